//! Code generation for the AMD64 host kernel: a 32-bit boot stub that turns
//! on long mode, and the 64-bit kernel (descriptor tables, environment,
//! the call loop with 64-bit snapshots, exception handlers).

use std::collections::BTreeMap;

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, Instruction};

use cpum::regs::{Cr0, Cr4, Efer, MSR_EFER, MSR_SYSENTER_CS};

use super::common::{
    build_image, emit_apic_line, emit_apic_setup, emit_cpuid_features, Emitter, ImageParts, R,
};
use super::emit::{
    descriptor, has_error_code, initial_stats, COM1, EXC_STACK_SIZE, SERIAL_INIT, STACK_SIZE,
    STAT_CALLS, STAT_FIRST, STAT_HOOKFAIL, STAT_MAX, STAT_MIN, STAT_MISM, STAT_RETFAIL,
    STAT_SECOND, STAT_SIZE, STAT_SUM,
};
use super::items::{Seg, SnapItem64, SnapSource64};
use super::{
    page_align, BuildError, DataArena, DumpRegion64, Expected, HookCtx, HookFn, HostKernelBuilder,
    KernelAddrs, Testbed, FEATURE_NX, FEATURE_SCE, FEATURE_SEP, FS_BASE64, FS_MAGIC, FS_PAGE_PHYS,
    GS_BASE64, GS_MAGIC, GS_MAGIC_OFF, KERNEL_GS_BASE64, LSTAR_VALUE, MAGIC_PAGE_PHYS, MAGIC_VIRT,
    MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_SFMASK, MSR_STAR, PATTERN_R12,
    PATTERN_R13, PATTERN_R14, PATTERN_R15, PATTERN_RBP, PATTERN_RBX, SEL64_CODE, SEL64_CODE32,
    SEL64_DATA, SEL64_LDT, SEL64_TSS, SFMASK_VALUE, SPURIOUS_VECTOR, STAR_VALUE, STUB_ADDR,
    TABLES_BASE,
};
use crate::paging::PAGE;
use crate::qemu::{DEBUG_EXIT_PORT, EXIT_FAIL, EXIT_HOST_EXCEPTION, EXIT_PASS};
use crate::transcript::{Phase, PREFIX};

/// Size of the NMI stack (IST2).
const NMI_STACK_SIZE: usize = 0x1000;
/// IST index of the exception stack.
const IST_EXC: u8 = 1;
/// IST index of the NMI stack.
const IST_NMI: u8 = 2;
/// 64-bit TSS field offsets (SDM Vol. 3A §8.7).
const TSS64_RSP0: usize = 4;
/// First IST slot; IST n is at `TSS64_IST1 + 8 * (n - 1)`.
const TSS64_IST1: usize = 36;
/// I/O map base field.
const TSS64_IOMAP: usize = 102;
/// Size of the 64-bit TSS.
const TSS64_SIZE: usize = 104;
/// CPUID.8000_0001:EDX.LM.
const CPUID_LM: u32 = 1 << 29;

/// A 64-bit interrupt gate (SDM Vol. 3A §6.14.1).
fn interrupt_gate64(handler: u64, selector: u16, ist: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&selector.to_le_bytes());
    g[4] = ist & 7;
    g[5] = 0x8e;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// A 16-byte system-segment descriptor (TSS 0x89, LDT 0x82; SDM Vol. 3A §8.2.3).
fn system_descriptor64(base: u64, limit: u32, access: u8) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&descriptor(base as u32, limit, access, 0).to_le_bytes());
    d[8..12].copy_from_slice(&((base >> 32) as u32).to_le_bytes());
    d
}

/// Registers the snapshot routine saves, in push order.
const SAVED: [AsmRegister64; 15] = [
    rax, rcx, rdx, rbx, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];
/// Frame offsets of the snapshot routine (after its pushes).
const SNAP_RFLAGS: i32 = 8 * SAVED.len() as i32;
const SNAP_BUFFER: i32 = SNAP_RFLAGS + 16;
const SNAP_ADJUST: i32 = SNAP_BUFFER + 8;
const SNAP_CALLER: i32 = SNAP_ADJUST + 8;

/// Offset of a saved register in the snapshot frame.
fn saved_off(reg: AsmRegister64) -> i32 {
    let i = SAVED.iter().position(|&r| r == reg).unwrap_or(0);
    8 * (SAVED.len() - 1 - i) as i32
}

struct Slots {
    mb_eax: u32,
    mb_ebx: u32,
    phase: u32,
    features: u32,
    apic_ver: u32,
    trip: u32,
    vcpu: u32,
    arg1: u32,
    arg2: u32,
    cookie: u32,
    ret: u32,
    want: u32,
    hook_fail: u32,
    iter_mism: u32,
    iter_failed: u32,
    tsc0: u32,
    delta: u32,
    nmi_count: u32,
    spurious: u32,
    in_exc: u32,
    report_lines: u32,
    trips_done: u32,
    calls: u32,
    mism: u32,
    retfails: u32,
    hookfails: u32,
    tsc_min: u32,
    tsc_max: u32,
    tsc_sum: u32,
    scratch: u32,
    exc_vec: u32,
    exc_err: u32,
    exc_rip: u32,
    exc_cs: u32,
    exc_rflags: u32,
    exc_rsp: u32,
    hexdigits: u32,
}

struct Tables {
    gdt: u32,
    gdt_limit: u16,
    idt: u32,
    idtr: u32,
    tss: u32,
    ldt: u32,
    arg2_table: u32,
    stats: u32,
    item_mask: u32,
    item_names: u32,
    snap_before: u32,
    snap_after: u32,
    stack_top: u32,
    exc_stack_top: u32,
    nmi_stack_top: u32,
}

struct Routines {
    serial_init: CodeLabel,
    putc: CodeLabel,
    puts: CodeLabel,
    puthex: CodeLabel,
    puthex2: CodeLabel,
    puthex64: CodeLabel,
    putdec: CodeLabel,
    putnl: CodeLabel,
    exit: CodeLabel,
    snap: CodeLabel,
    dump_mem: CodeLabel,
    exc_common: CodeLabel,
}

struct Gen {
    a: CodeAssembler,
    d: DataArena,
    s: Slots,
    t: Tables,
    r: Routines,
    exported: Vec<(String, CodeLabel)>,
    vectors: Vec<CodeLabel>,
}

impl Emitter for Gen {
    fn asm(&mut self) -> &mut CodeAssembler {
        &mut self.a
    }
    fn bits64(&self) -> bool {
        true
    }
    fn mark(&mut self, l: &mut CodeLabel) -> R {
        Gen::mark(self, l)
    }
    fn text(&mut self, s: &str) -> R {
        Gen::text(self, s)
    }
    fn exit_with(&mut self, value: u32) -> R {
        Gen::exit_with(self, value)
    }
    fn features_slot(&self) -> u32 {
        self.s.features
    }
    fn apic_ver_slot(&self) -> u32 {
        self.s.apic_ver
    }
    fn puthex(&self) -> CodeLabel {
        self.r.puthex
    }
    fn putnl(&self) -> CodeLabel {
        self.r.putnl
    }
}

impl Gen {
    fn mark(&mut self, l: &mut CodeLabel) -> R {
        self.a.set_label(l)?;
        self.a.zero_bytes()?;
        Ok(())
    }

    fn export(&mut self, name: &str, mut l: CodeLabel) -> R<CodeLabel> {
        self.mark(&mut l)?;
        self.exported.push((name.to_owned(), l));
        Ok(l)
    }

    fn text(&mut self, s: &str) -> R {
        let addr = self.d.string(s);
        self.a.push(rsi)?;
        self.a.mov(esi, addr)?;
        self.a.call(self.r.puts)?;
        self.a.pop(rsi)?;
        Ok(())
    }

    fn hex_mem(&mut self, addr: u32) -> R {
        self.a.push(rax)?;
        self.a.mov(eax, dword_ptr(addr))?;
        self.a.call(self.r.puthex)?;
        self.a.pop(rax)?;
        Ok(())
    }

    fn hex64_mem(&mut self, addr: u32) -> R {
        self.a.push(rax)?;
        self.a.mov(rax, qword_ptr(addr))?;
        self.a.call(self.r.puthex64)?;
        self.a.pop(rax)?;
        Ok(())
    }

    fn dec_mem(&mut self, addr: u32) -> R {
        self.a.push(rax)?;
        self.a.mov(eax, dword_ptr(addr))?;
        self.a.call(self.r.putdec)?;
        self.a.pop(rax)?;
        Ok(())
    }

    fn field_hex(&mut self, key: &str, addr: u32) -> R {
        self.text(&format!(" {key}="))?;
        self.hex_mem(addr)
    }

    fn field_hex64(&mut self, key: &str, addr: u32) -> R {
        self.text(&format!(" {key}="))?;
        self.hex64_mem(addr)
    }

    fn field_dec(&mut self, key: &str, addr: u32) -> R {
        self.text(&format!(" {key}="))?;
        self.dec_mem(addr)
    }

    /// Prints ` key=` and the MSR as 16 hex digits. Clobbers RAX, RCX, RDX.
    fn field_msr(&mut self, key: &str, msr: u32) -> R {
        self.text(&format!(" {key}="))?;
        self.a.mov(ecx, msr)?;
        self.a.rdmsr()?;
        self.a.shl(rdx, 32)?;
        self.a.or(rax, rdx)?;
        self.a.call(self.r.puthex64)?;
        Ok(())
    }

    fn phase(&mut self, p: Phase) -> R {
        self.a.mov(dword_ptr(self.s.phase), p.code())?;
        Ok(())
    }

    fn exit_with(&mut self, value: u32) -> R {
        self.a.mov(eax, value)?;
        self.a.jmp(self.r.exit)?;
        Ok(())
    }

    fn unless_feature(&mut self, bit: u32, skip: CodeLabel) -> R {
        self.a.test(dword_ptr(self.s.features), bit)?;
        self.a.jz(skip)?;
        Ok(())
    }

    /// `wrmsr(msr, value)`. Clobbers EAX, ECX, EDX.
    fn wrmsr_const(&mut self, msr: u32, value: u64) -> R {
        self.a.mov(ecx, msr)?;
        self.a.mov(eax, value as u32)?;
        self.a.mov(edx, (value >> 32) as u32)?;
        self.a.wrmsr()?;
        Ok(())
    }

    /// Loads FS and GS with the kernel data selector and sets the three
    /// base MSRs to the host's values. Clobbers EAX, ECX, EDX.
    fn load_fs_gs(&mut self) -> R {
        self.a.mov(ax, u32::from(SEL64_DATA))?;
        self.a.mov(fs, ax)?;
        self.a.mov(gs, ax)?;
        self.wrmsr_const(MSR_FS_BASE, FS_BASE64)?;
        self.wrmsr_const(MSR_GS_BASE, GS_BASE64)?;
        self.wrmsr_const(MSR_KERNEL_GS_BASE, KERNEL_GS_BASE64)
    }

    fn run_hook(&mut self, hook: &mut HookFn) -> R {
        let mut ctx = HookCtx {
            bitness: 64,
            trip_slot: self.s.trip,
            vcpu_slot: self.s.vcpu,
            arg1_slot: self.s.arg1,
            arg2_slot: self.s.arg2,
            cookie_slot: self.s.cookie,
            ret_slot: self.s.ret,
            tsc_delta_slot: self.s.delta,
            hook_fail_slot: self.s.hook_fail,
            putc: self.r.putc,
            puts: self.r.puts,
            puthex: self.r.puthex,
            puthex64: self.r.puthex64,
            putdec: self.r.putdec,
            putnl: self.r.putnl,
            arena: &mut self.d,
        };
        hook(&mut self.a, &mut ctx)?;
        // Hooks may leave DF set; the kernel relies on DF=0.
        self.a.cld()?;
        Ok(())
    }

    // ------------------------------------------------------------------
    // Library routines (all preserve every register they do not return in).

    fn emit_library(&mut self) -> R {
        let l = self.r.serial_init;
        self.export("serial_init", l)?;
        self.a.push(rax)?;
        self.a.push(rdx)?;
        for (port, value) in SERIAL_INIT {
            self.a.mov(dx, u32::from(COM1 + port))?;
            self.a.mov(al, u32::from(value))?;
            self.a.out(dx, al)?;
        }
        self.a.pop(rdx)?;
        self.a.pop(rax)?;
        self.a.ret()?;

        // putc: AL.
        let l = self.r.putc;
        self.export("putc", l)?;
        self.a.push(rdx)?;
        self.a.push(rax)?;
        self.a.mov(dx, u32::from(COM1 + 5))?;
        let mut wait = self.a.create_label();
        self.mark(&mut wait)?;
        self.a.in_(al, dx)?;
        self.a.test(al, 0x20)?;
        self.a.jz(wait)?;
        self.a.pop(rax)?;
        self.a.mov(dx, u32::from(COM1))?;
        self.a.out(dx, al)?;
        self.a.pop(rdx)?;
        self.a.ret()?;

        // putnl.
        let l = self.r.putnl;
        self.export("putnl", l)?;
        self.a.push(rax)?;
        self.a.mov(al, u32::from(b'\n'))?;
        self.a.call(self.r.putc)?;
        self.a.pop(rax)?;
        self.a.ret()?;

        // puts: RSI.
        let l = self.r.puts;
        self.export("puts", l)?;
        self.a.push(rsi)?;
        self.a.push(rax)?;
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
        self.a.pop(rax)?;
        self.a.pop(rsi)?;
        self.a.ret()?;

        // puthex: EAX (8 digits); puthex2: AL (2); puthex64: RAX (16).
        for (name, digits) in [("puthex", 8u32), ("puthex2", 2), ("puthex64", 16)] {
            let l = match digits {
                8 => self.r.puthex,
                2 => self.r.puthex2,
                _ => self.r.puthex64,
            };
            self.export(name, l)?;
            self.a.push(rax)?;
            self.a.push(rcx)?;
            self.a.push(rdx)?;
            self.a.mov(rdx, rax)?;
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
            self.a.mov(al, byte_ptr(rax + self.s.hexdigits))?;
            self.a.call(self.r.putc)?;
            self.a.dec(ecx)?;
            self.a.jnz(lp)?;
            self.a.pop(rdx)?;
            self.a.pop(rcx)?;
            self.a.pop(rax)?;
            self.a.ret()?;
        }

        // putdec: EAX, unsigned decimal.
        let l = self.r.putdec;
        self.export("putdec", l)?;
        for reg in [rax, rbx, rcx, rdx] {
            self.a.push(reg)?;
        }
        self.a.mov(ecx, 10u32)?;
        self.a.xor(ebx, ebx)?;
        let mut divide = self.a.create_label();
        let mut print = self.a.create_label();
        self.mark(&mut divide)?;
        self.a.xor(edx, edx)?;
        self.a.div(ecx)?;
        self.a.push(rdx)?;
        self.a.inc(ebx)?;
        self.a.test(eax, eax)?;
        self.a.jnz(divide)?;
        self.mark(&mut print)?;
        self.a.pop(rax)?;
        self.a.add(al, u32::from(b'0'))?;
        self.a.call(self.r.putc)?;
        self.a.dec(ebx)?;
        self.a.jnz(print)?;
        for reg in [rdx, rcx, rbx, rax] {
            self.a.pop(reg)?;
        }
        self.a.ret()?;

        // exit: EAX to isa-debug-exit, then halt forever.
        let l = self.r.exit;
        self.export("exit", l)?;
        self.a.mov(dx, u32::from(DEBUG_EXIT_PORT))?;
        self.a.out(dx, eax)?;
        let mut halt = self.a.create_label();
        self.mark(&mut halt)?;
        self.a.cli()?;
        self.a.hlt()?;
        self.a.jmp(halt)?;

        // dump_mem: RBX = address, ECX = length (> 0); 32 bytes per `H` line.
        let l = self.r.dump_mem;
        self.export("dump_mem", l)?;
        for reg in [rax, rbx, rcx, rdx] {
            self.a.push(reg)?;
        }
        let mut row = self.a.create_label();
        let mut col = self.a.create_label();
        let mut last = self.a.create_label();
        self.mark(&mut row)?;
        self.text(&format!("{PREFIX}H "))?;
        self.a.mov(edx, 32u32)?;
        self.mark(&mut col)?;
        self.a.mov(al, byte_ptr(rbx))?;
        self.a.call(self.r.puthex2)?;
        self.a.inc(rbx)?;
        self.a.dec(ecx)?;
        self.a.jz(last)?;
        self.a.dec(edx)?;
        self.a.jnz(col)?;
        self.a.call(self.r.putnl)?;
        self.a.jmp(row)?;
        self.mark(&mut last)?;
        self.a.call(self.r.putnl)?;
        for reg in [rdx, rcx, rbx, rax] {
            self.a.pop(reg)?;
        }
        self.a.ret()?;
        Ok(())
    }

    fn emit_dumps(&mut self, dumps: &[DumpRegion64]) -> R {
        for d in dumps {
            self.text(&format!(
                "{PREFIX}DUMP addr={:08x} len={:08x} name={}\n",
                d.addr, d.len, d.name
            ))?;
            self.a.mov(rbx, d.addr)?;
            self.a.mov(ecx, d.len)?;
            self.a.call(self.r.dump_mem)?;
            self.text(&format!("{PREFIX}END\n"))?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Interrupt and exception handlers.

    fn emit_vectors(&mut self, dumps: &[DumpRegion64], dump_on_exception: bool) -> R {
        for v in 0..256u32 {
            let l = self.a.create_label();
            let l = self.export(&format!("vec_{v:02x}"), l)?;
            self.vectors.push(l);
            if v == 2 || v == u32::from(SPURIOUS_VECTOR) {
                // NMI / spurious APIC interrupt: count and return (no EOI).
                let slot = if v == 2 {
                    self.s.nmi_count
                } else {
                    self.s.spurious
                };
                self.a.inc(dword_ptr(slot))?;
                self.a.iretq()?;
                continue;
            }
            if !has_error_code(v) {
                self.a.push(0)?;
            }
            self.a.push(v as i32)?;
            self.a.jmp(self.r.exc_common)?;
        }

        // Common path. Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
        let l = self.r.exc_common;
        self.export("exc_common", l)?;
        for (off, slot) in [
            (0, self.s.exc_vec),
            (8, self.s.exc_err),
            (16, self.s.exc_rip),
            (24, self.s.exc_cs),
            (32, self.s.exc_rflags),
            (40, self.s.exc_rsp),
        ] {
            self.a.mov(rcx, qword_ptr(rsp + off))?;
            self.a.mov(qword_ptr(slot), rcx)?;
        }
        self.a.mov(ax, u32::from(SEL64_DATA))?;
        self.a.mov(ds, ax)?;
        self.a.mov(es, ax)?;
        self.a.mov(ss, ax)?;
        self.a.mov(rsp, u64::from(self.t.exc_stack_top))?;
        self.a.cld()?;
        let mut nested = self.a.create_label();
        self.a.cmp(dword_ptr(self.s.in_exc), 0)?;
        self.a.jne(nested)?;
        self.a.mov(dword_ptr(self.s.in_exc), 1u32)?;
        self.text(&format!("{PREFIX}EXC vec="))?;
        self.a.mov(eax, dword_ptr(self.s.exc_vec))?;
        self.a.call(self.r.puthex2)?;
        self.field_hex("err", self.s.exc_err)?;
        self.field_hex64("eip", self.s.exc_rip)?;
        self.field_hex("cs", self.s.exc_cs)?;
        self.field_hex("eflags", self.s.exc_rflags)?;
        self.text(" cr2=")?;
        self.a.mov(rax, cr2)?;
        self.a.call(self.r.puthex64)?;
        self.field_hex64("rsp", self.s.exc_rsp)?;
        self.field_dec("trip", self.s.trip)?;
        self.field_dec("vcpu", self.s.vcpu)?;
        self.field_dec("phase", self.s.phase)?;
        self.a.call(self.r.putnl)?;
        if dump_on_exception {
            self.emit_dumps(dumps)?;
        }
        self.exit_with(EXIT_HOST_EXCEPTION)?;

        self.mark(&mut nested)?;
        self.text(&format!("{PREFIX}EXC2 vec="))?;
        self.a.mov(eax, dword_ptr(self.s.exc_vec))?;
        self.a.call(self.r.puthex2)?;
        self.field_hex("err", self.s.exc_err)?;
        self.field_hex64("eip", self.s.exc_rip)?;
        self.a.call(self.r.putnl)?;
        self.exit_with(EXIT_HOST_EXCEPTION)?;
        Ok(())
    }

    // ------------------------------------------------------------------
    // The snapshot routine, generated from the item table.
    //
    // Called as `push adjust; push buffer; call snap` (it pops both). It
    // records every item as a qword into `buffer` and preserves all
    // registers and flags. The recorded RSP is the caller's RSP before the
    // two pushes plus `adjust`.

    fn emit_snap(&mut self, items: &[SnapItem64]) -> R {
        let l = self.r.snap;
        self.export("snap", l)?;
        self.a.pushfq()?;
        for reg in SAVED {
            self.a.push(reg)?;
        }
        self.a.mov(rdi, qword_ptr(rsp + SNAP_BUFFER))?;
        for (idx, item) in items.iter().enumerate() {
            self.emit_source(&item.source)?;
            self.a.mov(qword_ptr(rdi + (idx as i32) * 8), rax)?;
        }
        for reg in SAVED.iter().rev() {
            self.a.pop(*reg)?;
        }
        self.a.popfq()?;
        self.a.ret_1(16)?;
        Ok(())
    }

    /// Leaves `(EDX << 32) | EAX` of `rdmsr(index)` in RAX.
    fn rdmsr64(a: &mut CodeAssembler, index: u32) -> R {
        a.mov(ecx, index)?;
        a.rdmsr()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        Ok(())
    }

    fn emit_source(&mut self, source: &SnapSource64) -> R {
        use SnapSource64 as S;
        let (scratch, gdt, features) = (self.s.scratch, self.t.gdt, self.s.features);
        let a = &mut self.a;
        match source {
            S::Rbx => a.mov(rax, qword_ptr(rsp + saved_off(rbx)))?,
            S::Rbp => a.mov(rax, qword_ptr(rsp + saved_off(rbp)))?,
            S::R12 => a.mov(rax, qword_ptr(rsp + saved_off(r12)))?,
            S::R13 => a.mov(rax, qword_ptr(rsp + saved_off(r13)))?,
            S::R14 => a.mov(rax, qword_ptr(rsp + saved_off(r14)))?,
            S::R15 => a.mov(rax, qword_ptr(rsp + saved_off(r15)))?,
            S::Rsp => {
                a.lea(rax, ptr(rsp + SNAP_CALLER))?;
                a.add(rax, qword_ptr(rsp + SNAP_ADJUST))?;
            }
            S::Rflags => a.mov(rax, qword_ptr(rsp + SNAP_RFLAGS))?,
            S::Seg(seg) => {
                let reg = match seg {
                    Seg::Cs => cs,
                    Seg::Ds => ds,
                    Seg::Es => es,
                    Seg::Fs => fs,
                    Seg::Gs => gs,
                    Seg::Ss => ss,
                };
                a.xor(eax, eax)?;
                a.mov(ax, reg)?;
            }
            S::GdtrBase | S::GdtrLimit | S::IdtrBase | S::IdtrLimit => {
                if matches!(source, S::GdtrBase | S::GdtrLimit) {
                    a.sgdt(ptr(scratch))?;
                } else {
                    a.sidt(ptr(scratch))?;
                }
                if matches!(source, S::GdtrBase | S::IdtrBase) {
                    a.mov(rax, qword_ptr(scratch + 2))?;
                } else {
                    a.movzx(eax, word_ptr(scratch))?;
                }
            }
            S::Ldtr => {
                a.xor(eax, eax)?;
                a.sldt(ax)?;
            }
            S::Tr => {
                a.xor(eax, eax)?;
                a.str(ax)?;
            }
            S::TssDescriptor { high } => {
                let off = u32::from(SEL64_TSS) + if *high { 8 } else { 0 };
                a.mov(rax, qword_ptr(gdt + off))?;
            }
            S::Cr(n) => match n {
                0 => a.mov(rax, cr0)?,
                2 => a.mov(rax, cr2)?,
                3 => a.mov(rax, cr3)?,
                4 => a.mov(rax, cr4)?,
                8 => a.mov(rax, cr8)?,
                _ => {
                    return Err(BuildError::Internal(format!(
                        "snapshot of CR{n} is not supported"
                    )))
                }
            },
            S::Dr(n) => match n {
                0 => a.mov(rax, dr0)?,
                1 => a.mov(rax, dr1)?,
                2 => a.mov(rax, dr2)?,
                3 => a.mov(rax, dr3)?,
                6 => a.mov(rax, dr6)?,
                7 => a.mov(rax, dr7)?,
                _ => {
                    return Err(BuildError::Internal(format!(
                        "snapshot of DR{n} is not supported"
                    )))
                }
            },
            S::Msr(index) => {
                let mut absent = a.create_label();
                let mut done = a.create_label();
                let guarded = *index == MSR_SYSENTER_CS;
                if guarded {
                    a.test(dword_ptr(features), FEATURE_SEP)?;
                    a.jz(absent)?;
                }
                Self::rdmsr64(a, *index)?;
                a.jmp(done)?;
                a.set_label(&mut absent)?;
                a.xor(eax, eax)?;
                a.set_label(&mut done)?;
                a.zero_bytes()?;
            }
            S::Mem32(addr) => {
                a.mov(rax, *addr)?;
                a.mov(eax, dword_ptr(rax))?;
            }
            S::Mem64(addr) => {
                a.mov(rax, *addr)?;
                a.mov(rax, qword_ptr(rax))?;
            }
            S::FsDword(off) | S::GsDword(off) => {
                let fs_side = matches!(source, S::FsDword(_));
                let (msr, want) = if fs_side {
                    (MSR_FS_BASE, FS_BASE64)
                } else {
                    (MSR_GS_BASE, GS_BASE64)
                };
                let mut bad = a.create_label();
                let mut done = a.create_label();
                Self::rdmsr64(a, msr)?;
                a.mov(rcx, want)?;
                a.cmp(rax, rcx)?;
                a.jne(bad)?;
                if fs_side {
                    a.mov(eax, dword_ptr(*off).fs())?;
                } else {
                    a.mov(eax, dword_ptr(*off).gs())?;
                }
                a.jmp(done)?;
                a.set_label(&mut bad)?;
                a.mov(rax, u64::MAX)?;
                a.set_label(&mut done)?;
                a.zero_bytes()?;
            }
            S::Custom(emit) => emit(a)?,
        }
        Ok(())
    }
}

/// Builder values the 64-bit kernel uses.
struct RunArgs {
    entry: u64,
    n_items: u32,
}

/// Validates the builder, lays everything out, generates and assembles.
pub(super) fn build(mut b: HostKernelBuilder) -> Result<Testbed, BuildError> {
    // ---- validation -------------------------------------------------------
    let entry = super::validate(&b)?;
    let mode = b.mode;
    if let Some(it) = b.extra_items.first() {
        return Err(BuildError::ItemWidth {
            name: it.name.clone(),
            width: 32,
            mode,
        });
    }
    let mut items = super::default_items64(b.x2apic);
    items.append(&mut b.extra_items64);
    super::check_item_names(items.iter().map(|i| i.name.as_str()))?;
    for name in &b.skip {
        let it = items
            .iter_mut()
            .find(|it| &it.name == name)
            .ok_or_else(|| BuildError::UnknownItem(name.clone()))?;
        it.mask = 0;
    }

    // ---- page tables -------------------------------------------------------
    let mut map = super::host_page_map(&b)?;
    map.map64("FS/GS page", FS_BASE64, FS_PAGE_PHYS, PAGE, 0)?;
    let tables_pages = map.table_pages();
    let tables = map.layout(TABLES_BASE);
    super::check_addresses(&tables, &b, entry)?;

    // ---- data --------------------------------------------------------------
    let data_base = TABLES_BASE + tables_pages * PAGE;
    let mut d = DataArena::new(data_base);
    let n_items = items.len() as u32;
    let n_vcpus = b.vcpus.len() as u32;
    let flat = |access: u8, flags: u8| descriptor(0, 0xfffff, access, flags);
    let mut gdt_entries = vec![
        0u64,
        flat(0x9a, 0xa), // SEL64_CODE: G, L
        flat(0x92, 0xc), // SEL64_DATA
        flat(0x92, 0xc), // SEL64_DATA_ALT
        0,               // SEL64_TSS (16 bytes, below)
        0,
        0, // SEL64_LDT (16 bytes, below)
        0,
        flat(0x9a, 0xc), // SEL64_CODE32: G, D
    ];
    if gdt_entries.len() * 8 != usize::from(super::SEL64_FIRST_EXTRA)
        || usize::from(SEL64_CODE32) != 8 * 8
    {
        return Err(BuildError::Internal("AMD64 GDT layout".into()));
    }
    gdt_entries.extend_from_slice(&b.extra_gdt);
    let gdt_bytes: Vec<u8> = gdt_entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    let gdt_limit = u16::try_from(gdt_bytes.len() - 1)
        .map_err(|_| BuildError::GdtTooLarge(b.extra_gdt.len()))?;
    let gdt = d.bytes(&gdt_bytes, 16);
    let ldt = d.bytes(&descriptor(FS_PAGE_PHYS, 0xfff, 0x92, 0x4).to_le_bytes(), 8);
    let stack_bottom = d.zeroed(STACK_SIZE, 16);
    let stack_top = stack_bottom + STACK_SIZE as u32;
    let exc_stack_bottom = d.zeroed(EXC_STACK_SIZE, 16);
    let exc_stack_top = exc_stack_bottom + EXC_STACK_SIZE as u32;
    let nmi_stack_bottom = d.zeroed(NMI_STACK_SIZE, 16);
    let nmi_stack_top = nmi_stack_bottom + NMI_STACK_SIZE as u32;
    let mut tss_bytes = [0u8; TSS64_SIZE];
    let ist = |n: u8| TSS64_IST1 + 8 * usize::from(n - 1);
    for (off, value) in [
        (TSS64_RSP0, stack_top),
        (ist(IST_EXC), exc_stack_top),
        (ist(IST_NMI), nmi_stack_top),
    ] {
        tss_bytes[off..off + 8].copy_from_slice(&u64::from(value).to_le_bytes());
    }
    tss_bytes[TSS64_IOMAP..TSS64_IOMAP + 2].copy_from_slice(&(TSS64_SIZE as u16).to_le_bytes());
    let tss = d.bytes(&tss_bytes, 16);
    let ok = d.write(
        gdt + u32::from(SEL64_TSS),
        &system_descriptor64(u64::from(tss), TSS64_SIZE as u32 - 1, 0x89),
    ) && d.write(
        gdt + u32::from(SEL64_LDT),
        &system_descriptor64(u64::from(ldt), 7, 0x82),
    );
    if !ok {
        return Err(BuildError::Internal("GDT outside the data area".into()));
    }
    let idt = d.zeroed(256 * 16, 16);
    let pseudo = |limit: u16, base: u32| {
        let mut p = [0u8; 10];
        p[..2].copy_from_slice(&limit.to_le_bytes());
        p[2..].copy_from_slice(&u64::from(base).to_le_bytes());
        p
    };
    let gdtr = d.bytes(&pseudo(gdt_limit, gdt), 16);
    let idtr = d.bytes(&pseudo(256 * 16 - 1, idt), 16);
    let arg2_table: Vec<u8> = b.vcpus.iter().flat_map(|v| v.to_le_bytes()).collect();
    let arg2_table = d.bytes(&arg2_table, 4);
    let stats = d.bytes(&initial_stats(n_vcpus), 8);
    let masks: Vec<u8> = items.iter().flat_map(|i| i.mask.to_le_bytes()).collect();
    let item_mask = d.bytes(&masks, 8);
    let item_names = d.zeroed(4 * items.len(), 4);
    for (i, it) in items.iter().enumerate() {
        let s = d.string(&it.name);
        if !d.write(item_names + 4 * i as u32, &s.to_le_bytes()) {
            return Err(BuildError::Internal("item name table".into()));
        }
    }
    let snap_before = d.zeroed(8 * items.len(), 8);
    let snap_after = d.zeroed(8 * items.len(), 8);
    let no_lm_msg = d.string(&format!(
        "{PREFIX}ERROR no long mode (CPUID.80000001:EDX.LM=0): cannot run an AMD64 host\n"
    ));
    let s = Slots {
        mb_eax: d.dword(0),
        mb_ebx: d.dword(0),
        phase: d.dword(Phase::Setup.code()),
        features: d.dword(0),
        apic_ver: d.dword(0),
        trip: d.dword(0),
        vcpu: d.dword(0),
        arg1: d.zeroed(8, 8),
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
        exc_vec: d.zeroed(8, 8),
        exc_err: d.zeroed(8, 8),
        exc_rip: d.zeroed(8, 8),
        exc_cs: d.zeroed(8, 8),
        exc_rflags: d.zeroed(8, 8),
        exc_rsp: d.zeroed(8, 8),
        hexdigits: d.bytes(b"0123456789abcdef", 4),
    };
    let t = Tables {
        gdt,
        gdt_limit,
        idt,
        idtr,
        tss,
        ldt,
        arg2_table,
        stats,
        item_mask,
        item_names,
        snap_before,
        snap_after,
        stack_top,
        exc_stack_top,
        nmi_stack_top,
    };

    let mut a = CodeAssembler::new(64)?;
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
    let mut g = Gen {
        a,
        d,
        s,
        t,
        r,
        exported: Vec::new(),
        vectors: Vec::new(),
    };

    // ---- code --------------------------------------------------------------
    let run = RunArgs { entry, n_items };
    let start = emit_main(&mut g, &mut b, &run)?;
    g.emit_library()?;
    g.emit_snap(&items)?;
    let dumps = b.dumps.clone();
    g.emit_vectors(&dumps, b.dump_on_exception)?;

    // ---- assemble ------------------------------------------------------------
    let code_base = page_align(g.d.end());
    let result = g.a.assemble_options(
        u64::from(code_base),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let code = result.inner.code_buffer.clone();
    let code_end = code_base + code.len() as u32;
    let mut symbols = BTreeMap::new();
    for (name, l) in &g.exported {
        symbols.insert(name.clone(), result.label_ip(l)? as u32);
    }
    for (i, l) in g.vectors.iter().enumerate() {
        let handler = result.label_ip(l)?;
        let ist = if i == 2 { IST_NMI } else { IST_EXC };
        if !g.d.write(
            g.t.idt + 16 * i as u32,
            &interrupt_gate64(handler, SEL64_CODE, ist),
        ) {
            return Err(BuildError::Internal("IDT outside the data area".into()));
        }
    }
    if code_end > b.identity_limit {
        return Err(BuildError::KernelTooLarge {
            end: code_end,
            limit: b.identity_limit,
        });
    }
    let start64 = result.label_ip(&start)? as u32;

    // ---- boot stub (32-bit, paging off) -----------------------------------------
    let mut stub = CodeAssembler::new(32)?;
    let mut no_lm = stub.create_label();
    stub.cli()?;
    stub.cld()?;
    stub.mov(dword_ptr(g.s.mb_eax), eax)?;
    stub.mov(dword_ptr(g.s.mb_ebx), ebx)?;
    stub.mov(eax, 0x8000_0000u32)?;
    stub.cpuid()?;
    stub.cmp(eax, 0x8000_0001u32)?;
    stub.jb(no_lm)?;
    stub.mov(eax, 0x8000_0001u32)?;
    stub.cpuid()?;
    stub.test(edx, CPUID_LM)?;
    stub.jz(no_lm)?;
    stub.lgdt(ptr(gdtr))?;
    let mut cr4_bits = Cr4::PAE | Cr4::PGE | Cr4::OSFXSR | Cr4::OSXMMEXCPT;
    if b.pse {
        cr4_bits |= Cr4::PSE;
    }
    stub.mov(eax, cr4)?;
    stub.or(eax, cr4_bits.bits() as u32)?;
    stub.mov(cr4, eax)?;
    stub.mov(eax, tables.cr3)?;
    stub.mov(cr3, eax)?;
    stub.mov(ecx, MSR_EFER)?;
    stub.rdmsr()?;
    stub.or(eax, Efer::LME.bits() as u32)?;
    stub.wrmsr()?;
    let cr0_bits = Cr0::PG | Cr0::WP | Cr0::NE | Cr0::MP | Cr0::ET | Cr0::PE;
    stub.mov(eax, cr0)?;
    stub.or(eax, cr0_bits.bits() as u32)?;
    stub.mov(cr0, eax)?;
    stub.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1632,
        SEL64_CODE,
        start64,
    )?)?;
    // No long mode: say so on COM1 (usable without setup under QEMU) and fail.
    stub.set_label(&mut no_lm)?;
    stub.mov(esi, no_lm_msg)?;
    stub.mov(dx, u32::from(COM1))?;
    let mut next = stub.create_label();
    let mut done = stub.create_label();
    stub.set_label(&mut next)?;
    stub.lodsb()?;
    stub.test(al, al)?;
    stub.jz(done)?;
    stub.out(dx, al)?;
    stub.jmp(next)?;
    stub.set_label(&mut done)?;
    stub.mov(eax, EXIT_FAIL)?;
    stub.mov(dx, u32::from(DEBUG_EXIT_PORT))?;
    stub.out(dx, eax)?;
    let mut halt = stub.create_label();
    stub.set_label(&mut halt)?;
    stub.hlt()?;
    stub.jmp(halt)?;
    let stub = stub.assemble(u64::from(STUB_ADDR))?;

    // ---- image -------------------------------------------------------------
    let mut fs_page = vec![0u8; PAGE as usize];
    fs_page[..4].copy_from_slice(&FS_MAGIC.to_le_bytes());
    let gs_off = GS_MAGIC_OFF as usize;
    fs_page[gs_off..gs_off + 4].copy_from_slice(&GS_MAGIC.to_le_bytes());
    let (image, layout) = build_image(ImageParts {
        stub,
        fs_page,
        tables: &tables.bytes,
        data_base,
        data: g.d.as_slice().to_vec(),
        code_base,
        code,
        blobs: std::mem::take(&mut b.blobs),
    })?;

    // ---- symbols -------------------------------------------------------------
    symbols.insert("entry".into(), STUB_ADDR);
    for (name, addr) in [
        ("gdt", g.t.gdt),
        ("gdtr", gdtr),
        ("idt", g.t.idt),
        ("idtr", g.t.idtr),
        ("tss", g.t.tss),
        ("ldt", g.t.ldt),
        ("magic_page", MAGIC_PAGE_PHYS),
        ("fs_page", FS_PAGE_PHYS),
        ("page_tables", TABLES_BASE),
        ("arg2_table", g.t.arg2_table),
        ("vcpu_stats", g.t.stats),
        ("item_mask", g.t.item_mask),
        ("item_names", g.t.item_names),
        ("snap_before", g.t.snap_before),
        ("snap_after", g.t.snap_after),
        ("stack_top", g.t.stack_top),
        ("exc_stack_top", g.t.exc_stack_top),
        ("nmi_stack_top", g.t.nmi_stack_top),
        ("mb_eax", g.s.mb_eax),
        ("mb_ebx", g.s.mb_ebx),
        ("phase", g.s.phase),
        ("features", g.s.features),
        ("trip", g.s.trip),
        ("vcpu", g.s.vcpu),
        ("arg1", g.s.arg1),
        ("arg2", g.s.arg2),
        ("cookie", g.s.cookie),
        ("ret", g.s.ret),
        ("hook_fail", g.s.hook_fail),
        ("tsc_delta", g.s.delta),
        ("nmi_count", g.s.nmi_count),
        ("spurious_count", g.s.spurious),
    ] {
        symbols.insert(name.into(), addr);
    }

    let addrs = KernelAddrs {
        entry: STUB_ADDR,
        code: code_base,
        code_end,
        cr3: tables.cr3,
        gdt: g.t.gdt,
        gdt_limit: g.t.gdt_limit,
        idt: g.t.idt,
        tss: g.t.tss,
        ldt: g.t.ldt,
        magic_page: MAGIC_PAGE_PHYS,
        fs_page: FS_PAGE_PHYS,
        trip: g.s.trip,
        vcpu: g.s.vcpu,
        arg1: g.s.arg1,
        arg2: g.s.arg2,
        cookie: g.s.cookie,
        ret: g.s.ret,
        hook_fail: g.s.hook_fail,
        nmi_count: g.s.nmi_count,
        snap_before: g.t.snap_before,
        snap_after: g.t.snap_after,
        stack_top: g.t.stack_top,
        kernel_end: code_end,
    };
    Ok(Testbed {
        mode,
        image,
        symbols,
        layout,
        addrs,
        items: items.into_iter().map(|i| i.name).collect(),
        page_tables: tables,
        trips: b.trips,
        vcpus: b.vcpus,
    })
}

/// Setup, the call loop and the summary; returns the label of the first
/// 64-bit instruction.
fn emit_main(g: &mut Gen, b: &mut HostKernelBuilder, run: &RunArgs) -> R<CodeLabel> {
    let n_vcpus = b.vcpus.len() as u32;
    let start = g.a.create_label();
    let start = g.export("start", start)?;
    g.a.mov(ax, u32::from(SEL64_DATA))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.mov(rsp, u64::from(g.t.stack_top))?;
    g.phase(Phase::Setup)?;
    g.a.call(g.r.serial_init)?;
    g.text(&format!("{PREFIX}BOOT mode={} mbeax=", b.mode))?;
    g.hex_mem(g.s.mb_eax)?;
    g.text(&format!(
        " trips={} vcpus={n_vcpus} items={} entry={:016x}\n",
        b.trips, run.n_items, run.entry
    ))?;

    // Legacy PIC: mask everything (LINT0 goes to NMI mode below).
    g.a.mov(al, 0xffu32)?;
    g.a.mov(dx, 0x21u32)?;
    g.a.out(dx, al)?;
    g.a.mov(dx, 0xa1u32)?;
    g.a.out(dx, al)?;

    // Descriptor tables, FS/GS and their bases.
    g.a.lidt(ptr(g.t.idtr))?;
    g.a.mov(ax, u32::from(SEL64_TSS))?;
    g.a.ltr(ax)?;
    g.a.mov(ax, u32::from(SEL64_LDT))?;
    g.a.lldt(ax)?;
    g.load_fs_gs()?;

    // CPUID features; EFER.NXE / EFER.SCE as a real host has them (LME and
    // LMA are on already).
    emit_cpuid_features(g)?;
    g.a.mov(ecx, MSR_EFER)?;
    g.a.rdmsr()?;
    for (flag, bit) in [(FEATURE_NX, Efer::NXE), (FEATURE_SCE, Efer::SCE)] {
        let mut no = g.a.create_label();
        g.unless_feature(flag, no)?;
        g.a.or(eax, bit.bits() as u32)?;
        g.mark(&mut no)?;
    }
    g.a.wrmsr()?;

    // SYSENTER_CS, the SYSCALL MSRs, CR8.
    let mut no_sep = g.a.create_label();
    g.unless_feature(FEATURE_SEP, no_sep)?;
    g.wrmsr_const(MSR_SYSENTER_CS, u64::from(SEL64_CODE))?;
    g.mark(&mut no_sep)?;
    let mut no_sce = g.a.create_label();
    g.unless_feature(FEATURE_SCE, no_sce)?;
    g.wrmsr_const(MSR_STAR, STAR_VALUE)?;
    g.wrmsr_const(MSR_LSTAR, LSTAR_VALUE)?;
    g.wrmsr_const(MSR_SFMASK, SFMASK_VALUE)?;
    g.mark(&mut no_sce)?;
    g.a.xor(eax, eax)?;
    g.a.mov(cr8, rax)?;

    // Local APIC.
    emit_apic_setup(g, b.x2apic)?;

    // HOST, HOST64 and APIC lines.
    g.text(&format!("{PREFIX}HOST cr0="))?;
    for (i, reg) in [cr0, cr3, cr4].into_iter().enumerate() {
        if i > 0 {
            g.text(if i == 1 { " cr3=" } else { " cr4=" })?;
        }
        g.a.mov(rax, reg)?;
        g.a.call(g.r.puthex)?;
    }
    g.field_msr("efer", MSR_EFER)?;
    g.text(" sysenter_cs=")?;
    let mut sep_absent = g.a.create_label();
    let mut sep_done = g.a.create_label();
    g.unless_feature(FEATURE_SEP, sep_absent)?;
    g.a.mov(ecx, MSR_SYSENTER_CS)?;
    g.a.rdmsr()?;
    g.a.jmp(sep_done)?;
    g.mark(&mut sep_absent)?;
    g.a.xor(eax, eax)?;
    g.mark(&mut sep_done)?;
    g.a.call(g.r.puthex)?;
    g.text(" magic=")?;
    g.a.mov(ebx, MAGIC_VIRT)?;
    g.a.mov(eax, dword_ptr(rbx))?;
    g.a.call(g.r.puthex)?;
    g.text(" fs0=")?;
    g.a.mov(eax, dword_ptr(0).fs())?;
    g.a.call(g.r.puthex)?;
    g.field_hex("features", g.s.features)?;
    g.a.call(g.r.putnl)?;
    g.text(&format!("{PREFIX}HOST64"))?;
    for (key, msr) in [
        ("fs_base", MSR_FS_BASE),
        ("gs_base", MSR_GS_BASE),
        ("kernel_gs_base", MSR_KERNEL_GS_BASE),
        ("star", MSR_STAR),
        ("lstar", MSR_LSTAR),
        ("sfmask", MSR_SFMASK),
    ] {
        g.field_msr(key, msr)?;
    }
    g.text(" cr8=")?;
    g.a.mov(rax, cr8)?;
    g.a.call(g.r.puthex64)?;
    g.a.call(g.r.putnl)?;
    emit_apic_line(g, b.x2apic)?;

    emit_loop(g, b, run)?;
    Ok(start)
}

/// The call loop, the summary and the verdict.
fn emit_loop(g: &mut Gen, b: &mut HostKernelBuilder, run: &RunArgs) -> R {
    let n_vcpus = b.vcpus.len() as u32;
    let trip_loop = g.a.create_label();
    let vcpu_loop = g.a.create_label();
    let done = g.a.create_label();
    g.a.mov(dword_ptr(g.s.trip), 0u32)?;
    g.export("trip_loop", trip_loop)?;
    g.a.mov(dword_ptr(g.s.vcpu), 0u32)?;
    g.export("vcpu_loop", vcpu_loop)?;

    // Per-call state.
    g.phase(Phase::PreHook)?;
    g.a.mov(eax, dword_ptr(g.s.vcpu))?;
    g.a.mov(eax, dword_ptr(rax * 4 + g.t.arg2_table))?;
    g.a.mov(dword_ptr(g.s.arg2), eax)?;
    g.a.mov(rax, b.arg1)?;
    g.a.mov(qword_ptr(g.s.arg1), rax)?;
    g.a.mov(eax, dword_ptr(g.s.trip))?;
    g.a.imul_3(eax, eax, 0x9e37_79b9u32 as i32)?;
    g.a.mov(ecx, dword_ptr(g.s.vcpu))?;
    g.a.imul_3(ecx, ecx, 0x85eb_ca6bu32 as i32)?;
    g.a.xor(eax, ecx)?;
    g.a.xor(eax, super::COOKIE_SEED)?;
    g.a.mov(dword_ptr(g.s.cookie), eax)?;
    if let Some(addr) = b.cookie_addr {
        g.a.mov(rcx, addr)?;
        g.a.mov(dword_ptr(rcx), eax)?;
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

    // (a) pre-call hook (RSP is the 16-byte aligned stack top here).
    if let Some(hook) = b.pre_hook.as_mut() {
        let l = g.a.create_label();
        g.export("pre_hook", l)?;
        g.run_hook(hook)?;
    }

    // (b) patterns in the callee-saved registers, snapshot.
    g.phase(Phase::Snapshot)?;
    g.a.mov(eax, dword_ptr(g.s.cookie))?;
    g.a.mov(edx, eax)?;
    g.a.not(edx)?;
    g.a.shl(rax, 32)?;
    g.a.or(rax, rdx)?;
    for (reg, pattern) in [
        (rbx, PATTERN_RBX),
        (rbp, PATTERN_RBP),
        (r12, PATTERN_R12),
        (r13, PATTERN_R13),
        (r14, PATTERN_R14),
        (r15, PATTERN_R15),
    ] {
        g.a.mov(reg, pattern)?;
        g.a.xor(reg, rax)?;
    }
    g.a.cld()?;
    g.a.sti()?;
    g.a.push(0)?;
    g.a.push(g.t.snap_before as i32)?;
    g.a.call(g.r.snap)?;

    // (c) the call: u32 entry(u64 arg1 /* RDI */, u32 arg2 /* ESI */), timed.
    g.a.mov(rdi, qword_ptr(g.s.arg1))?;
    g.a.mov(esi, dword_ptr(g.s.arg2))?;
    g.a.mov(r11, run.entry)?;
    g.phase(Phase::Call)?;
    g.a.rdtsc()?;
    g.a.mov(dword_ptr(g.s.tsc0), eax)?;
    g.a.mov(dword_ptr(g.s.tsc0 + 4), edx)?;
    let call_site = g.a.create_label();
    g.export("call_site", call_site)?;
    g.a.call(r11)?;
    let after_call = g.a.create_label();
    g.export("after_call", after_call)?;
    g.a.push(rax)?;
    g.a.rdtsc()?;
    g.a.shl(rdx, 32)?;
    g.a.or(rax, rdx)?;
    g.a.push(rax)?;
    g.phase(Phase::Snapshot)?;
    // Extra bytes since the call site's RSP: return value + TSC.
    g.a.push(16)?;
    g.a.push(g.t.snap_after as i32)?;
    g.a.call(g.r.snap)?;

    // Back to the kernel's data segments (FS and GS after the report).
    g.a.mov(ax, u32::from(SEL64_DATA))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.cld()?;
    g.phase(Phase::Check)?;
    g.a.pop(rax)?;
    g.a.sub(rax, qword_ptr(g.s.tsc0))?;
    g.a.mov(rcx, rax)?;
    g.a.shr(rcx, 32)?;
    let mut small = g.a.create_label();
    g.a.jz(small)?;
    g.a.mov(eax, u32::MAX)?;
    g.mark(&mut small)?;
    g.a.mov(dword_ptr(g.s.delta), eax)?;
    g.a.pop(rax)?;
    g.a.mov(dword_ptr(g.s.ret), eax)?;

    // (d) compare the snapshots.
    let limit = b.max_report_lines;
    let mut cmp_loop = g.a.create_label();
    let mut cmp_next = g.a.create_label();
    g.a.xor(ecx, ecx)?;
    g.mark(&mut cmp_loop)?;
    g.a.mov(rax, qword_ptr(rcx * 8 + g.t.snap_before))?;
    g.a.xor(rax, qword_ptr(rcx * 8 + g.t.snap_after))?;
    g.a.and(rax, qword_ptr(rcx * 8 + g.t.item_mask))?;
    g.a.jz(cmp_next)?;
    g.a.inc(dword_ptr(g.s.iter_mism))?;
    g.a.cmp(dword_ptr(g.s.report_lines), limit as i32)?;
    g.a.jae(cmp_next)?;
    g.a.inc(dword_ptr(g.s.report_lines))?;
    g.text(&format!("{PREFIX}MISMATCH"))?;
    g.field_dec("trip", g.s.trip)?;
    g.field_dec("vcpu", g.s.vcpu)?;
    g.text(" idx=")?;
    g.a.mov(eax, ecx)?;
    g.a.call(g.r.putdec)?;
    g.text(" name=")?;
    g.a.push(rsi)?;
    g.a.mov(esi, dword_ptr(rcx * 4 + g.t.item_names))?;
    g.a.call(g.r.puts)?;
    g.a.pop(rsi)?;
    g.text(" before=")?;
    g.a.mov(rax, qword_ptr(rcx * 8 + g.t.snap_before))?;
    g.a.call(g.r.puthex64)?;
    g.text(" after=")?;
    g.a.mov(rax, qword_ptr(rcx * 8 + g.t.snap_after))?;
    g.a.call(g.r.puthex64)?;
    g.a.call(g.r.putnl)?;
    g.mark(&mut cmp_next)?;
    g.a.inc(ecx)?;
    g.a.cmp(ecx, run.n_items as i32)?;
    g.a.jb(cmp_loop)?;

    // (e) the return value (EAX: the upper half of RAX is undefined for a u32).
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
    let mut ret_ok = g.a.create_label();
    if check {
        g.a.mov(dword_ptr(g.s.want), eax)?;
        g.a.cmp(eax, dword_ptr(g.s.ret))?;
        g.a.je(ret_ok)?;
        g.a.mov(eax, dword_ptr(g.s.vcpu))?;
        g.a.imul_3(ebx, eax, STAT_SIZE as i32)?;
        g.a.inc(dword_ptr(rbx + (g.t.stats + STAT_RETFAIL)))?;
        g.a.inc(dword_ptr(g.s.retfails))?;
        g.a.mov(dword_ptr(g.s.iter_failed), 1u32)?;
        g.a.cmp(dword_ptr(g.s.report_lines), limit as i32)?;
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

    // Statistics (per-VCPU record in RBX).
    g.a.mov(eax, dword_ptr(g.s.vcpu))?;
    g.a.imul_3(ebx, eax, STAT_SIZE as i32)?;
    g.a.add(ebx, g.t.stats)?;
    let mut hook_ok = g.a.create_label();
    g.a.cmp(dword_ptr(g.s.hook_fail), 0)?;
    g.a.je(hook_ok)?;
    g.a.inc(dword_ptr(rbx + STAT_HOOKFAIL))?;
    g.a.inc(dword_ptr(g.s.hookfails))?;
    g.a.mov(dword_ptr(g.s.iter_failed), 1u32)?;
    g.a.cmp(dword_ptr(g.s.report_lines), limit as i32)?;
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
    g.a.inc(dword_ptr(rbx + STAT_MISM))?;
    g.a.inc(dword_ptr(g.s.mism))?;
    g.a.mov(dword_ptr(g.s.iter_failed), 1u32)?;
    g.mark(&mut mism_ok)?;
    g.a.inc(dword_ptr(rbx + STAT_CALLS))?;
    g.a.inc(dword_ptr(g.s.calls))?;
    g.a.mov(eax, dword_ptr(g.s.delta))?;
    for (min, max, sum) in [
        (
            ptr(rbx + STAT_MIN),
            ptr(rbx + STAT_MAX),
            ptr(rbx + STAT_SUM),
        ),
        (ptr(g.s.tsc_min), ptr(g.s.tsc_max), ptr(g.s.tsc_sum)),
    ] {
        let mut not_min = g.a.create_label();
        let mut not_max = g.a.create_label();
        g.a.cmp(dword_ptr(min), eax)?;
        g.a.jbe(not_min)?;
        g.a.mov(dword_ptr(min), eax)?;
        g.mark(&mut not_min)?;
        g.a.cmp(dword_ptr(max), eax)?;
        g.a.jae(not_max)?;
        g.a.mov(dword_ptr(max), eax)?;
        g.mark(&mut not_max)?;
        g.a.add(dword_ptr(sum), eax)?;
        g.a.adc(dword_ptr(sum + 4), 0)?;
    }
    for (trip, off) in [(0u32, STAT_FIRST), (1, STAT_SECOND)] {
        let mut skip = g.a.create_label();
        g.a.cmp(dword_ptr(g.s.trip), trip as i32)?;
        g.a.jne(skip)?;
        g.a.mov(dword_ptr(rbx + off), eax)?;
        g.mark(&mut skip)?;
    }
    if b.trace_trips > 0 {
        let mut skip = g.a.create_label();
        g.a.cmp(dword_ptr(g.s.trip), b.trace_trips as i32)?;
        g.a.jae(skip)?;
        g.text(&format!("{PREFIX}TRIP"))?;
        g.field_dec("trip", g.s.trip)?;
        g.field_dec("vcpu", g.s.vcpu)?;
        g.field_hex("ret", g.s.ret)?;
        g.field_dec("tsc", g.s.delta)?;
        g.a.call(g.r.putnl)?;
        g.mark(&mut skip)?;
    }
    // FS, GS and their bases back to the host's values for the next call.
    g.load_fs_gs()?;
    if b.stop_on_failure {
        g.a.cmp(dword_ptr(g.s.iter_failed), 0)?;
        g.a.jne(done)?;
    }
    g.a.inc(dword_ptr(g.s.vcpu))?;
    g.a.cmp(dword_ptr(g.s.vcpu), n_vcpus as i32)?;
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
    for (i, arg2) in b.vcpus.clone().into_iter().enumerate() {
        let rec = g.t.stats + STAT_SIZE * i as u32;
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
    }
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
    let dumps = b.dumps.clone();
    g.emit_dumps(&dumps)?;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_and_system_descriptors_match_the_sdm_layout() {
        let g = interrupt_gate64(0xffff_8000_1234_5678, 0x08, 1);
        assert_eq!(&g[0..2], &0x5678u16.to_le_bytes());
        assert_eq!(&g[2..4], &8u16.to_le_bytes());
        assert_eq!((g[4], g[5]), (1, 0x8e));
        assert_eq!(&g[6..8], &0x1234u16.to_le_bytes());
        assert_eq!(&g[8..12], &0xffff_8000u32.to_le_bytes());
        assert_eq!(&g[12..16], &[0; 4]);
        let d = system_descriptor64(0x0000_0001_0020_3040, 103, 0x89);
        let lo = u64::from_le_bytes(d[..8].try_into().unwrap_or_default());
        assert_eq!(lo & 0xffff, 103);
        assert_eq!((lo >> 16) & 0xff_ffff, 0x20_3040);
        assert_eq!((lo >> 40) & 0xff, 0x89);
        assert_eq!(&d[8..12], &1u32.to_le_bytes());
    }

    #[test]
    fn snapshot_frame_offsets() {
        assert_eq!(saved_off(r15), 0);
        assert_eq!(saved_off(rax), 14 * 8);
        assert_eq!(saved_off(rbx), 11 * 8);
        assert_eq!(SNAP_RFLAGS, 120);
        assert_eq!(SNAP_BUFFER, 136);
        assert_eq!(SNAP_CALLER, 152);
    }
}
