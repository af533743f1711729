//! From command-line options to a [`Placement`], a [`Scenario`] and a [`Vmm`].

use std::time::Duration;

use vmm::{ExtraMapping, Placement, Vmm, VmmConfig};
use vmm_switcher::disasm::view_base;
use vmm_switcher::templates::TemplateOptions;
use vmm_switcher::{HcAddr, PhysAddr, RcAddr, SideMode, SwitcherKind, View};

use crate::args::{BuildArgs, HostApicArg, PlacementArgs, QemuArgs, ScenarioArgs, Selection};
use crate::CliError;
use integration::cpumodel::{self, CpuModel};
use integration::hostkernel::LAPIC_VIRT;
use integration::paging::HostMode;
use integration::qemu::QemuConfig;
use integration::scenario::Scenario;

/// Distance from the core code to the hypervisor area (HC and physical).
pub const HMA_GAP: u64 = 0x10_0000;
/// Distance from the core code to the intermediate tables (physical).
pub const TABLES_GAP: u64 = 0x20_0000;

/// The placement the options describe for `kind` (the switcher's own default
/// placement where absent: AMD64 hosts keep their HC addresses in the top
/// 2 GiB).
///
/// # Errors
/// A value does not fit its address space.
pub fn placement(p: &PlacementArgs, kind: SwitcherKind) -> Result<Placement, CliError> {
    let mut pl = Scenario::new(kind).placement;
    if let Some(hc) = p.hc_base {
        let hma = hc.checked_add(HMA_GAP).ok_or(CliError::Address {
            option: "--hc-base",
            value: hc,
            why: "leaves no room for the hypervisor area above it",
        })?;
        pl.code_hc = HcAddr(hc);
        pl.hma_hc = HcAddr(hma);
    }
    if let Some(rc) = p.rc_base {
        let rc32 = u32::try_from(rc).map_err(|_| CliError::Address {
            option: "--rc-base",
            value: rc,
            why: "is not a 32-bit hypervisor-context address",
        })?;
        pl.hma_rc = RcAddr(rc32);
    }
    if let Some(phys) = p.phys_base {
        let tables = phys
            .checked_add(TABLES_GAP)
            .filter(|t| *t < 1 << 32)
            .ok_or(CliError::Address {
                option: "--phys-base",
                value: phys,
                why: "leaves no room below 4 GiB for the hypervisor area and tables",
            })?;
        pl.code_phys = PhysAddr(phys);
        pl.hma_phys = PhysAddr(phys + HMA_GAP);
        pl.tables_phys = PhysAddr(tables);
    }
    Ok(pl)
}

/// The template options the flags describe.
pub fn options(b: &BuildArgs) -> TemplateOptions {
    TemplateOptions {
        stats: !b.no_stats,
        apic_nmi_masking: !b.no_apic,
        revision: b.revision.into(),
        trace: b.trace,
        x2apic: b.x2apic,
        ..TemplateOptions::default()
    }
}

/// The VMM configuration the testbed uses for these options (the local APIC
/// page mapped in the intermediate context, as [`integration::scenario::build`] does).
pub fn vmm_config(b: &BuildArgs, placement: Placement, kind: SwitcherKind) -> VmmConfig {
    VmmConfig {
        host_bits: host_bits(kind),
        placement,
        vcpus: b.vcpus,
        options: options(b),
        extra_mappings: vec![ExtraMapping {
            virt: u64::from(LAPIC_VIRT),
            phys: u64::from(LAPIC_VIRT),
            len: 0x1000,
            uncached: true,
        }],
        ..VmmConfig::default()
    }
}

/// Builds the VMM core holding `kind` for these options.
///
/// # Errors
/// A bad placement or VCPU count.
pub fn vmm(b: &BuildArgs, p: &PlacementArgs, kind: SwitcherKind) -> Result<Vmm, CliError> {
    Ok(Vmm::new(vmm_config(b, placement(p, kind)?, kind))?)
}

/// The bitness of the host `kind` runs on.
pub fn host_bits(kind: SwitcherKind) -> u32 {
    if vmm::AVAILABLE_AMD64_HOST.contains(&kind) || kind == SwitcherKind::Amd64ToAmd64 {
        64
    } else {
        32
    }
}

/// The scenario for `kind` and these options.
///
/// # Errors
/// A bad placement or host configuration.
pub fn scenario(kind: SwitcherKind, a: &ScenarioArgs) -> Result<Scenario, CliError> {
    Ok(scenario_and_cpu(kind, a)?.0)
}

/// The scenario for `kind` and these options, and the CPU model it boots:
/// the host options applied (`--host-apic x2apic` also builds the x2APIC
/// masking code), the switcher relocated for the model's CPU facts.
///
/// # Errors
/// A bad placement, or a host configuration the switcher or the `--cpu`
/// model cannot run.
pub fn scenario_and_cpu(
    kind: SwitcherKind,
    a: &ScenarioArgs,
) -> Result<(Scenario, CpuModel), CliError> {
    let mut s = Scenario::new(kind);
    s.options = options(&a.build);
    s.placement = placement(&a.placement, kind)?;
    s.vcpus = a.build.vcpus;
    s.trips = a.round_trips;
    if a.host.host_apic == HostApicArg::X2apic {
        s.host_x2apic = true;
        s.options.x2apic = true;
    }
    s.host_cr4 = a.host.host_cr4.into();
    if a.host.la57 {
        // The core code moves to a 57-bit-only HC address unless --hc-base
        // placed it.
        s.set_la57(true);
    }
    s.nmi_storm = a.nmi_storm;
    s.cpus = a.cpus;
    s.deadlines = !a.no_deadlines;
    let model = cpumodel::model_for(&s, a.host.cpu.as_deref())
        .map_err(integration::scenario::ScenarioError::from)?;
    s.cpu = model.facts();
    Ok((s, model))
}

/// The QEMU configuration for these options (QEMU's default CPU model;
/// [`scenario_and_cpu`] gives each scenario its own).
pub fn qemu(q: &QemuArgs, gdb: Option<u16>) -> QemuConfig {
    QemuConfig {
        binary: q.qemu.clone(),
        cpu: None,
        gdb,
        debug_log: q.qemu_log.clone(),
        plugin: None,
        smp: 1,
        // Waiting for a person at a gdb prompt is not a hang: the longest
        // timeout QEMU runs take.
        timeout: if gdb.is_some() {
            integration::qemu::MAX_TIMEOUT
        } else {
            Duration::from_secs(q.timeout)
        },
    }
}

/// Whether this build provides `kind`.
pub fn available(kind: SwitcherKind) -> bool {
    vmm::AVAILABLE.contains(&kind)
}

/// Fails with [`CliError::Unavailable`] unless this build provides `kind`.
///
/// # Errors
/// See above.
pub fn require(kind: SwitcherKind) -> Result<(), CliError> {
    if available(kind) {
        Ok(())
    } else {
        Err(CliError::Unavailable {
            kind: kind.cli_name(),
            available: available_names(),
        })
    }
}

/// The available switchers' names, comma separated.
pub fn available_names() -> String {
    SwitcherKind::ALL
        .into_iter()
        .filter(|k| available(*k))
        .map(SwitcherKind::cli_name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The switchers a selection names, each once: the explicit ones (each must
/// be available), or every available switcher.
///
/// # Errors
/// An explicitly named switcher is unavailable.
pub fn select(sel: &Selection) -> Result<Vec<SwitcherKind>, CliError> {
    if sel.all || sel.switchers.is_empty() {
        return Ok(SwitcherKind::ALL
            .into_iter()
            .filter(|k| available(*k))
            .collect());
    }
    let mut out = Vec::new();
    for &k in &sel.switchers {
        require(k)?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// The name of a host paging mode in the program's one vocabulary, the
/// README's: `32-bit`, `PAE`, `AMD64` (the serial protocol's `legacy32`,
/// `pae`, `amd64` never reach a user).
pub fn host_mode_name(m: HostMode) -> &'static str {
    let side = match m {
        HostMode::Legacy32 => SideMode::Bits32,
        HostMode::Pae => SideMode::Pae,
        HostMode::Amd64 => SideMode::Amd64,
    };
    side.name()
}

/// Every host paging mode `kind` serves, in that vocabulary: one for each
/// switcher, `32-bit` and `PAE` for the x86 stub.
pub fn host_modes(kind: SwitcherKind) -> Vec<&'static str> {
    match kind {
        SwitcherKind::X86Stub => vec![SideMode::Bits32.name(), SideMode::Pae.name()],
        _ => vec![kind.host().name()],
    }
}

/// The host configurations `kind` runs on, as `run` options: the host APIC
/// in either mode, today's CR4 and 5-level paging on AMD64 hosts, and CPUs
/// without NX, SYSENTER or SYSCALL (the switcher is relocated for the
/// `--cpu` model).
pub fn host_options(kind: SwitcherKind) -> Vec<&'static str> {
    let mut v = vec!["--host-apic xapic", "--host-apic x2apic", "--host-cr4 base"];
    if kind.host() == SideMode::Amd64 {
        v.extend(["--host-cr4 today", "--la57"]);
    }
    v.extend([
        "--cpu qemu64,-nx",
        "--cpu qemu64,-sep",
        "--cpu qemu64,-syscall",
    ]);
    v
}

/// The hypervisor-context paging mode of `kind`; `None` for a stub, which
/// has no hypervisor context.
pub fn guest_mode(kind: SwitcherKind) -> Option<&'static str> {
    kind.guest().map(SideMode::name)
}

/// A label or entry point of an installed switcher with its address in the
/// view the code around it executes in.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LabelAddr {
    /// Label name (`entry:` prefix for VMMSWITCHERDEF entry points).
    pub name: String,
    /// Offset in the switcher's code.
    pub offset: u32,
    /// View of the region holding it (`None` outside every region).
    pub view: Option<View>,
    /// Address in that view (HC when outside every region).
    pub addr: u64,
}

/// Every label and entry point of `sw`, in offset order.
pub fn labels(sw: &vmm::Installed) -> Vec<LabelAddr> {
    let def = &sw.def;
    let mut out: Vec<LabelAddr> = def
        .labels
        .iter()
        .map(|(n, o)| ((*n).to_string(), *o))
        .chain(
            def.entries
                .named()
                .iter()
                .map(|(n, o)| (format!("entry:{n}"), *o)),
        )
        .map(|(name, offset)| {
            let view = def.region_of(offset).map(|r| r.view);
            let base = view_base(&sw.ctx, view.unwrap_or(View::Hc));
            LabelAddr {
                name,
                offset,
                view,
                addr: base.wrapping_add(u64::from(offset)),
            }
        })
        .collect();
    out.sort_by(|a, b| a.offset.cmp(&b.offset).then(a.name.cmp(&b.name)));
    out
}

/// Names `addr` as `switcher:label+off` when it lies in `sw`'s code in any view.
pub fn symbolize_switcher(sw: &vmm::Installed, addr: u64) -> Option<String> {
    let len = u64::from(sw.def.code_len());
    let (view, off) = [View::Hc, View::Id, View::Rc].into_iter().find_map(|v| {
        let base = view_base(&sw.ctx, v);
        let off = addr.checked_sub(base)?;
        (off < len).then_some((v, off))
    })?;
    let off = u32::try_from(off).ok()?;
    let best = sw
        .def
        .labels
        .iter()
        .filter(|(_, o)| **o <= off)
        .max_by_key(|(_, o)| **o);
    let what = match best {
        Some((name, o)) => format!("{name}+{:#x}", off - o),
        None => format!("+{off:#x}"),
    };
    Some(format!(
        "{} {what} ({view:?} view, offset {off:#x})",
        sw.def.kind.cli_name()
    ))
}
