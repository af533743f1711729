//! Host page tables built as data (SDM Vol. 3A §4.3 32-bit paging, §4.4 PAE
//! paging, §4.5 4-level and 5-level paging).
//!
//! The testbed's host kernel runs with paging on, as a real embedding host
//! does. Its tables are computed here, in Rust, and placed in the image; the
//! generated code only loads CR3. Mappings are 4 KiB pages; every conflict
//! (two owners for one virtual page) is an error naming both owners.
//! [`PageTables::translate`] (and [`PageTables::translate64`] for 64-bit
//! virtual addresses) walks the produced bytes the way the MMU does, with
//! [`pgm_intermediate::walk`], so tests prove each mapping from the image
//! itself.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

pub use pgm_intermediate::{is_canonical, is_canonical57};
use pgm_intermediate::{EntryFlags, Flavour, MemoryError, TableMemory};

/// Page size.
pub const PAGE: u32 = 0x1000;

/// Paging mode of the host the kernel plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostMode {
    /// 32-bit paging without PAE (two levels, 4-byte entries).
    Legacy32,
    /// PAE paging (PDPT below 4 GiB, three levels, 8-byte entries).
    Pae,
    /// Long mode with 4-level paging (PML4 below 4 GiB, 48-bit canonical
    /// virtual addresses); the host kernel runs in 64-bit mode.
    Amd64,
}

impl HostMode {
    /// Short name used on the serial line (`legacy32`, `pae`, `amd64`).
    pub fn name(self) -> &'static str {
        match self {
            HostMode::Legacy32 => "legacy32",
            HostMode::Pae => "pae",
            HostMode::Amd64 => "amd64",
        }
    }

    /// Parses [`HostMode::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "legacy32" => Some(HostMode::Legacy32),
            "pae" => Some(HostMode::Pae),
            "amd64" => Some(HostMode::Amd64),
            _ => None,
        }
    }

    /// `true` for [`HostMode::Amd64`]: 64-bit virtual addresses and a 64-bit kernel.
    pub fn is_long(self) -> bool {
        self == HostMode::Amd64
    }

    /// The [`Flavour`] whose tables this mode's CR3 points to.
    pub fn flavour(self) -> Flavour {
        match self {
            HostMode::Legacy32 => Flavour::Legacy32,
            HostMode::Pae => Flavour::Pae,
            HostMode::Amd64 => Flavour::Long,
        }
    }

    /// One past the highest virtual address of the lower canonical half
    /// (4 GiB for the 32-bit modes).
    pub fn virt_limit(self) -> u64 {
        match self {
            HostMode::Legacy32 | HostMode::Pae => 1 << 32,
            HostMode::Amd64 => 1 << 47,
        }
    }
}

impl fmt::Display for HostMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Present.
pub const PTE_P: u64 = EntryFlags::PRESENT.bits();
/// Writable.
pub const PTE_RW: u64 = EntryFlags::WRITABLE.bits();
/// Page-level write-through.
pub const PTE_PWT: u64 = EntryFlags::WRITE_THROUGH.bits();
/// Page-level cache disable.
pub const PTE_PCD: u64 = EntryFlags::CACHE_DISABLE.bits();

/// A named virtual range `[start, end)`. Both ends are `u64`: the top page of
/// a 32-bit space ends at 4 GiB, and AMD64 hosts use the upper canonical half
/// (`end` may then wrap to 0 for the very last page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtRange {
    /// Owner name.
    pub name: String,
    /// First virtual byte.
    pub start: u64,
    /// One past the last virtual byte.
    pub end: u64,
}

impl fmt::Display for VirtRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` virt [{:#010x}, {:#011x})",
            self.name, self.start, self.end
        )
    }
}

/// Why a mapping cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    /// The virtual address is not page aligned.
    #[error("mapping `{name}`: virtual address {virt:#010x} is not 4 KiB aligned")]
    VirtMisaligned {
        /// Mapping name.
        name: String,
        /// Offending address.
        virt: u64,
    },
    /// The physical address is not page aligned.
    #[error("mapping `{name}`: physical address {phys:#010x} is not 4 KiB aligned")]
    PhysMisaligned {
        /// Mapping name.
        name: String,
        /// Offending address.
        phys: u32,
    },
    /// Zero length.
    #[error("mapping `{name}` at {virt:#010x} has length 0")]
    Empty {
        /// Mapping name.
        name: String,
        /// Virtual address.
        virt: u64,
    },
    /// The range runs past 4 GiB physically, past 4 GiB virtually (32-bit
    /// modes), or out of its canonical half (AMD64).
    #[error("mapping `{name}`: {virt:#010x} -> {phys:#010x} with {len:#x} bytes wraps past the end of its address space")]
    Wraps {
        /// Mapping name.
        name: String,
        /// Virtual address.
        virt: u64,
        /// Physical address.
        phys: u32,
        /// Length.
        len: u32,
    },
    /// Page 0 stays unmapped so that null pointers fault.
    #[error("mapping `{name}` at {virt:#010x} would map virtual page 0, which stays unmapped")]
    PageZero {
        /// Mapping name.
        name: String,
        /// Virtual address.
        virt: u64,
    },
    /// A 64-bit virtual address in a 32-bit paging mode.
    #[error("mapping `{name}`: virtual address {virt:#x} does not fit the 32-bit address space of a {mode} host")]
    VirtTooWide {
        /// Mapping name.
        name: String,
        /// Offending address.
        virt: u64,
        /// The paging mode.
        mode: HostMode,
    },
    /// A non-canonical virtual address (bits 63:47 differ).
    #[error("mapping `{name}`: virtual address {virt:#x} is not canonical (bits 63:47, or 63:56 with 5-level paging, must all equal the top bit)")]
    NonCanonical {
        /// Mapping name.
        name: String,
        /// Offending address.
        virt: u64,
    },
    /// A virtual page already belongs to another mapping.
    #[error("{new} conflicts with {existing} at page {page:#010x}")]
    Conflict {
        /// The mapping being added.
        new: VirtRange,
        /// The mapping already there.
        existing: VirtRange,
        /// First conflicting virtual page.
        page: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Pte {
    phys: u32,
    flags: u64,
    owner: usize,
}

/// A set of 4 KiB mappings, laid out as page tables on demand.
#[derive(Clone, Debug)]
pub struct PageMap {
    mode: HostMode,
    la57: bool,
    pages: BTreeMap<u64, Pte>,
    owners: Vec<VirtRange>,
}

/// Page tables laid out at a physical base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageTables {
    /// Paging mode.
    pub mode: HostMode,
    /// Physical address of the first table page.
    pub base: u32,
    /// Value for CR3: the page directory (legacy), the PDPT (PAE), the
    /// PML4 (AMD64) or the PML5 (AMD64 with 5-level paging).
    pub cr3: u32,
    /// 5-level tables ([`PageMap::new_la57`]): the host runs with CR4.LA57.
    pub la57: bool,
    /// The table pages, back to back from `base`.
    pub bytes: Vec<u8>,
}

impl PageMap {
    /// An empty map for `mode`.
    pub fn new(mode: HostMode) -> Self {
        Self {
            mode,
            la57: false,
            pages: BTreeMap::new(),
            owners: Vec::new(),
        }
    }

    /// An empty [`HostMode::Amd64`] map with 5-level tables (CR4.LA57):
    /// virtual addresses are canonical in 57 bits, and the root is a PML5.
    pub fn new_la57() -> Self {
        Self {
            la57: true,
            ..Self::new(HostMode::Amd64)
        }
    }

    /// Whether the tables are 5-level.
    pub fn la57(&self) -> bool {
        self.la57
    }

    /// One past the highest address of the lower canonical half.
    fn virt_limit(&self) -> u64 {
        if self.la57 {
            1 << 56
        } else {
            self.mode.virt_limit()
        }
    }

    /// The paging mode.
    pub fn mode(&self) -> HostMode {
        self.mode
    }

    /// Maps `len` bytes (rounded up to whole pages) at `virt` to `phys`.
    /// `flags` holds extra PTE bits ([`PTE_RW`], [`PTE_PCD`], [`PTE_PWT`]).
    pub fn map(
        &mut self,
        name: &str,
        virt: u32,
        phys: u32,
        len: u32,
        flags: u64,
    ) -> Result<(), PagingError> {
        self.map64(name, u64::from(virt), phys, len, flags)
    }

    /// [`PageMap::map`] for a 64-bit virtual address: any canonical address
    /// in [`HostMode::Amd64`], below 4 GiB in the 32-bit modes. A range may
    /// not cross from one canonical half to the other.
    pub fn map64(
        &mut self,
        name: &str,
        virt: u64,
        phys: u32,
        len: u32,
        flags: u64,
    ) -> Result<(), PagingError> {
        let name_s = || name.to_owned();
        if !self.mode.is_long() && virt >= 1 << 32 {
            return Err(PagingError::VirtTooWide {
                name: name_s(),
                virt,
                mode: self.mode,
            });
        }
        let canonical = if self.la57 {
            is_canonical57(virt)
        } else {
            is_canonical(virt)
        };
        if !canonical {
            return Err(PagingError::NonCanonical {
                name: name_s(),
                virt,
            });
        }
        if virt % u64::from(PAGE) != 0 {
            return Err(PagingError::VirtMisaligned {
                name: name_s(),
                virt,
            });
        }
        if phys % PAGE != 0 {
            return Err(PagingError::PhysMisaligned {
                name: name_s(),
                phys,
            });
        }
        if len == 0 {
            return Err(PagingError::Empty {
                name: name_s(),
                virt,
            });
        }
        let pages = len.div_ceil(PAGE);
        let span = u64::from(pages) * u64::from(PAGE);
        // The range must stay inside its half: [0, limit) or [2^64 - limit, 2^64).
        let limit = self.virt_limit();
        let virt_ok = if virt < limit {
            virt + span <= limit
        } else {
            virt.checked_add(span - 1).is_some()
        };
        if !virt_ok || u64::from(phys) + span > 1 << 32 {
            return Err(PagingError::Wraps {
                name: name_s(),
                virt,
                phys,
                len,
            });
        }
        if virt == 0 {
            return Err(PagingError::PageZero {
                name: name_s(),
                virt,
            });
        }
        let new = VirtRange {
            name: name_s(),
            start: virt,
            end: virt.wrapping_add(span),
        };
        for i in 0..u64::from(pages) {
            let page = virt + i * u64::from(PAGE);
            if let Some(pte) = self.pages.get(&page) {
                return Err(PagingError::Conflict {
                    new,
                    existing: self.owners[pte.owner].clone(),
                    page,
                });
            }
        }
        let owner = self.owners.len();
        self.owners.push(new);
        for i in 0..pages {
            self.pages.insert(
                virt + u64::from(i * PAGE),
                Pte {
                    phys: phys + i * PAGE,
                    flags: flags | PTE_P,
                    owner,
                },
            );
        }
        Ok(())
    }

    /// The named ranges mapped so far.
    pub fn ranges(&self) -> &[VirtRange] {
        &self.owners
    }

    /// Distinct `virt >> shift` keys, in address order.
    fn keys(&self, shift: u32) -> Vec<u64> {
        let mut keys: Vec<u64> = self.pages.keys().map(|v| v >> shift).collect();
        keys.dedup();
        keys
    }

    /// The levels below the root, root side first, as shifts: one table of
    /// such a level covers `1 << shift` bytes, so `virt >> shift` names it.
    fn table_shifts(&self) -> &'static [u32] {
        if self.la57 {
            return &[48, 39, 30, 21];
        }
        match self.mode {
            HostMode::Legacy32 => &[22],
            HostMode::Pae => &[30, 21],
            HostMode::Amd64 => &[39, 30, 21],
        }
    }

    /// Points the already mapped pages of `virt..virt + len` (whole pages)
    /// at `phys..` instead, keeping their flags: the shape of the tables
    /// does not change. `None` when a page of the range is not mapped.
    pub fn remap(&mut self, virt: u64, phys: u32, len: u32) -> Option<()> {
        for i in 0..len.div_ceil(PAGE) {
            let page = virt.checked_add(u64::from(i) * u64::from(PAGE))?;
            let pte = self.pages.get_mut(&page)?;
            pte.phys = phys.checked_add(i.checked_mul(PAGE)?)?;
        }
        Some(())
    }

    /// Number of 4 KiB table pages [`PageMap::layout`] will produce.
    pub fn table_pages(&self) -> u32 {
        let below: usize = self
            .table_shifts()
            .iter()
            .map(|&s| self.keys(s).len())
            .sum();
        1 + below as u32
    }

    /// Lays the tables out at physical `base` (page aligned): page 0 holds
    /// the root (page directory, PDPT or PML4), then come the tables of each
    /// lower level in address order.
    pub fn layout(&self, base: u32) -> PageTables {
        let size = self.mode.flavour().entry_size() as usize;
        // Index bits per table: 10 for 4-byte entries, 9 for 8-byte ones.
        let bits = (PAGE as usize / size).trailing_zeros();
        let mut bytes = vec![0u8; self.table_pages() as usize * PAGE as usize];
        // Writes the entry for `key` (its low `bits` bits index the table) in
        // table page `page`.
        let mut put = |page: usize, key: u64, value: u64| {
            let off = page * PAGE as usize + (key & ((1 << bits) - 1)) as usize * size;
            bytes[off..off + size].copy_from_slice(&value.to_le_bytes()[..size]);
        };
        // The keys and first table page of the level above (none: the root).
        let mut above: Option<(Vec<u64>, usize)> = None;
        let parent = |above: &Option<(Vec<u64>, usize)>, key: u64| match above {
            None => 0,
            Some((keys, first)) => first + keys.binary_search(&(key >> bits)).unwrap_or(0),
        };
        let mut first = 1;
        for &shift in self.table_shifts() {
            let keys = self.keys(shift);
            // PDPTEs take only P (and cache bits); RW/US are reserved.
            let flags = if self.mode == HostMode::Pae && above.is_none() {
                PTE_P
            } else {
                PTE_P | PTE_RW
            };
            for (i, &key) in keys.iter().enumerate() {
                let table = base + (first + i) as u32 * PAGE;
                put(parent(&above, key), key, u64::from(table) | flags);
            }
            let next = first + keys.len();
            above = Some((keys, first));
            first = next;
        }
        for (virt, pte) in &self.pages {
            let key = virt >> 12;
            put(parent(&above, key), key, u64::from(pte.phys) | pte.flags);
        }
        PageTables {
            mode: self.mode,
            base,
            cr3: base,
            la57: self.la57,
            bytes,
        }
    }
}

/// What [`PageTables::translate`] found for a virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address.
    pub phys: u32,
    /// The final (PTE) entry, with flags.
    pub pte: u64,
}

impl PageTables {
    /// Walks the tables like the MMU (tables must lie inside these bytes).
    pub fn translate(&self, virt: u32) -> Option<Translation> {
        self.translate64(u64::from(virt))
    }

    /// [`PageTables::translate`] for a 64-bit virtual address (`None` for
    /// non-canonical addresses, and above 4 GiB in the 32-bit modes).
    pub fn translate64(&self, virt: u64) -> Option<Translation> {
        let flavour = if self.la57 {
            Flavour::La57
        } else {
            self.mode.flavour()
        };
        let t = pgm_intermediate::walk(self, flavour, u64::from(self.cr3), virt).ok()?;
        Some(Translation {
            phys: t.phys as u32,
            pte: t.path.leaf()?.entry,
        })
    }

    /// Where the 8-byte entry at physical `phys` lies in [`PageTables::bytes`].
    fn entry_range(&self, phys: u64) -> Option<Range<usize>> {
        let off = usize::try_from(phys.checked_sub(u64::from(self.base))?).ok()?;
        Some(off..off.checked_add(8)?)
    }
}

/// The table bytes as physical memory from [`PageTables::base`] on.
impl TableMemory for PageTables {
    fn read_u64(&self, phys: u64) -> Result<u64, MemoryError> {
        self.entry_range(phys)
            .and_then(|r| self.bytes.get(r))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or(MemoryError { phys })
    }

    fn write_u64(&mut self, phys: u64, value: u64) -> Result<(), MemoryError> {
        let slot = self
            .entry_range(phys)
            .and_then(|r| self.bytes.get_mut(r))
            .ok_or(MemoryError { phys })?;
        slot.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: HostMode) -> PageMap {
        let mut m = PageMap::new(mode);
        m.map("identity", 0x1000, 0x1000, 0x3f_f000, PTE_RW)
            .unwrap();
        m.map("magic", 0x4000_0000, 0x0010_1000, 1, 0).unwrap();
        m.map("lapic", 0xfee0_0000, 0xfee0_0000, 0x1000, PTE_RW | PTE_PCD)
            .unwrap();
        m.map("switcher", 0xc000_0000, 0x0080_0000, 0x2001, PTE_RW)
            .unwrap();
        m
    }

    #[test]
    fn every_mapping_walks_to_its_target() {
        for mode in [HostMode::Legacy32, HostMode::Pae, HostMode::Amd64] {
            let t = sample(mode).layout(0x0020_0000);
            assert_eq!(t.bytes.len(), sample(mode).table_pages() as usize * 4096);
            assert_eq!(t.translate(0), None, "{mode}: page 0 unmapped");
            assert_eq!(t.translate(0x0012_3456).map(|x| x.phys), Some(0x0012_3456));
            assert_eq!(t.translate(0x003f_fffc).map(|x| x.phys), Some(0x003f_fffc));
            assert_eq!(t.translate(0x0040_0000), None);
            let magic = t.translate(0x4000_0010).unwrap();
            assert_eq!(magic.phys, 0x0010_1010);
            assert_eq!(magic.pte & PTE_RW, 0, "magic page is read-only");
            let apic = t.translate(0xfee0_0350).unwrap();
            assert_eq!(apic.phys, 0xfee0_0350);
            assert_ne!(apic.pte & PTE_PCD, 0);
            assert_eq!(t.translate(0xc000_2ff0).map(|x| x.phys), Some(0x0080_2ff0));
            assert_eq!(t.translate(0xc000_3000), None);
        }
    }

    #[test]
    fn pae_pdpt_entries_carry_only_present() {
        let t = sample(HostMode::Pae).layout(0x0020_0000);
        for i in 0..4 {
            let e = u64::from_le_bytes(t.bytes[i * 8..i * 8 + 8].try_into().unwrap());
            assert_eq!(e & 0xfff & !PTE_P, 0, "PDPTE {i} = {e:#x}");
        }
    }

    #[test]
    fn conflicts_and_bad_input_are_named() {
        let mut m = sample(HostMode::Legacy32);
        let err = m
            .map("late", 0x0010_0000, 0x0090_0000, 0x1000, 0)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`late`") && msg.contains("`identity`"),
            "{msg}"
        );
        assert!(matches!(
            m.map("z", 0, 0, 0x1000, 0),
            Err(PagingError::PageZero { .. })
        ));
        assert!(matches!(
            m.map("a", 0x5000_0001, 0, 0x1000, 0),
            Err(PagingError::VirtMisaligned {
                virt: 0x5000_0001,
                ..
            })
        ));
        assert!(matches!(
            m.map("w", 0xffff_f000, 0x1000, 0x2000, 0),
            Err(PagingError::Wraps { .. })
        ));
        assert!(matches!(
            m.map("e", 0x5000_0000, 0x1000, 0, 0),
            Err(PagingError::Empty { .. })
        ));
    }

    #[test]
    fn amd64_maps_high_canonical_addresses() {
        const HIGH: u64 = 0xffff_ffff_c040_0000;
        let mut m = sample(HostMode::Amd64);
        m.map64("switcher-hc", HIGH, 0x0060_0000, 0x3000, PTE_RW)
            .unwrap();
        m.map64("fs", 0xffff_8000_f5f5_0000, 0x0010_2000, 0x1000, 0)
            .unwrap();
        // The last page of the address space.
        m.map64("top", 0xffff_ffff_ffff_f000, 0x0070_0000, 0x1000, 0)
            .unwrap();
        let t = m.layout(0x0020_0000);
        assert_eq!(t.bytes.len(), m.table_pages() as usize * 4096);
        assert_eq!(
            t.translate64(HIGH + 0x2ff0).map(|x| x.phys),
            Some(0x0060_2ff0)
        );
        assert_eq!(t.translate64(HIGH + 0x3000), None);
        assert_eq!(
            t.translate64(0xffff_8000_f5f5_0004).map(|x| x.phys),
            Some(0x0010_2004)
        );
        assert_eq!(
            t.translate64(0xffff_ffff_ffff_fffc).map(|x| x.phys),
            Some(0x0070_0ffc)
        );
        assert_eq!(t.translate64(0x0000_8000_0000_0000), None, "non-canonical");
        assert_eq!(t.translate64(0x0000_0001_0000_0000), None);
        assert_eq!(t.translate(0x0012_3456).map(|x| x.phys), Some(0x0012_3456));
        // Intermediate entries are present and writable; the PML4 is at CR3.
        assert_eq!(t.cr3, 0x0020_0000);
        let pml4e = u64::from_le_bytes(t.bytes[511 * 8..512 * 8].try_into().unwrap());
        assert_eq!(pml4e & (PTE_P | PTE_RW), PTE_P | PTE_RW);
    }

    #[test]
    fn wide_and_non_canonical_addresses_are_refused() {
        let mut m = PageMap::new(HostMode::Pae);
        assert!(matches!(
            m.map64("wide", 0x1_0000_0000, 0x1000, 0x1000, 0),
            Err(PagingError::VirtTooWide {
                virt: 0x1_0000_0000,
                mode: HostMode::Pae,
                ..
            })
        ));
        let mut m = PageMap::new(HostMode::Amd64);
        let err = m
            .map64("odd", 0x0000_8000_0000_0000, 0x1000, 0x1000, 0)
            .unwrap_err();
        assert!(matches!(err, PagingError::NonCanonical { .. }), "{err}");
        assert!(err.to_string().contains("0x800000000000"), "{err}");
        // Crossing out of the lower half.
        assert!(matches!(
            m.map64("edge", 0x0000_7fff_ffff_f000, 0x1000, 0x2000, 0),
            Err(PagingError::Wraps { .. })
        ));
        // Wrapping past 2^64.
        assert!(matches!(
            m.map64("wrap", 0xffff_ffff_ffff_f000, 0x1000, 0x2000, 0),
            Err(PagingError::Wraps { .. })
        ));
        m.map64("a", 0xffff_ffff_c000_0000, 0x1000, 0x2000, 0)
            .unwrap();
        let err = m
            .map64("b", 0xffff_ffff_c000_1000, 0x5000, 0x1000, 0)
            .unwrap_err();
        assert!(
            matches!(
                &err,
                PagingError::Conflict {
                    page: 0xffff_ffff_c000_1000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("`a`"), "{err}");
    }

    #[test]
    fn la57_tables_walk_57_bit_addresses() {
        const HC57: u64 = 0xff00_0000_c040_0000;
        let mut m = PageMap::new_la57();
        m.map("identity", 0x1000, 0x1000, 0x3f_f000, PTE_RW)
            .unwrap();
        m.map64("core", HC57, 0x0060_0000, 0x3000, PTE_RW).unwrap();
        m.map64("fs", 0xffff_8000_f5f5_0000, 0x0010_2000, 0x1000, 0)
            .unwrap();
        let t = m.layout(0x0020_0000);
        assert!(t.la57);
        assert_eq!(
            t.translate64(HC57 + 0x1234).map(|x| x.phys),
            Some(0x0060_1234)
        );
        assert_eq!(t.translate(0x0012_3456).map(|x| x.phys), Some(0x0012_3456));
        assert_eq!(
            t.translate64(0xffff_8000_f5f5_0004).map(|x| x.phys),
            Some(0x0010_2004)
        );
        // PML5 entry 256 holds the 57-bit address, entry 511 the 48-bit one.
        let pml5e = |i: usize| u64::from_le_bytes(t.bytes[i * 8..i * 8 + 8].try_into().unwrap());
        assert_ne!(pml5e(256) & PTE_P, 0);
        assert_ne!(pml5e(511) & PTE_P, 0);
        assert_ne!(pml5e(0) & PTE_P, 0);
        // A 4-level map refuses the address; a 57-bit non-canonical one is refused here.
        let mut four = PageMap::new(HostMode::Amd64);
        assert!(matches!(
            four.map64("core", HC57, 0x1000, 0x1000, 0),
            Err(PagingError::NonCanonical { .. })
        ));
        assert!(matches!(
            m.map64("odd", 0x0100_0000_0000_0000, 0x1000, 0x1000, 0),
            Err(PagingError::NonCanonical { .. })
        ));
    }

    #[test]
    fn mode_names_round_trip() {
        for mode in [HostMode::Legacy32, HostMode::Pae, HostMode::Amd64] {
            assert_eq!(HostMode::from_name(mode.name()), Some(mode));
        }
        assert!(HostMode::Amd64.is_long() && !HostMode::Pae.is_long());
        assert!(is_canonical(0xffff_8000_0000_0000) && is_canonical(0x7fff_ffff_ffff));
        assert!(!is_canonical(0x8000_0000_0000));
    }
}
