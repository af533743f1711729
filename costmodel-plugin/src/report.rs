//! The plugin's report: one line per distinct round trip, written at exit,
//! and its reader.
//!
//! ```text
//! costmodel/1 trips=200
//! trip count=50 kind=no_sync to_gc.instructions=144 to_gc.cr0_write=2 … to_hc.apic_mmio_write=3
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::class::Class;
use crate::machine::{Counts, Direction, Trip, TripKind};

/// The first word of a report.
pub const MAGIC: &str = "costmodel/1";

/// Renders the distinct trips of a tally.
pub fn render(trips: &BTreeMap<Trip, u64>) -> String {
    let total: u64 = trips.values().sum();
    let mut out = format!("{MAGIC} trips={total}\n");
    let mut sorted: Vec<(&Trip, &u64)> = trips.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (trip, n) in sorted {
        let _ = write!(out, "trip count={n} kind={}", trip.kind().name());
        for d in Direction::ALL {
            let c = trip.dir(d);
            let _ = write!(out, " {}.instructions={}", d.name(), c.instructions);
            for class in Class::ALL {
                let _ = write!(out, " {}.{}={}", d.name(), class.name(), c.get(class));
            }
        }
        out.push('\n');
    }
    out
}

/// A report that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cost report line {}: {}", self.line, self.what)
    }
}

impl std::error::Error for ParseError {}

/// A parsed report: each distinct trip with its count, most frequent first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Round trips recorded.
    pub total: u64,
    /// `(count, trip)`, most frequent first.
    pub trips: Vec<(u64, Trip)>,
}

impl Report {
    /// Reads a report written by [`render`].
    ///
    /// # Errors
    /// A [`ParseError`] naming the line and the field that is missing,
    /// unknown, repeated or not a number, or a total that differs from the
    /// sum of the counts.
    pub fn parse(text: &str) -> Result<Report, ParseError> {
        let mut lines = text.lines().enumerate();
        let err = |line: usize, what: String| ParseError {
            line: line + 1,
            what,
        };
        let (_, head) = lines.next().ok_or_else(|| err(0, "empty report".into()))?;
        let total = head
            .strip_prefix(MAGIC)
            .and_then(|r| r.trim().strip_prefix("trips="))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| err(0, format!("expected `{MAGIC} trips=N`, found `{head}`")))?;
        let mut trips = Vec::new();
        for (no, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let (count, trip) = parse_trip(line).map_err(|what| err(no, what))?;
            trips.push((count, trip));
        }
        let sum: u64 = trips.iter().map(|t| t.0).sum();
        if sum != total {
            return Err(err(
                0,
                format!("trips={total} but the trip lines count {sum}"),
            ));
        }
        trips.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        Ok(Report { total, trips })
    }

    /// The most frequent trip of `kind` with its count.
    pub fn typical(&self, kind: TripKind) -> Option<(u64, &Trip)> {
        self.trips
            .iter()
            .find(|(_, t)| t.kind() == kind)
            .map(|(n, t)| (*n, t))
    }
}

fn parse_trip(line: &str) -> Result<(u64, Trip), String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("trip") {
        return Err(format!("expected a `trip` line, found `{line}`"));
    }
    let mut count = None;
    let mut kind = None;
    let mut trip = Trip::default();
    let mut seen = std::collections::BTreeSet::new();
    for w in words {
        let (key, value) = w
            .split_once('=')
            .ok_or_else(|| format!("`{w}` is not key=value"))?;
        if !seen.insert(key) {
            return Err(format!("`{key}` given twice"));
        }
        if key == "kind" {
            kind =
                Some(TripKind::from_name(value).ok_or_else(|| format!("unknown kind `{value}`"))?);
            continue;
        }
        let n: u64 = value
            .parse()
            .map_err(|_| format!("`{key}={value}` is not a number"))?;
        if key == "count" {
            count = Some(n);
            continue;
        }
        let (dir, name) = key
            .split_once('.')
            .ok_or_else(|| format!("unknown field `{key}`"))?;
        let d = Direction::ALL
            .into_iter()
            .find(|d| d.name() == dir)
            .ok_or_else(|| format!("unknown direction `{dir}`"))?;
        let counts: &mut Counts = &mut trip.dirs[d as usize];
        if name == "instructions" {
            counts.instructions = n;
        } else {
            let c = Class::from_name(name).ok_or_else(|| format!("unknown class `{name}`"))?;
            counts.classes[c.index()] = n;
        }
    }
    // Every field must be there: 2 + 2 × (1 + classes).
    let want = 2 + 2 * (1 + Class::ALL.len());
    if seen.len() != want {
        return Err(format!("{} fields, expected {want}", seen.len()));
    }
    let count = count.ok_or("no count")?;
    if kind != Some(trip.kind()) {
        return Err(format!(
            "kind {} does not match the trip's counts ({})",
            kind.map_or("?", TripKind::name),
            trip.kind().name()
        ));
    }
    Ok((count, trip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<Trip, u64> {
        let mut a = Trip::default();
        a.dirs[0].instructions = 144;
        a.dirs[0].classes[Class::Cr0Write.index()] = 2;
        a.dirs[1].classes[Class::ApicMmioWrite.index()] = 3;
        let mut b = a;
        b.dirs[0].classes[Class::Fxrstor.index()] = 1;
        BTreeMap::from([(a, 7), (b, 9)])
    }

    #[test]
    fn render_then_parse_gives_the_trips_back() {
        let text = render(&sample());
        let r = Report::parse(&text).map_err(|e| e.to_string());
        let r = r.as_ref().map(|r| (r.total, r.trips.len()));
        assert_eq!(r, Ok((16, 2)));
        let r = Report::parse(&text).unwrap_or_default();
        let fpu = r.typical(TripKind::FpuSync);
        let fpu = fpu.map(|(n, t)| (n, t.dir(Direction::ToGc).get(Class::Fxrstor)));
        assert_eq!(fpu, Some((9, 1)));
        assert_eq!(r.typical(TripKind::NoSync).map(|t| t.0), Some(7));
        assert!(r.typical(TripKind::DebugSync).is_none());
    }

    #[test]
    fn damaged_reports_are_refused_with_the_line() {
        let text = render(&sample());
        let bad = [
            ("", "empty report"),
            ("costmodel/2 trips=1\n", "expected `costmodel/1"),
            (&text.replace("trips=16", "trips=17"), "trip lines count 16"),
            (&text.replace("count=7", "count=x"), "not a number"),
            (
                &text.replace("to_gc.iret=0", "to_gc.iretx=0"),
                "unknown class",
            ),
            (&text.replace(" to_hc.iret=0", ""), "fields, expected"),
            (
                &text.replace("kind=no_sync", "kind=debug_sync"),
                "does not match",
            ),
        ];
        for (t, want) in bad {
            let e = Report::parse(t).map(|_| ()).map_err(|e| e.to_string());
            assert!(matches!(&e, Err(m) if m.contains(want)), "{want}: {e:?}");
        }
    }
}
