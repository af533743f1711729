//! A QEMU TCG plugin that measures what a world switch costs: for each
//! direction (ToGC, ToHC) of each round trip it counts the executed
//! instructions and, class by class, the expensive ones — CR0/CR3/CR4
//! writes, RDMSR/WRMSR, LGDT/LIDT/LTR/LLDT, far jumps and returns, IRET,
//! segment loads, FXSAVE/FXRSTOR, debug-register writes — and the reads and
//! writes of the local APIC's MMIO page (uncached accesses).
//!
//! The library is built twice: as the `cdylib` QEMU loads
//! (`qemu-system-x86_64 … -plugin libcostmodel_plugin.so,sw=LO-HI,far=LO-HI,out=FILE`,
//! plugin API version 4, QEMU 9.2 to 10.0) and as an `rlib` whose
//! classifier, phase machine and report reader are ordinary Rust:
//!
//! ```
//! use costmodel_plugin::class::{classify, Class};
//! use costmodel_plugin::report::Report;
//!
//! assert_eq!(classify(&[0x0f, 0x22, 0xd8], None), Some(Class::Cr3Write)); // mov cr3, eax
//! let r = Report::parse("costmodel/1 trips=0\n")?;
//! assert!(r.trips.is_empty());
//! # Ok::<(), costmodel_plugin::report::ParseError>(())
//! ```
//!
//! How the trips are cut is in [`machine`]; the report format in [`report`].

pub mod args;
pub mod class;
mod ffi;
pub mod machine;
pub mod report;

pub use ffi::{qemu_plugin_install, qemu_plugin_version, API_VERSION};
