//! Hot-path and render benchmarks for `stam`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stam::{
    Backing, Registry, SampleDef, StamCounter, StamProfile, StamProfileAdv, StamType, StamUnit,
    StamVisibility,
};

fn hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot");
    let mut counter = StamCounter::new();
    g.bench_function("counter_inc", |b| {
        b.iter(|| black_box(&mut counter).inc());
    });
    let mut adv = StamProfileAdv::new();
    let mut ts = 1u64;
    g.bench_function("adv_start_stop", |b| {
        b.iter(|| {
            let a = black_box(&mut adv);
            a.start(ts);
            ts += 3;
            a.stop(black_box(ts));
        });
    });
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        let mut adv = StamProfileAdv::new();
        g.bench_function("adv_start_stop_rdtsc", |b| {
            b.iter(|| {
                let a = black_box(&mut adv);
                a.start(stam::rdtsc());
                a.stop(stam::rdtsc());
            });
        });
    }
    g.finish();
}

/// 10 000 samples in registry-owned memory: counters, profiles, scalars.
fn big_registry() -> Registry {
    let mut reg = Registry::new();
    for i in 0..10_000u32 {
        let name = format!("/Bench/Cpu{}/Group{}/Sample{}", i % 8, (i / 8) % 32, i);
        let (ty, unit) = match i % 4 {
            0 | 1 => (StamType::Counter, StamUnit::Occurences),
            2 => (StamType::ProfileAdv, StamUnit::TicksPerCall),
            _ => (StamType::U32Reset, StamUnit::Bytes),
        };
        let def = SampleDef::new(&name, ty, unit)
            .visibility(StamVisibility::Always)
            .description("benchmark sample");
        let Ok(id) = reg.register_owned(def) else {
            continue;
        };
        match ty {
            StamType::Counter => {
                if let Ok(c) = reg.owned_mut::<StamCounter>(id) {
                    c.add(u64::from(i) * 7);
                }
            }
            StamType::ProfileAdv => {
                if let Ok(p) = reg.owned_mut::<StamProfile>(id) {
                    p.add_period(u64::from(i) + 100);
                    p.add_period(u64::from(i) * 3 + 5);
                }
            }
            _ => {
                if let Ok(v) = reg.owned_mut::<u32>(id) {
                    *v = i;
                }
            }
        }
    }
    reg
}

fn render(c: &mut Criterion) {
    let reg = big_registry();
    let none = Backing::new();
    let mut g = c.benchmark_group("render_10k");
    g.throughput(Throughput::Elements(10_000));
    g.sample_size(20);
    g.bench_function("print", |b| b.iter(|| reg.print("", &none)));
    g.bench_function("xml", |b| b.iter(|| reg.xml("", true, &none)));
    g.bench_function("json", |b| b.iter(|| reg.json("", &none)));
    g.bench_function("prometheus", |b| b.iter(|| reg.prometheus("", &none)));
    g.bench_function("snapshot", |b| b.iter(|| reg.snapshot("", &none)));
    g.bench_function("enumerate", |b| b.iter(|| reg.iter("").count()));
    let ids: Vec<_> = reg.iter("").map(|i| i.id).collect();
    g.bench_function("read_values", |b| {
        b.iter(|| {
            ids.iter()
                .filter_map(|&id| reg.value(id, &none).ok())
                .count()
        })
    });
    g.bench_function("select_glob", |b| {
        b.iter(|| reg.iter(black_box("/Bench/Cpu?/*/Sample1*|*9")).count())
    });
    g.finish();
}

criterion_group!(benches, hot_path, render);
criterion_main!(benches);
