//! The testbed over a core in pages an embedder chose: the intermediate and
//! hyper tables on scattered, non-adjacent pages, the hypervisor area's
//! pages in descending order, and a switcher still verifies under QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use integration::scenario::{build_over, run_built, Scenario};
use vmm::{Purpose, TableOrder, VecPages, Vmm};
use vmm_switcher::SwitcherKind;

#[test]
fn switchers_verify_with_scattered_table_pages() {
    let Some(q) = support::qemu() else { return };
    for kind in [SwitcherKind::PaeToAmd64, SwitcherKind::Amd64ToPae] {
        let mut s = Scenario::new(kind);
        s.trips = 50;
        let b = build_over(&s, |cfg| {
            let pages =
                VecPages::with_order(&cfg.placement, cfg.table_pages, TableOrder::Scattered);
            Ok(Vmm::with_pages(cfg, pages)?)
        })
        .unwrap_or_else(|e| panic!("{}: {e}", kind.cli_name()));
        for which in [Purpose::Tables, Purpose::HyperTables] {
            let used: Vec<u64> = b.vmm.table_pages(which).iter().map(|(p, _)| p.0).collect();
            assert!(used.len() > 2, "{used:x?}");
            for w in used.windows(2) {
                assert!(w[0] > w[1] + 0x1000, "not scattered: {used:x?}");
            }
        }
        // The HMA's pages from the top down: HC and RC page i on physical
        // page i, none where a contiguous HMA would put it.
        let hma: Vec<u64> = b.vmm.hma_pages().iter().map(|p| p.0).collect();
        assert!(hma.len() > 2, "{hma:x?}");
        for w in hma.windows(2) {
            assert_eq!(w[0], w[1] + 0x1000, "not descending: {hma:x?}");
        }
        assert_eq!(b.vmm.config().placement.hma_phys.0, hma[0]);
        let r = run_built(&s, &b, &q).unwrap();
        eprintln!(
            "{}: {:?}, {} round trips",
            kind.cli_name(),
            r.run.outcome,
            r.round_trips
        );
        assert!(
            r.verified,
            "{}: {:?} {:?}",
            kind.cli_name(),
            r.run.outcome,
            r.failures
        );
    }
}
