//! Memory handed to the registry for the duration of one call.

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::registry::RegionId;

/// Read-only memory for the registry's regions, supplied per call (dumps,
/// snapshots, reads).
///
/// The registry never keeps a reference to sample memory: it knows each
/// region only by id and length, and each call borrows the bytes from here.
/// The bytes may be any `&[u8]` — a `#[repr(C)]` structure seen through
/// zerocopy, a copy of a VM image, a window into a QEMU memory dump. They need
/// no particular alignment (samples are copied out), and they may be longer
/// than the region (only the region's length is used).
#[derive(Clone, Debug, Default)]
pub struct Backing<'a> {
    regions: Vec<Option<&'a [u8]>>,
}

impl<'a> Backing<'a> {
    /// A backing that supplies no region (enough for registry-owned samples).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Supplies `bytes` for `region`.
    #[must_use]
    pub fn with(mut self, region: RegionId, bytes: &'a [u8]) -> Self {
        self.set(region, bytes);
        self
    }

    /// Supplies the bytes of `value` for `region` (a `#[repr(C)]` structure
    /// whose fields hold samples).
    #[must_use]
    pub fn with_struct<T: IntoBytes + Immutable>(self, region: RegionId, value: &'a T) -> Self {
        self.with(region, value.as_bytes())
    }

    /// Supplies (or replaces) `bytes` for `region`.
    pub fn set(&mut self, region: RegionId, bytes: &'a [u8]) {
        let i = region.index();
        if self.regions.len() <= i {
            self.regions.resize(i + 1, None);
        }
        self.regions[i] = Some(bytes);
    }

    pub(crate) fn get(&self, region: RegionId) -> Option<&'a [u8]> {
        self.regions.get(region.index()).copied().flatten()
    }
}

/// Writable memory for the registry's regions, supplied per call (reset,
/// writes). See [`Backing`].
#[derive(Debug, Default)]
pub struct BackingMut<'a> {
    regions: Vec<Option<&'a mut [u8]>>,
}

impl<'a> BackingMut<'a> {
    /// A backing that supplies no region (enough for registry-owned samples).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Supplies `bytes` for `region`.
    #[must_use]
    pub fn with(mut self, region: RegionId, bytes: &'a mut [u8]) -> Self {
        self.set(region, bytes);
        self
    }

    /// Supplies the bytes of `value` for `region`.
    #[must_use]
    pub fn with_struct<T: IntoBytes + FromBytes>(self, region: RegionId, value: &'a mut T) -> Self {
        self.with(region, value.as_mut_bytes())
    }

    /// Supplies (or replaces) `bytes` for `region`.
    pub fn set(&mut self, region: RegionId, bytes: &'a mut [u8]) {
        let i = region.index();
        if self.regions.len() <= i {
            self.regions.resize_with(i + 1, || None);
        }
        self.regions[i] = Some(bytes);
    }

    /// A read-only view of the same memory, e.g. to dump right after a reset.
    #[must_use]
    pub fn as_backing(&self) -> Backing<'_> {
        Backing {
            regions: self.regions.iter().map(|r| r.as_deref()).collect(),
        }
    }

    pub(crate) fn get(&self, region: RegionId) -> Option<&[u8]> {
        self.regions.get(region.index()).and_then(|r| r.as_deref())
    }

    pub(crate) fn get_mut(&mut self, region: RegionId) -> Option<&mut [u8]> {
        self.regions
            .get_mut(region.index())
            .and_then(|r| r.as_deref_mut())
    }
}
