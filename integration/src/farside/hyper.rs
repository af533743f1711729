//! What the code of both hypervisor contexts shares: the 32-bit/PAE one
//! ([`super::hyper_legacy`]) and the 64-bit one ([`super::hyper_amd64`]).
//!
//! That code runs at its RC address under `Hyper.cr3`, entered by the
//! switcher with the hyper registers: ESI/RSI = this VCPU's `CpumCpu` (RC),
//! EDI/RDI = the [`RcMailbox`] (RC), EBP = `0x5afe_0000 | vcpu`, EBX = a trip
//! counter the code keeps in `Guest.r[0]` — so registers that do not survive
//! the exit/entry save and restore are noticed.
//!
//! Each trip it checks the hyper context from the inside (CR3, selectors, TR,
//! CR0 PG/PE/TS set and WP clear, CR4.PAE, IF clear, SYSENTER_CS = 0,
//! EFER.SCE clear — and EFER.LMA set at 64 bits —, the NMI LVTs masked and
//! `fApicDisVectors`, the hyper debug registers when in use), uses the FPU
//! when asked — which must raise `#NM`, whose handler does the lazy switch
//! (`fxsave` Host, `fxrstor` Guest, `USED_FPU`) — then returns
//! `cookie ^ RET_XOR ^ (failures << 16)` through the switcher's exit entry
//! with `call`, and loops: the next entry resumes after that call.
//!
//! It also holds target functions for the call trampoline.
//!
//! This module holds the mailbox and the bits, the per-trip checks and the
//! `#NM` handler (emitted at either width) and the final assembly; each
//! context's module adds its exits, exception handlers and trampoline targets.

use core::mem::{offset_of, size_of};

use cpum::layout as l;
use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER, MSR_SYSENTER_CS};
use cpum::{CpumCpu32, CpumCpu64, UseFlags};
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::common::{
    bit_names, emit_apic_checks, emit_record_fails, pop_scratch_and_iret, push_scratch, ApicCheck,
};
use super::FarError;

/// Failure bits the RC code reports.
pub mod fail {
    /// CR3 was not `Hyper.cr3`.
    pub const CR3: u32 = 1 << 0;
    /// CS/DS/ES/SS/FS/GS were not the hyper selectors (FS/GS null).
    pub const SEGS: u32 = 1 << 1;
    /// TR was not this VCPU's hyper TSS.
    pub const TR: u32 = 1 << 2;
    /// CR0 lacked PG/PE/TS or had WP.
    pub const CR0: u32 = 1 << 3;
    /// CR4.PAE was not the target flavour's.
    pub const CR4_PAE: u32 = 1 << 4;
    /// IF was set.
    pub const IF: u32 = 1 << 5;
    /// SYSENTER_CS was not parked at 0.
    pub const SYSENTER: u32 = 1 << 6;
    /// EFER.SCE was set.
    pub const SCE: u32 = 1 << 7;
    /// An NMI LVT read unmasked.
    pub const LVT: u32 = 1 << 8;
    /// `fApicDisVectors` differed.
    pub const DIS_VECTORS: u32 = 1 << 9;
    /// The hyper debug registers were not loaded.
    pub const DR: u32 = 1 << 10;
    /// EBP/EBX did not survive the last exit and entry.
    pub const REGS: u32 = 1 << 11;
    /// The first FPU instruction raised no `#NM` (CR0.TS not set).
    pub const NO_NM: u32 = 1 << 12;
    /// After the lazy switch the FCW was not `Guest.fpu`'s.
    pub const FPU_LOAD: u32 = 1 << 13;
    /// Names, by bit.
    pub const NAMES: [&str; 14] = [
        "cr3",
        "segments",
        "tr",
        "cr0",
        "cr4.pae",
        "eflags.if",
        "sysenter_cs",
        "efer.sce",
        "lvt-unmasked",
        "dis-vectors",
        "hyper-dr",
        "hyper-regs",
        "no-#nm",
        "fpu-load",
    ];
}

/// Expectation bits the host sets per trip.
pub mod expect {
    /// NMI masking is on.
    pub const APIC: u32 = 1 << 0;
    /// Use the FPU this trip (lazy switch expected).
    pub const FPU: u32 = 1 << 1;
    /// The hyper debug registers are in use.
    pub const DBG: u32 = 1 << 2;
    /// The host APIC is in x2APIC mode: read the LVTs through MSRs.
    pub const X2APIC: u32 = 1 << 3;
}

/// Host ⇄ RC code exchange area.
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
pub struct RcMailbox {
    /// Per-trip cookie.
    pub cookie: u32,
    /// [`expect`] bits.
    pub expect: u32,
    /// Expected `fApicDisVectors`.
    pub want_dis: u32,
    /// 1 if the hypervisor context is PAE.
    pub want_pae: u32,
    /// Entries seen.
    pub calls: u32,
    /// OR of all failures.
    pub fails: u32,
    /// Cookie of the first failing trip.
    pub first_fail_cookie: u32,
    /// `#NM` faults handled.
    pub nm_count: u32,
    /// The FCW the RC code loaded last (the switcher must save it to `Guest.fpu`).
    pub guest_fcw: u32,
    /// CR0 seen.
    pub cr0: u32,
    /// CR3 seen.
    pub cr3: u32,
    /// CR4 seen.
    pub cr4: u32,
    /// TR seen.
    pub tr: u32,
    /// EFLAGS seen.
    pub eflags: u32,
    /// SYSENTER_CS seen.
    pub sysenter_cs: u32,
    /// EFER (low) seen.
    pub efer: u32,
    /// LVTs seen.
    pub lvt: [u32; 4],
    /// `fApicDisVectors` seen.
    pub dis_seen: u32,
    /// Scratch: this trip's failures, `#NM` count before, stored FCW.
    pub scratch: [u32; 3],
    /// RC address of the switcher's exit entry (the RC code calls through it).
    pub exit_entry: u32,
    /// RC address of the switcher's C-callable exit (status as the argument);
    /// the RC code leaves through it on trips whose cookie has bit 8 set.
    pub c_exit_entry: u32,
    /// Exits taken through the C-callable exit.
    pub c_exits: u32,
    /// NMIs the hypervisor context's IDT took (the storm's, with NMI
    /// masking off; any is a failure).
    pub nmis: u32,
    /// Low half of the instruction pointer the first of them interrupted.
    pub nmi_ip: u32,
}

/// Value XORed into the return code.
pub const RET_XOR: u32 = 0x0c0d_e32a;
/// EBP the host gives VCPU `i` (`0x5afe_0000 | i`).
pub const fn ebp_magic(i: u32) -> u32 {
    0x5afe_0000 | i
}

/// Where things live and what the code needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RcConfig {
    /// RC address of the helper area (code at +0, mailbox at `mailbox_off`).
    pub rc: u32,
    /// Offset of the mailbox in the helper area.
    pub mailbox_off: u32,
    /// Mailboxes: 1, shared by every VCPU, or one per VCPU,
    /// [`super::MAILBOX_STRIDE`] apart (the host gives each VCPU its own in
    /// `Hyper.edi`, where the RC code and its `#NM` handler find it).
    pub mailboxes: u32,
    /// RC address of `Cpum`.
    pub cpum_rc: u32,
    /// RC address of the switcher's assembly exit entry.
    pub exit_rc: u32,
    /// RC address of the switcher's C-callable exit.
    pub c_exit_rc: u32,
    /// Hyper code selector.
    pub cs: u16,
    /// Hyper data selector.
    pub ds: u16,
    /// Address of the local APIC page in the hyper context.
    pub apic: u32,
    /// COM1 base port.
    pub com1: u16,
    /// isa-debug-exit port.
    pub exit_port: u16,
    /// Value written to the exit port on an RC exception.
    pub exit_code: u32,
}

/// Entry points of the built RC code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcEntries {
    /// The checking loop (the first `Hyper.eip`).
    pub entry: u32,
    /// Handler per vector 0–31 (`#NM` is the lazy-FPU handler).
    pub handlers: Vec<u32>,
    /// Trampoline targets: `targets[n]` takes `n` arguments.
    pub targets: Vec<u32>,
}

/// Highest argument count of the trampoline targets.
pub const MAX_TARGET_ARGS: usize = 6;

/// What trampoline target `n` returns for `args` (its own computation, in Rust).
pub fn target_result(args: &[u32]) -> u32 {
    args.iter()
        .enumerate()
        .fold(0x7ab0_0000 | args.len() as u32, |acc, (i, a)| {
            acc.wrapping_add(a.wrapping_mul(i as u32 + 1))
        })
}

fn mb(f: usize) -> i32 {
    f as i32
}

fn cc(f: usize) -> i32 {
    f as i32
}

/// How the checks address the mailbox and the `CpumCpu`: through EDI and ESI
/// in the 32-bit/PAE context, RDI and RSI (a `CpumCpu64`) in the 64-bit one,
/// where control and debug registers are also read at full width.
#[derive(Clone, Copy)]
struct Width {
    wide: bool,
}

impl Width {
    /// Mailbox field `f` (EDI/RDI).
    fn mbx(self, f: usize) -> AsmMemoryOperand {
        if self.wide {
            rdi + mb(f)
        } else {
            edi + mb(f)
        }
    }

    /// `CpumCpu` field `f` (ESI/RSI).
    fn cpu(self, f: usize) -> AsmMemoryOperand {
        if self.wide {
            rsi + cc(f)
        } else {
            esi + cc(f)
        }
    }

    /// The mailbox dword at `f`.
    fn field(self, f: usize) -> AsmMemoryOperand {
        dword_ptr(self.mbx(f))
    }

    /// Mailbox scratch dword `i` (0: this trip's failures).
    fn scratch(self, i: usize) -> AsmMemoryOperand {
        self.field(offset_of!(RcMailbox, scratch) + 4 * i)
    }

    /// Records failure `bit` for this trip.
    fn fail(self, a: &mut CodeAssembler, bit: u32) -> Result<(), IcedError> {
        a.or(self.scratch(0), bit)
    }

    /// Loads the accumulator, at the context's width, from `cr`.
    fn read_cr(self, a: &mut CodeAssembler, cr: AsmRegisterCr) -> Result<(), IcedError> {
        if self.wide {
            a.mov(rax, cr)
        } else {
            a.mov(eax, cr)
        }
    }

    /// Loads the accumulator, at the context's width, from `dr`.
    fn read_dr(self, a: &mut CodeAssembler, dr: AsmRegisterDr) -> Result<(), IcedError> {
        if self.wide {
            a.mov(rax, dr)
        } else {
            a.mov(eax, dr)
        }
    }

    /// Compares the accumulator, at the context's width, with the
    /// `CpumCpu` field at `f`.
    fn cmp_cpu(self, a: &mut CodeAssembler, f: usize) -> Result<(), IcedError> {
        if self.wide {
            a.cmp(rax, qword_ptr(self.cpu(f)))
        } else {
            a.cmp(eax, dword_ptr(self.cpu(f)))
        }
    }
}

/// Emits, at `entry`, the checks both RC flavours make each trip and their
/// accounting, leaving `cookie ^ RET_XOR ^ (failures << 16)` in EAX.
///
/// `wide` selects the 64-bit context ([`super::hyper_amd64`]): RDI and RSI
/// (a `CpumCpu64`) as the bases, control and debug registers, RBP and RBX
/// compared at full width, and EFER.LMA expected set besides SCE clear.
pub(crate) fn emit_checks(
    a: &mut CodeAssembler,
    cfg: &RcConfig,
    entry: &mut CodeLabel,
    wide: bool,
) -> Result<(), IcedError> {
    let w = Width { wide };
    a.set_label(entry)?;
    a.add(w.field(offset_of!(RcMailbox, calls)), 1)?;
    a.mov(w.scratch(0), 0u32)?;
    check_cr3(a, w)?;
    check_selectors(a, w, cfg)?;
    check_tr(a, w)?;
    check_cr0(a, w)?;
    check_cr4_pae(a, w)?;
    check_interrupts_off(a, w)?;
    check_sysenter_cs(a, w)?;
    check_efer(a, w)?;
    check_nmi_masking(a, w, cfg)?;
    check_hyper_debug_regs(a, w)?;
    check_preserved_regs(a, w)?;
    check_lazy_fpu(a, w)?;
    emit_status(a, w)
}

/// CR3 is `Hyper.cr3`.
fn check_cr3(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    w.read_cr(a, cr3)?;
    a.mov(w.field(offset_of!(RcMailbox, cr3)), eax)?;
    w.cmp_cpu(a, l::HYPER_CR3)?;
    a.je(ok)?;
    w.fail(a, fail::CR3)?;
    a.set_label(&mut ok)
}

/// CS is the hyper code selector, DS/ES/SS the hyper data selector, FS/GS null.
fn check_selectors(a: &mut CodeAssembler, w: Width, cfg: &RcConfig) -> Result<(), IcedError> {
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
    w.fail(a, fail::SEGS)?;
    a.set_label(&mut ok)
}

/// TR is this VCPU's hyper TSS.
fn check_tr(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.str(eax)?;
    a.mov(w.field(offset_of!(RcMailbox, tr)), eax)?;
    a.cmp(ax, word_ptr(w.cpu(l::HYPER_TR)))?;
    a.je(ok)?;
    w.fail(a, fail::TR)?;
    a.set_label(&mut ok)
}

/// CR0: PG, PE, TS set; WP clear.
fn check_cr0(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    w.read_cr(a, cr0)?;
    a.mov(w.field(offset_of!(RcMailbox, cr0)), eax)?;
    a.and(eax, (Cr0::PG | Cr0::PE | Cr0::TS | Cr0::WP).bits() as u32)?;
    a.cmp(eax, (Cr0::PG | Cr0::PE | Cr0::TS).bits() as u32)?;
    a.je(ok)?;
    w.fail(a, fail::CR0)?;
    a.set_label(&mut ok)
}

/// CR4.PAE as the target flavour (the mailbox's `want_pae`).
fn check_cr4_pae(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    w.read_cr(a, cr4)?;
    a.mov(w.field(offset_of!(RcMailbox, cr4)), eax)?;
    a.and(eax, Cr4::PAE.bits() as u32)?;
    a.shr(eax, Cr4::PAE.bits().trailing_zeros())?;
    a.cmp(eax, w.field(offset_of!(RcMailbox, want_pae)))?;
    a.je(ok)?;
    w.fail(a, fail::CR4_PAE)?;
    a.set_label(&mut ok)
}

/// EFLAGS.IF clear.
fn check_interrupts_off(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    if w.wide {
        a.pushfq()?;
        a.pop(rax)?;
    } else {
        a.pushfd()?;
        a.pop(eax)?;
    }
    a.mov(w.field(offset_of!(RcMailbox, eflags)), eax)?;
    a.test(eax, cpum::regs::Eflags::IF.bits() as u32)?;
    a.jz(ok)?;
    w.fail(a, fail::IF)?;
    a.set_label(&mut ok)
}

/// SYSENTER_CS parked at 0.
fn check_sysenter_cs(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.mov(ecx, MSR_SYSENTER_CS)?;
    a.rdmsr()?;
    a.mov(w.field(offset_of!(RcMailbox, sysenter_cs)), eax)?;
    a.test(eax, eax)?;
    a.jz(ok)?;
    w.fail(a, fail::SYSENTER)?;
    a.set_label(&mut ok)
}

/// EFER: SCE parked (and long mode active in the 64-bit context).
fn check_efer(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.mov(w.field(offset_of!(RcMailbox, efer)), eax)?;
    if w.wide {
        a.and(eax, (Efer::SCE | Efer::LMA).bits() as u32)?;
        a.cmp(eax, Efer::LMA.bits() as u32)?;
        a.je(ok)?;
    } else {
        a.test(eax, Efer::SCE.bits() as u32)?;
        a.jz(ok)?;
    }
    w.fail(a, fail::SCE)?;
    a.set_label(&mut ok)
}

/// When the host expects NMI masking: the LVTs masked (read through the
/// APIC page at `cfg.apic` or the x2APIC MSRs) and `fApicDisVectors` as
/// expected.
fn check_nmi_masking(a: &mut CodeAssembler, w: Width, cfg: &RcConfig) -> Result<(), IcedError> {
    let mut no_apic = a.create_label();
    a.test(w.field(offset_of!(RcMailbox, expect)), expect::APIC)?;
    a.jz(no_apic)?;
    emit_apic_checks(
        a,
        &ApicCheck {
            expect: w.field(offset_of!(RcMailbox, expect)),
            x2apic: expect::X2APIC,
            lvt: w.field(offset_of!(RcMailbox, lvt)),
            dis_vectors: dword_ptr(w.cpu(l::APIC_DIS_VECTORS)),
            dis_seen: w.field(offset_of!(RcMailbox, dis_seen)),
            want_dis: w.field(offset_of!(RcMailbox, want_dis)),
            fail_lvt: fail::LVT,
            fail_dis: fail::DIS_VECTORS,
        },
        |a, reg| {
            a.mov(ecx, cfg.apic)?;
            if w.wide {
                a.mov(eax, dword_ptr(rcx + reg))
            } else {
                a.mov(eax, dword_ptr(ecx + reg))
            }
        },
        |a, bit| w.fail(a, bit),
    )?;
    a.set_label(&mut no_apic)
}

/// When the hyper debug registers are in use: DR0–3 and DR7 are `Hyper.dr`'s.
fn check_hyper_debug_regs(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut no_dbg = a.create_label();
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    a.test(w.field(offset_of!(RcMailbox, expect)), expect::DBG)?;
    a.jz(no_dbg)?;
    for (n, dr) in [(0usize, dr0), (1, dr1), (2, dr2), (3, dr3), (7, dr7)] {
        w.read_dr(a, dr)?;
        w.cmp_cpu(a, l::HYPER_DR + 8 * n)?;
        a.jne(bad)?;
    }
    a.jmp(ok)?;
    a.set_label(&mut bad)?;
    w.fail(a, fail::DR)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    a.set_label(&mut no_dbg)
}

/// Registers that must survive the exit and the next entry: the EBP magic
/// and the trip counter in EBX, mirrored in `Guest.r[0]`; then counts the
/// trip in both.
fn check_preserved_regs(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    if w.wide {
        let guest_r0 = qword_ptr(w.cpu(offset_of!(CpumCpu64, guest.r)));
        a.mov(rax, rbp)?;
        a.shr(rax, 16)?;
        a.cmp(rax, (ebp_magic(0) >> 16) as i32)?;
        a.jne(bad)?;
        a.cmp(rbx, guest_r0)?;
    } else {
        let guest_r0 = dword_ptr(w.cpu(offset_of!(CpumCpu32, guest.r)));
        a.mov(eax, ebp)?;
        a.shr(eax, 16)?;
        a.cmp(eax, ebp_magic(0) >> 16)?;
        a.jne(bad)?;
        a.cmp(ebx, guest_r0)?;
    }
    a.je(ok)?;
    a.set_label(&mut bad)?;
    w.fail(a, fail::REGS)?;
    a.set_label(&mut ok)?;
    if w.wide {
        a.inc(rbx)?;
        a.mov(qword_ptr(w.cpu(offset_of!(CpumCpu64, guest.r))), rbx)
    } else {
        a.inc(ebx)?;
        a.mov(dword_ptr(w.cpu(offset_of!(CpumCpu32, guest.r))), ebx)
    }
}

/// When the host asks for FPU use: the first FPU instruction must trap
/// (`#NM`) and find `Guest.fpu` loaded; then a new FCW, derived from the
/// cookie, which the switcher must save on the way out.
fn check_lazy_fpu(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    let mut no_fpu = a.create_label();
    a.test(w.field(offset_of!(RcMailbox, expect)), expect::FPU)?;
    a.jz(no_fpu)?;
    let mut trapped = a.create_label();
    let mut loaded = a.create_label();
    let stored_fcw = word_ptr(w.mbx(offset_of!(RcMailbox, scratch) + 8));
    a.mov(eax, w.field(offset_of!(RcMailbox, nm_count)))?;
    a.mov(w.scratch(1), eax)?;
    a.fnstcw(stored_fcw)?;
    a.mov(eax, w.field(offset_of!(RcMailbox, nm_count)))?;
    a.cmp(eax, w.scratch(1))?;
    a.jne(trapped)?;
    w.fail(a, fail::NO_NM)?;
    a.set_label(&mut trapped)?;
    a.movzx(eax, stored_fcw)?;
    a.movzx(
        ecx,
        word_ptr(w.cpu(l::GUEST_FPU + offset_of!(cpum::FxSaveArea, fcw))),
    )?;
    a.cmp(eax, ecx)?;
    a.je(loaded)?;
    w.fail(a, fail::FPU_LOAD)?;
    a.set_label(&mut loaded)?;
    // New guest FPU state the switcher must save on the way out.
    a.mov(eax, w.field(offset_of!(RcMailbox, cookie)))?;
    a.and(eax, 0x0c00)?;
    a.xor(eax, u32::from(cpum::FxSaveArea::FCW_INIT))?;
    a.mov(w.field(offset_of!(RcMailbox, guest_fcw)), eax)?;
    a.fldcw(word_ptr(w.mbx(offset_of!(RcMailbox, guest_fcw))))?;
    a.set_label(&mut no_fpu)
}

/// Accounts this trip's failures in the mailbox and derives the return code
/// in EAX.
fn emit_status(a: &mut CodeAssembler, w: Width) -> Result<(), IcedError> {
    a.mov(eax, w.scratch(0))?;
    emit_record_fails(
        a,
        eax,
        ecx,
        w.field(offset_of!(RcMailbox, fails)),
        w.field(offset_of!(RcMailbox, first_fail_cookie)),
        w.field(offset_of!(RcMailbox, cookie)),
    )?;
    a.shl(eax, 16)?;
    a.xor(eax, w.field(offset_of!(RcMailbox, cookie)))?;
    a.xor(eax, RET_XOR)
}

/// Emits the `#NM` handler: it finds this VCPU's `CpumCpu` from TR, clears
/// CR0.TS, saves the host FPU state and loads `Guest.fpu` (the lazy switch),
/// sets `USED_FPU`, counts the fault in the mailbox and returns. `wide`
/// selects the 64-bit context.
pub(crate) fn emit_lazy_fpu_switch(
    a: &mut CodeAssembler,
    cfg: &RcConfig,
    wide: bool,
) -> Result<(), IcedError> {
    let mbox = cfg.rc + cfg.mailbox_off;
    let cpu = |f: usize| if wide { rdx + cc(f) } else { edx + cc(f) };
    push_scratch(a)?;
    a.mov(edx, cfg.cpum_rc)?;
    a.str(ecx)?;
    a.movzx(ecx, cx)?;
    a.sub(ecx, dword_ptr(cpu(l::CPUM_HYPER_TSS_SEL0)))?;
    a.shr(ecx, cpum::HYPER_TSS_STRIDE_SHIFT)?;
    let nm_count = offset_of!(RcMailbox, nm_count);
    a.imul_2(ecx, dword_ptr(cpu(l::CPUM_CB_CPUMCPU)))?;
    a.add(ecx, dword_ptr(cpu(l::CPUM_OFF_CPUMCPU0)))?;
    if wide {
        a.add(rdx, rcx)?;
        a.mov(rax, cr0)?;
        a.and(rax, !(Cr0::TS.bits() as u32) as i32)?;
        a.mov(cr0, rax)?;
    } else {
        a.add(edx, ecx)?;
        a.mov(eax, cr0)?;
        a.and(eax, !(Cr0::TS.bits() as u32))?;
        a.mov(cr0, eax)?;
    }
    a.fxsave(ptr(cpu(l::HOST32_FPU)))?;
    a.fxrstor(ptr(cpu(l::GUEST_FPU)))?;
    a.or(dword_ptr(cpu(l::USE_FLAGS)), UseFlags::USED_FPU.bits())?;
    if cfg.mailboxes > 1 {
        // The fault comes from the RC code's FPU check, where EDI/RDI is
        // this VCPU's own mailbox.
        a.add(w_field(wide, nm_count), 1)?;
    } else if wide {
        a.mov(ecx, mbox)?;
        a.add(dword_ptr(rcx + mb(nm_count)), 1)?;
    } else {
        a.add(dword_ptr(mbox + nm_count as u32), 1)?;
    }
    pop_scratch_and_iret(a)
}

/// The mailbox field at `f` through EDI (RDI when `wide`).
fn w_field(wide: bool, f: usize) -> AsmMemoryOperand {
    if wide {
        dword_ptr(rdi + mb(f))
    } else {
        dword_ptr(edi + mb(f))
    }
}

/// Assembles what `a` holds at `cfg.rc` into a blob of `area_size` bytes with
/// the mailbox's exit-entry slots filled, and resolves the entry points.
pub(crate) fn finish(
    mut a: CodeAssembler,
    cfg: &RcConfig,
    area_size: usize,
    entry: &CodeLabel,
    handlers: &[CodeLabel],
    targets: &[CodeLabel],
) -> Result<(Vec<u8>, RcEntries), FarError> {
    let res = a.assemble_options(
        u64::from(cfg.rc),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let code = &res.inner.code_buffer;
    let stride = super::MAILBOX_STRIDE as usize;
    let need = (cfg.mailboxes.max(1) as usize - 1)
        .checked_mul(stride)
        .and_then(|n| n.checked_add(cfg.mailbox_off as usize + size_of::<RcMailbox>()))
        .unwrap_or(usize::MAX);
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
        for i in 0..cfg.mailboxes.max(1) as usize {
            let slot = cfg.mailbox_off as usize + i * stride + field;
            blob[slot..slot + 4].copy_from_slice(&value.to_le_bytes());
        }
    }
    let ip = |l: &CodeLabel| res.label_ip(l).map(|v| v as u32);
    Ok((
        blob,
        RcEntries {
            entry: ip(entry)?,
            handlers: handlers.iter().map(ip).collect::<Result<_, _>>()?,
            targets: targets.iter().map(ip).collect::<Result<_, _>>()?,
        },
    ))
}

/// Names of the failure bits set in `bits`.
pub fn fail_names(bits: u32) -> Vec<&'static str> {
    bit_names(&fail::NAMES, bits)
}
