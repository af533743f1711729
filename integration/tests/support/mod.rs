//! What the QEMU test files share: finding QEMU, which CI requires and a
//! local run may lack (a loud skip), a run with QEMU's interrupt log, and
//! the assertion that a mutated switcher is caught.

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code, clippy::panic)]

use integration::hostkernel::Testbed;
use integration::qemu::{find_qemu, qemu_version, QemuConfig, RunResult};
use integration::qemu::{X2APIC_CPU, X2APIC_MIN_MAJOR};
use integration::scenario::{run, Mutation, Scenario, ScenarioResult};
use vmm_switcher::SwitcherKind;

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

/// How a mutation must show up.
pub type Caught = dyn Fn(&ScenarioResult) -> bool;

/// Runs each mutated switcher for 10 trips and asserts that the testbed
/// rejects it the way `caught` describes.
pub fn assert_caught(cases: &[(SwitcherKind, Mutation, &Caught)], q: &QemuConfig) {
    for &(kind, m, caught) in cases {
        let mut s = Scenario::new(kind);
        s.trips = 10;
        s.mutation = Some(m);
        let r = run(&s, q).unwrap_or_else(|e| panic!("{m} on {}: setup: {e}", kind.cli_name()));
        eprintln!(
            "{m} on {}: {:?} {:?}",
            kind.cli_name(),
            r.run.outcome,
            r.failures
        );
        assert!(!r.verified, "{m} on {} was not caught", kind.cli_name());
        assert!(
            caught(&r),
            "{m} on {}: wrong outcome {:?} {:?}",
            kind.cli_name(),
            r.run.outcome,
            r.failures
        );
    }
}

/// The default Bochs configuration, or `None` (skip) if Bochs is missing.
pub fn bochs() -> Option<integration::bochs::BochsConfig> {
    match integration::bochs::find_bochs() {
        Ok(_) => Some(integration::bochs::BochsConfig::default()),
        Err(e) => {
            skip(&e.to_string());
            None
        }
    }
}

/// Applies `f` to every item, two at a time (one per core of the machine
/// the suite is sized for); the results come back in the items' order.
pub fn in_parallel<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let next = std::sync::Mutex::new(items.into_iter().enumerate());
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| loop {
                let item = next.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some((i, t)) = item else { break };
                let r = f(t);
                done.lock().unwrap_or_else(|e| e.into_inner()).push((i, r));
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|d| d.0);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Runs every named scenario on its CPU model, two at a time; results in
/// order, each printed as it ends.
pub fn run_on_models(
    cases: Vec<(String, Scenario, integration::cpumodel::CpuModel)>,
    q: &QemuConfig,
) -> Vec<(String, ScenarioResult)> {
    in_parallel(cases, |(name, s, model)| {
        let q = QemuConfig {
            cpu: model.qemu_arg(),
            ..q.clone()
        };
        let r = run(&s, &q).unwrap_or_else(|e| panic!("{name}: setup: {e}"));
        eprintln!("{name}: {} {:?}", r.outcome, r.failures);
        (name, r)
    })
}

/// A verified 2-trip `amd64-to-pae` run on the base host, for tests that
/// judge its transcript against a scenario that asked for more.
pub fn verified_base_run(
    q: &QemuConfig,
) -> (Scenario, integration::scenario::Built, ScenarioResult) {
    let mut s = Scenario::new(SwitcherKind::Amd64ToPae);
    s.trips = 2;
    let b = integration::scenario::build(&s).unwrap_or_else(|e| panic!("{e}"));
    let r = integration::scenario::run_built(&s, &b, q).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.verified, "{:?}", r.failures);
    (s, b, r)
}
