//! Sample layouts shared with machine code, and their hot-path updates.
//!
//! Every sample is a `#[repr(C)]` structure of plain integers. Machine code
//! (the world switchers) updates them in place at displacements taken from
//! [`core::mem::offset_of!`], so the field order and sizes below are a
//! contract; the compile-time asserts at the bottom pin them.
//!
//! The update methods are single-writer read-modify-write sequences on plain
//! fields: no lock, no atomic instruction, no allocation. They use wrapping
//! arithmetic, as the C macros do, so they never panic.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A counter (`STAMCOUNTER`, type [`crate::StamType::Counter`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct StamCounter {
    /// The current count (`c`).
    pub c: u64,
}

impl StamCounter {
    /// The reset state: zero.
    pub const RESET: Self = Self { c: 0 };

    /// A counter in its reset state.
    #[must_use]
    pub const fn new() -> Self {
        Self::RESET
    }

    /// Adds one (`STAM_COUNTER_INC`).
    #[inline(always)]
    pub fn inc(&mut self) {
        self.c = self.c.wrapping_add(1);
    }

    /// Adds `n` (`STAM_COUNTER_ADD`).
    #[inline(always)]
    pub fn add(&mut self, n: u64) {
        self.c = self.c.wrapping_add(n);
    }

    /// Subtracts one (`STAM_COUNTER_DEC`).
    #[inline(always)]
    pub fn dec(&mut self) {
        self.c = self.c.wrapping_sub(1);
    }

    /// Back to zero (`STAM_COUNTER_RESET`).
    #[inline]
    pub fn reset(&mut self) {
        *self = Self::RESET;
    }

    /// The current count.
    #[must_use]
    pub const fn get(&self) -> u64 {
        self.c
    }
}

impl Default for StamCounter {
    fn default() -> Self {
        Self::RESET
    }
}

/// A profile (`STAMPROFILE`, type [`crate::StamType::Profile`]): number of
/// periods, total ticks, and the longest and shortest period.
///
/// Ticks are whatever the caller measures in (raw TSC ticks for the
/// switchers); STAM never converts them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct StamProfile {
    /// Number of periods recorded (`cPeriods`).
    pub periods: u64,
    /// Sum of all period lengths (`cTicks`).
    pub ticks: u64,
    /// Longest period seen (`cTicksMax`); 0 after reset.
    pub ticks_max: u64,
    /// Shortest period seen (`cTicksMin`); `u64::MAX` after reset.
    pub ticks_min: u64,
}

impl StamProfile {
    /// The reset state: no periods, `ticks_min == u64::MAX`.
    pub const RESET: Self = Self {
        periods: 0,
        ticks: 0,
        ticks_max: 0,
        ticks_min: u64::MAX,
    };

    /// A profile in its reset state.
    #[must_use]
    pub const fn new() -> Self {
        Self::RESET
    }

    /// Records one period of `ticks` (`STAM_PROFILE_ADD_PERIOD`).
    #[inline(always)]
    pub fn add_period(&mut self, ticks: u64) {
        self.ticks = self.ticks.wrapping_add(ticks);
        self.periods = self.periods.wrapping_add(1);
        if self.ticks_max < ticks {
            self.ticks_max = ticks;
        }
        if self.ticks_min > ticks {
            self.ticks_min = ticks;
        }
    }

    /// Records the period from `start` to `now` (`STAM_PROFILE_STOP`, where
    /// the start timestamp lives in the caller's frame).
    #[inline(always)]
    pub fn stop_since(&mut self, start: u64, now: u64) {
        self.add_period(now.wrapping_sub(start));
    }

    /// Back to the reset state.
    #[inline]
    pub fn reset(&mut self) {
        *self = Self::RESET;
    }

    /// Average ticks per period, `ticks / max(periods, 1)` (what the print
    /// layout shows).
    #[must_use]
    pub const fn average(&self) -> u64 {
        let div = if self.periods == 0 { 1 } else { self.periods };
        self.ticks / div
    }

    /// The shortest period, or `None` while no period has been recorded.
    #[must_use]
    pub const fn min(&self) -> Option<u64> {
        if self.periods == 0 {
            None
        } else {
            Some(self.ticks_min)
        }
    }
}

impl Default for StamProfile {
    fn default() -> Self {
        Self::RESET
    }
}

/// An advanced profile (`STAMPROFILEADV`, type
/// [`crate::StamType::ProfileAdv`]): a [`StamProfile`] plus the start
/// timestamp of the period in flight, so start and stop can happen in
/// different functions (or in machine code on either side of a world switch).
///
/// A `ts_start` of 0 means "not running"; a period started at timestamp 0 is
/// therefore indistinguishable from no period and is ignored by
/// [`stop`](Self::stop).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct StamProfileAdv {
    /// The accumulated statistics.
    pub core: StamProfile,
    /// Timestamp of the running period's start, 0 when stopped (`tsStart`).
    pub ts_start: u64,
}

impl StamProfileAdv {
    /// The reset state: core reset, not running.
    pub const RESET: Self = Self {
        core: StamProfile::RESET,
        ts_start: 0,
    };

    /// An advanced profile in its reset state.
    #[must_use]
    pub const fn new() -> Self {
        Self::RESET
    }

    /// Starts a period at `ts` (`STAM_PROFILE_ADV_START`).
    #[inline(always)]
    pub fn start(&mut self, ts: u64) {
        self.ts_start = ts;
    }

    /// Ends the running period at `ts` and records it
    /// (`STAM_PROFILE_ADV_STOP`). Does nothing unless running; always leaves
    /// the sample stopped.
    #[inline(always)]
    pub fn stop(&mut self, ts: u64) {
        let start = self.ts_start;
        if start != 0 {
            self.ts_start = 0;
            self.core.add_period(ts.wrapping_sub(start));
        }
    }

    /// Like [`stop`](Self::stop), and also credits the same period to
    /// `also` (`STAM_PROFILE_ADV_STOP_EX`, attribution to a second profile).
    #[inline(always)]
    pub fn stop_ex(&mut self, also: &mut StamProfile, ts: u64) {
        let start = self.ts_start;
        if start != 0 {
            self.ts_start = 0;
            let ticks = ts.wrapping_sub(start);
            self.core.add_period(ticks);
            also.add_period(ticks);
        }
    }

    /// Stops `self` and starts `next` with one timestamp
    /// (`STAM_PROFILE_ADV_STOP_START`).
    #[inline(always)]
    pub fn stop_start(&mut self, next: &mut StamProfileAdv, ts: u64) {
        self.stop(ts);
        next.start(ts);
    }

    /// Excludes a suspended stretch from the running period: shifts
    /// `ts_start` forward by `now - suspended_at` without adding a period
    /// (`STAM_PROFILE_ADV_SUSPEND` / `_RESUME`; the caller keeps the suspend
    /// timestamp). Does nothing unless running.
    #[inline(always)]
    pub fn resume(&mut self, suspended_at: u64, now: u64) {
        if self.ts_start != 0 {
            self.ts_start = self.ts_start.wrapping_add(now.wrapping_sub(suspended_at));
        }
    }

    /// Marks the sample stopped without recording anything
    /// (`STAM_PROFILE_ADV_SET_STOPPED`).
    #[inline(always)]
    pub fn set_stopped(&mut self) {
        self.ts_start = 0;
    }

    /// Whether a period is in flight (`STAM_PROFILE_ADV_IS_RUNNING`).
    #[inline(always)]
    #[must_use]
    pub const fn is_running(&self) -> bool {
        self.ts_start != 0
    }

    /// Back to the reset state (also drops a period in flight).
    #[inline]
    pub fn reset(&mut self) {
        *self = Self::RESET;
    }
}

impl Default for StamProfileAdv {
    fn default() -> Self {
        Self::RESET
    }
}

/// A ratio of two 32-bit values (`STAMRATIOU32`, types
/// [`crate::StamType::RatioU32`] and [`crate::StamType::RatioU32Reset`]),
/// printed `A:B`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct StamRatioU32 {
    /// The numerator (`u32A`).
    pub a: u32,
    /// The denominator (`u32B`).
    pub b: u32,
}

impl StamRatioU32 {
    /// A ratio of `0:0`.
    #[must_use]
    pub const fn new() -> Self {
        Self { a: 0, b: 0 }
    }

    /// Sets both halves.
    #[inline(always)]
    pub fn set(&mut self, a: u32, b: u32) {
        self.a = a;
        self.b = b;
    }
}

/// Reads the time-stamp counter (`STAM_GET_TS`): a bare `rdtsc`, not
/// serialised, exactly as STAM does it.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[inline(always)]
#[must_use]
pub fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86")]
    use core::arch::x86::_rdtsc;
    #[cfg(target_arch = "x86_64")]
    use core::arch::x86_64::_rdtsc;
    // SAFETY: `rdtsc` only reads the time-stamp counter into registers; it
    // touches no memory and every CPU Rust's x86 targets run on has it. (If
    // the OS sets CR4.TSD the instruction faults, which is a signal, not UB.)
    unsafe { _rdtsc() }
}

const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<StamCounter>() == 8);
    assert!(offset_of!(StamCounter, c) == 0);

    assert!(size_of::<StamProfile>() == 32);
    assert!(offset_of!(StamProfile, periods) == 0);
    assert!(offset_of!(StamProfile, ticks) == 8);
    assert!(offset_of!(StamProfile, ticks_max) == 16);
    assert!(offset_of!(StamProfile, ticks_min) == 24);

    assert!(size_of::<StamProfileAdv>() == 40);
    assert!(offset_of!(StamProfileAdv, core) == 0);
    assert!(offset_of!(StamProfileAdv, core.periods) == 0);
    assert!(offset_of!(StamProfileAdv, core.ticks) == 8);
    assert!(offset_of!(StamProfileAdv, core.ticks_max) == 16);
    assert!(offset_of!(StamProfileAdv, core.ticks_min) == 24);
    assert!(offset_of!(StamProfileAdv, ts_start) == 32);

    assert!(size_of::<StamRatioU32>() == 8);
    assert!(align_of::<StamRatioU32>() == 4);
    assert!(offset_of!(StamRatioU32, a) == 0);
    assert!(offset_of!(StamRatioU32, b) == 4);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_ops_wrap() {
        let mut c = StamCounter::new();
        c.inc();
        c.add(10);
        c.dec();
        assert_eq!(c.get(), 10);
        c.reset();
        c.dec();
        assert_eq!(c.c, u64::MAX);
        c.inc();
        assert_eq!(c.c, 0);
        assert_eq!(StamCounter::default(), StamCounter::RESET);
    }

    #[test]
    fn profile_min_max_average() {
        let mut p = StamProfile::default();
        assert_eq!(p.ticks_min, u64::MAX);
        assert_eq!(p.min(), None);
        assert_eq!(p.average(), 0);
        p.add_period(30);
        p.add_period(10);
        p.add_period(20);
        assert_eq!(
            p,
            StamProfile {
                periods: 3,
                ticks: 60,
                ticks_max: 30,
                ticks_min: 10
            }
        );
        assert_eq!(p.average(), 20);
        assert_eq!(p.min(), Some(10));
        p.stop_since(100, 105);
        assert_eq!(p.ticks_min, 5);
        p.reset();
        assert_eq!(p, StamProfile::RESET);
    }

    #[test]
    fn adv_stop_without_start_is_ignored() {
        let mut a = StamProfileAdv::new();
        a.stop(1_000);
        assert_eq!(a, StamProfileAdv::RESET);
        assert!(!a.is_running());
        a.start(100);
        assert!(a.is_running());
        a.stop(150);
        assert!(!a.is_running());
        assert_eq!(a.core.periods, 1);
        assert_eq!(a.core.ticks, 50);
        // A second stop is ignored: the first one cleared ts_start.
        a.stop(400);
        assert_eq!(a.core.periods, 1);
        assert_eq!(a.ts_start, 0);
    }

    #[test]
    fn adv_stop_start_resume_and_ex() {
        let mut a = StamProfileAdv::new();
        let mut b = StamProfileAdv::new();
        let mut attr = StamProfile::new();
        a.start(10);
        a.stop_start(&mut b, 30);
        assert_eq!(a.core.ticks, 20);
        assert_eq!(b.ts_start, 30);
        // Suspended from 40 to 70: those 30 ticks are excluded.
        b.resume(40, 70);
        b.stop_ex(&mut attr, 100);
        assert_eq!(b.core.ticks, 40);
        assert_eq!(attr.ticks, 40);
        assert_eq!(attr.periods, 1);
        // Resume while stopped does nothing.
        b.resume(0, 1000);
        assert!(!b.is_running());
        b.start(5);
        b.set_stopped();
        b.stop(10);
        assert_eq!(b.core.periods, 1);
    }

    #[test]
    fn adv_wrapping_timestamps_do_not_panic() {
        let mut a = StamProfileAdv::new();
        a.start(u64::MAX - 1);
        a.stop(3);
        assert_eq!(a.core.ticks, 5);
    }

    #[test]
    fn ratio_set() {
        let mut r = StamRatioU32::new();
        r.set(3, 4);
        assert_eq!((r.a, r.b), (3, 4));
    }

    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[test]
    fn rdtsc_moves_forward() {
        let a = rdtsc();
        let b = rdtsc();
        assert!(b >= a);
    }
}
