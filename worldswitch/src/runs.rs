//! `run`, `image`, `decode` and `stats`: the switchers executed.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use stam::{Pattern, Snapshot};
use vmm_switcher::templates::TemplateOptions;
use vmm_switcher::SwitcherKind;

use crate::args::{
    DecodeArgs, ImageArgs, PlacementArgs, RevisionArg, RunArgs, ScenarioArgs, StatsArgs,
    StatsFormat,
};
use crate::progress::Progress;
use crate::report::{self, RunDoc, RunJson, SCHEMA};
use crate::{setup, to_json, CliError, Exit};
use integration::paging::HostMode;
use integration::qemu::{self, Outcome, QemuConfig, RunResult};
use integration::scenario::{build, judge, run_built, Built, Scenario};
use integration::transcript::Report;

fn check_qemu(q: &QemuConfig) -> Result<(), CliError> {
    if q.binary.is_none() {
        qemu::find_qemu()?;
    }
    Ok(())
}

fn gdb_banner(s: &Scenario, built: &Built) -> Result<String, CliError> {
    let sw = built.vmm.switcher(s.kind)?;
    let labels = setup::labels(sw);
    // QEMU's x86_64 gdbstub always describes the 64-bit register file; forcing
    // `i386` makes gdb reject its `g` packets, so let the target describe itself.
    let mut script: String = built
        .testbed
        .gdb_commands()
        .lines()
        .filter(|l| !l.starts_with("set architecture"))
        .map(|l| format!("{l}\n"))
        .collect();
    for l in &labels {
        let name: String = l
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let _ = writeln!(script, "set $sw_{name} = {:#010x}", l.addr);
    }
    let _ = writeln!(
        script,
        "hbreak *{:#010x}\n# continue: run to the switcher's C entry",
        sw.entries.r0_host_to_guest_hc.0
    );
    let path = std::env::temp_dir().join(format!(
        "worldswitch-{}-{}.gdb",
        s.kind.cli_name(),
        std::process::id()
    ));
    std::fs::write(&path, &script).map_err(|source| CliError::Write {
        path: path.clone(),
        source,
    })?;
    let mut b = String::new();
    let _ = writeln!(
        b,
        "QEMU is starting halted with its gdbstub on :1234 ({}).",
        s.kind.cli_name()
    );
    let _ = writeln!(
        b,
        "In another terminal run:\n\n    gdb -q -x {}\n",
        path.display()
    );
    let _ = writeln!(
        b,
        "The script connects, defines $<symbol> for the host kernel (e.g. $call_site) and \
         $sw_<label> for the switcher, and sets a hardware breakpoint on the C entry."
    );
    let _ = writeln!(b, "Switcher labels ({}):", s.kind.cli_name());
    for l in &labels {
        let view = l.view.map_or("--", |v| match v {
            vmm_switcher::View::Hc => "HC",
            vmm_switcher::View::Id => "ID",
            vmm_switcher::View::Rc => "RC",
        });
        let _ = writeln!(
            b,
            "    {view}  {:#010x}  +{:#06x}  {}",
            l.addr, l.offset, l.name
        );
    }
    let _ = writeln!(
        b,
        "Host kernel: call_site {:#010x}, after_call {:#010x}. Quit gdb with `kill` to end the run.",
        built.testbed.symbol("call_site").unwrap_or(0),
        built.testbed.symbol("after_call").unwrap_or(0)
    );
    Ok(b)
}

fn emit(doc: &RunDoc, json: bool, out: &mut String) -> Result<Exit, CliError> {
    if json {
        out.push_str(&to_json(doc)?);
    } else {
        for r in &doc.runs {
            out.push_str(&report::render(r));
            out.push('\n');
        }
        out.push_str(&report::render_summary(doc));
    }
    Ok(if doc.verified { Exit::Ok } else { Exit::Failed })
}

/// `worldswitch run`.
///
/// # Errors
/// Bad options or placement, an unavailable switcher, QEMU missing.
pub fn run(a: &RunArgs, out: &mut String) -> Result<Exit, CliError> {
    let kinds = setup::select(&a.select)?;
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
    // Every scenario is built before the first boot, so a bad option or
    // placement fails fast, whether QEMU is installed or not.
    let progress = (!a.gdb).then(|| Progress::start("building"));
    let mut scenarios = Vec::new();
    for kind in &kinds {
        let mut s = setup::scenario(*kind, &a.scenario)?;
        s.mutation = a.mutate.map(Into::into);
        let built = build(&s)?;
        scenarios.push((s, built));
    }
    let q = setup::qemu(&a.qemu, a.gdb);
    check_qemu(&q)?;
    let mut runs: Vec<RunJson> = Vec::new();
    let n = scenarios.len();
    for (i, (s, built)) in scenarios.iter().enumerate() {
        if a.gdb {
            eprint!("{}", gdb_banner(s, built)?);
        }
        if let Some(p) = &progress {
            p.set(&format!(
                "[{}/{n}] {}: {} VCPUs x {} round trips under QEMU",
                i + 1,
                s.kind.cli_name(),
                s.vcpus,
                s.trips
            ));
        }
        let r = run_built(s, built, &q)?;
        let wall = r.run.wall;
        let mut j = report::run_json(s, built, &r, Some(wall), false);
        if a.gdb && r.run.outcome == Outcome::TripleFault {
            // QEMU also exits with status 0 when gdb kills it.
            if let Some(d) = j.outcome_detail.as_mut() {
                d.push_str(", or the run was ended from gdb");
            }
        }
        runs.push(j);
    }
    drop(progress);
    let doc = RunDoc {
        schema: SCHEMA,
        command: "run",
        verified: runs.iter().all(|r| r.verified),
        runs,
    };
    emit(&doc, a.json, out)
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

fn placement_flags(p: &PlacementArgs) -> String {
    let mut s = String::new();
    for (flag, v) in [
        ("--hc-base", p.hc_base),
        ("--rc-base", p.rc_base),
        ("--phys-base", p.phys_base),
    ] {
        if let Some(v) = v {
            let _ = write!(s, " {flag} {v:#x}");
        }
    }
    s
}

/// The `decode` command line that judges a transcript of an image built with `a`.
pub fn decode_command(kind: SwitcherKind, a: &ScenarioArgs) -> String {
    let mut s = format!("worldswitch decode {}", kind.cli_name());
    if a.build.revision == RevisionArg::A {
        s.push_str(" --revision a");
    }
    if a.build.no_apic {
        s.push_str(" --no-apic");
    }
    if a.build.no_stats {
        s.push_str(" --no-stats");
    }
    if a.build.trace {
        s.push_str(" --trace");
    }
    if a.build.x2apic {
        s.push_str(" --x2apic");
    }
    s.push_str(&placement_flags(&a.placement));
    s.push_str(" < serial.log");
    s
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
        let s = setup::scenario(kind, &a.scenario)?;
        let built = build(&s)?;
        let path = image_path(&a.out, kind, several);
        std::fs::write(&path, &built.testbed.image).map_err(|source| CliError::Write {
            path: path.clone(),
            source,
        })?;
        let qemu_args: Vec<String> = QemuConfig::default()
            .args(&path)
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let qemu_cmd = format!("{} {} > serial.log", qemu::QEMU_BINARY, qemu_args.join(" "));
        images.push(json!({
            "switcher": kind.cli_name(),
            "path": path,
            "bytes": built.testbed.image.len(),
            "host_mode": built.testbed.mode.name(),
            "vcpus": s.vcpus,
            "round_trips_per_vcpu": s.trips,
            "switcher_entry": built.vmm.switcher(kind)?.entries.r0_host_to_guest_hc.0,
            "qemu_command": qemu_cmd,
            "decode_command": decode_command(kind, &a.scenario),
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
/// transcript ends without either.
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

/// `worldswitch decode`.
///
/// # Errors
/// No `BOOT` line, a transcript that does not match the options, bad options.
pub fn decode(a: &DecodeArgs, out: &mut String) -> Result<Exit, CliError> {
    let bytes = read_input(a.input.as_deref())?;
    let report = Report::parse(&bytes);
    let boot = report.boot.clone().ok_or(CliError::NoBoot)?;
    let host = HostMode::from_name(&boot.mode).ok_or_else(|| {
        CliError::Transcript(format!(
            "unknown host mode `{}` on the BOOT line",
            boot.mode
        ))
    })?;
    let options = TemplateOptions {
        stats: !a.no_stats,
        apic_nmi_masking: !a.no_apic,
        revision: a.revision.into(),
        trace: a.trace,
        x2apic: a.x2apic,
        ..TemplateOptions::default()
    };
    let candidates: Vec<SwitcherKind> = match a.switcher {
        Some(k) => {
            setup::require(k)?;
            vec![k]
        }
        None => SwitcherKind::ALL
            .into_iter()
            .filter(|k| setup::available(*k))
            .filter(|k| Scenario::new(*k).host_mode() == host)
            .collect(),
    };
    let mut chosen: Option<(Scenario, Built)> = None;
    let mut seen = Vec::new();
    for kind in candidates {
        let mut s = Scenario::new(kind);
        s.options = options;
        s.placement = setup::placement(&a.placement, kind)?;
        s.vcpus = a.vcpus.unwrap_or(boot.vcpus);
        s.trips = a.round_trips.unwrap_or(boot.trips);
        if s.host_mode() != host {
            return Err(CliError::Transcript(format!(
                "the transcript is from a {} host, but {} runs on a {} host",
                boot.mode,
                kind.cli_name(),
                s.host_mode().name()
            )));
        }
        let built = build(&s)?;
        let entry = built.vmm.switcher(kind)?.entries.r0_host_to_guest_hc.0;
        if entry == u64::from(boot.entry) {
            chosen = Some((s, built));
            break;
        }
        seen.push(format!("{} at {entry:#x}", kind.cli_name()));
    }
    let (s, built) = chosen.ok_or_else(|| {
        CliError::Transcript(format!(
            "the BOOT line calls {:#x}, but no switcher for a {} host has its entry there with \
             these options ({}); pass the switcher, options and placement the image was built with",
            boot.entry,
            boot.mode,
            if seen.is_empty() {
                "none available".into()
            } else {
                seen.join(", ")
            }
        ))
    })?;
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
    let snap: Snapshot =
        serde_json::from_value(run["stam"].clone()).map_err(|e| bad(format!("stam: {e}")))?;
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
    let s = setup::scenario(kind, &a.scenario)?;
    let q = setup::qemu(&a.qemu, false);
    check_qemu(&q)?;
    let built = build(&s)?;
    let progress = Progress::start(&format!(
        "{}: {} VCPUs x {} round trips under QEMU",
        kind.cli_name(),
        s.vcpus,
        s.trips
    ));
    let r = run_built(&s, &built, &q)?;
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
    let snap = st.registry.snapshot(&a.pattern, &st.backing(img))?;
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
