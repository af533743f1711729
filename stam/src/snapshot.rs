//! Owned values of selected samples, serialisable with serde.

use serde::{Deserialize, Serialize};

use crate::render;
use crate::types::{StamType, StamUnit, StamVisibility};

/// The value of one sample, decoded from its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    /// [`StamType::Counter`].
    Counter {
        /// The count.
        c: u64,
    },
    /// [`StamType::Profile`] and [`StamType::ProfileAdv`] (the start
    /// timestamp of an advanced profile is transient and not captured).
    Profile {
        /// Number of periods.
        periods: u64,
        /// Sum of period lengths.
        ticks: u64,
        /// Longest period (0 with no period).
        ticks_max: u64,
        /// Shortest period (`u64::MAX` with no period).
        ticks_min: u64,
    },
    /// [`StamType::RatioU32`] and [`StamType::RatioU32Reset`].
    Ratio {
        /// Numerator.
        a: u32,
        /// Denominator.
        b: u32,
    },
    /// Any `U*`/`X*` scalar, widened.
    Unsigned(u64),
    /// [`StamType::Bool`] and [`StamType::BoolReset`].
    Bool(bool),
}

impl Value {
    /// Whether the value counts as "unused" for
    /// [`StamVisibility::Used`]: counter 0, profile without periods, ratio
    /// 0:0, scalar 0, `false`.
    #[must_use]
    pub const fn is_zero(&self) -> bool {
        match *self {
            Self::Counter { c } => c == 0,
            Self::Profile { periods, .. } => periods == 0,
            Self::Ratio { a, b } => a == 0 && b == 0,
            Self::Unsigned(v) => v == 0,
            Self::Bool(v) => !v,
        }
    }
}

/// One sample in a [`Snapshot`]: its descriptor and its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleValue {
    /// Full name, e.g. `/VMM/Switcher/ToGC`.
    pub name: String,
    /// Registered type.
    #[serde(rename = "type")]
    pub ty: StamType,
    /// Unit.
    pub unit: StamUnit,
    /// Visibility.
    pub visibility: StamVisibility,
    /// Description, if one was registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The value read.
    pub value: Value,
}

/// The values of a selection of samples at one moment, in sorted name order.
///
/// JSON is serde's rendering of this structure. The other formats are
/// produced by the methods below and are the same text the
/// [`Registry`](crate::Registry) renders directly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The samples.
    pub samples: Vec<SampleValue>,
}

impl Snapshot {
    /// The VirtualBox print layout (see the [crate docs](crate#output-formats)).
    #[must_use]
    pub fn print(&self) -> String {
        render::print(self.rows())
    }

    /// The VirtualBox XML snapshot, optionally with descriptions.
    #[must_use]
    pub fn xml(&self, with_desc: bool) -> String {
        render::xml(self.rows(), with_desc)
    }

    /// Prometheus text exposition format 0.0.4.
    #[must_use]
    pub fn prometheus(&self) -> String {
        render::prometheus(self.rows())
    }

    /// JSON (serde's rendering of this structure).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// Parses JSON written by [`to_json`](Self::to_json).
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    fn rows(&self) -> impl Iterator<Item = render::Row<'_>> {
        self.samples.iter().map(|s| render::Row {
            name: &s.name,
            ty: s.ty,
            unit: s.unit,
            visibility: s.visibility,
            description: s.description.as_deref(),
            value: s.value,
        })
    }
}
