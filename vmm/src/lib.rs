//! The VMM core an embedder instantiates.
//!
//! [`Vmm::new`] lays out the hypervisor area (HMA) at an RC base — the VM
//! structure ([`layout::VmFixed`]: STAM samples and `Cpum`, then one
//! `CpumCpu32` per VCPU), the hyper GDT and TSS, a hyper stack per VCPU and
//! room for helper code — builds every available switcher, copies them
//! 32-byte aligned into one physically contiguous core-code block below
//! 4 GiB, builds the intermediate context (core code at its HC and identity
//! addresses, the HMA and core code at RC) and relocates every switcher.
//! [`Vmm::relocate_hma`] moves the HMA and relocates again. The host paging
//! mode is decided from CR0/CR4/EFER ([`mode::HostPagingMode`]) and the
//! switcher chosen by VirtualBox's host × guest table ([`mode::select`]).
//!
//! The memory comes from a [`PageProvider`] ([`Vmm::with_pages`]): the
//! core-code block and the HMA are one contiguous run each, every table page
//! is asked for on its own and may lie anywhere below 4 GiB ([`pages`] says
//! why). With the default [`VecPages`] ([`Vmm::new`]) the images
//! ([`Vmm::core_code`], [`Vmm::hma`], [`Vmm::tables`]) are what an embedder
//! copies to the physical addresses of its [`Placement`]
//! ([`Placement::builder`] derives the usual one from an HC, an RC and a
//! physical base).
//!
//! A VCPU's `CPUMCPU` comes as the variant of the core's host width
//! ([`Vmm::cpumcpu`], [`Vmm::with_cpumcpu_as`]); each entry point's calling
//! convention is [`EntryPoint::contract`].
//!
//! # Example
//!
//! ```
//! use vmm::{mode::{GuestMode, HostPagingMode}, Vmm, VmmConfig};
//! use vmm_switcher::SwitcherKind;
//!
//! let vmm = Vmm::new(VmmConfig::default())?;
//! let host = HostPagingMode::from_registers(0x8001_0033, 0x6b0, 0x801, true, true)?;
//! let kind = vmm.select(host, GuestMode::Amd64)?;
//! assert_eq!(kind, SwitcherKind::PaeToAmd64);
//! let sw = vmm.switcher(kind)?;
//! assert_eq!(sw.entries.r0_host_to_guest_hc.0 % 32, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod layout;
pub mod mode;
pub mod pages;
pub mod stats;
pub mod vcpu;

pub use cpum::{CpumCpu32, CpumCpu64, CpumCpuShared};
pub use pages::{
    HmaPages, PageError, PageProvider, Pages, Purpose, TableOrder, TablePool, VecPages,
};
pub use pgm_intermediate::Flavour;
pub use vcpu::{CpumCpuVariant, VcpuCpum};
pub use vmm_switcher::entry::{EntryContract, EntryPoint};
pub use vmm_switcher::reloc::{CpuFacts, CpuidLeaves, EntryAddrs};
pub use vmm_switcher::{HcAddr, PhysAddr, RcAddr, SwitcherKind};

use std::mem::size_of;
use std::ops::Range;

use cpum::regs::{Cr4, Xdtr64};
use cpum::{SelSlot, CPUMCPU_SIZE};
use pgm_intermediate::{Flavours, IntermediateContext, MapFlags, PAGE_SIZE};
use serde::Serialize;
use thiserror::Error;
use vmm_switcher::reloc::{HyperSelectors, InterCr3};
use vmm_switcher::templates::{legacy_amd64, TemplateOptions, VmLayout};
use vmm_switcher::{relocate, RelocContext, RelocError, Relocated, SideMode, SwitcherDef};
use zerocopy::{FromBytes, IntoBytes};

use crate::layout::{HmaLayout, VmFixed, VmHeader, PAGE, TSS_SIZE};
use crate::mode::{GuestMode, HostPagingMode, SelectError};

/// Where the core code, the hypervisor area and the intermediate tables live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// HC address of the core-code block.
    pub code_hc: HcAddr,
    /// Physical address of the core-code block (below 4 GiB).
    pub code_phys: PhysAddr,
    /// RC address of the hypervisor area.
    pub hma_rc: RcAddr,
    /// HC address of the hypervisor area (where the host sees the VM structure).
    pub hma_hc: HcAddr,
    /// Physical address of the hypervisor area's first page (the area's
    /// pages need not be adjacent: [`Vmm::hma_pages`] lists them; the
    /// default provider puts them from here up).
    pub hma_phys: PhysAddr,
    /// Physical address of the intermediate page tables (below 4 GiB).
    pub tables_phys: PhysAddr,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            code_hc: HcAddr(0xc040_0000),
            code_phys: PhysAddr(0x0040_0000),
            hma_rc: RcAddr(0xa000_0000),
            hma_hc: HcAddr(0xc050_0000),
            hma_phys: PhysAddr(0x0050_0000),
            tables_phys: PhysAddr(0x0060_0000),
        }
    }
}

impl Placement {
    /// A builder for the usual layout: the core code at the HC base and the
    /// physical base, the HMA one slot (1 MiB unless set) above both, the
    /// intermediate tables two slots above the physical base, the HMA at
    /// the RC base.
    ///
    /// ```
    /// use vmm::{HcAddr, PhysAddr, Placement, RcAddr};
    ///
    /// let p = Placement::builder(HcAddr(0xc040_0000), RcAddr(0xa000_0000))
    ///     .phys_base(PhysAddr(0x40_0000))
    ///     .build()?;
    /// assert_eq!(p, Placement::default());
    /// # Ok::<(), vmm::PlacementError>(())
    /// ```
    pub const fn builder(hc_base: HcAddr, rc_base: RcAddr) -> PlacementBuilder {
        PlacementBuilder {
            hc_base,
            rc_base,
            phys_base: PhysAddr(0x0040_0000),
            slot: 0x10_0000,
        }
    }
}

/// Derives a [`Placement`] from an HC base, an RC base and a physical base
/// (see [`Placement::builder`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacementBuilder {
    hc_base: HcAddr,
    rc_base: RcAddr,
    phys_base: PhysAddr,
    slot: u64,
}

impl PlacementBuilder {
    /// Where the physical pages start (default 4 MiB): the core code there,
    /// the HMA one slot above, the intermediate tables two slots above.
    pub const fn phys_base(mut self, phys: PhysAddr) -> Self {
        self.phys_base = phys;
        self
    }

    /// The distance between the core code, the HMA and the tables (default
    /// 1 MiB; a page multiple large enough for each of them).
    pub const fn slot(mut self, bytes: u64) -> Self {
        self.slot = bytes;
        self
    }

    /// The placement.
    ///
    /// # Errors
    /// A base or the slot is not page-aligned, the slot is zero, the RC base
    /// is zero, or an address runs past the end of its address space.
    pub fn build(self) -> Result<Placement, PlacementError> {
        aligned("placement slot", self.slot)?;
        if self.slot == 0 {
            return Err(PlacementError::Misaligned {
                what: "placement slot",
                addr: 0,
            });
        }
        aligned("HC base", self.hc_base.0)?;
        aligned("RC base", u64::from(self.rc_base.0))?;
        aligned("physical base", self.phys_base.0)?;
        if self.rc_base.0 == 0 {
            return Err(PlacementError::ZeroHmaRc);
        }
        let up = |what: &'static str, base: u64, slots: u64| {
            self.slot
                .checked_mul(slots)
                .and_then(|d| base.checked_add(d))
                .ok_or(PlacementError::Wraps {
                    what,
                    start: base,
                    len: self.slot.saturating_mul(slots),
                })
        };
        Ok(Placement {
            code_hc: self.hc_base,
            code_phys: self.phys_base,
            hma_rc: self.rc_base,
            hma_hc: HcAddr(up("HMA HC", self.hc_base.0, 1)?),
            hma_phys: PhysAddr(up("HMA physical", self.phys_base.0, 1)?),
            tables_phys: PhysAddr(up("intermediate tables", self.phys_base.0, 2)?),
        })
    }
}

/// An extra range the intermediate context must map (e.g. the local APIC, so
/// the far side can read it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExtraMapping {
    /// Virtual address.
    pub virt: u64,
    /// Physical address.
    pub phys: u64,
    /// Length in bytes.
    pub len: u64,
    /// Map uncached.
    pub uncached: bool,
}

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmmConfig {
    /// Addresses.
    pub placement: Placement,
    /// Number of VCPUs (1..=[`layout::MAX_VCPUS`], i.e. 1..=32).
    pub vcpus: u32,
    /// Template options for every switcher.
    pub options: TemplateOptions,
    /// CPU facts the relocator needs, read from the host CPU's CPUID:
    /// `CpuFacts::from_cpuid(&CpuidLeaves { leaf1_edx, ext1_edx })`
    /// ([`CpuFacts::common`] by default: NX, FXSR, SYSENTER and SYSCALL).
    /// The relocated code is only right on a CPU with exactly these bits.
    pub cpu: CpuFacts,
    /// Pages reserved for helper code in the HMA.
    pub helper_pages: u32,
    /// Pages available for page tables: the first half (rounded down) for
    /// the intermediate tables, the rest for the hyper context's
    /// ([`PageProvider::table_page`] is asked for each of them up front).
    pub table_pages: u32,
    /// Extra intermediate mappings.
    pub extra_mappings: Vec<ExtraMapping>,
    /// Bitness of the host (32 for legacy and PAE hosts, 64 for AMD64 hosts):
    /// it decides which switchers the core holds, as VirtualBox's x86 and
    /// AMD64 builds do, and where HC addresses may lie.
    pub host_bits: u32,
}

impl Default for VmmConfig {
    fn default() -> Self {
        Self {
            placement: Placement::default(),
            vcpus: 2,
            options: TemplateOptions::default(),
            cpu: CpuFacts::common(),
            helper_pages: 4,
            table_pages: 64,
            extra_mappings: Vec::new(),
            host_bits: 32,
        }
    }
}

impl VmmConfig {
    /// The default configuration for an AMD64 host: the same physical and RC
    /// placement, HC addresses in the top 2 GiB of the canonical space.
    pub fn amd64_host() -> Self {
        let mut c = Self::default();
        c.host_bits = 64;
        c.placement.code_hc = HcAddr(0xffff_ffff_c040_0000);
        c.placement.hma_hc = HcAddr(0xffff_ffff_c050_0000);
        c
    }
}

/// A placement or configuration the core cannot use.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// An address is not page-aligned.
    #[error("{what} address {addr:#x} is not page-aligned")]
    Misaligned {
        /// Which address.
        what: &'static str,
        /// The address.
        addr: u64,
    },
    /// A range must lie below 4 GiB and does not.
    #[error("{what} range {start:#x}..{end:#x} does not lie below 4 GiB")]
    Above4G {
        /// Which range.
        what: &'static str,
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// The provider handed out a different number of HMA pages than asked.
    #[error("the provider handed out {got} hypervisor-area page(s) for a request of {want}")]
    HmaPageCount {
        /// Pages handed out.
        got: usize,
        /// Pages asked for.
        want: usize,
    },
    /// A range starting at `start` and `len` bytes long runs past 2^64.
    #[error(
        "{what} range at {start:#x} ({len:#x} bytes) runs past the end of the 64-bit address space"
    )]
    Wraps {
        /// Which range.
        what: &'static str,
        /// Start.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The hypervisor area or the core-code block does not fit in 32 bits.
    #[error("{what} of {value:#x} does not fit the 32-bit hypervisor area")]
    LayoutTooLarge {
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// Two physical or virtual ranges overlap.
    #[error("{a} range {a_range:x?} overlaps {b} range {b_range:x?}")]
    Overlap {
        /// First range's name.
        a: &'static str,
        /// First range.
        a_range: Range<u64>,
        /// Second range's name.
        b: &'static str,
        /// Second range.
        b_range: Range<u64>,
    },
    /// The host bitness is neither 32 nor 64.
    #[error("host bitness {0} is neither 32 nor 64")]
    HostBits(u32),
    /// 5-level paging (`options.la57`) asked for a core built for 32-bit
    /// hosts.
    #[error("5-level paging (LA57) needs a core built for 64-bit hosts, not {0}-bit ones")]
    La57NeedsAmd64Host(u32),
    /// An HC address is not canonical (in 48 bits, or in 57 bits for a
    /// host with `options.la57`).
    #[error("{what} address {addr:#x} is not canonical")]
    NonCanonical {
        /// Which address.
        what: &'static str,
        /// The address.
        addr: u64,
    },
    /// The VCPU count is out of range.
    #[error("VCPU count {0} is not in 1..=32")]
    VcpuCount(u32),
    /// The intermediate-table region is too small or misplaced.
    #[error("intermediate table region: {0}")]
    Tables(#[from] pgm_intermediate::RegionError),
    /// The hypervisor area's RC address is zero (the null pointer of the
    /// hypervisor context).
    #[error("HMA RC address 0 is the hypervisor context's null pointer")]
    ZeroHmaRc,
    /// The new RC window of an HMA move overlaps the current one.
    #[error("HMA move to RC {new:x?} overlaps the current RC window {old:x?}")]
    HmaMoveOverlaps {
        /// The current RC window (HMA, then the core code's RC copy).
        old: Range<u64>,
        /// The requested one.
        new: Range<u64>,
    },
    /// A page provider's mapping is not the size it was asked for.
    #[error("{what} mapping at {phys:#x} is {got:#x} bytes, {want:#x} were asked for")]
    MappingSize {
        /// What the pages are for.
        what: &'static str,
        /// Physical address.
        phys: u64,
        /// The mapping's size.
        got: usize,
        /// The size asked for.
        want: usize,
    },
}

impl From<layout::LayoutError> for PlacementError {
    fn from(e: layout::LayoutError) -> Self {
        Self::LayoutTooLarge {
            what: e.what,
            value: e.value,
        }
    }
}

/// Building or relocating the core failed.
#[derive(Debug, Error)]
pub enum VmmError {
    /// Bad placement or configuration.
    #[error("bad placement: {0}")]
    Placement(#[from] PlacementError),
    /// A template did not assemble.
    #[error("switcher template: {0}")]
    Template(#[from] vmm_switcher::builder::BuildError),
    /// The intermediate context could not be created.
    #[error("intermediate context: {0}")]
    InterNew(#[from] pgm_intermediate::NewError),
    /// A mapping in the intermediate context conflicts or failed.
    #[error("intermediate mapping of {what}: {source}")]
    InterMap {
        /// What was being mapped.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: pgm_intermediate::MapError,
    },
    /// Unmapping the old HMA failed.
    #[error("intermediate unmapping of {what}: {source}")]
    InterUnmap {
        /// What was being unmapped.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: pgm_intermediate::UnmapError,
    },
    /// A switcher did not relocate.
    #[error("relocating {}: {source}", kind.cli_name())]
    Relocate {
        /// Which switcher.
        kind: SwitcherKind,
        /// Why.
        #[source]
        source: RelocError,
    },
    /// Helper code does not fit its area.
    #[error("helper code of {len} bytes does not fit the {cap}-byte helper area")]
    HelperTooLarge {
        /// Code size.
        len: usize,
        /// Area size.
        cap: u32,
    },
    /// The switcher is not available.
    #[error("{0}")]
    Select(#[from] SelectError),
    /// A switcher's listing could not be made.
    #[error("disassembly: {0}")]
    Disasm(#[from] vmm_switcher::disasm::DisasmError),
    /// A switcher's bytes outside the core-code block (a layout bug).
    #[error("switcher of {len} bytes at {off:#x} is outside the {cap:#x}-byte core-code block")]
    CoreRange {
        /// Offset.
        off: usize,
        /// Length.
        len: usize,
        /// Block size.
        cap: usize,
    },
    /// A write into the HMA image outside it (a layout bug).
    #[error("HMA access of {len} bytes at {off:#x} is outside the {cap:#x}-byte image")]
    HmaRange {
        /// Offset.
        off: usize,
        /// Length.
        len: usize,
        /// Image size.
        cap: usize,
    },
    /// The page provider did not hand out the pages asked for.
    #[error("page provider: {0}")]
    Pages(#[from] PageError),
    /// A `CpumCpu*` variant of the other host width was asked for.
    #[error("a {requested}-bit host's CPUMCPU was asked of a core built for {core}-bit hosts")]
    HostWidth {
        /// The width of the variant asked for.
        requested: u32,
        /// The core's host width ([`VmmConfig::host_bits`]).
        core: u32,
    },
    /// A VCPU index past the configured count.
    #[error("VCPU {index} does not exist (the VM has {count})")]
    NoSuchVcpu {
        /// Requested index.
        index: u32,
        /// VCPU count.
        count: u32,
    },
}

/// One switcher installed in the core-code block.
#[derive(Clone, Debug, Serialize)]
pub struct Installed {
    /// Its definition.
    pub def: SwitcherDef,
    /// Offset in the core-code block.
    pub offset: u32,
    /// The last relocation's result (fields written, entry addresses).
    pub reloc: Relocated,
    /// The last relocation's context.
    pub ctx: RelocContext,
    /// Entry addresses (copy of `reloc.entries`).
    pub entries: EntryAddrs,
}

impl Installed {
    /// The relocated bytes of this switcher inside `core`.
    /// Empty if `core` is not the block this switcher was installed in.
    pub fn code<'a>(&self, core: &'a [u8]) -> &'a [u8] {
        let start = self.offset as usize;
        start
            .checked_add(self.def.code.len())
            .and_then(|end| core.get(start..end))
            .unwrap_or_default()
    }
}

/// The switchers a core for an AMD64 host holds.
pub const AVAILABLE_AMD64_HOST: [SwitcherKind; 4] = [
    SwitcherKind::Amd64To32,
    SwitcherKind::Amd64ToPae,
    SwitcherKind::Amd64ToAmd64,
    SwitcherKind::Amd64Stub,
];

/// The switchers a core for a 32-bit (legacy or PAE) host holds.
pub const AVAILABLE_32BIT_HOST: [SwitcherKind; 7] = [
    SwitcherKind::Legacy32To32,
    SwitcherKind::Legacy32ToPae,
    SwitcherKind::Legacy32ToAmd64,
    SwitcherKind::PaeTo32,
    SwitcherKind::PaeToPae,
    SwitcherKind::PaeToAmd64,
    SwitcherKind::X86Stub,
];

/// The switchers for a host of `bits` bitness.
pub fn available_for(bits: u32) -> &'static [SwitcherKind] {
    if bits == 64 {
        &AVAILABLE_AMD64_HOST
    } else {
        &AVAILABLE_32BIT_HOST
    }
}

/// Every switcher this build provides, for some host.
pub const AVAILABLE: [SwitcherKind; 11] = [
    SwitcherKind::Legacy32To32,
    SwitcherKind::Legacy32ToPae,
    SwitcherKind::Legacy32ToAmd64,
    SwitcherKind::PaeTo32,
    SwitcherKind::PaeToPae,
    SwitcherKind::PaeToAmd64,
    SwitcherKind::X86Stub,
    SwitcherKind::Amd64To32,
    SwitcherKind::Amd64ToPae,
    SwitcherKind::Amd64ToAmd64,
    SwitcherKind::Amd64Stub,
];

/// Builds the template of `kind`.
///
/// # Errors
/// The kind has no template in this build, or a template did not assemble.
pub fn build_switcher(
    kind: SwitcherKind,
    options: &TemplateOptions,
    vm: &VmLayout,
) -> Result<SwitcherDef, VmmError> {
    use vmm_switcher::templates::legacy_pae::{self, Flavour as F};
    Ok(match kind {
        SwitcherKind::Legacy32ToAmd64 => {
            legacy_amd64::build(legacy_amd64::HostPaging::Legacy32, options, vm)?
        }
        SwitcherKind::PaeToAmd64 => {
            legacy_amd64::build(legacy_amd64::HostPaging::Pae, options, vm)?
        }
        SwitcherKind::Legacy32To32 => legacy_pae::build(F::Legacy32, F::Legacy32, options, vm)?,
        SwitcherKind::Legacy32ToPae => legacy_pae::build(F::Legacy32, F::Pae, options, vm)?,
        SwitcherKind::PaeTo32 => legacy_pae::build(F::Pae, F::Legacy32, options, vm)?,
        SwitcherKind::PaeToPae => legacy_pae::build(F::Pae, F::Pae, options, vm)?,
        SwitcherKind::X86Stub => vmm_switcher::templates::stub::build(32, options)?,
        SwitcherKind::Amd64To32 => {
            vmm_switcher::templates::amd64_legacy::build(F::Legacy32, options, vm)?
        }
        SwitcherKind::Amd64ToPae => {
            vmm_switcher::templates::amd64_legacy::build(F::Pae, options, vm)?
        }
        SwitcherKind::Amd64ToAmd64 => vmm_switcher::templates::amd64_amd64::build(options, vm)?,
        SwitcherKind::Amd64Stub => vmm_switcher::templates::stub::build(64, options)?,
    })
}

/// The paging flavour of the hypervisor context a switcher enters (the stubs
/// enter none; they report 32-bit).
pub fn target_flavour(kind: SwitcherKind) -> Flavour {
    use pgm_intermediate::Flavour as F;
    match kind.guest() {
        Some(SideMode::Bits32) => F::Legacy32,
        Some(SideMode::Pae) => F::Pae,
        Some(SideMode::Amd64) | None => F::Long,
    }
}

/// The VMM core, in pages from `P` ([`VecPages`] unless the embedder hands
/// in its own [`PageProvider`]).
pub struct Vmm<P: PageProvider = VecPages> {
    cfg: VmmConfig,
    hma_layout: HmaLayout,
    switchers: Vec<Installed>,
    core: P::Mapping,
    core_len: usize,
    hma: P::Mapping,
    hma_len: usize,
    hma_pages: Vec<PhysAddr>,
    inter: IntermediateContext<TablePool<P::Mapping>>,
    hyper: IntermediateContext<TablePool<P::Mapping>>,
    active: Option<SwitcherKind>,
    addrs: Addrs,
    pages: P,
}

impl<P: PageProvider> core::fmt::Debug for Vmm<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vmm")
            .field("placement", &self.cfg.placement)
            .field("vcpus", &self.cfg.vcpus)
            .field("hma_layout", &self.hma_layout)
            .field(
                "switchers",
                &self
                    .switchers
                    .iter()
                    .map(|s| (s.def.kind, s.offset))
                    .collect::<Vec<_>>(),
            )
            .field("core_code_len", &self.core_len)
            .finish_non_exhaustive()
    }
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

fn aligned(what: &'static str, addr: u64) -> Result<(), PlacementError> {
    if addr % u64::from(PAGE) != 0 {
        return Err(PlacementError::Misaligned { what, addr });
    }
    Ok(())
}

/// Size of the CPUM area (`Cpum` and every `CpumCpu32`) for `vcpus` VCPUs.
fn cpum_size(vcpus: u32) -> Result<u32, PlacementError> {
    layout::off_cpumcpu(vcpus).ok_or(PlacementError::VcpuCount(vcpus))
}

type Named<'a> = (&'static str, &'a Range<u64>);

/// A range the RC view maps: its names in the switcher's and the hyper
/// context's tables, and `(virt, phys, len)`.
type RcRange = (&'static str, &'static str, (u64, u64, u64));

/// The first pair of `ranges` that overlaps and is not `allowed`, as an error.
fn no_overlaps(
    ranges: &[Named<'_>],
    allowed: impl Fn(&Named<'_>, &Named<'_>) -> bool,
) -> Result<(), PlacementError> {
    // A sweep in start order finds whether any two ranges overlap at all
    // (a range starting before the furthest end seen so far); only then is
    // the pair to report searched for, in the given order.
    let mut sorted: Vec<&Range<u64>> = ranges.iter().map(|r| r.1).collect();
    sorted.sort_unstable_by_key(|r| r.start);
    let mut furthest = 0;
    if sorted.iter().all(|r| {
        let clear = r.start >= furthest;
        furthest = furthest.max(r.end);
        clear
    }) {
        return Ok(());
    }
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            if overlap(a.1, b.1) && !allowed(a, b) {
                return Err(PlacementError::Overlap {
                    a: a.0,
                    a_range: a.1.clone(),
                    b: b.0,
                    b_range: b.1.clone(),
                });
            }
        }
    }
    Ok(())
}

/// `start..start + len`, or [`PlacementError::Wraps`] if it runs past 2^64.
fn range(what: &'static str, start: u64, len: u64) -> Result<Range<u64>, PlacementError> {
    let end = start
        .checked_add(len)
        .ok_or(PlacementError::Wraps { what, start, len })?;
    Ok(start..end)
}

/// The byte ranges of `mem`, each page aligned and not wrapping.
fn phys_ranges(what: &'static str, mem: Tables<'_>) -> Result<Vec<Range<u64>>, PlacementError> {
    match mem {
        Tables::Region(base, pages) => {
            aligned(what, base)?;
            let len = u64::from(pages) * u64::from(PAGE);
            Ok(vec![range(what, base, len)?])
        }
        Tables::Pages(list) => list
            .iter()
            .map(|&page| {
                aligned(what, page)?;
                range(what, page, u64::from(PAGE))
            })
            .collect(),
    }
}

fn below4g(what: &'static str, r: &Range<u64>) -> Result<(), PlacementError> {
    if r.end > 1 << 32 {
        return Err(PlacementError::Above4G {
            what,
            start: r.start,
            end: r.end,
        });
    }
    Ok(())
}

/// What [`Vmm::new`] and [`Vmm::with_pages`] build before asking for pages.
struct Assembled {
    cfg: VmmConfig,
    hma_layout: HmaLayout,
    switchers: Vec<Installed>,
    core: Vec<u8>,
}

impl Assembled {
    /// Checks the configuration, lays out the HMA and builds the core code.
    fn new(cfg: VmmConfig) -> Result<Self, VmmError> {
        if cfg.vcpus == 0 || cfg.vcpus > layout::MAX_VCPUS {
            return Err(PlacementError::VcpuCount(cfg.vcpus).into());
        }
        if cfg.host_bits != 32 && cfg.host_bits != 64 {
            return Err(PlacementError::HostBits(cfg.host_bits).into());
        }
        if cfg.options.la57 && cfg.host_bits != 64 {
            return Err(PlacementError::La57NeedsAmd64Host(cfg.host_bits).into());
        }
        let hma_layout =
            HmaLayout::new(cfg.vcpus, cfg.helper_pages).map_err(PlacementError::from)?;
        let vm = VmLayout {
            size: hma_layout.vm_size,
            cpum: layout::OFF_CPUM as u32,
            cpum_size: cpum_size(cfg.vcpus)?,
            stat_to_gc: layout::OFF_STAT_TO_GC as u32,
            stat_to_hc: layout::OFF_STAT_TO_HC as u32,
        };
        let (switchers, core) = Vmm::<VecPages>::build_core(&cfg, &vm)?;
        Ok(Self {
            cfg,
            hma_layout,
            switchers,
            core,
        })
    }
}

/// Pages from a provider, checked: `pages` pages whose mapping is exactly
/// that size.
fn take_contiguous<P: PageProvider>(
    provider: &mut P,
    purpose: Purpose,
    len: usize,
) -> Result<Pages<P::Mapping>, VmmError> {
    let page = PAGE_SIZE as usize;
    let pages = len.div_ceil(page).max(1);
    let got = provider.contiguous(purpose, pages)?;
    check_mapping(purpose, &got, pages * page)?;
    Ok(got)
}

/// The hypervisor area's pages from a provider, checked: one page per 4 KiB
/// of `len`, each aligned, and a mapping of exactly that size.
fn take_hma<P: PageProvider>(
    provider: &mut P,
    len: usize,
) -> Result<HmaPages<P::Mapping>, VmmError> {
    let page = PAGE_SIZE as usize;
    let pages = len.div_ceil(page).max(1);
    let got = provider.hma(pages)?;
    let what = Purpose::Hma.name();
    if got.phys.len() != pages {
        return Err(PlacementError::HmaPageCount {
            got: got.phys.len(),
            want: pages,
        }
        .into());
    }
    for p in &got.phys {
        aligned(what, p.0)?;
    }
    let mapped = got.map.as_ref().len();
    if mapped != pages * page {
        return Err(PlacementError::MappingSize {
            what,
            phys: got.phys.first().map_or(0, |p| p.0),
            got: mapped,
            want: pages * page,
        }
        .into());
    }
    Ok(got)
}

/// `table_pages` pages of `purpose`, each checked.
fn take_tables<P: PageProvider>(
    provider: &mut P,
    purpose: Purpose,
    count: u32,
) -> Result<Vec<(u64, P::Mapping)>, VmmError> {
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let got = provider.table_page(purpose)?;
        check_mapping(purpose, &got, PAGE_SIZE as usize)?;
        out.push((got.phys.0, got.map));
    }
    Ok(out)
}

fn check_mapping<M: AsRef<[u8]>>(
    purpose: Purpose,
    got: &Pages<M>,
    want: usize,
) -> Result<(), PlacementError> {
    aligned(purpose.name(), got.phys.0)?;
    let len = got.map.as_ref().len();
    if len != want {
        return Err(PlacementError::MappingSize {
            what: purpose.name(),
            phys: got.phys.0,
            got: len,
            want,
        });
    }
    Ok(())
}

impl Vmm {
    /// Builds, lays out, maps and relocates everything for `cfg`, in
    /// `Vec`-backed images at the placement's physical addresses
    /// ([`VecPages`]) for the embedder to copy there.
    ///
    /// # Errors
    /// [`VmmError`] for a bad placement, a mapping conflict or a failed relocation.
    pub fn new(cfg: VmmConfig) -> Result<Self, VmmError> {
        let a = Assembled::new(cfg)?;
        // The table region as a whole, before it is split into pages.
        let p = a.cfg.placement;
        let hma_len = u64::from(a.hma_layout.size);
        let hma_region = u32::try_from(hma_len.div_ceil(u64::from(PAGE))).unwrap_or(u32::MAX);
        Self::check_placement(
            &a.cfg,
            a.core.len() as u64,
            (hma_len, Tables::Region(p.hma_phys.0, hma_region)),
            Tables::Region(p.tables_phys.0, a.cfg.table_pages),
        )?;
        pgm_intermediate::VecAllocator::new(p.tables_phys.0, (a.cfg.table_pages / 2) as usize)
            .map_err(PlacementError::from)?;
        let pages = VecPages::new(&p, a.cfg.table_pages);
        Vmm::finish(a, pages)
    }

    /// The intermediate tables as one image: their physical base and the
    /// bytes from the lowest used page to the highest, gaps between
    /// scattered pages zero-filled (all inside the [`VecPages`] region, so at
    /// most the region).
    pub fn tables(&self) -> (PhysAddr, Vec<u8>) {
        span_image(self.inter.allocator())
    }

    /// The hyper context's page tables (what `Hyper.cr3` points into) as one
    /// image: their physical base and bytes, as [`Vmm::tables`].
    pub fn hyper_tables(&self) -> (PhysAddr, Vec<u8>) {
        span_image(self.hyper.allocator())
    }
}

/// The used pages of `pool` as one image from the lowest to the highest,
/// gaps zero-filled.
fn span_image<M: AsRef<[u8]> + AsMut<[u8]>>(pool: &TablePool<M>) -> (PhysAddr, Vec<u8>) {
    let lo = pool.used().map(|(p, _)| p.0).min().unwrap_or(0);
    let hi = pool
        .used()
        .map(|(p, b)| p.0.saturating_add(b.len() as u64))
        .max()
        .unwrap_or(lo);
    let mut image = vec![0u8; usize::try_from(hi - lo).unwrap_or(0)];
    for (p, bytes) in pool.used() {
        let off = (p.0 - lo) as usize;
        if let Some(dst) = image.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    (PhysAddr(lo), image)
}

/// The physical memory of the HMA or the intermediate tables, as
/// [`Vmm::check_placement`] checks it.
enum Tables<'a> {
    /// A region of pages at a base.
    Region(u64, u32),
    /// Individual pages.
    Pages(&'a [u64]),
}

impl<P: PageProvider> Vmm<P> {
    /// Builds, lays out, maps and relocates everything for `cfg` in pages
    /// from `pages`: the core-code block and the HMA each one contiguous
    /// run, every table page on its own ([`pages`] says why). The physical
    /// fields of the placement are taken from the pages handed out
    /// (`tables_phys` becomes the lowest table page).
    ///
    /// # Errors
    /// [`VmmError`] for a bad placement or bad pages, a mapping conflict or a
    /// failed relocation.
    pub fn with_pages(cfg: VmmConfig, pages: P) -> Result<Self, VmmError> {
        Self::finish(Assembled::new(cfg)?, pages)
    }

    fn finish(a: Assembled, mut pages: P) -> Result<Self, VmmError> {
        let Assembled {
            mut cfg,
            hma_layout,
            switchers,
            core: code,
        } = a;
        let hma_len = hma_layout.size as usize;
        let mut core = take_contiguous(&mut pages, Purpose::CoreCode, code.len())?;
        let mut hma = take_hma(&mut pages, hma_len)?;
        let half = cfg.table_pages / 2;
        let inter_pages = take_tables(&mut pages, Purpose::Tables, half)?;
        let hyper_pages = take_tables(&mut pages, Purpose::HyperTables, cfg.table_pages - half)?;
        let all: Vec<u64> = inter_pages
            .iter()
            .chain(&hyper_pages)
            .map(|(p, _)| *p)
            .collect();
        cfg.placement.code_phys = core.phys;
        let hma_pages: Vec<u64> = hma.phys.iter().map(|p| p.0).collect();
        cfg.placement.hma_phys = hma.phys.first().copied().unwrap_or_default();
        if let Some(&lo) = all.iter().min() {
            cfg.placement.tables_phys = PhysAddr(lo);
        }
        Self::check_placement(
            &cfg,
            code.len() as u64,
            (hma_len as u64, Tables::Pages(&hma_pages)),
            Tables::Pages(&all),
        )?;
        if let Some(dst) = core.map.as_mut().get_mut(..code.len()) {
            dst.copy_from_slice(&code);
        }
        // Whatever the provider left in the HMA, it starts out zero.
        hma.map.as_mut().fill(0);
        // A 5-level host gets 5-level tables in both contexts: the switchers
        // load the intermediate PML5 in long mode, and amd64-to-amd64 runs
        // its hypervisor context under the hyper PML5.
        let new_ctx = if cfg.options.la57 {
            IntermediateContext::with_la57
        } else {
            IntermediateContext::new
        };
        let inter = new_ctx(TablePool::new(inter_pages))?;
        let hyper = new_ctx(TablePool::new(hyper_pages))?;
        let mut vmm = Self {
            cfg,
            hma_layout,
            switchers,
            core: core.map,
            core_len: code.len(),
            hma: hma.map,
            hma_len,
            hma_pages: hma.phys,
            inter,
            hyper,
            active: None,
            addrs: Addrs::default(),
            pages,
        };
        vmm.addrs = vmm.compute_addrs()?;
        vmm.map_fixed()?;
        vmm.map_rc()?;
        vmm.init_vm(true)?;
        vmm.relocate_all()?;
        Ok(vmm)
    }

    /// The page provider the core's memory came from.
    pub fn pages(&self) -> &P {
        &self.pages
    }

    /// The used pages of the intermediate tables (`Purpose::Tables`) or the
    /// hyper tables (`Purpose::HyperTables`; any other purpose: the
    /// intermediate tables), each with its physical address, in the order
    /// they were used.
    pub fn table_pages(&self, which: Purpose) -> Vec<(PhysAddr, &[u8])> {
        let pool = if which == Purpose::HyperTables {
            self.hyper.allocator()
        } else {
            self.inter.allocator()
        };
        pool.used().collect()
    }

    /// Builds every switcher for the host's bitness and copies them, each
    /// 32-byte aligned with at least one byte of padding, into one
    /// page-granular core-code block.
    fn build_core(cfg: &VmmConfig, vm: &VmLayout) -> Result<(Vec<Installed>, Vec<u8>), VmmError> {
        let mut switchers = Vec::new();
        let mut core = Vec::new();
        for &kind in available_for(cfg.host_bits) {
            let def = build_switcher(kind, &cfg.options, vm)?;
            let offset = u32::try_from(core.len()).map_err(|_| PlacementError::LayoutTooLarge {
                what: "core-code block",
                value: core.len() as u64,
            })?;
            core.extend_from_slice(&def.code);
            core.push(0xcc);
            while core.len() % 32 != 0 {
                core.push(0xcc);
            }
            switchers.push(Installed {
                def,
                offset,
                reloc: Relocated {
                    applied: Vec::new(),
                    entries: Default::default(),
                },
                ctx: RelocContext::default(),
                entries: Default::default(),
            });
        }
        while core.len() % PAGE as usize != 0 {
            core.push(0xcc);
        }
        Ok((switchers, core))
    }

    /// Checks alignment, address-space limits and overlaps of every range;
    /// all arithmetic is checked, so a range that would cross 2^64 is
    /// [`PlacementError::Wraps`] and one that must stay below 4 GiB but does
    /// not is [`PlacementError::Above4G`].
    fn check_placement(
        cfg: &VmmConfig,
        code_len: u64,
        (hma_len, hma_mem): (u64, Tables<'_>),
        table_mem: Tables<'_>,
    ) -> Result<(), PlacementError> {
        let p = &cfg.placement;
        if p.hma_rc.0 == 0 {
            return Err(PlacementError::ZeroHmaRc);
        }
        aligned("core-code HC", p.code_hc.0)?;
        aligned("core-code physical", p.code_phys.0)?;
        aligned("HMA RC", u64::from(p.hma_rc.0))?;
        aligned("HMA HC", p.hma_hc.0)?;
        let code_phys = range("core-code physical", p.code_phys.0, code_len)?;
        let hma_phys = match hma_mem {
            // One run exactly the area's size.
            Tables::Region(base, _) => {
                aligned("HMA physical", base)?;
                vec![range("HMA physical", base, hma_len)?]
            }
            Tables::Pages(_) => phys_ranges("HMA physical", hma_mem)?,
        };
        let tables = phys_ranges("intermediate tables", table_mem)?;
        let code_hc = range("core-code HC", p.code_hc.0, code_len)?;
        let hma_hc = range("HMA HC", p.hma_hc.0, hma_len)?;
        // The RC window holds the HMA, then the core code's RC copy.
        let rc_len = hma_len
            .checked_add(code_len)
            .ok_or(PlacementError::LayoutTooLarge {
                what: "RC window",
                value: hma_len,
            })?;
        let rc = range("HMA RC", u64::from(p.hma_rc.0), rc_len)?;
        below4g("core-code physical", &code_phys)?;
        for t in &tables {
            below4g("intermediate tables", t)?;
        }
        // The RC view goes through 32-bit tables too.
        for h in &hma_phys {
            below4g("HMA physical", h)?;
        }
        below4g("HMA RC", &rc)?;
        if cfg.host_bits == 64 {
            for (what, r) in [("core-code HC", &code_hc), ("HMA HC", &hma_hc)] {
                // 48 bits, or 57 on a host with 5-level paging.
                let top_bit = if cfg.options.la57 { 56 } else { 47 };
                let canonical = |a: u64| {
                    let top = a >> top_bit;
                    top == 0 || top == u64::MAX >> top_bit
                };
                // Both ends in the same canonical half: no hole in between.
                let last = r.end.saturating_sub(1).max(r.start);
                if !canonical(r.start)
                    || !canonical(last)
                    || (r.start >> top_bit) != (last >> top_bit)
                {
                    return Err(PlacementError::NonCanonical {
                        what,
                        addr: r.start,
                    });
                }
            }
        } else {
            // 32-bit and PAE hosts run the HC code with 32-bit addresses.
            below4g("core-code HC", &code_hc)?;
            below4g("HMA HC", &hma_hc)?;
        }
        let mut phys = vec![("core-code physical", &code_phys)];
        phys.extend(hma_phys.iter().map(|h| ("HMA physical", h)));
        phys.extend(tables.iter().map(|t| ("intermediate tables", t)));
        no_overlaps(&phys, |_, _| false)?;
        // Virtual ranges that share the intermediate context must not collide;
        // the core code's HC and identity ranges may coincide exactly.
        let virt = [
            ("core-code HC", &code_hc),
            ("core-code identity", &code_phys),
            ("HMA RC", &rc),
        ];
        no_overlaps(&virt, |(_, ra), (b, rb)| {
            ra == rb && *b == "core-code identity"
        })?;
        no_overlaps(
            &[("core-code HC", &code_hc), ("HMA HC", &hma_hc)],
            |_, _| false,
        )
    }

    fn map_fixed(&mut self) -> Result<(), VmmError> {
        let p = self.cfg.placement;
        let len = self.core_len as u64;
        // Only long-mode code runs at an HC address above 4 GiB, and only
        // 5-level code at one canonical in 57 bits but not in 48 (`map`
        // leaves out the 5-level tables of a context without them).
        let hc_flavours = if !pgm_intermediate::is_canonical(p.code_hc.0) {
            Flavours::LA57
        } else if p.code_hc.0 >= 1 << 32 {
            Flavours::LONG | Flavours::LA57
        } else {
            Flavours::all()
        };
        map_into(
            &mut self.inter,
            "core code (HC)",
            (p.code_hc.0, p.code_phys.0, len),
            MapFlags::WRITABLE,
            hc_flavours,
        )?;
        if p.code_hc.0 != p.code_phys.0 {
            map_into(
                &mut self.inter,
                "core code (identity)",
                (p.code_phys.0, p.code_phys.0, len),
                MapFlags::WRITABLE,
                Flavours::all(),
            )?;
        }
        for m in &self.cfg.extra_mappings {
            let mut f = MapFlags::WRITABLE;
            if m.uncached {
                f |= MapFlags::CACHE_DISABLE;
            }
            let range = (m.virt, m.phys, m.len);
            map_into(&mut self.inter, "extra mapping", range, f, Flavours::all())?;
            map_into(
                &mut self.hyper,
                "extra mapping (hyper)",
                range,
                f,
                Flavours::all(),
            )?;
        }
        Ok(())
    }

    /// RC address of the core code's RC copy (right after the HMA).
    fn code_rc(&self) -> Result<RcAddr, PlacementError> {
        self.rc(self.hma_layout.size).map(RcAddr)
    }

    /// The ranges the RC view adds to both sets of tables: the names they carry
    /// in the switcher's tables and in the hyper context's, and `(virt, phys, len)`.
    ///
    /// The HMA is one range per run of physically adjacent pages: RC page
    /// *i* maps to [`Vmm::hma_pages`]`[i]`.
    fn rc_ranges(&self) -> Result<Vec<RcRange>, PlacementError> {
        let p = self.cfg.placement;
        let hma = u64::from(self.hma_layout.size);
        let code_rc = u64::from(self.code_rc()?.0);
        let page = u64::from(PAGE);
        let mut ranges: Vec<RcRange> = Vec::new();
        for (i, phys) in (0u64..).zip(&self.hma_pages) {
            let off = i * page;
            let len = page.min(hma.saturating_sub(off));
            if let Some((_, _, (_, run_phys, run_len))) = ranges.last_mut() {
                if run_phys.checked_add(*run_len) == Some(phys.0) {
                    *run_len += len;
                    continue;
                }
            }
            ranges.push((
                "hypervisor area (RC)",
                "hypervisor area (hyper RC)",
                (u64::from(p.hma_rc.0) + off, phys.0, len),
            ));
        }
        ranges.push((
            "core code (RC)",
            "core code (hyper RC)",
            (code_rc, p.code_phys.0, self.core_len as u64),
        ));
        Ok(ranges)
    }

    /// Maps the RC ranges into the switcher's tables, then into the hyper
    /// context's (what RC code sees under `Hyper.cr3`).
    fn map_rc(&mut self) -> Result<(), VmmError> {
        let ranges = self.rc_ranges()?;
        for (tables, hyper) in [(&mut self.inter, false), (&mut self.hyper, true)] {
            for &(inter_what, hyper_what, range) in &ranges {
                let what = if hyper { hyper_what } else { inter_what };
                map_into(tables, what, range, MapFlags::WRITABLE, Flavours::all())?;
            }
        }
        Ok(())
    }

    fn unmap_rc(&mut self) -> Result<(), VmmError> {
        let ranges = self.rc_ranges()?;
        for (tables, hyper) in [(&mut self.inter, false), (&mut self.hyper, true)] {
            for &(inter_what, hyper_what, (virt, _, len)) in &ranges {
                let what = if hyper { hyper_what } else { inter_what };
                tables
                    .unmap(virt, len, Flavours::all())
                    .map_err(|source| VmmError::InterUnmap { what, source })?;
            }
        }
        Ok(())
    }

    /// RC address of HMA offset `off`.
    fn rc(&self, off: u32) -> Result<u32, PlacementError> {
        let base = self.cfg.placement.hma_rc.0;
        base.checked_add(off).ok_or(PlacementError::Above4G {
            what: "HMA RC",
            start: u64::from(base),
            end: u64::from(base) + u64::from(off),
        })
    }

    /// HC address of HMA offset `off`.
    fn hc(&self, off: u32) -> Result<u64, PlacementError> {
        let base = self.cfg.placement.hma_hc.0;
        base.checked_add(u64::from(off))
            .ok_or(PlacementError::Wraps {
                what: "HMA HC",
                start: base,
                len: u64::from(off),
            })
    }

    /// Writes the parts of the VM structure and HMA that depend on the RC base.
    fn init_vm(&mut self, first: bool) -> Result<(), VmmError> {
        self.write_fixed(first)?;
        for i in 0..self.cfg.vcpus {
            self.init_vcpu(i, first)?;
        }
        self.write_gdt_and_tss()
    }

    /// The VM header and the VM-wide CPUM fields.
    fn write_fixed(&mut self, first: bool) -> Result<(), VmmError> {
        let l = self.hma_layout;
        let mut fixed = VmFixed::read_from_prefix(self.hma_ref())
            .map(|(f, _)| f)
            .unwrap_or_else(|_| VmFixed::new_zeroed_fixed());
        fixed.header.magic = layout::VM_MAGIC;
        fixed.header.version = layout::VM_VERSION;
        fixed.header.cb_self = l.vm_size;
        fixed.header.cpu_count = self.cfg.vcpus;
        fixed.header.off_cpum = layout::OFF_CPUM as u32;
        fixed.header.vm_rc = self.rc(l.vm)?;
        fixed.header.vm_hc = self.hc(l.vm)?;
        if first {
            fixed.header.stat_switcher_to_gc = Default::default();
            fixed.header.stat_switcher_to_hc = Default::default();
        }
        fixed.cpum.off_cpumcpu0 = layout::OFF_CPUMCPU0 as u32;
        fixed.cpum.cb_cpumcpu = CPUMCPU_SIZE as u32;
        fixed.cpum.cpu_count = self.cfg.vcpus;
        let mut use_flags = cpum::UseFlags::empty();
        if self.cfg.cpu.host_sysenter {
            use_flags |= cpum::UseFlags::USE_SYSENTER;
        }
        if self.cfg.cpu.host_syscall {
            use_flags |= cpum::UseFlags::USE_SYSCALL;
        }
        fixed.cpum.host_use_flags = use_flags.bits();
        fixed.cpum.hyper_tss_sel0 = u32::from(layout::sel::TSS);
        // Hyper CR4 = (host CR4 & (MCE|PSE|PAE|VMXE)) | (Guest.cr4 & and) | or.
        let (and, or) = if self.cfg.cpu.fxsr {
            (Cr4::OSXMMEXCPT | Cr4::PVI | Cr4::VME, Cr4::OSFXSR)
        } else {
            (Cr4::PVI | Cr4::VME, Cr4::empty())
        };
        fixed.cpum.cr4_and_mask = and.bits() as u32;
        fixed.cpum.cr4_or_mask = or.bits() as u32;
        self.hma_slice(0, size_of::<VmFixed>())?
            .copy_from_slice(fixed.as_bytes());
        Ok(())
    }

    /// VCPU `i`'s hyper context: GDTR, IDTR, TR, stack, segments and, once
    /// a switcher is active, its CR3 and CS.
    fn init_vcpu(&mut self, i: u32, first: bool) -> Result<(), VmmError> {
        let l = self.hma_layout;
        let vcpus = self.vcpus_u8()?;
        let gdt_limit = layout::sel::gdt_limit(vcpus);
        let idt_rc = u64::from(self.rc(l.idt)?);
        let active = self.active;
        let la57 = self.cfg.options.la57;
        let cr3 = active.map(|k| match (target_flavour(k), self.hyper.cr3_la57()) {
            // A 64-bit hypervisor context on a 5-level host is 5-level too:
            // long mode is never left, so LA57 cannot change.
            (Flavour::Long, Some(pml5)) if la57 => pml5,
            (f, _) => self.hyper.cr3(f),
        });
        let old_rc_base = self.cpumcpu(i)?.hyper().gdtr.base.get();
        let rc_gdt = u64::from(self.rc(l.gdt)?);
        let stack_top = self.rc(self.stack_top(i)?)?;
        let helper = self.rc(l.helper)?;
        let off_cpum = self.vcpu_arg(i)?;
        let tr = layout::sel::try_tss(i).ok_or(VmmError::NoSuchVcpu {
            index: i,
            count: self.cfg.vcpus,
        })?;
        self.with_cpumcpu(i, |c| {
            c.off_cpum = off_cpum;
            c.hyper.gdtr = Xdtr64::new(rc_gdt, gdt_limit);
            // 64-bit gates are 16 bytes: the IDT page holds 256 of either size.
            let gate = if active == Some(SwitcherKind::Amd64ToAmd64) {
                16
            } else {
                8
            };
            c.hyper.idtr = Xdtr64::new(idt_rc, 256 * gate - 1);
            c.hyper.tr = SelSlot::new(tr);
            c.hyper.rsp = u64::from(stack_top);
            c.hyper.lss_ss = SelSlot::new(layout::sel::DS);
            c.hyper.ds = SelSlot::new(layout::sel::DS);
            c.hyper.ss = SelSlot::new(layout::sel::DS);
            if first {
                c.hyper.rflags = cpum::regs::Eflags::RA1.bits();
                c.stat_to_gc = Default::default();
                c.stat_to_hc = Default::default();
            }
            if let (Some(kind), Some(cr3)) = (active, cr3) {
                c.hyper.cr3 = u64::from(cr3);
                let long = target_flavour(kind) == Flavour::Long;
                c.hyper.cs = SelSlot::new(if long {
                    layout::sel::CS64
                } else {
                    layout::sel::CS
                });
            }
            // A helper entry inside the old HMA moves with it.
            if c.hyper.rip == 0 {
                c.hyper.rip = u64::from(helper);
            } else if old_rc_base != 0 {
                c.hyper.rip = c.hyper.rip.wrapping_sub(old_rc_base).wrapping_add(rc_gdt);
            }
        })
    }

    /// The hyper GDT and every VCPU's TSS (SS0:ESP0 on its stack, no I/O bitmap).
    fn write_gdt_and_tss(&mut self) -> Result<(), VmmError> {
        let l = self.hma_layout;
        let vcpus = self.vcpus_u8()?;
        let mut tss_rc = Vec::with_capacity(usize::from(vcpus));
        for i in 0..self.cfg.vcpus {
            tss_rc.push(self.rc(self.tss_of(i)?)?);
        }
        let gdt = layout::hyper_gdt(|i| tss_rc.get(i as usize).copied().unwrap_or(0), vcpus);
        let bytes = gdt.as_bytes();
        self.hma_slice(l.gdt as usize, bytes.len())?
            .copy_from_slice(bytes);
        for i in 0..self.cfg.vcpus {
            let t = self.tss_of(i)? as usize;
            let esp0 = self.rc(self.stack_top(i)?)?;
            let tss = self.hma_slice(t, TSS_SIZE as usize)?;
            tss[4..8].copy_from_slice(&esp0.to_le_bytes());
            tss[8..10].copy_from_slice(&layout::sel::DS.to_le_bytes());
            tss[102..104].copy_from_slice(&104u16.to_le_bytes());
        }
        Ok(())
    }

    /// The VCPU count as the selector helpers take it (at most [`layout::MAX_VCPUS`]).
    fn vcpus_u8(&self) -> Result<u8, PlacementError> {
        u8::try_from(self.cfg.vcpus)
            .ok()
            .filter(|&v| u32::from(v) <= layout::MAX_VCPUS)
            .ok_or(PlacementError::VcpuCount(self.cfg.vcpus))
    }

    /// HMA offset of the top of VCPU `i`'s stack.
    fn stack_top(&self, i: u32) -> Result<u32, VmmError> {
        self.hma_layout.stack_top(i).ok_or(VmmError::NoSuchVcpu {
            index: i,
            count: self.cfg.vcpus,
        })
    }

    /// HMA offset of VCPU `i`'s TSS.
    fn tss_of(&self, i: u32) -> Result<u32, VmmError> {
        self.hma_layout.tss_of(i).ok_or(VmmError::NoSuchVcpu {
            index: i,
            count: self.cfg.vcpus,
        })
    }

    /// `len` bytes of the HMA image at `off`.
    fn hma_slice(&mut self, off: usize, len: usize) -> Result<&mut [u8], VmmError> {
        let cap = self.hma_len;
        off.checked_add(len)
            .filter(|&end| end <= cap)
            .and_then(|end| self.hma.as_mut().get_mut(off..end))
            .ok_or(VmmError::HmaRange { off, len, cap })
    }

    fn relocate_all(&mut self) -> Result<(), VmmError> {
        let p = self.cfg.placement;
        let code_rc = self.code_rc()?;
        let vm_rc = RcAddr(self.rc(self.hma_layout.vm)?);
        let vm_hc = HcAddr(self.hc(self.hma_layout.vm)?);
        let gdt_rc = RcAddr(self.rc(self.hma_layout.gdt)?);
        let inter_cr3 = InterCr3 {
            legacy32: PhysAddr(u64::from(self.inter.cr3_32())),
            pae: PhysAddr(u64::from(self.inter.cr3_pae())),
            amd64: PhysAddr(u64::from(self.inter.cr3_amd64())),
            la57: self.inter.cr3_la57().map(|a| PhysAddr(u64::from(a))),
        };
        let cpum_size = cpum_size(self.cfg.vcpus)?;
        for sw in &mut self.switchers {
            let at = |what: &'static str, base: u64| {
                base.checked_add(u64::from(sw.offset))
                    .ok_or(PlacementError::Wraps {
                        what,
                        start: base,
                        len: u64::from(sw.offset),
                    })
            };
            let ctx = RelocContext {
                code_hc: HcAddr(at("core-code HC", p.code_hc.0)?),
                code_id: PhysAddr(at("core-code physical", p.code_phys.0)?),
                code_rc: code_rc
                    .checked_add(sw.offset)
                    .ok_or(PlacementError::Above4G {
                        what: "core code (RC)",
                        start: u64::from(code_rc.0),
                        end: u64::from(code_rc.0) + u64::from(sw.offset),
                    })?,
                vm_hc,
                vm_rc,
                vm_size: self.hma_layout.vm_size,
                cpum_off: layout::OFF_CPUM as u32,
                cpum_size,
                cpumcpu0_off: layout::OFF_CPUMCPU0 as u32,
                inter_cr3,
                sel: HyperSelectors {
                    // A 64-bit hypervisor context is entered with the 64-bit
                    // code selector; every other one with the 32-bit one.
                    cs: if sw.def.kind == SwitcherKind::Amd64ToAmd64 {
                        layout::sel::CS64
                    } else {
                        layout::sel::CS
                    },
                    ds: layout::sel::DS,
                    tss: layout::sel::TSS,
                    cs64: layout::sel::CS64,
                },
                gdt_rc,
                cpu: self.cfg.cpu,
                apic_rc: None,
            };
            let start = sw.offset as usize;
            let cap = self.core_len;
            let len = sw.def.code.len();
            let buf = start
                .checked_add(len)
                .and_then(|end| self.core.as_mut().get_mut(start..end))
                .ok_or(VmmError::CoreRange {
                    off: start,
                    len,
                    cap,
                })?;
            let reloc = relocate(&sw.def, buf, &ctx).map_err(|source| VmmError::Relocate {
                kind: sw.def.kind,
                source,
            })?;
            sw.entries = reloc.entries;
            sw.reloc = reloc;
            sw.ctx = ctx;
        }
        Ok(())
    }

    /// Moves the hypervisor area to `new_rc`: remaps it (and the core code's RC
    /// copy) in the intermediate context, rewrites the RC-dependent VM fields
    /// and relocates every switcher again.
    ///
    /// Helper code written with [`Vmm::write_helper`] keeps its bytes: it must
    /// be position-independent or be rewritten by the caller.
    ///
    /// Moving to the current address relocates in place; a new RC window
    /// (the HMA, then the core code's RC copy) that overlaps the current
    /// one is refused ([`PlacementError::HmaMoveOverlaps`]), as is RC 0
    /// ([`PlacementError::ZeroHmaRc`]).
    ///
    /// # Errors
    /// The new placement is invalid or conflicts; the core is then unchanged
    /// only if the error is a [`PlacementError`].
    pub fn relocate_hma(&mut self, new_rc: RcAddr) -> Result<(), VmmError> {
        let mut cfg = self.cfg.clone();
        cfg.placement.hma_rc = new_rc;
        let hma_len = u64::from(self.hma_layout.size);
        let tables: Vec<u64> = self
            .inter
            .allocator()
            .all_phys()
            .chain(self.hyper.allocator().all_phys())
            .collect();
        let hma_pages: Vec<u64> = self.hma_pages.iter().map(|p| p.0).collect();
        Self::check_placement(
            &cfg,
            self.core_len as u64,
            (hma_len, Tables::Pages(&hma_pages)),
            Tables::Pages(&tables),
        )?;
        let window = hma_len.saturating_add(self.core_len as u64);
        let old_rc = u64::from(self.cfg.placement.hma_rc.0);
        let old = old_rc..old_rc.saturating_add(window);
        let new = u64::from(new_rc.0)..u64::from(new_rc.0).saturating_add(window);
        if old != new && overlap(&old, &new) {
            return Err(PlacementError::HmaMoveOverlaps { old, new }.into());
        }
        self.unmap_rc()?;
        self.cfg = cfg;
        self.addrs = self.compute_addrs()?;
        self.map_rc()?;
        self.init_vm(false)?;
        self.relocate_all()
    }

    /// The configuration.
    pub fn config(&self) -> &VmmConfig {
        &self.cfg
    }

    /// The HMA layout.
    pub fn hma_layout(&self) -> &HmaLayout {
        &self.hma_layout
    }

    /// The relocated core-code block (copy to `placement.code_phys`, or
    /// already there when the provider's mapping is the embedder's memory).
    pub fn core_code(&self) -> &[u8] {
        let m = self.core.as_ref();
        m.get(..self.core_len).unwrap_or(m)
    }

    /// The hypervisor-area image as the host sees it at
    /// `placement.hma_hc`: 4 KiB page *i* belongs at [`Vmm::hma_pages`]`[i]`
    /// (copy it there, or it is already there when the provider's mapping
    /// is the embedder's memory).
    pub fn hma(&self) -> &[u8] {
        self.hma_ref()
    }

    /// The physical page of each 4 KiB page of the hypervisor area, in
    /// order: what the core maps RC page *i* to and where the embedder maps
    /// HC page *i*.
    pub fn hma_pages(&self) -> &[PhysAddr] {
        &self.hma_pages
    }

    fn hma_ref(&self) -> &[u8] {
        let m = self.hma.as_ref();
        m.get(..self.hma_len).unwrap_or(m)
    }

    /// The hyper context's tables, for walks and inspection.
    pub fn hyper_context(&self) -> &IntermediateContext<TablePool<P::Mapping>> {
        &self.hyper
    }

    /// Prepares every VCPU's hyper context for `kind`: `Hyper.cr3` of its
    /// shadow paging flavour and the matching hyper CS.
    ///
    /// # Errors
    /// The switcher is not available.
    pub fn activate(&mut self, kind: SwitcherKind) -> Result<&Installed, VmmError> {
        self.switcher(kind)?;
        self.active = Some(kind);
        self.init_vm(false)?;
        Ok(self.switcher(kind)?)
    }

    /// Writes a call-trampoline frame for VCPU `index` at the top of its hyper
    /// stack and points `Hyper.eip` at the trampoline of `kind` (VirtualBox's
    /// `CPUMPushHyper` + `Hyper.eip = trampoline`). Returns the new `Hyper.esp`.
    ///
    /// # Errors
    /// No such VCPU or switcher, or too many arguments for the stack.
    pub fn push_trampoline_call(
        &mut self,
        kind: SwitcherKind,
        index: u32,
        target: RcAddr,
        args: &[u32],
    ) -> Result<u32, VmmError> {
        let tramp = self.switcher(kind)?.entries.rc_call_trampoline;
        // Refuse a missing VCPU before anything is written.
        self.cpumcpu_range(index)?;
        let top = self.stack_top(index)?;
        let cap = layout::STACK_PAGES * PAGE / 2;
        let len = args.len().saturating_add(2).saturating_mul(4);
        let bytes = u32::try_from(len)
            .ok()
            .filter(|&b| b <= cap)
            .ok_or(VmmError::HelperTooLarge { len, cap })?;
        let words = layout::trampoline_frame(target.0, args);
        // `bytes` is at most half a stack, so the frame stays on VCPU `index`'s stack.
        let at = top - bytes;
        self.hma_slice(at as usize, len)?
            .copy_from_slice(words.as_bytes());
        let rsp = self.rc(at)?;
        self.with_cpumcpu(index, |c| {
            c.hyper.rsp = u64::from(rsp);
            c.hyper.rip = u64::from(tramp.0);
        })?;
        Ok(rsp)
    }

    /// Installs 32-bit interrupt gates (hyper CS, DPL 0) in the hyper IDT:
    /// `(vector, RC handler address)` pairs.
    pub fn set_hyper_idt_gates(&mut self, gates: &[(u8, RcAddr)]) {
        let base = self.hma_layout.idt as usize;
        for (vector, handler) in gates {
            let h = handler.0;
            let mut g = [0u8; 8];
            g[0..2].copy_from_slice(&(h as u16).to_le_bytes());
            g[2..4].copy_from_slice(&layout::sel::CS.to_le_bytes());
            g[5] = 0x8e;
            g[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
            let at = base + usize::from(*vector) * 8;
            // 256 gates of 8 bytes fill at most the IDT page.
            if let Some(slot) = self.hma.as_mut().get_mut(at..at + 8) {
                slot.copy_from_slice(&g);
            }
        }
    }

    /// Installs 64-bit interrupt gates (64-bit hyper CS, DPL 0, no IST) in the
    /// hyper IDT, for a 64-bit hypervisor context.
    pub fn set_hyper_idt_gates64(&mut self, gates: &[(u8, RcAddr)]) {
        let base = self.hma_layout.idt as usize;
        for (vector, handler) in gates {
            let h = u64::from(handler.0);
            let mut g = [0u8; 16];
            g[0..2].copy_from_slice(&(h as u16).to_le_bytes());
            g[2..4].copy_from_slice(&layout::sel::CS64.to_le_bytes());
            g[5] = 0x8e;
            g[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
            g[8..12].copy_from_slice(&((h >> 32) as u32).to_le_bytes());
            let at = base + usize::from(*vector) * 16;
            // 256 gates of 16 bytes fill exactly the IDT page.
            if let Some(slot) = self.hma.as_mut().get_mut(at..at + 16) {
                slot.copy_from_slice(&g);
            }
        }
    }

    /// The intermediate context, for walks and inspection.
    pub fn intermediate(&self) -> &IntermediateContext<TablePool<P::Mapping>> {
        &self.inter
    }

    /// Every installed switcher.
    pub fn switchers(&self) -> &[Installed] {
        &self.switchers
    }

    /// The installed switcher of `kind`.
    ///
    /// # Errors
    /// [`SelectError::Unavailable`] when this build has no such switcher.
    pub fn switcher(&self, kind: SwitcherKind) -> Result<&Installed, SelectError> {
        self.switchers
            .iter()
            .find(|s| s.def.kind == kind)
            .ok_or(SelectError::Unavailable { kind })
    }

    /// The stub for `host`'s bitness, which VirtualBox selects whenever the
    /// hypervisor context is not used (raw mode off).
    ///
    /// # Errors
    /// [`SelectError::HostWidth`] when the core was not built for `host`.
    pub fn select_stub(&self, host: HostPagingMode) -> Result<SwitcherKind, SelectError> {
        self.serves(host)?;
        Ok(mode::stub_for(host))
    }

    /// Whether this core serves `host`: AMD64 hosts need a core built for
    /// 64-bit hosts, legacy and PAE hosts one built for 32-bit hosts.
    ///
    /// # Errors
    /// [`SelectError::HostWidth`] naming the host mode and the core's width.
    pub fn serves(&self, host: HostPagingMode) -> Result<(), SelectError> {
        let bits = if host.family() == mode::HostFamily::Amd64 {
            64
        } else {
            32
        };
        if bits != self.cfg.host_bits {
            return Err(SelectError::HostWidth {
                host,
                core_bits: self.cfg.host_bits,
            });
        }
        Ok(())
    }

    /// The switcher for `host` and `guest` under `prefs` (stubs when the
    /// hypervisor context is not used, a forced 32-bit shadow).
    ///
    /// # Errors
    /// [`SelectError::HostWidth`] when the core was not built for `host`;
    /// the choice is not available.
    pub fn select_with(
        &self,
        host: HostPagingMode,
        guest: GuestMode,
        prefs: mode::SelectPrefs,
    ) -> Result<SwitcherKind, SelectError> {
        self.serves(host)?;
        mode::select_with(host, guest, prefs, available_for(self.cfg.host_bits))
    }

    /// The switcher VirtualBox's table chooses for `host` and `guest`.
    ///
    /// # Errors
    /// [`SelectError::HostWidth`] when the core was not built for `host`
    /// (a 32-bit core asked about an AMD64 host or the reverse).
    pub fn select(
        &self,
        host: HostPagingMode,
        guest: GuestMode,
    ) -> Result<SwitcherKind, SelectError> {
        self.serves(host)?;
        mode::select(host, guest, available_for(self.cfg.host_bits))
    }

    /// The VM header.
    pub fn header(&self) -> VmHeader {
        VmFixed::read_from_prefix(self.hma_ref())
            .map(|(f, _)| f.header)
            .unwrap_or_else(|_| VmFixed::new_zeroed_fixed().header)
    }

    fn cpumcpu_range(&self, index: u32) -> Result<Range<usize>, VmmError> {
        if index >= self.cfg.vcpus {
            return Err(VmmError::NoSuchVcpu {
                index,
                count: self.cfg.vcpus,
            });
        }
        let off = layout::off_cpumcpu(index).ok_or(VmmError::NoSuchVcpu {
            index,
            count: self.cfg.vcpus,
        })?;
        let start = layout::OFF_CPUM + off as usize;
        Ok(start..start + CPUMCPU_SIZE)
    }

    /// A copy of VCPU `index`'s `CPUMCPU` as the variant of the core's host
    /// width ([`VmmConfig::host_bits`]).
    ///
    /// # Errors
    /// No such VCPU.
    pub fn cpumcpu(&self, index: u32) -> Result<VcpuCpum, VmmError> {
        Ok(if self.cfg.host_bits == 64 {
            VcpuCpum::Host64(self.cpumcpu_as(index)?)
        } else {
            VcpuCpum::Host32(self.cpumcpu_as(index)?)
        })
    }

    /// A copy of VCPU `index`'s `CPUMCPU` as `V`: [`CpumCpu32`] on a core
    /// for 32-bit hosts, [`CpumCpu64`] on one for AMD64 hosts, or
    /// [`CpumCpuShared`] on either.
    ///
    /// # Errors
    /// No such VCPU, or [`VmmError::HostWidth`] for the other width's variant.
    pub fn cpumcpu_as<V: CpumCpuVariant>(&self, index: u32) -> Result<V, VmmError> {
        self.check_width::<V>()?;
        let r = self.cpumcpu_range(index)?;
        let (off, len, cap) = (r.start, r.len(), self.hma_len);
        let bytes = self
            .hma_ref()
            .get(r)
            .ok_or(VmmError::HmaRange { off, len, cap })?;
        V::read_from_bytes(bytes).map_err(|_| VmmError::HmaRange { off, len, cap })
    }

    /// Edits the fields of VCPU `index`'s `CPUMCPU` that both host widths
    /// share (`guest`, `hyper`, the flag words, the APIC state); `host` is
    /// opaque bytes here (use [`Vmm::with_cpumcpu_as`] for it).
    ///
    /// # Errors
    /// No such VCPU.
    pub fn with_cpumcpu<R>(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut CpumCpuShared) -> R,
    ) -> Result<R, VmmError> {
        self.with_cpumcpu_as(index, f)
    }

    /// Records the host APIC's version register (read once, when the VMM is
    /// set up on that CPU) in every VCPU's `CPUMCPU`: revision C of the
    /// switchers masks the thermal LVT only when its max-LVT field (bits
    /// 16..23) is at least 5, instead of reading the register on every
    /// switch. Left at 0, no thermal LVT is assumed.
    ///
    /// # Errors
    /// The HMA image cannot be written (none in practice).
    pub fn set_host_apic_version(&mut self, version: u32) -> Result<(), VmmError> {
        for i in 0..self.cfg.vcpus {
            self.with_cpumcpu(i, |c| c.apic_version = version)?;
        }
        Ok(())
    }

    /// Edits VCPU `index`'s `CPUMCPU` as `V` in the HMA image (see
    /// [`Vmm::cpumcpu_as`]).
    ///
    /// # Errors
    /// No such VCPU, or [`VmmError::HostWidth`] for the other width's variant.
    pub fn with_cpumcpu_as<V: CpumCpuVariant, R>(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut V) -> R,
    ) -> Result<R, VmmError> {
        let mut c: V = self.cpumcpu_as(index)?;
        let r = self.cpumcpu_range(index)?;
        let out = f(&mut c);
        self.hma_slice(r.start, r.len())?
            .copy_from_slice(c.as_bytes());
        Ok(out)
    }

    fn check_width<V: CpumCpuVariant>(&self) -> Result<(), VmmError> {
        if V::HOST_BITS != 0 && V::HOST_BITS != self.cfg.host_bits {
            return Err(VmmError::HostWidth {
                requested: V::HOST_BITS,
                core: self.cfg.host_bits,
            });
        }
        Ok(())
    }

    /// The C entry's second argument for VCPU `index` (offset of its
    /// `CpumCpu32` from `Cpum`).
    ///
    /// # Errors
    /// [`VmmError::NoSuchVcpu`] for an index past the VCPU count.
    pub fn vcpu_arg(&self, index: u32) -> Result<u32, VmmError> {
        self.cpumcpu_range(index)?;
        layout::off_cpumcpu(index).ok_or(VmmError::NoSuchVcpu {
            index,
            count: self.cfg.vcpus,
        })
    }

    /// RC address, physical address and size of the helper-code area.
    pub fn helper_area(&self) -> (RcAddr, PhysAddr, u32) {
        let a = &self.addrs;
        (a.helper_rc, a.helper_phys, self.hma_layout.helper_size)
    }

    /// Copies helper code into the helper area.
    ///
    /// # Errors
    /// The code does not fit.
    pub fn write_helper(&mut self, code: &[u8]) -> Result<(), VmmError> {
        let l = self.hma_layout;
        if code.len() > l.helper_size as usize {
            return Err(VmmError::HelperTooLarge {
                len: code.len(),
                cap: l.helper_size,
            });
        }
        self.hma_slice(l.helper as usize, code.len())?
            .copy_from_slice(code);
        Ok(())
    }

    /// The VM structure's bytes (the start of the HMA image).
    pub fn vm_image(&self) -> &[u8] {
        let l = &self.hma_layout;
        let start = l.vm as usize;
        start
            .checked_add(l.vm_size as usize)
            .and_then(|end| self.hma_ref().get(start..end))
            .unwrap_or_default()
    }

    /// The VM's STAM registry (see [`stats`]).
    ///
    /// # Errors
    /// A registration failed (a bug).
    pub fn stam(&self) -> Result<stats::VmStats, stam::StamError> {
        stats::VmStats::new(self.cfg.vcpus)
    }

    /// Addresses of the VM structure in each view.
    pub fn vm_addrs(&self) -> (HcAddr, RcAddr, PhysAddr) {
        let a = &self.addrs;
        (a.vm_hc, a.vm_rc, a.vm_phys)
    }

    /// The addresses [`Vmm::vm_addrs`] and [`Vmm::helper_area`] report, for
    /// the current placement.
    fn compute_addrs(&self) -> Result<Addrs, VmmError> {
        let l = &self.hma_layout;
        let phys = |off: u32| {
            let page = self.hma_pages.get((off / PAGE) as usize);
            let at = page.map(|p| PhysAddr(p.0 + u64::from(off % PAGE)));
            at.ok_or(PlacementError::LayoutTooLarge {
                what: "HMA offset",
                value: u64::from(off),
            })
        };
        Ok(Addrs {
            vm_hc: HcAddr(self.hc(l.vm)?),
            vm_rc: RcAddr(self.rc(l.vm)?),
            vm_phys: phys(l.vm)?,
            helper_rc: RcAddr(self.rc(l.helper)?),
            helper_phys: phys(l.helper)?,
        })
    }
}

/// Addresses derived from the placement, computed (checked) whenever it changes.
#[derive(Clone, Copy, Debug, Default)]
struct Addrs {
    vm_hc: HcAddr,
    vm_rc: RcAddr,
    vm_phys: PhysAddr,
    helper_rc: RcAddr,
    helper_phys: PhysAddr,
}

/// Maps `(virt, phys, len)` into one set of intermediate tables, naming the
/// range in the error.
fn map_into<M: AsRef<[u8]> + AsMut<[u8]>>(
    tables: &mut IntermediateContext<TablePool<M>>,
    what: &'static str,
    (virt, phys, len): (u64, u64, u64),
    flags: MapFlags,
    flavours: Flavours,
) -> Result<(), VmmError> {
    tables
        .map(virt, phys, len, flags, flavours)
        .map_err(|source| VmmError::InterMap { what, source })
}

trait ZeroedFixed {
    fn new_zeroed_fixed() -> Self;
}

impl ZeroedFixed for VmFixed {
    fn new_zeroed_fixed() -> Self {
        <VmFixed as zerocopy::FromZeros>::new_zeroed()
    }
}
