//! AMD64 host → AMD64 hypervisor context (`VMMSWITCHER_AMD64_TO_AMD64`), the
//! switcher VirtualBox's table names but never implemented.
//!
//! Long mode stays on throughout: only CR3 and the descriptor tables change.
//! The host side is the AMD64-host entry and exit shared with
//! [`super::amd64_legacy`]. In between, the switcher loads the intermediate
//! PML4 (which maps its HC and RC copies), far-jumps (m16:32, hyper CS = the
//! 64-bit selector) into the RC copy, loads the hyper PML4 (`Hyper.cr3`), the
//! hyper IDT (64-bit gates), DS/ES/SS, null FS/GS, the VCPU's hyper TSS and
//! LDT, parks EFER.SCE, loads the hyper debug registers when asked and
//! `iretq`s to `Hyper.rip` with the hyper general registers.
//!
//! RC code leaves with `call` to the exit entry (status in EAX), which saves
//! every hyper register (the return address becomes `Hyper.rip`), finds its
//! VCPU from TR, and returns through the intermediate PML4 and a 64-bit slot
//! to the host copy. The call trampoline pops a target and an argument byte
//! count, passes up to six 32-bit arguments in RDI, RSI, RDX, RCX, R8, R9
//! (System V), calls the target and exits with its EAX.
//!
//! # 5-level paging hosts
//!
//! On a host with CR4.LA57 ([`TemplateOptions::la57`]) long mode is never
//! left, so LA57 can never change (a `mov cr4` that flips it in IA-32e mode
//! raises #GP): the hypervisor context is 5-level too. The intermediate root
//! loaded in long mode is the PML5 (`FIX_INTER_LA57_CR3`, which maps the HC
//! address canonical in 57 bits), and `Hyper.cr3` is the PML5 of the hyper
//! tables, whose entry 0 leads to a PML4 mapping the RC addresses (all
//! below 4 GiB, so RC code runs the same under either depth). The hypervisor CR4
//! keeps the host's LA57. Only the intermediate-root fixup differs from the
//! code for a 4-level host.

use core::mem::offset_of;

use cpum::layout::{self as l, disp};
use cpum::regs::{Efer, MSR_EFER};
use cpum::UseFlags;
use iced_x86::code_asm::*;

use super::amd64_legacy::{emit_host_entry64, emit_host_exit64, inter_long_cr3};
use super::legacy_pae::TRAMPOLINE_RESUMED;
use super::{
    adv_start64, adv_stop64, ctx_entry_traps, finish, jmp_slot64, load_tr_ldtr, mov_fix,
    round_trip_steps, trace, Step, TemplateOptions, VmLayout,
};
use crate::builder::{BuildError, Builder, Operand, Slot};
use crate::def::{SwitcherDef, SwitcherKind, View};
use crate::fixup::FixupKind as K;

const fn d(off: usize) -> i32 {
    disp(off)
}

/// The trace characters one round trip prints with `o.trace`, in order.
pub fn trace_steps(o: &TemplateOptions) -> Vec<Step> {
    use Step as S;
    round_trip_steps(
        o,
        &[
            S::HostCrSaved,
            S::InterCr3,
            S::RcEntered,
            S::RcLoaded,
            S::RcExit,
            S::HostCr3,
            S::HostTables,
            S::HostMsrs,
        ],
    )
}

/// RDX = RC `CpumCpu` of the VCPU whose hyper TSS is in TR (64-bit code). Clobbers RCX.
fn rc_cpumcpu_from_tr64(b: &mut Builder) -> Result<(), BuildError> {
    mov_fix(b, edx, K::GcCpumOff, Operand::Value(0))?;
    let a = b.a();
    a.str(ecx)?;
    a.movzx(ecx, cx)?;
    a.sub(ecx, dword_ptr(rdx + d(l::CPUM_HYPER_TSS_SEL0)))?;
    a.shr(ecx, cpum::HYPER_TSS_STRIDE_SHIFT)?;
    a.imul_2(ecx, dword_ptr(rdx + d(l::CPUM_CB_CPUMCPU)))?;
    a.add(ecx, dword_ptr(rdx + d(l::CPUM_OFF_CPUMCPU0)))?;
    a.add(rdx, rcx)?;
    Ok(())
}

const HYPER_GPRS: [(usize, AsmRegister64); 14] = [
    (l::HYPER_RAX, rax),
    (l::HYPER_RBX, rbx),
    (l::HYPER_RCX, rcx),
    (l::HYPER_RSI, rsi),
    (l::HYPER_RDI, rdi),
    (l::HYPER_RBP, rbp),
    (l::HYPER_R8, r8),
    (l::HYPER_R8 + 8, r9),
    (l::HYPER_R8 + 16, r10),
    (l::HYPER_R8 + 24, r11),
    (l::HYPER_R8 + 32, r12),
    (l::HYPER_R8 + 40, r13),
    (l::HYPER_R8 + 48, r14),
    (l::HYPER_R8 + 56, r15),
];

/// Builds the AMD64 → AMD64 switcher.
///
/// # Errors
/// [`BuildError`] if a template instruction cannot be assembled (a bug).
pub fn build(o: &TemplateOptions, vm: &VmLayout) -> Result<SwitcherDef, BuildError> {
    let mut b = Builder::new(64)?;
    emit_host_entry64(&mut b, o, vm)?;
    let fp = b.named("fpGCEnter");
    b.a().jmp(fword_ptr(fp))?;
    b.label("fpGCEnter")?;
    b.fixup(K::GcFar32, Slot::At(0), Operand::Label("FarJmpGCTarget"));
    b.a().dd(&[0xffff_ffff, 0x0000_ffff])?;

    // ------------------------------------------------------------ GC: 64-bit hypervisor context
    b.section(64)?;
    b.label("FarJmpGCTarget")?;
    {
        let a = b.a();
        a.mov(cr3, rbp)?;
        a.mov(rdx, rsi)?;
    }
    if o.trace {
        trace(&mut b, o, Step::RcEntered)?;
        b.a().mov(rdx, rsi)?;
    }
    b.a().lidt(ptr(rdx + d(l::HYPER_IDTR)))?;
    b.fixup(K::HyperDs, Slot::Imm, Operand::None);
    b.a().mov(eax, 0x0000_ffffu32)?;
    {
        let a = b.a();
        a.mov(ds, eax)?;
        a.mov(es, eax)?;
        a.mov(ss, eax)?;
        a.mov(rsp, qword_ptr(rdx + d(l::HYPER_RSP)))?;
        a.xor(eax, eax)?;
        a.mov(fs, eax)?;
        a.mov(gs, eax)?;
        load_tr_ldtr(
            a,
            rdx,
            l::HYPER_TR,
            l::HYPER_GDTR + offset_of!(cpum::regs::Xdtr64, base),
            l::HYPER_LDTR,
        )?;
        // The hypervisor context never runs SYSCALL into the host's LSTAR.
        a.mov(ecx, MSR_EFER)?;
        a.rdmsr()?;
        a.and(eax, !(Efer::SCE.bits() as u32) as i32)?;
        a.wrmsr()?;
        a.mov(rdx, rsi)?;
        let mut no_dr = a.create_label();
        a.test(
            dword_ptr(rdx + d(l::USE_FLAGS)),
            UseFlags::USE_DEBUG_REGS.bits(),
        )?;
        a.jz(no_dr)?;
        for (n, dr) in [dr0, dr1, dr2, dr3].into_iter().enumerate() {
            a.mov(rax, dr)?;
            a.mov(qword_ptr(rdx + d(l::HOST64_DR0 + 8 * n)), rax)?;
            a.mov(rax, qword_ptr(rdx + d(l::HYPER_DR + 8 * n)))?;
            a.mov(dr, rax)?;
        }
        a.mov(eax, cpum::regs::DR6_INIT as u32)?;
        a.mov(dr6, rax)?;
        a.mov(rax, qword_ptr(rdx + d(l::HYPER_DR + 8 * 7)))?;
        a.mov(dr7, rax)?;
        a.set_label(&mut no_dr)?;
        a.nop()?;
    }
    trace(&mut b, o, Step::RcLoaded)?;
    if o.stats {
        b.a().lea(rcx, ptr(rsi + d(l::STAT_TO_GC)))?;
        adv_stop64(&mut b)?;
    }
    {
        // The iretq frame: SS (= hyper DS), RSP, RFLAGS, CS, RIP.
        let a = b.a();
        a.mov(rdx, rsi)?;
        a.mov(eax, ds)?;
        a.push(rax)?;
        a.push(qword_ptr(rdx + d(l::HYPER_RSP)))?;
        a.push(qword_ptr(rdx + d(l::HYPER_RFLAGS)))?;
    }
    b.fixup(K::HyperCs, Slot::Imm, Operand::None);
    b.a().add_instruction(iced_x86::Instruction::with1(
        iced_x86::Code::Pushq_imm32,
        0x0000_ffffi32,
    )?)?;
    {
        let a = b.a();
        a.push(qword_ptr(rdx + d(l::HYPER_RIP)))?;
        for (off, r) in HYPER_GPRS {
            a.mov(r, qword_ptr(rdx + d(off)))?;
        }
        a.mov(rdx, qword_ptr(rdx + d(l::HYPER_RDX)))?;
        a.iretq()?;
    }

    // Call trampoline: [rsp] = target, [rsp+4] = argument bytes (32-bit words, as pushed by the VMM).
    let to_host = b.named("VMMGCGuestToHostAsm");
    b.label("vmmGCCallTrampoline")?;
    {
        let a = b.a();
        let mut again = a.create_label();
        a.mov(eax, dword_ptr(rsp))?;
        a.mov(r12d, dword_ptr(rsp + 4))?;
        a.add(rsp, 8)?;
        for (i, r) in [edi, esi, edx, ecx, r8d, r9d].into_iter().enumerate() {
            a.mov(r, dword_ptr(rsp + (4 * i) as i32))?;
        }
        a.add(rsp, r12)?;
        a.mov(rbx, rsp)?;
        a.and(rsp, -16)?;
        a.call(rax)?;
        a.mov(rsp, rbx)?;
        a.set_label(&mut again)?;
        a.call(to_host)?;
        a.mov(eax, TRAMPOLINE_RESUMED)?;
        a.jmp(again)?;
    }
    b.label("vmmGCGuestToHost")?;
    b.a().mov(eax, edi)?;
    b.a().jmp(to_host)?;

    // Exit: EAX = status, return address on the stack.
    b.label("VMMGCGuestToHostAsm")?;
    {
        let a = b.a();
        a.push(rdx)?;
        a.push(rcx)?;
    }
    rc_cpumcpu_from_tr64(&mut b)?;
    {
        let a = b.a();
        a.pop(qword_ptr(rdx + d(l::HYPER_RCX)))?;
        a.pop(qword_ptr(rdx + d(l::HYPER_RDX)))?;
        a.pop(qword_ptr(rdx + d(l::HYPER_RIP)))?;
        a.mov(qword_ptr(rdx + d(l::HYPER_RSP)), rsp)?;
        for (off, r) in HYPER_GPRS {
            if off != l::HYPER_RCX {
                a.mov(qword_ptr(rdx + d(off)), r)?;
            }
        }
        a.pushfq()?;
        a.pop(qword_ptr(rdx + d(l::HYPER_RFLAGS)))?;
        a.sldt(word_ptr(rdx + d(l::HYPER_LDTR)))?;
        a.mov(edi, eax)?;
        a.mov(r9, rdx)?;
    }
    if o.stats {
        b.a().lea(rcx, ptr(r9 + d(l::STAT_TO_HC)))?;
        adv_start64(&mut b)?;
    }
    trace(&mut b, o, Step::RcExit)?;
    mov_fix(&mut b, ebx, K::GcCpumOff, Operand::Value(0))?;
    {
        let a = b.a();
        a.mov(rbp, r9)?;
        a.sub(rbp, rbx)?;
        a.mov(rax, qword_ptr(r9 + d(l::HOST64_CR3)))?;
    }
    mov_fix(&mut b, ecx, inter_long_cr3(o), Operand::None)?;
    b.a().mov(cr3, rcx)?;
    jmp_slot64(&mut b, "pHCExitTarget", K::Hc64Bit, "HCExitTarget")?;

    // ------------------------------------------------------------ HC1
    b.section(64)?;
    emit_host_exit64(&mut b, o)?;
    ctx_entry_traps(&mut b)?;
    finish(
        SwitcherKind::Amd64ToAmd64,
        "AMD64 to/from AMD64",
        b,
        &[
            ("HC0", View::Hc, 64, "vmmR0HostToGuest"),
            ("GC", View::Rc, 64, "FarJmpGCTarget"),
            ("HC1", View::Hc, 64, "HCExitTarget"),
        ],
    )
}
