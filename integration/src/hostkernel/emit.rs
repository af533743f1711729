//! Code generation for the host kernel.

use std::collections::BTreeMap;

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, Instruction};

use cpum::regs::{Cr0, Cr4, Efer, MSR_APIC_BASE, MSR_EFER, MSR_SYSENTER_CS};

use super::common::{
    build_image, emit_apic_line, emit_apic_setup, emit_cpuid_features, Emitter, ImageParts, R,
};
use super::items::{Seg, SnapItem, SnapSource};
use super::{
    narrow, page_align, BuildError, DataArena, Expected, HookCtx, HookFn, HostKernelBuilder,
    KernelAddrs, Testbed, FEATURE_APIC, FEATURE_EFER, FEATURE_NX, FEATURE_SCE, FEATURE_SEP,
    FS_MAGIC, FS_PAGE_PHYS, MAGIC_PAGE_PHYS, MAGIC_VIRT, PATTERN_EBP, PATTERN_EBX, PATTERN_EDI,
    PATTERN_ESI, SEL_CODE32, SEL_DATA32, SEL_LDT, SEL_LDT_FS, SEL_TSS32, SPURIOUS_VECTOR,
    STUB_ADDR, TABLES_BASE,
};
use crate::paging::{HostMode, PAGE};
use crate::qemu::{DEBUG_EXIT_PORT, EXIT_FAIL, EXIT_HOST_EXCEPTION, EXIT_PASS};
use crate::transcript::{Phase, PREFIX};

pub(super) const COM1: u16 = 0x3f8;
pub(super) const STACK_SIZE: usize = 0x4000;
pub(super) const EXC_STACK_SIZE: usize = 0x1000;
/// Per-VCPU statistics record (dwords): calls, mismatches, retfails,
/// hookfails, tsc_min, tsc_max, tsc_sum lo/hi, tsc of trip 0, tsc of trip 1.
pub(super) const STAT_CALLS: u32 = 0;
pub(super) const STAT_MISM: u32 = 4;
pub(super) const STAT_RETFAIL: u32 = 8;
pub(super) const STAT_HOOKFAIL: u32 = 12;
pub(super) const STAT_MIN: u32 = 16;
pub(super) const STAT_MAX: u32 = 20;
pub(super) const STAT_SUM: u32 = 24;
pub(super) const STAT_FIRST: u32 = 32;
pub(super) const STAT_SECOND: u32 = 36;
pub(super) const STAT_SIZE: u32 = 40;

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
pub(super) fn initial_stats(n_vcpus: u32) -> Vec<u8> {
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

/// A 32-bit interrupt gate (SDM Vol. 3A §6.11).
fn interrupt_gate(handler: u32, selector: u16) -> u64 {
    let h = u64::from(handler);
    (h & 0xffff) | (u64::from(selector) << 16) | (0x8e00u64 << 32) | ((h >> 16) << 48)
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
    exc_eip: u32,
    exc_cs: u32,
    exc_eflags: u32,
    hexdigits: u32,
}

struct Tables {
    gdt: u32,
    gdt_limit: u16,
    gdtr: u32,
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
        false
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
        self.a.push(esi)?;
        self.a.mov(esi, addr)?;
        self.a.call(self.r.puts)?;
        self.a.pop(esi)?;
        Ok(())
    }

    fn hex_mem(&mut self, addr: u32) -> R {
        self.a.push(eax)?;
        self.a.mov(eax, dword_ptr(addr))?;
        self.a.call(self.r.puthex)?;
        self.a.pop(eax)?;
        Ok(())
    }

    fn dec_mem(&mut self, addr: u32) -> R {
        self.a.push(eax)?;
        self.a.mov(eax, dword_ptr(addr))?;
        self.a.call(self.r.putdec)?;
        self.a.pop(eax)?;
        Ok(())
    }

    fn field_hex(&mut self, key: &str, addr: u32) -> R {
        self.text(&format!(" {key}="))?;
        self.hex_mem(addr)
    }

    fn field_dec(&mut self, key: &str, addr: u32) -> R {
        self.text(&format!(" {key}="))?;
        self.dec_mem(addr)
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

    /// `if [features] & bit == 0 goto skip`.
    fn unless_feature(&mut self, bit: u32, skip: CodeLabel) -> R {
        self.a.test(dword_ptr(self.s.features), bit)?;
        self.a.jz(skip)?;
        Ok(())
    }

    fn hook_ctx<'x>(d: &'x mut DataArena, s: &Slots, r: &Routines) -> HookCtx<'x> {
        HookCtx {
            bitness: 32,
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
            arena: d,
        }
    }

    fn run_hook(&mut self, hook: &mut HookFn) -> R {
        let mut ctx = Self::hook_ctx(&mut self.d, &self.s, &self.r);
        hook(&mut self.a, &mut ctx)?;
        // Hooks may leave DF set or clobber anything else; the kernel relies on DF=0.
        self.a.cld()?;
        Ok(())
    }

    // ------------------------------------------------------------------
    // Library routines.

    fn emit_serial(&mut self) -> R {
        let l = self.r.serial_init;
        self.export("serial_init", l)?;
        self.a.push(eax)?;
        self.a.push(edx)?;
        for (port, value) in SERIAL_INIT {
            self.a.mov(dx, u32::from(COM1 + port))?;
            self.a.mov(al, u32::from(value))?;
            self.a.out(dx, al)?;
        }
        self.a.pop(edx)?;
        self.a.pop(eax)?;
        self.a.ret()?;

        // putc: AL.
        let l = self.r.putc;
        self.export("putc", l)?;
        self.a.push(edx)?;
        self.a.push(eax)?;
        self.a.mov(dx, u32::from(COM1 + 5))?;
        let mut wait = self.a.create_label();
        self.mark(&mut wait)?;
        self.a.in_(al, dx)?;
        self.a.test(al, 0x20)?;
        self.a.jz(wait)?;
        self.a.pop(eax)?;
        self.a.mov(dx, u32::from(COM1))?;
        self.a.out(dx, al)?;
        self.a.pop(edx)?;
        self.a.ret()?;

        // putnl.
        let l = self.r.putnl;
        self.export("putnl", l)?;
        self.a.push(eax)?;
        self.a.mov(al, u32::from(b'\n'))?;
        self.a.call(self.r.putc)?;
        self.a.pop(eax)?;
        self.a.ret()?;

        // puts: ESI.
        let l = self.r.puts;
        self.export("puts", l)?;
        self.a.pushad()?;
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
        self.a.popad()?;
        self.a.ret()?;

        // puthex: EAX, 8 digits; puthex2: AL, 2 digits.
        for (name, digits) in [("puthex", 8u32), ("puthex2", 2)] {
            let l = if digits == 8 {
                self.r.puthex
            } else {
                self.r.puthex2
            };
            self.export(name, l)?;
            self.a.pushad()?;
            self.a.mov(edx, eax)?;
            if digits == 2 {
                self.a.shl(edx, 24)?;
            }
            self.a.mov(ecx, digits)?;
            let mut lp = self.a.create_label();
            self.mark(&mut lp)?;
            self.a.rol(edx, 4)?;
            self.a.mov(eax, edx)?;
            self.a.and(eax, 0xf)?;
            self.a.mov(al, byte_ptr(eax + self.s.hexdigits))?;
            self.a.call(self.r.putc)?;
            self.a.dec(ecx)?;
            self.a.jnz(lp)?;
            self.a.popad()?;
            self.a.ret()?;
        }

        // puthex64: EDX:EAX, 16 digits.
        let l = self.r.puthex64;
        self.export("puthex64", l)?;
        self.a.push(eax)?;
        self.a.mov(eax, edx)?;
        self.a.call(self.r.puthex)?;
        self.a.pop(eax)?;
        self.a.call(self.r.puthex)?;
        self.a.ret()?;

        // putdec: EAX, unsigned decimal.
        let l = self.r.putdec;
        self.export("putdec", l)?;
        self.a.pushad()?;
        self.a.mov(ecx, 10u32)?;
        self.a.xor(ebx, ebx)?;
        let mut divide = self.a.create_label();
        let mut print = self.a.create_label();
        self.mark(&mut divide)?;
        self.a.xor(edx, edx)?;
        self.a.div(ecx)?;
        self.a.push(edx)?;
        self.a.inc(ebx)?;
        self.a.test(eax, eax)?;
        self.a.jnz(divide)?;
        self.mark(&mut print)?;
        self.a.pop(eax)?;
        self.a.add(al, u32::from(b'0'))?;
        self.a.call(self.r.putc)?;
        self.a.dec(ebx)?;
        self.a.jnz(print)?;
        self.a.popad()?;
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

        // dump_mem: EBX = address, ECX = length (> 0); 32 bytes per `H` line.
        let l = self.r.dump_mem;
        self.export("dump_mem", l)?;
        self.a.pushad()?;
        let mut row = self.a.create_label();
        let mut col = self.a.create_label();
        let mut last = self.a.create_label();
        self.mark(&mut row)?;
        self.text(&format!("{PREFIX}H "))?;
        self.a.mov(edx, 32u32)?;
        self.mark(&mut col)?;
        self.a.mov(al, byte_ptr(ebx))?;
        self.a.call(self.r.puthex2)?;
        self.a.inc(ebx)?;
        self.a.dec(ecx)?;
        self.a.jz(last)?;
        self.a.dec(edx)?;
        self.a.jnz(col)?;
        self.a.call(self.r.putnl)?;
        self.a.jmp(row)?;
        self.mark(&mut last)?;
        self.a.call(self.r.putnl)?;
        self.a.popad()?;
        self.a.ret()?;
        Ok(())
    }

    fn emit_dumps(&mut self, dumps: &[super::DumpRegion]) -> R {
        for d in dumps {
            self.text(&format!(
                "{PREFIX}DUMP addr={:08x} len={:08x} name={}\n",
                d.addr, d.len, d.name
            ))?;
            self.a.mov(ebx, d.addr)?;
            self.a.mov(ecx, d.len)?;
            self.a.call(self.r.dump_mem)?;
            self.text(&format!("{PREFIX}END\n"))?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Interrupt and exception handlers.

    fn emit_vectors(&mut self, dumps: &[super::DumpRegion], dump_on_exception: bool) -> R {
        // One stub per vector: push a dummy error code where the CPU pushes
        // none, push the vector, join the common path.
        for v in 0..256u32 {
            let l = self.a.create_label();
            let name = format!("vec_{v:02x}");
            let l = self.export(&name, l)?;
            self.vectors.push(l);
            if v == 2 {
                // NMI: count it and return (DS may be anything here).
                self.a.push(ds)?;
                self.a.push(eax)?;
                self.a.mov(ax, u32::from(SEL_DATA32))?;
                self.a.mov(ds, ax)?;
                self.a.inc(dword_ptr(self.s.nmi_count))?;
                self.a.pop(eax)?;
                self.a.pop(ds)?;
                self.a.iretd()?;
                continue;
            }
            if v == u32::from(SPURIOUS_VECTOR) {
                // Spurious APIC interrupt: count, no EOI.
                self.a.push(ds)?;
                self.a.push(eax)?;
                self.a.mov(ax, u32::from(SEL_DATA32))?;
                self.a.mov(ds, ax)?;
                self.a.inc(dword_ptr(self.s.spurious))?;
                self.a.pop(eax)?;
                self.a.pop(ds)?;
                self.a.iretd()?;
                continue;
            }
            if !has_error_code(v) {
                self.a.push(0u32)?;
            }
            self.a.push(v)?;
            self.a.jmp(self.r.exc_common)?;
        }

        // Common path. Stack: vector, error code, EIP, CS, EFLAGS.
        let l = self.r.exc_common;
        self.export("exc_common", l)?;
        self.a.mov(ax, u32::from(SEL_DATA32))?;
        self.a.mov(ds, ax)?;
        self.a.mov(es, ax)?;
        for (off, slot) in [
            (0, self.s.exc_vec),
            (4, self.s.exc_err),
            (8, self.s.exc_eip),
            (12, self.s.exc_cs),
            (16, self.s.exc_eflags),
        ] {
            self.a.mov(ecx, dword_ptr(esp + off))?;
            self.a.mov(dword_ptr(slot), ecx)?;
        }
        self.a.mov(ss, ax)?;
        self.a.mov(esp, self.t.exc_stack_top)?;
        self.a.cld()?;
        let mut nested = self.a.create_label();
        self.a.cmp(dword_ptr(self.s.in_exc), 0)?;
        self.a.jne(nested)?;
        self.a.mov(dword_ptr(self.s.in_exc), 1u32)?;
        self.text(&format!("{PREFIX}EXC vec="))?;
        self.a.mov(eax, dword_ptr(self.s.exc_vec))?;
        self.a.call(self.r.puthex2)?;
        self.field_hex("err", self.s.exc_err)?;
        self.field_hex("eip", self.s.exc_eip)?;
        self.field_hex("cs", self.s.exc_cs)?;
        self.field_hex("eflags", self.s.exc_eflags)?;
        self.text(" cr2=")?;
        self.a.mov(eax, cr2)?;
        self.a.call(self.r.puthex)?;
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
        self.field_hex("eip", self.s.exc_eip)?;
        self.a.call(self.r.putnl)?;
        self.exit_with(EXIT_HOST_EXCEPTION)?;
        Ok(())
    }

    // ------------------------------------------------------------------
    // The snapshot routine, generated from the item table.
    //
    // Called as `push adjust; push buffer; call snap` (it pops both). It
    // records every item into `buffer` and preserves all registers and flags.
    // The recorded ESP is the caller's ESP before the two pushes plus
    // `adjust`, so a caller with extra words on the stack can still record
    // the ESP of the call site.

    fn emit_snap(&mut self, items: &[SnapItem]) -> R {
        // Frame after pushfd, pushad and the two saved selectors:
        //   [esp+0] ES, [esp+4] DS, then F = esp+8:
        //   F+0 EDI, F+4 ESI, F+8 EBP, F+12 ESP, F+16 EBX, F+20 EDX, F+24 ECX,
        //   F+28 EAX, F+32 EFLAGS, F+36 return, F+40 buffer, F+44 adjust,
        //   F+48 the caller's stack before the pushes.
        const F: i32 = 8;
        let l = self.r.snap;
        self.export("snap", l)?;
        self.a.pushfd()?;
        self.a.pushad()?;
        self.a.xor(eax, eax)?;
        self.a.mov(ax, ds)?;
        self.a.push(eax)?;
        self.a.mov(ax, es)?;
        self.a.push(eax)?;
        self.a.mov(ax, u32::from(SEL_DATA32))?;
        self.a.mov(ds, ax)?;
        self.a.mov(es, ax)?;
        self.a.mov(edi, dword_ptr(esp + (F + 40)))?;
        for (idx, item) in items.iter().enumerate() {
            self.emit_source(&item.source, F)?;
            self.a.mov(dword_ptr(edi + (idx as i32) * 4), eax)?;
        }
        self.a.pop(eax)?;
        self.a.mov(es, ax)?;
        self.a.pop(eax)?;
        self.a.mov(ds, ax)?;
        self.a.popad()?;
        self.a.popfd()?;
        self.a.ret_1(8)?;
        Ok(())
    }

    fn emit_source(&mut self, source: &SnapSource, f: i32) -> R {
        let a = &mut self.a;
        match source {
            SnapSource::Ebx => a.mov(eax, dword_ptr(esp + (f + 16)))?,
            SnapSource::Esi => a.mov(eax, dword_ptr(esp + (f + 4)))?,
            SnapSource::Edi => a.mov(eax, dword_ptr(esp + f))?,
            SnapSource::Ebp => a.mov(eax, dword_ptr(esp + (f + 8)))?,
            SnapSource::Esp => {
                a.lea(eax, ptr(esp + (f + 48)))?;
                a.add(eax, dword_ptr(esp + (f + 44)))?;
            }
            SnapSource::Eflags => a.mov(eax, dword_ptr(esp + (f + 32)))?,
            SnapSource::Seg(Seg::Ds) => a.mov(eax, dword_ptr(esp + 4))?,
            SnapSource::Seg(Seg::Es) => a.mov(eax, dword_ptr(esp))?,
            SnapSource::Seg(seg) => {
                let reg = match seg {
                    Seg::Cs => cs,
                    Seg::Fs => fs,
                    Seg::Gs => gs,
                    _ => ss,
                };
                a.xor(eax, eax)?;
                a.mov(ax, reg)?;
            }
            SnapSource::GdtrBase | SnapSource::GdtrLimit => {
                a.sgdt(ptr(self.s.scratch))?;
                if matches!(source, SnapSource::GdtrBase) {
                    a.mov(eax, dword_ptr(self.s.scratch + 2))?;
                } else {
                    a.movzx(eax, word_ptr(self.s.scratch))?;
                }
            }
            SnapSource::IdtrBase | SnapSource::IdtrLimit => {
                a.sidt(ptr(self.s.scratch))?;
                if matches!(source, SnapSource::IdtrBase) {
                    a.mov(eax, dword_ptr(self.s.scratch + 2))?;
                } else {
                    a.movzx(eax, word_ptr(self.s.scratch))?;
                }
            }
            SnapSource::Ldtr => {
                a.xor(eax, eax)?;
                a.sldt(ax)?;
            }
            SnapSource::Tr => {
                a.xor(eax, eax)?;
                a.str(ax)?;
            }
            SnapSource::TssDescriptorHigh => {
                a.mov(eax, dword_ptr(self.t.gdt + u32::from(SEL_TSS32) + 4))?;
            }
            SnapSource::Cr(n) => match n {
                0 => a.mov(eax, cr0)?,
                2 => a.mov(eax, cr2)?,
                3 => a.mov(eax, cr3)?,
                4 => a.mov(eax, cr4)?,
                _ => {
                    return Err(BuildError::Internal(format!(
                        "snapshot of CR{n} is not supported"
                    )))
                }
            },
            SnapSource::Dr(n) => match n {
                0 => a.mov(eax, dr0)?,
                1 => a.mov(eax, dr1)?,
                2 => a.mov(eax, dr2)?,
                3 => a.mov(eax, dr3)?,
                6 => a.mov(eax, dr6)?,
                7 => a.mov(eax, dr7)?,
                _ => {
                    return Err(BuildError::Internal(format!(
                        "snapshot of DR{n} is not supported"
                    )))
                }
            },
            SnapSource::Msr { index, high } => {
                let guard = match *index {
                    MSR_EFER => Some(FEATURE_EFER),
                    MSR_SYSENTER_CS => Some(FEATURE_SEP),
                    MSR_APIC_BASE => Some(FEATURE_APIC),
                    _ => None,
                };
                let mut absent = a.create_label();
                let mut done = a.create_label();
                if let Some(bit) = guard {
                    a.test(dword_ptr(self.s.features), bit)?;
                    a.jz(absent)?;
                }
                a.mov(ecx, *index)?;
                a.rdmsr()?;
                if *high {
                    a.mov(eax, edx)?;
                }
                a.jmp(done)?;
                a.set_label(&mut absent)?;
                a.xor(eax, eax)?;
                a.set_label(&mut done)?;
                a.zero_bytes()?;
            }
            SnapSource::Mem(addr) => a.mov(eax, dword_ptr(*addr))?,
            SnapSource::FsDword(off) => {
                let mut bad = a.create_label();
                let mut done = a.create_label();
                a.xor(eax, eax)?;
                a.mov(ax, fs)?;
                a.cmp(eax, u32::from(SEL_LDT_FS))?;
                a.jne(bad)?;
                a.mov(eax, dword_ptr(*off).fs())?;
                a.jmp(done)?;
                a.set_label(&mut bad)?;
                a.mov(eax, u32::MAX)?;
                a.set_label(&mut done)?;
                a.zero_bytes()?;
            }
            SnapSource::Custom(emit) => emit(a)?,
        }
        Ok(())
    }
}

/// Validates the builder, lays everything out, generates and assembles.
pub(super) fn build(mut b: HostKernelBuilder) -> Result<Testbed, BuildError> {
    // ---- validation -------------------------------------------------------
    let entry64 = super::validate(&b)?;
    let mode = b.mode;
    let entry = narrow("entry", entry64, mode)?;
    let arg1 = narrow("arg1", b.arg1, mode)?;
    let cookie_addr = b
        .cookie_addr
        .map(|c| narrow("cookie address", c, mode))
        .transpose()?;
    let dumps = b
        .dumps
        .iter()
        .map(|d| {
            Ok(super::DumpRegion {
                name: d.name.clone(),
                addr: narrow("dump address", d.addr, mode)?,
                len: d.len,
            })
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    if let Some(it) = b.extra_items64.first() {
        return Err(BuildError::ItemWidth {
            name: it.name.clone(),
            width: 64,
            mode,
        });
    }
    let mut items = if b.x2apic {
        super::default_items_x2apic()
    } else {
        super::default_items()
    };
    items.append(&mut b.extra_items);
    super::check_item_names(items.iter().map(|i| i.name.as_str()))?;
    for name in &b.skip {
        let it = items
            .iter_mut()
            .find(|it| &it.name == name)
            .ok_or_else(|| BuildError::UnknownItem(name.clone()))?;
        it.mask = 0;
    }

    // ---- page tables -------------------------------------------------------
    let map = super::host_page_map(&b)?;
    let tables_pages = map.table_pages();
    let tables = map.layout(TABLES_BASE);
    super::check_addresses(&tables, &b, entry64)?;

    // ---- data --------------------------------------------------------------
    let data_base = TABLES_BASE + tables_pages * PAGE;
    let mut d = DataArena::new(data_base);
    let n_items = items.len() as u32;
    let n_vcpus = b.vcpus.len() as u32;
    let mut gdt_entries = vec![
        0u64,
        descriptor(0, 0xfffff, 0x9a, 0xc), // code32
        descriptor(0, 0xfffff, 0x92, 0xc), // data32
        descriptor(0, 0xfffff, 0x92, 0xc), // data32 alias
        0,                                 // TSS (below)
        0,                                 // LDT (below)
    ];
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
    let mut tss_bytes = [0u8; 104];
    tss_bytes[4..8].copy_from_slice(&stack_top.to_le_bytes()); // ESP0
    tss_bytes[8..10].copy_from_slice(&SEL_DATA32.to_le_bytes()); // SS0
    tss_bytes[102..104].copy_from_slice(&104u16.to_le_bytes()); // no I/O bitmap
    let tss = d.bytes(&tss_bytes, 16);
    let tss_desc = descriptor(tss, 103, 0x89, 0);
    let ldt_desc = descriptor(ldt, 7, 0x82, 0);
    let ok = d.write(gdt + u32::from(SEL_TSS32), &tss_desc.to_le_bytes())
        && d.write(gdt + u32::from(SEL_LDT), &ldt_desc.to_le_bytes());
    if !ok {
        return Err(BuildError::Internal("GDT outside the data area".into()));
    }
    let idt = d.zeroed(256 * 8, 16);
    let mut gdtr = [0u8; 6];
    gdtr[..2].copy_from_slice(&gdt_limit.to_le_bytes());
    gdtr[2..].copy_from_slice(&gdt.to_le_bytes());
    let gdtr = d.bytes(&gdtr, 8);
    let mut idtr = [0u8; 6];
    idtr[..2].copy_from_slice(&(256u16 * 8 - 1).to_le_bytes());
    idtr[2..].copy_from_slice(&idt.to_le_bytes());
    let idtr = d.bytes(&idtr, 8);
    let arg2_table: Vec<u8> = b.vcpus.iter().flat_map(|v| v.to_le_bytes()).collect();
    let arg2_table = d.bytes(&arg2_table, 4);
    let stats = d.bytes(&initial_stats(n_vcpus), 4);
    let masks: Vec<u8> = items.iter().flat_map(|i| i.mask.to_le_bytes()).collect();
    let item_mask = d.bytes(&masks, 4);
    let item_names = d.zeroed(4 * items.len(), 4);
    for (i, it) in items.iter().enumerate() {
        let s = d.string(&it.name);
        if !d.write(item_names + 4 * i as u32, &s.to_le_bytes()) {
            return Err(BuildError::Internal("item name table".into()));
        }
    }
    let snap_before = d.zeroed(4 * items.len(), 4);
    let snap_after = d.zeroed(4 * items.len(), 4);
    let s = Slots {
        mb_eax: d.dword(0),
        mb_ebx: d.dword(0),
        phase: d.dword(Phase::Setup.code()),
        features: d.dword(0),
        apic_ver: d.dword(0),
        trip: d.dword(0),
        vcpu: d.dword(0),
        arg1: d.dword(0),
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
        exc_vec: d.dword(0),
        exc_err: d.dword(0),
        exc_eip: d.dword(0),
        exc_cs: d.dword(0),
        exc_eflags: d.dword(0),
        hexdigits: d.bytes(b"0123456789abcdef", 4),
    };
    let t = Tables {
        gdt,
        gdt_limit,
        gdtr,
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
    };

    let mut a = CodeAssembler::new(32)?;
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
    let run = RunArgs {
        entry,
        arg1,
        cookie_addr,
        n_items,
        dumps,
    };
    emit_main(&mut g, &mut b, &run)?;
    g.emit_serial()?;
    g.emit_snap(&items)?;
    g.emit_vectors(&run.dumps, b.dump_on_exception)?;

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
        let handler = result.label_ip(l)? as u32;
        if !g.d.write(
            g.t.idt + 8 * i as u32,
            &interrupt_gate(handler, SEL_CODE32).to_le_bytes(),
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

    // Boot stub: save the multiboot registers, load the GDT, far-jump to the code.
    let mut stub = CodeAssembler::new(32)?;
    stub.cli()?;
    stub.cld()?;
    stub.mov(dword_ptr(g.s.mb_eax), eax)?;
    stub.mov(dword_ptr(g.s.mb_ebx), ebx)?;
    stub.lgdt(ptr(g.t.gdtr))?;
    stub.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1632,
        SEL_CODE32,
        code_base,
    )?)?;
    let stub = stub.assemble(u64::from(STUB_ADDR))?;

    // ---- image -------------------------------------------------------------
    let mut fs_page = vec![0u8; PAGE as usize];
    fs_page[..4].copy_from_slice(&FS_MAGIC.to_le_bytes());
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
        ("gdtr", g.t.gdtr),
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
        mode: b.mode,
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

/// Builder values narrowed to the 32-bit kernel.
struct RunArgs {
    entry: u32,
    arg1: u32,
    cookie_addr: Option<u32>,
    n_items: u32,
    dumps: Vec<super::DumpRegion>,
}

/// Setup, the call loop and the summary.
fn emit_main(g: &mut Gen, b: &mut HostKernelBuilder, run: &RunArgs) -> R {
    let mode = b.mode;
    let (entry, n_items) = (run.entry, run.n_items);
    let n_vcpus = b.vcpus.len() as u32;
    let start = g.a.create_label();
    g.export("start", start)?;
    g.a.mov(ax, u32::from(SEL_DATA32))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.mov(gs, ax)?;
    g.a.xor(eax, eax)?;
    g.a.mov(fs, ax)?;
    g.a.mov(esp, g.t.stack_top)?;
    g.phase(Phase::Setup)?;
    g.a.call(g.r.serial_init)?;
    g.text(&format!("{PREFIX}BOOT mode={mode} mbeax="))?;
    g.hex_mem(g.s.mb_eax)?;
    g.text(&format!(
        " trips={} vcpus={n_vcpus} items={n_items} entry={entry:08x}\n",
        b.trips
    ))?;

    // Legacy PIC: mask everything (LINT0 goes to NMI mode below).
    g.a.mov(al, 0xffu32)?;
    g.a.mov(dx, 0x21u32)?;
    g.a.out(dx, al)?;
    g.a.mov(dx, 0xa1u32)?;
    g.a.out(dx, al)?;

    // Descriptor tables.
    g.a.lidt(ptr(g.t.idtr))?;
    g.a.mov(ax, u32::from(SEL_TSS32))?;
    g.a.ltr(ax)?;
    g.a.mov(ax, u32::from(SEL_LDT))?;
    g.a.lldt(ax)?;
    g.a.mov(ax, u32::from(SEL_LDT_FS))?;
    g.a.mov(fs, ax)?;

    // CPUID features.
    let feat = g.s.features;
    emit_cpuid_features(g)?;

    // Paging.
    let mut cr4_bits = Cr4::PGE | Cr4::OSFXSR | Cr4::OSXMMEXCPT;
    if b.pse {
        cr4_bits |= Cr4::PSE;
    }
    if mode == HostMode::Pae {
        cr4_bits |= Cr4::PAE;
    }
    let cr0_bits = Cr0::PG | Cr0::WP | Cr0::NE | Cr0::MP | Cr0::ET | Cr0::PE;
    g.a.mov(eax, TABLES_BASE)?;
    g.a.mov(cr3, eax)?;
    g.a.mov(eax, cr4)?;
    g.a.or(eax, cr4_bits.bits() as u32)?;
    g.a.mov(cr4, eax)?;
    g.a.mov(eax, cr0)?;
    g.a.or(eax, cr0_bits.bits() as u32)?;
    g.a.mov(cr0, eax)?;
    let mut paged = g.a.create_label();
    g.a.jmp(paged)?;
    g.mark(&mut paged)?;

    // EFER.NXE / EFER.SCE as a real host has them.
    let mut no_efer = g.a.create_label();
    g.unless_feature(FEATURE_EFER, no_efer)?;
    g.a.mov(ecx, MSR_EFER)?;
    g.a.rdmsr()?;
    for (flag, bit) in [(FEATURE_NX, Efer::NXE), (FEATURE_SCE, Efer::SCE)] {
        let mut no = g.a.create_label();
        g.unless_feature(flag, no)?;
        g.a.or(eax, bit.bits() as u32)?;
        g.mark(&mut no)?;
    }
    g.a.wrmsr()?;
    g.mark(&mut no_efer)?;

    // SYSENTER_CS = the kernel code selector.
    let mut no_sep = g.a.create_label();
    g.unless_feature(FEATURE_SEP, no_sep)?;
    g.a.mov(ecx, MSR_SYSENTER_CS)?;
    g.a.mov(eax, u32::from(SEL_CODE32))?;
    g.a.xor(edx, edx)?;
    g.a.wrmsr()?;
    g.mark(&mut no_sep)?;

    // Local APIC.
    emit_apic_setup(g, b.x2apic)?;

    // HOST and APIC lines.
    g.text(&format!("{PREFIX}HOST cr0="))?;
    for (i, reg) in [cr0, cr3, cr4].into_iter().enumerate() {
        if i > 0 {
            g.text(if i == 1 { " cr3=" } else { " cr4=" })?;
        }
        g.a.mov(eax, reg)?;
        g.a.call(g.r.puthex)?;
    }
    g.text(" efer=")?;
    let mut efer_absent = g.a.create_label();
    let mut efer_done = g.a.create_label();
    g.unless_feature(FEATURE_EFER, efer_absent)?;
    g.a.mov(ecx, MSR_EFER)?;
    g.a.rdmsr()?;
    g.a.jmp(efer_done)?;
    g.mark(&mut efer_absent)?;
    g.a.xor(eax, eax)?;
    g.a.xor(edx, edx)?;
    g.mark(&mut efer_done)?;
    g.a.xchg(eax, edx)?;
    g.a.call(g.r.puthex)?;
    g.a.mov(eax, edx)?;
    g.a.call(g.r.puthex)?;
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
    g.field_hex("magic", MAGIC_VIRT)?;
    g.text(" fs0=")?;
    g.a.mov(eax, dword_ptr(0u32).fs())?;
    g.a.call(g.r.puthex)?;
    g.field_hex("features", feat)?;
    g.a.call(g.r.putnl)?;

    emit_apic_line(g, b.x2apic)?;

    // ---- the call loop ---------------------------------------------------------
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
    g.a.mov(eax, dword_ptr(eax * 4 + g.t.arg2_table))?;
    g.a.mov(dword_ptr(g.s.arg2), eax)?;
    g.a.mov(dword_ptr(g.s.arg1), run.arg1)?;
    g.a.mov(eax, dword_ptr(g.s.trip))?;
    g.a.imul_3(eax, eax, 0x9e37_79b9u32)?;
    g.a.mov(ecx, dword_ptr(g.s.vcpu))?;
    g.a.imul_3(ecx, ecx, 0x85eb_ca6bu32)?;
    g.a.xor(eax, ecx)?;
    g.a.xor(eax, super::COOKIE_SEED)?;
    g.a.mov(dword_ptr(g.s.cookie), eax)?;
    if let Some(addr) = run.cookie_addr {
        g.a.mov(dword_ptr(addr), eax)?;
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

    // (a) pre-call hook.
    if let Some(hook) = b.pre_hook.as_mut() {
        let l = g.a.create_label();
        g.export("pre_hook", l)?;
        g.run_hook(hook)?;
    }

    // (b) patterns in the callee-saved registers, snapshot.
    g.phase(Phase::Snapshot)?;
    g.a.mov(eax, dword_ptr(g.s.cookie))?;
    for (reg, pattern) in [
        (ebx, PATTERN_EBX),
        (esi, PATTERN_ESI),
        (edi, PATTERN_EDI),
        (ebp, PATTERN_EBP),
    ] {
        g.a.mov(reg, eax)?;
        g.a.xor(reg, pattern)?;
    }
    g.a.cld()?;
    g.a.sti()?;
    g.a.push(0u32)?;
    g.a.push(g.t.snap_before)?;
    g.a.call(g.r.snap)?;

    // (c) the call, timed.
    g.a.push(dword_ptr(g.s.arg2))?;
    g.a.push(dword_ptr(g.s.arg1))?;
    g.phase(Phase::Call)?;
    g.a.rdtsc()?;
    g.a.mov(dword_ptr(g.s.tsc0), eax)?;
    g.a.mov(dword_ptr(g.s.tsc0 + 4), edx)?;
    let call_site = g.a.create_label();
    g.export("call_site", call_site)?;
    g.a.call(u64::from(entry))?;
    let after_call = g.a.create_label();
    g.export("after_call", after_call)?;
    // Only stack (SS) accesses until the snapshot has recorded DS and ES.
    g.a.push(eax)?;
    g.a.rdtsc()?;
    g.a.push(edx)?;
    g.a.push(eax)?;
    g.a.mov(dword_ptr(g.s.phase).ss(), Phase::Snapshot.code())?;
    // Extra words since the call site's ESP: 2 args + ret + tsc (2) = 20 bytes.
    g.a.push(20u32)?;
    g.a.push(g.t.snap_after)?;
    g.a.call(g.r.snap)?;

    // Back to the kernel's data segments (FS is restored after the report).
    g.a.mov(ax, u32::from(SEL_DATA32))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(gs, ax)?;
    g.a.cld()?;
    g.phase(Phase::Check)?;
    g.a.pop(eax)?;
    g.a.pop(edx)?;
    g.a.sub(eax, dword_ptr(g.s.tsc0))?;
    g.a.sbb(edx, dword_ptr(g.s.tsc0 + 4))?;
    let mut small = g.a.create_label();
    g.a.jz(small)?;
    g.a.mov(eax, u32::MAX)?;
    g.mark(&mut small)?;
    g.a.mov(dword_ptr(g.s.delta), eax)?;
    g.a.pop(eax)?;
    g.a.mov(dword_ptr(g.s.ret), eax)?;
    g.a.add(esp, 8)?;

    // (d) compare the snapshots.
    let limit = b.max_report_lines;
    let mut cmp_loop = g.a.create_label();
    let mut cmp_next = g.a.create_label();
    g.a.xor(ecx, ecx)?;
    g.mark(&mut cmp_loop)?;
    g.a.mov(eax, dword_ptr(ecx * 4 + g.t.snap_before))?;
    g.a.xor(eax, dword_ptr(ecx * 4 + g.t.snap_after))?;
    g.a.and(eax, dword_ptr(ecx * 4 + g.t.item_mask))?;
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
    g.a.push(esi)?;
    g.a.mov(esi, dword_ptr(ecx * 4 + g.t.item_names))?;
    g.a.call(g.r.puts)?;
    g.a.pop(esi)?;
    g.text(" before=")?;
    g.a.mov(eax, dword_ptr(ecx * 4 + g.t.snap_before))?;
    g.a.call(g.r.puthex)?;
    g.text(" after=")?;
    g.a.mov(eax, dword_ptr(ecx * 4 + g.t.snap_after))?;
    g.a.call(g.r.puthex)?;
    g.a.call(g.r.putnl)?;
    g.mark(&mut cmp_next)?;
    g.a.inc(ecx)?;
    g.a.cmp(ecx, n_items)?;
    g.a.jb(cmp_loop)?;

    // (e) the return value.
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
    // Per-VCPU statistics record in EBX from here on.
    let mut ret_ok = g.a.create_label();
    if check {
        g.a.mov(dword_ptr(g.s.want), eax)?;
        g.a.cmp(eax, dword_ptr(g.s.ret))?;
        g.a.je(ret_ok)?;
        g.a.mov(eax, dword_ptr(g.s.vcpu))?;
        g.a.imul_3(ebx, eax, STAT_SIZE)?;
        g.a.inc(dword_ptr(ebx + (g.t.stats + STAT_RETFAIL)))?;
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
    g.a.add(ebx, g.t.stats)?;
    let mut hook_ok = g.a.create_label();
    g.a.cmp(dword_ptr(g.s.hook_fail), 0)?;
    g.a.je(hook_ok)?;
    g.a.inc(dword_ptr(ebx + STAT_HOOKFAIL))?;
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
    g.a.inc(dword_ptr(ebx + STAT_MISM))?;
    g.a.inc(dword_ptr(g.s.mism))?;
    g.a.mov(dword_ptr(g.s.iter_failed), 1u32)?;
    g.mark(&mut mism_ok)?;
    g.a.inc(dword_ptr(ebx + STAT_CALLS))?;
    g.a.inc(dword_ptr(g.s.calls))?;
    g.a.mov(eax, dword_ptr(g.s.delta))?;
    for (min, max, sum) in [
        (
            ptr(ebx + STAT_MIN),
            ptr(ebx + STAT_MAX),
            ptr(ebx + STAT_SUM),
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
        g.a.cmp(dword_ptr(g.s.trip), trip)?;
        g.a.jne(skip)?;
        g.a.mov(dword_ptr(ebx + off), eax)?;
        g.mark(&mut skip)?;
    }
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
    // FS back to the host's LDT selector for the next call.
    g.a.mov(ax, u32::from(SEL_LDT_FS))?;
    g.a.mov(fs, ax)?;
    if b.stop_on_failure {
        g.a.cmp(dword_ptr(g.s.iter_failed), 0)?;
        g.a.jne(done)?;
    }
    g.a.inc(dword_ptr(g.s.vcpu))?;
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
    for (i, arg2) in b.vcpus.clone().into_iter().enumerate() {
        let rec = g.t.stats + STAT_SIZE * i as u32;
        g.text(&format!("{PREFIX}VCPU vcpu={i} arg2={arg2:08x}"))?;
        g.field_dec("calls", rec + STAT_CALLS)?;
        g.field_dec("mismatches", rec + STAT_MISM)?;
        g.field_dec("retfails", rec + STAT_RETFAIL)?;
        g.field_dec("hookfails", rec + STAT_HOOKFAIL)?;
        g.field_dec("tsc_min", rec + STAT_MIN)?;
        g.field_dec("tsc_max", rec + STAT_MAX)?;
        g.field_hex("tsc_sum", rec + STAT_SUM + 4)?;
        g.hex_mem(rec + STAT_SUM)?;
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
    g.field_hex("tsc_sum", g.s.tsc_sum + 4)?;
    g.hex_mem(g.s.tsc_sum)?;
    g.a.call(g.r.putnl)?;
    g.text(&format!("{PREFIX}NMI count="))?;
    g.dec_mem(g.s.nmi_count)?;
    g.a.call(g.r.putnl)?;
    g.emit_dumps(&run.dumps)?;

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
    fn descriptors_match_the_sdm_layout() {
        assert_eq!(descriptor(0, 0xfffff, 0x9a, 0xc), 0x00cf_9a00_0000_ffff);
        assert_eq!(descriptor(0, 0xfffff, 0x92, 0xc), 0x00cf_9200_0000_ffff);
        let d = descriptor(0x1234_5678, 0x67, 0x89, 0);
        assert_eq!(d & 0xffff, 0x67);
        assert_eq!((d >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!((d >> 56) & 0xff, 0x12);
        assert_eq!((d >> 40) & 0xff, 0x89);
        let gate = interrupt_gate(0x0010_2345, 0x08);
        assert_eq!(gate & 0xffff, 0x2345);
        assert_eq!((gate >> 16) & 0xffff, 8);
        assert_eq!((gate >> 32) & 0xffff, 0x8e00);
        assert_eq!(gate >> 48, 0x10);
    }

    #[test]
    fn error_code_vectors() {
        let with: Vec<u32> = (0..32).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, vec![8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }
}
