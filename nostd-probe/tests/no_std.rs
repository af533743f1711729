//! Builds this crate on its own with its `#[panic_handler]` (feature
//! `probe`): it compiles only if no dependency links std. The same build
//! with std turned on in one dependency (feature `leak-std`) must fail, or
//! the probe would prove nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A target directory of its own under the one this test was built in, so
/// the nested build neither waits on nor disturbs the outer one.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/<test binary>
    let target = exe.ancestors().nth(3).unwrap();
    target.join("nostd-probe")
}

fn build(features: &str) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--offline",
            "-p",
            "nostd-probe",
            "--features",
            features,
        ])
        .arg("--target-dir")
        .arg(target_dir())
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo: {e}"))
}

#[test]
fn the_no_std_crates_build_without_std_and_a_leak_is_caught() {
    let ok = build("probe");
    assert!(
        ok.status.success(),
        "a no_std dependency links std:\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let leak = build("probe,leak-std");
    let stderr = String::from_utf8_lossy(&leak.stderr);
    assert!(!leak.status.success(), "std in stam went unnoticed");
    assert!(
        stderr.contains("duplicate lang item"),
        "the leak failed for another reason:\n{stderr}"
    );
}
