//! AMD64 hosts with CR4.PCIDE and a PCID in CR3, and with CR4.CET, which
//! QEMU's TCG does not emulate: every AMD64-host switcher, every revision,
//! on Bochs' Tiger Lake with today's CR4 plus PCIDE (plus CET). Switchers
//! patched to break the order PCIDE or CET demands fail, with Bochs naming
//! the rule.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use integration::bochs::{model_facts, BochsConfig, DEFAULT_CPU};
use integration::qemu::Outcome;
use integration::scenario::{build, judge, HostCr4, Scenario};
use vmm_switcher::templates::Revision;
use vmm_switcher::{SideMode, SwitcherKind};

/// The Bochs model with PCID (and today's CR4 features) the tests boot.
const CPU: &str = "tigerlake";

fn config() -> Option<BochsConfig> {
    let cfg = support::bochs()?;
    Some(BochsConfig {
        cpu: CPU.into(),
        ..cfg
    })
}

fn scenario(kind: SwitcherKind, rev: Revision, cr4: HostCr4) -> Scenario {
    let mut s = Scenario::new(kind);
    s.options.revision = rev;
    s.trips = 3;
    s.cpu = model_facts(CPU, kind.host()).unwrap();
    s.host_cr4 = cr4;
    s
}

fn amd64_host_kinds() -> impl Iterator<Item = SwitcherKind> {
    SwitcherKind::ALL
        .into_iter()
        .filter(|k| k.host() == SideMode::Amd64)
}

#[test]
fn every_amd64_host_switcher_on_a_pcid_host() {
    every_amd64_host_switcher_on(HostCr4::TodayPcid);
}

#[test]
fn every_amd64_host_switcher_on_a_pcid_and_cet_host() {
    every_amd64_host_switcher_on(HostCr4::TodayPcidCet);
}

fn every_amd64_host_switcher_on(cr4: HostCr4) {
    let Some(cfg) = config() else { return };
    assert!(integration::bochs::PCID_MODELS.contains(&CPU) && CPU == DEFAULT_CPU);
    assert!(integration::bochs::CET_MODELS.contains(&CPU));
    let cet = if cr4.cet() {
        integration::hostkernel::CR4_CET as u32
    } else {
        0
    };
    let mut bad = Vec::new();
    for rev in Revision::ALL {
        for kind in amd64_host_kinds() {
            let s = scenario(kind, rev, cr4);
            let b = build(&s).unwrap_or_else(|e| panic!("{}: {e}", kind.cli_name()));
            let run = integration::bochs::run_image(&b.testbed.image, &cfg).unwrap();
            let faults = run.stderr.clone();
            let r = judge(&s, &b, run);
            // The host really ran with PCIDE and its PCID (the HOST line),
            // and came back with both (the cr3/cr4 snapshot items).
            let host = r.run.report.host.clone().expect("HOST line");
            // The BOOT line carries the configuration: decode rebuilds it.
            let boot = r.run.report.boot.as_ref().expect("BOOT line");
            assert_eq!(Scenario::from_boot(boot).unwrap().host_cr4, cr4);
            let want = cpum::regs::Cr4::PCIDE.bits() as u32 | cet;
            if !(r.verified && r.run.outcome == Outcome::Pass)
                || host.cr4 & want != want
                || u64::from(host.cr3 & 0xfff) != integration::hostkernel::HOST_PCID
            {
                bad.push(format!(
                    "{} rev {rev:?}: {:?} {:?} cr3={:#x} cr4={:#x} {faults}",
                    kind.cli_name(),
                    r.run.outcome,
                    r.failures,
                    host.cr3,
                    host.cr4
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Replaces every occurrence of `from` in `image` with `to` (the core code
/// holds every switcher of the host's family, the one running among them).
fn patch_all(image: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let hits: Vec<usize> = image
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty(), "pattern {from:02x?} not in the image");
    for at in hits {
        image[at..at + from.len()].copy_from_slice(to);
    }
}

/// Runs `kind` with `patch` applied to its image; returns the Bochs log
/// lines after asserting the run failed.
fn broken_run(
    kind: SwitcherKind,
    cr4: HostCr4,
    cfg: &BochsConfig,
    patch: impl Fn(&mut [u8]),
) -> String {
    let s = scenario(kind, Revision::C, cr4);
    let mut b = build(&s).unwrap();
    patch(&mut b.testbed.image);
    let run = integration::bochs::run_image(&b.testbed.image, cfg).unwrap();
    let faults = run.stderr.clone();
    eprintln!("{} (broken): {:?}\n{faults}", kind.cli_name(), run.outcome);
    let r = judge(&s, &b, run);
    assert!(
        !r.verified && r.run.outcome != Outcome::Pass,
        "{}: the broken switcher passed",
        kind.cli_name()
    );
    faults
}

/// The hyper CR4 the AMD64→legacy switchers write in long mode keeps the
/// host's PCIDE (the mask of kept host bits, `and ecx, 0x2070`, gets bit
/// 17): clearing CR0.PG with CR4.PCIDE = 1 is then a #GP, which QEMU does
/// not model.
#[test]
fn pcide_kept_into_the_legacy_context_fails() {
    let Some(cfg) = config() else { return };
    for kind in [SwitcherKind::Amd64To32, SwitcherKind::Amd64ToPae] {
        let faults = broken_run(kind, HostCr4::TodayPcid, &cfg, |img| {
            patch_all(
                img,
                &[0x81, 0xe1, 0x70, 0x20, 0x00, 0x00],
                &[0x81, 0xe1, 0x70, 0x20, 0x02, 0x00],
            );
        });
        assert!(faults.contains("PCIDE"), "{}: {faults}", kind.cli_name());
    }
}

/// The exit restores CR4 (with PCIDE) while CR3 still holds the host's
/// PCID (the `and rcx, -0x1000` dropping it is NOPed): setting PCIDE with
/// CR3[11:0] ≠ 0 is a #GP.
#[test]
fn pcide_set_with_a_pcid_in_cr3_fails() {
    let Some(cfg) = config() else { return };
    for kind in [
        SwitcherKind::Amd64To32,
        SwitcherKind::Amd64ToPae,
        SwitcherKind::Amd64ToAmd64,
    ] {
        let faults = broken_run(kind, HostCr4::TodayPcid, &cfg, |img| {
            patch_all(img, &[0x48, 0x81, 0xe1, 0x00, 0xf0, 0xff, 0xff], &[0x90; 7]);
        });
        assert!(faults.contains("PCIDE"), "{}: {faults}", kind.cli_name());
    }
}

/// The hyper CR4 keeps the host's CET (the kept mask gets bit 23), so the
/// hyper CR0 written next, with WP clear, is a #GP: CR0.WP cannot be
/// cleared while CR4.CET = 1.
#[test]
fn cet_kept_while_wp_is_cleared_fails() {
    let Some(cfg) = config() else { return };
    for kind in [
        SwitcherKind::Amd64To32,
        SwitcherKind::Amd64ToPae,
        SwitcherKind::Amd64ToAmd64,
    ] {
        let faults = broken_run(kind, HostCr4::TodayPcidCet, &cfg, |img| {
            patch_all(
                img,
                &[0x81, 0xe1, 0x70, 0x20, 0x00, 0x00],
                &[0x81, 0xe1, 0x70, 0x20, 0x80, 0x00],
            );
        });
        assert!(faults.contains("WP"), "{}: {faults}", kind.cli_name());
    }
}
