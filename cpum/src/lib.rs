//! CPU context layouts shared by Rust and world-switcher machine code.
//!
//! This crate models VirtualBox's CPUM structures as the raw-mode world
//! switchers read and write them: the VM-wide [`Cpum`] (`CPUM`), the per-VCPU
//! [`CpumCpu32`]/[`CpumCpu64`] (`CPUMCPU`) with its `Host`, `Guest` and `Hyper` contexts, the
//! 512-byte FXSAVE image, debug registers, [`UseFlags`] (`fUseFlags`),
//! `u32RetCode` and the local-APIC NMI masking state.
//!
//! Every type is `#[repr(C)]` with zerocopy derives, so a VM image can be
//! written as bytes and decoded back from a memory dump. Machine code takes its
//! displacements from [`core::mem::offset_of!`] on these types; the
//! compile-time asserts pin every offset the switchers use.
//!
//! The host context comes in two variants of one size, [`HostCtx32`] (legacy
//! and PAE hosts; `ss` directly after `esp` so one `lss` restores both) and
//! [`HostCtx64`] (AMD64 hosts). [`CpumCpu32`] and [`CpumCpu64`] are the two
//! per-VCPU structures; both place `guest`, `hyper` and the flag words at the same offsets.
//!
//! `CPUM ⇄ CPUMCPU` conversion uses self-relative byte offsets
//! ([`Cpum::off_cpumcpu0`], [`CpumCpu32::off_cpum`]), so the same arithmetic
//! works through any view (host ring-0, identity, hypervisor context).
//!
//! # Example
//!
//! ```
//! use core::mem::offset_of;
//! use cpum::{CpumCpu32, UseFlags, layout};
//!
//! // Displacements for machine code come from the layout, never typed twice.
//! let ebx = offset_of!(CpumCpu32, host.ebx);
//! assert_eq!(ebx, layout::HOST32_EBX);
//! // `lss esp, [host.esp]` needs SS right after ESP.
//! assert_eq!(offset_of!(CpumCpu32, host.ss), offset_of!(CpumCpu32, host.esp) + 4);
//!
//! let mut vcpu = CpumCpu32::default();
//! vcpu.use_flags = (UseFlags::SYNC_FPU_STATE | UseFlags::SYNC_DEBUG_STATE).bits();
//! assert!(vcpu.flags().contains(UseFlags::SYNC_FPU_STATE));
//! ```
#![no_std]

mod ctx;
mod fpu;
pub mod regs;

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub use ctx::{CpumCtx, HostCtx32, HostCtx64, SelSlot, CPUM_CTX_SIZE, HOST_CTX_SIZE};
pub use fpu::{FxSaveArea, StReg, XmmReg, FXSAVE_SIZE};

bitflags! {
    /// `fUseFlags`, in VirtualBox's 2.x–4.2 bit assignment (the revision the
    /// switchers of this project follow; 4.3 renumbered them).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct UseFlags: u32 {
        /// `CPUM_USED_FPU`: the guest FPU state is loaded; save it and restore
        /// the host's on the way back.
        const USED_FPU = 1 << 0;
        /// `CPUM_USED_FPU_SINCE_REM`.
        const USED_FPU_SINCE_REM = 1 << 1;
        /// `CPUM_USE_SYSENTER`: the host uses SYSENTER (SYSENTER_CS ≠ 0).
        const USE_SYSENTER = 1 << 2;
        /// `CPUM_USE_SYSCALL`: the host uses SYSCALL (EFER.SCE set).
        const USE_SYSCALL = 1 << 3;
        /// `CPUM_USE_DEBUG_REGS_HOST`: the host has live debug registers.
        const USE_DEBUG_REGS_HOST = 1 << 4;
        /// `CPUM_USE_DEBUG_REGS`: the hypervisor context uses debug registers.
        const USE_DEBUG_REGS = 1 << 5;
        /// `CPUM_MANUAL_XMM_RESTORE`.
        const MANUAL_XMM_RESTORE = 1 << 6;
        /// `CPUM_SYNC_FPU_STATE`: load `Guest.fpu` in the 64-bit context, then clear.
        const SYNC_FPU_STATE = 1 << 7;
        /// `CPUM_SYNC_DEBUG_STATE`: load Guest DR0–3 and DR6 in the 64-bit context, then clear.
        const SYNC_DEBUG_STATE = 1 << 8;
        /// `CPUM_USE_DEBUG_REGS_HYPER`.
        const USE_DEBUG_REGS_HYPER = 1 << 9;
    }
}

/// A host-context variant that can sit in a `CpumCpu*::host`.
pub trait HostContext:
    FromBytes + IntoBytes + KnownLayout + Immutable + Copy + Default + core::fmt::Debug
{
    /// Bitness of the host this context belongs to (32 or 64).
    const BITS: u32;
}

impl HostContext for HostCtx32 {
    const BITS: u32 = 32;
}
impl HostContext for HostCtx64 {
    const BITS: u32 = 64;
}

/// A host context kept as its raw bytes: what [`CpumCpuShared::host`] holds
/// when the host's width is not known or not of interest.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HostCtxBytes(pub [u8; HOST_CTX_SIZE]);

impl Default for HostCtxBytes {
    fn default() -> Self {
        Self([0; HOST_CTX_SIZE])
    }
}

impl HostContext for HostCtxBytes {
    /// Not a host width: the bytes belong to either variant.
    const BITS: u32 = 0;
}

/// The VM-wide CPUM data (`CPUM`).
#[repr(C, align(64))]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct Cpum {
    /// Byte offset from this structure to VCPU 0's `CpumCpu*` (`offCPUMCPU0`).
    pub off_cpumcpu0: u32,
    /// Byte stride between consecutive VCPUs' `CpumCpu*`.
    pub cb_cpumcpu: u32,
    /// Number of VCPUs.
    pub cpu_count: u32,
    /// Host facts (`fHostUseFlags`): [`UseFlags::USE_SYSENTER`], [`UseFlags::USE_SYSCALL`].
    pub host_use_flags: u32,
    /// Guest CR4 bits that pass into the hypervisor CR4 (`CR4.AndMask`).
    pub cr4_and_mask: u32,
    /// Bits forced on in the hypervisor CR4 (`CR4.OrMask`).
    pub cr4_or_mask: u32,
    /// CPUID leaf 1 EDX of the host.
    pub std_features_edx: u32,
    /// CPUID leaf 0x8000_0001 EDX of the host.
    pub ext_features_edx: u32,
    /// Hyper TSS selector of VCPU 0; VCPU *i* uses
    /// `hyper_tss_sel0 + i * HYPER_TSS_STRIDE`. Hypervisor-context code finds
    /// its `CpumCpu*` from TR with it.
    pub hyper_tss_sel0: u32,
    /// Reserved.
    pub reserved: [u32; 7],
}

macro_rules! cpumcpu {
    ($(#[$m:meta])* $name:ident, $host:ty) => {
        $(#[$m])*
        ///
        /// The per-VCPU CPUM data (`CPUMCPU`). Both host variants share one
        /// layout outside `host`; see [`layout`].
        #[repr(C, align(64))]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
        pub struct $name {
            /// State of the host, saved on the way out and restored on the way back.
            pub host: $host,
            /// Guest state the far side consumes (FPU/debug sync, CR0.EM, CR4 mask).
            pub guest: CpumCtx,
            /// The hypervisor context: GDT/IDT, stack, entry point, CR3, debug registers.
            pub hyper: CpumCtx,
            /// [`UseFlags`] bits.
            pub use_flags: u32,
            /// Return code of the 64-bit helper, kept across the return switch (`u32RetCode`).
            pub ret_code: u32,
            /// Byte offset from the owning [`Cpum`] to this structure (`offCPUM`);
            /// the switcher subtracts it to get back to `Cpum`.
            pub off_cpum: u32,
            /// LVTs the switcher masked (`fApicDisVectors`): 1 LINT0, 2 LINT1, 4 PC, 8 THMR, 16 CMCI.
            pub apic_dis_vectors: u32,
            /// Host-view address of this CPU's xAPIC page (`pvApicBase`); 0 disables masking.
            pub apic_base: u64,
            /// Non-zero when the host CPU runs its APIC in x2APIC mode (`fX2Apic`).
            pub x2apic: u32,
            /// The host APIC's version register (max-LVT index in bits
            /// 16..23), read once when the VMM is set up; revision C of the
            /// switchers masks the thermal LVT only when the max-LVT index is
            /// at least 5, without reading the register on every switch. 0:
            /// not read (no thermal LVT is assumed).
            pub apic_version: u32,
            /// The LVT values revision C found before masking (LINT0, LINT1,
            /// PC, THMR), written back to unmask the ones in
            /// `apic_dis_vectors`.
            pub apic_saved_lvt: [u32; 4],
            /// `/VMM/CPU<i>/Switcher/ToGC`: this VCPU's host → hypervisor
            /// context switches, in TSC ticks. Per VCPU so that switches on
            /// several host CPUs at once, each updating its own profile with
            /// plain stores, lose nothing; the VM-wide figure is their sum.
            pub stat_to_gc: stam::StamProfileAdv,
            /// `/VMM/CPU<i>/Switcher/ToHC`: this VCPU's way back, in TSC ticks.
            pub stat_to_hc: stam::StamProfileAdv,
        }

        impl Default for $name {
            fn default() -> Self {
                <Self as zerocopy::FromZeros>::new_zeroed()
            }
        }

        impl $name {
            /// Bitness of the host this context belongs to.
            pub const HOST_BITS: u32 = <$host as HostContext>::BITS;

            /// The [`UseFlags`] word, keeping bits this crate does not name.
            pub fn flags(&self) -> UseFlags {
                UseFlags::from_bits_retain(self.use_flags)
            }
        }
    };
}

/// The two concrete per-VCPU structures. zerocopy's `KnownLayout` derive adds
/// helper types without `Debug` when expanded through `macro_rules!`; they are
/// private to this module.
#[allow(missing_debug_implementations)]
mod vcpu {
    use super::*;

    cpumcpu!(
        /// Per-VCPU data of a 32-bit (legacy or PAE) host.
        CpumCpu32,
        HostCtx32
    );
    cpumcpu!(
        /// Per-VCPU data of a 64-bit (AMD64) host.
        CpumCpu64,
        HostCtx64
    );
    cpumcpu!(
        /// Per-VCPU data with the host context as opaque bytes: the fields
        /// both host widths share (`guest`, `hyper`, the flag words, the APIC
        /// state), for code that edits those and must not misread `host`.
        CpumCpuShared,
        HostCtxBytes
    );
}
pub use vcpu::{CpumCpu32, CpumCpu64, CpumCpuShared};

/// Size of [`Cpum`].
pub const CPUM_SIZE: usize = 64;

/// Selector distance between consecutive VCPUs' hyper TSS descriptors: 16
/// bytes, so each slot also holds a 64-bit TSS descriptor.
pub const HYPER_TSS_STRIDE: u16 = 16;
/// `log2(HYPER_TSS_STRIDE)`, the shift machine code uses.
pub const HYPER_TSS_STRIDE_SHIFT: u32 = HYPER_TSS_STRIDE.trailing_zeros();
/// Size of [`CpumCpu32`] and [`CpumCpu64`].
pub const CPUMCPU_SIZE: usize = 2624;

/// Offsets machine code uses, from `offset_of!`, with the pinned values asserted.
///
/// These are the displacements the switcher templates encode. They are the
/// same for both host variants except where the name says `HOST32`/`HOST64`.
pub mod layout {
    use core::mem::offset_of;

    use super::{Cpum, CpumCpu32, CpumCpu64, CpumCpuShared};

    macro_rules! pinned {
        ($($(#[$m:meta])* $name:ident = $ty:ty, $($field:ident).+ => $val:expr;)*) => {$(
            $(#[$m])*
            pub const $name: usize = offset_of!($ty, $($field).+);
            const _: () = assert!($name == $val, concat!("layout moved: ", stringify!($name)));
        )*};
    }

    pinned! {
        /// `Cpum::off_cpumcpu0`.
        CPUM_OFF_CPUMCPU0 = Cpum, off_cpumcpu0 => 0;
        /// `Cpum::host_use_flags`.
        CPUM_HOST_USE_FLAGS = Cpum, host_use_flags => 12;
        /// `Cpum::cr4_and_mask`.
        CPUM_CR4_AND_MASK = Cpum, cr4_and_mask => 16;
        /// `Cpum::cr4_or_mask`.
        CPUM_CR4_OR_MASK = Cpum, cr4_or_mask => 20;
        /// `Cpum::cb_cpumcpu`.
        CPUM_CB_CPUMCPU = Cpum, cb_cpumcpu => 4;
        /// `Cpum::hyper_tss_sel0`.
        CPUM_HYPER_TSS_SEL0 = Cpum, hyper_tss_sel0 => 32;

        /// Host EBX (32-bit host).
        HOST32_EBX = CpumCpu32, host.ebx => 512;
        /// Host EDI (32-bit host).
        HOST32_EDI = CpumCpu32, host.edi => 516;
        /// Host ESI (32-bit host).
        HOST32_ESI = CpumCpu32, host.esi => 520;
        /// Host EBP (32-bit host).
        HOST32_EBP = CpumCpu32, host.ebp => 524;
        /// Host EFLAGS (32-bit host).
        HOST32_EFLAGS = CpumCpu32, host.eflags => 528;
        /// Host ESP, followed by SS (32-bit host).
        HOST32_ESP = CpumCpu32, host.esp => 532;
        /// Host SS (32-bit host).
        HOST32_SS = CpumCpu32, host.ss => 536;
        /// Host GS (32-bit host).
        HOST32_GS = CpumCpu32, host.gs => 540;
        /// Host FS (32-bit host).
        HOST32_FS = CpumCpu32, host.fs => 544;
        /// Host ES (32-bit host).
        HOST32_ES = CpumCpu32, host.es => 548;
        /// Host DS (32-bit host).
        HOST32_DS = CpumCpu32, host.ds => 552;
        /// Host CR0 (32-bit host).
        HOST32_CR0 = CpumCpu32, host.cr0 => 560;
        /// Host CR3 (32-bit host).
        HOST32_CR3 = CpumCpu32, host.cr3 => 564;
        /// Host CR4 (32-bit host).
        HOST32_CR4 = CpumCpu32, host.cr4 => 568;
        /// Host DR0 (32-bit host).
        HOST32_DR0 = CpumCpu32, host.dr0 => 572;
        /// Host DR6 (32-bit host).
        HOST32_DR6 = CpumCpu32, host.dr6 => 588;
        /// Host DR7 (32-bit host).
        HOST32_DR7 = CpumCpu32, host.dr7 => 592;
        /// Host GDTR image (32-bit host).
        HOST32_GDTR = CpumCpu32, host.gdtr => 596;
        /// Host IDTR image (32-bit host).
        HOST32_IDTR = CpumCpu32, host.idtr => 604;
        /// Host LDTR (32-bit host).
        HOST32_LDTR = CpumCpu32, host.ldtr => 612;
        /// Host TR (32-bit host).
        HOST32_TR = CpumCpu32, host.tr => 616;
        /// Host SYSENTER_CS (32-bit host).
        HOST32_SYSENTER_CS = CpumCpu32, host.sysenter_cs => 624;
        /// Host EFER (32-bit host).
        HOST32_EFER = CpumCpu32, host.efer => 648;
        /// Host RBX (64-bit host).
        HOST64_RBX = CpumCpu64, host.rbx => 512;
        /// Host RSP (64-bit host).
        HOST64_RSP = CpumCpu64, host.rsp => 544;
        /// Host CR3 (64-bit host).
        HOST64_CR3 = CpumCpu64, host.cr3 => 640;
        /// Host EFER (64-bit host).
        HOST64_EFER = CpumCpu64, host.efer => 776;
        /// Host RDI (64-bit host).
        HOST64_RDI = CpumCpu64, host.rdi => 520;
        /// Host RSI (64-bit host).
        HOST64_RSI = CpumCpu64, host.rsi => 528;
        /// Host RBP (64-bit host).
        HOST64_RBP = CpumCpu64, host.rbp => 536;
        /// Host R10–R15 (64-bit host).
        HOST64_R10 = CpumCpu64, host.r10_r15 => 552;
        /// Host RFLAGS (64-bit host).
        HOST64_RFLAGS = CpumCpu64, host.rflags => 600;
        /// Host SS (64-bit host).
        HOST64_SS = CpumCpu64, host.ss => 608;
        /// Host GS (64-bit host).
        HOST64_GS = CpumCpu64, host.gs => 612;
        /// Host FS (64-bit host).
        HOST64_FS = CpumCpu64, host.fs => 616;
        /// Host ES (64-bit host).
        HOST64_ES = CpumCpu64, host.es => 620;
        /// Host DS (64-bit host).
        HOST64_DS = CpumCpu64, host.ds => 624;
        /// Host CR0 (64-bit host).
        HOST64_CR0 = CpumCpu64, host.cr0 => 632;
        /// Host CR4 (64-bit host).
        HOST64_CR4 = CpumCpu64, host.cr4 => 648;
        /// Host DR0–DR3 (64-bit host).
        HOST64_DR0 = CpumCpu64, host.dr0_3 => 664;
        /// Host DR6 (64-bit host).
        HOST64_DR6 = CpumCpu64, host.dr6 => 696;
        /// Host DR7 (64-bit host).
        HOST64_DR7 = CpumCpu64, host.dr7 => 704;
        /// Host GDTR image (64-bit host).
        HOST64_GDTR = CpumCpu64, host.gdtr => 712;
        /// Host IDTR image (64-bit host).
        HOST64_IDTR = CpumCpu64, host.idtr => 728;
        /// Host LDTR (64-bit host).
        HOST64_LDTR = CpumCpu64, host.ldtr => 744;
        /// Host TR (64-bit host).
        HOST64_TR = CpumCpu64, host.tr => 748;
        /// Host SYSENTER_CS (64-bit host).
        HOST64_SYSENTER_CS = CpumCpu64, host.sysenter_cs => 752;
        /// Host FS.base (64-bit host).
        HOST64_FS_BASE = CpumCpu64, host.fs_base => 784;
        /// Host GS.base (64-bit host).
        HOST64_GS_BASE = CpumCpu64, host.gs_base => 792;
        /// Host DR1 (32-bit host).
        HOST32_DR1 = CpumCpu32, host.dr1 => 576;
        /// Host DR2 (32-bit host).
        HOST32_DR2 = CpumCpu32, host.dr2 => 580;
        /// Host DR3 (32-bit host).
        HOST32_DR3 = CpumCpu32, host.dr3 => 584;
        /// Host FXSAVE image (32-bit host).
        HOST32_FPU = CpumCpu32, host.fpu => 0;
        /// `Hyper.rax`.
        HYPER_RAX = CpumCpu32, hyper.rax => 2176;
        /// `Hyper.rbx`.
        HYPER_RBX = CpumCpu32, hyper.rbx => 2184;
        /// `Hyper.rcx`.
        HYPER_RCX = CpumCpu32, hyper.rcx => 2192;
        /// `Hyper.rdx`.
        HYPER_RDX = CpumCpu32, hyper.rdx => 2200;
        /// `Hyper.rsi`.
        HYPER_RSI = CpumCpu32, hyper.rsi => 2208;
        /// `Hyper.rdi`.
        HYPER_RDI = CpumCpu32, hyper.rdi => 2216;
        /// `Hyper.rbp`.
        HYPER_RBP = CpumCpu32, hyper.rbp => 2224;
        /// `Hyper.r[0]` (R8; R9–R15 follow).
        HYPER_R8 = CpumCpu32, hyper.r => 2240;
        /// `Hyper.rflags`.
        HYPER_RFLAGS = CpumCpu32, hyper.rflags => 2312;
        /// `Hyper.ldtr`.
        HYPER_LDTR = CpumCpu32, hyper.ldtr => 2344;
        /// `Hyper.tr`.
        HYPER_TR = CpumCpu32, hyper.tr => 2348;
        /// `Guest` context.
        GUEST = CpumCpu32, guest => 832;
        /// `Guest.fpu` (the FXSAVE image; also the helper's context pointer).
        GUEST_FPU = CpumCpu32, guest.fpu => 832;
        /// `Guest.cr0`.
        GUEST_CR0 = CpumCpu32, guest.cr0 => 1552;
        /// `Guest.cr4`.
        GUEST_CR4 = CpumCpu32, guest.cr4 => 1576;
        /// `Guest.dr[0]`.
        GUEST_DR = CpumCpu32, guest.dr => 1584;
        /// `Hyper` context.
        HYPER = CpumCpu32, hyper => 1664;
        /// `Hyper.rsp`.
        HYPER_RSP = CpumCpu32, hyper.rsp => 2232;
        /// `Hyper.rip` (`Hyper.eip`).
        HYPER_RIP = CpumCpu32, hyper.rip => 2304;
        /// `Hyper.gdtr`.
        HYPER_GDTR = CpumCpu32, hyper.gdtr => 2352;
        /// `Hyper.idtr`.
        HYPER_IDTR = CpumCpu32, hyper.idtr => 2368;
        /// `Hyper.cr3`.
        HYPER_CR3 = CpumCpu32, hyper.cr3 => 2400;
        /// `Hyper.dr[0]`.
        HYPER_DR = CpumCpu32, hyper.dr => 2416;
        /// `Hyper.lss_esp`, followed by `Hyper.lss_ss`.
        HYPER_LSS_ESP = CpumCpu32, hyper.lss_esp => 2488;
        /// `Hyper.lss_ss`.
        HYPER_LSS_SS = CpumCpu32, hyper.lss_ss => 2492;
        /// `fUseFlags`.
        USE_FLAGS = CpumCpu32, use_flags => 2496;
        /// `u32RetCode`.
        RET_CODE = CpumCpu32, ret_code => 2500;
        /// `offCPUM`.
        OFF_CPUM = CpumCpu32, off_cpum => 2504;
        /// `fApicDisVectors`.
        APIC_DIS_VECTORS = CpumCpu32, apic_dis_vectors => 2508;
        /// `pvApicBase`.
        APIC_BASE = CpumCpu32, apic_base => 2512;
        /// `fX2Apic`.
        X2APIC = CpumCpu32, x2apic => 2520;
        /// The host APIC's version register, read at set-up.
        APIC_VERSION = CpumCpu32, apic_version => 2524;
        /// The LVT values before masking (`[u32; 4]`: LINT0, LINT1, PC, THMR).
        APIC_SAVED_LVT = CpumCpu32, apic_saved_lvt => 2528;
        /// This VCPU's ToGC profile (`StamProfileAdv`).
        STAT_TO_GC = CpumCpu32, stat_to_gc => 2544;
        /// This VCPU's ToHC profile (`StamProfileAdv`).
        STAT_TO_HC = CpumCpu32, stat_to_hc => 2584;
    }

    macro_rules! same_for_both_hosts {
        ($($($field:ident).+),*) => {$(
            const _: () = assert!(
                offset_of!(CpumCpu32, $($field).+) == offset_of!(CpumCpu64, $($field).+)
                    && offset_of!(CpumCpu32, $($field).+)
                        == offset_of!(CpumCpuShared, $($field).+)
            );
        )*};
    }
    same_for_both_hosts!(
        host,
        guest,
        hyper,
        use_flags,
        ret_code,
        off_cpum,
        apic_dis_vectors,
        apic_base,
        x2apic,
        apic_version,
        apic_saved_lvt,
        stat_to_gc,
        stat_to_hc
    );

    /// A structure offset as a 32-bit displacement for an x86 memory operand.
    pub const fn disp(off: usize) -> i32 {
        assert!(off <= i32::MAX as usize);
        off as i32
    }
}

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<Cpum>() == CPUM_SIZE);
    assert!(size_of::<CpumCpu32>() == CPUMCPU_SIZE);
    assert!(size_of::<CpumCpu64>() == CPUMCPU_SIZE);
    assert!(size_of::<CpumCpuShared>() == CPUMCPU_SIZE);
    assert!(align_of::<CpumCpu32>() == 64);
    // FXSAVE/FXRSTOR need 16-byte alignment of every image.
    assert!(layout::GUEST_FPU % 16 == 0);
    assert!(layout::HYPER % 16 == 0);
};

/// Byte offset of VCPU `index`'s `CpumCpu*` from [`Cpum`] when the VCPUs are
/// laid out back to back right after `Cpum` (the arrangement this project uses).
///
/// Returns `None` if the offset would not fit in a u32.
pub fn cpumcpu_offset(first: u32, index: u32) -> Option<u32> {
    index
        .checked_mul(u32::try_from(CPUMCPU_SIZE).ok()?)?
        .checked_add(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn host_variants_share_every_non_host_offset() {
        assert_eq!(
            offset_of!(CpumCpu32, hyper.rip),
            offset_of!(CpumCpu64, hyper.rip)
        );
        assert_eq!(offset_of!(CpumCpu32, host.fpu), 0);
        assert_eq!(offset_of!(CpumCpu64, host.fpu), 0);
    }

    #[test]
    fn bytes_round_trip_through_zerocopy() {
        let mut v = CpumCpu32::default();
        v.host.esp = 0x1234_5678;
        v.host.ss = SelSlot::new(0x10);
        v.hyper.rip = 0xa000_2000;
        v.use_flags = UseFlags::SYNC_DEBUG_STATE.bits();
        let bytes = v.as_bytes();
        assert_eq!(bytes.len(), CPUMCPU_SIZE);
        assert_eq!(
            &bytes[layout::HOST32_ESP..layout::HOST32_ESP + 6],
            &[0x78, 0x56, 0x34, 0x12, 0x10, 0x00]
        );
        let back = CpumCpu32::read_from_bytes(bytes).ok();
        assert_eq!(back, Some(v));
        assert_eq!(back.map(|b| b.flags()), Some(UseFlags::SYNC_DEBUG_STATE));
    }

    #[test]
    fn offsets_of_vcpus() {
        assert_eq!(cpumcpu_offset(64, 0), Some(64));
        assert_eq!(cpumcpu_offset(64, 3), Some(64 + 3 * 2624));
        assert_eq!(cpumcpu_offset(u32::MAX, 1), None);
    }

    #[test]
    fn use_flags_keep_unknown_bits() {
        let mut v = CpumCpu64::default();
        v.use_flags = (1 << 20) | UseFlags::USED_FPU.bits();
        assert_eq!(v.flags().bits(), (1 << 20) | 1);
    }
}
