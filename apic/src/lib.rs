//! The local APIC as data: register offsets, LVT fields, version decoding and
//! the world switcher's NMI-masking rule, for xAPIC (MMIO) and x2APIC (MSR)
//! access behind one trait.
//!
//! A raw-mode world switcher must not take a host NMI while it runs in the
//! intermediate or hypervisor context, so on its way out it masks every local
//! vector table (LVT) entry that would deliver an NMI, remembers which ones it
//! masked in a bitmask, and unmasks exactly those on the way back. VirtualBox
//! does this under `VBOX_WITH_VMMR0_DISABLE_LAPIC_NMI`, keeping the bitmask in
//! `CPUMCPU::fApicDisVectors` (here [`DisVectors`]). This crate states the rule
//! once, in Rust, so it can be unit-tested here and emitted as machine code by
//! the switcher templates:
//!
//! - [`reg`] and [`lvt`] name the registers and LVT bits (Intel SDM Vol. 3A,
//!   APIC chapter: "Local Vector Table", "Local APIC Version Register"; the
//!   chapter is numbered 10 or 11 depending on the edition).
//! - [`CmciPolicy`] picks the candidate LVTs from the version register's
//!   max-LVT field, in the two revisions VirtualBox shipped.
//! - [`mask_nmi_lvts`] and [`restore_nmi_lvts`] apply the rule through any
//!   [`ApicAccess`]: [`XApicMmio`] (a 4 KiB register page), [`X2Apic`]
//!   (MSR `0x800 + offset/16`, SDM "x2APIC Register Address Space") or the in-memory [`RegisterFile`].
//!
//! The crate is `no_std` and allocation-free.
//!
//! # Example
//!
//! ```
//! use apic::{lvt, mask_nmi_lvts, reg, restore_nmi_lvts, ApicAccess, CmciPolicy, DisVectors, RegisterFile};
//!
//! let mut apic = RegisterFile::new();
//! // An integrated APIC (version 0x14) with max LVT index 5: LINT0..PC plus THMR.
//! apic.set(reg::VERSION, (5 << 16) | 0x14)?;
//! apic.set(reg::LVT_LINT0, lvt::MODE_EXTINT)?; // ExtINT: left alone
//! apic.set(reg::LVT_LINT1, lvt::MODE_NMI)?; // unmasked NMI: masked by the switcher
//! apic.set(reg::LVT_PC, lvt::MODE_NMI | lvt::MASKED)?; // masked on purpose: left alone
//! apic.set(reg::LVT_THMR, lvt::MODE_NMI)?;
//!
//! let masked = mask_nmi_lvts(&mut apic, CmciPolicy::Mask)?;
//! assert_eq!(masked, DisVectors::LINT1 | DisVectors::THMR);
//! assert!(lvt::is_masked(apic.read(reg::LVT_LINT1)?));
//!
//! restore_nmi_lvts(&mut apic, masked)?;
//! assert_eq!(apic.read(reg::LVT_LINT1)?, lvt::MODE_NMI);
//! assert_eq!(apic.read(reg::LVT_PC)?, lvt::MODE_NMI | lvt::MASKED);
//! # Ok::<(), apic::OffsetError>(())
//! ```
#![no_std]

#[cfg(test)]
extern crate std;

mod access;
pub mod lvt;
mod mask;

pub use access::{
    check_offset, ApicAccess, MsrAccess, OffsetError, RegisterFile, X2Apic, X2ApicError, XApicMmio,
    XApicPageError, XAPIC_REGISTER_SPAN,
};
pub use lvt::DeliveryMode;
pub use mask::{mask_nmi_lvts, restore_nmi_lvts, CmciPolicy, NmiLvt};

use bitflags::bitflags;

/// xAPIC register offsets inside the 4 KiB APIC page (SDM Vol. 3A, "Local
/// APIC Register Address Map"). Each register is 32 bits wide on a 16-byte boundary.
pub mod reg {
    /// Local APIC ID register.
    pub const ID: u32 = 0x020;
    /// Local APIC version register: version in bits 7:0, max LVT index in bits 23:16.
    pub const VERSION: u32 = 0x030;
    /// Task priority register.
    pub const TPR: u32 = 0x080;
    /// End-of-interrupt register (write-only).
    pub const EOI: u32 = 0x0b0;
    /// Spurious-interrupt vector register.
    pub const SVR: u32 = 0x0f0;
    /// LVT corrected machine-check interrupt (CMCI) register; present when max LVT ≥ 6.
    pub const LVT_CMCI: u32 = 0x2f0;
    /// LVT timer register.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT thermal sensor register; present when max LVT ≥ 5.
    pub const LVT_THMR: u32 = 0x330;
    /// LVT performance-monitoring counters register.
    pub const LVT_PC: u32 = 0x340;
    /// LVT LINT0 register.
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT LINT1 register.
    pub const LVT_LINT1: u32 = 0x360;
    /// LVT error register (never touched by the masking rule).
    pub const LVT_ERR: u32 = 0x370;
}

/// First x2APIC MSR (`MSR_IA32_X2APIC_START`); SDM Vol. 3A, "x2APIC Register Address Space".
pub const X2APIC_MSR_BASE: u32 = 0x800;

/// The x2APIC MSR that holds the register at `xapic_offset` in the xAPIC page:
/// `0x800 + (offset >> 4)`.
///
/// No range check is made; see [`check_offset`] for one.
pub const fn x2apic_msr(xapic_offset: u32) -> u32 {
    X2APIC_MSR_BASE + (xapic_offset >> 4)
}

/// `IA32_APIC_BASE` MSR number.
pub const APIC_BASE_MSR: u32 = 0x1b;
/// `IA32_APIC_BASE.BSP` (bit 8): this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// `IA32_APIC_BASE.EXTD` (bit 10): x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// `IA32_APIC_BASE.EN` (bit 11): the APIC is enabled.
pub const APIC_BASE_EN: u64 = 1 << 11;

/// Whether an `IA32_APIC_BASE` value selects x2APIC mode: both EN and EXTD
/// set, as `CPUMR0` decides `fX2Apic`.
pub const fn is_x2apic_mode(apic_base_msr: u64) -> bool {
    apic_base_msr & (APIC_BASE_EN | APIC_BASE_EXTD) == APIC_BASE_EN | APIC_BASE_EXTD
}

/// Physical address of the xAPIC page from an `IA32_APIC_BASE` value: bits
/// 12 up to `max_phys_bits − 1` (MAXPHYADDR from CPUID 0x8000_0008; VirtualBox
/// defaults to 36 when the leaf is missing). `max_phys_bits` is clamped to 12..=52.
pub const fn apic_base_phys(apic_base_msr: u64, max_phys_bits: u8) -> u64 {
    let bits = if max_phys_bits < 12 {
        12
    } else if max_phys_bits > 52 {
        52
    } else {
        max_phys_bits
    };
    let mask = ((1u64 << bits) - 1) & !0xfff;
    apic_base_msr & mask
}

/// Max LVT index from the version register (bits 23:16): the number of LVT
/// entries minus one. 4 means no thermal LVT, 5 adds THMR, 6 adds CMCI.
pub const fn max_lvt(version_reg: u32) -> u8 {
    (version_reg >> 16) as u8
}

/// APIC version from the version register (bits 7:0).
pub const fn version(version_reg: u32) -> u8 {
    version_reg as u8
}

/// Whether the version register describes an integrated local APIC
/// (`(version & 0xF0) == 0x10`); `0x0X` is the discrete 82489DX, which
/// VirtualBox refuses to touch.
pub const fn is_integrated(version_reg: u32) -> bool {
    version_reg & 0xf0 == 0x10
}

bitflags! {
    /// The LVTs a switcher masked (`fApicDisVectors`), one bit per LVT.
    ///
    /// Unknown bits are kept by `from_bits_retain` and ignored by
    /// [`restore_nmi_lvts`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct DisVectors: u32 {
        /// LINT0 ([`reg::LVT_LINT0`]).
        const LINT0 = 1;
        /// LINT1 ([`reg::LVT_LINT1`]).
        const LINT1 = 2;
        /// Performance counters ([`reg::LVT_PC`]).
        const PC = 4;
        /// Thermal sensor ([`reg::LVT_THMR`]).
        const THMR = 8;
        /// Corrected machine check ([`reg::LVT_CMCI`]).
        const CMCI = 16;
    }
}

const _: () = {
    assert!(x2apic_msr(reg::ID) == 0x802);
    assert!(x2apic_msr(reg::VERSION) == 0x803);
    assert!(x2apic_msr(reg::TPR) == 0x808);
    assert!(x2apic_msr(reg::EOI) == 0x80b);
    assert!(x2apic_msr(reg::SVR) == 0x80f);
    assert!(x2apic_msr(reg::LVT_CMCI) == 0x82f);
    assert!(x2apic_msr(reg::LVT_TIMER) == 0x832);
    assert!(x2apic_msr(reg::LVT_THMR) == 0x833);
    assert!(x2apic_msr(reg::LVT_PC) == 0x834);
    assert!(x2apic_msr(reg::LVT_LINT0) == 0x835);
    assert!(x2apic_msr(reg::LVT_LINT1) == 0x836);
    assert!(x2apic_msr(reg::LVT_ERR) == 0x837);
    assert!(DisVectors::all().bits() == 0x1f);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_fields() {
        let v = 0x8005_0014;
        assert_eq!(max_lvt(v), 5);
        assert_eq!(version(v), 0x14);
        assert!(is_integrated(v));
        assert!(!is_integrated(0x0003_0003));
        assert!(!is_integrated(0x0006_0020));
        assert_eq!(max_lvt(0x00ff_0000), 0xff);
    }

    #[test]
    fn apic_base_decoding() {
        let msr = 0xfee0_0000 | APIC_BASE_EN | APIC_BASE_BSP;
        assert!(!is_x2apic_mode(msr));
        assert!(is_x2apic_mode(msr | APIC_BASE_EXTD));
        assert!(!is_x2apic_mode(APIC_BASE_EXTD));
        assert_eq!(apic_base_phys(msr, 36), 0xfee0_0000);
        assert_eq!(apic_base_phys(0xf_ffff_f000 | 0xfff, 36), 0xf_ffff_f000);
        assert_eq!(apic_base_phys(0xff_ffff_f000, 36), 0xf_ffff_f000);
        assert_eq!(apic_base_phys(0xff_ffff_f000, 40), 0xff_ffff_f000);
        assert_eq!(apic_base_phys(u64::MAX, 255), 0x000f_ffff_ffff_f000);
        assert_eq!(apic_base_phys(u64::MAX, 0), 0);
    }

    #[test]
    fn dis_vector_bits_match_virtualbox() {
        assert_eq!(DisVectors::LINT0.bits(), 0x01);
        assert_eq!(DisVectors::LINT1.bits(), 0x02);
        assert_eq!(DisVectors::PC.bits(), 0x04);
        assert_eq!(DisVectors::THMR.bits(), 0x08);
        assert_eq!(DisVectors::CMCI.bits(), 0x10);
        assert_eq!(
            DisVectors::from_bits_retain(0xffff_ffe0).bits(),
            0xffff_ffe0
        );
    }
}
