//! Sample types, units and visibility, numbered as VirtualBox numbers them.

use core::mem::{align_of, size_of};

use serde::{Deserialize, Serialize};

use crate::sample::{StamCounter, StamProfile, StamProfileAdv, StamRatioU32};

/// What a registered sample is (`STAMTYPE`). Discriminants match VirtualBox
/// (`STAMTYPE_INVALID` = 0 and `STAMTYPE_END` are left out).
///
/// Plain scalars come in pairs: the plain variant is a gauge that reset never
/// touches; the `…Reset` variant is zeroed by [`crate::Registry::reset`]. The
/// `X…` variants print in hexadecimal.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StamType {
    /// [`StamCounter`].
    Counter = 1,
    /// [`StamProfile`].
    Profile = 2,
    /// [`StamProfileAdv`].
    ProfileAdv = 3,
    /// [`StamRatioU32`], not reset.
    RatioU32 = 4,
    /// [`StamRatioU32`], both halves reset to 0.
    RatioU32Reset = 5,
    /// A callback sample. Listed for numbering; this crate does not register
    /// callbacks ([`crate::StamError::UnsupportedType`]).
    Callback = 6,
    /// `u8`, decimal, not reset.
    U8 = 7,
    /// `u8`, decimal, reset to 0.
    U8Reset = 8,
    /// `u8`, hexadecimal, not reset.
    X8 = 9,
    /// `u8`, hexadecimal, reset to 0.
    X8Reset = 10,
    /// `u16`, decimal, not reset.
    U16 = 11,
    /// `u16`, decimal, reset to 0.
    U16Reset = 12,
    /// `u16`, hexadecimal, not reset.
    X16 = 13,
    /// `u16`, hexadecimal, reset to 0.
    X16Reset = 14,
    /// `u32`, decimal, not reset.
    U32 = 15,
    /// `u32`, decimal, reset to 0.
    U32Reset = 16,
    /// `u32`, hexadecimal, not reset.
    X32 = 17,
    /// `u32`, hexadecimal, reset to 0.
    X32Reset = 18,
    /// `u64`, decimal, not reset.
    U64 = 19,
    /// `u64`, decimal, reset to 0.
    U64Reset = 20,
    /// `u64`, hexadecimal, not reset.
    X64 = 21,
    /// `u64`, hexadecimal, reset to 0.
    X64Reset = 22,
    /// A one-byte boolean (any non-zero byte reads as `true`), not reset.
    Bool = 23,
    /// A one-byte boolean, reset to `false`.
    BoolReset = 24,
}

impl StamType {
    /// The name serde gives the value (JSON), for renderers that write JSON
    /// directly.
    #[must_use]
    pub const fn serde_name(self) -> &'static str {
        // Serde renames the variants to their `STAMTYPE_` suffix.
        self.name()
    }

    /// Every type, in numeric order.
    pub const ALL: [StamType; 24] = [
        Self::Counter,
        Self::Profile,
        Self::ProfileAdv,
        Self::RatioU32,
        Self::RatioU32Reset,
        Self::Callback,
        Self::U8,
        Self::U8Reset,
        Self::X8,
        Self::X8Reset,
        Self::U16,
        Self::U16Reset,
        Self::X16,
        Self::X16Reset,
        Self::U32,
        Self::U32Reset,
        Self::X32,
        Self::X32Reset,
        Self::U64,
        Self::U64Reset,
        Self::X64,
        Self::X64Reset,
        Self::Bool,
        Self::BoolReset,
    ];

    /// The VirtualBox number (`STAMTYPE_*` value).
    #[must_use]
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The type with VirtualBox number `raw`, if there is one.
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.raw() == raw)
    }

    /// The `STAMTYPE_` suffix, e.g. `"PROFILE_ADV"`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Counter => "COUNTER",
            Self::Profile => "PROFILE",
            Self::ProfileAdv => "PROFILE_ADV",
            Self::RatioU32 => "RATIO_U32",
            Self::RatioU32Reset => "RATIO_U32_RESET",
            Self::Callback => "CALLBACK",
            Self::U8 => "U8",
            Self::U8Reset => "U8_RESET",
            Self::X8 => "X8",
            Self::X8Reset => "X8_RESET",
            Self::U16 => "U16",
            Self::U16Reset => "U16_RESET",
            Self::X16 => "X16",
            Self::X16Reset => "X16_RESET",
            Self::U32 => "U32",
            Self::U32Reset => "U32_RESET",
            Self::X32 => "X32",
            Self::X32Reset => "X32_RESET",
            Self::U64 => "U64",
            Self::U64Reset => "U64_RESET",
            Self::X64 => "X64",
            Self::X64Reset => "X64_RESET",
            Self::Bool => "BOOL",
            Self::BoolReset => "BOOL_RESET",
        }
    }

    /// Size in bytes of the sample in memory; `None` for
    /// [`Callback`](Self::Callback), which has no fixed layout.
    #[must_use]
    pub const fn size(self) -> Option<usize> {
        Some(match self {
            Self::Counter => size_of::<StamCounter>(),
            Self::Profile => size_of::<StamProfile>(),
            Self::ProfileAdv => size_of::<StamProfileAdv>(),
            Self::RatioU32 | Self::RatioU32Reset => size_of::<StamRatioU32>(),
            Self::Callback => return None,
            Self::U8 | Self::U8Reset | Self::X8 | Self::X8Reset | Self::Bool | Self::BoolReset => 1,
            Self::U16 | Self::U16Reset | Self::X16 | Self::X16Reset => 2,
            Self::U32 | Self::U32Reset | Self::X32 | Self::X32Reset => 4,
            Self::U64 | Self::U64Reset | Self::X64 | Self::X64Reset => 8,
        })
    }

    /// Natural alignment of the sample: the Rust type's alignment on this
    /// target (so an [`offset_of!`](core::mem::offset_of) inside a
    /// `#[repr(C)]` structure always satisfies it). `None` for callbacks.
    #[must_use]
    pub const fn align(self) -> Option<usize> {
        Some(match self {
            Self::Counter => align_of::<StamCounter>(),
            Self::Profile => align_of::<StamProfile>(),
            Self::ProfileAdv => align_of::<StamProfileAdv>(),
            Self::RatioU32 | Self::RatioU32Reset => align_of::<StamRatioU32>(),
            Self::Callback => return None,
            Self::U8 | Self::U8Reset | Self::X8 | Self::X8Reset | Self::Bool | Self::BoolReset => 1,
            Self::U16 | Self::U16Reset | Self::X16 | Self::X16Reset => align_of::<u16>(),
            Self::U32 | Self::U32Reset | Self::X32 | Self::X32Reset => align_of::<u32>(),
            Self::U64 | Self::U64Reset | Self::X64 | Self::X64Reset => align_of::<u64>(),
        })
    }

    /// Whether a reset touches this sample (counters, profiles, `…Reset`
    /// types; callbacks would run their reset function).
    #[must_use]
    pub const fn is_reset(self) -> bool {
        !matches!(
            self,
            Self::RatioU32
                | Self::U8
                | Self::X8
                | Self::U16
                | Self::X16
                | Self::U32
                | Self::X32
                | Self::U64
                | Self::X64
                | Self::Bool
        )
    }

    /// Whether the value prints in hexadecimal.
    #[must_use]
    pub const fn is_hex(self) -> bool {
        matches!(
            self,
            Self::X8
                | Self::X8Reset
                | Self::X16
                | Self::X16Reset
                | Self::X32
                | Self::X32Reset
                | Self::X64
                | Self::X64Reset
        )
    }

    /// Whether this is one of the plain unsigned scalars (`U*`/`X*`).
    #[must_use]
    pub const fn is_unsigned_scalar(self) -> bool {
        matches!(self.size(), Some(1 | 2 | 4 | 8))
            && !matches!(
                self,
                Self::Counter | Self::RatioU32 | Self::RatioU32Reset | Self::Bool | Self::BoolReset
            )
    }

    /// The element name used by the XML snapshot.
    #[must_use]
    pub const fn xml_tag(self) -> &'static str {
        match self {
            Self::Counter => "Counter",
            Self::Profile | Self::ProfileAdv => "Profile",
            Self::RatioU32 | Self::RatioU32Reset => "Ratio32",
            Self::Callback => "Callback",
            Self::U8 | Self::U8Reset => "U8",
            Self::X8 | Self::X8Reset => "X8",
            Self::U16 | Self::U16Reset => "U16",
            Self::X16 | Self::X16Reset => "X16",
            Self::U32 | Self::U32Reset => "U32",
            Self::X32 | Self::X32Reset => "X32",
            Self::U64 | Self::U64Reset => "U64",
            Self::X64 | Self::X64Reset => "X64",
            Self::Bool | Self::BoolReset => "BOOL",
        }
    }
}

/// The unit of a sample (`STAMUNIT`). Discriminants match VirtualBox
/// (`STAMUNIT_INVALID` = 0 and `STAMUNIT_END` are left out); the spellings
/// (`Occurences`) follow VirtualBox too.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StamUnit {
    /// No unit (`""`).
    None = 1,
    /// `"calls"`.
    Calls = 2,
    /// `"count"`.
    Count = 3,
    /// `"bytes"`.
    Bytes = 4,
    /// `"bytes/call"`.
    BytesPerCall = 5,
    /// `"pages"`.
    Pages = 6,
    /// `"errors"`.
    Errors = 7,
    /// `"times"`.
    Occurences = 8,
    /// `"ticks"`.
    Ticks = 9,
    /// `"ticks/call"`.
    TicksPerCall = 10,
    /// `"ticks/time"`.
    TicksPerOccurence = 11,
    /// `"good:bad"`.
    GoodBad = 12,
    /// `"megabytes"`.
    Megabytes = 13,
    /// `"kilobytes"`.
    Kilobytes = 14,
    /// `"ns"`.
    Ns = 15,
    /// `"ns/call"`.
    NsPerCall = 16,
    /// `"ns/time"`.
    NsPerOccurence = 17,
    /// `"%"`.
    Pct = 18,
    /// `"Hz"`.
    Hz = 19,
}

impl StamUnit {
    /// The name serde gives the value (JSON), for renderers that write JSON
    /// directly.
    #[must_use]
    pub const fn serde_name(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Calls => "CALLS",
            Self::Count => "COUNT",
            Self::Bytes => "BYTES",
            Self::BytesPerCall => "BYTES_PER_CALL",
            Self::Pages => "PAGES",
            Self::Errors => "ERRORS",
            Self::Occurences => "OCCURENCES",
            Self::Ticks => "TICKS",
            Self::TicksPerCall => "TICKS_PER_CALL",
            Self::TicksPerOccurence => "TICKS_PER_OCCURENCE",
            Self::GoodBad => "GOOD_BAD",
            Self::Megabytes => "MEGABYTES",
            Self::Kilobytes => "KILOBYTES",
            Self::Ns => "NS",
            Self::NsPerCall => "NS_PER_CALL",
            Self::NsPerOccurence => "NS_PER_OCCURENCE",
            Self::Pct => "PCT",
            Self::Hz => "HZ",
        }
    }

    /// Every unit, in numeric order.
    pub const ALL: [StamUnit; 19] = [
        Self::None,
        Self::Calls,
        Self::Count,
        Self::Bytes,
        Self::BytesPerCall,
        Self::Pages,
        Self::Errors,
        Self::Occurences,
        Self::Ticks,
        Self::TicksPerCall,
        Self::TicksPerOccurence,
        Self::GoodBad,
        Self::Megabytes,
        Self::Kilobytes,
        Self::Ns,
        Self::NsPerCall,
        Self::NsPerOccurence,
        Self::Pct,
        Self::Hz,
    ];

    /// The VirtualBox number (`STAMUNIT_*` value).
    #[must_use]
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The unit with VirtualBox number `raw`, if there is one.
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|u| u.raw() == raw)
    }

    /// The full unit string (`STAMR3GetUnit`), e.g. `"ticks/call"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Calls => "calls",
            Self::Count => "count",
            Self::Bytes => "bytes",
            Self::BytesPerCall => "bytes/call",
            Self::Pages => "pages",
            Self::Errors => "errors",
            Self::Occurences => "times",
            Self::Ticks => "ticks",
            Self::TicksPerCall => "ticks/call",
            Self::TicksPerOccurence => "ticks/time",
            Self::GoodBad => "good:bad",
            Self::Megabytes => "megabytes",
            Self::Kilobytes => "kilobytes",
            Self::Ns => "ns",
            Self::NsPerCall => "ns/call",
            Self::NsPerOccurence => "ns/time",
            Self::Pct => "%",
            Self::Hz => "Hz",
        }
    }

    /// The numerator of a "per" unit (`STAMR3GetUnit1`): `"ticks"` for
    /// `ticks/call`; other units return their full string.
    #[must_use]
    pub const fn unit1(self) -> &'static str {
        match self {
            Self::BytesPerCall => "bytes",
            Self::TicksPerCall | Self::TicksPerOccurence => "ticks",
            Self::GoodBad => "good",
            Self::NsPerCall | Self::NsPerOccurence => "ns",
            other => other.as_str(),
        }
    }

    /// The denominator of a "per" unit (`STAMR3GetUnit2`): `"calls"` for
    /// `…/call`, `"bad"` for good:bad, and `"times"` for everything else
    /// (including [`None`](Self::None)).
    #[must_use]
    pub const fn unit2(self) -> &'static str {
        match self {
            Self::TicksPerCall | Self::NsPerCall | Self::BytesPerCall => "calls",
            Self::GoodBad => "bad",
            _ => "times",
        }
    }
}

impl core::fmt::Display for StamUnit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a sample is shown (`STAMVISIBILITY`). Discriminants match VirtualBox.
///
/// Only print and snapshot output look at it; enumeration, reset, JSON
/// snapshots and Prometheus output do not.
#[repr(u32)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StamVisibility {
    /// Always shown.
    #[default]
    Always = 1,
    /// Hidden while the value is zero (counter 0, profile without periods,
    /// ratio 0:0, scalar 0, `false`).
    Used = 2,
    /// Shown, but flagged `vis="not-gui"` so a GUI hides it.
    NotGui = 3,
}

impl StamVisibility {
    /// The name serde gives the value (JSON), for renderers that write JSON
    /// directly.
    #[must_use]
    pub const fn serde_name(self) -> &'static str {
        match self {
            Self::Always => "ALWAYS",
            Self::Used => "USED",
            Self::NotGui => "NOT_GUI",
        }
    }

    /// The VirtualBox number (`STAMVISIBILITY_*` value).
    #[must_use]
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The visibility with VirtualBox number `raw`, if there is one.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Always),
            2 => Some(Self::Used),
            3 => Some(Self::NotGui),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_matches_virtualbox() {
        assert_eq!(StamType::Counter.raw(), 1);
        assert_eq!(StamType::Callback.raw(), 6);
        assert_eq!(StamType::U8.raw(), 7);
        assert_eq!(StamType::BoolReset.raw(), 24);
        for (i, t) in StamType::ALL.iter().enumerate() {
            assert_eq!(t.raw() as usize, i + 1);
            assert_eq!(StamType::from_raw(t.raw()), Some(*t));
        }
        assert_eq!(StamType::from_raw(0), None);
        assert_eq!(StamType::from_raw(25), None);
        for (i, u) in StamUnit::ALL.iter().enumerate() {
            assert_eq!(u.raw() as usize, i + 1);
            assert_eq!(StamUnit::from_raw(u.raw()), Some(*u));
        }
        assert_eq!(StamUnit::from_raw(0), None);
        assert_eq!(StamVisibility::from_raw(2), Some(StamVisibility::Used));
        assert_eq!(StamVisibility::from_raw(4), None);
        assert_eq!(StamVisibility::NotGui.raw(), 3);
    }

    #[test]
    fn unit_strings() {
        assert_eq!(StamUnit::None.as_str(), "");
        assert_eq!(StamUnit::Occurences.as_str(), "times");
        assert_eq!(StamUnit::TicksPerCall.as_str(), "ticks/call");
        assert_eq!(StamUnit::TicksPerCall.unit1(), "ticks");
        assert_eq!(StamUnit::TicksPerCall.unit2(), "calls");
        assert_eq!(StamUnit::TicksPerOccurence.unit2(), "times");
        assert_eq!(StamUnit::NsPerOccurence.unit1(), "ns");
        assert_eq!(StamUnit::BytesPerCall.unit1(), "bytes");
        assert_eq!(StamUnit::GoodBad.unit1(), "good");
        assert_eq!(StamUnit::GoodBad.unit2(), "bad");
        assert_eq!(StamUnit::None.unit2(), "times");
        assert_eq!(StamUnit::Ticks.unit1(), "ticks");
        assert_eq!(StamUnit::Ticks.unit2(), "times");
        assert_eq!(StamUnit::Pct.to_string(), "%");
    }

    #[test]
    fn type_properties() {
        assert_eq!(StamType::ProfileAdv.size(), Some(40));
        assert_eq!(StamType::Callback.size(), None);
        assert_eq!(StamType::Callback.align(), None);
        assert_eq!(StamType::RatioU32.align(), Some(4));
        assert_eq!(StamType::X16Reset.size(), Some(2));
        assert!(StamType::Counter.is_reset());
        assert!(StamType::RatioU32Reset.is_reset());
        assert!(!StamType::RatioU32.is_reset());
        assert!(!StamType::Bool.is_reset());
        assert!(StamType::BoolReset.is_reset());
        assert!(StamType::X64.is_hex());
        assert!(!StamType::U64.is_hex());
        assert!(StamType::X8Reset.is_unsigned_scalar());
        assert!(!StamType::Bool.is_unsigned_scalar());
        assert!(!StamType::Counter.is_unsigned_scalar());
        assert_eq!(StamType::ProfileAdv.name(), "PROFILE_ADV");
        assert_eq!(StamType::ProfileAdv.xml_tag(), "Profile");
    }

    #[test]
    fn serde_names() -> Result<(), serde_json::Error> {
        assert_eq!(serde_json::to_string(&StamType::U8Reset)?, "\"U8_RESET\"");
        assert_eq!(
            serde_json::to_string(&StamType::RatioU32Reset)?,
            "\"RATIO_U32_RESET\""
        );
        assert_eq!(
            serde_json::to_string(&StamUnit::TicksPerCall)?,
            "\"TICKS_PER_CALL\""
        );
        assert_eq!(
            serde_json::to_string(&StamVisibility::NotGui)?,
            "\"NOT_GUI\""
        );
        for t in StamType::ALL {
            let s = serde_json::to_string(&t)?;
            assert_eq!(s, format!("\"{}\"", t.name()));
            assert_eq!(s, format!("\"{}\"", t.serde_name()));
        }
        for u in StamUnit::ALL {
            assert_eq!(
                serde_json::to_string(&u)?,
                format!("\"{}\"", u.serde_name())
            );
        }
        Ok(())
    }
}
