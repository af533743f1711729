//! A `#![no_std]` crate over the parts of the workspace a kernel-side
//! embedder uses without std: [`cpum`] and [`apic`] layouts, the
//! [`pgm_intermediate`] tables, the STAM sample layouts and their hot-path
//! updates, and the fixup decoder and relocator of [`vmm_switcher`] (its
//! templates and disassembly stay behind its default `std` feature).
//!
//! With the `probe` feature the crate defines a `#[panic_handler]`, which
//! std defines too: building `-p nostd-probe --features probe` on its own
//! fails if any dependency links std (tests/no_std.rs does exactly that).
#![no_std]

extern crate alloc;

use alloc::vec::Vec;

use pgm_intermediate::{Flavour, Flavours, IntermediateContext, MapFlags, VecAllocator};
use stam::StamProfileAdv;
use vmm_switcher::fixup::{decode, encode, FixupRecord};
/// The relocator, built without std.
pub use vmm_switcher::{relocate, RelocContext, Relocated, SwitcherDef};

/// Builds tables mapping `virt` to `phys` and returns the physical address
/// the PAE walk finds for `virt`, or `None` on any error.
pub fn map_and_walk(virt: u64, phys: u64) -> Option<u64> {
    let alloc = VecAllocator::new(0x10_0000, 16).ok()?;
    let mut ctx = IntermediateContext::new(alloc).ok()?;
    ctx.map(virt, phys, 0x1000, MapFlags::WRITABLE, Flavours::all())
        .ok()?;
    ctx.translate(Flavour::Pae, virt).ok().map(|t| t.phys)
}

/// Round-trips `records` through the fixup stream encoder and decoder.
pub fn fixups_round_trip(records: &[FixupRecord], code_len: usize) -> Option<Vec<FixupRecord>> {
    let stream = encode(records).ok()?;
    decode(&stream, code_len).ok()
}

/// One period of an advanced STAM profile, as the switchers record it.
pub fn profile_period(start: u64, stop: u64) -> StamProfileAdv {
    let mut p = StamProfileAdv::new();
    p.start(start);
    p.stop(stop);
    p
}

/// The size of a VCPU's CPUM data and the x2APIC MSR of an xAPIC register
/// offset, from the layout crates.
pub fn layouts(xapic_offset: u32) -> (usize, u32) {
    (cpum::CPUMCPU_SIZE, apic::x2apic_msr(xapic_offset))
}

/// What std would otherwise provide.
#[cfg(feature = "probe")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
