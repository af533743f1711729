//! The host scenarios of `worldswitch run`: `--host-apic x2apic` for every
//! switcher, `--host-cr4 today` for the AMD64-host ones, `--cpu` models
//! without a CPU fact, what `run --json` says about each, what `decode`
//! rebuilds from the `BOOT` line, and the bad combinations refused in one
//! line.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::support;
use common::{boot_serial, decode_json, err, ws};

use serde_json::Value;

/// `run --json` with `args`: the document, after checking exit status 0.
fn run_json(args: &[&str]) -> Value {
    let mut all = vec!["run", "--json", "--round-trips", "20", "--jobs", "2"];
    all.extend_from_slice(args);
    let o = ws(&all);
    assert_eq!(o.status.code(), Some(0), "{all:?}: {}", err(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn every_switcher_runs_on_an_x2apic_host_from_the_command_line() {
    if support::qemu_x2apic().is_none() {
        return;
    }
    let doc = run_json(&["--all", "--host-apic", "x2apic"]);
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), vmm::AVAILABLE.len());
    for r in runs {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["host_apic"], "x2apic", "{r}");
        assert_eq!(
            r["x2apic"], true,
            "--host-apic x2apic builds the x2APIC code"
        );
        assert_eq!(r["host_cr4"], "base");
    }
}

#[test]
fn amd64_host_switchers_run_with_todays_cr4_from_the_command_line() {
    if support::qemu().is_none() {
        return;
    }
    let amd64: Vec<&str> = vmm::AVAILABLE
        .iter()
        .filter(|k| k.host() == vmm_switcher::SideMode::Amd64)
        .map(|k| k.cli_name())
        .collect();
    assert_eq!(amd64.len(), 4);
    let mut args = vec!["--host-cr4", "today"];
    args.extend(&amd64);
    let doc = run_json(&args);
    for r in doc["runs"].as_array().unwrap() {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["host_cr4"], "today", "{r}");
        assert_eq!(r["host_apic"], "xapic");
    }
    // The text report says so.
    let o = ws(&["run", amd64[0], "--round-trips", "3", "--host-cr4", "today"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("host CR4 today"));
}

#[test]
fn run_json_reports_the_cpu_facts_each_image_was_relocated_for() {
    if support::qemu().is_none() {
        return;
    }
    for (cpu, fact) in [
        ("qemu64,-nx", "nx"),
        ("qemu64,-sep", "sysenter"),
        ("qemu64,-syscall", "syscall"),
    ] {
        let doc = run_json(&["pae-to-pae", "amd64-to-32", "--cpu", cpu]);
        for r in doc["runs"].as_array().unwrap() {
            assert_eq!(r["verified"], true, "{cpu}: {r}");
            let facts = r["cpu_facts"].as_object().unwrap();
            assert_eq!(facts.len(), 4, "{facts:?}");
            for (k, v) in facts {
                assert_eq!(v.as_bool(), Some(k != fact), "{cpu}: {k}");
            }
        }
    }
    let doc = run_json(&["x86-stub"]);
    assert_eq!(
        doc["runs"][0]["cpu_facts"],
        serde_json::json!({"nx": true, "fxsr": true, "sysenter": true, "syscall": true})
    );
}

#[test]
fn decode_rebuilds_the_host_and_the_cpu_facts_from_the_boot_line() {
    let Some(q) = support::qemu() else {
        return;
    };
    let dir = std::env::temp_dir();
    let img = dir.join(format!("ws-hosts-{}.bin", std::process::id()));
    let o = ws(&[
        "image",
        "amd64-to-pae",
        "--out",
        img.to_str().unwrap(),
        "--round-trips",
        "3",
        "--host-cr4",
        "today",
        "--cpu",
        "max,-sep",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("-cpu max,-sep"));
    let cfg = integration::qemu::QemuConfig {
        cpu: Some("max,-sep".into()),
        ..q
    };
    let serial = boot_serial(&img, &cfg);
    let _ = std::fs::remove_file(&img);
    let doc = decode_json(&serial);
    let r = &doc["runs"][0];
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["host_cr4"], "today");
    assert_eq!(r["cpu_facts"]["sysenter"], false);
    assert_eq!(r["cpu_facts"]["nx"], true);
}

#[test]
fn bad_host_combinations_are_one_line_errors() {
    for (args, words) in [
        (
            vec!["run", "pae-to-pae", "--host-cr4", "today"],
            vec!["--host-cr4 today needs an AMD64 host", "pae-to-pae", "PAE"],
        ),
        (
            vec![
                "run",
                "amd64-to-32",
                "--host-cr4",
                "today",
                "--cpu",
                "qemu64",
            ],
            vec!["--host-cr4 today needs a CPU with smep", "qemu64", "+smep"],
        ),
        (
            vec![
                "image",
                "32-to-32",
                "--out",
                "/dev/null",
                "--host-apic",
                "x2apic",
                "--cpu",
                "qemu64",
            ],
            vec!["--host-apic x2apic needs a CPU with x2apic", "+x2apic"],
        ),
    ] {
        let o = ws(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", err(&o));
        let e = err(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        for w in words {
            assert!(e.contains(w), "{args:?}: {e}");
        }
    }
}

#[test]
fn list_and_show_name_the_host_options_of_each_switcher() {
    let o = ws(&["list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    for r in doc["switchers"].as_array().unwrap() {
        let opts: Vec<&str> = r["host_options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(opts.contains(&"--host-apic x2apic"), "{r}");
        assert!(opts.contains(&"--cpu qemu64,-sep"), "{r}");
        let today = opts.contains(&"--host-cr4 today");
        assert_eq!(today, r["host_mode"] == "AMD64", "{r}");
    }
    let o = ws(&["show", "amd64-to-amd64"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("--host-cr4 today"));
}
