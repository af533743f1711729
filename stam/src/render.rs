//! Text renderers: the VirtualBox print layout, the VirtualBox XML snapshot
//! and the Prometheus text exposition format. The layouts are described in
//! the crate documentation (*Output formats*).
//!
//! Numbers and padding are formatted by hand rather than through
//! `core::fmt`: width padding dominates the cost of these renderers.

use crate::snapshot::Value;
use crate::types::{StamType, StamUnit, StamVisibility};

/// One sample to render, borrowed from a registry or a snapshot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Row<'a> {
    pub(crate) name: &'a str,
    pub(crate) ty: StamType,
    pub(crate) unit: StamUnit,
    pub(crate) visibility: StamVisibility,
    pub(crate) description: Option<&'a str>,
    pub(crate) value: Value,
}

impl Row<'_> {
    /// Print and XML skip `USED` samples whose value is zero.
    fn hidden(&self) -> bool {
        self.visibility == StamVisibility::Used && self.value.is_zero()
    }
}

// ---------------------------------------------------------------------------
// Number formatting.

/// Decimal digits of `v`, right-aligned in a stack buffer.
fn dec(v: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    core::str::from_utf8(&buf[i..]).unwrap_or("")
}

/// Lower-case hexadecimal digits of `v`, no prefix.
fn hex(v: u64, buf: &mut [u8; 20]) -> &str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = DIGITS[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    core::str::from_utf8(&buf[i..]).unwrap_or("")
}

fn pad(out: &mut String, n: usize) {
    const SPACES: &str = "                                ";
    let mut n = n;
    while n > 0 {
        let k = n.min(SPACES.len());
        out.push_str(&SPACES[..k]);
        n -= k;
    }
}

/// `%-<width>s`: `s` then spaces up to `width` characters.
fn push_left(out: &mut String, s: &str, width: usize) {
    out.push_str(s);
    let len = if s.is_ascii() {
        s.len()
    } else {
        s.chars().count()
    };
    pad(out, width.saturating_sub(len));
}

/// `%<width>s` for an ASCII string: spaces, then `s`.
fn push_right(out: &mut String, s: &str, width: usize) {
    pad(out, width.saturating_sub(s.len()));
    out.push_str(s);
}

/// `%<width>llu`.
fn push_u(out: &mut String, v: u64, width: usize) {
    let mut buf = [0u8; 20];
    push_right(out, dec(v, &mut buf), width);
}

/// `%<width>lld` of the bits of `v` (so `u64::MAX` shows as `-1`, as the
/// signed C formats do).
fn push_i(out: &mut String, v: u64, width: usize) {
    let mut buf = [0u8; 20];
    let signed = v as i64;
    if signed < 0 {
        let digits = dec(signed.unsigned_abs(), &mut buf);
        pad(out, width.saturating_sub(digits.len() + 1));
        out.push('-');
        out.push_str(digits);
    } else {
        push_right(out, dec(v, &mut buf), width);
    }
}

/// `%<width>llu` of a value that may be absent, shown as `-`.
fn push_opt(out: &mut String, v: Option<u64>, width: usize) {
    match v {
        Some(v) => push_u(out, v, width),
        None => push_right(out, ABSENT, width),
    }
}

/// How print shows a value that does not exist (a profile's extremes
/// before its first period).
const ABSENT: &str = "-";

/// `%<width>llx`.
fn push_x(out: &mut String, v: u64, width: usize) {
    let mut buf = [0u8; 20];
    push_right(out, hex(v, &mut buf), width);
}

// ---------------------------------------------------------------------------
// Print layout.

/// Renders the VirtualBox print layout (`STAMR3Print`, `.stats`).
pub(crate) fn print<'a>(rows: impl Iterator<Item = Row<'a>>) -> String {
    let mut out = String::with_capacity(reserve(&rows, 160));
    for row in rows.filter(|r| !r.hidden()) {
        print_row(&mut out, &row);
    }
    out
}

/// Bytes to reserve for `per_row` bytes a row. Generous on purpose: pages
/// never written are never faulted in, while growing the string copies
/// everything written so far.
fn reserve<I: Iterator>(rows: &I, per_row: usize) -> usize {
    let (lo, hi) = rows.size_hint();
    hi.unwrap_or(lo).saturating_mul(per_row).saturating_add(256)
}

fn print_row(out: &mut String, row: &Row<'_>) {
    let unit = row.unit.as_str();
    push_left(out, row.name, 32);
    out.push(' ');
    match row.value {
        Value::Counter { c } => push_u(out, c, 8),
        Value::Profile {
            periods,
            ticks,
            ticks_max,
            ticks_min,
        } => {
            push_u(out, ticks / periods.max(1), 8);
            out.push(' ');
            out.push_str(unit);
            out.push_str(" (");
            push_u(out, ticks, 12);
            out.push(' ');
            out.push_str(row.unit.unit1());
            out.push_str(", ");
            push_u(out, periods, 7);
            out.push(' ');
            out.push_str(row.unit.unit2());
            out.push_str(", max ");
            push_opt(out, ticks_max, 9);
            out.push_str(", min ");
            push_opt(out, ticks_min, 7);
            out.push_str(")\n");
            return;
        }
        Value::Ratio { a, b } => {
            push_u(out, u64::from(a), 8);
            out.push(':');
            let mut buf = [0u8; 20];
            push_left(out, dec(u64::from(b), &mut buf), 8);
        }
        Value::Unsigned(v) if row.ty.is_hex() => push_x(out, v, 8),
        Value::Unsigned(v) => push_u(out, v, 8),
        Value::Bool(v) => out.push_str(if v { "true    " } else { "false   " }),
    }
    out.push(' ');
    out.push_str(unit);
    out.push('\n');
}

// ---------------------------------------------------------------------------
// XML snapshot.

/// Appends `s` with `& < > " '` replaced by entities.
fn push_xml_escaped(out: &mut String, s: &str) {
    let mut rest = s;
    while let Some(i) = rest
        .bytes()
        .position(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\''))
    {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            _ => "&apos;",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// The XML declaration that opens a snapshot.
pub(crate) const XML_DECL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n";

/// Renders the VirtualBox XML snapshot (`STAMR3Snapshot`).
pub(crate) fn xml<'a>(rows: impl Iterator<Item = Row<'a>>, with_desc: bool) -> String {
    let mut out = String::with_capacity(reserve(&rows, if with_desc { 256 } else { 192 }));
    out.push_str(XML_DECL);
    out.push_str("<Statistics>\n");
    for row in rows.filter(|r| !r.hidden()) {
        xml_row(&mut out, &row, with_desc);
    }
    out.push_str("</Statistics>\n");
    out
}

fn xml_row(out: &mut String, row: &Row<'_>, with_desc: bool) {
    match row.value {
        Value::Counter { c } => {
            out.push_str("<Counter c=\"");
            push_i(out, c, 0);
        }
        Value::Profile {
            periods,
            ticks,
            ticks_max,
            ticks_min,
        } => {
            out.push_str("<Profile cPeriods=\"");
            push_i(out, periods, 0);
            out.push_str("\" cTicks=\"");
            push_i(out, ticks, 0);
            // Extremes that do not exist yet are left out, not invented.
            if let Some(min) = ticks_min {
                out.push_str("\" cTicksMin=\"");
                push_i(out, min, 0);
            }
            if let Some(max) = ticks_max {
                out.push_str("\" cTicksMax=\"");
                push_i(out, max, 0);
            }
        }
        Value::Ratio { a, b } => {
            out.push_str("<Ratio32 u32A=\"");
            push_u(out, u64::from(a), 0);
            out.push_str("\" u32B=\"");
            push_u(out, u64::from(b), 0);
        }
        Value::Unsigned(v) => {
            // A snapshot read back from JSON could pair a scalar value with a
            // non-scalar type; fall back to a 64-bit element then.
            let (tag, is_hex) = if row.ty.is_unsigned_scalar() {
                (row.ty.xml_tag(), row.ty.is_hex())
            } else {
                ("U64", false)
            };
            out.push('<');
            out.push_str(tag);
            out.push_str(" val=\"");
            if is_hex {
                out.push_str("0x");
                push_x(out, v, 0);
            } else {
                push_u(out, v, 0);
            }
        }
        Value::Bool(v) => {
            out.push_str("<BOOL val=\"");
            out.push_str(if v { "true" } else { "false" });
        }
    }
    out.push_str("\" unit=\"");
    out.push_str(row.unit.as_str());
    out.push('"');
    match row.visibility {
        StamVisibility::Always => {}
        StamVisibility::Used => out.push_str(" vis=\"used\""),
        StamVisibility::NotGui => out.push_str(" vis=\"not-gui\""),
    }
    out.push_str(" name=\"");
    push_xml_escaped(out, row.name);
    out.push('"');
    if let (true, Some(desc)) = (with_desc, row.description) {
        out.push_str(" desc=\"");
        push_xml_escaped(out, desc);
        out.push('"');
    }
    out.push_str("/>\n");
}

// ---------------------------------------------------------------------------
// JSON.

/// Appends `s` as a JSON string, quotes included, escaped exactly as
/// `serde_json` escapes (`"`, `\`, `\b \f \n \r \t`, other control
/// characters as `\u00xx`; everything else, non-ASCII included, as is).
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut rest = s;
    while let Some(i) = rest
        .bytes()
        .position(|b| b < 0x20 || b == b'"' || b == b'\\')
    {
        out.push_str(&rest[..i]);
        let b = rest.as_bytes()[i];
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ => {
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(DIGITS[usize::from(b >> 4)]));
                out.push(char::from(DIGITS[usize::from(b & 0xf)]));
            }
        }
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

fn push_json_opt(out: &mut String, v: Option<u64>) {
    match v {
        Some(v) => push_u(out, v, 0),
        None => out.push_str("null"),
    }
}

/// Renders the selected samples as the JSON of a [`Snapshot`]
/// (`crate::Snapshot`), byte for byte what `serde_json` writes for it, but
/// straight from the rows: no owned snapshot, no per-sample allocation.
pub(crate) fn json<'a>(rows: impl Iterator<Item = Row<'a>>) -> String {
    let mut out = String::with_capacity(reserve(&rows, 224));
    let mut heads = Heads::default();
    out.push_str("{\"samples\":[");
    let mut first = true;
    for row in rows {
        if !first {
            out.push(',');
        }
        first = false;
        json_row(&mut out, &row, &mut heads);
    }
    out.push_str("]}");
    out
}

/// The `,"type":…,"unit":…,"visibility":…` part of a JSON row for each
/// (type, unit, visibility) seen, written once per rendering.
#[derive(Default)]
struct Heads(Vec<Option<String>>);

impl Heads {
    const UNITS: usize = StamUnit::ALL.len();
    const VIS: usize = 3;

    fn get(&mut self, ty: StamType, unit: StamUnit, vis: StamVisibility) -> &str {
        if self.0.is_empty() {
            self.0 = vec![None; (StamType::ALL.len() + 1) * (Self::UNITS + 1) * (Self::VIS + 1)];
        }
        let i = (ty.raw() as usize * (Self::UNITS + 1) + unit.raw() as usize) * (Self::VIS + 1)
            + vis.raw() as usize;
        let last = self.0.len() - 1;
        let slot = &mut self.0[i.min(last)];
        slot.get_or_insert_with(|| {
            let mut h = String::with_capacity(64);
            h.push_str(",\"type\":\"");
            h.push_str(ty.serde_name());
            h.push_str("\",\"unit\":\"");
            h.push_str(unit.serde_name());
            h.push_str("\",\"visibility\":\"");
            h.push_str(vis.serde_name());
            h.push('"');
            h
        })
    }
}

fn json_row(out: &mut String, row: &Row<'_>, heads: &mut Heads) {
    out.push_str("{\"name\":");
    push_json_str(out, row.name);
    out.push_str(heads.get(row.ty, row.unit, row.visibility));
    if let Some(desc) = row.description {
        out.push_str(",\"description\":");
        push_json_str(out, desc);
    }
    match row.value {
        Value::Counter { c } => {
            out.push_str(",\"value\":{\"counter\":{\"c\":");
            push_u(out, c, 0);
            out.push_str("}}}");
        }
        Value::Profile {
            periods,
            ticks,
            ticks_max,
            ticks_min,
        } => {
            out.push_str(",\"value\":{\"profile\":{\"periods\":");
            push_u(out, periods, 0);
            out.push_str(",\"ticks\":");
            push_u(out, ticks, 0);
            out.push_str(",\"ticks_max\":");
            push_json_opt(out, ticks_max);
            out.push_str(",\"ticks_min\":");
            push_json_opt(out, ticks_min);
            out.push_str("}}}");
        }
        Value::Ratio { a, b } => {
            out.push_str(",\"value\":{\"ratio\":{\"a\":");
            push_u(out, u64::from(a), 0);
            out.push_str(",\"b\":");
            push_u(out, u64::from(b), 0);
            out.push_str("}}}");
        }
        Value::Unsigned(v) => {
            out.push_str(",\"value\":{\"unsigned\":");
            push_u(out, v, 0);
            out.push_str("}}");
        }
        Value::Bool(v) => {
            out.push_str(if v {
                ",\"value\":{\"bool\":true}}"
            } else {
                ",\"value\":{\"bool\":false}}"
            });
        }
    }
}

// ---------------------------------------------------------------------------
// Prometheus.

/// Appends a label value with `\`, `"` and newline escaped.
fn push_label_escaped(out: &mut String, s: &str) {
    let mut rest = s;
    while let Some(i) = rest.bytes().position(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// One metric family: its name, type, help text and how to get a row's
/// value (`None`: the row has no series in this family).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&Value) -> Option<u64>,
}

const FAMILIES: [Family; 8] = [
    Family {
        name: "stam_counter_total",
        kind: "counter",
        help: "STAM counter samples (COUNTER).",
        value: |v| match *v {
            Value::Counter { c } => Some(c),
            _ => None,
        },
    },
    Family {
        name: "stam_profile_periods_total",
        kind: "counter",
        help: "Periods recorded by STAM profile samples (PROFILE, PROFILE_ADV).",
        value: |v| match *v {
            Value::Profile { periods, .. } => Some(periods),
            _ => None,
        },
    },
    Family {
        name: "stam_profile_ticks_total",
        kind: "counter",
        help:
            "Sum of the period lengths of STAM profile samples, in the numerator of the unit label.",
        value: |v| match *v {
            Value::Profile { ticks, .. } => Some(ticks),
            _ => None,
        },
    },
    Family {
        name: "stam_profile_ticks_max",
        kind: "gauge",
        help: "Longest period of a STAM profile sample (absent before the first period).",
        value: |v| match *v {
            Value::Profile { ticks_max, .. } => ticks_max,
            _ => None,
        },
    },
    Family {
        name: "stam_profile_ticks_min",
        kind: "gauge",
        help: "Shortest period of a STAM profile sample (absent before the first period).",
        value: |v| match *v {
            Value::Profile { ticks_min, .. } => ticks_min,
            _ => None,
        },
    },
    Family {
        name: "stam_ratio_a",
        kind: "gauge",
        help: "Numerator of STAM ratio samples (RATIO_U32, RATIO_U32_RESET).",
        value: |v| match *v {
            Value::Ratio { a, .. } => Some(u64::from(a)),
            _ => None,
        },
    },
    Family {
        name: "stam_ratio_b",
        kind: "gauge",
        help: "Denominator of STAM ratio samples (RATIO_U32, RATIO_U32_RESET).",
        value: |v| match *v {
            Value::Ratio { b, .. } => Some(u64::from(b)),
            _ => None,
        },
    },
    Family {
        name: "stam_value",
        kind: "gauge",
        help: "STAM scalar samples (U8 to X64, with and without _RESET; BOOL as 0 or 1).",
        value: |v| match *v {
            Value::Unsigned(x) => Some(x),
            Value::Bool(b) => Some(u64::from(b)),
            _ => None,
        },
    },
];

/// Renders the Prometheus text exposition format, version 0.0.4.
///
/// One pass over the rows escapes each row's label set once (a profile
/// appears in four families) and sorts its values into the families; then
/// each family is written from its list.
pub(crate) fn prometheus<'a>(rows: impl Iterator<Item = Row<'a>>) -> String {
    let (lo, hi) = rows.size_hint();
    let n = hi.unwrap_or(lo);
    // `{path="…",unit="…"} ` of every row, back to back.
    let mut labels = String::with_capacity(n.saturating_mul(64));
    let mut label_end: Vec<usize> = Vec::with_capacity(n);
    let mut series: [Vec<(u32, u64)>; FAMILIES.len()] = Default::default();
    for (i, row) in rows.enumerate() {
        let Ok(idx) = u32::try_from(i) else { break };
        labels.push_str("{path=\"");
        push_label_escaped(&mut labels, row.name);
        labels.push_str("\",unit=\"");
        push_label_escaped(&mut labels, row.unit.as_str());
        labels.push_str("\"} ");
        label_end.push(labels.len());
        for (fam, list) in FAMILIES.iter().zip(series.iter_mut()) {
            if let Some(v) = (fam.value)(&row.value) {
                list.push((idx, v));
            }
        }
    }
    let total: usize = series.iter().map(Vec::len).sum();
    let mut out = String::with_capacity(
        labels
            .len()
            .saturating_mul(2)
            .saturating_add(total.saturating_mul(48)),
    );
    for (fam, list) in FAMILIES.iter().zip(&series) {
        if list.is_empty() {
            continue;
        }
        out.push_str("# HELP ");
        out.push_str(fam.name);
        out.push(' ');
        out.push_str(fam.help);
        out.push_str("\n# TYPE ");
        out.push_str(fam.name);
        out.push(' ');
        out.push_str(fam.kind);
        out.push('\n');
        for &(idx, v) in list {
            let i = idx as usize;
            let start = if i == 0 { 0 } else { label_end[i - 1] };
            out.push_str(fam.name);
            out.push_str(&labels[start..label_end[i]]);
            push_u(&mut out, v, 0);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, ty: StamType, unit: StamUnit, value: Value) -> Row<'_> {
        Row {
            name,
            ty,
            unit,
            visibility: StamVisibility::Always,
            description: None,
            value,
        }
    }

    #[test]
    fn number_helpers() {
        let mut s = String::new();
        push_u(&mut s, 0, 3);
        push_u(&mut s, 12345, 3);
        push_i(&mut s, u64::MAX, 4);
        push_i(&mut s, 7, 0);
        push_x(&mut s, 0xbeef, 6);
        push_i(&mut s, i64::MIN as u64, 0);
        assert_eq!(s, "  012345  -17  beef-9223372036854775808");
        let mut buf = [0u8; 20];
        assert_eq!(dec(u64::MAX, &mut buf), "18446744073709551615");
        assert_eq!(hex(u64::MAX, &mut buf), "ffffffffffffffff");
        let mut s = String::new();
        push_left(&mut s, "ü", 3);
        assert_eq!(s, "ü  ");
    }

    #[test]
    fn xml_escaping() {
        let mut s = String::new();
        push_xml_escaped(&mut s, "a&b<c>d\"e'f");
        assert_eq!(s, "a&amp;b&lt;c&gt;d&quot;e&apos;f");
        let mut s = String::new();
        push_label_escaped(&mut s, "a\\b\"c\nd");
        assert_eq!(s, "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn json_is_what_serde_json_writes_for_the_snapshot() {
        use crate::snapshot::{SampleValue, Snapshot};
        let mut samples = Vec::new();
        let values = [
            Value::Counter { c: u64::MAX },
            Value::Profile {
                periods: 3,
                ticks: 99,
                ticks_max: Some(50),
                ticks_min: None,
            },
            Value::Ratio { a: 1, b: u32::MAX },
            Value::Unsigned(0),
            Value::Bool(true),
        ];
        let names = [
            "/a",
            "/q\"uote\\back",
            "/ctl\u{1}\u{8}\u{c}\n\r\t\u{1f}\u{7f}",
            "/ünï",
        ];
        for (i, ty) in StamType::ALL.into_iter().enumerate() {
            for unit in StamUnit::ALL {
                samples.push(SampleValue {
                    name: format!("{}{i}{}", names[i % names.len()], unit.raw()),
                    ty,
                    unit,
                    visibility: [
                        StamVisibility::Always,
                        StamVisibility::Used,
                        StamVisibility::NotGui,
                    ][i % 3],
                    description: (i % 2 == 0).then(|| names[(i + 1) % names.len()].to_owned()),
                    value: values[i % values.len()],
                });
            }
        }
        let rows = samples.iter().map(|s| Row {
            name: &s.name,
            ty: s.ty,
            unit: s.unit,
            visibility: s.visibility,
            description: s.description.as_deref(),
            value: s.value,
        });
        let ours = json(rows);
        let serde = Snapshot { samples }.to_json().unwrap_or_default();
        assert_eq!(ours, serde);
        assert_eq!(json(core::iter::empty()), "{\"samples\":[]}");
    }

    #[test]
    fn inconsistent_rows_do_not_panic() {
        // A JSON snapshot may pair any type with any value.
        let rows = [
            row("/a", StamType::Counter, StamUnit::None, Value::Unsigned(5)),
            row("/b", StamType::U8, StamUnit::None, Value::Counter { c: 1 }),
        ];
        assert_eq!(
            xml(rows.iter().copied(), false),
            format!(
                "{XML_DECL}<Statistics>\n<U64 val=\"5\" unit=\"\" name=\"/a\"/>\n\
                 <Counter c=\"1\" unit=\"\" name=\"/b\"/>\n</Statistics>\n"
            )
        );
        assert!(!print(rows.iter().copied()).is_empty());
        assert!(!prometheus(rows.iter().copied()).is_empty());
    }
}
