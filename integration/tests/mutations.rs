//! The deliberate breakages (`scenario::Mutation`, `worldswitch run
//! --mutate`): their command-line names, where they apply, the errors that
//! name them, and `pae-left-on` caught on the 32-bit → PAE switcher.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use integration::qemu::Outcome;
use integration::scenario::{build, mutation_name, Mutation, Scenario, ScenarioError};
use support::{assert_caught, Caught};
use vmm_switcher::SwitcherKind;

#[test]
fn every_mutation_has_a_distinct_kebab_case_name_that_reads_back() {
    for m in Mutation::ALL {
        let name = m.name();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{name}"
        );
        assert_eq!(Mutation::from_name(name), Some(m));
        assert_eq!(m.to_string(), name);
        assert_eq!(mutation_name(m), name, "the BOOT line spells it the same");
        assert_eq!(
            serde_json::to_value(m).unwrap(),
            serde_json::Value::from(name),
            "the JSON spells it the same"
        );
        assert!(!m.description().is_empty());
        assert!(!m.switchers().is_empty(), "{name} applies nowhere");
    }
    let mut names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Mutation::ALL.len());
    assert_eq!(Mutation::from_name("PaeLeftOn"), None);
    assert_eq!(Mutation::from_name(""), None);
}

/// `applies_to` is what the build finds: with the default options, every
/// switcher a mutation applies to has the instruction it breaks, and every
/// other one is refused with a typed error.
#[test]
fn mutations_build_exactly_where_they_apply() {
    for m in Mutation::ALL {
        for kind in SwitcherKind::ALL {
            let mut s = Scenario::new(kind);
            s.trips = 1;
            s.mutation = Some(m);
            let r = build(&s);
            if m.applies_to(kind) {
                if let Err(e) = r {
                    panic!("{m} on {}: {e}", kind.cli_name());
                }
            } else {
                assert!(
                    matches!(r, Err(ScenarioError::MutationNotApplicable { mutation, kind: k }) if mutation == m && k == kind),
                    "{m} on {} was not refused",
                    kind.cli_name()
                );
            }
        }
    }
}

#[test]
fn pae_left_on_applies_wherever_a_32_bit_host_turned_pae_on() {
    assert_eq!(
        Mutation::PaeLeftOn.switchers(),
        [SwitcherKind::Legacy32ToPae, SwitcherKind::Legacy32ToAmd64]
    );
}

#[test]
fn refusals_name_the_mutation_and_switchers_as_the_command_line_does() {
    let mut s = Scenario::new(SwitcherKind::PaeToAmd64);
    s.mutation = Some(Mutation::PaeLeftOn);
    let e = build(&s).unwrap_err().to_string();
    assert_eq!(
        e,
        "mutation pae-left-on does not apply to pae-to-amd64 (only to 32-to-pae, 32-to-amd64)"
    );
    // Applicable, but the options left the code out.
    let mut s = Scenario::new(SwitcherKind::PaeToPae);
    s.options.apic_nmi_masking = false;
    s.mutation = Some(Mutation::LvtNotUnmasked);
    let e = build(&s).unwrap_err();
    assert!(
        matches!(e, ScenarioError::MutationTargetMissing { .. }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "mutation lvt-not-unmasked finds nothing to break in pae-to-pae as built with these options"
    );
}

/// The 32-bit → PAE switcher's way back clears CR4.PAE in its identity
/// section before the host's 32-bit paging goes back on; left on, the
/// intermediate 32-bit tables are walked as PAE tables and the CPU
/// triple-faults.
#[test]
fn pae_left_on_is_caught_on_32_to_pae() {
    let Some(q) = support::qemu() else { return };
    let cases: [(SwitcherKind, Mutation, &Caught); 1] =
        [(SwitcherKind::Legacy32ToPae, Mutation::PaeLeftOn, &|r| {
            r.run.outcome == Outcome::TripleFault
        })];
    assert_caught(&cases, &q);
}
