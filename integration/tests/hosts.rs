//! Hosts as they are today, each a named scenario run for real under QEMU:
//! CPUs without NX, SYSENTER or SYSCALL (every switcher relocated for the
//! CPU it boots, so every relocator branch executes), and AMD64 hosts with
//! today's CR4 (SMEP, SMAP, UMIP, PKE with PKRU, FSGSBASE). Few trips each,
//! two boots at a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use integration::cpumodel::{self, CpuModel};
use integration::qemu::QemuConfig;
use integration::scenario::{build, run_built, HostCr4, Scenario};
use vmm_switcher::{FixupKind, SwitcherKind};

/// The CPU models without one of the facts, with the fact they lack.
const CPUS_WITHOUT: [(&str, &str); 3] = [
    ("qemu64,-nx", "nx"),
    ("qemu64,-sep", "sep"),
    ("qemu64,-syscall", "syscall"),
];

/// The switchers whose relocation a CPU without `fact` changes: those with
/// a `FIX_NO_SYSENTER_JMP` (`sep`) or `FIX_NO_SYSCALL_JMP` (`syscall`)
/// record, or a `FIX_EFER_OR_MASK` (`nx`: NXE left out of EFER).
fn switchers_with(fact: &str) -> Vec<SwitcherKind> {
    let kind = match fact {
        "nx" => FixupKind::EferOrMask,
        "sep" => FixupKind::NoSysenterJmp,
        _ => FixupKind::NoSyscallJmp,
    };
    vmm::AVAILABLE
        .into_iter()
        .filter(|k| {
            let s = Scenario::new(*k);
            let b = build(&s).unwrap();
            b.vmm
                .switcher(*k)
                .unwrap()
                .def
                .fixups
                .iter()
                .any(|f| f.kind == kind)
        })
        .collect()
}

#[test]
fn every_switcher_runs_on_cpus_without_nx_sysenter_or_syscall() {
    let Some(q) = support::qemu() else {
        return;
    };
    let mut cases = Vec::new();
    for (cpu, _) in CPUS_WITHOUT {
        for kind in vmm::AVAILABLE {
            let mut s = Scenario::new(kind);
            s.trips = 20;
            let model = cpumodel::model_for(&s, Some(cpu)).unwrap();
            s.cpu = model.facts();
            cases.push((format!("{} on {cpu}", kind.cli_name()), s, model));
        }
    }
    let results = support::run_on_models(cases, &q);
    for (name, r) in &results {
        assert!(r.verified, "{name}: {} {:?}", r.outcome, r.failures);
        assert_eq!(r.round_trips, 40, "{name}");
    }
    // Every relocator branch ran: each fact's switchers were relocated
    // without it and verified above.
    for (cpu, fact) in CPUS_WITHOUT {
        let kinds = switchers_with(fact);
        assert!(!kinds.is_empty(), "{fact}: no switcher depends on it");
        let names: Vec<&str> = kinds.iter().map(|k| k.cli_name()).collect();
        eprintln!("{cpu}: relocated without {fact}: {}", names.join(", "));
    }
    assert_eq!(
        switchers_with("syscall"),
        [
            SwitcherKind::Legacy32To32,
            SwitcherKind::Legacy32ToPae,
            SwitcherKind::PaeTo32,
            SwitcherKind::PaeToPae,
        ]
    );
}

#[test]
fn a_cpu_that_differs_from_the_facts_is_refused_naming_the_bit() {
    let Some(q) = support::qemu() else {
        return;
    };
    // (relocated for, booted on, the refused feature, present on the CPU)
    for (facts_of, cpu, feature, present) in [
        ("qemu64,-nx", "qemu64", "nx", true),
        ("qemu64", "qemu64,-sep", "sep", false),
        ("qemu64,-syscall", "qemu64", "syscall", true),
    ] {
        let mut s = Scenario::new(SwitcherKind::PaeToPae);
        s.trips = 2;
        s.cpu = CpuModel::parse(facts_of).facts();
        let b = build(&s).unwrap();
        let q = QemuConfig {
            cpu: Some(cpu.into()),
            ..q.clone()
        };
        let r = run_built(&s, &b, &q).unwrap();
        let what = format!("relocated for {facts_of}, run on {cpu}");
        assert!(!r.verified, "{what}");
        assert_eq!(
            r.outcome,
            "CpuUnsupported",
            "{what}: {}",
            r.run.transcript()
        );
        let c = r.cpu_refusal().unwrap();
        assert_eq!(
            (c.feature.as_str(), c.present),
            (feature, present),
            "{what}"
        );
        assert!(r.run.report.crc_ok(), "{what}");
        assert!(r.run.report.summary.is_none(), "{what}: no call was made");
    }
}

#[test]
fn amd64_host_switchers_keep_todays_cr4_pkru_and_fs_gs_bases() {
    let Some(q) = support::qemu() else {
        return;
    };
    let mut cases = Vec::new();
    for kind in vmm::AVAILABLE {
        let mut s = Scenario::new(kind);
        if !s.amd64_host() {
            // Today's CR4 is an AMD64-host scenario; elsewhere it is refused.
            s.host_cr4 = HostCr4::Today;
            assert!(
                cpumodel::model_for(&s, None).is_err(),
                "{}",
                kind.cli_name()
            );
            assert!(build(&s).is_err(), "{}", kind.cli_name());
            continue;
        }
        s.trips = 20;
        s.host_cr4 = HostCr4::Today;
        let model = cpumodel::model_for(&s, None).unwrap();
        s.cpu = model.facts();
        let b = build(&s).unwrap();
        assert!(
            b.testbed.items.iter().any(|i| i == "pkru"),
            "{}: PKRU is compared",
            kind.cli_name()
        );
        for item in ["cr4", "fs_base", "gs_base"] {
            assert!(b.testbed.items.iter().any(|i| i == item), "{item}");
        }
        cases.push((format!("{} with today's CR4", kind.cli_name()), s, model));
    }
    assert_eq!(cases.len(), 4);
    for (name, r) in support::run_on_models(cases, &q) {
        assert!(r.verified, "{name}: {} {:?}", r.outcome, r.failures);
        let host = r.run.report.host.as_ref().unwrap();
        let want = integration::hostkernel::CR4_TODAY;
        assert_eq!(
            u64::from(host.cr4) & want,
            want,
            "{name}: cr4 {:#x}",
            host.cr4
        );
    }
}

#[test]
fn a_cpu_model_without_what_the_host_needs_is_refused_before_booting() {
    let mut s = Scenario::new(SwitcherKind::Amd64ToPae);
    s.host_cr4 = HostCr4::Today;
    let e = cpumodel::model_for(&s, Some("qemu64")).unwrap_err();
    assert!(e.to_string().contains("--host-cr4 today"), "{e}");
    assert!(e.to_string().contains("smep"), "{e}");
    let mut s = Scenario::new(SwitcherKind::PaeToPae);
    s.host_x2apic = true;
    let e = cpumodel::model_for(&s, Some("qemu64,-nx")).unwrap_err();
    assert!(e.to_string().contains("x2apic"), "{e}");
    // An unknown model is left to the boot-time check.
    assert!(cpumodel::model_for(&s, Some("Skylake-Server")).is_ok());
    // The default model gets what the host needs.
    let m = cpumodel::model_for(&s, None).unwrap();
    assert_eq!(m.spec, "qemu64,+x2apic");
}

#[test]
fn the_judge_checks_the_host_ran_as_the_scenario_asks() {
    let Some(q) = support::qemu() else {
        return;
    };
    // A run on the base host, judged as if today's CR4 or an x2APIC host
    // had been asked for: the HOST line gives it away.
    let (s, b, r) = support::verified_base_run(&q);
    for (what, want) in [
        ("today", "not today's"),
        ("x2apic", "did not run in x2APIC mode"),
    ] {
        let mut asked = s.clone();
        if what == "today" {
            asked.host_cr4 = HostCr4::Today;
        } else {
            asked.host_x2apic = true;
        }
        let j = integration::scenario::judge(&asked, &b, r.run.clone());
        assert!(!j.verified, "{what}");
        assert!(
            j.failures.iter().any(|f| f.contains(want)),
            "{what}: {:?}",
            j.failures
        );
    }
}
