//! Hot-path and render benchmarks for `stam`.
#![allow(clippy::expect_used)]

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
        let id = reg
            .register_owned(def)
            .expect("every benchmark sample registers");
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

/// The obvious alternatives to each renderer, over the same 10 000 samples
/// already decoded (`baseline_*`), measured in the same run as the
/// renderers (`stam_*`), which select and decode as well.
fn versus(c: &mut Criterion) {
    let reg = big_registry();
    let none = Backing::new();
    let snap = reg
        .snapshot("", &none)
        .expect("the benchmark registry snapshots");
    assert_eq!(
        snap.samples.len(),
        10_000,
        "the comparison is over 10 000 samples"
    );
    let records: Vec<baseline::Record> = snap.samples.iter().map(baseline::Record::from).collect();
    let prom = baseline::prometheus_registry(&snap.samples);
    let mut g = c.benchmark_group("versus_10k");
    g.throughput(Throughput::Elements(10_000));
    g.sample_size(20);
    g.bench_function("stam_print", |b| b.iter(|| reg.print("", &none)));
    g.bench_function("baseline_print_write_loop", |b| {
        b.iter(|| baseline::print(black_box(&snap.samples)))
    });
    g.bench_function("stam_xml", |b| b.iter(|| reg.xml("", true, &none)));
    g.bench_function("baseline_xml_write_loop", |b| {
        b.iter(|| baseline::xml(black_box(&snap.samples)))
    });
    g.bench_function("stam_json", |b| b.iter(|| reg.json("", &none)));
    g.bench_function("baseline_json_serde_vec", |b| {
        b.iter(|| serde_json::to_string(black_box(&records)))
    });
    g.bench_function("stam_prometheus", |b| b.iter(|| reg.prometheus("", &none)));
    g.bench_function("baseline_prometheus_client", |b| {
        b.iter(|| baseline::prometheus(black_box(&prom)))
    });
    g.finish();
}

/// What a user would write instead of `stam`'s renderers.
mod baseline {
    use std::fmt::Write as _;

    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use serde::Serialize;
    use stam::{SampleValue, StamType, StamUnit, StamVisibility, Value};

    /// A plain record of one sample: what `serde_json` gets.
    #[derive(Debug, Serialize)]
    pub struct Record {
        name: String,
        #[serde(rename = "type")]
        ty: StamType,
        unit: StamUnit,
        visibility: StamVisibility,
        #[serde(skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        value: Value,
    }

    impl From<&SampleValue> for Record {
        fn from(s: &SampleValue) -> Self {
            Record {
                name: s.name.clone(),
                ty: s.ty,
                unit: s.unit,
                visibility: s.visibility,
                description: s.description.clone(),
                value: s.value,
            }
        }
    }

    fn hidden(s: &SampleValue) -> bool {
        s.visibility == StamVisibility::Used && s.value.is_zero()
    }

    fn opt(v: Option<u64>) -> String {
        v.map_or_else(|| "-".to_owned(), |v| v.to_string())
    }

    /// The print layout with `write!`.
    pub fn print(samples: &[SampleValue]) -> String {
        let mut out = String::new();
        for s in samples.iter().filter(|s| !hidden(s)) {
            let (name, unit) = (&s.name, s.unit.as_str());
            let _ = match s.value {
                Value::Counter { c } => writeln!(out, "{name:<32} {c:>8} {unit}"),
                Value::Profile {
                    periods,
                    ticks,
                    ticks_max,
                    ticks_min,
                } => writeln!(
                    out,
                    "{name:<32} {:>8} {unit} ({ticks:>12} {}, {periods:>7} {}, max {:>9}, min {:>7})",
                    ticks / periods.max(1),
                    s.unit.unit1(),
                    s.unit.unit2(),
                    opt(ticks_max),
                    opt(ticks_min),
                ),
                Value::Ratio { a, b } => writeln!(out, "{name:<32} {a:>8}:{b:<8} {unit}"),
                Value::Unsigned(v) if s.ty.is_hex() => writeln!(out, "{name:<32} {v:>8x} {unit}"),
                Value::Unsigned(v) => writeln!(out, "{name:<32} {v:>8} {unit}"),
                Value::Bool(v) => writeln!(out, "{name:<32} {v:<8} {unit}"),
            };
        }
        out
    }

    fn escaped(s: &str) -> std::borrow::Cow<'_, str> {
        if s.contains(['&', '<', '>', '"', '\'']) {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
                .replace('\'', "&apos;")
                .into()
        } else {
            s.into()
        }
    }

    /// The XML snapshot with `write!`.
    pub fn xml(samples: &[SampleValue]) -> String {
        let mut out = String::new();
        out.push_str(
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n<Statistics>\n",
        );
        for s in samples.iter().filter(|s| !hidden(s)) {
            let _ = match s.value {
                Value::Counter { c } => write!(out, "<Counter c=\"{}\"", c as i64),
                Value::Profile {
                    periods,
                    ticks,
                    ticks_max,
                    ticks_min,
                } => {
                    let _ = write!(
                        out,
                        "<Profile cPeriods=\"{}\" cTicks=\"{}\"",
                        periods as i64, ticks as i64
                    );
                    if let Some(m) = ticks_min {
                        let _ = write!(out, " cTicksMin=\"{}\"", m as i64);
                    }
                    match ticks_max {
                        Some(m) => write!(out, " cTicksMax=\"{}\"", m as i64),
                        None => Ok(()),
                    }
                }
                Value::Ratio { a, b } => write!(out, "<Ratio32 u32A=\"{a}\" u32B=\"{b}\""),
                Value::Unsigned(v) if s.ty.is_hex() => {
                    write!(out, "<{} val=\"{v:#x}\"", s.ty.xml_tag())
                }
                Value::Unsigned(v) => write!(out, "<{} val=\"{v}\"", s.ty.xml_tag()),
                Value::Bool(v) => write!(out, "<BOOL val=\"{v}\""),
            };
            let vis = match s.visibility {
                StamVisibility::Always => "",
                StamVisibility::Used => " vis=\"used\"",
                StamVisibility::NotGui => " vis=\"not-gui\"",
            };
            let _ = write!(
                out,
                " unit=\"{}\"{vis} name=\"{}\"",
                s.unit.as_str(),
                escaped(&s.name)
            );
            if let Some(d) = &s.description {
                let _ = write!(out, " desc=\"{}\"", escaped(d));
            }
            out.push_str("/>\n");
        }
        out.push_str("</Statistics>\n");
        out
    }

    /// The labels of every series.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Labels {
        path: String,
        unit: String,
    }

    /// The same samples as `prometheus-client` metric families.
    pub fn prometheus_registry(samples: &[SampleValue]) -> prometheus_client::registry::Registry {
        let mut reg = prometheus_client::registry::Registry::default();
        let counters = Family::<Labels, Counter>::default();
        let periods = Family::<Labels, Counter>::default();
        let ticks = Family::<Labels, Counter>::default();
        let max = Family::<Labels, Gauge>::default();
        let min = Family::<Labels, Gauge>::default();
        let values = Family::<Labels, Gauge>::default();
        for s in samples {
            let l = Labels {
                path: s.name.clone(),
                unit: s.unit.as_str().to_owned(),
            };
            match s.value {
                Value::Counter { c } => {
                    counters.get_or_create(&l).inc_by(c);
                }
                Value::Profile {
                    periods: p,
                    ticks: t,
                    ticks_max,
                    ticks_min,
                } => {
                    periods.get_or_create(&l).inc_by(p);
                    ticks.get_or_create(&l).inc_by(t);
                    if let Some(m) = ticks_max {
                        max.get_or_create(&l).set(m as i64);
                    }
                    if let Some(m) = ticks_min {
                        min.get_or_create(&l).set(m as i64);
                    }
                }
                Value::Unsigned(v) => {
                    values.get_or_create(&l).set(v as i64);
                }
                Value::Ratio { .. } | Value::Bool(_) => {}
            }
        }
        reg.register("stam_counter", "STAM counter samples (COUNTER).", counters);
        reg.register(
            "stam_profile_periods",
            "Periods of STAM profile samples.",
            periods,
        );
        reg.register(
            "stam_profile_ticks",
            "Ticks of STAM profile samples.",
            ticks,
        );
        reg.register(
            "stam_profile_ticks_max",
            "Longest period of a profile.",
            max,
        );
        reg.register(
            "stam_profile_ticks_min",
            "Shortest period of a profile.",
            min,
        );
        reg.register("stam_value", "STAM scalar samples.", values);
        reg
    }

    /// `prometheus-client`'s text encoding.
    pub fn prometheus(reg: &prometheus_client::registry::Registry) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, reg);
        out
    }
}

criterion_group!(benches, hot_path, render, versus);
criterion_main!(benches);
