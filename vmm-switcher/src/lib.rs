//! World-switcher templates, fixup records, the relocator and disassembly.
//!
//! Templates are Rust code over iced-x86's code assembler (see [`builder`]);
//! each placeholder gets a VirtualBox-compatible [`fixup`] record at its exact
//! byte. A [`SwitcherDef`] (`VMMSWITCHERDEF`) carries the code, fixups, entry
//! points and regions; [`reloc::relocate`] patches a copy for a
//! [`reloc::RelocContext`]; [`disasm`] lists relocated code per region.
//!
//! # Example
//!
//! ```
//! use vmm_switcher::templates::{legacy_amd64, TemplateOptions, VmLayout};
//! use vmm_switcher::SwitcherKind;
//!
//! let vm = VmLayout { size: 0x4000, cpum: 0x100, cpum_size: 0x2000, stat_to_gc: 0x40, stat_to_hc: 0x68 };
//! let def = legacy_amd64::build(legacy_amd64::HostPaging::Legacy32, &TemplateOptions::default(), &vm)?;
//! assert_eq!(def.kind, SwitcherKind::Legacy32ToAmd64);
//! // cbIDCode1 spans the identity exit code only (VirtualBox overstated it).
//! let r = def.vbox_regions();
//! assert_eq!(r.id1.end, r.hc1.start);
//! # Ok::<(), vmm_switcher::builder::BuildError>(())
//! ```

//!
//! Without the default `std` feature the crate is `no_std` + `alloc` and
//! keeps what a kernel-side embedder needs to relocate again when the
//! hypervisor area moves: [`fixup`] (encoder and decoder), [`reloc`],
//! [`def`], [`addr`] and [`entry`]. The templates, their [`builder`] and
//! [`disasm`] need iced-x86 and std.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod addr;
#[cfg(feature = "std")]
pub mod builder;
pub mod def;
#[cfg(feature = "std")]
pub mod disasm;
pub mod entry;
pub mod fixup;
pub mod reloc;
#[cfg(feature = "std")]
pub mod templates;

pub use addr::{CodeOffset, HcAddr, PhysAddr, RcAddr};
pub use def::{SideMode, SwitcherDef, SwitcherKind, View, VmmSwitcherDefC};
pub use entry::{Convention, EntryContract, EntryPoint};
pub use fixup::{FixupKind, FixupRecord};
pub use reloc::{relocate, RelocContext, RelocError, Relocated};
