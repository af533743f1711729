//! Sample selection patterns.
//!
//! The syntax is IPRT's "simple pattern" as STAM uses it: `*` matches any run
//! of characters (zero or more, `/` included — it is not path-aware), `?`
//! matches exactly one character, everything else matches itself; there are
//! no escapes and no character classes. A pattern may hold several
//! alternatives separated by `|`; a name is selected if any alternative
//! matches. The empty pattern and `*` select everything.

/// Matches `name` against one glob alternative (no `|` handling): `*` is any
/// run of characters, `?` exactly one character, the rest literal.
///
/// ```
/// assert!(stam::glob_match("/VMM/*/To??", "/VMM/Switcher/ToGC"));
/// assert!(!stam::glob_match("/VMM/?", "/VMM/ab"));
/// ```
#[must_use]
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let pat = pattern.as_bytes();
    let txt = name.as_bytes();
    // Classic iterative matcher: remember the last `*` and where in the text
    // it started, and on a mismatch let that `*` swallow one more character.
    // `?` and backtracking always step over a whole UTF-8 character, so the
    // text position is on a character boundary whenever a wildcard is
    // considered; literal bytes are compared one by one.
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < txt.len() {
        match pat.get(p) {
            Some(b'*') => {
                p += 1;
                star = Some((p, t));
                continue;
            }
            Some(b'?') => {
                p += 1;
                t += utf8_len(txt[t]);
                continue;
            }
            Some(&c) if c == txt[t] => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                let st = st + utf8_len(txt[st]);
                star = Some((sp, st));
                p = sp;
                t = st;
            }
            None => return false,
        }
    }
    pat[p.min(pat.len())..].iter().all(|&c| c == b'*')
}

/// Length of the UTF-8 sequence introduced by `lead`.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// How a compiled pattern is evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Everything (empty pattern or `*`).
    All,
    /// One name, no wildcard: an exact lookup.
    Exact(String),
    /// `/literal*`: every name starting with the literal.
    Prefix(String),
    /// Anything else: test each name against every alternative.
    General(Vec<String>),
}

/// A compiled selection pattern.
///
/// `*` matches any run of characters (zero or more, `/` included), `?`
/// exactly one character, everything else itself; no escapes, no character
/// classes. `|` separates alternatives, any of which may match. The empty
/// pattern and `*` select everything.
///
/// ```
/// use stam::Pattern;
/// let p = Pattern::new("/VMM/*|/PROF/?M/*");
/// assert!(p.matches("/VMM/Switcher/ToGC"));
/// assert!(p.matches("/PROF/VM/SwitchToGC"));
/// assert!(!p.matches("/CPUM/Exits"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub(crate) kind: Kind,
}

impl Pattern {
    /// Compiles `pattern`. Every string is a valid pattern.
    #[must_use]
    pub fn new(pattern: &str) -> Self {
        let kind = if pattern.is_empty() || pattern == "*" {
            Kind::All
        } else if pattern.contains('|') {
            Kind::General(pattern.split('|').map(str::to_owned).collect())
        } else {
            let wild = |c: char| c == '*' || c == '?';
            match pattern.find(wild) {
                None => Kind::Exact(pattern.to_owned()),
                Some(i) if i == pattern.len() - 1 && pattern.ends_with('*') => {
                    Kind::Prefix(pattern[..i].to_owned())
                }
                Some(_) => Kind::General(vec![pattern.to_owned()]),
            }
        };
        Self { kind }
    }

    /// A pattern selecting everything.
    #[must_use]
    pub fn all() -> Self {
        Self { kind: Kind::All }
    }

    /// Whether this pattern selects every name.
    #[must_use]
    pub fn is_all(&self) -> bool {
        matches!(self.kind, Kind::All)
    }

    /// Whether `name` is selected.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        match &self.kind {
            Kind::All => true,
            Kind::Exact(n) => n == name,
            Kind::Prefix(p) => name.starts_with(p.as_str()),
            Kind::General(alts) => alts.iter().any(|a| glob_match(a, name)),
        }
    }
}

impl From<&str> for Pattern {
    fn from(p: &str) -> Self {
        Self::new(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_crosses_slashes() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "/a/b/c"));
        assert!(glob_match("/a*c", "/a/b/c"));
        assert!(glob_match("/VMM/*", "/VMM/Switcher/ToGC"));
        assert!(glob_match("*/ToGC", "/VMM/Switcher/ToGC"));
        assert!(glob_match("/a**b", "/ab"));
        assert!(!glob_match("/a*c", "/a/b/d"));
    }

    #[test]
    fn question_is_exactly_one_char() {
        assert!(glob_match("/a?c", "/abc"));
        assert!(glob_match("/a?c", "/a/c"));
        assert!(!glob_match("/a?c", "/ac"));
        assert!(!glob_match("/a?c", "/abbc"));
        assert!(glob_match("/?", "/ü"));
        assert!(!glob_match("/??", "/ü"));
        assert!(glob_match("/ü?", "/üx"));
    }

    #[test]
    fn literals_and_backtracking() {
        assert!(glob_match("/abc", "/abc"));
        assert!(!glob_match("/abc", "/abcd"));
        assert!(!glob_match("/abcd", "/abc"));
        assert!(glob_match("*aab", "/aaaab"));
        assert!(glob_match("*a*b*c", "/xaxxbxxxc"));
        assert!(!glob_match("*a*b*c", "/xaxxcxxxb"));
        assert!(glob_match("/*ü*", "/aüb"));
        assert!(!glob_match("", "/a"));
        assert!(glob_match("", ""));
    }

    #[test]
    fn alternatives() {
        let p = Pattern::new("/VMM/*|/PROF/VM/SwitchToGC|/CPUM/?");
        assert!(p.matches("/VMM/Switcher/ToGC"));
        assert!(p.matches("/PROF/VM/SwitchToGC"));
        assert!(p.matches("/CPUM/x"));
        assert!(!p.matches("/CPUM/xy"));
        assert!(!p.matches("/PROF/VM/SwitchToGCx"));
        // An empty alternative matches nothing (names are never empty).
        let p = Pattern::new("/a||/b");
        assert!(p.matches("/a") && p.matches("/b") && !p.matches("/c"));
    }

    #[test]
    fn compiled_kinds() {
        assert!(Pattern::new("").is_all());
        assert!(Pattern::new("*").is_all());
        assert!(Pattern::all().matches("/anything"));
        assert_eq!(Pattern::new("/a/b").kind, Kind::Exact("/a/b".into()));
        assert_eq!(Pattern::new("/a/*").kind, Kind::Prefix("/a/".into()));
        assert!(matches!(Pattern::new("/a/*b").kind, Kind::General(_)));
        assert!(matches!(Pattern::new("*|/a").kind, Kind::General(_)));
        assert!(Pattern::new("/a*").matches("/a-b"));
        assert!(Pattern::new("/a*").matches("/a/b"));
        assert!(!Pattern::new("/a*").matches("/b"));
        assert!(!Pattern::new("/a/b").matches("/a/bc"));
        assert!(Pattern::from("**").matches("/z"));
    }
}
