//! Host page tables built as data (SDM Vol. 3A §4.3 32-bit paging, §4.4 PAE paging).
//!
//! The testbed's host kernel runs with paging on, as a real embedding host
//! does. Its tables are computed here, in Rust, and placed in the image; the
//! generated code only loads CR3. Mappings are 4 KiB pages; every conflict
//! (two owners for one virtual page) is an error naming both owners.
//! [`PageTables::translate`] walks the produced bytes the way the MMU does, so
//! tests prove each mapping from the image itself.

use std::collections::BTreeMap;
use std::fmt;

/// Page size.
pub const PAGE: u32 = 0x1000;

/// Paging mode of the host the kernel plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostMode {
    /// 32-bit paging without PAE (two levels, 4-byte entries).
    Legacy32,
    /// PAE paging (PDPT below 4 GiB, three levels, 8-byte entries).
    Pae,
}

impl HostMode {
    /// Short name used on the serial line (`legacy32`, `pae`).
    pub fn name(self) -> &'static str {
        match self {
            HostMode::Legacy32 => "legacy32",
            HostMode::Pae => "pae",
        }
    }

    /// Parses [`HostMode::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "legacy32" => Some(HostMode::Legacy32),
            "pae" => Some(HostMode::Pae),
            _ => None,
        }
    }
}

impl fmt::Display for HostMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Present.
pub const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// Page-level write-through.
pub const PTE_PWT: u64 = 1 << 3;
/// Page-level cache disable.
pub const PTE_PCD: u64 = 1 << 4;

/// A named virtual range `[start, end)` (end as u64 so the top page fits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtRange {
    /// Owner name.
    pub name: String,
    /// First virtual byte.
    pub start: u32,
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
        virt: u32,
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
        virt: u32,
    },
    /// The range runs past 4 GiB, virtually or physically.
    #[error("mapping `{name}`: {virt:#010x} -> {phys:#010x} with {len:#x} bytes wraps past 4 GiB")]
    Wraps {
        /// Mapping name.
        name: String,
        /// Virtual address.
        virt: u32,
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
        virt: u32,
    },
    /// A virtual page already belongs to another mapping.
    #[error("{new} conflicts with {existing} at page {page:#010x}")]
    Conflict {
        /// The mapping being added.
        new: VirtRange,
        /// The mapping already there.
        existing: VirtRange,
        /// First conflicting virtual page.
        page: u32,
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
    pages: BTreeMap<u32, Pte>,
    owners: Vec<VirtRange>,
}

/// Page tables laid out at a physical base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageTables {
    /// Paging mode.
    pub mode: HostMode,
    /// Physical address of the first table page.
    pub base: u32,
    /// Value for CR3: the page directory (legacy) or the PDPT (PAE).
    pub cr3: u32,
    /// The table pages, back to back from `base`.
    pub bytes: Vec<u8>,
}

impl PageMap {
    /// An empty map for `mode`.
    pub fn new(mode: HostMode) -> Self {
        Self {
            mode,
            pages: BTreeMap::new(),
            owners: Vec::new(),
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
        let name_s = || name.to_owned();
        if virt % PAGE != 0 {
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
        if u64::from(virt) + span > 1 << 32 || u64::from(phys) + span > 1 << 32 {
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
            end: u64::from(virt) + span,
        };
        for i in 0..pages {
            let page = virt + i * PAGE;
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
                virt + i * PAGE,
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

    fn pt_keys(&self) -> Vec<u32> {
        let shift = match self.mode {
            HostMode::Legacy32 => 22,
            HostMode::Pae => 21,
        };
        let mut keys: Vec<u32> = self.pages.keys().map(|v| v >> shift).collect();
        keys.dedup();
        keys
    }

    fn pd_keys(&self) -> Vec<u32> {
        let mut keys: Vec<u32> = self.pages.keys().map(|v| v >> 30).collect();
        keys.dedup();
        keys
    }

    /// Number of 4 KiB table pages [`PageMap::layout`] will produce.
    pub fn table_pages(&self) -> u32 {
        let pts = self.pt_keys().len() as u32;
        match self.mode {
            HostMode::Legacy32 => 1 + pts,
            HostMode::Pae => 1 + self.pd_keys().len() as u32 + pts,
        }
    }

    /// Lays the tables out at physical `base` (page aligned).
    pub fn layout(&self, base: u32) -> PageTables {
        let n = self.table_pages() as usize;
        let mut bytes = vec![0u8; n * PAGE as usize];
        let put32 = |bytes: &mut [u8], off: usize, v: u32| {
            bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
        };
        let put64 = |bytes: &mut [u8], off: usize, v: u64| {
            bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
        };
        let page_addr = |i: usize| base + (i as u32) * PAGE;
        match self.mode {
            HostMode::Legacy32 => {
                // Page 0: the page directory; then one page table per used PDE.
                let pts = self.pt_keys();
                for (i, pde) in pts.iter().enumerate() {
                    let pt = page_addr(1 + i);
                    put32(
                        &mut bytes,
                        (*pde as usize) * 4,
                        pt | (PTE_P | PTE_RW) as u32,
                    );
                }
                for (virt, pte) in &self.pages {
                    let i = pts.binary_search(&(virt >> 22)).unwrap_or(0);
                    let off = (1 + i) * PAGE as usize + ((virt >> 12) & 0x3ff) as usize * 4;
                    put32(&mut bytes, off, pte.phys | pte.flags as u32);
                }
                PageTables {
                    mode: self.mode,
                    base,
                    cr3: base,
                    bytes,
                }
            }
            HostMode::Pae => {
                // Page 0: the PDPT (first 32 bytes); then the PDs; then the PTs.
                let pds = self.pd_keys();
                let pts = self.pt_keys();
                for (i, pdpte) in pds.iter().enumerate() {
                    // PDPTEs take only P (and cache bits); RW/US are reserved.
                    put64(
                        &mut bytes,
                        *pdpte as usize * 8,
                        u64::from(page_addr(1 + i)) | PTE_P,
                    );
                }
                for (i, key) in pts.iter().enumerate() {
                    let pd = pds.binary_search(&(key >> 9)).unwrap_or(0);
                    let off = (1 + pd) * PAGE as usize + (key & 0x1ff) as usize * 8;
                    let pt = page_addr(1 + pds.len() + i);
                    put64(&mut bytes, off, u64::from(pt) | PTE_P | PTE_RW);
                }
                for (virt, pte) in &self.pages {
                    let i = pts.binary_search(&(virt >> 21)).unwrap_or(0);
                    let off =
                        (1 + pds.len() + i) * PAGE as usize + ((virt >> 12) & 0x1ff) as usize * 8;
                    put64(&mut bytes, off, u64::from(pte.phys) | pte.flags);
                }
                PageTables {
                    mode: self.mode,
                    base,
                    cr3: base,
                    bytes,
                }
            }
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
    fn read(&self, phys: u32, size: usize) -> Option<u64> {
        let off = phys.checked_sub(self.base)? as usize;
        let b = self.bytes.get(off..off + size)?;
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    }

    /// Walks the tables like the MMU (tables must lie inside these bytes).
    pub fn translate(&self, virt: u32) -> Option<Translation> {
        let present = |e: u64| e & PTE_P != 0;
        match self.mode {
            HostMode::Legacy32 => {
                let pde = self.read(self.cr3 + (virt >> 22) * 4, 4)?;
                if !present(pde) {
                    return None;
                }
                let pt = (pde as u32) & !0xfff;
                let pte = self.read(pt + ((virt >> 12) & 0x3ff) * 4, 4)?;
                present(pte).then_some(Translation {
                    phys: ((pte as u32) & !0xfff) | (virt & 0xfff),
                    pte,
                })
            }
            HostMode::Pae => {
                let pdpte = self.read(self.cr3 + (virt >> 30) * 8, 8)?;
                if !present(pdpte) {
                    return None;
                }
                let pd = (pdpte as u32) & !0xfff;
                let pde = self.read(pd + ((virt >> 21) & 0x1ff) * 8, 8)?;
                if !present(pde) {
                    return None;
                }
                let pt = (pde as u32) & !0xfff;
                let pte = self.read(pt + ((virt >> 12) & 0x1ff) * 8, 8)?;
                present(pte).then_some(Translation {
                    phys: ((pte as u32) & !0xfff) | (virt & 0xfff),
                    pte,
                })
            }
        }
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
        for mode in [HostMode::Legacy32, HostMode::Pae] {
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
}
