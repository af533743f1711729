//! Guest/hyper CPU context (`CPUMCTX`) and the two host-context variants (`CPUMHOSTCTX`).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::fpu::FxSaveArea;
use crate::regs::{Xdtr32, Xdtr64};

/// A segment selector slot: the 16-bit selector `mov m16, sreg` stores, padded to 4 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct SelSlot {
    /// The selector.
    pub sel: u16,
    /// Padding.
    pub pad: u16,
}

impl SelSlot {
    /// A slot holding `sel`.
    pub const fn new(sel: u16) -> Self {
        Self { sel, pad: 0 }
    }
}

/// A full CPU context as the switchers load and save it for the guest and for
/// the hypervisor side (`CPUMCTX`). 64-bit wide so the same layout serves 32-bit
/// and 64-bit hypervisor contexts; 32-bit code uses the low dwords.
///
/// `fpu` sits at offset 0, so a pointer to the context is also a pointer to its
/// FXSAVE image (the helper argument the 32→AMD64 switcher passes).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct CpumCtx {
    /// FXSAVE image.
    pub fpu: FxSaveArea,
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// RSP (ESP in the low dword).
    pub rsp: u64,
    /// R8–R15.
    pub r: [u64; 8],
    /// RIP: where the hypervisor context starts executing (`Hyper.eip`).
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CS.
    pub cs: SelSlot,
    /// DS.
    pub ds: SelSlot,
    /// ES.
    pub es: SelSlot,
    /// FS.
    pub fs: SelSlot,
    /// GS.
    pub gs: SelSlot,
    /// SS.
    pub ss: SelSlot,
    /// LDTR.
    pub ldtr: SelSlot,
    /// TR.
    pub tr: SelSlot,
    /// GDTR (first six bytes double as a 32-bit pseudo-descriptor).
    pub gdtr: Xdtr64,
    /// IDTR.
    pub idtr: Xdtr64,
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// DR0–DR7 (DR4/DR5 unused).
    pub dr: [u64; 8],
    /// EFER.
    pub efer: u64,
    /// Stack offset for one `lss`: the switcher copies `rsp`'s low dword here.
    pub lss_esp: u32,
    /// Stack selector for the same `lss` (directly after `lss_esp`).
    pub lss_ss: SelSlot,
}

/// Size of [`CpumCtx`].
pub const CPUM_CTX_SIZE: usize = 832;

/// Size shared by both host-context variants, so the rest of [`crate::CpumCpu32`]
/// has one layout whatever the host's bitness.
pub const HOST_CTX_SIZE: usize = 832;

/// Host context saved by switchers running on a 32-bit (legacy or PAE) host
/// (`CPUMHOSTCTX`, 32-bit build). EAX, ECX and EDX are scratch and not saved.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HostCtx32 {
    /// Host FXSAVE image (lazy FPU switching).
    pub fpu: FxSaveArea,
    /// EBX.
    pub ebx: u32,
    /// EDI.
    pub edi: u32,
    /// ESI.
    pub esi: u32,
    /// EBP.
    pub ebp: u32,
    /// EFLAGS.
    pub eflags: u32,
    /// ESP; `ss` follows directly so one `lss esp, [esp_slot]` restores both.
    pub esp: u32,
    /// SS.
    pub ss: SelSlot,
    /// GS.
    pub gs: SelSlot,
    /// FS.
    pub fs: SelSlot,
    /// ES.
    pub es: SelSlot,
    /// DS.
    pub ds: SelSlot,
    /// CS.
    pub cs: SelSlot,
    /// CR0.
    pub cr0: u32,
    /// CR3.
    pub cr3: u32,
    /// CR4.
    pub cr4: u32,
    /// DR0.
    pub dr0: u32,
    /// DR1.
    pub dr1: u32,
    /// DR2.
    pub dr2: u32,
    /// DR3.
    pub dr3: u32,
    /// DR6.
    pub dr6: u32,
    /// DR7.
    pub dr7: u32,
    /// GDTR as `sgdt` stores it.
    pub gdtr: Xdtr32,
    /// IDTR as `sidt` stores it.
    pub idtr: Xdtr32,
    /// LDTR.
    pub ldtr: SelSlot,
    /// TR.
    pub tr: SelSlot,
    /// Padding.
    pub pad0: u32,
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// EFER (low dword at +0, high at +4).
    pub efer: u64,
    /// Padding to [`HOST_CTX_SIZE`].
    pub pad1: [u8; HOST_CTX_SIZE - 656],
}

/// Host context saved by switchers running on a 64-bit (AMD64) host.
/// RAX, RCX, RDX, R8 and R9 are scratch and not saved.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HostCtx64 {
    /// Host FXSAVE image.
    pub fpu: FxSaveArea,
    /// RBX.
    pub rbx: u64,
    /// RDI.
    pub rdi: u64,
    /// RSI.
    pub rsi: u64,
    /// RBP.
    pub rbp: u64,
    /// RSP.
    pub rsp: u64,
    /// R10–R15.
    pub r10_r15: [u64; 6],
    /// RFLAGS.
    pub rflags: u64,
    /// SS.
    pub ss: SelSlot,
    /// GS.
    pub gs: SelSlot,
    /// FS.
    pub fs: SelSlot,
    /// ES.
    pub es: SelSlot,
    /// DS.
    pub ds: SelSlot,
    /// CS.
    pub cs: SelSlot,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (TPR).
    pub cr8: u64,
    /// DR0–DR3.
    pub dr0_3: [u64; 4],
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
    /// GDTR as 64-bit `sgdt` stores it.
    pub gdtr: Xdtr64,
    /// IDTR as 64-bit `sidt` stores it.
    pub idtr: Xdtr64,
    /// LDTR.
    pub ldtr: SelSlot,
    /// TR.
    pub tr: SelSlot,
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// EFER.
    pub efer: u64,
    /// FS base (MSR 0xC000_0100).
    pub fs_base: u64,
    /// GS base (MSR 0xC000_0101).
    pub gs_base: u64,
    /// Padding to [`HOST_CTX_SIZE`].
    pub pad1: [u8; HOST_CTX_SIZE - 800],
}

macro_rules! zeroed_default {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                <Self as zerocopy::FromZeros>::new_zeroed()
            }
        }
    )*};
}
zeroed_default!(CpumCtx, HostCtx32, HostCtx64);

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<CpumCtx>() == CPUM_CTX_SIZE);
    assert!(size_of::<HostCtx32>() == HOST_CTX_SIZE);
    assert!(size_of::<HostCtx64>() == HOST_CTX_SIZE);
    // The pinned CPUMCTX layout machine code reads.
    assert!(offset_of!(CpumCtx, fpu) == 0);
    assert!(offset_of!(CpumCtx, rax) == 512);
    assert!(offset_of!(CpumCtx, rsp) == 568);
    assert!(offset_of!(CpumCtx, rip) == 640);
    assert!(offset_of!(CpumCtx, rflags) == 648);
    assert!(offset_of!(CpumCtx, cs) == 656);
    assert!(offset_of!(CpumCtx, ldtr) == 680);
    assert!(offset_of!(CpumCtx, tr) == 684);
    assert!(offset_of!(CpumCtx, gdtr) == 688);
    assert!(offset_of!(CpumCtx, idtr) == 704);
    assert!(offset_of!(CpumCtx, cr0) == 720);
    assert!(offset_of!(CpumCtx, cr3) == 736);
    assert!(offset_of!(CpumCtx, dr) == 752);
    assert!(offset_of!(CpumCtx, efer) == 816);
    assert!(offset_of!(CpumCtx, lss_esp) == 824);
    assert!(offset_of!(CpumCtx, lss_ss) == offset_of!(CpumCtx, lss_esp) + 4);
    // 32-bit host context: VirtualBox's CPUMHOSTCTX order.
    assert!(offset_of!(HostCtx32, ebx) == 512);
    assert!(offset_of!(HostCtx32, edi) == 516);
    assert!(offset_of!(HostCtx32, esi) == 520);
    assert!(offset_of!(HostCtx32, ebp) == 524);
    assert!(offset_of!(HostCtx32, eflags) == 528);
    assert!(offset_of!(HostCtx32, esp) == 532);
    assert!(offset_of!(HostCtx32, ss) == offset_of!(HostCtx32, esp) + 4);
    assert!(offset_of!(HostCtx32, ss) == 536);
    assert!(offset_of!(HostCtx32, cs) == 556);
    assert!(offset_of!(HostCtx32, cr0) == 560);
    assert!(offset_of!(HostCtx32, cr4) == 568);
    assert!(offset_of!(HostCtx32, dr0) == 572);
    assert!(offset_of!(HostCtx32, dr7) == 592);
    assert!(offset_of!(HostCtx32, gdtr) == 596);
    assert!(offset_of!(HostCtx32, idtr) == 604);
    assert!(offset_of!(HostCtx32, ldtr) == 612);
    assert!(offset_of!(HostCtx32, tr) == 616);
    assert!(offset_of!(HostCtx32, sysenter_cs) == 624);
    assert!(offset_of!(HostCtx32, efer) == 648);
    // 64-bit host context.
    assert!(offset_of!(HostCtx64, rbx) == 512);
    assert!(offset_of!(HostCtx64, rflags) == 600);
    assert!(offset_of!(HostCtx64, ss) == 608);
    assert!(offset_of!(HostCtx64, cr0) == 632);
    assert!(offset_of!(HostCtx64, dr0_3) == 664);
    assert!(offset_of!(HostCtx64, gdtr) == 712);
    assert!(offset_of!(HostCtx64, idtr) == 728);
    assert!(offset_of!(HostCtx64, ldtr) == 744);
    assert!(offset_of!(HostCtx64, efer) == 776);
    assert!(offset_of!(HostCtx64, gs_base) == 792);
};
