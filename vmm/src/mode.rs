//! Host paging modes (`SUPPAGINGMODE`) and the switcher selection table.

use cpum::regs::{Cr0, Cr4, Efer};
use serde::Serialize;
use thiserror::Error;
use vmm_switcher::SwitcherKind;

/// The host's paging mode, as VirtualBox's support driver classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum HostPagingMode {
    /// 32-bit paging.
    Legacy32,
    /// 32-bit paging with global pages.
    Legacy32Global,
    /// PAE paging.
    Pae,
    /// PAE with global pages.
    PaeGlobal,
    /// PAE with no-execute.
    PaeNx,
    /// PAE with global pages and no-execute.
    PaeGlobalNx,
    /// 4-level long mode.
    Amd64,
    /// Long mode with global pages.
    Amd64Global,
    /// Long mode with no-execute.
    Amd64Nx,
    /// Long mode with global pages and no-execute.
    Amd64GlobalNx,
    /// 5-level long mode (CR4.LA57). VirtualBox's table stops at the ten
    /// modes above; the four 5-level ones follow their naming.
    Amd64La57,
    /// 5-level long mode with global pages.
    Amd64La57Global,
    /// 5-level long mode with no-execute.
    Amd64La57Nx,
    /// 5-level long mode with global pages and no-execute.
    Amd64La57GlobalNx,
}

/// The paging family a host mode belongs to; the NX and global variants
/// choose the same switcher as their base mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum HostFamily {
    /// 32-bit paging.
    Legacy32,
    /// PAE paging.
    Pae,
    /// Long mode.
    Amd64,
}

/// The host's paging mode could not be decided.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum HostModeError {
    /// CR0.PE or CR0.PG is clear.
    #[error("host CR0 {cr0:#x} does not have both PE and PG set: no paging mode")]
    NoPaging {
        /// The CR0 value.
        cr0: u64,
    },
    /// EFER.LMA without CR4.PAE is not a valid state.
    #[error("host EFER {efer:#x} has LMA set but CR4 {cr4:#x} lacks PAE")]
    LongModeWithoutPae {
        /// EFER.
        efer: u64,
        /// CR4.
        cr4: u64,
    },
}

impl HostPagingMode {
    /// Decides the mode from CR0, CR4 and EFER, honouring EFER.NXE only when
    /// CPUID reports NX and EFER.LMA only when CPUID reports long mode
    /// (`SUPR0GetPagingMode`). CR4.LA57 makes a long mode 5-level; it needs
    /// no CPUID check (the bit cannot be set on a CPU without it) and means
    /// nothing outside long mode.
    ///
    /// # Errors
    /// Paging is off, or the registers are inconsistent.
    pub fn from_registers(
        cr0: u64,
        cr4: u64,
        efer: u64,
        cpu_nx: bool,
        cpu_lm: bool,
    ) -> Result<Self, HostModeError> {
        let cr0f = Cr0::from_bits_retain(cr0);
        if !cr0f.contains(Cr0::PE | Cr0::PG) {
            return Err(HostModeError::NoPaging { cr0 });
        }
        let cr4f = Cr4::from_bits_retain(cr4);
        let eferf = Efer::from_bits_retain(efer);
        let global = cr4f.contains(Cr4::PGE);
        let nx = cpu_nx && eferf.contains(Efer::NXE);
        let lma = cpu_lm && eferf.contains(Efer::LMA);
        if !cr4f.contains(Cr4::PAE) {
            if lma {
                return Err(HostModeError::LongModeWithoutPae { efer, cr4 });
            }
            return Ok(if global {
                Self::Legacy32Global
            } else {
                Self::Legacy32
            });
        }
        if lma && cr4f.contains(Cr4::LA57) {
            return Ok(match (global, nx) {
                (false, false) => Self::Amd64La57,
                (true, false) => Self::Amd64La57Global,
                (false, true) => Self::Amd64La57Nx,
                (true, true) => Self::Amd64La57GlobalNx,
            });
        }
        Ok(match (lma, global, nx) {
            (false, false, false) => Self::Pae,
            (false, true, false) => Self::PaeGlobal,
            (false, false, true) => Self::PaeNx,
            (false, true, true) => Self::PaeGlobalNx,
            (true, false, false) => Self::Amd64,
            (true, true, false) => Self::Amd64Global,
            (true, false, true) => Self::Amd64Nx,
            (true, true, true) => Self::Amd64GlobalNx,
        })
    }

    /// The paging family.
    pub const fn family(self) -> HostFamily {
        match self {
            Self::Legacy32 | Self::Legacy32Global => HostFamily::Legacy32,
            Self::Pae | Self::PaeGlobal | Self::PaeNx | Self::PaeGlobalNx => HostFamily::Pae,
            _ => HostFamily::Amd64,
        }
    }

    /// Whether the host runs 5-level paging (CR4.LA57): the switchers must
    /// then be built with `TemplateOptions::la57`.
    pub const fn la57(self) -> bool {
        matches!(
            self,
            Self::Amd64La57 | Self::Amd64La57Global | Self::Amd64La57Nx | Self::Amd64La57GlobalNx
        )
    }

    /// VirtualBox's numeric value (`SUPPAGINGMODE_*`, 1..=10); the 5-level
    /// modes, which VirtualBox does not have, continue at 11..=14.
    pub const fn vbox_value(self) -> u32 {
        match self {
            Self::Legacy32 => 1,
            Self::Legacy32Global => 2,
            Self::Pae => 3,
            Self::PaeGlobal => 4,
            Self::PaeNx => 5,
            Self::PaeGlobalNx => 6,
            Self::Amd64 => 7,
            Self::Amd64Global => 8,
            Self::Amd64Nx => 9,
            Self::Amd64GlobalNx => 10,
            Self::Amd64La57 => 11,
            Self::Amd64La57Global => 12,
            Self::Amd64La57Nx => 13,
            Self::Amd64La57GlobalNx => 14,
        }
    }
}

/// The guest's paging mode, which decides the shadow (hypervisor) mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum GuestMode {
    /// Real mode.
    Real,
    /// Protected mode without paging.
    Protected,
    /// 32-bit paging.
    Bits32,
    /// PAE paging.
    Pae,
    /// PAE with no-execute.
    PaeNx,
    /// Long mode.
    Amd64,
    /// Long mode with no-execute.
    Amd64Nx,
}

/// No switcher serves a host/guest pair.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum SelectError {
    /// VirtualBox's table names a switcher nobody implemented (AMD64 → AMD64).
    #[error("switcher {} for a {host:?} host and a {guest:?} guest is not implemented", kind.cli_name())]
    NotImplemented {
        /// Host mode.
        host: HostPagingMode,
        /// Guest mode.
        guest: GuestMode,
        /// The switcher the table names.
        kind: SwitcherKind,
    },
    /// The switcher exists in the table but this build does not provide it.
    #[error("switcher {} is not available in this build", kind.cli_name())]
    Unavailable {
        /// The switcher.
        kind: SwitcherKind,
    },
    /// The core was built for hosts of another width than `host`'s.
    #[error("a {host:?} host needs a core built for {}-bit hosts; this one is for {core_bits}-bit hosts", if matches!(host.family(), HostFamily::Amd64) { 64 } else { 32 })]
    HostWidth {
        /// The host mode asked about.
        host: HostPagingMode,
        /// The core's host width.
        core_bits: u32,
    },
}

/// VirtualBox's choice (`pgmR3CalcShadowMode`) of switcher for a host and guest mode.
pub fn table_choice(host: HostPagingMode, guest: GuestMode) -> SwitcherKind {
    use GuestMode as G;
    use SwitcherKind as S;
    match (host.family(), guest) {
        (HostFamily::Legacy32, G::Real | G::Protected | G::Bits32) => S::Legacy32To32,
        (HostFamily::Legacy32, G::Pae | G::PaeNx) => S::Legacy32ToPae,
        (HostFamily::Legacy32, G::Amd64 | G::Amd64Nx) => S::Legacy32ToAmd64,
        (HostFamily::Pae, G::Amd64 | G::Amd64Nx) => S::PaeToAmd64,
        (HostFamily::Pae, _) => S::PaeToPae,
        (HostFamily::Amd64, G::Amd64 | G::Amd64Nx) => S::Amd64ToAmd64,
        (HostFamily::Amd64, _) => S::Amd64ToPae,
    }
}

/// What may override VirtualBox's table when choosing a switcher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct SelectPrefs {
    /// The hypervisor context is not used (VirtualBox's HM case with raw mode
    /// off): choose the stub for the host's bitness.
    pub no_hypervisor_context: bool,
    /// Shadow a non-long-mode guest with 32-bit paging on PAE and AMD64 hosts
    /// (VirtualBox's developer override), choosing PAE → 32 and AMD64 → 32.
    pub force_32bit_shadow: bool,
}

/// The switcher for `host` and `guest` under `prefs`, if `available` has it.
///
/// # Errors
/// As [`select`].
pub fn select_with(
    host: HostPagingMode,
    guest: GuestMode,
    prefs: SelectPrefs,
    available: &[SwitcherKind],
) -> Result<SwitcherKind, SelectError> {
    let long_guest = matches!(guest, GuestMode::Amd64 | GuestMode::Amd64Nx);
    let kind = if prefs.no_hypervisor_context {
        stub_for(host)
    } else if prefs.force_32bit_shadow && !long_guest {
        match host.family() {
            HostFamily::Legacy32 => SwitcherKind::Legacy32To32,
            HostFamily::Pae => SwitcherKind::PaeTo32,
            HostFamily::Amd64 => SwitcherKind::Amd64To32,
        }
    } else {
        return select(host, guest, available);
    };
    if available.contains(&kind) {
        Ok(kind)
    } else {
        Err(SelectError::Unavailable { kind })
    }
}

/// The stub switcher for `host`'s bitness.
pub fn stub_for(host: HostPagingMode) -> SwitcherKind {
    match host.family() {
        HostFamily::Amd64 => SwitcherKind::Amd64Stub,
        _ => SwitcherKind::X86Stub,
    }
}

/// The switcher for `host` and `guest`, if this build provides it.
///
/// # Errors
/// [`SelectError::NotImplemented`] for AMD64 → AMD64 and
/// [`SelectError::Unavailable`] for a switcher `available` does not list.
pub fn select(
    host: HostPagingMode,
    guest: GuestMode,
    available: &[SwitcherKind],
) -> Result<SwitcherKind, SelectError> {
    let kind = table_choice(host, guest);
    if available.contains(&kind) {
        return Ok(kind);
    }
    if kind == SwitcherKind::Amd64ToAmd64 {
        return Err(SelectError::NotImplemented { host, guest, kind });
    }
    Err(SelectError::Unavailable { kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG_PE: u64 = 0x8000_0001;

    #[test]
    fn all_ten_modes_decode() {
        let cases = [
            (0, 0, false, false, HostPagingMode::Legacy32),
            (0x80, 0, false, false, HostPagingMode::Legacy32Global),
            (0x20, 0, false, false, HostPagingMode::Pae),
            (0xa0, 0, false, false, HostPagingMode::PaeGlobal),
            (0x20, 0x800, true, false, HostPagingMode::PaeNx),
            (0xa0, 0x800, true, false, HostPagingMode::PaeGlobalNx),
            (0x20, 0x500, false, true, HostPagingMode::Amd64),
            (0xa0, 0x500, false, true, HostPagingMode::Amd64Global),
            (0x20, 0xd00, true, true, HostPagingMode::Amd64Nx),
            (0xa0, 0xd00, true, true, HostPagingMode::Amd64GlobalNx),
        ];
        for (i, (cr4, efer, nx, lm, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                HostPagingMode::from_registers(PG_PE, cr4, efer, nx, lm),
                Ok(want)
            );
            assert_eq!(want.vbox_value() as usize, i + 1);
        }
        // CR4.LA57 (bit 12) with LMA: the 5-level modes, in the same order.
        let la57 = [
            (0x1020, 0x500, false, HostPagingMode::Amd64La57),
            (0x10a0, 0x500, false, HostPagingMode::Amd64La57Global),
            (0x1020, 0xd00, true, HostPagingMode::Amd64La57Nx),
            (0x10a0, 0xd00, true, HostPagingMode::Amd64La57GlobalNx),
        ];
        for (i, (cr4, efer, nx, want)) in la57.into_iter().enumerate() {
            let got = HostPagingMode::from_registers(PG_PE, cr4, efer, nx, true);
            assert_eq!(got, Ok(want));
            assert!(want.la57() && want.family() == HostFamily::Amd64);
            assert_eq!(want.vbox_value() as usize, 11 + i);
            // The same registers without LA57 are the 4-level mode.
            let four = HostPagingMode::from_registers(PG_PE, cr4 & !0x1000, efer, nx, true);
            assert!(!four.unwrap().la57());
        }
        // LA57 outside long mode means nothing: PAE paging.
        assert_eq!(
            HostPagingMode::from_registers(PG_PE, 0x1020, 0, false, true),
            Ok(HostPagingMode::Pae)
        );
        // NXE without CPUID NX, LMA without CPUID LM: ignored.
        assert_eq!(
            HostPagingMode::from_registers(PG_PE, 0x20, 0x800, false, false),
            Ok(HostPagingMode::Pae)
        );
        assert_eq!(
            HostPagingMode::from_registers(1, 0, 0, false, false),
            Err(HostModeError::NoPaging { cr0: 1 })
        );
        assert!(matches!(
            HostPagingMode::from_registers(PG_PE, 0, 0x500, false, true),
            Err(HostModeError::LongModeWithoutPae { .. })
        ));
    }

    #[test]
    fn selection_follows_the_table() {
        let all = SwitcherKind::ALL;
        use GuestMode as G;
        use HostPagingMode as H;
        assert_eq!(
            select(H::Legacy32, G::Amd64, &all),
            Ok(SwitcherKind::Legacy32ToAmd64)
        );
        assert_eq!(
            select(H::PaeGlobalNx, G::Amd64Nx, &all),
            Ok(SwitcherKind::PaeToAmd64)
        );
        assert_eq!(
            select(H::Legacy32Global, G::PaeNx, &all),
            Ok(SwitcherKind::Legacy32ToPae)
        );
        assert_eq!(select(H::PaeNx, G::Real, &all), Ok(SwitcherKind::PaeToPae));
        assert_eq!(
            select(H::Amd64, G::Bits32, &all),
            Ok(SwitcherKind::Amd64ToPae)
        );
        // The 5-level hosts choose as the 4-level ones.
        for (host, guest, want) in [
            (H::Amd64La57, G::Bits32, SwitcherKind::Amd64ToPae),
            (H::Amd64La57GlobalNx, G::Amd64Nx, SwitcherKind::Amd64ToAmd64),
        ] {
            assert_eq!(table_choice(host, guest), want);
        }
        let none: [SwitcherKind; 0] = [];
        assert!(matches!(
            select(H::Amd64Nx, G::Amd64, &none),
            Err(SelectError::NotImplemented {
                kind: SwitcherKind::Amd64ToAmd64,
                ..
            })
        ));
        assert_eq!(
            select(H::Legacy32, G::Bits32, &[SwitcherKind::Legacy32ToAmd64]),
            Err(SelectError::Unavailable {
                kind: SwitcherKind::Legacy32To32
            })
        );
        assert_eq!(stub_for(H::Amd64GlobalNx), SwitcherKind::Amd64Stub);
        // Every switcher is reachable from some host, guest and preference.
        let hosts = [H::Legacy32, H::PaeNx, H::Amd64GlobalNx];
        let guests = [
            G::Real,
            G::Protected,
            G::Bits32,
            G::Pae,
            G::PaeNx,
            G::Amd64,
            G::Amd64Nx,
        ];
        let mut reached = std::collections::BTreeSet::new();
        for h in hosts {
            for g in guests {
                for (no_ctx, force32) in [(false, false), (false, true), (true, false)] {
                    let prefs = SelectPrefs {
                        no_hypervisor_context: no_ctx,
                        force_32bit_shadow: force32,
                    };
                    if let Ok(k) = select_with(h, g, prefs, &all) {
                        reached.insert(k as u32);
                    }
                }
            }
        }
        assert_eq!(reached.len(), SwitcherKind::ALL.len(), "{reached:?}");
        let p = SelectPrefs {
            force_32bit_shadow: true,
            ..SelectPrefs::default()
        };
        assert_eq!(
            select_with(H::PaeNx, G::PaeNx, p, &all),
            Ok(SwitcherKind::PaeTo32)
        );
        assert_eq!(
            select_with(H::Amd64, G::Amd64, p, &all),
            Ok(SwitcherKind::Amd64ToAmd64)
        );
        assert_eq!(
            select_with(
                H::Amd64,
                G::Bits32,
                SelectPrefs {
                    no_hypervisor_context: true,
                    ..p
                },
                &[]
            ),
            Err(SelectError::Unavailable {
                kind: SwitcherKind::Amd64Stub
            })
        );
        assert_eq!(stub_for(H::PaeNx), SwitcherKind::X86Stub);
        let msg = select(H::Amd64, G::Amd64, &none).map_err(|e| e.to_string());
        assert_eq!(
            msg,
            Err(
                "switcher amd64-to-amd64 for a Amd64 host and a Amd64 guest is not implemented"
                    .into()
            )
        );
    }
}
