//! What `run` and `decode` report: the JSON document and its text rendering.
//!
//! The JSON document (schema `worldswitch.run/2`) is one object:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `schema` | string | `"worldswitch.run/2"` |
//! | `command` | string | `"run"` or `"decode"` |
//! | `verified` | bool | every run verified |
//! | `runs` | array of [`RunJson`] | one per switcher, in the order run |
//!
//! Every address and count is a JSON number; absent values are `null`, never
//! a sentinel. Paging modes are named `32-bit`, `PAE` and `AMD64`. Version 2
//! changed from version 1: a stub's `guest_mode` is `null` (was `"-"`),
//! `failures` holds the lines the text report prints after `failure` (the
//! outcome is in `outcome` and `outcome_detail` only), and `not_measured`
//! says why instruction counts and wall time are `null` under `--gdb`.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use stam::Snapshot;
use vmm_switcher::templates::Revision;
use vmm_switcher::SwitcherKind;

use crate::setup;
use integration::qemu::Outcome;
use integration::scenario::{mutation_name, Built, Scenario, ScenarioResult};
use integration::transcript::Report;

/// The schema name of the document `run --json` and `decode --json` print.
pub const SCHEMA: &str = "worldswitch.run/2";

/// Why a `run --gdb` has no instruction counts and no wall time.
pub const GDB_NOT_MEASURED: &str = "run under --gdb: time the guest spends stopped in the \
    debugger counts as guest instructions (QEMU -icount), so the instruction counts, the STAM \
    ticks and the wall time include the debugging session and are not measurements";

/// The STAM pattern the run reports carry.
pub const STAM_PATTERN: &str = "/VMM/*";

/// The whole document.
#[derive(Clone, Debug, Serialize)]
pub struct RunDoc {
    /// [`SCHEMA`].
    pub schema: &'static str,
    /// `run` or `decode`.
    pub command: &'static str,
    /// Every run verified.
    pub verified: bool,
    /// One entry per switcher run.
    pub runs: Vec<RunJson>,
}

/// Where everything was placed (all numbers).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PlacementJson {
    /// HC address of the core-code block.
    pub code_hc: u64,
    /// Physical address of the core-code block.
    pub code_phys: u64,
    /// RC address of the hypervisor area.
    pub hma_rc: u32,
    /// HC address of the hypervisor area.
    pub hma_hc: u64,
    /// Physical address of the hypervisor area.
    pub hma_phys: u64,
    /// Physical address of the intermediate page tables.
    pub tables_phys: u64,
}

/// The last trace step a switcher printed (`--trace`).
#[derive(Clone, Debug, Serialize)]
pub struct StepJson {
    /// The character on COM1.
    pub char: String,
    /// The step's name.
    pub name: String,
    /// What it means.
    pub description: &'static str,
}

/// One state item that differed after a round trip.
#[derive(Clone, Debug, Serialize)]
pub struct MismatchJson {
    /// Trip index.
    pub trip: u32,
    /// VCPU index.
    pub vcpu: u32,
    /// Snapshot item name (`cr3`, `gdtr.base`, `ebx`, …).
    pub name: String,
    /// Value before the call.
    pub before: u32,
    /// Value after the call.
    pub after: u32,
}

/// The CPU facts a switcher was relocated for (`vmm::CpuFacts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CpuFactsJson {
    /// No-execute pages (EFER.NXE is set on the way to long mode).
    pub nx: bool,
    /// FXSAVE/FXRSTOR.
    pub fxsr: bool,
    /// The host uses SYSENTER (its MSRs are saved and restored).
    pub sysenter: bool,
    /// The host uses SYSCALL (EFER.SCE is saved and restored).
    pub syscall: bool,
}

impl From<vmm::CpuFacts> for CpuFactsJson {
    fn from(c: vmm::CpuFacts) -> Self {
        Self {
            nx: c.nx,
            fxsr: c.fxsr,
            sysenter: c.host_sysenter,
            syscall: c.host_syscall,
        }
    }
}

/// The first offset whose NMI was fatal (`--nmi-storm` without masking).
#[derive(Clone, Debug, Serialize)]
pub struct FatalOffsetJson {
    /// Instructions into the round trip; `null` in an interleaved storm,
    /// which places no edge.
    pub offset: Option<u32>,
    /// The instruction there, `label+0x…`.
    pub label: String,
    /// Its view (`HC`, `ID`, `RC`).
    pub view: String,
    /// What happened (`triple fault`, an exception, `NMI in transit (…)`,
    /// `NMI in the hypervisor context`).
    pub outcome: String,
}

/// What the NMI storm found. The placement figures are `null` in an
/// interleaved storm (several host CPUs), which places nothing.
#[derive(Clone, Debug, Serialize)]
pub struct NmiStormJson {
    /// `exact` (one host CPU) or `interleaved` (several).
    pub placement: integration::storm::Placement,
    /// Instructions of the longest round trip (C entry to return, far side included).
    pub path_instructions: Option<u32>,
    /// Offsets an NMI edge was placed at inside the path.
    pub offsets_covered: Option<u32>,
    /// NMIs taken in all.
    pub nmis_taken: u32,
    /// NMIs whose edge fell while LINT0 was masked, taken at the unmask (QEMU behaviour).
    pub nmis_deferred: Option<u32>,
    /// NMIs the host's IDT took outside host context.
    pub nmis_in_transit: u32,
    /// NMIs the hypervisor context's IDT took.
    pub nmis_in_hypervisor_context: u32,
    /// The first fatal offset; `null` when none was.
    pub first_fatal: Option<FatalOffsetJson>,
    /// Interleaved: each host CPU's account; `null` on one CPU.
    pub per_cpu: Option<Vec<integration::storm::CpuStorm>>,
}

impl From<&integration::storm::StormReport> for NmiStormJson {
    fn from(s: &integration::storm::StormReport) -> Self {
        let exact = s.placement == integration::storm::Placement::Exact;
        let placed = |v: u32| exact.then_some(v);
        Self {
            placement: s.placement,
            path_instructions: placed(s.path_instructions),
            offsets_covered: placed(s.offsets_covered),
            nmis_taken: s.nmis_taken,
            nmis_deferred: placed(s.nmis_deferred),
            nmis_in_transit: s.nmis_in_transit,
            nmis_in_hypervisor_context: s.nmis_in_hypervisor_context,
            first_fatal: s.first_fatal.as_ref().map(|f| FatalOffsetJson {
                offset: f.offset,
                label: f.label.clone(),
                view: f.view.clone(),
                outcome: f.outcome.clone(),
            }),
            per_cpu: (!exact).then(|| s.per_cpu.clone()),
        }
    }
}

/// The `nmi storm` lines of the text report.
fn render_storm(s: &mut String, st: &NmiStormJson) {
    match (st.offsets_covered, st.path_instructions, st.nmis_deferred) {
        (Some(covered), Some(path), Some(deferred)) => {
            let _ = writeln!(
                s,
                "  nmi storm    {covered} of {path} offsets covered; {} NMIs taken: {deferred} deferred to the unmask, {} in transit, {} in the hypervisor context",
                st.nmis_taken, st.nmis_in_transit, st.nmis_in_hypervisor_context
            );
        }
        _ => render_interleaved(s, st),
    }
    if let Some(f) = &st.first_fatal {
        let offset = f
            .offset
            .map(|o| format!("offset {o}: "))
            .unwrap_or_default();
        let at = match f.label.as_str() {
            "?" if f.offset.is_none() => String::new(),
            label => format!("{label} ({}): ", f.view),
        };
        let _ = writeln!(s, "  first fatal  {offset}{at}{}", f.outcome);
    }
}

/// An interleaved storm's lines: the totals, then each CPU's account.
fn render_interleaved(s: &mut String, st: &NmiStormJson) {
    let cpus = st.per_cpu.as_deref().unwrap_or_default();
    let calls: u32 = cpus.iter().map(|c| c.calls).sum();
    let with_edge: u32 = cpus.iter().map(|c| c.calls_with_edge).sum();
    if cpus.is_empty() {
        let _ = writeln!(
            s,
            "  nmi storm    interleaved; no CPU gave its account (the run ended first)"
        );
        return;
    }
    let edges = format!(
        "interleaved over {} CPUs: an edge inside {with_edge} of {calls} round trips",
        cpus.len()
    );
    let _ = writeln!(
        s,
        "  nmi storm    {edges}; {} NMIs taken, {} in transit, {} in the hypervisor context",
        st.nmis_taken, st.nmis_in_transit, st.nmis_in_hypervisor_context
    );
    for c in cpus {
        let _ = writeln!(
            s,
            "    cpu {}      edge inside {} of {} round trips ({} hidden by the mask); {} NMIs, {} in a round trip, {} in transit",
            c.cpu,
            c.calls_with_edge,
            c.calls,
            c.edges_hidden,
            c.nmis_taken,
            c.nmis_in_call,
            c.nmis_in_transit
        );
    }
}

/// One switcher's run.
#[derive(Clone, Debug, Serialize)]
pub struct RunJson {
    /// Command-line name (`32-to-amd64`).
    pub switcher: &'static str,
    /// VirtualBox name (`VMMSWITCHER_32_TO_AMD64`).
    pub vbox_name: &'static str,
    /// Host paging mode the testbed ran (`32-bit`, `PAE`, `AMD64`).
    pub host_mode: &'static str,
    /// Hypervisor-context paging mode (`32-bit`, `PAE`, `AMD64`); `None`
    /// for a stub, which has no hypervisor context.
    pub guest_mode: Option<&'static str>,
    /// Switcher revision, `"a"`, `"b"` (the seeds') or `"c"` (this project's).
    pub revision: &'static str,
    /// STAM profiling built in.
    pub stats: bool,
    /// APIC NMI masking built in.
    pub apic_nmi_masking: bool,
    /// Trace characters built in.
    pub trace: bool,
    /// x2APIC-capable masking built in.
    pub x2apic: bool,
    /// The CPU facts the switcher was relocated for.
    pub cpu_facts: CpuFactsJson,
    /// The host APIC's mode: `xapic` or `x2apic`.
    pub host_apic: &'static str,
    /// The host's CR4 configuration: `base` or `today`.
    pub host_cr4: &'static str,
    /// The host ran 5-level paging (CR4.LA57; `--la57`).
    pub la57: bool,
    /// VCPUs called in turn.
    pub vcpus: u32,
    /// Host CPUs switching at once (`--cpus`).
    pub cpus: u32,
    /// Round trips asked per VCPU.
    pub round_trips_per_vcpu: u32,
    /// Addresses.
    pub placement: PlacementJson,
    /// The deliberate breakage (`run --mutate`), kebab-case; `null` normally.
    pub mutation: Option<String>,
    /// Every check passed.
    pub verified: bool,
    /// `pass`, `verification-failed`, `host-exception`, `far-exception`,
    /// `triple-fault`, `timeout`, `exit-status` or `incomplete` (a decoded
    /// transcript without a `RESULT` line). A QEMU that refuses to start is
    /// an error (exit status 2), not an outcome.
    pub outcome: &'static str,
    /// Details of the outcome (exception vector and symbolised address, …).
    pub outcome_detail: Option<String>,
    /// The checks that failed, one human line each, exactly as the text
    /// report prints them after `failure` (the outcome itself is in
    /// `outcome` and `outcome_detail`).
    pub failures: Vec<String>,
    /// State items that differed after a round trip (first few).
    pub mismatches: Vec<MismatchJson>,
    /// The last trace step printed (`--trace` only).
    pub last_step: Option<StepJson>,
    /// Round trips completed, over all VCPUs.
    pub round_trips: u64,
    /// Exact instructions host → hypervisor context (`/VMM/Switcher/ToGC` average).
    pub instructions_to_guest: Option<u64>,
    /// Exact instructions hypervisor context → host (`/VMM/Switcher/ToHC` average).
    pub instructions_to_host: Option<u64>,
    /// Instructions of the cheapest round trip as the host measures it
    /// (C call to return, far helper included, no FPU/debug sync).
    pub instructions_per_round_trip: Option<u64>,
    /// Instructions of the dearest round trip (FPU and debug sync).
    pub instructions_per_round_trip_max: Option<u64>,
    /// NMIs the host took during the run.
    pub nmis: Option<u32>,
    /// What the NMI storm found (`--nmi-storm`); `null` without one.
    pub nmi_storm: Option<NmiStormJson>,
    /// With `--cpus` above 1: round trips during which another host CPU
    /// was inside its own switch; `null` with one CPU.
    pub overlapping_trips: Option<u64>,
    /// With `--cpus` above 1: every host CPU's calls, overlapping calls,
    /// failed calls and TSC range; `null` with one CPU.
    pub per_cpu: Option<Vec<integration::scenario::CpuFigures>>,
    /// Wall-clock time of the QEMU boot in seconds (`null` when decoded or
    /// not measured).
    pub wall_seconds: Option<f64>,
    /// Why the instruction counts and the wall time are `null` although the
    /// run produced them (under `--gdb`, [`GDB_NOT_MEASURED`]); `null` when
    /// they are measurements.
    pub not_measured: Option<String>,
    /// The VM's STAM samples after the run (`stam::Snapshot`), `null` without a VM dump.
    pub stam: Option<Snapshot>,
    /// `run --cost`: the expensive operations of each trip kind and
    /// direction, counted by the QEMU plugin ([`crate::cost::Cost`]);
    /// `null` without `--cost`.
    pub cost: Option<crate::cost::Cost>,
    /// The engine that ran the image: `qemu` or `bochs` (`run --engine`).
    pub engine: &'static str,
    /// The Bochs CPU model (`--bochs-cpu`); `null` under QEMU.
    pub bochs_cpu: Option<String>,
    /// Under Bochs, which has no instruction counter, the `instructions_*`
    /// figures are `null` and the same figures are here, in emulated TSC
    /// ticks (what Bochs' RDTSC counts); `null` under QEMU.
    pub tsc_ticks: Option<TscTicksJson>,
    /// The lines of the Bochs log that name an architectural rule the run
    /// broke, or Bochs' panic; empty under QEMU.
    pub engine_faults: Vec<String>,
}

/// The host's RDTSC figures under Bochs, in emulated TSC ticks.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TscTicksJson {
    /// Host → hypervisor context (`/VMM/Switcher/ToGC` average).
    pub to_guest: Option<u64>,
    /// Hypervisor context → host (`/VMM/Switcher/ToHC` average).
    pub to_host: Option<u64>,
    /// The cheapest round trip as the host measures it.
    pub per_round_trip: Option<u64>,
    /// The dearest round trip.
    pub per_round_trip_max: Option<u64>,
}

/// What the QEMU figures are not under Bochs.
pub const BOCHS_NOT_INSTRUCTIONS: &str =
    "Bochs has no instruction counter: its RDTSC counts emulated TSC ticks (see tsc_ticks)";

/// Marks `r` as a Bochs run on `cpu`: the RDTSC figures move from the
/// `instructions_*` fields to [`RunJson::tsc_ticks`], and the log's fault
/// lines (`faults`, one per line) join [`RunJson::engine_faults`] and the
/// outcome's details.
pub fn as_bochs_run(r: &mut RunJson, cpu: &str, faults: &str) {
    r.engine = "bochs";
    r.bochs_cpu = Some(cpu.to_owned());
    r.tsc_ticks = Some(TscTicksJson {
        to_guest: r.instructions_to_guest.take(),
        to_host: r.instructions_to_host.take(),
        per_round_trip: r.instructions_per_round_trip.take(),
        per_round_trip_max: r.instructions_per_round_trip_max.take(),
    });
    r.not_measured = Some(BOCHS_NOT_INSTRUCTIONS.to_owned());
    r.engine_faults = faults.lines().map(str::to_owned).collect();
    if let (Some(first), Some(d)) = (r.engine_faults.first(), r.outcome_detail.as_mut()) {
        let _ = write!(d, "; Bochs: {first}");
    }
}

fn revision_name(r: Revision) -> &'static str {
    match r {
        Revision::A => "a",
        Revision::B => "b",
        Revision::C => "c",
    }
}

/// The kebab-case name of an outcome.
pub fn outcome_name(o: &Outcome, incomplete: bool, verified: bool) -> &'static str {
    match o {
        _ if incomplete => "incomplete",
        // The machine said "pass" but the judge did not accept the run (a
        // failed check, a corrupted or forged transcript): never call it a pass.
        Outcome::Pass if !verified => "verification-failed",
        Outcome::Pass => "pass",
        Outcome::VerificationFailed => "verification-failed",
        Outcome::HostException(_) => "host-exception",
        Outcome::FarException(_) => "far-exception",
        Outcome::TripleFault => "triple-fault",
        Outcome::Timeout => "timeout",
        Outcome::QemuRefused(_) => "qemu-refused",
        Outcome::Other(_) => "exit-status",
        Outcome::EnginePanic(_) => "engine-panic",
    }
}

/// The mnemonic of an exception vector.
pub fn vector_name(v: u8) -> String {
    let n = match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        _ => return format!("vector {v}"),
    };
    n.to_string()
}

fn symbolize(built: &Built, kind: SwitcherKind, addr: u64) -> String {
    if let Some(s) = built
        .vmm
        .switcher(kind)
        .ok()
        .and_then(|sw| setup::symbolize_switcher(sw, addr))
    {
        return s;
    }
    if let Some((name, off)) = u32::try_from(addr)
        .ok()
        .and_then(|a| built.testbed.symbolize(a))
    {
        return format!("host kernel {name}+{off:#x}");
    }
    "unknown code".into()
}

fn outcome_detail(
    o: &Outcome,
    report: &Report,
    built: &Built,
    kind: SwitcherKind,
    incomplete: bool,
) -> Option<String> {
    let mut d = match o {
        _ if incomplete => {
            "the transcript ends without a RESULT line (reset, triple fault or hang)".to_string()
        }
        Outcome::Pass | Outcome::VerificationFailed => return None,
        // A long-mode host reports all 64 bits of RIP and CR2 (an LA57 host's
        // code lies above 2^48); a 32-bit host's equal EIP and CR2.
        Outcome::HostException(Some(e)) if e.rip > u64::from(u32::MAX) => format!(
            "{}({:#x}) in the host at rip {:#x} [{}], cs {:#x}, rflags {:#x}, cr2 {:#x}, trip {}, vcpu {}, phase {:?}",
            vector_name(e.vector),
            e.error_code,
            e.rip,
            symbolize(built, kind, e.rip),
            e.cs,
            e.eflags,
            e.cr2_64,
            e.trip,
            e.vcpu,
            e.phase
        ),
        Outcome::HostException(Some(e)) => format!(
            "{}({:#x}) in the host at eip {:#010x} [{}], cs {:#x}, eflags {:#x}, cr2 {:#x}, trip {}, vcpu {}, phase {:?}",
            vector_name(e.vector),
            e.error_code,
            e.eip,
            symbolize(built, kind, u64::from(e.eip)),
            e.cs,
            e.eflags,
            e.cr2,
            e.trip,
            e.vcpu,
            e.phase
        ),
        Outcome::HostException(None) => "an exception in the host (no EXC line)".into(),
        Outcome::FarException(Some(f)) => format!(
            "{}({:#x}) in the hypervisor context at rip {:#x} [{}]",
            vector_name(f.vector),
            f.error_code,
            f.rip,
            symbolize(built, kind, f.rip)
        ),
        Outcome::FarException(None) => {
            "an exception in the hypervisor context (no FAREXC line)".into()
        }
        Outcome::TripleFault => {
            "QEMU exited with status 0: a triple fault (or reset) under -no-reboot".into()
        }
        Outcome::Timeout => "QEMU was killed at the wall-clock limit (--timeout)".into(),
        Outcome::QemuRefused(err) => format!(
            "QEMU refused to start: {}",
            err.lines().next().unwrap_or("").trim()
        ),
        Outcome::Other(s) => format!("QEMU exit status {s}"),
        Outcome::EnginePanic(p) => format!("Bochs panicked: {p}"),
    };
    if let Some(n) = &report.nested_exception {
        let _ = write!(
            d,
            "; then {}({:#x}) at {:#010x} inside the exception path",
            vector_name(n.vector),
            n.error_code,
            n.eip
        );
    }
    Some(d)
}

/// Builds the report of one run.
///
/// `incomplete` marks a decoded transcript that has no `RESULT` line;
/// `wall` is the boot's wall-clock time when QEMU ran.
pub fn run_json(
    s: &Scenario,
    built: &Built,
    r: &ScenarioResult,
    wall: Option<Duration>,
    incomplete: bool,
) -> RunJson {
    let p = s.placement;
    let report = &r.run.report;
    let stam = r.vm_image.as_deref().and_then(|img| {
        let st = built.vmm.stam().ok()?;
        st.registry
            .snapshot(STAM_PATTERN, &st.backing(&st.with_totals(img)))
            .ok()
    });
    RunJson {
        switcher: s.kind.cli_name(),
        vbox_name: s.kind.vbox_name(),
        host_mode: setup::host_mode_name(s.host_mode()),
        guest_mode: setup::guest_mode(s.kind),
        revision: revision_name(s.options.revision),
        stats: s.options.stats,
        apic_nmi_masking: s.options.apic_nmi_masking,
        trace: s.options.trace,
        x2apic: s.options.x2apic,
        cpu_facts: s.cpu.into(),
        host_apic: if s.host_x2apic { "x2apic" } else { "xapic" },
        host_cr4: s.host_cr4.name(),
        la57: s.la57(),
        vcpus: s.vcpus,
        cpus: s.cpus,
        round_trips_per_vcpu: s.trips,
        placement: PlacementJson {
            code_hc: p.code_hc.0,
            code_phys: p.code_phys.0,
            hma_rc: p.hma_rc.0,
            hma_hc: p.hma_hc.0,
            hma_phys: p.hma_phys.0,
            tables_phys: p.tables_phys.0,
        },
        mutation: s.mutation.map(mutation_name),
        verified: r.verified,
        outcome: outcome_name(&r.run.outcome, incomplete, r.verified),
        outcome_detail: outcome_detail(&r.run.outcome, report, built, s.kind, incomplete),
        failures: failure_lines(&r.failures),
        mismatches: report
            .mismatches
            .iter()
            .take(16)
            .map(|m| MismatchJson {
                trip: m.trip,
                vcpu: m.vcpu,
                name: m.name.clone(),
                before: m.before,
                after: m.after,
            })
            .collect(),
        last_step: r.last_step.map(|st| StepJson {
            char: char::from(st.ch()).to_string(),
            name: format!("{st:?}"),
            description: st.describe(),
        }),
        round_trips: r.round_trips,
        instructions_to_guest: r.instructions_to_guest,
        instructions_to_host: r.instructions_to_host,
        instructions_per_round_trip: r.instructions_per_round_trip,
        instructions_per_round_trip_max: r.instructions_per_round_trip_max,
        nmis: report.summary.as_ref().map(|sm| sm.nmis),
        nmi_storm: r.nmi_storm.as_ref().map(NmiStormJson::from),
        overlapping_trips: r.smp.as_ref().map(|m| m.overlapping_trips),
        per_cpu: r.smp.as_ref().map(|m| m.per_cpu.clone()),
        wall_seconds: wall.map(|w| (w.as_secs_f64() * 1000.0).round() / 1000.0),
        not_measured: None,
        stam,
        cost: None,
        engine: "qemu",
        bochs_cpu: None,
        tsc_ticks: None,
        engine_faults: Vec::new(),
    }
}

/// The judge's failure lines a report shows: every check that failed, less
/// the judge's own line about the outcome (`outcome …`, Rust debug text),
/// which the report gives as `outcome` and `outcome_detail` instead.
pub fn failure_lines(judged: &[String]) -> Vec<String> {
    judged
        .iter()
        .filter(|f| !f.starts_with("outcome "))
        .cloned()
        .collect()
}

/// Withholds the figures a run produced but did not measure: the
/// instruction counts and the wall time become `None`, and
/// [`RunJson::not_measured`] says `why`.
pub fn withhold_measurements(r: &mut RunJson, why: &str) {
    r.instructions_to_guest = None;
    r.instructions_to_host = None;
    r.instructions_per_round_trip = None;
    r.instructions_per_round_trip_max = None;
    r.wall_seconds = None;
    r.not_measured = Some(why.to_owned());
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |n| n.to_string())
}

/// The text report of one run (what `run` and `decode` print per switcher).
pub fn render(r: &RunJson) -> String {
    let mut s = String::new();
    match r.guest_mode {
        None => {
            let _ = writeln!(
                s,
                "{} ({}, stub for {} hosts: no hypervisor context)",
                r.switcher, r.vbox_name, r.host_mode
            );
        }
        Some(guest) => {
            let _ = writeln!(
                s,
                "{} ({}, {} host -> {guest} hypervisor context)",
                r.switcher, r.vbox_name, r.host_mode
            );
        }
    }
    let mut opts = vec![format!("revision {}", r.revision.to_uppercase())];
    if !r.apic_nmi_masking {
        opts.push("no APIC masking".into());
    }
    if !r.stats {
        opts.push("no stats".into());
    }
    if r.trace {
        opts.push("trace".into());
    }
    if r.x2apic {
        opts.push("x2APIC".into());
    }
    opts.extend(host_words(r));
    if let Some(m) = &r.mutation {
        opts.push(format!("MUTATED: {m}"));
    }
    let _ = writeln!(
        s,
        "  build        {}; {} VCPUs x {} round trips; HC {:#x}, RC {:#x}, phys {:#x}",
        opts.join(", "),
        r.vcpus,
        r.round_trips_per_vcpu,
        r.placement.code_hc,
        r.placement.hma_rc,
        r.placement.code_phys
    );
    let wall = r
        .wall_seconds
        .map(|w| format!(" in {w:.2} s"))
        .unwrap_or_default();
    if r.verified {
        let _ = writeln!(
            s,
            "  verified     yes ({} round trips, host state intact after each{wall})",
            r.round_trips
        );
    } else {
        let _ = writeln!(
            s,
            "  verified     NO: outcome {} ({} round trip{} completed{wall})",
            r.outcome,
            r.round_trips,
            if r.round_trips == 1 { "" } else { "s" }
        );
    }
    if let Some(d) = &r.outcome_detail {
        let _ = writeln!(s, "  outcome      {d}");
    }
    if let Some(st) = &r.last_step {
        let _ = writeln!(
            s,
            "  last step    '{}' {}: {}",
            st.char, st.name, st.description
        );
    }
    for f in &r.failures {
        let _ = writeln!(s, "  failure      {f}");
    }
    if let Some(why) = &r.not_measured {
        let _ = writeln!(s, "  not measured {why}");
    }
    let (unit, to_guest, to_host, trip, trip_max) = match &r.tsc_ticks {
        Some(t) => (
            "TSC ticks",
            t.to_guest,
            t.to_host,
            t.per_round_trip,
            t.per_round_trip_max,
        ),
        None => (
            "instructions",
            r.instructions_to_guest,
            r.instructions_to_host,
            r.instructions_per_round_trip,
            r.instructions_per_round_trip_max,
        ),
    };
    for f in &r.engine_faults {
        let _ = writeln!(s, "  bochs        {f}");
    }
    let _ = writeln!(
        s,
        "  to guest     {:>5} {unit} per switch (/VMM/Switcher/ToGC average)",
        opt(to_guest)
    );
    let _ = writeln!(
        s,
        "  to host      {:>5} {unit} per switch (/VMM/Switcher/ToHC average)",
        opt(to_host)
    );
    let _ = writeln!(
        s,
        "  round trip   {:>5} .. {} {unit} (C call to return, helper included; no sync .. FPU+debug sync)",
        opt(trip),
        opt(trip_max)
    );
    if let Some(st) = &r.nmi_storm {
        render_storm(&mut s, st);
    }
    if let (Some(overlap), Some(cpus)) = (r.overlapping_trips, &r.per_cpu) {
        let _ = writeln!(
            s,
            "  host CPUs    {}, {overlap} of {} round trips overlapping another CPU's switch",
            r.cpus, r.round_trips
        );
        for c in cpus {
            let _ = writeln!(
                s,
                "    cpu {}      {} round trips, {} overlapping, {} failed, tsc {}..{}",
                c.cpu, c.calls, c.overlapping_trips, c.failed, c.tsc_min, c.tsc_max
            );
        }
    }
    match &r.stam {
        Some(snap) => {
            let _ = writeln!(s, "  STAM ({STAM_PATTERN}):");
            for line in snap.print().lines() {
                let _ = writeln!(s, "    {line}");
            }
        }
        None => {
            let _ = writeln!(s, "  STAM         no VM dump in the transcript");
        }
    }
    s
}

/// The comparison table that ends a text report of several switchers: one
/// row per run, in the order run, with the verdict, the ToGC and ToHC
/// averages, the round trip's cheapest and dearest instruction counts and
/// the wall time (`n/a` where there is no figure).
pub fn render_table(runs: &[RunJson]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<15} {:<25} {:>5} {:>5}  {:<12} {:>7}",
        "SWITCHER", "VERDICT", "TOGC", "TOHC", "ROUND TRIP", "WALL"
    );
    for r in runs {
        let verdict = if r.verified {
            "verified".to_owned()
        } else {
            format!("NO: {}", r.outcome)
        };
        // Under Bochs, TSC ticks (marked `t`) stand where QEMU's
        // instruction counts stand.
        let (to_guest, to_host, lo, hi, mark) = match &r.tsc_ticks {
            Some(t) => (
                t.to_guest,
                t.to_host,
                t.per_round_trip,
                t.per_round_trip_max,
                "t",
            ),
            None => (
                r.instructions_to_guest,
                r.instructions_to_host,
                r.instructions_per_round_trip,
                r.instructions_per_round_trip_max,
                "",
            ),
        };
        let trip = match (lo, hi) {
            (None, None) => "n/a".to_owned(),
            (lo, hi) => format!("{}..{}{mark}", opt(lo), opt(hi)),
        };
        let wall = r
            .wall_seconds
            .map_or_else(|| "n/a".to_owned(), |w| format!("{w:.2} s"));
        let _ = writeln!(
            s,
            "{:<15} {:<25} {:>5} {:>5}  {:<12} {:>7}",
            r.switcher,
            verdict,
            opt(to_guest),
            opt(to_host),
            trip,
            wall
        );
    }
    s
}

/// The closing line of a text report.
pub fn render_summary(doc: &RunDoc) -> String {
    let ok = doc.runs.iter().filter(|r| r.verified).count();
    let mut s = format!(
        "{ok} of {} switcher{} verified",
        doc.runs.len(),
        if doc.runs.len() == 1 { "" } else { "s" }
    );
    s.push('\n');
    s
}

/// The text report's words for a host that is not the default one: an
/// x2APIC-mode APIC, today's CR4, CPU facts other than the common ones.
fn host_words(r: &RunJson) -> Vec<String> {
    let mut v = Vec::new();
    if r.host_apic != "xapic" {
        v.push(format!("{} host", r.host_apic));
    }
    if r.host_cr4 != "base" {
        v.push(format!("host CR4 {}", r.host_cr4));
    }
    if r.la57 {
        v.push("5-level paging (LA57)".into());
    }
    let c = r.cpu_facts;
    let missing: Vec<&str> = [
        ("NX", c.nx),
        ("FXSR", c.fxsr),
        ("SYSENTER", c.sysenter),
        ("SYSCALL", c.syscall),
    ]
    .into_iter()
    .filter(|(_, on)| !on)
    .map(|(n, _)| n)
    .collect();
    if !missing.is_empty() {
        v.push(format!("for a CPU without {}", missing.join("/")));
    }
    v
}
