//! Behaviour of `IntermediateContext`: roots, mapping, conflicts, limits,
//! the walker, and unmapping.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::{assert_mapped, ctx, pages_of, SparseAllocator, BASE};
use pgm_intermediate::{
    walk, AllocError, EntryFlags, Flavour, Flavours, IntermediateContext, Level, MapError,
    MapFlags, NewError, PageAllocator, PageSize, RangeError, TableMemory, UnmapError, VecAllocator,
    WalkError, FOUR_GIB, PAGE_SIZE,
};

const W: MapFlags = MapFlags::WRITABLE;
const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 0x20;
const D: u64 = 0x40;
const PS: u64 = 0x80;

fn is_unmapped(c: &IntermediateContext<impl PageAllocator>, flavour: Flavour, virt: u64) -> bool {
    matches!(
        c.translate(flavour, virt),
        Err(WalkError::NotPresent { .. })
    )
}

#[test]
fn new_allocates_seven_roots_below_4g_and_maps_nothing() {
    let c = ctx(16);
    let a = c.allocator();
    assert_eq!(a.used_pages(), 7);
    let roots = [c.cr3_32(), c.cr3_pae(), c.cr3_amd64()];
    for r in roots {
        assert_eq!(u64::from(r) % PAGE_SIZE, 0);
        assert!(u64::from(r) >= BASE && u64::from(r) < BASE + 7 * PAGE_SIZE);
    }
    assert_eq!(c.cr3(Flavour::Legacy32), c.cr3_32());
    assert_eq!(c.cr3(Flavour::Pae), c.cr3_pae());
    assert_eq!(c.cr3(Flavour::Long), c.cr3_amd64());
    // The PAE PDPT holds four present PDs and nothing else (no R/W, U/S, A).
    for i in 0..4u64 {
        let e = a.read_u64(u64::from(c.cr3_pae()) + 8 * i).unwrap();
        assert_eq!(e & 0xfff, P, "PDPTE {i}");
        assert!(e & !0xfff >= BASE);
    }
    for i in 4..512u64 {
        assert_eq!(a.read_u64(u64::from(c.cr3_pae()) + 8 * i), Ok(0));
    }
    for flavour in Flavour::ALL {
        assert_eq!(c.mappings(flavour).unwrap(), []);
        assert!(is_unmapped(&c, flavour, 0));
    }
}

#[test]
fn new_reports_exhaustion_and_high_tables() {
    let err = IntermediateContext::new(VecAllocator::new(BASE, 6).unwrap()).unwrap_err();
    assert_eq!(err, NewError::Alloc(AllocError::OutOfPages { capacity: 6 }));
    // The 3rd page lands at 4 GiB.
    let err = IntermediateContext::new(SparseAllocator::new(FOUR_GIB - 2 * PAGE_SIZE, PAGE_SIZE))
        .unwrap_err();
    assert_eq!(err, NewError::BadTablePage { phys: FOUR_GIB });
    assert_eq!(
        err.to_string(),
        "table page 0x100000000 is not a 4 KiB-aligned page below 4 GiB"
    );
    let err = IntermediateContext::new(SparseAllocator::new(0x1800, PAGE_SIZE)).unwrap_err();
    assert_eq!(err, NewError::BadTablePage { phys: 0x1800 });
}

/// The switcher's three views of one block: HC, identity and RC, plus
/// the RC hypervisor area, proven page by page in every flavour.
#[test]
fn hc_identity_and_rc_ranges_in_every_flavour() {
    let mut c = ctx(64);
    let code_phys = 0x0123_4000;
    let code_pages = 5;
    let hc32 = 0xc08f_e000; // straddles a 2 MiB boundary
    let hc64 = 0xffff_8000_c08f_e000;
    let rc = 0xa000_0000;
    let len = code_pages * PAGE_SIZE;
    let area_phys = 0x0200_0000;
    c.map(code_phys, code_phys, len, W, Flavours::all())
        .unwrap();
    c.map(hc32, code_phys, len, W, Flavours::LEGACY32 | Flavours::PAE)
        .unwrap();
    c.map(hc64, code_phys, len, W, Flavours::LONG).unwrap();
    c.map(rc, code_phys, len, W, Flavours::default()).unwrap();
    c.map(
        rc + 0x10_0000,
        area_phys,
        0x40_0000,
        W | MapFlags::NO_EXECUTE,
        Flavours::all(),
    )
    .unwrap();

    for flavour in Flavour::ALL {
        assert_mapped(&c, flavour, code_phys, code_phys, code_pages, W);
        let hc = if flavour == Flavour::Long { hc64 } else { hc32 };
        assert_mapped(&c, flavour, hc, code_phys, code_pages, W);
        assert_mapped(&c, flavour, rc, code_phys, code_pages, W);
        assert_mapped(
            &c,
            flavour,
            rc + 0x10_0000,
            area_phys,
            0x400,
            W | MapFlags::NO_EXECUTE,
        );
        let t = c.translate(flavour, rc + 0x10_0000).unwrap();
        assert_eq!(t.no_execute, flavour != Flavour::Legacy32);
        assert!(t.writable && !t.user);
        assert_eq!(t.page_size, PageSize::Size4K);
        // Exactly these runs and nothing else.
        let area_flags = if flavour == Flavour::Legacy32 {
            W
        } else {
            W | MapFlags::NO_EXECUTE
        };
        let mut want = vec![
            (code_phys, code_phys, len, W),
            (rc, code_phys, len, W),
            (rc + 0x10_0000, area_phys, 0x40_0000, area_flags),
            (hc, code_phys, len, W),
        ];
        want.sort();
        let got: Vec<_> = c
            .mappings(flavour)
            .unwrap()
            .into_iter()
            .map(|m| (m.virt, m.phys, m.len, m.flags))
            .collect();
        assert_eq!(got, want, "{flavour}");
        assert_eq!(pages_of(&c, flavour).len() as u64, 3 * code_pages + 0x400);
    }
    // The long-mode tables do not see the 32-bit HC address and vice versa.
    assert!(is_unmapped(&c, Flavour::Long, hc32));
    assert!(is_unmapped(&c, Flavour::Legacy32, 0xc08f_d000));
}

#[test]
fn entries_have_the_documented_bits() {
    let mut c = ctx(32);
    let virt = 0x4040_3000;
    let phys = 0x0765_4000;
    let flags =
        MapFlags::WRITE_THROUGH | MapFlags::CACHE_DISABLE | MapFlags::GLOBAL | MapFlags::NO_EXECUTE;
    c.map(virt, phys, PAGE_SIZE, flags, Flavours::all())
        .unwrap();
    for flavour in Flavour::ALL {
        let t = c.translate(flavour, virt).unwrap();
        let steps = t.path.steps();
        let (leaf, dirs) = steps.split_last().unwrap();
        let nx = if flavour == Flavour::Legacy32 {
            0
        } else {
            1 << 63
        };
        assert_eq!(
            leaf.entry,
            phys | P | A | D | 0x8 | 0x10 | 0x100 | nx,
            "{flavour}"
        );
        assert_eq!(leaf.level, Level::Pt);
        for d in dirs {
            let want = if flavour == Flavour::Pae && d.level == Level::Pdpt {
                P
            } else {
                P | RW | A
            };
            assert_eq!(d.entry & 0xfff, want, "{flavour} {:?}", d.level);
            assert_eq!(d.entry >> 63, 0);
        }
        assert!(!t.writable && !t.user);
        assert_eq!(leaf.flags(), EntryFlags::from_bits_retain(leaf.entry));
        assert!(leaf
            .flags()
            .contains(EntryFlags::DIRTY | EntryFlags::ACCESSED));
    }
}

#[test]
fn user_mappings_set_us_on_the_directories_above_them() {
    let mut c = ctx(32);
    c.map(0x0040_0000, 0x1000, PAGE_SIZE, W, Flavours::all())
        .unwrap();
    for flavour in Flavour::ALL {
        assert!(!c.translate(flavour, 0x0040_0000).unwrap().user);
    }
    // A user page under the same directories.
    c.map(
        0x0040_1000,
        0x2000,
        PAGE_SIZE,
        MapFlags::USER,
        Flavours::all(),
    )
    .unwrap();
    for flavour in Flavour::ALL {
        let t = c.translate(flavour, 0x0040_1000).unwrap();
        assert!(t.user && !t.writable, "{flavour}");
        for s in t.path.steps() {
            let pae_root = flavour == Flavour::Pae && s.level == Level::Pdpt;
            assert_eq!(s.entry & US != 0, !pae_root, "{flavour} {:?}", s.level);
        }
        // The supervisor page stays supervisor: its own PTE has no U/S.
        assert!(!c.translate(flavour, 0x0040_0000).unwrap().user);
    }
}

#[test]
fn remapping_identically_is_a_no_op() {
    let mut c = ctx(32);
    c.map(0x7000_0000, 0x30_0000, 0x5000, W, Flavours::all())
        .unwrap();
    let before = c.allocator().clone();
    c.map(0x7000_0000, 0x30_0000, 0x5000, W, Flavours::all())
        .unwrap();
    c.map(0x7000_2000, 0x30_2000, 0x1000, W, Flavours::PAE)
        .unwrap();
    // NX is dropped for 32-bit, so asking for it there is still identical.
    c.map(
        0x7000_2000,
        0x30_2000,
        0x1000,
        W | MapFlags::NO_EXECUTE,
        Flavours::LEGACY32,
    )
    .unwrap();
    assert_eq!(c.allocator(), &before);
}

/// VirtualBox's PAE check compared the PDE's table against the HC table
/// twice, so a PDE already pointing at the identity table was a conflict.
/// Any table this context made is fine to share.
#[test]
fn mapping_into_a_directory_whose_table_is_ours_is_not_a_conflict() {
    let mut c = ctx(32);
    // Identity range first, then an HC range in the same 2 MiB / 4 MiB region.
    c.map(0x0010_0000, 0x0010_0000, 0x2000, W, Flavours::all())
        .unwrap();
    let used = c.allocator().used_pages();
    c.map(0x0018_0000, 0x0090_0000, 0x2000, W, Flavours::all())
        .unwrap();
    assert_eq!(
        c.allocator().used_pages(),
        used,
        "the existing tables were reused"
    );
    c.map(0x0010_2000, 0x0010_2000, 0x1000, W, Flavours::all())
        .unwrap();
    for flavour in Flavour::ALL {
        assert_mapped(&c, flavour, 0x0010_0000, 0x0010_0000, 3, W);
        assert_mapped(&c, flavour, 0x0018_0000, 0x0090_0000, 2, W);
    }
}

#[test]
fn conflicts_name_both_frames_and_change_nothing() {
    let mut c = ctx(64);
    c.map(0x2000_0000, 0x50_0000, 0x3000, W, Flavours::all())
        .unwrap();
    c.map(0xffff_9000_0000_0000, 0x60_0000, 0x1000, W, Flavours::LONG)
        .unwrap();
    let before = c.allocator().clone();

    // Different frame, last page of a range whose other pages are free.
    let err = c
        .map(0x1fff_e000, 0x70_0000, 0x3000, W, Flavours::all())
        .unwrap_err();
    assert_eq!(
        err,
        MapError::Conflict {
            virt: 0x2000_0000,
            existing_phys: 0x50_0000,
            requested_phys: 0x70_2000,
            existing_flags: W,
            requested_flags: W,
            flavour: Flavour::Legacy32,
        }
    );
    assert!(err.to_string().contains("0x500000") && err.to_string().contains("0x702000"));

    // Same frame, different attributes.
    let err = c
        .map(
            0x2000_1000,
            0x50_1000,
            0x1000,
            MapFlags::empty(),
            Flavours::PAE,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        MapError::Conflict { virt: 0x2000_1000, existing_flags: W, requested_flags, flavour: Flavour::Pae, .. }
            if requested_flags.is_empty()
    ));

    // Conflict only in the last flavour checked: the others are untouched too.
    let err = c
        .map(0xffff_9000_0000_0000, 0x61_0000, 0x1000, W, Flavours::LONG)
        .unwrap_err();
    assert!(matches!(
        err,
        MapError::Conflict {
            flavour: Flavour::Long,
            existing_phys: 0x60_0000,
            ..
        }
    ));
    let err = c
        .map(0x2000_2000, 0x99_9000, 0x1000, W, Flavours::all())
        .unwrap_err();
    assert!(matches!(
        err,
        MapError::Conflict {
            flavour: Flavour::Legacy32,
            ..
        }
    ));
    let err = c
        .map(0x2000_2000, 0x99_9000, 0x1000, W, Flavours::LONG)
        .unwrap_err();
    assert!(matches!(
        err,
        MapError::Conflict {
            flavour: Flavour::Long,
            ..
        }
    ));

    // An HC range partially overlapping the identity range (VirtualBox rule 4).
    let err = c
        .map(0x2000_2000, 0x2000_2000, 0x2000, W, Flavours::all())
        .unwrap_err();
    assert!(matches!(
        err,
        MapError::Conflict {
            virt: 0x2000_2000,
            ..
        }
    ));

    assert_eq!(
        c.allocator(),
        &before,
        "a failed map must not change any table"
    );
    assert_eq!(pages_of(&c, Flavour::Legacy32).len(), 3);
}

/// Test the last entry at every level.
#[test]
fn last_entry_at_every_level() {
    let mut c = ctx(64);
    let top32 = 0xffff_f000;
    c.map(top32, 0xffff_f000, PAGE_SIZE, W, Flavours::LEGACY32)
        .unwrap();
    c.map(top32, 0x000f_ffff_ffff_f000, PAGE_SIZE, W, Flavours::PAE)
        .unwrap();
    let top64 = 0xffff_ffff_ffff_f000;
    let top_low = 0x0000_7fff_ffff_f000;
    c.map(top64, 0x000f_ffff_ffff_f000, PAGE_SIZE, W, Flavours::LONG)
        .unwrap();
    c.map(top_low, 0x1000, PAGE_SIZE, W, Flavours::LONG)
        .unwrap();

    let indices = |flavour, virt| -> Vec<u16> {
        c.translate(flavour, virt)
            .unwrap()
            .path
            .steps()
            .iter()
            .map(|s| s.index)
            .collect()
    };
    assert_eq!(indices(Flavour::Legacy32, top32 + 0xfff), [1023, 1023]);
    assert_eq!(indices(Flavour::Pae, top32 + 0xfff), [3, 511, 511]);
    assert_eq!(indices(Flavour::Long, top64 + 0xfff), [511, 511, 511, 511]);
    assert_eq!(
        indices(Flavour::Long, top_low + 0xfff),
        [255, 511, 511, 511]
    );

    assert_eq!(
        c.translate(Flavour::Legacy32, u64::from(u32::MAX))
            .unwrap()
            .phys,
        u64::from(u32::MAX)
    );
    assert_eq!(
        c.translate(Flavour::Pae, 0xffff_ffff).unwrap().phys,
        0x000f_ffff_ffff_ffff
    );
    assert_eq!(
        c.translate(Flavour::Long, u64::MAX).unwrap().phys,
        0x000f_ffff_ffff_ffff
    );
    assert_eq!(
        c.translate(Flavour::Long, top_low + 0xfff).unwrap().phys,
        0x1fff
    );

    // The lister sign-extends the upper half and sees nothing else.
    let long: Vec<_> = c
        .mappings(Flavour::Long)
        .unwrap()
        .iter()
        .map(|m| (m.virt, m.len))
        .collect();
    assert_eq!(long, [(top_low, PAGE_SIZE), (top64, PAGE_SIZE)]);
    assert_eq!(c.mappings(Flavour::Pae).unwrap()[0].virt, top32);
    assert_eq!(c.mappings(Flavour::Legacy32).unwrap()[0].phys, 0xffff_f000);

    // One past the last page: out of range, not a wrap-around to zero.
    for flavour in [Flavour::Legacy32, Flavour::Pae] {
        assert_eq!(
            c.translate(flavour, FOUR_GIB),
            Err(WalkError::VirtOutOfRange {
                virt: FOUR_GIB,
                flavour
            })
        );
    }
    assert_eq!(
        c.map(top64, 0, 0x2000, W, Flavours::LONG),
        Err(MapError::Range(RangeError::Wraps {
            start: top64,
            len: 0x2000
        }))
    );
    assert!(is_unmapped(&c, Flavour::Long, 0));
    assert!(is_unmapped(&c, Flavour::Legacy32, 0));
}

/// VirtualBox reused one default page table under the next directory entry
/// when a range crossed a 4 MiB (32-bit) or 2 MiB (PAE) boundary, so extra
/// addresses aliased. Here each directory entry gets its own table.
#[test]
fn straddling_a_directory_boundary_maps_exactly_the_range() {
    for boundary in [0x0040_0000u64, 0x0020_0000, 0x4000_0000, 0x80_0000_0000] {
        let mut c = ctx(64);
        let virt = boundary - PAGE_SIZE;
        let flavours = if boundary >= FOUR_GIB {
            Flavours::LONG
        } else {
            Flavours::all()
        };
        c.map(virt, 0x0900_0000, 0x2000, W, flavours).unwrap();
        for flavour in flavours.flavours().filter(|f| c.has(*f)) {
            assert_mapped(&c, flavour, virt, 0x0900_0000, 2, W);
            // Neither neighbour, nor what a shared table would alias.
            let neighbours = [
                Some(virt - PAGE_SIZE),
                Some(boundary + PAGE_SIZE),
                boundary.checked_sub(0x40_0000),
                Some(boundary + 0x40_0000 - PAGE_SIZE),
                boundary.checked_sub(0x20_0000),
                Some(boundary + 0x20_0000 - PAGE_SIZE),
                Some(0),
            ];
            for v in neighbours.into_iter().flatten() {
                assert!(
                    is_unmapped(&c, flavour, v),
                    "{flavour} {boundary:#x}: {v:#x} is mapped"
                );
            }
            assert_eq!(pages_of(&c, flavour).len(), 2, "{flavour}");
            let t0 = c.translate(flavour, virt).unwrap();
            let t1 = c.translate(flavour, boundary).unwrap();
            let pt_span = if flavour == Flavour::Legacy32 {
                0x40_0000
            } else {
                0x20_0000
            };
            let same_pt = t0.path.leaf().unwrap().table == t1.path.leaf().unwrap().table;
            assert_eq!(same_pt, boundary % pt_span != 0, "{flavour} {boundary:#x}");
        }
    }
}

#[test]
fn exhaustion_is_reported_before_anything_changes() {
    // 7 roots + 2 pages: the 32-bit PT fits, the PAE PT fits, long mode needs 3.
    let mut c = ctx(9);
    let before = c.allocator().clone();
    let err = c
        .map(0x1000_0000, 0x1000, 0x1000, W, Flavours::all())
        .unwrap_err();
    assert_eq!(
        err,
        MapError::OutOfPages {
            needed: 5,
            available: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "mapping needs 5 new table pages but only 2 are free"
    );
    assert_eq!(c.allocator(), &before);
    // Within budget it works, and then the budget is gone.
    c.map(
        0x1000_0000,
        0x1000,
        0x1000,
        W,
        Flavours::LEGACY32 | Flavours::PAE,
    )
    .unwrap();
    assert_eq!(c.allocator().available_pages(), 0);
    // Pages under existing tables need no new table.
    c.map(
        0x1000_1000,
        0x2000,
        0x1000,
        W,
        Flavours::LEGACY32 | Flavours::PAE,
    )
    .unwrap();
    let err = c
        .map(0x1040_0000, 0x2000, 0x1000, W, Flavours::LEGACY32)
        .unwrap_err();
    assert_eq!(
        err,
        MapError::OutOfPages {
            needed: 1,
            available: 0
        }
    );
}

#[test]
fn allocator_failure_after_the_check_writes_no_entry() {
    let mut alloc = SparseAllocator::new(0x20_0000, PAGE_SIZE);
    alloc.fail_after = Some(9);
    let mut c = IntermediateContext::new(alloc).unwrap();
    let err = c
        .map(0x1000_0000, 0x1000, 0x1000, W, Flavours::all())
        .unwrap_err();
    assert_eq!(err, MapError::Alloc(AllocError::OutOfPages { capacity: 9 }));
    for flavour in Flavour::ALL {
        assert_eq!(c.mappings(flavour).unwrap(), []);
        assert!(is_unmapped(&c, flavour, 0x1000_0000));
    }
}

#[test]
fn tables_above_4g_are_refused() {
    let alloc = SparseAllocator::new(FOUR_GIB - 7 * PAGE_SIZE, PAGE_SIZE);
    let mut c = IntermediateContext::new(alloc).unwrap();
    let err = c
        .map(0x1000, 0x1000, 0x1000, W, Flavours::LEGACY32)
        .unwrap_err();
    assert_eq!(err, MapError::BadTablePage { phys: FOUR_GIB });
    assert_eq!(c.mappings(Flavour::Legacy32).unwrap(), []);
}

#[test]
fn range_checks_name_the_value() {
    let mut c = ctx(32);
    let before = c.allocator().clone();
    let cases: Vec<(u64, u64, u64, Flavours, RangeError)> = vec![
        (
            0x1000,
            0x1000,
            0,
            Flavours::all(),
            RangeError::Empty { virt: 0x1000 },
        ),
        (
            0x1234,
            0x1000,
            1,
            Flavours::all(),
            RangeError::VirtMisaligned { virt: 0x1234 },
        ),
        (
            0x1000,
            0x1800,
            1,
            Flavours::all(),
            RangeError::PhysMisaligned { phys: 0x1800 },
        ),
        (
            FOUR_GIB,
            0,
            0x1000,
            Flavours::PAE,
            RangeError::VirtOutOfRange {
                virt: FOUR_GIB,
                last: FOUR_GIB + 0xfff,
                flavour: Flavour::Pae,
            },
        ),
        (
            0xffff_f000,
            0,
            0x2000,
            Flavours::all(),
            RangeError::VirtOutOfRange {
                virt: 0xffff_f000,
                last: FOUR_GIB + 0xfff,
                flavour: Flavour::Legacy32,
            },
        ),
        (
            0x0000_8000_0000_0000,
            0,
            0x1000,
            Flavours::LONG,
            RangeError::VirtOutOfRange {
                virt: 0x0000_8000_0000_0000,
                last: 0x0000_8000_0000_0fff,
                flavour: Flavour::Long,
            },
        ),
        // Crossing the canonical hole from the top of the lower half.
        (
            0x0000_7fff_ffff_f000,
            0,
            0x2000,
            Flavours::LONG,
            RangeError::VirtOutOfRange {
                virt: 0x0000_7fff_ffff_f000,
                last: 0x0000_8000_0000_0fff,
                flavour: Flavour::Long,
            },
        ),
        (
            0x1000,
            0xffff_f000,
            0x2000,
            Flavours::LEGACY32,
            RangeError::PhysOutOfRange {
                phys: 0xffff_f000,
                last: FOUR_GIB + 0xfff,
                flavour: Flavour::Legacy32,
            },
        ),
        (
            0x1000,
            1 << 52,
            0x1000,
            Flavours::PAE,
            RangeError::PhysOutOfRange {
                phys: 1 << 52,
                last: (1 << 52) + 0xfff,
                flavour: Flavour::Pae,
            },
        ),
        (
            0x1000,
            u64::MAX - 0xfff,
            0x2000,
            Flavours::LONG,
            RangeError::Wraps {
                start: u64::MAX - 0xfff,
                len: 0x2000,
            },
        ),
        (
            0x1000,
            0,
            u64::MAX,
            Flavours::LONG,
            RangeError::Wraps {
                start: 0x1000,
                len: u64::MAX,
            },
        ),
    ];
    for (virt, phys, len, flavours, want) in cases {
        assert_eq!(
            c.map(virt, phys, len, W, flavours),
            Err(MapError::Range(want)),
            "{want}"
        );
    }
    assert_eq!(
        c.map(
            0x1000,
            0x1000,
            0x1000,
            MapFlags::from_bits_retain(0x80),
            Flavours::all()
        ),
        Err(MapError::UnknownFlags { bits: 0x80 })
    );
    assert_eq!(c.allocator(), &before);
    assert_eq!(
        RangeError::VirtOutOfRange {
            virt: FOUR_GIB,
            last: FOUR_GIB + 0xfff,
            flavour: Flavour::Pae
        }
        .to_string(),
        "virtual range 0x100000000..=0x100000fff is outside the PAE linear address space"
    );

    // Physical addresses above 4 GiB are fine for PAE and long mode only.
    c.map(
        0x1000,
        0x1_2345_6000,
        0x1000,
        W,
        Flavours::PAE | Flavours::LONG,
    )
    .unwrap();
    assert_eq!(
        c.translate(Flavour::Pae, 0x1000).unwrap().phys,
        0x1_2345_6000
    );
    // An empty flavour set maps nothing and succeeds.
    c.map(0x9000, 0x9000, 0x1000, W, Flavours::empty()).unwrap();
    assert!(is_unmapped(&c, Flavour::Long, 0x9000));
}

#[test]
fn length_is_rounded_up_to_whole_pages() {
    let mut c = ctx(32);
    c.map(0x5000, 0x8000, 1, W, Flavours::all()).unwrap();
    c.map(0x9000, 0xa000, 0x1001, W, Flavours::all()).unwrap();
    for flavour in Flavour::ALL {
        assert_mapped(&c, flavour, 0x5000, 0x8000, 1, W);
        assert!(is_unmapped(&c, flavour, 0x6000));
        assert_mapped(&c, flavour, 0x9000, 0xa000, 2, W);
        assert!(is_unmapped(&c, flavour, 0xb000));
    }
}

/// Plants an entry `map` never writes, at the given level of `virt`'s walk.
fn plant(
    c: &mut IntermediateContext<VecAllocator>,
    flavour: Flavour,
    virt: u64,
    level: Level,
    entry: u64,
) {
    let table = match level {
        Level::Pml4 => u64::from(c.cr3_amd64()),
        Level::Pdpt if flavour == Flavour::Pae => u64::from(c.cr3_pae()),
        _ => {
            // The table at `level` is reached through a 4 KiB mapping made for the purpose.
            let t = c.translate(flavour, virt).unwrap();
            t.path
                .steps()
                .iter()
                .find(|s| s.level == level)
                .unwrap()
                .table
        }
    };
    let (shift, bits) = match (flavour, level) {
        (Flavour::Legacy32, Level::Pd) => (22, 10),
        (Flavour::Legacy32, _) => (12, 10),
        (Flavour::Pae, Level::Pdpt) => (30, 2),
        (_, Level::Pml5) => (48, 9),
        (_, Level::Pml4) => (39, 9),
        (_, Level::Pdpt) => (30, 9),
        (_, Level::Pd) => (21, 9),
        (_, Level::Pt) => (12, 9),
    };
    let addr = table + ((virt >> shift) & ((1 << bits) - 1)) * flavour.entry_size();
    let a = c.allocator_mut();
    if flavour == Flavour::Legacy32 {
        a.write_u32(addr, entry as u32).unwrap();
    } else {
        a.write_u64(addr, entry).unwrap();
    }
}

#[test]
fn walker_honours_large_pages() {
    let mut c = ctx(32);
    // Build the directories with a throwaway 4 KiB page, then replace the PDE.
    c.map(0x0080_0000, 0x1000, 0x1000, W, Flavours::all())
        .unwrap();
    // 32-bit: 4 MiB page at phys 0x12_0040_0000 (PSE-36 bits 20:13 = 0x12).
    plant(
        &mut c,
        Flavour::Legacy32,
        0x0080_0000,
        Level::Pd,
        0x0040_0000 | (0x12 << 13) | P | RW | PS | A | D,
    );
    let t = c.translate(Flavour::Legacy32, 0x00ab_cdef).unwrap();
    assert_eq!((t.phys, t.page_size), (0x12_006b_cdef, PageSize::Size4M));
    assert_eq!(t.path.steps().len(), 1);
    // PAE: 2 MiB page; PAT (bit 12) is not an address bit.
    plant(
        &mut c,
        Flavour::Pae,
        0x0080_0000,
        Level::Pd,
        0x0_3460_0000 | 0x1000 | P | RW | PS | A | D,
    );
    let t = c.translate(Flavour::Pae, 0x0091_2345).unwrap();
    assert_eq!(
        (t.phys, t.page_size),
        (0x3460_0000 + 0x11_2345, PageSize::Size2M)
    );
    // Long: 2 MiB and 1 GiB pages.
    plant(
        &mut c,
        Flavour::Long,
        0x0080_0000,
        Level::Pd,
        0x5_0000_0000 | P | PS | A | D | (1 << 63),
    );
    let t = c.translate(Flavour::Long, 0x0080_0010).unwrap();
    assert_eq!(
        (t.phys, t.page_size, t.writable, t.no_execute),
        (0x5_0000_0010, PageSize::Size2M, false, true)
    );
    plant(
        &mut c,
        Flavour::Long,
        0x0080_0000,
        Level::Pdpt,
        0x40_0000_0000 | P | RW | PS | A | D,
    );
    let t = c.translate(Flavour::Long, 0x3fff_ffff).unwrap();
    assert_eq!((t.phys, t.page_size), (0x40_3fff_ffff, PageSize::Size1G));
    let runs = c.mappings(Flavour::Long).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].virt, runs[0].phys, runs[0].len),
        (0, 0x40_0000_0000, 1 << 30)
    );

    // Mapping over a large page: identical pages are accepted, others conflict.
    c.map(0x1000, 0x40_0000_1000, 0x1000, W, Flavours::LONG)
        .unwrap();
    let err = c
        .map(0x1000, 0x1000, 0x1000, W, Flavours::LONG)
        .unwrap_err();
    assert!(matches!(
        err,
        MapError::Conflict {
            existing_phys: 0x40_0000_1000,
            ..
        }
    ));
    assert_eq!(
        c.unmap(0x1000, 0x1000, Flavours::LONG),
        Err(UnmapError::LargePage {
            virt: 0x1000,
            flavour: Flavour::Long,
            page_size: PageSize::Size1G
        })
    );
}

#[test]
fn pte_bit_7_is_pat_not_ps() {
    let mut c = ctx(32);
    c.map(0x0030_0000, 0x7000, 0x1000, W, Flavours::all())
        .unwrap();
    for flavour in Flavour::ALL {
        plant(
            &mut c,
            flavour,
            0x0030_0000,
            Level::Pt,
            0x7000 | P | RW | A | D | PS,
        );
        let t = c.translate(flavour, 0x0030_0123).unwrap();
        assert_eq!(
            (t.phys, t.page_size),
            (0x7123, PageSize::Size4K),
            "{flavour}"
        );
    }
}

#[test]
fn walker_reports_reserved_bits_and_bad_pointers() {
    let mut c = ctx(32);
    c.map(0x0060_0000, 0x7000, 0x1000, W, Flavours::all())
        .unwrap();
    // PS in a PML4 entry is reserved.
    let pml4e = c
        .translate(Flavour::Long, 0x0060_0000)
        .unwrap()
        .path
        .steps()[0]
        .entry;
    plant(&mut c, Flavour::Long, 0x0060_0000, Level::Pml4, pml4e | PS);
    assert!(matches!(
        c.translate(Flavour::Long, 0x0060_0000),
        Err(WalkError::Reserved {
            level: Level::Pml4,
            ..
        })
    ));
    assert!(matches!(
        c.mappings(Flavour::Long),
        Err(WalkError::Reserved {
            level: Level::Pml4,
            ..
        })
    ));
    assert!(matches!(
        c.map(0x0060_1000, 0x8000, 0x1000, W, Flavours::LONG),
        Err(MapError::Walk(WalkError::Reserved { .. }))
    ));
    // R/W in a PAE PDPTE is reserved.
    let pdpte = c.translate(Flavour::Pae, 0x0060_0000).unwrap().path.steps()[0].entry;
    plant(&mut c, Flavour::Pae, 0x0060_0000, Level::Pdpt, pdpte | RW);
    assert_eq!(
        c.translate(Flavour::Pae, 0x0060_0000),
        Err(WalkError::Reserved {
            virt: 0x0060_0000,
            flavour: Flavour::Pae,
            level: Level::Pdpt,
            entry: pdpte | RW
        })
    );
    // A 2 MiB page with bit 13 set.
    plant(&mut c, Flavour::Pae, 0x0060_0000, Level::Pdpt, pdpte);
    plant(
        &mut c,
        Flavour::Pae,
        0x0060_0000,
        Level::Pd,
        0x20_0000 | 0x2000 | P | PS,
    );
    assert!(matches!(
        c.translate(Flavour::Pae, 0x0060_0000),
        Err(WalkError::Reserved {
            level: Level::Pd,
            ..
        })
    ));
    // A directory entry pointing outside the table memory.
    plant(
        &mut c,
        Flavour::Legacy32,
        0x0060_0000,
        Level::Pd,
        0x7000_0000 | P | RW,
    );
    assert!(matches!(
        c.translate(Flavour::Legacy32, 0x0060_0000),
        Err(WalkError::Memory {
            level: Level::Pt,
            ..
        })
    ));
    // Non-canonical long-mode address.
    assert_eq!(
        c.translate(Flavour::Long, 0x0000_8000_0000_0000),
        Err(WalkError::VirtOutOfRange {
            virt: 0x0000_8000_0000_0000,
            flavour: Flavour::Long
        })
    );
}

#[test]
fn walk_works_on_any_table_memory_and_cr3() {
    let mut c = ctx(32);
    c.map(0xa000_0000, 0x4000, 0x1000, W, Flavours::all())
        .unwrap();
    let a = c.allocator();
    for flavour in Flavour::ALL {
        let root = u64::from(c.cr3(flavour));
        // CR3 control bits (PWT/PCD, PCID) do not change the walk.
        let t = walk(a, flavour, root | 0x18, 0xa000_0abc).unwrap();
        assert_eq!(t.phys, 0x4abc);
        assert_eq!(t.path.steps()[0].table, root);
    }
    // The image bytes hold the tables at their physical offsets.
    let img = a.bytes();
    let pde_off = (u64::from(c.cr3_32()) - a.base() + (0xa000_0000u64 >> 22) * 4) as usize;
    let pde = u32::from_le_bytes(img[pde_off..pde_off + 4].try_into().unwrap());
    assert_eq!(pde & 0xfff, (P | RW | A) as u32);
    assert!(u64::from(pde & !0xfff) < a.end());
}

#[test]
fn unmap_clears_pages_and_checks_first() {
    let mut c = ctx(32);
    c.map(0x0050_0000, 0x9000, 0x4000, W, Flavours::all())
        .unwrap();
    assert_eq!(
        c.unmap(0x0050_1000, 0x2000, Flavours::PAE | Flavours::LONG),
        Ok(4)
    );
    assert_mapped(&c, Flavour::Legacy32, 0x0050_0000, 0x9000, 4, W);
    for flavour in [Flavour::Pae, Flavour::Long] {
        assert_mapped(&c, flavour, 0x0050_0000, 0x9000, 1, W);
        assert!(is_unmapped(&c, flavour, 0x0050_1000));
        assert!(is_unmapped(&c, flavour, 0x0050_2000));
        assert_mapped(&c, flavour, 0x0050_3000, 0xc000, 1, W);
    }
    // Idempotent, and the freed pages can be mapped elsewhere.
    assert_eq!(
        c.unmap(0x0050_1000, 0x2000, Flavours::PAE | Flavours::LONG),
        Ok(0)
    );
    c.map(0x0050_1000, 0x2_0000, 0x1000, W, Flavours::PAE)
        .unwrap();
    assert_eq!(
        c.unmap(FOUR_GIB, 0x1000, Flavours::LEGACY32),
        Err(UnmapError::Range(RangeError::VirtOutOfRange {
            virt: FOUR_GIB,
            last: FOUR_GIB + 0xfff,
            flavour: Flavour::Legacy32
        }))
    );
}
