//! The plugin's arguments (`-plugin lib.so,sw=LO-HI,far=LO-HI,apic=ADDR,out=FILE`).

use crate::machine::Ranges;

/// The physical page of the local APIC when `apic=` is not given.
pub const DEFAULT_APIC_PAGE: u64 = 0xfee0_0000;

/// What the plugin was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginArgs {
    /// The switcher's and the far side's address ranges.
    pub ranges: Ranges,
    /// Physical address of the local APIC's MMIO page.
    pub apic_page: u64,
    /// Where to write the report (QEMU's log when `None`).
    pub out: Option<String>,
}

fn number(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("`{s}` is not a number"))
}

fn range(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("`{s}` is not a range LO-HI"))?;
    let (lo, hi) = (number(lo)?, number(hi)?);
    if lo >= hi {
        return Err(format!("range `{s}` is empty"));
    }
    Ok((lo, hi))
}

/// Parses the `key=value` arguments.
///
/// # Errors
/// A message naming the argument that is unknown or malformed, or saying
/// that no `sw=` range was given.
pub fn parse<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<PluginArgs, String> {
    let mut p = PluginArgs {
        ranges: Ranges::default(),
        apic_page: DEFAULT_APIC_PAGE,
        out: None,
    };
    for a in args {
        match a.split_once('=') {
            Some(("sw", r)) => p.ranges.switcher.push(range(r)?),
            Some(("far", r)) => p.ranges.far.push(range(r)?),
            Some(("apic", n)) => p.apic_page = number(n)? & !0xfff,
            Some(("out", f)) if !f.is_empty() => p.out = Some(f.to_owned()),
            _ => {
                return Err(format!(
                    "unknown argument `{a}` (expected sw=, far=, apic=, out=)"
                ))
            }
        }
    }
    if p.ranges.switcher.is_empty() {
        return Err("no switcher range (sw=LO-HI) given".into());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_and_bad_ones_are_named() {
        let p = parse([
            "sw=0xc0400000-0xc0401000",
            "sw=4194304-4198400",
            "far=0xa0000000-0xa0100000",
            "out=/tmp/x",
        ]);
        let p = p.map_err(|e| e.to_string());
        assert_eq!(
            p.as_ref().map(|p| (
                p.ranges.switcher.len(),
                p.ranges.far.len(),
                p.apic_page,
                p.out.clone()
            )),
            Ok((2, 1, DEFAULT_APIC_PAGE, Some("/tmp/x".to_owned())))
        );
        for (bad, want) in [
            (vec!["far=1-2"], "no switcher range"),
            (vec!["sw=2-1"], "empty"),
            (vec!["sw=1"], "not a range"),
            (vec!["sw=1-x"], "`x` is not a number"),
            (vec!["sw=1-2", "what=3"], "unknown argument `what=3`"),
        ] {
            let e = parse(bad).map(|_| ());
            assert!(matches!(&e, Err(m) if m.contains(want)), "{want}: {e:?}");
        }
    }
}
