//! Named bits of the control registers, EFER and EFLAGS (SDM Vol. 3A §2.5, §2.2.1; Vol. 1 §3.4.3).
//!
//! Every decoder keeps bits it does not name: construct with
//! `from_bits_retain` so that a round trip through these types never drops
//! a reserved or future bit.

use bitflags::bitflags;

bitflags! {
    /// CR0 (SDM Vol. 3A §2.5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Cr0: u64 {
        /// Protection enable.
        const PE = 1 << 0;
        /// Monitor coprocessor.
        const MP = 1 << 1;
        /// x87 emulation.
        const EM = 1 << 2;
        /// Task switched (lazy FPU).
        const TS = 1 << 3;
        /// Extension type (always 1 on modern CPUs).
        const ET = 1 << 4;
        /// Numeric error reporting via #MF.
        const NE = 1 << 5;
        /// Supervisor write protection.
        const WP = 1 << 16;
        /// Alignment mask.
        const AM = 1 << 18;
        /// Not write-through.
        const NW = 1 << 29;
        /// Cache disable.
        const CD = 1 << 30;
        /// Paging.
        const PG = 1 << 31;
    }
}

bitflags! {
    /// CR4 (SDM Vol. 3A §2.5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Cr4: u64 {
        /// Virtual-8086 mode extensions.
        const VME = 1 << 0;
        /// Protected-mode virtual interrupts.
        const PVI = 1 << 1;
        /// RDTSC restricted to ring 0.
        const TSD = 1 << 2;
        /// Debugging extensions (DR4/DR5 fault, I/O breakpoints).
        const DE = 1 << 3;
        /// 4 MiB pages in 32-bit paging.
        const PSE = 1 << 4;
        /// Physical address extension.
        const PAE = 1 << 5;
        /// Machine-check enable.
        const MCE = 1 << 6;
        /// Global pages.
        const PGE = 1 << 7;
        /// Performance-counter enable.
        const PCE = 1 << 8;
        /// OS supports FXSAVE/FXRSTOR.
        const OSFXSR = 1 << 9;
        /// OS supports unmasked SIMD exceptions.
        const OSXMMEXCPT = 1 << 10;
        /// User-mode instruction prevention.
        const UMIP = 1 << 11;
        /// 57-bit linear addresses.
        const LA57 = 1 << 12;
        /// VMX enable.
        const VMXE = 1 << 13;
        /// SMX enable.
        const SMXE = 1 << 14;
        /// RDFSBASE and friends.
        const FSGSBASE = 1 << 16;
        /// PCID enable.
        const PCIDE = 1 << 17;
        /// XSAVE and processor extended states.
        const OSXSAVE = 1 << 18;
        /// Supervisor-mode execution prevention.
        const SMEP = 1 << 20;
        /// Supervisor-mode access prevention.
        const SMAP = 1 << 21;
        /// Protection keys for user pages.
        const PKE = 1 << 22;
    }
}

bitflags! {
    /// IA32_EFER, MSR 0xC000_0080 (SDM Vol. 3A §2.2.1; AMD `MSR_K6_EFER`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Efer: u64 {
        /// SYSCALL/SYSRET enable.
        const SCE = 1 << 0;
        /// Long mode enable.
        const LME = 1 << 8;
        /// Long mode active (read-only).
        const LMA = 1 << 10;
        /// No-execute enable.
        const NXE = 1 << 11;
        /// Secure virtual machine enable (AMD).
        const SVME = 1 << 12;
        /// Long mode segment limit enable (AMD).
        const LMSLE = 1 << 13;
        /// Fast FXSAVE/FXRSTOR: skips XMM state in ring 0 (AMD).
        const FFXSR = 1 << 14;
    }
}

/// MSR number of IA32_EFER.
pub const MSR_EFER: u32 = 0xc000_0080;
/// MSR number of IA32_SYSENTER_CS.
pub const MSR_SYSENTER_CS: u32 = 0x174;
/// MSR number of IA32_STAR (SYSCALL/SYSRET selectors).
pub const MSR_STAR: u32 = 0xc000_0081;
/// MSR number of IA32_LSTAR (64-bit SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// MSR number of IA32_FMASK (RFLAGS bits SYSCALL clears).
pub const MSR_SFMASK: u32 = 0xc000_0084;
/// MSR number of IA32_FS_BASE.
pub const MSR_FS_BASE: u32 = 0xc000_0100;
/// MSR number of IA32_GS_BASE.
pub const MSR_GS_BASE: u32 = 0xc000_0101;
/// MSR number of IA32_KERNEL_GS_BASE (the value SWAPGS exchanges with GS.base).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

bitflags! {
    /// EFLAGS/RFLAGS (SDM Vol. 1 §3.4.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Eflags: u64 {
        /// Carry.
        const CF = 1 << 0;
        /// Always one.
        const RA1 = 1 << 1;
        /// Parity.
        const PF = 1 << 2;
        /// Auxiliary carry.
        const AF = 1 << 4;
        /// Zero.
        const ZF = 1 << 6;
        /// Sign.
        const SF = 1 << 7;
        /// Trap (single step).
        const TF = 1 << 8;
        /// Interrupt enable.
        const IF = 1 << 9;
        /// Direction.
        const DF = 1 << 10;
        /// Overflow.
        const OF = 1 << 11;
        /// I/O privilege level, bit 0.
        const IOPL0 = 1 << 12;
        /// I/O privilege level, bit 1.
        const IOPL1 = 1 << 13;
        /// Nested task.
        const NT = 1 << 14;
        /// Resume.
        const RF = 1 << 16;
        /// Virtual-8086 mode.
        const VM = 1 << 17;
        /// Alignment check / access control.
        const AC = 1 << 18;
        /// Virtual interrupt flag.
        const VIF = 1 << 19;
        /// Virtual interrupt pending.
        const VIP = 1 << 20;
        /// CPUID available.
        const ID = 1 << 21;
    }
}

/// DR6 value after reset and what the switchers load into DR6 (`X86_DR6_INIT_VAL`).
pub const DR6_INIT: u64 = 0xffff_0ff0;
/// DR7 value after reset (`X86_DR7_INIT_VAL`).
pub const DR7_INIT: u64 = 0x400;

/// A pseudo-descriptor as `sgdt`/`sidt` store it in 32-bit code: limit, then a
/// 32-bit base (6 bytes), padded to 8. Alignment 1 for the base keeps the
/// layout byte-exact.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::KnownLayout,
    zerocopy::Immutable,
)]
pub struct Xdtr32 {
    /// Table limit (size − 1).
    pub limit: u16,
    /// Linear base address.
    pub base: zerocopy::little_endian::U32,
    /// Padding to 8 bytes.
    pub pad: u16,
}

/// A pseudo-descriptor as 64-bit code stores it: limit, then a 64-bit base
/// (10 bytes), padded to 16. Its first six bytes also form a valid 32-bit
/// pseudo-descriptor for a base below 4 GiB, so one image serves `lgdt` in
/// either mode.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::KnownLayout,
    zerocopy::Immutable,
)]
pub struct Xdtr64 {
    /// Table limit (size − 1).
    pub limit: u16,
    /// Linear base address.
    pub base: zerocopy::little_endian::U64,
    /// Padding to 16 bytes.
    pub pad: [u8; 6],
}

impl Xdtr32 {
    /// A pseudo-descriptor for `base` with `limit`.
    pub fn new(base: u32, limit: u16) -> Self {
        Self {
            limit,
            base: base.into(),
            pad: 0,
        }
    }
}

impl Xdtr64 {
    /// A pseudo-descriptor for `base` with `limit`.
    pub fn new(base: u64, limit: u16) -> Self {
        Self {
            limit,
            base: base.into(),
            pad: [0; 6],
        }
    }
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Xdtr32>() == 8);
    assert!(offset_of!(Xdtr32, base) == 2);
    assert!(size_of::<Xdtr64>() == 16);
    assert!(offset_of!(Xdtr64, base) == 2);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_bits_survive() {
        let raw = 0x8001_003b | (1 << 40);
        let cr0 = Cr0::from_bits_retain(raw);
        assert!(cr0.contains(Cr0::PG | Cr0::WP | Cr0::TS | Cr0::PE));
        assert_eq!(cr0.bits(), raw);
        let efer = Efer::from_bits_retain(0xd01 | (1 << 20));
        assert!(efer.contains(Efer::SCE | Efer::LME | Efer::LMA | Efer::NXE));
        assert_eq!(efer.bits() & (1 << 20), 1 << 20);
        let cr4 = Cr4::from_bits_retain(0x6f0 | (1 << 30));
        assert!(cr4.contains(Cr4::PAE | Cr4::PGE | Cr4::OSFXSR | Cr4::OSXMMEXCPT));
        assert_eq!(cr4.bits() >> 30, 1);
    }

    #[test]
    fn xdtr_images_are_byte_exact() {
        use zerocopy::IntoBytes;
        let g = Xdtr32::new(0x0012_3456, 0x2f);
        assert_eq!(g.as_bytes(), &[0x2f, 0, 0x56, 0x34, 0x12, 0, 0, 0]);
        let g = Xdtr64::new(0xa000_1000, 0xffff);
        assert_eq!(&g.as_bytes()[..6], &[0xff, 0xff, 0x00, 0x10, 0x00, 0xa0]);
    }
}
