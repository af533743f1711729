//! The `worldswitch` program as a user runs it: every subcommand with and
//! without `--json`, `--help` everywhere, and bad arguments and placements
//! ending with a one-line error and exit status 2.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::support;
use common::{available, err, json, ok, text, tmp, ws, ws_stdin};

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use integration::qemu::{QemuConfig, INSTALL_HINT, QEMU_BINARY};
use serde_json::Value;
use vmm_switcher::SwitcherKind;

use common::BIN;

/// The two switchers of the seed documents: they must always verify.
const SEED: [&str; 2] = ["32-to-amd64", "pae-to-amd64"];

/// The one vocabulary of paging modes, the README's.
const MODES: [&str; 3] = ["32-bit", "PAE", "AMD64"];

/// The schema name of `run --json` and `decode --json`.
const SCHEMA: &str = "worldswitch.run/2";

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
        assert!(MODES.contains(&row["host_mode"].as_str().unwrap()), "{row}");
        for m in row["host_modes"].as_array().unwrap() {
            assert!(MODES.contains(&m.as_str().unwrap()), "{row}");
        }
        // A stub has no hypervisor context: `null`, not a sentinel.
        if kind.guest().is_none() {
            assert!(row["guest_mode"].is_null(), "{row}");
        } else {
            assert!(
                MODES.contains(&row["guest_mode"].as_str().unwrap()),
                "{row}"
            );
        }
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
        &["run", "--revision", "d"],
        &["run", "--all", "32-to-amd64"],
        &["run", "amd64-to-amd65"],
        &["run", "--vcpus", "0"],
        &["run", "--vcpus", "65"],
        &["run", "--gdb"],
        &["run", "--jobs", "0"],
        &["run", "--jobs", "x"],
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
        &["run", "32-to-32", "--timeout", "18446744073709551615"],
        &["stats", "32-to-32", "--timeout", "18446744073709551615"],
        &["run", "32-to-32", "--timeout", "86401"],
        &["disasm", "32-to-32", "--hc-base", "0xffffffffffeff000"],
        &[
            "relocate",
            "amd64-to-pae",
            "--hc-base",
            "0xffffffffffeff000",
            "--out",
            "/dev/null",
        ],
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
    assert_eq!(doc["schema"], SCHEMA);
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
        assert_eq!(r["revision"], "c");
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

/// `mode` is named in the README's vocabulary, never the serial protocol's.
fn assert_vocabulary(out: &str) {
    for word in ["legacy32", "\"pae\"", "\"amd64\"", "\"x86\"", "\"-\""] {
        assert!(!out.contains(word), "{word} in {out}");
    }
}

#[test]
fn paging_modes_have_one_vocabulary_everywhere() {
    let t = ok(&["list"]);
    assert!(
        t.contains("32-bit") && t.contains("PAE") && t.contains("AMD64"),
        "{t}"
    );
    assert_vocabulary(&t);
    assert_vocabulary(&ok(&["list", "--json"]));
    let out = tmp("vocab.bin");
    let j = json(&[
        "image",
        "--all",
        "--out",
        out.to_str().unwrap(),
        "--round-trips",
        "1",
        "--json",
    ]);
    for i in j["images"].as_array().unwrap() {
        assert!(MODES.contains(&i["host_mode"].as_str().unwrap()), "{i}");
    }
    let t = ok(&[
        "image",
        "--all",
        "--out",
        out.to_str().unwrap(),
        "--round-trips",
        "1",
    ]);
    assert_vocabulary(&t);
}

#[test]
fn show_lists_entry_points_in_offset_order() {
    for name in available() {
        let j = json(&["show", name, "--json"]);
        let offs: Vec<u64> = j["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["offset"].as_u64().unwrap())
            .collect();
        assert!(offs.windows(2).all(|w| w[0] <= w[1]), "{name}: {offs:?}");
        let t = ok(&["show", name]);
        let section = t.split("\nentry points\n").nth(1).unwrap();
        let text_offs: Vec<u64> = section
            .lines()
            .take_while(|l| !l.is_empty())
            .map(|l| {
                u64::from_str_radix(
                    l.trim().split(' ').next().unwrap().trim_start_matches("0x"),
                    16,
                )
                .unwrap()
            })
            .collect();
        assert_eq!(text_offs, offs, "{name}: {t}");
    }
}

/// The value a fixup record writes, recomputed from `relocate --json`'s
/// context alone.
fn recompute(c: &Value, f: &Value) -> u64 {
    let n = |k: &str| {
        c[k].as_u64()
            .unwrap_or_else(|| panic!("context lacks {k}: {c}"))
    };
    let sel = |k: &str| c["sel"][k].as_u64().unwrap();
    let cr3 = |k: &str| c["inter_cr3"][k].as_u64().unwrap();
    let fact = |k: &str| c["cpu"][k].as_bool().unwrap();
    let op = || f["operand"].as_u64().unwrap();
    let off = f["offset"].as_u64().unwrap();
    let cpum_rc = n("vm_rc") + n("cpum_off");
    let kind = f["kind"].as_str().unwrap();
    let at = |view: &str, o: u64| match view {
        "HC" => n("code_hc") + o,
        "ID" => n("code_id") + o,
        "GC" => n("code_rc") + o,
        _ => unreachable!(),
    };
    if let Some(views) = kind
        .strip_prefix("FIX_")
        .and_then(|k| k.strip_suffix("_NEAR_REL"))
    {
        // rel32 from the field's end to the operand's offset.
        let (from, to) = views.split_once("_2_").unwrap();
        let src = at(from, off + 4);
        return u64::from(at(to, op()).wrapping_sub(src) as u32);
    }
    match kind {
        "FIX_GC_FAR32" => at("GC", op()) | sel("cs") << 32,
        "FIX_GC_CPUM_OFF" | "FIX_GC_64_BIT_CPUM_OFF" => cpum_rc + op(),
        "FIX_GC_CPUMCPU_OFF" => cpum_rc + n("cpumcpu0_off") + op(),
        "FIX_GC_VM_OFF" => n("vm_rc") + op(),
        "FIX_HC_CPUM_OFF" => n("vm_hc") + n("cpum_off") + op(),
        "FIX_HC_VM_OFF" => n("vm_hc") + op(),
        "FIX_HC_64BIT_CPUM" => n("vm_hc") + n("cpum_off"),
        "FIX_INTER_32BIT_CR3" => cr3("legacy32"),
        "FIX_INTER_PAE_CR3" => cr3("pae"),
        "FIX_INTER_AMD64_CR3" => cr3("amd64"),
        "FIX_HYPER_CS" => sel("cs"),
        "FIX_HYPER_DS" => sel("ds"),
        "FIX_HYPER_TSS" => sel("tss"),
        "FIX_GC_TSS_GDTE_DW2" => n("gdt_rc") + (sel("tss") & !7) + 4,
        "FIX_HC_32BIT" | "FIX_HC_64BIT" => at("HC", op()),
        "FIX_ID_32BIT" | "FIX_ID_64BIT" | "FIX_HC_64BIT_NOCHECK" => at("ID", op()),
        "FIX_ID_FAR32_TO_64BIT_MODE" => at("ID", op()) | sel("cs64") << 32,
        "FIX_GC_APIC_BASE_32BIT" => n("apic_rc"),
        "FIX_EFER_OR_MASK" => n("efer_or_mask"),
        "FIX_NO_FXSAVE_JMP" => u64::from(!fact("fxsr")),
        "FIX_NO_SYSENTER_JMP" => u64::from(!fact("host_sysenter")),
        "FIX_NO_SYSCALL_JMP" => u64::from(!fact("host_syscall")),
        other => panic!("no rule for {other}: {f}"),
    }
}

#[test]
fn relocate_json_is_enough_to_recompute_every_fixup() {
    let placements: [&[&str]; 2] = [
        &[],
        &[
            "--hc-base",
            "0xd0000000",
            "--rc-base",
            "0xb0000000",
            "--phys-base",
            "0x1000000",
        ],
    ];
    for name in available() {
        for (i, placement) in placements.iter().enumerate() {
            let out = tmp(&format!("recompute-{name}-{i}.bin"));
            let o = out.to_str().unwrap();
            let j = json(&[&["relocate", name, "--out", o, "--json"][..], placement].concat());
            let bytes = std::fs::read(&out).unwrap();
            let c = &j["context"];
            for k in ["vm_size", "cpum_size", "gdt_rc"] {
                assert!(c[k].is_u64(), "{name}: context lacks {k}: {c}");
            }
            for f in j["fixups"].as_array().unwrap() {
                let want = recompute(c, f);
                assert_eq!(
                    f["value"].as_u64().unwrap(),
                    want,
                    "{name} {placement:?}: {f}"
                );
                // Plain fields hold the value itself, little-endian.
                let len = f["len"].as_u64().unwrap() as usize;
                let at = f["offset"].as_u64().unwrap() as usize;
                if matches!(len, 2 | 4 | 8) {
                    let mut field = [0u8; 8];
                    field[..len].copy_from_slice(&bytes[at..at + len]);
                    assert_eq!(u64::from_le_bytes(field), want, "{name}: bytes of {f}");
                }
            }
        }
    }
}

/// A QEMU stand-in: a shell script that runs `body` (with `$QEMU` the real
/// binary and `$LOG` the `-D` file QEMU was given).
fn qemu_wrapper(name: &str, body: &str) -> PathBuf {
    let real = integration::qemu::find_qemu().unwrap();
    let path = tmp(name);
    let script = format!(
        "#!/bin/sh\nQEMU='{}'\nLOG=''\nprev=''\nfor a in \"$@\"; do\n  [ \"$prev\" = -D ] && LOG=\"$a\"\n  prev=\"$a\"\ndone\n{body}\n",
        real.display()
    );
    std::fs::write(&path, script).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    path
}

/// Shell: wait (at most 60 s) for `file`; if it never comes, leave `marker`.
fn wait_for(file: &std::path::Path, marker: &std::path::Path) -> String {
    format!(
        "i=0\nwhile [ ! -e '{f}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n[ -e '{f}' ] || touch '{m}'",
        f = file.display(),
        m = marker.display()
    )
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = tmp(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn environment_problems_exit_2_naming_the_cause() {
    let one_line = |o: &Output, want: &[&str]| {
        let e = err(o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e:?}");
        assert!(e.starts_with("worldswitch: error: "), "{e}");
        for w in want {
            assert!(e.contains(w), "{w}: {e}");
        }
        assert!(text(o).is_empty(), "{}", text(o));
        e
    };
    // A `--qemu` that is not there is named, not PATH.
    let e = one_line(
        &ws(&["run", SEED[0], "--round-trips", "1", "--qemu", "/nope"]),
        &["/nope", "does not exist"],
    );
    assert!(!e.contains("PATH"), "{e}");
    // A `--qemu` that is not QEMU: status 1 and not a word.
    one_line(
        &ws(&["run", SEED[0], "--round-trips", "1", "--qemu", "/bin/false"]),
        &["/bin/false", "refused to start", "printed nothing"],
    );
    if support::qemu().is_none() {
        return;
    }
    // QEMU's own words, for a bad CPU model and a log it cannot write.
    one_line(
        &ws(&[
            "run",
            SEED[0],
            "--round-trips",
            "1",
            "--cpu",
            "no-such-cpu-model",
        ]),
        &["refused to start", "no-such-cpu-model"],
    );
    one_line(
        &ws(&[
            "run",
            SEED[0],
            "--round-trips",
            "1",
            "--qemu-log",
            "/nonexistent/dir/q.log",
        ]),
        &["refused to start", "/nonexistent/dir/q.log"],
    );
    // With several switchers each boot has its own log, named after it.
    one_line(
        &ws(&[
            "run",
            SEED[0],
            SEED[1],
            "--round-trips",
            "1",
            "--qemu-log",
            "/nonexistent/dir/q.log",
        ]),
        &[&format!("/nonexistent/dir/q-{}.log", SEED[0])],
    );
    one_line(
        &ws(&[
            "stats",
            SEED[0],
            "--round-trips",
            "1",
            "--cpu",
            "no-such-cpu-model",
        ]),
        &["no-such-cpu-model"],
    );
}

#[test]
fn reports_stream_in_switcher_order_and_boots_run_in_parallel() {
    if support::qemu().is_none() {
        return;
    }
    let (first, second) = (SEED[0], SEED[1]);
    // Parallel: the first switcher's QEMU waits until the second's has
    // ended, so the second finishes first; with one boot at a time the wait
    // would be in vain and leave a marker.
    let d = fresh_dir("parallel");
    let done = d.join("second-done");
    let marker = d.join("waited-in-vain");
    let wrapper = qemu_wrapper(
        "qemu-parallel.sh",
        &format!(
            "case \"$LOG\" in\n*{first}*) {wait}\n  exec \"$QEMU\" \"$@\";;\n*) \"$QEMU\" \"$@\"; st=$?; touch '{done}'; exit $st;;\nesac",
            wait = wait_for(&done, &marker),
            done = done.display()
        ),
    );
    let log = d.join("q.log");
    let o = ws(&[
        "run",
        first,
        second,
        "--round-trips",
        "10",
        "--jobs",
        "2",
        "--qemu",
        wrapper.to_str().unwrap(),
        "--qemu-log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(!marker.exists(), "the boots did not run at the same time");
    for k in [first, second] {
        assert!(d.join(format!("q-{k}.log")).is_file(), "no log for {k}");
    }
    // Reports in switcher order although the second ended first, then the
    // comparison table, then the count.
    let t = text(&o);
    let pos = |needle: &str| t.find(needle).unwrap_or_else(|| panic!("{needle}: {t}"));
    let r1 = pos(&format!("{first} (VMMSWITCHER"));
    let r2 = pos(&format!("{second} (VMMSWITCHER"));
    let table = pos("SWITCHER        VERDICT");
    assert!(r1 < r2 && r2 < table, "{t}");
    assert!(t.ends_with("2 of 2 switchers verified\n"), "{t}");
    let rows: Vec<&str> = t[table..].lines().skip(1).take(2).collect();
    for (row, k) in rows.iter().zip([first, second]) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[0], k, "{row}");
        assert_eq!(cols[1], "verified", "{row}");
        assert!(cols[2].parse::<u64>().unwrap() > 50, "ToGC: {row}");
        assert!(cols[3].parse::<u64>().unwrap() > 50, "ToHC: {row}");
        let (lo, hi) = cols[4].split_once("..").unwrap();
        assert!(
            lo.parse::<u64>().unwrap() <= hi.parse::<u64>().unwrap(),
            "{row}"
        );
        assert_eq!(cols[6], "s", "wall time: {row}");
    }

    // Streaming: the second boot waits until the test has read the first
    // report from the pipe; output written once at the end would never
    // come before it.
    let d = fresh_dir("stream");
    let go = d.join("go");
    let marker = d.join("waited-in-vain");
    let wrapper = qemu_wrapper(
        "qemu-stream.sh",
        &format!(
            "case \"$LOG\" in\n*{second}*) {wait};;\nesac\nexec \"$QEMU\" \"$@\"",
            wait = wait_for(&go, &marker)
        ),
    );
    let mut child = Command::new(BIN)
        .args([
            "run",
            first,
            second,
            "--round-trips",
            "10",
            "--jobs",
            "1",
            "--qemu",
            wrapper.to_str().unwrap(),
            "--qemu-log",
            d.join("q.log").to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let end = line.is_empty();
        seen.push_str(&line);
        seen.push('\n');
        if end {
            break;
        }
    }
    std::fs::write(&go, "").unwrap();
    assert!(seen.starts_with(&format!("{first} (VMMSWITCHER")), "{seen}");
    assert!(seen.contains("verified     yes"), "{seen}");
    let rest: String = lines.map(|l| l.unwrap() + "\n").collect();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(!marker.exists(), "the first report came only at the end");
    assert!(
        rest.starts_with(&format!("{second} (VMMSWITCHER")),
        "{rest}"
    );
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    if support::qemu().is_none() {
        return;
    }
    let mut child = Command::new(BIN)
        .args(["run", SEED[0], SEED[1], "--round-trips", "1", "--jobs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert!(first.starts_with(SEED[0]), "{first}");
    drop(out);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(err(&o).is_empty(), "{}", err(&o));
}

#[test]
fn run_json_failures_are_the_report_lines() {
    if support::qemu().is_none() {
        return;
    }
    let args = [
        "run",
        SEED[0],
        "--round-trips",
        "10",
        "--mutate",
        "host-ebx-not-restored",
    ];
    let t = text(&ws(&args));
    let o = ws(&[&args[..], &["--json"]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["schema"], SCHEMA);
    let failures = doc["runs"][0]["failures"].as_array().unwrap();
    assert!(!failures.is_empty());
    let printed: Vec<&str> = t
        .lines()
        .filter_map(|l| l.strip_prefix("  failure      "))
        .collect();
    let listed: Vec<&str> = failures.iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(listed, printed, "{t}");
    for f in listed {
        assert!(
            !f.contains("Some(") && !f.contains(" { "),
            "debug text: {f}"
        );
    }
    // A stub: no hypervisor context, so no guest mode.
    let o = ws(&["run", "x86-stub", "--round-trips", "2", "--json"]);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &doc["runs"][0];
    assert!(r["guest_mode"].is_null(), "{r}");
    assert_eq!(r["host_mode"], "32-bit");
    assert!(r["not_measured"].is_null(), "{r}");
}

/// Connects to QEMU's gdbstub (retrying while QEMU starts) and sends
/// `continue`; the connection stays open until the returned stream drops.
fn gdb_continue(port: u16) -> std::net::TcpStream {
    for _ in 0..600 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(b"+$c#63").unwrap();
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no gdbstub on :{port}");
}

/// Runs `args` (a `run --gdb`), lets the guest go from the gdbstub, and
/// kills the program if it has not ended after two minutes.
fn run_under_gdb(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stub = gdb_continue(1234);
    for _ in 0..1200 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let o = child.wait_with_output().unwrap();
    drop(stub);
    o
}

#[test]
fn under_gdb_counts_and_wall_time_are_not_measurements() {
    if support::qemu().is_none() {
        return;
    }
    let o = run_under_gdb(&["run", SEED[0], "--round-trips", "2", "--gdb", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &doc["runs"][0];
    assert_eq!(r["verified"], true, "{r}");
    for f in [
        "instructions_to_guest",
        "instructions_to_host",
        "instructions_per_round_trip",
        "instructions_per_round_trip_max",
        "wall_seconds",
    ] {
        assert!(r[f].is_null(), "{f}: {r}");
    }
    let why = r["not_measured"].as_str().unwrap();
    assert!(why.contains("--gdb") && why.contains("debugger"), "{why}");
    // The text report says so too.
    let o = run_under_gdb(&["run", SEED[0], "--round-trips", "2", "--gdb"]);
    let t = text(&o);
    assert!(t.contains("  not measured run under --gdb"), "{t}");
    assert!(t.contains("to guest       n/a"), "{t}");
    assert!(!t.contains(" s)"), "a wall time: {t}");
}

/// The backticked names in the first column of the README's table of run
/// fields.
fn readme_run_fields() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let table = readme
        .split("| field of a run |")
        .nth(1)
        .expect("the README has the table of run fields");
    let mut names = Vec::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let first = row.split('|').nth(1).unwrap();
        names.extend(first.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    names
}

#[test]
fn readme_schema_lists_every_field_a_run_has() {
    use worldswitch::report::{PlacementJson, RunJson};
    let run = RunJson {
        switcher: "",
        vbox_name: "",
        host_mode: "",
        guest_mode: None,
        revision: "",
        stats: false,
        apic_nmi_masking: false,
        trace: false,
        x2apic: false,
        cpu_facts: vmm::CpuFacts::common().into(),
        host_apic: "",
        host_cr4: "",
        la57: false,
        vcpus: 0,
        cpus: 1,
        round_trips_per_vcpu: 0,
        placement: PlacementJson {
            code_hc: 0,
            code_phys: 0,
            hma_rc: 0,
            hma_hc: 0,
            hma_phys: 0,
            tables_phys: 0,
        },
        mutation: None,
        verified: false,
        outcome: "",
        outcome_detail: None,
        failures: Vec::new(),
        mismatches: Vec::new(),
        last_step: None,
        round_trips: 0,
        instructions_to_guest: None,
        instructions_to_host: None,
        instructions_per_round_trip: None,
        instructions_per_round_trip_max: None,
        nmis: None,
        nmi_storm: None,
        overlapping_trips: None,
        per_cpu: None,
        wall_seconds: None,
        not_measured: None,
        stam: None,
        cost: None,
        engine: "qemu",
        bochs_cpu: None,
        tsc_ticks: None,
        engine_faults: Vec::new(),
    };
    let v = serde_json::to_value(&run).unwrap();
    let mut emitted: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    let mut documented = readme_run_fields();
    emitted.sort();
    documented.sort();
    assert_eq!(documented, emitted, "the README's table of run fields");
    let readme = include_str!("../../README.md");
    assert!(readme.contains(&format!("\"schema\": \"{SCHEMA}\"")));
    assert_eq!(worldswitch::report::SCHEMA, SCHEMA);
}
