//! Decodes relocated switchers with iced-x86 and proves the relocation:
//! no placeholder left, every branch lands on an instruction start in the
//! intended region, absolute values equal the context's addresses and every
//! structure displacement is a layout offset.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{all_options, both, ctx, VM};
use iced_x86::{Code, FlowControl, Instruction, OpKind, Register};
use proptest::prelude::*;
use vmm_switcher::def::View;
use vmm_switcher::reloc::{field_width, patch_len};
use vmm_switcher::templates::{legacy_amd64, Revision, TemplateOptions};
use vmm_switcher::{
    relocate, FixupKind as K, HcAddr, PhysAddr, RcAddr, RelocContext, RelocError, SwitcherDef,
};

struct Decoded {
    /// (view, address) → (offset, instruction)
    by_addr: BTreeMap<(View, u64), (u32, Instruction)>,
    insns: Vec<(u32, View, u32, Instruction)>,
}

fn base(c: &RelocContext, v: View) -> u64 {
    vmm_switcher::disasm::view_base(c, v)
}

fn decode(def: &SwitcherDef, code: &[u8], c: &RelocContext) -> Decoded {
    let mut d = Decoded {
        by_addr: BTreeMap::new(),
        insns: Vec::new(),
    };
    let mut probe = code.to_vec();
    let rel = relocate(def, &mut probe, c).expect("relocates");
    for line in vmm_switcher::disasm::lines(def, code, c, &rel).expect("lists") {
        if let Some(insn) = line.insn {
            d.by_addr.insert((line.view, insn.ip()), (line.off, insn));
            d.insns.push((line.off, line.view, line.bits, insn));
        }
    }
    d
}

/// Offsets of data slots (never executed) inside the 64-bit code.
fn data_ranges(def: &SwitcherDef) -> Vec<std::ops::Range<u32>> {
    assert_eq!(def.data.len(), 4, "four pointer slots: {:?}", def.data);
    def.data.clone()
}

fn layout_offsets() -> BTreeSet<i64> {
    use cpum::layout as l;
    let mut s: BTreeSet<i64> = [
        l::HOST32_EBX,
        l::HOST32_EDI,
        l::HOST32_ESI,
        l::HOST32_EBP,
        l::HOST32_ESP,
        l::HOST32_SS,
        l::HOST32_GS,
        l::HOST32_FS,
        l::HOST32_ES,
        l::HOST32_DS,
        l::HOST32_CR0,
        l::HOST32_CR3,
        l::HOST32_CR4,
        l::HOST32_GDTR,
        l::HOST32_IDTR,
        l::HOST32_LDTR,
        l::HOST32_TR,
        l::HOST32_EFER,
        l::HOST32_EFER + 4,
        l::GUEST_FPU,
        l::HYPER_RSP,
        l::HYPER_RIP,
        l::STAT_TO_GC,
        l::STAT_TO_HC,
        l::HYPER_GDTR,
        l::HYPER_LSS_ESP,
        l::USE_FLAGS,
        l::RET_CODE,
        l::APIC_BASE,
        l::APIC_DIS_VECTORS,
        l::HOST32_GDTR + core::mem::offset_of!(cpum::regs::Xdtr32, base),
        l::X2APIC,
        // Revision C: the max-LVT byte of the APIC version read at set-up.
        l::APIC_VERSION + 2,
    ]
    .into_iter()
    .map(|x| x as i64)
    .collect();
    for n in 0..8 {
        s.insert((l::GUEST_DR + 8 * n) as i64);
    }
    // Revision C: the LVT values saved before masking.
    for n in 0..4 {
        s.insert((l::APIC_SAVED_LVT + 4 * n) as i64);
    }
    s
}

fn check(def: &SwitcherDef, o: &TemplateOptions, c: &RelocContext) {
    let mut code = def.code.clone();
    let rel = relocate(def, &mut code, c).expect("relocates");
    assert_eq!(rel.applied.len(), def.fixups.len());
    let d = decode(def, &code, c);
    let data = data_ranges(def);
    let is_data = |off: u32| data.iter().any(|r| r.contains(&off));
    let starts: BTreeSet<u32> = d
        .insns
        .iter()
        .map(|x| x.0)
        .filter(|o| !is_data(*o))
        .collect();

    // 1. No placeholder left in any field the fixups name, nor in any decoded constant.
    for f in &def.fixups {
        let w = field_width(f.kind).max(4);
        let bytes =
            &code[f.off as usize..f.off as usize + w.min(patch_len(f.kind) as usize).max(2)];
        assert!(
            bytes.iter().any(|&b| b != 0xff),
            "{:?} at {:#x} still holds a placeholder",
            f.kind,
            f.off
        );
    }
    for (off, _, _, insn) in &d.insns {
        if is_data(*off) {
            continue;
        }
        for i in 0..insn.op_count() {
            if matches!(
                insn.op_kind(i),
                OpKind::Immediate32 | OpKind::Immediate32to64
            ) {
                assert_ne!(
                    insn.immediate32(),
                    0xffff_ffff,
                    "placeholder imm at {off:#x}: {insn}"
                );
            }
        }
        assert_ne!(
            insn.memory_displacement32(),
            0xffff_ffff,
            "placeholder disp at {off:#x}"
        );
    }

    // 2. Every branch lands on an instruction start in the intended region.
    let view_of = |off: u32| def.region_of(off).map(|r| r.view);
    for (off, view, _bits, insn) in &d.insns {
        if is_data(*off) {
            continue;
        }
        match insn.flow_control() {
            FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Call
                if insn.op0_kind() == OpKind::NearBranch32
                    || insn.op0_kind() == OpKind::NearBranch64 =>
            {
                let t = insn.near_branch_target();
                let fix = def
                    .fixups
                    .iter()
                    .find(|f| f.off > *off && f.off < *off + insn.len() as u32);
                let want = match fix.map(|f| f.kind) {
                    Some(K::Hc2IdNearRel) => View::Id,
                    Some(K::Id2HcNearRel) => View::Hc,
                    Some(k) => panic!("unexpected branch fixup {k:?}"),
                    None => *view,
                };
                let t_off = t.wrapping_sub(base(c, want)) as u32;
                assert!(
                    starts.contains(&t_off),
                    "branch at {off:#x} to {t:#x} is not an instruction start"
                );
                assert_eq!(
                    view_of(t_off),
                    Some(want),
                    "branch at {off:#x} leaves its intended view"
                );
            }
            _ => {}
        }
        if insn.code() == Code::Jmp_ptr1632 {
            assert_eq!(insn.far_branch_selector(), c.sel.cs64);
            let t_off = insn.far_branch32().wrapping_sub(c.code_id.0 as u32);
            assert_eq!(Some(t_off), def.labels.get("IDEnter64Mode").copied());
            assert!(starts.contains(&t_off));
        }
    }
    // The 64-bit absolute slot and the 16:32 far pointer.
    let slot = def.labels["pICEnterTarget"] as usize;
    let v = u64::from_le_bytes(code[slot..slot + 8].try_into().unwrap_or_default());
    assert_eq!(v, c.code_id.0 + u64::from(def.labels["ICEnterTarget"]));
    let fp = def.labels["fpIDEnterTarget"] as usize;
    let off32 = u32::from_le_bytes(code[fp..fp + 4].try_into().unwrap_or_default());
    let sel = u16::from_le_bytes([code[fp + 4], code[fp + 5]]);
    assert_eq!(
        u64::from(off32),
        c.code_id.0 + u64::from(def.labels["IDExitTarget"])
    );
    assert_eq!(sel, c.sel.cs);
    assert_eq!(view_of(off32 - c.code_id.0 as u32), Some(View::Id));

    // 3. Absolute values equal the context's addresses.
    for a in &rel.applied {
        let op = u64::from(a.record.operand.unwrap_or(0));
        let expect = match a.record.kind {
            K::HcVmOff => c.vm_hc.0 + op,
            K::HcCpumOff => c.vm_hc.0 + u64::from(c.cpum_off) + op,
            K::GcVmOff => u64::from(c.vm_rc.0) + op,
            K::GcCpumOff | K::Gc64BitCpumOff => u64::from(c.vm_rc.0) + u64::from(c.cpum_off) + op,
            K::Inter32BitCr3 => c.inter_cr3.legacy32.0,
            K::InterPaeCr3 => c.inter_cr3.pae.0,
            K::InterAmd64Cr3 => c.inter_cr3.amd64.0,
            K::HyperCs => u64::from(c.sel.cs),
            K::HyperDs => u64::from(c.sel.ds),
            K::EferOrMask => 0x901,
            K::Hc64BitNoCheck | K::Id32Bit => c.code_id.0 + op,
            K::IdFar32To64BitMode => (c.code_id.0 + op) | (u64::from(c.sel.cs64) << 32),
            K::Hc2IdNearRel | K::Id2HcNearRel => continue,
            k => panic!("unexpected fixup kind {k:?} at {:#x}", a.record.off),
        };
        assert_eq!(
            a.value, expect,
            "{:?} at {:#x}",
            a.record.kind, a.record.off
        );
    }
    // The profiles are per VCPU: the C entry reaches its VCPU's through the
    // HC CPUM; no switcher updates the VM-wide ones.
    let n = def
        .fixups
        .iter()
        .filter(|f| f.kind == K::HcCpumOff && f.operand == Some(cpum::layout::STAT_TO_GC as u32))
        .count();
    assert_eq!(
        n,
        usize::from(o.stats),
        "ToGC fixups with stats={}",
        o.stats
    );
    for k in [K::HcVmOff, K::GcVmOff] {
        assert!(
            !def.fixups
                .iter()
                .any(|f| f.kind == k
                    && [VM.stat_to_gc, VM.stat_to_hc].contains(&f.operand.unwrap_or(0))),
            "{k:?}: a VM-wide profile is updated"
        );
    }

    // 4. Every displacement off the CPUMCPU pointer is a layout offset.
    let offs = layout_offsets();
    let prof: BTreeSet<i64> = [0, 4, 8, 12, 16, 20, 24, 28, 32, 36].into_iter().collect();
    let apic: BTreeSet<i64> = [0x30, 0x330, 0x340, 0x350, 0x360].into_iter().collect();
    let mut seen_cpumcpu = 0;
    for (off, _, _, insn) in &d.insns {
        if is_data(*off) || insn.op_count() == 0 {
            continue;
        }
        let has_mem = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory);
        if !has_mem || insn.memory_base() == Register::RIP || insn.memory_base() == Register::ESP {
            continue;
        }
        let disp = i64::from(insn.memory_displacement32() as i32);
        match insn.memory_base() {
            Register::EDX | Register::RDX => {
                seen_cpumcpu += 1;
                assert!(
                    offs.contains(&disp) || apic.contains(&disp),
                    "edx+{disp:#x} at {off:#x}: {insn}"
                );
            }
            Register::ECX | Register::RCX => {
                assert!(prof.contains(&disp), "ecx+{disp:#x} at {off:#x}")
            }
            Register::EBX => assert!(
                apic.contains(&disp) || offs.contains(&disp),
                "ebx+{disp:#x} at {off:#x}"
            ),
            Register::EAX => assert!(disp == 0 || disp == 4, "eax+{disp:#x} at {off:#x}"),
            // Revision C's x2APIC paths keep CPUMCPU in ESI (WRMSR takes EDX).
            Register::ESI if o.revision == Revision::C && o.x2apic => {
                assert!(offs.contains(&disp), "esi+{disp:#x} at {off:#x}")
            }
            r => panic!("unexpected base {r:?} at {off:#x}: {insn}"),
        }
    }
    assert!(seen_cpumcpu > 40);

    // Options show in the code.
    let outs = d
        .insns
        .iter()
        .filter(|x| x.3.code() == Code::Out_DX_AL)
        .count();
    let expected = if o.trace {
        legacy_amd64::trace_steps(o).len()
    } else {
        0
    };
    assert_eq!(outs, expected, "trace characters");
    let marker_writes = d
        .insns
        .iter()
        .filter(|x| {
            x.3.code() == Code::Mov_rm32_imm32
                && x.3.memory_displacement32() as usize == cpum::layout::GUEST_DR + 32
        })
        .count();
    assert_eq!(marker_writes > 0, o.crash_markers);
    // x2APIC: one RDMSR/WRMSR pair per candidate LVT, in mask and unmask paths.
    let msrs: Vec<u32> = d
        .insns
        .iter()
        .filter(|x| x.3.code() == Code::Mov_r32_imm32 && x.3.op0_register() == Register::ECX)
        .map(|x| x.3.immediate32())
        .filter(|v| (0x800..0x840).contains(v))
        .collect();
    if o.x2apic && o.apic_nmi_masking {
        for m in [0x835, 0x836, 0x834, 0x833] {
            assert_eq!(
                msrs.iter().filter(|&&v| v == m).count(),
                2,
                "MSR {m:#x} in mask and unmask"
            );
        }
        // Revision C takes the version from CPUMCPU (read at set-up).
        assert_eq!(
            msrs.contains(&0x803),
            o.revision != Revision::C,
            "x2APIC VERSION for the thermal check"
        );
    } else {
        assert!(
            msrs.is_empty(),
            "no x2APIC code without the option: {msrs:x?}"
        );
    }
    let apic_and = d
        .insns
        .iter()
        .filter(|x| {
            x.3.code() == Code::And_rm32_imm32
                && x.3.op0_kind() == OpKind::Memory
                && x.3.immediate32() == !0x1_0000
        })
        .collect::<Vec<_>>();
    let lvt_writes = d
        .insns
        .iter()
        .filter(|x| {
            x.3.code() == Code::Mov_rm32_r32
                && matches!(x.3.memory_base(), Register::EBX | Register::RBX)
                && [0x330, 0x340, 0x350, 0x360].contains(&x.3.memory_displacement32())
        })
        .count();
    if o.apic_nmi_masking && o.revision == Revision::C {
        // No read-modify-write: the saved values are written back, so each
        // LVT has one write to mask and one to unmask.
        assert!(apic_and.is_empty());
        assert_eq!(lvt_writes, 8);
    } else if o.apic_nmi_masking {
        assert_eq!(apic_and.len(), 4);
        assert_eq!(lvt_writes, 4);
        let hc1 = def.labels["ICExitTarget"];
        let in_exit_path = apic_and.iter().all(|x| x.0 >= hc1);
        assert_eq!(in_exit_path, o.revision == Revision::A, "unmask placement");
    } else {
        assert!(apic_and.is_empty());
    }

    // Idempotent.
    let mut again = code.clone();
    let rel2 = relocate(def, &mut again, c).expect("relocates again");
    assert_eq!(again, code);
    assert_eq!(rel2, rel);
}

#[test]
fn every_option_combination_relocates_and_decodes() {
    for o in all_options() {
        for def in both(&o) {
            check(&def, &o, &ctx());
        }
    }
}

#[test]
fn regions_are_computed_correctly() {
    for def in both(&TemplateOptions::default()) {
        let r = def.vbox_regions();
        let l = &def.labels;
        assert_eq!(r.hc0, 0..l["IDEnterTarget"]);
        assert_eq!(r.id0, l["IDEnterTarget"]..l["IDExitTarget"]);
        // Not VirtualBox's `ICExitTarget - Start`.
        assert_eq!(r.id1, l["IDExitTarget"]..l["ICExitTarget"]);
        assert_eq!(r.hc1, l["ICExitTarget"]..def.code_len());
        assert_eq!(r.gc, 0..0);
        let c = def.to_c(0x1000, 0x2000, 0x3000, 0x4000);
        let bytes = zerocopy::IntoBytes::as_bytes(&c).to_vec();
        assert_eq!(bytes.len(), 104);
        let back =
            <vmm_switcher::VmmSwitcherDefC as zerocopy::FromBytes>::read_from_bytes(&bytes).ok();
        assert_eq!(back, Some(c));
        assert_eq!({ c.cb_id_code1 }, l["ICExitTarget"] - l["IDExitTarget"]);
        assert_eq!({ c.enm_type }, def.kind as u32);
        let stream = def.fixup_stream().expect("encodes");
        assert_eq!(
            vmm_switcher::fixup::decode(&stream, def.code.len()),
            Ok(def.fixups.clone())
        );
    }
}

#[test]
fn pae_host_keeps_pae_on_the_way_back() {
    let o = TemplateOptions::default();
    let defs = both(&o);
    let c = ctx();
    for def in &defs {
        let mut code = def.code.clone();
        relocate(def, &mut code, &c).expect("relocates");
        let d = decode(def, &code, &c);
        let id1 = def.labels["IDExitTarget"]..def.labels["ICExitTarget"];
        let clears_pae = d.insns.iter().any(|x| {
            id1.contains(&x.0)
                && x.3.mnemonic() == iced_x86::Mnemonic::And
                && x.3.immediate(1) as u32 == !0x20
        });
        assert_eq!(
            clears_pae,
            def.kind == vmm_switcher::SwitcherKind::Legacy32ToAmd64
        );
        let cr3_kind = if def.kind == vmm_switcher::SwitcherKind::Legacy32ToAmd64 {
            K::Inter32BitCr3
        } else {
            K::InterPaeCr3
        };
        assert_eq!(def.fixups.iter().filter(|f| f.kind == cr3_kind).count(), 2);
    }
}

fn err(def: &SwitcherDef, c: &RelocContext) -> RelocError {
    let mut code = def.code.clone();
    relocate(def, &mut code, c).expect_err("must fail")
}

#[test]
fn every_invalid_input_class_gets_its_error() {
    let def = &both(&TemplateOptions::default())[0];
    let good = ctx();
    let mut short = def.code.clone();
    short.pop();
    assert!(matches!(
        relocate(def, &mut short, &good),
        Err(RelocError::BufferSize { .. })
    ));

    let mut c = good;
    c.inter_cr3.amd64 = PhysAddr(0x1_0000_0000);
    assert!(matches!(
        err(def, &c),
        RelocError::Cr3Above4G { which: "AMD64", .. }
    ));
    let mut c = good;
    c.code_id = PhysAddr(0x1_0000_0000);
    assert!(matches!(err(def, &c), RelocError::IdAbove4G(_)));
    let mut c = good;
    c.sel.cs64 = 0;
    assert!(matches!(err(def, &c), RelocError::NullCs64 { .. }));
    let mut c = good;
    let stat = cpum::layout::STAT_TO_GC as u32;
    c.cpum_size = stat;
    assert!(
        matches!(err(def, &c), RelocError::OperandOutOfRange { operand, .. } if operand == stat)
    );
    let mut c = good;
    c.vm_hc = HcAddr(0xffff_8000_0000_0000);
    assert!(matches!(err(def, &c), RelocError::ValueTooWide { .. }));

    let mutate = |f: &dyn Fn(&mut SwitcherDef)| {
        let mut d = def.clone();
        f(&mut d);
        err(&d, &good)
    };
    let first_hc2id = def
        .fixups
        .iter()
        .position(|f| f.kind == K::Hc2IdNearRel)
        .unwrap_or(0);
    assert!(matches!(
        mutate(&|d| d.fixups[first_hc2id].kind = K::Id2HcNearRel),
        RelocError::SourceRegion {
            want: View::Id,
            actual: Some(View::Hc),
            ..
        }
    ));
    assert!(matches!(
        mutate(&|d| d.fixups[first_hc2id].operand = Some(0)),
        RelocError::TargetRegion {
            want: View::Id,
            actual: Some(View::Hc),
            ..
        }
    ));
    assert!(matches!(
        mutate(&|d| d.fixups[first_hc2id].operand = None),
        RelocError::MissingOperand { .. }
    ));
    let len = def.code_len();
    assert!(matches!(
        mutate(&|d| d.fixups[0].off = len - 2),
        RelocError::FieldOutsideCode { .. }
    ));
    assert!(matches!(
        mutate(&|d| d.fixups[0].kind = K::Cr4Mask),
        RelocError::Unsupported { .. }
    ));
    assert!(matches!(
        mutate(&|d| d.fixups[0].kind = K::GcApicBase32Bit),
        RelocError::NoApicAddress { .. }
    ));
    // A rel32 from 64-bit identity code to a host address 4 GiB away.
    let in64 = def.labels["ICEnterTarget"] + 2;
    let hc1 = def.labels["ICExitTarget"];
    let mut far = good;
    far.code_hc = HcAddr(0x7000_0000_0000);
    let mut d = def.clone();
    d.fixups = vec![vmm_switcher::FixupRecord {
        kind: K::Id2HcNearRel,
        off: in64,
        operand: Some(hc1),
    }];
    assert!(matches!(err(&d, &far), RelocError::Rel32OutOfRange { .. }));
}

#[test]
fn moving_the_placement_re_relocates_to_a_fresh_result() {
    let def = &both(&TemplateOptions::default())[1];
    let a = ctx();
    let mut b = a;
    b.code_rc = RcAddr(0xb000_0000);
    b.vm_rc = RcAddr(0xb100_0000);
    b.code_hc = HcAddr(0xd000_0000);
    let mut moved = def.code.clone();
    relocate(def, &mut moved, &a).expect("a");
    relocate(def, &mut moved, &b).expect("b");
    let mut fresh = def.code.clone();
    relocate(def, &mut fresh, &b).expect("fresh");
    assert_eq!(moved, fresh);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_valid_placements(
        hc in 0x0010_0000u32..0xffe0_0000,
        id in 0x0010_0000u32..0xffe0_0000,
        rc in 0x0010_0000u32..0xff00_0000,
        vm_hc in 0x0010_0000u32..0xfff0_0000,
        cr3 in proptest::collection::vec(0x1000u32..0xffff_f000, 3),
        pae in proptest::bool::ANY,
        nx in proptest::bool::ANY,
    ) {
        let host = if pae { legacy_amd64::HostPaging::Pae } else { legacy_amd64::HostPaging::Legacy32 };
        let def = legacy_amd64::build(host, &TemplateOptions::default(), &VM).expect("builds");
        let mut c = ctx();
        c.code_hc = HcAddr(u64::from(hc & !0xfff));
        c.code_id = PhysAddr(u64::from(id & !0xfff));
        c.code_rc = RcAddr(rc & !0xfff);
        c.vm_hc = HcAddr(u64::from(vm_hc & !0xfff));
        c.vm_rc = RcAddr((rc & !0xfff) + 0x10_0000);
        c.inter_cr3.legacy32 = PhysAddr(u64::from(cr3[0] & !0xfff));
        c.inter_cr3.pae = PhysAddr(u64::from(cr3[1] & !0x1f));
        c.inter_cr3.amd64 = PhysAddr(u64::from(cr3[2] & !0xfff));
        c.cpu.nx = nx;
        let mut code = def.code.clone();
        let rel = relocate(&def, &mut code, &c);
        prop_assert!(rel.is_ok(), "{:?}", rel);
        // Branch-target and slot checks hold at any placement.
        if !nx {
            // The EFER mask drops NXE without NX.
            let m = rel.as_ref().map(|r| r.applied.iter().find(|a| a.record.kind == K::EferOrMask).map(|a| a.value));
            prop_assert_eq!(m, Ok(Some(0x101)));
        } else {
            check(&def, &TemplateOptions::default(), &c);
        }
    }
}

#[test]
fn listing_names_regions_labels_entries_and_fixups() {
    let def = &both(&TemplateOptions::default())[0];
    let c = ctx();
    let mut code = def.code.clone();
    let rel = relocate(def, &mut code, &c).expect("relocates");
    let text = vmm_switcher::disasm::listing(def, &code, &c, &rel).expect("lists");
    for r in &def.regions {
        assert!(
            text.contains(&format!(
                "---- {} ({:?} view, {}-bit)",
                r.name, r.view, r.bits
            )),
            "{}",
            r.name
        );
    }
    for name in def.labels.keys() {
        assert!(text.contains(&format!("\n{name}:\n")), "label {name}");
    }
    for (name, _) in def.entries.named() {
        assert!(text.contains(&format!("entry:{name}:")), "entry {name}");
    }
    for a in &rel.applied {
        assert!(
            text.contains(&format!("{} = {:#x}", a.record.kind.vbox_name(), a.value)),
            "{:?}",
            a.record
        );
    }
    // 64-bit code is decoded as 64-bit at its identity address; HC code at the HC address.
    let ic = c.code_id.0 + u64::from(def.labels["ICEnterTarget"]);
    let at = format!("{:#06x} {ic:016x}", def.labels["ICEnterTarget"]);
    let line = text.lines().find(|l| l.contains(&at)).unwrap_or_default();
    assert!(line.contains("mov     rdx,"), "{line}");
    // 32-bit code has 8-digit addresses.
    assert!(
        text.contains(&format!("  {:#06x} {:08x}  ", 0, c.code_hc.0)),
        "{text}"
    );
    let body: Vec<&str> = text.lines().filter(|l| l.starts_with("  0x")).collect();
    assert!(!body
        .iter()
        .any(|l| l.contains(&format!("{:016x}", c.code_hc.0))));
    // Data slots are shown as data, not decoded as instructions.
    assert!(text.contains("dq      0x"), "pointer slots");
}

#[test]
fn pae_and_32bit_family_builds_relocates_and_branches_land() {
    use vmm_switcher::templates::legacy_pae::{build, Flavour};
    for o in all_options() {
        for (h, t) in [
            (Flavour::Legacy32, Flavour::Legacy32),
            (Flavour::Legacy32, Flavour::Pae),
            (Flavour::Pae, Flavour::Legacy32),
            (Flavour::Pae, Flavour::Pae),
        ] {
            let def = build(h, t, &o, &VM).expect("builds");
            let c = ctx();
            let mut code = def.code.clone();
            let rel = relocate(&def, &mut code, &c).expect("relocates");
            assert_eq!(rel.applied.len(), def.fixups.len());
            let regions = def.vbox_regions();
            assert_eq!(regions.id0.is_empty(), h == t, "{:?}", def.kind);
            assert!(!regions.gc.is_empty());
            // Every near branch lands on an instruction start in its intended view.
            let lines = vmm_switcher::disasm::lines(&def, &code, &c, &rel).expect("lists");
            let starts: BTreeSet<(View, u64)> = lines
                .iter()
                .filter(|l| l.insn.is_some())
                .map(|l| (l.view, l.addr))
                .collect();
            for line in lines.iter().filter(|l| l.insn.is_some()) {
                let insn = line.insn.unwrap();
                let near = matches!(insn.op0_kind(), OpKind::NearBranch32);
                if !near || insn.flow_control() == FlowControl::IndirectBranch {
                    continue;
                }
                let t_addr = insn.near_branch_target();
                let hit = [View::Hc, View::Id, View::Rc]
                    .iter()
                    .any(|v| starts.contains(&(*v, t_addr)));
                assert!(
                    hit,
                    "{:?}: branch at {:#x} to {t_addr:#x} lands nowhere",
                    def.kind, line.off
                );
            }
            for line in lines.iter().filter_map(|l| l.insn) {
                if line.code() == Code::Jmp_ptr1632 {
                    assert_eq!(line.far_branch_selector(), c.sel.cs);
                    assert!(starts.contains(&(View::Rc, u64::from(line.far_branch32()))));
                }
            }
            // Conditional jumps: the host in ctx() uses SYSENTER and SYSCALL, so the original bytes stay.
            let mut no_se = c;
            no_se.cpu.host_sysenter = false;
            no_se.cpu.host_syscall = false;
            let mut code2 = def.code.clone();
            let rel2 = relocate(&def, &mut code2, &no_se).expect("relocates");
            let jumps = rel2
                .applied
                .iter()
                .filter(|a| matches!(a.record.kind, K::NoSysenterJmp | K::NoSyscallJmp))
                .collect::<Vec<_>>();
            assert_eq!(jumps.len(), 4);
            for j in jumps {
                assert_eq!(j.value, 1);
                assert_eq!(code2[j.record.off as usize], 0xe9);
                let rel32 = i32::from_le_bytes(
                    code2[j.record.off as usize + 1..j.record.off as usize + 5]
                        .try_into()
                        .unwrap(),
                );
                let target = (j.record.off as i64 + 5 + i64::from(rel32)) as u32;
                assert_eq!(Some(target), j.record.operand);
            }
            // …and relocating back restores them byte for byte.
            relocate(&def, &mut code2, &c).expect("relocates");
            assert_eq!(code2, code);
        }
    }
}

#[test]
fn stubs_have_no_fixups_and_return_the_stub_status() {
    use vmm_switcher::templates::stub::{build, STUB_STATUS};
    for bits in [32, 64] {
        let def = build(bits, &TemplateOptions::default()).expect("builds");
        assert!(def.fixups.is_empty());
        assert_eq!(def.fixup_stream().expect("encodes"), vec![255]);
        let c = ctx();
        let mut code = def.code.clone();
        let rel = relocate(&def, &mut code, &c).expect("relocates");
        assert_eq!(code, def.code, "relocation changes nothing");
        let lines = vmm_switcher::disasm::lines(&def, &code, &c, &rel).expect("lists");
        for (name, off) in def.entries.named() {
            let at = lines
                .iter()
                .position(|l| l.off == off)
                .expect("entry decodes");
            let insn = lines[at].insn.expect("code");
            if name == "GCCallTrampoline" {
                assert_eq!(insn.code(), Code::Int3);
                let back = lines[at + 1].insn.expect("jmp");
                assert_eq!(
                    back.near_branch_target(),
                    lines[at].addr,
                    "endless int3 loop"
                );
            } else {
                assert_eq!(insn.immediate32(), STUB_STATUS, "{name}");
                assert_eq!(
                    lines[at + 1].insn.expect("ret").code(),
                    if bits == 64 { Code::Retnq } else { Code::Retnd }
                );
            }
        }
        let r = def.vbox_regions();
        assert_eq!(r.hc0.end, r.gc.start);
        assert!(r.id0.is_empty() && r.id1.is_empty());
    }
}

#[test]
fn amd64_host_family_relocates_at_high_canonical_addresses() {
    use vmm_switcher::templates::{amd64_legacy, legacy_pae::Flavour};
    let mut c = ctx();
    c.code_hc = HcAddr(0xffff_ffff_c040_0000);
    c.vm_hc = HcAddr(0xffff_ffff_c050_0000);
    for o in all_options() {
        for target in [Flavour::Legacy32, Flavour::Pae] {
            let def = amd64_legacy::build(target, &o, &VM).expect("builds");
            let mut code = def.code.clone();
            let rel = relocate(&def, &mut code, &c).expect("relocates");
            assert_eq!(rel.applied.len(), def.fixups.len());
            let lines = vmm_switcher::disasm::lines(&def, &code, &c, &rel).expect("lists");
            let starts: BTreeSet<(View, u64)> = lines
                .iter()
                .filter(|l| l.insn.is_some())
                .map(|l| (l.view, l.addr))
                .collect();
            for l in lines.iter().filter(|l| l.insn.is_some()) {
                let insn = l.insn.unwrap();
                if matches!(insn.op0_kind(), OpKind::NearBranch32 | OpKind::NearBranch64) {
                    let t = insn.near_branch_target();
                    assert!(
                        [View::Hc, View::Id, View::Rc]
                            .iter()
                            .any(|v| starts.contains(&(*v, t))),
                        "{:?}: branch at {:#x} to {t:#x}",
                        def.kind,
                        l.off
                    );
                }
                if insn.code() == Code::Jmp_ptr1632 {
                    let sel = insn.far_branch_selector();
                    let view = if sel == c.sel.cs64 {
                        View::Id
                    } else {
                        View::Rc
                    };
                    assert!(
                        starts.contains(&(view, u64::from(insn.far_branch32()))),
                        "far jump at {:#x}",
                        l.off
                    );
                }
            }
            // The 64-bit slots hold the HC exit target, the identity entry and CPUM's HC address.
            let slot = |n: &str| {
                let o = def.labels[n] as usize;
                u64::from_le_bytes(code[o..o + 8].try_into().unwrap())
            };
            assert_eq!(
                slot("pHCExitTarget"),
                c.code_hc.0 + u64::from(def.labels["HCExitTarget"])
            );
            assert_eq!(
                slot("pIDEnterTarget"),
                c.code_id.0 + u64::from(def.labels["IDEnterTarget"])
            );
            assert_eq!(slot("pCpumHC"), c.vm_hc.0 + u64::from(c.cpum_off));
            assert_eq!(slot("pCpumHC1"), slot("pCpumHC"));
            let r = def.vbox_regions();
            assert!(!r.id0.is_empty() && !r.id1.is_empty() && !r.gc.is_empty());
            // No 32-bit HC fixups: every HC address is reached through 64-bit slots.
            assert!(def.fixups.iter().all(|f| !matches!(
                f.kind,
                K::HcVmOff | K::HcCpumOff | K::Hc32Bit | K::Hc2IdNearRel | K::Id2HcNearRel
            )));
        }
    }
}

#[test]
fn amd64_to_amd64_relocates_and_enters_rc_with_the_64bit_selector() {
    use vmm_switcher::templates::amd64_amd64;
    let mut c = ctx();
    c.code_hc = HcAddr(0xffff_ffff_c040_0000);
    c.vm_hc = HcAddr(0xffff_ffff_c050_0000);
    c.sel.cs = c.sel.cs64;
    for o in all_options() {
        let def = amd64_amd64::build(&o, &VM).expect("builds");
        let mut code = def.code.clone();
        let rel = relocate(&def, &mut code, &c).expect("relocates");
        let lines = vmm_switcher::disasm::lines(&def, &code, &c, &rel).expect("lists");
        let starts: BTreeSet<(View, u64)> = lines
            .iter()
            .filter(|l| l.insn.is_some())
            .map(|l| (l.view, l.addr))
            .collect();
        for l in lines.iter().filter(|l| l.insn.is_some()) {
            let insn = l.insn.unwrap();
            if matches!(insn.op0_kind(), OpKind::NearBranch64) {
                assert!(
                    starts.contains(&(l.view, insn.near_branch_target())),
                    "branch at {:#x}",
                    l.off
                );
            }
        }
        // The m16:32 pointer into the RC copy carries the 64-bit selector; the exit slot the HC target.
        let fp = def.labels["fpGCEnter"] as usize;
        let off = u32::from_le_bytes(code[fp..fp + 4].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([code[fp + 4], code[fp + 5]]), c.sel.cs64);
        assert!(starts.contains(&(View::Rc, u64::from(off))));
        let hc = def.labels["pHCExitTarget"] as usize;
        let v = u64::from_le_bytes(code[hc..hc + 8].try_into().unwrap());
        assert_eq!(v, c.code_hc.0 + u64::from(def.labels["HCExitTarget"]));
        let r = def.vbox_regions();
        assert!(
            r.id0.is_empty() && r.id1.is_empty(),
            "no identity detour: long mode stays on"
        );
        assert!(!r.gc.is_empty());
    }
}
