//! The `worldswitch` program as a user runs it: every subcommand with and
//! without `--json`, `--help` everywhere, and bad arguments and placements
//! ending with a one-line error and exit status 2.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../integration/tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use integration::qemu::{QemuConfig, INSTALL_HINT, QEMU_BINARY};
use serde_json::Value;
use vmm_switcher::SwitcherKind;

const BIN: &str = env!("CARGO_BIN_EXE_worldswitch");

/// The two switchers of the seed documents: they must always verify.
const SEED: [&str; 2] = ["32-to-amd64", "pae-to-amd64"];

fn ws(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ws_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = ws(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", err(&o));
    text(&o)
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worldswitch-cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn available() -> Vec<&'static str> {
    SwitcherKind::ALL
        .into_iter()
        .filter(|k| vmm::AVAILABLE.contains(k))
        .map(SwitcherKind::cli_name)
        .collect()
}

#[test]
fn every_subcommand_has_help() {
    let top = ok(&["--help"]);
    for sub in [
        "list", "show", "disasm", "relocate", "run", "image", "decode", "stats",
    ] {
        assert!(top.contains(sub), "top-level help lacks {sub}");
        let h = ok(&[sub, "--help"]);
        assert!(h.contains("Usage: worldswitch"), "{sub}: {h}");
    }
    let run = ok(&["run", "--help"]);
    for flag in [
        "--all",
        "--round-trips",
        "--vcpus",
        "--revision",
        "--no-apic",
        "--no-stats",
        "--trace",
        "--hc-base",
        "--rc-base",
        "--phys-base",
        "--json",
        "--gdb",
    ] {
        assert!(run.contains(flag), "run --help lacks {flag}");
    }
}

#[test]
fn list_names_every_kind_with_and_without_json() {
    let t = ok(&["list"]);
    for k in SwitcherKind::ALL {
        assert!(t.contains(k.cli_name()), "{t}");
    }
    let j = json(&["list", "--json"]);
    let rows = j["switchers"].as_array().unwrap();
    assert_eq!(rows.len(), SwitcherKind::ALL.len());
    for (row, kind) in rows.iter().zip(SwitcherKind::ALL) {
        assert_eq!(row["switcher"], kind.cli_name());
        let avail = vmm::AVAILABLE.contains(&kind);
        assert_eq!(row["available"], avail, "{}", kind.cli_name());
        assert!(row["host_mode"].is_string() && row["guest_mode"].is_string());
        assert!(row["description"].as_str().is_some_and(|d| !d.is_empty()));
        if avail {
            assert!(row["code_size"].as_u64().unwrap() > 0);
            assert!(row["fixups"].is_u64());
        } else {
            assert!(row["code_size"].is_null());
        }
    }
}

#[test]
fn show_every_available_switcher() {
    for name in available() {
        let t = ok(&["show", name]);
        for field in [
            "VMMSWITCHERDEF",
            "cbCode",
            "offR0HostToGuest",
            "fixup records",
        ] {
            assert!(t.contains(field), "{name}: {field}");
        }
        let j = json(&["show", name, "--json"]);
        let fixups = j["fixups"].as_array().unwrap();
        // Stubs have no fixups; every real switcher has some.
        assert_eq!(fixups.is_empty(), name.ends_with("-stub"), "{name}");
        let cb = j["vmmswitcherdef"]["cbCode"].as_u64().unwrap();
        for f in fixups {
            assert!(f["offset"].as_u64().unwrap() < cb);
            assert!(f["kind"].as_str().unwrap().starts_with("FIX_"));
        }
        assert!(!j["regions"].as_array().unwrap().is_empty());
        assert!(!j["labels"].as_array().unwrap().is_empty());
    }
}

#[test]
fn disasm_follows_the_placement() {
    let name = available()
        .into_iter()
        .find(|n| !n.ends_with("-stub"))
        .unwrap();
    let t = ok(&["disasm", name]);
    assert!(t.contains("entry:R0HostToGuest"), "{t}");
    assert!(t.contains("FIX_"), "{t}");
    let a = json(&["disasm", name, "--json"]);
    let b = json(&["disasm", name, "--json", "--hc-base", "0xd0000000"]);
    let first = |v: &Value| v["lines"][0]["addr"].as_u64().unwrap();
    assert_eq!(first(&b) - first(&a), 0xd000_0000 - 0xc040_0000);
    assert!(a["lines"].as_array().unwrap().len() > 100);
}

#[test]
fn relocate_writes_the_bytes_and_lists_every_fixup() {
    for name in available() {
        let out = tmp(&format!("{name}.bin"));
        let o = out.to_str().unwrap();
        let t = ok(&["relocate", name, "--out", o, "--rc-base", "0xb0000000"]);
        assert!(t.contains("fixups applied"), "{t}");
        let j = json(&["relocate", name, "--out", o, "--json"]);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len() as u64, j["bytes"].as_u64().unwrap());
        let fixups = j["fixups"].as_array().unwrap();
        assert_eq!(fixups.is_empty(), name.ends_with("-stub"), "{name}");
        for f in fixups {
            assert!(f["offset"].as_u64().unwrap() < bytes.len() as u64);
            assert!(f["kind"].is_string() && f["value"].is_u64());
        }
        let entries = j["entries"].as_array().unwrap();
        let r0 = entries
            .iter()
            .find(|e| e["name"] == "R0HostToGuest")
            .unwrap();
        assert_eq!(r0["addr"], j["context"]["code_hc"]);
    }
}

#[test]
fn bad_arguments_and_placements_exit_2_with_one_line() {
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["show"],
        &["show", "64-to-64"],
        &["show", "amd64-to-amd65"],
        &["list", "--bogus"],
        &["run", "--round-trips", "0"],
        &["run", "--round-trips", "many"],
        &["run", "--revision", "c"],
        &["run", "--all", "32-to-amd64"],
        &["run", "amd64-to-amd65"],
        &["run", "--vcpus", "0"],
        &["run", "--vcpus", "65"],
        &["run", "--gdb"],
        &["run", "32-to-amd64", "--phys-base", "0x8000000"],
        &["run", "32-to-amd64", "--hc-base", "0x100000000"],
        &["run", "32-to-amd64", "--rc-base", "0x100000000"],
        &["disasm", "32-to-amd64", "--hc-base", "0xc0400123"],
        &["disasm", "32-to-amd64", "--hc-base", "zz"],
        &["disasm", "32-to-amd64", "--phys-base", "0xfff00000"],
        &["disasm", "32-to-amd64", "--rc-base", "0x1001"],
        &["run", "32-to-amd64", "--phys-base", "0x100000"],
        &["relocate", "32-to-amd64"],
        &["relocate", "32-to-amd64", "--out", "/nonexistent/dir/x.bin"],
        &["image", "32-to-amd64"],
        &["stats", "--from", "/nonexistent.json"],
        &["stats", "--format", "yaml"],
    ];
    for args in cases {
        let o = ws(args);
        let e = err(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e:?}");
        assert!(e.starts_with("worldswitch: error: "), "{args:?}: {e}");
    }
    // The offending value is named.
    let e = err(&ws(&["disasm", "32-to-amd64", "--hc-base", "0xc0400123"]));
    assert!(e.contains("0xc0400123"), "{e}");
    let e = err(&ws(&["run", "--vcpus", "65"]));
    assert!(e.contains("65"), "{e}");
    // A document that is not a run.
    let f = tmp("not-a-run.json");
    std::fs::write(&f, "{\"x\": 1}").unwrap();
    let o = ws(&["stats", "--from", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    // A transcript that is not one.
    let o = ws_stdin(&["decode"], b"hello\n");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(err(&o).trim_end().lines().count(), 1);
}

#[test]
fn missing_qemu_names_the_package() {
    let empty = tmp("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let o = Command::new(BIN)
        .args(["run", "--round-trips", "1"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert!(e.contains(INSTALL_HINT), "{e}");
    assert!(e.contains(QEMU_BINARY), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
}

fn check_run_object(r: &Value) {
    for field in [
        "switcher",
        "revision",
        "verified",
        "outcome",
        "round_trips",
        "vcpus",
        "instructions_to_guest",
        "instructions_to_host",
        "instructions_per_round_trip",
        "stam",
    ] {
        assert!(r.get(field).is_some(), "run object lacks {field}: {r}");
    }
    assert!(r["verified"].is_boolean());
}

#[test]
fn run_all_json_matches_the_schema_and_the_exit_status() {
    if support::qemu().is_none() {
        return;
    }
    let o = ws(&["run", "--all", "--round-trips", "10", "--json"]);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["schema"], "worldswitch.run/1");
    let runs = doc["runs"].as_array().unwrap();
    assert!(!runs.is_empty());
    let all = runs.iter().all(|r| r["verified"] == true);
    assert_eq!(doc["verified"], all);
    assert_eq!(
        o.status.code(),
        Some(if all { 0 } else { 1 }),
        "{}",
        err(&o)
    );
    // No progress output when stderr is not a terminal.
    assert!(err(&o).is_empty(), "{}", err(&o));
    for r in runs {
        check_run_object(r);
        if !SEED.contains(&r["switcher"].as_str().unwrap()) {
            continue;
        }
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["outcome"], "pass");
        assert_eq!(r["round_trips"], 20);
        assert_eq!(r["vcpus"], 2);
        assert_eq!(r["revision"], "b");
        for f in [
            "instructions_to_guest",
            "instructions_to_host",
            "instructions_per_round_trip",
            "instructions_per_round_trip_max",
        ] {
            assert!(r[f].as_u64().unwrap() > 50, "{f}: {r}");
        }
        let samples = r["stam"]["samples"].as_array().unwrap();
        assert!(samples
            .iter()
            .any(|s| s["name"] == "/VMM/Switcher/ToGC" && s["value"]["profile"]["periods"] == 20));
    }
}

#[test]
fn run_text_options_and_a_caught_mutation() {
    if support::qemu().is_none() {
        return;
    }
    let t = ok(&[
        "run",
        SEED[1],
        "--round-trips",
        "10",
        "--vcpus",
        "3",
        "--revision",
        "a",
        "--trace",
        "--hc-base",
        "0xd0000000",
        "--rc-base",
        "0xb0000000",
        "--phys-base",
        "0x1000000",
    ]);
    for want in [
        "verified     yes (30 round trips",
        "revision A, trace",
        "to guest",
        "to host",
        "round trip",
        "/VMM/Switcher/ToGC",
        "1 of 1 switcher verified",
    ] {
        assert!(t.contains(want), "{want}: {t}");
    }
    let t = ok(&[
        "run",
        SEED[0],
        "--round-trips",
        "10",
        "--no-apic",
        "--no-stats",
    ]);
    assert!(t.contains("verified     yes"), "{t}");
    // A broken switcher: exit 1, the failing state named.
    let o = ws(&[
        "run",
        SEED[0],
        "--round-trips",
        "10",
        "--mutate",
        "host-ebx-not-restored",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let t = text(&o);
    assert!(t.contains("verified     NO"), "{t}");
    assert!(t.to_lowercase().contains("ebx"), "{t}");
    let o = ws(&[
        "run",
        SEED[0],
        "--round-trips",
        "10",
        "--mutate",
        "host-ebx-not-restored",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["verified"], false);
    assert_eq!(doc["runs"][0]["mutation"], "host-ebx-not-restored");
    assert!(!doc["runs"][0]["failures"].as_array().unwrap().is_empty());
}

#[test]
fn image_boots_and_decode_judges_the_transcript() {
    let out = tmp("ws.bin");
    let o = out.to_str().unwrap();
    let t = ok(&["image", SEED[0], "--out", o, "--round-trips", "10"]);
    assert!(t.contains("multiboot"), "{t}");
    let j = json(&[
        "image",
        SEED[0],
        "--out",
        o,
        "--round-trips",
        "10",
        "--json",
    ]);
    assert_eq!(
        j["images"][0]["bytes"],
        std::fs::metadata(&out).unwrap().len()
    );
    // Several switchers: one file each.
    let j = json(&[
        "image",
        "--all",
        "--out",
        tmp("all.bin").to_str().unwrap(),
        "--json",
    ]);
    for i in j["images"].as_array().unwrap() {
        assert!(PathBuf::from(i["path"].as_str().unwrap()).is_file(), "{i}");
    }
    if support::qemu().is_none() {
        return;
    }
    // Boot it the way the README says, capture COM1, decode it.
    let serial = Command::new(QEMU_BINARY)
        .args(QemuConfig::default().args(&out))
        .output()
        .unwrap()
        .stdout;
    let t = text(&ws_stdin(&["decode"], &serial));
    assert!(t.contains("verified     yes (20 round trips"), "{t}");
    let d = ws_stdin(&["decode", SEED[0], "--json"], &serial);
    assert_eq!(d.status.code(), Some(0), "{}", err(&d));
    let doc: Value = serde_json::from_slice(&d.stdout).unwrap();
    assert_eq!(doc["command"], "decode");
    check_run_object(&doc["runs"][0]);
    assert_eq!(doc["runs"][0]["verified"], true);
    // A transcript cut short (a reset on real hardware): exit 1, incomplete.
    let cut = &serial[..serial.len() / 3];
    let d = ws_stdin(&["decode", "--json"], cut);
    assert_eq!(d.status.code(), Some(1), "{}", err(&d));
    let doc: Value = serde_json::from_slice(&d.stdout).unwrap();
    assert_eq!(doc["runs"][0]["outcome"], "incomplete");
    // The wrong placement is noticed, not misjudged.
    let d = ws_stdin(&["decode", "--hc-base", "0xd0000000"], &serial);
    assert_eq!(d.status.code(), Some(2), "{}", err(&d));
}

#[test]
fn stats_in_every_format_from_a_run_and_from_a_saved_run() {
    if support::qemu().is_none() {
        return;
    }
    let base = ["stats", SEED[0], "--round-trips", "10"];
    let t = ok(&base);
    assert!(t.contains("/VMM/Switcher/ToGC"), "{t}");
    let x = ok(&[&base[..], &["--format", "xml"]].concat());
    assert!(x.contains("<Statistics>"), "{x}");
    let p = ok(&[
        &base[..],
        &["--format", "prometheus", "--pattern", "/VMM/Switcher/*"],
    ]
    .concat());
    assert!(p.contains("stam_profile_periods_total"), "{p}");
    assert!(!p.contains("CPU0"), "{p}");
    let j = json(&[&base[..], &["--json"]].concat());
    assert!(!j["samples"].as_array().unwrap().is_empty());
    // From a saved run.
    let saved = tmp("run.json");
    let o = ws(&["run", SEED[0], SEED[1], "--round-trips", "10", "--json"]);
    std::fs::write(&saved, &o.stdout).unwrap();
    let s = saved.to_str().unwrap();
    let t = ok(&[
        "stats",
        "--from",
        s,
        SEED[1],
        "--pattern",
        "/VMM/Switcher/ToHC",
    ]);
    assert!(
        t.contains("/VMM/Switcher/ToHC") && !t.contains("ToGC"),
        "{t}"
    );
    let j = json(&["stats", "--from", s, SEED[0], "--format", "json"]);
    assert!(j["samples"].as_array().unwrap().len() >= 2);
    // Two runs in the file and none named.
    assert_eq!(ws(&["stats", "--from", s]).status.code(), Some(2));
}
