//! 32-bit or PAE host → 64-bit long-mode hypervisor context
//! (`VMMSWITCHER_32_TO_AMD64`, `VMMSWITCHER_PAE_TO_AMD64`; VirtualBox's
//! `LegacyandAMD64.mac`).
//!
//! The C entry `u32 entry(void *vm, u32 off_cpumcpu)` (cdecl) saves the host
//! context into `CpumCpu32::host`, masks NMI LVTs, loads the hyper GDT and the
//! intermediate CR3 of the host's flavour, jumps to its identity copy, turns
//! paging off, sets CR4.PAE, loads the intermediate PML4, sets EFER.LME (OR
//! mask from the CPU), turns paging on with CR0.WP clear and far-jumps into
//! 64-bit mode. There it loads the hyper stack, syncs FPU and debug state on
//! request, and calls the helper at `Hyper.rip` with RSI = `&Guest`, RDX =
//! `&CpumCpu` (RC). The helper's EAX is kept in `ret_code`; the way back
//! reverses every step and returns it.
//!
//! Register contract of the 64-bit helper: it may clobber every general
//! register except RSP (it must return with `ret`), and any of CR0.TS, CR4 bits
//! that do not change the paging mode, EFER.SCE, data segments and the debug
//! registers. EBP holds the VCPU offset on the way in and is kept on the hyper
//! stack across the call.

use cpum::layout::{self as l, disp};
use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER};
use cpum::UseFlags;
use iced_x86::code_asm::*;

use super::legacy_pae::{
    emit_host_entry32, hc_cpumcpu, restore_host_gprs32, restore_host_segs32, restore_host_tables32,
    save_host32, trace_hc,
};
use super::{
    adv_start64, adv_stop64, apic_mask32, apic_unmask32, ctx_entry_traps, finish, jmp_far_fix,
    jmp_far_id32, jmp_rel32_fix, jmp_slot64, mov_fix, round_trip_steps, slot64, trace, Revision,
    Step, TemplateOptions, VmLayout,
};
use crate::builder::{BuildError, Builder, Operand, Slot};
use crate::def::{SwitcherDef, SwitcherKind, View};
use crate::fixup::FixupKind as K;

/// Which host flavour the template is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPaging {
    /// 32-bit non-PAE host: PAE is turned off again on the way back.
    Legacy32,
    /// PAE host: PAE stays on.
    Pae,
}

const fn d(off: usize) -> i32 {
    disp(off)
}

/// Offset of `Guest.dr[n]`.
const fn guest_dr(n: usize) -> i32 {
    d(l::GUEST_DR + 8 * n)
}

/// Crash-dump marker in HC/IC code: EDX/RDX = CPUMCPU.
fn marker32(b: &mut Builder, o: &TemplateOptions, n: u32) -> Result<(), BuildError> {
    if o.crash_markers {
        b.a().mov(dword_ptr(edx + guest_dr(4)), n)?;
    }
    Ok(())
}

fn marker64(b: &mut Builder, o: &TemplateOptions, n: u32) -> Result<(), BuildError> {
    if o.crash_markers {
        b.a().mov(dword_ptr(rdx + guest_dr(4)), n)?;
    }
    Ok(())
}

/// Crash-dump marker while paging is off: the scratch page's physical address is in CR2.
fn marker_id(b: &mut Builder, o: &TemplateOptions, n: u32) -> Result<(), BuildError> {
    if o.crash_markers {
        let a = b.a();
        a.mov(eax, cr2)?;
        a.mov(dword_ptr(eax), n)?;
    }
    Ok(())
}

/// RDX = RC address of this VCPU's CPUMCPU, from the 64-bit CPUM slot.
fn load_ic_cpumcpu(b: &mut Builder, slot: CodeLabel) -> Result<(), BuildError> {
    let a = b.a();
    a.mov(rdx, qword_ptr(slot))?;
    a.add(edx, ebp)?;
    Ok(())
}

/// Revision C, in HC0 with EDX = CPUMCPU and EAX = the host's EFER (low
/// half): keeps EAX in EDI for ID0's EFER write and puts in ESI the AND mask
/// for the CR0 value that turns paging on — WP clear, and on an FPU-sync
/// trip TS and EM clear as well, so that FXRSTOR in 64-bit mode needs no
/// CR0 writes of its own (FXRSTOR raises #NM only with TS or EM set, SDM
/// Vol. 2A FXRSTOR; the host's CR0 is written back on the way home).
/// Clobbers flags.
fn rev_c_carry_to_id0(a: &mut CodeAssembler) -> Result<(), BuildError> {
    let mut no_fpu = a.create_label();
    a.mov(edi, eax)?;
    a.mov(esi, !(Cr0::WP.bits() as u32))?;
    a.test(
        dword_ptr(edx + d(l::USE_FLAGS)),
        UseFlags::SYNC_FPU_STATE.bits(),
    )?;
    a.jz(no_fpu)?;
    a.mov(esi, !((Cr0::WP | Cr0::TS | Cr0::EM).bits() as u32))?;
    a.set_label(&mut no_fpu)?;
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
            S::IdEntered,
            S::PaeOn,
            S::LongModeOn,
            S::PagingOn,
            S::Mode64,
            S::HyperStack,
            S::Synced,
            S::HelperReturned,
            S::Compat,
            S::LongModeOff,
            S::HostPaging,
            S::HostCr3,
            S::HostTables,
            S::HostSegments,
            S::HostCr,
        ],
    )
}

/// Builds the switcher for `host`.
///
/// # Errors
/// [`BuildError`] if a template instruction cannot be assembled (a bug).
pub fn build(
    host: HostPaging,
    o: &TemplateOptions,
    vm: &VmLayout,
) -> Result<SwitcherDef, BuildError> {
    let (kind, inter_cr3_hc, desc) = match host {
        HostPaging::Legacy32 => (
            SwitcherKind::Legacy32ToAmd64,
            K::Inter32BitCr3,
            "32-bit to/from AMD64",
        ),
        HostPaging::Pae => (
            SwitcherKind::PaeToAmd64,
            K::InterPaeCr3,
            "PAE to/from AMD64",
        ),
    };
    let mut b = Builder::new(32)?;

    // ---------------------------------------------------------------- HC0: C entry
    emit_host_entry32(&mut b, o, vm)?;

    // ---------------------------------------------------------------- HC0: the worker
    b.label("vmmR0HostToGuestAsm")?;
    b.a().add(edx, ebp)?;
    if o.crash_markers {
        let a = b.a();
        a.mov(eax, dword_ptr(edx + guest_dr(5)))?;
        a.mov(cr2, eax)?;
    }
    marker32(&mut b, o, 1)?;
    save_host32(b.a())?;
    marker32(&mut b, o, 2)?;
    trace_hc(&mut b, o, Step::HostSaved)?;
    if o.apic_nmi_masking {
        apic_mask32(&mut b, o)?;
        trace_hc(&mut b, o, Step::ApicMasked)?;
    }
    {
        let a = b.a();
        a.mov(eax, cr0)?;
        a.mov(dword_ptr(edx + d(l::HOST32_CR0)), eax)?;
        a.mov(eax, cr3)?;
        a.mov(dword_ptr(edx + d(l::HOST32_CR3)), eax)?;
        a.mov(eax, cr4)?;
        a.mov(dword_ptr(edx + d(l::HOST32_CR4)), eax)?;
        a.mov(ebx, edx)?;
        a.mov(ecx, MSR_EFER)?;
        a.rdmsr()?;
        a.mov(dword_ptr(ebx + d(l::HOST32_EFER)), eax)?;
        a.mov(dword_ptr(ebx + d(l::HOST32_EFER + 4)), edx)?;
        a.mov(edx, ebx)?;
    }
    let rev_c = o.revision == Revision::C;
    if rev_c {
        rev_c_carry_to_id0(b.a())?;
    }
    marker32(&mut b, o, 3)?;
    b.a().lgdt(fword_ptr(edx + d(l::HYPER_GDTR)))?;
    marker32(&mut b, o, 4)?;
    trace_hc(&mut b, o, Step::HostCrSaved)?;
    mov_fix(&mut b, eax, inter_cr3_hc, Operand::None)?;
    b.a().mov(cr3, eax)?;
    trace(&mut b, o, Step::InterCr3)?;
    jmp_rel32_fix(&mut b, K::Hc2IdNearRel, "IDEnterTarget")?;

    // ---------------------------------------------------------------- ID0: mode switch
    b.section(32)?;
    b.label("IDEnterTarget")?;
    {
        let a = b.a();
        a.mov(ebx, cr0)?;
        a.and(ebx, !(Cr0::PG.bits() as u32) as i32)?;
        a.mov(cr0, ebx)?;
    }
    trace(&mut b, o, Step::IdEntered)?;
    marker_id(&mut b, o, 3)?;
    {
        let a = b.a();
        a.mov(ecx, cr4)?;
        a.or(ecx, Cr4::PAE.bits() as i32)?;
        a.mov(cr4, ecx)?;
    }
    mov_fix(&mut b, ecx, K::InterAmd64Cr3, Operand::None)?;
    b.a().mov(cr3, ecx)?;
    trace(&mut b, o, Step::PaeOn)?;
    marker_id(&mut b, o, 4)?;
    {
        let a = b.a();
        a.mov(ecx, MSR_EFER)?;
        if rev_c {
            // EFER is what the host had (EDI: its low half, saved above):
            // only WRMSR changes EFER but for LMA, which is 0 on a 32-bit
            // host and with paging off (Intel SDM Vol. 3A, 10.8.5
            // "Initializing IA-32e Mode"), and bits 63:32 are reserved, so
            // read as 0 (Vol. 4, IA32_EFER). No second RDMSR.
            a.mov(eax, edi)?;
            a.xor(edx, edx)?;
        } else {
            a.rdmsr()?;
        }
    }
    // `or eax, imm32` with a full 32-bit immediate the relocator fills in.
    b.fixup(K::EferOrMask, Slot::Imm, Operand::None);
    b.a().add_instruction(iced_x86::Instruction::with2(
        iced_x86::Code::Or_EAX_imm32,
        iced_x86::Register::EAX,
        0xffff_ffffu32,
    )?)?;
    {
        let a = b.a();
        a.and(eax, !(Efer::FFXSR.bits() as u32) as i32)?;
        a.wrmsr()?;
    }
    trace(&mut b, o, Step::LongModeOn)?;
    marker_id(&mut b, o, 5)?;
    {
        let a = b.a();
        a.or(ebx, Cr0::PG.bits() as i32)?;
        if rev_c {
            // ESI: ~WP, and ~(TS | EM) too on an FPU-sync trip.
            a.and(ebx, esi)?;
        } else {
            a.and(ebx, !(Cr0::WP.bits() as u32) as i32)?;
        }
        a.mov(cr0, ebx)?;
    }
    trace(&mut b, o, Step::PagingOn)?;
    jmp_far_fix(&mut b, K::IdFar32To64BitMode, "IDEnter64Mode")?;

    // ---------------------------------------------------------------- 64-bit, identity addresses
    b.section(64)?;
    let slot = b.named("pCpumIC");
    b.label("IDEnter64Mode")?;
    jmp_slot64(&mut b, "pICEnterTarget", K::Hc64BitNoCheck, "ICEnterTarget")?;
    slot64(&mut b, "pCpumIC", K::Gc64BitCpumOff, Operand::Value(0))?;

    b.label("ICEnterTarget")?;
    load_ic_cpumcpu(&mut b, slot)?;
    if o.trace {
        trace(&mut b, o, Step::Mode64)?;
        load_ic_cpumcpu(&mut b, slot)?;
    }
    {
        let a = b.a();
        a.mov(eax, cs)?;
        a.mov(ds, eax)?;
        a.mov(es, eax)?;
        a.xor(eax, eax)?;
        a.mov(fs, eax)?;
        a.mov(gs, eax)?;
    }
    marker64(&mut b, o, 5)?;
    {
        let a = b.a();
        a.mov(eax, dword_ptr(rdx + d(l::HYPER_RSP)))?;
        a.mov(dword_ptr(rdx + d(l::HYPER_LSS_ESP)), eax)?;
        a.lss(esp, fword_ptr(rdx + d(l::HYPER_LSS_ESP)))?;
    }
    marker64(&mut b, o, 6)?;
    if o.trace {
        trace(&mut b, o, Step::HyperStack)?;
        load_ic_cpumcpu(&mut b, slot)?;
    }
    {
        let a = b.a();
        let mut no_fpu = a.create_label();
        let mut no_dbg = a.create_label();
        a.mov(esi, dword_ptr(rdx + d(l::USE_FLAGS)))?;
        a.test(esi, UseFlags::SYNC_FPU_STATE.bits())?;
        a.jz(no_fpu)?;
        if rev_c {
            // CR0.TS and EM were cleared when paging went on.
            a.fxrstor(ptr(rdx + d(l::GUEST_FPU)))?;
        } else {
            a.mov(rax, cr0)?;
            a.mov(rcx, rax)?;
            a.and(rax, !((Cr0::TS | Cr0::EM).bits() as u32) as i32)?;
            a.mov(cr0, rax)?;
            a.fxrstor(ptr(rdx + d(l::GUEST_FPU)))?;
            a.mov(cr0, rcx)?;
        }
        a.and(
            dword_ptr(rdx + d(l::USE_FLAGS)),
            !UseFlags::SYNC_FPU_STATE.bits() as i32,
        )?;
        a.set_label(&mut no_fpu)?;
        a.test(esi, UseFlags::SYNC_DEBUG_STATE.bits())?;
        a.jz(no_dbg)?;
        for (n, dr) in [(0, dr0), (1, dr1), (2, dr2), (3, dr3), (6, dr6)] {
            a.mov(rax, qword_ptr(rdx + guest_dr(n)))?;
            a.mov(dr, rax)?;
        }
        a.and(
            dword_ptr(rdx + d(l::USE_FLAGS)),
            !UseFlags::SYNC_DEBUG_STATE.bits() as i32,
        )?;
        a.set_label(&mut no_dbg)?;
        a.nop()?;
    }
    marker64(&mut b, o, 9)?;
    trace(&mut b, o, Step::Synced)?;
    if o.stats {
        if o.trace {
            // The trace above clobbered RDX.
            load_ic_cpumcpu(&mut b, slot)?;
        }
        b.a().lea(rcx, ptr(rdx + d(l::STAT_TO_GC)))?;
        adv_stop64(&mut b)?;
    }
    load_ic_cpumcpu(&mut b, slot)?;
    {
        let a = b.a();
        a.mov(r9, qword_ptr(rdx + d(l::HYPER_RIP)))?;
        a.lea(rsi, ptr(rdx + d(l::GUEST_FPU)))?;
        // Keep the VCPU offset across the helper; two pushes keep the
        // helper's entry RSP at 8 mod 16 for a 16-aligned hyper stack.
        a.push(rbp)?;
        a.push(rbp)?;
        a.call(r9)?;
        a.pop(rbp)?;
        a.pop(rbp)?;
        a.mov(r12d, eax)?;
    }
    trace(&mut b, o, Step::HelperReturned)?;
    load_ic_cpumcpu(&mut b, slot)?;
    b.a().mov(dword_ptr(rdx + d(l::RET_CODE)), r12d)?;
    marker64(&mut b, o, 10)?;
    if o.stats {
        b.a().lea(rcx, ptr(rdx + d(l::STAT_TO_HC)))?;
        adv_start64(&mut b)?;
    }
    let to_host = b.named("VMMGCGuestToHostAsm");
    b.a().jmp(to_host)?;

    // RC entry stubs: unused by this family.
    b.label("vmmGCCallTrampoline")?;
    b.a().int3()?;
    b.label("vmmGCGuestToHost")?;
    b.a().int3()?;

    b.label("VMMGCGuestToHostAsm")?;
    if rev_c {
        // The host's EFER (EDI) and CR0 (ESI) for ID1, which runs with paging off.
        load_ic_cpumcpu(&mut b, slot)?;
        let a = b.a();
        a.mov(edi, dword_ptr(rdx + d(l::HOST32_EFER)))?;
        a.mov(esi, dword_ptr(rdx + d(l::HOST32_CR0)))?;
    }
    jmp_far_id32(&mut b, "fpIDEnterTarget", "IDExitTarget")?;

    // ---------------------------------------------------------------- ID1: back to host paging
    b.section(32)?;
    b.label("IDExitTarget")?;
    trace(&mut b, o, Step::Compat)?;
    {
        let a = b.a();
        a.mov(ebx, cr0)?;
        a.and(ebx, !(Cr0::PG.bits() as u32) as i32)?;
        a.mov(cr0, ebx)?;
    }
    mov_fix(&mut b, edx, inter_cr3_hc, Operand::None)?;
    {
        let a = b.a();
        a.mov(cr3, edx)?;
        a.mov(ecx, MSR_EFER)?;
        if rev_c {
            // The host's EFER itself, LME clear as on any 32-bit host, in
            // place of RDMSR, AND and the restoring WRMSR in HC1: LME may
            // be cleared now that paging is off (SDM Vol. 3A, 10.8.5.4
            // "Switching Out of IA-32e Mode Operation"), and the host's NXE
            // and SCE are safe here because the intermediate tables the
            // VMM builds carry no XD bit (reserved with NXE = 0) and no
            // SYSCALL runs before the host's code.
            a.mov(eax, edi)?;
            a.and(eax, !(Efer::LME.bits() as u32) as i32)?;
            a.xor(edx, edx)?;
        } else {
            a.rdmsr()?;
            a.and(eax, !(Efer::LME.bits() as u32) as i32)?;
        }
        a.wrmsr()?;
    }
    trace(&mut b, o, Step::LongModeOff)?;
    if host == HostPaging::Legacy32 {
        let a = b.a();
        a.mov(eax, cr4)?;
        a.and(eax, !(Cr4::PAE.bits() as u32) as i32)?;
        a.mov(cr4, eax)?;
    }
    {
        let a = b.a();
        let mut just_a_jump = a.create_label();
        if rev_c {
            // Paging goes on with the host's own CR0 (PG and PE set, as
            // on any paged host), which HC1 then need not write again:
            // WP, TS, EM, CD, NW have no effect on the intermediate tables'
            // supervisor-writable mappings or on the code to HC1 (no FPU
            // instruction), and CR0 has no bits that must wait for CR4 or
            // CR3 (SDM Vol. 3A, 2.5 "Control Registers").
            a.mov(cr0, esi)?;
        } else {
            a.or(ebx, Cr0::PG.bits() as i32)?;
            a.mov(cr0, ebx)?;
        }
        a.jmp(just_a_jump)?;
        a.set_label(&mut just_a_jump)?;
        a.nop()?;
    }
    trace(&mut b, o, Step::HostPaging)?;
    jmp_rel32_fix(&mut b, K::Id2HcNearRel, "ICExitTarget")?;

    // ---------------------------------------------------------------- HC1: host context
    b.section(32)?;
    b.label("ICExitTarget")?;
    // The selector fills the low word; the high word of the immediate stays 0.
    b.fixup(K::HyperDs, Slot::Imm, Operand::None);
    b.a().mov(eax, 0x0000_ffffu32)?;
    {
        let a = b.a();
        a.mov(ds, eax)?;
        a.mov(es, eax)?;
    }
    mov_fix(&mut b, edx, K::GcCpumOff, Operand::Value(0))?;
    {
        let a = b.a();
        a.add(edx, ebp)?;
        a.mov(esi, dword_ptr(edx + d(l::HOST32_CR3)))?;
        a.mov(cr3, esi)?;
    }
    trace(&mut b, o, Step::HostCr3)?;
    hc_cpumcpu(&mut b)?;
    {
        let a = b.a();
        if !rev_c {
            a.mov(ebx, edx)?;
            a.mov(ecx, MSR_EFER)?;
            a.mov(eax, dword_ptr(ebx + d(l::HOST32_EFER)))?;
            a.mov(edx, dword_ptr(ebx + d(l::HOST32_EFER + 4)))?;
            a.wrmsr()?;
            a.mov(edx, ebx)?;
        }
        restore_host_tables32(a)?;
    }
    trace_hc(&mut b, o, Step::HostTables)?;
    restore_host_segs32(b.a())?;
    trace_hc(&mut b, o, Step::HostSegments)?;
    {
        let a = b.a();
        a.mov(ecx, dword_ptr(edx + d(l::HOST32_CR4)))?;
        a.mov(cr4, ecx)?;
        if !rev_c {
            a.mov(ecx, dword_ptr(edx + d(l::HOST32_CR0)))?;
            a.mov(cr0, ecx)?;
        }
    }
    trace_hc(&mut b, o, Step::HostCr)?;
    if o.apic_nmi_masking && o.revision == Revision::A {
        apic_unmask32(&mut b, o)?;
        trace_hc(&mut b, o, Step::ApicUnmasked)?;
    }
    trace_hc(&mut b, o, Step::Return)?;
    {
        let a = b.a();
        restore_host_gprs32(a)?;
        a.mov(eax, dword_ptr(edx + d(l::RET_CODE)))?;
        a.retf()?;
    }

    ctx_entry_traps(&mut b)?;
    finish(
        kind,
        desc,
        b,
        &[
            ("HC0", View::Hc, 32, "vmmR0HostToGuest"),
            ("ID0", View::Id, 32, "IDEnterTarget"),
            ("ID0/64", View::Id, 64, "IDEnter64Mode"),
            ("ID1", View::Id, 32, "IDExitTarget"),
            ("HC1", View::Hc, 32, "ICExitTarget"),
        ],
    )
}
