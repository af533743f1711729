//! Building the intermediate context and walking it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pgm_intermediate::{Flavour, Flavours, IntermediateContext, MapFlags, VecAllocator};

/// The switcher's three views of a 2 MiB core-code block, in all flavours.
fn build() -> IntermediateContext<VecAllocator> {
    let mut c = IntermediateContext::new(VecAllocator::new(0x10_0000, 64).unwrap()).unwrap();
    let phys = 0x0100_0000;
    let len = 0x20_0000;
    let w = MapFlags::WRITABLE;
    c.map(phys, phys, len, w, Flavours::all()).unwrap();
    c.map(0xa000_0000, phys, len, w, Flavours::all()).unwrap();
    c.map(
        0xc080_0000,
        phys,
        len,
        w,
        Flavours::LEGACY32 | Flavours::PAE,
    )
    .unwrap();
    c.map(0xffff_8000_c080_0000, phys, len, w, Flavours::LONG)
        .unwrap();
    c
}

fn benches(cr: &mut Criterion) {
    cr.bench_function("build 3 x 512 pages x 3 flavours", |b| {
        b.iter(|| black_box(build()))
    });
    let c = build();
    cr.bench_function("translate 4-level", |b| {
        b.iter(|| {
            c.translate(Flavour::Long, black_box(0xffff_8000_c09f_f123))
                .unwrap()
        })
    });
    cr.bench_function("remap identical (no-op)", |b| {
        let mut c = build();
        b.iter(|| {
            c.map(
                0xa000_0000,
                0x0100_0000,
                0x20_0000,
                MapFlags::WRITABLE,
                Flavours::all(),
            )
            .unwrap()
        })
    });
}

criterion_group!(group, benches);
criterion_main!(group);
