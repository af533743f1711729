//! `map` refuses a request larger than the page budget before it looks at
//! any page: the count of new tables reads directories only.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::{Metered, BASE};
use pgm_intermediate::{
    Flavour, Flavours, IntermediateContext, MapError, MapFlags, VecAllocator, PAGE_SIZE,
};
use proptest::prelude::*;

const TIB: u64 = 1 << 40;

fn metered(pages: usize, read_budget: u64, limit: usize) -> IntermediateContext<Metered> {
    let alloc = Metered::new(VecAllocator::new(BASE, pages).unwrap(), read_budget, limit);
    IntermediateContext::new(alloc).unwrap()
}

#[test]
fn mapping_a_tebibyte_is_refused_from_the_directories_alone() {
    // 64 table pages; reads past 10 000 fail (a page-by-page pass needs
    // 2^28 walks and would hit that, as a walk error).
    let mut c = metered(64, 10_000, usize::MAX);
    let w = MapFlags::WRITABLE;
    c.map(0x40_0000, 0x40_0000, 0x20_0000, w, Flavours::all())
        .unwrap();
    let before = c.allocator().inner.clone();
    c.allocator().reads.set(0);
    let err = c
        .map(0x100_0000_0000, 0, TIB, w, Flavours::LONG)
        .unwrap_err();
    // One PDPT per 512 GiB, one PD per GiB, one PT per 2 MiB.
    let needed = (TIB >> 39) + (TIB >> 30) + (TIB >> 21);
    assert_eq!(
        err,
        MapError::OutOfPages {
            needed: needed as usize,
            available: 64 - before.used_pages(),
        }
    );
    assert!(
        c.allocator().reads.get() < 100,
        "{} reads",
        c.allocator().reads.get()
    );
    // Nothing allocated, nothing written.
    assert_eq!(c.allocator().inner, before);
    // The same in the upper canonical half, and with tables already on the way.
    c.map(0xffff_8000_0000_0000, 0x40_0000, 0x1000, w, Flavours::LONG)
        .unwrap();
    let before = c.allocator().inner.clone();
    c.allocator().reads.set(0);
    assert!(matches!(
        c.map(0xffff_8000_0000_0000, 0, TIB, w, Flavours::LONG),
        Err(MapError::OutOfPages { .. })
    ));
    assert!(
        c.allocator().reads.get() < 2_000,
        "{} reads",
        c.allocator().reads.get()
    );
    assert_eq!(c.allocator().inner, before);
    // The 4 GiB flavours: all of 32-bit space needs 1 + 1024 + 4 × 512 … tables.
    assert!(matches!(
        c.map(0, 0, 1 << 32, w, Flavours::all()),
        Err(MapError::OutOfPages { .. })
    ));
    assert_eq!(c.allocator().inner, before);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The counted budget is exact: a request that needs `n` new tables
    /// succeeds with `n` free pages, allocating exactly `n`, and with
    /// `n - 1` is refused with `needed == n` and nothing changed.
    #[test]
    fn the_budget_is_exactly_what_map_allocates(
        first in (0u64..0x400, 1u64..0x400),
        second in (0u64..0x400, 1u64..0x400),
        high in any::<bool>(),
        flavours in 1u8..8,
    ) {
        let flavours = Flavours::from_bits_truncate(flavours);
        let base = if high && flavours == Flavours::LONG { 0xffff_ff80_0000_0000 } else { 0x4000_0000 };
        let w = MapFlags::WRITABLE;
        let mut c = metered(512, u64::MAX, usize::MAX);
        let (a_page, a_len) = first;
        c.map(base + a_page * PAGE_SIZE * 64, 0x100_0000, a_len * PAGE_SIZE, w, flavours).unwrap();
        let (b_page, b_len) = second;
        let (virt, len) = (base + b_page * PAGE_SIZE * 97, b_len * PAGE_SIZE * 3);
        let mut probe = c.clone();
        let used = probe.allocator().inner.used_pages();
        let r = probe.map(virt, 0x200_0000, len, w, flavours);
        // Overlaps with the first mapping are conflicts; skip those.
        prop_assume!(r.is_ok());
        let n = probe.allocator().inner.used_pages() - used;
        prop_assume!(n > 0);
        let mut tight = c.clone();
        tight.allocator_mut().limit = n - 1;
        let before = tight.allocator().inner.clone();
        prop_assert_eq!(
            tight.map(virt, 0x200_0000, len, w, flavours),
            Err(MapError::OutOfPages { needed: n, available: n - 1 })
        );
        prop_assert_eq!(&tight.allocator().inner, &before);
        tight.allocator_mut().limit = n;
        prop_assert_eq!(tight.map(virt, 0x200_0000, len, w, flavours), Ok(()));
        prop_assert_eq!(tight.allocator().inner.used_pages() - used, n);
        for f in flavours.flavours() {
            let t = tight.translate(f, virt + len - PAGE_SIZE).unwrap();
            prop_assert_eq!(t.phys, 0x200_0000 + len - PAGE_SIZE);
        }
        let _ = Flavour::ALL;
    }
}
