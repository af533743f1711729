//! The intermediate paging context a world switcher passes through.
//!
//! Paging mode cannot change in place, so a switcher going from a host in
//! one paging mode to a hypervisor context in another runs for a few
//! instructions on *intermediate* page tables that map, in every mode at
//! once:
//!
//! 1. the switcher code at its host ring-0 (HC) address,
//! 2. the same code at its physical address (identity, used while paging is off), and
//! 3. the hypervisor area at its hypervisor-context (RC) addresses.
//!
//! [`IntermediateContext`] builds those tables in three flavours side by side:
//!
//! | [`Flavour`] | root | SDM Vol. 3A | CR3 |
//! |---|---|---|---|
//! | [`Legacy32`](Flavour::Legacy32) | page directory, 1024 × 32-bit | §4.3 "32-Bit Paging" | [`cr3_32`](IntermediateContext::cr3_32) |
//! | [`Pae`](Flavour::Pae) | PDPT (4 entries) + 4 page directories | §4.4 "PAE Paging" | [`cr3_pae`](IntermediateContext::cr3_pae) |
//! | [`Long`](Flavour::Long) | PML4 | §4.5 "4-Level Paging" | [`cr3_amd64`](IntermediateContext::cr3_amd64) |
//! | [`La57`](Flavour::La57) | PML5, whose entries point to PML4s | §4.5 "5-Level Paging" (CR4.LA57) | [`cr3_la57`](IntermediateContext::cr3_la57) |
//!
//! The 5-level tables exist only in a context made with
//! [`IntermediateContext::with_la57`], for hosts running with CR4.LA57:
//! their HC addresses are canonical in 57 bits (`0xff00_0000_c040_0000`
//! lies in PML5 entry 256), and a switcher that loads an intermediate CR3
//! while still in long mode cannot change LA57 there.
//!
//! Every table page lives below 4 GiB, because the CR3 values are loaded from
//! 32-bit code. Tables come from a [`PageAllocator`]; [`VecAllocator`] is a
//! contiguous region at a chosen physical base whose bytes are copied into a
//! boot image. [`IntermediateContext::map`] maps 4 KiB pages, checks the whole
//! request (range limits, conflicts, page budget) before it writes anything,
//! and is idempotent. [`IntermediateContext::translate`] is a software page
//! walker that reads the tables as the CPU would, so tests prove every mapping
//! in every flavour; [`walk`] does the same for any [`TableMemory`] and root.
//!
//! This models VirtualBox's `PGMR3MapIntermediate` and the "Intermediate
//! Context" members of `PGM` (`pInterPD`, `pInterPaePDPT`, `pInterPaePML4`,
//! `PGMGetInter*CR3`), without two of its defects: a range that straddles a
//! 4 MiB / 2 MiB boundary gets a page table of its own per directory entry
//! (no aliasing through a shared default table), and the conflict check
//! accepts any table the context itself created. Unlike VirtualBox, the
//! long-mode tables do not repeat the low 4 GiB across the 64-bit space:
//! each flavour maps exactly the addresses it is given.
//!
//! # Example
//!
//! ```
//! use pgm_intermediate::{Flavour, Flavours, IntermediateContext, MapFlags, VecAllocator};
//!
//! // 32 table pages at physical 1 MiB.
//! let tables = VecAllocator::new(0x10_0000, 32)?;
//! let mut ctx = IntermediateContext::new(tables)?;
//!
//! let code_phys = 0x40_0000; // the switcher code, 3 pages
//! let rc = 0xa000_0000; // hypervisor-context address of the same code
//! let w = MapFlags::WRITABLE;
//! ctx.map(code_phys, code_phys, 0x3000, w, Flavours::all())?; // identity
//! ctx.map(rc, code_phys, 0x3000, w, Flavours::all())?; // RC
//! // The host address: 32-bit host view for the 32-bit/PAE flavours, a
//! // 64-bit kernel address for long mode.
//! ctx.map(0xc123_4000, code_phys, 0x3000, w, Flavours::LEGACY32 | Flavours::PAE)?;
//! ctx.map(0xffff_8000_0123_4000, code_phys, 0x3000, w, Flavours::LONG)?;
//!
//! for flavour in Flavour::ALL {
//!     let t = ctx.translate(flavour, rc + 0x1234)?;
//!     assert_eq!(t.phys, code_phys + 0x1234);
//!     assert!(t.writable);
//! }
//! let t = ctx.translate(Flavour::Long, 0xffff_8000_0123_5008)?;
//! assert_eq!(t.phys, code_phys + 0x1008);
//! assert!(ctx.translate(Flavour::Pae, rc + 0x3000).is_err()); // nothing past the range
//!
//! // Remapping the same page to a different frame is refused, naming both.
//! let err = ctx.map(rc, 0x80_0000, 0x1000, w, Flavours::PAE).unwrap_err();
//! assert!(err.to_string().contains("0x400000"));
//!
//! // CR3 values for the switcher, and the bytes to place at the region's base.
//! assert!(ctx.cr3_32() >= 0x10_0000 && ctx.cr3_amd64() < 0x12_0000);
//! let (base, image) = (ctx.allocator().base(), ctx.allocator().bytes());
//! assert_eq!((base, image.len()), (0x10_0000, 32 * 4096));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![no_std]

extern crate alloc as heap;
#[cfg(test)]
extern crate std;

mod alloc;
mod context;
mod walk;

pub use alloc::{AllocError, MemoryError, PageAllocator, RegionError, TableMemory, VecAllocator};
pub use context::{IntermediateContext, MapError, NewError, RangeError, UnmapError};
pub use walk::{walk, Mapping, Translation, WalkError, WalkPath, WalkStep};

use bitflags::bitflags;
use core::fmt;

/// Size of a page and of every table.
pub const PAGE_SIZE: u64 = 0x1000;
/// First address that 32-bit code cannot put into CR3 or a 32-bit entry.
pub const FOUR_GIB: u64 = 1 << 32;
/// One past the largest physical address a PAE or 4-level entry can hold (2^52).
pub const MAX_PHYS: u64 = 1 << 52;

bitflags! {
    /// Leaf (page) attributes for [`IntermediateContext::map`]. The values are
    /// the PTE bit positions shared by all three flavours (SDM Vol. 3A
    /// Tables 4-6, 4-11 and 4-19). Present, accessed and dirty are always
    /// set; PAT is never.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct MapFlags: u64 {
        /// R/W (bit 1): writes allowed.
        const WRITABLE = 1 << 1;
        /// U/S (bit 2): user-mode accesses allowed. The directory entries
        /// above such a page get U/S too.
        const USER = 1 << 2;
        /// PWT (bit 3): write-through.
        const WRITE_THROUGH = 1 << 3;
        /// PCD (bit 4): cache disabled.
        const CACHE_DISABLE = 1 << 4;
        /// G (bit 8): global, kept across CR3 loads when CR4.PGE = 1.
        const GLOBAL = 1 << 8;
        /// XD (bit 63): instruction fetches not allowed. PAE and long mode
        /// only (the CPU needs EFER.NXE = 1, or the bit is reserved); it is
        /// dropped for [`Flavour::Legacy32`], whose entries have no such bit.
        const NO_EXECUTE = 1 << 63;
    }
}

bitflags! {
    /// The bits of a raw paging-structure entry, for reading entries found
    /// by the walker ([`WalkStep::flags`]). Unknown bits are kept
    /// (`from_bits_retain`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct EntryFlags: u64 {
        /// P (bit 0).
        const PRESENT = 1 << 0;
        /// R/W (bit 1).
        const WRITABLE = 1 << 1;
        /// U/S (bit 2).
        const USER = 1 << 2;
        /// PWT (bit 3).
        const WRITE_THROUGH = 1 << 3;
        /// PCD (bit 4).
        const CACHE_DISABLE = 1 << 4;
        /// A (bit 5).
        const ACCESSED = 1 << 5;
        /// D (bit 6), leaves only.
        const DIRTY = 1 << 6;
        /// PS (bit 7) in a directory entry: this entry maps a large page.
        /// In a 4 KiB PTE the same bit is PAT, not PS.
        const LARGE = 1 << 7;
        /// G (bit 8), leaves only.
        const GLOBAL = 1 << 8;
        /// XD (bit 63), PAE and 4-level entries only.
        const NO_EXECUTE = 1 << 63;
    }
}

/// One of the three paging modes the intermediate context serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flavour {
    /// 32-bit paging (CR4.PAE = 0): PD → PT, 32-bit entries (SDM §4.3).
    Legacy32,
    /// PAE paging: PDPT → PD → PT, 64-bit entries, 32-bit linear addresses (SDM §4.4).
    Pae,
    /// 4-level paging (long mode): PML4 → PDPT → PD → PT, 48-bit canonical
    /// linear addresses (SDM §4.5).
    Long,
    /// 5-level paging (long mode with CR4.LA57): PML5 → PML4 → PDPT → PD →
    /// PT, 57-bit canonical linear addresses (SDM §4.5). Built only by a
    /// context from [`IntermediateContext::with_la57`].
    La57,
}

impl Flavour {
    /// The three every context builds, in the order `Legacy32`, `Pae`, `Long`.
    pub const ALL: [Flavour; 3] = [Flavour::Legacy32, Flavour::Pae, Flavour::Long];
    /// The three of [`Flavour::ALL`], then [`Flavour::La57`].
    pub const ALL_WITH_LA57: [Flavour; 4] = [
        Flavour::Legacy32,
        Flavour::Pae,
        Flavour::Long,
        Flavour::La57,
    ];

    /// This flavour's bit in [`Flavours`].
    pub const fn flag(self) -> Flavours {
        match self {
            Flavour::Legacy32 => Flavours::LEGACY32,
            Flavour::Pae => Flavours::PAE,
            Flavour::Long => Flavours::LONG,
            Flavour::La57 => Flavours::LA57,
        }
    }

    /// Whether `virt` is a linear address of this mode: below 4 GiB for
    /// 32-bit and PAE paging, canonical (bits 63:47 all equal) for long
    /// mode, 57-bit canonical (bits 63:56 all equal) for 5-level paging.
    pub const fn is_valid_virt(self, virt: u64) -> bool {
        match self {
            Flavour::Legacy32 | Flavour::Pae => virt < FOUR_GIB,
            Flavour::Long => is_canonical(virt),
            Flavour::La57 => is_canonical57(virt),
        }
    }

    /// One past the largest physical address a leaf entry can hold: 4 GiB
    /// for 32-bit PTEs, 2^52 otherwise.
    pub const fn phys_limit(self) -> u64 {
        match self {
            Flavour::Legacy32 => FOUR_GIB,
            Flavour::Pae | Flavour::Long | Flavour::La57 => MAX_PHYS,
        }
    }

    /// Size of one table entry in bytes.
    pub const fn entry_size(self) -> u64 {
        match self {
            Flavour::Legacy32 => 4,
            Flavour::Pae | Flavour::Long | Flavour::La57 => 8,
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavour::Legacy32 => "32-bit",
            Flavour::Pae => "PAE",
            Flavour::Long => "4-level",
            Flavour::La57 => "5-level",
        })
    }
}

bitflags! {
    /// A set of [`Flavour`]s to map into. The default is all of them: every
    /// flavour the context builds (the 5-level one only in a context from
    /// [`IntermediateContext::with_la57`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Flavours: u8 {
        /// 32-bit paging.
        const LEGACY32 = 1;
        /// PAE paging.
        const PAE = 2;
        /// 4-level paging.
        const LONG = 4;
        /// 5-level paging.
        const LA57 = 8;
    }
}

impl Default for Flavours {
    fn default() -> Self {
        Flavours::all()
    }
}

impl Flavours {
    /// The flavours in this set, in [`Flavour::ALL_WITH_LA57`] order.
    pub fn flavours(self) -> impl Iterator<Item = Flavour> {
        Flavour::ALL_WITH_LA57
            .into_iter()
            .filter(move |f| self.contains(f.flag()))
    }
}

/// A level of the paging hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// Page-map level 5 (5-level paging only).
    Pml5,
    /// Page-map level 4 (long mode only).
    Pml4,
    /// Page-directory-pointer table (PAE: the 4-entry root; long mode: level 3).
    Pdpt,
    /// Page directory.
    Pd,
    /// Page table.
    Pt,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pml5 => "PML5",
            Level::Pml4 => "PML4",
            Level::Pdpt => "PDPT",
            Level::Pd => "PD",
            Level::Pt => "PT",
        })
    }
}

/// Size of the page a translation ends in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB, from a PTE.
    Size4K,
    /// 2 MiB, from a PAE or 4-level PDE with PS = 1.
    Size2M,
    /// 4 MiB, from a 32-bit PDE with PS = 1 (CR4.PSE = 1).
    Size4M,
    /// 1 GiB, from a 4-level PDPTE with PS = 1.
    Size1G,
}

impl PageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size4M => 1 << 22,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// Whether `virt` is a canonical 48-bit linear address.
pub const fn is_canonical(virt: u64) -> bool {
    let top = virt >> 47;
    top == 0 || top == 0x1_ffff
}

/// Whether `virt` is a canonical 57-bit linear address (5-level paging:
/// bits 63:56 all equal bit 56).
pub const fn is_canonical57(virt: u64) -> bool {
    let top = virt >> 56;
    top == 0 || top == 0xff
}

const _: () = {
    assert!(MapFlags::all().bits() == 0x8000_0000_0000_011e);
    assert!(MapFlags::WRITABLE.bits() == EntryFlags::WRITABLE.bits());
    assert!(MapFlags::USER.bits() == EntryFlags::USER.bits());
    assert!(MapFlags::WRITE_THROUGH.bits() == EntryFlags::WRITE_THROUGH.bits());
    assert!(MapFlags::CACHE_DISABLE.bits() == EntryFlags::CACHE_DISABLE.bits());
    assert!(MapFlags::GLOBAL.bits() == EntryFlags::GLOBAL.bits());
    assert!(MapFlags::NO_EXECUTE.bits() == EntryFlags::NO_EXECUTE.bits());
    assert!(PageSize::Size4K.bytes() == PAGE_SIZE);
    assert!(is_canonical(0x0000_7fff_ffff_f000) && is_canonical(0xffff_8000_0000_0000));
    assert!(!is_canonical(0x0000_8000_0000_0000) && !is_canonical(0xfff7_ffff_ffff_f000));
    assert!(is_canonical57(0xff00_0000_c040_0000) && !is_canonical(0xff00_0000_c040_0000));
    assert!(is_canonical57(0x00ff_ffff_ffff_f000) && !is_canonical57(0x0100_0000_0000_0000));
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    #[test]
    fn flavour_limits() {
        assert!(Flavour::Legacy32.is_valid_virt(0xffff_ffff));
        assert!(!Flavour::Pae.is_valid_virt(FOUR_GIB));
        assert!(Flavour::Long.is_valid_virt(u64::MAX));
        assert!(!Flavour::Long.is_valid_virt(1 << 47));
        assert_eq!(Flavour::Legacy32.phys_limit(), FOUR_GIB);
        assert_eq!(Flavour::Long.phys_limit(), 1 << 52);
        assert_eq!(Flavours::default(), Flavours::all());
        let v: Vec<_> = (Flavours::LONG | Flavours::LEGACY32).flavours().collect();
        assert_eq!(v, [Flavour::Legacy32, Flavour::Long]);
        assert_eq!(Flavour::Pae.to_string(), "PAE");
        assert_eq!(Level::Pml4.to_string(), "PML4");
    }
}
