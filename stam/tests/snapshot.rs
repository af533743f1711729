//! Snapshots read back from JSON: absent values are `null`, and a snapshot
//! that no registry could have produced is refused with the first bad
//! sample named.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use stam::{
    Backing, Registry, SampleDef, SampleProblem, SampleValue, Snapshot, StamError, StamProfile,
    StamType, StamUnit, StamVisibility, Value,
};

type R = Result<(), Box<dyn std::error::Error>>;

/// A JSON sample with the given name, type and value object.
fn sample(name: &str, ty: &str, value: &str) -> String {
    format!(
        r#"{{"name":{name:?},"type":"{ty}","unit":"COUNT","visibility":"ALWAYS","value":{value}}}"#
    )
}

fn doc(samples: &[String]) -> String {
    format!(r#"{{"samples":[{}]}}"#, samples.join(","))
}

const COUNTER: &str = r#"{"counter":{"c":1}}"#;

/// The error for `samples`, which must be refused.
fn refused(samples: &[String]) -> StamError {
    let json = doc(samples);
    let e = Snapshot::from_json(&json).expect_err(&json);
    // Any serde path refuses it the same way.
    let via_serde = serde_json::from_str::<Snapshot>(&json).expect_err(&json);
    assert_eq!(via_serde.to_string(), e.to_string(), "{json}");
    // One line, naming the sample.
    assert!(!e.to_string().contains('\n'), "{e}");
    e
}

fn problem(e: &StamError) -> (usize, &str, &SampleProblem) {
    match e {
        StamError::InvalidSample {
            index,
            name,
            problem,
        } => (*index, name, problem),
        other => panic!("not a sample error: {other:?}"),
    }
}

#[test]
fn empty_profile_extremes_are_null_everywhere() -> R {
    let mut reg = Registry::new();
    reg.register_owned(SampleDef::new(
        "/Empty",
        StamType::Profile,
        StamUnit::TicksPerCall,
    ))?;
    let one = reg.register_owned(SampleDef::new(
        "/One",
        StamType::ProfileAdv,
        StamUnit::TicksPerCall,
    ))?;
    reg.owned_mut::<StamProfile>(one)?.add_period(7);
    let none = Backing::new();
    // The memory still holds the reset state (min u64::MAX, max 0)...
    assert_eq!(
        reg.read::<StamProfile>(reg.find("/Empty").unwrap(), &none)?
            .ticks_min,
        u64::MAX
    );
    // ...but no format shows it as a value.
    let json = reg.json("/Empty", &none)?;
    assert_eq!(
        json,
        r#"{"samples":[{"name":"/Empty","type":"PROFILE","unit":"TICKS_PER_CALL","visibility":"ALWAYS","value":{"profile":{"periods":0,"ticks":0,"ticks_max":null,"ticks_min":null}}}]}"#
    );
    assert!(!json.contains("18446744073709551615"));
    let text = reg.print("*", &none)?;
    assert!(
        text.contains("0 calls, max         -, min       -)"),
        "{text}"
    );
    assert!(!text.contains("-1"), "{text}");
    let xml = reg.xml("/Empty", false, &none)?;
    assert!(
        xml.contains(r#"<Profile cPeriods="0" cTicks="0" unit="ticks/call" name="/Empty"/>"#),
        "{xml}"
    );
    let prom = reg.prometheus("*", &none)?;
    assert!(!prom.contains("ticks_min{path=\"/Empty\""), "{prom}");
    assert!(prom.contains("stam_profile_ticks_min{path=\"/One\",unit=\"ticks/call\"} 7"));
    // What the registry writes reads back, and renders the same.
    let snap = Snapshot::from_json(&reg.json("*", &none)?)?;
    assert_eq!(snap, reg.snapshot("*", &none)?);
    assert_eq!(snap.print(), text);
    assert_eq!(
        snap.samples[1].value,
        Value::Profile {
            periods: 1,
            ticks: 7,
            ticks_max: Some(7),
            ticks_min: Some(7)
        }
    );
    Ok(())
}

#[test]
fn every_registry_type_round_trips_valid() -> R {
    let mut reg = Registry::new();
    for (i, ty) in StamType::ALL.into_iter().enumerate() {
        if ty == StamType::Callback {
            continue;
        }
        reg.register_owned(SampleDef::new(&format!("/T/{i}"), ty, StamUnit::Count))?;
    }
    let json = reg.json("*", &Backing::new())?;
    let snap = Snapshot::from_json(&json)?;
    snap.validate()?;
    assert_eq!(snap.samples.len(), StamType::ALL.len() - 1);
    Ok(())
}

#[test]
fn bad_names_are_refused_by_the_registry_rules() {
    for (name, rule) in [
        ("", "does not start with '/'"),
        ("VMM/x", "does not start with '/'"),
        ("/a//b", "empty path component"),
        ("/a/", "ends with '/'"),
        ("/", "ends with '/'"),
        ("/a\\b", "backslash"),
    ] {
        let e = refused(&[
            sample("/ok", "COUNTER", COUNTER),
            sample(name, "COUNTER", COUNTER),
        ]);
        let (index, got, p) = problem(&e);
        assert_eq!((index, got), (1, name));
        assert!(matches!(p, SampleProblem::Name(_)), "{p:?}");
        assert!(e.to_string().contains(rule), "{e}");
    }
    let long = format!("/{}", "a".repeat(stam::MAX_NAME_LEN));
    let e = refused(&[sample(&long, "COUNTER", COUNTER)]);
    assert!(matches!(
        problem(&e).2,
        SampleProblem::Name(b) if matches!(**b, StamError::NameTooLong { .. })
    ));
}

#[test]
fn duplicate_names_are_refused() {
    let e = refused(&[
        sample("/a", "COUNTER", COUNTER),
        sample("/b", "COUNTER", COUNTER),
        sample("/a", "U8", r#"{"unsigned":1}"#),
    ]);
    assert_eq!(
        problem(&e),
        (2, "/a", &SampleProblem::Duplicate { first: 0 })
    );
    assert_eq!(
        e.to_string(),
        "snapshot sample 2 (\"/a\"): the name is already used by sample 0"
    );
}

#[test]
fn values_must_match_their_type() {
    let prof = r#"{"profile":{"periods":1,"ticks":5,"ticks_max":5,"ticks_min":5}}"#;
    let e = refused(&[sample("/Exits", "COUNTER", prof)]);
    assert_eq!(
        problem(&e).2,
        &SampleProblem::WrongKind {
            ty: StamType::Counter,
            expected: "counter",
            found: "profile"
        }
    );
    assert_eq!(
        e.to_string(),
        "snapshot sample 0 (\"/Exits\"): type COUNTER holds a counter value, not a profile value"
    );
    for (ty, value, expected, found) in [
        ("PROFILE_ADV", COUNTER, "profile", "counter"),
        ("RATIO_U32", r#"{"bool":true}"#, "ratio", "bool"),
        ("X32", r#"{"ratio":{"a":1,"b":2}}"#, "unsigned", "ratio"),
        ("BOOL_RESET", r#"{"unsigned":1}"#, "bool", "unsigned"),
    ] {
        let e = refused(&[sample("/v", ty, value)]);
        assert!(
            matches!(problem(&e).2, SampleProblem::WrongKind { expected: x, found: f, .. }
                if *x == expected && *f == found),
            "{e}"
        );
    }
    let e = refused(&[sample("/cb", "CALLBACK", r#"{"unsigned":1}"#)]);
    assert_eq!(
        problem(&e).2,
        &SampleProblem::UnsupportedType {
            ty: StamType::Callback
        }
    );
}

#[test]
fn scalars_must_fit_their_width() {
    for (ty, max) in [
        ("U8", 0xffu64),
        ("X8_RESET", 0xff),
        ("U16", 0xffff),
        ("X32", 0xffff_ffff),
    ] {
        let ok = doc(&[sample("/s", ty, &format!(r#"{{"unsigned":{max}}}"#))]);
        assert!(Snapshot::from_json(&ok).is_ok(), "{ok}");
        let e = refused(&[sample("/s", ty, &format!(r#"{{"unsigned":{}}}"#, max + 1))]);
        assert!(
            matches!(problem(&e).2, SampleProblem::OutOfRange { value, max: m, .. }
                if *value == max + 1 && *m == max),
            "{e}"
        );
    }
    let ok = doc(&[sample(
        "/s",
        "U64",
        &format!(r#"{{"unsigned":{}}}"#, u64::MAX),
    )]);
    assert!(Snapshot::from_json(&ok).is_ok());
}

#[test]
fn profiles_must_be_consistent() {
    // The old sentinel form of an empty profile.
    let e = refused(&[sample(
        "/p",
        "PROFILE",
        r#"{"profile":{"periods":0,"ticks":0,"ticks_max":0,"ticks_min":18446744073709551615}}"#,
    )]);
    assert_eq!(
        problem(&e).2,
        &SampleProblem::ExtremeWithoutPeriods {
            field: "ticks_max",
            value: 0
        }
    );
    let e = refused(&[sample(
        "/p",
        "PROFILE",
        r#"{"profile":{"periods":0,"ticks":0,"ticks_max":null,"ticks_min":18446744073709551615}}"#,
    )]);
    assert_eq!(
        e.to_string(),
        "snapshot sample 0 (\"/p\"): a profile without periods has ticks_min \
         18446744073709551615; it must be null"
    );
    let e = refused(&[sample(
        "/p",
        "PROFILE_ADV",
        r#"{"profile":{"periods":2,"ticks":9,"ticks_max":5,"ticks_min":null}}"#,
    )]);
    assert_eq!(
        problem(&e).2,
        &SampleProblem::MissingExtreme {
            periods: 2,
            field: "ticks_min"
        }
    );
    let e = refused(&[sample(
        "/p",
        "PROFILE",
        r#"{"profile":{"periods":2,"ticks":9,"ticks_max":3,"ticks_min":6}}"#,
    )]);
    assert_eq!(
        problem(&e).2,
        &SampleProblem::MinAboveMax { min: 6, max: 3 }
    );
    // Missing extremes read as null.
    let ok = doc(&[sample(
        "/p",
        "PROFILE",
        r#"{"profile":{"periods":0,"ticks":0}}"#,
    )]);
    assert!(Snapshot::from_json(&ok).is_ok());
}

#[test]
fn malformed_samples_are_named() {
    let e = refused(&[
        sample("/a", "COUNTER", COUNTER),
        sample("/b", "NO_SUCH_TYPE", COUNTER),
    ]);
    let (index, name, p) = problem(&e);
    assert_eq!((index, name), (1, "/b"));
    assert!(matches!(p, SampleProblem::Malformed(m) if m.contains("NO_SUCH_TYPE")));
    let e = refused(&[sample("/a", "U8", r#"{"unsigned":-1}"#)]);
    assert_eq!(problem(&e).1, "/a");
    let e = refused(&["{}".into()]);
    assert!(matches!(problem(&e), (0, "", SampleProblem::Malformed(_))));
    let e = refused(&[sample(
        "/r",
        "RATIO_U32",
        r#"{"ratio":{"a":4294967296,"b":0}}"#,
    )]);
    assert_eq!(problem(&e).1, "/r");
    assert!(matches!(
        Snapshot::from_json("not json"),
        Err(StamError::JsonDecode(_))
    ));
    assert!(matches!(
        Snapshot::from_json(r#"{"samples":3}"#),
        Err(StamError::JsonDecode(_))
    ));
    assert!(matches!(
        Snapshot::from_json_value(serde_json::json!([])),
        Err(StamError::JsonDecode(_))
    ));
}

#[test]
fn validate_checks_snapshots_built_in_code() {
    let mut snap = Snapshot {
        samples: vec![SampleValue {
            name: "/a".into(),
            ty: StamType::U16,
            unit: StamUnit::None,
            visibility: StamVisibility::Always,
            description: None,
            value: Value::Unsigned(7),
        }],
    };
    assert_eq!(snap.validate(), Ok(()));
    snap.samples[0].value = Value::Unsigned(1 << 16);
    assert!(snap.validate().is_err());
    snap.samples[0].value = Value::Unsigned(1);
    snap.samples.push(snap.samples[0].clone());
    assert_eq!(
        snap.validate(),
        Err(StamError::InvalidSample {
            index: 1,
            name: "/a".into(),
            problem: SampleProblem::Duplicate { first: 0 }
        })
    );
}
