//! 32-bit or PAE host ⇄ 32-bit or PAE hypervisor context
//! (`VMMSWITCHER_32_TO_32`, `_32_TO_PAE`, `_PAE_TO_32`, `_PAE_TO_PAE`;
//! VirtualBox's `PAEand32Bit.mac`).
//!
//! The hypervisor context is 32-bit protected mode at RC addresses with its own
//! CR3 (`Hyper.cr3`), GDT, IDT, TSS and LDT, stack and debug registers. The
//! C entry `u32 entry(void *vm, u32 off_cpumcpu)` (cdecl) saves the host, masks
//! NMI LVTs, parks SYSENTER_CS (0) and EFER.SCE (clear) while away, clears
//! `USED_FPU`, switches CR4/CR0 to the hyper rules (WP clear, TS set for lazy
//! FPU), loads the intermediate CR3 and — only when the paging flavour changes —
//! flips CR4.PAE in the identity copy, then far-jumps to the RC copy, loads the
//! hyper context and `iret`s to `Hyper.eip` with the hyper general registers.
//!
//! RC code returns with `call` to the exit entry (status in EAX) or the C exit
//! (status as the argument). The exit saves the hyper registers (the return
//! address becomes `Hyper.eip`, so the next entry resumes after the call),
//! derives its VCPU from TR, and reverses every step; if the RC code used the
//! FPU (`USED_FPU`) the guest FPU is saved and the host's restored. The status
//! is stored in `CpumCpu32::ret_code` (`/VMM/CPUn/RetCode`) and returned.
//!
//! The call trampoline pops a target and an argument byte count pushed on the
//! hyper stack by the VMM, calls the target (cdecl), drops the arguments and
//! exits with the target's EAX; resumed, it exits again with
//! [`TRAMPOLINE_RESUMED`].

use core::mem::offset_of;

use cpum::layout::{self as l, disp};
use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER, MSR_SYSENTER_CS};
use cpum::UseFlags;
use iced_x86::code_asm::*;

use super::{
    adv_start32, adv_stop32, apic_mask32, apic_unmask32, ctx_entry_traps, finish, jmp_far_fix,
    jmp_rel32_fix, load_tr_ldtr, mov_fix, round_trip_steps, skippable, trace, Revision, Step,
    TemplateOptions, VmLayout,
};
use crate::builder::{BuildError, Builder, Operand, Slot};
use crate::def::{SwitcherDef, SwitcherKind, View};
use crate::fixup::FixupKind as K;

/// Status a resumed trampoline returns (where VirtualBox returns its
/// internal-error status `VERR_VMM_SWITCHER_IPE_1`). Negative, like every
/// error status; the value is this project's.
pub const TRAMPOLINE_RESUMED: u32 = (-2905i32) as u32;

/// A paging flavour of this family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// 32-bit paging.
    Legacy32,
    /// PAE paging.
    Pae,
}

impl Flavour {
    fn inter_cr3(self) -> K {
        match self {
            Self::Legacy32 => K::Inter32BitCr3,
            Self::Pae => K::InterPaeCr3,
        }
    }
}

const fn d(off: usize) -> i32 {
    disp(off)
}

/// EDX = HC address of this VCPU's CPUMCPU (EBP = offset from CPUM).
pub(crate) fn hc_cpumcpu(b: &mut Builder) -> Result<(), BuildError> {
    mov_fix(b, edx, K::HcCpumOff, Operand::Value(0))?;
    b.a().add(edx, ebp)?;
    Ok(())
}

/// Traces `step` in 32-bit host code and reloads EDX = HC CPUMCPU after it.
pub(crate) fn trace_hc(b: &mut Builder, o: &TemplateOptions, step: Step) -> Result<(), BuildError> {
    if o.trace {
        trace(b, o, step)?;
        hc_cpumcpu(b)?;
    }
    Ok(())
}

/// The 32-bit C entry (cdecl `u32 entry(void *vm, u32 off_cpumcpu)`) shared
/// by the 32-bit/PAE-host switchers: profiles, keeps EBP and EFLAGS, and
/// far-calls `vmmR0HostToGuestAsm` with EBP = VCPU offset and EDX = HC CPUM;
/// unmasks the NMI LVTs after it for revisions B and C.
pub(crate) fn emit_host_entry32(
    b: &mut Builder,
    o: &TemplateOptions,
    _vm: &VmLayout,
) -> Result<(), BuildError> {
    b.label("vmmR0HostToGuest")?;
    trace(b, o, Step::Entry)?;
    if o.stats {
        // This VCPU's profile: HC CPUM plus the VCPU offset (cdecl arg 2).
        mov_fix(b, ecx, K::HcCpumOff, Operand::Value(l::STAT_TO_GC as u32))?;
        b.a().add(ecx, dword_ptr(esp + 8))?;
        adv_start32(b)?;
    }
    {
        let a = b.a();
        a.push(ebp)?;
        a.mov(ebp, dword_ptr(esp + 12))?;
        a.pushfd()?;
        a.cli()?;
    }
    mov_fix(b, edx, K::HcCpumOff, Operand::Value(0))?;
    let worker = b.named("vmmR0HostToGuestAsm");
    b.a().push(cs)?;
    b.a().call(worker)?;
    if o.apic_nmi_masking && o.revision.unmasks_after_call() {
        // EDX = CPUMCPU (HC) as the exit path leaves it; EAX = status.
        apic_unmask32(b, o)?;
    }
    b.a().popfd()?;
    b.a().pop(ebp)?;
    if o.stats {
        mov_fix(b, ecx, K::HcCpumOff, Operand::Value(l::STAT_TO_HC as u32))?;
        b.a().add(ecx, dword_ptr(esp + 8))?;
        adv_stop32(b)?;
    }
    b.a().ret()?;
    Ok(())
}

/// Saves the host's callee-saved registers, ESP, selectors and descriptor
/// tables into `CpumCpu32::host` at EDX.
pub(crate) fn save_host32(a: &mut CodeAssembler) -> Result<(), BuildError> {
    a.mov(dword_ptr(edx + d(l::HOST32_EBX)), ebx)?;
    a.mov(dword_ptr(edx + d(l::HOST32_EDI)), edi)?;
    a.mov(dword_ptr(edx + d(l::HOST32_ESI)), esi)?;
    a.mov(dword_ptr(edx + d(l::HOST32_ESP)), esp)?;
    a.mov(dword_ptr(edx + d(l::HOST32_EBP)), ebp)?;
    a.mov(word_ptr(edx + d(l::HOST32_DS)), ds)?;
    a.mov(word_ptr(edx + d(l::HOST32_ES)), es)?;
    a.mov(word_ptr(edx + d(l::HOST32_FS)), fs)?;
    a.mov(word_ptr(edx + d(l::HOST32_GS)), gs)?;
    a.mov(word_ptr(edx + d(l::HOST32_SS)), ss)?;
    a.sldt(word_ptr(edx + d(l::HOST32_LDTR)))?;
    a.sidt(fword_ptr(edx + d(l::HOST32_IDTR)))?;
    a.sgdt(fword_ptr(edx + d(l::HOST32_GDTR)))?;
    a.str(word_ptr(edx + d(l::HOST32_TR)))?;
    Ok(())
}

/// Reloads the host GDT, IDT, stack, TSS (busy bit cleared first) and LDT
/// from `CpumCpu32::host` at EDX. Clobbers EAX.
pub(crate) fn restore_host_tables32(a: &mut CodeAssembler) -> Result<(), BuildError> {
    a.lgdt(fword_ptr(edx + d(l::HOST32_GDTR)))?;
    a.lidt(fword_ptr(edx + d(l::HOST32_IDTR)))?;
    // The host stack first: from here on a fault in the exit path is
    // delivered through the host IDT on the host stack and reported,
    // instead of escalating to a triple fault on the unmapped hyper stack.
    a.lss(esp, fword_ptr(edx + d(l::HOST32_ESP)))?;
    load_tr_ldtr(
        a,
        edx,
        l::HOST32_TR,
        l::HOST32_GDTR + offset_of!(cpum::regs::Xdtr32, base),
        l::HOST32_LDTR,
    )
}

/// Reloads the host DS, ES, FS and GS from `CpumCpu32::host` at EDX. Clobbers EAX.
pub(crate) fn restore_host_segs32(a: &mut CodeAssembler) -> Result<(), BuildError> {
    for (sreg, off) in [
        (ds, l::HOST32_DS),
        (es, l::HOST32_ES),
        (fs, l::HOST32_FS),
        (gs, l::HOST32_GS),
    ] {
        a.mov(eax, dword_ptr(edx + d(off)))?;
        a.mov(sreg, eax)?;
    }
    Ok(())
}

/// Reloads the host's EDI, ESI, EBX and EBP from `CpumCpu32::host` at EDX.
pub(crate) fn restore_host_gprs32(a: &mut CodeAssembler) -> Result<(), BuildError> {
    a.mov(edi, dword_ptr(edx + d(l::HOST32_EDI)))?;
    a.mov(esi, dword_ptr(edx + d(l::HOST32_ESI)))?;
    a.mov(ebx, dword_ptr(edx + d(l::HOST32_EBX)))?;
    a.mov(ebp, dword_ptr(edx + d(l::HOST32_EBP)))?;
    Ok(())
}

/// In identity-mapped code: paging off, CR4.PAE as `to` needs it, `to`'s
/// intermediate CR3 (through `reg`), paging on. Clobbers EAX and `reg`.
fn switch_paging(b: &mut Builder, reg: AsmRegister32, to: Flavour) -> Result<(), BuildError> {
    {
        let a = b.a();
        a.mov(eax, cr0)?;
        a.and(eax, !(Cr0::PG.bits() as u32) as i32)?;
        a.mov(cr0, eax)?;
        a.mov(reg, cr4)?;
        if to == Flavour::Pae {
            a.or(reg, Cr4::PAE.bits() as i32)?;
        } else {
            a.and(reg, !(Cr4::PAE.bits() as u32) as i32)?;
        }
        a.mov(cr4, reg)?;
    }
    mov_fix(b, reg, to.inter_cr3(), Operand::None)?;
    let a = b.a();
    a.mov(cr3, reg)?;
    a.or(eax, Cr0::PG.bits() as i32)?;
    a.mov(cr0, eax)?;
    Ok(())
}

/// EDX = RC `CpumCpu` of the VCPU whose hyper TSS is in TR. Clobbers ECX.
fn rc_cpumcpu_from_tr(b: &mut Builder) -> Result<(), BuildError> {
    mov_fix(b, edx, K::GcCpumOff, Operand::Value(0))?;
    let a = b.a();
    a.str(ecx)?;
    a.movzx(ecx, cx)?;
    a.sub(ecx, dword_ptr(edx + d(l::CPUM_HYPER_TSS_SEL0)))?;
    a.shr(ecx, cpum::HYPER_TSS_STRIDE_SHIFT)?;
    a.imul_2(ecx, dword_ptr(edx + d(l::CPUM_CB_CPUMCPU)))?;
    a.add(ecx, dword_ptr(edx + d(l::CPUM_OFF_CPUMCPU0)))?;
    a.add(edx, ecx)?;
    Ok(())
}

/// Where the host context keeps DR0–DR3 (the hyper side saves them there).
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostDrSlots {
    /// Offset of host DR0 in `CpumCpu*`.
    pub dr0: usize,
    /// Bytes between consecutive host DRs (4 for a 32-bit host, 8 for AMD64).
    pub stride: usize,
}

impl HostDrSlots {
    /// A 32-bit host context.
    pub const HOST32: Self = Self {
        dr0: l::HOST32_DR0,
        stride: l::HOST32_DR1 - l::HOST32_DR0,
    };
    /// A 64-bit host context.
    pub const HOST64: Self = Self {
        dr0: l::HOST64_DR0,
        stride: 8,
    };
}

/// The hypervisor-context (RC, 32-bit) part shared by every switcher whose
/// hypervisor context is 32-bit or PAE: the far-jump target that loads the
/// hyper context and `iret`s to `Hyper.eip`, the call trampoline, the C exit
/// and the assembly exit up to the point where the hyper registers are saved.
///
/// In at `FarJmpGCTarget`: EBP = hyper CR3, ESI = RC `CpumCpu`. Out at the
/// end of the exit: EDX = RC `CpumCpu`, EDI = status, stack = hyper stack.
pub(crate) fn emit_gc(
    b: &mut Builder,
    o: &TemplateOptions,
    _vm: &VmLayout,
    host: HostDrSlots,
) -> Result<(), BuildError> {
    b.label("FarJmpGCTarget")?;
    {
        let a = b.a();
        a.mov(cr3, ebp)?;
        a.mov(edx, esi)?;
    }
    if o.trace {
        trace(b, o, Step::RcEntered)?;
        b.a().mov(edx, esi)?;
    }
    b.a().lidt(fword_ptr(edx + d(l::HYPER_IDTR)))?;
    b.fixup(K::HyperDs, Slot::Imm, Operand::None);
    b.a().mov(eax, 0x0000_ffffu32)?;
    {
        let a = b.a();
        a.mov(ds, eax)?;
        a.mov(es, eax)?;
        a.xor(eax, eax)?;
        a.mov(fs, eax)?;
        a.mov(gs, eax)?;
        a.mov(eax, dword_ptr(edx + d(l::HYPER_RSP)))?;
        a.mov(dword_ptr(edx + d(l::HYPER_LSS_ESP)), eax)?;
        a.lss(esp, fword_ptr(edx + d(l::HYPER_LSS_ESP)))?;
        // This VCPU's hyper TSS and LDT.
        load_tr_ldtr(
            a,
            edx,
            l::HYPER_TR,
            l::HYPER_GDTR + offset_of!(cpum::regs::Xdtr64, base),
            l::HYPER_LDTR,
        )?;
        // Hyper debug registers.
        let mut no_dr = a.create_label();
        a.test(
            dword_ptr(edx + d(l::USE_FLAGS)),
            UseFlags::USE_DEBUG_REGS.bits(),
        )?;
        a.jz(no_dr)?;
        for (n, dr) in [dr0, dr1, dr2, dr3].into_iter().enumerate() {
            let slot = host.dr0 + host.stride * n;
            a.mov(eax, dr)?;
            a.mov(dword_ptr(edx + d(slot)), eax)?;
            if host.stride == 8 {
                a.mov(dword_ptr(edx + d(slot + 4)), 0u32)?;
            }
            a.mov(eax, dword_ptr(edx + d(l::HYPER_DR + 8 * n)))?;
            a.mov(dr, eax)?;
        }
        a.mov(eax, cpum::regs::DR6_INIT as u32)?;
        a.mov(dr6, eax)?;
        a.mov(eax, dword_ptr(edx + d(l::HYPER_DR + 8 * 7)))?;
        a.mov(dr7, eax)?;
        a.set_label(&mut no_dr)?;
        a.nop()?;
    }
    if o.trace {
        trace(b, o, Step::RcLoaded)?;
        b.a().mov(edx, esi)?;
    }
    if o.stats {
        b.a().lea(ecx, ptr(edx + d(l::STAT_TO_GC)))?;
        adv_stop32(b)?;
    }
    {
        let a = b.a();
        a.push(dword_ptr(edx + d(l::HYPER_RFLAGS)))?;
    }
    b.fixup(K::HyperCs, Slot::Imm, Operand::None);
    b.a().add_instruction(iced_x86::Instruction::with1(
        iced_x86::Code::Pushd_imm32,
        0x0000_ffffi32,
    )?)?;
    {
        let a = b.a();
        a.push(dword_ptr(edx + d(l::HYPER_RIP)))?;
        a.mov(eax, dword_ptr(edx + d(l::HYPER_RAX)))?;
        a.mov(ebx, dword_ptr(edx + d(l::HYPER_RBX)))?;
        a.mov(ecx, dword_ptr(edx + d(l::HYPER_RCX)))?;
        a.mov(esi, dword_ptr(edx + d(l::HYPER_RSI)))?;
        a.mov(edi, dword_ptr(edx + d(l::HYPER_RDI)))?;
        a.mov(ebp, dword_ptr(edx + d(l::HYPER_RBP)))?;
        a.mov(edx, dword_ptr(edx + d(l::HYPER_RDX)))?;
        a.iretd()?;
    }

    // The call trampoline: [esp] = target, [esp+4] = argument bytes, then the arguments.
    let to_host = b.named("VMMGCGuestToHostAsm");
    b.label("vmmGCCallTrampoline")?;
    {
        let a = b.a();
        let mut again = a.create_label();
        a.pop(eax)?;
        a.pop(edi)?;
        a.call(eax)?;
        a.add(esp, edi)?;
        a.set_label(&mut again)?;
        a.call(to_host)?;
        a.mov(eax, TRAMPOLINE_RESUMED)?;
        a.jmp(again)?;
    }
    // The C-callable exit: u32 status on the stack.
    b.label("vmmGCGuestToHost")?;
    b.a().mov(eax, dword_ptr(esp + 4))?;
    b.a().jmp(to_host)?;

    // The assembly exit: EAX = status, return address on the stack.
    b.label("VMMGCGuestToHostAsm")?;
    {
        let a = b.a();
        a.push(edx)?;
        a.push(ecx)?;
    }
    rc_cpumcpu_from_tr(b)?;
    {
        let a = b.a();
        a.pop(dword_ptr(edx + d(l::HYPER_RCX)))?;
        a.pop(dword_ptr(edx + d(l::HYPER_RDX)))?;
        a.pop(dword_ptr(edx + d(l::HYPER_RIP)))?;
        a.mov(dword_ptr(edx + d(l::HYPER_RSP)), esp)?;
        a.mov(dword_ptr(edx + d(l::HYPER_RAX)), eax)?;
        a.mov(dword_ptr(edx + d(l::HYPER_RBX)), ebx)?;
        a.mov(dword_ptr(edx + d(l::HYPER_RSI)), esi)?;
        a.mov(dword_ptr(edx + d(l::HYPER_RDI)), edi)?;
        a.mov(dword_ptr(edx + d(l::HYPER_RBP)), ebp)?;
        a.pushfd()?;
        a.pop(dword_ptr(edx + d(l::HYPER_RFLAGS)))?;
        a.sldt(word_ptr(edx + d(l::HYPER_LDTR)))?;
        a.mov(edi, eax)?; // status
    }
    if o.stats {
        b.a().lea(ecx, ptr(edx + d(l::STAT_TO_HC)))?;
        adv_start32(b)?;
    }
    if o.trace {
        let a = b.a();
        a.push(edx)?;
        trace(b, o, Step::RcExit)?;
        b.a().pop(edx)?;
    }
    Ok(())
}

/// The trace characters one round trip prints with `o.trace`, in order.
pub fn trace_steps(host: Flavour, target: Flavour, o: &TemplateOptions) -> Vec<Step> {
    use Step as S;
    let mut middle = vec![S::HostCrSaved, S::InterCr3];
    if host != target {
        middle.push(S::PaeOn);
    }
    middle.extend([
        S::RcEntered,
        S::RcLoaded,
        S::RcExit,
        S::HostCr3,
        S::HostTables,
        S::HostMsrs,
    ]);
    round_trip_steps(o, &middle)
}

/// Builds the switcher from `host` to `target` paging.
///
/// # Errors
/// [`BuildError`] if a template instruction cannot be assembled (a bug).
pub fn build(
    host: Flavour,
    target: Flavour,
    o: &TemplateOptions,
    vm: &VmLayout,
) -> Result<SwitcherDef, BuildError> {
    let (kind, desc) = match (host, target) {
        (Flavour::Legacy32, Flavour::Legacy32) => {
            (SwitcherKind::Legacy32To32, "32-bit to/from 32-bit")
        }
        (Flavour::Legacy32, Flavour::Pae) => (SwitcherKind::Legacy32ToPae, "32-bit to/from PAE"),
        (Flavour::Pae, Flavour::Legacy32) => (SwitcherKind::PaeTo32, "PAE to/from 32-bit"),
        (Flavour::Pae, Flavour::Pae) => (SwitcherKind::PaeToPae, "PAE to/from PAE"),
    };
    let need_id = host != target;
    let mut b = Builder::new(32)?;

    // ------------------------------------------------------------ HC0: C entry
    emit_host_entry32(&mut b, o, vm)?;

    // ------------------------------------------------------------ HC0: worker
    b.label("vmmR0HostToGuestAsm")?;
    {
        let a = b.a();
        a.add(edx, ebp)?;
        save_host32(a)?;
        a.pushfd()?;
        a.pop(dword_ptr(edx + d(l::HOST32_EFLAGS)))?;
    }
    trace_hc(&mut b, o, Step::HostSaved)?;
    if o.apic_nmi_masking {
        apic_mask32(&mut b, o)?;
        trace_hc(&mut b, o, Step::ApicMasked)?;
    }
    // SYSENTER_CS parked at 0 while away (skipped when the host does not use SYSENTER).
    skippable(&mut b, K::NoSysenterJmp, "htg_no_sysenter", |a| {
        a.mov(ebx, edx)?; // 2 bytes
        a.mov(ecx, MSR_SYSENTER_CS)?; // 5 bytes: the patch covers these 5 bytes + ...
        a.rdmsr()?;
        a.mov(dword_ptr(ebx + d(l::HOST32_SYSENTER_CS)), eax)?;
        a.mov(dword_ptr(ebx + d(l::HOST32_SYSENTER_CS + 4)), edx)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(edx, ebx)?;
        Ok(())
    })?;
    // EFER.SCE cleared while away (skipped when the host does not use SYSCALL).
    skippable(&mut b, K::NoSyscallJmp, "htg_no_syscall", |a| {
        a.mov(ebx, edx)?;
        a.mov(ecx, MSR_EFER)?;
        a.rdmsr()?;
        a.and(eax, !(Efer::SCE.bits() as u32) as i32)?;
        a.wrmsr()?;
        a.mov(edx, ebx)?;
        Ok(())
    })?;
    {
        let a = b.a();
        let mut no_dr = a.create_label();
        a.and(
            dword_ptr(edx + d(l::USE_FLAGS)),
            !UseFlags::USED_FPU.bits() as i32,
        )?;
        // Host DR7/DR6 parked when the host or the hyper context has live debug registers.
        a.test(
            dword_ptr(edx + d(l::USE_FLAGS)),
            (UseFlags::USE_DEBUG_REGS | UseFlags::USE_DEBUG_REGS_HOST).bits(),
        )?;
        a.jz(no_dr)?;
        a.mov(eax, dr7)?;
        a.mov(dword_ptr(edx + d(l::HOST32_DR7)), eax)?;
        a.xor(eax, eax)?;
        a.mov(dr7, eax)?;
        a.mov(eax, dr6)?;
        a.mov(dword_ptr(edx + d(l::HOST32_DR6)), eax)?;
        a.set_label(&mut no_dr)?;
        // Host control registers, then the hyper CR4/CR0.
        a.mov(eax, cr0)?;
        a.mov(dword_ptr(edx + d(l::HOST32_CR0)), eax)?;
        a.mov(eax, cr3)?;
        a.mov(dword_ptr(edx + d(l::HOST32_CR3)), eax)?;
        a.mov(ecx, cr4)?;
        a.mov(dword_ptr(edx + d(l::HOST32_CR4)), ecx)?;
        a.and(
            ecx,
            (Cr4::MCE | Cr4::PSE | Cr4::PAE | Cr4::VMXE).bits() as i32,
        )?;
        a.mov(eax, dword_ptr(edx + d(l::GUEST_CR4)))?;
        a.sub(edx, ebp)?; // CPUM
        a.and(eax, dword_ptr(edx + d(l::CPUM_CR4_AND_MASK)))?;
        a.or(eax, dword_ptr(edx + d(l::CPUM_CR4_OR_MASK)))?;
        a.add(edx, ebp)?;
        a.or(ecx, eax)?;
        a.mov(cr4, ecx)?;
        a.mov(eax, dword_ptr(edx + d(l::GUEST_CR0)))?;
        a.and(eax, Cr0::EM.bits() as i32)?;
        a.or(
            eax,
            (Cr0::PE | Cr0::PG | Cr0::TS | Cr0::ET | Cr0::NE | Cr0::MP).bits() as i32,
        )?;
        a.mov(cr0, eax)?;
        a.lgdt(fword_ptr(edx + d(l::HYPER_GDTR)))?;
        // Carried through the switch: EBP = hyper CR3, ESI = RC CpumCpu.
        a.mov(esi, ebp)?;
        a.mov(ebp, dword_ptr(edx + d(l::HYPER_CR3)))?;
    }
    if o.trace {
        trace(&mut b, o, Step::HostCrSaved)?;
    }
    mov_fix(&mut b, eax, K::GcCpumOff, Operand::Value(0))?;
    b.a().add(esi, eax)?;
    mov_fix(&mut b, eax, host.inter_cr3(), Operand::None)?;
    b.a().mov(cr3, eax)?;
    trace(&mut b, o, Step::InterCr3)?;
    if need_id {
        jmp_rel32_fix(&mut b, K::Hc2IdNearRel, "IDEnterTarget")?;
        // ------------------------------------------------------------ ID0: flip PAE
        b.section(32)?;
        b.label("IDEnterTarget")?;
        switch_paging(&mut b, ecx, target)?;
        trace(&mut b, o, Step::PaeOn)?;
    }
    jmp_far_fix(&mut b, K::GcFar32, "FarJmpGCTarget")?;

    // ------------------------------------------------------------ GC: hypervisor context
    b.section(32)?;
    emit_gc(&mut b, o, vm, HostDrSlots::HOST32)?;
    // EBP = VCPU offset from CPUM; ECX = host CR3.
    mov_fix(&mut b, ebx, K::GcCpumOff, Operand::Value(0))?;
    {
        let a = b.a();
        a.mov(ebp, edx)?;
        a.sub(ebp, ebx)?;
        a.mov(ecx, dword_ptr(edx + d(l::HOST32_CR3)))?;
    }
    mov_fix(&mut b, eax, target.inter_cr3(), Operand::None)?;
    b.a().mov(cr3, eax)?;
    if need_id {
        jmp_rel32_fix(&mut b, K::Gc2IdNearRel, "IDExitTarget")?;
        // ------------------------------------------------------------ ID1: flip PAE back
        b.section(32)?;
        b.label("IDExitTarget")?;
        switch_paging(&mut b, edx, host)?;
        jmp_rel32_fix(&mut b, K::Id2HcNearRel, "HCExitTarget")?;
    } else {
        jmp_rel32_fix(&mut b, K::Gc2HcNearRel, "HCExitTarget")?;
    }

    // ------------------------------------------------------------ HC1: host context
    b.section(32)?;
    b.label("HCExitTarget")?;
    b.a().mov(cr3, ecx)?;
    trace(&mut b, o, Step::HostCr3)?;
    hc_cpumcpu(&mut b)?;
    {
        let a = b.a();
        restore_host_tables32(a)?;
        restore_host_segs32(a)?;
    }
    trace_hc(&mut b, o, Step::HostTables)?;
    skippable(&mut b, K::NoSysenterJmp, "gth_no_sysenter", |a| {
        a.mov(ebx, edx)?;
        a.mov(ecx, MSR_SYSENTER_CS)?;
        a.mov(eax, dword_ptr(ebx + d(l::HOST32_SYSENTER_CS)))?;
        a.mov(edx, dword_ptr(ebx + d(l::HOST32_SYSENTER_CS + 4)))?;
        a.wrmsr()?;
        a.mov(edx, ebx)?;
        Ok(())
    })?;
    skippable(&mut b, K::NoSyscallJmp, "gth_no_syscall", |a| {
        a.mov(ebx, edx)?;
        a.mov(ecx, MSR_EFER)?;
        a.rdmsr()?;
        a.or(eax, Efer::SCE.bits() as i32)?;
        a.wrmsr()?;
        a.mov(edx, ebx)?;
        Ok(())
    })?;
    {
        // Lazy FPU: the RC code used the FPU, so the guest state goes to
        // Guest.fpu and the host's comes back.
        let a = b.a();
        let mut no_fpu = a.create_label();
        a.test(dword_ptr(edx + d(l::USE_FLAGS)), UseFlags::USED_FPU.bits())?;
        a.jz(no_fpu)?;
        a.mov(eax, cr0)?;
        a.and(eax, !((Cr0::TS | Cr0::EM).bits() as u32) as i32)?;
        a.mov(cr0, eax)?;
        a.fxsave(ptr(edx + d(l::GUEST_FPU)))?;
        a.fxrstor(ptr(edx + d(l::HOST32_FPU)))?;
        a.set_label(&mut no_fpu)?;
        a.mov(ecx, dword_ptr(edx + d(l::HOST32_CR4)))?;
        a.mov(cr4, ecx)?;
        a.mov(ecx, dword_ptr(edx + d(l::HOST32_CR0)))?;
        a.mov(cr0, ecx)?;
        // Debug registers, after CR4 (CR4.DE matters).
        let mut no_dr = a.create_label();
        let mut no_hyper_dr = a.create_label();
        a.test(
            dword_ptr(edx + d(l::USE_FLAGS)),
            (UseFlags::USE_DEBUG_REGS | UseFlags::USE_DEBUG_REGS_HOST).bits(),
        )?;
        a.jz(no_dr)?;
        a.xor(eax, eax)?;
        a.mov(dr7, eax)?;
        a.test(
            dword_ptr(edx + d(l::USE_FLAGS)),
            UseFlags::USE_DEBUG_REGS.bits(),
        )?;
        a.jz(no_hyper_dr)?;
        for (dr, host_off) in [
            (dr0, l::HOST32_DR0),
            (dr1, l::HOST32_DR1),
            (dr2, l::HOST32_DR2),
            (dr3, l::HOST32_DR3),
        ] {
            a.mov(eax, dword_ptr(edx + d(host_off)))?;
            a.mov(dr, eax)?;
        }
        a.set_label(&mut no_hyper_dr)?;
        a.mov(eax, dword_ptr(edx + d(l::HOST32_DR6)))?;
        a.mov(dr6, eax)?;
        a.mov(eax, dword_ptr(edx + d(l::HOST32_DR7)))?;
        a.mov(dr7, eax)?;
        a.set_label(&mut no_dr)?;
        a.nop()?;
    }
    trace_hc(&mut b, o, Step::HostMsrs)?;
    if o.apic_nmi_masking && o.revision == Revision::A {
        apic_unmask32(&mut b, o)?;
        trace_hc(&mut b, o, Step::ApicUnmasked)?;
    }
    trace_hc(&mut b, o, Step::Return)?;
    {
        let a = b.a();
        // The RC code's status: kept in `ret_code` and returned.
        a.mov(dword_ptr(edx + d(l::RET_CODE)), edi)?;
        a.mov(eax, edi)?;
        restore_host_gprs32(a)?;
        a.push(dword_ptr(edx + d(l::HOST32_EFLAGS)))?;
        a.popfd()?;
        a.retf()?;
    }
    ctx_entry_traps(&mut b)?;
    let regions: &[_] = if need_id {
        &[
            ("HC0", View::Hc, 32, "vmmR0HostToGuest"),
            ("ID0", View::Id, 32, "IDEnterTarget"),
            ("GC", View::Rc, 32, "FarJmpGCTarget"),
            ("ID1", View::Id, 32, "IDExitTarget"),
            ("HC1", View::Hc, 32, "HCExitTarget"),
        ]
    } else {
        &[
            ("HC0", View::Hc, 32, "vmmR0HostToGuest"),
            ("GC", View::Rc, 32, "FarJmpGCTarget"),
            ("HC1", View::Hc, 32, "HCExitTarget"),
        ]
    };
    finish(kind, desc, b, regions)
}
