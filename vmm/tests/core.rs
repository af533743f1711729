//! The VMM core: layout, intermediate mappings, relocation and HMA moves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pgm_intermediate::Flavour;
use vmm::layout::{self, VM_MAGIC};
use vmm::{ExtraMapping, Placement, PlacementError, Vmm, VmmConfig, VmmError};
use vmm_switcher::{FixupKind, HcAddr, PhysAddr, RcAddr, SwitcherKind};

fn walk_all(vmm: &Vmm, virt: u64, phys: u64) {
    for f in Flavour::ALL {
        let t = vmm
            .intermediate()
            .translate(f, virt)
            .unwrap_or_else(|e| panic!("{f}: {virt:#x}: {e}"));
        assert_eq!(t.phys, phys, "{f}: {virt:#x}");
    }
}

#[test]
fn default_core_maps_every_view_and_relocates_every_switcher() {
    let vmm = Vmm::new(VmmConfig::default()).unwrap();
    let p = vmm.config().placement;
    let code_len = vmm.core_code().len() as u64;
    let hma_len = u64::from(vmm.hma_layout().size);
    for off in (0..code_len).step_by(0x1000) {
        walk_all(&vmm, p.code_hc.0 + off, p.code_phys.0 + off);
        walk_all(&vmm, p.code_phys.0 + off, p.code_phys.0 + off);
        walk_all(
            &vmm,
            u64::from(p.hma_rc.0) + hma_len + off,
            p.code_phys.0 + off,
        );
    }
    for off in (0..hma_len).step_by(0x1000) {
        walk_all(&vmm, u64::from(p.hma_rc.0) + off, p.hma_phys.0 + off);
    }
    // Nothing past the HMA's RC copy of the core code.
    let past = u64::from(p.hma_rc.0) + hma_len + code_len;
    assert!(vmm.intermediate().translate(Flavour::Long, past).is_err());

    assert_eq!(vmm.switchers().len(), vmm::available_for(32).len());
    for sw in vmm.switchers() {
        assert_eq!(sw.offset % 32, 0);
        assert_eq!(sw.reloc.applied.len(), sw.def.fixups.len());
        assert_eq!(
            sw.entries.r0_host_to_guest_hc.0,
            p.code_hc.0 + u64::from(sw.offset)
        );
        let code = sw.code(vmm.core_code());
        if sw.def.fixups.is_empty() {
            assert_eq!(
                code,
                &sw.def.code[..],
                "nothing to relocate in {:?}",
                sw.def.kind
            );
        } else {
            assert_ne!(
                code,
                &sw.def.code[..],
                "relocated bytes differ from the template"
            );
        }
        // Every intermediate CR3 written is the matching root of the context.
        for a in &sw.reloc.applied {
            let root = match a.record.kind {
                FixupKind::Inter32BitCr3 => vmm.intermediate().cr3_32(),
                FixupKind::InterPaeCr3 => vmm.intermediate().cr3_pae(),
                FixupKind::InterAmd64Cr3 => vmm.intermediate().cr3_amd64(),
                _ => continue,
            };
            assert_eq!(a.value, u64::from(root));
        }
        if !matches!(
            sw.def.kind,
            SwitcherKind::Legacy32ToAmd64 | SwitcherKind::PaeToAmd64
        ) {
            continue;
        }
        let want = match sw.def.kind {
            SwitcherKind::Legacy32ToAmd64 => vmm.intermediate().cr3_32(),
            _ => vmm.intermediate().cr3_pae(),
        };
        let kind = if sw.def.kind == SwitcherKind::Legacy32ToAmd64 {
            FixupKind::Inter32BitCr3
        } else {
            FixupKind::InterPaeCr3
        };
        let written: Vec<_> = sw
            .reloc
            .applied
            .iter()
            .filter(|a| a.record.kind == kind)
            .map(|a| a.value)
            .collect();
        assert_eq!(written, vec![u64::from(want); 2]);
    }
    let h = vmm.header();
    assert_eq!(h.magic, VM_MAGIC);
    assert_eq!(h.cpu_count, 2);
    assert_eq!(h.stat_switcher_to_gc.core.ticks_min, u64::MAX);
    for i in 0..2 {
        let c = vmm.cpumcpu(i).unwrap().shared();
        assert_eq!(c.off_cpum, vmm.vcpu_arg(i).unwrap());
        assert_eq!(
            c.hyper.gdtr.base.get(),
            u64::from(p.hma_rc.0 + vmm.hma_layout().gdt)
        );
        assert_eq!(
            c.hyper.rsp,
            u64::from(p.hma_rc.0 + vmm.hma_layout().stack_top(i).unwrap())
        );
        assert_eq!(c.hyper.lss_ss.sel, layout::sel::DS);
        assert_eq!(c.hyper.rip, u64::from(vmm.helper_area().0 .0));
    }
    assert!(matches!(
        vmm.cpumcpu(2),
        Err(VmmError::NoSuchVcpu { index: 2, count: 2 })
    ));
    let (t_base, t_bytes) = vmm.tables();
    assert_eq!(t_base, p.tables_phys);
    assert_eq!(t_bytes.len() % 4096, 0);
}

#[test]
fn moving_the_hma_re_relocates_and_remaps() {
    let mut vmm = Vmm::new(VmmConfig::default()).unwrap();
    let old = vmm.config().placement.hma_rc;
    let before: Vec<_> = vmm.switchers().iter().map(|s| s.reloc.clone()).collect();
    let new = RcAddr(0xb040_0000);
    vmm.relocate_hma(new).unwrap();
    assert!(vmm
        .intermediate()
        .translate(Flavour::Pae, u64::from(old.0))
        .is_err());
    walk_all(&vmm, u64::from(new.0), vmm.config().placement.hma_phys.0);
    let delta = u64::from(new.0 - old.0);
    for (sw, b) in vmm.switchers().iter().zip(before) {
        for (a, old) in sw.reloc.applied.iter().zip(b.applied) {
            use FixupKind as K;
            match a.record.kind {
                // RC addresses move by the delta.
                K::GcVmOff | K::GcCpumOff | K::Gc64BitCpumOff => {
                    assert_eq!(a.value, old.value + delta)
                }
                K::GcFar32 => assert_eq!(a.value & 0xffff_ffff, (old.value & 0xffff_ffff) + delta),
                // Displacements between the RC copy and the others change by it.
                K::Gc2HcNearRel | K::Gc2IdNearRel => {
                    assert_eq!(
                        a.value as u32,
                        (old.value as u32).wrapping_sub(delta as u32)
                    )
                }
                _ => assert_eq!(a.value, old.value, "{:?} must not move", a.record.kind),
            }
        }
    }
    let c = vmm.cpumcpu(0).unwrap().shared();
    assert_eq!(c.hyper.rip, u64::from(vmm.helper_area().0 .0));
    assert_eq!(vmm.header().vm_rc, new.0);
    let mut cfg = VmmConfig::default();
    cfg.placement.hma_rc = new;
    let fresh = Vmm::new(cfg).unwrap();
    assert_eq!(fresh.core_code(), vmm.core_code());
    assert_eq!(fresh.hma(), vmm.hma());
}

#[test]
fn bad_placements_are_typed_errors() {
    let bad = |f: &dyn Fn(&mut VmmConfig)| {
        let mut c = VmmConfig::default();
        f(&mut c);
        Vmm::new(c).unwrap_err()
    };
    assert!(matches!(
        bad(&|c| c.placement.code_hc = HcAddr(0xc040_0010)),
        VmmError::Placement(PlacementError::Misaligned {
            what: "core-code HC",
            addr: 0xc040_0010
        })
    ));
    assert!(matches!(
        bad(&|c| c.placement.code_phys = PhysAddr(0x1_0000_0000)),
        VmmError::Placement(PlacementError::Above4G {
            what: "core-code physical",
            ..
        })
    ));
    assert!(matches!(
        bad(&|c| c.placement.hma_phys = PhysAddr(0x0040_0000)),
        VmmError::Placement(PlacementError::Overlap {
            a: "core-code physical",
            b: "HMA physical",
            ..
        })
    ));
    assert!(matches!(
        bad(&|c| c.placement.hma_rc = RcAddr(0xc040_0000)),
        VmmError::Placement(PlacementError::Overlap {
            a: "core-code HC",
            b: "HMA RC",
            ..
        })
    ));
    assert!(matches!(
        bad(&|c| c.placement.hma_rc = RcAddr(0xffff_8000)),
        VmmError::Placement(PlacementError::Above4G { what: "HMA RC", .. })
    ));
    assert!(matches!(
        bad(&|c| c.vcpus = 0),
        VmmError::Placement(PlacementError::VcpuCount(0))
    ));
    assert!(matches!(
        bad(&|c| c.vcpus = 33),
        VmmError::Placement(PlacementError::VcpuCount(33))
    ));
    assert!(matches!(
        bad(&|c| c.extra_mappings.push(ExtraMapping {
            virt: 0xc040_0000,
            phys: 0x1000,
            len: 0x1000,
            uncached: false
        })),
        VmmError::InterMap {
            what: "extra mapping",
            ..
        }
    ));
    assert!(matches!(bad(&|c| c.table_pages = 3), VmmError::InterNew(_)));
    let msg = bad(&|c| c.placement.tables_phys = PhysAddr(0x0050_0000)).to_string();
    assert!(msg.contains("overlaps"), "{msg}");
    let mut c = VmmConfig::default();
    c.placement.code_hc = HcAddr(c.placement.code_phys.0);
    assert!(Vmm::new(c).is_ok(), "identity-mapped core code is allowed");
}

#[test]
fn non_default_placement_builds() {
    let cfg = VmmConfig {
        placement: Placement {
            code_hc: HcAddr(0xd123_4000),
            code_phys: PhysAddr(0x0234_5000),
            hma_rc: RcAddr(0x8800_0000),
            hma_hc: HcAddr(0xd200_0000),
            hma_phys: PhysAddr(0x0300_0000),
            tables_phys: PhysAddr(0x0380_0000),
        },
        vcpus: 3,
        ..VmmConfig::default()
    };
    let mut vmm = Vmm::new(cfg).unwrap();
    assert_eq!(
        vmm.switchers()[1].entries.r0_host_to_guest_hc.0,
        0xd123_4000 + u64::from(vmm.switchers()[1].offset)
    );
    walk_all(&vmm, 0xd123_4000, 0x0234_5000);
    walk_all(&vmm, 0x8800_0000, 0x0300_0000);
    assert!(matches!(
        vmm.write_helper(&vec![0x90; 0x5000]),
        Err(VmmError::HelperTooLarge {
            len: 0x5000,
            cap: 0x4000
        })
    ));
    vmm.write_helper(&[0xc3]).unwrap();
    assert_eq!(vmm.helper_area().2, 0x4000);
}

#[test]
fn stam_registry_reads_the_vm_image() {
    let vmm = Vmm::new(VmmConfig::default()).unwrap();
    let st = vmm.stam().unwrap();
    let names: Vec<String> = st.registry.iter("*").map(|i| i.name.to_string()).collect();
    assert_eq!(
        names,
        [
            "/VMM/CPU0/ApicDisVectors",
            "/VMM/CPU0/RetCode",
            "/VMM/CPU0/Switcher/ToGC",
            "/VMM/CPU0/Switcher/ToHC",
            "/VMM/CPU0/UseFlags",
            "/VMM/CPU1/ApicDisVectors",
            "/VMM/CPU1/RetCode",
            "/VMM/CPU1/Switcher/ToGC",
            "/VMM/CPU1/Switcher/ToHC",
            "/VMM/CPU1/UseFlags",
            vmm::stats::TO_GC,
            vmm::stats::TO_HC,
        ]
    );
    // A fresh VM: no period yet, min at its reset value.
    let snap = st
        .registry
        .snapshot("/VMM/Switcher/*", &st.backing(vmm.vm_image()))
        .unwrap();
    assert_eq!(snap.samples.len(), 2);
    let text = st
        .registry
        .print("/VMM/Switcher/ToGC", &st.backing(vmm.vm_image()))
        .unwrap();
    assert!(text.starts_with("/VMM/Switcher/ToGC"), "{text}");
    // Too short an image is a typed error, not a panic.
    assert!(st
        .registry
        .snapshot("*", &st.backing(&vmm.vm_image()[..100]))
        .is_err());
}

#[test]
fn amd64_host_core_maps_hc_in_long_mode_only() {
    let vmm = Vmm::new(VmmConfig::amd64_host()).unwrap();
    let p = vmm.config().placement;
    let kinds: Vec<_> = vmm.switchers().iter().map(|s| s.def.kind).collect();
    assert_eq!(kinds, vmm::AVAILABLE_AMD64_HOST);
    let t = vmm
        .intermediate()
        .translate(Flavour::Long, p.code_hc.0)
        .unwrap();
    assert_eq!(t.phys, p.code_phys.0);
    // The identity and RC views exist in every flavour; the high HC view only in long mode.
    walk_all(&vmm, p.code_phys.0, p.code_phys.0);
    walk_all(&vmm, u64::from(p.hma_rc.0), p.hma_phys.0);
    for sw in vmm.switchers() {
        assert_eq!(
            sw.entries.r0_host_to_guest_hc.0,
            p.code_hc.0 + u64::from(sw.offset)
        );
        assert_eq!(sw.reloc.applied.len(), sw.def.fixups.len());
    }
    assert!(matches!(
        vmm.switcher(SwitcherKind::PaeToPae),
        Err(vmm::mode::SelectError::Unavailable { .. })
    ));
    let mut c = VmmConfig::amd64_host();
    c.placement.code_hc = HcAddr(0x8000_0000_0000);
    assert!(matches!(
        Vmm::new(c).unwrap_err(),
        VmmError::Placement(PlacementError::NonCanonical {
            what: "core-code HC",
            ..
        })
    ));
    let mut c = VmmConfig::default();
    c.host_bits = 16;
    assert!(matches!(
        Vmm::new(c).unwrap_err(),
        VmmError::Placement(PlacementError::HostBits(16))
    ));
}

#[test]
fn trampoline_call_frame_is_pushed_on_the_hyper_stack() {
    let mut vmm = Vmm::new(VmmConfig::default()).unwrap();
    vmm.activate(SwitcherKind::PaeToPae).unwrap();
    let p = vmm.config().placement;
    let l = *vmm.hma_layout();
    let target = RcAddr(0xa000_9abc);
    let rsp = vmm
        .push_trampoline_call(SwitcherKind::PaeToPae, 1, target, &[11, 22, 33])
        .unwrap();
    assert_eq!(rsp, p.hma_rc.0 + l.stack_top(1).unwrap() - 20);
    let c = vmm.cpumcpu(1).unwrap().shared();
    assert_eq!(c.hyper.rsp, u64::from(rsp));
    assert_eq!(
        c.hyper.rip,
        u64::from(
            vmm.switcher(SwitcherKind::PaeToPae)
                .unwrap()
                .entries
                .rc_call_trampoline
                .0
        )
    );
    let at = (rsp - p.hma_rc.0) as usize;
    let words: Vec<u32> = (0..5)
        .map(|k| u32::from_le_bytes(vmm.hma()[at + 4 * k..at + 4 * k + 4].try_into().unwrap()))
        .collect();
    assert_eq!(words, vec![target.0, 12, 11, 22, 33]);
    // The other VCPU is untouched, and a too-large frame is refused.
    assert_eq!(
        vmm.cpumcpu(0).unwrap().shared().hyper.rsp,
        u64::from(p.hma_rc.0 + l.stack_top(0).unwrap())
    );
    assert!(vmm
        .push_trampoline_call(SwitcherKind::PaeToPae, 0, target, &[0; 2000])
        .is_err());
    // Activating a PAE switcher puts the hyper PAE root in Hyper.cr3.
    assert_eq!(c.hyper.cr3, u64::from(vmm.hyper_context().cr3_pae()));
}
