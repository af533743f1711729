//! The crate's error type.

use crate::registry::{RegionId, SampleId};
use crate::types::StamType;
use crate::MAX_NAME_LEN;

/// Everything that can go wrong. Bad input is always one of these, never a
/// panic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StamError {
    /// The name is empty or does not start with `/`.
    #[error("sample name {name:?} does not start with '/'")]
    NoLeadingSlash {
        /// The offending name.
        name: String,
    },
    /// The name contains `//`.
    #[error("sample name {name:?} has an empty path component")]
    EmptyComponent {
        /// The offending name.
        name: String,
    },
    /// The name ends with `/` (this includes the bare root `/`).
    #[error("sample name {name:?} ends with '/'")]
    TrailingSlash {
        /// The offending name.
        name: String,
    },
    /// The name contains a backslash.
    #[error("sample name {name:?} contains a backslash")]
    Backslash {
        /// The offending name.
        name: String,
    },
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("sample name {name:?} is {len} bytes long, more than the {MAX_NAME_LEN} allowed")]
    NameTooLong {
        /// The offending name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A sample with this name is already registered.
    #[error("a sample named {name:?} is already registered")]
    Duplicate {
        /// The offending name.
        name: String,
    },
    /// The type cannot be registered by this crate ([`StamType::Callback`]).
    #[error("sample {name:?}: type {ty:?} cannot be registered")]
    UnsupportedType {
        /// The sample's name.
        name: String,
        /// The rejected type.
        ty: StamType,
    },
    /// The region was not created by this registry.
    #[error("sample {name:?}: region {region} does not exist in this registry")]
    UnknownRegion {
        /// The sample's name.
        name: String,
        /// The unknown region.
        region: RegionId,
    },
    /// The sample does not fit in its region.
    #[error(
        "sample {name:?}: {size} bytes at offset {offset} do not fit in region {region} of {region_len} bytes"
    )]
    OutOfBounds {
        /// The sample's name.
        name: String,
        /// The region it was placed in.
        region: RegionId,
        /// Requested offset.
        offset: usize,
        /// Size of the sample type.
        size: usize,
        /// Declared length of the region.
        region_len: usize,
    },
    /// The offset is not a multiple of the sample type's natural alignment.
    #[error("sample {name:?}: offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        /// The sample's name.
        name: String,
        /// Requested offset.
        offset: usize,
        /// Required alignment.
        align: usize,
    },
    /// The Rust type used to access a sample does not fit its registered type.
    #[error("sample {name:?} has type {ty:?} and cannot be accessed as {requested}")]
    TypeMismatch {
        /// The sample's name.
        name: String,
        /// Its registered type.
        ty: StamType,
        /// The Rust type asked for.
        requested: &'static str,
    },
    /// The sample lives in a region, not in registry-owned memory.
    #[error("sample {name:?} does not live in registry-owned memory")]
    NotOwned {
        /// The sample's name.
        name: String,
    },
    /// No sample has this id (never registered, or deregistered).
    #[error("no sample with id {id}")]
    UnknownSample {
        /// The id asked for.
        id: SampleId,
    },
    /// A selected sample lives in a region the call's backing does not supply.
    #[error("no memory was supplied for region {region} ({region_name:?})")]
    RegionNotSupplied {
        /// The missing region.
        region: RegionId,
        /// Its name.
        region_name: String,
    },
    /// The memory supplied for a region is shorter than the region.
    #[error("memory supplied for region {region} ({region_name:?}) is {got} bytes; the region is {need}")]
    RegionTooSmall {
        /// The region.
        region: RegionId,
        /// Its name.
        region_name: String,
        /// The region's declared length.
        need: usize,
        /// Length of the supplied memory.
        got: usize,
    },
    /// Encoding a snapshot as JSON failed (not expected for this plain
    /// data; reported rather than hidden).
    #[error("JSON encoding failed: {0}")]
    Json(String),
}
