//! The NMI storm: an NMI edge at every instruction offset of the round
//! trip, for every switcher and both unmask revisions (and the x2APIC
//! masking code where QEMU emulates x2APIC). With NMI masking every run
//! passes; without it every switcher that has a hypervisor context breaks,
//! and the report names the first fatal offset — the proof that the storm
//! has teeth.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use integration::qemu::QemuConfig;
use integration::scenario::{run, Scenario, ScenarioResult};
use vmm_switcher::templates::Revision;
use vmm_switcher::SwitcherKind;

/// One VCPU; enough round trips for the storm to sweep the longest path
/// (about 500 offsets), retry the offsets only some paths reach, and end.
const TRIPS: u32 = 1500;

/// A storm scenario of `kind`.
fn storm(kind: SwitcherKind, revision: Revision, apic: bool, x2apic: bool) -> Scenario {
    let mut s = Scenario::new(kind);
    s.vcpus = 1;
    s.trips = TRIPS;
    s.nmi_storm = true;
    s.options.revision = revision;
    s.options.apic_nmi_masking = apic;
    if x2apic {
        s.options.x2apic = true;
        s.host_x2apic = true;
    }
    s
}

/// Runs every scenario, two QEMUs at a time; results in input order.
fn run_all(scenarios: Vec<Scenario>, q: &QemuConfig) -> Vec<(Scenario, ScenarioResult)> {
    support::in_parallel(scenarios, |s| {
        let r = run(&s, q).unwrap_or_else(|e| panic!("{}: {e}", s.kind.cli_name()));
        (s, r)
    })
}

fn describe(s: &Scenario, r: &ScenarioResult) -> String {
    format!(
        "{} revision {:?} apic={} x2apic={}: {:?} {:?} {:?}",
        s.kind.cli_name(),
        s.options.revision,
        s.options.apic_nmi_masking,
        s.options.x2apic,
        r.run.outcome,
        r.failures,
        r.nmi_storm
    )
}

fn assert_protected(results: &[(Scenario, ScenarioResult)]) {
    for (s, r) in results {
        let what = describe(s, r);
        eprintln!("{what}");
        assert!(r.verified, "{what}");
        let st = r.nmi_storm.as_ref().expect("a storm report");
        assert!(st.complete, "{what}");
        assert!(st.path_instructions > 0, "{what}");
        assert!(st.offsets_covered >= st.path_instructions, "{what}");
        assert_eq!(st.nmis_in_transit, 0, "{what}");
        assert_eq!(st.nmis_in_hypervisor_context, 0, "{what}");
        assert!(st.first_fatal.is_none(), "{what}");
        if s.is_stub() {
            assert_eq!(st.nmis_deferred, 0, "{what}");
        } else {
            // QEMU delivers the masked edges at the unmask.
            assert!(st.nmis_deferred > 0 && st.deferred_to.is_some(), "{what}");
        }
    }
}

#[test]
fn every_switcher_survives_the_storm_with_nmi_masking() {
    let Some(q) = support::qemu() else { return };
    let mut scenarios = Vec::new();
    for kind in vmm::AVAILABLE {
        for rev in Revision::ALL {
            scenarios.push(storm(kind, rev, true, false));
        }
    }
    assert_protected(&run_all(scenarios, &q));
}

#[test]
fn the_x2apic_masking_code_survives_the_storm() {
    let Some(q) = support::qemu_x2apic() else {
        return;
    };
    let scenarios = vmm::AVAILABLE
        .into_iter()
        .filter(|k| !matches!(k, SwitcherKind::X86Stub | SwitcherKind::Amd64Stub))
        .flat_map(|k| Revision::ALL.map(|rev| storm(k, rev, true, true)))
        .collect();
    assert_protected(&run_all(scenarios, &q));
}

/// The teeth: without NMI masking the storm breaks every switcher with a
/// hypervisor context, at a named offset; the stubs have nothing to break.
#[test]
fn without_nmi_masking_the_storm_breaks_every_family() {
    let Some(q) = support::qemu() else { return };
    let scenarios = vmm::AVAILABLE
        .into_iter()
        .map(|k| storm(k, Revision::B, false, false))
        .collect();
    for (s, r) in run_all(scenarios, &q) {
        let what = describe(&s, &r);
        eprintln!("{what}");
        let st = r.nmi_storm.as_ref().expect("a storm report");
        if s.is_stub() {
            assert!(r.verified, "{what}");
            continue;
        }
        assert!(!r.verified, "{what}");
        let fatal = st.first_fatal.as_ref().unwrap_or_else(|| panic!("{what}"));
        let offset = fatal.offset.expect("an exact storm names the fatal offset");
        // Offsets advance only while they lie inside a path.
        assert!(offset <= st.path_instructions, "{what}");
        assert_ne!(fatal.label, "?", "{what}");
        assert!(
            r.failures
                .iter()
                .any(|f| f.contains(&format!("offset {offset}"))),
            "{what}"
        );
    }
}
