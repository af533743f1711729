//! Owned values of selected samples, serialisable with serde; reading one
//! back validates it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{SampleProblem, StamError};
use crate::name::validate_name;
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
    ///
    /// Before the first period the longest and shortest period do not exist:
    /// they are `None` here (`null` in JSON), whatever the sample's memory
    /// holds (0 and the `u64::MAX` sentinel after a reset).
    Profile {
        /// Number of periods.
        periods: u64,
        /// Sum of period lengths.
        ticks: u64,
        /// Longest period; `None` without periods.
        ticks_max: Option<u64>,
        /// Shortest period; `None` without periods.
        ticks_min: Option<u64>,
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

    /// The kind of value, as its JSON key spells it: `counter`, `profile`,
    /// `ratio`, `unsigned` or `bool`.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Counter { .. } => "counter",
            Self::Profile { .. } => "profile",
            Self::Ratio { .. } => "ratio",
            Self::Unsigned(_) => "unsigned",
            Self::Bool(_) => "bool",
        }
    }

    /// The value of a profile whose memory holds these fields: the extremes
    /// only once a period was recorded.
    #[must_use]
    pub const fn profile(periods: u64, ticks: u64, ticks_max: u64, ticks_min: u64) -> Self {
        let recorded = periods != 0;
        Self::Profile {
            periods,
            ticks,
            ticks_max: if recorded { Some(ticks_max) } else { None },
            ticks_min: if recorded { Some(ticks_min) } else { None },
        }
    }
}

/// The value kind `ty` holds (see [`Value::kind`]); `None` for callbacks.
const fn kind_of(ty: StamType) -> Option<&'static str> {
    Some(match ty {
        StamType::Counter => "counter",
        StamType::Profile | StamType::ProfileAdv => "profile",
        StamType::RatioU32 | StamType::RatioU32Reset => "ratio",
        StamType::Callback => return None,
        StamType::Bool | StamType::BoolReset => "bool",
        _ => "unsigned",
    })
}

/// The largest value of an unsigned scalar type of `size` bytes.
const fn scalar_max(size: usize) -> u64 {
    match size {
        1 => u8::MAX as u64,
        2 => u16::MAX as u64,
        4 => u32::MAX as u64,
        _ => u64::MAX,
    }
}

/// Checks that `value` is something type `ty` can hold.
fn check_value(ty: StamType, value: &Value) -> Result<(), SampleProblem> {
    let expected = kind_of(ty).ok_or(SampleProblem::UnsupportedType { ty })?;
    if value.kind() != expected {
        return Err(SampleProblem::WrongKind {
            ty,
            expected,
            found: value.kind(),
        });
    }
    match *value {
        Value::Unsigned(v) => {
            let max = scalar_max(ty.size().unwrap_or(8));
            if v > max {
                return Err(SampleProblem::OutOfRange { ty, value: v, max });
            }
        }
        Value::Profile {
            periods,
            ticks_max,
            ticks_min,
            ..
        } => check_profile(periods, ticks_max, ticks_min)?,
        _ => {}
    }
    Ok(())
}

/// A profile has both extremes exactly when it has periods, and min ≤ max.
fn check_profile(
    periods: u64,
    ticks_max: Option<u64>,
    ticks_min: Option<u64>,
) -> Result<(), SampleProblem> {
    let fields = [("ticks_max", ticks_max), ("ticks_min", ticks_min)];
    for (field, v) in fields {
        match (periods, v) {
            (0, Some(value)) => return Err(SampleProblem::ExtremeWithoutPeriods { field, value }),
            (1.., None) => return Err(SampleProblem::MissingExtreme { periods, field }),
            _ => {}
        }
    }
    match (ticks_min, ticks_max) {
        (Some(min), Some(max)) if min > max => Err(SampleProblem::MinAboveMax { min, max }),
        _ => Ok(()),
    }
}

/// One sample in a [`Snapshot`]: its descriptor and its value.
///
/// Deserialising one checks only its JSON shape; [`Snapshot`] checks the
/// rest (see [`Snapshot::validate`]).
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
///
/// Deserialising a snapshot (with [`from_json`](Self::from_json),
/// [`from_json_value`](Self::from_json_value) or any serde deserializer)
/// runs [`validate`](Self::validate): a snapshot read back is one a
/// registry could have produced, or an error naming the first bad sample.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSnapshot")]
pub struct Snapshot {
    /// The samples.
    pub samples: Vec<SampleValue>,
}

/// A snapshot as JSON holds it, each sample still unparsed so that a
/// malformed one can be reported by position and name.
#[derive(Deserialize)]
struct RawSnapshot {
    samples: Vec<serde_json::Value>,
}

impl TryFrom<RawSnapshot> for Snapshot {
    type Error = StamError;

    fn try_from(raw: RawSnapshot) -> Result<Self, StamError> {
        let mut samples = Vec::with_capacity(raw.samples.len());
        for (index, v) in raw.samples.into_iter().enumerate() {
            let name = v
                .get("name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let sample = SampleValue::deserialize(v).map_err(|e| StamError::InvalidSample {
                index,
                name,
                problem: SampleProblem::Malformed(e.to_string()),
            })?;
            samples.push(sample);
        }
        let snap = Self { samples };
        snap.validate()?;
        Ok(snap)
    }
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

    /// Parses and validates JSON written by [`to_json`](Self::to_json).
    ///
    /// # Errors
    /// [`StamError::JsonDecode`] if the text is not a JSON object with a
    /// `samples` array, [`StamError::InvalidSample`] for the first sample
    /// that is malformed or fails [`validate`](Self::validate).
    pub fn from_json(json: &str) -> Result<Self, StamError> {
        let raw: RawSnapshot =
            serde_json::from_str(json).map_err(|e| StamError::JsonDecode(e.to_string()))?;
        Self::try_from(raw)
    }

    /// Like [`from_json`](Self::from_json), from an already parsed JSON
    /// value (e.g. a member of a larger document).
    ///
    /// # Errors
    /// As [`from_json`](Self::from_json).
    pub fn from_json_value(json: serde_json::Value) -> Result<Self, StamError> {
        let raw: RawSnapshot =
            serde_json::from_value(json).map_err(|e| StamError::JsonDecode(e.to_string()))?;
        Self::try_from(raw)
    }

    /// Checks that every sample is one a [`Registry`](crate::Registry)
    /// could have produced:
    ///
    /// - its name follows [`validate_name`] and no earlier sample has it
    ///   (duplicates would render as duplicate Prometheus series);
    /// - its value is of the kind its type holds (`COUNTER` a counter,
    ///   `PROFILE`/`PROFILE_ADV` a profile, `RATIO_U32*` a ratio, `U*`/`X*`
    ///   an unsigned scalar that fits the type's width, `BOOL*` a boolean;
    ///   `CALLBACK` holds none);
    /// - a profile has `ticks_max`/`ticks_min` exactly when it has periods,
    ///   with `ticks_min <= ticks_max`.
    ///
    /// Units are not tied to types (as in VirtualBox, any unit goes with
    /// any type); deserialisation already rejects unknown units.
    ///
    /// # Errors
    /// [`StamError::InvalidSample`] for the first bad sample, with its
    /// index, name and [`SampleProblem`].
    pub fn validate(&self) -> Result<(), StamError> {
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(self.samples.len());
        for (index, s) in self.samples.iter().enumerate() {
            let bad = |problem| StamError::InvalidSample {
                index,
                name: s.name.clone(),
                problem,
            };
            validate_name(&s.name).map_err(|e| bad(SampleProblem::Name(Box::new(e))))?;
            if let Some(&first) = seen.get(s.name.as_str()) {
                return Err(bad(SampleProblem::Duplicate { first }));
            }
            seen.insert(&s.name, index);
            check_value(s.ty, &s.value).map_err(bad)?;
        }
        Ok(())
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
