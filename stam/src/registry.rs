//! The sample registry: names, descriptors and where each sample lives.

use core::fmt;
use core::mem::size_of;
use core::ops::Range;
use std::collections::BTreeMap;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::backing::{Backing, BackingMut};
use crate::error::StamError;
use crate::name::{validate_name, NameKey};
use crate::pattern::{Kind, Pattern};
use crate::render::{self, Row};
use crate::sample::{StamCounter, StamProfile, StamProfileAdv, StamRatioU32};
use crate::snapshot::{SampleValue, Snapshot, Value};
use crate::types::{StamType, StamUnit, StamVisibility};

/// `offset..offset + len`, or `None` if that overflows.
fn byte_range(offset: usize, len: usize) -> Option<Range<usize>> {
    Some(offset..offset.checked_add(len)?)
}

/// Identifies a memory region declared with [`Registry::add_region`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(usize);

impl RegionId {
    pub(crate) const fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Identifies a registered sample. Ids are never reused, so a stale id after
/// deregistration gives [`StamError::UnknownSample`] rather than another
/// sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleId(usize);

impl fmt::Display for SampleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where a sample's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SampleLocation {
    /// At `offset` within a region whose memory the caller supplies per call
    /// (a [`Backing`] or [`BackingMut`]).
    Region {
        /// The region.
        region: RegionId,
        /// Byte offset of the sample within the region.
        offset: usize,
    },
    /// In storage the registry owns (see [`Registry::register_owned`]).
    Owned {
        /// Byte offset within that storage.
        offset: usize,
    },
}

/// What to register: name, type, unit, visibility and description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleDef<'a> {
    /// Full hierarchical name (see [`validate_name`]).
    pub name: &'a str,
    /// Sample type.
    pub ty: StamType,
    /// Unit.
    pub unit: StamUnit,
    /// Visibility (default [`StamVisibility::Always`]).
    pub visibility: StamVisibility,
    /// Optional description.
    pub description: Option<&'a str>,
}

impl<'a> SampleDef<'a> {
    /// A definition with [`StamVisibility::Always`] and no description.
    #[must_use]
    pub const fn new(name: &'a str, ty: StamType, unit: StamUnit) -> Self {
        Self {
            name,
            ty,
            unit,
            visibility: StamVisibility::Always,
            description: None,
        }
    }

    /// Sets the visibility.
    #[must_use]
    pub const fn visibility(mut self, visibility: StamVisibility) -> Self {
        self.visibility = visibility;
        self
    }

    /// Sets the description.
    #[must_use]
    pub const fn description(mut self, description: &'a str) -> Self {
        self.description = Some(description);
        self
    }
}

/// A registered sample's descriptor, borrowed from the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleInfo<'a> {
    /// Its id.
    pub id: SampleId,
    /// Full name.
    pub name: &'a str,
    /// Type.
    pub ty: StamType,
    /// Unit.
    pub unit: StamUnit,
    /// Visibility.
    pub visibility: StamVisibility,
    /// Description, if any.
    pub description: Option<&'a str>,
    /// Where its bytes are.
    pub location: SampleLocation,
}

mod sealed {
    pub trait Sealed {}
}

/// Rust types through which a sample's memory can be read or written: the
/// sample structures and the plain integers. Sealed.
pub trait SampleData:
    FromBytes + IntoBytes + KnownLayout + Immutable + Copy + sealed::Sealed
{
    /// The type's name, for [`StamError::TypeMismatch`].
    const NAME: &'static str;
    /// Whether a sample of type `ty` can be accessed as `Self`.
    fn accepts(ty: StamType) -> bool;
}

macro_rules! sample_data {
    ($t:ty, $name:literal, $($pat:pat_param)|+) => {
        impl sealed::Sealed for $t {}
        impl SampleData for $t {
            const NAME: &'static str = $name;
            fn accepts(ty: StamType) -> bool {
                matches!(ty, $($pat)|+)
            }
        }
    };
}

sample_data!(StamCounter, "StamCounter", StamType::Counter);
sample_data!(
    StamProfile,
    "StamProfile",
    StamType::Profile | StamType::ProfileAdv
);
sample_data!(StamProfileAdv, "StamProfileAdv", StamType::ProfileAdv);
sample_data!(
    StamRatioU32,
    "StamRatioU32",
    StamType::RatioU32 | StamType::RatioU32Reset
);
sample_data!(
    u8,
    "u8",
    StamType::U8
        | StamType::U8Reset
        | StamType::X8
        | StamType::X8Reset
        | StamType::Bool
        | StamType::BoolReset
);
sample_data!(
    u16,
    "u16",
    StamType::U16 | StamType::U16Reset | StamType::X16 | StamType::X16Reset
);
sample_data!(
    u32,
    "u32",
    StamType::U32 | StamType::U32Reset | StamType::X32 | StamType::X32Reset
);
sample_data!(
    u64,
    "u64",
    StamType::U64 | StamType::U64Reset | StamType::X64 | StamType::X64Reset
);

#[derive(Clone, Debug)]
struct Entry {
    name: Box<str>,
    ty: StamType,
    unit: StamUnit,
    visibility: StamVisibility,
    description: Option<Box<str>>,
    location: SampleLocation,
    size: usize,
}

#[derive(Clone, Debug)]
struct Region {
    name: Box<str>,
    len: usize,
}

/// The statistics registry.
///
/// Holds descriptors only. Samples live either in *regions* — memory the
/// registry does not own, known by id and length and lent to each call as a
/// [`Backing`] / [`BackingMut`] — or in storage the registry owns
/// ([`register_owned`](Self::register_owned)). No reference to sample memory
/// outlives a call, so memory that machine code or another process writes is
/// never aliased by a long-lived `&mut`.
///
/// Enumeration is always in name order, comparing component by component
/// ([`cmp_names`](crate::cmp_names)).
#[derive(Clone, Debug, Default)]
pub struct Registry {
    entries: Vec<Option<Entry>>,
    by_name: BTreeMap<NameKey, usize>,
    regions: Vec<Region>,
    /// Registry-owned sample storage; `u64` elements keep every slot 8-byte
    /// aligned.
    owned: Vec<u64>,
}

impl Registry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a region of `len` bytes whose memory callers supply per call.
    /// `name` is only used in messages.
    pub fn add_region(&mut self, name: &str, len: usize) -> RegionId {
        self.regions.push(Region {
            name: name.into(),
            len,
        });
        RegionId(self.regions.len() - 1)
    }

    /// Declares a region the size of `T`, for samples at
    /// [`offset_of!`](core::mem::offset_of) positions inside a `#[repr(C)]`
    /// structure.
    pub fn add_region_for<T>(&mut self, name: &str) -> RegionId {
        self.add_region(name, size_of::<T>())
    }

    /// The declared length of `region`.
    #[must_use]
    pub fn region_len(&self, region: RegionId) -> Option<usize> {
        self.regions.get(region.0).map(|r| r.len)
    }

    /// The name `region` was declared with.
    #[must_use]
    pub fn region_name(&self, region: RegionId) -> Option<&str> {
        self.regions.get(region.0).map(|r| &*r.name)
    }

    /// Registers a sample at `offset` within `region`.
    ///
    /// Checks, in order: the name ([`validate_name`]), that no sample has it
    /// yet, that the type has a fixed layout, that the region exists, that
    /// the sample fits in it, and that `offset` is a multiple of the type's
    /// natural alignment. The sample's memory is not touched (VirtualBox
    /// resets a sample on registration; here the memory is not available at
    /// registration time — start from the `Default` of the sample types, or
    /// call [`reset`](Self::reset)).
    pub fn register(
        &mut self,
        def: SampleDef<'_>,
        region: RegionId,
        offset: usize,
    ) -> Result<SampleId, StamError> {
        let size = self.check_def(&def)?;
        let name = def.name;
        let region_len = self
            .region_len(region)
            .ok_or_else(|| StamError::UnknownRegion {
                name: name.into(),
                region,
            })?;
        if byte_range(offset, size).is_none_or(|r| r.end > region_len) {
            return Err(StamError::OutOfBounds {
                name: name.into(),
                region,
                offset,
                size,
                region_len,
            });
        }
        let align = def.ty.align().unwrap_or(1);
        if offset % align != 0 {
            return Err(StamError::Misaligned {
                name: name.into(),
                offset,
                align,
            });
        }
        Ok(self.insert(def, SampleLocation::Region { region, offset }, size))
    }

    /// Like [`register`](Self::register), and also checks that the type `T`
    /// found at `offset` (e.g. the field named in `offset_of!`) fits
    /// `def.ty` — catching a counter field registered as a profile.
    pub fn register_as<T: SampleData>(
        &mut self,
        def: SampleDef<'_>,
        region: RegionId,
        offset: usize,
    ) -> Result<SampleId, StamError> {
        if !T::accepts(def.ty) || def.ty.size() != Some(size_of::<T>()) {
            // Validate the name first so a bad name is reported as such.
            validate_name(def.name)?;
            return Err(StamError::TypeMismatch {
                name: def.name.into(),
                ty: def.ty,
                requested: T::NAME,
            });
        }
        self.register(def, region, offset)
    }

    /// Registers a sample in storage the registry owns, initialised to the
    /// reset state (non-reset scalars to 0). Access it with
    /// [`owned`](Self::owned) / [`owned_mut`](Self::owned_mut). Storage of
    /// deregistered owned samples is not reused.
    pub fn register_owned(&mut self, def: SampleDef<'_>) -> Result<SampleId, StamError> {
        let size = self.check_def(&def)?;
        let offset = self.owned.len() * 8;
        self.owned.resize(self.owned.len() + size.div_ceil(8), 0);
        if let Some(bytes) = self.owned.as_mut_bytes().get_mut(offset..offset + size) {
            reset_bytes(def.ty, bytes);
        }
        Ok(self.insert(def, SampleLocation::Owned { offset }, size))
    }

    /// Name, duplicate and type checks shared by the register functions;
    /// returns the sample size.
    fn check_def(&self, def: &SampleDef<'_>) -> Result<usize, StamError> {
        validate_name(def.name)?;
        if self.by_name.contains_key(&NameKey(def.name.into())) {
            return Err(StamError::Duplicate {
                name: def.name.into(),
            });
        }
        def.ty.size().ok_or_else(|| StamError::UnsupportedType {
            name: def.name.into(),
            ty: def.ty,
        })
    }

    fn insert(&mut self, def: SampleDef<'_>, location: SampleLocation, size: usize) -> SampleId {
        let idx = self.entries.len();
        self.entries.push(Some(Entry {
            name: def.name.into(),
            ty: def.ty,
            unit: def.unit,
            visibility: def.visibility,
            description: def.description.map(Into::into),
            location,
            size,
        }));
        self.by_name.insert(NameKey(def.name.into()), idx);
        SampleId(idx)
    }

    /// Removes every sample `pattern` selects; returns how many.
    pub fn deregister(&mut self, pattern: &str) -> usize {
        let selected = self.select(&Pattern::new(pattern));
        for &idx in &selected {
            if let Some(e) = self.entries.get_mut(idx).and_then(Option::take) {
                self.by_name.remove(&NameKey(e.name));
            }
        }
        selected.len()
    }

    /// Removes one sample.
    pub fn deregister_id(&mut self, id: SampleId) -> Result<(), StamError> {
        let e = self
            .entries
            .get_mut(id.0)
            .and_then(Option::take)
            .ok_or(StamError::UnknownSample { id })?;
        self.by_name.remove(&NameKey(e.name));
        Ok(())
    }

    /// Number of registered samples.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no sample is registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The id of the sample called `name`.
    #[must_use]
    pub fn find(&self, name: &str) -> Option<SampleId> {
        self.by_name
            .get(&NameKey(name.into()))
            .map(|&i| SampleId(i))
    }

    /// The descriptor of sample `id`.
    #[must_use]
    pub fn info(&self, id: SampleId) -> Option<SampleInfo<'_>> {
        self.entry(id).ok().map(|e| info(id.0, e))
    }

    /// Descriptors of the samples `pattern` selects, in name order
    /// (`STAMR3Enum`). Visibility is not applied.
    pub fn iter(&self, pattern: &str) -> impl Iterator<Item = SampleInfo<'_>> + '_ {
        self.select(&Pattern::new(pattern))
            .into_iter()
            .filter_map(move |i| self.entries.get(i)?.as_ref().map(|e| info(i, e)))
    }

    /// Indices of the selected entries, in name order.
    fn select(&self, pattern: &Pattern) -> Vec<usize> {
        match &pattern.kind {
            Kind::All => self.by_name.values().copied().collect(),
            Kind::Exact(name) => self
                .by_name
                .get(&NameKey(name.as_str().into()))
                .copied()
                .into_iter()
                .collect(),
            // Names sharing a prefix are contiguous in component order, so
            // the range starting at the prefix covers them all.
            Kind::Prefix(prefix) => self
                .by_name
                .range(NameKey(prefix.as_str().into())..)
                .take_while(|(k, _)| k.0.starts_with(prefix.as_str()))
                .map(|(_, &i)| i)
                .collect(),
            Kind::General(_) => self
                .by_name
                .iter()
                .filter(|(k, _)| pattern.matches(&k.0))
                .map(|(_, &i)| i)
                .collect(),
        }
    }

    fn entry(&self, id: SampleId) -> Result<&Entry, StamError> {
        self.entries
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or(StamError::UnknownSample { id })
    }

    /// Checks that `backing` supplies `region` with enough bytes, and returns
    /// them.
    fn region_bytes<'b>(
        &self,
        region: RegionId,
        bytes: Option<&'b [u8]>,
    ) -> Result<&'b [u8], StamError> {
        let (name, len) = self
            .regions
            .get(region.0)
            .map_or(("", 0), |r| (&*r.name, r.len));
        let bytes = bytes.ok_or_else(|| StamError::RegionNotSupplied {
            region,
            region_name: name.into(),
        })?;
        if bytes.len() < len {
            return Err(StamError::RegionTooSmall {
                region,
                region_name: name.into(),
                need: len,
                got: bytes.len(),
            });
        }
        Ok(bytes)
    }

    /// The bytes of one sample.
    fn sample_bytes<'s>(
        &'s self,
        e: &Entry,
        backing: &'s Backing<'_>,
    ) -> Result<&'s [u8], StamError> {
        let (bytes, offset) = match e.location {
            SampleLocation::Owned { offset } => (self.owned.as_bytes(), offset),
            SampleLocation::Region { region, offset } => {
                (self.region_bytes(region, backing.get(region))?, offset)
            }
        };
        byte_range(offset, e.size)
            .and_then(|r| bytes.get(r))
            .ok_or_else(|| out_of_bounds(e, bytes.len()))
    }

    /// Reads the value of sample `id`.
    pub fn value(&self, id: SampleId, backing: &Backing<'_>) -> Result<Value, StamError> {
        let e = self.entry(id)?;
        let bytes = self.sample_bytes(e, backing)?;
        decode(e.ty, bytes).ok_or_else(|| out_of_bounds(e, bytes.len()))
    }

    /// Reads sample `id` as `T` (which must fit its type).
    pub fn read<T: SampleData>(&self, id: SampleId, backing: &Backing<'_>) -> Result<T, StamError> {
        let e = self.entry(id)?;
        check_access::<T>(e)?;
        let bytes = self.sample_bytes(e, backing)?;
        T::read_from_prefix(bytes)
            .map(|(v, _)| v)
            .map_err(|_| out_of_bounds(e, bytes.len()))
    }

    /// Writes `value` to sample `id` (which must fit `T`).
    pub fn write<T: SampleData>(
        &mut self,
        id: SampleId,
        backing: &mut BackingMut<'_>,
        value: &T,
    ) -> Result<(), StamError> {
        let e = self.entry(id)?;
        check_access::<T>(e)?;
        let (location, size) = (e.location, e.size);
        let err = out_of_bounds(e, 0);
        let dst = match location {
            SampleLocation::Owned { offset } => {
                byte_range(offset, size).and_then(|r| self.owned.as_mut_bytes().get_mut(r))
            }
            SampleLocation::Region { region, offset } => {
                self.region_bytes(region, backing.get(region))?;
                byte_range(offset, size).and_then(|r| backing.get_mut(region)?.get_mut(r))
            }
        };
        let src = value.as_bytes();
        match dst.and_then(|d| d.get_mut(..src.len())) {
            Some(d) => {
                d.copy_from_slice(src);
                Ok(())
            }
            None => Err(err),
        }
    }

    /// A shared reference to registry-owned sample `id` as `T`.
    pub fn owned<T: SampleData>(&self, id: SampleId) -> Result<&T, StamError> {
        let e = self.entry(id)?;
        check_access::<T>(e)?;
        let SampleLocation::Owned { offset } = e.location else {
            return Err(StamError::NotOwned {
                name: e.name.to_string(),
            });
        };
        byte_range(offset, size_of::<T>())
            .and_then(|r| self.owned.as_bytes().get(r))
            .and_then(|b| T::ref_from_bytes(b).ok())
            .ok_or_else(|| mismatch::<T>(e))
    }

    /// A mutable reference to registry-owned sample `id` as `T`, for
    /// hot-path updates of samples the registry owns.
    pub fn owned_mut<T: SampleData>(&mut self, id: SampleId) -> Result<&mut T, StamError> {
        let e = self.entry(id)?;
        check_access::<T>(e)?;
        let SampleLocation::Owned { offset } = e.location else {
            return Err(StamError::NotOwned {
                name: e.name.to_string(),
            });
        };
        let err = mismatch::<T>(e);
        byte_range(offset, size_of::<T>())
            .and_then(|r| self.owned.as_mut_bytes().get_mut(r))
            .and_then(|b| T::mut_from_bytes(b).ok())
            .ok_or(err)
    }

    /// Resets every sample `pattern` selects, by VirtualBox's rules:
    /// counters to 0; profiles to 0 periods, ticks and max, min `u64::MAX`
    /// (advanced profiles also stop: `ts_start` = 0, dropping a period in
    /// flight, where VirtualBox would leave it running); `…Reset` scalars,
    /// `BoolReset` and `RatioU32Reset` to 0; plain scalars and `RatioU32`
    /// untouched. Returns the number of samples selected.
    ///
    /// Every region a selected sample lives in must be supplied; this is
    /// checked before anything is written, so an error leaves all memory
    /// untouched.
    pub fn reset(
        &mut self,
        pattern: &str,
        backing: &mut BackingMut<'_>,
    ) -> Result<usize, StamError> {
        let selected = self.select(&Pattern::new(pattern));
        for &idx in &selected {
            if let Some(Some(Entry {
                location: SampleLocation::Region { region, .. },
                ..
            })) = self.entries.get(idx)
            {
                self.region_bytes(*region, backing.get(*region))?;
            }
        }
        for &idx in &selected {
            let Some(Some(e)) = self.entries.get(idx) else {
                continue;
            };
            let (bytes, offset) = match e.location {
                SampleLocation::Owned { offset } => (Some(self.owned.as_mut_bytes()), offset),
                SampleLocation::Region { region, offset } => (backing.get_mut(region), offset),
            };
            if let Some(b) = bytes.and_then(|b| b.get_mut(byte_range(offset, e.size)?)) {
                reset_bytes(e.ty, b);
            }
        }
        Ok(selected.len())
    }

    /// Selects by `pattern` and checks that every selected sample can be
    /// read from `backing`, so that rendering cannot fail half-way.
    fn readable(&self, pattern: &str, backing: &Backing<'_>) -> Result<Vec<usize>, StamError> {
        let selected = self.select(&Pattern::new(pattern));
        for &idx in &selected {
            if let Some(Some(e)) = self.entries.get(idx) {
                self.sample_bytes(e, backing)?;
            }
        }
        Ok(selected)
    }

    /// Rows for the renderers, in name order, decoded as they are consumed
    /// (`selected` has been checked by [`readable`](Self::readable)).
    fn rows<'s>(
        &'s self,
        selected: &'s [usize],
        backing: &'s Backing<'s>,
    ) -> impl Iterator<Item = Row<'s>> + 's {
        selected.iter().filter_map(move |&idx| {
            let e = self.entries.get(idx)?.as_ref()?;
            let value = decode(e.ty, self.sample_bytes(e, backing).ok()?)?;
            Some(Row {
                name: &e.name,
                ty: e.ty,
                unit: e.unit,
                visibility: e.visibility,
                description: e.description.as_deref(),
                value,
            })
        })
    }

    /// Reads the samples `pattern` selects into an owned [`Snapshot`]
    /// (visibility not applied; the renderers apply it).
    pub fn snapshot(&self, pattern: &str, backing: &Backing<'_>) -> Result<Snapshot, StamError> {
        let selected = self.readable(pattern, backing)?;
        let samples = self
            .rows(&selected, backing)
            .map(|r| SampleValue {
                name: r.name.into(),
                ty: r.ty,
                unit: r.unit,
                visibility: r.visibility,
                description: r.description.map(Into::into),
                value: r.value,
            })
            .collect();
        Ok(Snapshot { samples })
    }

    /// The selected samples in the VirtualBox print layout (`STAMR3Print`).
    pub fn print(&self, pattern: &str, backing: &Backing<'_>) -> Result<String, StamError> {
        let selected = self.readable(pattern, backing)?;
        Ok(render::print(self.rows(&selected, backing)))
    }

    /// The selected samples as a VirtualBox XML snapshot
    /// (`STAMR3Snapshot`), with or without descriptions.
    pub fn xml(
        &self,
        pattern: &str,
        with_desc: bool,
        backing: &Backing<'_>,
    ) -> Result<String, StamError> {
        let selected = self.readable(pattern, backing)?;
        Ok(render::xml(self.rows(&selected, backing), with_desc))
    }

    /// The selected samples in the Prometheus text format 0.0.4.
    pub fn prometheus(&self, pattern: &str, backing: &Backing<'_>) -> Result<String, StamError> {
        let selected = self.readable(pattern, backing)?;
        Ok(render::prometheus(self.rows(&selected, backing)))
    }

    /// The selected samples as JSON (a serialised [`Snapshot`]).
    pub fn json(&self, pattern: &str, backing: &Backing<'_>) -> Result<String, StamError> {
        let selected = self.readable(pattern, backing)?;
        Ok(render::json(self.rows(&selected, backing)))
    }
}

fn info(idx: usize, e: &Entry) -> SampleInfo<'_> {
    SampleInfo {
        id: SampleId(idx),
        name: &e.name,
        ty: e.ty,
        unit: e.unit,
        visibility: e.visibility,
        description: e.description.as_deref(),
        location: e.location,
    }
}

fn out_of_bounds(e: &Entry, region_len: usize) -> StamError {
    let (region, offset) = match e.location {
        SampleLocation::Region { region, offset } => (region, offset),
        SampleLocation::Owned { offset } => (RegionId(usize::MAX), offset),
    };
    StamError::OutOfBounds {
        name: e.name.to_string(),
        region,
        offset,
        size: e.size,
        region_len,
    }
}

fn mismatch<T: SampleData>(e: &Entry) -> StamError {
    StamError::TypeMismatch {
        name: e.name.to_string(),
        ty: e.ty,
        requested: T::NAME,
    }
}

fn check_access<T: SampleData>(e: &Entry) -> Result<(), StamError> {
    if T::accepts(e.ty) && size_of::<T>() <= e.size {
        Ok(())
    } else {
        Err(mismatch::<T>(e))
    }
}

/// Decodes a sample of type `ty` from its bytes (native byte order, no
/// alignment needed).
fn decode(ty: StamType, b: &[u8]) -> Option<Value> {
    fn rd<T: FromBytes>(b: &[u8]) -> Option<T> {
        T::read_from_prefix(b).ok().map(|(v, _)| v)
    }
    Some(match ty {
        StamType::Counter => Value::Counter {
            c: rd::<StamCounter>(b)?.c,
        },
        StamType::Profile | StamType::ProfileAdv => {
            let p = rd::<StamProfile>(b)?;
            Value::profile(p.periods, p.ticks, p.ticks_max, p.ticks_min)
        }
        StamType::RatioU32 | StamType::RatioU32Reset => {
            let r = rd::<StamRatioU32>(b)?;
            Value::Ratio { a: r.a, b: r.b }
        }
        StamType::Callback => return None,
        StamType::U8 | StamType::U8Reset | StamType::X8 | StamType::X8Reset => {
            Value::Unsigned(u64::from(rd::<u8>(b)?))
        }
        StamType::U16 | StamType::U16Reset | StamType::X16 | StamType::X16Reset => {
            Value::Unsigned(u64::from(rd::<u16>(b)?))
        }
        StamType::U32 | StamType::U32Reset | StamType::X32 | StamType::X32Reset => {
            Value::Unsigned(u64::from(rd::<u32>(b)?))
        }
        StamType::U64 | StamType::U64Reset | StamType::X64 | StamType::X64Reset => {
            Value::Unsigned(rd::<u64>(b)?)
        }
        StamType::Bool | StamType::BoolReset => Value::Bool(rd::<u8>(b)? != 0),
    })
}

/// Applies the reset rule of `ty` to a sample's bytes (`b` is exactly the
/// sample).
fn reset_bytes(ty: StamType, b: &mut [u8]) {
    let src: &[u8] = match ty {
        StamType::Counter => StamCounter::RESET.as_bytes(),
        StamType::Profile => StamProfile::RESET.as_bytes(),
        StamType::ProfileAdv => StamProfileAdv::RESET.as_bytes(),
        t if t.is_reset() => {
            b.fill(0);
            return;
        }
        _ => return,
    };
    if let Some(dst) = b.get_mut(..src.len()) {
        dst.copy_from_slice(src);
    }
}
