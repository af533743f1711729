//! 5-level paging hosts (CR4.LA57), each run for real under QEMU: every
//! AMD64-host switcher with the core code at an HC address canonical in 57
//! bits only, with the base and today's CR4; the bad combinations refused;
//! the judge checking the host ran 5-level; 4-level hosts' code unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use integration::cpumodel::{self, CpuModel, HostConfigError};
use integration::scenario::{build, run_built, HostCr4, Scenario};
use vmm_switcher::{FixupKind, SwitcherKind};

fn la57_scenario(kind: SwitcherKind, cr4: HostCr4) -> (Scenario, CpuModel) {
    let mut s = Scenario::new(kind);
    s.trips = 20;
    s.host_cr4 = cr4;
    s.set_la57(true);
    let model = cpumodel::model_for(&s, None).unwrap();
    s.cpu = model.facts();
    (s, model)
}

#[test]
fn every_amd64_host_switcher_runs_on_a_5_level_host() {
    let Some(q) = support::qemu() else {
        return;
    };
    let mut cases = Vec::new();
    for kind in vmm::AVAILABLE {
        if !Scenario::new(kind).amd64_host() {
            continue;
        }
        for cr4 in HostCr4::ALL {
            let (s, model) = la57_scenario(kind, cr4);
            assert_eq!(s.placement.code_hc.0, integration::scenario::LA57_CODE_HC);
            assert!(!pgm_intermediate::is_canonical(s.placement.code_hc.0));
            let name = format!("{} LA57, {} CR4", kind.cli_name(), cr4.name());
            cases.push((name, s, model));
        }
    }
    assert_eq!(cases.len(), 8);
    for (name, r) in support::run_on_models(cases, &q) {
        assert!(r.verified, "{name}: {} {:?}", r.outcome, r.failures);
        assert_eq!(r.round_trips, 40, "{name}");
        let host = r.run.report.host.as_ref().unwrap();
        let la57 = cpum::regs::Cr4::LA57.bits();
        assert_eq!(
            u64::from(host.cr4) & la57,
            la57,
            "{name}: cr4 {:#x}",
            host.cr4
        );
    }
}

#[test]
fn la57_is_refused_for_32_bit_hosts_and_cpu_models_without_it() {
    let mut s = Scenario::new(SwitcherKind::PaeToPae);
    s.set_la57(true);
    let e = cpumodel::model_for(&s, None).unwrap_err();
    assert!(
        matches!(
            e,
            HostConfigError::NeedsAmd64Host {
                option: "--la57",
                ..
            }
        ),
        "{e}"
    );
    assert!(build(&s).is_err());
    let mut s = Scenario::new(SwitcherKind::Amd64ToAmd64);
    s.set_la57(true);
    let e = cpumodel::model_for(&s, Some("qemu64")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--la57 needs a CPU with la57, and the --cpu model `qemu64` has none (add +la57)"
    );
    assert!(cpumodel::model_for(&s, Some("max")).is_ok());
    assert_eq!(cpumodel::model_for(&s, None).unwrap().spec, "qemu64,+la57");
    // The image checks the CPU too: built for LA57, booted without it.
    let b = build(&s).unwrap();
    let Some(q) = support::qemu() else {
        return;
    };
    s.trips = 2;
    let r = run_built(&s, &b, &q).unwrap();
    assert!(!r.verified);
    let c = r.cpu_refusal().unwrap();
    assert_eq!((c.feature.as_str(), c.present), ("la57", false));
    assert!(r.run.report.crc_ok());
}

#[test]
fn the_judge_checks_the_host_ran_5_level() {
    let Some(q) = support::qemu() else {
        return;
    };
    let (s, b, r) = support::verified_base_run(&q);
    let mut asked = s.clone();
    asked.options.la57 = true;
    let j = integration::scenario::judge(&asked, &b, r.run.clone());
    assert!(!j.verified);
    assert!(
        j.failures.iter().any(|f| f.contains("without LA57")),
        "{:?}",
        j.failures
    );
}

#[test]
fn only_5_level_hosts_get_the_5_level_code_and_the_boot_line_names_it() {
    for kind in vmm::AVAILABLE {
        let s = Scenario::new(kind);
        if !s.amd64_host() {
            continue;
        }
        let kinds = |s: &Scenario| -> Vec<FixupKind> {
            let b = build(s).unwrap();
            let sw = b.vmm.switcher(kind).unwrap();
            sw.def.fixups.iter().map(|f| f.kind).collect()
        };
        let four = kinds(&s);
        let (five_s, _) = la57_scenario(kind, HostCr4::Base);
        let five = kinds(&five_s);
        assert!(
            !four.contains(&FixupKind::InterLa57Cr3),
            "{}",
            kind.cli_name()
        );
        if kind != SwitcherKind::Amd64Stub {
            assert!(
                five.contains(&FixupKind::InterLa57Cr3),
                "{}",
                kind.cli_name()
            );
            assert!(
                !five.contains(&FixupKind::InterAmd64Cr3),
                "{}",
                kind.cli_name()
            );
        }
        // The 4-level code is what it was: the default options build the
        // same bytes with la57 off, whatever the placement.
        let b4 = build(&s).unwrap();
        let mut s2 = s.clone();
        s2.set_la57(true);
        s2.set_la57(false);
        let b4b = build(&s2).unwrap();
        assert_eq!(
            b4.vmm.switcher(kind).unwrap().def.code,
            b4b.vmm.switcher(kind).unwrap().def.code
        );
        let fields = five_s.boot_fields();
        assert!(
            fields.iter().any(|(k, v)| k == "la57" && v == "1"),
            "{fields:?}"
        );
    }
}
