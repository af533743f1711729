//! AMD64 host → 32-bit or PAE hypervisor context (`VMMSWITCHER_AMD64_TO_32`,
//! `VMMSWITCHER_AMD64_TO_PAE`; VirtualBox's `AMD64andLegacy.mac`).
//!
//! The C entry is 64-bit, System V: `u32 entry(void *vm /*RDI*/, u32
//! off_cpumcpu /*ESI*/)`; RBX, RBP, R12–R15, RSP and RFLAGS come back, and so
//! do the segment selectors, FS.base and GS.base, EFER, the descriptor tables,
//! CR0/CR3/CR4, the debug registers, SYSENTER_CS and the LVTs.
//!
//! Long mode cannot be left in place: the switcher loads the intermediate
//! PML4, jumps through a 64-bit slot to its identity copy, far-jumps to
//! compatibility mode there, turns paging off (leaving long mode), clears
//! EFER.LME, sets CR4.PAE for the target, loads the target's intermediate CR3,
//! turns paging on and far-jumps into the RC copy — the same hypervisor-side
//! code as the 32-bit/PAE family. The way back re-enters long mode in the
//! identity copy and reaches the host address through a 64-bit slot.
//!
//! # 5-level paging hosts
//!
//! With [`TemplateOptions::la57`] the host runs with CR4.LA57, which can
//! change only outside IA-32e mode (a `mov cr4` that flips it in long mode
//! raises #GP). So the hypervisor CR4 written while still in long mode keeps
//! LA57 (it is in the mask of host bits kept), the intermediate root loaded
//! there is the 5-level one (`FIX_INTER_LA57_CR3`, which maps the HC
//! address canonical in 57 bits), and the identity code clears LA57 only
//! after paging is off, together with PAE for a 32-bit target. On the way
//! back it sets LA57 again with PAE while paging is off, loads the 5-level
//! root and only then sets EFER.LME and CR0.PG. The LA57 instructions are
//! emitted only for such hosts: the code for a 4-level host is unchanged.

use core::mem::offset_of;

use cpum::layout::{self as l, disp};
use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER, MSR_FS_BASE, MSR_GS_BASE, MSR_SYSENTER_CS};
use cpum::UseFlags;
use iced_x86::code_asm::*;

use super::legacy_pae::{emit_gc, Flavour, HostDrSlots};
use super::{
    adv_start64, adv_stop64, apic_mask64, apic_unmask64, ctx_entry_traps, finish, jmp_far_fix,
    jmp_far_id32, jmp_rel32_fix, jmp_slot64, load_tr_ldtr, mov_fix, round_trip_steps, skippable,
    slot64, trace, Revision, Step, TemplateOptions, VmLayout,
};
use crate::builder::{BuildError, Builder, Operand};
use crate::def::{SwitcherDef, SwitcherKind, View};
use crate::fixup::FixupKind as K;

const fn d(off: usize) -> i32 {
    disp(off)
}

/// The intermediate root an AMD64-host switcher loads while in long mode:
/// the PML4, or the PML5 on a host with CR4.LA57 (LA57 cannot change there).
pub(crate) fn inter_long_cr3(o: &TemplateOptions) -> K {
    if o.la57 {
        K::InterLa57Cr3
    } else {
        K::InterAmd64Cr3
    }
}

/// The host CR4 bits the hypervisor CR4 keeps while still in long mode:
/// LA57 too on a 5-level host, since clearing it there raises #GP.
fn cr4_kept_in_long_mode(o: &TemplateOptions) -> Cr4 {
    let kept = Cr4::MCE | Cr4::PSE | Cr4::PAE | Cr4::VMXE;
    if o.la57 {
        kept | Cr4::LA57
    } else {
        kept
    }
}

/// The 64-bit C entry and the host-saving worker shared by the AMD64-host
/// switchers, up to the hyper GDT and the intermediate PML4. Out: ESI = RC
/// `CpumCpu`, EBP = hyper CR3, R8 = HC `CpumCpu`.
pub(crate) fn emit_host_entry64(
    b: &mut Builder,
    o: &TemplateOptions,
    _vm: &VmLayout,
) -> Result<(), BuildError> {
    // ------------------------------------------------------------ HC0: C entry (64-bit)
    b.label("vmmR0HostToGuest")?;
    trace(b, o, Step::Entry)?;
    let cpum_slot = b.named("pCpumHC");
    {
        let a = b.a();
        a.push(rbp)?;
        a.push(rbx)?;
        a.mov(rbx, rdi)?;
    }
    if o.stats {
        // This VCPU's profile: HC CPUM plus the VCPU offset (ESI).
        let a = b.a();
        a.mov(ecx, esi)?;
        a.add(rcx, qword_ptr(cpum_slot))?;
        a.add(rcx, d(l::STAT_TO_GC))?;
        adv_start64(b)?;
    }
    let worker = b.named("vmmR0HostToGuestAsm");
    {
        let a = b.a();
        a.mov(ebp, esi)?;
        a.pushfq()?;
        a.cli()?;
        a.mov(rdx, qword_ptr(cpum_slot))?;
        // A far-return frame: the worker comes back with `retfq`.
        a.mov(eax, cs)?;
        a.push(rax)?;
        a.call(worker)?;
    }
    if o.apic_nmi_masking && o.revision.unmasks_after_call() {
        apic_unmask64(b, o)?;
    }
    b.a().popfq()?;
    if o.stats {
        let a = b.a();
        a.mov(r9d, eax)?;
        // RDX = HC CPUMCPU, as the exit path leaves it.
        a.lea(rcx, ptr(rdx + d(l::STAT_TO_HC)))?;
        adv_stop64(b)?;
        b.a().mov(eax, r9d)?;
    }
    {
        let a = b.a();
        a.pop(rbx)?;
        a.pop(rbp)?;
        a.ret()?;
    }
    slot64(b, "pCpumHC", K::Hc64BitCpum, Operand::None)?;

    // ------------------------------------------------------------ HC0: worker (64-bit)
    b.label("vmmR0HostToGuestAsm")?;
    {
        let a = b.a();
        a.add(rdx, rbp)?;
        a.mov(r8, rdx)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_RBX)), rbx)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_RDI)), rdi)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_RSI)), rsi)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_RBP)), rbp)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_RSP)), rsp)?;
        for (i, r) in [r10, r11, r12, r13, r14, r15].into_iter().enumerate() {
            a.mov(qword_ptr(r8 + d(l::HOST64_R10 + 8 * i)), r)?;
        }
        a.mov(word_ptr(r8 + d(l::HOST64_DS)), ds)?;
        a.mov(word_ptr(r8 + d(l::HOST64_ES)), es)?;
        a.mov(word_ptr(r8 + d(l::HOST64_FS)), fs)?;
        a.mov(word_ptr(r8 + d(l::HOST64_GS)), gs)?;
        a.mov(word_ptr(r8 + d(l::HOST64_SS)), ss)?;
        a.sldt(word_ptr(r8 + d(l::HOST64_LDTR)))?;
        a.sidt(ptr(r8 + d(l::HOST64_IDTR)))?;
        a.sgdt(ptr(r8 + d(l::HOST64_GDTR)))?;
        a.str(word_ptr(r8 + d(l::HOST64_TR)))?;
        a.pushfq()?;
        a.pop(qword_ptr(r8 + d(l::HOST64_RFLAGS)))?;
        for (msr, off) in [
            (MSR_FS_BASE, l::HOST64_FS_BASE),
            (MSR_GS_BASE, l::HOST64_GS_BASE),
            (MSR_EFER, l::HOST64_EFER),
        ] {
            a.mov(ecx, msr)?;
            a.rdmsr()?;
            a.mov(dword_ptr(r8 + d(off)), eax)?;
            a.mov(dword_ptr(r8 + d(off + 4)), edx)?;
        }
    }
    trace(b, o, Step::HostSaved)?;
    if o.apic_nmi_masking {
        apic_mask64(b, o)?;
        trace(b, o, Step::ApicMasked)?;
    }
    skippable(b, K::NoSysenterJmp, "htg_no_sysenter", |a| {
        a.mov(ecx, MSR_SYSENTER_CS)?;
        a.rdmsr()?;
        a.mov(dword_ptr(r8 + d(l::HOST64_SYSENTER_CS)), eax)?;
        a.mov(dword_ptr(r8 + d(l::HOST64_SYSENTER_CS + 4)), edx)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        Ok(())
    })?;
    {
        let a = b.a();
        let mut no_dr = a.create_label();
        a.and(
            dword_ptr(r8 + d(l::USE_FLAGS)),
            !UseFlags::USED_FPU.bits() as i32,
        )?;
        a.test(
            dword_ptr(r8 + d(l::USE_FLAGS)),
            (UseFlags::USE_DEBUG_REGS | UseFlags::USE_DEBUG_REGS_HOST).bits(),
        )?;
        a.jz(no_dr)?;
        a.mov(rax, dr7)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_DR7)), rax)?;
        a.xor(eax, eax)?;
        a.mov(dr7, rax)?;
        a.mov(rax, dr6)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_DR6)), rax)?;
        a.set_label(&mut no_dr)?;
        a.mov(rax, cr0)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_CR0)), rax)?;
        a.mov(rax, cr3)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_CR3)), rax)?;
        a.mov(rcx, cr4)?;
        a.mov(qword_ptr(r8 + d(l::HOST64_CR4)), rcx)?;
        // Hyper CR4 (PAE, and LA57 on a 5-level host, stay on while in long
        // mode; the identity code sets them for the target) and hyper CR0
        // (WP clear, TS set).
        a.and(ecx, cr4_kept_in_long_mode(o).bits() as i32)?;
        a.mov(eax, dword_ptr(r8 + d(l::GUEST_CR4)))?;
        a.mov(rdx, r8)?;
        a.sub(rdx, rbp)?; // CPUM
        a.and(eax, dword_ptr(rdx + d(l::CPUM_CR4_AND_MASK)))?;
        a.or(eax, dword_ptr(rdx + d(l::CPUM_CR4_OR_MASK)))?;
        a.or(ecx, eax)?;
        a.mov(cr4, rcx)?;
        a.mov(eax, dword_ptr(r8 + d(l::GUEST_CR0)))?;
        a.and(eax, Cr0::EM.bits() as i32)?;
        a.or(
            eax,
            (Cr0::PE | Cr0::PG | Cr0::TS | Cr0::ET | Cr0::NE | Cr0::MP).bits() as i32,
        )?;
        a.mov(cr0, rax)?;
        a.lgdt(ptr(r8 + d(l::HYPER_GDTR)))?;
        // Carried through the switch: EBP = hyper CR3, ESI = RC CpumCpu.
        a.mov(esi, ebp)?;
        a.mov(ebp, dword_ptr(r8 + d(l::HYPER_CR3)))?;
    }
    trace(b, o, Step::HostCrSaved)?;
    mov_fix(b, eax, K::GcCpumOff, Operand::Value(0))?;
    b.a().add(esi, eax)?;
    mov_fix(b, eax, inter_long_cr3(o), Operand::None)?;
    b.a().mov(cr3, rax)?;
    trace(b, o, Step::InterCr3)
}

/// Restores the host CR0, CR4 and, on a host with CR4.PCIDE, the PCID in
/// CR3, from the hyper CR0/CR4 (WP clear; neither PCIDE nor CET, which the
/// entry dropped with the hyper CR4 before clearing WP and PG), in an order
/// the architecture permits: CR0 first, since a `mov cr4` setting CR4.CET
/// while CR0.WP = 0 raises #GP; then CR4, where setting PCIDE raises #GP
/// unless CR3 bits 11:0 are clear, so a PCIDE host first gets its CR3 without the
/// PCID and the whole CR3 after CR4. Decided at run time from the saved
/// CR4 rather than by a build option: a host may turn PCIDE on or off
/// while the switcher stays the same, and a host without PCIDE pays a
/// `test`, a not-taken `jnz` and a `jmp`. R8 = HC `CpumCpu`; clobbers RAX,
/// RCX.
fn restore_host_cr0_cr4(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut pcide = a.create_label();
    let mut done = a.create_label();
    a.mov(rax, qword_ptr(r8 + d(l::HOST64_CR0)))?;
    a.mov(cr0, rax)?;
    a.mov(rax, qword_ptr(r8 + d(l::HOST64_CR4)))?;
    a.test(eax, Cr4::PCIDE.bits() as u32)?;
    a.jnz(pcide)?;
    a.mov(cr4, rax)?;
    a.jmp(done)?;
    a.set_label(&mut pcide)?;
    a.mov(rcx, cr3)?;
    a.and(rcx, -0x1000)?;
    a.mov(cr3, rcx)?;
    a.mov(cr4, rax)?;
    a.mov(rax, qword_ptr(r8 + d(l::HOST64_CR3)))?;
    a.mov(cr3, rax)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// The 64-bit host-restoring exit shared by the AMD64-host switchers, from
/// `HCExitTarget` (reached at its HC address under the intermediate PML4,
/// RAX = host CR3, EBP = VCPU offset, EDI = status) to the `retfq`, which
/// returns the status after storing it in `ret_code` (`/VMM/CPUn/RetCode`).
pub(crate) fn emit_host_exit64(b: &mut Builder, o: &TemplateOptions) -> Result<(), BuildError> {
    b.label("HCExitTarget")?;
    let cpum_slot = b.named("pCpumHC1");
    {
        // In: RAX = host CR3, EBP = VCPU offset, EDI = status.
        let a = b.a();
        a.mov(cr3, rax)?;
        a.mov(r8, qword_ptr(cpum_slot))?;
        a.add(r8, rbp)?;
    }
    trace(b, o, Step::HostCr3)?;
    {
        let a = b.a();
        a.lgdt(ptr(r8 + d(l::HOST64_GDTR)))?;
        a.lidt(ptr(r8 + d(l::HOST64_IDTR)))?;
        a.mov(ax, word_ptr(r8 + d(l::HOST64_SS)))?;
        a.mov(ss, ax)?;
        a.mov(rsp, qword_ptr(r8 + d(l::HOST64_RSP)))?;
        load_tr_ldtr(
            a,
            r8,
            l::HOST64_TR,
            l::HOST64_GDTR + offset_of!(cpum::regs::Xdtr64, base),
            l::HOST64_LDTR,
        )?;
        for (sreg, off) in [
            (ds, l::HOST64_DS),
            (es, l::HOST64_ES),
            (fs, l::HOST64_FS),
            (gs, l::HOST64_GS),
        ] {
            a.mov(ax, word_ptr(r8 + d(off)))?;
            a.mov(sreg, ax)?;
        }
        // Loading FS/GS selectors clobbered the bases; EFER comes back whole.
        for (msr, off) in [
            (MSR_FS_BASE, l::HOST64_FS_BASE),
            (MSR_GS_BASE, l::HOST64_GS_BASE),
            (MSR_EFER, l::HOST64_EFER),
        ] {
            a.mov(ecx, msr)?;
            a.mov(eax, dword_ptr(r8 + d(off)))?;
            a.mov(edx, dword_ptr(r8 + d(off + 4)))?;
            a.wrmsr()?;
        }
    }
    trace(b, o, Step::HostTables)?;
    skippable(b, K::NoSysenterJmp, "gth_no_sysenter", |a| {
        a.mov(ecx, MSR_SYSENTER_CS)?;
        a.mov(eax, dword_ptr(r8 + d(l::HOST64_SYSENTER_CS)))?;
        a.mov(edx, dword_ptr(r8 + d(l::HOST64_SYSENTER_CS + 4)))?;
        a.wrmsr()?;
        Ok(())
    })?;
    {
        let a = b.a();
        let mut no_fpu = a.create_label();
        a.test(dword_ptr(r8 + d(l::USE_FLAGS)), UseFlags::USED_FPU.bits())?;
        a.jz(no_fpu)?;
        a.mov(rax, cr0)?;
        a.and(rax, !((Cr0::TS | Cr0::EM).bits() as u32) as i32)?;
        a.mov(cr0, rax)?;
        a.fxsave(ptr(r8 + d(l::GUEST_FPU)))?;
        a.fxrstor(ptr(r8 + d(l::HOST32_FPU)))?;
        a.set_label(&mut no_fpu)?;
        restore_host_cr0_cr4(a)?;
        let mut no_dr = a.create_label();
        let mut no_hyper_dr = a.create_label();
        a.test(
            dword_ptr(r8 + d(l::USE_FLAGS)),
            (UseFlags::USE_DEBUG_REGS | UseFlags::USE_DEBUG_REGS_HOST).bits(),
        )?;
        a.jz(no_dr)?;
        a.xor(eax, eax)?;
        a.mov(dr7, rax)?;
        a.test(
            dword_ptr(r8 + d(l::USE_FLAGS)),
            UseFlags::USE_DEBUG_REGS.bits(),
        )?;
        a.jz(no_hyper_dr)?;
        for (n, dr) in [dr0, dr1, dr2, dr3].into_iter().enumerate() {
            a.mov(rax, qword_ptr(r8 + d(l::HOST64_DR0 + 8 * n)))?;
            a.mov(dr, rax)?;
        }
        a.set_label(&mut no_hyper_dr)?;
        a.mov(rax, qword_ptr(r8 + d(l::HOST64_DR6)))?;
        a.mov(dr6, rax)?;
        a.mov(rax, qword_ptr(r8 + d(l::HOST64_DR7)))?;
        a.mov(dr7, rax)?;
        a.set_label(&mut no_dr)?;
        a.mov(rdx, r8)?;
    }
    trace(b, o, Step::HostMsrs)?;
    b.a().mov(rdx, r8)?;
    if o.apic_nmi_masking && o.revision == Revision::A {
        // Once the LVTs are unmasked an NMI may arrive at any instruction,
        // and the host's handler returns with IRETQ, which reloads the CS it
        // interrupted from the host GDT loaded above. CS still holds the
        // switcher's own 64-bit selector, which names no code segment there
        // (#GP at the IRETQ), so take the host CS first: a far return
        // through the frame the C entry left on the host stack (RIP at
        // [RSP], CS at [RSP+8]), to the next instruction.
        let a = b.a();
        let mut host_cs = a.create_label();
        a.push(qword_ptr(rsp + 8))?;
        a.lea(rax, ptr(host_cs))?;
        a.push(rax)?;
        a.add_instruction(iced_x86::Instruction::with(iced_x86::Code::Retfq))?;
        a.set_label(&mut host_cs)?;
        apic_unmask64(b, o)?;
        trace(b, o, Step::ApicUnmasked)?;
    }
    trace(b, o, Step::Return)?;
    {
        let a = b.a();
        a.mov(rdx, r8)?;
        // The hypervisor side's status: kept in `ret_code` and returned.
        a.mov(dword_ptr(rdx + d(l::RET_CODE)), edi)?;
        a.mov(eax, edi)?;
        a.mov(rbx, qword_ptr(rdx + d(l::HOST64_RBX)))?;
        a.mov(rdi, qword_ptr(rdx + d(l::HOST64_RDI)))?;
        a.mov(rsi, qword_ptr(rdx + d(l::HOST64_RSI)))?;
        a.mov(rbp, qword_ptr(rdx + d(l::HOST64_RBP)))?;
        for (i, r) in [r10, r11, r12, r13, r14, r15].into_iter().enumerate() {
            a.mov(r, qword_ptr(rdx + d(l::HOST64_R10 + 8 * i)))?;
        }
        a.push(qword_ptr(rdx + d(l::HOST64_RFLAGS)))?;
        a.popfq()?;
        // REX.W RETF: pops an 8-byte RIP and an 8-byte CS slot.
        a.add_instruction(iced_x86::Instruction::with(iced_x86::Code::Retfq))?;
    }
    slot64(b, "pCpumHC1", K::Hc64BitCpum, Operand::None)?;
    Ok(())
}

/// The trace characters one round trip prints with `o.trace`, in order.
pub fn trace_steps(o: &TemplateOptions) -> Vec<Step> {
    use Step as S;
    round_trip_steps(
        o,
        &[
            S::HostCrSaved,
            S::InterCr3,
            S::Compat,
            S::LongModeOff,
            S::RcEntered,
            S::RcLoaded,
            S::RcExit,
            S::LongModeOn,
            S::Mode64,
            S::HostCr3,
            S::HostTables,
            S::HostMsrs,
        ],
    )
}

/// Builds the switcher from an AMD64 host to `target` paging.
///
/// # Errors
/// [`BuildError`] if a template instruction cannot be assembled (a bug).
pub fn build(
    target: Flavour,
    o: &TemplateOptions,
    vm: &VmLayout,
) -> Result<SwitcherDef, BuildError> {
    let (kind, desc, inter_target) = match target {
        Flavour::Legacy32 => (
            SwitcherKind::Amd64To32,
            "AMD64 to/from 32-bit",
            K::Inter32BitCr3,
        ),
        Flavour::Pae => (
            SwitcherKind::Amd64ToPae,
            "AMD64 to/from PAE",
            K::InterPaeCr3,
        ),
    };
    let mut b = Builder::new(64)?;

    emit_host_entry64(&mut b, o, vm)?;
    jmp_slot64(&mut b, "pIDEnterTarget", K::Hc64BitNoCheck, "IDEnterTarget")?;

    // ------------------------------------------------------------ ID0/64: to compatibility mode
    b.section(64)?;
    b.label("IDEnterTarget")?;
    jmp_far_id32(&mut b, "fpIDEnter32", "IDEnter32")?;

    // ------------------------------------------------------------ ID0/32: leave long mode
    b.section(32)?;
    b.label("IDEnter32")?;
    trace(&mut b, o, Step::Compat)?;
    {
        let a = b.a();
        a.mov(ebx, cr0)?;
        a.and(ebx, !(Cr0::PG.bits() as u32) as i32)?;
        a.mov(cr0, ebx)?;
        a.mov(ecx, MSR_EFER)?;
        a.rdmsr()?;
        // SCE too: the hypervisor context never runs SYSCALL; the host's EFER
        // comes back whole on the way out.
        a.and(eax, !((Efer::LME | Efer::SCE).bits() as u32) as i32)?;
        a.wrmsr()?;
        // Outside IA-32e mode now: PAE off for a 32-bit target, LA57 off
        // on a 5-level host.
        let mut clear = Cr4::empty();
        if target == Flavour::Legacy32 {
            clear |= Cr4::PAE;
        }
        if o.la57 {
            clear |= Cr4::LA57;
        }
        if !clear.is_empty() {
            a.mov(eax, cr4)?;
            a.and(eax, !(clear.bits() as u32) as i32)?;
            a.mov(cr4, eax)?;
        }
    }
    trace(&mut b, o, Step::LongModeOff)?;
    mov_fix(&mut b, eax, inter_target, Operand::None)?;
    {
        let a = b.a();
        a.mov(cr3, eax)?;
        a.or(ebx, Cr0::PG.bits() as i32)?;
        a.mov(cr0, ebx)?;
    }
    jmp_far_fix(&mut b, K::GcFar32, "FarJmpGCTarget")?;

    // ------------------------------------------------------------ GC: the hypervisor context
    b.section(32)?;
    emit_gc(&mut b, o, vm, HostDrSlots::HOST64)?;
    mov_fix(&mut b, ebx, K::GcCpumOff, Operand::Value(0))?;
    {
        let a = b.a();
        a.mov(ebp, edx)?;
        a.sub(ebp, ebx)?;
    }
    mov_fix(&mut b, eax, inter_target, Operand::None)?;
    b.a().mov(cr3, eax)?;
    jmp_rel32_fix(&mut b, K::Gc2IdNearRel, "IDExitTarget")?;

    // ------------------------------------------------------------ ID1/32: back into long mode
    b.section(32)?;
    b.label("IDExitTarget")?;
    {
        let a = b.a();
        a.mov(ebx, cr0)?;
        a.and(ebx, !(Cr0::PG.bits() as u32) as i32)?;
        a.mov(cr0, ebx)?;
        a.mov(eax, cr4)?;
        // LA57 goes back on while paging is off, before EFER.LME and CR0.PG.
        let set = if o.la57 {
            Cr4::PAE | Cr4::LA57
        } else {
            Cr4::PAE
        };
        a.or(eax, set.bits() as i32)?;
        a.mov(cr4, eax)?;
    }
    mov_fix(&mut b, eax, inter_long_cr3(o), Operand::None)?;
    {
        let a = b.a();
        a.mov(cr3, eax)?;
        a.mov(ecx, MSR_EFER)?;
        a.rdmsr()?;
        a.or(eax, Efer::LME.bits() as i32)?;
        a.wrmsr()?;
        a.or(ebx, Cr0::PG.bits() as i32)?;
        a.mov(cr0, ebx)?;
    }
    trace(&mut b, o, Step::LongModeOn)?;
    jmp_far_fix(&mut b, K::IdFar32To64BitMode, "IDExit64")?;

    // ------------------------------------------------------------ ID1/64: to the host address
    b.section(64)?;
    b.label("IDExit64")?;
    trace(&mut b, o, Step::Mode64)?;
    {
        // Upper register halves are undefined after the mode switches.
        let a = b.a();
        a.mov(ebp, ebp)?;
        a.mov(edi, edi)?;
    }
    // Host CR3 through the RC mapping (the intermediate context does not map
    // the HMA at its HC address); carried in RAX to the HC copy.
    mov_fix(&mut b, edx, K::GcCpumOff, Operand::Value(0))?;
    {
        let a = b.a();
        a.add(rdx, rbp)?;
        a.mov(rax, qword_ptr(rdx + d(l::HOST64_CR3)))?;
    }
    jmp_slot64(&mut b, "pHCExitTarget", K::Hc64Bit, "HCExitTarget")?;

    // ------------------------------------------------------------ HC1: host context (64-bit)
    b.section(64)?;
    emit_host_exit64(&mut b, o)?;
    ctx_entry_traps(&mut b)?;
    finish(
        kind,
        desc,
        b,
        &[
            ("HC0", View::Hc, 64, "vmmR0HostToGuest"),
            ("ID0/64", View::Id, 64, "IDEnterTarget"),
            ("ID0", View::Id, 32, "IDEnter32"),
            ("GC", View::Rc, 32, "FarJmpGCTarget"),
            ("ID1", View::Id, 32, "IDExitTarget"),
            ("ID1/64", View::Id, 64, "IDExit64"),
            ("HC1", View::Hc, 64, "HCExitTarget"),
        ],
    )
}
