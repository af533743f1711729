//! Relocating the seed's switcher family (32 → AMD64 and PAE → AMD64) into
//! fresh copies, as the VMM core does whenever the hypervisor area moves.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use vmm_switcher::relocate;
use vmm_switcher::templates::{legacy_amd64, sample_context, TemplateOptions, VmLayout};

fn bench(c: &mut Criterion) {
    let vm = VmLayout::sample();
    let defs: Vec<_> = [
        legacy_amd64::HostPaging::Legacy32,
        legacy_amd64::HostPaging::Pae,
    ]
    .into_iter()
    .filter_map(|h| legacy_amd64::build(h, &TemplateOptions::default(), &vm).ok())
    .collect();
    let ctx = sample_context(&vm);
    let mut bufs: Vec<Vec<u8>> = defs.iter().map(|d| d.code.clone()).collect();
    c.bench_function("relocate both switchers", |b| {
        b.iter(|| {
            for (d, buf) in defs.iter().zip(bufs.iter_mut()) {
                let r = relocate(d, buf, black_box(&ctx));
                black_box(r.is_ok());
            }
        })
    });
    c.bench_function("build both templates", |b| {
        b.iter(|| {
            for h in [
                legacy_amd64::HostPaging::Legacy32,
                legacy_amd64::HostPaging::Pae,
            ] {
                black_box(legacy_amd64::build(h, &TemplateOptions::default(), &vm).is_ok());
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
