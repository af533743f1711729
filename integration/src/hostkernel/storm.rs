//! The NMI storm: a deterministic NMI edge placed at every instruction
//! offset of the round trip, one offset per call
//! ([`HostKernelBuilder::nmi_storm`]).
//!
//! # The NMI source
//!
//! The legacy PIT (channel 0, mode 3, divisor [`NmiStorm::divisor`]) drives
//! IRQ 0 of the 8259, whose output reaches the local APIC's LINT0, which the
//! kernel programs for NMI delivery. Under `-icount shift=0` QEMU's virtual
//! clock advances one nanosecond per guest instruction and the vCPU stops
//! exactly at a timer deadline, so rising edge `n` after the count was
//! loaded arrives at a fixed instruction count: `load + ceil(n * D * 10^9 /
//! 1193182)` (plus a constant of the kernel's code). The NMI handler
//! acknowledges the 8259 with an OCW3 poll (a software INTA: IRR to ISR)
//! and a non-specific EOI, so every edge raises exactly one NMI. A masked
//! LINT0 delivers none; QEMU delivers an edge that arrived while LINT0 was
//! masked as soon as LINT0 is unmasked (the 8259's output is still high).
//!
//! # Setup
//!
//! After the APIC line the kernel masks LINT0, re-initialises both 8259s
//! (vector bases 0x20/0x28, only IRQ 0 unmasked), loads the PIT (reading the
//! TSC right before the count's high byte: the `pit_load` slot), clears the
//! 8259 with a poll and an EOI, unmasks LINT0, and waits for
//! [`PIT_SAMPLES`] NMIs whose TSCs (minus the load) it prints on a `PIT`
//! line. The judge checks them against the formula: a QEMU whose timer
//! behaves otherwise fails loudly instead of silently weakening the storm.
//!
//! # Each call
//!
//! Until the storm is complete, before each call (after the first
//! snapshot) the kernel waits for the next NMI (so no edge falls between
//! its computation and its target), reads the TSC, computes the first edge
//! after `o` instructions into the entry with a fixed-length sequence (two
//! `mul`, two `div`), and spins with `loop` until the edge falls exactly
//! `o` instructions after the entry's first instruction. The handler records
//! the first NMI taken during the call: its TSC minus the call's, the
//! interrupted instruction pointer and a context word ([`ctx`]). After the
//! call the kernel prints a `STORM` line and advances `o` when the edge fell
//! inside the path (`o` < the call's path length); after [`MISS_LIMIT`]
//! calls in a row whose paths all ended before `o` the storm is complete,
//! the kernel masks IRQ 0 and the remaining calls run without NMIs.
//!
//! The path is everything from the entry's first instruction to its
//! return, the far side's code (helper or RC code) included; its length is
//! the call's TSC delta minus the kernel's instructions around the call and
//! minus the NMI handler's own instructions.
//!
//! # Several CPUs: the interleaved storm
//!
//! With [`HostKernelBuilder::cpus`] above 1 the CPUs share the instruction
//! clock: between a CPU's RDTSC and an edge the other CPUs run too, so no
//! CPU can place an edge in its own instruction stream. The bootstrap CPU
//! sets up the 8259 and the PIT and takes the `PIT` samples before it
//! starts the others (so the line is exact, [`SHARED_LOAD_INSTRUCTIONS`]
//! later than on one CPU); it hands the load's TSC to the others in the
//! shared page, and each one, after its local APIC set-up, programs its own
//! LINT0 for NMI delivery and records its own CR3 as host CR3. The 8259's
//! output reaches every local APIC whose LINT0 is unmasked, so every edge
//! raises an NMI on each such CPU, wherever the round robin has left it;
//! the PIT's transitions are also the deadlines that interleave the CPUs.
//! Every handler acknowledges with the poll and the EOI: the first poll
//! takes the interrupt, the others find none.
//!
//! Nothing is placed and nothing is printed per call (a line per call
//! would serialise the CPUs on the print lock). Each CPU counts its calls,
//! the calls inside which an edge fell (the formula's edges, stepped
//! exactly in 64-bit TSC arithmetic), the *hidden* ones among them (no
//! NMI taken: the edge fell while LINT0 was masked and another CPU polled
//! the 8259 before the unmask), the NMIs taken during calls and how many of
//! those outside host context (with the first one's address and context),
//! and prints them on a `STORMCPU` line after its `CPU` line. The last CPU
//! to finish its calls masks IRQ 0.

use iced_x86::code_asm::*;

use super::common::{Gen, R};
use super::{HostKernelBuilder, SEL64_CODE, SEL_CODE32};
use crate::transcript::{Phase, PREFIX};

/// The PIT's input clock in Hz.
pub const PIT_HZ: u32 = 1_193_182;
/// The divisor the storm programs by default: an edge every ~1676 instructions.
pub const DEFAULT_DIVISOR: u16 = 2;
/// NMIs whose arrival the kernel records for the `PIT` line.
pub const PIT_SAMPLES: usize = 6;
/// Calls in a row whose path ended before the target offset after which the
/// storm is complete.
pub const MISS_LIMIT: u32 = 64;
/// Instructions between the kernel's two RDTSCs around a call that are not
/// the callee's (the first RDTSC, the two stores of its value, the `call`,
/// the push of the return value).
pub const CALL_OVERHEAD: u32 = 5;
/// The handler's TSC minus the call's, less the target offset, for an NMI
/// taken exactly at its target: the instructions from the call's RDTSC to
/// the entry, and the handler's own before its RDTSC.
pub const DT_AT_TARGET: u32 = 10;
/// An edge's TSC (minus the PIT load) less the formula, as the handler's
/// RDTSC sees it (the `PIT` line's check).
pub const PIT_EDGE_DELAY: u32 = 11;
/// What the placement adds to the target offset so that the edge lands
/// exactly `o` instructions into the entry.
const PLACEMENT: u32 = 17;
/// [`PLACEMENT`] in the 64-bit kernel.
const PLACEMENT_64: u32 = 17;
/// Instructions of the handler not between its two RDTSCs.
const HANDLER_EXTRA: u32 = 16;
/// Instructions of the handler before its first RDTSC.
const HANDLER_BEFORE_RDTSC: u32 = 6;
/// With several CPUs, the instructions between the load's RDTSC and the
/// count's high byte that hand the load to the other CPUs: the `PIT`
/// line's edges come this much later than on one CPU.
pub const SHARED_LOAD_INSTRUCTIONS: u32 = 3;
/// In an interleaved storm, an edge reaches the CPUs this many
/// instructions after the formula's arrival (the handler's RDTSC, on the
/// `PIT` line, comes [`HANDLER_BEFORE_RDTSC`] instructions later).
const EDGE_AFTER_LOAD: u32 = PIT_EDGE_DELAY + SHARED_LOAD_INSTRUCTIONS - HANDLER_BEFORE_RDTSC;

/// The context word the handler records (`ctx` of the `STORM` line).
pub mod ctx {
    /// Bits 0–1: the paging mode (0 off, 1 32-bit, 2 PAE, 3 long mode).
    pub const PAGING: u32 = 0x3;
    /// CS was the host kernel's code selector.
    pub const HOST_CS: u32 = 1 << 2;
    /// CR3 was the host's.
    pub const HOST_CR3: u32 = 1 << 3;
}

/// The paging-mode code of [`ctx::PAGING`] for a name.
pub fn paging_name(code: u32) -> &'static str {
    match code & ctx::PAGING {
        0 => "paging off",
        1 => "32-bit paging",
        2 => "PAE paging",
        _ => "long mode",
    }
}

/// What the storm needs from the builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NmiStorm {
    /// PIT divisor (2–4: the period must exceed the wait, the placement and
    /// the longest path, and `D * 10^9` must fit 32 bits).
    pub divisor: u16,
    /// Host-virtual address of the far side's NMI counter (a dword), printed
    /// as `far` on each `STORM` line; `None` prints 0.
    pub far_nmis: Option<u64>,
    /// Host-virtual address of the far side's first NMI address (a dword),
    /// printed as `far_ip`; `None` prints 0.
    pub far_ip: Option<u64>,
}

impl Default for NmiStorm {
    fn default() -> Self {
        Self {
            divisor: DEFAULT_DIVISOR,
            far_nmis: None,
            far_ip: None,
        }
    }
}

impl NmiStorm {
    /// `D * 10^9`: the period's numerator (in ns, times the PIT clock).
    pub fn period_numerator(self) -> u32 {
        u32::from(self.divisor) * 1_000_000_000
    }

    /// The formula's arrival of rising edge `n` after the load:
    /// `ceil(n * D * 10^9 / 1193182)`.
    pub fn edge(self, n: u64) -> u64 {
        (n * u64::from(self.period_numerator())).div_ceil(u64::from(PIT_HZ))
    }
}

impl HostKernelBuilder {
    /// Turn on the NMI storm (see [the module](crate::hostkernel::storm)).
    pub fn nmi_storm(mut self, storm: NmiStorm) -> Self {
        self.storm = Some(storm);
        self
    }
}

/// The storm's data slots.
pub(super) struct StormSlots {
    far_nmis: Option<u64>,
    far_ip: Option<u64>,
    pit_load: u32,
    pit_n: u32,
    pit_ts: u32,
    host_cr3: u32,
    target: u32,
    misses: u32,
    done: u32,
    u: u32,
    pit_hz: u32,
    period: u32,
    call_nmis: u32,
    cost: u32,
    h_tsc: u32,
    first_dt: u32,
    first_ip: u32,
    first_ctx: u32,
    len: u32,
    /// With several CPUs: what the CPUs share (the storm is interleaved).
    share: Option<super::smp::StormShare>,
    /// The context word of host context ([`host_context`]).
    host_ctx: u32,
    /// Interleaved storm: this CPU's counters ([`Interleaved`]).
    il: Interleaved,
}

/// An interleaved storm's per-CPU slots: the next PIT edge by the formula
/// (`edge_t` relative to the load, `edge_b` the remainder that makes the
/// next step exact) and the counts of the `STORMCPU` line.
struct Interleaved {
    edge_t: u32,
    edge_b: u32,
    rel_t0: u32,
    calls: u32,
    edges: u32,
    hidden: u32,
    in_call: u32,
    host: u32,
    transit: u32,
    transit_ip: u32,
    transit_ctx: u32,
}

/// The context word ([`ctx`]) of an NMI taken in host context: the host's
/// paging mode, CS and CR3.
pub fn host_context(mode: crate::paging::HostMode) -> u32 {
    use crate::paging::HostMode;
    let paging = match mode {
        HostMode::Legacy32 => 1,
        HostMode::Pae => 2,
        HostMode::Amd64 => 3,
    };
    paging | ctx::HOST_CS | ctx::HOST_CR3
}

impl StormSlots {
    fn new(g: &mut Gen, storm: NmiStorm, host_ctx: u32) -> Self {
        let share = super::smp::storm_share(g);
        let d = &mut g.d;
        let il = Interleaved {
            edge_t: d.zeroed(8, 8),
            edge_b: d.dword(0),
            rel_t0: d.zeroed(8, 8),
            calls: d.dword(0),
            edges: d.dword(0),
            hidden: d.dword(0),
            in_call: d.dword(0),
            host: d.dword(0),
            transit: d.dword(0),
            transit_ip: d.zeroed(8, 8),
            transit_ctx: d.dword(0),
        };
        StormSlots {
            far_nmis: storm.far_nmis,
            far_ip: storm.far_ip,
            pit_load: d.zeroed(8, 8),
            pit_n: d.dword(0),
            pit_ts: d.zeroed(4 * PIT_SAMPLES, 4),
            host_cr3: d.dword(0),
            target: d.dword(0),
            misses: d.dword(0),
            done: d.dword(0),
            u: d.dword(0),
            pit_hz: d.dword(PIT_HZ),
            period: d.dword(storm.period_numerator()),
            call_nmis: d.dword(0),
            cost: d.dword(0),
            h_tsc: d.dword(0),
            first_dt: d.dword(0),
            first_ip: d.zeroed(8, 8),
            first_ctx: d.dword(0),
            len: d.dword(0),
            share,
            host_ctx,
            il,
        }
    }
}

/// `out imm8, AL`-style port write of a constant byte. Clobbers AL, DX.
fn outb(g: &mut Gen, port: u16, value: u8) -> R {
    g.a.mov(al, u32::from(value))?;
    g.a.mov(dx, u32::from(port))?;
    g.a.out(dx, al)?;
    Ok(())
}

/// Writes LINT0 (xAPIC through the MMIO page, or the x2APIC MSR). Clobbers
/// EAX, ECX, EDX.
fn write_lint0(g: &mut Gen, x2apic: bool, value: u32) -> R {
    if x2apic {
        g.a.mov(ecx, apic::x2apic_msr(apic::reg::LVT_LINT0))?;
        g.a.mov(eax, value)?;
        g.a.xor(edx, edx)?;
        g.a.wrmsr()?;
    } else {
        let reg = super::LAPIC_VIRT + apic::reg::LVT_LINT0;
        if g.bits64() {
            g.a.mov(ecx, reg)?;
            g.a.mov(dword_ptr(rcx), value)?;
        } else {
            g.a.mov(dword_ptr(reg), value)?;
        }
    }
    Ok(())
}

/// The 8259 acknowledge: OCW3 poll (0x0C to port 0x20, read 0x20), then a
/// non-specific EOI. Clobbers AL, DX.
fn ack_pic(g: &mut Gen) -> R {
    outb(g, 0x20, 0x0c)?;
    g.a.in_(al, dx)?;
    outb(g, 0x20, 0x20)
}

/// Programs LINT0, the 8259s and the PIT, waits for [`PIT_SAMPLES`] NMIs and
/// prints the `PIT` line. Does nothing without a storm. Clobbers EAX, EBX,
/// ECX, EDX.
pub(super) fn emit_setup(g: &mut Gen, b: &HostKernelBuilder) -> R {
    let Some(storm) = b.storm else {
        return Ok(());
    };
    if !g.bits64() {
        for (what, addr) in [
            ("far NMI counter", storm.far_nmis),
            ("far NMI address", storm.far_ip),
        ] {
            if let Some(a) = addr {
                super::narrow(what, a, b.mode)?;
            }
        }
    }
    let st = StormSlots::new(g, storm, host_context(b.mode));
    let nmi = apic::lvt::MODE_NMI;
    write_lint0(g, b.x2apic, nmi | apic::lvt::MASKED)?;
    // Both 8259s: ICW1 (edge, cascade, ICW4), ICW2 (vector base), ICW3, ICW4 (8086).
    for (port, value) in [
        (0x20u16, 0x11u8),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xfe),
        (0xa1, 0xff),
    ] {
        outb(g, port, value)?;
    }
    // PIT channel 0: lobyte/hibyte, mode 3, binary; the TSC right before
    // the high byte loads the count.
    let [lo, hi] = storm.divisor.to_le_bytes();
    outb(g, 0x43, 0x36)?;
    outb(g, 0x40, lo)?;
    g.a.mov(bl, u32::from(hi))?;
    g.a.rdtsc()?;
    g.a.mov(dword_ptr(st.pit_load), eax)?;
    if let Some(share) = &st.share {
        // SHARED_LOAD_INSTRUCTIONS (not in the one-CPU storm, whose PIT line
        // counts the instructions before the load).
        g.a.mov(dword_ptr(st.pit_load + 4), edx)?;
        g.a.mov(dword_ptr(share.load), eax)?;
        g.a.mov(dword_ptr(share.load + 4), edx)?;
    }
    g.a.mov(al, bl)?;
    g.a.mov(dx, 0x40u32)?;
    g.a.out(dx, al)?;
    ack_pic(g)?;
    if g.bits64() {
        g.a.mov(rax, cr3)?;
    } else {
        g.a.mov(eax, cr3)?;
    }
    g.a.mov(dword_ptr(st.host_cr3), eax)?;
    g.a.mov(dword_ptr(st.target), 0u32)?;
    write_lint0(g, b.x2apic, nmi)?;
    let mut wait = g.a.create_label();
    g.mark(&mut wait)?;
    g.a.cmp(dword_ptr(st.pit_n), PIT_SAMPLES as u32)?;
    g.a.jb(wait)?;
    g.text(&format!("{PREFIX}PIT divisor={}", storm.divisor))?;
    for i in 0..PIT_SAMPLES {
        g.text(&format!(" e{}=", i + 1))?;
        g.a.mov(eax, dword_ptr(st.pit_ts + 4 * i as u32))?;
        g.a.sub(eax, dword_ptr(st.pit_load))?;
        g.a.call(g.r.putdec)?;
    }
    g.a.call(g.r.putnl)?;
    g.storm = Some(st);
    Ok(())
}

/// Before a call (after the first snapshot, before the arguments): waits
/// for an NMI, then places the next edge `o` instructions into the entry.
/// Clobbers EAX, ECX, EDX only (the callee-saved registers hold the call's
/// patterns already).
pub(super) fn emit_before_call(g: &mut Gen) -> R {
    let Some(st) = g.storm.take() else {
        return Ok(());
    };
    let mut skip = g.a.create_label();
    g.a.cmp(dword_ptr(st.done), 0)?;
    g.a.jne(skip)?;
    for slot in [st.call_nmis, st.cost, st.first_dt, st.first_ctx] {
        g.a.mov(dword_ptr(slot), 0u32)?;
    }
    g.a.mov(dword_ptr(st.first_ip), 0u32)?;
    g.a.mov(dword_ptr(st.first_ip + 4), 0u32)?;
    if st.share.is_some() {
        // Interleaved: the edges fall where the other CPUs' slices put them.
        g.mark(&mut skip)?;
        g.storm = Some(st);
        return Ok(());
    }
    // Synchronise: an edge has just been taken, the next is a period away.
    g.a.mov(eax, dword_ptr(g.s.nmi_count))?;
    let mut spin = g.a.create_label();
    g.mark(&mut spin)?;
    g.a.cmp(eax, dword_ptr(g.s.nmi_count))?;
    g.a.je(spin)?;
    // From here to the entry the instruction count depends on nothing but
    // the loop count: u = now - load + o + PLACEMENT; n = floor(u F / P) + 1;
    // k = ceil(n P / F) - u >= 1.
    g.a.rdtsc()?;
    g.a.sub(eax, dword_ptr(st.pit_load))?;
    g.a.add(eax, dword_ptr(st.target))?;
    g.a.add(eax, if g.bits64() { PLACEMENT_64 } else { PLACEMENT })?;
    g.a.mov(dword_ptr(st.u), eax)?;
    g.a.mul(dword_ptr(st.pit_hz))?;
    g.a.div(dword_ptr(st.period))?;
    g.a.inc(eax)?;
    g.a.mul(dword_ptr(st.period))?;
    g.a.add(eax, PIT_HZ - 1)?;
    g.a.adc(edx, 0)?;
    g.a.div(dword_ptr(st.pit_hz))?;
    g.a.sub(eax, dword_ptr(st.u))?;
    g.a.mov(ecx, eax)?;
    let mut delay = g.a.create_label();
    g.mark(&mut delay)?;
    g.a.loop_(delay)?;
    if !g.bits64() {
        // The 64-bit kernel has one instruction more from here to the entry.
        g.a.nop()?;
    }
    g.mark(&mut skip)?;
    g.storm = Some(st);
    Ok(())
}

/// After a call (its TSC delta in the `delta` slot): prints the `STORM` line
/// and advances the target. Clobbers EAX, ECX.
pub(super) fn emit_after_call(g: &mut Gen) -> R {
    let Some(st) = g.storm.take() else {
        return Ok(());
    };
    if st.share.is_some() {
        emit_interleaved_after_call(g, &st)?;
        g.storm = Some(st);
        return Ok(());
    }
    let bits64 = g.bits64();
    let mut skip = g.a.create_label();
    g.a.cmp(dword_ptr(st.done), 0)?;
    g.a.jne(skip)?;
    // The handler's instructions are in the delta only when it ran before
    // the second RDTSC (an NMI right after the return is taken after it).
    let mut after = g.a.create_label();
    g.a.mov(eax, dword_ptr(g.s.delta))?;
    g.a.sub(eax, CALL_OVERHEAD)?;
    g.a.mov(ecx, dword_ptr(st.first_dt))?;
    g.a.cmp(ecx, dword_ptr(g.s.delta))?;
    g.a.jae(after)?;
    g.a.sub(eax, dword_ptr(st.cost))?;
    g.mark(&mut after)?;
    g.a.mov(dword_ptr(st.len), eax)?;
    g.text(&format!("{PREFIX}STORM"))?;
    g.field_dec("o", st.target)?;
    g.field_dec("len", st.len)?;
    g.field_dec("nmis", st.call_nmis)?;
    g.field_dec("dt", st.first_dt)?;
    if bits64 {
        g.field_hex64("ip", st.first_ip)?;
    } else {
        g.field_hex("ip", st.first_ip)?;
    }
    g.field_hex("ctx", st.first_ctx)?;
    emit_far_fields(g, &st)?;
    g.a.call(g.r.putnl)?;
    // Advance: the edge fell inside the path, or one more miss.
    let mut miss = g.a.create_label();
    let mut advanced = g.a.create_label();
    g.a.mov(eax, dword_ptr(st.target))?;
    g.a.cmp(eax, dword_ptr(st.len))?;
    g.a.jae(miss)?;
    g.a.inc(dword_ptr(st.target))?;
    g.a.mov(dword_ptr(st.misses), 0u32)?;
    g.a.jmp(advanced)?;
    g.mark(&mut miss)?;
    g.a.inc(dword_ptr(st.misses))?;
    g.a.cmp(dword_ptr(st.misses), MISS_LIMIT)?;
    g.a.jb(advanced)?;
    g.a.mov(dword_ptr(st.done), 1u32)?;
    // Complete: IRQ 0 masked, no more edges.
    if bits64 {
        g.a.push(rdx)?;
    } else {
        g.a.push(edx)?;
    }
    outb(g, 0x21, 0xff)?;
    if bits64 {
        g.a.pop(rdx)?;
    } else {
        g.a.pop(edx)?;
    }
    g.mark(&mut advanced)?;
    g.mark(&mut skip)?;
    g.storm = Some(st);
    Ok(())
}

/// The `far` and `far_ip` fields: the far side's NMI counter and first
/// NMI address. Preserves EAX.
fn emit_far_fields(g: &mut Gen, st: &StormSlots) -> R {
    let bits64 = g.bits64();
    for (key, addr) in [("far", st.far_nmis), ("far_ip", st.far_ip)] {
        g.text(&format!(" {key}="))?;
        if bits64 {
            g.a.push(rax)?;
            match addr {
                Some(a) => {
                    g.a.mov(rax, a)?;
                    g.a.mov(eax, dword_ptr(rax))?;
                }
                None => g.a.xor(eax, eax)?,
            }
        } else {
            g.a.push(eax)?;
            match addr {
                // Validated to fit 32 bits in `emit_setup`.
                Some(a) => g.a.mov(eax, dword_ptr(a as u32))?,
                None => g.a.xor(eax, eax)?,
            }
        }
        g.a.call(if key == "far" { g.r.putdec } else { g.r.puthex })?;
        if bits64 {
            g.a.pop(rax)?;
        } else {
            g.a.pop(eax)?;
        }
    }
    Ok(())
}

/// An interleaved storm, after a call: counts it, advances the formula's
/// edges past the call's start and counts the call as one with an edge
/// inside when the next edge falls before its end, and as *hidden* when
/// it took no NMI for it. Clobbers EAX, EDX.
fn emit_interleaved_after_call(g: &mut Gen, st: &StormSlots) -> R {
    let il = &st.il;
    g.a.inc(dword_ptr(il.calls))?;
    g.a.mov(eax, dword_ptr(st.call_nmis))?;
    g.a.add(dword_ptr(il.in_call), eax)?;
    // The call's start relative to the edges' time base.
    g.a.mov(eax, dword_ptr(g.s.tsc0))?;
    g.a.mov(edx, dword_ptr(g.s.tsc0 + 4))?;
    g.a.sub(eax, dword_ptr(st.pit_load))?;
    g.a.sbb(edx, dword_ptr(st.pit_load + 4))?;
    g.a.sub(eax, EDGE_AFTER_LOAD)?;
    g.a.sbb(edx, 0)?;
    g.a.mov(dword_ptr(il.rel_t0), eax)?;
    g.a.mov(dword_ptr(il.rel_t0 + 4), edx)?;
    let mut advance = g.a.create_label();
    let mut step = g.a.create_label();
    let mut past = g.a.create_label();
    g.mark(&mut advance)?;
    g.a.mov(eax, dword_ptr(il.edge_t))?;
    g.a.mov(edx, dword_ptr(il.edge_t + 4))?;
    g.a.cmp(edx, dword_ptr(il.rel_t0 + 4))?;
    g.a.ja(past)?;
    g.a.jb(step)?;
    g.a.cmp(eax, dword_ptr(il.rel_t0))?;
    g.a.ja(past)?;
    g.mark(&mut step)?;
    emit_next_edge(g, il)?;
    g.a.jmp(advance)?;
    g.mark(&mut past)?;
    // The call's end: its start plus its TSC delta.
    let mut outside = g.a.create_label();
    let mut inside = g.a.create_label();
    g.a.mov(eax, dword_ptr(il.rel_t0))?;
    g.a.mov(edx, dword_ptr(il.rel_t0 + 4))?;
    g.a.add(eax, dword_ptr(g.s.delta))?;
    g.a.adc(edx, 0)?;
    g.a.cmp(dword_ptr(il.edge_t + 4), edx)?;
    g.a.ja(outside)?;
    g.a.jb(inside)?;
    g.a.cmp(dword_ptr(il.edge_t), eax)?;
    g.a.ja(outside)?;
    g.mark(&mut inside)?;
    g.a.inc(dword_ptr(il.edges))?;
    g.a.cmp(dword_ptr(st.call_nmis), 0)?;
    g.a.jne(outside)?;
    g.a.inc(dword_ptr(il.hidden))?;
    g.mark(&mut outside)?;
    Ok(())
}

/// One step of the formula's edges: `T(n+1) = ceil((n+1) D 10^9 / F)`
/// from `T(n)` and the remainder `b(n) = F T(n) - n D 10^9`, with
/// `D 10^9 = q F + r`: `T += q`, `b -= r`, and when `b` went below zero,
/// `T += 1`, `b += F`.
fn emit_next_edge(g: &mut Gen, il: &Interleaved) -> R {
    let storm = NmiStorm::default();
    let (q, r) = (
        storm.period_numerator() / PIT_HZ,
        storm.period_numerator() % PIT_HZ,
    );
    let mut exact = g.a.create_label();
    g.a.add(dword_ptr(il.edge_t), q)?;
    g.a.adc(dword_ptr(il.edge_t + 4), 0)?;
    g.a.sub(dword_ptr(il.edge_b), r)?;
    g.a.jae(exact)?;
    g.a.add(dword_ptr(il.edge_b), PIT_HZ)?;
    g.a.add(dword_ptr(il.edge_t), 1)?;
    g.a.adc(dword_ptr(il.edge_t + 4), 0)?;
    g.mark(&mut exact)?;
    Ok(())
}

/// An interleaved storm's `STORMCPU` line, after the CPU's `CPU` line.
pub(super) fn emit_cpu_line(g: &mut Gen) -> R {
    let Some(st) = g.storm.take() else {
        return Ok(());
    };
    if let Some(share) = &st.share {
        let il = &st.il;
        g.text(&format!("{PREFIX}STORMCPU"))?;
        g.field_dec("cpu", share.index)?;
        for (key, slot) in [
            ("calls", il.calls),
            ("edges", il.edges),
            ("hidden", il.hidden),
            ("nmis", g.s.nmi_count),
            ("in_call", il.in_call),
            ("host", il.host),
            ("transit", il.transit),
        ] {
            g.field_dec(key, slot)?;
        }
        if g.bits64() {
            g.field_hex64("ip", il.transit_ip)?;
        } else {
            g.field_hex("ip", il.transit_ip)?;
        }
        g.field_hex("ctx", il.transit_ctx)?;
        g.a.call(g.r.putnl)?;
    }
    g.storm = Some(st);
    Ok(())
}

/// The NMI handler of a storm kernel (at vector 2): records the first NMI
/// of a call and the PIT samples, acknowledges the 8259, counts, and adds
/// its own instructions to the call's cost. Without a storm it emits
/// nothing and returns `false`.
pub(super) fn emit_nmi_handler(g: &mut Gen) -> R<bool> {
    let Some(st) = g.storm.take() else {
        return Ok(false);
    };
    let bits64 = g.bits64();
    // Frame offset of the interrupted IP after the pushes below.
    let ip_at: i32 = if bits64 { 24 } else { 16 };
    if bits64 {
        for r in [rax, rdx, rcx] {
            g.a.push(r)?;
        }
        // As many instructions before the RDTSC as the 32-bit handler has.
        for _ in 0..3 {
            g.a.nop()?;
        }
    } else {
        g.a.push(ds)?;
        for r in [eax, edx, ecx] {
            g.a.push(r)?;
        }
        g.a.mov(ax, u32::from(super::SEL_DATA32))?;
        g.a.mov(ds, ax)?;
    }
    g.a.rdtsc()?;
    g.a.mov(dword_ptr(st.h_tsc), eax)?;
    // The PIT samples.
    let mut no_sample = g.a.create_label();
    g.a.mov(ecx, dword_ptr(st.pit_n))?;
    g.a.cmp(ecx, PIT_SAMPLES as u32)?;
    g.a.jae(no_sample)?;
    if bits64 {
        g.a.mov(dword_ptr(rcx * 4 + st.pit_ts), eax)?;
    } else {
        g.a.mov(dword_ptr(ecx * 4 + st.pit_ts), eax)?;
    }
    g.a.inc(dword_ptr(st.pit_n))?;
    g.mark(&mut no_sample)?;
    let mut not_call = g.a.create_label();
    let mut not_first = g.a.create_label();
    g.a.cmp(dword_ptr(g.s.phase), Phase::Call.code())?;
    g.a.jne(not_call)?;
    g.a.inc(dword_ptr(st.call_nmis))?;
    if st.share.is_some() {
        emit_classify_interleaved(g, &st, ip_at)?;
        g.a.jmp(not_call)?;
    }
    g.a.cmp(dword_ptr(st.call_nmis), 1)?;
    g.a.jne(not_first)?;
    g.a.sub(eax, dword_ptr(g.s.tsc0))?;
    g.a.mov(dword_ptr(st.first_dt), eax)?;
    emit_save_ip(g, ip_at, st.first_ip)?;
    emit_context(g, &st, ip_at + if bits64 { 8 } else { 4 })?;
    g.mark(&mut not_first)?;
    ack_pic(g)?;
    g.a.inc(dword_ptr(g.s.nmi_count))?;
    g.a.rdtsc()?;
    g.a.sub(eax, dword_ptr(st.h_tsc))?;
    g.a.add(eax, HANDLER_EXTRA)?;
    g.a.add(dword_ptr(st.cost), eax)?;
    let mut out = g.a.create_label();
    g.a.jmp(out)?;
    g.mark(&mut not_call)?;
    ack_pic(g)?;
    g.a.inc(dword_ptr(g.s.nmi_count))?;
    g.mark(&mut out)?;
    if bits64 {
        for r in [rcx, rdx, rax] {
            g.a.pop(r)?;
        }
        // As many instructions after the last RDTSC as the 32-bit handler has.
        g.a.nop()?;
        g.a.iretq()?;
    } else {
        for r in [ecx, edx, eax] {
            g.a.pop(r)?;
        }
        g.a.pop(ds)?;
        g.a.iretd()?;
    }
    g.storm = Some(st);
    Ok(true)
}

/// An interleaved storm's handler, for an NMI taken during a call: counts
/// it as taken in host context or in transit, and records the first one in
/// transit. Clobbers EAX, ECX, EDX.
fn emit_classify_interleaved(g: &mut Gen, st: &StormSlots, ip_at: i32) -> R {
    let bits64 = g.bits64();
    let il = &st.il;
    emit_context(g, st, ip_at + if bits64 { 8 } else { 4 })?;
    let mut host = g.a.create_label();
    let mut done = g.a.create_label();
    g.a.cmp(dword_ptr(st.first_ctx), st.host_ctx)?;
    g.a.je(host)?;
    g.a.inc(dword_ptr(il.transit))?;
    g.a.cmp(dword_ptr(il.transit), 1)?;
    g.a.jne(done)?;
    emit_save_ip(g, ip_at, il.transit_ip)?;
    g.a.mov(eax, dword_ptr(st.first_ctx))?;
    g.a.mov(dword_ptr(il.transit_ctx), eax)?;
    g.a.jmp(done)?;
    g.mark(&mut host)?;
    g.a.inc(dword_ptr(il.host))?;
    g.mark(&mut done)?;
    Ok(())
}

/// Copies the interrupted instruction pointer (at `ip_at` in the
/// handler's frame) to `slot`. Clobbers EAX.
fn emit_save_ip(g: &mut Gen, ip_at: i32, slot: u32) -> R {
    if g.bits64() {
        g.a.mov(rax, qword_ptr(rsp + ip_at))?;
        g.a.mov(qword_ptr(slot), rax)?;
    } else {
        g.a.mov(eax, dword_ptr(esp + ip_at))?;
        g.a.mov(dword_ptr(slot), eax)?;
    }
    Ok(())
}

/// Records the context word of the interrupted code ([`ctx`]); `cs_at` is
/// the frame offset of its CS. Clobbers EAX, ECX, EDX.
fn emit_context(g: &mut Gen, st: &StormSlots, cs_at: i32) -> R {
    let bits64 = g.bits64();
    let mut pg_done = g.a.create_label();
    g.a.xor(edx, edx)?;
    if bits64 {
        g.a.mov(rax, cr0)?;
    } else {
        g.a.mov(eax, cr0)?;
    }
    g.a.test(eax, eax)?;
    g.a.jns(pg_done)?;
    g.a.inc(edx)?;
    if bits64 {
        g.a.mov(rax, cr4)?;
    } else {
        g.a.mov(eax, cr4)?;
    }
    g.a.test(eax, cpum::regs::Cr4::PAE.bits() as u32)?;
    g.a.jz(pg_done)?;
    g.a.inc(edx)?;
    if bits64 {
        // A handler of the 64-bit IDT runs in long mode only.
        g.a.inc(edx)?;
    }
    g.mark(&mut pg_done)?;
    let (host_cs, frame) = if bits64 {
        (SEL64_CODE, word_ptr(rsp + cs_at))
    } else {
        (SEL_CODE32, word_ptr(esp + cs_at))
    };
    let mut cs_other = g.a.create_label();
    g.a.cmp(frame, u32::from(host_cs))?;
    g.a.jne(cs_other)?;
    g.a.or(edx, ctx::HOST_CS)?;
    g.mark(&mut cs_other)?;
    let mut cr3_other = g.a.create_label();
    if bits64 {
        g.a.mov(rax, cr3)?;
        g.a.mov(ecx, dword_ptr(st.host_cr3))?;
        g.a.cmp(rax, rcx)?;
    } else {
        g.a.mov(eax, cr3)?;
        g.a.cmp(eax, dword_ptr(st.host_cr3))?;
    }
    g.a.jne(cr3_other)?;
    g.a.or(edx, ctx::HOST_CR3)?;
    g.mark(&mut cr3_other)?;
    g.a.mov(dword_ptr(st.first_ctx), edx)?;
    Ok(())
}

/// At the summary: masks IRQ 0, so no edge arrives while the kernel reports.
/// Clobbers EAX, EDX.
pub(super) fn emit_stop(g: &mut Gen) -> R {
    let Some(st) = g.storm.as_ref() else {
        return Ok(());
    };
    let mut keep = g.a.create_label();
    if let Some(share) = &st.share {
        // Interleaved: the last CPU done with its calls stops the storm.
        let (stopped, cpus) = (share.stopped, share.cpus);
        g.a.lock().inc(dword_ptr(stopped))?;
        g.a.cmp(dword_ptr(stopped), cpus)?;
        g.a.jne(keep)?;
    }
    outb(g, 0x21, 0xff)?;
    g.mark(&mut keep)
}

/// An application processor of an interleaved storm, after its local APIC
/// set-up: the PIT load and its own CR3 into its slots, no PIT samples to
/// take, and LINT0 in NMI mode, so it receives the edges as the bootstrap
/// CPU does. Clobbers EAX, ECX, EDX.
pub(super) fn emit_ap_setup(g: &mut Gen, b: &HostKernelBuilder) -> R {
    let Some(st) = g.storm.take() else {
        return Ok(());
    };
    if let Some(share) = &st.share {
        for half in [0, 4] {
            g.a.mov(eax, dword_ptr(share.load + half))?;
            g.a.mov(dword_ptr(st.pit_load + half), eax)?;
        }
        g.a.mov(dword_ptr(st.pit_n), PIT_SAMPLES as u32)?;
        if g.bits64() {
            g.a.mov(rax, cr3)?;
        } else {
            g.a.mov(eax, cr3)?;
        }
        g.a.mov(dword_ptr(st.host_cr3), eax)?;
        write_lint0(g, b.x2apic, apic::lvt::MODE_NMI)?;
    }
    g.storm = Some(st);
    Ok(())
}
