//! Statistics in the style of VirtualBox's STAM.
//!
//! # Samples and the hot path
//!
//! A *sample* is a small `#[repr(C)]` structure of plain integers that the
//! code being measured updates in place: [`StamCounter`], [`StamProfile`],
//! [`StamProfileAdv`] (a profile plus the start timestamp of the period in
//! flight) and [`StamRatioU32`], plus plain `u8`/`u16`/`u32`/`u64`/bool
//! scalars described by [`StamType`]. The world switchers update them from
//! machine code at displacements taken from [`core::mem::offset_of!`]; the
//! layouts are pinned by compile-time asserts. Updates from Rust
//! ([`StamCounter::inc`], [`StamProfileAdv::start`]/[`stop`](StamProfileAdv::stop),
//! …) are plain single-writer stores with wrapping arithmetic: no lock, no
//! atomic read-modify-write, no allocation, never a panic. Timestamps come
//! from [`rdtsc`] on x86 (raw TSC ticks, never converted).
//!
//! # Where samples live
//!
//! A [`Registry`] holds descriptors — name, [`StamType`], [`StamUnit`],
//! [`StamVisibility`], description — and a [`SampleLocation`], never a
//! pointer. A sample lives either
//!
//! - at a byte offset inside a *region*: memory the registry does not own,
//!   declared once by length ([`Registry::add_region`],
//!   [`Registry::add_region_for`] for a `#[repr(C)]` structure) and lent to
//!   each call that reads or writes it as a [`Backing`] (`&[u8]`) or
//!   [`BackingMut`] (`&mut [u8]`). The bytes can be a Rust structure seen
//!   through zerocopy, a VM image that machine code writes, or a window into
//!   a memory dump taken from QEMU; they need no alignment, since values are
//!   copied out with zerocopy. Registration checks that the sample fits in
//!   the region and that its offset is naturally aligned for its type;
//!   [`Registry::register_as`] also checks the Rust field type against the
//!   registered type. Nothing is borrowed beyond one call, so the registry
//!   never holds a `&mut` over memory someone else writes;
//! - or in storage the registry owns ([`Registry::register_owned`]), reached
//!   through [`Registry::owned_mut`].
//!
//! # Names, order and patterns
//!
//! Names are hierarchical paths checked by [`validate_name`]: a leading `/`,
//! no empty component, no trailing `/`, no `\`, at most [`MAX_NAME_LEN`]
//! bytes, and unique within a registry; each violation is its own
//! [`StamError`] variant. Every enumeration and dump lists samples in name
//! order, compared component by component ([`cmp_names`]), so a subtree is
//! always contiguous.
//!
//! Selection uses STAM's patterns ([`Pattern`]): `*` matches any run of
//! characters including `/`, `?` exactly one character, the rest is literal;
//! `|` separates alternatives; the empty pattern and `*` select everything.
//!
//! # Reset
//!
//! [`Registry::reset`] follows VirtualBox: counters to 0; profiles to 0
//! periods, ticks and max with min `u64::MAX` (advanced profiles also get
//! `ts_start = 0`); `…Reset` scalars, `BoolReset` and `RatioU32Reset` to 0;
//! plain scalars and `RatioU32` are left alone.
//!
//! # Output formats
//!
//! Every dump reads the selected samples from a backing.
//!
//! - **Print** ([`Registry::print`], VirtualBox's `STAMR3Print` layout): the
//!   name left-justified in 32 columns, a space, the value right-justified
//!   in 8 (hexadecimal for `X` types, `true    `/`false   ` for booleans,
//!   `A:B` with B left-justified in 8 for ratios), a space and the unit.
//!   Profiles show the average per period and then
//!   `(<ticks:12> <unit1>, <periods:7> <unit2>, max <max:9>, min <min:7>)`.
//!   Before the first period a profile has no longest or shortest period:
//!   max and min show `-` (VirtualBox prints the reset values, `0` and
//!   `-1`; the memory still holds them, see [Reset](#reset)).
//! - **XML** ([`Registry::xml`], `STAMR3Snapshot`): an XML declaration, a
//!   `<Statistics>` root and one empty element per sample — `<Counter c=…`,
//!   `<Profile cPeriods=… cTicks=… cTicksMin=… cTicksMax=…`,
//!   `<Ratio32 u32A=… u32B=…`, `<U8 val=…` … `<X64 val="0x…"`,
//!   `<BOOL val="true|false"` — followed by `unit`, `vis="used"` or
//!   `vis="not-gui"` when not always visible, `name`, and with descriptions
//!   on, `desc`. Counter and profile fields are printed signed, as
//!   VirtualBox does; a profile without periods has no `cTicksMin` and
//!   `cTicksMax` attributes. Attribute values are XML-escaped (VirtualBox escapes
//!   only the description; escaping the name too keeps odd names valid XML
//!   and changes nothing for ordinary ones).
//! - **JSON** ([`Registry::json`], [`Snapshot::to_json`]): serde's rendering
//!   of the owned [`Snapshot`] `{ "samples": [ { "name", "type", "unit",
//!   "visibility", "description"?, "value" } ] }`. Absent values are `null`,
//!   never a sentinel (a profile's `ticks_max`/`ticks_min` before its first
//!   period). Reading a snapshot back ([`Snapshot::from_json`] or any serde
//!   path) validates it ([`Snapshot::validate`]: naming rules, unique names,
//!   values of the kind and width the type holds) and names the first bad
//!   sample in a [`StamError::InvalidSample`].
//!
//! Print and XML hide `USED` samples whose value is zero (counter 0,
//! profile without periods, ratio 0:0, scalar 0, `false`). Enumeration,
//! snapshots, JSON and Prometheus do not look at visibility.
//!
//! - **Prometheus** ([`Registry::prometheus`], text exposition format
//!   0.0.4). Metric names cannot contain `/`, and turning paths into names
//!   would make distinct paths collide (`/a-b` and `/a_b`), so the STAM path
//!   goes into a `path` label and the unit string into a `unit` label; the
//!   metric name only says what kind of value it is:
//!
//!   | STAM type | metric | Prometheus type |
//!   |---|---|---|
//!   | `COUNTER` | `stam_counter_total` | counter |
//!   | `PROFILE`, `PROFILE_ADV` | `stam_profile_periods_total`, `stam_profile_ticks_total` | counter |
//!   | `PROFILE`, `PROFILE_ADV` | `stam_profile_ticks_max`, `stam_profile_ticks_min` (only once a period was recorded) | gauge |
//!   | `RATIO_U32`, `RATIO_U32_RESET` | `stam_ratio_a`, `stam_ratio_b` | gauge |
//!   | `U8` … `X64`, `BOOL` (and `_RESET`) | `stam_value` (booleans 0/1) | gauge |
//!
//!   Families come in the order of the table, each with one `# HELP` and
//!   one `# TYPE` line before its first sample and left out when empty;
//!   within a family samples are in name order. Label values escape `\`,
//!   `"` and newlines. Descriptions are not exported. A STAM reset makes
//!   counters go down, which Prometheus reads as a counter restart.
//!
//! # Example
//!
//! A profile and a counter inside a `#[repr(C)]` structure, updated in
//! place, then dumped and reset:
//!
//! ```
//! use core::mem::offset_of;
//! use stam::{Backing, BackingMut, Registry, SampleDef, StamCounter, StamProfileAdv, StamType, StamUnit};
//! use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};
//!
//! /// Part of a VM structure; machine code updates these fields in place.
//! #[repr(C)]
//! #[derive(Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
//! struct Vm {
//!     magic: u64,
//!     stat_switch_to_gc: StamProfileAdv,
//!     stat_exits: StamCounter,
//! }
//!
//! let mut reg = Registry::new();
//! let vm_region = reg.add_region_for::<Vm>("vm");
//! reg.register_as::<StamProfileAdv>(
//!     SampleDef::new("/VMM/Switcher/ToGC", StamType::ProfileAdv, StamUnit::TicksPerCall)
//!         .description("Host to guest world switch"),
//!     vm_region,
//!     offset_of!(Vm, stat_switch_to_gc),
//! )?;
//! reg.register_as::<StamCounter>(
//!     SampleDef::new("/VMM/Exits", StamType::Counter, StamUnit::Occurences),
//!     vm_region,
//!     offset_of!(Vm, stat_exits),
//! )?;
//!
//! // The hot path: plain stores into the structure (the switchers do the
//! // same from machine code at the same offsets, with rdtsc timestamps).
//! let mut vm = Vm::default();
//! for (start, stop) in [(1000, 1300), (2000, 2100)] {
//!     vm.stat_switch_to_gc.start(start);
//!     vm.stat_switch_to_gc.stop(stop);
//!     vm.stat_exits.inc();
//! }
//!
//! // Dumps borrow the structure's bytes for the duration of the call.
//! let text = reg.print("/VMM/*", &Backing::new().with_struct(vm_region, &vm))?;
//! assert_eq!(
//!     text,
//!     "/VMM/Exits                              2 times\n\
//!      /VMM/Switcher/ToGC                    200 ticks/call \
//!      (         400 ticks,       2 calls, max       300, min     100)\n"
//! );
//!
//! // Reset by pattern writes through a mutable borrow, again for one call.
//! reg.reset("/VMM/Switcher/*", &mut BackingMut::new().with_struct(vm_region, &mut vm))?;
//! assert_eq!(vm.stat_switch_to_gc.core.periods, 0);
//! assert_eq!(vm.stat_switch_to_gc.core.ticks_min, u64::MAX);
//! assert_eq!(vm.stat_exits.c, 2);
//! # Ok::<(), stam::StamError>(())
//! ```

// Without the default `std` feature only the sample layouts, their hot-path
// updates and the type/unit vocabulary are built (`no_std`, no allocation):
// what machine code and a kernel-side embedder touch. The registry, the
// selection and every renderer need std.
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "std")]
mod backing;
#[cfg(feature = "std")]
mod error;
#[cfg(feature = "std")]
mod name;
#[cfg(feature = "std")]
mod pattern;
#[cfg(feature = "std")]
mod registry;
#[cfg(feature = "std")]
mod render;
mod sample;
#[cfg(feature = "std")]
mod snapshot;
mod types;

#[cfg(feature = "std")]
pub use backing::{Backing, BackingMut};
#[cfg(feature = "std")]
pub use error::{SampleProblem, StamError};
#[cfg(feature = "std")]
pub use name::{cmp_names, validate_name, MAX_NAME_LEN};
#[cfg(feature = "std")]
pub use pattern::{glob_match, Pattern};
#[cfg(feature = "std")]
pub use registry::{
    RegionId, Registry, SampleData, SampleDef, SampleId, SampleInfo, SampleLocation,
};
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
pub use sample::rdtsc;
pub use sample::{StamCounter, StamProfile, StamProfileAdv, StamRatioU32};
#[cfg(feature = "std")]
pub use snapshot::{SampleValue, Snapshot, Value};
pub use types::{StamType, StamUnit, StamVisibility};
/// The zerocopy crate this crate's sample types derive from.
pub use zerocopy;
