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
use cpum::{CpumCpu32, UseFlags};
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::far::FarError;
use crate::transcript::PREFIX;

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

const LVTS: [u32; 4] = [
    apic::reg::LVT_LINT0,
    apic::reg::LVT_LINT1,
    apic::reg::LVT_PC,
    apic::reg::LVT_THMR,
];

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
    let mut putc = a.create_label();
    let mut puthex = a.create_label();
    let scratch = |i: usize| dword_ptr(edi + mb(offset_of!(RcMailbox, scratch) + 4 * i));
    let fail_bit = |a: &mut CodeAssembler, bit: u32| {
        a.or(dword_ptr(edi + mb(offset_of!(RcMailbox, scratch))), bit)
    };

    a.set_label(&mut entry)?;
    a.add(dword_ptr(edi + mb(offset_of!(RcMailbox, calls))), 1)?;
    a.mov(scratch(0), 0u32)?;
    // CR3 is Hyper.cr3.
    let mut ok = a.create_label();
    a.mov(eax, cr3)?;
    a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, cr3))), eax)?;
    a.cmp(eax, dword_ptr(esi + cc(l::HYPER_CR3)))?;
    a.je(ok)?;
    fail_bit(&mut a, fail::CR3)?;
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
    fail_bit(&mut a, fail::SEGS)?;
    a.set_label(&mut ok)?;
    // TR is this VCPU's.
    let mut ok = a.create_label();
    a.str(eax)?;
    a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, tr))), eax)?;
    a.cmp(ax, word_ptr(esi + cc(l::HYPER_TR)))?;
    a.je(ok)?;
    fail_bit(&mut a, fail::TR)?;
    a.set_label(&mut ok)?;
    // CR0: PG, PE, TS set; WP clear.
    let mut ok = a.create_label();
    a.mov(eax, cr0)?;
    a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, cr0))), eax)?;
    a.and(eax, (Cr0::PG | Cr0::PE | Cr0::TS | Cr0::WP).bits() as u32)?;
    a.cmp(eax, (Cr0::PG | Cr0::PE | Cr0::TS).bits() as u32)?;
    a.je(ok)?;
    fail_bit(&mut a, fail::CR0)?;
    a.set_label(&mut ok)?;
    // CR4.PAE as the target flavour.
    let mut ok = a.create_label();
    a.mov(eax, cr4)?;
    a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, cr4))), eax)?;
    a.and(eax, Cr4::PAE.bits() as u32)?;
    a.shr(eax, Cr4::PAE.bits().trailing_zeros())?;
    a.cmp(eax, dword_ptr(edi + mb(offset_of!(RcMailbox, want_pae))))?;
    a.je(ok)?;
    fail_bit(&mut a, fail::CR4_PAE)?;
    a.set_label(&mut ok)?;
    // Interrupts off.
    let mut ok = a.create_label();
    a.pushfd()?;
    a.pop(eax)?;
    a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, eflags))), eax)?;
    a.test(eax, cpum::regs::Eflags::IF.bits() as u32)?;
    a.jz(ok)?;
    fail_bit(&mut a, fail::IF)?;
    a.set_label(&mut ok)?;
    // SYSENTER_CS parked at 0, EFER.SCE clear.
    let mut ok = a.create_label();
    a.mov(ecx, MSR_SYSENTER_CS)?;
    a.rdmsr()?;
    a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, sysenter_cs))), eax)?;
    a.test(eax, eax)?;
    a.jz(ok)?;
    fail_bit(&mut a, fail::SYSENTER)?;
    a.set_label(&mut ok)?;
    let mut ok = a.create_label();
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, efer))), eax)?;
    a.test(eax, Efer::SCE.bits() as u32)?;
    a.jz(ok)?;
    fail_bit(&mut a, fail::SCE)?;
    a.set_label(&mut ok)?;
    // APIC.
    let mut no_apic = a.create_label();
    a.test(
        dword_ptr(edi + mb(offset_of!(RcMailbox, expect))),
        expect::APIC,
    )?;
    a.jz(no_apic)?;
    for (i, reg) in LVTS.iter().enumerate() {
        let mut ok = a.create_label();
        let mut mmio = a.create_label();
        let mut have = a.create_label();
        a.test(
            dword_ptr(edi + mb(offset_of!(RcMailbox, expect))),
            expect::X2APIC,
        )?;
        a.jz(mmio)?;
        a.mov(ecx, apic::x2apic_msr(*reg))?;
        a.rdmsr()?;
        a.jmp(have)?;
        a.set_label(&mut mmio)?;
        a.mov(ecx, cfg.apic)?;
        a.mov(eax, dword_ptr(ecx + *reg as i32))?;
        a.set_label(&mut have)?;
        a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, lvt) + 4 * i)), eax)?;
        a.test(eax, apic::lvt::MASKED)?;
        a.jnz(ok)?;
        fail_bit(&mut a, fail::LVT)?;
        a.set_label(&mut ok)?;
    }
    let mut ok = a.create_label();
    a.mov(eax, dword_ptr(esi + cc(l::APIC_DIS_VECTORS)))?;
    a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, dis_seen))), eax)?;
    a.cmp(eax, dword_ptr(edi + mb(offset_of!(RcMailbox, want_dis))))?;
    a.je(ok)?;
    fail_bit(&mut a, fail::DIS_VECTORS)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    a.set_label(&mut no_apic)?;
    // Hyper debug registers.
    let mut no_dbg = a.create_label();
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    a.test(
        dword_ptr(edi + mb(offset_of!(RcMailbox, expect))),
        expect::DBG,
    )?;
    a.jz(no_dbg)?;
    for (n, dr) in [(0usize, dr0), (1, dr1), (2, dr2), (3, dr3), (7, dr7)] {
        a.mov(eax, dr)?;
        a.cmp(eax, dword_ptr(esi + cc(l::HYPER_DR + 8 * n)))?;
        a.jne(bad)?;
    }
    a.jmp(ok)?;
    a.set_label(&mut bad)?;
    fail_bit(&mut a, fail::DR)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    a.set_label(&mut no_dbg)?;
    // Registers that must survive the exit and the next entry.
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    let guest_r0 = cc(offset_of!(CpumCpu32, guest.r));
    a.mov(eax, ebp)?;
    a.shr(eax, 16)?;
    a.cmp(eax, ebp_magic(0) >> 16)?;
    a.jne(bad)?;
    a.cmp(ebx, dword_ptr(esi + guest_r0))?;
    a.je(ok)?;
    a.set_label(&mut bad)?;
    fail_bit(&mut a, fail::REGS)?;
    a.set_label(&mut ok)?;
    a.inc(ebx)?;
    a.mov(dword_ptr(esi + guest_r0), ebx)?;
    // FPU: the first FPU instruction must trap (#NM) and find Guest.fpu loaded.
    let mut no_fpu = a.create_label();
    a.test(
        dword_ptr(edi + mb(offset_of!(RcMailbox, expect))),
        expect::FPU,
    )?;
    a.jz(no_fpu)?;
    {
        let mut trapped = a.create_label();
        let mut loaded = a.create_label();
        a.mov(eax, dword_ptr(edi + mb(offset_of!(RcMailbox, nm_count))))?;
        a.mov(scratch(1), eax)?;
        a.fnstcw(word_ptr(edi + mb(offset_of!(RcMailbox, scratch) + 8)))?;
        a.mov(eax, dword_ptr(edi + mb(offset_of!(RcMailbox, nm_count))))?;
        a.cmp(eax, scratch(1))?;
        a.jne(trapped)?;
        fail_bit(&mut a, fail::NO_NM)?;
        a.set_label(&mut trapped)?;
        a.movzx(eax, word_ptr(edi + mb(offset_of!(RcMailbox, scratch) + 8)))?;
        a.movzx(
            ecx,
            word_ptr(esi + cc(l::GUEST_FPU + offset_of!(cpum::FxSaveArea, fcw))),
        )?;
        a.cmp(eax, ecx)?;
        a.je(loaded)?;
        fail_bit(&mut a, fail::FPU_LOAD)?;
        a.set_label(&mut loaded)?;
        // New guest FPU state the switcher must save on the way out.
        a.mov(eax, dword_ptr(edi + mb(offset_of!(RcMailbox, cookie))))?;
        a.and(eax, 0x0c00)?;
        a.xor(eax, u32::from(cpum::FxSaveArea::FCW_INIT))?;
        a.mov(dword_ptr(edi + mb(offset_of!(RcMailbox, guest_fcw))), eax)?;
        a.fldcw(word_ptr(edi + mb(offset_of!(RcMailbox, guest_fcw))))?;
    }
    a.set_label(&mut no_fpu)?;
    // Account and return.
    let mut clean = a.create_label();
    a.mov(eax, scratch(0))?;
    a.test(eax, eax)?;
    a.jz(clean)?;
    a.or(dword_ptr(edi + mb(offset_of!(RcMailbox, fails))), eax)?;
    a.cmp(
        dword_ptr(edi + mb(offset_of!(RcMailbox, first_fail_cookie))),
        0,
    )?;
    a.jne(clean)?;
    a.mov(ecx, dword_ptr(edi + mb(offset_of!(RcMailbox, cookie))))?;
    a.mov(
        dword_ptr(edi + mb(offset_of!(RcMailbox, first_fail_cookie))),
        ecx,
    )?;
    a.set_label(&mut clean)?;
    a.shl(eax, 16)?;
    a.xor(eax, dword_ptr(edi + mb(offset_of!(RcMailbox, cookie))))?;
    a.xor(eax, RET_XOR)?;
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
        a.set_label(h)?;
        if v == 7 {
            a.push(eax)?;
            a.push(ecx)?;
            a.push(edx)?;
            a.mov(edx, cfg.cpum_rc)?;
            a.str(ecx)?;
            a.movzx(ecx, cx)?;
            a.sub(ecx, dword_ptr(edx + cc(l::CPUM_HYPER_TSS_SEL0)))?;
            a.shr(ecx, cpum::HYPER_TSS_STRIDE_SHIFT)?;
            a.imul_2(ecx, dword_ptr(edx + cc(l::CPUM_CB_CPUMCPU)))?;
            a.add(ecx, dword_ptr(edx + cc(l::CPUM_OFF_CPUMCPU0)))?;
            a.add(edx, ecx)?;
            a.mov(eax, cr0)?;
            a.and(eax, !(Cr0::TS.bits() as u32))?;
            a.mov(cr0, eax)?;
            a.fxsave(ptr(edx + cc(l::HOST32_FPU)))?;
            a.fxrstor(ptr(edx + cc(l::GUEST_FPU)))?;
            a.or(dword_ptr(edx + cc(l::USE_FLAGS)), UseFlags::USED_FPU.bits())?;
            a.add(dword_ptr(mbox + offset_of!(RcMailbox, nm_count) as u32), 1)?;
            a.pop(edx)?;
            a.pop(ecx)?;
            a.pop(eax)?;
            a.iretd()?;
            continue;
        }
        if !matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30) {
            a.push(0)?;
        }
        a.push(v as u32)?;
        a.jmp(common)?;
    }
    a.set_label(&mut common)?;
    for &c in format!("\n{PREFIX}FAREXC vec=").as_bytes() {
        a.mov(al, u32::from(c))?;
        a.call(putc)?;
    }
    a.mov(eax, dword_ptr(esp))?;
    a.call(puthex)?;
    for &c in b" err=" {
        a.mov(al, u32::from(c))?;
        a.call(putc)?;
    }
    a.mov(eax, dword_ptr(esp + 4))?;
    a.call(puthex)?;
    for &c in b" rip=" {
        a.mov(al, u32::from(c))?;
        a.call(putc)?;
    }
    a.mov(eax, dword_ptr(esp + 8))?;
    a.call(puthex)?;
    a.mov(al, u32::from(b'\n'))?;
    a.call(putc)?;
    a.mov(eax, cfg.exit_code)?;
    a.mov(dx, u32::from(cfg.exit_port))?;
    a.out(dx, eax)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.set_label(&mut putc)?;
    a.push(edx)?;
    a.push(eax)?;
    let mut wait = a.create_label();
    a.mov(dx, u32::from(cfg.com1) + 5)?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.pop(eax)?;
    a.mov(dx, u32::from(cfg.com1))?;
    a.out(dx, al)?;
    a.pop(edx)?;
    a.ret()?;
    a.set_label(&mut puthex)?;
    a.push(ecx)?;
    a.push(edx)?;
    a.mov(edx, eax)?;
    a.mov(ecx, 8)?;
    let mut digit = a.create_label();
    let mut num = a.create_label();
    a.set_label(&mut digit)?;
    a.rol(edx, 4)?;
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
    a.pop(edx)?;
    a.pop(ecx)?;
    a.ret()?;
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
            entry: ip(&entry)?,
            handlers: handlers.iter().map(ip).collect::<Result<_, _>>()?,
            targets: targets.iter().map(ip).collect::<Result<_, _>>()?,
        },
    ))
}

/// Names of the failure bits set in `bits`.
pub fn fail_names(bits: u32) -> Vec<&'static str> {
    fail::NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
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
