//! The seed's switchers (32-bit → AMD64 and PAE → AMD64) executed for real
//! under QEMU: both unmask revisions, every build option, a non-default
//! placement, determinism, and a mutation check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::{assert_caught, Caught};

use integration::farside::{hyper, intermediate_amd64};
use integration::qemu::{Outcome, QemuConfig};
use integration::scenario::{run, Mutation, Scenario, ScenarioResult};
use vmm::Placement;
use vmm_switcher::templates::{Revision, Step};
use vmm_switcher::{HcAddr, PhysAddr, RcAddr, SwitcherKind};

const KINDS: [SwitcherKind; 2] = [SwitcherKind::Legacy32ToAmd64, SwitcherKind::PaeToAmd64];

fn go(s: &Scenario, q: &QemuConfig) -> ScenarioResult {
    let r = run(s, q).unwrap_or_else(|e| panic!("{} setup: {e}", s.kind.cli_name()));
    eprintln!(
        "{} rev {:?} {:?}: {} trips, to_gc {:?} to_hc {:?} round trip {:?}..{:?}",
        s.kind.cli_name(),
        s.options.revision,
        r.outcome,
        r.round_trips,
        r.instructions_to_guest,
        r.instructions_to_host,
        r.instructions_per_round_trip,
        r.instructions_per_round_trip_max
    );
    r
}

/// Every VCPU's `ret_code` (`/VMM/CPUn/RetCode`) holds what the far side
/// returned on its last trip: `last(vcpu)`.
fn assert_ret_codes(r: &ScenarioResult, last: impl Fn(u32) -> u32) {
    assert!(!r.cpumcpu.is_empty(), "no CPUM dump");
    let n = u32::try_from(r.cpumcpu.len()).unwrap();
    let st = vmm::stats::VmStats::new(n).unwrap();
    let backing = st.backing(r.vm_image.as_deref().unwrap());
    for (i, c) in (0u32..).zip(&r.cpumcpu) {
        assert_eq!(c.ret_code, last(i), "VCPU {i} RetCode");
        let id = st.registry.find(&format!("/VMM/CPU{i}/RetCode")).unwrap();
        assert_eq!(
            st.registry.value(id, &backing).unwrap(),
            stam::Value::Unsigned(u64::from(last(i)))
        );
    }
}

/// The status a verified run's far side returns on the last trip of `vcpu`.
fn last_cookie(s: &Scenario, xor: u32) -> impl Fn(u32) -> u32 {
    let trips = s.trips;
    move |vcpu| integration::hostkernel::cookie(trips - 1, vcpu) ^ xor
}

#[test]
fn both_switchers_both_revisions_thousand_trips_two_vcpus_deterministic() {
    let Some(q) = support::qemu() else { return };
    for kind in KINDS {
        for revision in Revision::ALL {
            let mut s = Scenario::new(kind);
            s.options.revision = revision;
            s.trips = 1000;
            s.vcpus = 2;
            let a = go(&s, &q);
            assert!(a.verified, "{}: {:?}", kind.cli_name(), a.failures);
            assert_eq!(a.round_trips, 2000);
            let vm = a.vm.unwrap();
            assert_eq!(vm.stat_switcher_to_gc.core.periods, 2000);
            assert_eq!(vm.stat_switcher_to_hc.core.periods, 2000);
            assert!(vm.stat_switcher_to_gc.core.ticks_min <= vm.stat_switcher_to_gc.core.ticks_max);
            for c in &a.cpumcpu {
                assert_eq!(
                    c.apic_dis_vectors, 0x7,
                    "THERM was masked on purpose and must stay out of the set"
                );
            }
            assert_ret_codes(&a, last_cookie(&s, intermediate_amd64::RET_XOR));
            // The VM's STAM registry reads the same profiles from the dumped image.
            let st = vmm::stats::VmStats::new(2).unwrap();
            let image = a.vm_image.as_deref().unwrap();
            let snap = st
                .registry
                .snapshot("/VMM/Switcher/*", &st.backing(&st.with_totals(image)))
                .unwrap();
            for sv in &snap.samples {
                match &sv.value {
                    stam::Value::Profile { periods, ticks, .. } => {
                        assert_eq!(*periods, 2000, "{}", sv.name);
                        assert!(*ticks > 2000 * 50, "{}: {ticks} ticks", sv.name);
                    }
                    v => panic!("{}: {v:?}", sv.name),
                }
            }
            let mb = a.mailbox.unwrap();
            assert_eq!(mb.calls, 2000);
            assert_eq!(
                mb.lvt.map(|v| v & 0x1_0000),
                [0x1_0000; 4],
                "all four NMI LVTs read masked in the far world"
            );
            assert_eq!(mb.cs, u32::from(vmm::layout::sel::CS64));
            assert_ne!(mb.efer & 0x400, 0, "EFER.LMA");
            // Identical instruction counts and transcript across two runs.
            let b = go(&s, &q);
            assert_eq!(a.run.serial, b.run.serial);
            assert_eq!(
                (
                    a.instructions_to_guest,
                    a.instructions_to_host,
                    a.instructions_per_round_trip
                ),
                (
                    b.instructions_to_guest,
                    b.instructions_to_host,
                    b.instructions_per_round_trip
                )
            );
        }
    }
}

#[test]
fn non_default_placement() {
    let Some(q) = support::qemu() else { return };
    for kind in KINDS {
        let mut s = Scenario::new(kind);
        s.placement = Placement {
            code_hc: HcAddr(0xd123_4000),
            code_phys: PhysAddr(0x0070_0000),
            hma_rc: RcAddr(0x8800_0000),
            hma_hc: HcAddr(0xd200_0000),
            hma_phys: PhysAddr(0x0080_0000),
            tables_phys: PhysAddr(0x0090_0000),
        };
        s.vcpus = 3;
        s.trips = 1000;
        let r = go(&s, &q);
        assert!(r.verified, "{}: {:?}", kind.cli_name(), r.failures);
        assert_eq!(r.round_trips, 3000);
        assert_eq!(r.vm.unwrap().vm_rc, 0x8800_0000);
    }
}

#[test]
fn every_option_is_honoured() {
    let Some(q) = support::qemu() else { return };
    let kind = SwitcherKind::Legacy32ToAmd64;
    // Statistics off: no profile is touched.
    let mut s = Scenario::new(kind);
    s.trips = 20;
    s.options.stats = false;
    let r = go(&s, &q);
    assert!(r.verified, "{:?}", r.failures);
    let vm = r.vm.unwrap();
    assert_eq!(vm.stat_switcher_to_gc.core.periods, 0);
    assert_eq!(r.instructions_to_guest, None);
    // APIC masking off: LVTs stay unmasked in the far world, no vectors recorded.
    let mut s = Scenario::new(kind);
    s.trips = 20;
    s.options.apic_nmi_masking = false;
    let r = go(&s, &q);
    assert!(r.verified, "{:?}", r.failures);
    let mb = r.mailbox.unwrap();
    assert_eq!(mb.expect & intermediate_amd64::expect::APIC, 0);
    assert!(r.cpumcpu.iter().all(|c| c.apic_dis_vectors == 0));
    // Tracing: every step in order, ending at Return.
    let mut s = Scenario::new(kind);
    s.trips = 3;
    s.options.trace = true;
    let r = go(&s, &q);
    assert!(r.verified, "{:?}", r.failures);
    assert_eq!(r.last_step, Some(Step::Return));
    let trace = r.run.report.trace.clone();
    let one: String = vmm_switcher::templates::legacy_amd64::trace_steps(&s.options)
        .iter()
        .map(|st| st.ch() as char)
        .collect();
    assert_eq!(trace.matches(&one).count(), 6, "trace {trace:?}");
    // Crash markers: the last HC marker (10) and the last paging-off marker (5).
    let mut s = Scenario::new(kind);
    s.trips = 3;
    s.options.crash_markers = true;
    let r = go(&s, &q);
    assert!(r.verified, "{:?}", r.failures);
    assert!(r.cpumcpu.iter().all(|c| c.guest.dr[4] == 10));
    assert_eq!(r.scratch_marker, Some(5));
}

#[test]
fn mutation_check_catches_broken_switchers() {
    let Some(q) = support::qemu() else { return };
    let cases: [(SwitcherKind, Mutation, &Caught); 7] = [
        (
            SwitcherKind::Legacy32ToAmd64,
            Mutation::TssBusyNotCleared,
            &|r| matches!(&r.run.outcome, Outcome::HostException(Some(e)) if e.vector == 13),
        ),
        (
            SwitcherKind::PaeToAmd64,
            Mutation::HostEbxNotRestored,
            &|r| {
                r.run.outcome == Outcome::VerificationFailed
                    && r.run.report.mismatch_names().contains(&"ebx")
            },
        ),
        (
            SwitcherKind::Legacy32ToAmd64,
            Mutation::LvtNotUnmasked,
            &|r| {
                r.run.outcome == Outcome::VerificationFailed
                    && r.run.report.mismatch_names().contains(&"lvt_lint0")
            },
        ),
        (SwitcherKind::Legacy32ToAmd64, Mutation::PaeLeftOn, &|r| {
            r.run.outcome == Outcome::TripleFault
        }),
        (SwitcherKind::PaeToAmd64, Mutation::FpuNotSynced, &|r| {
            r.run.outcome == Outcome::VerificationFailed
                && r.failures
                    .iter()
                    .any(|f| f.contains("fcw") || f.contains("xmm0"))
        }),
        (
            SwitcherKind::Legacy32ToAmd64,
            Mutation::DisVectorsNotCleared,
            &|r| {
                r.run.outcome == Outcome::VerificationFailed
                    && r.failures.iter().any(|f| f.contains("dis-vectors"))
            },
        ),
        (SwitcherKind::PaeToAmd64, Mutation::LvtNotUnmasked, &|r| {
            r.run.outcome == Outcome::VerificationFailed
                && r.run.report.mismatch_names().contains(&"lvt_lint0")
        }),
    ];
    assert_caught(&cases, &q);
    // A mutation that has no target in this switcher is a typed error.
    let mut s = Scenario::new(SwitcherKind::PaeToAmd64);
    s.mutation = Some(Mutation::PaeLeftOn);
    assert!(matches!(
        run(&s, &q),
        Err(integration::scenario::ScenarioError::MutationNotApplicable { .. })
    ));
}

const RC_KINDS: [SwitcherKind; 4] = [
    SwitcherKind::Legacy32To32,
    SwitcherKind::Legacy32ToPae,
    SwitcherKind::PaeTo32,
    SwitcherKind::PaeToPae,
];

#[test]
fn pae_and_32bit_family_thousand_trips_both_revisions() {
    let Some(q) = support::qemu() else { return };
    for kind in RC_KINDS {
        for revision in Revision::ALL {
            let mut s = Scenario::new(kind);
            s.options.revision = revision;
            let r = go(&s, &q);
            assert!(
                r.verified,
                "{} rev {revision:?}: {:?}",
                kind.cli_name(),
                r.failures
            );
            assert_eq!(r.round_trips, 2000);
            let mb = r.rc_mailbox.unwrap();
            assert_eq!(mb.calls, 2000, "the RC code ran every trip");
            assert!(
                mb.c_exits > 500 && mb.c_exits < 1500,
                "both exits used: {} C exits",
                mb.c_exits
            );
            assert_eq!(mb.nm_count, 1000, "one lazy-FPU trap per FPU trip");
            assert_eq!(mb.sysenter_cs, 0, "SYSENTER_CS parked while away");
            assert_eq!(mb.efer & 1, 0, "EFER.SCE cleared while away");
            assert_eq!(mb.lvt.map(|v| v & 0x1_0000), [0x1_0000; 4]);
            let pae = matches!(kind, SwitcherKind::Legacy32ToPae | SwitcherKind::PaeToPae);
            assert_eq!(mb.cr4 & 0x20 != 0, pae, "hyper paging flavour");
            for (i, c) in r.cpumcpu.iter().enumerate() {
                // The RC code's CR3 is Hyper.cr3, not the intermediate context.
                assert_eq!(u64::from(mb.cr3), c.hyper.cr3);
                assert_eq!(c.apic_dis_vectors, 0x7);
                // Its trip counter survived every exit and entry: 1000 trips.
                assert_eq!(c.guest.r[0], 1000, "vcpu {i}");
                assert_eq!(c.hyper.rbp, u64::from(hyper::ebp_magic(i as u32)));
            }
            assert_ret_codes(&r, last_cookie(&s, hyper::RET_XOR));
            let vm = r.vm.unwrap();
            assert_eq!(vm.stat_switcher_to_gc.core.periods, 2000);
            assert_eq!(vm.stat_switcher_to_hc.core.periods, 2000);
        }
    }
}

#[test]
fn call_trampoline_returns_the_target_value() {
    let Some(q) = support::qemu() else { return };
    for (kind, args) in [
        (SwitcherKind::Legacy32To32, vec![]),
        (SwitcherKind::Legacy32ToPae, vec![7]),
        (SwitcherKind::PaeTo32, vec![1, 2, 3]),
        (
            SwitcherKind::PaeToPae,
            vec![0xdead, 0xbeef, 3, 4, 5, 0xffff_ffff],
        ),
    ] {
        let mut s = Scenario::new(kind);
        s.trips = 50;
        s.trampoline_args = Some(args.clone());
        let r = go(&s, &q);
        assert!(r.verified, "{} {args:?}: {:?}", kind.cli_name(), r.failures);
        let want = hyper::target_result(&args);
        assert!(
            r.run.report.trips.iter().all(|t| t.ret == want),
            "{:?}",
            r.run.report.trips
        );
        assert_ret_codes(&r, |_| want);
    }
    // Not for the long-mode family, and not with too many arguments.
    let mut s = Scenario::new(SwitcherKind::PaeToAmd64);
    s.trampoline_args = Some(vec![1]);
    assert!(matches!(
        run(&s, &q),
        Err(integration::scenario::ScenarioError::NoTrampoline(_))
    ));
    let mut s = Scenario::new(SwitcherKind::PaeToPae);
    s.trampoline_args = Some(vec![0; 7]);
    assert!(matches!(
        run(&s, &q),
        Err(integration::scenario::ScenarioError::TooManyArgs(7))
    ));
}

#[test]
fn mutation_check_pae_and_32bit_family() {
    let Some(q) = support::qemu() else { return };
    let cases: [(SwitcherKind, Mutation, &Caught); 6] = [
        (
            SwitcherKind::Legacy32To32,
            Mutation::HostFpuNotRestored,
            &|r| {
                r.run.outcome == Outcome::VerificationFailed
                    && r.failures.iter().any(|f| f.contains("host FPU"))
            },
        ),
        (
            SwitcherKind::PaeToPae,
            Mutation::SysenterCsNotRestored,
            &|r| {
                r.run.outcome == Outcome::VerificationFailed
                    && r.run.report.mismatch_names().contains(&"sysenter_cs")
            },
        ),
        (
            SwitcherKind::Legacy32ToPae,
            Mutation::HyperTssBusyNotCleared,
            &|r| matches!(&r.run.outcome, Outcome::FarException(Some(e)) if e.vector == 13),
        ),
        (SwitcherKind::PaeTo32, Mutation::HyperCr3NotLoaded, &|r| {
            r.run.outcome == Outcome::VerificationFailed
                && r.failures.iter().any(|f| f.contains("cr3"))
        }),
        (
            SwitcherKind::Legacy32To32,
            Mutation::TssBusyNotCleared,
            &|r| matches!(&r.run.outcome, Outcome::HostException(Some(e)) if e.vector == 13),
        ),
        (SwitcherKind::PaeToPae, Mutation::LvtNotUnmasked, &|r| {
            r.run.outcome == Outcome::VerificationFailed
                && r.run.report.mismatch_names().contains(&"lvt_lint0")
        }),
    ];
    assert_caught(&cases, &q);
}

#[test]
fn pae_and_32bit_family_trace_and_options() {
    let Some(q) = support::qemu() else { return };
    use vmm_switcher::templates::legacy_pae::{trace_steps, Flavour};
    for (kind, h, t) in [
        (SwitcherKind::Legacy32ToPae, Flavour::Legacy32, Flavour::Pae),
        (SwitcherKind::PaeToPae, Flavour::Pae, Flavour::Pae),
    ] {
        let mut s = Scenario::new(kind);
        s.trips = 3;
        s.options.trace = true;
        s.options.revision = Revision::A;
        let r = go(&s, &q);
        assert!(r.verified, "{:?}", r.failures);
        let one: String = trace_steps(h, t, &s.options)
            .iter()
            .map(|st| st.ch() as char)
            .collect();
        assert_eq!(
            r.run.report.trace.matches(&one).count(),
            6,
            "{}",
            r.run.report.trace
        );
        assert_eq!(r.last_step, Some(Step::Return));
        let mut s = Scenario::new(kind);
        s.trips = 20;
        s.options.stats = false;
        s.options.apic_nmi_masking = false;
        let r = go(&s, &q);
        assert!(r.verified, "{:?}", r.failures);
        assert_eq!(r.vm.unwrap().stat_switcher_to_gc.core.periods, 0);
        assert!(r.cpumcpu.iter().all(|c| c.apic_dis_vectors == 0));
    }
}

#[test]
fn x86_stub_returns_the_stub_status_and_touches_nothing() {
    let Some(q) = support::qemu() else { return };
    let mut s = Scenario::new(SwitcherKind::X86Stub);
    s.trips = 100;
    let r = go(&s, &q);
    assert!(r.verified, "{:?}", r.failures);
    let status = vmm_switcher::templates::stub::STUB_STATUS;
    assert!(r.run.report.trips.iter().all(|t| t.ret == status));
    // A stub knows no CPUM: RetCode keeps its initial 0.
    assert_ret_codes(&r, |_| 0);
    let vm = r.vm.unwrap();
    assert_eq!(
        vm.stat_switcher_to_gc.core.periods, 0,
        "a stub switches nothing"
    );
    assert_eq!(
        r.instructions_per_round_trip,
        Some(r.instructions_per_round_trip_max.unwrap())
    );
}

#[test]
fn x2apic_option_on_an_xapic_host_takes_the_mmio_path() {
    let Some(q) = support::qemu() else { return };
    for kind in [SwitcherKind::Legacy32ToAmd64, SwitcherKind::PaeToPae] {
        for revision in Revision::ALL {
            let mut s = Scenario::new(kind);
            s.trips = 50;
            s.options.x2apic = true;
            s.options.revision = revision;
            let r = go(&s, &q);
            assert!(
                r.verified,
                "{} {revision:?}: {:?}",
                kind.cli_name(),
                r.failures
            );
            assert!(r.cpumcpu.iter().all(|c| c.apic_dis_vectors == 0x7));
        }
    }
}

#[test]
fn amd64_host_family_thousand_trips_both_revisions_and_trampoline() {
    let Some(q) = support::qemu() else { return };
    for kind in [SwitcherKind::Amd64To32, SwitcherKind::Amd64ToPae] {
        for revision in Revision::ALL {
            let mut s = Scenario::new(kind);
            s.options.revision = revision;
            assert!(
                s.placement.code_hc.0 > 0xffff_8000_0000_0000,
                "high canonical HC by default"
            );
            let r = go(&s, &q);
            assert!(
                r.verified,
                "{} rev {revision:?}: {:?}",
                kind.cli_name(),
                r.failures
            );
            assert_eq!(r.round_trips, 2000);
            let mb = r.rc_mailbox.unwrap();
            assert_eq!((mb.calls, mb.nm_count, mb.sysenter_cs), (2000, 1000, 0));
            assert_eq!(
                mb.efer & 0x500,
                0,
                "EFER.LME/LMA off in the 32-bit hypervisor context"
            );
            assert_eq!(mb.cr4 & 0x20 != 0, kind == SwitcherKind::Amd64ToPae);
            for c in &r.cpumcpu {
                assert_eq!(u64::from(mb.cr3), c.hyper.cr3);
                assert_eq!(c.guest.r[0], 1000);
            }
            assert_ret_codes(&r, last_cookie(&s, hyper::RET_XOR));
        }
        let mut s = Scenario::new(kind);
        s.trips = 20;
        s.trampoline_args = Some(vec![5, 6, 7, 8]);
        let r = go(&s, &q);
        assert!(
            r.verified,
            "{} trampoline: {:?}",
            kind.cli_name(),
            r.failures
        );
        // Host HC below 4 GiB works too (a 64-bit host may map its kernel low).
        let mut s = Scenario::new(kind);
        s.trips = 20;
        s.placement = Placement::default();
        let r = go(&s, &q);
        assert!(r.verified, "{} low HC: {:?}", kind.cli_name(), r.failures);
    }
    let mut s = Scenario::new(SwitcherKind::Amd64Stub);
    s.trips = 50;
    let r = go(&s, &q);
    assert!(r.verified, "{:?}", r.failures);
    assert!(r
        .run
        .report
        .trips
        .iter()
        .all(|t| t.ret == vmm_switcher::templates::stub::STUB_STATUS));
    // A broken AMD64-host switcher is caught: host FPU state not restored.
    assert_caught(
        &[(
            SwitcherKind::Amd64ToPae,
            Mutation::HostFpuNotRestored,
            &|r| r.failures.iter().any(|f| f.contains("host FPU")),
        )],
        &q,
    );
}

#[test]
fn amd64_to_amd64_thousand_trips_both_revisions_and_trampoline() {
    let Some(q) = support::qemu() else { return };
    for revision in Revision::ALL {
        let mut s = Scenario::new(SwitcherKind::Amd64ToAmd64);
        s.options.revision = revision;
        let r = go(&s, &q);
        assert!(r.verified, "rev {revision:?}: {:?}", r.failures);
        assert_eq!(r.round_trips, 2000);
        let mb = r.rc_mailbox.unwrap();
        assert_eq!((mb.calls, mb.nm_count, mb.sysenter_cs), (2000, 1000, 0));
        assert!(
            mb.c_exits > 500 && mb.c_exits < 1500,
            "both exits used: {} C exits",
            mb.c_exits
        );
        assert_eq!(mb.efer & 0x401, 0x400, "EFER.LMA on, SCE parked");
        assert_eq!(
            mb.tr & 0xffff,
            u32::from(vmm::layout::sel::tss(1)),
            "last trip ran on VCPU 1's TSS"
        );
        for c in &r.cpumcpu {
            assert_eq!(u64::from(mb.cr3), c.hyper.cr3 & 0xffff_ffff);
            assert_eq!(c.guest.r[0], 1000);
        }
        assert_ret_codes(&r, last_cookie(&s, hyper::RET_XOR));
    }
    for args in [vec![], vec![9], vec![1, 2, 3, 4, 5, 6]] {
        let mut s = Scenario::new(SwitcherKind::Amd64ToAmd64);
        s.trips = 20;
        s.trampoline_args = Some(args.clone());
        let r = go(&s, &q);
        assert!(r.verified, "{args:?}: {:?}", r.failures);
        let want = hyper::target_result(&args);
        assert!(r.run.report.trips.iter().all(|t| t.ret == want));
        assert_ret_codes(&r, |_| want);
    }
    // A fault in the 64-bit hypervisor context is reported through its own IDT;
    // host FPU state not restored is caught.
    assert_caught(
        &[
            (
                SwitcherKind::Amd64ToAmd64,
                Mutation::HyperTssBusyNotCleared,
                &|r| matches!(&r.run.outcome, Outcome::FarException(Some(e)) if e.vector == 13),
            ),
            (
                SwitcherKind::Amd64ToAmd64,
                Mutation::HostFpuNotRestored,
                &|r| r.failures.iter().any(|f| f.contains("host FPU")),
            ),
        ],
        &q,
    );
}

#[test]
fn every_switcher_with_the_host_apic_in_x2apic_mode() {
    let Some(q) = support::qemu_x2apic() else {
        return;
    };
    for kind in vmm::AVAILABLE {
        if matches!(kind, SwitcherKind::X86Stub | SwitcherKind::Amd64Stub) {
            continue;
        }
        for revision in Revision::ALL {
            let mut s = Scenario::new(kind);
            s.options.x2apic = true;
            s.options.revision = revision;
            s.host_x2apic = true;
            let r = go(&s, &q);
            assert!(
                r.verified,
                "{} rev {revision:?} x2APIC: {:?}",
                kind.cli_name(),
                r.failures
            );
            assert_eq!(r.round_trips, 2000);
            let seen: Vec<_> = r
                .cpumcpu
                .iter()
                .map(|c| (c.x2apic, c.apic_dis_vectors))
                .collect();
            assert!(
                seen.iter().all(|&(x, d)| x == 1 && d == 0x7),
                "{}: {seen:?}",
                kind.cli_name()
            );
            let lvts = r
                .mailbox
                .map(|m| m.lvt)
                .or(r.rc_mailbox.map(|m| m.lvt))
                .unwrap();
            assert_eq!(
                lvts.map(|v| v & 0x1_0000),
                [0x1_0000; 4],
                "masked, read through the MSRs"
            );
        }
    }
}
