//! The command line, declared with clap's derive API.
//!
//! Every subcommand has `--help`; the doc comments below are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmm_switcher::templates::Revision;
use vmm_switcher::SwitcherKind;

use integration::scenario::Mutation;

/// See, run, measure and debug world switchers.
///
/// A world switcher is the ring-0 code that leaves a host CPU context for a
/// hypervisor context in another paging mode and comes back with the host
/// intact. This program builds VirtualBox-style switchers with iced-x86,
/// relocates them, and executes them for real under QEMU TCG.
///
/// Exit status: 0 every switcher verified, 1 a switcher failed verification,
/// 2 usage or environment error (bad argument, bad placement, QEMU missing).
#[derive(Debug, Parser)]
#[command(name = "worldswitch", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every switcher kind: host and guest modes, availability, code size, fixups.
    List(ListArgs),
    /// Show one switcher's VMMSWITCHERDEF: fields, regions, entry points, labels, fixup records.
    Show(ShowArgs),
    /// Disassemble a switcher's relocated code, annotated with regions, labels and fixups.
    Disasm(DisasmArgs),
    /// Relocate a switcher for a placement and write its bytes to a file.
    Relocate(RelocateArgs),
    /// Boot the testbed under QEMU and run switchers for real: verdict, instruction counts, STAM.
    Run(RunArgs),
    /// Write the bootable multiboot test image (for QEMU, other emulators or GRUB on real x86).
    Image(ImageArgs),
    /// Judge a captured COM1 transcript of an image and print the same report `run` prints.
    Decode(DecodeArgs),
    /// Dump the VM's STAM samples of a fresh run (or of a saved `run --json`) in a chosen format.
    Stats(StatsArgs),
    /// Decode code bytes gdb dumped (what `run --gdb`'s `ws-x` runs).
    #[command(name = "gdb-x", hide = true)]
    GdbX(crate::gdb::XArgs),
}

/// Where the core code, the hypervisor area and the intermediate tables go.
///
/// Each value is an address in hex (`0x` prefix) or decimal, page aligned.
#[derive(Clone, Copy, Debug, Default, Args)]
pub struct PlacementArgs {
    /// Host-context (ring-0 virtual) base: the core code goes here, the
    /// hypervisor area's host mapping 1 MiB above [default: 0xc0400000].
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub hc_base: Option<u64>,
    /// Hypervisor-context (RC) base of the hypervisor area [default: 0xa0000000].
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub rc_base: Option<u64>,
    /// Physical base: the core code goes here, the hypervisor area 1 MiB above
    /// and the intermediate page tables 2 MiB above [default: 0x400000].
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub phys_base: Option<u64>,
}

/// The switcher revision (`--revision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum RevisionArg {
    /// The earlier seed's algorithm: NMI LVTs unmasked in the exit path.
    A,
    /// The later seed's algorithm: unmasked after the worker call returns.
    B,
    /// This project's: as B, with fewer expensive operations (one xAPIC
    /// read-back, the APIC version read at set-up, unmasking by writing back
    /// the saved LVTs, EFER and CR0 writes derived from saved values).
    #[default]
    C,
}

impl From<RevisionArg> for Revision {
    fn from(r: RevisionArg) -> Self {
        match r {
            RevisionArg::A => Revision::A,
            RevisionArg::B => Revision::B,
            RevisionArg::C => Revision::C,
        }
    }
}

/// Template and VM options shared by every subcommand that builds switchers.
#[derive(Clone, Copy, Debug, Args)]
pub struct BuildArgs {
    /// The switcher's algorithm: a or b (the seeds'), c (this project's, fewer expensive operations).
    #[arg(long, value_enum, default_value_t = RevisionArg::C)]
    pub revision: RevisionArg,
    /// Build without APIC NMI masking.
    #[arg(long)]
    pub no_apic: bool,
    /// Build without the STAM ToGC/ToHC profiles.
    #[arg(long)]
    pub no_stats: bool,
    /// Print one trace character per switch step to COM1 (shows the last step reached).
    #[arg(long)]
    pub trace: bool,
    /// Build the masking code that also handles a host APIC in x2APIC mode (MSRs).
    #[arg(long)]
    pub x2apic: bool,
    /// Number of VCPUs; the host calls them in turn.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub vcpus: u32,
}

/// How QEMU is run.
#[derive(Clone, Debug, Args)]
pub struct QemuArgs {
    /// Wall-clock limit per boot, in seconds (1 to 86400, one day).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=integration::qemu::MAX_TIMEOUT_SECS))]
    pub timeout: u64,
    /// QEMU binary [default: qemu-system-x86_64 on PATH].
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Write QEMU's interrupt/reset log (`-d int,cpu_reset,guest_errors`) to
    /// FILE; with several switchers, `-<switcher>` is inserted before the
    /// extension (`qemu.log` → `qemu-32-to-amd64.log`), one file per boot.
    #[arg(long, value_name = "FILE")]
    pub qemu_log: Option<PathBuf>,
}

/// `worldswitch list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `worldswitch show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The switcher (see `worldswitch list`).
    #[arg(value_name = "SWITCHER", value_parser = parse_switcher)]
    pub switcher: SwitcherKind,
    /// Template options.
    #[command(flatten)]
    pub build: BuildArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `worldswitch disasm`.
#[derive(Debug, Args)]
pub struct DisasmArgs {
    /// The switcher (see `worldswitch list`).
    #[arg(value_name = "SWITCHER", value_parser = parse_switcher)]
    pub switcher: SwitcherKind,
    /// Placement.
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// Template options.
    #[command(flatten)]
    pub build: BuildArgs,
    /// Print one JSON object per instruction in an array.
    #[arg(long)]
    pub json: bool,
}

/// `worldswitch relocate`.
#[derive(Debug, Args)]
pub struct RelocateArgs {
    /// The switcher (see `worldswitch list`).
    #[arg(value_name = "SWITCHER", value_parser = parse_switcher)]
    pub switcher: SwitcherKind,
    /// Where to write the relocated bytes.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Placement.
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// Template options.
    #[command(flatten)]
    pub build: BuildArgs,
    /// Print every fixup (offset, kind, written value) and the entry addresses as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which switchers to run: names, or `--all` (the default).
#[derive(Clone, Debug, Args)]
pub struct Selection {
    /// Switchers to run (see `worldswitch list`); none means `--all`.
    #[arg(value_name = "SWITCHER", value_parser = parse_switcher)]
    pub switchers: Vec<SwitcherKind>,
    /// Every available switcher.
    #[arg(long, conflicts_with = "switchers")]
    pub all: bool,
}

/// The host APIC's mode (`--host-apic`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum HostApicArg {
    /// xAPIC: registers in the MMIO page.
    #[default]
    Xapic,
    /// x2APIC: registers through MSRs (implies `--x2apic`; QEMU 9 or later).
    X2apic,
}

/// The AMD64 host's CR4 (`--host-cr4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum HostCr4Arg {
    /// What the testbed needs: PAE, PGE, OSFXSR, OSXMMEXCPT.
    #[default]
    Base,
    /// Also SMEP, SMAP, UMIP, PKE (with a non-zero PKRU) and FSGSBASE, as
    /// current kernels run (AMD64 hosts).
    Today,
    /// `today` plus CR4.PCIDE with a non-zero PCID in CR3 (Bochs only:
    /// QEMU TCG does not emulate PCID).
    #[value(name = "today+pcid")]
    TodayPcid,
    /// `today+pcid` plus CR4.CET (IA32_S_CET left 0; Bochs only: QEMU TCG
    /// does not emulate CET).
    #[value(name = "today+pcid+cet")]
    TodayPcidCet,
}

impl From<HostCr4Arg> for integration::scenario::HostCr4 {
    fn from(c: HostCr4Arg) -> Self {
        match c {
            HostCr4Arg::Base => Self::Base,
            HostCr4Arg::Today => Self::Today,
            HostCr4Arg::TodayPcid => Self::TodayPcid,
            HostCr4Arg::TodayPcidCet => Self::TodayPcidCet,
        }
    }
}

/// The options that define the host the switchers run on.
#[derive(Clone, Debug, Args)]
pub struct HostArgs {
    /// The host local APIC's mode; `x2apic` builds the x2APIC masking code
    /// (`--x2apic`) and boots a CPU model with x2APIC.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = HostApicArg::Xapic)]
    pub host_apic: HostApicArg,
    /// The AMD64 host's CR4; `today` boots a CPU model with SMEP, SMAP,
    /// UMIP, PKU and FSGSBASE; `today+pcid` also sets CR4.PCIDE with a
    /// PCID in CR3, `today+pcid+cet` also CR4.CET (--engine bochs on a
    /// model with PCID and CET).
    #[arg(long, value_enum, value_name = "CR4", default_value_t = HostCr4Arg::Base)]
    pub host_cr4: HostCr4Arg,
    /// AMD64 hosts: run the host with 5-level paging (CR4.LA57), the core
    /// code at 0xff00000000c0400000 (canonical in 57 bits only) unless
    /// --hc-base places it; boots a CPU model with LA57.
    #[arg(long)]
    pub la57: bool,
    /// QEMU `-cpu` model: the switchers are relocated for its CPU facts
    /// (NX, FXSR, SYSENTER, SYSCALL), and the image refuses a CPU whose bits
    /// differ [default: qemu64, plus what --host-apic and --host-cr4 need].
    #[arg(long, value_name = "MODEL")]
    pub cpu: Option<String>,
}

/// Options that define a scenario (what the image does).
#[derive(Clone, Debug, Args)]
pub struct ScenarioArgs {
    /// Round trips per VCPU.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub round_trips: u32,
    /// The host.
    #[command(flatten)]
    pub host: HostArgs,
    /// Template options.
    #[command(flatten)]
    pub build: BuildArgs,
    /// Placement.
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// The NMI storm: place an NMI edge at every instruction offset of the
    /// round trip, one offset per call (PIT -> 8259 -> LINT0 as NMI, exact
    /// under -icount); the report says where each NMI was taken. With
    /// --cpus above 1 the storm is interleaved: every edge reaches every
    /// CPU's LINT0 wherever it is, and each CPU reports where they fell.
    #[arg(long)]
    pub nmi_storm: bool,
    /// Host CPUs switching at once (QEMU -smp N, 1 to 8, at most --vcpus):
    /// VCPU v runs on CPU v % N, and PIT deadlines interleave the CPUs
    /// mid-switch.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(integration::hostkernel::smp::MAX_CPUS)))]
    pub cpus: u32,
    /// With --cpus: leave the PIT deadlines off, so each CPU runs until it
    /// waits and no round trip overlaps another CPU's (a baseline; not with
    /// --nmi-storm, whose PIT makes deadlines).
    #[arg(long)]
    pub no_deadlines: bool,
}

/// `worldswitch run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Switchers.
    #[command(flatten)]
    pub select: Selection,
    /// Scenario.
    #[command(flatten)]
    pub scenario: ScenarioArgs,
    /// QEMU.
    #[command(flatten)]
    pub qemu: QemuArgs,
    /// Print one JSON document (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// Boot up to N switchers at once (each in its own QEMU); reports still
    /// come in switcher order [default: the number of CPU cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    /// Start QEMU halted with its gdbstub on 127.0.0.1:PORT (see
    /// `--gdb-port`); write a gdb script and a symbol file, print the gdb
    /// command line and the switcher's label addresses (one switcher only).
    #[arg(long)]
    pub gdb: bool,
    /// The gdbstub's TCP port for `--gdb`.
    #[arg(long, value_name = "PORT", default_value_t = crate::gdb::DEFAULT_PORT, requires = "gdb", value_parser = clap::value_parser!(u16).range(1..))]
    pub gdb_port: u16,
    /// Count the expensive operations of each switch direction and trip
    /// kind (CR/MSR/descriptor-table/segment/FPU/DR instructions, xAPIC
    /// accesses) with the `costmodel-plugin` QEMU TCG plugin; adds `cost`
    /// to the JSON.
    #[arg(long, conflicts_with = "gdb")]
    pub cost: bool,
    /// Break the switcher on purpose (one instruction replaced by NOPs) to
    /// see the testbed catch it.
    #[arg(long, value_name = "BUG", value_parser = mutation_parser())]
    pub mutate: Option<Mutation>,
    /// The machine that runs the image: QEMU's TCG, or Bochs, which
    /// enforces mode-transition rules TCG lets through (it has no
    /// instruction counter: the figures are TSC ticks).
    #[arg(long, value_enum, default_value_t = EngineArg::Qemu)]
    pub engine: EngineArg,
    /// The Bochs CPU model (`bochs-bin --help cpu`; `--engine bochs` only)
    /// [default: tigerlake].
    #[arg(long, value_name = "MODEL")]
    pub bochs_cpu: Option<String>,
}

/// `run --engine`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// QEMU TCG with -icount.
    #[default]
    Qemu,
    /// Bochs 2.7, headless.
    Bochs,
}

/// `--mutate`'s values: every [`Mutation`] by its command-line name, with a
/// help line saying what breaks and on which switchers ([`mutation_help`]).
pub fn mutation_parser() -> impl clap::builder::TypedValueParser<Value = Mutation> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let values = Mutation::ALL.map(|m| PossibleValue::new(m.name()).help(mutation_help(m)));
    PossibleValuesParser::new(values).try_map(|name: String| {
        Mutation::from_name(&name).ok_or_else(|| format!("unknown mutation `{name}`"))
    })
}

/// The `--help` line of `m`: what breaks, and the switchers it applies to.
pub fn mutation_help(m: Mutation) -> String {
    let kinds: Vec<&str> = m.switchers().iter().map(|k| k.cli_name()).collect();
    format!("{} (switchers: {})", m.description(), kinds.join(", "))
}

/// `worldswitch image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Switchers.
    #[command(flatten)]
    pub select: Selection,
    /// Output file; with several switchers, `-<switcher>` is inserted before
    /// the extension (`ws.bin` → `ws-32-to-amd64.bin`).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Scenario.
    #[command(flatten)]
    pub scenario: ScenarioArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `worldswitch decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// The switcher the image ran [default: inferred from the BOOT line].
    #[arg(value_name = "SWITCHER", value_parser = parse_switcher)]
    pub switcher: Option<SwitcherKind>,
    /// Read the transcript from FILE instead of stdin.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Round trips per VCPU [default: from the BOOT line].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub round_trips: Option<u32>,
    /// VCPUs [default: from the BOOT line].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// The unmask revision the image was built with [default: from the BOOT line].
    #[arg(long, value_enum)]
    pub revision: Option<RevisionArg>,
    /// The image was built with `--no-apic`.
    #[arg(long)]
    pub no_apic: bool,
    /// The image was built with `--no-stats`.
    #[arg(long)]
    pub no_stats: bool,
    /// The image was built with `--trace`.
    #[arg(long)]
    pub trace: bool,
    /// The image was built with `--x2apic`.
    #[arg(long)]
    pub x2apic: bool,
    /// Placement the image was built with.
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// Print the same JSON document `run --json` prints.
    #[arg(long)]
    pub json: bool,
}

/// Output format of `worldswitch stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum StatsFormat {
    /// VirtualBox's `STAMR3Print` layout.
    #[default]
    Text,
    /// VirtualBox's `STAMR3Snapshot` XML.
    Xml,
    /// A serialised `stam::Snapshot`.
    Json,
    /// Prometheus text exposition format 0.0.4.
    Prometheus,
}

/// `worldswitch stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The switcher to run or to pick from `--from` [default: the first available].
    #[arg(value_name = "SWITCHER", value_parser = parse_switcher)]
    pub switcher: Option<SwitcherKind>,
    /// Read a document written by `worldswitch run --json` (`-` for stdin) instead of running.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = StatsFormat::Text)]
    pub format: StatsFormat,
    /// Sample name pattern: globs (`*`, `?`) with `|` alternatives.
    #[arg(long, value_name = "P", default_value = "/VMM/*")]
    pub pattern: String,
    /// Same as `--format json`.
    #[arg(long)]
    pub json: bool,
    /// Scenario (when running).
    #[command(flatten)]
    pub scenario: ScenarioArgs,
    /// QEMU (when running).
    #[command(flatten)]
    pub qemu: QemuArgs,
}

/// Parses an address: `0x`-prefixed hex or decimal, `_` separators allowed.
///
/// # Errors
/// A message naming the value.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    parsed.map_err(|_| format!("`{s}` is not an address (hex with 0x, or decimal)"))
}

/// Parses a switcher's command-line name.
///
/// # Errors
/// A message naming the value and listing the valid names.
pub fn parse_switcher(s: &str) -> Result<SwitcherKind, String> {
    SwitcherKind::from_cli_name(s).ok_or_else(|| {
        let names: Vec<&str> = SwitcherKind::ALL.iter().map(|k| k.cli_name()).collect();
        format!("unknown switcher `{s}` (one of: {})", names.join(", "))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn mutate_takes_every_mutation_by_name_and_its_help_names_the_switchers() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        let arg = run
            .get_arguments()
            .find(|a| a.get_id() == "mutate")
            .unwrap();
        let values = arg.get_possible_values();
        let names: Vec<&str> = values.iter().map(|v| v.get_name()).collect();
        assert_eq!(names, Mutation::ALL.map(Mutation::name));
        for (v, m) in values.iter().zip(Mutation::ALL) {
            assert_eq!(v.get_help().unwrap().to_string(), mutation_help(m));
            let parsed = Cli::try_parse_from(["worldswitch", "run", "--mutate", m.name()]).unwrap();
            match parsed.command {
                Command::Run(a) => assert_eq!(a.mutate, Some(m)),
                c => panic!("{c:?}"),
            }
        }
        assert_eq!(
            mutation_help(Mutation::PaeLeftOn),
            "CR4.PAE stays on when returning to a 32-bit host (switchers: 32-to-pae, 32-to-amd64)"
        );
        assert!(Cli::try_parse_from(["worldswitch", "run", "--mutate", "PaeLeftOn"]).is_err());
    }
}
