//! The 5-level tables of a context made with `IntermediateContext::with_la57`:
//! a PML5 whose entries point to PML4s, walked with 57-bit addresses.
#![allow(clippy::unwrap_used, clippy::panic)]

use pgm_intermediate::{
    is_canonical, is_canonical57, walk, Flavour, Flavours, IntermediateContext, Level, MapError,
    MapFlags, RangeError, UnmapError, VecAllocator, WalkError,
};

const BASE: u64 = 0x10_0000;
/// A host address canonical under 57-bit addressing only: PML5 index 256.
const HC57: u64 = 0xff00_0000_c040_0000;
const W: MapFlags = MapFlags::WRITABLE;

fn la57_ctx(pages: usize) -> IntermediateContext<VecAllocator> {
    IntermediateContext::with_la57(VecAllocator::new(BASE, pages).unwrap()).unwrap()
}

#[test]
fn the_pml5_is_an_eighth_root_and_walks_57_bit_addresses() {
    let mut c = la57_ctx(40);
    assert_eq!(c.allocator().used_pages(), 8);
    let pml5 = c.cr3_la57().unwrap();
    assert_eq!(c.cr3(Flavour::La57), pml5);
    assert!(![c.cr3_32(), c.cr3_pae(), c.cr3_amd64()].contains(&pml5));
    assert!(!is_canonical(HC57) && is_canonical57(HC57));
    // HC (57-bit only), identity and RC, as a switcher on an LA57 host needs.
    c.map(HC57, 0x40_0000, 0x3000, W, Flavours::LA57).unwrap();
    c.map(0x40_0000, 0x40_0000, 0x3000, W, Flavours::all())
        .unwrap();
    c.map(0xa000_0000, 0x40_0000, 0x3000, W, Flavours::all())
        .unwrap();
    let t = c.translate(Flavour::La57, HC57 + 0x2123).unwrap();
    assert_eq!(t.phys, 0x40_2123);
    assert!(t.writable);
    let steps = t.path.steps();
    let levels: Vec<Level> = steps.iter().map(|s| s.level).collect();
    assert_eq!(
        levels,
        [Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt]
    );
    assert_eq!(steps[0].table, u64::from(pml5));
    assert_eq!(steps[0].index, 256, "bits 56:48 of {HC57:#x}");
    assert_eq!(steps[1].index, 0, "bits 47:39");
    // The low addresses hang off PML5 entry 0, through a PML4 of their own.
    for v in [0x40_0000u64, 0xa000_0000] {
        let t = c.translate(Flavour::La57, v + 8).unwrap();
        assert_eq!(t.phys, 0x40_0008);
        assert_eq!(t.path.steps()[0].index, 0);
        assert_ne!(t.path.steps()[1].table, u64::from(c.cr3_amd64()));
        assert_eq!(c.translate(Flavour::Long, v).unwrap().phys, 0x40_0000);
    }
    // The 4-level tables never see the 57-bit address.
    assert!(matches!(
        c.translate(Flavour::Long, HC57),
        Err(WalkError::VirtOutOfRange { .. })
    ));
    // The generic walker reads the same bytes from CR3.
    let w = walk(c.allocator(), Flavour::La57, u64::from(pml5), HC57).unwrap();
    assert_eq!(w.phys, 0x40_0000);
    let m = c.mappings(Flavour::La57).unwrap();
    assert_eq!(m.len(), 3, "{m:?}");
    assert_eq!(
        m[2].virt, HC57,
        "upper-half addresses are sign-extended from bit 56"
    );
}

#[test]
fn the_57_bit_range_checks_name_the_value() {
    let mut c = la57_ctx(40);
    // Not canonical in 57 bits.
    let e = c
        .map(0x0100_0000_0000_0000, 0x1000, 0x1000, W, Flavours::LA57)
        .unwrap_err();
    assert!(
        matches!(
            e,
            MapError::Range(RangeError::VirtOutOfRange {
                flavour: Flavour::La57,
                ..
            })
        ),
        "{e}"
    );
    // Canonical in 57 bits but not in 48: the 4-level flavour refuses it.
    let e = c
        .map(HC57, 0x1000, 0x1000, W, Flavours::LONG | Flavours::LA57)
        .unwrap_err();
    assert!(
        matches!(
            e,
            MapError::Range(RangeError::VirtOutOfRange {
                flavour: Flavour::Long,
                ..
            })
        ),
        "{e}"
    );
    // Crossing from the lower 57-bit half into the hole.
    assert!(c
        .map(0x00ff_ffff_ffff_f000, 0x1000, 0x2000, W, Flavours::LA57)
        .is_err());
    assert_eq!(c.unmap(HC57, 0x1000, Flavours::LA57).unwrap(), 0);
}

#[test]
fn a_context_without_la57_refuses_5_level_requests_and_maps_the_rest() {
    let mut c = IntermediateContext::new(VecAllocator::new(BASE, 32).unwrap()).unwrap();
    assert_eq!(c.cr3_la57(), None);
    assert!(!c.has(Flavour::La57) && c.has(Flavour::Long));
    let e = c.map(HC57, 0x1000, 0x1000, W, Flavours::LA57).unwrap_err();
    assert_eq!(
        e,
        MapError::NotBuilt {
            flavour: Flavour::La57
        }
    );
    assert!(e.to_string().contains("5-level"), "{e}");
    assert_eq!(
        c.unmap(0x1000, 0x1000, Flavours::LA57).unwrap_err(),
        UnmapError::NotBuilt {
            flavour: Flavour::La57
        }
    );
    // `all()` is every flavour the context builds: no 5-level tables here.
    c.map(0x40_0000, 0x40_0000, 0x1000, W, Flavours::all())
        .unwrap();
    assert_eq!(c.allocator().used_pages(), 7 + 1 + 1 + 3);
    assert!(matches!(
        c.translate(Flavour::La57, 0x40_0000),
        Err(WalkError::NotPresent {
            level: Level::Pml5,
            ..
        })
    ));
    assert!(c.mappings(Flavour::La57).unwrap().is_empty());
}
