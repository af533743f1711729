//! Moving the hypervisor area: `Vmm::relocate_hma` back and forth between
//! two RC bases, for both cores (32-bit and AMD64 hosts), each with every
//! switcher of its width installed and two VCPUs.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use vmm::{Vmm, VmmConfig};
use vmm_switcher::RcAddr;

fn relocate_hma(c: &mut Criterion) {
    let mut g = c.benchmark_group("vmm");
    for (name, cfg) in [
        (
            "relocate_hma 32-bit host core (there and back)",
            VmmConfig::default(),
        ),
        (
            "relocate_hma AMD64 host core (there and back)",
            VmmConfig::amd64_host(),
        ),
    ] {
        let mut vmm = Vmm::new(cfg).expect("the default core builds");
        let home = vmm.config().placement.hma_rc;
        let away = RcAddr(home.0 ^ 0x1000_0000);
        // A refused move would time the error path: prove both moves work.
        vmm.relocate_hma(away).expect("the HMA moves away");
        vmm.relocate_hma(home).expect("the HMA moves back");
        g.bench_function(name, |b| {
            b.iter(|| {
                let there = vmm.relocate_hma(black_box(away));
                let back = vmm.relocate_hma(black_box(home));
                black_box((there.is_ok(), back.is_ok()))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, relocate_hma);
criterion_main!(benches);
