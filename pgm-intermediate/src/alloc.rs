//! Where the page tables live: the [`TableMemory`] / [`PageAllocator`] traits
//! and the contiguous, `Vec`-backed [`VecAllocator`].

use heap::{vec, vec::Vec};

use crate::{FOUR_GIB, PAGE_SIZE};

/// A table-memory access at a physical address that the memory does not back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("no table memory at physical address {phys:#x}")]
pub struct MemoryError {
    /// The physical address of the access.
    pub phys: u64,
}

/// A page could not be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AllocError {
    /// Every page of the allocator is in use.
    #[error("out of table pages: all {capacity} pages are in use")]
    OutOfPages {
        /// How many pages the allocator holds in all.
        capacity: usize,
    },
}

/// Physical memory that holds page tables, read and written in
/// little-endian entries as the CPU reads them.
pub trait TableMemory {
    /// Read the 64-bit entry at `phys` (8-byte aligned).
    ///
    /// # Errors
    ///
    /// [`MemoryError`] when `phys` is not backed.
    fn read_u64(&self, phys: u64) -> Result<u64, MemoryError>;

    /// Write the 64-bit entry at `phys` (8-byte aligned).
    ///
    /// # Errors
    ///
    /// [`MemoryError`] when `phys` is not backed.
    fn write_u64(&mut self, phys: u64, value: u64) -> Result<(), MemoryError>;

    /// Read the 32-bit entry at `phys` (4-byte aligned). The default reads
    /// the enclosing 64-bit word.
    ///
    /// # Errors
    ///
    /// [`MemoryError`] when `phys` is not backed or not 4-byte aligned.
    fn read_u32(&self, phys: u64) -> Result<u32, MemoryError> {
        if phys % 4 != 0 {
            return Err(MemoryError { phys });
        }
        let word = self.read_u64(phys & !7)?;
        Ok((word >> ((phys & 4) * 8)) as u32)
    }

    /// Write the 32-bit entry at `phys` (4-byte aligned). The default does a
    /// read-modify-write of the enclosing 64-bit word.
    ///
    /// # Errors
    ///
    /// [`MemoryError`] when `phys` is not backed or not 4-byte aligned.
    fn write_u32(&mut self, phys: u64, value: u32) -> Result<(), MemoryError> {
        if phys % 4 != 0 {
            return Err(MemoryError { phys });
        }
        let shift = (phys & 4) * 8;
        let word = self.read_u64(phys & !7)?;
        let word = (word & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
        self.write_u64(phys & !7, word)
    }
}

/// Hands out zeroed 4 KiB table pages.
///
/// The intermediate context needs every table page below 4 GiB (its
/// physical addresses are loaded into CR3 and 32-bit entries from 32-bit
/// code); [`crate::IntermediateContext`] checks each page it gets.
pub trait PageAllocator: TableMemory {
    /// Allocate one zero-filled page and return its physical address (4 KiB aligned).
    ///
    /// # Errors
    ///
    /// [`AllocError`] when no page is left.
    fn alloc_zeroed(&mut self) -> Result<u64, AllocError>;

    /// How many more pages [`alloc_zeroed`](Self::alloc_zeroed) will hand
    /// out; `usize::MAX` if unknown. [`crate::IntermediateContext::map`]
    /// checks it before changing anything.
    fn available_pages(&self) -> usize;
}

impl<T: TableMemory + ?Sized> TableMemory for &mut T {
    fn read_u64(&self, phys: u64) -> Result<u64, MemoryError> {
        (**self).read_u64(phys)
    }
    fn write_u64(&mut self, phys: u64, value: u64) -> Result<(), MemoryError> {
        (**self).write_u64(phys, value)
    }
    fn read_u32(&self, phys: u64) -> Result<u32, MemoryError> {
        (**self).read_u32(phys)
    }
    fn write_u32(&mut self, phys: u64, value: u32) -> Result<(), MemoryError> {
        (**self).write_u32(phys, value)
    }
}

impl<T: PageAllocator + ?Sized> PageAllocator for &mut T {
    fn alloc_zeroed(&mut self) -> Result<u64, AllocError> {
        (**self).alloc_zeroed()
    }
    fn available_pages(&self) -> usize {
        (**self).available_pages()
    }
}

/// A [`VecAllocator`] region that cannot hold page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RegionError {
    /// The base is not 4 KiB aligned.
    #[error("table region base {base:#x} is not 4 KiB aligned")]
    Misaligned {
        /// The requested base.
        base: u64,
    },
    /// The region does not end at or below 4 GiB.
    #[error("table region {base:#x} + {pages} pages does not fit below 4 GiB")]
    AboveFourGib {
        /// The requested base.
        base: u64,
        /// The requested size in pages.
        pages: usize,
    },
    /// A region of zero pages.
    #[error("table region at {base:#x} has no pages")]
    Empty {
        /// The requested base.
        base: u64,
    },
}

/// A contiguous region of physical memory at `base`, backed by a `Vec`,
/// that hands out its pages in ascending order.
///
/// Build the intermediate context in it, then copy [`bytes`](Self::bytes) to
/// physical [`base`](Self::base) of the target (a boot image, a VM). Table
/// reads and writes are allowed only in pages already handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecAllocator {
    base: u64,
    mem: Vec<u8>,
    used_pages: usize,
}

impl VecAllocator {
    /// A region of `pages` pages at physical `base`.
    ///
    /// # Errors
    ///
    /// [`RegionError`] when `base` is not page aligned, `pages` is zero, or
    /// the region would end above 4 GiB.
    pub fn new(base: u64, pages: usize) -> Result<Self, RegionError> {
        if base % PAGE_SIZE != 0 {
            return Err(RegionError::Misaligned { base });
        }
        if pages == 0 {
            return Err(RegionError::Empty { base });
        }
        let end = u64::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .and_then(|size| base.checked_add(size));
        match end {
            Some(end) if end <= FOUR_GIB => {}
            _ => return Err(RegionError::AboveFourGib { base, pages }),
        }
        Ok(Self {
            base,
            mem: vec![0; pages * PAGE_SIZE as usize],
            used_pages: 0,
        })
    }

    /// Physical address of the first byte of the region.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The whole region, `capacity_pages() * 4096` bytes, to be placed at [`base`](Self::base).
    pub fn bytes(&self) -> &[u8] {
        &self.mem
    }

    /// The pages handed out so far (a prefix of [`bytes`](Self::bytes)).
    pub fn used_bytes(&self) -> &[u8] {
        self.mem.get(..self.used_len()).unwrap_or(&[])
    }

    /// Pages handed out so far.
    pub fn used_pages(&self) -> usize {
        self.used_pages
    }

    /// Pages in the region.
    pub fn capacity_pages(&self) -> usize {
        self.mem.len() / PAGE_SIZE as usize
    }

    /// Physical address one past the region.
    pub fn end(&self) -> u64 {
        self.base + self.mem.len() as u64
    }

    fn used_len(&self) -> usize {
        self.used_pages * PAGE_SIZE as usize
    }

    fn slot(&self, phys: u64, size: usize) -> Option<usize> {
        let off = usize::try_from(phys.checked_sub(self.base)?).ok()?;
        (off % size == 0 && off + size <= self.used_len()).then_some(off)
    }
}

impl TableMemory for VecAllocator {
    fn read_u64(&self, phys: u64) -> Result<u64, MemoryError> {
        self.slot(phys, 8)
            .and_then(|off| self.mem.get(off..off + 8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or(MemoryError { phys })
    }

    fn write_u64(&mut self, phys: u64, value: u64) -> Result<(), MemoryError> {
        let off = self.slot(phys, 8).ok_or(MemoryError { phys })?;
        self.mem
            .get_mut(off..off + 8)
            .ok_or(MemoryError { phys })?
            .copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    fn read_u32(&self, phys: u64) -> Result<u32, MemoryError> {
        self.slot(phys, 4)
            .and_then(|off| self.mem.get(off..off + 4))
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or(MemoryError { phys })
    }

    fn write_u32(&mut self, phys: u64, value: u32) -> Result<(), MemoryError> {
        let off = self.slot(phys, 4).ok_or(MemoryError { phys })?;
        self.mem
            .get_mut(off..off + 4)
            .ok_or(MemoryError { phys })?
            .copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

impl PageAllocator for VecAllocator {
    fn alloc_zeroed(&mut self) -> Result<u64, AllocError> {
        if self.used_pages == self.capacity_pages() {
            return Err(AllocError::OutOfPages {
                capacity: self.capacity_pages(),
            });
        }
        let phys = self.base + self.used_len() as u64;
        self.used_pages += 1;
        // Pages are never freed, so they are still zero; clear anyway in
        // case a caller wrote through `bytes` of a clone.
        let start = self.used_len() - PAGE_SIZE as usize;
        if let Some(page) = self.mem.get_mut(start..start + PAGE_SIZE as usize) {
            page.fill(0);
        }
        Ok(phys)
    }

    fn available_pages(&self) -> usize {
        self.capacity_pages() - self.used_pages
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn region_checks_name_the_value() {
        assert_eq!(
            VecAllocator::new(0x1234, 1),
            Err(RegionError::Misaligned { base: 0x1234 })
        );
        assert_eq!(
            VecAllocator::new(0xffff_f000, 2),
            Err(RegionError::AboveFourGib {
                base: 0xffff_f000,
                pages: 2
            })
        );
        assert_eq!(
            VecAllocator::new(0x1_0000_0000, 1),
            Err(RegionError::AboveFourGib {
                base: 0x1_0000_0000,
                pages: 1
            })
        );
        assert_eq!(
            VecAllocator::new(0x1000, 0),
            Err(RegionError::Empty { base: 0x1000 })
        );
        assert_eq!(
            RegionError::Misaligned { base: 0x1234 }.to_string(),
            "table region base 0x1234 is not 4 KiB aligned"
        );
        // The very last page below 4 GiB is fine.
        let a = VecAllocator::new(0xffff_f000, 1).unwrap();
        assert_eq!(a.end(), FOUR_GIB);
    }

    #[test]
    fn pages_in_order_then_exhaustion() {
        let mut a = VecAllocator::new(0x8000, 3).unwrap();
        assert_eq!(a.available_pages(), 3);
        assert_eq!(a.alloc_zeroed(), Ok(0x8000));
        assert_eq!(a.alloc_zeroed(), Ok(0x9000));
        assert_eq!(a.alloc_zeroed(), Ok(0xa000));
        assert_eq!(
            a.alloc_zeroed(),
            Err(AllocError::OutOfPages { capacity: 3 })
        );
        assert_eq!(a.available_pages(), 0);
        assert_eq!((a.used_pages(), a.capacity_pages()), (3, 3));
        assert_eq!(a.bytes().len(), 3 * 4096);
        assert_eq!(a.used_bytes().len(), 3 * 4096);
    }

    #[test]
    fn access_only_inside_allocated_pages_and_little_endian() {
        let mut a = VecAllocator::new(0x10_0000, 2).unwrap();
        assert_eq!(a.read_u64(0x10_0000), Err(MemoryError { phys: 0x10_0000 }));
        let p = a.alloc_zeroed().unwrap();
        a.write_u64(p + 8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(
            &a.bytes()[8..16],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(a.read_u32(p + 12), Ok(0x1122_3344));
        a.write_u32(p + 0xffc, 0xdead_beef).unwrap();
        assert_eq!(a.read_u64(p + 0xff8), Ok(0xdead_beef_0000_0000));
        for bad in [p - 8, p + 0x1000, p + 4, 0, u64::MAX - 7] {
            assert_eq!(a.read_u64(bad), Err(MemoryError { phys: bad }));
            assert_eq!(a.write_u64(bad, 1), Err(MemoryError { phys: bad }));
        }
        assert_eq!(a.read_u32(p + 2), Err(MemoryError { phys: p + 2 }));
        assert_eq!(a.used_bytes().len(), 4096);
    }

    /// The trait's default u32 accessors, over a memory that only has u64 ones.
    #[test]
    fn default_u32_accessors() {
        #[derive(Debug)]
        struct Words([u64; 4]);
        impl TableMemory for Words {
            fn read_u64(&self, phys: u64) -> Result<u64, MemoryError> {
                self.0
                    .get((phys / 8) as usize)
                    .copied()
                    .ok_or(MemoryError { phys })
            }
            fn write_u64(&mut self, phys: u64, value: u64) -> Result<(), MemoryError> {
                *self
                    .0
                    .get_mut((phys / 8) as usize)
                    .ok_or(MemoryError { phys })? = value;
                Ok(())
            }
        }
        let mut m = Words([0; 4]);
        m.write_u32(12, 0xaabb_ccdd).unwrap();
        m.write_u32(8, 0x1122_3344).unwrap();
        assert_eq!(m.0[1], 0xaabb_ccdd_1122_3344);
        assert_eq!(m.read_u32(12), Ok(0xaabb_ccdd));
        assert_eq!(m.read_u32(6), Err(MemoryError { phys: 6 }));
        assert_eq!(m.write_u32(40, 0), Err(MemoryError { phys: 40 }));
    }
}
