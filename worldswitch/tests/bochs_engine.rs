//! `run --engine bochs`: the second engine as a user runs it.
//!
//! The boots skip loudly when Bochs is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../integration/tests/support/mod.rs"]
mod support;

use std::process::{Command, Output};

use integration::bochs::BOCHS_INSTALL_HINT;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_worldswitch");

fn ws(args: &[&str], path: Option<&str>) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    if let Some(p) = path {
        c.env("PATH", p);
    }
    c.output().unwrap()
}

fn one_line_error(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

#[test]
fn without_bochs_the_error_names_the_install_command() {
    let empty = std::env::temp_dir().join(format!("ws-no-bochs-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let o = ws(
        &["run", "32-to-amd64", "--engine", "bochs"],
        Some(empty.to_str().unwrap()),
    );
    let err = one_line_error(&o);
    assert!(err.contains(BOCHS_INSTALL_HINT), "{err}");
    let _ = std::fs::remove_dir(&empty);
}

#[test]
fn qemu_only_options_and_unknown_models_are_refused() {
    for (args, want) in [
        (
            &["run", "32-to-amd64", "--bochs-cpu", "ryzen"][..],
            "--bochs-cpu ryzen needs --engine bochs",
        ),
        (
            &["run", "32-to-amd64", "--engine", "bochs", "--cost"][..],
            "--cost is for QEMU",
        ),
        (
            &["run", "32-to-amd64", "--engine", "bochs", "--cpu", "max"][..],
            "--cpu is for QEMU",
        ),
        (
            &[
                "run",
                "32-to-amd64",
                "--engine",
                "bochs",
                "--bochs-cpu",
                "p3_katmai",
            ][..],
            "\"p3_katmai\" is not one the testbed knows",
        ),
        (
            &["run", "amd64-to-pae", "--host-cr4", "today+pcid"][..],
            "--host-cr4 today+pcid needs --engine bochs: QEMU TCG does not emulate PCID",
        ),
        (
            &[
                "run",
                "amd64-to-pae",
                "--engine",
                "bochs",
                "--bochs-cpu",
                "ryzen",
                "--host-cr4",
                "today+pcid",
            ][..],
            "--host-cr4 today+pcid needs a Bochs model with PCID",
        ),
        (
            &[
                "run",
                "amd64-to-pae",
                "--engine",
                "bochs",
                "--bochs-cpu",
                "corei7_icelake_u",
                "--host-cr4",
                "today+pcid+cet",
            ][..],
            "--host-cr4 today+pcid+cet needs a Bochs model with CET",
        ),
    ] {
        let err = one_line_error(&ws(args, None));
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_bochs_run_reports_tsc_ticks_not_instructions() {
    if support::bochs().is_none() {
        return;
    }
    let o = ws(
        &[
            "run",
            "amd64-to-pae",
            "32-to-32",
            "--engine",
            "bochs",
            "--bochs-cpu",
            "ryzen",
            "--round-trips",
            "3",
            "--json",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    for r in doc["runs"].as_array().unwrap() {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["engine"], "bochs");
        assert_eq!(r["bochs_cpu"], "ryzen");
        assert!(r["instructions_to_guest"].is_null(), "{r}");
        assert!(r["tsc_ticks"]["to_guest"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["engine_faults"], Value::Array(Vec::new()));
    }
    let o = ws(
        &[
            "run",
            "amd64-to-pae",
            "--engine",
            "bochs",
            "--round-trips",
            "3",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("TSC ticks per switch"), "{text}");
    assert!(!text.contains("instructions per switch"), "{text}");
}

/// A PCIDE and CET host under Bochs: verified, and named in the JSON.
#[test]
fn a_pcid_and_cet_host_is_reported() {
    if support::bochs().is_none() {
        return;
    }
    let o = ws(
        &[
            "run",
            "amd64-to-amd64",
            "--engine",
            "bochs",
            "--host-cr4",
            "today+pcid+cet",
            "--round-trips",
            "3",
            "--json",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    for r in doc["runs"].as_array().unwrap() {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["host_cr4"], "today+pcid+cet", "{r}");
    }
}
