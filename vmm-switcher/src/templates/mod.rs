//! Switcher templates, one module per family, and the code pieces they share.

pub mod amd64_amd64;
pub mod amd64_legacy;
pub mod legacy_amd64;
pub mod legacy_pae;
pub mod stub;

use core::ops::Add;

use iced_x86::code_asm::*;
use serde::Serialize;

use crate::builder::{BuildError, Builder, Operand, Slot};
use crate::fixup::FixupKind;

/// Which algorithm the switcher follows: the two seeds' (A, B), which differ
/// in where the APIC NMI vectors are unmasked again, or this project's
/// cheaper one (C).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum Revision {
    /// Revision A: in the exit path, before the host's general registers and
    /// the far return (host CS not yet reloaded).
    A,
    /// Revision B: in the C-callable entry, right after the call into the
    /// worker returns (host CS is back).
    B,
    /// Revision C: unmasks where B does, with fewer expensive operations and
    /// the same guarantees: one xAPIC read-back after the last masking write
    /// instead of one per write, the APIC version taken from
    /// `CpumCpu::apic_version` (read once at set-up) instead of the APIC on
    /// every switch, unmasking by writing back the saved LVT values instead
    /// of a read-modify-write, and, on the 32-bit/PAE → AMD64 switchers,
    /// EFER and CR0 writes derived from saved values (see
    /// [`legacy_amd64`]).
    #[default]
    C,
}

impl Revision {
    /// Every revision.
    pub const ALL: [Revision; 3] = [Revision::A, Revision::B, Revision::C];

    /// Whether the NMI LVTs are unmasked in the C entry after the worker
    /// returns (B and C) rather than in the exit path (A).
    pub const fn unmasks_after_call(self) -> bool {
        !matches!(self, Revision::A)
    }
}

/// Build options every template honours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct TemplateOptions {
    /// STAM advanced-profile start/stop of ToGC and ToHC around both directions.
    pub stats: bool,
    /// Mask the local APIC LVTs that deliver NMIs while away.
    pub apic_nmi_masking: bool,
    /// Where the masked LVTs are unmasked.
    pub revision: Revision,
    /// Print one character per step to COM1 (see [`Step`]).
    pub trace: bool,
    /// Write progress markers to `Guest.dr[4]` (and, while paging is off, to the
    /// physical scratch page whose address the caller put in `Guest.dr[5]`).
    pub crash_markers: bool,
    /// Also handle a host APIC in x2APIC mode (`fX2Apic` set): mask and unmask
    /// through the MSRs 0x800 + (register >> 4) instead of the MMIO page.
    pub x2apic: bool,
    /// The host runs 5-level paging (CR4.LA57): the AMD64-host switchers
    /// load the 5-level intermediate root ([`FixupKind::InterLa57Cr3`]) in
    /// long mode and change LA57 only while paging is off. No effect on the
    /// 32-bit/PAE-host switchers; without it the code is byte for byte what
    /// it was before LA57 existed.
    ///
    /// [`FixupKind::InterLa57Cr3`]: crate::fixup::FixupKind::InterLa57Cr3
    pub la57: bool,
}

impl Default for TemplateOptions {
    fn default() -> Self {
        Self {
            stats: true,
            apic_nmi_masking: true,
            revision: Revision::C,
            trace: false,
            crash_markers: false,
            x2apic: false,
            la57: false,
        }
    }
}

/// Offsets inside the VM structure that switchers reach through fixups. The
/// VMM core derives them from its own `#[repr(C)]` VM type with `offset_of!`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct VmLayout {
    /// Size of the VM structure.
    pub size: u32,
    /// Offset of `Cpum`.
    pub cpum: u32,
    /// Size of the CPUM area (`Cpum` plus every `CpumCpu`).
    pub cpum_size: u32,
    /// Offset of the ToGC `StamProfileAdv`.
    pub stat_to_gc: u32,
    /// Offset of the ToHC `StamProfileAdv`.
    pub stat_to_hc: u32,
}

impl VmLayout {
    /// A VM layout for examples, benchmarks and tests (not a real VM's).
    pub const fn sample() -> Self {
        Self {
            size: 0x8000,
            cpum: 0x100,
            cpum_size: 0x2000,
            stat_to_gc: 0x40,
            stat_to_hc: 0x68,
        }
    }
}

/// A complete relocation context at a sample placement (HC 0xc040_0000,
/// physical 0x40_0000, RC 0xa010_0000, VM at HC 0xc050_0000 / RC 0xa000_0000,
/// hyper selectors 0x08/0x10/0x18/0x20), for examples, benchmarks and tests.
pub fn sample_context(vm: &VmLayout) -> crate::RelocContext {
    use crate::reloc::{CpuFacts, HyperSelectors, InterCr3};
    use crate::{HcAddr, PhysAddr, RcAddr};
    crate::RelocContext {
        code_hc: HcAddr(0xc040_0000),
        code_id: PhysAddr(0x0040_0000),
        code_rc: RcAddr(0xa010_0000),
        vm_hc: HcAddr(0xc050_0000),
        vm_rc: RcAddr(0xa000_0000),
        vm_size: vm.size,
        cpum_off: vm.cpum,
        cpum_size: vm.cpum_size,
        cpumcpu0_off: 64,
        inter_cr3: InterCr3 {
            legacy32: PhysAddr(0x60_0000),
            pae: PhysAddr(0x60_1000),
            amd64: PhysAddr(0x60_2000),
            la57: Some(PhysAddr(0x60_3000)),
        },
        sel: HyperSelectors {
            cs: 0x08,
            ds: 0x10,
            tss: 0x20,
            cs64: 0x18,
        },
        gdt_rc: RcAddr(0xa000_8000),
        cpu: CpuFacts {
            nx: true,
            fxsr: true,
            host_sysenter: true,
            host_syscall: true,
        },
        apic_rc: None,
    }
}

/// Completes a template: the entry points from the labels every template
/// defines (`vmmR0HostToGuest`, `vmmGCGuestToHost`, `vmmGCCallTrampoline`,
/// `VMMGCGuestToHostAsm`, `…HyperCtx`, `…GuestCtx`), the regions, and the
/// assembled code, fixups, labels and data slots.
///
/// `regions` lists every region in code order as `(name, view, bits, label)`:
/// each starts at its label and runs to the next one's (the last to the end
/// of the code).
pub(crate) fn finish(
    kind: crate::SwitcherKind,
    description: impl Into<String>,
    b: Builder,
    regions: &[(&'static str, crate::def::View, u32, &'static str)],
) -> Result<crate::SwitcherDef, BuildError> {
    let t = b.finish()?;
    let at = |n: &str| t.labels.get(n).copied().unwrap_or(0);
    let end = u32::try_from(t.code.len()).map_err(|_| BuildError::TooLarge)?;
    let regions = regions
        .iter()
        .enumerate()
        .map(|(i, &(name, view, bits, start))| crate::def::Region {
            name,
            view,
            bits,
            range: at(start)..regions.get(i + 1).map_or(end, |next| at(next.3)),
        })
        .collect();
    let entries = crate::def::EntryOffsets {
        r0_host_to_guest: at("vmmR0HostToGuest"),
        rc_guest_to_host: at("vmmGCGuestToHost"),
        rc_call_trampoline: at("vmmGCCallTrampoline"),
        rc_guest_to_host_asm: at("VMMGCGuestToHostAsm"),
        rc_guest_to_host_asm_hyper_ctx: at("VMMGCGuestToHostAsmHyperCtx"),
        rc_guest_to_host_asm_guest_ctx: at("VMMGCGuestToHostAsmGuestCtx"),
    };
    Ok(crate::SwitcherDef {
        kind,
        description: description.into(),
        code: t.code,
        fixups: t.fixups,
        entries,
        regions,
        labels: t.labels,
        data: t.data,
    })
}

/// The `VMMGCGuestToHostAsmHyperCtx` and `…GuestCtx` entries, which the
/// switchers do not implement: an `int3` each.
pub(crate) fn ctx_entry_traps(b: &mut Builder) -> Result<(), BuildError> {
    b.label("VMMGCGuestToHostAsmHyperCtx")?;
    b.a().int3()?;
    b.label("VMMGCGuestToHostAsmGuestCtx")?;
    b.a().int3()?;
    Ok(())
}

/// The trace steps of a round trip: the entry and the host save, the NMI
/// masking when on, `middle`, the unmasking when revision A does it in the
/// exit path, and the return.
pub(crate) fn round_trip_steps(o: &TemplateOptions, middle: &[Step]) -> Vec<Step> {
    let mut v = vec![Step::Entry, Step::HostSaved];
    if o.apic_nmi_masking {
        v.push(Step::ApicMasked);
    }
    v.extend_from_slice(middle);
    if o.apic_nmi_masking && o.revision == Revision::A {
        v.push(Step::ApicUnmasked);
    }
    v.push(Step::Return);
    v
}

macro_rules! steps {
    ($($name:ident = $ch:literal, $what:literal;)*) => {
        /// The steps a switcher reports when tracing is on: one character each on COM1.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        pub enum Step {
            $(#[doc = $what] $name,)*
        }

        impl Step {
            /// Every step in switch order.
            pub const ALL: &'static [Step] = &[$(Step::$name),*];

            /// The character printed.
            pub const fn ch(self) -> u8 {
                match self { $(Step::$name => $ch,)* }
            }

            /// What the step is.
            pub const fn describe(self) -> &'static str {
                match self { $(Step::$name => $what,)* }
            }

            /// The step printed as `ch`.
            pub fn from_ch(c: u8) -> Option<Self> {
                match c { $($ch => Some(Step::$name),)* _ => None }
            }
        }
    };
}

steps! {
    Entry = b'A', "C entry reached, interrupts off";
    HostSaved = b'B', "host registers, selectors and descriptor tables saved";
    ApicMasked = b'C', "NMI LVTs masked";
    HostCrSaved = b'D', "host CR0/CR3/CR4 and EFER saved, hyper GDT loaded";
    InterCr3 = b'E', "intermediate CR3 loaded (host flavour)";
    IdEntered = b'F', "running at the identity address, paging off";
    PaeOn = b'G', "CR4.PAE set, target intermediate CR3 loaded";
    LongModeOn = b'H', "EFER.LME set";
    PagingOn = b'I', "paging on";
    Mode64 = b'J', "in 64-bit mode";
    HyperStack = b'K', "hyper stack and segments loaded";
    Synced = b'L', "FPU/debug state synced, calling the helper";
    HelperReturned = b'M', "helper returned";
    Compat = b'N', "back in compatibility mode at the identity address";
    LongModeOff = b'O', "paging off, EFER.LME cleared";
    HostPaging = b'P', "host paging flavour restored, paging on";
    HostCr3 = b'Q', "host CR3 loaded";
    HostTables = b'R', "host EFER, GDT, IDT, stack, TSS and LDT restored";
    HostSegments = b'S', "host data segments restored";
    HostCr = b'T', "host CR4/CR0 restored";
    ApicUnmasked = b'U', "NMI LVTs unmasked";
    Return = b'V', "returning to the caller";
    RcEntered = b'W', "in the hypervisor context at the RC address, hyper CR3 loaded";
    RcLoaded = b'X', "hyper IDT, segments, stack, TSS and LDT loaded; entering the RC code";
    RcExit = b'Y', "RC exit entry reached, hyper registers saved";
    HostMsrs = b'Z', "host SYSENTER_CS, EFER.SCE and lazy FPU state restored";
}

/// The COM1 base port the trace writes to.
pub const COM1: u16 = 0x3f8;

/// Emits a trace character: waits for the transmitter, then writes `step`.
/// Clobbers EAX, EDX and flags (RAX, RDX in 64-bit code); uses no stack.
pub(crate) fn trace(b: &mut Builder, opts: &TemplateOptions, step: Step) -> Result<(), BuildError> {
    if !opts.trace {
        return Ok(());
    }
    let a = b.a();
    let mut wait = a.create_label();
    a.mov(dx, COM1 as u32 + 5)?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.mov(dx, COM1 as u32)?;
    a.mov(al, step.ch() as u32)?;
    a.out(dx, al)?;
    Ok(())
}

/// `mov reg32, imm32` with a fixup on the immediate.
pub(crate) fn mov_fix(
    b: &mut Builder,
    reg: AsmRegister32,
    kind: FixupKind,
    operand: Operand,
) -> Result<(), BuildError> {
    b.fixup(kind, Slot::Imm, operand);
    b.a().mov(reg, 0xffff_ffffu32)?;
    Ok(())
}

/// A `jmp rel32` whose displacement a fixup supplies.
pub(crate) fn jmp_rel32_fix(
    b: &mut Builder,
    kind: FixupKind,
    target: &'static str,
) -> Result<(), BuildError> {
    b.fixup(kind, Slot::At(1), Operand::Label(target));
    b.raw_code(&[0xe9, 0xff, 0xff, 0xff, 0xff])?;
    Ok(())
}

/// A direct `jmp ptr16:32` (32-bit code) whose pointer a fixup supplies.
pub(crate) fn jmp_far_fix(
    b: &mut Builder,
    kind: FixupKind,
    target: &'static str,
) -> Result<(), BuildError> {
    b.fixup(kind, Slot::At(1), Operand::Label(target));
    b.raw_code(&[0xea, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff])?;
    Ok(())
}

/// A 64-bit data slot named `name` that a fixup fills (placeholder all ones).
pub(crate) fn slot64(
    b: &mut Builder,
    name: &'static str,
    kind: FixupKind,
    operand: Operand,
) -> Result<(), BuildError> {
    b.label(name)?;
    b.fixup(kind, Slot::At(0), operand);
    b.a().dq(&[u64::MAX])?;
    Ok(())
}

/// 64-bit `jmp [rip+slot]` to `target`, the slot (named `name`, filled by a
/// `kind` fixup) right behind it.
pub(crate) fn jmp_slot64(
    b: &mut Builder,
    name: &'static str,
    kind: FixupKind,
    target: &'static str,
) -> Result<(), BuildError> {
    let slot = b.named(name);
    b.a().jmp(qword_ptr(slot))?;
    slot64(b, name, kind, Operand::Label(target))
}

/// 64-bit `jmp fword [rip+ptr]` to `target`'s identity address in the hyper
/// CS, the m16:32 pointer (named `name`) right behind it.
pub(crate) fn jmp_far_id32(
    b: &mut Builder,
    name: &'static str,
    target: &'static str,
) -> Result<(), BuildError> {
    let fp = b.named(name);
    b.a().jmp(fword_ptr(fp))?;
    b.label(name)?;
    b.fixup(FixupKind::Id32Bit, Slot::At(0), Operand::Label(target));
    b.a().dd(&[0xffff_ffff])?;
    b.fixup(FixupKind::HyperCs, Slot::At(0), Operand::None);
    b.a().dd(&[0x0000_ffff])?;
    Ok(())
}

/// Code the relocator may skip: a `kind` fixup (`NoSysenterJmp`,
/// `NoSyscallJmp`) on its first five bytes, overwritten with a `jmp rel32` to
/// `end` (placed right after `body`) when the host does not use the feature.
pub(crate) fn skippable(
    b: &mut Builder,
    kind: FixupKind,
    end: &'static str,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    b.fixup(kind, Slot::At(0), Operand::Label(end));
    body(b.a())?;
    b.label(end)?;
    Ok(())
}

/// Loads TR and LDTR from a context at `ctx` (EDX, RDX or R8); `tr`, `ldtr`
/// and `gdt_base` are the offsets of the saved selectors and of the GDT base.
/// The TSS is still marked busy from its last use and `ltr` refuses a busy
/// one, so the busy bit (type bit 1, in the descriptor's second dword) is
/// cleared first. Clobbers EAX (RAX in 64-bit code).
pub(crate) fn load_tr_ldtr<R>(
    a: &mut CodeAssembler,
    ctx: R,
    tr: usize,
    gdt_base: usize,
    ldtr: usize,
) -> Result<(), BuildError>
where
    R: Copy + Add<i32, Output = AsmMemoryOperand>,
{
    use cpum::layout::disp;
    a.movzx(eax, word_ptr(ctx + disp(tr)))?;
    a.and(al, 0xf8)?;
    if a.bitness() == 64 {
        a.add(rax, qword_ptr(ctx + disp(gdt_base)))?;
        a.and(dword_ptr(rax + 4), !0x200i32)?;
    } else {
        a.add(eax, dword_ptr(ctx + disp(gdt_base)))?;
        a.and(dword_ptr(eax + 4), !0x200i32)?;
    }
    a.ltr(word_ptr(ctx + disp(tr)))?;
    a.lldt(word_ptr(ctx + disp(ldtr)))?;
    Ok(())
}

/// STAM profile field offsets used by the profile code.
mod prof {
    use core::mem::offset_of;
    use stam::StamProfileAdv;

    pub const PERIODS: i32 = offset_of!(StamProfileAdv, core.periods) as i32;
    pub const TICKS: i32 = offset_of!(StamProfileAdv, core.ticks) as i32;
    pub const MAX: i32 = offset_of!(StamProfileAdv, core.ticks_max) as i32;
    pub const MIN: i32 = offset_of!(StamProfileAdv, core.ticks_min) as i32;
    pub const TS: i32 = offset_of!(StamProfileAdv, ts_start) as i32;
}

/// 32-bit `STAM_PROFILE_ADV_START` on the sample at ECX. Preserves all but ECX; needs a stack.
pub(crate) fn adv_start32(b: &mut Builder) -> Result<(), BuildError> {
    let a = b.a();
    a.push(eax)?;
    a.push(edx)?;
    a.rdtsc()?;
    a.mov(dword_ptr(ecx + prof::TS), eax)?;
    a.mov(dword_ptr(ecx + prof::TS + 4), edx)?;
    a.pop(edx)?;
    a.pop(eax)?;
    Ok(())
}

/// 32-bit `STAM_PROFILE_ADV_STOP` on the sample at ECX: ignored unless started,
/// adds the 64-bit delta to ticks, counts a period, updates max/min, clears
/// `tsStart`. Preserves all but ECX; needs a stack.
pub(crate) fn adv_stop32(b: &mut Builder) -> Result<(), BuildError> {
    let a = b.a();
    let mut done = a.create_label();
    let mut set_max = a.create_label();
    let mut no_max = a.create_label();
    let mut set_min = a.create_label();
    let mut no_min = a.create_label();
    a.push(eax)?;
    a.push(edx)?;
    a.mov(eax, dword_ptr(ecx + prof::TS))?;
    a.or(eax, dword_ptr(ecx + prof::TS + 4))?;
    a.jz(done)?;
    a.rdtsc()?;
    a.sub(eax, dword_ptr(ecx + prof::TS))?;
    a.sbb(edx, dword_ptr(ecx + prof::TS + 4))?;
    a.add(dword_ptr(ecx + prof::TICKS), eax)?;
    a.adc(dword_ptr(ecx + prof::TICKS + 4), edx)?;
    a.add(dword_ptr(ecx + prof::PERIODS), 1)?;
    a.adc(dword_ptr(ecx + prof::PERIODS + 4), 0)?;
    a.cmp(edx, dword_ptr(ecx + prof::MAX + 4))?;
    a.ja(set_max)?;
    a.jb(no_max)?;
    a.cmp(eax, dword_ptr(ecx + prof::MAX))?;
    a.jbe(no_max)?;
    a.set_label(&mut set_max)?;
    a.mov(dword_ptr(ecx + prof::MAX), eax)?;
    a.mov(dword_ptr(ecx + prof::MAX + 4), edx)?;
    a.set_label(&mut no_max)?;
    a.cmp(edx, dword_ptr(ecx + prof::MIN + 4))?;
    a.jb(set_min)?;
    a.ja(no_min)?;
    a.cmp(eax, dword_ptr(ecx + prof::MIN))?;
    a.jae(no_min)?;
    a.set_label(&mut set_min)?;
    a.mov(dword_ptr(ecx + prof::MIN), eax)?;
    a.mov(dword_ptr(ecx + prof::MIN + 4), edx)?;
    a.set_label(&mut no_min)?;
    a.mov(dword_ptr(ecx + prof::TS), 0)?;
    a.mov(dword_ptr(ecx + prof::TS + 4), 0)?;
    a.set_label(&mut done)?;
    a.pop(edx)?;
    a.pop(eax)?;
    Ok(())
}

/// 64-bit `STAM_PROFILE_ADV_START` on the sample at RCX. Clobbers RAX, RDX.
pub(crate) fn adv_start64(b: &mut Builder) -> Result<(), BuildError> {
    let a = b.a();
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(rcx + prof::TS), rax)?;
    Ok(())
}

/// 64-bit `STAM_PROFILE_ADV_STOP` on the sample at RCX. Clobbers RAX, RDX, R8.
pub(crate) fn adv_stop64(b: &mut Builder) -> Result<(), BuildError> {
    let a = b.a();
    let mut done = a.create_label();
    let mut no_max = a.create_label();
    let mut no_min = a.create_label();
    a.mov(r8, qword_ptr(rcx + prof::TS))?;
    a.test(r8, r8)?;
    a.jz(done)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, r8)?;
    a.add(qword_ptr(rcx + prof::TICKS), rax)?;
    a.add(qword_ptr(rcx + prof::PERIODS), 1)?;
    a.cmp(rax, qword_ptr(rcx + prof::MAX))?;
    a.jbe(no_max)?;
    a.mov(qword_ptr(rcx + prof::MAX), rax)?;
    a.set_label(&mut no_max)?;
    a.cmp(rax, qword_ptr(rcx + prof::MIN))?;
    a.jae(no_min)?;
    a.mov(qword_ptr(rcx + prof::MIN), rax)?;
    a.set_label(&mut no_min)?;
    a.mov(qword_ptr(rcx + prof::TS), 0)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// The LVTs the reference revision masks, with their `fApicDisVectors` bits,
/// in mask/restore order. THMR is only a candidate when max-LVT ≥ 5.
pub(crate) const NMI_LVTS: [(u32, apic::DisVectors); 4] = [
    (apic::reg::LVT_LINT0, apic::DisVectors::LINT0),
    (apic::reg::LVT_LINT1, apic::DisVectors::LINT1),
    (apic::reg::LVT_PC, apic::DisVectors::PC),
    (apic::reg::LVT_THMR, apic::DisVectors::THMR),
];

fn lvt_disp(reg: u32) -> i32 {
    reg as i32
}

/// Revision C's test for the thermal LVT: the max-LVT index (version bits
/// 16..23) the VMM stored in `CpumCpu::apic_version` at set-up, a cached
/// memory read instead of an uncached APIC (or MSR) read on every switch;
/// jumps to `skip` when it is below 5 (no thermal LVT).
fn thermal_absent_c<R>(a: &mut CodeAssembler, cpu: R, skip: CodeLabel) -> Result<(), BuildError>
where
    R: Copy + Add<i32, Output = AsmMemoryOperand>,
{
    a.cmp(byte_ptr(cpu + (cpum::layout::APIC_VERSION as i32 + 2)), 5)?;
    a.jb(skip)?;
    Ok(())
}

/// The displacement of LVT `i`'s saved value in `CpumCpu::apic_saved_lvt`.
fn saved_lvt(i: usize) -> i32 {
    (cpum::layout::APIC_SAVED_LVT + 4 * i) as i32
}

/// Masks the NMI LVTs through the x2APIC MSRs, ORing their bits into EDI.
/// With `rev_c`, the thermal LVT's presence comes from `CpumCpu` at `cpu`
/// and each LVT's value is saved there for the unmasking. Clobbers EAX,
/// EBX, ECX, EDX.
fn x2apic_mask_lvts<R>(a: &mut CodeAssembler, rev_c: Option<R>) -> Result<(), BuildError>
where
    R: Copy + Add<i32, Output = AsmMemoryOperand>,
{
    for (i, (reg, bit)) in NMI_LVTS.iter().enumerate() {
        let mut skip = a.create_label();
        if i == 3 {
            if let Some(cpu) = rev_c {
                thermal_absent_c(a, cpu, skip)?;
            } else {
                a.mov(ecx, apic::x2apic_msr(apic::reg::VERSION))?;
                a.rdmsr()?;
                a.shr(eax, 16)?;
                a.cmp(al, 5)?;
                a.jb(skip)?;
            }
        }
        a.mov(ecx, apic::x2apic_msr(*reg))?;
        a.rdmsr()?;
        if let Some(cpu) = rev_c {
            a.mov(dword_ptr(cpu + saved_lvt(i)), eax)?;
        }
        a.mov(ebx, eax)?;
        a.and(ebx, (apic::lvt::MASKED | apic::lvt::MODE_MASK) as i32)?;
        a.cmp(ebx, apic::lvt::MODE_NMI as i32)?;
        a.jne(skip)?;
        a.or(edi, bit.bits() as i32)?;
        a.or(eax, apic::lvt::MASKED as i32)?;
        a.wrmsr()?;
        a.set_label(&mut skip)?;
    }
    Ok(())
}

/// Masks the NMI LVTs of the MMIO page at `page` (EBX or RBX), ORing their
/// bits into EDI; the code falls through to `store`, which is placed after
/// it. Clobbers EAX, ECX.
///
/// The seeds (A, B) read the version register on every switch for the
/// thermal LVT's presence and read each LVT back right after masking it.
/// With `rev_c` (the `CpumCpu` at `cpu`) the presence comes from
/// `apic_version`, each LVT's value is saved in `apic_saved_lvt`, and one
/// read-back follows the last masking write: the xAPIC page is strong
/// uncacheable (UC), and UC reads and writes are executed in program order
/// without reordering (Intel SDM Vol. 3A, 12.3 "Methods of Caching
/// Available", UC), so a read that returns after the last write can only
/// return after every earlier write has reached the APIC as well.
fn mmio_mask_lvts<R, C>(
    a: &mut CodeAssembler,
    page: R,
    store: CodeLabel,
    rev_c: Option<C>,
) -> Result<(), BuildError>
where
    R: Copy + Add<i32, Output = AsmMemoryOperand>,
    C: Copy + Add<i32, Output = AsmMemoryOperand>,
{
    for (i, (reg, bit)) in NMI_LVTS.iter().enumerate() {
        let mut skip = if i + 1 == NMI_LVTS.len() && rev_c.is_none() {
            store
        } else {
            a.create_label()
        };
        if i == 3 {
            // Thermal LVT only exists when the max-LVT index is at least 5.
            if let Some(cpu) = rev_c {
                thermal_absent_c(a, cpu, skip)?;
            } else {
                a.mov(eax, dword_ptr(page + lvt_disp(apic::reg::VERSION)))?;
                a.shr(eax, 16)?;
                a.cmp(al, 5)?;
                a.jb(skip)?;
            }
        }
        a.mov(eax, dword_ptr(page + lvt_disp(*reg)))?;
        if let Some(cpu) = rev_c {
            a.mov(dword_ptr(cpu + saved_lvt(i)), eax)?;
        }
        a.mov(ecx, eax)?;
        a.and(ecx, (apic::lvt::MASKED | apic::lvt::MODE_MASK) as i32)?;
        a.cmp(ecx, apic::lvt::MODE_NMI as i32)?;
        a.jne(skip)?;
        a.or(edi, bit.bits() as i32)?;
        a.or(eax, apic::lvt::MASKED as i32)?;
        a.mov(dword_ptr(page + lvt_disp(*reg)), eax)?;
        if rev_c.is_none() {
            // Read back: the write has completed before we go on.
            a.mov(eax, dword_ptr(page + lvt_disp(*reg)))?;
        }
        a.set_label(&mut skip)?;
    }
    if rev_c.is_some() {
        // One read-back after the last masking write (none without one).
        a.test(edi, edi)?;
        a.jz(store)?;
        a.mov(eax, dword_ptr(page + lvt_disp(apic::reg::LVT_LINT0)))?;
        let mut store = store;
        a.set_label(&mut store)?;
    }
    Ok(())
}

/// Unmasks, through the x2APIC MSRs, the LVTs whose bits are set in EBX
/// (consumed). With `rev_c`, by writing back the values saved in the
/// `CpumCpu` at `cpu` (no RDMSR). Clobbers EAX, ECX, EDX.
fn x2apic_unmask_lvts<R>(a: &mut CodeAssembler, rev_c: Option<R>) -> Result<(), BuildError>
where
    R: Copy + Add<i32, Output = AsmMemoryOperand>,
{
    for (i, (reg, _bit)) in NMI_LVTS.iter().enumerate() {
        let mut skip = a.create_label();
        a.shr(ebx, 1)?;
        a.jae(skip)?;
        a.mov(ecx, apic::x2apic_msr(*reg))?;
        if let Some(cpu) = rev_c {
            a.mov(eax, dword_ptr(cpu + saved_lvt(i)))?;
            a.xor(edx, edx)?;
        } else {
            a.rdmsr()?;
            a.and(eax, !apic::lvt::MASKED as i32)?;
        }
        a.wrmsr()?;
        a.set_label(&mut skip)?;
    }
    Ok(())
}

/// Unmasks, on the MMIO page at `page` (EBX or RBX), the LVTs whose bits are
/// set in ECX (consumed).
///
/// The seeds clear the mask bit with a read-modify-write (`and [lvt]`: an
/// uncached read and write each). With `rev_c` (the `CpumCpu` at `cpu`) the
/// value saved before masking is written back instead, a write only, and
/// bit for bit what the host had: interrupts are off from the masking to
/// here and the LVTs are this CPU's own registers, so nothing else can have
/// changed them in between. Clobbers EDI with `rev_c`.
fn mmio_unmask_lvts<R, C>(
    a: &mut CodeAssembler,
    page: R,
    rev_c: Option<C>,
) -> Result<(), BuildError>
where
    R: Copy + Add<i32, Output = AsmMemoryOperand>,
    C: Copy + Add<i32, Output = AsmMemoryOperand>,
{
    for (i, (reg, _bit)) in NMI_LVTS.iter().enumerate() {
        let mut skip = a.create_label();
        a.shr(ecx, 1)?;
        a.jae(skip)?;
        if let Some(cpu) = rev_c {
            a.mov(edi, dword_ptr(cpu + saved_lvt(i)))?;
            a.mov(dword_ptr(page + lvt_disp(*reg)), edi)?;
        } else {
            a.and(dword_ptr(page + lvt_disp(*reg)), !apic::lvt::MASKED as i32)?;
        }
        a.set_label(&mut skip)?;
    }
    Ok(())
}

/// NMI masking. In: EDX = CPUMCPU (current view). Clobbers EAX, EBX, ECX,
/// ESI, EDI. Always rewrites `apic_dis_vectors` (0 when there is no APIC),
/// starting from a cleared register (VirtualBox ORed into host EDI).
pub(crate) fn apic_mask32(b: &mut Builder, o: &TemplateOptions) -> Result<(), BuildError> {
    use cpum::layout as l;
    let rev_c = o.revision == Revision::C;
    let a = b.a();
    let store = a.create_label();
    a.xor(edi, edi)?;
    if o.x2apic {
        let mut mmio = a.create_label();
        a.cmp(dword_ptr(edx + l::X2APIC as i32), 0)?;
        a.je(mmio)?;
        // x2APIC: RDMSR/WRMSR clobber EDX; keep CPUMCPU in ESI.
        a.mov(esi, edx)?;
        x2apic_mask_lvts(a, rev_c.then_some(esi))?;
        a.mov(edx, esi)?;
        a.jmp(store)?;
        a.set_label(&mut mmio)?;
    }
    a.mov(ebx, dword_ptr(edx + l::APIC_BASE as i32))?;
    a.test(ebx, ebx)?;
    a.jz(store)?;
    mmio_mask_lvts(a, ebx, store, rev_c.then_some(edx))?;
    a.mov(dword_ptr(edx + l::APIC_DIS_VECTORS as i32), edi)?;
    Ok(())
}

/// NMI unmasking of the LVTs in `apic_dis_vectors`. In: EDX = CPUMCPU.
/// Preserves EAX, EBX and EDX (EAX may hold the status); clobbers ECX and flags.
/// Nothing is done when there is no APIC.
pub(crate) fn apic_unmask32(b: &mut Builder, o: &TemplateOptions) -> Result<(), BuildError> {
    use cpum::layout as l;
    let a = b.a();
    let mut done = a.create_label();
    let rev_c = o.revision == Revision::C;
    a.push(ebx)?;
    a.mov(ebx, dword_ptr(edx + l::APIC_DIS_VECTORS as i32))?;
    if o.x2apic {
        let mut mmio = a.create_label();
        a.cmp(dword_ptr(edx + l::X2APIC as i32), 0)?;
        a.je(mmio)?;
        a.push(eax)?;
        a.push(edx)?;
        if rev_c {
            // WRMSR takes EDX: the saved values are read through ESI.
            a.push(esi)?;
            a.mov(esi, edx)?;
            x2apic_unmask_lvts(a, Some(esi))?;
            a.pop(esi)?;
        } else {
            x2apic_unmask_lvts(a, None::<AsmRegister32>)?;
        }
        a.pop(edx)?;
        a.pop(eax)?;
        a.jmp(done)?;
        a.set_label(&mut mmio)?;
    }
    a.mov(ecx, ebx)?;
    a.mov(ebx, dword_ptr(edx + l::APIC_BASE as i32))?;
    a.test(ebx, ebx)?;
    a.jz(done)?;
    if rev_c {
        a.push(edi)?;
        mmio_unmask_lvts(a, ebx, Some(edx))?;
        a.pop(edi)?;
    } else {
        mmio_unmask_lvts(a, ebx, None::<AsmRegister32>)?;
    }
    a.nop()?;
    a.set_label(&mut done)?;
    a.pop(ebx)?;
    Ok(())
}

/// 64-bit NMI masking. In: R8 = CPUMCPU (HC, 64-bit address). Clobbers RAX,
/// RBX, RCX, RDX, RDI. Always rewrites `apic_dis_vectors`.
pub(crate) fn apic_mask64(b: &mut Builder, o: &TemplateOptions) -> Result<(), BuildError> {
    use cpum::layout as l;
    let rev_c = o.revision == Revision::C;
    let a = b.a();
    let store = a.create_label();
    a.xor(edi, edi)?;
    if o.x2apic {
        let mut mmio = a.create_label();
        a.cmp(dword_ptr(r8 + l::X2APIC as i32), 0)?;
        a.je(mmio)?;
        x2apic_mask_lvts(a, rev_c.then_some(r8))?;
        a.jmp(store)?;
        a.set_label(&mut mmio)?;
    }
    a.mov(rbx, qword_ptr(r8 + l::APIC_BASE as i32))?;
    a.test(rbx, rbx)?;
    a.jz(store)?;
    mmio_mask_lvts(a, rbx, store, rev_c.then_some(r8))?;
    a.mov(dword_ptr(r8 + l::APIC_DIS_VECTORS as i32), edi)?;
    Ok(())
}

/// 64-bit NMI unmasking. In: RDX = CPUMCPU (HC). Preserves RAX, RBX, RDX;
/// clobbers RCX and flags.
pub(crate) fn apic_unmask64(b: &mut Builder, o: &TemplateOptions) -> Result<(), BuildError> {
    use cpum::layout as l;
    let a = b.a();
    let mut done = a.create_label();
    let rev_c = o.revision == Revision::C;
    a.push(rbx)?;
    a.push(rax)?;
    a.push(rdx)?;
    a.mov(ebx, dword_ptr(rdx + l::APIC_DIS_VECTORS as i32))?;
    if o.x2apic {
        let mut mmio = a.create_label();
        a.cmp(dword_ptr(rdx + l::X2APIC as i32), 0)?;
        a.je(mmio)?;
        if rev_c {
            // WRMSR takes RDX: the saved values are read through RSI.
            a.push(rsi)?;
            a.mov(rsi, rdx)?;
            x2apic_unmask_lvts(a, Some(rsi))?;
            a.pop(rsi)?;
        } else {
            x2apic_unmask_lvts(a, None::<AsmRegister64>)?;
        }
        a.jmp(done)?;
        a.set_label(&mut mmio)?;
    }
    a.mov(ecx, ebx)?;
    a.mov(rbx, qword_ptr(rdx + l::APIC_BASE as i32))?;
    a.test(rbx, rbx)?;
    a.jz(done)?;
    if rev_c {
        a.push(rdi)?;
        mmio_unmask_lvts(a, rbx, Some(rdx))?;
        a.pop(rdi)?;
    } else {
        mmio_unmask_lvts(a, rbx, None::<AsmRegister64>)?;
    }
    a.nop()?;
    a.set_label(&mut done)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.pop(rbx)?;
    Ok(())
}
