//! Every switcher also runs under Bochs, the stricter engine: every
//! revision, on an Intel and an AMD CPU model, and the AMD64-host switchers
//! on a host with today's CR4. Bochs checks mode-transition rules QEMU's
//! TCG does not, so a switcher that breaks one fails here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use integration::bochs::{model_facts, BochsConfig, AMD_CPU, DEFAULT_CPU};
use integration::qemu::Outcome;
use integration::scenario::{build, judge, HostCr4, Scenario};
use vmm_switcher::templates::Revision;
use vmm_switcher::{SideMode, SwitcherKind};

/// Boots every scenario under Bochs on `cpu`, two at a time; returns a
/// line per scenario that was not verified.
fn run_all(scenarios: Vec<Scenario>, cfg: &BochsConfig) -> Vec<String> {
    let verdicts = support::in_parallel(scenarios, |s| {
        let b = build(&s).unwrap_or_else(|e| panic!("{}: {e}", s.kind.cli_name()));
        let run = integration::bochs::run_image(&b.testbed.image, cfg)
            .unwrap_or_else(|e| panic!("{}: {e}", s.kind.cli_name()));
        let faults = run.stderr.clone();
        let r = judge(&s, &b, run);
        let tag = format!(
            "{} rev {:?} on {} host-cr4 {}",
            s.kind.cli_name(),
            s.options.revision,
            cfg.cpu,
            s.host_cr4.name()
        );
        eprintln!("{tag}: {:?} {:?}", r.run.outcome, r.run.wall);
        (!(r.verified && r.run.outcome == Outcome::Pass))
            .then(|| format!("{tag}: {:?} {:?} {faults}", r.run.outcome, r.failures))
    });
    verdicts.into_iter().flatten().collect()
}

fn scenario(kind: SwitcherKind, rev: Revision, cpu: &str) -> Scenario {
    let mut s = Scenario::new(kind);
    s.options.revision = rev;
    s.trips = 3;
    s.cpu = model_facts(cpu, kind.host()).unwrap();
    s
}

#[test]
fn every_switcher_every_revision_on_an_intel_and_an_amd_model() {
    let Some(base) = support::bochs() else { return };
    let mut bad = Vec::new();
    for cpu in [DEFAULT_CPU, AMD_CPU] {
        let cfg = BochsConfig {
            cpu: cpu.into(),
            ..base.clone()
        };
        let scenarios = Revision::ALL
            .into_iter()
            .flat_map(|rev| SwitcherKind::ALL.map(|k| scenario(k, rev, cpu)))
            .collect();
        bad.extend(run_all(scenarios, &cfg));
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn amd64_host_switchers_on_todays_cr4() {
    let Some(cfg) = support::bochs() else { return };
    let scenarios = Revision::ALL
        .into_iter()
        .flat_map(|rev| {
            SwitcherKind::ALL
                .into_iter()
                .filter(|k| k.host() == SideMode::Amd64)
                .map(move |k| {
                    let mut s = scenario(k, rev, DEFAULT_CPU);
                    s.host_cr4 = HostCr4::Today;
                    s
                })
        })
        .collect();
    let bad = run_all(scenarios, &cfg);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The boot loader enters the kernel the way multiboot does: the `BOOT`
/// line shows EAX = 0x2BADB002, and the transcript is the same from run to
/// run.
#[test]
fn multiboot_entry_and_a_deterministic_transcript() {
    let Some(cfg) = support::bochs() else { return };
    let s = scenario(SwitcherKind::PaeToAmd64, Revision::C, DEFAULT_CPU);
    let b = build(&s).unwrap();
    let one = integration::bochs::run_image(&b.testbed.image, &cfg).unwrap();
    let two = integration::bochs::run_image(&b.testbed.image, &cfg).unwrap();
    assert!(
        one.transcript().contains("mbeax=2badb002"),
        "{}",
        one.transcript()
    );
    assert_eq!(one.transcript(), two.transcript());
    assert!(one.stderr.is_empty(), "Bochs complained: {}", one.stderr);
}
