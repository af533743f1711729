//! Sample name rules and name ordering.

use core::cmp::Ordering;

use crate::error::StamError;

/// Longest accepted sample name, in bytes (UTF-8).
pub const MAX_NAME_LEN: usize = 239;

/// Checks a sample name against STAM's rules: it starts with `/`, is at most
/// [`MAX_NAME_LEN`] bytes, has no `\`, no empty component (`//`) and no
/// trailing `/`. Each violation is its own [`StamError`] variant, checked in
/// that order.
///
/// ```
/// use stam::{validate_name, StamError};
/// assert!(validate_name("/VMM/Switcher/ToGC").is_ok());
/// assert!(matches!(validate_name("/VMM//ToGC"), Err(StamError::EmptyComponent { .. })));
/// ```
pub fn validate_name(name: &str) -> Result<(), StamError> {
    if !name.starts_with('/') {
        return Err(StamError::NoLeadingSlash { name: name.into() });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StamError::NameTooLong {
            name: name.into(),
            len: name.len(),
        });
    }
    if name.contains('\\') {
        return Err(StamError::Backslash { name: name.into() });
    }
    if name.contains("//") {
        return Err(StamError::EmptyComponent { name: name.into() });
    }
    if name.ends_with('/') {
        return Err(StamError::TrailingSlash { name: name.into() });
    }
    Ok(())
}

/// Compares two names the way the sample tree orders them: component by
/// component, i.e. bytewise with `/` sorting before every other byte. All
/// samples below a node therefore come out together, directly after the
/// node itself (`/a`, `/a/x`, `/a-b`, `/ab`), which plain string order
/// would not give (`-` sorts before `/`).
#[must_use]
pub fn cmp_names(a: &str, b: &str) -> Ordering {
    fn key(b: u8) -> u16 {
        if b == b'/' {
            0
        } else {
            u16::from(b) + 1
        }
    }
    a.bytes().map(key).cmp(b.bytes().map(key))
}

/// A name as a `BTreeMap` key ordered by [`cmp_names`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NameKey(pub(crate) Box<str>);

impl Ord for NameKey {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_names(&self.0, &other.0)
    }
}

impl PartialOrd for NameKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for n in [
            "/a",
            "/VMM/Switcher/ToGC",
            "/PROF/VM/SwitchToGC",
            "/x y/ü/0",
        ] {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
        let longest = format!("/{}", "a".repeat(MAX_NAME_LEN - 1));
        assert_eq!(validate_name(&longest), Ok(()));
    }

    #[test]
    fn every_rule_has_its_error() {
        assert_eq!(
            validate_name(""),
            Err(StamError::NoLeadingSlash { name: "".into() })
        );
        assert_eq!(
            validate_name("VMM/x"),
            Err(StamError::NoLeadingSlash {
                name: "VMM/x".into()
            })
        );
        let long = format!("/{}", "a".repeat(MAX_NAME_LEN));
        assert_eq!(
            validate_name(&long),
            Err(StamError::NameTooLong {
                name: long.clone(),
                len: MAX_NAME_LEN + 1
            })
        );
        assert_eq!(
            validate_name("/a\\b"),
            Err(StamError::Backslash {
                name: "/a\\b".into()
            })
        );
        assert_eq!(
            validate_name("/a//b"),
            Err(StamError::EmptyComponent {
                name: "/a//b".into()
            })
        );
        assert_eq!(
            validate_name("//a"),
            Err(StamError::EmptyComponent { name: "//a".into() })
        );
        assert_eq!(
            validate_name("/a/"),
            Err(StamError::TrailingSlash { name: "/a/".into() })
        );
        assert_eq!(
            validate_name("/"),
            Err(StamError::TrailingSlash { name: "/".into() })
        );
    }

    #[test]
    fn error_messages_name_the_culprit() {
        let e = validate_name("/bad/").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("sample name \"/bad/\" ends with '/'"));
    }

    #[test]
    fn tree_order() {
        let mut v = vec!["/ab", "/a-b", "/a/x", "/a", "/a/x/y", "/b", "/a/y"];
        v.sort_by(|a, b| cmp_names(a, b));
        assert_eq!(v, ["/a", "/a/x", "/a/x/y", "/a/y", "/a-b", "/ab", "/b"]);
        assert_eq!(cmp_names("/a", "/a"), Ordering::Equal);
    }
}
