//! The kernel's data area: slots, tables and strings at fixed physical
//! addresses, handed out while the code is generated.

use std::collections::HashMap;

/// A growing byte area starting at a fixed physical (= identity-virtual) base.
///
/// Addresses handed out never move: the area only grows at its end, so code
/// generated early can use addresses allocated early.
#[derive(Debug)]
pub struct DataArena {
    base: u32,
    bytes: Vec<u8>,
    strings: HashMap<String, u32>,
}

impl DataArena {
    /// An empty area at `base`.
    pub fn new(base: u32) -> Self {
        Self {
            base,
            bytes: Vec::new(),
            strings: HashMap::new(),
        }
    }

    /// First address of the area.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// One past the last allocated byte.
    pub fn end(&self) -> u32 {
        self.base
            .saturating_add(u32::try_from(self.bytes.len()).unwrap_or(u32::MAX))
    }

    /// Appends `data` at the next multiple of `align` (a power of two; 0 and 1
    /// mean unaligned) and returns its address.
    pub fn bytes(&mut self, data: &[u8], align: u32) -> u32 {
        let align = align.max(1);
        let end = self.end();
        let addr = end.div_ceil(align).saturating_mul(align);
        self.bytes
            .resize(self.bytes.len() + (addr - end) as usize, 0);
        self.bytes.extend_from_slice(data);
        addr
    }

    /// Reserves `len` zero bytes aligned to `align`.
    pub fn zeroed(&mut self, len: usize, align: u32) -> u32 {
        self.bytes(&vec![0; len], align)
    }

    /// A 4-byte aligned dword holding `init`.
    pub fn dword(&mut self, init: u32) -> u32 {
        self.bytes(&init.to_le_bytes(), 4)
    }

    /// A NUL-terminated copy of `s` (interned: the same text gets one address).
    pub fn string(&mut self, s: &str) -> u32 {
        if let Some(&addr) = self.strings.get(s) {
            return addr;
        }
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        let addr = self.bytes(&data, 1);
        self.strings.insert(s.to_owned(), addr);
        addr
    }

    /// Overwrites bytes at `addr`; `false` if the range is not inside the area.
    pub fn write(&mut self, addr: u32, data: &[u8]) -> bool {
        let Some(off) = addr.checked_sub(self.base) else {
            return false;
        };
        let off = off as usize;
        match self.bytes.get_mut(off..off + data.len()) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// The bytes so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_stable() {
        let mut a = DataArena::new(0x1000);
        let s = a.string("hi");
        assert_eq!(s, 0x1000);
        let d = a.dword(7);
        assert_eq!(d, 0x1004);
        assert_eq!(a.string("hi"), s);
        let z = a.zeroed(3, 16);
        assert_eq!(z, 0x1010);
        assert!(a.write(d, &9u32.to_le_bytes()));
        assert!(!a.write(0x1012, &[0; 4]));
        assert_eq!(&a.as_slice()[4..8], &[9, 0, 0, 0]);
        assert_eq!(a.end(), 0x1013);
    }
}
