//! The STAM snapshot reader (`stam::Snapshot::from_json`) on arbitrary
//! bytes: never a panic; what it accepts is valid, renders in every format,
//! and survives a JSON round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stam::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(snap) = Snapshot::from_json(text) else {
        return;
    };
    snap.validate().expect("an accepted snapshot is valid");
    let _ = snap.print();
    let _ = snap.xml(true);
    let prom = snap.prometheus();
    // Unique names: one series per sample and family.
    let mut series: Vec<&str> = prom.lines().filter(|l| !l.starts_with('#')).collect();
    let n = series.len();
    series.sort_unstable();
    series.dedup();
    assert_eq!(series.len(), n, "duplicate Prometheus series");
    let json = snap.to_json().expect("encodes");
    assert_eq!(Snapshot::from_json(&json).expect("reads back"), snap);
});
