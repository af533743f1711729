//! Code generation for the 32-bit host kernels (legacy and PAE paging): the
//! boot stub, the setup, the call itself, the snapshot routine and the
//! interrupt entry points; the rest is in [`super::common`].

use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction};

use cpum::regs::{Cr0, Cr4, MSR_EFER, MSR_SYSENTER_CS};

use super::common::{
    descriptor, emit_apic_line, emit_apic_setup, emit_cpuid_features, emit_loop, finish,
    has_error_code, Gen, LoopTables, Slots, Tables, EXC_STACK_SIZE, R, STACK_SIZE,
};
use super::items::{Seg, SnapItem, SnapSource};
use super::{
    narrow, BuildError, DataArena, HostKernelBuilder, Testbed, FEATURE_APIC, FEATURE_EFER,
    FEATURE_SEP, FS_MAGIC, FS_PAGE_PHYS, MAGIC_VIRT, PATTERN_EBP, PATTERN_EBX, PATTERN_EDI,
    PATTERN_ESI, SEL_CODE32, SEL_DATA32, SEL_LDT, SEL_LDT_FS, SEL_TSS32, SPURIOUS_VECTOR,
    STUB_ADDR, TABLES_BASE,
};
use crate::paging::{HostMode, PAGE};
use crate::transcript::{Phase, PREFIX};

/// A 32-bit interrupt gate (SDM Vol. 3A §6.11).
fn interrupt_gate(handler: u32, selector: u16) -> u64 {
    let h = u64::from(handler);
    (h & 0xffff) | (u64::from(selector) << 16) | (0x8e00u64 << 32) | ((h >> 16) << 48)
}

// ------------------------------------------------------------------
// Interrupt and exception handlers.

fn emit_vectors(g: &mut Gen, b: &HostKernelBuilder) -> R {
    // One stub per vector: push a dummy error code where the CPU pushes
    // none, push the vector, join the common path.
    for v in 0..256u32 {
        let l = g.a.create_label();
        let name = format!("vec_{v:02x}");
        let l = g.export(&name, l)?;
        g.vectors.push(l);
        if v == 2 && super::storm::emit_nmi_handler(g)? {
            continue;
        }
        if v == 2 || v == u32::from(SPURIOUS_VECTOR) {
            // NMI / spurious APIC interrupt: count and return, no EOI (DS
            // may be anything here).
            let slot = if v == 2 { g.s.nmi_count } else { g.s.spurious };
            g.a.push(ds)?;
            g.a.push(eax)?;
            g.a.mov(ax, u32::from(SEL_DATA32))?;
            g.a.mov(ds, ax)?;
            g.a.inc(dword_ptr(slot))?;
            g.a.pop(eax)?;
            g.a.pop(ds)?;
            g.a.iretd()?;
            continue;
        }
        if !has_error_code(v) {
            g.a.push(0u32)?;
        }
        g.a.push(v)?;
        g.a.jmp(g.r.exc_common)?;
    }

    // Common path. Stack: vector, error code, EIP, CS, EFLAGS.
    let l = g.r.exc_common;
    g.export("exc_common", l)?;
    g.a.mov(ax, u32::from(SEL_DATA32))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    for (off, slot) in [
        (0, g.s.exc_vec),
        (4, g.s.exc_err),
        (8, g.s.exc_ip),
        (12, g.s.exc_cs),
        (16, g.s.exc_flags),
    ] {
        g.a.mov(ecx, dword_ptr(esp + off))?;
        g.a.mov(dword_ptr(slot), ecx)?;
    }
    g.a.mov(ss, ax)?;
    g.a.mov(esp, g.t.exc_stack_top)?;
    g.a.cld()?;
    g.emit_exc_report(b)
}

// ------------------------------------------------------------------
// The snapshot routine, generated from the item table.
//
// Called as `push adjust; push buffer; call snap` (it pops both). It
// records every item into `buffer` and preserves all registers and flags.
// The recorded ESP is the caller's ESP before the two pushes plus
// `adjust`, so a caller with extra words on the stack can still record
// the ESP of the call site.

fn emit_snap(g: &mut Gen, items: &[SnapItem]) -> R {
    // Frame after pushfd, pushad and the two saved selectors:
    //   [esp+0] ES, [esp+4] DS, then F = esp+8:
    //   F+0 EDI, F+4 ESI, F+8 EBP, F+12 ESP, F+16 EBX, F+20 EDX, F+24 ECX,
    //   F+28 EAX, F+32 EFLAGS, F+36 return, F+40 buffer, F+44 adjust,
    //   F+48 the caller's stack before the pushes.
    const F: i32 = 8;
    let l = g.r.snap;
    g.export("snap", l)?;
    g.a.pushfd()?;
    g.a.pushad()?;
    g.a.xor(eax, eax)?;
    g.a.mov(ax, ds)?;
    g.a.push(eax)?;
    g.a.mov(ax, es)?;
    g.a.push(eax)?;
    g.a.mov(ax, u32::from(SEL_DATA32))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(edi, dword_ptr(esp + (F + 40)))?;
    for (idx, item) in items.iter().enumerate() {
        emit_source(g, &item.source, F)?;
        g.a.mov(dword_ptr(edi + (idx as i32) * 4), eax)?;
    }
    g.a.pop(eax)?;
    g.a.mov(es, ax)?;
    g.a.pop(eax)?;
    g.a.mov(ds, ax)?;
    g.a.popad()?;
    g.a.popfd()?;
    g.a.ret_1(8)?;
    Ok(())
}

fn emit_source(g: &mut Gen, source: &SnapSource, f: i32) -> R {
    let a = &mut g.a;
    match source {
        SnapSource::Ebx => a.mov(eax, dword_ptr(esp + (f + 16)))?,
        SnapSource::Esi => a.mov(eax, dword_ptr(esp + (f + 4)))?,
        SnapSource::Edi => a.mov(eax, dword_ptr(esp + f))?,
        SnapSource::Ebp => a.mov(eax, dword_ptr(esp + (f + 8)))?,
        SnapSource::Esp => {
            a.lea(eax, ptr(esp + (f + 48)))?;
            a.add(eax, dword_ptr(esp + (f + 44)))?;
        }
        SnapSource::Eflags => a.mov(eax, dword_ptr(esp + (f + 32)))?,
        SnapSource::Seg(Seg::Ds) => a.mov(eax, dword_ptr(esp + 4))?,
        SnapSource::Seg(Seg::Es) => a.mov(eax, dword_ptr(esp))?,
        SnapSource::Seg(seg) => {
            let reg = match seg {
                Seg::Cs => cs,
                Seg::Fs => fs,
                Seg::Gs => gs,
                _ => ss,
            };
            a.xor(eax, eax)?;
            a.mov(ax, reg)?;
        }
        SnapSource::GdtrBase => g.load_table_reg(false, true)?,
        SnapSource::GdtrLimit => g.load_table_reg(false, false)?,
        SnapSource::IdtrBase => g.load_table_reg(true, true)?,
        SnapSource::IdtrLimit => g.load_table_reg(true, false)?,
        SnapSource::Ldtr => g.load_tr_ldtr(false)?,
        SnapSource::Tr => g.load_tr_ldtr(true)?,
        SnapSource::TssDescriptorHigh => {
            a.mov(eax, dword_ptr(g.t.gdt + u32::from(SEL_TSS32) + 4))?;
        }
        SnapSource::Cr(n) => g.load_cr(*n)?,
        SnapSource::Dr(n) => g.load_dr(*n)?,
        SnapSource::Msr { index, high } => {
            let guard = match *index {
                MSR_EFER => Some(FEATURE_EFER),
                MSR_SYSENTER_CS => Some(FEATURE_SEP),
                apic::APIC_BASE_MSR => Some(FEATURE_APIC),
                _ => None,
            };
            let mut absent = a.create_label();
            let mut done = a.create_label();
            if let Some(bit) = guard {
                a.test(dword_ptr(g.s.features), bit)?;
                a.jz(absent)?;
            }
            a.mov(ecx, *index)?;
            a.rdmsr()?;
            if *high {
                a.mov(eax, edx)?;
            }
            a.jmp(done)?;
            a.set_label(&mut absent)?;
            a.xor(eax, eax)?;
            a.set_label(&mut done)?;
            a.zero_bytes()?;
        }
        SnapSource::Mem(addr) => a.mov(eax, dword_ptr(*addr))?,
        SnapSource::FsDword(off) => {
            let mut bad = a.create_label();
            let mut done = a.create_label();
            a.xor(eax, eax)?;
            a.mov(ax, fs)?;
            a.cmp(eax, u32::from(SEL_LDT_FS))?;
            a.jne(bad)?;
            a.mov(eax, dword_ptr(*off).fs())?;
            a.jmp(done)?;
            a.set_label(&mut bad)?;
            a.mov(eax, u32::MAX)?;
            a.set_label(&mut done)?;
            a.zero_bytes()?;
        }
        SnapSource::Custom(emit) => emit(a)?,
    }
    Ok(())
}

/// Validates the builder, lays everything out, generates and assembles.
pub(super) fn build(mut b: HostKernelBuilder) -> Result<Testbed, BuildError> {
    // ---- validation -------------------------------------------------------
    let entry64 = super::validate(&b)?;
    let mode = b.mode;
    // Everything the 32-bit kernel uses as an address or operand must fit
    // 32 bits; the code generation narrows these values again.
    let entry = narrow("entry", entry64, mode)?;
    narrow("arg1", b.arg1, mode)?;
    if let Some(c) = b.cookie_addr {
        narrow("cookie address", c, mode)?;
    }
    for d in &b.dumps {
        narrow("dump address", d.addr, mode)?;
    }
    if let Some(it) = b.extra_items64.first() {
        return Err(BuildError::ItemWidth {
            name: it.name.clone(),
            width: 64,
            mode,
        });
    }
    let mut items = if b.x2apic {
        super::default_items_x2apic()
    } else {
        super::default_items()
    };
    items.append(&mut b.extra_items);
    super::check_item_names(items.iter().map(|i| i.name.as_str()))?;
    for name in &b.skip {
        let it = items
            .iter_mut()
            .find(|it| &it.name == name)
            .ok_or_else(|| BuildError::UnknownItem(name.clone()))?;
        it.mask = 0;
    }

    // ---- page tables -------------------------------------------------------
    let map = super::host_page_map(&b)?;
    let tables_pages = map.table_pages();
    let tables = map.layout(TABLES_BASE);
    super::check_addresses(&tables, &b, entry64)?;

    // ---- data --------------------------------------------------------------
    // Each host CPU has its own tables ([`super::smp`]).
    let data_base = TABLES_BASE + b.cpus * tables_pages * PAGE;
    let mut d = DataArena::new(data_base);
    let smp = super::smp::alloc(&mut d, b.cpus)?;
    let n_items = items.len() as u32;
    let mut gdt_entries = vec![
        0u64,
        descriptor(0, 0xfffff, 0x9a, 0xc), // code32
        descriptor(0, 0xfffff, 0x92, 0xc), // data32
        descriptor(0, 0xfffff, 0x92, 0xc), // data32 alias
        0,                                 // TSS (below)
        0,                                 // LDT (below)
    ];
    gdt_entries.extend_from_slice(&b.extra_gdt);
    let gdt_bytes: Vec<u8> = gdt_entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    let gdt_limit = u16::try_from(gdt_bytes.len() - 1)
        .map_err(|_| BuildError::GdtTooLarge(b.extra_gdt.len()))?;
    let gdt = d.bytes(&gdt_bytes, 16);
    let ldt = d.bytes(&descriptor(FS_PAGE_PHYS, 0xfff, 0x92, 0x4).to_le_bytes(), 8);
    let stack_bottom = d.zeroed(STACK_SIZE, 16);
    let stack_top = stack_bottom + STACK_SIZE as u32;
    let exc_stack_bottom = d.zeroed(EXC_STACK_SIZE, 16);
    let exc_stack_top = exc_stack_bottom + EXC_STACK_SIZE as u32;
    let mut tss_bytes = [0u8; 104];
    tss_bytes[4..8].copy_from_slice(&stack_top.to_le_bytes()); // ESP0
    tss_bytes[8..10].copy_from_slice(&SEL_DATA32.to_le_bytes()); // SS0
    tss_bytes[102..104].copy_from_slice(&104u16.to_le_bytes()); // no I/O bitmap
    let tss = d.bytes(&tss_bytes, 16);
    let tss_desc = descriptor(tss, 103, 0x89, 0);
    let ldt_desc = descriptor(ldt, 7, 0x82, 0);
    let ok = d.write(gdt + u32::from(SEL_TSS32), &tss_desc.to_le_bytes())
        && d.write(gdt + u32::from(SEL_LDT), &ldt_desc.to_le_bytes());
    if !ok {
        return Err(BuildError::Internal("GDT outside the data area".into()));
    }
    let idt = d.zeroed(256 * 8, 16);
    let mut gdtr = [0u8; 6];
    gdtr[..2].copy_from_slice(&gdt_limit.to_le_bytes());
    gdtr[2..].copy_from_slice(&gdt.to_le_bytes());
    let gdtr = d.bytes(&gdtr, 8);
    let mut idtr = [0u8; 6];
    idtr[..2].copy_from_slice(&(256u16 * 8 - 1).to_le_bytes());
    idtr[2..].copy_from_slice(&idt.to_le_bytes());
    let idtr = d.bytes(&idtr, 8);
    let masks: Vec<u8> = items.iter().flat_map(|i| i.mask.to_le_bytes()).collect();
    let names = items.iter().map(|i| i.name.as_str());
    let l = LoopTables::new(&mut d, &b.vcpus, &masks, names, 4)?;
    let s = Slots::new(&mut d, false);
    let t = Tables {
        gdt,
        gdt_limit,
        gdtr,
        idt,
        idtr,
        tss,
        ldt,
        stack_top,
        exc_stack_top,
        nmi_stack_top: None,
    };

    let mut g = Gen::new(CodeAssembler::new(32)?, d, s, t, l);
    super::smp::attach(&mut g, smp);

    // ---- code --------------------------------------------------------------
    emit_main(&mut g, &mut b, entry, n_items)?;
    let (cr4_bits, cr0_bits) = paging_bits(&b);
    super::smp::emit_ap_entry32(&mut g, &b, cr4_bits, cr0_bits)?;
    g.emit_library()?;
    emit_snap(&mut g, &items)?;
    emit_vectors(&mut g, &b)?;
    let code = g.assemble(b.identity_limit)?;
    for (i, &handler) in code.vectors.iter().enumerate() {
        let gate = interrupt_gate(handler as u32, SEL_CODE32);
        if !g.d.write(g.t.idt + 8 * i as u32, &gate.to_le_bytes()) {
            return Err(BuildError::Internal("IDT outside the data area".into()));
        }
    }
    super::smp::finish_copies(
        &mut g,
        &mut b,
        &map,
        tables_pages,
        code.base,
        code.end(),
        code.symbols.get("ap_entry").copied(),
    )?;

    // Boot stub: save the multiboot registers, load the GDT, far-jump to the code.
    let mut stub = CodeAssembler::new(32)?;
    stub.cli()?;
    stub.cld()?;
    stub.mov(dword_ptr(g.s.mb_eax), eax)?;
    stub.mov(dword_ptr(g.s.mb_ebx), ebx)?;
    stub.lgdt(ptr(g.t.gdtr))?;
    stub.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1632,
        SEL_CODE32,
        code.base,
    )?)?;
    let stub = stub.assemble(u64::from(STUB_ADDR))?;

    let mut fs_page = vec![0u8; PAGE as usize];
    fs_page[..4].copy_from_slice(&FS_MAGIC.to_le_bytes());
    let items = items.into_iter().map(|i| i.name).collect();
    finish(g, b, code, stub, fs_page, tables, items)
}

/// Setup, the call loop and the summary.
fn emit_main(g: &mut Gen, b: &mut HostKernelBuilder, entry: u32, n_items: u32) -> R {
    let mode = b.mode;
    let start = g.a.create_label();
    g.export("start", start)?;
    g.a.mov(ax, u32::from(SEL_DATA32))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.mov(gs, ax)?;
    g.a.xor(eax, eax)?;
    g.a.mov(fs, ax)?;
    g.a.mov(esp, g.t.stack_top)?;
    g.phase(Phase::Setup)?;
    g.a.call(g.r.serial_init)?;
    g.text(&format!("{PREFIX}BOOT mode={mode} mbeax="))?;
    g.hex_mem(g.s.mb_eax)?;
    g.text(&super::common::boot_tail(b, n_items, u64::from(entry), 8))?;
    let required = b.required_cpu();
    super::common::emit_cpu_check(g, &required, &b.forbidden_cpu())?;

    // Legacy PIC: mask everything (LINT0 goes to NMI mode below).
    g.mask_pic()?;

    load_descriptor_tables(g)?;

    // CPUID features.
    let feat = g.s.features;
    emit_cpuid_features(g)?;

    // Paging.
    let (cr4_bits, cr0_bits) = paging_bits(b);
    g.a.mov(eax, TABLES_BASE)?;
    paging_on(g, eax, cr4_bits, cr0_bits)?;

    emit_msrs_and_apic(g, b.x2apic)?;

    // HOST and APIC lines.
    g.host_crs()?;
    g.text(" efer=")?;
    let mut efer_absent = g.a.create_label();
    let mut efer_done = g.a.create_label();
    g.unless_feature(FEATURE_EFER, efer_absent)?;
    g.a.mov(ecx, MSR_EFER)?;
    g.a.rdmsr()?;
    g.a.jmp(efer_done)?;
    g.mark(&mut efer_absent)?;
    g.a.xor(eax, eax)?;
    g.a.xor(edx, edx)?;
    g.mark(&mut efer_done)?;
    g.a.xchg(eax, edx)?;
    g.a.call(g.r.puthex)?;
    g.a.mov(eax, edx)?;
    g.a.call(g.r.puthex)?;
    g.field_sysenter_cs()?;
    g.field_hex("magic", MAGIC_VIRT)?;
    g.text(" fs0=")?;
    g.a.mov(eax, dword_ptr(0u32).fs())?;
    g.a.call(g.r.puthex)?;
    g.field_hex("features", feat)?;
    g.a.call(g.r.putnl)?;

    emit_apic_line(g, b.x2apic)?;
    super::storm::emit_setup(g, b)?;

    super::smp::emit_start_aps(g, b)?;
    emit_loop(g, b, n_items, &mut |g| emit_call(g, entry))
}

/// Loads the IDT, the TSS, the LDT and FS from the LDT (every CPU, once its
/// GDT is loaded). Clobbers AX.
pub(super) fn load_descriptor_tables(g: &mut Gen) -> R {
    g.a.lidt(ptr(g.t.idtr))?;
    g.a.mov(ax, u32::from(SEL_TSS32))?;
    g.a.ltr(ax)?;
    g.a.mov(ax, u32::from(SEL_LDT))?;
    g.a.lldt(ax)?;
    g.a.mov(ax, u32::from(SEL_LDT_FS))?;
    g.a.mov(fs, ax)?;
    Ok(())
}

/// After the CPUID features: EFER.NXE and EFER.SCE as a real host has
/// them, SYSENTER_CS the kernel code selector (each where the CPU has
/// it), then the local APIC. Clobbers EAX, ECX, EDX.
pub(super) fn emit_msrs_and_apic(g: &mut Gen, x2apic: bool) -> R {
    let mut no_efer = g.a.create_label();
    g.unless_feature(FEATURE_EFER, no_efer)?;
    g.set_efer_bits()?;
    g.mark(&mut no_efer)?;
    let mut no_sep = g.a.create_label();
    g.unless_feature(FEATURE_SEP, no_sep)?;
    g.wrmsr_const(MSR_SYSENTER_CS, u64::from(SEL_CODE32))?;
    g.mark(&mut no_sep)?;
    emit_apic_setup(g, x2apic)
}

/// Loads CR3 from `reg`, sets `cr4_bits` in CR4 and `cr0_bits` (paging)
/// in CR0, and jumps once so the next fetch runs paged. Clobbers `reg`.
pub(super) fn paging_on(g: &mut Gen, reg: AsmRegister32, cr4_bits: u32, cr0_bits: u32) -> R {
    g.a.mov(cr3, reg)?;
    g.a.mov(reg, cr4)?;
    g.a.or(reg, cr4_bits)?;
    g.a.mov(cr4, reg)?;
    g.a.mov(reg, cr0)?;
    g.a.or(reg, cr0_bits)?;
    g.a.mov(cr0, reg)?;
    let mut paged = g.a.create_label();
    g.a.jmp(paged)?;
    g.mark(&mut paged)
}

/// The CR4 and CR0 bits the 32-bit host turns on with paging.
fn paging_bits(b: &HostKernelBuilder) -> (u32, u32) {
    let mut cr4_bits = Cr4::PGE | Cr4::OSFXSR | Cr4::OSXMMEXCPT;
    if b.pse {
        cr4_bits |= Cr4::PSE;
    }
    if b.mode == HostMode::Pae {
        cr4_bits |= Cr4::PAE;
    }
    let cr0_bits = Cr0::PG | Cr0::WP | Cr0::NE | Cr0::MP | Cr0::ET | Cr0::PE;
    (cr4_bits.bits() as u32, cr0_bits.bits() as u32)
}

/// Loads EBX/ESI/EDI/EBP with the call's patterns, takes the first
/// snapshot, calls `u32 entry(u32 arg1, u32 arg2)` (cdecl) between two
/// RDTSCs, takes the second snapshot and stores the delta and the return
/// value.
fn emit_call(g: &mut Gen, entry: u32) -> R {
    // (b) patterns in the callee-saved registers, snapshot.
    g.phase(Phase::Snapshot)?;
    g.a.mov(eax, dword_ptr(g.s.cookie))?;
    for (reg, pattern) in [
        (ebx, PATTERN_EBX),
        (esi, PATTERN_ESI),
        (edi, PATTERN_EDI),
        (ebp, PATTERN_EBP),
    ] {
        g.a.mov(reg, eax)?;
        g.a.xor(reg, pattern)?;
    }
    g.a.cld()?;
    g.a.sti()?;
    g.a.push(0u32)?;
    g.a.push(g.l.snap_before)?;
    g.a.call(g.r.snap)?;
    super::storm::emit_before_call(g)?;
    super::smp::emit_enter(g)?;

    // (c) the call, timed.
    g.a.push(dword_ptr(g.s.arg2))?;
    g.a.push(dword_ptr(g.s.arg1))?;
    g.phase(Phase::Call)?;
    g.a.rdtsc()?;
    g.a.mov(dword_ptr(g.s.tsc0), eax)?;
    g.a.mov(dword_ptr(g.s.tsc0 + 4), edx)?;
    let call_site = g.a.create_label();
    g.export("call_site", call_site)?;
    g.a.call(u64::from(entry))?;
    let after_call = g.a.create_label();
    g.export("after_call", after_call)?;
    // Only stack (SS) accesses until the snapshot has recorded DS and ES.
    g.a.push(eax)?;
    g.a.rdtsc()?;
    g.a.push(edx)?;
    g.a.push(eax)?;
    g.a.mov(dword_ptr(g.s.phase).ss(), Phase::Snapshot.code())?;
    // Extra words since the call site's ESP: 2 args + ret + tsc (2) = 20 bytes.
    g.a.push(20u32)?;
    g.a.push(g.l.snap_after)?;
    g.a.call(g.r.snap)?;

    // Back to the kernel's data segments (FS is restored after the report).
    g.a.mov(ax, u32::from(SEL_DATA32))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(gs, ax)?;
    g.a.cld()?;
    g.phase(Phase::Check)?;
    super::smp::emit_leave(g)?;
    g.a.pop(eax)?;
    g.a.pop(edx)?;
    g.a.sub(eax, dword_ptr(g.s.tsc0))?;
    g.a.sbb(edx, dword_ptr(g.s.tsc0 + 4))?;
    let mut small = g.a.create_label();
    g.a.jz(small)?;
    g.a.mov(eax, u32::MAX)?;
    g.mark(&mut small)?;
    g.a.mov(dword_ptr(g.s.delta), eax)?;
    g.a.pop(eax)?;
    g.a.mov(dword_ptr(g.s.ret), eax)?;
    g.a.add(esp, 8)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_sdm_layout() {
        assert_eq!(descriptor(0, 0xfffff, 0x9a, 0xc), 0x00cf_9a00_0000_ffff);
        assert_eq!(descriptor(0, 0xfffff, 0x92, 0xc), 0x00cf_9200_0000_ffff);
        let d = descriptor(0x1234_5678, 0x67, 0x89, 0);
        assert_eq!(d & 0xffff, 0x67);
        assert_eq!((d >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!((d >> 56) & 0xff, 0x12);
        assert_eq!((d >> 40) & 0xff, 0x89);
        let gate = interrupt_gate(0x0010_2345, 0x08);
        assert_eq!(gate & 0xffff, 0x2345);
        assert_eq!((gate >> 16) & 0xffff, 8);
        assert_eq!((gate >> 32) & 0xffff, 0x8e00);
        assert_eq!(gate >> 48, 0x10);
    }

    #[test]
    fn error_code_vectors() {
        let with: Vec<u32> = (0..32).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, vec![8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }
}
