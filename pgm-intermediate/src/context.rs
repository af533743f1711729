//! [`IntermediateContext`]: the three roots, `map`, `unmap`, `translate`.

use heap::vec::Vec;

use crate::walk::{self, decode, levels, read_at, read_entry, table_addr_mask, Decoded};
use crate::{
    is_canonical, is_canonical57, AllocError, EntryFlags, Flavour, Flavours, Level, MapFlags,
    Mapping, MemoryError, PageAllocator, PageSize, Translation, WalkError, FOUR_GIB, PAGE_SIZE,
};

/// Flags of every directory (non-leaf) entry the context creates.
const DIR_FLAGS: u64 =
    EntryFlags::PRESENT.bits() | EntryFlags::WRITABLE.bits() | EntryFlags::ACCESSED.bits();
/// Flags every leaf gets on top of its [`MapFlags`].
const LEAF_FLAGS: u64 =
    EntryFlags::PRESENT.bits() | EntryFlags::ACCESSED.bits() | EntryFlags::DIRTY.bits();

/// [`IntermediateContext::new`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum NewError {
    /// The allocator ran out of pages for the root pages (seven, eight
    /// with the PML5).
    #[error("cannot allocate the intermediate root tables")]
    Alloc(#[from] AllocError),
    /// The allocator handed out a page that is not aligned or not below 4 GiB.
    #[error("table page {phys:#x} is not a 4 KiB-aligned page below 4 GiB")]
    BadTablePage {
        /// The page's physical address.
        phys: u64,
    },
    /// A freshly allocated root could not be written.
    #[error("cannot write the PAE PDPT")]
    Memory(#[from] MemoryError),
}

/// A range given to [`IntermediateContext::map`] or
/// [`IntermediateContext::unmap`] is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RangeError {
    /// `len` is zero.
    #[error("empty range at {virt:#x}")]
    Empty {
        /// The start address.
        virt: u64,
    },
    /// The linear start address is not 4 KiB aligned.
    #[error("virtual address {virt:#x} is not 4 KiB aligned")]
    VirtMisaligned {
        /// The start address.
        virt: u64,
    },
    /// The physical start address is not 4 KiB aligned.
    #[error("physical address {phys:#x} is not 4 KiB aligned")]
    PhysMisaligned {
        /// The start address.
        phys: u64,
    },
    /// The range runs past the end of the 64-bit space.
    #[error("range {start:#x} + {len:#x} wraps around the 64-bit address space")]
    Wraps {
        /// The start address (linear or physical).
        start: u64,
        /// The requested length.
        len: u64,
    },
    /// The linear range does not lie inside one flavour's address space:
    /// below 4 GiB for 32-bit and PAE paging, inside one canonical half for
    /// long mode.
    #[error("virtual range {virt:#x}..={last:#x} is outside the {flavour} linear address space")]
    VirtOutOfRange {
        /// The start address.
        virt: u64,
        /// The last byte of the (page-rounded) range.
        last: u64,
        /// The flavour that cannot address it.
        flavour: Flavour,
    },
    /// The physical range is beyond what a flavour's leaf entries hold:
    /// 4 GiB for 32-bit PTEs, 2^52 otherwise.
    #[error(
        "physical range {phys:#x}..={last:#x} is beyond what a {flavour} page entry can address"
    )]
    PhysOutOfRange {
        /// The start address.
        phys: u64,
        /// The last byte of the (page-rounded) range.
        last: u64,
        /// The flavour that cannot address it.
        flavour: Flavour,
    },
}

/// [`IntermediateContext::map`] failed; nothing was mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum MapError {
    /// Every flavour asked for is one this context does not build (5-level
    /// paging in a context from [`IntermediateContext::new`]).
    #[error(
        "this intermediate context has no {flavour} tables (see IntermediateContext::with_la57)"
    )]
    NotBuilt {
        /// The first flavour asked for.
        flavour: Flavour,
    },
    /// The range is unusable.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// `flags` has bits that are not [`MapFlags`].
    #[error("unknown mapping flag bits {bits:#x}")]
    UnknownFlags {
        /// The unknown bits.
        bits: u64,
    },
    /// A page is already mapped to another frame or with other attributes.
    #[error(
        "{flavour}: {virt:#x} is already mapped to {existing_phys:#x} ({existing_flags:?}), \
         cannot map it to {requested_phys:#x} ({requested_flags:?})"
    )]
    Conflict {
        /// The conflicting page.
        virt: u64,
        /// Where it is mapped now.
        existing_phys: u64,
        /// Where the request wanted it.
        requested_phys: u64,
        /// Its attributes now.
        existing_flags: MapFlags,
        /// The requested attributes.
        requested_flags: MapFlags,
        /// The flavour whose tables conflict.
        flavour: Flavour,
    },
    /// The allocator has fewer free pages than the new tables need.
    #[error("mapping needs {needed} new table pages but only {available} are free")]
    OutOfPages {
        /// Pages the request needs.
        needed: usize,
        /// Pages the allocator reported free.
        available: usize,
    },
    /// The allocator failed although it reported enough pages. Pages
    /// allocated before the failure are lost, but no entry was written.
    #[error("cannot allocate a page table")]
    Alloc(#[from] AllocError),
    /// The allocator handed out a page that is not aligned or not below 4 GiB.
    #[error("table page {phys:#x} is not a 4 KiB-aligned page below 4 GiB")]
    BadTablePage {
        /// The page's physical address.
        phys: u64,
    },
    /// The existing tables could not be walked (reserved bits, bad pointers).
    #[error("the existing tables cannot be walked")]
    Walk(#[from] WalkError),
    /// Table memory could not be written.
    #[error("cannot write a table entry")]
    Memory(#[from] MemoryError),
}

/// [`IntermediateContext::unmap`] failed; nothing was unmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum UnmapError {
    /// Every flavour asked for is one this context does not build.
    #[error("this intermediate context has no {flavour} tables")]
    NotBuilt {
        /// The first flavour asked for.
        flavour: Flavour,
    },
    /// The range is unusable.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// A page of the range lies in a large page, which this context does not split.
    #[error("{flavour}: {virt:#x} lies in a {page_size:?} page, which unmap does not split")]
    LargePage {
        /// The page.
        virt: u64,
        /// The flavour.
        flavour: Flavour,
        /// The large page's size.
        page_size: PageSize,
    },
    /// The existing tables could not be walked.
    #[error("the existing tables cannot be walked")]
    Walk(#[from] WalkError),
    /// Table memory could not be written.
    #[error("cannot write a table entry")]
    Memory(#[from] MemoryError),
}

/// The intermediate page tables, in all three flavours, over allocator `A`.
///
/// [`new`](Self::new) allocates the seven root pages: the 32-bit PD, the PAE
/// PDPT with its four PDs (PDPTEs preset, as PAE loads all four with CR3),
/// and the PML4; [`with_la57`](Self::with_la57) an eighth, the PML5 of the
/// 5-level tables. Lower tables are allocated by [`map`](Self::map) as
/// needed, one page table per 4 MiB (32-bit) or 2 MiB (PAE, long) region
/// touched, never shared between directory entries (nor between the 4-level
/// and 5-level tables). Tables are never freed.
#[derive(Clone, Debug)]
pub struct IntermediateContext<A> {
    alloc: A,
    pd32: u32,
    pdpt_pae: u32,
    pml4: u32,
    pml5: Option<u32>,
}

fn table_page(phys: u64) -> Option<u32> {
    if phys % PAGE_SIZE != 0 {
        return None;
    }
    u32::try_from(phys).ok()
}

/// Checks a linear range against every flavour in `flavours`; returns the page count.
fn virt_pages(virt: u64, len: u64, flavours: Flavours) -> Result<u64, RangeError> {
    if len == 0 {
        return Err(RangeError::Empty { virt });
    }
    if virt % PAGE_SIZE != 0 {
        return Err(RangeError::VirtMisaligned { virt });
    }
    let pages = len.div_ceil(PAGE_SIZE);
    let last = span(virt, pages).ok_or(RangeError::Wraps { start: virt, len })?;
    for flavour in flavours.flavours() {
        let ok = match flavour {
            Flavour::Legacy32 | Flavour::Pae => last < FOUR_GIB,
            // Both ends canonical and in the same half: no hole in between.
            Flavour::Long => {
                is_canonical(virt) && is_canonical(last) && (virt >> 47) == (last >> 47)
            }
            Flavour::La57 => {
                is_canonical57(virt) && is_canonical57(last) && (virt >> 56) == (last >> 56)
            }
        };
        if !ok {
            return Err(RangeError::VirtOutOfRange {
                virt,
                last,
                flavour,
            });
        }
    }
    Ok(pages)
}

fn check_phys(phys: u64, len: u64, pages: u64, flavours: Flavours) -> Result<(), RangeError> {
    if phys % PAGE_SIZE != 0 {
        return Err(RangeError::PhysMisaligned { phys });
    }
    let last = span(phys, pages).ok_or(RangeError::Wraps { start: phys, len })?;
    for flavour in flavours.flavours() {
        if last >= flavour.phys_limit() {
            return Err(RangeError::PhysOutOfRange {
                phys,
                last,
                flavour,
            });
        }
    }
    Ok(())
}

/// Last byte of `pages` pages from `start`, if it does not wrap.
fn span(start: u64, pages: u64) -> Option<u64> {
    pages
        .checked_mul(PAGE_SIZE)
        .and_then(|bytes| start.checked_add(bytes - 1))
}

/// The leaf attributes `flags` become in `flavour`.
fn requested_flags(flavour: Flavour, flags: MapFlags) -> MapFlags {
    match flavour {
        Flavour::Legacy32 => flags - MapFlags::NO_EXECUTE,
        Flavour::Pae | Flavour::Long | Flavour::La57 => flags,
    }
}

impl<A: PageAllocator> IntermediateContext<A> {
    /// Allocate the roots of all three flavours from `alloc` (7 pages).
    ///
    /// # Errors
    ///
    /// [`NewError`] when the allocator runs out or hands out a page that is
    /// not 4 KiB aligned below 4 GiB.
    pub fn new(mut alloc: A) -> Result<Self, NewError> {
        let mut roots = [0u32; 7];
        for root in &mut roots {
            let phys = alloc.alloc_zeroed()?;
            *root = table_page(phys).ok_or(NewError::BadTablePage { phys })?;
        }
        let [pd32, pdpt_pae, pd0, pd1, pd2, pd3, pml4] = roots;
        for (i, pd) in [pd0, pd1, pd2, pd3].into_iter().enumerate() {
            // A PAE PDPTE may carry only P, PWT and PCD besides the address.
            alloc.write_u64(
                u64::from(pdpt_pae) + 8 * i as u64,
                u64::from(pd) | EntryFlags::PRESENT.bits(),
            )?;
        }
        Ok(Self {
            alloc,
            pd32,
            pdpt_pae,
            pml4,
            pml5: None,
        })
    }

    /// [`new`](Self::new), plus the 5-level tables ([`Flavour::La57`]): an
    /// eighth root page, the PML5, whose entries point to PML4s of their
    /// own. For hosts running with CR4.LA57 (8 pages).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn with_la57(alloc: A) -> Result<Self, NewError> {
        let mut ctx = Self::new(alloc)?;
        let phys = ctx.alloc.alloc_zeroed()?;
        ctx.pml5 = Some(table_page(phys).ok_or(NewError::BadTablePage { phys })?);
        Ok(ctx)
    }

    /// CR3 for 5-level paging: the PML5's physical address, below 4 GiB
    /// (`FIX_INTER_LA57_CR3`); `None` for a context from [`new`](Self::new).
    pub fn cr3_la57(&self) -> Option<u32> {
        self.pml5
    }

    /// Whether this context builds `flavour`'s tables (all but
    /// [`Flavour::La57`] always; that one with [`with_la57`](Self::with_la57)).
    pub fn has(&self, flavour: Flavour) -> bool {
        flavour != Flavour::La57 || self.pml5.is_some()
    }

    /// The flavours of `flavours` this context builds; an error naming the
    /// first one asked for when that leaves none.
    fn built(&self, flavours: Flavours) -> Result<Flavours, Flavour> {
        let built = if self.pml5.is_some() {
            flavours
        } else {
            flavours - Flavours::LA57
        };
        match flavours.flavours().next() {
            Some(first) if built.is_empty() => Err(first),
            _ => Ok(built),
        }
    }

    /// CR3 for 32-bit paging: the page directory's physical address
    /// (`PGMGetInter32BitCR3`, `FIX_INTER_32BIT_CR3`).
    pub fn cr3_32(&self) -> u32 {
        self.pd32
    }

    /// CR3 for PAE paging: the PDPT's physical address
    /// (`PGMGetInterPaeCR3`, `FIX_INTER_PAE_CR3`).
    pub fn cr3_pae(&self) -> u32 {
        self.pdpt_pae
    }

    /// CR3 for 4-level paging: the PML4's physical address, below 4 GiB so
    /// 32-bit code can load it (`PGMGetInterAmd64CR3`, `FIX_INTER_AMD64_CR3`).
    pub fn cr3_amd64(&self) -> u32 {
        self.pml4
    }

    /// The CR3 value of `flavour`; 0 for [`Flavour::La57`] in a context
    /// without it ([`has`](Self::has); [`cr3_la57`](Self::cr3_la57) says so
    /// as an `Option`).
    pub fn cr3(&self, flavour: Flavour) -> u32 {
        match flavour {
            Flavour::Legacy32 => self.pd32,
            Flavour::Pae => self.pdpt_pae,
            Flavour::Long => self.pml4,
            Flavour::La57 => self.pml5.unwrap_or(0),
        }
    }

    /// The root of `flavour`, or the walk error for a flavour not built.
    fn root(&self, flavour: Flavour, virt: u64) -> Result<u64, WalkError> {
        if self.has(flavour) {
            Ok(u64::from(self.cr3(flavour)))
        } else {
            Err(WalkError::NotPresent {
                virt,
                flavour,
                level: Level::Pml5,
            })
        }
    }

    /// The table memory.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// The table memory, mutably. Writes through it bypass every check of
    /// this type; tests use it to plant entries `map` never makes.
    pub fn allocator_mut(&mut self) -> &mut A {
        &mut self.alloc
    }

    /// Give the table memory back.
    pub fn into_allocator(self) -> A {
        self.alloc
    }

    /// Walk `flavour`'s tables for `virt` as the CPU would; see [`walk::walk`].
    ///
    /// # Errors
    ///
    /// [`WalkError`] when `virt` is not mapped or not a linear address of
    /// the flavour, or the tables are malformed.
    pub fn translate(&self, flavour: Flavour, virt: u64) -> Result<Translation, WalkError> {
        walk::walk(&self.alloc, flavour, self.root(flavour, virt)?, virt)
    }

    /// [`translate`](Self::translate) for runs of neighbouring pages: the
    /// directory entries are read once per page table (`cache`, which the
    /// caller clears whenever it writes a directory entry).
    fn translate_cached(
        &self,
        flavour: Flavour,
        virt: u64,
        cache: &mut walk::WalkCache,
    ) -> Result<Translation, WalkError> {
        walk::walk_cached(&self.alloc, flavour, self.root(flavour, virt)?, virt, cache)
    }

    /// Every mapping of `flavour`, merged into runs, in ascending linear
    /// address order.
    ///
    /// # Errors
    ///
    /// [`WalkError`] when the tables are malformed.
    pub fn mappings(&self, flavour: Flavour) -> Result<Vec<Mapping>, WalkError> {
        if !self.has(flavour) {
            return Ok(Vec::new());
        }
        walk::list(&self.alloc, flavour, u64::from(self.cr3(flavour)))
    }

    /// Map `len` bytes (rounded up to whole pages) at linear `virt` to
    /// physical `phys` with leaf attributes `flags`, in every flavour of
    /// `flavours`, using 4 KiB pages.
    ///
    /// Flavours the context does not build are left out of `flavours`
    /// ([`MapError::NotBuilt`] when that leaves none), so
    /// [`Flavours::all()`] is every flavour this context has.
    ///
    /// `virt` and `phys` must be 4 KiB aligned. For 32-bit and PAE paging the
    /// linear range must lie below 4 GiB; for long mode it must lie in one
    /// canonical half (48-bit, or 57-bit for 5-level paging). The physical range must lie below 4 GiB for 32-bit
    /// paging and below 2^52 otherwise. New directory entries are
    /// P | R/W | A, plus U/S when `flags` has [`MapFlags::USER`] (which is
    /// also added to existing directory entries on the way); leaves are
    /// P | A | D | `flags` ([`MapFlags::NO_EXECUTE`] dropped for 32-bit).
    ///
    /// The whole request is checked first. The page tables it needs are
    /// counted from the directories alone (work proportional to the tables
    /// the range spans, not to its pages) and must fit in
    /// [`PageAllocator::available_pages`], or the request is
    /// [`MapError::OutOfPages`] before any page is looked at. Then every
    /// page in every flavour: a page already mapped to the same frame with
    /// the same attributes is left as it is (mapping is idempotent), a page
    /// mapped differently is a [`MapError::Conflict`]. Only then are tables
    /// allocated and entries written, so on error nothing is mapped.
    ///
    /// # Errors
    ///
    /// [`MapError`], naming the offending value.
    pub fn map(
        &mut self,
        virt: u64,
        phys: u64,
        len: u64,
        flags: MapFlags,
        flavours: Flavours,
    ) -> Result<(), MapError> {
        let unknown = flags.bits() & !MapFlags::all().bits();
        if unknown != 0 {
            return Err(MapError::UnknownFlags { bits: unknown });
        }
        let flavours = self
            .built(flavours)
            .map_err(|flavour| MapError::NotBuilt { flavour })?;
        let pages = virt_pages(virt, len, flavours)?;
        check_phys(phys, len, pages, flavours)?;

        // The page budget, from the directories alone.
        let last = span(virt, pages).ok_or(RangeError::Wraps { start: virt, len })?;
        let mut needed = 0usize;
        for flavour in flavours.flavours() {
            let root = Some(u64::from(self.cr3(flavour)));
            let n = self.new_tables(flavour, 0, root, virt, last)?;
            needed = needed.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
        }
        let available = self.alloc.available_pages();
        if available < needed {
            return Err(MapError::OutOfPages { needed, available });
        }

        // Pass 1: conflicts, page by page.
        let mut cache = walk::WalkCache::default();
        for flavour in flavours.flavours() {
            let want = requested_flags(flavour, flags);
            let root = self.root(flavour, virt).ok();
            for page in 0..pages {
                let (v, p) = (virt + page * PAGE_SIZE, phys + page * PAGE_SIZE);
                match root.and_then(|r| cache.pt_lookup(&self.alloc, flavour, r, v)) {
                    Some(Ok(walk::PtEntry::Absent)) => continue,
                    Some(Ok(walk::PtEntry::Leaf {
                        phys: got,
                        flags: f,
                        ..
                    })) if got == p && f == want => continue,
                    // A conflict or an error: the full walk below names it.
                    Some(_) | None => {}
                }
                match self.translate_cached(flavour, v, &mut cache) {
                    Ok(t) if t.phys == p && t.flags == want => {}
                    Ok(t) => {
                        return Err(MapError::Conflict {
                            virt: v,
                            existing_phys: t.phys,
                            requested_phys: p,
                            existing_flags: t.flags,
                            requested_flags: want,
                            flavour,
                        })
                    }
                    Err(WalkError::NotPresent { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }

        let mut pool = Vec::with_capacity(needed);
        for _ in 0..needed {
            let phys = self.alloc.alloc_zeroed()?;
            if table_page(phys).is_none() {
                return Err(MapError::BadTablePage { phys });
            }
            pool.push(phys);
        }
        pool.reverse();

        // Pass 2: write. Pages that already translate are the identical
        // mappings pass 1 accepted.
        let user = flags.contains(MapFlags::USER);
        for flavour in flavours.flavours() {
            let leaf_bits = requested_flags(flavour, flags).bits() | LEAF_FLAGS;
            for page in 0..pages {
                let v = virt + page * PAGE_SIZE;
                let leaf = (phys + page * PAGE_SIZE) | leaf_bits;
                let root = self.root(flavour, v)?;
                match cache.pt_lookup(&self.alloc, flavour, root, v) {
                    Some(Ok(walk::PtEntry::Leaf { .. })) => continue,
                    Some(Ok(walk::PtEntry::Absent)) if !user => {
                        if let Some(addr) = cache.pt_entry(flavour, root, v) {
                            self.write_entry(flavour, addr, leaf)?;
                            continue;
                        }
                    }
                    _ => {}
                }
                match self.translate_cached(flavour, v, &mut cache) {
                    Ok(_) => continue,
                    // Every directory is there and none needs U/S: what
                    // `install` would do is write the page-table entry.
                    Err(WalkError::NotPresent {
                        level: Level::Pt, ..
                    }) if !user => {
                        let root = self.root(flavour, v)?;
                        if let Some(addr) = cache.pt_entry(flavour, root, v) {
                            self.write_entry(flavour, addr, leaf)?;
                            continue;
                        }
                    }
                    Err(_) => {}
                }
                // Installing may write directory entries (new tables, U/S).
                cache.clear();
                self.install(flavour, v, leaf, user, &mut pool)?;
            }
        }
        Ok(())
    }

    /// How many new tables mapping `start..=last` needs below the
    /// level-`depth` table at `table` (`None`: that table is itself new and
    /// counted by the caller).
    /// Reads only directory entries: existing tables are descended, a
    /// missing entry's subtree is counted arithmetically, and a large page
    /// needs none (the page pass reports it as identical or a conflict).
    fn new_tables(
        &self,
        flavour: Flavour,
        depth: usize,
        table: Option<u64>,
        start: u64,
        last: u64,
    ) -> Result<u64, WalkError> {
        let specs = levels(flavour);
        let Some(spec) = specs.get(depth).filter(|s| s.level != Level::Pt) else {
            return Ok(0);
        };
        let Some(table) = table else {
            // Every table from this level down is new: one per distinct
            // entry of each directory level on the way.
            return Ok(specs
                .get(depth..specs.len() - 1)
                .unwrap_or_default()
                .iter()
                .map(|s| (last >> s.shift) - (start >> s.shift) + 1)
                .sum());
        };
        let mask = (1u64 << spec.shift) - 1;
        let mut total = 0u64;
        for n in (start >> spec.shift)..=(last >> spec.shift) {
            let sub_start = start.max(n << spec.shift);
            let sub_last = last.min((n << spec.shift) | mask);
            let entry = read_at(
                &self.alloc,
                flavour,
                spec,
                table,
                spec.index(sub_start),
                sub_start,
            )?;
            let child = if entry & EntryFlags::PRESENT.bits() == 0 {
                None
            } else {
                match decode(flavour, spec, sub_start, entry)? {
                    Decoded::Leaf { .. } => continue,
                    Decoded::Table(next) => Some(next),
                }
            };
            // A missing entry needs its own table, then everything below it.
            let own = u64::from(child.is_none());
            let below = self.new_tables(flavour, depth + 1, child, sub_start, sub_last)?;
            total = total.saturating_add(below).saturating_add(own);
        }
        Ok(total)
    }

    /// Write the path for one unmapped page, taking new tables from `pool`.
    fn install(
        &mut self,
        flavour: Flavour,
        virt: u64,
        leaf: u64,
        user: bool,
        pool: &mut Vec<u64>,
    ) -> Result<(), MapError> {
        let mut table = u64::from(self.cr3(flavour));
        for spec in levels(flavour) {
            let addr = table + spec.index(virt) * flavour.entry_size();
            if spec.level == Level::Pt {
                return Ok(self.write_entry(flavour, addr, leaf)?);
            }
            let entry = read_entry(&self.alloc, flavour, addr)?;
            // PAE PDPTEs have no R/W, U/S or A bits.
            let pae_root = flavour == Flavour::Pae && spec.level == Level::Pdpt;
            let us = if user && !pae_root {
                EntryFlags::USER.bits()
            } else {
                0
            };
            if entry & EntryFlags::PRESENT.bits() == 0 {
                let new = pool.pop().ok_or(MapError::OutOfPages {
                    needed: 1,
                    available: 0,
                })?;
                let flags = if pae_root {
                    EntryFlags::PRESENT.bits()
                } else {
                    DIR_FLAGS
                };
                self.write_entry(flavour, addr, new | flags | us)?;
                table = new;
            } else {
                if entry & us != us {
                    self.write_entry(flavour, addr, entry | us)?;
                }
                table = entry & table_addr_mask(flavour);
            }
        }
        Ok(())
    }

    fn write_entry(&mut self, flavour: Flavour, addr: u64, value: u64) -> Result<(), MemoryError> {
        match flavour {
            // Callers guarantee addresses below 4 GiB and no bit 63 here.
            Flavour::Legacy32 => self.alloc.write_u32(addr, value as u32),
            Flavour::Pae | Flavour::Long | Flavour::La57 => self.alloc.write_u64(addr, value),
        }
    }

    /// Remove the 4 KiB mappings of `len` bytes (rounded up to pages) at
    /// `virt` in every flavour of `flavours`. Pages not mapped are skipped;
    /// tables stay allocated. Returns the number of page entries cleared.
    /// The whole range is checked before anything is cleared.
    ///
    /// # Errors
    ///
    /// [`UnmapError`]: a bad range, a page inside a large page, or malformed tables.
    pub fn unmap(&mut self, virt: u64, len: u64, flavours: Flavours) -> Result<usize, UnmapError> {
        let flavours = self
            .built(flavours)
            .map_err(|flavour| UnmapError::NotBuilt { flavour })?;
        let pages = virt_pages(virt, len, flavours)?;
        let mut clear = Vec::new();
        let mut cache = walk::WalkCache::default();
        for flavour in flavours.flavours() {
            let root = self.root(flavour, virt).ok();
            for page in 0..pages {
                let v = virt + page * PAGE_SIZE;
                match root.and_then(|r| cache.pt_lookup(&self.alloc, flavour, r, v)) {
                    Some(Ok(walk::PtEntry::Absent)) => continue,
                    Some(Ok(walk::PtEntry::Leaf { addr, .. })) => {
                        clear.push((flavour, addr));
                        continue;
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => {}
                }
                match self.translate_cached(flavour, v, &mut cache) {
                    Ok(t) if t.page_size == PageSize::Size4K => {
                        if let Some(leaf) = t.path.leaf() {
                            clear.push((flavour, leaf.entry_addr(flavour)));
                        }
                    }
                    Ok(t) => {
                        return Err(UnmapError::LargePage {
                            virt: v,
                            flavour,
                            page_size: t.page_size,
                        })
                    }
                    Err(WalkError::NotPresent { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for &(flavour, addr) in &clear {
            self.write_entry(flavour, addr, 0)?;
        }
        Ok(clear.len())
    }
}
