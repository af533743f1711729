//! What the QEMU test files share: finding QEMU, which CI requires and a
//! local run may lack (a loud skip), and a run with QEMU's interrupt log.

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code, clippy::panic)]

use integration::hostkernel::Testbed;
use integration::qemu::{find_qemu, qemu_version, QemuConfig, RunResult};
use integration::qemu::{X2APIC_CPU, X2APIC_MIN_MAJOR};

/// Fails under `CI=true`; elsewhere prints a notice that libtest does not
/// capture, so it shows even when the skipping test passes.
fn skip(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {why}");
    }
    let notice = format!("\n!!! SKIPPING a QEMU test: {why}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), notice.as_bytes());
}

/// The default QEMU configuration, or `None` (skip) if QEMU is missing.
pub fn qemu() -> Option<QemuConfig> {
    match find_qemu() {
        Ok(_) => Some(QemuConfig::default()),
        Err(e) => {
            skip(&e.to_string());
            None
        }
    }
}

/// A configuration whose CPU model has x2APIC, or `None` (skip) if QEMU is
/// missing or too old to emulate x2APIC under TCG.
pub fn qemu_x2apic() -> Option<QemuConfig> {
    let mut q = qemu()?;
    let (major, minor, micro) = qemu_version().unwrap_or_else(|e| panic!("{e}"));
    if major < X2APIC_MIN_MAJOR {
        skip(&format!(
            "QEMU {major}.{minor}.{micro} cannot emulate x2APIC under TCG (needs {X2APIC_MIN_MAJOR} or later)"
        ));
        return None;
    }
    q.cpu = Some(X2APIC_CPU.into());
    Some(q)
}

/// Runs `tb` with QEMU's `-d int,cpu_reset,guest_errors` log in a temporary
/// file named after `tag`; returns the result and the log's text.
pub fn run_with_int_log(tb: &Testbed, tag: &str) -> (RunResult, String) {
    let log = std::env::temp_dir().join(format!("{tag}-{}.log", std::process::id()));
    let cfg = QemuConfig {
        debug_log: Some(log.clone()),
        ..QemuConfig::default()
    };
    let r = tb.run(&cfg).unwrap_or_else(|e| panic!("QEMU runs: {e}"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    (r, text)
}
