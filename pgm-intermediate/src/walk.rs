//! The software page walker and the mapping lister.

use heap::vec::Vec;

use crate::{EntryFlags, Flavour, Level, MapFlags, MemoryError, PageSize, TableMemory, FOUR_GIB};

/// One level of a flavour's hierarchy: which linear-address bits index it,
/// and whether a PS = 1 entry at this level ends the walk in a large page.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LevelSpec {
    pub(crate) level: Level,
    pub(crate) shift: u32,
    pub(crate) index_bits: u32,
    pub(crate) large: Option<PageSize>,
}

impl LevelSpec {
    pub(crate) const fn index(&self, virt: u64) -> u64 {
        (virt >> self.shift) & ((1 << self.index_bits) - 1)
    }
}

const fn spec(level: Level, shift: u32, index_bits: u32, large: Option<PageSize>) -> LevelSpec {
    LevelSpec {
        level,
        shift,
        index_bits,
        large,
    }
}

/// SDM §4.3: bits 31:22 index the PD, 21:12 the PT; PS = 1 in a PDE maps 4 MiB.
const LEGACY32: [LevelSpec; 2] = [
    spec(Level::Pd, 22, 10, Some(PageSize::Size4M)),
    spec(Level::Pt, 12, 10, None),
];
/// SDM §4.4: bits 31:30 index the PDPT, 29:21 the PD, 20:12 the PT.
const PAE: [LevelSpec; 3] = [
    spec(Level::Pdpt, 30, 2, None),
    spec(Level::Pd, 21, 9, Some(PageSize::Size2M)),
    spec(Level::Pt, 12, 9, None),
];
/// SDM §4.5: bits 47:39, 38:30, 29:21 and 20:12.
const LONG: [LevelSpec; 4] = [
    spec(Level::Pml4, 39, 9, None),
    spec(Level::Pdpt, 30, 9, Some(PageSize::Size1G)),
    spec(Level::Pd, 21, 9, Some(PageSize::Size2M)),
    spec(Level::Pt, 12, 9, None),
];

/// SDM §4.5 with CR4.LA57: bits 56:48 index the PML5, then as [`LONG`].
const LA57: [LevelSpec; 5] = [
    spec(Level::Pml5, 48, 9, None),
    spec(Level::Pml4, 39, 9, None),
    spec(Level::Pdpt, 30, 9, Some(PageSize::Size1G)),
    spec(Level::Pd, 21, 9, Some(PageSize::Size2M)),
    spec(Level::Pt, 12, 9, None),
];

pub(crate) const fn levels(flavour: Flavour) -> &'static [LevelSpec] {
    match flavour {
        Flavour::Legacy32 => &LEGACY32,
        Flavour::Pae => &PAE,
        Flavour::Long => &LONG,
        Flavour::La57 => &LA57,
    }
}

/// Physical-address bits of a table pointer in an entry.
pub(crate) const fn table_addr_mask(flavour: Flavour) -> u64 {
    match flavour {
        Flavour::Legacy32 => 0xffff_f000,
        Flavour::Pae | Flavour::Long | Flavour::La57 => 0x000f_ffff_ffff_f000,
    }
}

/// Physical-address bits of CR3 for `flavour` (the PAE PDPT is only
/// 32-byte aligned).
pub(crate) const fn root_addr_mask(flavour: Flavour) -> u64 {
    match flavour {
        Flavour::Legacy32 => 0xffff_f000,
        Flavour::Pae => 0xffff_ffe0,
        Flavour::Long | Flavour::La57 => 0x000f_ffff_ffff_f000,
    }
}

/// Bits of a PAE PDPTE that must be zero (only P, PWT, PCD, the ignored bits
/// 11:9 and the address may be set; SDM §4.4.1, Table 4-8).
const PAE_PDPTE_RESERVED: u64 = 0xfff0_0000_0000_01e6;
/// Address bits between PAT (bit 12) and the page base that must be zero.
const LARGE_2M_RESERVED: u64 = 0x1f_e000;
const LARGE_1G_RESERVED: u64 = 0x3fff_e000;
/// 32-bit 4 MiB PDE: bits 20:13 are physical-address bits 39:32 (PSE-36);
/// bit 21 is reserved with a 40-bit MAXPHYADDR.
const LARGE_4M_RESERVED: u64 = 1 << 21;

/// Reads an entry of `flavour`'s width.
pub(crate) fn read_entry<M: TableMemory + ?Sized>(
    mem: &M,
    flavour: Flavour,
    addr: u64,
) -> Result<u64, MemoryError> {
    match flavour {
        Flavour::Legacy32 => mem.read_u32(addr).map(u64::from),
        Flavour::Pae | Flavour::Long | Flavour::La57 => mem.read_u64(addr),
    }
}

/// A walk could not produce a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WalkError {
    /// The address is not a linear address of the flavour.
    #[error("{virt:#x} is not a {flavour} linear address")]
    VirtOutOfRange {
        /// The address.
        virt: u64,
        /// The flavour walked.
        flavour: Flavour,
    },
    /// An entry on the way has P = 0 (the CPU raises #PF).
    #[error("{virt:#x} is not mapped ({flavour}): the {level} entry is not present")]
    NotPresent {
        /// The address.
        virt: u64,
        /// The flavour walked.
        flavour: Flavour,
        /// The level whose entry is not present.
        level: Level,
    },
    /// An entry has reserved bits set (the CPU raises #PF with RSVD, or #GP
    /// when loading a PAE PDPT).
    #[error("{flavour} {level} entry {entry:#x} for {virt:#x} has reserved bits set")]
    Reserved {
        /// The address.
        virt: u64,
        /// The flavour walked.
        flavour: Flavour,
        /// The level of the bad entry.
        level: Level,
        /// The entry.
        entry: u64,
    },
    /// A table the walk reached is not in the table memory.
    #[error("cannot read the {level} entry for {virt:#x} ({flavour})")]
    Memory {
        /// The address.
        virt: u64,
        /// The flavour walked.
        flavour: Flavour,
        /// The level whose table could not be read.
        level: Level,
        /// The failed access.
        #[source]
        source: MemoryError,
    },
}

/// One entry the walker read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalkStep {
    /// The level of the table.
    pub level: Level,
    /// Physical address of the table.
    pub table: u64,
    /// Index of the entry in the table.
    pub index: u16,
    /// The entry (zero-extended for 32-bit tables).
    pub entry: u64,
}

impl WalkStep {
    /// Physical address of the entry.
    pub fn entry_addr(&self, flavour: Flavour) -> u64 {
        self.table + u64::from(self.index) * flavour.entry_size()
    }

    /// The entry's bits as [`EntryFlags`], unknown bits kept.
    pub fn flags(&self) -> EntryFlags {
        EntryFlags::from_bits_retain(self.entry)
    }
}

/// The entries a walk read, root first (at most five).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalkPath {
    steps: [WalkStep; 5],
    len: usize,
}

impl WalkPath {
    const fn new() -> Self {
        const EMPTY: WalkStep = WalkStep {
            level: Level::Pml4,
            table: 0,
            index: 0,
            entry: 0,
        };
        Self {
            steps: [EMPTY; 5],
            len: 0,
        }
    }

    fn push(&mut self, step: WalkStep) {
        if let Some(slot) = self.steps.get_mut(self.len) {
            *slot = step;
            self.len += 1;
        }
    }

    /// The steps, root first.
    pub fn steps(&self) -> &[WalkStep] {
        self.steps.get(..self.len).unwrap_or(&[])
    }

    /// The final (leaf) step.
    pub fn leaf(&self) -> Option<&WalkStep> {
        self.steps().last()
    }
}

/// Where a linear address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The linear address walked.
    pub virt: u64,
    /// The physical address it translates to (page base + offset).
    pub phys: u64,
    /// Size of the page it lies in.
    pub page_size: PageSize,
    /// The leaf entry's own attributes (what `map` was given).
    pub flags: MapFlags,
    /// Effective R/W: set at every level that has the bit.
    pub writable: bool,
    /// Effective U/S: set at every level that has the bit.
    pub user: bool,
    /// Effective XD: set at any level (never for 32-bit paging).
    pub no_execute: bool,
    /// The entries read, root first.
    pub path: WalkPath,
}

/// Walk `flavour`'s tables rooted at physical `root` (the CR3 address bits)
/// for `virt`, reading `mem` as the CPU would.
///
/// Assumes CR4.PSE = 1 for 32-bit paging (4 MiB pages, with PSE-36 address
/// bits), EFER.NXE = 1 for PAE and long mode (XD allowed), 1 GiB pages
/// supported, and a 52-bit MAXPHYADDR. Bit 7 of a PTE is PAT, never PS.
///
/// # Errors
///
/// [`WalkError`] naming the address, the level and, for bad entries, the entry.
pub fn walk<M: TableMemory + ?Sized>(
    mem: &M,
    flavour: Flavour,
    root: u64,
    virt: u64,
) -> Result<Translation, WalkError> {
    if !flavour.is_valid_virt(virt) {
        return Err(WalkError::VirtOutOfRange { virt, flavour });
    }
    match walk_dirs(mem, flavour, root, virt) {
        Dirs::Done(result) => result,
        Dirs::Pt(state) => walk_pt(mem, &state, virt),
    }
}

/// Effective attributes gathered on the way down, and the entries read.
#[derive(Clone, Copy, Debug)]
struct Acc {
    writable: bool,
    user: bool,
    no_execute: bool,
    path: WalkPath,
}

/// Where one level of a walk leads.
enum Next {
    /// The walk ends here: a translation or an error.
    Done(Result<Translation, WalkError>),
    /// The next level's table.
    Table(u64),
}

/// One level of [`walk`]: reads the entry for `virt` in `table`.
fn step<M: TableMemory + ?Sized>(
    mem: &M,
    flavour: Flavour,
    spec: &LevelSpec,
    table: u64,
    virt: u64,
    acc: &mut Acc,
) -> Next {
    let index = spec.index(virt);
    let entry = match read_at(mem, flavour, spec, table, index, virt) {
        Ok(e) => e,
        Err(e) => return Next::Done(Err(e)),
    };
    acc.path.push(WalkStep {
        level: spec.level,
        table,
        index: index as u16,
        entry,
    });
    if entry & EntryFlags::PRESENT.bits() == 0 {
        return Next::Done(Err(WalkError::NotPresent {
            virt,
            flavour,
            level: spec.level,
        }));
    }
    // PDPTEs carry no R/W, U/S or XD.
    if !(flavour == Flavour::Pae && spec.level == Level::Pdpt) {
        acc.writable &= entry & EntryFlags::WRITABLE.bits() != 0;
        acc.user &= entry & EntryFlags::USER.bits() != 0;
        acc.no_execute |=
            flavour != Flavour::Legacy32 && entry & EntryFlags::NO_EXECUTE.bits() != 0;
    }
    match decode(flavour, spec, virt, entry) {
        Err(e) => Next::Done(Err(e)),
        Ok(Decoded::Leaf { size, base }) => Next::Done(Ok(Translation {
            virt,
            phys: base + (virt & (size.bytes() - 1)),
            page_size: size,
            flags: leaf_flags(flavour, entry),
            writable: acc.writable,
            user: acc.user,
            no_execute: acc.no_execute,
            path: acc.path,
        })),
        Ok(Decoded::Table(next)) => Next::Table(next),
    }
}

/// The directory part of a walk that reached a page table: the same for
/// every address whose directory indices are the same (one page table's
/// span), so [`walk_cached`] reuses it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DirState {
    flavour: Flavour,
    root: u64,
    /// `virt >> shift` of the page-directory level: the page table's span.
    chunk: u64,
    /// The page table.
    table: u64,
    acc: Acc,
}

/// The directory levels of a walk.
enum Dirs {
    /// The walk ended above the page table (not present, a large page, an error).
    Done(Result<Translation, WalkError>),
    /// The page table was reached.
    Pt(DirState),
}

/// Every level but the last (the page table) of [`walk`].
fn walk_dirs<M: TableMemory + ?Sized>(mem: &M, flavour: Flavour, root: u64, virt: u64) -> Dirs {
    let specs = levels(flavour);
    let (dirs, _) = specs.split_at(specs.len().saturating_sub(1));
    let mut table = root & root_addr_mask(flavour);
    let mut acc = Acc {
        writable: true,
        user: true,
        no_execute: false,
        path: WalkPath::new(),
    };
    for spec in dirs {
        match step(mem, flavour, spec, table, virt, &mut acc) {
            Next::Done(result) => return Dirs::Done(result),
            Next::Table(next) => table = next,
        }
    }
    Dirs::Pt(DirState {
        flavour,
        root,
        chunk: chunk_of(flavour, virt),
        table,
        acc,
    })
}

/// The page-table level of [`walk`], from the directory part.
fn walk_pt<M: TableMemory + ?Sized>(
    mem: &M,
    state: &DirState,
    virt: u64,
) -> Result<Translation, WalkError> {
    let flavour = state.flavour;
    let mut acc = state.acc;
    match levels(flavour).last() {
        Some(spec) => match step(mem, flavour, spec, state.table, virt, &mut acc) {
            Next::Done(result) => result,
            // A page-table entry is always a leaf (or not present).
            Next::Table(_) => Err(WalkError::NotPresent {
                virt,
                flavour,
                level: Level::Pt,
            }),
        },
        None => Err(WalkError::NotPresent {
            virt,
            flavour,
            level: Level::Pt,
        }),
    }
}

/// The page table's span `virt` lies in: its address shifted by the
/// page-directory level's shift.
fn chunk_of(flavour: Flavour, virt: u64) -> u64 {
    let specs = levels(flavour);
    specs
        .len()
        .checked_sub(2)
        .and_then(|i| specs.get(i))
        .map_or(virt >> 12, |pd| virt >> pd.shift)
}

/// A page-table entry found through a [`WalkCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PtEntry {
    /// Not present.
    Absent,
    /// A 4 KiB page.
    Leaf {
        /// Physical address of the entry.
        addr: u64,
        /// The page's physical address.
        phys: u64,
        /// Its attributes, as [`Translation::flags`].
        flags: MapFlags,
    },
}

/// A walk's directory part, kept between walks of neighbouring pages.
/// Valid only while no directory entry changes: clear it after writing one.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WalkCache(Option<DirState>);

impl WalkCache {
    /// Forgets the directory part.
    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }

    /// `virt`'s page-table entry read through the cache, without building a
    /// [`Translation`]: `None` when the cache does not hold the directory
    /// part of `virt`'s walk (walk it with [`walk_cached`] then). A present
    /// entry is decoded as [`walk`] decodes it, with the same errors.
    pub(crate) fn pt_lookup<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        flavour: Flavour,
        root: u64,
        virt: u64,
    ) -> Option<Result<PtEntry, WalkError>> {
        let addr = self.pt_entry(flavour, root, virt)?;
        if !flavour.is_valid_virt(virt) {
            return None;
        }
        let spec = levels(flavour).last()?;
        let entry = match read_at(mem, flavour, spec, addr & !0xfff, spec.index(virt), virt) {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        if entry & EntryFlags::PRESENT.bits() == 0 {
            return Some(Ok(PtEntry::Absent));
        }
        Some(match decode(flavour, spec, virt, entry) {
            Ok(Decoded::Leaf { base, .. }) => Ok(PtEntry::Leaf {
                addr,
                phys: base + (virt & 0xfff),
                flags: leaf_flags(flavour, entry),
            }),
            Ok(Decoded::Table(_)) => return None,
            Err(e) => Err(e),
        })
    }

    /// The address of `virt`'s page-table entry when the cache holds the
    /// directory part of its walk (`flavour` rooted at `root`).
    pub(crate) fn pt_entry(&self, flavour: Flavour, root: u64, virt: u64) -> Option<u64> {
        let state = self.0.as_ref().filter(|s| {
            s.flavour == flavour && s.root == root && s.chunk == chunk_of(flavour, virt)
        })?;
        let pt = levels(flavour).last()?;
        Some(state.table + pt.index(virt) * flavour.entry_size())
    }
}

/// [`walk`], reusing the directory part of the previous walk through
/// `cache` when `virt` lies in the same page table: one entry read per page
/// instead of one per level. Same result as [`walk`] for every input.
pub(crate) fn walk_cached<M: TableMemory + ?Sized>(
    mem: &M,
    flavour: Flavour,
    root: u64,
    virt: u64,
    cache: &mut WalkCache,
) -> Result<Translation, WalkError> {
    if !flavour.is_valid_virt(virt) {
        return Err(WalkError::VirtOutOfRange { virt, flavour });
    }
    let chunk = chunk_of(flavour, virt);
    if let Some(state) = cache
        .0
        .as_ref()
        .filter(|s| s.flavour == flavour && s.root == root && s.chunk == chunk)
    {
        return walk_pt(mem, state, virt);
    }
    match walk_dirs(mem, flavour, root, virt) {
        Dirs::Done(result) => {
            cache.clear();
            result
        }
        Dirs::Pt(state) => {
            cache.0 = Some(state);
            walk_pt(mem, &state, virt)
        }
    }
}

/// Reads entry `index` of the table at `table`, `spec`'s level, on the way to `virt`.
pub(crate) fn read_at<M: TableMemory + ?Sized>(
    mem: &M,
    flavour: Flavour,
    spec: &LevelSpec,
    table: u64,
    index: u64,
    virt: u64,
) -> Result<u64, WalkError> {
    read_entry(mem, flavour, table + index * flavour.entry_size()).map_err(|source| {
        WalkError::Memory {
            virt,
            flavour,
            level: spec.level,
            source,
        }
    })
}

/// Where a present entry leads.
pub(crate) enum Decoded {
    /// A page of `size` at `base`.
    Leaf { size: PageSize, base: u64 },
    /// The next table's physical address.
    Table(u64),
}

/// Decodes a present entry at `spec`'s level, rejecting the reserved-bit
/// combinations the walk honours (PDPTE reserved bits, PS in a PML4E, reserved
/// address bits in a large page).
pub(crate) fn decode(
    flavour: Flavour,
    spec: &LevelSpec,
    virt: u64,
    entry: u64,
) -> Result<Decoded, WalkError> {
    let reserved = WalkError::Reserved {
        virt,
        flavour,
        level: spec.level,
        entry,
    };
    if flavour == Flavour::Pae && spec.level == Level::Pdpt && entry & PAE_PDPTE_RESERVED != 0 {
        return Err(reserved);
    }
    let is_large = entry & EntryFlags::LARGE.bits() != 0;
    let top_level = matches!(
        (flavour, spec.level),
        (Flavour::Long | Flavour::La57, Level::Pml4) | (Flavour::La57, Level::Pml5)
    );
    if top_level && is_large {
        return Err(reserved);
    }
    let size = match spec.large {
        Some(size) if is_large => size,
        _ if spec.level == Level::Pt => PageSize::Size4K,
        _ => return Ok(Decoded::Table(entry & table_addr_mask(flavour))),
    };
    let base = leaf_base(flavour, size, entry).ok_or(reserved)?;
    Ok(Decoded::Leaf { size, base })
}

/// Page base of a leaf entry, or `None` if its reserved address bits are set.
fn leaf_base(flavour: Flavour, size: PageSize, entry: u64) -> Option<u64> {
    let addr = entry & table_addr_mask(flavour);
    match size {
        PageSize::Size4K => Some(addr),
        PageSize::Size4M => (entry & LARGE_4M_RESERVED == 0)
            .then_some((entry & 0xffc0_0000) | (((entry >> 13) & 0xff) << 32)),
        PageSize::Size2M => (entry & LARGE_2M_RESERVED == 0).then_some(addr & !(size.bytes() - 1)),
        PageSize::Size1G => (entry & LARGE_1G_RESERVED == 0).then_some(addr & !(size.bytes() - 1)),
    }
}

/// The [`MapFlags`] of a leaf entry (XD only where the flavour has it).
pub(crate) fn leaf_flags(flavour: Flavour, entry: u64) -> MapFlags {
    let flags = MapFlags::from_bits_retain(entry & MapFlags::all().bits());
    if flavour == Flavour::Legacy32 {
        flags - MapFlags::NO_EXECUTE
    } else {
        flags
    }
}

/// A run of linear addresses mapped to contiguous physical memory with one
/// set of leaf attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// First linear address.
    pub virt: u64,
    /// Physical address of `virt`.
    pub phys: u64,
    /// Length in bytes.
    pub len: u64,
    /// Leaf attributes.
    pub flags: MapFlags,
}

/// Every present leaf under `root`, merged into runs, in ascending
/// linear-address order (long-mode upper-half addresses sign-extended).
pub(crate) fn list<M: TableMemory + ?Sized>(
    mem: &M,
    flavour: Flavour,
    root: u64,
) -> Result<Vec<Mapping>, WalkError> {
    let mut out: Vec<Mapping> = Vec::new();
    visit(mem, flavour, 0, root & root_addr_mask(flavour), 0, &mut out)?;
    Ok(out)
}

fn visit<M: TableMemory + ?Sized>(
    mem: &M,
    flavour: Flavour,
    depth: usize,
    table: u64,
    prefix: u64,
    out: &mut Vec<Mapping>,
) -> Result<(), WalkError> {
    let specs = levels(flavour);
    let Some(spec) = specs.get(depth) else {
        return Ok(());
    };
    for index in 0..(1u64 << spec.index_bits) {
        let mut virt = prefix | (index << spec.shift);
        if flavour == Flavour::Long && virt & (1 << 47) != 0 {
            virt |= 0xffff_0000_0000_0000;
        }
        if flavour == Flavour::La57 && virt & (1 << 56) != 0 {
            virt |= 0xfe00_0000_0000_0000;
        }
        let entry = read_at(mem, flavour, spec, table, index, virt)?;
        if entry & EntryFlags::PRESENT.bits() == 0 {
            continue;
        }
        match decode(flavour, spec, virt, entry)? {
            Decoded::Leaf { size, base: phys } => {
                push_merged(
                    out,
                    Mapping {
                        virt,
                        phys,
                        len: size.bytes(),
                        flags: leaf_flags(flavour, entry),
                    },
                );
            }
            Decoded::Table(next) => visit(mem, flavour, depth + 1, next, virt, out)?,
        }
    }
    Ok(())
}

fn push_merged(out: &mut Vec<Mapping>, m: Mapping) {
    if let Some(last) = out.last_mut() {
        if last.flags == m.flags
            && last.virt.wrapping_add(last.len) == m.virt
            && last.phys.wrapping_add(last.len) == m.phys
        {
            last.len += m.len;
            return;
        }
    }
    out.push(m);
}

const _: () = {
    assert!(LEGACY32[0].shift + LEGACY32[0].index_bits == 32);
    assert!(PAE[0].shift + PAE[0].index_bits == 32);
    assert!(LONG[0].shift + LONG[0].index_bits == 48);
    assert!(LA57[0].shift + LA57[0].index_bits == 57);
    assert!(1u64 << (PAE[0].shift + PAE[0].index_bits) == FOUR_GIB);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Flavours, IntermediateContext, VecAllocator};

    /// One cache across many addresses, in and out of page tables, across
    /// page-table boundaries, in each flavour, and across a directory change
    /// (after which the cache is cleared, as its callers do): always the
    /// full walk's answer.
    #[test]
    fn cached_walks_are_full_walks() -> Result<(), std::boxed::Box<dyn std::error::Error>> {
        let mut ctx = IntermediateContext::new(VecAllocator::new(0x60_0000, 64)?)?;
        ctx.map(
            0x40_0000,
            0x40_0000,
            0x3000,
            MapFlags::WRITABLE,
            Flavours::all(),
        )?;
        // Straddles a 2 MiB and a 4 MiB boundary.
        ctx.map(
            0x9fff_e000,
            0x50_0000,
            0x5000,
            MapFlags::WRITABLE,
            Flavours::all(),
        )?;
        let addrs: Vec<u64> = (0x9ffe_0000u64..0xa002_0000)
            .step_by(0x1000)
            .chain([
                0x40_0000,
                0x40_1000,
                0x9fff_e000,
                0x1234_5000,
                0xffff_f000,
                1 << 48,
            ])
            .collect();
        let check = |ctx: &IntermediateContext<VecAllocator>| {
            for flavour in [Flavour::Legacy32, Flavour::Pae, Flavour::Long] {
                let root = u64::from(ctx.cr3(flavour));
                let mut cache = WalkCache::default();
                for &v in addrs.iter().chain(addrs.iter().rev()) {
                    let full = walk(ctx.allocator(), flavour, root, v);
                    assert_eq!(
                        walk_cached(ctx.allocator(), flavour, root, v, &mut cache),
                        full
                    );
                    let fast = cache.pt_lookup(ctx.allocator(), flavour, root, v);
                    match (fast, full) {
                        (None, _) => {}
                        (Some(Ok(PtEntry::Absent)), Err(WalkError::NotPresent { level, .. })) => {
                            assert_eq!(level, Level::Pt);
                        }
                        (Some(Ok(PtEntry::Leaf { addr, phys, flags })), Ok(t)) => {
                            assert_eq!((phys, flags), (t.phys, t.flags));
                            assert_eq!(Some(addr), t.path.leaf().map(|l| l.entry_addr(flavour)));
                        }
                        (fast, full) => panic!("{v:#x} {flavour:?}: {fast:?} vs {full:?}"),
                    }
                }
            }
        };
        check(&ctx);
        ctx.unmap(0x9fff_f000, 0x2000, Flavours::all())?;
        ctx.map(
            0xa040_0000,
            0x58_0000,
            0x1000,
            MapFlags::WRITABLE,
            Flavours::all(),
        )?;
        check(&ctx);
        Ok(())
    }
}
