//! Moving the hypervisor area: `Vmm::relocate_hma` back and forth between
//! two RC bases, with the default configuration (every switcher installed,
//! two VCPUs).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use vmm::{Vmm, VmmConfig};
use vmm_switcher::RcAddr;

fn relocate_hma(c: &mut Criterion) {
    let Ok(mut vmm) = Vmm::new(VmmConfig::default()) else {
        return;
    };
    let home = vmm.config().placement.hma_rc;
    let away = RcAddr(home.0 ^ 0x1000_0000);
    let mut g = c.benchmark_group("vmm");
    g.bench_function("relocate_hma (there and back)", |b| {
        b.iter(|| {
            let _ = vmm.relocate_hma(black_box(away));
            let _ = vmm.relocate_hma(black_box(home));
        })
    });
    g.finish();
}

criterion_group!(benches, relocate_hma);
criterion_main!(benches);
