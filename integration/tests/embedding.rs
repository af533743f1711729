//! The testbed over a core in pages an embedder chose: the intermediate and
//! hyper tables on scattered, non-adjacent pages, and a switcher still
//! verifies under QEMU.
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
