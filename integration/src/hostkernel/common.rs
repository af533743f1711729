//! What the 32-bit and the 64-bit kernel share: the generator ([`Gen`]:
//! the assembler, the data area, the slots, the tables and the routine
//! labels), the library routines, the exception report, CPUID feature
//! detection, the local APIC (xAPIC through the MMIO page, or x2APIC through
//! MSRs), the call loop with its checks, statistics and summary, and the
//! assembly of the image. Where the kernels differ only in register width,
//! the code asks [`Gen::bits64`].

use std::collections::BTreeMap;

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use cpum::regs::{Efer, MSR_EFER, MSR_SYSENTER_CS};

use super::CpuFeature;
use super::{
    narrow, page_align, BuildError, DataArena, DumpRegion64, Expected, HookCtx, HookFn,
    HostKernelBuilder, KernelAddrs, LayoutRegion, Testbed, COOKIE_SEED, FEATURE_APIC, FEATURE_EFER,
    FEATURE_NX, FEATURE_SCE, FEATURE_SEP, FEATURE_X2APIC, FEATURE_X2APIC_ON, FS_BASE64,
    FS_PAGE_PHYS, GS_BASE64, KERNEL_GS_BASE64, LAPIC_VIRT, MAGIC_PAGE_PHYS, MAGIC_VALUE,
    MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, SEL64_DATA, SEL_LDT_FS, SPURIOUS_VECTOR,
    STUB_ADDR, TABLES_BASE,
};
use crate::image::ImageBuilder;
use crate::paging::{HostMode, PageTables, PAGE};
use crate::qemu::{DEBUG_EXIT_PORT, EXIT_FAIL, EXIT_HOST_EXCEPTION, EXIT_PASS};
use crate::transcript::{Phase, CRC32_TABLE, PREFIX};

pub(super) type R<T = ()> = Result<T, BuildError>;

pub(super) const COM1: u16 = 0x3f8;
pub(super) const STACK_SIZE: usize = 0x4000;
pub(super) const EXC_STACK_SIZE: usize = 0x1000;
/// Per-VCPU statistics record (dwords): calls, mismatches, retfails,
/// hookfails, tsc_min, tsc_max, tsc_sum lo/hi, tsc of trip 0, tsc of trip 1.
const STAT_CALLS: u32 = 0;
const STAT_MISM: u32 = 4;
const STAT_RETFAIL: u32 = 8;
const STAT_HOOKFAIL: u32 = 12;
const STAT_MIN: u32 = 16;
const STAT_MAX: u32 = 20;
const STAT_SUM: u32 = 24;
const STAT_FIRST: u32 = 32;
const STAT_SECOND: u32 = 36;
const STAT_SIZE: u32 = 40;

/// Serial port settings: (offset from COM1, value) — no interrupts, 115200
/// baud (divisor 1), 8N1, FIFO on and cleared, DTR | RTS.
pub(super) const SERIAL_INIT: [(u16, u8); 7] = [
    (1, 0x00),
    (3, 0x80),
    (0, 0x01),
    (1, 0x00),
    (3, 0x03),
    (2, 0xc7),
    (4, 0x03),
];

/// Vectors for which the CPU pushes an error code.
pub(super) fn has_error_code(v: u32) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The initial per-VCPU statistics records (`tsc_min` = all ones).
fn initial_stats(n_vcpus: u32) -> Vec<u8> {
    let mut stats = vec![0u8; (STAT_SIZE * n_vcpus) as usize];
    for i in 0..n_vcpus {
        let off = (i * STAT_SIZE + STAT_MIN) as usize;
        stats[off..off + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    }
    stats
}

/// A segment descriptor (SDM Vol. 3A §3.4.5).
pub(super) fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// IA32_APIC_BASE.EN: the local APIC is globally enabled.
const APIC_BASE_EN: u32 = apic::APIC_BASE_EN as u32;
/// IA32_APIC_BASE.EXTD: x2APIC mode.
const APIC_BASE_EXTD: u32 = apic::APIC_BASE_EXTD as u32;
/// CPUID.1:ECX.x2APIC.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;

/// The LVT values the kernel programs: LINT0, LINT1 and PERF to NMI
/// delivery unmasked, THERM to NMI delivery masked.
const LVT_SETUP: [(u32, u32); 4] = [
    (apic::reg::LVT_LINT0, apic::lvt::MODE_NMI),
    (apic::reg::LVT_LINT1, apic::lvt::MODE_NMI),
    (apic::reg::LVT_PC, apic::lvt::MODE_NMI),
    (apic::reg::LVT_THMR, apic::lvt::MODE_NMI | apic::lvt::MASKED),
];

/// The `APIC` line's register fields: key and xAPIC offset.
const APIC_LINE: [(&str, u32); 5] = [
    ("lint0", apic::reg::LVT_LINT0),
    ("lint1", apic::reg::LVT_LINT1),
    ("perf", apic::reg::LVT_PC),
    ("therm", apic::reg::LVT_THMR),
    ("svr", apic::reg::SVR),
];

/// The general registers by their 32-bit and 64-bit names.
const GPRS: [(AsmRegister32, AsmRegister64); 8] = [
    (eax, rax),
    (ecx, rcx),
    (edx, rdx),
    (ebx, rbx),
    (esp, rsp),
    (ebp, rbp),
    (esi, rsi),
    (edi, rdi),
];

/// The 64-bit register whose low half is `reg`.
fn wide(reg: AsmRegister32) -> R<AsmRegister64> {
    GPRS.iter()
        .find(|(r32, _)| *r32 == reg)
        .map(|&(_, r64)| r64)
        .ok_or_else(|| BuildError::Internal(format!("no 64-bit form of {reg:?}")))
}

/// The kernel's data slots (addresses in the data area). The 64-bit kernel
/// keeps `arg1` and the exception frame as qwords, and also records RSP.
pub(super) struct Slots {
    pub mb_eax: u32,
    pub mb_ebx: u32,
    pub phase: u32,
    pub features: u32,
    pub apic_ver: u32,
    pub trip: u32,
    pub vcpu: u32,
    pub arg1: u32,
    pub arg2: u32,
    pub cookie: u32,
    pub ret: u32,
    pub want: u32,
    pub hook_fail: u32,
    pub iter_mism: u32,
    pub iter_failed: u32,
    pub tsc0: u32,
    pub delta: u32,
    pub nmi_count: u32,
    pub spurious: u32,
    pub in_exc: u32,
    pub report_lines: u32,
    pub trips_done: u32,
    pub calls: u32,
    pub mism: u32,
    pub retfails: u32,
    pub hookfails: u32,
    pub tsc_min: u32,
    pub tsc_max: u32,
    pub tsc_sum: u32,
    pub scratch: u32,
    pub exc_vec: u32,
    pub exc_err: u32,
    /// EIP or RIP of the faulting instruction.
    pub exc_ip: u32,
    pub exc_cs: u32,
    /// EFLAGS or RFLAGS.
    pub exc_flags: u32,
    /// RSP at the exception (64-bit kernel only).
    pub exc_rsp: Option<u32>,
    pub hexdigits: u32,
    /// The running CRC-32 of every byte `putc` sent (not inverted).
    pub crc: u32,
    /// The inverted CRC-32 the `CRC` line prints.
    pub crc_final: u32,
    /// [`CRC32_TABLE`], 256 dwords.
    pub crc_table: u32,
    /// Set once the exit routine has printed the `CRC` line.
    pub exiting: u32,
}

impl Slots {
    /// Allocates the slots in `d`; `bits64` selects the 64-bit kernel's
    /// qword slots.
    pub(super) fn new(d: &mut DataArena, bits64: bool) -> Self {
        let word = |d: &mut DataArena| {
            if bits64 {
                d.zeroed(8, 8)
            } else {
                d.dword(0)
            }
        };
        Slots {
            mb_eax: d.dword(0),
            mb_ebx: d.dword(0),
            phase: d.dword(Phase::Setup.code()),
            features: d.dword(0),
            apic_ver: d.dword(0),
            trip: d.dword(0),
            vcpu: d.dword(0),
            arg1: word(d),
            arg2: d.dword(0),
            cookie: d.dword(0),
            ret: d.dword(0),
            want: d.dword(0),
            hook_fail: d.dword(0),
            iter_mism: d.dword(0),
            iter_failed: d.dword(0),
            tsc0: d.zeroed(8, 8),
            delta: d.dword(0),
            nmi_count: d.dword(0),
            spurious: d.dword(0),
            in_exc: d.dword(0),
            report_lines: d.dword(0),
            trips_done: d.dword(0),
            calls: d.dword(0),
            mism: d.dword(0),
            retfails: d.dword(0),
            hookfails: d.dword(0),
            tsc_min: d.dword(u32::MAX),
            tsc_max: d.dword(0),
            tsc_sum: d.zeroed(8, 8),
            scratch: d.zeroed(16, 16),
            exc_vec: word(d),
            exc_err: word(d),
            exc_ip: word(d),
            exc_cs: word(d),
            exc_flags: word(d),
            exc_rsp: bits64.then(|| d.zeroed(8, 8)),
            hexdigits: d.bytes(b"0123456789abcdef", 4),
            crc: d.dword(!0),
            crc_final: d.dword(0),
            crc_table: {
                let table: Vec<u8> = CRC32_TABLE.iter().flat_map(|w| w.to_le_bytes()).collect();
                d.bytes(&table, 4)
            },
            exiting: d.dword(0),
        }
    }
}

/// The kernel's descriptor tables and stacks (addresses in the data area).
pub(super) struct Tables {
    pub gdt: u32,
    pub gdt_limit: u16,
    pub gdtr: u32,
    pub idt: u32,
    pub idtr: u32,
    pub tss: u32,
    pub ldt: u32,
    pub stack_top: u32,
    pub exc_stack_top: u32,
    /// The NMI stack (IST2; 64-bit kernel only).
    pub nmi_stack_top: Option<u32>,
}

/// The call loop's tables (addresses in the data area).
pub(super) struct LoopTables {
    pub arg2_table: u32,
    pub stats: u32,
    pub item_mask: u32,
    pub item_names: u32,
    pub snap_before: u32,
    pub snap_after: u32,
}

impl LoopTables {
    /// Allocates, in this order: the `arg2` values, the per-VCPU statistics,
    /// the item masks (`masks`, `width`-byte items), the pointers to the
    /// item names and the two snapshot buffers (`width`-byte items).
    pub(super) fn new<'n>(
        d: &mut DataArena,
        vcpus: &[u32],
        masks: &[u8],
        names: impl ExactSizeIterator<Item = &'n str>,
        width: u32,
    ) -> R<Self> {
        let n = names.len() as u32;
        let arg2_table: Vec<u8> = vcpus.iter().flat_map(|v| v.to_le_bytes()).collect();
        let arg2_table = d.bytes(&arg2_table, 4);
        let stats = d.bytes(&initial_stats(vcpus.len() as u32), width);
        let item_mask = d.bytes(masks, width);
        let item_names = d.zeroed(4 * n as usize, 4);
        for (i, name) in names.enumerate() {
            let s = d.string(name);
            if !d.write(item_names + 4 * i as u32, &s.to_le_bytes()) {
                return Err(BuildError::Internal("item name table".into()));
            }
        }
        Ok(LoopTables {
            arg2_table,
            stats,
            item_mask,
            item_names,
            snap_before: d.zeroed((width * n) as usize, width),
            snap_after: d.zeroed((width * n) as usize, width),
        })
    }
}

/// The kernel's routines.
pub(super) struct Routines {
    pub serial_init: CodeLabel,
    pub putc: CodeLabel,
    pub puts: CodeLabel,
    pub puthex: CodeLabel,
    pub puthex2: CodeLabel,
    pub puthex64: CodeLabel,
    pub putdec: CodeLabel,
    pub putnl: CodeLabel,
    pub exit: CodeLabel,
    pub snap: CodeLabel,
    pub dump_mem: CodeLabel,
    pub exc_common: CodeLabel,
}

/// A kernel generator: the assembler (32- or 64-bit) and the data area
/// with the kernel's slots, tables and routine labels.
pub(super) struct Gen {
    pub a: CodeAssembler,
    pub d: DataArena,
    pub s: Slots,
    pub t: Tables,
    pub l: LoopTables,
    pub r: Routines,
    /// Labels that become symbols.
    pub exported: Vec<(String, CodeLabel)>,
    /// The 256 interrupt handlers, by vector.
    pub vectors: Vec<CodeLabel>,
    /// The NMI storm's slots ([`super::storm`]), once set up.
    pub storm: Option<super::storm::StormSlots>,
    /// Several host CPUs ([`super::smp`]).
    pub smp: Option<super::smp::SmpSlots>,
}

impl Gen {
    /// A generator emitting into `a`.
    pub(super) fn new(
        mut a: CodeAssembler,
        d: DataArena,
        s: Slots,
        t: Tables,
        l: LoopTables,
    ) -> Self {
        let r = Routines {
            serial_init: a.create_label(),
            putc: a.create_label(),
            puts: a.create_label(),
            puthex: a.create_label(),
            puthex2: a.create_label(),
            puthex64: a.create_label(),
            putdec: a.create_label(),
            putnl: a.create_label(),
            exit: a.create_label(),
            snap: a.create_label(),
            dump_mem: a.create_label(),
            exc_common: a.create_label(),
        };
        Gen {
            a,
            d,
            s,
            t,
            l,
            r,
            exported: Vec::new(),
            vectors: Vec::new(),
            storm: None,
            smp: None,
        }
    }

    /// The running CRC's slot: the shared page's with several CPUs.
    pub(super) fn crc_slot(&self) -> u32 {
        self.smp.as_ref().map_or(self.s.crc, |m| m.crc())
    }

    /// `true` for the 64-bit kernel.
    pub(super) fn bits64(&self) -> bool {
        self.a.bitness() == 64
    }

    /// Binds a label here.
    pub(super) fn mark(&mut self, l: &mut CodeLabel) -> R {
        self.a.set_label(l)?;
        self.a.zero_bytes()?;
        Ok(())
    }

    /// Binds a label here and records it as the symbol `name`.
    pub(super) fn export(&mut self, name: &str, mut l: CodeLabel) -> R<CodeLabel> {
        self.mark(&mut l)?;
        self.exported.push((name.to_owned(), l));
        Ok(l)
    }

    /// Pushes `reg`, or the 64-bit register it is the low half of.
    pub(super) fn push_gpr(&mut self, reg: AsmRegister32) -> R {
        if self.bits64() {
            self.a.push(wide(reg)?)?;
        } else {
            self.a.push(reg)?;
        }
        Ok(())
    }

    /// Pops `reg`, or the 64-bit register it is the low half of.
    pub(super) fn pop_gpr(&mut self, reg: AsmRegister32) -> R {
        if self.bits64() {
            self.a.pop(wide(reg)?)?;
        } else {
            self.a.pop(reg)?;
        }
        Ok(())
    }

    /// Saves `regs` on entry to a routine: `pushad` in 32-bit code, the
    /// 64-bit registers one by one in 64-bit code.
    fn save(&mut self, regs: &[AsmRegister32]) -> R {
        if !self.bits64() {
            self.a.pushad()?;
            return Ok(());
        }
        regs.iter().try_for_each(|&r| self.push_gpr(r))
    }

    /// Restores what [`Gen::save`] saved.
    fn restore(&mut self, regs: &[AsmRegister32]) -> R {
        if !self.bits64() {
            self.a.popad()?;
            return Ok(());
        }
        regs.iter().rev().try_for_each(|&r| self.pop_gpr(r))
    }

    /// The dword at EBX (RBX) + `off`.
    pub(super) fn bx(&self, off: u32) -> AsmMemoryOperand {
        if self.bits64() {
            dword_ptr(rbx + off)
        } else {
            dword_ptr(ebx + off)
        }
    }

    /// The LAPIC register at `off`, with the base in EBX (RBX).
    fn lapic(&self, off: u32) -> AsmMemoryOperand {
        self.bx(off)
    }

    /// Prints a constant text.
    pub(super) fn text(&mut self, s: &str) -> R {
        let addr = self.d.string(s);
        self.push_gpr(esi)?;
        self.a.mov(esi, addr)?;
        self.a.call(self.r.puts)?;
        self.pop_gpr(esi)
    }

    /// Calls `routine` with the dword at `addr` in EAX; preserves EAX (RAX).
    fn print_mem(&mut self, addr: u32, routine: CodeLabel) -> R {
        self.push_gpr(eax)?;
        self.a.mov(eax, dword_ptr(addr))?;
        self.a.call(routine)?;
        self.pop_gpr(eax)
    }

    /// Prints the dword at `addr` as 8 hex digits.
    pub(super) fn hex_mem(&mut self, addr: u32) -> R {
        self.print_mem(addr, self.r.puthex)
    }

    /// Prints the dword at `addr` in decimal.
    pub(super) fn dec_mem(&mut self, addr: u32) -> R {
        self.print_mem(addr, self.r.putdec)
    }

    /// Prints ` key=` and the dword at `addr` in hex.
    pub(super) fn field_hex(&mut self, key: &str, addr: u32) -> R {
        self.text(&format!(" {key}="))?;
        self.hex_mem(addr)
    }

    /// Prints ` key=` and the dword at `addr` in decimal.
    pub(super) fn field_dec(&mut self, key: &str, addr: u32) -> R {
        self.text(&format!(" {key}="))?;
        self.dec_mem(addr)
    }

    /// Prints ` key=` and the qword at `addr` as 16 hex digits.
    pub(super) fn field_hex64(&mut self, key: &str, addr: u32) -> R {
        if !self.bits64() {
            self.field_hex(key, addr + 4)?;
            return self.hex_mem(addr);
        }
        self.text(&format!(" {key}="))?;
        self.a.push(rax)?;
        self.a.mov(rax, qword_ptr(addr))?;
        self.a.call(self.r.puthex64)?;
        self.a.pop(rax)?;
        Ok(())
    }

    /// Prints ` key=` and the register-wide value at `addr` in hex (a dword
    /// in the 32-bit kernel, a qword in the 64-bit one).
    fn field_word(&mut self, key: &str, addr: u32) -> R {
        if self.bits64() {
            self.field_hex64(key, addr)
        } else {
            self.field_hex(key, addr)
        }
    }

    /// Records the loop phase.
    pub(super) fn phase(&mut self, p: Phase) -> R {
        self.a.mov(dword_ptr(self.s.phase), p.code())?;
        Ok(())
    }

    /// Exits through isa-debug-exit with `value`.
    pub(super) fn exit_with(&mut self, value: u32) -> R {
        self.a.mov(eax, value)?;
        self.a.jmp(self.r.exit)?;
        Ok(())
    }

    /// `if [features] & bit == 0 goto skip`.
    pub(super) fn unless_feature(&mut self, bit: u32, skip: CodeLabel) -> R {
        self.a.test(dword_ptr(self.s.features), bit)?;
        self.a.jz(skip)?;
        Ok(())
    }

    /// Emits a caller's hook into the loop.
    pub(super) fn run_hook(&mut self, hook: &mut HookFn) -> R {
        let (s, r) = (&self.s, &self.r);
        let mut ctx = HookCtx {
            bitness: self.a.bitness(),
            trip_slot: s.trip,
            vcpu_slot: s.vcpu,
            arg1_slot: s.arg1,
            arg2_slot: s.arg2,
            cookie_slot: s.cookie,
            ret_slot: s.ret,
            tsc_delta_slot: s.delta,
            hook_fail_slot: s.hook_fail,
            putc: r.putc,
            puts: r.puts,
            puthex: r.puthex,
            puthex64: r.puthex64,
            putdec: r.putdec,
            putnl: r.putnl,
            arena: &mut self.d,
        };
        hook(&mut self.a, &mut ctx)?;
        // Hooks may leave DF set or clobber anything else; the kernel relies on DF=0.
        self.a.cld()?;
        Ok(())
    }

    /// `wrmsr(msr, value)`. Clobbers EAX, ECX, EDX.
    pub(super) fn wrmsr_const(&mut self, msr: u32, value: u64) -> R {
        self.a.mov(ecx, msr)?;
        self.a.mov(eax, value as u32)?;
        self.a.mov(edx, (value >> 32) as u32)?;
        self.a.wrmsr()?;
        Ok(())
    }

    /// 64-bit kernel: loads FS and GS with the kernel data selector and sets
    /// the three base MSRs to the host's values. Clobbers EAX, ECX, EDX.
    pub(super) fn load_fs_gs(&mut self) -> R {
        self.a.mov(ax, u32::from(SEL64_DATA))?;
        self.a.mov(fs, ax)?;
        self.a.mov(gs, ax)?;
        self.wrmsr_const(MSR_FS_BASE, FS_BASE64)?;
        self.wrmsr_const(MSR_GS_BASE, GS_BASE64)?;
        self.wrmsr_const(MSR_KERNEL_GS_BASE, KERNEL_GS_BASE64)
    }

    /// Masks every line of the legacy 8259 PICs.
    pub(super) fn mask_pic(&mut self) -> R {
        self.a.mov(al, 0xffu32)?;
        self.a.mov(dx, 0x21u32)?;
        self.a.out(dx, al)?;
        self.a.mov(dx, 0xa1u32)?;
        self.a.out(dx, al)?;
        Ok(())
    }

    /// Sets EFER.NXE and EFER.SCE where the CPU has them. Clobbers EAX, ECX,
    /// EDX.
    pub(super) fn set_efer_bits(&mut self) -> R {
        self.a.mov(ecx, MSR_EFER)?;
        self.a.rdmsr()?;
        for (flag, bit) in [(FEATURE_NX, Efer::NXE), (FEATURE_SCE, Efer::SCE)] {
            let mut no = self.a.create_label();
            self.unless_feature(flag, no)?;
            self.a.or(eax, bit.bits() as u32)?;
            self.mark(&mut no)?;
        }
        self.a.wrmsr()?;
        Ok(())
    }

    /// Prints `HOST cr0=… cr3=… cr4=…` (the start of the `HOST` line).
    pub(super) fn host_crs(&mut self) -> R {
        self.text(&format!("{PREFIX}HOST cr0="))?;
        for (i, reg) in [cr0, cr3, cr4].into_iter().enumerate() {
            if i > 0 {
                self.text(if i == 1 { " cr3=" } else { " cr4=" })?;
            }
            if self.bits64() {
                self.a.mov(rax, reg)?;
            } else {
                self.a.mov(eax, reg)?;
            }
            self.a.call(self.r.puthex)?;
        }
        Ok(())
    }

    /// Prints ` sysenter_cs=` and the MSR (0 without SEP). Clobbers EAX,
    /// ECX, EDX.
    pub(super) fn field_sysenter_cs(&mut self) -> R {
        self.text(" sysenter_cs=")?;
        let mut sep_absent = self.a.create_label();
        let mut sep_done = self.a.create_label();
        self.unless_feature(FEATURE_SEP, sep_absent)?;
        self.a.mov(ecx, MSR_SYSENTER_CS)?;
        self.a.rdmsr()?;
        self.a.jmp(sep_done)?;
        self.mark(&mut sep_absent)?;
        self.a.xor(eax, eax)?;
        self.mark(&mut sep_done)?;
        self.a.call(self.r.puthex)?;
        Ok(())
    }

    // ------------------------------------------------------------------
    // Snapshot sources both kernels record the same way (into EAX, or RAX in
    // the 64-bit kernel).

    /// CR`n` (0, 2, 3, 4; also 8 in the 64-bit kernel).
    pub(super) fn load_cr(&mut self, n: u8) -> R {
        let reg = match n {
            0 => cr0,
            2 => cr2,
            3 => cr3,
            4 => cr4,
            8 if self.bits64() => cr8,
            _ => {
                return Err(BuildError::Internal(format!(
                    "snapshot of CR{n} is not supported"
                )))
            }
        };
        if self.bits64() {
            self.a.mov(rax, reg)?;
        } else {
            self.a.mov(eax, reg)?;
        }
        Ok(())
    }

    /// DR`n` (0–3, 6, 7).
    pub(super) fn load_dr(&mut self, n: u8) -> R {
        let reg = match n {
            0 => dr0,
            1 => dr1,
            2 => dr2,
            3 => dr3,
            6 => dr6,
            7 => dr7,
            _ => {
                return Err(BuildError::Internal(format!(
                    "snapshot of DR{n} is not supported"
                )))
            }
        };
        if self.bits64() {
            self.a.mov(rax, reg)?;
        } else {
            self.a.mov(eax, reg)?;
        }
        Ok(())
    }

    /// TR (`tr`) or LDTR, zero-extended.
    pub(super) fn load_tr_ldtr(&mut self, tr: bool) -> R {
        self.a.xor(eax, eax)?;
        if tr {
            self.a.str(ax)?;
        } else {
            self.a.sldt(ax)?;
        }
        Ok(())
    }

    /// The base (`base`) or the limit of the IDTR (`idt`) or the GDTR,
    /// stored through the scratch slot.
    pub(super) fn load_table_reg(&mut self, idt: bool, base: bool) -> R {
        let scratch = self.s.scratch;
        if idt {
            self.a.sidt(ptr(scratch))?;
        } else {
            self.a.sgdt(ptr(scratch))?;
        }
        if !base {
            self.a.movzx(eax, word_ptr(scratch))?;
        } else if self.bits64() {
            self.a.mov(rax, qword_ptr(scratch + 2))?;
        } else {
            self.a.mov(eax, dword_ptr(scratch + 2))?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Library routines (all preserve every register they do not return in).

    /// Emits `serial_init`, `putc`, `putnl`, `puts`, `puthex`, `puthex2`,
    /// `puthex64`, `putdec`, `exit` and `dump_mem`.
    pub(super) fn emit_library(&mut self) -> R {
        let bits64 = self.bits64();
        let l = self.r.serial_init;
        self.export("serial_init", l)?;
        self.push_gpr(eax)?;
        self.push_gpr(edx)?;
        for (port, value) in SERIAL_INIT {
            self.a.mov(dx, u32::from(COM1 + port))?;
            self.a.mov(al, u32::from(value))?;
            self.a.out(dx, al)?;
        }
        self.pop_gpr(edx)?;
        self.pop_gpr(eax)?;
        self.a.ret()?;

        // putc: AL.
        let l = self.r.putc;
        self.export("putc", l)?;
        self.push_gpr(edx)?;
        self.push_gpr(eax)?;
        super::smp::emit_putc_lock(self)?;
        self.a.mov(dx, u32::from(COM1 + 5))?;
        let mut wait = self.a.create_label();
        self.mark(&mut wait)?;
        self.a.in_(al, dx)?;
        self.a.test(al, 0x20)?;
        self.a.jz(wait)?;
        self.pop_gpr(eax)?;
        self.a.mov(dx, u32::from(COM1))?;
        self.a.out(dx, al)?;
        // crc = (crc >> 8) ^ table[(crc ^ AL) & 0xff]
        self.push_gpr(ecx)?;
        self.push_gpr(eax)?;
        let crc = self.crc_slot();
        self.a.movzx(ecx, al)?;
        self.a.xor(cl, byte_ptr(crc))?;
        self.a.mov(eax, dword_ptr(crc))?;
        self.a.shr(eax, 8)?;
        let entry = if bits64 {
            dword_ptr(rcx * 4 + self.s.crc_table)
        } else {
            dword_ptr(ecx * 4 + self.s.crc_table)
        };
        self.a.xor(eax, entry)?;
        self.a.mov(dword_ptr(crc), eax)?;
        self.pop_gpr(eax)?;
        super::smp::emit_putc_unlock(self)?;
        self.pop_gpr(ecx)?;
        self.pop_gpr(edx)?;
        self.a.ret()?;

        // putnl.
        let l = self.r.putnl;
        self.export("putnl", l)?;
        self.push_gpr(eax)?;
        self.a.mov(al, u32::from(b'\n'))?;
        self.a.call(self.r.putc)?;
        self.pop_gpr(eax)?;
        self.a.ret()?;

        // puts: ESI (RSI).
        let l = self.r.puts;
        self.export("puts", l)?;
        self.save(&[esi, eax])?;
        self.a.cld()?;
        let mut next = self.a.create_label();
        let mut done = self.a.create_label();
        self.mark(&mut next)?;
        self.a.lodsb()?;
        self.a.test(al, al)?;
        self.a.jz(done)?;
        self.a.call(self.r.putc)?;
        self.a.jmp(next)?;
        self.mark(&mut done)?;
        self.restore(&[esi, eax])?;
        self.a.ret()?;

        // puthex: EAX (8 digits); puthex2: AL (2); in 64-bit code also
        // puthex64: RAX (16).
        let mut hex = vec![
            ("puthex", 8u32, self.r.puthex),
            ("puthex2", 2, self.r.puthex2),
        ];
        if bits64 {
            hex.push(("puthex64", 16, self.r.puthex64));
        }
        for (name, digits, l) in hex {
            self.export(name, l)?;
            self.save(&[eax, ecx, edx])?;
            if bits64 {
                self.a.mov(rdx, rax)?;
            } else {
                self.a.mov(edx, eax)?;
            }
            if digits == 2 {
                self.a.shl(edx, 24)?;
            }
            self.a.mov(ecx, digits)?;
            let mut lp = self.a.create_label();
            self.mark(&mut lp)?;
            if digits == 16 {
                self.a.rol(rdx, 4)?;
            } else {
                self.a.rol(edx, 4)?;
            }
            self.a.mov(eax, edx)?;
            self.a.and(eax, 0xf)?;
            let digit = if bits64 {
                byte_ptr(rax + self.s.hexdigits)
            } else {
                byte_ptr(eax + self.s.hexdigits)
            };
            self.a.mov(al, digit)?;
            self.a.call(self.r.putc)?;
            self.a.dec(ecx)?;
            self.a.jnz(lp)?;
            self.restore(&[eax, ecx, edx])?;
            self.a.ret()?;
        }
        if !bits64 {
            // puthex64: EDX:EAX, 16 digits.
            let l = self.r.puthex64;
            self.export("puthex64", l)?;
            self.a.push(eax)?;
            self.a.mov(eax, edx)?;
            self.a.call(self.r.puthex)?;
            self.a.pop(eax)?;
            self.a.call(self.r.puthex)?;
            self.a.ret()?;
        }

        // putdec: EAX, unsigned decimal.
        let l = self.r.putdec;
        self.export("putdec", l)?;
        self.save(&[eax, ebx, ecx, edx])?;
        self.a.mov(ecx, 10u32)?;
        self.a.xor(ebx, ebx)?;
        let mut divide = self.a.create_label();
        let mut print = self.a.create_label();
        self.mark(&mut divide)?;
        self.a.xor(edx, edx)?;
        self.a.div(ecx)?;
        self.push_gpr(edx)?;
        self.a.inc(ebx)?;
        self.a.test(eax, eax)?;
        self.a.jnz(divide)?;
        self.mark(&mut print)?;
        self.pop_gpr(eax)?;
        self.a.add(al, u32::from(b'0'))?;
        self.a.call(self.r.putc)?;
        self.a.dec(ebx)?;
        self.a.jnz(print)?;
        self.restore(&[eax, ebx, ecx, edx])?;
        self.a.ret()?;

        // exit: the CRC line (once), EAX to isa-debug-exit, then halt forever.
        let l = self.r.exit;
        self.export("exit", l)?;
        let mut out = self.a.create_label();
        self.a.cmp(dword_ptr(self.s.exiting), 0)?;
        self.a.jne(out)?;
        self.a.mov(dword_ptr(self.s.exiting), 1u32)?;
        self.push_gpr(eax)?;
        super::smp::emit_exit_lock(self)?;
        self.a.mov(eax, dword_ptr(self.crc_slot()))?;
        self.a.not(eax)?;
        self.a.mov(dword_ptr(self.s.crc_final), eax)?;
        self.text(&format!("{PREFIX}CRC crc32="))?;
        self.hex_mem(self.s.crc_final)?;
        self.a.call(self.r.putnl)?;
        self.pop_gpr(eax)?;
        self.mark(&mut out)?;
        self.a.mov(dx, u32::from(DEBUG_EXIT_PORT))?;
        self.a.out(dx, eax)?;
        let mut halt = self.a.create_label();
        self.mark(&mut halt)?;
        self.a.cli()?;
        self.a.hlt()?;
        self.a.jmp(halt)?;

        // dump_mem: EBX (RBX) = address, ECX = length (> 0); 32 bytes per `H` line.
        let l = self.r.dump_mem;
        self.export("dump_mem", l)?;
        self.save(&[eax, ebx, ecx, edx])?;
        let mut row = self.a.create_label();
        let mut col = self.a.create_label();
        let mut last = self.a.create_label();
        self.mark(&mut row)?;
        self.text(&format!("{PREFIX}H "))?;
        self.a.mov(edx, 32u32)?;
        self.mark(&mut col)?;
        self.a.mov(al, byte_ptr(self.bx(0)))?;
        self.a.call(self.r.puthex2)?;
        if bits64 {
            self.a.inc(rbx)?;
        } else {
            self.a.inc(ebx)?;
        }
        self.a.dec(ecx)?;
        self.a.jz(last)?;
        self.a.dec(edx)?;
        self.a.jnz(col)?;
        self.a.call(self.r.putnl)?;
        self.a.jmp(row)?;
        self.mark(&mut last)?;
        self.a.call(self.r.putnl)?;
        self.restore(&[eax, ebx, ecx, edx])?;
        self.a.ret()?;
        Ok(())
    }

    /// Prints the dump regions (`DUMP`, `H` lines, `END`).
    pub(super) fn emit_dumps(&mut self, dumps: &[DumpRegion64], mode: HostMode) -> R {
        for d in dumps {
            self.text(&format!(
                "{PREFIX}DUMP addr={:08x} len={:08x} name={}\n",
                d.addr, d.len, d.name
            ))?;
            if self.bits64() {
                self.a.mov(rbx, d.addr)?;
            } else {
                self.a.mov(ebx, narrow("dump address", d.addr, mode)?)?;
            }
            self.a.mov(ecx, d.len)?;
            self.a.call(self.r.dump_mem)?;
            self.text(&format!("{PREFIX}END\n"))?;
        }
        Ok(())
    }

    /// The exception report, once the handler has saved the frame into the
    /// `exc_*` slots and switched to the exception stack: an `EXC` line (an
    /// `EXC2` line for an exception inside the handler), the dumps if the
    /// builder asks for them, and the exception exit code.
    pub(super) fn emit_exc_report(&mut self, b: &HostKernelBuilder) -> R {
        let mut nested = self.a.create_label();
        self.a.cmp(dword_ptr(self.s.in_exc), 0)?;
        self.a.jne(nested)?;
        self.a.mov(dword_ptr(self.s.in_exc), 1u32)?;
        self.text(&format!("{PREFIX}EXC vec="))?;
        self.a.mov(eax, dword_ptr(self.s.exc_vec))?;
        self.a.call(self.r.puthex2)?;
        self.field_hex("err", self.s.exc_err)?;
        self.field_word("eip", self.s.exc_ip)?;
        self.field_hex("cs", self.s.exc_cs)?;
        self.field_hex("eflags", self.s.exc_flags)?;
        self.text(" cr2=")?;
        if self.bits64() {
            self.a.mov(rax, cr2)?;
            self.a.call(self.r.puthex64)?;
        } else {
            self.a.mov(eax, cr2)?;
            self.a.call(self.r.puthex)?;
        }
        if let Some(slot) = self.s.exc_rsp {
            self.field_hex64("rsp", slot)?;
        }
        self.field_dec("trip", self.s.trip)?;
        self.field_dec("vcpu", self.s.vcpu)?;
        self.field_dec("phase", self.s.phase)?;
        self.a.call(self.r.putnl)?;
        if b.dump_on_exception {
            self.emit_dumps(&b.dumps, b.mode)?;
        }
        self.exit_with(EXIT_HOST_EXCEPTION)?;

        self.mark(&mut nested)?;
        self.text(&format!("{PREFIX}EXC2 vec="))?;
        self.a.mov(eax, dword_ptr(self.s.exc_vec))?;
        self.a.call(self.r.puthex2)?;
        self.field_hex("err", self.s.exc_err)?;
        self.field_word("eip", self.s.exc_ip)?;
        self.a.call(self.r.putnl)?;
        self.exit_with(EXIT_HOST_EXCEPTION)?;
        Ok(())
    }
}

/// The `BOOT` line after `mbeax=…`: trips, VCPUs, items, the entry
/// (`entry_digits` hex digits) and the builder's own fields, with the newline.
pub(super) fn boot_tail(
    b: &HostKernelBuilder,
    n_items: u32,
    entry: u64,
    entry_digits: usize,
) -> String {
    let mut s = format!(
        " trips={} vcpus={} items={n_items} entry={entry:0entry_digits$x}",
        b.trips,
        b.vcpus.len()
    );
    for (k, v) in &b.boot_fields {
        s.push_str(&format!(" {k}={v}"));
    }
    s.push('\n');
    s
}

/// Checks every feature in `required` with CPUID; for the first one
/// missing, prints its `NOCPU` line and exits with the failure code (the
/// exit routine adds the `CRC` line). Then the same for the first feature
/// in `forbidden` the CPU has, with its `CPUEXTRA` line. Clobbers EAX, EBX,
/// ECX, EDX.
pub(super) fn emit_cpu_check(g: &mut Gen, required: &[CpuFeature], forbidden: &[CpuFeature]) -> R {
    let checks = required
        .iter()
        .map(|f| (*f, true))
        .chain(forbidden.iter().map(|f| (*f, false)));
    for (f, want) in checks {
        let (leaf, reg, bit) = f.cpuid();
        let mut has = g.a.create_label();
        let mut lacks = g.a.create_label();
        // A leaf exists only up to the highest one of its range (leaf 1
        // always does).
        let top = leaf & 0x8000_0000;
        if top != 0 || leaf > 1 {
            g.a.mov(eax, top)?;
            g.a.cpuid()?;
            g.a.cmp(eax, leaf)?;
            g.a.jb(lacks)?;
        }
        g.a.mov(eax, leaf)?;
        g.a.xor(ecx, ecx)?;
        g.a.cpuid()?;
        let r = match reg {
            super::CpuidReg::Ebx => ebx,
            super::CpuidReg::Ecx => ecx,
            super::CpuidReg::Edx => edx,
        };
        g.a.test(r, 1u32 << bit)?;
        g.a.jnz(has)?;
        g.mark(&mut lacks)?;
        if want {
            g.text(&f.refusal_line())?;
            g.exit_with(EXIT_FAIL)?;
            g.mark(&mut has)?;
        } else {
            let mut ok = g.a.create_label();
            g.a.jmp(ok)?;
            g.mark(&mut has)?;
            g.text(&f.extra_line())?;
            g.exit_with(EXIT_FAIL)?;
            g.mark(&mut ok)?;
        }
    }
    Ok(())
}

/// Sets feature bits from CPUID: APIC, SEP, x2APIC (leaf 1), NX, SYSCALL or
/// long mode (leaf 0x8000_0001). Clobbers EAX, EBX, ECX, EDX.
pub(super) fn emit_cpuid_features(g: &mut Gen) -> R {
    let feat = g.s.features;
    g.a.mov(eax, 1u32)?;
    g.a.cpuid()?;
    for (reg, bit, flag) in [
        (edx, 1u32 << 9, FEATURE_APIC),
        (edx, 1 << 11, FEATURE_SEP),
        (ecx, CPUID1_ECX_X2APIC, FEATURE_X2APIC),
    ] {
        let mut no = g.a.create_label();
        g.a.test(reg, bit)?;
        g.a.jz(no)?;
        g.a.or(dword_ptr(feat), flag)?;
        g.mark(&mut no)?;
    }
    let mut no_ext = g.a.create_label();
    g.a.mov(eax, 0x8000_0000u32)?;
    g.a.cpuid()?;
    g.a.cmp(eax, 0x8000_0001u32)?;
    g.a.jb(no_ext)?;
    g.a.mov(eax, 0x8000_0001u32)?;
    g.a.cpuid()?;
    for (bits, flags) in [
        (1u32 << 20, FEATURE_NX | FEATURE_EFER),
        (1 << 29, FEATURE_EFER),
        // SCE only where CPUID shows SYSCALL in the current mode (Intel
        // hides it outside 64-bit mode but still accepts EFER.SCE): the
        // facts a switcher is relocated for say the same.
        (1 << 11, FEATURE_SCE | FEATURE_EFER),
    ] {
        let mut no = g.a.create_label();
        g.a.test(edx, bits)?;
        g.a.jz(no)?;
        g.a.or(dword_ptr(feat), flags)?;
        g.mark(&mut no)?;
    }
    g.mark(&mut no_ext)?;
    Ok(())
}

/// Enables the local APIC (SVR = 0x100 | [`SPURIOUS_VECTOR`]), records its
/// version, and programs [`LVT_SETUP`] — through the MMIO page, or, with
/// `x2apic`, after switching to x2APIC mode, through the x2APIC MSRs. Exits
/// with an `ERROR` line when the CPU has no APIC, the base is not
/// [`LAPIC_VIRT`], or x2APIC is asked for but absent. Clobbers EAX, EBX,
/// ECX, EDX.
pub(super) fn emit_apic_setup(g: &mut Gen, x2apic: bool) -> R {
    let feat = g.s.features;
    let mut have_apic = g.a.create_label();
    g.a.test(dword_ptr(feat), FEATURE_APIC)?;
    g.a.jnz(have_apic)?;
    g.text(&format!(
        "{PREFIX}ERROR no local APIC (CPUID.1:EDX.APIC=0)\n"
    ))?;
    g.exit_with(EXIT_FAIL)?;
    g.mark(&mut have_apic)?;
    if x2apic {
        let mut have_x2 = g.a.create_label();
        g.a.test(dword_ptr(feat), FEATURE_X2APIC)?;
        g.a.jnz(have_x2)?;
        g.text(&format!(
            "{PREFIX}ERROR x2APIC requested but CPUID.1:ECX.x2APIC (bit 21) is 0: \
             this CPU cannot run an x2APIC host (QEMU TCG emulates x2APIC from 9.0 on)\n"
        ))?;
        g.exit_with(EXIT_FAIL)?;
        g.mark(&mut have_x2)?;
    }
    g.a.mov(ecx, apic::APIC_BASE_MSR)?;
    g.a.rdmsr()?;
    g.a.or(eax, APIC_BASE_EN)?; // globally enabled
    g.a.wrmsr()?;
    g.a.mov(ebx, eax)?;
    g.a.and(ebx, 0xffff_f000u32)?;
    g.a.cmp(ebx, LAPIC_VIRT)?;
    let mut base_ok = g.a.create_label();
    g.a.je(base_ok)?;
    g.text(&format!(
        "{PREFIX}ERROR the APIC base MSR does not point at {LAPIC_VIRT:#010x}\n"
    ))?;
    g.exit_with(EXIT_FAIL)?;
    g.mark(&mut base_ok)?;

    if !x2apic {
        g.a.mov(ebx, LAPIC_VIRT)?;
        let svr = g.lapic(apic::reg::SVR);
        g.a.mov(eax, svr)?;
        g.a.and(eax, !0x1ffu32)?;
        g.a.or(eax, 0x100u32 | u32::from(SPURIOUS_VECTOR))?;
        g.a.mov(svr, eax)?;
        let ver = g.lapic(apic::reg::VERSION);
        g.a.mov(eax, ver)?;
        let slot = g.s.apic_ver;
        g.a.mov(dword_ptr(slot), eax)?;
        for (off, value) in LVT_SETUP {
            let lvt = g.lapic(off);
            g.a.mov(lvt, value)?;
        }
        return Ok(());
    }

    // xAPIC -> x2APIC (EN is already set: EN=0, EXTD=1 is invalid).
    g.a.or(eax, APIC_BASE_EXTD)?;
    g.a.wrmsr()?;
    g.a.rdmsr()?;
    let mut extd_ok = g.a.create_label();
    g.a.test(eax, APIC_BASE_EXTD)?;
    g.a.jnz(extd_ok)?;
    g.text(&format!(
        "{PREFIX}ERROR x2APIC: IA32_APIC_BASE.EXTD did not stick after wrmsr\n"
    ))?;
    g.exit_with(EXIT_FAIL)?;
    g.mark(&mut extd_ok)?;
    g.a.or(dword_ptr(feat), FEATURE_X2APIC_ON)?;
    g.a.mov(ecx, apic::x2apic_msr(apic::reg::SVR))?;
    g.a.rdmsr()?;
    g.a.and(eax, !0x1ffu32)?;
    g.a.or(eax, 0x100u32 | u32::from(SPURIOUS_VECTOR))?;
    g.a.wrmsr()?;
    g.a.mov(ecx, apic::x2apic_msr(apic::reg::VERSION))?;
    g.a.rdmsr()?;
    let slot = g.s.apic_ver;
    g.a.mov(dword_ptr(slot), eax)?;
    for (off, value) in LVT_SETUP {
        g.a.mov(ecx, apic::x2apic_msr(off))?;
        g.a.mov(eax, value)?;
        g.a.xor(edx, edx)?;
        g.a.wrmsr()?;
    }
    Ok(())
}

/// Prints the `APIC` line (base MSR, version, LVTs, SVR), reading the
/// registers the way [`emit_apic_setup`] programmed them. Clobbers EAX, EBX,
/// ECX, EDX.
pub(super) fn emit_apic_line(g: &mut Gen, x2apic: bool) -> R {
    let (puthex, putnl) = (g.r.puthex, g.r.putnl);
    g.text(&format!("{PREFIX}APIC base="))?;
    g.a.mov(ecx, apic::APIC_BASE_MSR)?;
    g.a.rdmsr()?;
    g.a.call(puthex)?;
    g.text(" ver=")?;
    let slot = g.s.apic_ver;
    g.a.mov(eax, dword_ptr(slot))?;
    g.a.call(puthex)?;
    g.a.mov(ebx, LAPIC_VIRT)?;
    for (key, off) in APIC_LINE {
        g.text(&format!(" {key}="))?;
        if x2apic {
            g.a.mov(ecx, apic::x2apic_msr(off))?;
            g.a.rdmsr()?;
        } else {
            let reg = g.lapic(off);
            g.a.mov(eax, reg)?;
        }
        g.a.call(puthex)?;
    }
    g.a.call(putnl)?;
    Ok(())
}

/// The pieces of a kernel image.
struct ImageParts<'t> {
    /// The boot stub (at [`STUB_ADDR`]).
    pub stub: Vec<u8>,
    /// The FS page (at [`FS_PAGE_PHYS`]).
    pub fs_page: Vec<u8>,
    /// The host page tables (at [`TABLES_BASE`]).
    pub tables: &'t [u8],
    /// Where the data area starts.
    pub data_base: u32,
    /// The data area.
    pub data: Vec<u8>,
    /// Where the code starts.
    pub code_base: u32,
    /// The code.
    pub code: Vec<u8>,
    /// The caller's blobs: name, physical address, bytes.
    pub blobs: Vec<(String, u32, Vec<u8>)>,
}

/// Places the kernel's parts (plus the magic page) and the caller's blobs;
/// returns the image and its physical layout, sorted by address.
fn build_image(p: ImageParts<'_>) -> R<(Vec<u8>, Vec<LayoutRegion>)> {
    let mut magic = vec![0u8; PAGE as usize];
    magic[..4].copy_from_slice(&MAGIC_VALUE.to_le_bytes());
    let len = |b: &[u8]| u32::try_from(b.len()).unwrap_or(u32::MAX);
    let region = |name: &str, start: u32, end: u32| LayoutRegion {
        name: name.to_owned(),
        start,
        end,
    };
    let mut layout = vec![
        region("multiboot header", crate::image::LOAD_ADDR, STUB_ADDR),
        region("boot stub", STUB_ADDR, STUB_ADDR + len(&p.stub)),
        region("magic page", MAGIC_PAGE_PHYS, MAGIC_PAGE_PHYS + PAGE),
        region("FS page", FS_PAGE_PHYS, FS_PAGE_PHYS + PAGE),
        region("host page tables", TABLES_BASE, TABLES_BASE + len(p.tables)),
        region("kernel data", p.data_base, p.data_base + len(&p.data)),
        region("kernel code", p.code_base, p.code_base + len(&p.code)),
    ];
    let mut img = ImageBuilder::new();
    img.place("boot stub", STUB_ADDR, p.stub)?;
    img.place("magic page", MAGIC_PAGE_PHYS, magic)?;
    img.place("FS page", FS_PAGE_PHYS, p.fs_page)?;
    img.place("host page tables", TABLES_BASE, p.tables.to_vec())?;
    img.place("kernel data", p.data_base, p.data)?;
    img.place("kernel code", p.code_base, p.code)?;
    for (name, phys, bytes) in p.blobs {
        let end = phys.saturating_add(len(&bytes));
        img.place(name.clone(), phys, bytes)?;
        layout.push(region(&name, phys, end));
    }
    layout.sort_by_key(|r| r.start);
    Ok((img.build(STUB_ADDR)?, layout))
}

/// Stores the cookie (EAX) at `addr`, plus the VCPU index times
/// [`HostKernelBuilder::cookie_stride`] when that is set. Clobbers ECX/RCX
/// and EDX/RDX.
fn emit_cookie_store(g: &mut Gen, b: &HostKernelBuilder, addr: u64) -> R {
    let stride = b.cookie_stride;
    let n_vcpus = u64::try_from(b.vcpus.len()).unwrap_or(u64::MAX);
    let last = u64::from(stride)
        .checked_mul(n_vcpus.saturating_sub(1))
        .and_then(|span| addr.checked_add(span))
        .ok_or(BuildError::TooWide {
            what: "last cookie address",
            value: addr,
            mode: b.mode,
        })?;
    if g.bits64() {
        g.a.mov(rcx, addr)?;
        if stride != 0 {
            g.a.mov(edx, dword_ptr(g.s.vcpu))?;
            g.a.imul_3(edx, edx, stride)?;
            g.a.add(rcx, rdx)?;
        }
        g.a.mov(dword_ptr(rcx), eax)?;
    } else if stride != 0 {
        narrow("last cookie address", last, b.mode)?;
        g.a.mov(ecx, dword_ptr(g.s.vcpu))?;
        g.a.imul_3(ecx, ecx, stride)?;
        g.a.mov(
            dword_ptr(ecx + narrow("cookie address", addr, b.mode)?),
            eax,
        )?;
    } else {
        g.a.mov(dword_ptr(narrow("cookie address", addr, b.mode)?), eax)?;
    }
    Ok(())
}

/// The call loop, the summary and the verdict. `emit_call` emits the
/// kernel's own part of each iteration: the register patterns, the first
/// snapshot, the timed call, the second snapshot, the return value into
/// the `ret` slot and the TSC delta into the `delta` slot.
pub(super) fn emit_loop(
    g: &mut Gen,
    b: &mut HostKernelBuilder,
    n_items: u32,
    emit_call: &mut dyn FnMut(&mut Gen) -> R,
) -> R {
    let bits64 = g.bits64();
    let mode = b.mode;
    let n_vcpus = b.vcpus.len() as u32;
    let trip_loop = g.a.create_label();
    let vcpu_loop = g.a.create_label();
    let done = g.a.create_label();
    super::smp::mark_loop_start(g)?;
    g.a.mov(dword_ptr(g.s.trip), 0u32)?;
    g.export("trip_loop", trip_loop)?;
    super::smp::emit_first_vcpu(g)?;
    g.export("vcpu_loop", vcpu_loop)?;

    // Per-call state.
    g.phase(Phase::PreHook)?;
    g.a.mov(eax, dword_ptr(g.s.vcpu))?;
    let arg2 = if bits64 {
        dword_ptr(rax * 4 + g.l.arg2_table)
    } else {
        dword_ptr(eax * 4 + g.l.arg2_table)
    };
    g.a.mov(eax, arg2)?;
    g.a.mov(dword_ptr(g.s.arg2), eax)?;
    if bits64 {
        g.a.mov(rax, b.arg1)?;
        g.a.mov(qword_ptr(g.s.arg1), rax)?;
    } else {
        g.a.mov(dword_ptr(g.s.arg1), narrow("arg1", b.arg1, mode)?)?;
    }
    g.a.mov(eax, dword_ptr(g.s.trip))?;
    g.a.imul_3(eax, eax, 0x9e37_79b9u32)?;
    g.a.mov(ecx, dword_ptr(g.s.vcpu))?;
    g.a.imul_3(ecx, ecx, 0x85eb_ca6bu32)?;
    g.a.xor(eax, ecx)?;
    g.a.xor(eax, COOKIE_SEED)?;
    g.a.mov(dword_ptr(g.s.cookie), eax)?;
    if let Some(addr) = b.cookie_addr {
        emit_cookie_store(g, b, addr)?;
    }
    for slot in [
        g.s.hook_fail,
        g.s.iter_mism,
        g.s.iter_failed,
        g.s.ret,
        g.s.delta,
    ] {
        g.a.mov(dword_ptr(slot), 0u32)?;
    }

    // (a) pre-call hook (in the 64-bit kernel RSP is the 16-byte aligned
    // stack top here).
    if let Some(hook) = b.pre_hook.as_mut() {
        let l = g.a.create_label();
        g.export("pre_hook", l)?;
        g.run_hook(hook)?;
    }

    // (b), (c): patterns, snapshot, the call, snapshot.
    emit_call(g)?;

    // (d) compare the snapshots (dword items, or qword items in the 64-bit
    // kernel; ECX is the index).
    let limit = b.max_report_lines;
    let item = |table: u32| {
        if bits64 {
            qword_ptr(rcx * 8 + table)
        } else {
            dword_ptr(ecx * 4 + table)
        }
    };
    let mut cmp_loop = g.a.create_label();
    let mut cmp_next = g.a.create_label();
    g.a.xor(ecx, ecx)?;
    g.mark(&mut cmp_loop)?;
    if bits64 {
        g.a.mov(rax, item(g.l.snap_before))?;
        g.a.xor(rax, item(g.l.snap_after))?;
        g.a.and(rax, item(g.l.item_mask))?;
    } else {
        g.a.mov(eax, item(g.l.snap_before))?;
        g.a.xor(eax, item(g.l.snap_after))?;
        g.a.and(eax, item(g.l.item_mask))?;
    }
    g.a.jz(cmp_next)?;
    g.a.inc(dword_ptr(g.s.iter_mism))?;
    g.a.cmp(dword_ptr(g.s.report_lines), limit)?;
    g.a.jae(cmp_next)?;
    g.a.inc(dword_ptr(g.s.report_lines))?;
    g.text(&format!("{PREFIX}MISMATCH"))?;
    g.field_dec("trip", g.s.trip)?;
    g.field_dec("vcpu", g.s.vcpu)?;
    g.text(" idx=")?;
    g.a.mov(eax, ecx)?;
    g.a.call(g.r.putdec)?;
    g.text(" name=")?;
    let name = if bits64 {
        dword_ptr(rcx * 4 + g.l.item_names)
    } else {
        dword_ptr(ecx * 4 + g.l.item_names)
    };
    g.push_gpr(esi)?;
    g.a.mov(esi, name)?;
    g.a.call(g.r.puts)?;
    g.pop_gpr(esi)?;
    for (key, table) in [(" before=", g.l.snap_before), (" after=", g.l.snap_after)] {
        g.text(key)?;
        if bits64 {
            g.a.mov(rax, item(table))?;
            g.a.call(g.r.puthex64)?;
        } else {
            g.a.mov(eax, item(table))?;
            g.a.call(g.r.puthex)?;
        }
    }
    g.a.call(g.r.putnl)?;
    g.mark(&mut cmp_next)?;
    g.a.inc(ecx)?;
    g.a.cmp(ecx, n_items)?;
    g.a.jb(cmp_loop)?;

    // (e) the return value (EAX: in the 64-bit kernel the upper half of RAX
    // is undefined for a u32).
    let check = match &mut b.expected {
        Expected::Any => false,
        Expected::Value(v) => {
            g.a.mov(eax, *v)?;
            true
        }
        Expected::CookieXor(k) => {
            g.a.mov(eax, dword_ptr(g.s.cookie))?;
            g.a.xor(eax, *k)?;
            true
        }
        Expected::Code(hook) => {
            g.run_hook(hook)?;
            true
        }
    };
    // Per-VCPU statistics record in EBX (RBX) from here on.
    let mut ret_ok = g.a.create_label();
    if check {
        g.a.mov(dword_ptr(g.s.want), eax)?;
        g.a.cmp(eax, dword_ptr(g.s.ret))?;
        g.a.je(ret_ok)?;
        g.a.mov(eax, dword_ptr(g.s.vcpu))?;
        g.a.imul_3(ebx, eax, STAT_SIZE)?;
        g.a.inc(g.bx(g.l.stats + STAT_RETFAIL))?;
        g.a.inc(dword_ptr(g.s.retfails))?;
        g.a.mov(dword_ptr(g.s.iter_failed), 1u32)?;
        g.a.cmp(dword_ptr(g.s.report_lines), limit)?;
        g.a.jae(ret_ok)?;
        g.a.inc(dword_ptr(g.s.report_lines))?;
        g.text(&format!("{PREFIX}RETFAIL"))?;
        g.field_dec("trip", g.s.trip)?;
        g.field_dec("vcpu", g.s.vcpu)?;
        g.field_hex("got", g.s.ret)?;
        g.field_hex("want", g.s.want)?;
        g.a.call(g.r.putnl)?;
    }
    g.mark(&mut ret_ok)?;

    // (f) post-call hook.
    if let Some(hook) = b.post_hook.as_mut() {
        g.phase(Phase::PostHook)?;
        let l = g.a.create_label();
        g.export("post_hook", l)?;
        g.run_hook(hook)?;
    }
    g.phase(Phase::Check)?;

    // Statistics.
    g.a.mov(eax, dword_ptr(g.s.vcpu))?;
    g.a.imul_3(ebx, eax, STAT_SIZE)?;
    g.a.add(ebx, g.l.stats)?;
    let mut hook_ok = g.a.create_label();
    g.a.cmp(dword_ptr(g.s.hook_fail), 0)?;
    g.a.je(hook_ok)?;
    g.a.inc(g.bx(STAT_HOOKFAIL))?;
    g.a.inc(dword_ptr(g.s.hookfails))?;
    g.a.mov(dword_ptr(g.s.iter_failed), 1u32)?;
    g.a.cmp(dword_ptr(g.s.report_lines), limit)?;
    g.a.jae(hook_ok)?;
    g.a.inc(dword_ptr(g.s.report_lines))?;
    g.text(&format!("{PREFIX}HOOKFAIL"))?;
    g.field_dec("trip", g.s.trip)?;
    g.field_dec("vcpu", g.s.vcpu)?;
    g.field_hex("code", g.s.hook_fail)?;
    g.a.call(g.r.putnl)?;
    g.mark(&mut hook_ok)?;
    let mut mism_ok = g.a.create_label();
    g.a.cmp(dword_ptr(g.s.iter_mism), 0)?;
    g.a.je(mism_ok)?;
    g.a.inc(g.bx(STAT_MISM))?;
    g.a.inc(dword_ptr(g.s.mism))?;
    g.a.mov(dword_ptr(g.s.iter_failed), 1u32)?;
    g.mark(&mut mism_ok)?;
    g.a.inc(g.bx(STAT_CALLS))?;
    g.a.inc(dword_ptr(g.s.calls))?;
    g.a.mov(eax, dword_ptr(g.s.delta))?;
    for (min, max, sum) in [
        (g.bx(STAT_MIN), g.bx(STAT_MAX), g.bx(STAT_SUM)),
        (
            dword_ptr(g.s.tsc_min),
            dword_ptr(g.s.tsc_max),
            dword_ptr(g.s.tsc_sum),
        ),
    ] {
        let mut not_min = g.a.create_label();
        let mut not_max = g.a.create_label();
        g.a.cmp(min, eax)?;
        g.a.jbe(not_min)?;
        g.a.mov(min, eax)?;
        g.mark(&mut not_min)?;
        g.a.cmp(max, eax)?;
        g.a.jae(not_max)?;
        g.a.mov(max, eax)?;
        g.mark(&mut not_max)?;
        g.a.add(sum, eax)?;
        g.a.adc(sum + 4, 0)?;
    }
    for (trip, off) in [(0u32, STAT_FIRST), (1, STAT_SECOND)] {
        let mut skip = g.a.create_label();
        g.a.cmp(dword_ptr(g.s.trip), trip)?;
        g.a.jne(skip)?;
        g.a.mov(g.bx(off), eax)?;
        g.mark(&mut skip)?;
    }
    super::storm::emit_after_call(g)?;
    if b.trace_trips > 0 {
        let mut skip = g.a.create_label();
        g.a.cmp(dword_ptr(g.s.trip), b.trace_trips)?;
        g.a.jae(skip)?;
        g.text(&format!("{PREFIX}TRIP"))?;
        g.field_dec("trip", g.s.trip)?;
        g.field_dec("vcpu", g.s.vcpu)?;
        g.field_hex("ret", g.s.ret)?;
        g.field_dec("tsc", g.s.delta)?;
        g.a.call(g.r.putnl)?;
        g.mark(&mut skip)?;
    }
    // FS (and in the 64-bit kernel GS and the base MSRs) back to the
    // host's values for the next call.
    if bits64 {
        g.load_fs_gs()?;
    } else {
        g.a.mov(ax, u32::from(SEL_LDT_FS))?;
        g.a.mov(fs, ax)?;
    }
    if b.stop_on_failure {
        g.a.cmp(dword_ptr(g.s.iter_failed), 0)?;
        g.a.jne(done)?;
    }
    super::smp::emit_next_vcpu(g)?;
    g.a.cmp(dword_ptr(g.s.vcpu), n_vcpus)?;
    g.a.jb(vcpu_loop)?;
    g.a.mov(eax, dword_ptr(g.s.trip))?;
    g.a.inc(eax)?;
    g.a.mov(dword_ptr(g.s.trip), eax)?;
    g.a.mov(dword_ptr(g.s.trips_done), eax)?;
    g.a.cmp(eax, b.trips)?;
    g.a.jb(trip_loop)?;

    // ---- summary -------------------------------------------------------------------
    g.export("summary", done)?;
    g.phase(Phase::Summary)?;
    super::storm::emit_stop(g)?;
    for (i, arg2) in b.vcpus.clone().into_iter().enumerate() {
        let rec = g.l.stats + STAT_SIZE * i as u32;
        let other_cpu = super::smp::emit_vcpu_guard(g, i as u32)?;
        g.text(&format!("{PREFIX}VCPU vcpu={i} arg2={arg2:08x}"))?;
        g.field_dec("calls", rec + STAT_CALLS)?;
        g.field_dec("mismatches", rec + STAT_MISM)?;
        g.field_dec("retfails", rec + STAT_RETFAIL)?;
        g.field_dec("hookfails", rec + STAT_HOOKFAIL)?;
        g.field_dec("tsc_min", rec + STAT_MIN)?;
        g.field_dec("tsc_max", rec + STAT_MAX)?;
        g.field_hex64("tsc_sum", rec + STAT_SUM)?;
        g.field_dec("tsc_first", rec + STAT_FIRST)?;
        g.field_dec("tsc_second", rec + STAT_SECOND)?;
        g.a.call(g.r.putnl)?;
        if let Some(mut l) = other_cpu {
            g.mark(&mut l)?;
        }
    }
    super::smp::emit_merge(g, b.deadlines, b.storm)?;
    g.text(&format!("{PREFIX}SUMMARY"))?;
    g.field_dec("trips", g.s.trips_done)?;
    g.field_dec("calls", g.s.calls)?;
    g.field_dec("mismatches", g.s.mism)?;
    g.field_dec("retfails", g.s.retfails)?;
    g.field_dec("hookfails", g.s.hookfails)?;
    g.field_dec("nmis", g.s.nmi_count)?;
    g.field_dec("spurious", g.s.spurious)?;
    g.field_dec("tsc_min", g.s.tsc_min)?;
    g.field_dec("tsc_max", g.s.tsc_max)?;
    g.field_hex64("tsc_sum", g.s.tsc_sum)?;
    g.a.call(g.r.putnl)?;
    g.text(&format!("{PREFIX}NMI count="))?;
    g.dec_mem(g.s.nmi_count)?;
    g.a.call(g.r.putnl)?;
    g.emit_dumps(&b.dumps, mode)?;

    // Verdict.
    let fail = g.a.create_label();
    g.a.mov(eax, dword_ptr(g.s.mism))?;
    g.a.or(eax, dword_ptr(g.s.retfails))?;
    g.a.or(eax, dword_ptr(g.s.hookfails))?;
    if !b.allow_nmis {
        g.a.or(eax, dword_ptr(g.s.nmi_count))?;
    }
    g.a.jnz(fail)?;
    g.text(&format!("{PREFIX}RESULT PASS\n"))?;
    g.exit_with(EXIT_PASS)?;
    g.export("fail", fail)?;
    g.text(&format!("{PREFIX}RESULT FAIL\n"))?;
    g.exit_with(EXIT_FAIL)?;
    Ok(())
}

/// The assembled kernel code.
pub(super) struct Code {
    /// Where the code starts (the first page after the data area).
    pub base: u32,
    /// The code.
    pub bytes: Vec<u8>,
    /// The exported labels' addresses.
    pub symbols: BTreeMap<String, u32>,
    /// The interrupt handlers' addresses, by vector.
    pub vectors: Vec<u64>,
}

impl Code {
    /// One past the last byte of code.
    pub(super) fn end(&self) -> u32 {
        self.base + self.bytes.len() as u32
    }
}

impl Gen {
    /// Assembles the code at the first page after the data area; it must
    /// end below `identity_limit`.
    pub(super) fn assemble(&mut self, identity_limit: u32) -> R<Code> {
        let base = page_align(self.d.end());
        let result = self.a.assemble_options(
            u64::from(base),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?;
        let mut symbols = BTreeMap::new();
        for (name, l) in &self.exported {
            symbols.insert(name.clone(), result.label_ip(l)? as u32);
        }
        let vectors = self
            .vectors
            .iter()
            .map(|l| result.label_ip(l))
            .collect::<Result<Vec<_>, _>>()?;
        let code = Code {
            base,
            bytes: result.inner.code_buffer,
            symbols,
            vectors,
        };
        if code.end() > identity_limit {
            return Err(BuildError::KernelTooLarge {
                end: code.end(),
                limit: identity_limit,
            });
        }
        Ok(code)
    }
}

/// Places the kernel (boot stub, FS page, page tables, data, code) and the
/// caller's blobs into an image, and describes it.
pub(super) fn finish(
    g: Gen,
    mut b: HostKernelBuilder,
    code: Code,
    stub: Vec<u8>,
    fs_page: Vec<u8>,
    tables: PageTables,
    items: Vec<String>,
) -> R<Testbed> {
    let code_end = code.end();
    let (image, layout) = build_image(ImageParts {
        stub,
        fs_page,
        tables: &tables.bytes,
        data_base: g.d.base(),
        data: g.d.as_slice().to_vec(),
        code_base: code.base,
        code: code.bytes,
        blobs: std::mem::take(&mut b.blobs),
    })?;

    let mut symbols = code.symbols;
    symbols.insert("entry".into(), STUB_ADDR);
    let (s, t, l) = (&g.s, &g.t, &g.l);
    for (name, addr) in [
        ("gdt", t.gdt),
        ("gdtr", t.gdtr),
        ("idt", t.idt),
        ("idtr", t.idtr),
        ("tss", t.tss),
        ("ldt", t.ldt),
        ("magic_page", MAGIC_PAGE_PHYS),
        ("fs_page", FS_PAGE_PHYS),
        ("page_tables", TABLES_BASE),
        ("arg2_table", l.arg2_table),
        ("vcpu_stats", l.stats),
        ("item_mask", l.item_mask),
        ("item_names", l.item_names),
        ("snap_before", l.snap_before),
        ("snap_after", l.snap_after),
        ("stack_top", t.stack_top),
        ("exc_stack_top", t.exc_stack_top),
        ("mb_eax", s.mb_eax),
        ("mb_ebx", s.mb_ebx),
        ("phase", s.phase),
        ("features", s.features),
        ("trip", s.trip),
        ("vcpu", s.vcpu),
        ("arg1", s.arg1),
        ("arg2", s.arg2),
        ("cookie", s.cookie),
        ("ret", s.ret),
        ("hook_fail", s.hook_fail),
        ("tsc_delta", s.delta),
        ("nmi_count", s.nmi_count),
        ("spurious_count", s.spurious),
    ] {
        symbols.insert(name.into(), addr);
    }
    if let Some(top) = t.nmi_stack_top {
        symbols.insert("nmi_stack_top".into(), top);
    }

    let addrs = KernelAddrs {
        entry: STUB_ADDR,
        code: code.base,
        code_end,
        cr3: tables.cr3,
        gdt: t.gdt,
        gdt_limit: t.gdt_limit,
        idt: t.idt,
        tss: t.tss,
        ldt: t.ldt,
        magic_page: MAGIC_PAGE_PHYS,
        fs_page: FS_PAGE_PHYS,
        trip: s.trip,
        vcpu: s.vcpu,
        arg1: s.arg1,
        arg2: s.arg2,
        cookie: s.cookie,
        ret: s.ret,
        hook_fail: s.hook_fail,
        nmi_count: s.nmi_count,
        snap_before: l.snap_before,
        snap_after: l.snap_after,
        stack_top: t.stack_top,
        kernel_end: code_end,
    };
    let required_cpu = b.required_cpu();
    let forbidden_cpu = b.forbidden_cpu();
    Ok(Testbed {
        required_cpu,
        forbidden_cpu,
        trace_trips: b.trace_trips,
        max_report_lines: b.max_report_lines,
        dumps: b.dumps.clone(),
        boot_fields: b.boot_fields.clone(),
        mode: b.mode,
        image,
        symbols,
        layout,
        addrs,
        items,
        page_tables: tables,
        trips: b.trips,
        cpus: b.cpus,
        vcpus: b.vcpus,
    })
}
