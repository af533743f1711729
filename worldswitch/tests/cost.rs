//! `run --cost`: the QEMU plugin's counts for every switcher and revision,
//! revision C's savings, and the environment errors.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::support;
use common::{err, tmp};

use std::process::{Command, Output};

use serde_json::Value;

use common::BIN;

const KINDS: [&str; 3] = ["no_sync", "fpu_sync", "debug_sync"];
const DIRS: [&str; 2] = ["to_gc", "to_hc"];
const CLASSES: [&str; 18] = [
    "cr0_write",
    "cr3_write",
    "cr4_write",
    "wrmsr",
    "rdmsr",
    "lgdt",
    "lidt",
    "ltr",
    "lldt",
    "far_jump",
    "far_return",
    "iret",
    "segment_load",
    "fxsave",
    "fxrstor",
    "dr_write",
    "apic_mmio_read",
    "apic_mmio_write",
];

/// `run --all --cost --json` of one revision: every run, by switcher name.
fn cost_runs(revision: &str) -> Vec<(String, Value)> {
    let o = Command::new(BIN)
        .args([
            "run",
            "--all",
            "--cost",
            "--json",
            "--round-trips",
            "8",
            "--revision",
            revision,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "revision {revision}: {}", err(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    doc["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["switcher"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

fn n(cost: &Value, kind: &str, dir: &str, class: &str) -> u64 {
    cost[kind][dir][class]
        .as_u64()
        .unwrap_or_else(|| panic!("{kind}.{dir}.{class} in {cost}"))
}

/// Both directions of a class.
fn trip(cost: &Value, kind: &str, class: &str) -> u64 {
    DIRS.iter().map(|d| n(cost, kind, d, class)).sum()
}

fn apic(cost: &Value) -> u64 {
    trip(cost, "no_sync", "apic_mmio_read") + trip(cost, "no_sync", "apic_mmio_write")
}

/// The shape: three kinds (stubs have only `no_sync`), two directions,
/// exactly the eighteen classes.
fn check_shape(name: &str, cost: &Value) {
    let kinds = cost.as_object().unwrap_or_else(|| panic!("{name}: {cost}"));
    assert_eq!(kinds.len(), 3, "{name}: {cost}");
    for kind in KINDS {
        let k = &cost[kind];
        if k.is_null() {
            assert!(
                name.ends_with("stub") && kind != "no_sync",
                "{name}: no {kind} trip"
            );
            continue;
        }
        assert_eq!(k.as_object().unwrap().len(), 2, "{name}: {k}");
        for dir in DIRS {
            let classes = k[dir].as_object().unwrap();
            let mut names: Vec<&str> = classes.keys().map(String::as_str).collect();
            names.sort_unstable();
            let mut want = CLASSES.to_vec();
            want.sort_unstable();
            assert_eq!(names, want, "{name} {kind} {dir}");
        }
    }
}

#[test]
fn every_switcher_and_revision_is_measured_and_c_is_cheaper() {
    if support::qemu().is_none() {
        return;
    }
    let runs: Vec<(&str, Vec<(String, Value)>)> = ["a", "b", "c"]
        .into_iter()
        .map(|r| (r, cost_runs(r)))
        .collect();
    for (rev, rs) in &runs {
        assert_eq!(rs.len(), 11, "revision {rev}");
        for (name, r) in rs {
            assert_eq!(r["verified"], true, "{name} {rev}: {r}");
            assert_eq!(r["revision"], *rev);
            let cost = &r["cost"];
            check_shape(name, cost);
            if name.ends_with("stub") {
                continue;
            }
            // Every switch loads a GDT each way and writes CR3 each way.
            for dir in DIRS {
                assert!(n(cost, "no_sync", dir, "lgdt") >= 1, "{name} {rev} {dir}");
                assert!(
                    n(cost, "no_sync", dir, "cr3_write") >= 1,
                    "{name} {rev} {dir}"
                );
            }
            // The trip kinds are what they say.
            assert_eq!(trip(cost, "no_sync", "dr_write"), 0, "{name} {rev}");
            assert!(trip(cost, "debug_sync", "dr_write") >= 5, "{name} {rev}");
            assert!(
                trip(cost, "fpu_sync", "fxrstor") + trip(cost, "fpu_sync", "fxsave") >= 1,
                "{name} {rev}"
            );
        }
    }
    let of = |rev: &str, name: &str| -> Value {
        let rs = &runs.iter().find(|(r, _)| *r == rev).unwrap().1;
        rs.iter().find(|(n, _)| n == name).unwrap().1["cost"].clone()
    };
    // The seeds' algorithm, as VirtualBox's hand count has it (testbed APIC:
    // three LVTs in NMI mode, thermal present and masked).
    for seed in ["32-to-amd64", "pae-to-amd64"] {
        for rev in ["a", "b"] {
            let c = of(rev, seed);
            assert_eq!(
                n(&c, "no_sync", "to_gc", "apic_mmio_read"),
                8,
                "{seed} {rev}"
            );
            assert_eq!(
                n(&c, "no_sync", "to_hc", "apic_mmio_read"),
                3,
                "{seed} {rev}"
            );
            assert_eq!(trip(&c, "no_sync", "apic_mmio_write"), 6, "{seed} {rev}");
            assert_eq!(trip(&c, "no_sync", "rdmsr"), 3, "{seed} {rev}");
            assert_eq!(trip(&c, "no_sync", "wrmsr"), 3, "{seed} {rev}");
            assert_eq!(
                trip(&c, "fpu_sync", "cr0_write"),
                trip(&c, "no_sync", "cr0_write") + 2,
                "{seed} {rev}"
            );
        }
        let (b, c) = (of("b", seed), of("c", seed));
        // Revision C: one read-back, no version read, no read-modify-write.
        assert_eq!(n(&c, "no_sync", "to_gc", "apic_mmio_read"), 5, "{seed}");
        assert_eq!(n(&c, "no_sync", "to_hc", "apic_mmio_read"), 0, "{seed}");
        // EFER derived from the saved value: one RDMSR, two WRMSRs.
        assert_eq!(trip(&c, "no_sync", "rdmsr"), 1, "{seed}");
        assert_eq!(trip(&c, "no_sync", "wrmsr"), 2, "{seed}");
        // No CR0 writes of its own around FXRSTOR, one fewer on the way home.
        assert_eq!(
            trip(&c, "fpu_sync", "cr0_write"),
            trip(&c, "no_sync", "cr0_write"),
            "{seed}"
        );
        assert_eq!(
            trip(&c, "no_sync", "cr0_write") + 1,
            trip(&b, "no_sync", "cr0_write")
        );
    }
    // Everywhere: at most 11 xAPIC accesses per round trip, and never more
    // of any class than revision B.
    for (name, r) in &runs.iter().find(|(r, _)| *r == "c").unwrap().1 {
        let (b, c) = (of("b", name), &r["cost"]);
        if !name.ends_with("stub") {
            assert_eq!(apic(&b), 17, "{name}");
        }
        assert!(apic(c) <= 11, "{name}: {}", apic(c));
        for kind in KINDS {
            if c[kind].is_null() {
                continue;
            }
            for dir in DIRS {
                for class in CLASSES {
                    let (vb, vc) = (n(&b, kind, dir, class), n(c, kind, dir, class));
                    assert!(vc <= vb, "{name} {kind} {dir} {class}: c {vc} > b {vb}");
                }
            }
        }
    }
}

#[test]
fn without_plugin_support_or_the_plugin_it_is_one_line_and_exit_2() {
    let one_line = |o: &Output, want: &str| {
        let e = err(o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e:?}");
        assert!(e.starts_with("worldswitch: error: cost model: "), "{e}");
        assert!(e.contains(want), "{want}: {e}");
        assert!(o.stdout.is_empty());
    };
    // A QEMU built without plugins rejects `-plugin` and boots nothing
    // else: the stand-in runs the real QEMU for anything but `-plugin help`.
    let Some(real) = integration::qemu::find_qemu().ok() else {
        return;
    };
    let fake = tmp("qemu-without-plugins");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = -plugin ]; then echo \"qemu-system-x86_64: -plugin: invalid option\" >&2; exit 1; fi\nexec '{}' \"$@\"\n",
        real.display()
    );
    std::fs::write(&fake, script).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let fake = fake.to_str().unwrap();
    let o = Command::new(BIN)
        .args([
            "run",
            "32-to-amd64",
            "--round-trips",
            "1",
            "--cost",
            "--qemu",
            fake,
        ])
        .output()
        .unwrap();
    one_line(
        &o,
        "has no TCG plugin support (`-plugin help`: qemu-system-x86_64: -plugin: invalid option)",
    );
    // The same stand-in without --cost runs as usual.
    let o = Command::new(BIN)
        .args(["run", "32-to-amd64", "--round-trips", "1", "--qemu", fake])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    // A plugin library that is not there.
    let o = Command::new(BIN)
        .env(
            "WORLDSWITCH_COST_PLUGIN",
            "/nonexistent/libcostmodel_plugin.so",
        )
        .args(["run", "32-to-amd64", "--round-trips", "1", "--cost"])
        .output()
        .unwrap();
    one_line(&o, "/nonexistent/libcostmodel_plugin.so is not a file");
}

#[test]
fn the_text_report_has_the_cost_table() {
    if support::qemu().is_none() {
        return;
    }
    let o = Command::new(BIN)
        .args(["run", "32-to-amd64", "--round-trips", "4", "--cost"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("  cost         expensive operations per switch"),
        "{out}"
    );
    for class in CLASSES {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(class)),
            "{class}: {out}"
        );
    }
    // Without --cost there is no table and `cost` is null.
    let o = Command::new(BIN)
        .args(["run", "32-to-amd64", "--round-trips", "1", "--json"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(doc["runs"][0]["cost"].is_null());
}
