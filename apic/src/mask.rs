//! The switcher's NMI-masking rule and its undo.

use crate::{lvt, max_lvt, reg, ApicAccess, DisVectors};

/// An LVT the masking rule may touch, in [`DisVectors`] bit order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NmiLvt {
    /// LINT0, bit 0x01.
    Lint0,
    /// LINT1, bit 0x02.
    Lint1,
    /// Performance counters, bit 0x04.
    Pc,
    /// Thermal sensor, bit 0x08.
    Thmr,
    /// Corrected machine check, bit 0x10.
    Cmci,
}

impl NmiLvt {
    /// All five, least significant [`DisVectors`] bit first (the restore order).
    pub const ALL: [NmiLvt; 5] = [
        NmiLvt::Lint0,
        NmiLvt::Lint1,
        NmiLvt::Pc,
        NmiLvt::Thmr,
        NmiLvt::Cmci,
    ];

    /// The register's xAPIC offset.
    pub const fn offset(self) -> u32 {
        match self {
            NmiLvt::Lint0 => reg::LVT_LINT0,
            NmiLvt::Lint1 => reg::LVT_LINT1,
            NmiLvt::Pc => reg::LVT_PC,
            NmiLvt::Thmr => reg::LVT_THMR,
            NmiLvt::Cmci => reg::LVT_CMCI,
        }
    }

    /// The register's bit in [`DisVectors`].
    pub const fn flag(self) -> DisVectors {
        match self {
            NmiLvt::Lint0 => DisVectors::LINT0,
            NmiLvt::Lint1 => DisVectors::LINT1,
            NmiLvt::Pc => DisVectors::PC,
            NmiLvt::Thmr => DisVectors::THMR,
            NmiLvt::Cmci => DisVectors::CMCI,
        }
    }
}

/// Which revision of the candidate rule to apply; the two differ only in
/// whether the CMCI LVT exists for the rule.
///
/// | max LVT | [`Ignore`](CmciPolicy::Ignore) | [`Mask`](CmciPolicy::Mask) |
/// |---|---|---|
/// | < 5 | LINT0, LINT1, PC | LINT0, LINT1, PC |
/// | 5 | + THMR | + THMR |
/// | > 5 | + THMR | + CMCI, then THMR |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CmciPolicy {
    /// The reference revision (VirtualBox 3.2.12 to 4.3.x before CMCI
    /// support): THMR is a candidate whenever max LVT ≥ 5; CMCI never is.
    Ignore,
    /// VirtualBox 4.3.22 and later: with max LVT > 5, CMCI is a candidate
    /// too and is handled before THMR.
    #[default]
    Mask,
}

const BASE: &[NmiLvt] = &[NmiLvt::Lint0, NmiLvt::Lint1, NmiLvt::Pc];
const WITH_THMR: &[NmiLvt] = &[NmiLvt::Lint0, NmiLvt::Lint1, NmiLvt::Pc, NmiLvt::Thmr];
const WITH_CMCI: &[NmiLvt] = &[
    NmiLvt::Lint0,
    NmiLvt::Lint1,
    NmiLvt::Pc,
    NmiLvt::Cmci,
    NmiLvt::Thmr,
];

impl CmciPolicy {
    /// The candidate LVTs, in the order the switcher visits them, for an
    /// APIC whose version register reports `max_lvt` (see [`crate::max_lvt`]).
    pub const fn candidates(self, max_lvt: u8) -> &'static [NmiLvt] {
        match (self, max_lvt) {
            (_, 0..=4) => BASE,
            (CmciPolicy::Ignore, _) | (CmciPolicy::Mask, 5) => WITH_THMR,
            (CmciPolicy::Mask, _) => WITH_CMCI,
        }
    }
}

/// Mask every candidate LVT that would deliver an NMI, and report which ones
/// were masked.
///
/// Reads the version register, then for each candidate of `policy` (see
/// [`CmciPolicy::candidates`]) whose value is an unmasked NMI
/// ([`lvt::is_unmasked_nmi`]) writes `value | MASKED` and sets its bit. The
/// result starts empty, so it never carries stale bits (unlike VirtualBox's
/// `LegacyandAMD64` path, which OR-ed into an uninitialised register). LVTs
/// that are masked already, or deliver anything but NMI, are not written.
///
/// Whether the APIC is an integrated one ([`crate::is_integrated`]) is the
/// caller's check, made once when the APIC is set up.
///
/// # Errors
///
/// The back end's error. LVTs this call had already masked are unmasked
/// again (best effort) before the error is returned, so a failure leaves no
/// LVT masked that the caller does not know about.
pub fn mask_nmi_lvts<A: ApicAccess>(
    apic: &mut A,
    policy: CmciPolicy,
) -> Result<DisVectors, A::Error> {
    let version = apic.read(reg::VERSION)?;
    let mut masked = DisVectors::empty();
    for &candidate in policy.candidates(max_lvt(version)) {
        match mask_one(apic, candidate) {
            Ok(true) => masked |= candidate.flag(),
            Ok(false) => {}
            Err(e) => {
                // Undo what this call did; the original error is the one to report.
                let _ = restore_nmi_lvts(apic, masked);
                return Err(e);
            }
        }
    }
    Ok(masked)
}

fn mask_one<A: ApicAccess>(apic: &mut A, lvt: NmiLvt) -> Result<bool, A::Error> {
    let value = apic.read(lvt.offset())?;
    if !lvt::is_unmasked_nmi(value) {
        return Ok(false);
    }
    apic.write(lvt.offset(), value | lvt::MASKED)?;
    Ok(true)
}

/// Undo [`mask_nmi_lvts`]: clear `MASKED` on exactly the LVTs whose bit is
/// set in `masked`, least significant bit first, by read-modify-write. Other
/// bits of each LVT are kept, LVTs without a bit are not touched (so entries
/// the host masked on purpose stay masked), unknown bits are ignored, and an
/// empty set makes no access at all.
///
/// # Errors
///
/// The first error of the back end. The remaining LVTs are still unmasked.
pub fn restore_nmi_lvts<A: ApicAccess>(apic: &mut A, masked: DisVectors) -> Result<(), A::Error> {
    let mut first_error = None;
    for lvt in NmiLvt::ALL {
        if masked.contains(lvt.flag()) {
            let result = apic
                .read(lvt.offset())
                .and_then(|value| apic.write(lvt.offset(), value & !lvt::MASKED));
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::lvt::{DeliveryMode, MASKED, MODE_EXTINT, MODE_FIXED, MODE_NMI};
    use crate::{MsrAccess, OffsetError, RegisterFile, X2Apic, XApicMmio};

    const POLICIES: [CmciPolicy; 2] = [CmciPolicy::Ignore, CmciPolicy::Mask];
    /// Extra bits that must survive masking and restoring.
    const EXTRA: u32 = lvt::LEVEL_TRIGGER | lvt::POLARITY_LOW | 0x5a;

    fn apic_with(max: u8) -> RegisterFile {
        let mut apic = RegisterFile::new();
        apic.set(reg::VERSION, (u32::from(max) << 16) | 0x15)
            .unwrap();
        for l in NmiLvt::ALL {
            apic.set(l.offset(), MODE_FIXED | 0x30).unwrap();
        }
        apic.set(reg::LVT_ERR, MODE_NMI).unwrap();
        apic
    }

    /// An access back end that logs accesses and can fail one of them.
    #[derive(Debug)]
    struct Logged {
        inner: RegisterFile,
        log: [(bool, u32); 32],
        n: usize,
        fail_write_to: Option<u32>,
    }

    #[derive(Debug, PartialEq, Eq)]
    enum LoggedError {
        Offset(OffsetError),
        Injected(u32),
    }

    impl Logged {
        fn new(inner: RegisterFile) -> Self {
            Self {
                inner,
                log: [(false, 0); 32],
                n: 0,
                fail_write_to: None,
            }
        }
        fn log(&self) -> &[(bool, u32)] {
            &self.log[..self.n]
        }
        fn writes(&self) -> impl Iterator<Item = u32> + '_ {
            self.log().iter().filter(|(w, _)| *w).map(|&(_, o)| o)
        }
    }

    impl ApicAccess for Logged {
        type Error = LoggedError;
        fn read(&mut self, offset: u32) -> Result<u32, LoggedError> {
            self.log[self.n] = (false, offset);
            self.n += 1;
            self.inner.read(offset).map_err(LoggedError::Offset)
        }
        fn write(&mut self, offset: u32, value: u32) -> Result<(), LoggedError> {
            if self.fail_write_to == Some(offset) {
                return Err(LoggedError::Injected(offset));
            }
            self.log[self.n] = (true, offset);
            self.n += 1;
            self.inner.write(offset, value).map_err(LoggedError::Offset)
        }
    }

    #[test]
    fn candidates_per_policy_and_max_lvt() {
        use NmiLvt::*;
        for policy in POLICIES {
            for max in [0, 3, 4] {
                assert_eq!(policy.candidates(max), [Lint0, Lint1, Pc]);
            }
            assert_eq!(policy.candidates(5), [Lint0, Lint1, Pc, Thmr]);
        }
        for max in [6, 7, 0xff] {
            assert_eq!(CmciPolicy::Ignore.candidates(max), [Lint0, Lint1, Pc, Thmr]);
            assert_eq!(
                CmciPolicy::Mask.candidates(max),
                [Lint0, Lint1, Pc, Cmci, Thmr]
            );
        }
        assert_eq!(CmciPolicy::default(), CmciPolicy::Mask);
    }

    #[test]
    fn every_lvt_state_for_every_candidate() {
        let states = [MODE_FIXED, MODE_NMI, MODE_EXTINT];
        for policy in POLICIES {
            for max in [4u8, 5, 6] {
                for &candidate in policy.candidates(max) {
                    for mode in states {
                        for pre_masked in [false, true] {
                            let mut apic = apic_with(max);
                            let before = mode | EXTRA | if pre_masked { MASKED } else { 0 };
                            apic.set(candidate.offset(), before).unwrap();
                            let got = mask_nmi_lvts(&mut apic, policy).unwrap();
                            let expect_mask = mode == MODE_NMI && !pre_masked;
                            let ctx = (policy, max, candidate, mode, pre_masked);
                            if expect_mask {
                                assert_eq!(got, candidate.flag(), "{ctx:?}");
                                assert_eq!(apic.get(candidate.offset()), Ok(before | MASKED));
                                assert_eq!(apic.writes(), 1, "{ctx:?}");
                            } else {
                                assert_eq!(got, DisVectors::empty(), "{ctx:?}");
                                assert_eq!(apic.get(candidate.offset()), Ok(before));
                                assert_eq!(apic.writes(), 0, "{ctx:?}");
                            }
                            restore_nmi_lvts(&mut apic, got).unwrap();
                            assert_eq!(apic.get(candidate.offset()), Ok(before), "{ctx:?}");
                            // LVT_ERR is never a candidate, even when it is an unmasked NMI.
                            assert_eq!(apic.get(reg::LVT_ERR), Ok(MODE_NMI));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn all_nmi_at_max_lvt_4_5_6_under_both_policies() {
        let cases = [
            (
                CmciPolicy::Ignore,
                4,
                DisVectors::LINT0 | DisVectors::LINT1 | DisVectors::PC,
            ),
            (CmciPolicy::Ignore, 5, DisVectors::all() - DisVectors::CMCI),
            (CmciPolicy::Ignore, 6, DisVectors::all() - DisVectors::CMCI),
            (
                CmciPolicy::Mask,
                4,
                DisVectors::LINT0 | DisVectors::LINT1 | DisVectors::PC,
            ),
            (CmciPolicy::Mask, 5, DisVectors::all() - DisVectors::CMCI),
            (CmciPolicy::Mask, 6, DisVectors::all()),
        ];
        for (policy, max, expected) in cases {
            let mut regs = apic_with(max);
            for l in NmiLvt::ALL {
                regs.set(l.offset(), MODE_NMI | EXTRA).unwrap();
            }
            let mut apic = Logged::new(regs);
            let got = mask_nmi_lvts(&mut apic, policy).unwrap();
            assert_eq!(got, expected, "{policy:?} max {max}");
            for l in NmiLvt::ALL {
                let v = apic.inner.get(l.offset()).unwrap();
                assert_eq!(lvt::is_masked(v), expected.contains(l.flag()), "{l:?}");
                assert_eq!(v & !MASKED, MODE_NMI | EXTRA);
            }
            // The version register is read first; writes follow the candidate order.
            assert_eq!(apic.log()[0], (false, reg::VERSION));
            let order: [u32; 5] =
                core::array::from_fn(|i| policy.candidates(max).get(i).map_or(0, |l| l.offset()));
            assert!(apic.writes().eq(order.into_iter().take(got.iter().count())));

            // Restore runs least significant bit first and leaves everything as before.
            apic.n = 0;
            restore_nmi_lvts(&mut apic, got).unwrap();
            let restore_order = NmiLvt::ALL
                .into_iter()
                .filter(|l| got.contains(l.flag()))
                .map(NmiLvt::offset);
            assert!(apic.writes().eq(restore_order));
            for l in NmiLvt::ALL {
                assert_eq!(apic.inner.get(l.offset()), Ok(MODE_NMI | EXTRA));
            }
        }
    }

    #[test]
    fn restore_leaves_deliberately_masked_entries_masked() {
        let mut apic = apic_with(6);
        apic.set(reg::LVT_LINT0, MODE_NMI).unwrap();
        apic.set(reg::LVT_LINT1, MODE_NMI | MASKED).unwrap();
        apic.set(reg::LVT_PC, MODE_NMI | MASKED | 0x40).unwrap();
        apic.set(reg::LVT_THMR, MODE_FIXED | MASKED | 0x41).unwrap();
        apic.set(reg::LVT_CMCI, MODE_NMI).unwrap();
        let got = mask_nmi_lvts(&mut apic, CmciPolicy::Mask).unwrap();
        assert_eq!(got, DisVectors::LINT0 | DisVectors::CMCI);
        restore_nmi_lvts(&mut apic, got).unwrap();
        assert_eq!(apic.get(reg::LVT_LINT0), Ok(MODE_NMI));
        assert_eq!(apic.get(reg::LVT_LINT1), Ok(MODE_NMI | MASKED));
        assert_eq!(apic.get(reg::LVT_PC), Ok(MODE_NMI | MASKED | 0x40));
        assert_eq!(apic.get(reg::LVT_THMR), Ok(MODE_FIXED | MASKED | 0x41));
        assert_eq!(apic.get(reg::LVT_CMCI), Ok(MODE_NMI));
    }

    #[test]
    fn masking_twice_reports_nothing_the_second_time() {
        let mut apic = apic_with(5);
        apic.set(reg::LVT_PC, MODE_NMI).unwrap();
        assert_eq!(
            mask_nmi_lvts(&mut apic, CmciPolicy::Mask),
            Ok(DisVectors::PC)
        );
        assert_eq!(
            mask_nmi_lvts(&mut apic, CmciPolicy::Mask),
            Ok(DisVectors::empty())
        );
    }

    #[test]
    fn restore_of_nothing_makes_no_access_and_ignores_unknown_bits() {
        let mut apic = apic_with(6);
        restore_nmi_lvts(&mut apic, DisVectors::empty()).unwrap();
        restore_nmi_lvts(&mut apic, DisVectors::from_bits_retain(0xffff_ff00)).unwrap();
        assert_eq!((apic.reads(), apic.writes()), (0, 0));
    }

    #[test]
    fn restore_only_clears_the_mask_bit() {
        let mut apic = apic_with(6);
        for l in NmiLvt::ALL {
            apic.set(
                l.offset(),
                MODE_NMI | MASKED | EXTRA | lvt::DELIVERY_PENDING,
            )
            .unwrap();
        }
        restore_nmi_lvts(&mut apic, DisVectors::PC | DisVectors::CMCI).unwrap();
        for l in NmiLvt::ALL {
            let unmasked = matches!(l, NmiLvt::Pc | NmiLvt::Cmci);
            let want = MODE_NMI | EXTRA | lvt::DELIVERY_PENDING | if unmasked { 0 } else { MASKED };
            assert_eq!(apic.get(l.offset()), Ok(want), "{l:?}");
        }
    }

    #[test]
    fn failure_midway_unmasks_what_was_masked_and_reports_the_error() {
        let mut regs = apic_with(6);
        for l in NmiLvt::ALL {
            regs.set(l.offset(), MODE_NMI).unwrap();
        }
        let mut apic = Logged::new(regs);
        apic.fail_write_to = Some(reg::LVT_CMCI);
        assert_eq!(
            mask_nmi_lvts(&mut apic, CmciPolicy::Mask),
            Err(LoggedError::Injected(reg::LVT_CMCI))
        );
        for l in NmiLvt::ALL {
            assert_eq!(apic.inner.get(l.offset()), Ok(MODE_NMI), "{l:?}");
        }
    }

    #[test]
    fn restore_continues_after_a_failure_and_returns_the_first_error() {
        let mut regs = apic_with(6);
        for l in NmiLvt::ALL {
            regs.set(l.offset(), MODE_NMI | MASKED).unwrap();
        }
        let mut apic = Logged::new(regs);
        apic.fail_write_to = Some(reg::LVT_LINT1);
        assert_eq!(
            restore_nmi_lvts(&mut apic, DisVectors::all()),
            Err(LoggedError::Injected(reg::LVT_LINT1))
        );
        for l in NmiLvt::ALL {
            let want = if l == NmiLvt::Lint1 {
                MODE_NMI | MASKED
            } else {
                MODE_NMI
            };
            assert_eq!(apic.inner.get(l.offset()), Ok(want), "{l:?}");
        }
    }

    #[test]
    fn same_rule_through_xapic_mmio() {
        let mut page = [0u8; 4096];
        page[0x30..0x34].copy_from_slice(&0x0006_0014u32.to_le_bytes());
        page[0x2f0..0x2f4].copy_from_slice(&MODE_NMI.to_le_bytes());
        page[0x350..0x354].copy_from_slice(&DeliveryMode::ExtInt.bits().to_le_bytes());
        let mut apic = XApicMmio::new(&mut page).unwrap();
        let got = mask_nmi_lvts(&mut apic, CmciPolicy::Mask).unwrap();
        assert_eq!(got, DisVectors::CMCI);
        assert_eq!(apic.read(reg::LVT_CMCI), Ok(MODE_NMI | MASKED));
        restore_nmi_lvts(&mut apic, got).unwrap();
        assert_eq!(page[0x2f0..0x2f4], MODE_NMI.to_le_bytes());
    }

    #[test]
    fn same_rule_through_x2apic_msrs() {
        #[derive(Debug)]
        struct Msrs([u64; 0x40]);
        impl MsrAccess for Msrs {
            type Error = u32;
            fn read_msr(&mut self, msr: u32) -> Result<u64, u32> {
                self.0.get((msr - 0x800) as usize).copied().ok_or(msr)
            }
            fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), u32> {
                *self.0.get_mut((msr - 0x800) as usize).ok_or(msr)? = value;
                Ok(())
            }
        }
        let mut msrs = [0u64; 0x40];
        msrs[0x03] = 0x0005_0015;
        msrs[0x33] = u64::from(MODE_NMI);
        msrs[0x36] = u64::from(MODE_NMI);
        let mut apic = X2Apic::new(Msrs(msrs));
        let got = mask_nmi_lvts(&mut apic, CmciPolicy::Mask).unwrap();
        assert_eq!(got, DisVectors::THMR | DisVectors::LINT1);
        assert_eq!(apic.msrs().0[0x33], u64::from(MODE_NMI | MASKED));
        assert_eq!(apic.msrs().0[0x36], u64::from(MODE_NMI | MASKED));
        restore_nmi_lvts(&mut apic, got).unwrap();
        assert_eq!(apic.msrs().0[0x33], u64::from(MODE_NMI));
        assert_eq!(apic.msrs().0[0x36], u64::from(MODE_NMI));
    }
}
