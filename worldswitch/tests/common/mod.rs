//! What the `worldswitch` test files share: running the program, reading
//! its output, scratch files, and the testbed's QEMU-or-skip support.

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../integration/tests/support/mod.rs"]
pub mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The program under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_worldswitch");

/// Runs the program with `args`.
pub fn ws(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Runs the program with `args`, `input` on its standard input.
pub fn ws_stdin(args: &[&str], input: &[u8]) -> Output {
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

/// Standard output as text.
pub fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Standard output of a run that must exit 0.
pub fn ok(args: &[&str]) -> String {
    let o = ws(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", err(&o));
    text(&o)
}

/// The JSON document of a run that must exit 0.
pub fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// A scratch path in this test binary's own folder of the target's tmp dir.
pub fn tmp(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let test = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("tests");
    let test = test.split('-').next().unwrap_or(test);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("worldswitch-{test}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Boots `image` under QEMU as `cfg` says and returns what it sent to COM1.
pub fn boot_serial(image: &std::path::Path, cfg: &integration::qemu::QemuConfig) -> Vec<u8> {
    Command::new(integration::qemu::QEMU_BINARY)
        .args(cfg.args(image))
        .output()
        .unwrap()
        .stdout
}

/// The JSON report of `decode --json` on `serial`, which must exit 0.
pub fn decode_json(serial: &[u8]) -> serde_json::Value {
    let o = ws_stdin(&["decode", "--json"], serial);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The CLI names of the switchers this build provides.
pub fn available() -> Vec<&'static str> {
    vmm_switcher::SwitcherKind::ALL
        .into_iter()
        .filter(|k| vmm::AVAILABLE.contains(k))
        .map(vmm_switcher::SwitcherKind::cli_name)
        .collect()
}
