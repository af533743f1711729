//! The per-vCPU phase machine that cuts the executed instructions into
//! round trips, and the tally of distinct trips.
//!
//! Phases are decided by where each executed instruction lies:
//!
//! ```text
//! Host --insn in the switcher--> ToGC --insn in the far side--> Far
//! Far  --insn in the switcher--> ToHC --insn elsewhere-------> Host (trip recorded)
//! ToGC --insn elsewhere (no far side: a stub)-----------------> Host (trip recorded)
//! ```
//!
//! The switcher ranges are its code in every view it runs at (HC, identity,
//! RC); the far-side ranges are the hypervisor area, where the helper (or the
//! RC code) runs.

use std::collections::BTreeMap;

use crate::class::{Class, N_CLASSES};

/// A switch direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Host to hypervisor context.
    ToGc,
    /// Back to the host.
    ToHc,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::ToGc, Direction::ToHc];

    /// `to_gc` or `to_hc`.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::ToGc => "to_gc",
            Direction::ToHc => "to_hc",
        }
    }
}

/// What a round trip synchronised, read from what it executed: FPU state
/// moved (FXSAVE or FXRSTOR) and/or debug registers written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TripKind {
    /// Neither: the cheapest trip.
    NoSync,
    /// FPU state only.
    FpuSync,
    /// Debug registers only.
    DebugSync,
    /// Both.
    FpuDebugSync,
}

impl TripKind {
    /// Every kind.
    pub const ALL: [TripKind; 4] = [
        TripKind::NoSync,
        TripKind::FpuSync,
        TripKind::DebugSync,
        TripKind::FpuDebugSync,
    ];

    /// `no_sync`, `fpu_sync`, `debug_sync`, `fpu_debug_sync`.
    pub const fn name(self) -> &'static str {
        match self {
            TripKind::NoSync => "no_sync",
            TripKind::FpuSync => "fpu_sync",
            TripKind::DebugSync => "debug_sync",
            TripKind::FpuDebugSync => "fpu_debug_sync",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<TripKind> {
        TripKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// The counts of one direction of one trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Counts {
    /// Every instruction executed in the direction.
    pub instructions: u64,
    /// Per class, indexed by [`Class::index`].
    pub classes: [u64; N_CLASSES],
}

impl Counts {
    /// The count of `class`.
    pub fn get(&self, class: Class) -> u64 {
        self.classes[class.index()]
    }
}

/// Both directions of one round trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Trip {
    /// ToGC, then ToHC.
    pub dirs: [Counts; 2],
}

impl Trip {
    /// The counts of direction `d`.
    pub fn dir(&self, d: Direction) -> &Counts {
        &self.dirs[d as usize]
    }

    /// The trip's kind, from the FPU and debug-register classes it executed.
    pub fn kind(&self) -> TripKind {
        let any = |c: Class| self.dirs.iter().any(|d| d.get(c) > 0);
        match (
            any(Class::Fxsave) || any(Class::Fxrstor),
            any(Class::DrWrite),
        ) {
            (false, false) => TripKind::NoSync,
            (true, false) => TripKind::FpuSync,
            (false, true) => TripKind::DebugSync,
            (true, true) => TripKind::FpuDebugSync,
        }
    }
}

/// Where a vCPU is in a round trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Host,
    ToGc,
    Far,
    ToHc,
}

/// Where an executed instruction lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// In the switcher's code.
    Switcher,
    /// In the hypervisor area (the far side).
    Far,
    /// Anywhere else (the host kernel).
    Elsewhere,
}

/// Address ranges `[start, end)` of the switcher and of the far side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges {
    /// The switcher's code in each view.
    pub switcher: Vec<(u64, u64)>,
    /// The hypervisor area in each view.
    pub far: Vec<(u64, u64)>,
}

impl Ranges {
    /// Where `va` lies.
    pub fn place(&self, va: u64) -> Place {
        let within = |r: &[(u64, u64)]| r.iter().any(|&(lo, hi)| va >= lo && va < hi);
        if within(&self.switcher) {
            Place::Switcher
        } else if within(&self.far) {
            Place::Far
        } else {
            Place::Elsewhere
        }
    }
}

/// The phase machine of every vCPU and the tally of distinct trips.
#[derive(Debug, Default)]
pub struct Tally {
    vcpus: Vec<(Phase, Trip)>,
    /// Each distinct trip with the number of times it ran.
    pub trips: BTreeMap<Trip, u64>,
}

impl Tally {
    /// An empty tally.
    pub fn new() -> Self {
        Self::default()
    }

    fn vcpu(&mut self, v: usize) -> &mut (Phase, Trip) {
        if self.vcpus.len() <= v {
            self.vcpus.resize(v + 1, (Phase::Host, Trip::default()));
        }
        &mut self.vcpus[v]
    }

    /// An instruction at a place of kind `place` starts executing on vCPU
    /// `v`: moves the phase; counts it (and its class) when in the switcher.
    pub fn insn(&mut self, v: usize, place: Place, class: Option<Class>) {
        let (phase, trip) = *self.vcpu(v);
        let next = match (phase, place) {
            (Phase::Host, Place::Switcher) => Phase::ToGc,
            (Phase::ToGc, Place::Far) => Phase::Far,
            (Phase::Far, Place::Switcher) => Phase::ToHc,
            (Phase::ToGc | Phase::ToHc, Place::Elsewhere) => {
                *self.trips.entry(trip).or_insert(0) += 1;
                *self.vcpu(v) = (Phase::Host, Trip::default());
                return;
            }
            (p, _) => p,
        };
        let slot = self.vcpu(v);
        slot.0 = next;
        let d = match next {
            Phase::ToGc => Direction::ToGc,
            Phase::ToHc => Direction::ToHc,
            Phase::Host | Phase::Far => return,
        };
        let counts = &mut slot.1.dirs[d as usize];
        counts.instructions += 1;
        if let Some(c) = class {
            counts.classes[c.index()] += 1;
        }
    }

    /// A memory access to the local APIC page on vCPU `v`, counted when it
    /// happens inside a switch.
    pub fn apic(&mut self, v: usize, write: bool) {
        let slot = self.vcpu(v);
        let d = match slot.0 {
            Phase::ToGc => Direction::ToGc,
            Phase::ToHc => Direction::ToHc,
            Phase::Host | Phase::Far => return,
        };
        let c = if write {
            Class::ApicMmioWrite
        } else {
            Class::ApicMmioRead
        };
        slot.1.dirs[d as usize].classes[c.index()] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_is_cut_at_the_far_side_and_at_the_return() {
        let mut t = Tally::new();
        t.insn(0, Place::Elsewhere, None);
        t.insn(0, Place::Switcher, None);
        t.insn(0, Place::Switcher, Some(Class::Cr3Write));
        t.apic(0, false);
        t.insn(0, Place::Far, Some(Class::Cr3Write)); // not counted
        t.apic(0, true); // far side: not counted
        t.insn(0, Place::Switcher, Some(Class::Fxrstor));
        t.apic(0, true);
        assert!(t.trips.is_empty());
        t.insn(0, Place::Elsewhere, None);
        let (trip, n) = t
            .trips
            .iter()
            .next()
            .map(|(t, n)| (*t, *n))
            .unwrap_or_default();
        assert_eq!(n, 1);
        assert_eq!(trip.dir(Direction::ToGc).instructions, 2);
        assert_eq!(trip.dir(Direction::ToGc).get(Class::Cr3Write), 1);
        assert_eq!(trip.dir(Direction::ToGc).get(Class::ApicMmioRead), 1);
        assert_eq!(trip.dir(Direction::ToHc).get(Class::ApicMmioWrite), 1);
        assert_eq!(trip.dir(Direction::ToHc).get(Class::Cr3Write), 0);
        assert_eq!(trip.kind(), TripKind::FpuSync);
    }

    #[test]
    fn a_stub_trip_ends_without_a_far_side() {
        let mut t = Tally::new();
        t.insn(1, Place::Switcher, Some(Class::DrWrite));
        t.insn(1, Place::Elsewhere, None);
        t.insn(1, Place::Switcher, None);
        t.insn(1, Place::Elsewhere, None);
        assert_eq!(t.trips.values().sum::<u64>(), 2);
        assert!(t.trips.keys().any(|k| k.kind() == TripKind::DebugSync));
        assert!(t.trips.keys().any(|k| k.kind() == TripKind::NoSync));
    }
}
