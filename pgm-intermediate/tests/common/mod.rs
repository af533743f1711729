//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::collections::HashMap;

use pgm_intermediate::{
    AllocError, Flavour, IntermediateContext, MapFlags, MemoryError, PageAllocator, TableMemory,
    VecAllocator, PAGE_SIZE,
};

/// A sparse allocator that hands out pages from `next` upwards in steps of
/// `step`, optionally failing after `fail_after` pages while still claiming
/// unlimited capacity.
#[derive(Debug, Clone)]
pub struct SparseAllocator {
    pub pages: HashMap<u64, Vec<u8>>,
    pub next: u64,
    pub step: u64,
    pub fail_after: Option<usize>,
}

impl SparseAllocator {
    pub fn new(first: u64, step: u64) -> Self {
        Self {
            pages: HashMap::new(),
            next: first,
            step,
            fail_after: None,
        }
    }

    fn locate(&self, phys: u64, size: u64) -> Result<(&Vec<u8>, usize), MemoryError> {
        let page = self
            .pages
            .get(&(phys & !(PAGE_SIZE - 1)))
            .ok_or(MemoryError { phys })?;
        if phys % size != 0 {
            return Err(MemoryError { phys });
        }
        Ok((page, (phys % PAGE_SIZE) as usize))
    }
}

impl TableMemory for SparseAllocator {
    fn read_u64(&self, phys: u64) -> Result<u64, MemoryError> {
        let (page, off) = self.locate(phys, 8)?;
        let bytes: [u8; 8] = page[off..off + 8]
            .try_into()
            .map_err(|_| MemoryError { phys })?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn write_u64(&mut self, phys: u64, value: u64) -> Result<(), MemoryError> {
        self.locate(phys, 8)?;
        let page = self
            .pages
            .get_mut(&(phys & !(PAGE_SIZE - 1)))
            .ok_or(MemoryError { phys })?;
        let off = (phys % PAGE_SIZE) as usize;
        page[off..off + 8].copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

impl PageAllocator for SparseAllocator {
    fn alloc_zeroed(&mut self) -> Result<u64, AllocError> {
        if self.fail_after == Some(self.pages.len()) {
            return Err(AllocError::OutOfPages {
                capacity: self.pages.len(),
            });
        }
        let phys = self.next;
        self.next += self.step;
        self.pages.insert(phys, vec![0; PAGE_SIZE as usize]);
        Ok(phys)
    }

    fn available_pages(&self) -> usize {
        usize::MAX
    }
}

pub const BASE: u64 = 0x10_0000;

/// A context over a `VecAllocator` of `pages` pages at 1 MiB.
pub fn ctx(pages: usize) -> IntermediateContext<VecAllocator> {
    IntermediateContext::new(VecAllocator::new(BASE, pages).unwrap()).unwrap()
}

/// Expand mappings into (virt page → (phys page, flags)).
pub fn pages_of(
    ctx: &IntermediateContext<impl PageAllocator>,
    flavour: Flavour,
) -> Vec<(u64, u64, MapFlags)> {
    let mut out = Vec::new();
    for m in ctx.mappings(flavour).unwrap() {
        for i in 0..m.len / PAGE_SIZE {
            out.push((m.virt + i * PAGE_SIZE, m.phys + i * PAGE_SIZE, m.flags));
        }
    }
    out
}

/// Assert that every page of the range translates to the right frame and flags.
pub fn assert_mapped(
    ctx: &IntermediateContext<impl PageAllocator>,
    flavour: Flavour,
    virt: u64,
    phys: u64,
    pages: u64,
    flags: MapFlags,
) {
    for i in 0..pages {
        for off in [0, 0x7f8, 0xfff] {
            let v = virt + i * PAGE_SIZE + off;
            let t = ctx
                .translate(flavour, v)
                .unwrap_or_else(|e| panic!("{flavour} {v:#x}: {e}"));
            assert_eq!(t.phys, phys + i * PAGE_SIZE + off, "{flavour} {v:#x}");
            let want = if flavour == Flavour::Legacy32 {
                flags - MapFlags::NO_EXECUTE
            } else {
                flags
            };
            assert_eq!(t.flags, want, "{flavour} {v:#x}");
        }
    }
}

/// A `VecAllocator` that counts table reads and fails every read past
/// `read_budget`, and reports at most `limit` free pages.
#[derive(Debug, Clone)]
pub struct Metered {
    pub inner: VecAllocator,
    pub reads: std::cell::Cell<u64>,
    pub read_budget: u64,
    pub limit: usize,
}

impl Metered {
    pub fn new(inner: VecAllocator, read_budget: u64, limit: usize) -> Self {
        Self {
            inner,
            reads: std::cell::Cell::new(0),
            read_budget,
            limit,
        }
    }

    fn count(&self, phys: u64) -> Result<(), MemoryError> {
        let n = self.reads.get() + 1;
        self.reads.set(n);
        if n > self.read_budget {
            return Err(MemoryError { phys });
        }
        Ok(())
    }
}

impl TableMemory for Metered {
    fn read_u64(&self, phys: u64) -> Result<u64, MemoryError> {
        self.count(phys)?;
        self.inner.read_u64(phys)
    }
    fn write_u64(&mut self, phys: u64, value: u64) -> Result<(), MemoryError> {
        self.inner.write_u64(phys, value)
    }
    fn read_u32(&self, phys: u64) -> Result<u32, MemoryError> {
        self.count(phys)?;
        self.inner.read_u32(phys)
    }
    fn write_u32(&mut self, phys: u64, value: u32) -> Result<(), MemoryError> {
        self.inner.write_u32(phys, value)
    }
}

impl PageAllocator for Metered {
    fn alloc_zeroed(&mut self) -> Result<u64, AllocError> {
        self.inner.alloc_zeroed()
    }
    fn available_pages(&self) -> usize {
        self.inner.available_pages().min(self.limit)
    }
}
