//! Typed access to a VCPU's `CPUMCPU` for the core's host width.
//!
//! The core holds one `CpumCpu*` per VCPU whose `host` context is
//! [`CpumCpu32`]'s on a 32-bit (legacy or PAE) host and [`CpumCpu64`]'s on
//! an AMD64 host ([`crate::VmmConfig::host_bits`]). [`crate::Vmm::cpumcpu`]
//! returns the right one as a [`VcpuCpum`]; [`crate::Vmm::with_cpumcpu_as`]
//! edits it as the variant named by its type parameter and refuses the other
//! with [`crate::VmmError::HostWidth`]; [`crate::Vmm::with_cpumcpu`] edits the
//! fields both widths share ([`CpumCpuShared`], `host` as opaque bytes).

use cpum::{CpumCpu32, CpumCpu64, CpumCpuShared, CpumCtx};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

mod sealed {
    pub trait Sealed {}
    impl Sealed for cpum::CpumCpu32 {}
    impl Sealed for cpum::CpumCpu64 {}
    impl Sealed for cpum::CpumCpuShared {}
}

/// A per-VCPU CPUM structure the core can hand out: [`CpumCpu32`],
/// [`CpumCpu64`] or the width-independent [`CpumCpuShared`].
pub trait CpumCpuVariant:
    sealed::Sealed + FromBytes + IntoBytes + KnownLayout + Immutable + Copy
{
    /// The host width this variant belongs to (32 or 64; 0 for
    /// [`CpumCpuShared`], which fits either).
    const HOST_BITS: u32;
}

impl CpumCpuVariant for CpumCpu32 {
    const HOST_BITS: u32 = CpumCpu32::HOST_BITS;
}
impl CpumCpuVariant for CpumCpu64 {
    const HOST_BITS: u32 = CpumCpu64::HOST_BITS;
}
impl CpumCpuVariant for CpumCpuShared {
    const HOST_BITS: u32 = 0;
}

/// A VCPU's `CPUMCPU` as the variant of the core's host width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCpum {
    /// A 32-bit (legacy or PAE) host's.
    Host32(CpumCpu32),
    /// An AMD64 host's.
    Host64(CpumCpu64),
}

impl VcpuCpum {
    /// The host width (32 or 64).
    pub const fn host_bits(&self) -> u32 {
        match self {
            Self::Host32(_) => 32,
            Self::Host64(_) => 64,
        }
    }

    /// The 32-bit host's structure, if this is one.
    pub const fn as32(&self) -> Option<&CpumCpu32> {
        match self {
            Self::Host32(c) => Some(c),
            Self::Host64(_) => None,
        }
    }

    /// The AMD64 host's structure, if this is one.
    pub const fn as64(&self) -> Option<&CpumCpu64> {
        match self {
            Self::Host64(c) => Some(c),
            Self::Host32(_) => None,
        }
    }

    /// The guest context (the same place in both variants).
    pub const fn guest(&self) -> &CpumCtx {
        match self {
            Self::Host32(c) => &c.guest,
            Self::Host64(c) => &c.guest,
        }
    }

    /// The hypervisor context (the same place in both variants).
    pub const fn hyper(&self) -> &CpumCtx {
        match self {
            Self::Host32(c) => &c.hyper,
            Self::Host64(c) => &c.hyper,
        }
    }

    /// `u32RetCode`.
    pub const fn ret_code(&self) -> u32 {
        match self {
            Self::Host32(c) => c.ret_code,
            Self::Host64(c) => c.ret_code,
        }
    }

    /// The fields both widths share, `host` as bytes.
    pub fn shared(&self) -> CpumCpuShared {
        let bytes = match self {
            Self::Host32(c) => c.as_bytes(),
            Self::Host64(c) => c.as_bytes(),
        };
        CpumCpuShared::read_from_bytes(bytes).unwrap_or_default()
    }
}
