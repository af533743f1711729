//! Several host CPUs switching at once ([`HostKernelBuilder::cpus`]).
//!
//! Every CPU runs the same kernel code, each on its own copy of the
//! kernel's data area: CPU *i* runs on its own host page tables, which map
//! the data area's virtual range (all but its first page) to CPU *i*'s
//! physical copy. So every slot, table and stack the kernel names by a
//! fixed address — the GDT with its TSS descriptor and busy bit, the TSS,
//! the IDT, the stacks, the snapshot buffers, the counters — is per CPU
//! without a single instruction of the loop changing. The data area's first
//! page is not remapped: it is the shared page, with the print lock, the
//! CRC of the serial output, the start-up counters, the switch-occupancy
//! counters and the merged totals.
//!
//! The bootstrap CPU starts the others with INIT, SIPI, SIPI: they begin in
//! a real-mode trampoline at [`TRAMPOLINE_PHYS`], enter protected mode with
//! the bootstrap GDT, take a CPU index, load their own CR3 and then set up
//! their descriptor tables, features and local APIC like the bootstrap CPU.
//! On an AMD64 host the trampoline enters a 32-bit stub after the boot
//! stub instead, which turns on long mode with the CPU's own CR3 and goes
//! on to the 64-bit kernel's AP entry.
//! VCPU `v` runs on CPU `v % cpus`. Output is serialised by a line lock
//! taken by `putc` and released at the newline, so the CRC stays the CRC of
//! the bytes on the wire.
//!
//! Interleaving: under `-icount`, QEMU runs the vCPUs round robin in one
//! thread, and a vCPU gives up its slice only at a timer deadline (or at
//! `pause`/`hlt`). The bootstrap CPU programs PIT channel 0 with divisor
//! [`DEADLINE_DIVISOR`] (its interrupt stays masked at the 8259: it only
//! creates deadlines), so every CPU is preempted every few hundred
//! instructions, inside its switches as well. With the NMI storm the
//! storm's own PIT makes the deadlines, and every CPU's LINT0 receives its
//! edges (see [the storm](super::storm)). Each call counts as
//! *overlapping* when another CPU was inside its own call when it began or
//! entered one before it ended (shared counters around the call).

use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction};

use super::common::{emit_cpuid_features, Gen, R};
use super::{
    BuildError, DataArena, HostKernelBuilder, LAPIC_VIRT, SEL64_CODE, SEL64_CODE32, SEL64_DATA,
    SEL_CODE32, SEL_DATA32, TABLES_BASE,
};
use crate::paging::{PageMap, PAGE};
use crate::transcript::PREFIX;
use cpum::regs::{Cr0, Efer, MSR_EFER};

/// The most host CPUs a kernel runs on.
pub const MAX_CPUS: u32 = 8;
/// Where the application processors start (real mode, below 1 MiB).
pub const TRAMPOLINE_PHYS: u32 = 0x8000;
/// PIT channel 0 divisor: a timer deadline every `2 / 1.193182 MHz`, about
/// 1676 instructions under `-icount shift=0`.
pub const DEADLINE_DIVISOR: u16 = 2;
/// Room for the trampoline in the data area.
const TRAMPOLINE_MAX: usize = 64;
/// Where in the trampoline its GDT descriptor lies.
const TRAMPOLINE_GDTR: u32 = 0x30;

/// Interrupt command register (xAPIC offsets; x2APIC: one MSR).
const ICR_LO: u32 = 0x300;
const ICR_HI: u32 = 0x310;
/// INIT, level assert, all excluding self.
const ICR_INIT: u32 = 0x000c_4500;
/// Start-up at [`TRAMPOLINE_PHYS`], all excluding self.
const ICR_STARTUP: u32 = 0x000c_4600 | (TRAMPOLINE_PHYS >> 12);

/// Offsets in the shared page.
const SH_CRC: u32 = 0;
const SH_LOCK: u32 = 4;
const SH_NEXT_CPU: u32 = 8;
const SH_STARTED: u32 = 12;
const SH_GO: u32 = 16;
const SH_FINISHED: u32 = 20;
const SH_IN_SWITCH: u32 = 24;
const SH_ENTER_SEQ: u32 = 28;
const SH_MERGE_LOCK: u32 = 32;
/// The NMI storm's PIT load (the bootstrap CPU's TSC), for every CPU.
const SH_STORM_LOAD: u32 = 40;
/// CPUs done with their calls; the last one stops the NMI storm.
const SH_STORM_STOPPED: u32 = 48;
/// Merged totals: calls, mismatches, retfails, hookfails, NMIs, spurious
/// interrupts, overlapping calls (summed), TSC min, TSC max, TSC sum (qword).
const SH_TOTALS: u32 = 64;
const SUMMED: u32 = 7;
const SH_MIN: u32 = SH_TOTALS + 4 * SUMMED;
const SH_MAX: u32 = SH_MIN + 4;
const SH_SUM: u32 = SH_MAX + 4;
/// CR3 of every CPU, by index.
const SH_CR3: u32 = 128;

/// The PIT divisor whose deadlines interleave the CPUs (the `SMP` line's
/// `divisor`): the NMI storm's when it runs (its PIT makes the deadlines),
/// [`DEADLINE_DIVISOR`] otherwise, 0 without deadlines.
pub fn deadline_divisor(deadlines: bool, storm: Option<super::storm::NmiStorm>) -> u16 {
    match (deadlines, storm) {
        (false, _) => 0,
        (true, Some(st)) => st.divisor,
        (true, None) => DEADLINE_DIVISOR,
    }
}

impl HostKernelBuilder {
    /// Runs the kernel on `n` host CPUs (QEMU `-smp n`); VCPU `v` runs on
    /// CPU `v % n`. See [the module](crate::hostkernel::smp).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// With several CPUs: program the PIT deadlines that interleave them
    /// (on by default). Without them each CPU runs until it waits, so no
    /// call ever overlaps another CPU's.
    pub fn deadlines(mut self, on: bool) -> Self {
        self.deadlines = on;
        self
    }
}

/// The CPU count is in range and the rest of the builder allows it.
pub(super) fn validate(b: &HostKernelBuilder) -> Result<(), BuildError> {
    let vcpus = u32::try_from(b.vcpus.len()).unwrap_or(u32::MAX);
    if b.cpus == 0 || b.cpus > MAX_CPUS || b.cpus > vcpus {
        return Err(BuildError::BadCpus {
            cpus: b.cpus,
            vcpus,
            max: MAX_CPUS,
        });
    }
    if b.cpus > 1 && b.storm.is_some() && !b.deadlines {
        return Err(BuildError::StormWithoutDeadlines);
    }
    Ok(())
}

/// The data-area part of [`SmpSlots`], allocated before anything else.
pub(super) struct SmpData {
    cpus: u32,
    shared: u32,
    cpu_index: u32,
    cpu_tag: u32,
    seq0: u32,
    was_inside: u32,
    overlap: u32,
    trampoline: u32,
}

/// With more than one CPU: the shared page (the data area's first page)
/// and this CPU's private slots.
pub(super) fn alloc(d: &mut DataArena, cpus: u32) -> R<Option<SmpData>> {
    if cpus <= 1 {
        return Ok(None);
    }
    let shared = d.zeroed(PAGE as usize, PAGE as usize as u32);
    if shared != d.base() {
        return Err(BuildError::Internal(
            "the shared page must open the data area".into(),
        ));
    }
    let ok = d.write(shared + SH_CRC, &u32::MAX.to_le_bytes())
        && d.write(shared + SH_NEXT_CPU, &1u32.to_le_bytes())
        && d.write(shared + SH_MIN, &u32::MAX.to_le_bytes());
    if !ok {
        return Err(BuildError::Internal("shared page".into()));
    }
    Ok(Some(SmpData {
        cpus,
        shared,
        cpu_index: d.dword(0),
        cpu_tag: d.dword(1),
        seq0: d.dword(0),
        was_inside: d.dword(0),
        overlap: d.dword(0),
        trampoline: d.zeroed(TRAMPOLINE_MAX, 16),
    }))
}

/// [`SmpData`] and the labels the kernel code shares with the AP entry.
pub(super) struct SmpSlots {
    d: SmpData,
    loop_start: CodeLabel,
    ap_entry: CodeLabel,
}

impl SmpSlots {
    fn sh(&self, off: u32) -> u32 {
        self.d.shared + off
    }

    /// The shared CRC slot.
    pub(super) fn crc(&self) -> u32 {
        self.sh(SH_CRC)
    }
}

/// Hands the slots to the generator.
pub(super) fn attach(g: &mut Gen, data: Option<SmpData>) {
    g.smp = data.map(|d| SmpSlots {
        d,
        loop_start: g.a.create_label(),
        ap_entry: g.a.create_label(),
    });
}

/// What the NMI storm of a multiprocessor kernel shares between CPUs.
pub(super) struct StormShare {
    /// The PIT load's TSC, written by the bootstrap CPU.
    pub load: u32,
    /// CPUs done with their calls.
    pub stopped: u32,
    /// The CPU count.
    pub cpus: u32,
    /// This CPU's index (a private slot).
    pub index: u32,
}

/// The storm's shared slots, with several CPUs.
pub(super) fn storm_share(g: &Gen) -> Option<StormShare> {
    g.smp.as_ref().map(|m| StormShare {
        load: m.sh(SH_STORM_LOAD),
        stopped: m.sh(SH_STORM_STOPPED),
        cpus: m.d.cpus,
        index: m.d.cpu_index,
    })
}

fn slots(g: &Gen) -> Option<(u32, u32, u32)> {
    g.smp
        .as_ref()
        .map(|m| (m.d.cpus, m.d.shared, m.d.cpu_index))
}

/// Spins (with `pause`) until the lock at `lock` is this CPU's. Clobbers
/// EAX, ECX.
fn acquire(g: &mut Gen, lock: u32, tag: u32) -> R {
    let mut have = g.a.create_label();
    let mut spin = g.a.create_label();
    g.a.mov(ecx, dword_ptr(tag))?;
    g.a.cmp(dword_ptr(lock), ecx)?;
    g.a.je(have)?;
    g.mark(&mut spin)?;
    g.a.xor(eax, eax)?;
    g.a.lock().cmpxchg(dword_ptr(lock), ecx)?;
    g.a.je(have)?;
    g.a.pause()?;
    g.a.jmp(spin)?;
    g.mark(&mut have)?;
    Ok(())
}

/// In `putc`, after EDX and EAX are saved: takes the line lock unless this
/// CPU holds it. Preserves every register but EAX.
pub(super) fn emit_putc_lock(g: &mut Gen) -> R {
    if g.smp.is_none() {
        return Ok(());
    }
    g.push_gpr(ecx)?;
    emit_exit_lock(g)?;
    g.pop_gpr(ecx)
}

/// In `putc`, with the character in AL: a newline releases the line lock.
pub(super) fn emit_putc_unlock(g: &mut Gen) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let lock = m.sh(SH_LOCK);
    let mut keep = g.a.create_label();
    g.a.cmp(al, u32::from(b'\n'))?;
    g.a.jne(keep)?;
    g.a.mov(dword_ptr(lock), 0u32)?;
    g.mark(&mut keep)?;
    Ok(())
}

/// Takes the line lock unless this CPU holds it; in the exit routine,
/// before the CRC is read, so no other CPU is half-way through a line.
/// Clobbers EAX, ECX.
pub(super) fn emit_exit_lock(g: &mut Gen) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let (lock, tag) = (m.sh(SH_LOCK), m.d.cpu_tag);
    acquire(g, lock, tag)
}

/// At the start of the call loop: where the other CPUs join.
pub(super) fn mark_loop_start(g: &mut Gen) -> R {
    if let Some(mut l) = g.smp.as_ref().map(|m| m.loop_start) {
        g.mark(&mut l)?;
    }
    Ok(())
}

/// The first VCPU of this CPU into the `vcpu` slot. Clobbers EAX.
pub(super) fn emit_first_vcpu(g: &mut Gen) -> R {
    match slots(g) {
        None => g.a.mov(dword_ptr(g.s.vcpu), 0u32)?,
        Some((_, _, index)) => {
            g.a.mov(eax, dword_ptr(index))?;
            g.a.mov(dword_ptr(g.s.vcpu), eax)?;
        }
    }
    Ok(())
}

/// The next VCPU of this CPU.
pub(super) fn emit_next_vcpu(g: &mut Gen) -> R {
    match slots(g) {
        None => g.a.inc(dword_ptr(g.s.vcpu))?,
        Some((cpus, _, _)) => g.a.add(dword_ptr(g.s.vcpu), cpus)?,
    }
    Ok(())
}

/// Just before the call's arguments: this CPU is inside a switch. Clobbers
/// EAX.
pub(super) fn emit_enter(g: &mut Gen) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let (inside, seq) = (m.sh(SH_IN_SWITCH), m.sh(SH_ENTER_SEQ));
    let (was_inside, seq0) = (m.d.was_inside, m.d.seq0);
    g.a.mov(eax, 1u32)?;
    g.a.lock().xadd(dword_ptr(inside), eax)?;
    g.a.mov(dword_ptr(was_inside), eax)?;
    g.a.mov(eax, 1u32)?;
    g.a.lock().xadd(dword_ptr(seq), eax)?;
    g.a.mov(dword_ptr(seq0), eax)?;
    Ok(())
}

/// After the second snapshot (data segments back): this CPU left its
/// switch; the call overlapped when another CPU was inside at the start or
/// entered since. Clobbers EAX.
pub(super) fn emit_leave(g: &mut Gen) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let (inside, seq) = (m.sh(SH_IN_SWITCH), m.sh(SH_ENTER_SEQ));
    let (was_inside, seq0, overlap) = (m.d.was_inside, m.d.seq0, m.d.overlap);
    let mut alone = g.a.create_label();
    g.a.lock().dec(dword_ptr(inside))?;
    g.a.mov(eax, dword_ptr(seq))?;
    g.a.sub(eax, dword_ptr(seq0))?;
    g.a.dec(eax)?;
    g.a.or(eax, dword_ptr(was_inside))?;
    g.a.jz(alone)?;
    g.a.inc(dword_ptr(overlap))?;
    g.mark(&mut alone)?;
    Ok(())
}

/// Before VCPU `i`'s summary line: skip it on every CPU but its own.
pub(super) fn emit_vcpu_guard(g: &mut Gen, i: u32) -> R<Option<CodeLabel>> {
    let Some((cpus, _, index)) = slots(g) else {
        return Ok(None);
    };
    let skip = g.a.create_label();
    g.a.cmp(dword_ptr(index), i % cpus)?;
    g.a.jne(skip)?;
    Ok(Some(skip))
}

/// After this CPU's VCPU lines: its `CPU` line, its totals merged into the
/// shared page. The other CPUs then halt; the bootstrap CPU waits for them,
/// takes the merged totals into its own slots (which the `SUMMARY` line and
/// the verdict read) and prints the `SMP` line.
pub(super) fn emit_merge(g: &mut Gen, deadlines: bool, storm: Option<super::storm::NmiStorm>) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let cpus = m.d.cpus;
    let (index, overlap) = (m.d.cpu_index, m.d.overlap);
    let shared = m.d.shared;
    let sh = move |off: u32| shared + off;
    let (merge_lock, finished, tag) = (sh(SH_MERGE_LOCK), sh(SH_FINISHED), m.d.cpu_tag);
    let (t_min, t_max, t_sum) = (sh(SH_MIN), sh(SH_MAX), sh(SH_SUM));
    let s = &g.s;
    let summed = [
        s.calls,
        s.mism,
        s.retfails,
        s.hookfails,
        s.nmi_count,
        s.spurious,
        overlap,
    ];
    let (tsc_min, tsc_max, tsc_sum) = (s.tsc_min, s.tsc_max, s.tsc_sum);

    g.text(&format!("{PREFIX}CPU cpu="))?;
    g.dec_mem(index)?;
    g.field_dec("trips", g.s.trips_done)?;
    g.field_dec("calls", g.s.calls)?;
    g.field_dec("overlapping", overlap)?;
    g.field_dec("mismatches", g.s.mism)?;
    g.field_dec("retfails", g.s.retfails)?;
    g.field_dec("hookfails", g.s.hookfails)?;
    g.field_dec("tsc_min", tsc_min)?;
    g.field_dec("tsc_max", tsc_max)?;
    g.field_hex64("tsc_sum", tsc_sum)?;
    g.a.call(g.r.putnl)?;
    super::storm::emit_cpu_line(g)?;

    acquire(g, merge_lock, tag)?;
    for (k, &slot) in summed.iter().enumerate() {
        g.a.mov(eax, dword_ptr(slot))?;
        g.a.add(dword_ptr(sh(SH_TOTALS) + 4 * k as u32), eax)?;
    }
    let mut not_min = g.a.create_label();
    let mut not_max = g.a.create_label();
    g.a.mov(eax, dword_ptr(tsc_min))?;
    g.a.cmp(eax, dword_ptr(t_min))?;
    g.a.jae(not_min)?;
    g.a.mov(dword_ptr(t_min), eax)?;
    g.mark(&mut not_min)?;
    g.a.mov(eax, dword_ptr(tsc_max))?;
    g.a.cmp(eax, dword_ptr(t_max))?;
    g.a.jbe(not_max)?;
    g.a.mov(dword_ptr(t_max), eax)?;
    g.mark(&mut not_max)?;
    g.a.mov(eax, dword_ptr(tsc_sum))?;
    g.a.add(dword_ptr(t_sum), eax)?;
    g.a.mov(eax, dword_ptr(tsc_sum + 4))?;
    g.a.adc(dword_ptr(t_sum + 4), eax)?;
    g.a.mov(dword_ptr(merge_lock), 0u32)?;

    let mut bsp = g.a.create_label();
    g.a.cmp(dword_ptr(index), 0)?;
    g.a.je(bsp)?;
    g.a.lock().inc(dword_ptr(finished))?;
    let halt = g.a.create_label();
    let halt = g.export("ap_halt", halt)?;
    g.a.cli()?;
    g.a.hlt()?;
    g.a.jmp(halt)?;

    g.mark(&mut bsp)?;
    let mut wait = g.a.create_label();
    g.mark(&mut wait)?;
    g.a.pause()?;
    g.a.cmp(dword_ptr(finished), cpus - 1)?;
    g.a.jne(wait)?;
    for (k, &slot) in summed.iter().enumerate() {
        g.a.mov(eax, dword_ptr(sh(SH_TOTALS) + 4 * k as u32))?;
        g.a.mov(dword_ptr(slot), eax)?;
    }
    for (from, to) in [
        (t_min, tsc_min),
        (t_max, tsc_max),
        (t_sum, tsc_sum),
        (t_sum + 4, tsc_sum + 4),
    ] {
        g.a.mov(eax, dword_ptr(from))?;
        g.a.mov(dword_ptr(to), eax)?;
    }
    let divisor = deadline_divisor(deadlines, storm);
    g.text(&format!(
        "{PREFIX}SMP cpus={cpus} divisor={divisor} overlapping="
    ))?;
    g.dec_mem(overlap)?;
    g.field_dec("calls", g.s.calls)?;
    g.a.call(g.r.putnl)?;
    Ok(())
}

/// `out port, value` for a constant byte. Clobbers AL, DX.
fn outb(g: &mut Gen, port: u16, value: u8) -> R {
    g.a.mov(al, u32::from(value))?;
    g.a.mov(dx, u32::from(port))?;
    g.a.out(dx, al)?;
    Ok(())
}

/// Writes the interrupt command register. Clobbers EAX, ECX, EDX.
fn send_ipi(g: &mut Gen, x2apic: bool, low: u32) -> R {
    if x2apic {
        g.a.mov(ecx, apic::x2apic_msr(ICR_LO))?;
        g.a.mov(eax, low)?;
        g.a.xor(edx, edx)?;
        g.a.wrmsr()?;
    } else if g.bits64() {
        // The xAPIC page lies above 2 GiB: no 64-bit displacement reaches it.
        g.a.mov(edx, LAPIC_VIRT)?;
        g.a.mov(dword_ptr(rdx + ICR_HI), 0u32)?;
        g.a.mov(dword_ptr(rdx + ICR_LO), low)?;
    } else {
        g.a.mov(dword_ptr(LAPIC_VIRT + ICR_HI), 0u32)?;
        g.a.mov(dword_ptr(LAPIC_VIRT + ICR_LO), low)?;
    }
    Ok(())
}

/// The bootstrap CPU, before its loop: copies the trampoline, starts the
/// other CPUs, waits until every one is set up, programs the PIT deadlines
/// and lets them all go. Clobbers EAX, ECX, EDX, ESI, EDI.
pub(super) fn emit_start_aps(g: &mut Gen, b: &HostKernelBuilder) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let (cpus, trampoline) = (m.d.cpus, m.d.trampoline);
    let (started, go) = (m.sh(SH_STARTED), m.sh(SH_GO));
    g.a.cld()?;
    g.a.mov(esi, trampoline)?;
    g.a.mov(edi, TRAMPOLINE_PHYS)?;
    g.a.mov(ecx, TRAMPOLINE_MAX as u32)?;
    g.a.rep().movsb()?;
    send_ipi(g, b.x2apic, ICR_INIT)?;
    send_ipi(g, b.x2apic, ICR_STARTUP)?;
    send_ipi(g, b.x2apic, ICR_STARTUP)?;
    let mut wait = g.a.create_label();
    g.mark(&mut wait)?;
    g.a.pause()?;
    g.a.cmp(dword_ptr(started), cpus - 1)?;
    g.a.jne(wait)?;
    if b.deadlines && b.storm.is_none() {
        // PIT channel 0, lobyte/hibyte, mode 2 (rate generator), binary.
        // (The NMI storm's PIT, running already, makes deadlines itself.)
        let [lo, hi] = DEADLINE_DIVISOR.to_le_bytes();
        outb(g, 0x43, 0x34)?;
        outb(g, 0x40, lo)?;
        outb(g, 0x40, hi)?;
    }
    g.a.mov(dword_ptr(go), 1u32)?;
    Ok(())
}

/// The application processors' 32-bit entry (from the trampoline, paging
/// off, flat CS): index, own CR3 with the bootstrap CPU's paging bits, own
/// descriptor tables and stack, features, SYSENTER, local APIC; then it
/// reports in, waits for the start and joins the loop.
pub(super) fn emit_ap_entry32(
    g: &mut Gen,
    b: &HostKernelBuilder,
    cr4_bits: u32,
    cr0_bits: u32,
) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let (ap_entry, loop_start) = (m.ap_entry, m.loop_start);
    let (index, tag) = (m.d.cpu_index, m.d.cpu_tag);
    let (next, cr3s, started, go) = (
        m.sh(SH_NEXT_CPU),
        m.sh(SH_CR3),
        m.sh(SH_STARTED),
        m.sh(SH_GO),
    );
    g.export("ap_entry", ap_entry)?;
    g.a.mov(ax, u32::from(SEL_DATA32))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.mov(eax, 1u32)?;
    g.a.lock().xadd(dword_ptr(next), eax)?;
    g.a.mov(ecx, dword_ptr(eax * 4 + cr3s))?;
    super::emit::paging_on(g, ecx, cr4_bits, cr0_bits)?;
    // The private slots are this CPU's from here on.
    g.a.mov(dword_ptr(index), eax)?;
    g.a.inc(eax)?;
    g.a.mov(dword_ptr(tag), eax)?;
    g.a.lgdt(ptr(g.t.gdtr))?;
    g.a.mov(ax, u32::from(SEL_DATA32))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.mov(gs, ax)?;
    g.a.mov(esp, g.t.stack_top)?;
    super::emit::load_descriptor_tables(g)?;
    emit_cpuid_features(g)?;
    super::emit::emit_msrs_and_apic(g, b.x2apic)?;
    super::storm::emit_ap_setup(g, b)?;
    g.a.lock().inc(dword_ptr(started))?;
    let mut wait = g.a.create_label();
    g.mark(&mut wait)?;
    g.a.pause()?;
    g.a.cmp(dword_ptr(go), 0)?;
    g.a.je(wait)?;
    g.a.jmp(loop_start)?;
    Ok(())
}

/// On an AMD64 host, in the boot stub (paging off, the GDT's flat 32-bit
/// code): the application processors' way on from the trampoline. Takes a
/// CPU index into EBX, turns on long mode with this CPU's CR3 and the
/// bootstrap CPU's CR4 and CR0 bits, and far-jumps to `ap_entry64`
/// ([`emit_ap_entry64`]). Nothing without several CPUs.
pub(super) fn emit_ap_stub32(
    stub: &mut CodeAssembler,
    g: &Gen,
    cr4_bits: u32,
    cr0_bits: u32,
    ap_entry64: u32,
) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let (next, cr3s) = (m.sh(SH_NEXT_CPU), m.sh(SH_CR3));
    stub.mov(ax, u32::from(SEL64_DATA))?;
    stub.mov(ds, ax)?;
    stub.mov(es, ax)?;
    stub.mov(ss, ax)?;
    stub.mov(ebx, 1u32)?;
    stub.lock().xadd(dword_ptr(next), ebx)?;
    stub.mov(eax, cr4)?;
    stub.or(eax, cr4_bits)?;
    stub.mov(cr4, eax)?;
    stub.mov(eax, dword_ptr(ebx * 4 + cr3s))?;
    stub.mov(cr3, eax)?;
    stub.mov(ecx, MSR_EFER)?;
    stub.rdmsr()?;
    stub.or(eax, Efer::LME.bits() as u32)?;
    stub.wrmsr()?;
    // Caches on as on the bootstrap CPU (INIT leaves CD and NW set).
    stub.mov(eax, cr0)?;
    stub.and(eax, !(Cr0::CD | Cr0::NW).bits() as u32)?;
    stub.or(eax, cr0_bits)?;
    stub.mov(cr0, eax)?;
    stub.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1632,
        SEL64_CODE,
        ap_entry64,
    )?)?;
    Ok(())
}

/// The application processors' 64-bit entry on an AMD64 host (from
/// [`emit_ap_stub32`], the CPU index in EBX): index, own GDT and stack,
/// then `setup` (descriptor tables, features, MSRs, local APIC, as the
/// bootstrap CPU's); then it reports in, waits for the start and joins
/// the loop.
pub(super) fn emit_ap_entry64(
    g: &mut Gen,
    b: &HostKernelBuilder,
    setup: &dyn Fn(&mut Gen) -> R,
) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let (ap_entry, loop_start) = (m.ap_entry, m.loop_start);
    let (index, tag) = (m.d.cpu_index, m.d.cpu_tag);
    let (started, go) = (m.sh(SH_STARTED), m.sh(SH_GO));
    g.export("ap_entry", ap_entry)?;
    // The private slots are this CPU's: its CR3 is loaded.
    g.a.mov(dword_ptr(index), ebx)?;
    g.a.inc(ebx)?;
    g.a.mov(dword_ptr(tag), ebx)?;
    g.a.lgdt(ptr(g.t.gdtr))?;
    g.a.mov(ax, u32::from(SEL64_DATA))?;
    g.a.mov(ds, ax)?;
    g.a.mov(es, ax)?;
    g.a.mov(ss, ax)?;
    g.a.mov(rsp, u64::from(g.t.stack_top))?;
    setup(g)?;
    super::storm::emit_ap_setup(g, b)?;
    g.a.lock().inc(dword_ptr(started))?;
    let mut wait = g.a.create_label();
    g.mark(&mut wait)?;
    g.a.pause()?;
    g.a.cmp(dword_ptr(go), 0)?;
    g.a.je(wait)?;
    g.a.jmp(loop_start)?;
    Ok(())
}

/// The real-mode trampoline: loads the bootstrap GDT (its descriptor is
/// part of the trampoline, at [`TRAMPOLINE_GDTR`]), sets CR0.PE and
/// far-jumps to `ap_entry` through `code32`, the GDT's flat 32-bit code.
fn trampoline(gdt: u32, gdt_limit: u16, code32: u16, ap_entry: u32) -> R<Vec<u8>> {
    let gdtr = TRAMPOLINE_PHYS + TRAMPOLINE_GDTR;
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.lgdt(ptr(gdtr))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1u32)?;
    a.mov(cr0, eax)?;
    a.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1632,
        code32,
        ap_entry,
    )?)?;
    let mut bytes = a.assemble(u64::from(TRAMPOLINE_PHYS))?;
    if bytes.len() > TRAMPOLINE_GDTR as usize {
        return Err(BuildError::Internal("AP trampoline too long".into()));
    }
    bytes.resize(TRAMPOLINE_GDTR as usize, 0);
    bytes.extend_from_slice(&gdt_limit.to_le_bytes());
    bytes.extend_from_slice(&gdt.to_le_bytes());
    Ok(bytes)
}

/// After assembly: the trampoline and every CPU's CR3 into the data area,
/// then, for each application processor, its page tables (right after the
/// bootstrap CPU's) and its copy of the data area (after the code) as
/// blobs. `map` is the bootstrap CPU's page map, `tables_pages` its size;
/// `ap_entry` is where the trampoline jumps (on an AMD64 host the 32-bit
/// [`emit_ap_stub32`]).
pub(super) fn finish_copies(
    g: &mut Gen,
    b: &mut HostKernelBuilder,
    map: &PageMap,
    tables_pages: u32,
    code_base: u32,
    code_end: u32,
    ap_entry: Option<u32>,
) -> R {
    let Some(m) = g.smp.as_ref() else {
        return Ok(());
    };
    let (cpus, shared, tramp_at) = (m.d.cpus, m.d.shared, m.d.trampoline);
    let ap_entry = ap_entry.ok_or_else(|| BuildError::Internal("no ap_entry symbol".into()))?;
    let code32 = if g.a.bitness() == 64 {
        SEL64_CODE32
    } else {
        SEL_CODE32
    };
    let tramp = trampoline(g.t.gdt, g.t.gdt_limit, code32, ap_entry)?;
    let private = shared + PAGE;
    let private_len = code_base - private;
    let copies = super::page_align(code_end);
    let mut ok = g.d.write(tramp_at, &tramp);
    let tables_at = |i: u32| TABLES_BASE + i * tables_pages * PAGE;
    let copy_at = |i: u32| copies + (i - 1) * private_len;
    for i in 0..cpus {
        ok &=
            g.d.write(shared + SH_CR3 + 4 * i, &tables_at(i).to_le_bytes());
    }
    if !ok {
        return Err(BuildError::Internal("SMP data".into()));
    }
    let start = (private - g.d.base()) as usize;
    let mut image = g.d.as_slice()[start..].to_vec();
    image.resize(private_len as usize, 0);
    for i in 1..cpus {
        let mut own = map.clone();
        own.remap(u64::from(private), copy_at(i), private_len)
            .ok_or_else(|| BuildError::Internal("data area not mapped".into()))?;
        let tables = own.layout(tables_at(i));
        b.blobs.push((
            format!("host page tables cpu{i}"),
            tables_at(i),
            tables.bytes,
        ));
        b.blobs
            .push((format!("kernel data cpu{i}"), copy_at(i), image.clone()));
    }
    Ok(())
}
