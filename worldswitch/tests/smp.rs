//! `worldswitch run --cpus N`: several host CPUs (QEMU `-smp N`, one
//! thread under `-icount`) each running their own VCPUs' round trips.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{err, support, ws};

use serde_json::Value;

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

/// The switchers from AMD64 hosts: the APs go on from the trampoline to
/// long mode.
const AMD64_HOST: [&str; 4] = [
    "amd64-to-32",
    "amd64-to-pae",
    "amd64-to-amd64",
    "amd64-stub",
];

/// `run --json` of every 32-bit and PAE host switcher with `args`.
fn run_json(args: &[&str]) -> (Option<i32>, Value) {
    run_json_on(&SWITCHERS, args)
}

/// `run --json` of `switchers` with `args`.
fn run_json_on(switchers: &[&str], args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["run", "--json", "--round-trips", "20", "--jobs", "2"];
    all.extend_from_slice(args);
    all.extend_from_slice(switchers);
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

/// `list` holds one entry per CPU 0 to 3, in order.
fn assert_cpu_ids(list: &[Value], name: &str) {
    let ids: Vec<u64> = list.iter().map(|c| c["cpu"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2, 3], "{name}");
}

/// A run of `--cpus 4 --vcpus 8` (20 round trips per VCPU) verified, and
/// each CPU called its two VCPUs 20 times each, every call checked and clean.
fn assert_four_cpus_verified(r: &Value) {
    let name = r["switcher"].as_str().unwrap();
    assert_eq!(r["verified"], true, "{name}: {:#}", r["failures"]);
    assert_eq!(r["cpus"], 4, "{name}");
    assert_eq!(r["round_trips"], 160, "{name}");
    let cpus = r["per_cpu"].as_array().unwrap();
    assert_cpu_ids(cpus, name);
    for c in cpus {
        assert_eq!(c["calls"], 40, "{name}: {c}");
        assert_eq!(c["failed"], 0, "{name}: {c}");
    }
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
        assert_four_cpus_verified(r);
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

/// A profile's periods in a run's STAM samples.
fn periods(r: &Value, name: &str) -> u64 {
    r["stam"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("{}: no {name}", r["switcher"]))["value"]["profile"]["periods"]
        .as_u64()
        .unwrap()
}

/// With the PIT deadlines the CPUs are preempted every few hundred
/// instructions, inside their switches too: most calls overlap another
/// CPU's. Each VCPU has its own far-side mailbox and its own switcher
/// profiles, so every switcher verifies, and no profile loses a period
/// (each VCPU's has one per round trip, the VM-wide one their sum).
#[test]
fn deadlines_interleave_the_cpus_mid_switch_and_every_switcher_verifies() {
    if support::qemu().is_none() {
        return;
    }
    for (cpus, vcpus) in [("2", 2u64), ("4", 8)] {
        let (code, doc) = run_json(&["--cpus", cpus, "--vcpus", &vcpus.to_string()]);
        assert_eq!(code, Some(0), "--cpus {cpus}: {doc:#}");
        for r in doc["runs"].as_array().unwrap() {
            let name = &r["switcher"];
            assert_eq!(r["verified"], true, "{name}: {:#}", r["failures"]);
            let trips = 20 * vcpus;
            assert_eq!(r["round_trips"], trips, "{name}");
            let overlapping = r["overlapping_trips"].as_u64().unwrap();
            eprintln!("--cpus {cpus} {name}: {overlapping} of {trips} round trips overlapping");
            assert!(
                overlapping * 2 > trips,
                "{name}: only {overlapping} of {trips} overlapping"
            );
            for dir in ["ToGC", "ToHC"] {
                assert_eq!(periods(r, &format!("/VMM/Switcher/{dir}")), trips, "{name}");
                for v in 0..vcpus {
                    assert_eq!(
                        periods(r, &format!("/VMM/CPU{v}/Switcher/{dir}")),
                        20,
                        "{name}: VCPU {v} {dir}"
                    );
                }
            }
        }
    }
}

/// The sharing bugs only several host CPUs can show: every VCPU on VCPU
/// 0's hyper stack (the VMM's set-up), every VCPU's far side on one
/// mailbox (the testbed's). On one host CPU the VCPUs take turns and both
/// pass; with two CPUs interleaved by the deadlines every switcher fails.
#[test]
fn sharing_mutations_pass_on_one_cpu_and_fail_on_several() {
    if support::qemu().is_none() {
        return;
    }
    for m in ["shared-hyper-stack", "shared-far-mailbox"] {
        let (code, doc) = run_json(&["--mutate", m, "--cpus", "1", "--vcpus", "2"]);
        assert_eq!(code, Some(0), "{m} on one CPU: {doc:#}");
        let (code, doc) = run_json(&["--mutate", m, "--cpus", "2", "--vcpus", "2"]);
        assert_eq!(code, Some(1), "{m} on two CPUs: {doc:#}");
        for r in doc["runs"].as_array().unwrap() {
            assert_eq!(r["verified"], false, "{m} on {}", r["switcher"]);
        }
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
            vec![
                "run",
                "32-to-32",
                "--cpus",
                "2",
                "--nmi-storm",
                "--no-deadlines",
            ],
            "cannot be combined with running them without deadlines",
        ),
        (
            vec!["run", "32-to-32", "--cpus", "2", "--trace"],
            "several host CPUs cannot be combined with the switcher trace",
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

/// Four CPUs on every AMD64-host switcher: the application processors
/// go from the real-mode trampoline through the boot stub's 32-bit stub
/// into long mode, each on its own page tables. With the PIT deadlines
/// most calls overlap another CPU's and every switcher verifies, each
/// VCPU's profiles holding one period per round trip (the stub has no
/// switch, so none); without them each trip costs as many instructions
/// as on one CPU. Two runs are byte-identical.
#[test]
fn four_cpus_interleave_every_amd64_host_switcher_mid_switch() {
    if support::qemu().is_none() {
        return;
    }
    let args = ["--cpus", "4", "--vcpus", "8"];
    let (code, doc) = run_json_on(&AMD64_HOST, &args);
    assert_eq!(code, Some(0), "{doc:#}");
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), AMD64_HOST.len());
    for r in runs {
        let name = &r["switcher"];
        assert_four_cpus_verified(r);
        let overlapping = r["overlapping_trips"].as_u64().unwrap();
        eprintln!("--cpus 4 {name}: {overlapping} of 160 round trips overlapping");
        assert!(
            overlapping * 2 > 160,
            "{name}: only {overlapping} of 160 overlapping"
        );
        let per_vcpu = if name == "amd64-stub" { 0 } else { 20 };
        for dir in ["ToGC", "ToHC"] {
            let total = periods(r, &format!("/VMM/Switcher/{dir}"));
            assert_eq!(total, 8 * per_vcpu, "{name}");
            for v in 0..8 {
                let each = periods(r, &format!("/VMM/CPU{v}/Switcher/{dir}"));
                assert_eq!(each, per_vcpu, "{name}: VCPU {v} {dir}");
            }
        }
    }
    let (_, again) = run_json_on(&AMD64_HOST, &args);
    assert_eq!(
        without_wall_times(doc),
        without_wall_times(again),
        "two runs differ"
    );

    let (code, quiet) = run_json_on(
        &AMD64_HOST,
        &["--cpus", "4", "--vcpus", "8", "--no-deadlines"],
    );
    assert_eq!(code, Some(0), "{quiet:#}");
    let (code, one) = run_json_on(&AMD64_HOST, &["--vcpus", "8"]);
    assert_eq!(code, Some(0), "{one:#}");
    let quiet = quiet["runs"].as_array().unwrap();
    for (r, one) in quiet.iter().zip(one["runs"].as_array().unwrap()) {
        let name = &r["switcher"];
        assert_eq!(r["overlapping_trips"], 0, "{name}");
        assert_eq!(one["cpus"], 1, "{name}");
        let k = "instructions_per_round_trip";
        assert_eq!(r[k], one[k], "{name}: {k}");
        // The dearest trip (FPU and debug sync) of amd64-to-amd64 is one
        // instruction shorter with the multiprocessor kernel, on the
        // bootstrap CPU as on the others; every other figure is equal.
        let k = "instructions_per_round_trip_max";
        let (many, single) = (r[k].as_u64().unwrap(), one[k].as_u64().unwrap());
        assert!(many.abs_diff(single) <= 1, "{name}: {k} {many} vs {single}");
        if name != "amd64-to-amd64" {
            assert_eq!(many, single, "{name}: {k}");
        }
    }
}

/// The sharing mutations on the AMD64-host switchers: a far side on the
/// shared mailbox passes on one CPU and fails on two; so does every VCPU
/// on VCPU 0's hyper stack where one CPU tolerates it (the 32-bit and PAE
/// hyper contexts).
#[test]
fn sharing_mutations_fail_the_amd64_host_switchers_on_several_cpus() {
    if support::qemu().is_none() {
        return;
    }
    for (m, switchers) in [
        (
            "shared-far-mailbox",
            &["amd64-to-32", "amd64-to-pae", "amd64-to-amd64"][..],
        ),
        ("shared-hyper-stack", &["amd64-to-32", "amd64-to-pae"][..]),
    ] {
        let (code, doc) = run_json_on(switchers, &["--mutate", m, "--cpus", "1", "--vcpus", "2"]);
        assert_eq!(code, Some(0), "{m} on one CPU: {doc:#}");
        let (code, doc) = run_json_on(switchers, &["--mutate", m, "--cpus", "2", "--vcpus", "2"]);
        assert_eq!(code, Some(1), "{m} on two CPUs: {doc:#}");
        for r in doc["runs"].as_array().unwrap() {
            assert_eq!(r["verified"], false, "{m} on {}", r["switcher"]);
        }
    }
}

/// Every switcher, the stubs included.
fn every_switcher() -> Vec<&'static str> {
    let mut all = SWITCHERS.to_vec();
    all.extend(AMD64_HOST);
    all.push("x86-stub");
    all
}

/// One CPU's storm account from a run's JSON.
fn storm_cpus(r: &Value) -> &Vec<Value> {
    r["nmi_storm"]["per_cpu"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no per-CPU storm account", r["switcher"]))
}

/// The NMI storm on four CPUs, every switcher: every CPU's LINT0 receives
/// the PIT's edges (each CPU takes NMIs), an edge falls inside most round
/// trips of every CPU (the stubs' round trips are a few instructions
/// long), none is taken outside host context or by the hypervisor
/// context, most round trips overlap another CPU's, and every trip
/// verifies. Two runs are byte-identical.
#[test]
fn the_interleaved_storm_reaches_every_cpu_mid_switch_and_every_switcher_verifies() {
    if support::qemu().is_none() {
        return;
    }
    let all = every_switcher();
    let args = ["--cpus", "4", "--vcpus", "8", "--nmi-storm"];
    let (code, doc) = run_json_on(&all, &args);
    assert_eq!(code, Some(0), "{doc:#}");
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), all.len());
    for r in runs {
        let name = r["switcher"].as_str().unwrap();
        assert_four_cpus_verified(r);
        let st = &r["nmi_storm"];
        assert_eq!(st["placement"], "interleaved", "{name}");
        assert_eq!(st["path_instructions"], Value::Null, "{name}");
        assert_eq!(st["nmis_in_transit"], 0, "{name}");
        assert_eq!(st["nmis_in_hypervisor_context"], 0, "{name}");
        assert_eq!(st["first_fatal"], Value::Null, "{name}");
        let overlapping = r["overlapping_trips"].as_u64().unwrap();
        assert!(overlapping * 2 > 160, "{name}: {overlapping} of 160");
        let cpus = storm_cpus(r);
        assert_cpu_ids(cpus, name);
        for c in cpus {
            let calls = c["calls"].as_u64().unwrap();
            let with_edge = c["calls_with_edge"].as_u64().unwrap();
            eprintln!(
                "--cpus 4 --nmi-storm {name}: cpu {}: edge inside {with_edge} of {calls}, {} hidden, {} NMIs, {overlapping} of 160 overlapping",
                c["cpu"], c["edges_hidden"], c["nmis_taken"]
            );
            assert_eq!(calls, 40, "{name}: {c}");
            assert!(c["nmis_taken"].as_u64().unwrap() > 0, "{name}: {c}");
            assert_eq!(c["nmis_in_transit"], 0, "{name}: {c}");
            if !name.ends_with("stub") {
                assert!(with_edge * 2 > calls, "{name}: {c}");
            }
        }
    }
    let (_, again) = run_json_on(&all, &args);
    assert_eq!(
        without_wall_times(doc),
        without_wall_times(again),
        "two runs differ"
    );
}

/// The x2APIC host: each CPU's LINT0 is programmed through its MSR.
#[test]
fn the_interleaved_storm_reaches_every_cpu_of_an_x2apic_host() {
    if support::qemu_x2apic().is_none() {
        return;
    }
    let switchers = ["32-to-amd64", "amd64-to-amd64"];
    let args = [
        "--cpus",
        "4",
        "--vcpus",
        "4",
        "--nmi-storm",
        "--host-apic",
        "x2apic",
    ];
    let (code, doc) = run_json_on(&switchers, &args);
    assert_eq!(code, Some(0), "{doc:#}");
    for r in doc["runs"].as_array().unwrap() {
        let name = &r["switcher"];
        assert_eq!(r["host_apic"], "x2apic", "{name}");
        for c in storm_cpus(r) {
            assert!(c["nmis_taken"].as_u64().unwrap() > 0, "{name}: {c}");
            assert!(c["calls_with_edge"].as_u64().unwrap() > 0, "{name}: {c}");
        }
    }
}

/// Without NMI masking the interleaved storm kills every switcher that
/// leaves the host context, while the same run without the storm passes:
/// the NMIs are what breaks it, as on one CPU.
#[test]
fn without_masking_the_interleaved_storm_is_fatal_and_the_quiet_run_passes() {
    if support::qemu().is_none() {
        return;
    }
    let switchers: Vec<&str> = every_switcher()
        .into_iter()
        .filter(|n| !n.ends_with("stub"))
        .collect();
    let quiet = ["--no-apic", "--cpus", "4", "--vcpus", "8"];
    let (code, doc) = run_json_on(&switchers, &quiet);
    assert_eq!(code, Some(0), "{doc:#}");
    let stormy = ["--no-apic", "--cpus", "4", "--vcpus", "8", "--nmi-storm"];
    let (code, doc) = run_json_on(&switchers, &stormy);
    assert_eq!(code, Some(1), "{doc:#}");
    for r in doc["runs"].as_array().unwrap() {
        let name = &r["switcher"];
        assert_eq!(r["verified"], false, "{name}");
        let fatal = &r["nmi_storm"]["first_fatal"];
        eprintln!("--no-apic --cpus 4 --nmi-storm {name}: {fatal}");
        assert!(fatal.is_object(), "{name}: {:#}", r["nmi_storm"]);
        assert_eq!(fatal["offset"], Value::Null, "{name}");
    }
}

/// `image --cpus N` prints the QEMU command with `-smp N` (the image's
/// other CPUs would never start without it); one CPU needs no `-smp`.
#[test]
fn the_image_command_boots_as_many_cpus_as_the_image_runs() {
    let out = common::tmp("smp.elf");
    let out = out.to_str().unwrap();
    for (cpus, want) in [("4", Some(" -smp 4 ")), ("1", None)] {
        let o = ws(&[
            "image",
            "32-to-amd64",
            "--cpus",
            cpus,
            "--vcpus",
            "4",
            "--out",
            out,
            "--json",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
        let cmd = doc["images"][0]["qemu_command"]
            .as_str()
            .unwrap_or_else(|| panic!("{doc:#}"));
        match want {
            Some(w) => assert!(cmd.contains(w), "--cpus {cpus}: {cmd}"),
            None => assert!(!cmd.contains(" -smp "), "--cpus {cpus}: {cmd}"),
        }
    }
}
