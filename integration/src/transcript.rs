//! The serial line protocol of the host kernel and its decoder.
//!
//! The kernel writes COM1 (QEMU `-serial stdio`). Each protocol line starts
//! with [`PREFIX`] (`@@`), then a keyword and `key=value` fields separated by
//! single spaces, and ends with `\n`. Every line has a fixed set of fields in
//! a fixed order; a line with a field missing, an extra field, a value that
//! is not a plain hex or decimal number, or an unknown keyword lands in
//! [`Report::malformed`].
//!
//! | line | fields |
//! |---|---|
//! | `BOOT` | `mode` (`legacy32`/`pae`/`amd64`), `mbeax` hex, `trips`, `vcpus`, `items` dec, `entry` hex (16 digits on AMD64), then the scenario's own `key=value` fields ([`BootLine::scenario`]) |
//! | `NOCPU` | `feature` (a name such as `pae`, `long-mode`), `cpuid` (`leaf.register.bit`): the CPU lacks what the build needs; the run stops |
//! | `CPUEXTRA` | `feature`, `cpuid` as `NOCPU`: the CPU has a feature the image was relocated for a CPU without (its CPU facts say `nx`, `sep` or `syscall` is absent); the run stops |
//! | `HOST` | `cr0`, `cr3`, `cr4` hex, `efer` 16 hex digits, `sysenter_cs`, `magic`, `fs0`, `features` hex |
//! | `HOST64` | `fs_base`, `gs_base`, `kernel_gs_base`, `star`, `lstar`, `sfmask`, `cr8` 16 hex digits (AMD64 host only) |
//! | `APIC` | `base`, `ver`, `lint0`, `lint1`, `perf`, `therm`, `svr` hex |
//! | `TRIP` | `trip`, `vcpu` dec, `ret` hex, `tsc` dec (first trips only) |
//! | `MISMATCH` | `trip`, `vcpu`, `idx` dec, `name`, `before`, `after` hex (16 digits on AMD64) |
//! | `RETFAIL` | `trip`, `vcpu` dec, `got`, `want` hex |
//! | `HOOKFAIL` | `trip`, `vcpu` dec, `code` hex |
//! | `VCPU` | `vcpu` dec, `arg2` hex, `calls`, `mismatches`, `retfails`, `hookfails`, `tsc_min`, `tsc_max` dec, `tsc_sum` 16 hex digits, `tsc_first`, `tsc_second` dec |
//! | `SUMMARY` | `trips`, `calls`, `mismatches`, `retfails`, `hookfails`, `nmis`, `spurious`, `tsc_min`, `tsc_max` dec, `tsc_sum` 16 hex digits |
//! | `NMI` | `count` dec |
//! | `PIT` | `divisor` dec, `e1` … `e6` dec: the TSC of the first six NMIs the storm's PIT raised, less the TSC at the count's load (NMI storm only) |
//! | `STORM` | `o`, `len`, `nmis`, `dt` dec, `ip` hex (16 digits on AMD64), `ctx` hex, `far` dec, `far_ip` hex: one storm call (NMI storm only; see `hostkernel::storm`) |
//! | `STORMCPU` | `cpu`, `calls`, `edges`, `hidden`, `nmis`, `in_call`, `host`, `transit` dec, `ip` hex (16 digits on AMD64), `ctx` hex: one host CPU's account of an NMI storm on several CPUs, after its `CPU` line (see `hostkernel::storm`)
//! | `DUMP` | `addr` hex (16 digits for a 64-bit address), `len` hex, `name`; followed by `H <hex bytes>` lines and `END` |
//! | `EXC` | `vec`, `err`, `eip`, `cs`, `eflags`, `cr2` hex, `trip`, `vcpu`, `phase` dec; on AMD64 `eip` and `cr2` have 16 digits and `rsp` follows `cr2` |
//! | `EXC2` | `vec`, `err`, `eip` hex (an exception inside the exception path; `eip` 16 digits on AMD64) |
//! | `FAREXC` | `vec`, `err` hex, `rip` hex (printed by far-side handlers, if they use the prefix) |
//! | `LOG` | free text (from hooks) |
//! | `ERROR` | free text (setup problems) |
//! | `RESULT` | `PASS` or `FAIL` |
//! | `CRC` | `crc32` hex: the checksum of the transcript (below); always the last line |
//!
//! The counters in `TRIP`/`VCPU`/`SUMMARY` lines are RDTSC deltas around the
//! call; under `-icount shift=0` they are guest instruction counts.
//!
//! # What is protocol and what is noise
//!
//! The *protocol stream* starts at the first `@@` of the transcript. Bytes
//! before it are noise (a boot loader's messages, terminal escape codes) and
//! are only kept in [`Report::trace`]. From there on the transcript is read
//! as lines ending in `\n` (a `\r` right before a `\n` is dropped: terminal
//! programs insert them; the kernel never sends one):
//!
//! * In a line holding `@@`, the bytes from its first `@@` through the `\n`
//!   are the kernel's protocol line. Bytes before that `@@` are *foreign*:
//!   the kernel only prints at the start of a line, so anything there was
//!   written by someone else while the kernel waited for the call to return
//!   (a switcher's trace characters, text from the far side).
//! * A line without `@@` is foreign as a whole, its `\n` included.
//!
//! Foreign bytes go to [`Report::trace`] and, when they follow the first
//! protocol line, also to [`Report::foreign`]; the judge accepts them only
//! from a build with trace characters, and only trace characters.
//!
//! # The checksum
//!
//! The kernel keeps a running CRC-32 (IEEE 802.3: reflected polynomial
//! `0xEDB88320`, initial value and final XOR `0xFFFFFFFF`; [`crc32`]) of
//! every byte its print routine sends to COM1, from its first byte on.
//! Before it stops (pass, failure, exception, refusal) it prints
//! `@@CRC crc32=<8 hex digits>\n` with the checksum of everything it sent
//! *before* that line. The decoder recomputes it over the protocol lines
//! before the `CRC` line, each `@@` through `\n` ([`Report::crc_computed`]),
//! so foreign bytes do not count and a single changed, lost, duplicated or
//! reordered byte of the kernel's output does. Nothing may follow the `CRC`
//! line ([`Report::problems`]).

use zerocopy::FromBytes;

/// Marks the start of every protocol line.
pub const PREFIX: &str = "@@";

/// Where the kernel was when an exception hit (the `phase` field of `EXC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Boot and environment setup.
    Setup,
    /// Inside the pre-call hook.
    PreHook,
    /// Taking a snapshot.
    Snapshot,
    /// Inside the called entry (the switcher).
    Call,
    /// Comparing snapshots / checking the return value.
    Check,
    /// Inside the post-call hook.
    PostHook,
    /// Printing the summary and dumps.
    Summary,
    /// A code the decoder does not know.
    Unknown(u32),
}

impl Phase {
    /// The number the kernel stores for this phase.
    pub fn code(self) -> u32 {
        match self {
            Phase::Setup => 1,
            Phase::PreHook => 2,
            Phase::Snapshot => 3,
            Phase::Call => 4,
            Phase::Check => 5,
            Phase::PostHook => 6,
            Phase::Summary => 7,
            Phase::Unknown(n) => n,
        }
    }

    /// Inverse of [`Phase::code`].
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Phase::Setup,
            2 => Phase::PreHook,
            3 => Phase::Snapshot,
            4 => Phase::Call,
            5 => Phase::Check,
            6 => Phase::PostHook,
            7 => Phase::Summary,
            n => Phase::Unknown(n),
        }
    }
}

/// The `BOOT` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootLine {
    /// Host paging mode name.
    pub mode: String,
    /// EAX at multiboot entry (0x2BADB002 from a multiboot loader).
    pub mb_eax: u32,
    /// Trips the kernel will run.
    pub trips: u32,
    /// VCPUs per trip.
    pub vcpus: u32,
    /// Number of snapshot items.
    pub items: u32,
    /// Address of the called entry (low 32 bits on an AMD64 host).
    pub entry: u32,
    /// Address of the called entry, all 64 bits.
    pub entry64: u64,
    /// The fields after `entry`, in order: what the image was built for
    /// (the scenario's switcher, options, placement; see
    /// `scenario::Scenario::boot_fields`).
    pub scenario: Vec<(String, String)>,
}

impl BootLine {
    /// The value of the scenario field `key`.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.scenario
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A `NOCPU` line (the CPU lacks a feature the build needs) or a
/// `CPUEXTRA` line (the CPU has a feature the image was relocated for a CPU
/// without): the kernel refused to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuRefusal {
    /// The feature (`pae`, `long-mode`, `fxsr`, `apic`, `nx`, `sep`, …).
    pub feature: String,
    /// Where CPUID reports it, `leaf.register.bit` (e.g. `00000001.edx.6`).
    pub cpuid: String,
    /// `true` for `CPUEXTRA`: the CPU has the feature the image's CPU
    /// facts say is absent; `false` for `NOCPU`: the CPU lacks it.
    pub present: bool,
}

/// The `HOST` line: the host state the kernel established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLine {
    /// CR0.
    pub cr0: u32,
    /// CR3.
    pub cr3: u32,
    /// CR4.
    pub cr4: u32,
    /// EFER (0 if the CPU has none).
    pub efer: u64,
    /// IA32_SYSENTER_CS (0 if the CPU has no SYSENTER).
    pub sysenter_cs: u32,
    /// Value read through the magic page mapping.
    pub magic: u32,
    /// Value read at FS:0.
    pub fs0: u32,
    /// Feature bits the kernel detected (see `hostkernel::FEATURE_*`).
    pub features: u32,
}

/// The `HOST64` line: the 64-bit host state an AMD64 host kernel established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host64Line {
    /// IA32_FS_BASE.
    pub fs_base: u64,
    /// IA32_GS_BASE.
    pub gs_base: u64,
    /// IA32_KERNEL_GS_BASE.
    pub kernel_gs_base: u64,
    /// IA32_STAR.
    pub star: u64,
    /// IA32_LSTAR.
    pub lstar: u64,
    /// IA32_FMASK.
    pub sfmask: u64,
    /// CR8 (task priority).
    pub cr8: u64,
}

/// The `APIC` line: local APIC state after setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApicLine {
    /// IA32_APIC_BASE MSR (low half).
    pub base: u32,
    /// Version register.
    pub ver: u32,
    /// LVT LINT0.
    pub lint0: u32,
    /// LVT LINT1.
    pub lint1: u32,
    /// LVT performance counter.
    pub perf: u32,
    /// LVT thermal sensor.
    pub therm: u32,
    /// Spurious-interrupt vector register.
    pub svr: u32,
}

impl ApicLine {
    /// Max LVT entry index from the version register.
    pub fn max_lvt(&self) -> u32 {
        (self.ver >> 16) & 0xff
    }
}

/// One `TRIP` line (printed for the first trips only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TripLine {
    /// Trip index.
    pub trip: u32,
    /// VCPU index within the trip.
    pub vcpu: u32,
    /// Value the entry returned.
    pub ret: u32,
    /// RDTSC delta around the call.
    pub tsc: u32,
}

/// One `MISMATCH` line: a snapshot item differed after the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Trip index.
    pub trip: u32,
    /// VCPU index.
    pub vcpu: u32,
    /// Snapshot item index.
    pub idx: u32,
    /// Snapshot item name.
    pub name: String,
    /// Value before the call (low 32 bits of a 64-bit item).
    pub before: u32,
    /// Value after the call (low 32 bits of a 64-bit item).
    pub after: u32,
    /// Value before the call, all 64 bits (AMD64 host items).
    pub before64: u64,
    /// Value after the call, all 64 bits.
    pub after64: u64,
}

/// One `RETFAIL` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetFailure {
    /// Trip index.
    pub trip: u32,
    /// VCPU index.
    pub vcpu: u32,
    /// Value returned.
    pub got: u32,
    /// Value expected.
    pub want: u32,
}

/// One `HOOKFAIL` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookFailure {
    /// Trip index.
    pub trip: u32,
    /// VCPU index.
    pub vcpu: u32,
    /// Code the hook stored in its failure slot.
    pub code: u32,
}

/// One `VCPU` summary line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuSummary {
    /// VCPU index.
    pub vcpu: u32,
    /// The `arg2` passed for it.
    pub arg2: u32,
    /// Calls made.
    pub calls: u32,
    /// Calls with at least one mismatch.
    pub mismatches: u32,
    /// Calls with a wrong return value.
    pub retfails: u32,
    /// Calls whose hooks reported failure.
    pub hookfails: u32,
    /// Smallest RDTSC delta.
    pub tsc_min: u32,
    /// Largest RDTSC delta.
    pub tsc_max: u32,
    /// Sum of RDTSC deltas.
    pub tsc_sum: u64,
    /// Delta of trip 0.
    pub tsc_first: u32,
    /// Delta of trip 1.
    pub tsc_second: u32,
}

/// The `SUMMARY` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Trips completed (fewer than configured if the run stopped early).
    pub trips: u32,
    /// Calls made.
    pub calls: u32,
    /// Calls with at least one mismatch.
    pub mismatches: u32,
    /// Calls with a wrong return value.
    pub retfails: u32,
    /// Calls whose hooks reported failure.
    pub hookfails: u32,
    /// NMIs taken.
    pub nmis: u32,
    /// Spurious APIC interrupts taken.
    pub spurious: u32,
    /// Smallest RDTSC delta.
    pub tsc_min: u32,
    /// Largest RDTSC delta.
    pub tsc_max: u32,
    /// Sum of RDTSC deltas.
    pub tsc_sum: u64,
}

/// An `EXC` line: an exception in the host kernel (or the code it called).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExceptionInfo {
    /// Vector.
    pub vector: u8,
    /// Error code (0 for vectors without one).
    pub error_code: u32,
    /// Faulting EIP (low 32 bits of the RIP on an AMD64 host).
    pub eip: u32,
    /// Faulting RIP, all 64 bits (equals `eip` on a 32-bit host).
    pub rip: u64,
    /// CS at the fault.
    pub cs: u32,
    /// EFLAGS at the fault.
    pub eflags: u32,
    /// CR2 (low 32 bits on an AMD64 host).
    pub cr2: u32,
    /// CR2, all 64 bits.
    pub cr2_64: u64,
    /// RSP at the fault (AMD64 host only: the 64-bit frame always has it).
    pub rsp: Option<u64>,
    /// Trip index.
    pub trip: u32,
    /// VCPU index.
    pub vcpu: u32,
    /// Kernel phase.
    pub phase: Phase,
}

/// An `EXC2` line (exception while handling an exception).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NestedException {
    /// Vector.
    pub vector: u8,
    /// Error code.
    pub error_code: u32,
    /// Faulting EIP (low 32 bits on an AMD64 host).
    pub eip: u32,
    /// Faulting RIP, all 64 bits.
    pub rip: u64,
}

/// A `FAREXC` line from the far side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FarExceptionInfo {
    /// Vector.
    pub vector: u8,
    /// Error code.
    pub error_code: u64,
    /// Faulting RIP.
    pub rip: u64,
}

/// One `CPU` line: a host CPU's own figures (several host CPUs only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuLine {
    /// CPU index (0: the bootstrap CPU).
    pub cpu: u32,
    /// Trips this CPU completed.
    pub trips: u32,
    /// Calls it made.
    pub calls: u32,
    /// Calls during which another CPU was inside its own call.
    pub overlapping: u32,
    /// Calls with at least one mismatch.
    pub mismatches: u32,
    /// Calls with a wrong return value.
    pub retfails: u32,
    /// Calls whose hooks reported failure.
    pub hookfails: u32,
    /// Smallest RDTSC delta.
    pub tsc_min: u32,
    /// Largest RDTSC delta.
    pub tsc_max: u32,
    /// Sum of RDTSC deltas.
    pub tsc_sum: u64,
}

/// The `SMP` line: how many host CPUs ran and how often their calls
/// overlapped (several host CPUs only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmpLine {
    /// Host CPUs.
    pub cpus: u32,
    /// The PIT divisor that made the timer deadlines.
    pub divisor: u32,
    /// Calls during which another CPU was inside its own call, all CPUs.
    pub overlapping: u32,
    /// Calls, all CPUs.
    pub calls: u32,
}

/// The `PIT` line of an NMI storm: when the first edges arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PitLine {
    /// The PIT divisor programmed.
    pub divisor: u32,
    /// The handler's TSC at each of the first six NMIs, less the TSC at the
    /// count's load.
    pub edges: [u32; 6],
}

/// One `STORM` line: a call of the NMI storm (see `hostkernel::storm`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StormLine {
    /// The target: the edge was placed this many instructions into the entry.
    pub o: u32,
    /// The call's path length in instructions (entry to return, far side included).
    pub len: u32,
    /// NMIs the host took during the call.
    pub nmis: u32,
    /// The first one's TSC less the call's (0 without one).
    pub dt: u32,
    /// The instruction pointer it interrupted (0 without one).
    pub ip: u64,
    /// Its context word (`hostkernel::storm::ctx`).
    pub ctx: u32,
    /// NMIs the far side has taken so far (its mailbox counter).
    pub far: u32,
    /// The instruction pointer (low half) the far side's first NMI interrupted.
    pub far_ip: u32,
}

/// One `STORMCPU` line: a host CPU's account of an NMI storm on several
/// CPUs (see `hostkernel::storm`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StormCpuLine {
    /// The host CPU.
    pub cpu: u32,
    /// Its calls.
    pub calls: u32,
    /// Calls during which a PIT edge arrived (by the PIT formula on the TSC).
    pub edges: u32,
    /// Of those, calls that took no NMI: the edge fell while LINT0 was
    /// masked and another CPU acknowledged it at the 8259 before the unmask.
    pub hidden: u32,
    /// NMIs the CPU took in all.
    pub nmis: u32,
    /// NMIs it took during its calls.
    pub in_call: u32,
    /// Of those, taken in host context.
    pub host: u32,
    /// Of those, taken outside host context (in transit).
    pub transit: u32,
    /// The instruction pointer of the first NMI in transit (0 without one).
    pub ip: u64,
    /// Its context word (`hostkernel::storm::ctx`).
    pub ctx: u32,
}

/// A memory region dumped as hex (`DUMP` … `END`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dump {
    /// Region name.
    pub name: String,
    /// Host-virtual address (low 32 bits of a 64-bit one).
    pub addr: u32,
    /// Host-virtual address, all 64 bits.
    pub addr64: u64,
    /// Length the header announced.
    pub len: u32,
    /// Bytes decoded from the hex lines.
    pub bytes: Vec<u8>,
    /// `END` was seen and the byte count matches `len`.
    pub complete: bool,
}

impl Dump {
    /// Decodes a `T` at byte `offset` of the dump.
    pub fn read<T: FromBytes>(&self, offset: usize) -> Option<T> {
        let tail = self.bytes.get(offset..)?;
        T::read_from_prefix(tail).ok().map(|(v, _)| v)
    }

    /// The little-endian dword at `offset`.
    pub fn u32_at(&self, offset: usize) -> Option<u32> {
        self.read::<u32>(offset)
    }
}

/// Everything decoded from one serial transcript.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `BOOT`.
    pub boot: Option<BootLine>,
    /// `HOST`.
    pub host: Option<HostLine>,
    /// `HOST64` (AMD64 host only).
    pub host64: Option<Host64Line>,
    /// `APIC`.
    pub apic: Option<ApicLine>,
    /// `TRIP` lines.
    pub trips: Vec<TripLine>,
    /// `MISMATCH` lines.
    pub mismatches: Vec<Mismatch>,
    /// `RETFAIL` lines.
    pub ret_failures: Vec<RetFailure>,
    /// `HOOKFAIL` lines.
    pub hook_failures: Vec<HookFailure>,
    /// `VCPU` lines.
    pub vcpus: Vec<VcpuSummary>,
    /// `SUMMARY`.
    pub summary: Option<Summary>,
    /// `NMI count=`.
    pub nmi_count: Option<u32>,
    /// `PIT` (NMI storm only).
    pub pit: Option<PitLine>,
    /// `STORM` lines, in order (NMI storm only).
    pub storm: Vec<StormLine>,
    /// `STORMCPU` lines, in the order printed (NMI storm on several CPUs).
    pub storm_cpus: Vec<StormCpuLine>,
    /// `CPU` lines, in the order the CPUs finished (several host CPUs).
    pub cpu_lines: Vec<CpuLine>,
    /// `SMP` (several host CPUs).
    pub smp: Option<SmpLine>,
    /// `EXC`.
    pub exception: Option<ExceptionInfo>,
    /// `EXC2`.
    pub nested_exception: Option<NestedException>,
    /// `FAREXC`.
    pub far_exception: Option<FarExceptionInfo>,
    /// `DUMP` blocks, in order.
    pub dumps: Vec<Dump>,
    /// `LOG` texts.
    pub logs: Vec<String>,
    /// `ERROR` texts.
    pub errors: Vec<String>,
    /// `RESULT`: `Some(true)` for PASS.
    pub result: Option<bool>,
    /// Bytes that were not protocol lines, in order (trace characters, far-side text).
    pub trace: String,
    /// Protocol lines (without the prefix) the decoder could not parse.
    pub malformed: Vec<String>,
    /// Every protocol line, without the prefix, in order.
    pub lines: Vec<String>,
    /// `NOCPU`: the CPU lacks a feature the build needs.
    pub cpu_refusal: Option<CpuRefusal>,
    /// The checksum the `CRC` line printed.
    pub crc: Option<u32>,
    /// The checksum recomputed over the protocol lines before the `CRC`
    /// line (see [the module docs](self#the-checksum)); `None` without a
    /// `CRC` line.
    pub crc_computed: Option<u32>,
    /// Foreign bytes after the first protocol line (see [the module
    /// docs](self#what-is-protocol-and-what-is-noise)).
    pub foreign: String,
    /// Structural problems: a line that may appear once appearing again, a
    /// dump cut short, bytes after the `CRC` line, a last line without `\n`.
    pub problems: Vec<String>,
}

/// One CRC-32 step (reflected polynomial `0xEDB88320`) of the running value
/// `crc` (not inverted) over `byte`: `(crc >> 8) ^ CRC32_TABLE[(crc ^ byte) & 0xff]`.
pub const fn crc32_step(crc: u32, byte: u8) -> u32 {
    (crc >> 8) ^ CRC32_TABLE[((crc ^ byte as u32) & 0xff) as usize]
}

/// The CRC-32 lookup table the kernel's print routine uses.
pub const CRC32_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// The CRC-32 (IEEE 802.3) of `bytes`: initial value and final XOR `0xFFFFFFFF`.
pub fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |c, &b| crc32_step(c, b))
}

/// Parses a line whose keys are exactly a struct's field names, in order,
/// each read with the named [`Fields`] reader (`dec`, `hex`, `hex64`,
/// `str`): the field list is written once, as the struct's.
macro_rules! exact_line {
    ($f:expr, $ty:ident { $($field:ident: $kind:ident),+ $(,)? }) => {
        $f.exact(&[$(stringify!($field)),+])
            .then(|| Some($ty { $($field: $f.$kind(stringify!($field))?),+ }))
            .flatten()
    };
}

/// The `key=value` fields of one line, in order. `ok` is false when the
/// text is not exactly `key=value` tokens separated by single spaces.
struct Fields<'a> {
    list: Vec<(&'a str, &'a str)>,
    ok: bool,
}

fn is_hex(v: &str) -> bool {
    (1..=16).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_dec(v: &str) -> bool {
    (1..=10).contains(&v.len())
        && v.bytes().all(|b| b.is_ascii_digit())
        && (v == "0" || !v.starts_with('0'))
}

impl<'a> Fields<'a> {
    fn new(rest: &'a str) -> Self {
        let mut ok = true;
        let list = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split(' ')
                .filter_map(|kv| {
                    let pair = kv
                        .split_once('=')
                        .filter(|(k, v)| !k.is_empty() && !v.is_empty() && !v.contains('='));
                    ok &= pair.is_some();
                    pair
                })
                .collect()
        };
        Self { list, ok }
    }
    /// The keys are exactly `keys`, in this order.
    fn exact(&self, keys: &[&str]) -> bool {
        self.ok
            && self.list.len() == keys.len()
            && self.list.iter().zip(keys).all(|((k, _), want)| k == want)
    }
    /// The keys start with `keys`, in this order.
    fn starts(&self, keys: &[&str]) -> bool {
        self.ok
            && self.list.len() >= keys.len()
            && self.list.iter().zip(keys).all(|((k, _), want)| k == want)
    }
    fn get(&self, k: &str) -> Option<&'a str> {
        self.list.iter().find(|(key, _)| *key == k).map(|(_, v)| *v)
    }
    fn hex(&self, k: &str) -> Option<u32> {
        let v = self.get(k).filter(|v| is_hex(v))?;
        u32::from_str_radix(v, 16).ok()
    }
    fn hex64(&self, k: &str) -> Option<u64> {
        let v = self.get(k).filter(|v| is_hex(v))?;
        u64::from_str_radix(v, 16).ok()
    }
    fn dec(&self, k: &str) -> Option<u32> {
        self.get(k).filter(|v| is_dec(v))?.parse().ok()
    }
    fn str(&self, k: &str) -> Option<String> {
        self.get(k).map(str::to_owned)
    }
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Sets a line that may appear once; a second one is a problem.
fn once<T>(slot: &mut Option<T>, value: Option<T>, kw: &str, problems: &mut Vec<String>) -> bool {
    let Some(v) = value else {
        return false;
    };
    if slot.is_some() {
        problems.push(format!("a second {kw} line"));
    }
    *slot = Some(v);
    true
}

/// The position of the first `@@` in `bytes`.
fn find_prefix(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(PREFIX.len())
        .position(|w| w == PREFIX.as_bytes())
}

impl Report {
    /// Decodes a transcript. Never fails: what it cannot read lands in
    /// [`Report::malformed`], [`Report::problems`] or [`Report::trace`].
    pub fn parse(serial: &[u8]) -> Self {
        let mut r = Report::default();
        let Some(start) = find_prefix(serial) else {
            r.trace = String::from_utf8_lossy(serial).into_owned();
            return r;
        };
        r.trace = String::from_utf8_lossy(&serial[..start]).into_owned();
        let mut open_dump: Option<Dump> = None;
        let mut crc = !0u32;
        let mut after_crc = false;
        let mut pieces = serial[start..].split(|&b| b == b'\n').peekable();
        while let Some(raw) = pieces.next() {
            let terminated = pieces.peek().is_some();
            let line = match raw.strip_suffix(b"\r") {
                Some(l) if terminated => l,
                _ => raw,
            };
            if after_crc {
                if !line.is_empty() || terminated {
                    r.problems.push("bytes after the CRC line".into());
                    after_crc = false;
                }
                continue;
            }
            if !terminated && !line.is_empty() {
                r.problems
                    .push("the transcript ends inside a line (no final newline)".into());
            }
            let Some(at) = find_prefix(line) else {
                let text = String::from_utf8_lossy(line);
                r.trace.push_str(&text);
                r.foreign.push_str(&text);
                if terminated {
                    r.trace.push('\n');
                    r.foreign.push('\n');
                }
                continue;
            };
            let foreign = String::from_utf8_lossy(&line[..at]);
            r.trace.push_str(&foreign);
            r.foreign.push_str(&foreign);
            let body_bytes = &line[at + PREFIX.len()..];
            let body = String::from_utf8_lossy(body_bytes).into_owned();
            r.lines.push(body.clone());
            let (kw, rest) = body.split_once(' ').unwrap_or((&body, ""));
            if kw == "CRC" {
                let f = Fields::new(rest);
                let value = f.hex("crc32").filter(|_| f.exact(&["crc32"]));
                if value.is_none() {
                    r.malformed.push(body.clone());
                }
                r.crc = value;
                r.crc_computed = Some(!crc);
                if let Some(d) = open_dump.take() {
                    r.dumps.push(d);
                }
                after_crc = true;
                continue;
            }
            crc = line[at..]
                .iter()
                .chain(terminated.then_some(&b'\n'))
                .fold(crc, |c, &b| crc32_step(c, b));
            if let Some(dump) = open_dump.as_mut() {
                match kw {
                    "H" => {
                        match hex_bytes(rest) {
                            Some(b) => dump.bytes.extend(b),
                            None => r.malformed.push(body.clone()),
                        }
                        continue;
                    }
                    "END" => {
                        if let Some(mut d) = open_dump.take() {
                            d.complete = rest.is_empty() && d.bytes.len() == d.len as usize;
                            if !d.complete {
                                r.problems.push(format!(
                                    "dump `{}` holds {} bytes, its DUMP line announced {}",
                                    d.name,
                                    d.bytes.len(),
                                    d.len
                                ));
                            }
                            r.dumps.push(d);
                        }
                        continue;
                    }
                    _ => {
                        // A dump cut short by another line (e.g. an exception).
                        if let Some(d) = open_dump.take() {
                            r.problems
                                .push(format!("dump `{}` has no END line", d.name));
                            r.dumps.push(d);
                        }
                    }
                }
            }
            if !r.line(kw, rest, &mut open_dump) {
                r.malformed.push(body.clone());
            }
        }
        if let Some(d) = open_dump.take() {
            r.problems
                .push(format!("dump `{}` has no END line", d.name));
            r.dumps.push(d);
        }
        r
    }

    fn line(&mut self, kw: &str, rest: &str, open_dump: &mut Option<Dump>) -> bool {
        let f = Fields::new(rest);
        let p = &mut self.problems;
        match kw {
            "BOOT" => {
                let fixed = ["mode", "mbeax", "trips", "vcpus", "items", "entry"];
                let boot = f.starts(&fixed).then(|| {
                    Some(BootLine {
                        mode: f.str("mode")?,
                        mb_eax: f.hex("mbeax")?,
                        trips: f.dec("trips")?,
                        vcpus: f.dec("vcpus")?,
                        items: f.dec("items")?,
                        entry: f.hex64("entry")? as u32,
                        entry64: f.hex64("entry")?,
                        scenario: f.list[fixed.len()..]
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                    })
                });
                once(&mut self.boot, boot.flatten(), kw, p)
            }
            "NOCPU" | "CPUEXTRA" => {
                let c = f.exact(&["feature", "cpuid"]).then(|| {
                    Some(CpuRefusal {
                        feature: f.str("feature")?,
                        cpuid: f.str("cpuid")?,
                        present: kw == "CPUEXTRA",
                    })
                });
                once(&mut self.cpu_refusal, c.flatten(), kw, p)
            }
            "HOST" => {
                let h = exact_line!(
                    f,
                    HostLine {
                        cr0: hex,
                        cr3: hex,
                        cr4: hex,
                        efer: hex64,
                        sysenter_cs: hex,
                        magic: hex,
                        fs0: hex,
                        features: hex
                    }
                );
                once(&mut self.host, h, kw, p)
            }
            "HOST64" => {
                let h = exact_line!(
                    f,
                    Host64Line {
                        fs_base: hex64,
                        gs_base: hex64,
                        kernel_gs_base: hex64,
                        star: hex64,
                        lstar: hex64,
                        sfmask: hex64,
                        cr8: hex64
                    }
                );
                once(&mut self.host64, h, kw, p)
            }
            "APIC" => {
                let a = exact_line!(
                    f,
                    ApicLine {
                        base: hex,
                        ver: hex,
                        lint0: hex,
                        lint1: hex,
                        perf: hex,
                        therm: hex,
                        svr: hex
                    }
                );
                once(&mut self.apic, a, kw, p)
            }
            "TRIP" => push(
                &mut self.trips,
                exact_line!(
                    f,
                    TripLine {
                        trip: dec,
                        vcpu: dec,
                        ret: hex,
                        tsc: dec
                    }
                ),
            ),
            "MISMATCH" => push(
                &mut self.mismatches,
                f.exact(&["trip", "vcpu", "idx", "name", "before", "after"])
                    .then(|| {
                        Some(Mismatch {
                            trip: f.dec("trip")?,
                            vcpu: f.dec("vcpu")?,
                            idx: f.dec("idx")?,
                            name: f.str("name")?,
                            before: f.hex64("before")? as u32,
                            after: f.hex64("after")? as u32,
                            before64: f.hex64("before")?,
                            after64: f.hex64("after")?,
                        })
                    })
                    .flatten(),
            ),
            "RETFAIL" => push(
                &mut self.ret_failures,
                exact_line!(
                    f,
                    RetFailure {
                        trip: dec,
                        vcpu: dec,
                        got: hex,
                        want: hex
                    }
                ),
            ),
            "HOOKFAIL" => push(
                &mut self.hook_failures,
                exact_line!(
                    f,
                    HookFailure {
                        trip: dec,
                        vcpu: dec,
                        code: hex
                    }
                ),
            ),
            "VCPU" => push(
                &mut self.vcpus,
                exact_line!(
                    f,
                    VcpuSummary {
                        vcpu: dec,
                        arg2: hex,
                        calls: dec,
                        mismatches: dec,
                        retfails: dec,
                        hookfails: dec,
                        tsc_min: dec,
                        tsc_max: dec,
                        tsc_sum: hex64,
                        tsc_first: dec,
                        tsc_second: dec
                    }
                ),
            ),
            "SUMMARY" => {
                let sm = exact_line!(
                    f,
                    Summary {
                        trips: dec,
                        calls: dec,
                        mismatches: dec,
                        retfails: dec,
                        hookfails: dec,
                        nmis: dec,
                        spurious: dec,
                        tsc_min: dec,
                        tsc_max: dec,
                        tsc_sum: hex64
                    }
                );
                once(&mut self.summary, sm, kw, p)
            }
            "CPU" => push(
                &mut self.cpu_lines,
                exact_line!(
                    f,
                    CpuLine {
                        cpu: dec,
                        trips: dec,
                        calls: dec,
                        overlapping: dec,
                        mismatches: dec,
                        retfails: dec,
                        hookfails: dec,
                        tsc_min: dec,
                        tsc_max: dec,
                        tsc_sum: hex64
                    }
                ),
            ),
            "SMP" => {
                let line = exact_line!(
                    f,
                    SmpLine {
                        cpus: dec,
                        divisor: dec,
                        overlapping: dec,
                        calls: dec
                    }
                );
                once(&mut self.smp, line, kw, p)
            }
            "NMI" => {
                let n = f.exact(&["count"]).then(|| f.dec("count")).flatten();
                once(&mut self.nmi_count, n, kw, p)
            }
            "PIT" => {
                let keys = ["divisor", "e1", "e2", "e3", "e4", "e5", "e6"];
                let pit = f.exact(&keys).then(|| {
                    let mut edges = [0u32; 6];
                    for (e, k) in edges.iter_mut().zip(&keys[1..]) {
                        *e = f.dec(k)?;
                    }
                    Some(PitLine {
                        divisor: f.dec("divisor")?,
                        edges,
                    })
                });
                once(&mut self.pit, pit.flatten(), kw, p)
            }
            "STORM" => push(
                &mut self.storm,
                exact_line!(
                    f,
                    StormLine {
                        o: dec,
                        len: dec,
                        nmis: dec,
                        dt: dec,
                        ip: hex64,
                        ctx: hex,
                        far: dec,
                        far_ip: hex
                    }
                ),
            ),
            "STORMCPU" => push(
                &mut self.storm_cpus,
                exact_line!(
                    f,
                    StormCpuLine {
                        cpu: dec,
                        calls: dec,
                        edges: dec,
                        hidden: dec,
                        nmis: dec,
                        in_call: dec,
                        host: dec,
                        transit: dec,
                        ip: hex64,
                        ctx: hex
                    }
                ),
            ),
            "DUMP" => {
                let d = f
                    .exact(&["addr", "len", "name"])
                    .then(|| {
                        Some(Dump {
                            name: f.str("name")?,
                            addr: f.hex64("addr")? as u32,
                            addr64: f.hex64("addr")?,
                            len: f.hex("len")?,
                            bytes: Vec::new(),
                            complete: false,
                        })
                    })
                    .flatten();
                if let Some(d) = &d {
                    if self.dumps.iter().any(|o| o.name == d.name) {
                        p.push(format!("a second dump named `{}`", d.name));
                    }
                }
                let ok = d.is_some();
                *open_dump = d;
                ok
            }
            "EXC" => {
                let base = ["vec", "err", "eip", "cs", "eflags", "cr2"];
                let tail = ["trip", "vcpu", "phase"];
                let with_rsp: Vec<&str> =
                    base.iter().chain(&["rsp"]).chain(&tail).copied().collect();
                let without: Vec<&str> = base.iter().chain(&tail).copied().collect();
                let e = (f.exact(&with_rsp) || f.exact(&without)).then(|| {
                    Some(ExceptionInfo {
                        vector: u8::try_from(f.hex("vec")?).ok()?,
                        error_code: f.hex("err")?,
                        eip: f.hex64("eip")? as u32,
                        rip: f.hex64("eip")?,
                        cs: f.hex("cs")?,
                        eflags: f.hex("eflags")?,
                        cr2: f.hex64("cr2")? as u32,
                        cr2_64: f.hex64("cr2")?,
                        rsp: match f.get("rsp") {
                            Some(_) => Some(f.hex64("rsp")?),
                            None => None,
                        },
                        trip: f.dec("trip")?,
                        vcpu: f.dec("vcpu")?,
                        phase: Phase::from_code(f.dec("phase")?),
                    })
                });
                once(&mut self.exception, e.flatten(), kw, p)
            }
            "EXC2" => {
                let e = f.exact(&["vec", "err", "eip"]).then(|| {
                    Some(NestedException {
                        vector: u8::try_from(f.hex("vec")?).ok()?,
                        error_code: f.hex("err")?,
                        eip: f.hex64("eip")? as u32,
                        rip: f.hex64("eip")?,
                    })
                });
                once(&mut self.nested_exception, e.flatten(), kw, p)
            }
            "FAREXC" => {
                let e = f.exact(&["vec", "err", "rip"]).then(|| {
                    Some(FarExceptionInfo {
                        vector: u8::try_from(f.hex("vec")?).ok()?,
                        error_code: f.hex64("err")?,
                        rip: f.hex64("rip")?,
                    })
                });
                once(&mut self.far_exception, e.flatten(), kw, p)
            }
            "LOG" => {
                self.logs.push(rest.to_owned());
                true
            }
            "ERROR" => {
                self.errors.push(rest.to_owned());
                true
            }
            "RESULT" => {
                let v = match rest {
                    "PASS" => Some(true),
                    "FAIL" => Some(false),
                    _ => None,
                };
                once(&mut self.result, v, kw, p)
            }
            _ => false,
        }
    }

    /// The checksum is present and matches the protocol lines.
    pub fn crc_ok(&self) -> bool {
        self.crc.is_some() && self.crc == self.crc_computed
    }

    /// The dump named `name`, if one was printed.
    pub fn dump(&self, name: &str) -> Option<&Dump> {
        self.dumps.iter().find(|d| d.name == name)
    }

    /// The last non-whitespace trace character: with a switcher built with
    /// debug tracing, the last step it reached.
    pub fn last_trace_char(&self) -> Option<char> {
        self.trace.chars().rev().find(|c| !c.is_whitespace())
    }

    /// Names of the mismatching items, deduplicated, in first-seen order.
    pub fn mismatch_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for m in &self.mismatches {
            if !names.contains(&m.name.as_str()) {
                names.push(&m.name);
            }
        }
        names
    }
}

fn push<T>(v: &mut Vec<T>, item: Option<T>) -> bool {
    match item {
        Some(x) => {
            v.push(x);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
@@BOOT mode=pae mbeax=2badb002 trips=2 vcpus=1 items=3 entry=c0000000
@@HOST cr0=80010033 cr3=00103000 cr4=000006a0 efer=0000000000000801 sysenter_cs=00000008 magic=c0ffee42 fs0=f5f5abcd features=0000000f
@@APIC base=fee00900 ver=00050014 lint0=00000400 lint1=00000400 perf=00000400 therm=00010400 svr=000001ff
ab@@TRIP trip=0 vcpu=0 ret=12345678 tsc=269
cdXY
@@MISMATCH trip=1 vcpu=0 idx=3 name=ebp before=bebebebe after=00000000
@@RETFAIL trip=1 vcpu=0 got=00000001 want=00000002
@@DUMP addr=c0001000 len=00000006 name=vm
@@H 010203040506
@@END
@@VCPU vcpu=0 arg2=00000040 calls=2 mismatches=1 retfails=1 hookfails=0 tsc_min=269 tsc_max=300 tsc_sum=0000000000000239 tsc_first=269 tsc_second=300
@@SUMMARY trips=2 calls=2 mismatches=1 retfails=1 hookfails=0 nmis=0 spurious=0 tsc_min=269 tsc_max=300 tsc_sum=0000000000000239
@@NMI count=0
@@BOGUS x
@@RESULT FAIL
Q";

    #[test]
    fn sample_transcript_decodes() {
        let r = Report::parse(SAMPLE.as_bytes());
        let boot = r.boot.as_ref().unwrap();
        assert_eq!(boot.mode, "pae");
        assert_eq!(boot.mb_eax, 0x2bad_b002);
        assert_eq!(r.host.as_ref().unwrap().efer, 0x801);
        assert_eq!(r.apic.as_ref().unwrap().max_lvt(), 5);
        assert_eq!(r.trips[0].tsc, 269);
        assert_eq!(r.mismatches[0].name, "ebp");
        assert_eq!(r.mismatch_names(), vec!["ebp"]);
        assert_eq!(r.ret_failures[0].want, 2);
        let d = r.dump("vm").unwrap();
        assert!(d.complete);
        assert_eq!(d.bytes, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(d.u32_at(0), Some(0x0403_0201));
        assert_eq!(d.u32_at(4), None);
        assert_eq!(r.vcpus[0].tsc_sum, 0x239);
        assert_eq!(r.summary.as_ref().unwrap().calls, 2);
        assert_eq!(r.nmi_count, Some(0));
        assert_eq!(r.result, Some(false));
        assert_eq!(r.malformed, vec!["BOGUS x".to_owned()]);
        assert_eq!(r.trace, "abcdXY\nQ");
        assert_eq!(r.last_trace_char(), Some('Q'));
    }

    #[test]
    fn exception_cuts_a_dump_short() {
        let t = "@@DUMP addr=00001000 len=00000040 name=x\n@@H 00ff\n\
                 ABC@@EXC vec=0e err=00000002 eip=00101234 cs=00000008 eflags=00010002 cr2=40000000 trip=3 vcpu=1 phase=4\n";
        let r = Report::parse(t.as_bytes());
        assert_eq!(r.dumps.len(), 1);
        assert!(!r.dumps[0].complete);
        let e = r.exception.clone().unwrap();
        assert_eq!((e.vector, e.error_code, e.eip), (14, 2, 0x0010_1234));
        assert_eq!(e.phase, Phase::Call);
        assert_eq!(r.last_trace_char(), Some('C'));
    }

    #[test]
    fn amd64_lines_decode_with_64_bit_fields() {
        let t = "@@BOOT mode=amd64 mbeax=2badb002 trips=2 vcpus=1 items=44 entry=ffffffffc0400000\n\
                 @@HOST64 fs_base=ffff8000f5f50000 gs_base=ffff8000f5f50800 kernel_gs_base=00007fff4b475000 star=0023000853544152 lstar=ffffffff8157a000 sfmask=0000000000047700 cr8=0000000000000000\n\
                 @@MISMATCH trip=0 vcpu=0 idx=0 name=rbx before=b0b0b0b10b0b0b0a after=000000000badbad0\n\
                 @@DUMP addr=ffffffffc0500000 len=00000002 name=vm\n@@H 0102\n@@END\n\
                 @@EXC vec=06 err=00000000 eip=ffffffffc0400012 cs=00000008 eflags=00010246 cr2=0000000000000000 rsp=0000000000110ff8 trip=0 vcpu=0 phase=4\n\
                 @@EXC2 vec=0e err=00000002 eip=ffffffffc0400020\n";
        let r = Report::parse(t.as_bytes());
        assert!(r.malformed.is_empty(), "{:?}", r.malformed);
        let boot = r.boot.clone().unwrap();
        assert_eq!(
            (boot.entry, boot.entry64),
            (0xc040_0000, 0xffff_ffff_c040_0000)
        );
        let h = r.host64.clone().unwrap();
        assert_eq!(h.fs_base, 0xffff_8000_f5f5_0000);
        assert_eq!(h.sfmask, 0x47700);
        let m = &r.mismatches[0];
        assert_eq!(m.before64, 0xb0b0_b0b1_0b0b_0b0a);
        assert_eq!(m.after, 0x0bad_bad0);
        let d = r.dump("vm").unwrap();
        assert_eq!((d.addr64, d.addr), (0xffff_ffff_c050_0000, 0xc050_0000));
        assert!(d.complete);
        let e = r.exception.clone().unwrap();
        assert_eq!(
            (e.vector, e.rip, e.eip),
            (6, 0xffff_ffff_c040_0012, 0xc040_0012)
        );
        assert_eq!(e.rsp, Some(0x0011_0ff8));
        assert_eq!(r.nested_exception.unwrap().rip, 0xffff_ffff_c040_0020);
    }

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    /// A transcript with its CRC line: noise before it, the given lines.
    fn sealed(noise: &str, body: &str) -> String {
        format!("{noise}{body}@@CRC crc32={:08x}\n", crc32(body.as_bytes()))
    }

    #[test]
    fn the_checksum_covers_the_protocol_lines_only() {
        let body = "@@BOOT mode=pae mbeax=2badb002 trips=1 vcpus=1 items=3 entry=c0000000\n@@RESULT PASS\n";
        let r = Report::parse(sealed("\x1b[2JSeaBIOS\r\n", body).as_bytes());
        assert!(r.crc_ok(), "{r:?}");
        assert!(r.problems.is_empty() && r.malformed.is_empty() && r.foreign.is_empty());
        // Foreign bytes at a line start are not the kernel's: excluded, but kept.
        let t = sealed("", body).replace("@@RESULT", "abc@@RESULT");
        let r = Report::parse(t.as_bytes());
        assert!(r.crc_ok());
        assert_eq!(r.foreign, "abc");
        // CR LF from a terminal program is tolerated.
        let r = Report::parse(sealed("", body).replace('\n', "\r\n").as_bytes());
        assert!(r.crc_ok(), "{r:?}");
        // One changed byte, or anything after the CRC line, is not.
        let r = Report::parse(sealed("", body).replace("trips=1", "trips=2").as_bytes());
        assert!(!r.crc_ok());
        let r = Report::parse(format!("{}x\n", sealed("", body)).as_bytes());
        assert_eq!(r.problems, vec!["bytes after the CRC line".to_owned()]);
        // No CRC line: nothing to compare.
        let r = Report::parse(body.as_bytes());
        assert_eq!((r.crc, r.crc_computed), (None, None));
        assert!(!r.crc_ok());
    }

    #[test]
    fn lines_must_have_exactly_their_fields() {
        for bad in [
            "@@NMI count=0 extra=1",
            "@@NMI",
            "@@NMI count=+1",
            "@@NMI count=01",
            "@@NMI  count=1",
            "@@NMI count=1 ",
            "@@TRIP vcpu=0 trip=0 ret=00000000 tsc=1",
            "@@RETFAIL trip=0 vcpu=0 got=-1 want=00000000",
            "@@RESULT PASS ",
            "@@CRC crc32=zz",
            "@@H 0",
        ] {
            let r = Report::parse(format!("{bad}\n").as_bytes());
            assert_eq!(r.malformed.len(), 1, "{bad}: {r:?}");
        }
        let r = Report::parse(
            b"@@NMI count=0\n@@NMI count=0\n@@NOCPU feature=pae cpuid=00000001.edx.6\n",
        );
        assert_eq!(r.problems, vec!["a second NMI line".to_owned()]);
        assert_eq!(r.cpu_refusal.unwrap().feature, "pae");
    }

    #[test]
    fn phases_round_trip() {
        for c in 0..10 {
            assert_eq!(Phase::from_code(c).code(), c);
        }
    }
}
