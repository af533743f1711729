//! Judging an NMI storm ([`crate::scenario::Scenario::nmi_storm`]): the
//! `PIT` line against the PIT formula, the `STORM` lines against the
//! kernel's targeting rule, and where each NMI was taken.
//!
//! The storm's path is the whole round trip from the switcher's C entry to
//! its return, the far side's code (helper or RC code) included: offset `o`
//! means "`o` instructions after the entry's first instruction". An NMI is
//! classified as
//!
//! - *at target*: taken in host context exactly at its offset;
//! - *deferred*: taken in host context later than its edge (the edge fell
//!   while LINT0 was masked; QEMU delivers it when LINT0 is unmasked);
//! - *in transit*: taken by the host's IDT outside host context (another
//!   CS, CR3 or paging mode);
//! - *in the hypervisor context*: taken by the far side's IDT (its mailbox
//!   counts it).
//!
//! With NMI masking a run passes only when every NMI is at target or
//! deferred, all deferred ones are taken at one instruction (the unmask),
//! no path has an NMI at target between two deferred offsets, and every
//! offset of the longest path is covered. Without it, the first offset that
//! took an NMI in transit, in the hypervisor context, or crashed the machine
//! is the *first fatal offset*.
//!
//! On several host CPUs the storm is *interleaved* ([`interleaved`]): the
//! CPUs share one instruction clock, so no CPU can place an edge in its own
//! instruction stream; every CPU's LINT0 receives every edge wherever the
//! round robin has put the CPU, and the judge counts where they fell.

use serde::Serialize;
use vmm_switcher::View;

use crate::hostkernel::storm::{
    self as kstorm, ctx, NmiStorm, DT_AT_TARGET, MISS_LIMIT, PIT_EDGE_DELAY, PIT_SAMPLES,
};
use crate::qemu::{Outcome, RunResult};
use crate::scenario::{Built, Scenario};
use crate::transcript::{Report, StormLine};

pub mod interleaved;

/// How the storm's edges met the round trips.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// One host CPU: each edge placed at an exact instruction offset.
    #[default]
    Exact,
    /// Several host CPUs: every edge reaches every CPU wherever it is.
    Interleaved,
}

/// One host CPU's account of an interleaved storm (`STORMCPU` line).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuStorm {
    /// The host CPU.
    pub cpu: u32,
    /// Its calls (round trips).
    pub calls: u32,
    /// Calls during which a PIT edge arrived (the PIT formula on the TSC).
    pub calls_with_edge: u32,
    /// Of those, calls that took no NMI: the edge fell while LINT0 was
    /// masked and another CPU acknowledged it at the 8259 first.
    pub edges_hidden: u32,
    /// NMIs the CPU took in all.
    pub nmis_taken: u32,
    /// NMIs it took during its calls.
    pub nmis_in_call: u32,
    /// Of those, NMIs taken outside host context.
    pub nmis_in_transit: u32,
}

/// The first offset whose NMI was fatal (or would have been).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FatalOffset {
    /// The offset into the path.
    pub offset: Option<u32>,
    /// The instruction there, `label+0x…` (a switcher label, `far side+0x…`
    /// or `host kernel symbol+0x…`), or `?` when unknown.
    pub label: String,
    /// The view it runs in (`HC`, `ID`, `RC`), or `?`.
    pub view: String,
    /// What happened: `triple fault`, an exception, `NMI in transit (…)`,
    /// `NMI in the hypervisor context`.
    pub outcome: String,
}

/// What the storm found. In an interleaved storm the placement's figures
/// (`path_instructions`, `offsets_covered`, `nmis_at_target`,
/// `nmis_deferred`, `deferred_to`, `masked_offsets`) stay 0 or `None`:
/// nothing was placed; `per_cpu` has each CPU's account instead.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StormReport {
    /// Exact (one CPU) or interleaved (several).
    pub placement: Placement,
    /// Instructions of the longest path (entry to return, far side
    /// included) among the calls that ended the storm, which take every kind
    /// of round trip; the first call of a kind may take a few more once, on
    /// a cold path no later call repeats.
    pub path_instructions: u32,
    /// Offsets an edge was placed at inside the path (`0..offsets_covered`).
    pub offsets_covered: u32,
    /// NMIs taken in all (host and far side).
    pub nmis_taken: u32,
    /// NMIs taken at their target offset in host context.
    pub nmis_at_target: u32,
    /// NMIs whose edge fell while LINT0 was masked, taken at the unmask (QEMU).
    pub nmis_deferred: u32,
    /// NMIs the host's IDT took outside host context.
    pub nmis_in_transit: u32,
    /// NMIs the far side's IDT took.
    pub nmis_in_hypervisor_context: u32,
    /// Calls that targeted an offset (`STORM` lines); interleaved: every
    /// CPU's calls.
    pub calls: u32,
    /// The storm covered the longest path and stopped by itself;
    /// interleaved: every CPU gave its account.
    pub complete: bool,
    /// Where the deferred NMIs were taken (the unmask), `label+0x… (view)`.
    pub deferred_to: Option<String>,
    /// The first and last offset whose edge was deferred.
    pub masked_offsets: Option<(u32, u32)>,
    /// The first fatal offset (none with working NMI masking).
    pub first_fatal: Option<FatalOffset>,
    /// Interleaved: each host CPU's account, by CPU index.
    pub per_cpu: Vec<CpuStorm>,
}

/// A view's short name.
fn view_name(v: View) -> &'static str {
    match v {
        View::Hc => "HC",
        View::Id => "ID",
        View::Rc => "RC",
    }
}

/// The switcher's listing (offset, address, view, length, flow is linear,
/// labels before it), for naming addresses.
struct Listing {
    lines: Vec<(u32, u64, View, bool)>,
    labels: Vec<(&'static str, u32)>,
}

impl Listing {
    fn new(s: &Scenario, b: &Built) -> Option<Self> {
        let sw = b.vmm.switcher(s.kind).ok()?;
        let code = sw.code(b.vmm.core_code());
        let lines = vmm_switcher::disasm::lines(&sw.def, code, &sw.ctx, &sw.reloc).ok()?;
        let lines = lines
            .iter()
            .filter_map(|l| {
                let i = l.insn.as_ref()?;
                let linear = i.flow_control() == iced_x86::FlowControl::Next;
                Some((l.off, l.addr, l.view, linear))
            })
            .collect();
        let labels = sw.def.labels.iter().map(|(n, o)| (*n, *o)).collect();
        Some(Self { lines, labels })
    }

    fn index(&self, addr: u64) -> Option<usize> {
        self.lines.iter().position(|l| l.1 == addr)
    }

    fn name_at(&self, i: usize) -> (String, String) {
        let (off, _, view, _) = self.lines[i];
        let label = self
            .labels
            .iter()
            .filter(|(_, o)| *o <= off)
            .max_by_key(|(_, o)| *o);
        let name = match label {
            Some((n, o)) => format!("{n}+{:#x}", off - o),
            None => format!("+{off:#x}"),
        };
        (name, view_name(view).to_owned())
    }
}

/// Names `addr`: a switcher instruction, the far side's code, or the host kernel.
fn name_addr(listing: Option<&Listing>, b: &Built, addr: u64) -> (String, String) {
    if let Some((l, i)) = listing.and_then(|l| Some((l, l.index(addr)?))) {
        return l.name_at(i);
    }
    let (helper_rc, _, helper_size) = b.vmm.helper_area();
    if let Some(off) = addr
        .checked_sub(u64::from(helper_rc.0))
        .filter(|o| *o < u64::from(helper_size))
    {
        return (format!("far side+{off:#x}"), "RC".into());
    }
    if let Some((sym, off)) = u32::try_from(addr)
        .ok()
        .and_then(|a| b.testbed.symbolize(a))
    {
        return (format!("host kernel {sym}+{off:#x}"), "HC".into());
    }
    (format!("{addr:#x}"), "?".into())
}

/// The instruction after the one at `addr` on the path, when it follows
/// linearly.
fn successor(listing: Option<&Listing>, addr: u64) -> Option<(String, String)> {
    let l = listing?;
    let i = l.index(addr)?;
    let (_, here, view, linear) = l.lines[i];
    let next = l.lines.get(i + 1)?;
    (linear && next.2 == view && next.1 > here).then(|| l.name_at(i + 1))
}

/// What a machine that stopped early did.
fn crash_outcome(run: &RunResult) -> Option<String> {
    match &run.outcome {
        Outcome::Pass | Outcome::VerificationFailed => None,
        Outcome::TripleFault => Some("triple fault".into()),
        Outcome::HostException(Some(e)) => Some(format!(
            "exception vector {} (error {:#x}) in the host at {:#x}",
            e.vector, e.error_code, e.rip
        )),
        Outcome::HostException(None) => Some("an exception in the host".into()),
        Outcome::FarException(Some(e)) => Some(format!(
            "exception vector {} (error {:#x}) in the hypervisor context at {:#x}",
            e.vector, e.error_code, e.rip
        )),
        Outcome::FarException(None) => Some("an exception in the hypervisor context".into()),
        Outcome::Timeout => Some("a hang (timeout)".into()),
        Outcome::QemuRefused(_) => None,
        Outcome::Other(st) => Some(format!("QEMU exit status {st}")),
        Outcome::EnginePanic(p) => Some(format!("the engine panicked: {p}")),
    }
}

/// The `PIT` line agrees with the formula, or why not.
/// `delay`: the handler's RDTSC less the formula's arrival
/// ([`PIT_EDGE_DELAY`] on one CPU).
fn pit_failures(r: &Report, storm: NmiStorm, delay: u32) -> Vec<String> {
    let Some(p) = &r.pit else {
        return vec!["no PIT line: the storm's timer was never checked".into()];
    };
    let mut f = Vec::new();
    if p.divisor != u32::from(storm.divisor) {
        f.push(format!(
            "PIT divisor={}, the storm programs {}",
            p.divisor, storm.divisor
        ));
    }
    for (n, &got) in (1u64..).zip(&p.edges).take(PIT_SAMPLES) {
        let want = storm.edge(n) + u64::from(delay);
        if u64::from(got) != want {
            f.push(format!(
                "PIT edge {n} arrived {got} instructions after the load, the formula gives {want}: \
                 QEMU's PIT or -icount timing changed, so the storm's placement cannot be trusted"
            ));
            break;
        }
    }
    f
}

/// Judges the storm of a finished run; returns its report and the failures.
pub fn analyze(s: &Scenario, b: &Built, run: &RunResult) -> (StormReport, Vec<String>) {
    if s.cpus > 1 {
        return interleaved::analyze(s, b, run);
    }
    let r = &run.report;
    let storm = NmiStorm::default();
    let listing = Listing::new(s, b);
    let listing = listing.as_ref();
    let mut f = pit_failures(r, storm, PIT_EDGE_DELAY);
    let mut rep = StormReport {
        calls: r.storm.len() as u32,
        ..StormReport::default()
    };
    let want_ctx = kstorm::host_context(s.host_mode());
    let host_ctx = |c: u32| c == want_ctx;
    let mut expected_o = 0u32;
    let mut misses = 0u32;
    let mut prev_far = 0u32;
    let mut fatal: Option<FatalOffset> = None;
    let mut deferred: Vec<(u32, u32, u64)> = Vec::new();
    let mut at_target: Vec<(u32, u32, u64)> = Vec::new();
    let mut last_at_target: Option<(u32, u64)> = None;
    for (i, l) in r.storm.iter().enumerate() {
        if rep.complete {
            f.push(format!("STORM line {} after the storm completed", i + 1));
            break;
        }
        if l.o != expected_o {
            f.push(format!(
                "STORM line {}: o={}, the targeting rule gives {expected_o}",
                i + 1,
                l.o
            ));
            break;
        }
        classify(
            l,
            &mut ClassifyState {
                rep: &mut rep,
                f: &mut f,
                fatal: &mut fatal,
                deferred: &mut deferred,
                at_target: &mut at_target,
                last_at_target: &mut last_at_target,
            },
            prev_far,
            &host_ctx,
            |ip| name_addr(listing, b, ip),
        );
        prev_far = l.far;
        if l.o < l.len {
            expected_o += 1;
            misses = 0;
        } else {
            misses += 1;
            rep.complete = misses == MISS_LIMIT;
        }
    }
    rep.offsets_covered = expected_o;
    // The longest path of the calls that ended the storm (of every kind):
    // the first calls of a kind may take a few instructions more (cold
    // paths) that no later call repeats.
    rep.path_instructions = steady_max(&r.storm, rep.complete);
    rep.nmis_in_hypervisor_context = prev_far.max(far_total(s, r));
    let finished = crash_outcome(run).is_none() && r.result.is_some();
    if let (false, Some(what)) = (rep.complete, crash_outcome(run)) {
        let (label, view) = match last_at_target {
            Some((o, ip)) if o + 1 == expected_o => successor(listing, ip)
                .unwrap_or_else(|| (format!("after {}", name_addr(listing, b, ip).0), "?".into())),
            _ => ("?".into(), "?".into()),
        };
        fatal.get_or_insert(FatalOffset {
            offset: Some(expected_o),
            label,
            view,
            outcome: what,
        });
    }
    let calls = u64::from(s.trips) * u64::from(s.vcpus);
    if finished && !rep.complete {
        if r.storm.len() as u64 == calls {
            f.push(format!(
                "the storm ran out of round trips after covering {} offsets of paths up to {} \
                 instructions long: raise the round trips",
                rep.offsets_covered, rep.path_instructions
            ));
        } else {
            f.push(format!(
                "{} STORM lines for {calls} calls and the storm did not complete",
                r.storm.len()
            ));
        }
    }
    if rep.complete && rep.offsets_covered < rep.path_instructions {
        f.push(format!(
            "the storm covered {} offsets, the longest path has {}",
            rep.offsets_covered, rep.path_instructions
        ));
    }
    let host_nmis = r
        .nmi_count
        .unwrap_or_else(|| r.storm.iter().map(|l| l.nmis).sum::<u32>() + PIT_SAMPLES as u32);
    rep.nmis_taken = host_nmis.saturating_add(rep.nmis_in_hypervisor_context);
    window_checks(&mut rep, &mut f, &deferred, &at_target, |ip| {
        name_addr(listing, b, ip)
    });
    if let Some(fa) = &fatal {
        f.push(format!(
            "the NMI placed at offset {} [{} ({})] was fatal: {}",
            fa.offset.unwrap_or(expected_o),
            fa.label,
            fa.view,
            fa.outcome
        ));
    }
    rep.first_fatal = fatal;
    (rep, f)
}

/// What was wrong with the context word of an NMI in transit: its paging
/// mode, and which of the host's CS and CR3 it lacked.
fn transit_context(c: u32) -> String {
    let mut what = vec![kstorm::paging_name(c)];
    if c & ctx::HOST_CS == 0 {
        what.push("not the host's CS");
    }
    if c & ctx::HOST_CR3 == 0 {
        what.push("not the host's CR3");
    }
    what.join(", ")
}

/// The longest path of the last [`MISS_LIMIT`] calls of a complete storm
/// (of all calls otherwise).
fn steady_max(lines: &[StormLine], complete: bool) -> u32 {
    let tail = if complete {
        lines.len().saturating_sub(MISS_LIMIT as usize)
    } else {
        0
    };
    lines[tail..].iter().map(|l| l.len).max().unwrap_or(0)
}

/// The far side's NMI count from its mailbox dump (0 without one).
fn far_total(s: &Scenario, r: &Report) -> u32 {
    far_account(s, r).0
}

/// The far side's NMI count and first NMI address (low half) from its
/// mailbox dump (zeros without one).
fn far_account(s: &Scenario, r: &Report) -> (u32, u32) {
    use crate::farside::{hyper::RcMailbox, intermediate_amd64::Mailbox};
    let Some(d) = r.dump("mailbox") else {
        return (0, 0);
    };
    if s.uses_far_helper() {
        d.read::<Mailbox>(0).map_or((0, 0), |m| (m.nmis, m.nmi_ip))
    } else {
        d.read::<RcMailbox>(0)
            .map_or((0, 0), |m| (m.nmis, m.nmi_ip))
    }
}

struct ClassifyState<'a> {
    rep: &'a mut StormReport,
    f: &'a mut Vec<String>,
    fatal: &'a mut Option<FatalOffset>,
    deferred: &'a mut Vec<(u32, u32, u64)>,
    at_target: &'a mut Vec<(u32, u32, u64)>,
    last_at_target: &'a mut Option<(u32, u64)>,
}

/// Where the NMI of one storm call was taken.
fn classify(
    l: &StormLine,
    st: &mut ClassifyState<'_>,
    prev_far: u32,
    host_ctx: &dyn Fn(u32) -> bool,
    name: impl Fn(u64) -> (String, String),
) {
    if l.far > prev_far {
        let (label, view) = name(u64::from(l.far_ip));
        st.fatal.get_or_insert(FatalOffset {
            offset: Some(l.o),
            label,
            view,
            outcome: "NMI in the hypervisor context".into(),
        });
    }
    if l.nmis == 0 {
        if l.o < l.len && l.far == prev_far {
            st.f.push(format!(
                "the edge placed at offset {} of a {}-instruction path was never taken",
                l.o, l.len
            ));
        }
        return;
    }
    if l.nmis > 1 {
        st.f.push(format!(
            "{} NMIs in the call targeting offset {}: one edge raised several",
            l.nmis, l.o
        ));
    }
    let Some(at) = l.dt.checked_sub(DT_AT_TARGET).filter(|at| *at >= l.o) else {
        st.f.push(format!(
            "the NMI placed at offset {} was taken before its edge (dt={})",
            l.o, l.dt
        ));
        return;
    };
    if !host_ctx(l.ctx) {
        st.rep.nmis_in_transit += 1;
        let (label, view) = name(l.ip);
        st.fatal.get_or_insert(FatalOffset {
            offset: Some(l.o),
            label,
            view,
            outcome: format!("NMI in transit ({})", transit_context(l.ctx)),
        });
    } else if at == l.o {
        st.rep.nmis_at_target += 1;
        st.at_target.push((l.o, l.len, l.ip));
        *st.last_at_target = Some((l.o, l.ip));
    } else {
        st.rep.nmis_deferred += 1;
        st.deferred.push((l.o, l.len, l.ip));
    }
}

/// Deferred NMIs were all taken at one instruction, and no path took an NMI
/// at target between two of its deferred offsets.
fn window_checks(
    rep: &mut StormReport,
    f: &mut Vec<String>,
    deferred: &[(u32, u32, u64)],
    at_target: &[(u32, u32, u64)],
    name: impl Fn(u64) -> (String, String),
) {
    let Some(&(first, _, site)) = deferred.first() else {
        return;
    };
    let last = deferred.iter().map(|d| d.0).max().unwrap_or(first);
    rep.masked_offsets = Some((first, last));
    let (label, view) = name(site);
    rep.deferred_to = Some(format!("{label} ({view})"));
    if let Some(&(o, _, ip)) = deferred.iter().find(|d| d.2 != site) {
        let (l2, v2) = name(ip);
        f.push(format!(
            "deferred NMIs were taken at two places: {label} ({view}) and, for offset {o}, {l2} ({v2})"
        ));
    }
    for &(o, len, ip) in at_target {
        let same: Vec<u32> = deferred
            .iter()
            .filter(|d| d.1 == len)
            .map(|d| d.0)
            .collect();
        let inside = same.iter().any(|&d| d < o) && same.iter().any(|&d| d > o);
        if inside {
            let (l2, v2) = name(ip);
            f.push(format!(
                "an NMI was taken inside the masked window: offset {o} at {l2} ({v2})"
            ));
            break;
        }
    }
}
