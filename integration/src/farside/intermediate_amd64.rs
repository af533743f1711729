//! The 64-bit helper the 32-bit/PAE host → AMD64 switchers call at
//! `Hyper.rip`, in the intermediate context (long mode on the intermediate
//! page tables).
//!
//! It plays the hypervisor-context function: it checks what it should see
//! and reports into a [`Mailbox`] the host fills before each trip, then
//! clobbers everything a real callee may and returns a per-trip code.
//!
//! Checks (each a bit of [`Mailbox::fails`] and of the return value's top half):
//! EFER.LMA set, CS is the 64-bit hyper selector, the four NMI LVTs read
//! masked, `fApicDisVectors` equals the expected set, and — when the host asked
//! for FPU or debug-register sync on this trip — FCW, MXCSR and XMM0 equal
//! `Guest.fpu`'s and DR0–3/DR6 equal `Guest.dr`.
//!
//! Clobbers: every general register but RSP, CR0.TS, CR4.{DE,TSD,PCE},
//! EFER.SCE, DS/ES/FS/GS, DR0–3, DR6, the x87/SSE state.
//!
//! It loads its own 64-bit IDT first, so a fault in the far world prints a
//! `FAREXC` line and exits with the far-exception code rather than
//! triple-faulting; the switcher's way back restores the host IDT.

use core::mem::{offset_of, size_of};

use cpum::layout as l;
use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER};
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::common::{
    bit_names, emit_apic_checks, emit_exception_reporter64, emit_nmi_counter, emit_record_fails,
    ApicCheck,
};
use super::FarError;

/// Failure bits the helper reports.
pub mod fail {
    /// EFER.LMA was clear.
    pub const LMA: u32 = 1 << 0;
    /// CS was not the 64-bit hyper selector.
    pub const CS: u32 = 1 << 1;
    /// An NMI LVT read unmasked.
    pub const LVT: u32 = 1 << 2;
    /// `fApicDisVectors` differed from the expected set.
    pub const DIS_VECTORS: u32 = 1 << 3;
    /// FCW differed from `Guest.fpu`.
    pub const FCW: u32 = 1 << 4;
    /// MXCSR differed from `Guest.fpu`.
    pub const MXCSR: u32 = 1 << 5;
    /// XMM0 differed from `Guest.fpu`.
    pub const XMM0: u32 = 1 << 6;
    /// DR0–3 differed from `Guest.dr`.
    pub const DR0_3: u32 = 1 << 7;
    /// DR6 differed from `Guest.dr[6]`.
    pub const DR6: u32 = 1 << 8;
    /// Names, by bit.
    pub const NAMES: [&str; 9] = [
        "efer.lma",
        "cs",
        "lvt-unmasked",
        "dis-vectors",
        "fcw",
        "mxcsr",
        "xmm0",
        "dr0-3",
        "dr6",
    ];
}

/// Expectation bits the host sets in [`Mailbox::expect`].
pub mod expect {
    /// `Guest.fpu` must have been loaded.
    pub const FPU: u32 = 1 << 0;
    /// Guest DR0–3 and DR6 must have been loaded.
    pub const DBG: u32 = 1 << 1;
    /// NMI masking is on: LVTs masked and `fApicDisVectors` == `want_dis`.
    pub const APIC: u32 = 1 << 2;
    /// The host APIC is in x2APIC mode: read the LVTs through MSRs.
    pub const X2APIC: u32 = 1 << 3;
}

/// What the host and the far helper exchange; lives in the helper area.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    serde::Serialize,
)]
pub struct Mailbox {
    /// Per-trip value the return code is derived from.
    pub cookie: u32,
    /// [`expect`] bits for this trip.
    pub expect: u32,
    /// Expected `fApicDisVectors`.
    pub want_dis: u32,
    /// Calls seen.
    pub calls: u32,
    /// OR of every trip's failure bits.
    pub fails: u32,
    /// Cookie of the first failing trip (0 if none).
    pub first_fail_cookie: u32,
    /// EFER as seen (low dword).
    pub efer: u32,
    /// CS as seen.
    pub cs: u32,
    /// LINT0, LINT1, PC, THMR as seen.
    pub lvt: [u32; 4],
    /// `fApicDisVectors` as seen.
    pub dis_seen: u32,
    /// Scratch for FCW/MXCSR stores.
    pub scratch: [u32; 3],
    /// NMIs the helper's IDT took (the storm's, with NMI masking off; any
    /// is a failure).
    pub nmis: u32,
    /// Low half of the instruction pointer the first of them interrupted.
    pub nmi_ip: u32,
}

/// The return value for `cookie` when every check passed.
pub const RET_XOR: u32 = 0x5eed_f00d;

/// Where things sit inside the helper area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FarLayout {
    /// RC address of the helper area (code starts here).
    pub rc: u32,
    /// Offset of the 64-bit IDT.
    pub idt_off: u32,
    /// Offset of the [`Mailbox`].
    pub mailbox_off: u32,
    /// Offset of a scratch page (crash markers written while paging is off).
    pub scratch_off: u32,
}

impl FarLayout {
    /// Code at +0, scratch at +0x1000, IDT at +0x2000, mailbox at +0x3000 (the area needs 4 pages).
    pub const fn new(rc: u32) -> Self {
        Self {
            rc,
            idt_off: 0x2000,
            mailbox_off: 0x3000,
            scratch_off: 0x1000,
        }
    }

    /// RC address of the mailbox.
    pub const fn mailbox_rc(&self) -> u32 {
        self.rc + self.mailbox_off
    }
}

/// Options for the far helper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FarConfig {
    /// Layout in the helper area.
    pub layout: FarLayout,
    /// The 64-bit hyper code selector.
    pub cs64: u16,
    /// Address (valid in the intermediate context) of the local APIC page.
    pub apic: u32,
    /// COM1 base port.
    pub com1: u16,
    /// isa-debug-exit port.
    pub exit_port: u16,
    /// Value written to the exit port after a far exception.
    pub exit_far_exception: u32,
    /// Mailboxes: 1, shared by every VCPU, or one per VCPU,
    /// [`super::MAILBOX_STRIDE`] apart, each VCPU's RC address in its
    /// `CpumCpu`'s `Hyper.rdi` (which these switchers leave alone).
    pub mailboxes: u32,
}

fn mb(field: usize) -> i32 {
    field as i32
}

/// Assembles the far helper (code, IDT and an initial mailbox) as one blob of
/// the helper area's size, to be placed at `cfg.layout.rc`.
///
/// The code, in order: the entry and the mode checks, the NMI-masking check,
/// the FPU and debug-register sync checks, the failure accounting and return
/// code, the clobbering of what a callee may clobber, the exception handlers
/// and the IDTR image.
///
/// # Errors
/// [`FarError`] when the area is too small or iced rejects an instruction.
pub fn build(cfg: &FarConfig, area_size: usize) -> Result<Vec<u8>, FarError> {
    let mut a = CodeAssembler::new(64)?;
    let mut handlers: Vec<CodeLabel> = (0..32).map(|_| a.create_label()).collect();
    let mut idtr = a.create_label();

    emit_entry_and_mode_checks(&mut a, cfg, idtr)?;
    emit_nmi_masking_check(&mut a, cfg)?;
    emit_fpu_sync_check(&mut a)?;
    emit_debug_sync_check(&mut a)?;
    emit_return_code(&mut a)?;
    emit_clobber_and_return(&mut a)?;
    let mbox = cfg.layout.mailbox_rc();
    emit_nmi_counter(
        &mut a,
        &mut handlers[2],
        mbox + offset_of!(Mailbox, nmis) as u32,
        mbox + offset_of!(Mailbox, nmi_ip) as u32,
    )?;
    emit_exception_reporter64(
        &mut a,
        &mut handlers,
        &[2],
        cfg.com1,
        cfg.exit_port,
        cfg.exit_far_exception,
    )?;
    // IDTR image: limit, base of the IDT in the helper area.
    a.set_label(&mut idtr)?;
    a.dw(&[32 * 16 - 1])?;
    a.dq(&[u64::from(cfg.layout.rc) + u64::from(cfg.layout.idt_off)])?;
    assemble(a, cfg, area_size, &handlers)
}

/// A mailbox field; RBX holds the mailbox's address from the entry on.
fn field(f: usize) -> AsmMemoryOperand {
    dword_ptr(rbx + mb(f))
}

/// The entry (RSI = `&Guest`, FPU state at +0; RDX = `&CpumCpu`): loads the
/// helper's IDT, keeps `&CpumCpu` in R13 and the mailbox in RBX, counts the
/// call, clears R15D (this trip's failure bits) and checks EFER.LMA and CS.
fn emit_entry_and_mode_checks(
    a: &mut CodeAssembler,
    cfg: &FarConfig,
    idtr: CodeLabel,
) -> Result<(), IcedError> {
    a.lidt(ptr(idtr))?;
    a.mov(r13, rdx)?; // RDMSR below clobbers RDX
    if cfg.mailboxes > 1 {
        a.mov(rbx, qword_ptr(r13 + l::HYPER_RDI as i32))?;
    } else {
        a.mov(rbx, i64::from(cfg.layout.mailbox_rc()))?;
    }
    a.add(field(offset_of!(Mailbox, calls)), 1)?;
    // R15D collects the failure bits of this trip.
    a.xor(r15d, r15d)?;
    // EFER.LMA
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.mov(field(offset_of!(Mailbox, efer)), eax)?;
    let mut ok = a.create_label();
    a.test(eax, Efer::LMA.bits() as u32)?;
    a.jnz(ok)?;
    a.or(r15d, fail::LMA)?;
    a.set_label(&mut ok)?;
    // CS
    a.mov(eax, cs)?;
    a.mov(field(offset_of!(Mailbox, cs)), eax)?;
    let mut ok = a.create_label();
    a.cmp(ax, u32::from(cfg.cs64))?;
    a.je(ok)?;
    a.or(r15d, fail::CS)?;
    a.set_label(&mut ok)
}

/// When the host expects NMI masking: the LVTs read masked and
/// `fApicDisVectors` (in the `CpumCpu` at R13) as expected.
fn emit_nmi_masking_check(a: &mut CodeAssembler, cfg: &FarConfig) -> Result<(), IcedError> {
    let mut no_apic = a.create_label();
    a.test(field(offset_of!(Mailbox, expect)), expect::APIC)?;
    a.jz(no_apic)?;
    a.mov(r8d, cfg.apic)?;
    emit_apic_checks(
        a,
        &ApicCheck {
            expect: field(offset_of!(Mailbox, expect)),
            x2apic: expect::X2APIC,
            lvt: field(offset_of!(Mailbox, lvt)),
            dis_vectors: dword_ptr(r13 + l::APIC_DIS_VECTORS as i32),
            dis_seen: field(offset_of!(Mailbox, dis_seen)),
            want_dis: field(offset_of!(Mailbox, want_dis)),
            fail_lvt: fail::LVT,
            fail_dis: fail::DIS_VECTORS,
        },
        |a, reg| a.mov(eax, dword_ptr(r8 + reg)),
        |a, bit| a.or(r15d, bit),
    )?;
    a.set_label(&mut no_apic)
}

/// When the host asked for FPU sync: FCW, MXCSR and XMM0 against
/// `Guest.fpu` (at RSI).
fn emit_fpu_sync_check(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut no_fpu = a.create_label();
    a.test(field(offset_of!(Mailbox, expect)), expect::FPU)?;
    a.jz(no_fpu)?;
    let fpu = |f: usize| f as i32;
    let mut ok1 = a.create_label();
    let mut ok2 = a.create_label();
    let mut ok3 = a.create_label();
    a.fnstcw(word_ptr(rbx + mb(offset_of!(Mailbox, scratch))))?;
    a.movzx(eax, word_ptr(rbx + mb(offset_of!(Mailbox, scratch))))?;
    a.movzx(ecx, word_ptr(rsi + fpu(offset_of!(cpum::FxSaveArea, fcw))))?;
    a.cmp(eax, ecx)?;
    a.je(ok1)?;
    a.or(r15d, fail::FCW)?;
    a.set_label(&mut ok1)?;
    a.stmxcsr(field(offset_of!(Mailbox, scratch) + 4))?;
    a.mov(eax, field(offset_of!(Mailbox, scratch) + 4))?;
    a.cmp(
        eax,
        dword_ptr(rsi + fpu(offset_of!(cpum::FxSaveArea, mxcsr))),
    )?;
    a.je(ok2)?;
    a.or(r15d, fail::MXCSR)?;
    a.set_label(&mut ok2)?;
    a.movq(rax, xmm0)?;
    a.cmp(rax, qword_ptr(rsi + fpu(offset_of!(cpum::FxSaveArea, xmm))))?;
    // A mismatch takes the failure path below.
    a.jne(ok3)?;
    // The high quadword, with SSE2 only (QEMU's default CPU lacks SSE4.1).
    a.pshufd(xmm1, xmm0, 0x4e)?;
    a.movq(rax, xmm1)?;
    a.cmp(
        rax,
        qword_ptr(rsi + fpu(offset_of!(cpum::FxSaveArea, xmm) + 8)),
    )?;
    let mut good = a.create_label();
    a.je(good)?;
    a.set_label(&mut ok3)?;
    a.or(r15d, fail::XMM0)?;
    a.set_label(&mut good)?;
    a.nop()?;
    a.set_label(&mut no_fpu)
}

/// When the host asked for debug-register sync: DR0–3 and DR6 against
/// `Guest.dr` (found from `Guest.fpu` at RSI).
fn emit_debug_sync_check(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut no_dbg = a.create_label();
    a.test(field(offset_of!(Mailbox, expect)), expect::DBG)?;
    a.jz(no_dbg)?;
    let dr_off = |n: usize| (l::GUEST_DR - l::GUEST_FPU + 8 * n) as i32;
    for (n, dr) in [(0, dr0), (1, dr1), (2, dr2), (3, dr3)] {
        let mut ok = a.create_label();
        a.mov(rax, dr)?;
        a.cmp(rax, qword_ptr(rsi + dr_off(n)))?;
        a.je(ok)?;
        a.or(r15d, fail::DR0_3)?;
        a.set_label(&mut ok)?;
    }
    let mut ok = a.create_label();
    a.mov(rax, dr6)?;
    a.cmp(eax, dword_ptr(rsi + dr_off(6)))?;
    a.je(ok)?;
    a.or(r15d, fail::DR6)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    a.set_label(&mut no_dbg)
}

/// Records this trip's failures in the mailbox and leaves the return code,
/// `cookie ^ RET_XOR ^ (failures << 16)`, in R14D.
fn emit_return_code(a: &mut CodeAssembler) -> Result<(), IcedError> {
    emit_record_fails(
        a,
        r15d,
        eax,
        field(offset_of!(Mailbox, fails)),
        field(offset_of!(Mailbox, first_fail_cookie)),
        field(offset_of!(Mailbox, cookie)),
    )?;
    a.mov(r14d, field(offset_of!(Mailbox, cookie)))?;
    a.xor(r14d, RET_XOR)?;
    a.shl(r15d, 16)?;
    a.xor(r14d, r15d)
}

/// Clobbers everything a callee may (see the module documentation) and
/// returns the code in R14D.
fn emit_clobber_and_return(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.fninit()?;
    a.pxor(xmm0, xmm0)?;
    a.pxor(xmm1, xmm1)?;
    a.mov(rax, cr0)?;
    a.or(rax, Cr0::TS.bits() as i32)?;
    a.mov(cr0, rax)?;
    a.mov(rax, cr4)?;
    a.xor(rax, (Cr4::DE | Cr4::TSD | Cr4::PCE).bits() as i32)?;
    a.mov(cr4, rax)?;
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.and(eax, !(Efer::SCE.bits() as u32) as i32)?;
    a.wrmsr()?;
    a.mov(rax, 0x0000_0bad_0000_1000u64)?;
    for dr in [dr0, dr1, dr2, dr3] {
        a.mov(dr, rax)?;
        a.add(rax, 0x1000)?;
    }
    a.xor(eax, eax)?;
    a.mov(dr6, rax)?;
    a.mov(ds, eax)?;
    a.mov(es, eax)?;
    a.mov(fs, eax)?;
    a.mov(gs, eax)?;
    for (i, r) in [
        rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r15,
    ]
    .into_iter()
    .enumerate()
    {
        a.mov(r, 0xdead_0000_0000_0000u64 | (i as u64))?;
    }
    a.mov(eax, r14d)?;
    a.mov(r14, 0xdead_0000_0000_00eeu64)?;
    a.ret()
}

/// Assembles what `a` holds at `cfg.layout.rc` into a blob of `area_size`
/// bytes with the IDT's gates to `handlers` filled in.
fn assemble(
    mut a: CodeAssembler,
    cfg: &FarConfig,
    area_size: usize,
    handlers: &[CodeLabel],
) -> Result<Vec<u8>, FarError> {
    let base = u64::from(cfg.layout.rc);
    let res = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let code = &res.inner.code_buffer;
    let mut blob = vec![0u8; area_size];
    let need = (cfg.mailboxes.max(1) as usize - 1)
        .checked_mul(super::MAILBOX_STRIDE as usize)
        .and_then(|n| n.checked_add(cfg.layout.mailbox_off as usize + size_of::<Mailbox>()))
        .unwrap_or(usize::MAX);
    if code.len() > cfg.layout.scratch_off as usize || area_size < need {
        return Err(FarError::TooSmall {
            need: need.max(code.len()),
            have: area_size,
        });
    }
    blob[..code.len()].copy_from_slice(code);
    // 64-bit interrupt gates, present, DPL 0, type 0xE.
    for (v, h) in handlers.iter().enumerate() {
        let target = res.label_ip(h)?;
        let gate = idt_gate(target, cfg.cs64);
        let at = cfg.layout.idt_off as usize + v * 16;
        blob[at..at + 16].copy_from_slice(&gate);
    }
    Ok(blob)
}

/// A 64-bit interrupt gate (present, DPL 0, type 0xE) to `target` through `selector`.
pub(crate) fn idt_gate(target: u64, selector: u16) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
    g[2..4].copy_from_slice(&selector.to_le_bytes());
    g[5] = 0x8e;
    g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    g
}

/// Names of the failure bits set in `bits`.
pub fn fail_names(bits: u32) -> Vec<&'static str> {
    bit_names(&fail::NAMES, bits)
}
