//! Relocation (`vmm_switcher::relocate`) of mutated switcher definitions:
//! one of the built templates with its fixup records, code, entry points,
//! regions and relocation context changed by the input. A bad definition or
//! context must give a `RelocError`, never a panic; a relocation that
//! succeeds must also list and disassemble without one.
#![no_main]

use std::sync::OnceLock;

use fuzz_input::Input;
use libfuzzer_sys::fuzz_target;
use vmm_switcher::templates::{
    amd64_amd64, amd64_legacy, legacy_amd64, legacy_pae, sample_context, stub, TemplateOptions,
    VmLayout,
};
use vmm_switcher::{
    relocate, FixupKind, FixupRecord, HcAddr, PhysAddr, RcAddr, RelocContext, SwitcherDef,
};

const VM: VmLayout = VmLayout::sample();

/// Every template, with default options and with every option on.
fn defs() -> &'static [SwitcherDef] {
    static DEFS: OnceLock<Vec<SwitcherDef>> = OnceLock::new();
    DEFS.get_or_init(|| {
        use legacy_pae::Flavour as F;
        let mut all = TemplateOptions::default();
        all.stats = true;
        all.apic_nmi_masking = true;
        all.trace = true;
        all.crash_markers = true;
        let mut v = Vec::new();
        for o in [TemplateOptions::default(), all] {
            for h in [
                legacy_amd64::HostPaging::Legacy32,
                legacy_amd64::HostPaging::Pae,
            ] {
                v.push(legacy_amd64::build(h, &o, &VM).expect("builds"));
            }
            for (h, t) in [
                (F::Legacy32, F::Legacy32),
                (F::Legacy32, F::Pae),
                (F::Pae, F::Legacy32),
                (F::Pae, F::Pae),
            ] {
                v.push(legacy_pae::build(h, t, &o, &VM).expect("builds"));
            }
            for t in [F::Legacy32, F::Pae] {
                v.push(amd64_legacy::build(t, &o, &VM).expect("builds"));
            }
            v.push(amd64_amd64::build(&o, &VM).expect("builds"));
        }
        v.push(stub::build(32, &TemplateOptions::default()).expect("builds"));
        v.push(stub::build(64, &TemplateOptions::default()).expect("builds"));
        v
    })
}

fn kind(i: &mut Input) -> FixupKind {
    FixupKind::ALL[usize::from(i.u8()) % FixupKind::ALL.len()]
}

fn operand(i: &mut Input) -> Option<u32> {
    i.bool().then(|| i.u32())
}

/// Applies one mutation chosen by the input to the definition, code or context.
fn mutate(i: &mut Input, def: &mut SwitcherDef, code: &mut Vec<u8>, c: &mut RelocContext) {
    let n = def.fixups.len();
    match i.u8() % 16 {
        0 if n > 0 => {
            let k = i.index(n);
            def.fixups[k].kind = kind(i);
        }
        1 if n > 0 => {
            let k = i.index(n);
            def.fixups[k].off = i.u32();
        }
        2 if n > 0 => {
            let k = i.index(n);
            // Small moves keep the field near real code.
            def.fixups[k].off = def.fixups[k]
                .off
                .wrapping_add(u32::from(i.u8()) & 7)
                .wrapping_sub(3);
        }
        3 if n > 0 => {
            let k = i.index(n);
            def.fixups[k].operand = operand(i);
        }
        4 if n > 0 => {
            let k = i.index(n);
            def.fixups.remove(k);
        }
        5 => {
            let k = i.index(n + 1);
            let r = FixupRecord {
                kind: kind(i),
                off: i.u32() % (def.code_len() + 16),
                operand: operand(i),
            };
            def.fixups.insert(k, r);
        }
        6 if !code.is_empty() => {
            let k = i.index(code.len());
            code[k] = i.u8();
        }
        7 => {
            let len = i.index(code.len() + 1);
            code.truncate(len);
            def.code.truncate(len);
        }
        8 => {
            let which = i.u8() % 6;
            let v = i.u32();
            let e = &mut def.entries;
            *[
                &mut e.r0_host_to_guest,
                &mut e.rc_guest_to_host,
                &mut e.rc_call_trampoline,
                &mut e.rc_guest_to_host_asm,
                &mut e.rc_guest_to_host_asm_hyper_ctx,
                &mut e.rc_guest_to_host_asm_guest_ctx,
            ][usize::from(which)] = v;
        }
        9 if !def.regions.is_empty() => {
            let k = i.index(def.regions.len());
            let (a, b) = (i.u32(), i.u32());
            def.regions[k].range = a..b;
        }
        10 => c.code_hc = HcAddr(i.u64()),
        11 => c.code_id = PhysAddr(i.u64()),
        12 => c.code_rc = RcAddr(i.u32()),
        13 => match i.u8() % 4 {
            0 => c.vm_hc = HcAddr(i.u64()),
            1 => c.vm_rc = RcAddr(i.u32()),
            2 => c.vm_size = i.u32(),
            _ => c.cpum_off = i.u32(),
        },
        14 => match i.u8() % 6 {
            0 => c.cpum_size = i.u32(),
            1 => c.cpumcpu0_off = i.u32(),
            2 => c.inter_cr3.legacy32 = PhysAddr(i.u64()),
            3 => c.inter_cr3.pae = PhysAddr(i.u64()),
            4 => c.inter_cr3.amd64 = PhysAddr(i.u64()),
            _ => c.gdt_rc = RcAddr(i.u32()),
        },
        _ => match i.u8() % 8 {
            0 => c.sel.cs = i.u16(),
            1 => c.sel.ds = i.u16(),
            2 => c.sel.tss = i.u16(),
            3 => c.sel.cs64 = i.u16(),
            4 => c.apic_rc = i.bool().then(|| RcAddr(i.u32())),
            5 => c.cpu.nx = i.bool(),
            6 => c.cpu.host_sysenter = i.bool(),
            _ => c.cpu.host_syscall = i.bool(),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let mut i = Input::new(data);
    let defs = defs();
    let mut def = defs[i.index(defs.len())].clone();
    let mut code = def.code.clone();
    let mut c = sample_context(&VM);
    let mut steps = 0;
    while !i.is_empty() && steps < 64 {
        mutate(&mut i, &mut def, &mut code, &mut c);
        steps += 1;
    }
    let pristine = code.clone();
    if let Ok(rel) = relocate(&def, &mut code, &c) {
        let _ = vmm_switcher::disasm::listing(&def, &pristine, &c, &rel);
    }
});
