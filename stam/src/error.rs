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
    /// A snapshot's JSON text is not JSON, or not an object with a
    /// `samples` array (serde's message, with line and column).
    #[error("snapshot JSON: {0}")]
    JsonDecode(String),
    /// A sample of a snapshot read back from JSON is unusable (see
    /// [`Snapshot::validate`](crate::Snapshot::validate)); the first bad
    /// sample is reported.
    #[error("snapshot sample {index} ({name:?}): {problem}")]
    InvalidSample {
        /// Its position in the `samples` array, from 0.
        index: usize,
        /// Its name (empty if the sample has no string `name`).
        name: String,
        /// What is wrong with it.
        problem: SampleProblem,
    },
}

/// What is wrong with one sample of a snapshot read back from JSON
/// ([`StamError::InvalidSample`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SampleProblem {
    /// The sample is not a well-formed JSON sample (missing field, unknown
    /// type or unit, number out of range…): serde's message.
    #[error("{0}")]
    Malformed(String),
    /// The name breaks a naming rule of [`validate_name`](crate::validate_name);
    /// the inner error says which.
    #[error("{0}")]
    Name(Box<StamError>),
    /// An earlier sample has the same name (a registry never holds two).
    #[error("the name is already used by sample {first}")]
    Duplicate {
        /// Index of the first sample with this name.
        first: usize,
    },
    /// The type has no value this crate can hold ([`StamType::Callback`]).
    #[error("type {} has no value", ty.name())]
    UnsupportedType {
        /// The type.
        ty: StamType,
    },
    /// The value is of another kind than the type holds (a `COUNTER` with a
    /// profile value, …).
    #[error("type {} holds a {expected} value, not a {found} value", ty.name())]
    WrongKind {
        /// The declared type.
        ty: StamType,
        /// The value kind the type holds (`counter`, `profile`, `ratio`,
        /// `unsigned`, `bool`).
        expected: &'static str,
        /// The value kind found.
        found: &'static str,
    },
    /// A scalar value does not fit the width of its type.
    #[error("value {value} does not fit type {} (at most {max})", ty.name())]
    OutOfRange {
        /// The declared type.
        ty: StamType,
        /// The value.
        value: u64,
        /// The largest value of the type.
        max: u64,
    },
    /// A profile without periods carries a longest or shortest period; an
    /// absent extreme is `null`.
    #[error("a profile without periods has {field} {value}; it must be null")]
    ExtremeWithoutPeriods {
        /// `ticks_max` or `ticks_min`.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A profile with periods lacks its longest or shortest period.
    #[error("a profile with {periods} periods has no {field}")]
    MissingExtreme {
        /// The number of periods.
        periods: u64,
        /// `ticks_max` or `ticks_min`.
        field: &'static str,
    },
    /// A profile's shortest period is longer than its longest.
    #[error("a profile's ticks_min {min} is above its ticks_max {max}")]
    MinAboveMax {
        /// `ticks_min`.
        min: u64,
        /// `ticks_max`.
        max: u64,
    },
}
