//! The code the 32-bit/PAE hypervisor context runs: the RC code the
//! `32-to-32`, `32-to-pae`, `pae-to-32`, `pae-to-pae`, `amd64-to-32` and
//! `amd64-to-pae` switchers enter with `iret` under `Hyper.cr3`.
//!
//! Each trip it makes the checks of [`super::hyper`] at 32-bit width, then
//! leaves through the switcher's assembly exit or, every other trip (cookie
//! bit 8), its C-callable exit (cdecl, the status on the stack). Its `#NM`
//! handler does the lazy FPU switch; every other exception is reported on
//! COM1. It also holds the cdecl target functions for the call trampoline.

use core::mem::offset_of;

use iced_x86::code_asm::*;

use super::common::{emit_exception_report, emit_exception_stub, emit_nmi_counter, ReporterRegs};
use super::hyper::{
    emit_checks, emit_lazy_fpu_switch, finish, RcConfig, RcEntries, RcMailbox, MAX_TARGET_ARGS,
};
use super::FarError;

/// Assembles the RC code into a blob of `area_size` bytes for `cfg.rc`.
///
/// # Errors
/// [`FarError`] when iced rejects an instruction or the area is too small.
pub fn build(cfg: &RcConfig, area_size: usize) -> Result<(Vec<u8>, RcEntries), FarError> {
    let mbox = cfg.rc + cfg.mailbox_off;
    let mut a = CodeAssembler::new(32)?;
    let mut entry = a.create_label();
    let mut handlers: Vec<CodeLabel> = (0..32).map(|_| a.create_label()).collect();
    let mut targets: Vec<CodeLabel> = (0..=MAX_TARGET_ARGS).map(|_| a.create_label()).collect();
    let mut common = a.create_label();

    emit_checks(&mut a, cfg, &mut entry, false)?;
    // Every other trip (cookie bit 8) leaves through the C-callable exit
    // (cdecl: the status on the stack); resumed, the call returns here.
    let mut asm_exit = a.create_label();
    a.test(dword_ptr(edi + offset_of!(RcMailbox, cookie) as i32), 0x100)?;
    a.jz(asm_exit)?;
    a.add(dword_ptr(edi + offset_of!(RcMailbox, c_exits) as i32), 1)?;
    a.push(eax)?;
    a.call(dword_ptr(mbox + offset_of!(RcMailbox, c_exit_entry) as u32))?;
    a.add(esp, 4)?;
    a.jmp(entry)?;
    a.set_label(&mut asm_exit)?;
    a.call(dword_ptr(mbox + offset_of!(RcMailbox, exit_entry) as u32))?;
    a.jmp(entry)?;

    // Exception handlers: #NM does the lazy FPU switch; the rest report and stop.
    for (v, h) in handlers.iter_mut().enumerate() {
        if v == 7 {
            a.set_label(h)?;
            emit_lazy_fpu_switch(&mut a, cfg, false)?;
        } else if v == 2 {
            emit_nmi_counter(
                &mut a,
                h,
                mbox + offset_of!(RcMailbox, nmis) as u32,
                mbox + offset_of!(RcMailbox, nmi_ip) as u32,
            )?;
        } else {
            emit_exception_stub(&mut a, h, v, common)?;
        }
    }
    let regs = ReporterRegs {
        ax: eax,
        cx: ecx,
        dx: edx,
        sp: esp,
    };
    emit_exception_report(
        &mut a,
        &mut common,
        &regs,
        cfg.com1,
        cfg.exit_port,
        cfg.exit_code,
    )?;
    // Trampoline targets (cdecl).
    for (n, t) in targets.iter_mut().enumerate() {
        a.set_label(t)?;
        a.push(ebp)?;
        a.mov(ebp, esp)?;
        a.mov(eax, 0x7ab0_0000 | n as u32)?;
        for i in 0..n {
            a.mov(ecx, dword_ptr(ebp + (8 + 4 * i) as i32))?;
            a.imul_3(ecx, ecx, i as i32 + 1)?;
            a.add(eax, ecx)?;
        }
        a.pop(ebp)?;
        a.ret()?;
    }
    finish(a, cfg, area_size, &entry, &handlers, &targets)
}

#[cfg(test)]
mod tests {
    use super::super::hyper::target_result;
    use super::*;

    #[test]
    fn builds_and_targets_compute_what_rust_computes() {
        let cfg = RcConfig {
            rc: 0xa000_9000,
            mailbox_off: 0x3000,
            mailboxes: 1,
            cpum_rc: 0xa000_00c0,
            exit_rc: 0xa000_d123,
            c_exit_rc: 0xa000_d100,
            cs: 8,
            ds: 0x10,
            apic: 0xfee0_0000,
            com1: 0x3f8,
            exit_port: 0xf4,
            exit_code: 0x13,
        };
        let (blob, e) = build(&cfg, 0x4000).unwrap();
        assert_eq!(blob.len(), 0x4000);
        assert_eq!(e.entry, cfg.rc);
        assert_eq!(e.handlers.len(), 32);
        assert_eq!(e.targets.len(), MAX_TARGET_ARGS + 1);
        assert_eq!(target_result(&[]), 0x7ab0_0000);
        assert_eq!(target_result(&[1, 2, 3]), 0x7ab0_0003 + 1 + 4 + 9);
        assert!(matches!(
            build(&cfg, 0x1000),
            Err(FarError::TooSmall { .. })
        ));
    }
}
