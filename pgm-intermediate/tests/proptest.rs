//! Property tests: random non-conflicting mapping sets, checked against the
//! walker and the lister page by page.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::{ctx, pages_of};
use pgm_intermediate::{Flavour, Flavours, MapError, MapFlags, PAGE_SIZE};
use proptest::prelude::*;

/// Windows of 256 pages each, with the flavours that can address them:
/// around directory boundaries, the top of 4 GiB and both canonical halves.
const WINDOWS: [(u64, Flavours); 9] = [
    (0x0000_0000, Flavours::all()),
    (0x001f_8000, Flavours::all()),
    (0x003f_8000, Flavours::all()),
    (0xa000_0000, Flavours::all()),
    (0xfff0_0000, Flavours::all()),
    (0x0000_0080_0000_0000, Flavours::LONG),
    (0x0000_7fff_fff0_0000, Flavours::LONG),
    (0xffff_8000_0000_0000, Flavours::LONG),
    (0xffff_ffff_fff0_0000, Flavours::LONG),
];

const FLAG_BITS: [MapFlags; 6] = [
    MapFlags::WRITABLE,
    MapFlags::USER,
    MapFlags::WRITE_THROUGH,
    MapFlags::CACHE_DISABLE,
    MapFlags::GLOBAL,
    MapFlags::NO_EXECUTE,
];

#[derive(Clone, Copy, Debug)]
struct Req {
    virt: u64,
    phys: u64,
    pages: u64,
    flags: MapFlags,
    flavours: Flavours,
}

fn requests() -> impl Strategy<Value = Vec<Req>> {
    let one = (
        0..WINDOWS.len(),
        0u64..0xf0,
        1u64..=16,
        any::<u64>(),
        0u8..64,
        1u8..8,
    );
    prop::collection::vec(one, 1..14).prop_map(|raw| {
        let mut accepted: Vec<Req> = Vec::new();
        for (w, off, pages, phys_seed, flag_seed, flavour_seed) in raw {
            let (base, allowed) = WINDOWS[w];
            let flavours = Flavours::from_bits_truncate(flavour_seed) & allowed;
            if flavours.is_empty() {
                continue;
            }
            let phys_pages = if flavours.contains(Flavours::LEGACY32) {
                (1 << 20) - 16
            } else {
                (1 << 40) - 16
            };
            let mut flags = MapFlags::empty();
            for (i, f) in FLAG_BITS.iter().enumerate() {
                if flag_seed & (1 << i) != 0 {
                    flags |= *f;
                }
            }
            let r = Req {
                virt: base + off * PAGE_SIZE,
                phys: (phys_seed % phys_pages) * PAGE_SIZE,
                pages,
                flags,
                flavours,
            };
            let overlaps = accepted.iter().any(|a| {
                a.flavours.intersects(r.flavours)
                    && a.virt < r.virt + r.pages * PAGE_SIZE
                    && r.virt < a.virt + a.pages * PAGE_SIZE
            });
            if !overlaps {
                accepted.push(r);
            }
        }
        accepted
    })
}

fn expected(reqs: &[Req]) -> BTreeMap<Flavour, Vec<(u64, u64, MapFlags)>> {
    let mut out: BTreeMap<Flavour, Vec<(u64, u64, MapFlags)>> = BTreeMap::new();
    for r in reqs {
        for flavour in r.flavours.flavours() {
            let flags = if flavour == Flavour::Legacy32 {
                r.flags - MapFlags::NO_EXECUTE
            } else {
                r.flags
            };
            for i in 0..r.pages {
                out.entry(flavour).or_default().push((
                    r.virt + i * PAGE_SIZE,
                    r.phys + i * PAGE_SIZE,
                    flags,
                ));
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every page of every request translates as requested, and nothing
    /// else is mapped in any flavour.
    #[test]
    fn walker_agrees_with_every_mapping(reqs in requests()) {
        let mut c = ctx(512);
        for r in &reqs {
            prop_assert_eq!(c.map(r.virt, r.phys, r.pages * PAGE_SIZE, r.flags, r.flavours), Ok(()), "{:x?}", r);
        }
        let want = expected(&reqs);
        for flavour in Flavour::ALL {
            let pages = want.get(&flavour).cloned().unwrap_or_default();
            for &(virt, phys, flags) in &pages {
                let t = c.translate(flavour, virt + 0x9a8).unwrap();
                prop_assert_eq!(t.phys, phys + 0x9a8);
                prop_assert_eq!(t.flags, flags);
                prop_assert_eq!(t.writable, flags.contains(MapFlags::WRITABLE));
                prop_assert_eq!(t.user, flags.contains(MapFlags::USER));
                prop_assert_eq!(t.no_execute, flags.contains(MapFlags::NO_EXECUTE));
            }
            prop_assert_eq!(pages_of(&c, flavour), pages, "{}", flavour);
        }
        // Mapping everything again changes nothing.
        let before = c.allocator().clone();
        for r in &reqs {
            prop_assert_eq!(c.map(r.virt, r.phys, r.pages * PAGE_SIZE, r.flags, r.flavours), Ok(()));
        }
        prop_assert_eq!(c.allocator(), &before);
    }

    /// Remapping any mapped page elsewhere is a conflict naming it, and
    /// leaves every table as it was.
    #[test]
    fn conflicting_requests_change_nothing(reqs in requests(), pick in any::<prop::sample::Index>(), delta in 1u64..1000) {
        prop_assume!(!reqs.is_empty());
        let mut c = ctx(512);
        for r in &reqs {
            c.map(r.virt, r.phys, r.pages * PAGE_SIZE, r.flags, r.flavours).unwrap();
        }
        let r = reqs[pick.index(reqs.len())];
        let before = c.allocator().clone();
        let last = r.virt + (r.pages - 1) * PAGE_SIZE;
        // The last one or two pages of `r`, moved to other frames.
        let start = last.saturating_sub(PAGE_SIZE).max(r.virt.min(last));
        let existing = r.phys + (start - r.virt);
        let new_phys = if existing >= 1 << 24 {
            existing - delta * PAGE_SIZE
        } else {
            existing + delta * PAGE_SIZE
        };
        let len = last + PAGE_SIZE - start;
        let err = c.map(start, new_phys, len, r.flags, r.flavours).unwrap_err();
        let is_conflict = matches!(err, MapError::Conflict { virt, .. } if virt >= r.virt && virt <= last);
        prop_assert!(is_conflict, "{:?}", err);
        prop_assert_eq!(c.allocator(), &before);
    }
}
