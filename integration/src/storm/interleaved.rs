//! Judging an NMI storm on several host CPUs.
//!
//! Under `-icount` every CPU's instructions advance one clock, so between
//! a CPU's RDTSC and a PIT edge the other CPUs run as well: no CPU can
//! place an edge at an instruction offset of its own round trip. The
//! storm is interleaved instead. Every CPU's LINT0 receives every edge
//! (the 8259's output reaches each local APIC whose LINT0 is unmasked),
//! wherever the round robin has left the CPU: inside its switch, in the
//! host code around it, or suspended mid-switch. Each CPU counts, per call,
//! whether an edge fell inside it (the PIT formula on the shared TSC),
//! whether it took the NMI, and where (host context or not); it prints a
//! `STORMCPU` line after its `CPU` line.
//!
//! With NMI masking a run passes only when no CPU took an NMI outside host
//! context, the far side took none, every CPU took NMIs (its LINT0
//! received the edges), edges fell inside calls, and each account adds up.

use super::{
    crash_outcome, far_account, name_addr, pit_failures, transit_context, CpuStorm, FatalOffset,
    Listing, Placement, StormReport,
};
use crate::hostkernel::storm::{NmiStorm, PIT_EDGE_DELAY, SHARED_LOAD_INSTRUCTIONS};
use crate::qemu::RunResult;
use crate::scenario::{Built, Scenario};
use crate::transcript::{Report, StormCpuLine};

/// Judges the interleaved storm of a finished run.
pub fn analyze(s: &Scenario, b: &Built, run: &RunResult) -> (StormReport, Vec<String>) {
    let r = &run.report;
    let listing = Listing::new(s, b);
    let listing = listing.as_ref();
    // The edges arrive where they do on one CPU: the round robin moves
    // nothing while the other CPUs wait for their start-up.
    let delay = PIT_EDGE_DELAY + SHARED_LOAD_INSTRUCTIONS;
    let mut f = pit_failures(r, NmiStorm::default(), delay);
    let mut rep = StormReport {
        placement: Placement::Interleaved,
        ..StormReport::default()
    };
    let finished = crash_outcome(run).is_none() && r.result.is_some();
    let mut fatal: Option<FatalOffset> = None;
    for l in &r.storm_cpus {
        f.extend(account_failures(s, r, l));
        if l.transit > 0 && fatal.is_none() {
            let (label, view) = name_addr(listing, b, l.ip);
            fatal = Some(FatalOffset {
                offset: None,
                label,
                view,
                outcome: format!(
                    "NMI in transit on CPU {} ({})",
                    l.cpu,
                    transit_context(l.ctx)
                ),
            });
        }
        rep.per_cpu.push(CpuStorm {
            cpu: l.cpu,
            calls: l.calls,
            calls_with_edge: l.edges,
            edges_hidden: l.hidden,
            nmis_taken: l.nmis,
            nmis_in_call: l.in_call,
            nmis_in_transit: l.transit,
        });
    }
    rep.per_cpu.sort_by_key(|c| c.cpu);
    rep.calls = sum(&rep.per_cpu, |c| c.calls);
    rep.nmis_in_transit = sum(&rep.per_cpu, |c| c.nmis_in_transit);
    let (far_nmis, far_ip) = far_account(s, r);
    rep.nmis_in_hypervisor_context = far_nmis;
    rep.nmis_taken = r
        .nmi_count
        .unwrap_or_else(|| sum(&rep.per_cpu, |c| c.nmis_taken))
        .saturating_add(far_nmis);
    if far_nmis > 0 && fatal.is_none() {
        let (label, view) = name_addr(listing, b, u64::from(far_ip));
        fatal = Some(FatalOffset {
            offset: None,
            label,
            view,
            outcome: "NMI in the hypervisor context".into(),
        });
    }
    if let (None, Some(what)) = (&fatal, crash_outcome(run)) {
        fatal = Some(FatalOffset {
            offset: None,
            label: "?".into(),
            view: "?".into(),
            outcome: what,
        });
    }
    rep.complete = r.storm_cpus.len() == s.cpus as usize;
    if finished {
        f.extend(coverage_failures(s, &rep));
    }
    if let Some(fa) = &fatal {
        let at = match fa.label.as_str() {
            "?" => String::new(),
            label => format!(" at {label} ({})", fa.view),
        };
        f.push(format!(
            "an NMI of the interleaved storm was fatal{at}: {}",
            fa.outcome
        ));
    }
    rep.first_fatal = fatal;
    (rep, f)
}

fn sum(cpus: &[CpuStorm], field: impl Fn(&CpuStorm) -> u32) -> u32 {
    cpus.iter().map(field).fold(0, u32::saturating_add)
}

/// One CPU's account adds up and agrees with its `CPU` line.
fn account_failures(s: &Scenario, r: &Report, l: &StormCpuLine) -> Vec<String> {
    let mut f = Vec::new();
    let who = format!("STORMCPU cpu={}", l.cpu);
    if l.cpu >= s.cpus {
        f.push(format!("{who}: the run has {} host CPUs", s.cpus));
        return f;
    }
    if r.storm_cpus.iter().filter(|o| o.cpu == l.cpu).count() > 1 {
        f.push(format!("{who} appears twice"));
    }
    match r.cpu_lines.iter().find(|c| c.cpu == l.cpu) {
        Some(c) if c.calls != l.calls => f.push(format!(
            "{who}: {} calls, its CPU line has {}",
            l.calls, c.calls
        )),
        Some(_) => {}
        None => f.push(format!("{who} without a CPU line")),
    }
    if u64::from(l.host) + u64::from(l.transit) != u64::from(l.in_call) {
        f.push(format!(
            "{who}: {} NMIs in calls, but {} in host context and {} in transit",
            l.in_call, l.host, l.transit
        ));
    }
    if l.hidden > l.edges || l.edges > l.calls || l.in_call > l.nmis {
        f.push(format!(
            "{who}: calls={} edges={} hidden={} nmis={} in_call={} do not nest",
            l.calls, l.edges, l.hidden, l.nmis, l.in_call
        ));
    }
    if l.transit == 0 && (l.ip != 0 || l.ctx != 0) {
        f.push(format!("{who}: no NMI in transit, yet ip or ctx is set"));
    }
    f
}

/// Every CPU's LINT0 received edges, and edges fell inside calls.
fn coverage_failures(s: &Scenario, rep: &StormReport) -> Vec<String> {
    let mut f = Vec::new();
    if rep.per_cpu.len() != s.cpus as usize {
        f.push(format!(
            "{} STORMCPU lines for {} host CPUs",
            rep.per_cpu.len(),
            s.cpus
        ));
    }
    for c in rep.per_cpu.iter().filter(|c| c.nmis_taken == 0) {
        f.push(format!(
            "CPU {} took no NMI: its LINT0 never received the PIT's edges",
            c.cpu
        ));
    }
    if !rep.per_cpu.is_empty() && sum(&rep.per_cpu, |c| c.calls_with_edge) == 0 {
        f.push("no PIT edge fell inside any round trip: the storm tested nothing".into());
    }
    f
}
