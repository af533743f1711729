//! The code the 32-bit/PAE switchers enter in the hypervisor context (RC).
//!
//! It runs at its RC address under `Hyper.cr3`, entered by the switcher's
//! `iret` with the hyper registers: ESI = this VCPU's `CpumCpu32` (RC),
//! EDI = the [`RcMailbox`] (RC), EBP = `0x5afe_0000 | vcpu`, EBX = a trip
//! counter the code keeps in `Guest.r[0]` — so registers that do not survive
//! the exit/entry save and restore are noticed.
//!
//! Each trip it checks the hyper context from the inside (CR3, selectors, TR,
//! CR0 PG/PE/TS set and WP clear, CR4.PAE, IF clear, SYSENTER_CS = 0,
//! EFER.SCE clear, the NMI LVTs masked and `fApicDisVectors`, the hyper debug
//! registers when in use), uses the FPU when asked — which must raise `#NM`,
//! whose handler here does the lazy switch (`fxsave` Host, `fxrstor` Guest,
//! `USED_FPU`) — then returns `cookie ^ RET_XOR ^ (failures << 16)` through the
//! switcher's exit entry with `call`, and loops: the next entry resumes after
//! that call.
//!
//! It also holds cdecl target functions for the call trampoline.

use core::mem::{offset_of, size_of};

use cpum::layout as l;
use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER, MSR_SYSENTER_CS};
use cpum::{CpumCpu32, CpumCpu64, UseFlags};
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::far::FarError;
use crate::farcommon::{
    bit_names, emit_apic_checks, emit_exception_report, emit_exception_stub, emit_record_fails,
    ApicCheck, ReporterRegs,
};

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
    a.test(dword_ptr(edi + mb(offset_of!(RcMailbox, cookie))), 0x100)?;
    a.jz(asm_exit)?;
    a.add(dword_ptr(edi + mb(offset_of!(RcMailbox, c_exits))), 1)?;
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

/// Emits, at `entry`, the checks both RC flavours make each trip and their
/// accounting, leaving `cookie ^ RET_XOR ^ (failures << 16)` in EAX.
///
/// `wide` selects the 64-bit context ([`crate::rc64`]): RDI and RSI (a
/// `CpumCpu64`) as the bases, control and debug registers, RBP and RBX
/// compared at full width, and EFER.LMA expected set besides SCE clear.
pub(crate) fn emit_checks(
    a: &mut CodeAssembler,
    cfg: &RcConfig,
    entry: &mut CodeLabel,
    wide: bool,
) -> Result<(), IcedError> {
    // Mailbox (EDI/RDI) and CpumCpu (ESI/RSI) addresses.
    let mbx = |f: usize| if wide { rdi + mb(f) } else { edi + mb(f) };
    let cpu = |f: usize| if wide { rsi + cc(f) } else { esi + cc(f) };
    let field = |f: usize| dword_ptr(mbx(f));
    let scratch = |i: usize| field(offset_of!(RcMailbox, scratch) + 4 * i);
    let fail_bit = |a: &mut CodeAssembler, bit: u32| a.or(scratch(0), bit);
    // The accumulator at the context's width: loaded from a control or debug
    // register, compared with the `CpumCpu` field at `f`.
    let read_cr = |a: &mut CodeAssembler, cr: AsmRegisterCr| {
        if wide {
            a.mov(rax, cr)
        } else {
            a.mov(eax, cr)
        }
    };
    let read_dr = |a: &mut CodeAssembler, dr: AsmRegisterDr| {
        if wide {
            a.mov(rax, dr)
        } else {
            a.mov(eax, dr)
        }
    };
    let cmp_cpu = |a: &mut CodeAssembler, f: usize| {
        if wide {
            a.cmp(rax, qword_ptr(cpu(f)))
        } else {
            a.cmp(eax, dword_ptr(cpu(f)))
        }
    };

    a.set_label(entry)?;
    a.add(field(offset_of!(RcMailbox, calls)), 1)?;
    a.mov(scratch(0), 0u32)?;
    // CR3 is Hyper.cr3.
    let mut ok = a.create_label();
    read_cr(a, cr3)?;
    a.mov(field(offset_of!(RcMailbox, cr3)), eax)?;
    cmp_cpu(a, l::HYPER_CR3)?;
    a.je(ok)?;
    fail_bit(a, fail::CR3)?;
    a.set_label(&mut ok)?;
    // Selectors.
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
    fail_bit(a, fail::SEGS)?;
    a.set_label(&mut ok)?;
    // TR is this VCPU's.
    let mut ok = a.create_label();
    a.str(eax)?;
    a.mov(field(offset_of!(RcMailbox, tr)), eax)?;
    a.cmp(ax, word_ptr(cpu(l::HYPER_TR)))?;
    a.je(ok)?;
    fail_bit(a, fail::TR)?;
    a.set_label(&mut ok)?;
    // CR0: PG, PE, TS set; WP clear.
    let mut ok = a.create_label();
    read_cr(a, cr0)?;
    a.mov(field(offset_of!(RcMailbox, cr0)), eax)?;
    a.and(eax, (Cr0::PG | Cr0::PE | Cr0::TS | Cr0::WP).bits() as u32)?;
    a.cmp(eax, (Cr0::PG | Cr0::PE | Cr0::TS).bits() as u32)?;
    a.je(ok)?;
    fail_bit(a, fail::CR0)?;
    a.set_label(&mut ok)?;
    // CR4.PAE as the target flavour.
    let mut ok = a.create_label();
    read_cr(a, cr4)?;
    a.mov(field(offset_of!(RcMailbox, cr4)), eax)?;
    a.and(eax, Cr4::PAE.bits() as u32)?;
    a.shr(eax, Cr4::PAE.bits().trailing_zeros())?;
    a.cmp(eax, field(offset_of!(RcMailbox, want_pae)))?;
    a.je(ok)?;
    fail_bit(a, fail::CR4_PAE)?;
    a.set_label(&mut ok)?;
    // Interrupts off.
    let mut ok = a.create_label();
    if wide {
        a.pushfq()?;
        a.pop(rax)?;
    } else {
        a.pushfd()?;
        a.pop(eax)?;
    }
    a.mov(field(offset_of!(RcMailbox, eflags)), eax)?;
    a.test(eax, cpum::regs::Eflags::IF.bits() as u32)?;
    a.jz(ok)?;
    fail_bit(a, fail::IF)?;
    a.set_label(&mut ok)?;
    // SYSENTER_CS parked at 0.
    let mut ok = a.create_label();
    a.mov(ecx, MSR_SYSENTER_CS)?;
    a.rdmsr()?;
    a.mov(field(offset_of!(RcMailbox, sysenter_cs)), eax)?;
    a.test(eax, eax)?;
    a.jz(ok)?;
    fail_bit(a, fail::SYSENTER)?;
    a.set_label(&mut ok)?;
    // EFER: SCE parked (and long mode active in the 64-bit context).
    let mut ok = a.create_label();
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.mov(field(offset_of!(RcMailbox, efer)), eax)?;
    if wide {
        a.and(eax, (Efer::SCE | Efer::LMA).bits() as u32)?;
        a.cmp(eax, Efer::LMA.bits() as u32)?;
        a.je(ok)?;
    } else {
        a.test(eax, Efer::SCE.bits() as u32)?;
        a.jz(ok)?;
    }
    fail_bit(a, fail::SCE)?;
    a.set_label(&mut ok)?;
    // APIC.
    let mut no_apic = a.create_label();
    a.test(field(offset_of!(RcMailbox, expect)), expect::APIC)?;
    a.jz(no_apic)?;
    emit_apic_checks(
        a,
        &ApicCheck {
            expect: field(offset_of!(RcMailbox, expect)),
            x2apic: expect::X2APIC,
            lvt: field(offset_of!(RcMailbox, lvt)),
            dis_vectors: dword_ptr(cpu(l::APIC_DIS_VECTORS)),
            dis_seen: field(offset_of!(RcMailbox, dis_seen)),
            want_dis: field(offset_of!(RcMailbox, want_dis)),
            fail_lvt: fail::LVT,
            fail_dis: fail::DIS_VECTORS,
        },
        |a, reg| {
            a.mov(ecx, cfg.apic)?;
            if wide {
                a.mov(eax, dword_ptr(rcx + reg))
            } else {
                a.mov(eax, dword_ptr(ecx + reg))
            }
        },
        fail_bit,
    )?;
    a.set_label(&mut no_apic)?;
    // Hyper debug registers.
    let mut no_dbg = a.create_label();
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    a.test(field(offset_of!(RcMailbox, expect)), expect::DBG)?;
    a.jz(no_dbg)?;
    for (n, dr) in [(0usize, dr0), (1, dr1), (2, dr2), (3, dr3), (7, dr7)] {
        read_dr(a, dr)?;
        cmp_cpu(a, l::HYPER_DR + 8 * n)?;
        a.jne(bad)?;
    }
    a.jmp(ok)?;
    a.set_label(&mut bad)?;
    fail_bit(a, fail::DR)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    a.set_label(&mut no_dbg)?;
    // Registers that must survive the exit and the next entry: the EBP
    // magic and the trip counter in EBX, mirrored in `Guest.r[0]`.
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    if wide {
        let guest_r0 = qword_ptr(cpu(offset_of!(CpumCpu64, guest.r)));
        a.mov(rax, rbp)?;
        a.shr(rax, 16)?;
        a.cmp(rax, (ebp_magic(0) >> 16) as i32)?;
        a.jne(bad)?;
        a.cmp(rbx, guest_r0)?;
    } else {
        let guest_r0 = dword_ptr(cpu(offset_of!(CpumCpu32, guest.r)));
        a.mov(eax, ebp)?;
        a.shr(eax, 16)?;
        a.cmp(eax, ebp_magic(0) >> 16)?;
        a.jne(bad)?;
        a.cmp(ebx, guest_r0)?;
    }
    a.je(ok)?;
    a.set_label(&mut bad)?;
    fail_bit(a, fail::REGS)?;
    a.set_label(&mut ok)?;
    if wide {
        a.inc(rbx)?;
        a.mov(qword_ptr(cpu(offset_of!(CpumCpu64, guest.r))), rbx)?;
    } else {
        a.inc(ebx)?;
        a.mov(dword_ptr(cpu(offset_of!(CpumCpu32, guest.r))), ebx)?;
    }
    // FPU: the first FPU instruction must trap (#NM) and find Guest.fpu loaded.
    let mut no_fpu = a.create_label();
    a.test(field(offset_of!(RcMailbox, expect)), expect::FPU)?;
    a.jz(no_fpu)?;
    {
        let mut trapped = a.create_label();
        let mut loaded = a.create_label();
        a.mov(eax, field(offset_of!(RcMailbox, nm_count)))?;
        a.mov(scratch(1), eax)?;
        a.fnstcw(word_ptr(mbx(offset_of!(RcMailbox, scratch) + 8)))?;
        a.mov(eax, field(offset_of!(RcMailbox, nm_count)))?;
        a.cmp(eax, scratch(1))?;
        a.jne(trapped)?;
        fail_bit(a, fail::NO_NM)?;
        a.set_label(&mut trapped)?;
        a.movzx(eax, word_ptr(mbx(offset_of!(RcMailbox, scratch) + 8)))?;
        a.movzx(
            ecx,
            word_ptr(cpu(l::GUEST_FPU + offset_of!(cpum::FxSaveArea, fcw))),
        )?;
        a.cmp(eax, ecx)?;
        a.je(loaded)?;
        fail_bit(a, fail::FPU_LOAD)?;
        a.set_label(&mut loaded)?;
        // New guest FPU state the switcher must save on the way out.
        a.mov(eax, field(offset_of!(RcMailbox, cookie)))?;
        a.and(eax, 0x0c00)?;
        a.xor(eax, u32::from(cpum::FxSaveArea::FCW_INIT))?;
        a.mov(field(offset_of!(RcMailbox, guest_fcw)), eax)?;
        a.fldcw(word_ptr(mbx(offset_of!(RcMailbox, guest_fcw))))?;
    }
    a.set_label(&mut no_fpu)?;
    // Account and derive the return code.
    a.mov(eax, scratch(0))?;
    emit_record_fails(
        a,
        eax,
        ecx,
        field(offset_of!(RcMailbox, fails)),
        field(offset_of!(RcMailbox, first_fail_cookie)),
        field(offset_of!(RcMailbox, cookie)),
    )?;
    a.shl(eax, 16)?;
    a.xor(eax, field(offset_of!(RcMailbox, cookie)))?;
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
    if wide {
        a.push(rax)?;
        a.push(rcx)?;
        a.push(rdx)?;
    } else {
        a.push(eax)?;
        a.push(ecx)?;
        a.push(edx)?;
    }
    a.mov(edx, cfg.cpum_rc)?;
    a.str(ecx)?;
    a.movzx(ecx, cx)?;
    a.sub(ecx, dword_ptr(cpu(l::CPUM_HYPER_TSS_SEL0)))?;
    a.shr(ecx, cpum::HYPER_TSS_STRIDE_SHIFT)?;
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
    let nm_count = offset_of!(RcMailbox, nm_count);
    if wide {
        a.mov(ecx, mbox)?;
        a.add(dword_ptr(rcx + mb(nm_count)), 1)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rax)?;
        a.iretq()
    } else {
        a.add(dword_ptr(mbox + nm_count as u32), 1)?;
        a.pop(edx)?;
        a.pop(ecx)?;
        a.pop(eax)?;
        a.iretd()
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
    let need = cfg.mailbox_off as usize + size_of::<RcMailbox>();
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
        let slot = cfg.mailbox_off as usize + field;
        blob[slot..slot + 4].copy_from_slice(&value.to_le_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_targets_compute_what_rust_computes() {
        let cfg = RcConfig {
            rc: 0xa000_9000,
            mailbox_off: 0x3000,
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
