//! The far side: the code a switcher runs on the other side of the switch,
//! standing in for the embedding hypervisor's code there. It checks from the
//! inside what the switcher must have set up, records what it saw in a
//! mailbox the host reads back, and returns a per-trip status.
//!
//! One file per context it serves:
//!
//! - [`intermediate_amd64`]: the 64-bit helper the 32-bit/PAE host → AMD64
//!   switchers (`32-to-amd64`, `pae-to-amd64`) call at `Hyper.rip` in the
//!   intermediate context (long mode on the intermediate page tables);
//! - [`hyper_legacy`]: the RC code of the 32-bit/PAE hypervisor context
//!   (`32-to-32`, `32-to-pae`, `pae-to-32`, `pae-to-pae`, `amd64-to-32`,
//!   `amd64-to-pae`), entered by the switcher's `iret` under `Hyper.cr3`;
//! - [`hyper_amd64`]: the 64-bit RC code of the AMD64 → AMD64 switcher's
//!   hypervisor context, also under `Hyper.cr3`;
//! - [`hyper`]: what the two hypervisor contexts share — the mailbox, the
//!   expectation and failure bits, the per-trip checks and the lazy-FPU
//!   `#NM` handler (emitted at either width), the final assembly;
//! - `common` (crate-private): the emission all of them share (NMI-masking
//!   check, failure accounting, exception reporter).

mod common;
pub mod hyper;
pub mod hyper_amd64;
pub mod hyper_legacy;
pub mod intermediate_amd64;

use iced_x86::IcedError;
use thiserror::Error;

/// log2 of [`MAILBOX_STRIDE`].
pub const MAILBOX_STRIDE_SHIFT: u32 = 8;

/// Distance between two VCPUs' mailboxes when each VCPU has its own (runs
/// on several host CPUs): VCPU `i`'s mailbox is `i * MAILBOX_STRIDE` bytes
/// after VCPU 0's.
pub const MAILBOX_STRIDE: u32 = 1 << MAILBOX_STRIDE_SHIFT;

const _: () = assert!(size_of::<hyper::RcMailbox>() <= MAILBOX_STRIDE as usize);
const _: () = assert!(size_of::<intermediate_amd64::Mailbox>() <= MAILBOX_STRIDE as usize);

/// Building far-side code failed.
#[derive(Debug, Error)]
pub enum FarError {
    /// iced rejected an instruction (a bug in this module).
    #[error("iced-x86: {0}")]
    Iced(#[from] IcedError),
    /// The helper area is too small for code, IDT and mailbox.
    #[error("far helper needs {need:#x} bytes; the helper area has {have:#x}")]
    TooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}
