//! `worldswitch run --cpus N`: several host CPUs (QEMU `-smp N`, one
//! thread under `-icount`) each running their own VCPUs' round trips.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../integration/tests/support/mod.rs"]
mod support;

use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_worldswitch");

/// The switchers from 32-bit and PAE hosts (the multiprocessor kernel's
/// host widths so far).
const SWITCHERS: [&str; 6] = [
    "32-to-32",
    "32-to-pae",
    "32-to-amd64",
    "pae-to-32",
    "pae-to-pae",
    "pae-to-amd64",
];

fn ws(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `run --json` of every switcher with `args`.
fn run_json(args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["run", "--json", "--round-trips", "20", "--jobs", "2"];
    all.extend_from_slice(args);
    all.extend_from_slice(&SWITCHERS);
    let o = ws(&all);
    let doc =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{all:?}: {e}: {}", err(&o)));
    (o.status.code(), doc)
}

/// The document without wall times (the only figure that may differ
/// between two runs).
fn without_wall_times(mut doc: Value) -> Value {
    for r in doc["runs"].as_array_mut().unwrap() {
        r["wall_seconds"] = Value::Null;
    }
    doc
}

#[test]
fn four_cpus_run_every_32_bit_and_pae_host_switcher_each_on_its_own_vcpus() {
    if support::qemu().is_none() {
        return;
    }
    let args = ["--cpus", "4", "--vcpus", "8", "--no-deadlines"];
    let (code, doc) = run_json(&args);
    assert_eq!(code, Some(0), "{doc:#}");
    for r in doc["runs"].as_array().unwrap() {
        let name = &r["switcher"];
        assert_eq!(r["verified"], true, "{name}: {:#}", r["failures"]);
        assert_eq!(r["cpus"], 4, "{name}");
        assert_eq!(r["round_trips"], 160, "{name}");
        let cpus = r["per_cpu"].as_array().unwrap();
        let ids: Vec<u64> = cpus.iter().map(|c| c["cpu"].as_u64().unwrap()).collect();
        assert_eq!(ids, [0, 1, 2, 3], "{name}");
        for c in cpus {
            // Two VCPUs each, 20 trips, every call checked and clean.
            assert_eq!(c["calls"], 40, "{name}: {c}");
            assert_eq!(c["failed"], 0, "{name}: {c}");
        }
        // No deadline: each CPU runs until it waits, so nothing overlaps,
        // and the STAM profiles (updated by plain stores) lose nothing.
        assert_eq!(r["overlapping_trips"], 0, "{name}");
        let togc = r["stam"]["samples"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "/VMM/Switcher/ToGC")
            .unwrap();
        assert_eq!(togc["value"]["profile"]["periods"], 160, "{name}");
        // The same instructions per trip as on one CPU.
        let one = ws(&[
            "run",
            "--json",
            "--round-trips",
            "20",
            name.as_str().unwrap(),
        ]);
        let one: Value = serde_json::from_slice(&one.stdout).unwrap();
        let one = &one["runs"][0];
        for k in [
            "instructions_per_round_trip",
            "instructions_per_round_trip_max",
        ] {
            assert_eq!(r[k], one[k], "{name}: {k}");
        }
        assert_eq!(one["cpus"], 1, "{name}");
        assert_eq!(one["overlapping_trips"], Value::Null, "{name}");
    }
    let (_, again) = run_json(&args);
    assert_eq!(
        without_wall_times(doc),
        without_wall_times(again),
        "two runs differ"
    );
}

/// With the PIT deadlines the CPUs are preempted every few hundred
/// instructions, inside their switches too: the calls overlap, and the far
/// sides' one mailbox, which every VCPU shares, is caught at once (it
/// passes above, without the deadlines).
#[test]
fn deadlines_interleave_the_cpus_mid_switch_and_catch_shared_state() {
    if support::qemu().is_none() {
        return;
    }
    let (code, doc) = run_json(&["--cpus", "2", "--vcpus", "2"]);
    assert_eq!(code, Some(1), "{doc:#}");
    for r in doc["runs"].as_array().unwrap() {
        let name = &r["switcher"];
        assert_eq!(r["verified"], false, "{name}");
        assert!(
            r["overlapping_trips"].as_u64().unwrap() > 0,
            "{name}: {}",
            r["overlapping_trips"]
        );
    }
}

#[test]
fn bad_cpu_counts_and_unsupported_hosts_are_refused_in_one_line() {
    for (args, want) in [
        (
            vec!["run", "32-to-32", "--cpus", "3", "--vcpus", "2"],
            "host CPUs must be 1 to 8 and at most the VCPU count (2), got 3",
        ),
        (
            vec!["run", "amd64-to-pae", "--cpus", "2"],
            "several host CPUs cannot be combined with an AMD64 host",
        ),
        (
            vec!["run", "32-to-32", "--cpus", "2", "--nmi-storm"],
            "several host CPUs cannot be combined with the NMI storm",
        ),
        (vec!["run", "32-to-32", "--cpus", "9"], "--cpus"),
    ] {
        let o = ws(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = err(&o);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}
