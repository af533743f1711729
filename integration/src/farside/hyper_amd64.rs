//! The code the 64-bit hypervisor context runs: the RC code the
//! `amd64-to-amd64` switcher enters under `Hyper.cr3`. It is the 64-bit
//! counterpart of [`super::hyper_legacy`], with the same mailbox,
//! expectations and failure bits (CS must be the 64-bit hyper selector and
//! EFER.LMA set; CR4.PAE is expected on). Its `#NM` handler does the lazy FPU
//! switch; its trampoline targets take System V arguments. The checks and
//! the `#NM` handler are [`super::hyper`]'s, emitted at 64-bit width.

use core::mem::offset_of;

use iced_x86::code_asm::*;

use super::common::{emit_exception_reporter64, emit_nmi_counter};
use super::hyper::{
    emit_checks, emit_lazy_fpu_switch, finish, RcConfig, RcEntries, RcMailbox, MAX_TARGET_ARGS,
};
use super::FarError;

/// Assembles the 64-bit RC code into a blob of `area_size` bytes for `cfg.rc`
/// (`cfg.cs` is the 64-bit hyper code selector).
///
/// # Errors
/// [`FarError`] when iced rejects an instruction or the area is too small.
pub fn build(cfg: &RcConfig, area_size: usize) -> Result<(Vec<u8>, RcEntries), FarError> {
    let mut a = CodeAssembler::new(64)?;
    let mut entry = a.create_label();
    let mut handlers: Vec<CodeLabel> = (0..32).map(|_| a.create_label()).collect();
    let mut targets: Vec<CodeLabel> = (0..=MAX_TARGET_ARGS).map(|_| a.create_label()).collect();
    let field = |f: usize| dword_ptr(rdi + f as i32);

    emit_checks(&mut a, cfg, &mut entry, true)?;
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
    emit_lazy_fpu_switch(&mut a, cfg, true)?;
    let mbox = cfg.rc + cfg.mailbox_off;
    emit_nmi_counter(
        &mut a,
        &mut handlers[2],
        mbox + offset_of!(RcMailbox, nmis) as u32,
        mbox + offset_of!(RcMailbox, nmi_ip) as u32,
    )?;
    emit_exception_reporter64(
        &mut a,
        &mut handlers,
        &[2, 7],
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

    finish(a, cfg, area_size, &entry, &handlers, &targets)
}
