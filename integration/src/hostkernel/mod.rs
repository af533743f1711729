//! The generated 32-bit host kernel: it plays the embedding hypervisor.
//!
//! [`HostKernelBuilder`] produces a bootable [`Testbed`]: a multiboot image
//! holding a small kernel generated with iced-x86's code assembler, its page
//! tables (built as data by [`crate::paging`]), its GDT/IDT/TSS/LDT, and the
//! caller's blobs (a switcher, a VM structure, …) at the caller's physical
//! addresses, mapped where the caller says.
//!
//! # What the kernel does
//!
//! 1. Loads its own GDT (writable, so a switcher can clear the TSS busy bit),
//!    IDT (vectors 0–31 print `EXC` and exit with 0x12; NMI counts; the APIC
//!    spurious vector counts), `ltr`, `lldt`, and FS from the LDT (a data
//!    segment based at the FS page, whose first dword is [`FS_MAGIC`]).
//! 2. Masks the 8259 PIC, turns on paging in the chosen [`HostMode`]
//!    (CR4 = PGE|OSFXSR|OSXMMEXCPT (+PSE, +PAE); CR0 |= PG|WP|NE|MP|ET|PE),
//!    sets EFER.NXE (if CPUID has NX) and EFER.SCE (if it has SYSCALL or long
//!    mode), SYSENTER_CS = the kernel code selector, COM1 to 115200 8N1.
//! 3. Software-enables the local APIC (SVR = 0x1FF) and programs LINT0, LINT1
//!    and PERF to NMI delivery unmasked and THERM to NMI delivery masked.
//! 4. For each trip and each VCPU (`arg2` value): runs the pre-call hook,
//!    loads EBX/ESI/EDI/EBP with trip-dependent patterns, snapshots the
//!    state ([`items::default_items`]), calls `u32 entry(u32 arg1, u32 arg2)`
//!    (cdecl) with IF=1 between two RDTSCs, snapshots again, compares, checks
//!    the return value ([`Expected`]) and runs the post-call hook.
//! 5. Prints per-VCPU and global counters, dumps the requested regions as hex,
//!    and exits through isa-debug-exit: 0x10 pass, 0x11 fail.
//!
//! The serial protocol is described in [`crate::transcript`].

mod arena;
mod emit;
pub mod items;

use std::collections::BTreeMap;
use std::fmt;

use iced_x86::code_asm::{CodeAssembler, CodeLabel};
use iced_x86::IcedError;

pub use arena::DataArena;
pub use items::{default_items, Seg, SnapItem, SnapSource, EFLAGS_STATUS_BITS};

use crate::image::{ImageError, TempImage};
use crate::paging::{HostMode, PageTables, PagingError, Translation, PAGE};
use crate::qemu::{run_image, QemuConfig, QemuError, RunResult};

/// Kernel 32-bit code selector (GDT index 1).
pub const SEL_CODE32: u16 = 0x08;
/// Kernel flat data selector (GDT index 2).
pub const SEL_DATA32: u16 = 0x10;
/// A second flat data selector (GDT index 3): same segment, different value.
pub const SEL_DATA32_ALT: u16 = 0x18;
/// The host's 32-bit TSS (GDT index 4).
pub const SEL_TSS32: u16 = 0x20;
/// The host's LDT (GDT index 5).
pub const SEL_LDT: u16 = 0x28;
/// First selector of caller-supplied GDT entries.
pub const SEL_FIRST_EXTRA: u16 = 0x30;
/// FS: LDT entry 0 (TI = 1, RPL 0), based at the FS page.
pub const SEL_LDT_FS: u16 = 0x04;

/// Virtual address of the magic page (mapped only by the host's tables).
pub const MAGIC_VIRT: u32 = 0x4000_0000;
/// First dword of the magic page.
pub const MAGIC_VALUE: u32 = 0xc0ff_ee42;
/// First dword of the FS page.
pub const FS_MAGIC: u32 = 0xf5f5_abcd;

/// Where the local APIC is mapped (identity, PCD).
pub const LAPIC_VIRT: u32 = 0xfee0_0000;
/// APIC version register offset.
pub const LAPIC_VER: u32 = 0x30;
/// Spurious-interrupt vector register offset.
pub const LAPIC_SVR: u32 = 0xf0;
/// LVT thermal sensor offset.
pub const LAPIC_LVT_THERM: u32 = 0x330;
/// LVT performance counter offset.
pub const LAPIC_LVT_PERF: u32 = 0x340;
/// LVT LINT0 offset.
pub const LAPIC_LVT_LINT0: u32 = 0x350;
/// LVT LINT1 offset.
pub const LAPIC_LVT_LINT1: u32 = 0x360;
/// LVT delivery mode NMI.
pub const LVT_DM_NMI: u32 = 0x400;
/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// Spurious vector the kernel programs (also handled by the IDT).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Entry point (right after the multiboot header).
pub const STUB_ADDR: u32 = crate::image::LOAD_ADDR + crate::image::HEADER_SIZE;
/// Physical address of the magic page.
pub const MAGIC_PAGE_PHYS: u32 = 0x0010_1000;
/// Physical (= virtual) address of the FS page.
pub const FS_PAGE_PHYS: u32 = 0x0010_2000;
/// Physical address of the first page-table page.
pub const TABLES_BASE: u32 = 0x0010_3000;
/// Default end of the identity mapping of low memory (page 0 excluded).
pub const DEFAULT_IDENTITY_LIMIT: u32 = 0x0040_0000;

/// Feature bit in the `HOST features=` field: the CPU has EFER.
pub const FEATURE_EFER: u32 = 1 << 0;
/// The CPU has NX (EFER.NXE set).
pub const FEATURE_NX: u32 = 1 << 1;
/// The CPU has SYSCALL or long mode (EFER.SCE set).
pub const FEATURE_SCE: u32 = 1 << 2;
/// The CPU has SYSENTER (SYSENTER_CS set).
pub const FEATURE_SEP: u32 = 1 << 3;
/// The CPU has a local APIC.
pub const FEATURE_APIC: u32 = 1 << 4;

/// Seed of [`cookie`].
pub const COOKIE_SEED: u32 = 0x5eed_c0de;
/// EBX pattern: `cookie ^ PATTERN_EBX` is in EBX at the call.
pub const PATTERN_EBX: u32 = 0xb0b0_b0b0;
/// ESI pattern.
pub const PATTERN_ESI: u32 = 0x5151_5151;
/// EDI pattern.
pub const PATTERN_EDI: u32 = 0xd1d1_d1d1;
/// EBP pattern.
pub const PATTERN_EBP: u32 = 0xbebe_bebe;

/// The cookie the kernel computes for `(trip, vcpu)` and writes to its cookie
/// slot (and to [`HostKernelBuilder::cookie_at`]) before each call.
pub const fn cookie(trip: u32, vcpu: u32) -> u32 {
    trip.wrapping_mul(0x9e37_79b9) ^ vcpu.wrapping_mul(0x85eb_ca6b) ^ COOKIE_SEED
}

/// A caller mapping in the host page tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Name for errors and listings.
    pub name: String,
    /// Host-virtual address (page aligned).
    pub virt: u32,
    /// Physical address (page aligned).
    pub phys: u32,
    /// Length in bytes (rounded up to pages).
    pub len: u32,
    /// Writable (CR0.WP is set, so read-only holds in ring 0 too).
    pub writable: bool,
}

/// A region the kernel prints as hex at the end of the run (and, by default,
/// after an exception).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpRegion {
    /// Name (one token).
    pub name: String,
    /// Host-virtual address.
    pub addr: u32,
    /// Length in bytes.
    pub len: u32,
}

/// What the hooks see: where the loop keeps its state, and the kernel's print
/// routines. Every slot is a host-virtual (= physical) dword address.
///
/// Hooks may clobber every general register except ESP, must leave the stack
/// balanced, and run with DS = ES = the kernel data selector.
pub struct HookCtx<'a> {
    /// Current trip index.
    pub trip_slot: u32,
    /// Current VCPU index (into the `vcpus` list).
    pub vcpu_slot: u32,
    /// `arg1` for this call (a pre-call hook may overwrite it).
    pub arg1_slot: u32,
    /// `arg2` for this call (a pre-call hook may overwrite it).
    pub arg2_slot: u32,
    /// The cookie for this call.
    pub cookie_slot: u32,
    /// The value the entry returned (valid in the post-call hook).
    pub ret_slot: u32,
    /// RDTSC delta of the call (valid in the post-call hook).
    pub tsc_delta_slot: u32,
    /// Store a non-zero code here to fail this call (`HOOKFAIL`).
    pub hook_fail_slot: u32,
    /// `putc`: prints AL; preserves all registers.
    pub putc: CodeLabel,
    /// `puts`: prints the NUL-terminated string at ESI; preserves all registers.
    pub puts: CodeLabel,
    /// `puthex`: prints EAX as 8 hex digits; preserves all registers.
    pub puthex: CodeLabel,
    /// `putdec`: prints EAX in decimal; preserves all registers.
    pub putdec: CodeLabel,
    /// `putnl`: prints a newline; preserves all registers.
    pub putnl: CodeLabel,
    arena: &'a mut DataArena,
}

impl fmt::Debug for HookCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookCtx")
            .field("trip_slot", &format_args!("{:#x}", self.trip_slot))
            .field("vcpu_slot", &format_args!("{:#x}", self.vcpu_slot))
            .field("ret_slot", &format_args!("{:#x}", self.ret_slot))
            .finish_non_exhaustive()
    }
}

impl HookCtx<'_> {
    /// Allocates initialised data in the kernel's data area; returns its address.
    pub fn alloc(&mut self, bytes: &[u8], align: u32) -> u32 {
        self.arena.bytes(bytes, align)
    }

    /// A NUL-terminated string in the kernel's data area.
    pub fn string(&mut self, s: &str) -> u32 {
        self.arena.string(s)
    }

    /// Emits code printing `text` (no newline); preserves all registers.
    pub fn emit_print(&mut self, a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
        use iced_x86::code_asm::esi;
        let addr = self.arena.string(text);
        a.push(esi)?;
        a.mov(esi, addr)?;
        a.call(self.puts)?;
        a.pop(esi)
    }

    /// Emits code printing a `LOG <text>` protocol line.
    pub fn emit_log(&mut self, a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
        self.emit_print(a, &format!("{}LOG {text}\n", crate::transcript::PREFIX))
    }
}

/// A code hook: emits machine code into the kernel's call loop.
pub type HookFn = Box<dyn FnMut(&mut CodeAssembler, &mut HookCtx<'_>) -> Result<(), IcedError>>;

/// How the kernel checks the entry's return value.
pub enum Expected {
    /// Not checked.
    Any,
    /// Must equal this value.
    Value(u32),
    /// Must equal `cookie ^ k` (see [`cookie`]).
    CookieXor(u32),
    /// Emitted code leaves the expected value in EAX (the returned value is
    /// in the `ret_slot`).
    Code(HookFn),
}

impl fmt::Debug for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Any => f.write_str("Any"),
            Expected::Value(v) => write!(f, "Value({v:#010x})"),
            Expected::CookieXor(k) => write!(f, "CookieXor({k:#010x})"),
            Expected::Code(_) => f.write_str("Code(..)"),
        }
    }
}

/// Why a testbed cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Placing a blob failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A mapping failed.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// iced-x86 refused an instruction or could not assemble.
    #[error("code generation failed: {0}")]
    Asm(#[from] IcedError),
    /// No entry address was given.
    #[error("no entry address: call `HostKernelBuilder::entry`")]
    MissingEntry,
    /// The VCPU list is empty.
    #[error("the VCPU list is empty: call `HostKernelBuilder::vcpus` with at least one arg2")]
    NoVcpus,
    /// Zero trips.
    #[error("trip count must be at least 1, got {0}")]
    ZeroTrips(u32),
    /// A skip names no snapshot item.
    #[error("no snapshot item is named `{0}`")]
    UnknownItem(String),
    /// Two snapshot items share a name.
    #[error("two snapshot items are named `{0}`")]
    DuplicateItem(String),
    /// A name cannot be printed as one token.
    #[error("{what} name `{name}` must be one printable token without `=` or `@`")]
    BadName {
        /// What is named.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A dump region has no bytes.
    #[error("dump region `{name}` at {addr:#010x} is empty")]
    EmptyDump {
        /// Region name.
        name: String,
        /// Its address.
        addr: u32,
    },
    /// An address the kernel uses is not mapped by the host tables.
    #[error("{what} at {addr:#010x} is not mapped by the host page tables")]
    Unmapped {
        /// What the address is.
        what: String,
        /// The address.
        addr: u32,
    },
    /// An address the kernel writes is mapped read-only.
    #[error("{what} at {addr:#010x} is mapped read-only")]
    ReadOnly {
        /// What the address is.
        what: String,
        /// The address.
        addr: u32,
    },
    /// The identity limit is not a page multiple in (kernel end, 64 MiB].
    #[error("identity limit {0:#010x} must be page aligned and at most 64 MiB")]
    BadIdentityLimit(u32),
    /// The kernel outgrew its identity mapping.
    #[error("the kernel ends at {end:#010x}, beyond the identity-mapped limit {limit:#010x}")]
    KernelTooLarge {
        /// Kernel end.
        end: u32,
        /// Identity limit.
        limit: u32,
    },
    /// Too many GDT entries for a 16-bit selector.
    #[error("{0} extra GDT entries do not fit in a GDT")]
    GdtTooLarge(usize),
    /// A bug in this crate (a generated address left the data area).
    #[error("internal testbed error: {0}")]
    Internal(String),
}

/// Builds a [`Testbed`].
pub struct HostKernelBuilder {
    pub(crate) mode: HostMode,
    pub(crate) pse: bool,
    pub(crate) trips: u32,
    pub(crate) arg1: u32,
    pub(crate) vcpus: Vec<u32>,
    pub(crate) entry: Option<u32>,
    pub(crate) expected: Expected,
    pub(crate) cookie_addr: Option<u32>,
    pub(crate) mappings: Vec<Mapping>,
    pub(crate) blobs: Vec<(String, u32, Vec<u8>)>,
    pub(crate) dumps: Vec<DumpRegion>,
    pub(crate) skip: Vec<String>,
    pub(crate) extra_items: Vec<SnapItem>,
    pub(crate) pre_hook: Option<HookFn>,
    pub(crate) post_hook: Option<HookFn>,
    pub(crate) trace_trips: u32,
    pub(crate) max_report_lines: u32,
    pub(crate) stop_on_failure: bool,
    pub(crate) allow_nmis: bool,
    pub(crate) extra_gdt: Vec<u64>,
    pub(crate) dump_on_exception: bool,
    pub(crate) identity_limit: u32,
}

impl fmt::Debug for HostKernelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostKernelBuilder")
            .field("mode", &self.mode)
            .field("trips", &self.trips)
            .field("vcpus", &self.vcpus)
            .field("entry", &self.entry)
            .field("expected", &self.expected)
            .field("mappings", &self.mappings)
            .field("dumps", &self.dumps)
            .finish_non_exhaustive()
    }
}

impl HostKernelBuilder {
    /// A kernel for `mode`: 1 trip, no VCPUs, no entry yet, return value not
    /// checked, stop at the first failing call, 64 report lines, `TRIP` lines
    /// for the first 2 trips, dumps after exceptions.
    pub fn new(mode: HostMode) -> Self {
        Self {
            mode,
            pse: false,
            trips: 1,
            arg1: 0,
            vcpus: Vec::new(),
            entry: None,
            expected: Expected::Any,
            cookie_addr: None,
            mappings: Vec::new(),
            blobs: Vec::new(),
            dumps: Vec::new(),
            skip: Vec::new(),
            extra_items: Vec::new(),
            pre_hook: None,
            post_hook: None,
            trace_trips: 2,
            max_report_lines: 64,
            stop_on_failure: true,
            allow_nmis: false,
            extra_gdt: Vec::new(),
            dump_on_exception: true,
            identity_limit: DEFAULT_IDENTITY_LIMIT,
        }
    }

    /// Sets CR4.PSE as well (the tables still use 4 KiB pages).
    pub fn pse(mut self, on: bool) -> Self {
        self.pse = on;
        self
    }

    /// Number of trips (each calls the entry once per VCPU).
    pub fn trips(mut self, n: u32) -> Self {
        self.trips = n;
        self
    }

    /// The `arg1` passed on every call (e.g. the HC address of the VM).
    pub fn arg1(mut self, value: u32) -> Self {
        self.arg1 = value;
        self
    }

    /// The `arg2` values, one per VCPU, called in this order each trip.
    pub fn vcpus(mut self, arg2s: impl IntoIterator<Item = u32>) -> Self {
        self.vcpus = arg2s.into_iter().collect();
        self
    }

    /// Host-virtual address of `u32 entry(u32 arg1, u32 arg2)` (cdecl).
    pub fn entry(mut self, hc_addr: u32) -> Self {
        self.entry = Some(hc_addr);
        self
    }

    /// How to check the return value.
    pub fn expect(mut self, expected: Expected) -> Self {
        self.expected = expected;
        self
    }

    /// Also write the cookie to this host-virtual address before each call.
    pub fn cookie_at(mut self, hc_addr: u32) -> Self {
        self.cookie_addr = Some(hc_addr);
        self
    }

    /// Adds a mapping to the host page tables.
    pub fn map(mut self, mapping: Mapping) -> Self {
        self.mappings.push(mapping);
        self
    }

    /// Places `bytes` at physical `phys` in the image (not mapped by itself).
    pub fn blob(mut self, name: &str, phys: u32, bytes: Vec<u8>) -> Self {
        self.blobs.push((name.to_owned(), phys, bytes));
        self
    }

    /// Places `bytes` at physical `phys` and maps them at host-virtual `virt`.
    pub fn blob_mapped(
        mut self,
        name: &str,
        phys: u32,
        virt: u32,
        bytes: Vec<u8>,
        writable: bool,
    ) -> Self {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.mappings.push(Mapping {
            name: name.to_owned(),
            virt,
            phys,
            len,
            writable,
        });
        self.blobs.push((name.to_owned(), phys, bytes));
        self
    }

    /// Dumps `len` bytes at host-virtual `addr` as hex at the end of the run.
    pub fn dump(mut self, name: &str, addr: u32, len: u32) -> Self {
        self.dumps.push(DumpRegion {
            name: name.to_owned(),
            addr,
            len,
        });
        self
    }

    /// Excludes a snapshot item (by name) from the comparison; its index stays.
    pub fn skip_item(mut self, name: &str) -> Self {
        self.skip.push(name.to_owned());
        self
    }

    /// Appends a snapshot item after the default ones.
    pub fn snapshot_item(mut self, item: SnapItem) -> Self {
        self.extra_items.push(item);
        self
    }

    /// Code run before each call (before the snapshot).
    pub fn pre_call(
        mut self,
        hook: impl FnMut(&mut CodeAssembler, &mut HookCtx<'_>) -> Result<(), IcedError> + 'static,
    ) -> Self {
        self.pre_hook = Some(Box::new(hook));
        self
    }

    /// Code run after each call (after the checks).
    pub fn post_call(
        mut self,
        hook: impl FnMut(&mut CodeAssembler, &mut HookCtx<'_>) -> Result<(), IcedError> + 'static,
    ) -> Self {
        self.post_hook = Some(Box::new(hook));
        self
    }

    /// Print a `TRIP` line for trips below `n`.
    pub fn trace_trips(mut self, n: u32) -> Self {
        self.trace_trips = n;
        self
    }

    /// At most `n` `MISMATCH`/`RETFAIL`/`HOOKFAIL` lines (all are counted).
    pub fn max_report_lines(mut self, n: u32) -> Self {
        self.max_report_lines = n;
        self
    }

    /// Stop the loop after the first call that failed a check.
    pub fn stop_on_failure(mut self, on: bool) -> Self {
        self.stop_on_failure = on;
        self
    }

    /// Do not fail the run because NMIs arrived.
    pub fn allow_nmis(mut self, on: bool) -> Self {
        self.allow_nmis = on;
        self
    }

    /// Appends a raw descriptor to the host GDT (selectors from [`SEL_FIRST_EXTRA`]).
    pub fn gdt_entry(mut self, descriptor: u64) -> Self {
        self.extra_gdt.push(descriptor);
        self
    }

    /// Print the dump regions after an exception too (default on).
    pub fn dump_on_exception(mut self, on: bool) -> Self {
        self.dump_on_exception = on;
        self
    }

    /// Identity-map low memory `[4 KiB, limit)` instead of `[4 KiB, 4 MiB)`.
    pub fn identity_limit(mut self, limit: u32) -> Self {
        self.identity_limit = limit;
        self
    }

    /// Generates the kernel and the image.
    pub fn build(self) -> Result<Testbed, BuildError> {
        emit::build(self)
    }
}

/// One range of the physical layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutRegion {
    /// What lives there.
    pub name: String,
    /// First byte.
    pub start: u32,
    /// One past the last byte.
    pub end: u32,
}

/// Addresses of the kernel's parts (all identity-mapped unless noted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelAddrs {
    /// Multiboot entry (the boot stub).
    pub entry: u32,
    /// Start of the generated code.
    pub code: u32,
    /// End of the generated code.
    pub code_end: u32,
    /// Host CR3.
    pub cr3: u32,
    /// The GDT.
    pub gdt: u32,
    /// GDT limit.
    pub gdt_limit: u16,
    /// The IDT (256 gates).
    pub idt: u32,
    /// The 32-bit TSS.
    pub tss: u32,
    /// The LDT.
    pub ldt: u32,
    /// Physical address of the magic page (virtual [`MAGIC_VIRT`]).
    pub magic_page: u32,
    /// The FS page.
    pub fs_page: u32,
    /// Trip index slot.
    pub trip: u32,
    /// VCPU index slot.
    pub vcpu: u32,
    /// arg1 slot.
    pub arg1: u32,
    /// arg2 slot.
    pub arg2: u32,
    /// Cookie slot.
    pub cookie: u32,
    /// Return-value slot.
    pub ret: u32,
    /// Hook failure slot.
    pub hook_fail: u32,
    /// NMI counter.
    pub nmi_count: u32,
    /// Snapshot before the call (one dword per item).
    pub snap_before: u32,
    /// Snapshot after the call.
    pub snap_after: u32,
    /// Top of the kernel stack.
    pub stack_top: u32,
    /// End of everything the kernel occupies.
    pub kernel_end: u32,
}

/// A built image plus everything needed to run and debug it.
#[derive(Clone)]
pub struct Testbed {
    /// Host paging mode.
    pub mode: HostMode,
    /// The multiboot image.
    pub image: Vec<u8>,
    /// Label and data names → addresses (for gdb and listings).
    pub symbols: BTreeMap<String, u32>,
    /// Physical layout, sorted by address (kernel parts and caller blobs).
    pub layout: Vec<LayoutRegion>,
    /// Kernel addresses.
    pub addrs: KernelAddrs,
    /// Snapshot item names by index.
    pub items: Vec<String>,
    /// The host page tables as placed in the image.
    pub page_tables: PageTables,
    /// Trips configured.
    pub trips: u32,
    /// `arg2` per VCPU.
    pub vcpus: Vec<u32>,
}

impl fmt::Debug for Testbed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Testbed")
            .field("mode", &self.mode)
            .field("image_len", &self.image.len())
            .field("layout", &self.layout)
            .field("addrs", &self.addrs)
            .field("items", &self.items.len())
            .field("trips", &self.trips)
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

impl Testbed {
    /// Writes the image to a temporary file (removed when dropped).
    pub fn write_image(&self) -> std::io::Result<TempImage> {
        TempImage::write(&self.image)
    }

    /// Boots the image under QEMU.
    pub fn run(&self, config: &QemuConfig) -> Result<RunResult, QemuError> {
        let image = self.write_image().map_err(QemuError::WriteImage)?;
        run_image(image.path(), config)
    }

    /// Address of a symbol.
    pub fn symbol(&self, name: &str) -> Option<u32> {
        self.symbols.get(name).copied()
    }

    /// Index of a snapshot item.
    pub fn item_index(&self, name: &str) -> Option<usize> {
        self.items.iter().position(|n| n == name)
    }

    /// Walks the host page tables for `virt`.
    pub fn translate(&self, virt: u32) -> Option<Translation> {
        self.page_tables.translate(virt)
    }

    /// gdb commands for a run with [`QemuConfig::gdb`]: connect to QEMU's
    /// gdbstub and define `$name` for every symbol (e.g. `hbreak *$call_site`).
    pub fn gdb_commands(&self) -> String {
        let mut out = String::from("set architecture i386\ntarget remote :1234\n");
        for (name, addr) in &self.symbols {
            out.push_str(&format!("set ${name} = {addr:#010x}\n"));
        }
        out
    }

    /// The kernel code symbol at or before `addr` and the offset from it
    /// (for EIPs); `None` outside the kernel's code.
    pub fn symbolize(&self, addr: u32) -> Option<(&str, u32)> {
        if addr < self.addrs.code || addr >= self.addrs.code_end {
            return None;
        }
        self.symbols
            .iter()
            .filter(|(_, &a)| a <= addr && a >= self.addrs.code && a < self.addrs.code_end)
            .max_by_key(|(_, &a)| a)
            .map(|(n, &a)| (n.as_str(), addr - a))
    }
}

pub(crate) fn page_align(x: u32) -> u32 {
    x.div_ceil(PAGE) * PAGE
}

pub(crate) fn check_maps(
    tables: &PageTables,
    what: &str,
    addr: u32,
    len: u32,
    write: bool,
) -> Result<(), BuildError> {
    let last = addr.saturating_add(len.max(1) - 1);
    let mut page = addr & !(PAGE - 1);
    loop {
        let probe = page.max(addr);
        let t = tables
            .translate(probe)
            .ok_or_else(|| BuildError::Unmapped {
                what: what.to_owned(),
                addr: probe,
            })?;
        if write && t.pte & crate::paging::PTE_RW == 0 {
            return Err(BuildError::ReadOnly {
                what: what.to_owned(),
                addr: probe,
            });
        }
        match page.checked_add(PAGE) {
            Some(next) if next <= last => page = next,
            _ => return Ok(()),
        }
    }
}
