//! Emission every far-side piece shares: the 64-bit helper of the
//! intermediate context ([`super::intermediate_amd64`]) and the code of both
//! hypervisor contexts ([`super::hyper`], [`super::hyper_legacy`],
//! [`super::hyper_amd64`]).
//!
//! Each piece takes the operands and registers that differ between its users
//! (the mailbox layout, the failure bits, the register width) as parameters.

use core::ops::Add;

use iced_x86::code_asm::asm_traits::{CodeAsmMov, CodeAsmPop, CodeAsmPush, CodeAsmRol};
use iced_x86::code_asm::*;

use crate::transcript::PREFIX;

/// The NMI LVTs checked for the mask bit, in mailbox order.
pub(crate) const LVTS: [u32; 4] = [
    apic::reg::LVT_LINT0,
    apic::reg::LVT_LINT1,
    apic::reg::LVT_PC,
    apic::reg::LVT_THMR,
];

/// The operands and bits of the NMI-masking check.
pub(crate) struct ApicCheck {
    /// The mailbox's expectation word.
    pub expect: AsmMemoryOperand,
    /// Its bit saying the host APIC is in x2APIC mode.
    pub x2apic: u32,
    /// Where the first LVT read is recorded (the others follow, 4 bytes apart).
    pub lvt: AsmMemoryOperand,
    /// `fApicDisVectors` of this VCPU.
    pub dis_vectors: AsmMemoryOperand,
    /// Where the `fApicDisVectors` read is recorded.
    pub dis_seen: AsmMemoryOperand,
    /// The expected `fApicDisVectors`.
    pub want_dis: AsmMemoryOperand,
    /// Failure bit for an unmasked LVT.
    pub fail_lvt: u32,
    /// Failure bit for a `fApicDisVectors` mismatch.
    pub fail_dis: u32,
}

/// Emits the NMI-masking check: each of [`LVTS`] read through its x2APIC MSR
/// in x2APIC mode, else by `mmio` (which loads EAX from the register at the
/// given APIC page offset), recorded and tested for the mask bit; then
/// `fApicDisVectors` recorded and compared. `fail` records a failure bit.
/// Clobbers EAX, ECX, EDX.
pub(crate) fn emit_apic_checks(
    a: &mut CodeAssembler,
    c: &ApicCheck,
    mmio: impl Fn(&mut CodeAssembler, i32) -> Result<(), IcedError>,
    fail: impl Fn(&mut CodeAssembler, u32) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    for (i, reg) in LVTS.iter().enumerate() {
        let mut ok = a.create_label();
        let mut mmio_read = a.create_label();
        let mut have = a.create_label();
        a.test(c.expect, c.x2apic)?;
        a.jz(mmio_read)?;
        a.mov(ecx, apic::x2apic_msr(*reg))?;
        a.rdmsr()?;
        a.jmp(have)?;
        a.set_label(&mut mmio_read)?;
        mmio(a, *reg as i32)?;
        a.set_label(&mut have)?;
        a.mov(c.lvt + 4 * i as i32, eax)?;
        a.test(eax, apic::lvt::MASKED)?;
        a.jnz(ok)?;
        fail(a, c.fail_lvt)?;
        a.set_label(&mut ok)?;
    }
    let mut ok = a.create_label();
    a.mov(eax, c.dis_vectors)?;
    a.mov(c.dis_seen, eax)?;
    a.cmp(eax, c.want_dis)?;
    a.je(ok)?;
    fail(a, c.fail_dis)?;
    a.set_label(&mut ok)?;
    a.nop()
}

/// Emits the end-of-trip accounting: when `bits` (this trip's failures) is
/// non-zero, ORs it into `fails` and, if `first_fail_cookie` is still 0,
/// stores `cookie` there (through `tmp`). Leaves `bits` as it was.
pub(crate) fn emit_record_fails(
    a: &mut CodeAssembler,
    bits: AsmRegister32,
    tmp: AsmRegister32,
    fails: AsmMemoryOperand,
    first_fail_cookie: AsmMemoryOperand,
    cookie: AsmMemoryOperand,
) -> Result<(), IcedError> {
    let mut clean = a.create_label();
    a.test(bits, bits)?;
    a.jz(clean)?;
    a.or(fails, bits)?;
    a.cmp(first_fail_cookie, 0)?;
    a.jne(clean)?;
    a.mov(tmp, cookie)?;
    a.mov(first_fail_cookie, tmp)?;
    a.set_label(&mut clean)
}

/// Emits, at `handler`, the stub of exception vector `v`: it pushes a zero
/// error code when the CPU pushes none, then the vector, and jumps to `common`.
pub(crate) fn emit_exception_stub(
    a: &mut CodeAssembler,
    handler: &mut CodeLabel,
    v: usize,
    common: CodeLabel,
) -> Result<(), IcedError> {
    a.set_label(handler)?;
    if !matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30) {
        a.push(0)?;
    }
    a.push(v as i32)?;
    a.jmp(common)
}

/// The general registers of one width the exception reporter uses.
pub(crate) struct ReporterRegs<R> {
    /// Accumulator (RAX or EAX).
    pub ax: R,
    /// Counter (RCX or ECX).
    pub cx: R,
    /// Data (RDX or EDX).
    pub dx: R,
    /// Stack pointer (RSP or ESP).
    pub sp: R,
}

/// Emits, at `common`, the reporter the [`emit_exception_stub`] stubs jump to:
/// it prints `FAREXC vec= err= rip=` (the vector, error code and return
/// address on the stack, each a register wide) on COM1 and exits through
/// isa-debug-exit with `exit_code`; then the `putc`/`puthex` routines it uses.
pub(crate) fn emit_exception_report<R>(
    a: &mut CodeAssembler,
    common: &mut CodeLabel,
    r: &ReporterRegs<R>,
    com1: u16,
    exit_port: u16,
    exit_code: u32,
) -> Result<(), IcedError>
where
    R: Copy + Add<i32, Output = AsmMemoryOperand>,
    CodeAssembler: CodeAsmPush<R>
        + CodeAsmPop<R>
        + CodeAsmMov<R, R>
        + CodeAsmMov<R, AsmMemoryOperand>
        + CodeAsmRol<R, i32>,
{
    // Register width in bytes: the stack slot size, half the hex digits.
    let width = if a.bitness() == 64 { 8 } else { 4 };
    let mut putc = a.create_label();
    let mut puthex = a.create_label();
    a.set_label(common)?;
    for &c in format!("\n{PREFIX}FAREXC vec=").as_bytes() {
        a.mov(al, u32::from(c))?;
        a.call(putc)?;
    }
    for (k, text) in [(0, " err="), (width, " rip="), (2 * width, "")] {
        a.mov(r.ax, ptr(r.sp + k))?;
        a.call(puthex)?;
        for &c in text.as_bytes() {
            a.mov(al, u32::from(c))?;
            a.call(putc)?;
        }
    }
    a.mov(al, u32::from(b'\n'))?;
    a.call(putc)?;
    a.mov(eax, exit_code)?;
    a.mov(dx, u32::from(exit_port))?;
    a.out(dx, eax)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    // putc: AL; preserves the data register and the accumulator.
    a.set_label(&mut putc)?;
    a.push(r.dx)?;
    a.push(r.ax)?;
    let mut wait = a.create_label();
    a.mov(dx, u32::from(com1) + 5)?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.pop(r.ax)?;
    a.mov(dx, u32::from(com1))?;
    a.out(dx, al)?;
    a.pop(r.dx)?;
    a.ret()?;
    // puthex: the accumulator as hex digits, one per nibble.
    a.set_label(&mut puthex)?;
    a.push(r.cx)?;
    a.push(r.dx)?;
    a.mov(r.dx, r.ax)?;
    a.mov(ecx, 2 * width as u32)?;
    let mut digit = a.create_label();
    let mut num = a.create_label();
    a.set_label(&mut digit)?;
    a.rol(r.dx, 4)?;
    a.mov(eax, edx)?;
    a.and(eax, 0xf)?;
    a.add(al, u32::from(b'0'))?;
    a.cmp(al, u32::from(b'9'))?;
    a.jbe(num)?;
    a.add(al, 7)?;
    a.set_label(&mut num)?;
    a.call(putc)?;
    a.dec(ecx)?;
    a.jnz(digit)?;
    a.pop(r.dx)?;
    a.pop(r.cx)?;
    a.ret()
}

/// Emits, for 64-bit code, a stub for every vector 0–31 not in `own` (the
/// caller places those itself) and the common reporter that prints
/// `FAREXC vec= err= rip=` on COM1 and exits through isa-debug-exit with
/// `exit_code`.
///
/// # Errors
/// iced rejects an instruction.
pub(crate) fn emit_exception_reporter64(
    a: &mut CodeAssembler,
    handlers: &mut [CodeLabel],
    own: &[usize],
    com1: u16,
    exit_port: u16,
    exit_code: u32,
) -> Result<(), IcedError> {
    let mut common = a.create_label();
    for (v, h) in handlers.iter_mut().enumerate() {
        if !own.contains(&v) {
            emit_exception_stub(a, h, v, common)?;
        }
    }
    let regs = ReporterRegs {
        ax: rax,
        cx: rcx,
        dx: rdx,
        sp: rsp,
    };
    emit_exception_report(a, &mut common, &regs, com1, exit_port, exit_code)
}

/// Names of the bits set in `bits`, `names[i]` naming bit `i`.
pub(crate) fn bit_names(names: &[&'static str], bits: u32) -> Vec<&'static str> {
    names
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Emits, at `handler`, the NMI handler of a far-side IDT (vector 2): it
/// counts the NMI in the dword at `count` (an RC address below 4 GiB),
/// records the interrupted instruction pointer's low half at `first_ip` for
/// the first one, acknowledges the 8259 (an OCW3 poll, then a non-specific
/// EOI: the storm's NMIs come from the PIT through the 8259 and LINT0) and
/// returns. An NMI that reaches the far side is thus counted, not fatal; the
/// host's judge fails a run whose far side took any.
pub(crate) fn emit_nmi_counter(
    a: &mut CodeAssembler,
    handler: &mut CodeLabel,
    count: u32,
    first_ip: u32,
) -> Result<(), IcedError> {
    let mut not_first = a.create_label();
    a.set_label(handler)?;
    push_scratch(a)?;
    if a.bitness() == 64 {
        a.mov(ecx, count)?;
        a.inc(dword_ptr(rcx))?;
        a.cmp(dword_ptr(rcx), 1)?;
        a.jne(not_first)?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.mov(ecx, first_ip)?;
        a.mov(dword_ptr(rcx), eax)?;
    } else {
        a.mov(ecx, count)?;
        a.inc(dword_ptr(ecx))?;
        a.cmp(dword_ptr(ecx), 1)?;
        a.jne(not_first)?;
        a.mov(eax, dword_ptr(esp + 12))?;
        a.mov(ecx, first_ip)?;
        a.mov(dword_ptr(ecx), eax)?;
    }
    a.set_label(&mut not_first)?;
    a.mov(dx, 0x20u32)?;
    a.mov(al, 0x0cu32)?;
    a.out(dx, al)?;
    a.in_(al, dx)?;
    a.mov(al, 0x20u32)?;
    a.out(dx, al)?;
    pop_scratch_and_iret(a)
}

/// An interrupt handler's prologue: saves EAX, ECX, EDX (RAX, RCX, RDX in
/// 64-bit code).
pub(crate) fn push_scratch(a: &mut CodeAssembler) -> Result<(), IcedError> {
    if a.bitness() == 64 {
        a.push(rax)?;
        a.push(rcx)?;
        a.push(rdx)
    } else {
        a.push(eax)?;
        a.push(ecx)?;
        a.push(edx)
    }
}

/// The epilogue to [`push_scratch`]: restores the registers and returns
/// from the interrupt.
pub(crate) fn pop_scratch_and_iret(a: &mut CodeAssembler) -> Result<(), IcedError> {
    if a.bitness() == 64 {
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rax)?;
        a.iretq()
    } else {
        a.pop(edx)?;
        a.pop(ecx)?;
        a.pop(eax)?;
        a.iretd()
    }
}
