//! The code the AMD64 → AMD64 switcher enters in its 64-bit hypervisor
//! context: the 64-bit counterpart of [`crate::rc`], with the same mailbox,
//! expectations and failure bits (CS must be the 64-bit hyper selector and
//! EFER.LMA set; CR4.PAE is expected on). Its `#NM` handler does the lazy FPU
//! switch; its trampoline targets take System V arguments.

use core::mem::{offset_of, size_of};

use cpum::layout as l;
use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER, MSR_SYSENTER_CS};
use cpum::{CpumCpu64, UseFlags};
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use crate::far::{emit_exception_reporter64, FarError};
use crate::rc::{
    ebp_magic, expect, fail, RcConfig, RcEntries, RcMailbox, MAX_TARGET_ARGS, RET_XOR,
};

const LVTS: [u32; 4] = [
    apic::reg::LVT_LINT0,
    apic::reg::LVT_LINT1,
    apic::reg::LVT_PC,
    apic::reg::LVT_THMR,
];

fn mb(f: usize) -> i32 {
    f as i32
}

fn cc(f: usize) -> i32 {
    f as i32
}

/// Assembles the 64-bit RC code into a blob of `area_size` bytes for `cfg.rc`
/// (`cfg.cs` is the 64-bit hyper code selector).
///
/// # Errors
/// [`FarError`] when iced rejects an instruction or the area is too small.
pub fn build(cfg: &RcConfig, area_size: usize) -> Result<(Vec<u8>, RcEntries), FarError> {
    let mbox = u64::from(cfg.rc + cfg.mailbox_off);
    let mut a = CodeAssembler::new(64)?;
    let mut entry = a.create_label();
    let mut handlers: Vec<CodeLabel> = (0..32).map(|_| a.create_label()).collect();
    let mut targets: Vec<CodeLabel> = (0..=MAX_TARGET_ARGS).map(|_| a.create_label()).collect();
    let scratch = |i: usize| dword_ptr(rdi + mb(offset_of!(RcMailbox, scratch) + 4 * i));
    let fail_bit = |a: &mut CodeAssembler, bit: u32| {
        a.or(dword_ptr(rdi + mb(offset_of!(RcMailbox, scratch))), bit)
    };
    let field = |f: usize| dword_ptr(rdi + mb(f));

    a.set_label(&mut entry)?;
    a.add(field(offset_of!(RcMailbox, calls)), 1)?;
    a.mov(scratch(0), 0u32)?;
    let mut ok = a.create_label();
    a.mov(rax, cr3)?;
    a.mov(field(offset_of!(RcMailbox, cr3)), eax)?;
    a.cmp(rax, qword_ptr(rsi + cc(l::HYPER_CR3)))?;
    a.je(ok)?;
    fail_bit(&mut a, fail::CR3)?;
    a.set_label(&mut ok)?;
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    for (reg, want) in [
        (cs, cfg.cs),
        (ds, cfg.ds),
        (es, cfg.ds),
        (ss, cfg.ds),
        (fs, 0),
        (gs, 0),
    ] {
        a.mov(eax, reg)?;
        a.cmp(ax, u32::from(want))?;
        a.jne(bad)?;
    }
    a.jmp(ok)?;
    a.set_label(&mut bad)?;
    fail_bit(&mut a, fail::SEGS)?;
    a.set_label(&mut ok)?;
    let mut ok = a.create_label();
    a.str(eax)?;
    a.mov(field(offset_of!(RcMailbox, tr)), eax)?;
    a.cmp(ax, word_ptr(rsi + cc(l::HYPER_TR)))?;
    a.je(ok)?;
    fail_bit(&mut a, fail::TR)?;
    a.set_label(&mut ok)?;
    let mut ok = a.create_label();
    a.mov(rax, cr0)?;
    a.mov(field(offset_of!(RcMailbox, cr0)), eax)?;
    a.and(eax, (Cr0::PG | Cr0::PE | Cr0::TS | Cr0::WP).bits() as u32)?;
    a.cmp(eax, (Cr0::PG | Cr0::PE | Cr0::TS).bits() as u32)?;
    a.je(ok)?;
    fail_bit(&mut a, fail::CR0)?;
    a.set_label(&mut ok)?;
    let mut ok = a.create_label();
    a.mov(rax, cr4)?;
    a.mov(field(offset_of!(RcMailbox, cr4)), eax)?;
    a.and(eax, Cr4::PAE.bits() as u32)?;
    a.shr(eax, Cr4::PAE.bits().trailing_zeros())?;
    a.cmp(eax, field(offset_of!(RcMailbox, want_pae)))?;
    a.je(ok)?;
    fail_bit(&mut a, fail::CR4_PAE)?;
    a.set_label(&mut ok)?;
    let mut ok = a.create_label();
    a.pushfq()?;
    a.pop(rax)?;
    a.mov(field(offset_of!(RcMailbox, eflags)), eax)?;
    a.test(eax, cpum::regs::Eflags::IF.bits() as u32)?;
    a.jz(ok)?;
    fail_bit(&mut a, fail::IF)?;
    a.set_label(&mut ok)?;
    let mut ok = a.create_label();
    a.mov(ecx, MSR_SYSENTER_CS)?;
    a.rdmsr()?;
    a.mov(field(offset_of!(RcMailbox, sysenter_cs)), eax)?;
    a.test(eax, eax)?;
    a.jz(ok)?;
    fail_bit(&mut a, fail::SYSENTER)?;
    a.set_label(&mut ok)?;
    // EFER: long mode active, SCE parked.
    let mut ok = a.create_label();
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.mov(field(offset_of!(RcMailbox, efer)), eax)?;
    a.and(eax, (Efer::SCE | Efer::LMA).bits() as u32)?;
    a.cmp(eax, Efer::LMA.bits() as u32)?;
    a.je(ok)?;
    fail_bit(&mut a, fail::SCE)?;
    a.set_label(&mut ok)?;
    let mut no_apic = a.create_label();
    a.test(field(offset_of!(RcMailbox, expect)), expect::APIC)?;
    a.jz(no_apic)?;
    for (i, reg) in LVTS.iter().enumerate() {
        let mut ok = a.create_label();
        let mut mmio = a.create_label();
        let mut have = a.create_label();
        a.test(
            dword_ptr(rdi + mb(offset_of!(RcMailbox, expect))),
            expect::X2APIC,
        )?;
        a.jz(mmio)?;
        a.mov(ecx, apic::x2apic_msr(*reg))?;
        a.rdmsr()?;
        a.jmp(have)?;
        a.set_label(&mut mmio)?;
        a.mov(ecx, cfg.apic)?;
        a.mov(eax, dword_ptr(rcx + *reg as i32))?;
        a.set_label(&mut have)?;
        a.mov(field(offset_of!(RcMailbox, lvt) + 4 * i), eax)?;
        a.test(eax, apic::lvt::MASKED)?;
        a.jnz(ok)?;
        fail_bit(&mut a, fail::LVT)?;
        a.set_label(&mut ok)?;
    }
    let mut ok = a.create_label();
    a.mov(eax, dword_ptr(rsi + cc(l::APIC_DIS_VECTORS)))?;
    a.mov(field(offset_of!(RcMailbox, dis_seen)), eax)?;
    a.cmp(eax, field(offset_of!(RcMailbox, want_dis)))?;
    a.je(ok)?;
    fail_bit(&mut a, fail::DIS_VECTORS)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    a.set_label(&mut no_apic)?;
    let mut no_dbg = a.create_label();
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    a.test(field(offset_of!(RcMailbox, expect)), expect::DBG)?;
    a.jz(no_dbg)?;
    for (n, dr) in [(0usize, dr0), (1, dr1), (2, dr2), (3, dr3), (7, dr7)] {
        a.mov(rax, dr)?;
        a.cmp(rax, qword_ptr(rsi + cc(l::HYPER_DR + 8 * n)))?;
        a.jne(bad)?;
    }
    a.jmp(ok)?;
    a.set_label(&mut bad)?;
    fail_bit(&mut a, fail::DR)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    a.set_label(&mut no_dbg)?;
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    let guest_r0 = cc(offset_of!(CpumCpu64, guest.r));
    a.mov(rax, rbp)?;
    a.shr(rax, 16)?;
    a.cmp(rax, (ebp_magic(0) >> 16) as i32)?;
    a.jne(bad)?;
    a.cmp(rbx, qword_ptr(rsi + guest_r0))?;
    a.je(ok)?;
    a.set_label(&mut bad)?;
    fail_bit(&mut a, fail::REGS)?;
    a.set_label(&mut ok)?;
    a.inc(rbx)?;
    a.mov(qword_ptr(rsi + guest_r0), rbx)?;
    let mut no_fpu = a.create_label();
    a.test(field(offset_of!(RcMailbox, expect)), expect::FPU)?;
    a.jz(no_fpu)?;
    {
        let mut trapped = a.create_label();
        let mut loaded = a.create_label();
        a.mov(eax, field(offset_of!(RcMailbox, nm_count)))?;
        a.mov(scratch(1), eax)?;
        a.fnstcw(word_ptr(rdi + mb(offset_of!(RcMailbox, scratch) + 8)))?;
        a.mov(eax, field(offset_of!(RcMailbox, nm_count)))?;
        a.cmp(eax, scratch(1))?;
        a.jne(trapped)?;
        fail_bit(&mut a, fail::NO_NM)?;
        a.set_label(&mut trapped)?;
        a.movzx(eax, word_ptr(rdi + mb(offset_of!(RcMailbox, scratch) + 8)))?;
        a.movzx(
            ecx,
            word_ptr(rsi + cc(l::GUEST_FPU + offset_of!(cpum::FxSaveArea, fcw))),
        )?;
        a.cmp(eax, ecx)?;
        a.je(loaded)?;
        fail_bit(&mut a, fail::FPU_LOAD)?;
        a.set_label(&mut loaded)?;
        a.mov(eax, field(offset_of!(RcMailbox, cookie)))?;
        a.and(eax, 0x0c00)?;
        a.xor(eax, u32::from(cpum::FxSaveArea::FCW_INIT))?;
        a.mov(field(offset_of!(RcMailbox, guest_fcw)), eax)?;
        a.fldcw(word_ptr(rdi + mb(offset_of!(RcMailbox, guest_fcw))))?;
    }
    a.set_label(&mut no_fpu)?;
    let mut clean = a.create_label();
    a.mov(eax, scratch(0))?;
    a.test(eax, eax)?;
    a.jz(clean)?;
    a.or(field(offset_of!(RcMailbox, fails)), eax)?;
    a.cmp(field(offset_of!(RcMailbox, first_fail_cookie)), 0)?;
    a.jne(clean)?;
    a.mov(ecx, field(offset_of!(RcMailbox, cookie)))?;
    a.mov(field(offset_of!(RcMailbox, first_fail_cookie)), ecx)?;
    a.set_label(&mut clean)?;
    a.shl(eax, 16)?;
    a.xor(eax, field(offset_of!(RcMailbox, cookie)))?;
    a.xor(eax, RET_XOR)?;
    // Every other trip (cookie bit 8) leaves through the C-callable exit
    // (System V: the status in EDI); resumed, the call returns here.
    let mut asm_exit = a.create_label();
    a.test(field(offset_of!(RcMailbox, cookie)), 0x100)?;
    a.jz(asm_exit)?;
    a.add(field(offset_of!(RcMailbox, c_exits)), 1)?;
    a.mov(r11d, field(offset_of!(RcMailbox, c_exit_entry)))?;
    a.push(rdi)?;
    a.mov(edi, eax)?;
    a.call(r11)?;
    a.pop(rdi)?;
    a.jmp(entry)?;
    a.set_label(&mut asm_exit)?;
    a.mov(r11d, field(offset_of!(RcMailbox, exit_entry)))?;
    a.call(r11)?;
    a.jmp(entry)?;

    // #NM: the lazy FPU switch; every other vector is reported.
    a.set_label(&mut handlers[7])?;
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.mov(edx, cfg.cpum_rc)?;
    a.str(ecx)?;
    a.movzx(ecx, cx)?;
    a.sub(ecx, dword_ptr(rdx + cc(l::CPUM_HYPER_TSS_SEL0)))?;
    a.shr(ecx, cpum::HYPER_TSS_STRIDE_SHIFT)?;
    a.imul_2(ecx, dword_ptr(rdx + cc(l::CPUM_CB_CPUMCPU)))?;
    a.add(ecx, dword_ptr(rdx + cc(l::CPUM_OFF_CPUMCPU0)))?;
    a.add(rdx, rcx)?;
    a.mov(rax, cr0)?;
    a.and(rax, !(Cr0::TS.bits() as u32) as i32)?;
    a.mov(cr0, rax)?;
    a.fxsave(ptr(rdx + cc(l::HOST32_FPU)))?;
    a.fxrstor(ptr(rdx + cc(l::GUEST_FPU)))?;
    a.or(dword_ptr(rdx + cc(l::USE_FLAGS)), UseFlags::USED_FPU.bits())?;
    a.mov(ecx, mbox as u32)?;
    a.add(dword_ptr(rcx + mb(offset_of!(RcMailbox, nm_count))), 1)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.iretq()?;
    emit_exception_reporter64(
        &mut a,
        &mut handlers,
        &[7],
        cfg.com1,
        cfg.exit_port,
        cfg.exit_code,
    )?;
    // Trampoline targets: System V arguments in EDI, ESI, EDX, ECX, R8D, R9D.
    for (n, t) in targets.iter_mut().enumerate() {
        a.set_label(t)?;
        a.mov(eax, 0x7ab0_0000 | n as u32)?;
        for (i, r) in [edi, esi, edx, ecx, r8d, r9d]
            .into_iter()
            .take(n)
            .enumerate()
        {
            a.imul_3(r10d, r, i as i32 + 1)?;
            a.add(eax, r10d)?;
        }
        a.ret()?;
    }

    let res = a.assemble_options(
        u64::from(cfg.rc),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let code = &res.inner.code_buffer;
    let need = cfg.mailbox_off as usize + size_of::<RcMailbox>();
    if code.len() > cfg.mailbox_off as usize || area_size < need {
        return Err(FarError::TooSmall {
            need: need.max(code.len()),
            have: area_size,
        });
    }
    let mut blob = vec![0u8; area_size];
    blob[..code.len()].copy_from_slice(code);
    for (field, value) in [
        (offset_of!(RcMailbox, exit_entry), cfg.exit_rc),
        (offset_of!(RcMailbox, c_exit_entry), cfg.c_exit_rc),
    ] {
        let slot = cfg.mailbox_off as usize + field;
        blob[slot..slot + 4].copy_from_slice(&value.to_le_bytes());
    }
    let ip = |l: &CodeLabel| res.label_ip(l).map(|v| v as u32);
    Ok((
        blob,
        RcEntries {
            entry: ip(&entry)?,
            handlers: handlers.iter().map(ip).collect::<Result<_, _>>()?,
            targets: targets.iter().map(ip).collect::<Result<_, _>>()?,
        },
    ))
}
