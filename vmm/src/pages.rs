//! Where the core's memory comes from: the [`PageProvider`] an embedder
//! implements, the [`VecPages`] default and the [`TablePool`] the
//! intermediate and hyper tables are built in.
//!
//! The core asks for three kinds of memory ([`Purpose`]):
//!
//! | purpose | pages | contiguous | below 4 GiB | why |
//! |---|---|---|---|---|
//! | [`Purpose::CoreCode`] | the core-code block | yes | yes | the mode-changing code runs at its identity (physical) address with paging off, so every switcher must be one physical run the identity map covers |
//! | [`Purpose::Hma`] | the hypervisor area, page by page ([`PageProvider::hma`]) | no | yes | the host reaches it at one HC range and the core at one RC range, but both are virtual: the core maps RC page *i* to physical page *i* ([`crate::Vmm::hma_pages`]), the embedder maps HC page *i* to it; below 4 GiB because the 32-bit intermediate tables hold 32-bit physical addresses |
//! | [`Purpose::Tables`] | one page at a time | no | yes | CR3 and 32-bit page-table entries hold 32-bit physical addresses; each table is one page and tables point at each other, so they may be scattered |
//!
//! Every page is handed out together with the embedder's mapping of it
//! ([`PageProvider::Mapping`]): the bytes the core writes the images into.

use std::collections::BTreeMap;

use pgm_intermediate::{AllocError, MemoryError, PageAllocator, TableMemory, PAGE_SIZE};
use serde::Serialize;
use thiserror::Error;
use vmm_switcher::PhysAddr;

use crate::Placement;

/// What a request for pages is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Purpose {
    /// The core-code block: physically contiguous, below 4 GiB.
    CoreCode,
    /// The hypervisor area: pages below 4 GiB, anywhere relative to each
    /// other ([`PageProvider::hma`]).
    Hma,
    /// One page of the intermediate (switcher) page tables: below 4 GiB,
    /// anywhere relative to the other table pages.
    Tables,
    /// One page of the hyper context's page tables (`Hyper.cr3`): below
    /// 4 GiB, anywhere relative to the other table pages.
    HyperTables,
}

impl Purpose {
    /// Whether a request for this purpose needs physically contiguous pages.
    pub const fn contiguous(self) -> bool {
        matches!(self, Self::CoreCode)
    }

    /// Whether every page of this purpose must lie below 4 GiB (all of them:
    /// CR3, the 32-bit page-table entries the RC and identity views go
    /// through, and the core code's identity address are 32-bit).
    pub const fn below_4g(self) -> bool {
        true
    }

    /// The name used in errors.
    pub const fn name(self) -> &'static str {
        match self {
            Self::CoreCode => "core code",
            Self::Hma => "hypervisor area",
            Self::Tables => "intermediate tables",
            Self::HyperTables => "hyper tables",
        }
    }
}

/// Pages handed out by a [`PageProvider`]: the physical address of the first
/// byte and the embedder's mapping of all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pages<M> {
    /// Physical address of the first page (4 KiB aligned).
    pub phys: PhysAddr,
    /// The embedder's mapping: exactly `pages * 4096` bytes, zero-filled.
    pub map: M,
}

/// The hypervisor area as handed out by [`PageProvider::hma`]: one
/// physical page per 4 KiB of the area, in order, and the embedder's
/// mapping of all of them as one contiguous range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HmaPages<M> {
    /// Physical address of page *i* of the area (each 4 KiB aligned, below
    /// 4 GiB, anywhere relative to the others).
    pub phys: Vec<PhysAddr>,
    /// The embedder's mapping: exactly `phys.len() * 4096` bytes,
    /// zero-filled, byte `i * 4096 + o` being byte `o` of page `phys[i]`.
    pub map: M,
}

/// A provider could not or would not hand out pages.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PageError {
    /// No memory is left for the request.
    #[error("no {} pages left for a request of {pages} page(s)", purpose.name())]
    Exhausted {
        /// What the pages were for.
        purpose: Purpose,
        /// How many pages were asked for.
        pages: usize,
    },
    /// The provider refused for a reason of its own.
    #[error("{} request of {pages} page(s) refused: {reason}", purpose.name())]
    Refused {
        /// What the pages were for.
        purpose: Purpose,
        /// How many pages were asked for.
        pages: usize,
        /// The provider's reason.
        reason: String,
    },
}

/// Hands out the physical pages the core lives in, with the embedder's
/// mapping of each.
///
/// [`contiguous`](Self::contiguous) is asked once for [`Purpose::CoreCode`],
/// [`hma`](Self::hma) once for the hypervisor area;
/// [`table_page`](Self::table_page) is asked
/// `table_pages / 2` times for [`Purpose::Tables`] and the rest for
/// [`Purpose::HyperTables`] ([`crate::VmmConfig::table_pages`]). The core
/// checks what it gets (alignment, mapping size, the 4 GiB limit, overlaps)
/// and refuses bad pages with a [`crate::PlacementError`].
pub trait PageProvider {
    /// The embedder's mapping of a run of pages: the bytes the core writes.
    type Mapping: AsRef<[u8]> + AsMut<[u8]>;

    /// `pages` physically contiguous, zero-filled pages below 4 GiB for
    /// `purpose` ([`Purpose::CoreCode`]; also [`Purpose::Hma`] from the
    /// default [`hma`](Self::hma)).
    ///
    /// # Errors
    /// [`PageError`] when the provider cannot serve the request.
    fn contiguous(
        &mut self,
        purpose: Purpose,
        pages: usize,
    ) -> Result<Pages<Self::Mapping>, PageError>;

    /// One zero-filled page below 4 GiB for `purpose` ([`Purpose::Tables`]
    /// or [`Purpose::HyperTables`]); consecutive pages need not be adjacent.
    ///
    /// # Errors
    /// [`PageError`] when the provider cannot serve the request.
    fn table_page(&mut self, purpose: Purpose) -> Result<Pages<Self::Mapping>, PageError>;

    /// The hypervisor area: `pages` zero-filled pages below 4 GiB, page
    /// *i* anywhere relative to page *i - 1*, and one mapping of all of
    /// them in order. The mapping is the embedder's HC view of the area:
    /// the host reaches the VM structure at [`crate::Placement::hma_hc`],
    /// so the embedder maps HC page *i* to `phys[i]` (the core maps RC page
    /// *i* there itself). The default asks [`contiguous`](Self::contiguous)
    /// for one run of [`Purpose::Hma`] pages.
    ///
    /// # Errors
    /// [`PageError`] when the provider cannot serve the request.
    fn hma(&mut self, pages: usize) -> Result<HmaPages<Self::Mapping>, PageError> {
        let run = self.contiguous(Purpose::Hma, pages)?;
        let phys = (0..pages as u64)
            .map(|i| PhysAddr(run.phys.0.saturating_add(i * PAGE_SIZE)))
            .collect();
        Ok(HmaPages { phys, map: run.map })
    }
}

/// The order in which [`VecPages`] hands out table pages inside its region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum TableOrder {
    /// Ascending and adjacent: the intermediate tables in the first half of
    /// the region, the hyper tables in the second.
    #[default]
    Ascending,
    /// Every other page of a region twice the size, from the top down: the
    /// intermediate tables in the upper half, the hyper tables in the lower
    /// half, no two tables adjacent and each set in descending order. The
    /// hypervisor area's pages are handed out in descending order too (page
    /// 0 the highest), so no two consecutive HMA pages are adjacent upwards.
    Scattered,
}

/// The default provider: `Vec`-backed images at the placement's physical
/// addresses (the core code at [`Placement::code_phys`], the HMA in the
/// pages from [`Placement::hma_phys`] up (ascending, or descending for
/// [`TableOrder::Scattered`]), the tables inside the region of
/// `table_pages` pages at [`Placement::tables_phys`]), for embedders that
/// copy the images to those addresses themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecPages {
    code_phys: PhysAddr,
    hma_phys: PhysAddr,
    tables_phys: PhysAddr,
    region_pages: u32,
    order: TableOrder,
    /// Table pages still to hand out, by purpose, next one last.
    inter: Vec<u64>,
    hyper: Vec<u64>,
}

impl VecPages {
    /// The provider for `placement` with a table region of `table_pages`
    /// pages handed out in [`TableOrder::Ascending`] order.
    pub fn new(placement: &Placement, table_pages: u32) -> Self {
        Self::with_order(placement, table_pages, TableOrder::Ascending)
    }

    /// The provider for `placement` with a table region of `table_pages`
    /// pages handed out in `order`.
    pub fn with_order(placement: &Placement, table_pages: u32, order: TableOrder) -> Self {
        let base = placement.tables_phys.0;
        let page = |i: u32| base.saturating_add(u64::from(i) * PAGE_SIZE);
        let (mut inter, mut hyper): (Vec<u64>, Vec<u64>) = match order {
            TableOrder::Ascending => {
                let half = table_pages / 2;
                (
                    (0..half).map(page).collect(),
                    (half..table_pages).map(page).collect(),
                )
            }
            TableOrder::Scattered => {
                // Every other page from the top of each half down.
                let n = table_pages;
                let inter = (n..n.saturating_mul(2))
                    .rev()
                    .step_by(2)
                    .map(page)
                    .collect();
                let hyper = (0..n).rev().step_by(2).map(page).collect();
                (inter, hyper)
            }
        };
        // Handed out from the end.
        inter.reverse();
        hyper.reverse();
        Self {
            code_phys: placement.code_phys,
            hma_phys: placement.hma_phys,
            tables_phys: placement.tables_phys,
            region_pages: match order {
                TableOrder::Ascending => table_pages,
                TableOrder::Scattered => table_pages.saturating_mul(2),
            },
            order,
            inter,
            hyper,
        }
    }

    /// The table region: its physical base and size in pages (twice
    /// `table_pages` for [`TableOrder::Scattered`]).
    pub fn table_region(&self) -> (PhysAddr, u32) {
        (self.tables_phys, self.region_pages)
    }
}

/// `pages` zeroed pages as a `Vec`, or [`PageError::Refused`] when the size
/// does not fit a `usize`.
fn zeroed(purpose: Purpose, pages: usize) -> Result<Vec<u8>, PageError> {
    let len = pages
        .checked_mul(PAGE_SIZE as usize)
        .ok_or_else(|| PageError::Refused {
            purpose,
            pages,
            reason: "size overflows".into(),
        })?;
    Ok(vec![0; len])
}

impl PageProvider for VecPages {
    type Mapping = Vec<u8>;

    fn contiguous(&mut self, purpose: Purpose, pages: usize) -> Result<Pages<Vec<u8>>, PageError> {
        let phys = match purpose {
            Purpose::CoreCode => self.code_phys,
            Purpose::Hma => self.hma_phys,
            Purpose::Tables | Purpose::HyperTables => {
                return Err(PageError::Refused {
                    purpose,
                    pages,
                    reason: "table pages come one at a time".into(),
                })
            }
        };
        Ok(Pages {
            phys,
            map: zeroed(purpose, pages)?,
        })
    }

    fn hma(&mut self, pages: usize) -> Result<HmaPages<Vec<u8>>, PageError> {
        let base = self.hma_phys.0;
        let page = |i: usize| {
            (i as u64)
                .checked_mul(PAGE_SIZE)
                .and_then(|off| base.checked_add(off))
                .map(PhysAddr)
                .ok_or(PageError::Exhausted {
                    purpose: Purpose::Hma,
                    pages,
                })
        };
        let phys = match self.order {
            TableOrder::Ascending => (0..pages).map(page).collect::<Result<_, _>>()?,
            TableOrder::Scattered => (0..pages).rev().map(page).collect::<Result<_, _>>()?,
        };
        Ok(HmaPages {
            phys,
            map: zeroed(Purpose::Hma, pages)?,
        })
    }

    fn table_page(&mut self, purpose: Purpose) -> Result<Pages<Vec<u8>>, PageError> {
        let list = match purpose {
            Purpose::Tables => &mut self.inter,
            Purpose::HyperTables => &mut self.hyper,
            Purpose::CoreCode | Purpose::Hma => {
                return Err(PageError::Refused {
                    purpose,
                    pages: 1,
                    reason: "not a table purpose".into(),
                })
            }
        };
        let phys = list
            .pop()
            .ok_or(PageError::Exhausted { purpose, pages: 1 })?;
        Ok(Pages {
            phys: PhysAddr(phys),
            map: zeroed(purpose, 1)?,
        })
    }
}

/// Table pages from a [`PageProvider`], handed to one
/// [`pgm_intermediate::IntermediateContext`] in the order they came.
///
/// Reads and writes reach only pages already handed out, through the
/// embedder's mapping of each.
#[derive(Debug)]
pub struct TablePool<M> {
    pages: Vec<(u64, M)>,
    index: BTreeMap<u64, usize>,
    used: usize,
}

impl<M: AsRef<[u8]> + AsMut<[u8]>> TablePool<M> {
    /// A pool of `pages` (physical address, mapping of one page).
    pub(crate) fn new(pages: Vec<(u64, M)>) -> Self {
        let index = pages
            .iter()
            .enumerate()
            .map(|(i, (phys, _))| (*phys, i))
            .collect();
        Self {
            pages,
            index,
            used: 0,
        }
    }

    /// Every page of the pool (used or not), by physical address.
    pub fn all_phys(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.iter().map(|(p, _)| *p)
    }

    /// The pages handed out so far: physical address and bytes, in the
    /// order they were handed out.
    pub fn used(&self) -> impl Iterator<Item = (PhysAddr, &[u8])> + '_ {
        self.pages
            .iter()
            .take(self.used)
            .map(|(p, m)| (PhysAddr(*p), m.as_ref()))
    }

    /// How many pages are handed out.
    pub fn used_pages(&self) -> usize {
        self.used
    }

    /// The used page holding `phys` and the offset in it, for an aligned
    /// access of `size` bytes.
    fn slot(&self, phys: u64, size: u64) -> Option<(usize, usize)> {
        if phys % size != 0 {
            return None;
        }
        let base = phys & !(PAGE_SIZE - 1);
        let i = *self.index.get(&base)?;
        (i < self.used).then_some((i, (phys - base) as usize))
    }

    fn bytes<const N: usize>(&self, phys: u64) -> Option<[u8; N]> {
        let (i, off) = self.slot(phys, N as u64)?;
        let page = self.pages.get(i)?.1.as_ref();
        page.get(off..off + N)?.try_into().ok()
    }

    fn put(&mut self, phys: u64, value: &[u8]) -> Result<(), MemoryError> {
        let (i, off) = self
            .slot(phys, value.len() as u64)
            .ok_or(MemoryError { phys })?;
        let page = self
            .pages
            .get_mut(i)
            .ok_or(MemoryError { phys })?
            .1
            .as_mut();
        page.get_mut(off..off + value.len())
            .ok_or(MemoryError { phys })?
            .copy_from_slice(value);
        Ok(())
    }
}

impl<M: AsRef<[u8]> + AsMut<[u8]>> TableMemory for TablePool<M> {
    fn read_u64(&self, phys: u64) -> Result<u64, MemoryError> {
        self.bytes::<8>(phys)
            .map(u64::from_le_bytes)
            .ok_or(MemoryError { phys })
    }

    fn write_u64(&mut self, phys: u64, value: u64) -> Result<(), MemoryError> {
        self.put(phys, &value.to_le_bytes())
    }

    fn read_u32(&self, phys: u64) -> Result<u32, MemoryError> {
        self.bytes::<4>(phys)
            .map(u32::from_le_bytes)
            .ok_or(MemoryError { phys })
    }

    fn write_u32(&mut self, phys: u64, value: u32) -> Result<(), MemoryError> {
        self.put(phys, &value.to_le_bytes())
    }
}

impl<M: AsRef<[u8]> + AsMut<[u8]>> PageAllocator for TablePool<M> {
    fn alloc_zeroed(&mut self) -> Result<u64, AllocError> {
        let capacity = self.pages.len();
        let (phys, map) = self
            .pages
            .get_mut(self.used)
            .ok_or(AllocError::OutOfPages { capacity })?;
        map.as_mut().fill(0);
        self.used += 1;
        Ok(*phys)
    }

    fn available_pages(&self) -> usize {
        self.pages.len() - self.used
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scattered_order_leaves_gaps_and_descends() {
        let p = Placement::default();
        let mut v = VecPages::with_order(&p, 4, TableOrder::Scattered);
        assert_eq!(v.table_region(), (p.tables_phys, 8));
        let base = p.tables_phys.0;
        let h1 = v.table_page(Purpose::HyperTables).unwrap().phys.0;
        let i1 = v.table_page(Purpose::Tables).unwrap().phys.0;
        let h2 = v.table_page(Purpose::HyperTables).unwrap().phys.0;
        let i2 = v.table_page(Purpose::Tables).unwrap().phys.0;
        assert_eq!(
            (h1, i1, h2, i2),
            (base + 0x3000, base + 0x7000, base + 0x1000, base + 0x5000)
        );
        assert_eq!(
            v.table_page(Purpose::Tables).map(|_| ()),
            Err(PageError::Exhausted {
                purpose: Purpose::Tables,
                pages: 1
            })
        );
        assert!(v.contiguous(Purpose::Tables, 2).is_err());
        let hma = v.hma(3).unwrap();
        let h = p.hma_phys.0;
        assert_eq!(
            hma.phys,
            [h + 0x2000, h + 0x1000, h].map(PhysAddr).to_vec(),
            "descending HMA pages"
        );
        assert_eq!(hma.map.len(), 3 * 4096);
        let asc = VecPages::new(&p, 4).hma(2).unwrap().phys;
        assert_eq!(asc, [h, h + 0x1000].map(PhysAddr).to_vec());
    }

    #[test]
    fn pool_reaches_only_used_pages() {
        let mut pool = TablePool::new(vec![(0x5000, vec![0u8; 4096]), (0x2000, vec![0u8; 4096])]);
        assert_eq!(pool.read_u64(0x5000), Err(MemoryError { phys: 0x5000 }));
        assert_eq!(pool.alloc_zeroed(), Ok(0x5000));
        pool.write_u64(0x5ff8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(pool.read_u32(0x5ffc), Ok(0x1122_3344));
        assert_eq!(pool.read_u64(0x2000), Err(MemoryError { phys: 0x2000 }));
        assert_eq!(pool.read_u64(0x5004), Err(MemoryError { phys: 0x5004 }));
        assert_eq!(pool.alloc_zeroed(), Ok(0x2000));
        assert_eq!(
            pool.alloc_zeroed(),
            Err(AllocError::OutOfPages { capacity: 2 })
        );
        assert_eq!(pool.used().count(), 2);
    }
}
