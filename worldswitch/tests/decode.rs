//! `image` → QEMU → `decode` for every switcher and both revisions, exactly
//! as `image` tells a user to do it; `decode` needs no options because the
//! transcript names its build, and refuses options that contradict it. A
//! CPU without what a switcher needs ends `run` and `decode` with a
//! one-line error naming the feature.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::support;
use common::{available, err, tmp, ws, ws_stdin};

use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// Writes the image of `kind` with `extra` options and boots it with the
/// exact command `image --json` prints (`qemu_command`, without the
/// redirection); returns COM1 and the printed `decode_command`.
fn boot_as_told(kind: &str, extra: &[&str]) -> (Vec<u8>, String) {
    let out = tmp(&format!("{kind}{}.bin", extra.join("").replace('-', "_")));
    let mut args = vec!["image", kind, "--out", out.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let o = ws(&args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", err(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let img = &doc["images"][0];
    let cmd = img["qemu_command"].as_str().unwrap();
    let cmd = cmd.strip_suffix(" > serial.log").unwrap_or(cmd);
    let mut words = cmd.split(' ');
    let qemu = Command::new(words.next().unwrap())
        .args(words)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        qemu.stdout,
        img["decode_command"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn every_switcher_and_revision_round_trips_through_image_qemu_and_decode() {
    if support::qemu().is_none() {
        return;
    }
    let kinds = available();
    assert_eq!(kinds.len(), 11, "{kinds:?}");
    let jobs: Vec<(&str, &str)> = kinds
        .iter()
        .flat_map(|k| [(*k, "a"), (*k, "b"), (*k, "c")])
        .collect();
    // Two boots at a time (the machine has two cores).
    let results: Vec<(String, Output, String)> = std::thread::scope(|sc| {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(2))
            .map(|chunk| {
                sc.spawn(move || {
                    chunk
                        .iter()
                        .map(|(kind, rev)| {
                            let (serial, cmd) =
                                boot_as_told(kind, &["--round-trips", "5", "--revision", rev]);
                            assert_eq!(cmd, "worldswitch decode < serial.log");
                            let o = ws_stdin(&["decode", "--json"], &serial);
                            let text = String::from_utf8_lossy(&serial).into_owned();
                            (format!("{kind} revision {rev}"), o, text)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(results.len(), 33);
    for (what, o, serial) in results {
        assert_eq!(o.status.code(), Some(0), "{what}: {}\n{serial}", err(&o));
        let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
        let run = &doc["runs"][0];
        assert_eq!(run["verified"], true, "{what}: {run}");
        assert_eq!(run["round_trips_per_vcpu"], 5, "{what}");
        let rev = what.rsplit(' ').next().unwrap();
        assert_eq!(
            run["revision"], rev,
            "{what}: the build comes from the transcript"
        );
    }
}

#[test]
fn decode_refuses_options_that_contradict_the_transcript() {
    if support::qemu().is_none() {
        return;
    }
    let (serial, _) = boot_as_told(
        "pae-to-amd64",
        &[
            "--round-trips",
            "3",
            "--revision",
            "a",
            "--rc-base",
            "0xb0000000",
            "--no-stats",
        ],
    );
    // No options: the build comes from the BOOT line.
    let o = ws_stdin(&["decode"], &serial);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    // Agreeing options are fine.
    let o = ws_stdin(
        &[
            "decode",
            "pae-to-amd64",
            "--revision",
            "a",
            "--rc-base",
            "0xb0000000",
            "--no-stats",
        ],
        &serial,
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    for args in [
        &["decode", "--revision", "b"][..],
        &["decode", "--rc-base", "0xa0000000"],
        &["decode", "--phys-base", "0x800000"],
        &["decode", "--round-trips", "4"],
        &["decode", "--vcpus", "1"],
        &["decode", "--no-apic"],
        &["decode", "32-to-amd64"],
    ] {
        let o = ws_stdin(args, &serial);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", err(&o));
        let e = err(&o);
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(e.contains("contradict"), "{args:?}: {e}");
    }
}

#[test]
fn decode_judges_amd64_host_transcripts() {
    if support::qemu().is_none() {
        return;
    }
    for kind in [
        "amd64-to-32",
        "amd64-to-pae",
        "amd64-to-amd64",
        "amd64-stub",
    ] {
        let (serial, cmd) = boot_as_told(kind, &["--round-trips", "3"]);
        assert_eq!(cmd, "worldswitch decode < serial.log");
        let o = ws_stdin(&["decode"], &serial);
        assert_eq!(o.status.code(), Some(0), "{kind}: {}", err(&o));
        // Naming the switcher agrees with the transcript.
        let o = ws_stdin(&["decode", kind], &serial);
        assert_eq!(o.status.code(), Some(0), "{kind}: {}", err(&o));
    }
}

#[test]
fn decode_refuses_a_forged_verdict() {
    if support::qemu().is_none() {
        return;
    }
    let (serial, _) = boot_small();
    let text = String::from_utf8_lossy(&serial).into_owned();
    for (what, bad) in [
        (
            "mismatches=5",
            text.replacen("mismatches=0", "mismatches=5", 1),
        ),
        (
            "RETFAIL line",
            text.replacen(
                "@@VCPU",
                "@@RETFAIL trip=0 vcpu=0 got=00000001 want=00000002\n@@VCPU",
                1,
            ),
        ),
        (
            "ERROR line",
            text.replacen("@@VCPU", "@@ERROR boom\n@@VCPU", 1),
        ),
        (
            "EXC2 line",
            text.replacen(
                "@@RESULT",
                "@@EXC2 vec=0e err=00000000 eip=00100000\n@@RESULT",
                1,
            ),
        ),
        (
            "unknown line",
            text.replacen("@@VCPU", "@@WHAT x=1\n@@VCPU", 1),
        ),
        ("no CRC", text[..text.rfind("@@CRC").unwrap()].to_owned()),
    ] {
        let o = ws_stdin(&["decode"], bad.as_bytes());
        assert_eq!(o.status.code(), Some(1), "{what}: {}", err(&o));
        // The machine's own RESULT line says pass; the report must not.
        let j = ws_stdin(&["decode", "--json"], bad.as_bytes());
        let doc: Value = serde_json::from_slice(&j.stdout).unwrap();
        let run = &doc["runs"][0];
        assert_eq!(run["verified"], false, "{what}");
        assert_ne!(run["outcome"], "pass", "{what}: {run}");
    }
}

/// A small 32-bit-host image, booted.
fn boot_small() -> (Vec<u8>, String) {
    boot_as_told("32-to-amd64", &["--round-trips", "3"])
}

#[test]
fn a_cpu_without_what_the_switcher_needs_is_a_one_line_error() {
    if support::qemu().is_none() {
        return;
    }
    for (kind, cpu, feature) in [
        ("32-to-amd64", "qemu64,-pae", "no pae"),
        ("amd64-to-amd64", "486", "no long-mode"),
    ] {
        let o = ws(&["run", kind, "--cpu", cpu, "--round-trips", "2"]);
        assert_eq!(o.status.code(), Some(2), "{kind} {cpu}: {}", err(&o));
        let e = err(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(feature), "{kind} {cpu}: {e}");
        // The same transcript through decode.
        let out = tmp(&format!("{kind}-nocpu.bin"));
        let o = ws(&[
            "image",
            kind,
            "--out",
            out.to_str().unwrap(),
            "--round-trips",
            "2",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        let mut q = integration::qemu::QemuConfig::default();
        q.cpu = Some(cpu.into());
        let serial = Command::new(integration::qemu::QEMU_BINARY)
            .args(q.args(&out))
            .output()
            .unwrap()
            .stdout;
        let o = ws_stdin(&["decode"], &serial);
        assert_eq!(o.status.code(), Some(2), "{kind} {cpu}: {}", err(&o));
        assert!(err(&o).contains(feature), "{}", err(&o));
    }
}
