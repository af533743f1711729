//! Code generation for the AMD64 host kernel: a 32-bit boot stub that turns
//! on long mode, and the 64-bit kernel (descriptor tables, environment,
//! the call loop with 64-bit snapshots, exception handlers).

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, Instruction};

use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER, MSR_SYSENTER_CS};

use super::common::{
    descriptor, emit_apic_line, emit_apic_setup, emit_cpuid_features, emit_loop, finish,
    has_error_code, Gen, LoopTables, Slots, Tables, COM1, EXC_STACK_SIZE, R, STACK_SIZE,
};
use super::items::{Seg, SnapItem64, SnapSource64};
use super::{
    BuildError, CpuFeature, DataArena, HostKernelBuilder, Testbed, FEATURE_SCE, FEATURE_SEP,
    FS_BASE64, FS_MAGIC, FS_PAGE_PHYS, GS_BASE64, GS_MAGIC, GS_MAGIC_OFF, LSTAR_VALUE, MAGIC_VIRT,
    MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_SFMASK, MSR_STAR, PATTERN_R12,
    PATTERN_R13, PATTERN_R14, PATTERN_R15, PATTERN_RBP, PATTERN_RBX, SEL64_CODE, SEL64_CODE32,
    SEL64_DATA, SEL64_LDT, SEL64_TSS, SFMASK_VALUE, SPURIOUS_VECTOR, STAR_VALUE, STUB_ADDR,
    TABLES_BASE,
};
use crate::paging::PAGE;
use crate::qemu::{DEBUG_EXIT_PORT, EXIT_FAIL};
use crate::transcript::{Phase, PREFIX};

/// Size of the NMI stack (IST2).
const NMI_STACK_SIZE: usize = 0x1000;
/// IST index of the exception stack.
const IST_EXC: u8 = 1;
/// IST index of the NMI stack.
const IST_NMI: u8 = 2;
/// 64-bit TSS field offsets (SDM Vol. 3A §8.7).
const TSS64_RSP0: usize = 4;
/// First IST slot; IST n is at `TSS64_IST1 + 8 * (n - 1)`.
const TSS64_IST1: usize = 36;
/// I/O map base field.
const TSS64_IOMAP: usize = 102;
/// Size of the 64-bit TSS.
const TSS64_SIZE: usize = 104;

/// A 64-bit interrupt gate (SDM Vol. 3A §6.14.1).
fn interrupt_gate64(handler: u64, selector: u16, ist: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&selector.to_le_bytes());
    g[4] = ist & 7;
    g[5] = 0x8e;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// A 16-byte system-segment descriptor (TSS 0x89, LDT 0x82; SDM Vol. 3A §8.2.3).
fn system_descriptor64(base: u64, limit: u32, access: u8) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&descriptor(base as u32, limit, access, 0).to_le_bytes());
    d[8..12].copy_from_slice(&((base >> 32) as u32).to_le_bytes());
    d
}

/// Registers the snapshot routine saves, in push order.
const SAVED: [AsmRegister64; 15] = [
    rax, rcx, rdx, rbx, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];
/// Frame offsets of the snapshot routine (after its pushes).
const SNAP_RFLAGS: i32 = 8 * SAVED.len() as i32;
const SNAP_BUFFER: i32 = SNAP_RFLAGS + 16;
const SNAP_ADJUST: i32 = SNAP_BUFFER + 8;
const SNAP_CALLER: i32 = SNAP_ADJUST + 8;

/// Offset of a saved register in the snapshot frame.
fn saved_off(reg: AsmRegister64) -> i32 {
    let i = SAVED.iter().position(|&r| r == reg).unwrap_or(0);
    8 * (SAVED.len() - 1 - i) as i32
}

// ------------------------------------------------------------------
// Interrupt and exception handlers.

fn emit_vectors(g: &mut Gen, b: &HostKernelBuilder) -> R {
    for v in 0..256u32 {
        let l = g.a.create_label();
        let l = g.export(&format!("vec_{v:02x}"), l)?;
        g.vectors.push(l);
        if v == 2 && super::storm::emit_nmi_handler(g)? {
            continue;
        }
        if v == 2 || v == u32::from(SPURIOUS_VECTOR) {
            // NMI / spurious APIC interrupt: count and return (no EOI).
            let slot = if v == 2 { g.s.nmi_count } else { g.s.spurious };
            g.a.inc(dword_ptr(slot))?;
            g.a.iretq()?;
            continue;
        }
        if !has_error_code(v) {
            g.a.push(0)?;
        }
        g.a.push(v as i32)?;
        g.a.jmp(g.r.exc_common)?;
    }

    // Common path. Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
    let l = g.r.exc_common;
    g.export("exc_common", l)?;
    let frame = [
        g.s.exc_vec,
        g.s.exc_err,
        g.s.exc_ip,
        g.s.exc_cs,
        g.s.exc_flags,
    ]
    .into_iter()
    .chain(g.s.exc_rsp);
    for (off, slot) in (0..).step_by(8).zip(frame) {
        g.a.mov(rcx, qword_ptr(rsp + off))?;
        g.a.mov(qword_ptr(slot), rcx)?;
    }
    g.a.mov(ax, u32::from(SEL64_DATA))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.mov(rsp, u64::from(g.t.exc_stack_top))?;
    g.a.cld()?;
    g.emit_exc_report(b)
}

// ------------------------------------------------------------------
// The snapshot routine, generated from the item table.
//
// Called as `push adjust; push buffer; call snap` (it pops both). It
// records every item as a qword into `buffer` and preserves all
// registers and flags. The recorded RSP is the caller's RSP before the
// two pushes plus `adjust`.

fn emit_snap(g: &mut Gen, items: &[SnapItem64]) -> R {
    let l = g.r.snap;
    g.export("snap", l)?;
    g.a.pushfq()?;
    for reg in SAVED {
        g.a.push(reg)?;
    }
    g.a.mov(rdi, qword_ptr(rsp + SNAP_BUFFER))?;
    for (idx, item) in items.iter().enumerate() {
        emit_source(g, &item.source)?;
        g.a.mov(qword_ptr(rdi + (idx as i32) * 8), rax)?;
    }
    for reg in SAVED.iter().rev() {
        g.a.pop(*reg)?;
    }
    g.a.popfq()?;
    g.a.ret_1(16)?;
    Ok(())
}

/// Leaves `(EDX << 32) | EAX` of `rdmsr(index)` in RAX.
fn rdmsr64(a: &mut CodeAssembler, index: u32) -> R {
    a.mov(ecx, index)?;
    a.rdmsr()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    Ok(())
}

fn emit_source(g: &mut Gen, source: &SnapSource64) -> R {
    use SnapSource64 as S;
    let (gdt, features) = (g.t.gdt, g.s.features);
    let a = &mut g.a;
    match source {
        S::Rbx => a.mov(rax, qword_ptr(rsp + saved_off(rbx)))?,
        S::Rbp => a.mov(rax, qword_ptr(rsp + saved_off(rbp)))?,
        S::R12 => a.mov(rax, qword_ptr(rsp + saved_off(r12)))?,
        S::R13 => a.mov(rax, qword_ptr(rsp + saved_off(r13)))?,
        S::R14 => a.mov(rax, qword_ptr(rsp + saved_off(r14)))?,
        S::R15 => a.mov(rax, qword_ptr(rsp + saved_off(r15)))?,
        S::Rsp => {
            a.lea(rax, ptr(rsp + SNAP_CALLER))?;
            a.add(rax, qword_ptr(rsp + SNAP_ADJUST))?;
        }
        S::Rflags => a.mov(rax, qword_ptr(rsp + SNAP_RFLAGS))?,
        S::Seg(seg) => {
            let reg = match seg {
                Seg::Cs => cs,
                Seg::Ds => ds,
                Seg::Es => es,
                Seg::Fs => fs,
                Seg::Gs => gs,
                Seg::Ss => ss,
            };
            a.xor(eax, eax)?;
            a.mov(ax, reg)?;
        }
        S::GdtrBase => g.load_table_reg(false, true)?,
        S::GdtrLimit => g.load_table_reg(false, false)?,
        S::IdtrBase => g.load_table_reg(true, true)?,
        S::IdtrLimit => g.load_table_reg(true, false)?,
        S::Ldtr => g.load_tr_ldtr(false)?,
        S::Tr => g.load_tr_ldtr(true)?,
        S::TssDescriptor { high } => {
            let off = u32::from(SEL64_TSS) + if *high { 8 } else { 0 };
            a.mov(rax, qword_ptr(gdt + off))?;
        }
        S::Cr(n) => g.load_cr(*n)?,
        S::Dr(n) => g.load_dr(*n)?,
        S::Msr(index) => {
            let mut absent = a.create_label();
            let mut done = a.create_label();
            let guarded = *index == MSR_SYSENTER_CS;
            if guarded {
                a.test(dword_ptr(features), FEATURE_SEP)?;
                a.jz(absent)?;
            }
            rdmsr64(a, *index)?;
            a.jmp(done)?;
            a.set_label(&mut absent)?;
            a.xor(eax, eax)?;
            a.set_label(&mut done)?;
            a.zero_bytes()?;
        }
        S::Mem32(addr) => {
            a.mov(rax, *addr)?;
            a.mov(eax, dword_ptr(rax))?;
        }
        S::Mem64(addr) => {
            a.mov(rax, *addr)?;
            a.mov(rax, qword_ptr(rax))?;
        }
        S::FsDword(off) | S::GsDword(off) => {
            let fs_side = matches!(source, S::FsDword(_));
            let (msr, want) = if fs_side {
                (MSR_FS_BASE, FS_BASE64)
            } else {
                (MSR_GS_BASE, GS_BASE64)
            };
            let mut bad = a.create_label();
            let mut done = a.create_label();
            rdmsr64(a, msr)?;
            a.mov(rcx, want)?;
            a.cmp(rax, rcx)?;
            a.jne(bad)?;
            if fs_side {
                a.mov(eax, dword_ptr(*off).fs())?;
            } else {
                a.mov(eax, dword_ptr(*off).gs())?;
            }
            a.jmp(done)?;
            a.set_label(&mut bad)?;
            a.mov(rax, u64::MAX)?;
            a.set_label(&mut done)?;
            a.zero_bytes()?;
        }
        S::Custom(emit) => emit(a)?,
    }
    Ok(())
}

/// Validates the builder, lays everything out, generates and assembles.
pub(super) fn build(mut b: HostKernelBuilder) -> Result<Testbed, BuildError> {
    // ---- validation -------------------------------------------------------
    let entry = super::validate(&b)?;
    let mode = b.mode;
    if let Some(it) = b.extra_items.first() {
        return Err(BuildError::ItemWidth {
            name: it.name.clone(),
            width: 32,
            mode,
        });
    }
    let mut items = super::default_items64(b.x2apic);
    if b.cr4_today {
        items.push(super::items::pkru_item());
    }
    if b.cet {
        items.push(SnapItem64::new(
            "s_cet",
            SnapSource64::Msr(super::MSR_S_CET),
        ));
    }
    items.append(&mut b.extra_items64);
    super::check_item_names(items.iter().map(|i| i.name.as_str()))?;
    for name in &b.skip {
        let it = items
            .iter_mut()
            .find(|it| &it.name == name)
            .ok_or_else(|| BuildError::UnknownItem(name.clone()))?;
        it.mask = 0;
    }

    // ---- page tables -------------------------------------------------------
    let mut map = super::host_page_map(&b)?;
    map.map64("FS/GS page", FS_BASE64, FS_PAGE_PHYS, PAGE, 0)?;
    let tables_pages = map.table_pages();
    let tables = map.layout(TABLES_BASE);
    super::check_addresses(&tables, &b, entry)?;

    // ---- data --------------------------------------------------------------
    // Each host CPU has its own tables ([`super::smp`]).
    let data_base = TABLES_BASE + b.cpus * tables_pages * PAGE;
    let mut d = DataArena::new(data_base);
    let smp = super::smp::alloc(&mut d, b.cpus)?;
    let n_items = items.len() as u32;
    let flat = |access: u8, flags: u8| descriptor(0, 0xfffff, access, flags);
    let mut gdt_entries = vec![
        0u64,
        flat(0x9a, 0xa), // SEL64_CODE: G, L
        flat(0x92, 0xc), // SEL64_DATA
        flat(0x92, 0xc), // SEL64_DATA_ALT
        0,               // SEL64_TSS (16 bytes, below)
        0,
        0, // SEL64_LDT (16 bytes, below)
        0,
        flat(0x9a, 0xc), // SEL64_CODE32: G, D
    ];
    if gdt_entries.len() * 8 != usize::from(super::SEL64_FIRST_EXTRA)
        || usize::from(SEL64_CODE32) != 8 * 8
    {
        return Err(BuildError::Internal("AMD64 GDT layout".into()));
    }
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
    let nmi_stack_bottom = d.zeroed(NMI_STACK_SIZE, 16);
    let nmi_stack_top = nmi_stack_bottom + NMI_STACK_SIZE as u32;
    let mut tss_bytes = [0u8; TSS64_SIZE];
    let ist = |n: u8| TSS64_IST1 + 8 * usize::from(n - 1);
    for (off, value) in [
        (TSS64_RSP0, stack_top),
        (ist(IST_EXC), exc_stack_top),
        (ist(IST_NMI), nmi_stack_top),
    ] {
        tss_bytes[off..off + 8].copy_from_slice(&u64::from(value).to_le_bytes());
    }
    tss_bytes[TSS64_IOMAP..TSS64_IOMAP + 2].copy_from_slice(&(TSS64_SIZE as u16).to_le_bytes());
    let tss = d.bytes(&tss_bytes, 16);
    let ok = d.write(
        gdt + u32::from(SEL64_TSS),
        &system_descriptor64(u64::from(tss), TSS64_SIZE as u32 - 1, 0x89),
    ) && d.write(
        gdt + u32::from(SEL64_LDT),
        &system_descriptor64(u64::from(ldt), 7, 0x82),
    );
    if !ok {
        return Err(BuildError::Internal("GDT outside the data area".into()));
    }
    let idt = d.zeroed(256 * 16, 16);
    let pseudo = |limit: u16, base: u32| {
        let mut p = [0u8; 10];
        p[..2].copy_from_slice(&limit.to_le_bytes());
        p[2..].copy_from_slice(&u64::from(base).to_le_bytes());
        p
    };
    let gdtr = d.bytes(&pseudo(gdt_limit, gdt), 16);
    let idtr = d.bytes(&pseudo(256 * 16 - 1, idt), 16);
    let masks: Vec<u8> = items.iter().flat_map(|i| i.mask.to_le_bytes()).collect();
    let names = items.iter().map(|i| i.name.as_str());
    let l = LoopTables::new(&mut d, &b.vcpus, &masks, names, 8)?;
    // The boot stub's refusals: constant texts, each with its CRC line.
    // LA57 is checked here too: setting CR4.LA57 without it raises #GP.
    let stub_checks: &[CpuFeature] = if b.la57 {
        &[CpuFeature::LongMode, CpuFeature::Pae, CpuFeature::La57]
    } else {
        &[CpuFeature::LongMode, CpuFeature::Pae]
    };
    let refusals: Vec<(CpuFeature, u32)> = stub_checks
        .iter()
        .copied()
        .map(|f| {
            let line = f.refusal_line();
            let crc = crate::transcript::crc32(line.as_bytes());
            (f, d.string(&format!("{line}{PREFIX}CRC crc32={crc:08x}\n")))
        })
        .collect();
    let s = Slots::new(&mut d, true);
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
        nmi_stack_top: Some(nmi_stack_top),
    };

    let mut g = Gen::new(CodeAssembler::new(64)?, d, s, t, l);
    super::smp::attach(&mut g, smp);

    // ---- code --------------------------------------------------------------
    emit_main(&mut g, &mut b, entry, n_items)?;
    super::smp::emit_ap_entry64(&mut g, &b, &|g| emit_cpu_setup(g, &b))?;
    g.emit_library()?;
    emit_snap(&mut g, &items)?;
    emit_vectors(&mut g, &b)?;
    let code = g.assemble(b.identity_limit)?;
    for (i, &handler) in code.vectors.iter().enumerate() {
        let ist = if i == 2 { IST_NMI } else { IST_EXC };
        let gate = interrupt_gate64(handler, SEL64_CODE, ist);
        if !g.d.write(g.t.idt + 16 * i as u32, &gate) {
            return Err(BuildError::Internal("IDT outside the data area".into()));
        }
    }
    // ---- boot stub (32-bit, paging off) -----------------------------------------
    let (stub, ap_stub) = boot_stub(&b, &g, &tables, gdtr, &code, &refusals)?;
    super::smp::finish_copies(
        &mut g,
        &mut b,
        &map,
        tables_pages,
        code.base,
        code.end(),
        ap_stub,
    )?;

    let mut fs_page = vec![0u8; PAGE as usize];
    fs_page[..4].copy_from_slice(&FS_MAGIC.to_le_bytes());
    let gs_off = GS_MAGIC_OFF as usize;
    fs_page[gs_off..gs_off + 4].copy_from_slice(&GS_MAGIC.to_le_bytes());
    let items = items.into_iter().map(|i| i.name).collect();
    finish(g, b, code, stub, fs_page, tables, items)
}

/// The 32-bit boot stub (paging off): saves the multiboot registers, checks
/// CPUID for PAE and long mode (printing a constant `NOCPU` and `CRC` line
/// and failing without them), turns on long mode and far-jumps to the
/// 64-bit `start`. With several CPUs the application processors' 32-bit
/// stub follows ([`super::smp::emit_ap_stub32`]); its address is returned
/// with the bytes.
fn boot_stub(
    b: &HostKernelBuilder,
    g: &Gen,
    tables: &crate::paging::PageTables,
    gdtr: u32,
    code: &super::common::Code,
    refusals: &[(CpuFeature, u32)],
) -> R<(Vec<u8>, Option<u32>)> {
    let symbol = |name: &str| {
        code.symbols
            .get(name)
            .copied()
            .ok_or_else(|| BuildError::Internal(format!("the 64-bit kernel has no {name} label")))
    };
    let start64 = symbol("start")?;
    let mut stub = CodeAssembler::new(32)?;
    let mut labels = Vec::new();
    stub.cli()?;
    stub.cld()?;
    stub.mov(dword_ptr(g.s.mb_eax), eax)?;
    stub.mov(dword_ptr(g.s.mb_ebx), ebx)?;
    for &(f, msg) in refusals {
        let (leaf, reg, bit) = f.cpuid();
        let missing = stub.create_label();
        if leaf >= 0x8000_0000 {
            stub.mov(eax, 0x8000_0000u32)?;
            stub.cpuid()?;
            stub.cmp(eax, leaf)?;
            stub.jb(missing)?;
        }
        stub.mov(eax, leaf)?;
        stub.xor(ecx, ecx)?;
        stub.cpuid()?;
        let r = match reg {
            super::CpuidReg::Ebx => ebx,
            super::CpuidReg::Ecx => ecx,
            super::CpuidReg::Edx => edx,
        };
        stub.test(r, 1u32 << bit)?;
        stub.jz(missing)?;
        labels.push((missing, msg));
    }
    stub.lgdt(ptr(gdtr))?;
    let mut cr4_bits = Cr4::PAE | Cr4::PGE | Cr4::OSFXSR | Cr4::OSXMMEXCPT;
    if b.pse {
        cr4_bits |= Cr4::PSE;
    }
    // 5-level paging is chosen here, with paging off: CR4.LA57 cannot
    // change in IA-32e mode.
    if b.la57 {
        cr4_bits |= Cr4::LA57;
    }
    stub.mov(eax, cr4)?;
    stub.or(eax, cr4_bits.bits() as u32)?;
    stub.mov(cr4, eax)?;
    stub.mov(eax, tables.cr3)?;
    stub.mov(cr3, eax)?;
    stub.mov(ecx, MSR_EFER)?;
    stub.rdmsr()?;
    stub.or(eax, Efer::LME.bits() as u32)?;
    stub.wrmsr()?;
    let cr0_bits = Cr0::PG | Cr0::WP | Cr0::NE | Cr0::MP | Cr0::ET | Cr0::PE;
    stub.mov(eax, cr0)?;
    stub.or(eax, cr0_bits.bits() as u32)?;
    stub.mov(cr0, eax)?;
    stub.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1632,
        SEL64_CODE,
        start64,
    )?)?;
    // A missing feature: ESI = the refusal text.
    let mut say = stub.create_label();
    for (mut missing, msg) in labels {
        stub.set_label(&mut missing)?;
        stub.mov(esi, msg)?;
        stub.jmp(say)?;
    }
    stub.set_label(&mut say)?;
    for (port, value) in super::common::SERIAL_INIT {
        stub.mov(dx, u32::from(COM1 + port))?;
        stub.mov(al, u32::from(value))?;
        stub.out(dx, al)?;
    }
    let mut next = stub.create_label();
    let mut wait = stub.create_label();
    let mut done = stub.create_label();
    stub.set_label(&mut next)?;
    stub.mov(dx, u32::from(COM1 + 5))?;
    stub.set_label(&mut wait)?;
    stub.in_(al, dx)?;
    stub.test(al, 0x20)?;
    stub.jz(wait)?;
    stub.lodsb()?;
    stub.test(al, al)?;
    stub.jz(done)?;
    stub.mov(dx, u32::from(COM1))?;
    stub.out(dx, al)?;
    stub.jmp(next)?;
    stub.set_label(&mut done)?;
    stub.mov(eax, EXIT_FAIL)?;
    stub.mov(dx, u32::from(DEBUG_EXIT_PORT))?;
    stub.out(dx, eax)?;
    let mut halt = stub.create_label();
    stub.set_label(&mut halt)?;
    stub.hlt()?;
    stub.jmp(halt)?;
    let mut ap_stub = stub.create_label();
    if g.smp.is_some() {
        stub.set_label(&mut ap_stub)?;
        let (cr4_on, cr0_on) = (cr4_bits.bits() as u32, cr0_bits.bits() as u32);
        super::smp::emit_ap_stub32(&mut stub, g, cr4_on, cr0_on, symbol("ap_entry")?)?;
    }
    let res = stub.assemble_options(
        u64::from(STUB_ADDR),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let ap_stub = match g.smp {
        Some(_) => Some(res.label_ip(&ap_stub)? as u32),
        None => None,
    };
    Ok((res.inner.code_buffer, ap_stub))
}

/// Setup, the call loop and the summary, from `start`, the first 64-bit
/// instruction.
fn emit_main(g: &mut Gen, b: &mut HostKernelBuilder, entry: u64, n_items: u32) -> R {
    let start = g.a.create_label();
    g.export("start", start)?;
    g.a.mov(ax, u32::from(SEL64_DATA))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.mov(rsp, u64::from(g.t.stack_top))?;
    g.phase(Phase::Setup)?;
    g.a.call(g.r.serial_init)?;
    g.text(&format!("{PREFIX}BOOT mode={} mbeax=", b.mode))?;
    g.hex_mem(g.s.mb_eax)?;
    g.text(&super::common::boot_tail(b, n_items, entry, 16))?;
    let required = b.required_cpu();
    super::common::emit_cpu_check(g, &required, &b.forbidden_cpu())?;

    // Legacy PIC: mask everything (LINT0 goes to NMI mode below).
    g.mask_pic()?;

    emit_cpu_setup(g, b)?;

    // HOST, HOST64 and APIC lines.
    g.host_crs()?;
    field_msr(g, "efer", MSR_EFER)?;
    g.field_sysenter_cs()?;
    g.text(" magic=")?;
    g.a.mov(ebx, MAGIC_VIRT)?;
    g.a.mov(eax, dword_ptr(rbx))?;
    g.a.call(g.r.puthex)?;
    g.text(" fs0=")?;
    g.a.mov(eax, dword_ptr(0).fs())?;
    g.a.call(g.r.puthex)?;
    g.field_hex("features", g.s.features)?;
    g.a.call(g.r.putnl)?;
    g.text(&format!("{PREFIX}HOST64"))?;
    for (key, msr) in [
        ("fs_base", MSR_FS_BASE),
        ("gs_base", MSR_GS_BASE),
        ("kernel_gs_base", MSR_KERNEL_GS_BASE),
        ("star", MSR_STAR),
        ("lstar", MSR_LSTAR),
        ("sfmask", MSR_SFMASK),
    ] {
        field_msr(g, key, msr)?;
    }
    g.text(" cr8=")?;
    g.a.mov(rax, cr8)?;
    g.a.call(g.r.puthex64)?;
    g.a.call(g.r.putnl)?;
    emit_apic_line(g, b.x2apic)?;
    super::storm::emit_setup(g, b)?;

    super::smp::emit_start_aps(g, b)?;
    emit_loop(g, b, n_items, &mut |g| emit_call(g, entry))
}

/// Every CPU's set-up in long mode: descriptor tables, FS/GS and their
/// bases, CPUID features, EFER bits, today's CR4, PCID, CET, the SYSENTER
/// and SYSCALL MSRs, CR8 and the local APIC.
fn emit_cpu_setup(g: &mut Gen, b: &HostKernelBuilder) -> R {
    // Descriptor tables, FS/GS and their bases.
    g.a.lidt(ptr(g.t.idtr))?;
    g.a.mov(ax, u32::from(SEL64_TSS))?;
    g.a.ltr(ax)?;
    g.a.mov(ax, u32::from(SEL64_LDT))?;
    g.a.lldt(ax)?;
    g.load_fs_gs()?;

    // CPUID features; EFER.NXE / EFER.SCE as a real host has them (LME and
    // LMA are on already).
    emit_cpuid_features(g)?;
    g.set_efer_bits()?;
    if b.cr4_today {
        emit_cr4_today(g)?;
    }
    if b.pcid {
        emit_pcid(g)?;
    }
    if b.cet {
        // CR0.WP is set already: CR4.CET cannot be set without it.
        g.a.mov(rax, cr4)?;
        g.a.or(eax, super::CR4_CET as i32)?;
        g.a.mov(cr4, rax)?;
    }

    // SYSENTER_CS, the SYSCALL MSRs, CR8.
    let mut no_sep = g.a.create_label();
    g.unless_feature(FEATURE_SEP, no_sep)?;
    g.wrmsr_const(MSR_SYSENTER_CS, u64::from(SEL64_CODE))?;
    g.mark(&mut no_sep)?;
    let mut no_sce = g.a.create_label();
    g.unless_feature(FEATURE_SCE, no_sce)?;
    g.wrmsr_const(MSR_STAR, STAR_VALUE)?;
    g.wrmsr_const(MSR_LSTAR, LSTAR_VALUE)?;
    g.wrmsr_const(MSR_SFMASK, SFMASK_VALUE)?;
    g.mark(&mut no_sce)?;
    g.a.xor(eax, eax)?;
    g.a.mov(cr8, rax)?;

    // Local APIC.
    emit_apic_setup(g, b.x2apic)
}

/// Today's CR4: SMEP, SMAP, UMIP, PKE and FSGSBASE on (the CPU check made
/// sure the CPU has them), then PKRU = [`super::PKRU_TODAY`]. Clobbers RAX,
/// RCX, RDX.
fn emit_cr4_today(g: &mut Gen) -> R {
    g.a.mov(rax, cr4)?;
    g.a.mov(rcx, super::CR4_TODAY)?;
    g.a.or(rax, rcx)?;
    g.a.mov(cr4, rax)?;
    g.a.mov(eax, super::PKRU_TODAY)?;
    g.a.xor(ecx, ecx)?;
    g.a.xor(edx, edx)?;
    g.a.wrpkru()?;
    Ok(())
}

/// CR4.PCIDE on, then CR3 with [`super::HOST_PCID`]: PCIDE can be set only
/// in IA-32e mode with CR3 bits 11:0 clear (else #GP), which holds here since the
/// boot stub loaded a page-aligned root. Clobbers RAX, RCX.
fn emit_pcid(g: &mut Gen) -> R {
    g.a.mov(rax, cr4)?;
    g.a.or(eax, Cr4::PCIDE.bits() as i32)?;
    g.a.mov(cr4, rax)?;
    g.a.mov(rax, cr3)?;
    g.a.or(rax, super::HOST_PCID as i32)?;
    g.a.mov(cr3, rax)?;
    Ok(())
}

/// Prints ` key=` and the MSR as 16 hex digits. Clobbers RAX, RCX, RDX.
fn field_msr(g: &mut Gen, key: &str, msr: u32) -> R {
    g.text(&format!(" {key}="))?;
    rdmsr64(&mut g.a, msr)?;
    g.a.call(g.r.puthex64)?;
    Ok(())
}

/// Loads RBX, RBP and R12–R15 with the call's patterns, takes the first
/// snapshot, calls `u32 entry(u64 arg1 /* RDI */, u32 arg2 /* ESI */)`
/// between two RDTSCs, takes the second snapshot and stores the delta and
/// the return value.
fn emit_call(g: &mut Gen, entry: u64) -> R {
    // (b) patterns in the callee-saved registers, snapshot.
    g.phase(Phase::Snapshot)?;
    g.a.mov(eax, dword_ptr(g.s.cookie))?;
    g.a.mov(edx, eax)?;
    g.a.not(edx)?;
    g.a.shl(rax, 32)?;
    g.a.or(rax, rdx)?;
    for (reg, pattern) in [
        (rbx, PATTERN_RBX),
        (rbp, PATTERN_RBP),
        (r12, PATTERN_R12),
        (r13, PATTERN_R13),
        (r14, PATTERN_R14),
        (r15, PATTERN_R15),
    ] {
        g.a.mov(reg, pattern)?;
        g.a.xor(reg, rax)?;
    }
    g.a.cld()?;
    g.a.sti()?;
    g.a.push(0)?;
    g.a.push(g.l.snap_before as i32)?;
    g.a.call(g.r.snap)?;
    super::storm::emit_before_call(g)?;
    super::smp::emit_enter(g)?;

    // (c) the call: u32 entry(u64 arg1 /* RDI */, u32 arg2 /* ESI */), timed.
    g.a.mov(rdi, qword_ptr(g.s.arg1))?;
    g.a.mov(esi, dword_ptr(g.s.arg2))?;
    g.a.mov(r11, entry)?;
    g.phase(Phase::Call)?;
    g.a.rdtsc()?;
    g.a.mov(dword_ptr(g.s.tsc0), eax)?;
    g.a.mov(dword_ptr(g.s.tsc0 + 4), edx)?;
    let call_site = g.a.create_label();
    g.export("call_site", call_site)?;
    g.a.call(r11)?;
    let after_call = g.a.create_label();
    g.export("after_call", after_call)?;
    g.a.push(rax)?;
    g.a.rdtsc()?;
    g.a.shl(rdx, 32)?;
    g.a.or(rax, rdx)?;
    g.a.push(rax)?;
    g.phase(Phase::Snapshot)?;
    // Extra bytes since the call site's RSP: return value + TSC.
    g.a.push(16)?;
    g.a.push(g.l.snap_after as i32)?;
    g.a.call(g.r.snap)?;

    // Back to the kernel's data segments (FS and GS after the report).
    g.a.mov(ax, u32::from(SEL64_DATA))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.cld()?;
    g.phase(Phase::Check)?;
    super::smp::emit_leave(g)?;
    g.a.pop(rax)?;
    g.a.sub(rax, qword_ptr(g.s.tsc0))?;
    g.a.mov(rcx, rax)?;
    g.a.shr(rcx, 32)?;
    let mut small = g.a.create_label();
    g.a.jz(small)?;
    g.a.mov(eax, u32::MAX)?;
    g.mark(&mut small)?;
    g.a.mov(dword_ptr(g.s.delta), eax)?;
    g.a.pop(rax)?;
    g.a.mov(dword_ptr(g.s.ret), eax)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_and_system_descriptors_match_the_sdm_layout() {
        let g = interrupt_gate64(0xffff_8000_1234_5678, 0x08, 1);
        assert_eq!(&g[0..2], &0x5678u16.to_le_bytes());
        assert_eq!(&g[2..4], &8u16.to_le_bytes());
        assert_eq!((g[4], g[5]), (1, 0x8e));
        assert_eq!(&g[6..8], &0x1234u16.to_le_bytes());
        assert_eq!(&g[8..12], &0xffff_8000u32.to_le_bytes());
        assert_eq!(&g[12..16], &[0; 4]);
        let d = system_descriptor64(0x0000_0001_0020_3040, 103, 0x89);
        let lo = u64::from_le_bytes(d[..8].try_into().unwrap_or_default());
        assert_eq!(lo & 0xffff, 103);
        assert_eq!((lo >> 16) & 0xff_ffff, 0x20_3040);
        assert_eq!((lo >> 40) & 0xff, 0x89);
        assert_eq!(&d[8..12], &1u32.to_le_bytes());
    }

    #[test]
    fn snapshot_frame_offsets() {
        assert_eq!(saved_off(r15), 0);
        assert_eq!(saved_off(rax), 14 * 8);
        assert_eq!(saved_off(rbx), 11 * 8);
        assert_eq!(SNAP_RFLAGS, 120);
        assert_eq!(SNAP_BUFFER, 136);
        assert_eq!(SNAP_CALLER, 152);
    }
}
