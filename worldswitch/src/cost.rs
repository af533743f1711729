//! `run --cost`: the switch's expensive operations counted by the QEMU TCG
//! plugin of the `costmodel-plugin` crate, per direction and trip kind.
//!
//! The plugin is told the switcher's code in every view it runs at (HC,
//! identity, RC) and the hypervisor area (where the far side runs); it cuts
//! each VCPU's instruction stream into round trips at those boundaries and
//! writes one line per distinct trip when QEMU exits. The trip kinds are
//! read from what the trip executed: FPU state moved (FXSAVE/FXRSTOR) or
//! debug registers written (the testbed asks for both kinds, each alone and
//! together, on a fixed pattern of trips).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use costmodel_plugin::class::Class;
use costmodel_plugin::machine::{Direction, Trip, TripKind};
use costmodel_plugin::report::Report;
use integration::qemu::{self, QemuConfig};
use integration::scenario::Built;
use serde::Serialize;
use vmm_switcher::SwitcherKind;

use crate::CliError;

/// The environment variable naming the plugin library, overriding the search.
pub const PLUGIN_ENV: &str = "WORLDSWITCH_COST_PLUGIN";

/// The plugin library's file name.
pub const PLUGIN_FILE: &str = "libcostmodel_plugin.so";

/// The trip kinds `run --cost` reports.
pub const KINDS: [TripKind; 3] = [TripKind::NoSync, TripKind::FpuSync, TripKind::DebugSync];

/// One direction's counts: class name → executed instructions of the class.
pub type ClassCounts = BTreeMap<&'static str, u64>;

/// One trip kind: `to_gc` and `to_hc`.
pub type KindCost = BTreeMap<&'static str, ClassCounts>;

/// The `cost` member of a run: trip kind (`no_sync`, `fpu_sync`,
/// `debug_sync`) → its typical trip, `null` when the run had no trip of
/// that kind (a stub has no FPU or debug trips).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Cost(pub BTreeMap<&'static str, Option<KindCost>>);

/// One trip kind as measured: the kind, its typical trip with how many
/// trips were exactly it, and how many trips of the kind ran.
pub type KindTrips = (TripKind, Option<(Trip, u64)>, u64);

/// What the plugin measured for one switcher, for the text report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// The JSON form.
    pub cost: Cost,
    /// Per kind: the typical trip and how many trips were exactly it, and
    /// how many trips of the kind ran.
    pub typical: Vec<KindTrips>,
}

impl Measured {
    /// Reads a plugin report.
    pub fn from_report(r: &Report) -> Measured {
        let mut cost = BTreeMap::new();
        let mut typical = Vec::new();
        for kind in KINDS {
            let all: u64 = r
                .trips
                .iter()
                .filter(|(_, t)| t.kind() == kind)
                .map(|(n, _)| n)
                .sum();
            let t = r.typical(kind).map(|(n, t)| (*t, n));
            cost.insert(kind.name(), t.map(|(trip, _)| kind_cost(&trip)));
            typical.push((kind, t, all));
        }
        Measured {
            cost: Cost(cost),
            typical,
        }
    }
}

fn kind_cost(t: &Trip) -> KindCost {
    Direction::ALL
        .into_iter()
        .map(|d| {
            let c = t.dir(d);
            let classes = Class::ALL
                .into_iter()
                .map(|k| (k.name(), c.get(k)))
                .collect();
            (d.name(), classes)
        })
        .collect()
}

/// Finds the plugin library: `$WORLDSWITCH_COST_PLUGIN`, else beside the
/// running program or in its `deps/` directory or their parent (where Cargo
/// puts it when it builds the workspace).
///
/// # Errors
/// [`CliError::Cost`] naming the places searched and the build command.
pub fn find_plugin() -> Result<PathBuf, CliError> {
    if let Some(p) = std::env::var_os(PLUGIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(CliError::Cost(format!(
                "{PLUGIN_ENV}={} is not a file",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dirs = Vec::new();
    if let Some(d) = exe.parent() {
        dirs.push(d.to_path_buf());
        dirs.push(d.join("deps"));
        if let Some(up) = d.parent() {
            dirs.push(up.to_path_buf());
            dirs.push(up.join("deps"));
        }
    }
    dirs.iter()
        .map(|d| d.join(PLUGIN_FILE))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CliError::Cost(format!(
                "the QEMU plugin {PLUGIN_FILE} is not beside {} (build it with `cargo build --release -p costmodel-plugin`, or name it in {PLUGIN_ENV})",
                exe.display()
            ))
        })
}

/// Fails unless the QEMU `q` runs loads TCG plugins (`-plugin help` is an
/// unknown option in a QEMU built without them).
///
/// # Errors
/// [`CliError::Cost`] with QEMU's own words.
pub fn check_plugin_support(q: &QemuConfig) -> Result<(), CliError> {
    let binary = qemu::resolve_binary(q)?;
    let out = Command::new(&binary)
        .args(["-plugin", "help"])
        .output()
        .map_err(|e| CliError::Cost(format!("cannot run {}: {e}", binary.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && text.contains("file=") {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.lines().next().unwrap_or("").trim();
    Err(CliError::Cost(format!(
        "{} has no TCG plugin support (`-plugin help`: {}); --cost needs a QEMU built with plugins (Debian's qemu-system-x86 8.0 or later)",
        binary.display(),
        if said.is_empty() { "no plugin options listed" } else { said }
    )))
}

/// The `-plugin` argument for `kind` in `built`: the switcher's code in the
/// HC, identity and RC views, the hypervisor area in the RC, HC and
/// physical views, and the report file.
///
/// # Errors
/// The switcher is not installed in `built`.
pub fn plugin_arg(
    plugin: &Path,
    built: &Built,
    kind: SwitcherKind,
    out: &Path,
) -> Result<OsString, CliError> {
    let sw = built.vmm.switcher(kind)?;
    let len = sw.def.code.len() as u64;
    let hma_len = built.vmm.hma().len() as u64;
    let p = built.vmm.config().placement;
    let mut arg = plugin.as_os_str().to_owned();
    let mut range = |key: &str, lo: u64, n: u64| {
        arg.push(format!(",{key}={lo:#x}-{:#x}", lo.saturating_add(n)));
    };
    range("sw", sw.ctx.code_hc.0, len);
    range("sw", sw.ctx.code_id.0, len);
    range("sw", u64::from(sw.ctx.code_rc.0), len);
    range("far", u64::from(p.hma_rc.0), hma_len);
    range("far", p.hma_hc.0, hma_len);
    range("far", p.hma_phys.0, hma_len);
    range("far", u64::from(built.far.rc), 0x4000);
    arg.push(",out=");
    arg.push(out.as_os_str());
    Ok(arg)
}

/// Reads the report the plugin wrote to `path`.
///
/// # Errors
/// The file is missing (QEMU did not exit normally) or damaged.
pub fn read_report(path: &Path) -> Result<Measured, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let r = Report::parse(&text).map_err(|e| CliError::Cost(e.to_string()))?;
    Ok(Measured::from_report(&r))
}

/// The text report's cost table: one row per class, one column per trip
/// kind, each cell `ToGC/ToHC`.
pub fn render(m: &Measured) -> String {
    let mut s = String::from(
        "  cost         expensive operations per switch, ToGC/ToHC (QEMU plugin, typical trip of each kind)\n",
    );
    let _ = write!(s, "    {:<16}", "class");
    for (kind, _, _) in &m.typical {
        let _ = write!(s, " {:>13}", kind.name());
    }
    s.push('\n');
    let cell = |t: &Option<(Trip, u64)>, f: &dyn Fn(&Trip, Direction) -> u64| match t {
        Some((trip, _)) => format!("{}/{}", f(trip, Direction::ToGc), f(trip, Direction::ToHc)),
        None => "-".to_owned(),
    };
    let _ = write!(s, "    {:<16}", "instructions");
    for (_, t, _) in &m.typical {
        let _ = write!(s, " {:>13}", cell(t, &|t, d| t.dir(d).instructions));
    }
    s.push('\n');
    for class in Class::ALL {
        let _ = write!(s, "    {:<16}", class.name());
        for (_, t, _) in &m.typical {
            let _ = write!(s, " {:>13}", cell(t, &|t, d| t.dir(d).get(class)));
        }
        s.push('\n');
    }
    let _ = write!(s, "    {:<16}", "trips (typical)");
    for (_, t, all) in &m.typical {
        let _ = write!(s, " {:>13}", format!("{all} ({})", t.map_or(0, |t| t.1)));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_json_has_every_kind_direction_and_class() {
        let mut t = Trip::default();
        t.dirs[0].classes[Class::Lgdt.index()] = 1;
        let r = Report {
            total: 3,
            trips: vec![(3, t)],
        };
        let m = Measured::from_report(&r);
        let v = serde_json::to_value(&m.cost).unwrap_or_default();
        assert_eq!(v["no_sync"]["to_gc"]["lgdt"], 1);
        assert_eq!(v["no_sync"]["to_hc"]["lgdt"], 0);
        assert_eq!(v["no_sync"]["to_hc"].as_object().map(|o| o.len()), Some(18));
        assert!(v["fpu_sync"].is_null() && v["debug_sync"].is_null());
        assert!(render(&m).contains("lgdt"));
    }
}
