//! Property tests: the pattern matcher against a plain reference, and the
//! registry against arbitrary names.

use proptest::prelude::*;
use stam::{
    cmp_names, glob_match, validate_name, BackingMut, Pattern, Registry, SampleDef, StamError,
    StamProfile, StamType, StamUnit, MAX_NAME_LEN,
};

/// Reference glob: recursion over characters, exponential but obviously
/// right.
fn reference_glob(p: &[char], t: &[char]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some(('*', rest)) => (0..=t.len()).any(|i| reference_glob(rest, &t[i..])),
        Some(('?', rest)) => !t.is_empty() && reference_glob(rest, &t[1..]),
        Some((c, rest)) => t.first() == Some(c) && reference_glob(rest, &t[1..]),
    }
}

fn reference_pattern(pattern: &str, name: &str) -> bool {
    if pattern.is_empty() || pattern == "*" {
        return true;
    }
    let t: Vec<char> = name.chars().collect();
    pattern.split('|').any(|alt| {
        let p: Vec<char> = alt.chars().collect();
        reference_glob(&p, &t)
    })
}

fn name_strategy() -> impl Strategy<Value = String> {
    "[/ab\u{fc}-]{0,10}"
}

fn pattern_strategy() -> impl Strategy<Value = String> {
    "[/ab\u{fc}*?|-]{0,8}"
}

/// Reference of the naming rules, as a plain predicate.
fn reference_valid(name: &str) -> bool {
    name.starts_with('/')
        && name.len() <= MAX_NAME_LEN
        && !name.contains('\\')
        && !name.contains("//")
        && !name.ends_with('/')
}

proptest! {
    #[test]
    fn glob_matches_reference(p in "[/ab\u{fc}*?]{0,8}", t in name_strategy()) {
        let pc: Vec<char> = p.chars().collect();
        let tc: Vec<char> = t.chars().collect();
        prop_assert_eq!(glob_match(&p, &t), reference_glob(&pc, &tc), "pattern {:?} name {:?}", p, t);
    }

    #[test]
    fn pattern_matches_reference(p in pattern_strategy(), t in name_strategy()) {
        prop_assert_eq!(Pattern::new(&p).matches(&t), reference_pattern(&p, &t), "pattern {:?} name {:?}", p, t);
    }

    #[test]
    fn registration_never_panics(names in prop::collection::vec(any::<String>(), 0..20),
                                 tricky in prop::collection::vec("[/a\\\\]{0,6}", 0..20)) {
        let mut reg = Registry::new();
        let mut ok = 0usize;
        for n in names.iter().chain(&tricky) {
            let res = reg.register_owned(SampleDef::new(n, StamType::Counter, StamUnit::Count));
            match res {
                Ok(_) => {
                    prop_assert!(reference_valid(n));
                    ok += 1;
                }
                Err(StamError::Duplicate { name }) => {
                    prop_assert_eq!(&name, n);
                    prop_assert!(reg.find(n).is_some());
                }
                Err(e) => {
                    prop_assert!(!reference_valid(n), "{n:?} rejected: {e}");
                    prop_assert_eq!(validate_name(n), Err(e));
                }
            }
        }
        prop_assert_eq!(reg.len(), ok);
    }

    #[test]
    fn selection_is_sorted_and_exact(names in prop::collection::btree_set("(/[ab-]{1,3}){1,3}", 0..24),
                                     p in pattern_strategy()) {
        let mut reg = Registry::new();
        for n in &names {
            reg.register_owned(SampleDef::new(n, StamType::Counter, StamUnit::Count))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let got: Vec<&str> = reg.iter(&p).map(|i| i.name).collect();
        let mut want: Vec<&str> = names.iter().map(String::as_str).filter(|n| reference_pattern(&p, n)).collect();
        want.sort_by(|a, b| cmp_names(a, b));
        prop_assert_eq!(&got, &want);
        // Reset selects the same set.
        let n = reg.reset(&p, &mut BackingMut::new()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(n, want.len());
    }

    #[test]
    fn profile_matches_model(periods in prop::collection::vec(any::<u32>(), 0..50)) {
        let mut p = StamProfile::new();
        for &t in &periods {
            p.add_period(u64::from(t));
        }
        prop_assert_eq!(p.periods, periods.len() as u64);
        prop_assert_eq!(p.ticks, periods.iter().map(|&t| u64::from(t)).sum::<u64>());
        prop_assert_eq!(p.ticks_max, periods.iter().map(|&t| u64::from(t)).max().unwrap_or(0));
        prop_assert_eq!(p.ticks_min, periods.iter().map(|&t| u64::from(t)).min().unwrap_or(u64::MAX));
    }
}
