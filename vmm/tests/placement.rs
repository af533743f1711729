//! Placements and configurations near the ends of the address spaces: every
//! bad one is a typed error naming the value, the same in debug and release.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use vmm::{Placement, PlacementError, Vmm, VmmConfig, VmmError};
use vmm_switcher::{HcAddr, PhysAddr, RcAddr, SwitcherKind};

fn placement_err(c: VmmConfig) -> PlacementError {
    match Vmm::new(c) {
        Err(VmmError::Placement(e)) => e,
        other => panic!("expected a placement error, got {other:?}"),
    }
}

#[test]
fn hc_base_below_2_64_whose_range_crosses_it_is_refused() {
    // A 32-bit host: the HC range must lie below 4 GiB.
    let mut c = VmmConfig::default();
    c.placement.code_hc = HcAddr(0xffff_ffff_ffef_f000);
    let e = placement_err(c);
    assert!(
        matches!(
            e,
            PlacementError::Above4G {
                what: "core-code HC",
                start: 0xffff_ffff_ffef_f000,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("0xffffffffffeff000"), "{e}");

    // An AMD64 host with the CLI's `--hc-base 0xffffffffffeff000`: the core
    // code fits, the hypervisor area 1 MiB above it (VM structure, CPUM)
    // runs past 2^64.
    let mut c = VmmConfig::amd64_host();
    c.placement.code_hc = HcAddr(0xffff_ffff_ffef_f000);
    c.placement.hma_hc = HcAddr(0xffff_ffff_ffff_f000);
    let e = placement_err(c);
    assert!(
        matches!(
            e,
            PlacementError::Wraps {
                what: "HMA HC",
                start: 0xffff_ffff_ffff_f000,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("0xfffffffffffff000"), "{e}");

    // The core code's own range crossing 2^64.
    let mut c = VmmConfig::amd64_host();
    c.placement.code_hc = HcAddr(0xffff_ffff_ffff_f000);
    assert!(matches!(
        placement_err(c),
        PlacementError::Wraps {
            what: "core-code HC",
            ..
        }
    ));
}

#[test]
fn physical_ranges_near_2_64_and_4_gib_are_refused() {
    let mut c = VmmConfig::default();
    c.placement.code_phys = PhysAddr(0xffff_ffff_ffff_f000);
    assert!(matches!(
        placement_err(c),
        PlacementError::Wraps {
            what: "core-code physical",
            ..
        }
    ));
    let mut c = VmmConfig::default();
    c.placement.hma_phys = PhysAddr(0xffff_ffff_ffff_f000);
    assert!(matches!(
        placement_err(c),
        PlacementError::Wraps {
            what: "HMA physical",
            ..
        }
    ));
    let mut c = VmmConfig::default();
    c.placement.tables_phys = PhysAddr(0xffff_f000);
    assert!(matches!(
        placement_err(c),
        PlacementError::Above4G {
            what: "intermediate tables",
            start: 0xffff_f000,
            ..
        }
    ));
    let mut c = VmmConfig::default();
    c.placement.tables_phys = PhysAddr(0xffff_ffff_ffff_f000);
    c.table_pages = u32::MAX;
    assert!(matches!(
        placement_err(c),
        PlacementError::Wraps {
            what: "intermediate tables",
            ..
        }
    ));
    // The RC window (HMA, then the core code's RC copy) must end at or below 4 GiB.
    let mut c = VmmConfig::default();
    c.placement.hma_rc = RcAddr(0xffff_f000);
    assert!(matches!(
        placement_err(c),
        PlacementError::Above4G { what: "HMA RC", .. }
    ));
}

#[test]
fn oversized_layouts_are_refused() {
    let mut c = VmmConfig::default();
    c.helper_pages = u32::MAX;
    let e = placement_err(c);
    assert!(
        matches!(
            e,
            PlacementError::LayoutTooLarge {
                what: "helper area",
                value: 0xffff_ffff
            }
        ),
        "{e:?}"
    );
    let mut c = VmmConfig::default();
    c.vcpus = u32::MAX;
    assert_eq!(placement_err(c), PlacementError::VcpuCount(u32::MAX));
    let mut c = VmmConfig::default();
    c.vcpus = 33;
    assert_eq!(placement_err(c), PlacementError::VcpuCount(33));
    // 32 VCPUs is the documented maximum and builds.
    let mut c = VmmConfig::default();
    c.vcpus = 32;
    c.placement.hma_phys = PhysAddr(0x0100_0000);
    c.placement.hma_hc = HcAddr(0xc100_0000);
    assert!(Vmm::new(c).is_ok());
}

#[test]
fn moving_the_hma_past_4_gib_is_refused_and_changes_nothing() {
    let mut vmm = Vmm::new(VmmConfig::default()).unwrap();
    let before = vmm.hma().to_vec();
    for rc in [0xffff_f000, 0xffff_1000, 0xffff_c000] {
        let e = vmm.relocate_hma(RcAddr(rc)).unwrap_err();
        assert!(
            matches!(
                e,
                VmmError::Placement(PlacementError::Above4G { what: "HMA RC", start, .. })
                    if start == u64::from(rc)
            ),
            "{e:?}"
        );
    }
    assert_eq!(vmm.hma(), &before[..]);
}

#[test]
fn trampoline_for_a_missing_vcpu_writes_nothing() {
    let mut vmm = Vmm::new(VmmConfig::default()).unwrap();
    let before = vmm.hma().to_vec();
    for index in [2, 3, 1000, u32::MAX] {
        let e = vmm
            .push_trampoline_call(SwitcherKind::PaeToPae, index, RcAddr(0xa000_9000), &[1])
            .unwrap_err();
        assert!(
            matches!(e, VmmError::NoSuchVcpu { index: i, count: 2 } if i == index),
            "{e:?}"
        );
    }
    assert_eq!(vmm.hma(), &before[..], "nothing written past the stacks");
}

#[test]
fn layout_helpers_refuse_indices_past_the_layout() {
    let l = vmm::layout::HmaLayout::new(2, 4).unwrap();
    assert_eq!(l.stack_top(1), Some(0x9000));
    assert_eq!(l.stack_top(2), None);
    assert_eq!(l.stack_top(u32::MAX), None);
    assert_eq!(l.tss_of(1), Some(0x3080));
    assert_eq!(l.tss_of(vmm::layout::MAX_VCPUS), None);
    assert_eq!(l.tss_of(u32::MAX), None);
    assert_eq!(vmm::layout::sel::tss(1), 0x30);
    assert_eq!(vmm::layout::sel::try_tss(u32::MAX), None);
    assert!(vmm::layout::HmaLayout::new(u32::MAX, 4).is_err());
    assert!(vmm::layout::HmaLayout::new(2, u32::MAX).is_err());
}

fn page_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        // Anything, aligned or not.
        any::<u64>(),
        // Page-aligned near interesting edges.
        (0u64..0x10_0000).prop_map(|p| p << 12),
        (0u64..0x400).prop_map(|p| 0xffff_ffff_u64.wrapping_sub(p << 12) & !0xfff),
        (0u64..0x400).prop_map(|p| u64::MAX.wrapping_sub(p << 12) & !0xfff),
        (0u64..0x400).prop_map(|p| (0x7fff_ffff_f000u64).wrapping_sub(p << 12)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// `Vmm::new` with random addresses and sizes returns a value or a typed
    /// error; it never panics.
    #[test]
    fn random_placements_never_panic(
        code_hc in page_addr(),
        code_phys in page_addr(),
        hma_rc in any::<u32>(),
        hma_hc in page_addr(),
        hma_phys in page_addr(),
        tables_phys in page_addr(),
        vcpus in prop_oneof![0u32..40, any::<u32>()],
        // Sizes that fit a 4 GiB view are small here: the images are real buffers.
        helper_pages in prop_oneof![0u32..16, (1u32 << 20)..],
        table_pages in prop_oneof![0u32..128, (1u32 << 20)..],
        amd64 in any::<bool>(),
        new_rc in any::<u32>(),
    ) {
        let mut c = if amd64 { VmmConfig::amd64_host() } else { VmmConfig::default() };
        c.placement = Placement {
            code_hc: HcAddr(code_hc),
            code_phys: PhysAddr(code_phys),
            hma_rc: RcAddr(hma_rc & !0xfff),
            hma_hc: HcAddr(hma_hc),
            hma_phys: PhysAddr(hma_phys),
            tables_phys: PhysAddr(tables_phys),
        };
        c.vcpus = vcpus;
        c.helper_pages = helper_pages;
        c.table_pages = table_pages;
        if let Ok(mut vmm) = Vmm::new(c) {
            let _ = vmm.relocate_hma(RcAddr(new_rc));
            let _ = vmm.relocate_hma(RcAddr(new_rc & !0xfff));
        }
    }

    /// Moving a good core's HMA to any RC address never panics, and a refused
    /// move leaves the images as they were.
    #[test]
    fn random_hma_moves_never_panic(new_rc in any::<u32>()) {
        let mut vmm = Vmm::new(VmmConfig::default()).unwrap();
        let (hma, core) = (vmm.hma().to_vec(), vmm.core_code().to_vec());
        match vmm.relocate_hma(RcAddr(new_rc)) {
            Ok(()) => prop_assert_eq!(vmm.config().placement.hma_rc, RcAddr(new_rc)),
            Err(VmmError::Placement(_)) => {
                prop_assert_eq!(vmm.hma(), &hma[..]);
                prop_assert_eq!(vmm.core_code(), &core[..]);
            }
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }
}
