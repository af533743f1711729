//! `run`, `image`, `decode` and `stats`: the switchers executed.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use stam::{Pattern, Snapshot};
use vmm_switcher::SwitcherKind;

use crate::args::{DecodeArgs, EngineArg, ImageArgs, RunArgs, StatsArgs, StatsFormat};
use crate::progress::Progress;
use crate::report::{self, RunDoc, RunJson, SCHEMA};
use crate::{cost, gdb, setup, to_json, CliError, Exit, Sink};
use integration::bochs::BochsConfig;
use integration::qemu::{self, Outcome, QemuConfig, RunResult};
use integration::scenario::{build, judge, run_built, Built, Scenario, ScenarioResult};
use integration::transcript::Report;

/// Fails unless the binary `q` runs is there: the one `--qemu` names, or
/// `qemu-system-x86_64` on PATH.
fn check_qemu(q: &QemuConfig) -> Result<(), CliError> {
    qemu::resolve_binary(q)?;
    Ok(())
}

/// Boots a built scenario. A QEMU that refuses to start (an unknown
/// `--cpu` model, a `--qemu-log` it cannot open, a `--qemu` that is not
/// QEMU) is an environment error carrying QEMU's own words, not a failed
/// switcher.
fn boot(
    s: &Scenario,
    built: &Built,
    q: &QemuConfig,
    bochs: Option<&BochsConfig>,
) -> Result<ScenarioResult, CliError> {
    if let Some(b) = bochs {
        let run = integration::bochs::run_image(&built.testbed.image, b)?;
        return Ok(judge(s, built, run));
    }
    let r = run_built(s, built, q)?;
    match r.run.refusal(q) {
        Some(e) => Err(e.into()),
        None => Ok(r),
    }
}

/// The QEMU configuration of each boot: with several switchers,
/// `--qemu-log FILE` gets the switcher's name inserted (as `image` names
/// its files), so boots never share a log.
fn qemu_configs(q: &QemuConfig, kinds: &[SwitcherKind]) -> Vec<QemuConfig> {
    let several = kinds.len() > 1;
    kinds
        .iter()
        .map(|&kind| QemuConfig {
            debug_log: q
                .debug_log
                .as_deref()
                .map(|log| image_path(log, kind, several)),
            ..q.clone()
        })
        .collect()
}

/// How many boots run at once without `--jobs`: one per CPU core.
fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// What a worker hands back: the scenario's index and its boot.
type Booted = (usize, Result<ScenarioResult, CliError>);

/// Boots every scenario, up to `jobs` at a time, and hands each result to
/// `ready` in scenario order, as soon as it and every earlier one are in.
/// The first error `ready` returns stops further boots; it is returned once
/// the boots under way have ended.
fn boot_all(
    scenarios: &[(Scenario, Built)],
    configs: &[QemuConfig],
    bochs: Option<&BochsConfig>,
    jobs: usize,
    progress: Option<&Progress>,
    ready: &mut dyn FnMut(usize, Result<ScenarioResult, CliError>) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let n = scenarios.len();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let running: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());
    let finished = AtomicUsize::new(0);
    let show = || {
        let Some(p) = progress else { return };
        let names: Vec<&str> = running
            .lock()
            .map(|r| r.iter().map(|&i| scenarios[i].0.kind.cli_name()).collect())
            .unwrap_or_default();
        p.set(&format!(
            "{}/{n} booted; under QEMU: {}",
            finished.load(Ordering::Relaxed),
            names.join(", ")
        ));
    };
    std::thread::scope(|sc| {
        let (tx, rx) = mpsc::channel::<Booted>();
        for _ in 0..jobs.clamp(1, n.max(1)) {
            let tx = tx.clone();
            let (next, stop, running, finished, show) = (&next, &stop, &running, &finished, &show);
            sc.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (Some((s, built)), Some(q)) = (scenarios.get(i), configs.get(i)) else {
                    break;
                };
                if let Ok(mut r) = running.lock() {
                    r.insert(i);
                }
                show();
                let r = boot(s, built, q, bochs);
                if let Ok(mut r) = running.lock() {
                    r.remove(&i);
                }
                finished.fetch_add(1, Ordering::Relaxed);
                show();
                if tx.send((i, r)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut slots: Vec<Option<Result<ScenarioResult, CliError>>> =
            (0..n).map(|_| None).collect();
        let mut done = 0;
        for (i, r) in rx {
            if let Some(slot) = slots.get_mut(i) {
                *slot = Some(r);
            }
            while let Some(r) = slots.get_mut(done).and_then(Option::take) {
                if let Err(e) = ready(done, r) {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                done += 1;
            }
        }
        Ok(())
    })
}

/// Under `--gdb` the figures include the time stopped in the debugger, and
/// QEMU also exits with status 0 when gdb kills it.
fn gdb_caveats(r: &ScenarioResult, j: &mut RunJson) {
    report::withhold_measurements(j, report::GDB_NOT_MEASURED);
    if r.run.outcome == Outcome::TripleFault {
        if let Some(d) = j.outcome_detail.as_mut() {
            d.push_str(", or the run was ended from gdb");
        }
    }
}

/// Prints a finished document: the JSON, or each text report and then the
/// closing lines.
fn emit(doc: &RunDoc, json: bool, out: &mut dyn Sink) -> Result<Exit, CliError> {
    if json {
        out.put(&to_json(doc)?);
    } else {
        for r in &doc.runs {
            out.put(&report::render(r));
            out.put("\n");
        }
        out.put(&closing(doc));
    }
    Ok(exit_of(doc))
}

/// What ends a text report: the comparison table when several switchers
/// ran, then the count of those verified.
fn closing(doc: &RunDoc) -> String {
    let mut s = String::new();
    if doc.runs.len() > 1 {
        s.push_str(&report::render_table(&doc.runs));
        s.push('\n');
    }
    s.push_str(&report::render_summary(doc));
    s
}

fn exit_of(doc: &RunDoc) -> Exit {
    if doc.verified {
        Exit::Ok
    } else {
        Exit::Failed
    }
}

/// The Bochs configuration of `run --engine bochs` (`None` for QEMU);
/// refuses the options that only QEMU has.
fn bochs_config(a: &RunArgs) -> Result<Option<BochsConfig>, CliError> {
    let cr4: integration::scenario::HostCr4 = a.scenario.host.host_cr4.into();
    if a.engine == EngineArg::Qemu {
        if !cr4.qemu_can_run() {
            return Err(CliError::Usage(format!(
                "--host-cr4 {} needs --engine bochs: QEMU TCG does not emulate PCID or CET",
                cr4.name()
            )));
        }
        return match &a.bochs_cpu {
            Some(m) => Err(CliError::Usage(format!(
                "--bochs-cpu {m} needs --engine bochs"
            ))),
            None => Ok(None),
        };
    }
    let qemu_only = [
        ("--gdb", a.gdb),
        ("--cost", a.cost),
        ("--qemu", a.qemu.qemu.is_some()),
        ("--qemu-log", a.qemu.qemu_log.is_some()),
        ("--cpu", a.scenario.host.cpu.is_some()),
    ];
    if let Some((opt, _)) = qemu_only.iter().find(|(_, on)| *on) {
        return Err(CliError::Usage(format!(
            "{opt} is for QEMU and cannot be used with --engine bochs"
        )));
    }
    let cpu = a
        .bochs_cpu
        .clone()
        .unwrap_or_else(|| integration::bochs::DEFAULT_CPU.to_owned());
    integration::bochs::model_facts(&cpu, vmm_switcher::SideMode::Amd64)?;
    for (on, feature, models) in [
        (cr4.pcid(), "PCID", &integration::bochs::PCID_MODELS[..]),
        (cr4.cet(), "CET", &integration::bochs::CET_MODELS[..]),
    ] {
        if on && !models.contains(&cpu.as_str()) {
            return Err(CliError::Usage(format!(
                "--host-cr4 {} needs a Bochs model with {feature} ({}), not {cpu}",
                cr4.name(),
                models.join(", ")
            )));
        }
    }
    Ok(Some(BochsConfig {
        cpu,
        timeout: Duration::from_secs(a.qemu.timeout),
        keep: None,
    }))
}

/// `worldswitch run`: builds every scenario, boots them up to `--jobs` at a
/// time and writes each text report as soon as its boot and every earlier
/// one have ended (in switcher order), then the comparison table; with
/// `--json`, one document at the end.
///
/// # Errors
/// Bad options or placement, an unavailable switcher, QEMU missing or
/// refusing to start.
pub fn run(a: &RunArgs, out: &mut dyn Sink) -> Result<Exit, CliError> {
    let kinds = setup::select(&a.select)?;
    let bochs = bochs_config(a)?;
    if a.gdb && kinds.len() != 1 {
        return Err(CliError::Usage(format!(
            "--gdb debugs one switcher; name one of: {}",
            kinds
                .iter()
                .map(|k| k.cli_name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if a.gdb {
        gdb::check_port(a.gdb_port)?;
    }
    // Every scenario is built before the first boot, so a bad option or
    // placement fails fast, whether QEMU is installed or not.
    let progress = (!a.gdb).then(|| Progress::start("building"));
    let mut scenarios = Vec::new();
    let mut models = Vec::new();
    for kind in &kinds {
        let (mut s, model) = setup::scenario_and_cpu(*kind, &a.scenario)?;
        s.mutation = a.mutate;
        if let Some(b) = &bochs {
            s.cpu = integration::bochs::model_facts(&b.cpu, kind.host())?;
        }
        let built = build(&s)?;
        scenarios.push((s, built));
        models.push(model);
    }
    let q = setup::qemu(&a.qemu, a.gdb.then_some(a.gdb_port));
    match &bochs {
        Some(_) => {
            integration::bochs::find_bochs()?;
        }
        None => check_qemu(&q)?,
    }
    let mut configs = qemu_configs(&q, &kinds);
    for (c, m) in configs.iter_mut().zip(&models) {
        c.cpu = m.qemu_arg();
    }
    let cost_files = if a.cost {
        cost_setup(&q, &scenarios, &mut configs)?
    } else {
        Vec::new()
    };
    // Each session's files are removed when `run` returns, in failure too.
    let mut sessions = Vec::new();
    if a.gdb {
        for (s, built) in &scenarios {
            let g = gdb::Session::start(s, built, a.gdb_port)?;
            eprint!("{}", g.banner());
            sessions.push(g);
        }
    }
    let jobs = a.jobs.map_or_else(default_jobs, |j| j as usize);
    let mut runs: Vec<RunJson> = Vec::new();
    boot_all(
        &scenarios,
        &configs,
        bochs.as_ref(),
        jobs,
        progress.as_ref(),
        &mut |i, r| {
            let r = r?;
            cpu_refusal(&r)?;
            let (s, built) = &scenarios[i];
            let mut j = report::run_json(s, built, &r, Some(r.run.wall), false);
            if let Some(b) = &bochs {
                report::as_bochs_run(&mut j, &b.cpu, &r.run.stderr);
            }
            if a.gdb {
                gdb_caveats(&r, &mut j);
            }
            let measured = match cost_files.get(i) {
                Some(f) => cost_result(f, &j)?,
                None => None,
            };
            j.cost = measured.as_ref().map(|m| m.cost.clone());
            if !a.json {
                let table = measured.as_ref().map(cost::render).unwrap_or_default();
                let text = format!("{}{table}\n", report::render(&j));
                match &progress {
                    Some(p) => p.above(|| out.put(&text)),
                    None => out.put(&text),
                }
            }
            runs.push(j);
            Ok(())
        },
    )?;
    drop(progress);
    let doc = RunDoc {
        schema: SCHEMA,
        command: "run",
        verified: runs.iter().all(|r| r.verified),
        runs,
    };
    if a.json {
        out.put(&to_json(&doc)?);
    } else {
        out.put(&closing(&doc));
    }
    Ok(exit_of(&doc))
}

/// A plugin report file, removed when dropped.
struct CostFile(PathBuf);

impl Drop for CostFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `run --cost`: checks that QEMU loads plugins and finds the plugin, then
/// gives every boot the `-plugin` argument with its own report file.
fn cost_setup(
    q: &QemuConfig,
    scenarios: &[(Scenario, Built)],
    configs: &mut [QemuConfig],
) -> Result<Vec<CostFile>, CliError> {
    cost::check_plugin_support(q)?;
    let plugin = cost::find_plugin()?;
    let mut files = Vec::new();
    for ((s, built), c) in scenarios.iter().zip(configs.iter_mut()) {
        let name = format!(
            "worldswitch-cost-{}-{}.txt",
            std::process::id(),
            s.kind.cli_name()
        );
        let file = CostFile(std::env::temp_dir().join(name));
        c.plugin = Some(cost::plugin_arg(&plugin, built, s.kind, &file.0)?);
        files.push(file);
    }
    Ok(files)
}

/// The plugin's measurement of a finished boot. A boot that failed may have
/// ended before the plugin wrote its report: then there is none. A passing
/// boot without a readable report is an error.
fn cost_result(f: &CostFile, j: &RunJson) -> Result<Option<cost::Measured>, CliError> {
    match cost::read_report(&f.0) {
        Ok(m) => Ok(Some(m)),
        Err(_) if !j.verified => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file `image` writes for `kind` when `several` switchers are asked.
pub fn image_path(out: &Path, kind: SwitcherKind, several: bool) -> PathBuf {
    if !several {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "worldswitch".into());
    let name = match out.extension() {
        Some(ext) => format!("{stem}-{}.{}", kind.cli_name(), ext.to_string_lossy()),
        None => format!("{stem}-{}", kind.cli_name()),
    };
    out.with_file_name(name)
}

/// The `decode` command line that judges a transcript of an image: none of
/// the build's options, because the transcript's `BOOT` line names them all.
pub fn decode_command() -> &'static str {
    "worldswitch decode < serial.log"
}

/// `worldswitch image`.
///
/// # Errors
/// Bad options or placement, an unavailable switcher, the file cannot be written.
pub fn image(a: &ImageArgs, out: &mut String) -> Result<Exit, CliError> {
    let kinds = setup::select(&a.select)?;
    let several = kinds.len() > 1;
    let mut images = Vec::new();
    for kind in kinds {
        let (s, model) = setup::scenario_and_cpu(kind, &a.scenario)?;
        let built = build(&s)?;
        let path = image_path(&a.out, kind, several);
        std::fs::write(&path, &built.testbed.image).map_err(|source| CliError::Write {
            path: path.clone(),
            source,
        })?;
        let qemu_args: Vec<String> = QemuConfig {
            cpu: model.qemu_arg(),
            smp: s.cpus,
            ..QemuConfig::default()
        }
        .args(&path)
        .into_iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
        let qemu_cmd = format!("{} {} > serial.log", qemu::QEMU_BINARY, qemu_args.join(" "));
        images.push(json!({
            "switcher": kind.cli_name(),
            "path": path,
            "bytes": built.testbed.image.len(),
            "host_mode": setup::host_mode_name(built.testbed.mode),
            "vcpus": s.vcpus,
            "round_trips_per_vcpu": s.trips,
            "switcher_entry": built.vmm.switcher(kind)?.entries.r0_host_to_guest_hc.0,
            "qemu_command": qemu_cmd,
            "decode_command": decode_command(),
        }));
    }
    if a.json {
        out.push_str(&to_json(&json!({ "images": images }))?);
        return Ok(Exit::Ok);
    }
    for i in &images {
        let _ = writeln!(
            out,
            "wrote {} ({} bytes): multiboot kernel, {} host, running {} for {} VCPUs x {} round trips",
            i["path"].as_str().unwrap_or(""),
            i["bytes"],
            i["host_mode"].as_str().unwrap_or(""),
            i["switcher"].as_str().unwrap_or(""),
            i["vcpus"],
            i["round_trips_per_vcpu"]
        );
        let _ = writeln!(
            out,
            "  QEMU:   {}",
            i["qemu_command"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            out,
            "  GRUB:   multiboot /boot/{} ; boot   (capture COM1 at 115200 8N1 into serial.log)",
            Path::new(i["path"].as_str().unwrap_or(""))
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  judge:  {}",
            i["decode_command"].as_str().unwrap_or("")
        );
    }
    Ok(Exit::Ok)
}

fn read_input(path: Option<&Path>) -> Result<Vec<u8>, CliError> {
    let mut buf = Vec::new();
    match path {
        Some(p) if p != Path::new("-") => {
            buf = std::fs::read(p).map_err(|source| CliError::Read {
                path: p.to_path_buf(),
                source,
            })?;
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|source| CliError::Read {
                    path: "<stdin>".into(),
                    source,
                })?;
        }
    }
    Ok(buf)
}

/// The outcome a captured transcript implies (no exit status is known):
/// the exception lines first, then the `RESULT` line. `None` when the
/// transcript ends without either (a `NOCPU` refusal has neither either; see
/// [`cpu_refusal`]).
pub fn transcript_outcome(r: &Report) -> Option<Outcome> {
    if let Some(e) = &r.exception {
        return Some(Outcome::HostException(Some(e.clone())));
    }
    if let Some(f) = &r.far_exception {
        return Some(Outcome::FarException(Some(f.clone())));
    }
    match r.result {
        Some(true) => Some(Outcome::Pass),
        Some(false) => Some(Outcome::VerificationFailed),
        None => None,
    }
}

/// The error for a run or transcript whose CPU lacked a feature the build
/// needs (a `NOCPU` line): nothing was tested, so this is an environment
/// error (exit status 2), not a failed switcher.
fn cpu_refusal_text(kind: Option<SwitcherKind>, c: &integration::transcript::CpuRefusal) -> String {
    let what = kind.map_or_else(|| "the image".to_owned(), |k| k.cli_name().to_owned());
    if c.present {
        return format!(
            "the CPU has {} (CPUID {}), and {what} was relocated for a CPU without it: nothing \
             was run; relocate for this CPU (--cpu names the model the image runs on)",
            c.feature, c.cpuid
        );
    }
    format!(
        "the CPU has no {} (CPUID {}), which {what} needs: nothing was run; pick a CPU model \
         with it (--cpu)",
        c.feature, c.cpuid
    )
}

/// Fails with a one-line [`CliError::Transcript`] naming the missing CPU
/// feature when the kernel refused the CPU it ran on.
///
/// # Errors
/// See above.
pub fn cpu_refusal(r: &ScenarioResult) -> Result<(), CliError> {
    match r.cpu_refusal() {
        Some(c) => Err(CliError::Transcript(cpu_refusal_text(
            Some(r.scenario.kind),
            c,
        ))),
        None => Ok(()),
    }
}

/// Options given to `decode` must agree with the scenario the `BOOT` line
/// names; each one that does not is an error naming both values.
fn check_decode_options(a: &DecodeArgs, s: &Scenario) -> Result<(), CliError> {
    let rev = |r: vmm_switcher::templates::Revision| format!("{r:?}").to_lowercase();
    let p = &s.placement;
    let hex = |v: u64| format!("{v:#x}");
    // (option, value given, value the transcript names)
    let given: [(&str, Option<String>, String); 7] = [
        (
            "switcher",
            a.switcher.map(|k| k.cli_name().into()),
            s.kind.cli_name().into(),
        ),
        (
            "--round-trips",
            a.round_trips.map(|n| n.to_string()),
            s.trips.to_string(),
        ),
        (
            "--vcpus",
            a.vcpus.map(|n| n.to_string()),
            s.vcpus.to_string(),
        ),
        (
            "--revision",
            a.revision.map(|r| rev(r.into())),
            rev(s.options.revision),
        ),
        ("--hc-base", a.placement.hc_base.map(hex), hex(p.code_hc.0)),
        (
            "--rc-base",
            a.placement.rc_base.map(hex),
            hex(u64::from(p.hma_rc.0)),
        ),
        (
            "--phys-base",
            a.placement.phys_base.map(hex),
            hex(p.code_phys.0),
        ),
    ];
    let mut wrong: Vec<String> = given
        .into_iter()
        .filter_map(|(opt, given, named)| {
            let given = given?;
            (given != named).then(|| format!("{opt} {given} (the transcript says {named})"))
        })
        .collect();
    let o = &s.options;
    for (flag, given, built) in [
        ("--no-apic", a.no_apic, !o.apic_nmi_masking),
        ("--no-stats", a.no_stats, !o.stats),
        ("--trace", a.trace, o.trace),
        ("--x2apic", a.x2apic, o.x2apic),
    ] {
        if given && !built {
            wrong.push(format!(
                "{flag} (the transcript's image was built without it)"
            ));
        }
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(CliError::Transcript(format!(
        "the transcript names its build, and these options contradict it: {}; drop them",
        wrong.join("; ")
    )))
}

/// `worldswitch decode`: the scenario comes from the transcript's `BOOT`
/// line; options are only checked against it.
///
/// # Errors
/// No `BOOT` line, a `BOOT` line naming no valid scenario, options that
/// contradict it, an unavailable switcher, a `NOCPU` refusal.
pub fn decode(a: &DecodeArgs, out: &mut String) -> Result<Exit, CliError> {
    let bytes = read_input(a.input.as_deref())?;
    let report = Report::parse(&bytes);
    if let Some(c) = &report.cpu_refusal {
        let kind = report
            .boot
            .as_ref()
            .and_then(|b| b.field("switcher"))
            .and_then(SwitcherKind::from_cli_name);
        return Err(CliError::Transcript(cpu_refusal_text(kind, c)));
    }
    let boot = report.boot.clone().ok_or(CliError::NoBoot)?;
    let s = Scenario::from_boot(&boot).map_err(|e| CliError::Transcript(e.to_string()))?;
    check_decode_options(a, &s)?;
    setup::require(s.kind)?;
    let built = build(&s)?;
    let entry = built.vmm.switcher(s.kind)?.entries.r0_host_to_guest_hc.0;
    if entry != boot.entry64 {
        return Err(CliError::Transcript(format!(
            "the BOOT line calls {:#x}, but {} built as the line describes has its entry at \
             {entry:#x}: the transcript comes from another version of the switcher",
            boot.entry64,
            s.kind.cli_name()
        )));
    }
    let outcome = transcript_outcome(&report);
    let incomplete = outcome.is_none();
    let run = RunResult {
        outcome: outcome.unwrap_or(Outcome::Other(-1)),
        status: None,
        serial: bytes,
        stderr: String::new(),
        report,
        wall: Duration::ZERO,
    };
    let r = judge(&s, &built, run);
    let doc = RunDoc {
        schema: SCHEMA,
        command: "decode",
        verified: r.verified,
        runs: vec![report::run_json(&s, &built, &r, None, incomplete)],
    };
    emit(&doc, a.json, out)
}

fn render_snapshot(snap: &Snapshot, format: StatsFormat) -> Result<String, CliError> {
    Ok(match format {
        StatsFormat::Text => snap.print(),
        StatsFormat::Xml => snap.xml(true),
        StatsFormat::Prometheus => snap.prometheus(),
        StatsFormat::Json => to_json(snap)?,
    })
}

fn stats_from(a: &StatsArgs, path: &Path) -> Result<(Option<Snapshot>, Exit), CliError> {
    let bytes = read_input(Some(path))?;
    let bad = |why: String| CliError::Document {
        path: path.to_path_buf(),
        why,
    };
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if doc["schema"].as_str() != Some(SCHEMA) {
        return Err(bad(format!(
            "not a `worldswitch run --json` document (no \"schema\": \"{SCHEMA}\")"
        )));
    }
    let runs = doc["runs"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = runs
        .iter()
        .filter_map(|r| r["switcher"].as_str().map(str::to_owned))
        .collect();
    let run = match a.switcher {
        Some(k) => runs
            .iter()
            .find(|r| r["switcher"].as_str() == Some(k.cli_name()))
            .ok_or_else(|| {
                bad(format!(
                    "holds no run of {} (it has: {})",
                    k.cli_name(),
                    names.join(", ")
                ))
            })?,
        None if runs.len() == 1 => &runs[0],
        None => {
            return Err(bad(format!(
                "holds {} runs ({}); name the switcher to dump",
                runs.len(),
                names.join(", ")
            )))
        }
    };
    let name = run["switcher"].as_str().unwrap_or("?").to_owned();
    if run["stam"].is_null() {
        return Err(bad(format!("the run of {name} has no STAM samples")));
    }
    // Names, uniqueness and value kinds are checked here, so nothing below
    // renders a sample a registry could not hold.
    let snap =
        Snapshot::from_json_value(run["stam"].clone()).map_err(|e| bad(format!("stam: {e}")))?;
    let pat = Pattern::new(&a.pattern);
    let samples = snap
        .samples
        .into_iter()
        .filter(|s| pat.matches(&s.name))
        .collect();
    Ok((Some(Snapshot { samples }), Exit::Ok))
}

fn stats_run(a: &StatsArgs) -> Result<(Option<Snapshot>, Exit), CliError> {
    let kind = match a.switcher {
        Some(k) => k,
        None => setup::select(&crate::args::Selection {
            switchers: Vec::new(),
            all: true,
        })?
        .first()
        .copied()
        .ok_or_else(|| CliError::Usage("no runnable switcher in this build".into()))?,
    };
    let sel = crate::args::Selection {
        switchers: vec![kind],
        all: false,
    };
    setup::select(&sel)?;
    let (s, model) = setup::scenario_and_cpu(kind, &a.scenario)?;
    let q = QemuConfig {
        cpu: model.qemu_arg(),
        ..setup::qemu(&a.qemu, None)
    };
    check_qemu(&q)?;
    let built = build(&s)?;
    let progress = Progress::start(&format!(
        "{}: {} VCPUs x {} round trips under QEMU",
        kind.cli_name(),
        s.vcpus,
        s.trips
    ));
    let r = boot(&s, &built, &q, None)?;
    drop(progress);
    let exit = if r.verified {
        Exit::Ok
    } else {
        eprintln!(
            "worldswitch: {} failed verification: {}",
            kind.cli_name(),
            r.failures.join("; ")
        );
        Exit::Failed
    };
    let Some(img) = r.vm_image.as_deref() else {
        if exit == Exit::Failed {
            return Ok((None, exit));
        }
        return Err(CliError::Transcript(format!(
            "the run of {} left no VM dump to read samples from",
            kind.cli_name()
        )));
    };
    let st = built.vmm.stam()?;
    let snap = st
        .registry
        .snapshot(&a.pattern, &st.backing(&st.with_totals(img)))?;
    Ok((Some(snap), exit))
}

/// `worldswitch stats`.
///
/// # Errors
/// Bad options, an unreadable or foreign `--from` document, QEMU missing.
pub fn stats(a: &StatsArgs, out: &mut String) -> Result<Exit, CliError> {
    let format = if a.json { StatsFormat::Json } else { a.format };
    let (snap, exit) = match &a.from {
        Some(p) => stats_from(a, p)?,
        None => stats_run(a)?,
    };
    let Some(snap) = snap else {
        return Ok(exit);
    };
    if snap.samples.is_empty() {
        return Err(CliError::Usage(format!(
            "pattern `{}` selects no samples",
            a.pattern
        )));
    }
    out.push_str(&render_snapshot(&snap, format)?);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(exit)
}
