//! `worldswitch stats --from` on saved run documents whose `stam` member no
//! registry could have produced: each ends with a one-line error naming the
//! first bad sample and exit status 2, and nothing is rendered. A good
//! document renders in every format, absent profile extremes included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_worldswitch");

/// A `run --json` document holding one run whose `stam` member has `samples`.
fn run_doc(samples: &[Value]) -> Value {
    json!({
        "schema": worldswitch::report::SCHEMA,
        "command": "run",
        "verified": true,
        "runs": [{ "switcher": "32-to-amd64", "stam": { "samples": samples } }],
    })
}

fn sample(name: &str, ty: &str, value: Value) -> Value {
    json!({ "name": name, "type": ty, "unit": "COUNT", "visibility": "ALWAYS", "value": value })
}

fn counter(name: &str) -> Value {
    sample(name, "COUNTER", json!({ "counter": { "c": 3 } }))
}

fn write(file: &str, doc: &Value) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worldswitch-stats-from");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    path
}

fn stats_from(file: &str, doc: &Value, format: &str) -> Output {
    let path = write(file, doc);
    Command::new(BIN)
        .args([
            "stats",
            "--from",
            path.to_str().unwrap(),
            "--format",
            format,
        ])
        .output()
        .unwrap()
}

/// Runs `stats --from` on `samples` in every format and checks the refusal:
/// exit 2, nothing on stdout, one line on stderr containing every `needle`.
fn refused(file: &str, samples: &[Value], needles: &[&str]) {
    let doc = run_doc(samples);
    for format in ["text", "xml", "prometheus", "json"] {
        let o = stats_from(file, &doc, format);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{file} {format}: {err}");
        assert!(o.stdout.is_empty(), "{file} {format}: rendered anyway");
        assert_eq!(err.trim_end().lines().count(), 1, "{file}: {err:?}");
        assert!(err.starts_with("worldswitch: error: "), "{err}");
        assert!(err.contains(file), "{err}");
        for n in needles {
            assert!(err.contains(n), "{file} {format}: {n:?} not in {err}");
        }
    }
}

#[test]
fn invalid_names_are_refused() {
    refused(
        "trailing-slash.json",
        &[counter("/ok"), counter("/VMM/bad/")],
        &["sample 1", "\"/VMM/bad/\"", "ends with '/'"],
    );
    refused(
        "no-slash.json",
        &[counter("VMM/Exits")],
        &["sample 0", "\"VMM/Exits\"", "does not start with '/'"],
    );
    refused(
        "empty-component.json",
        &[counter("/a//b")],
        &["\"/a//b\"", "empty path component"],
    );
}

#[test]
fn duplicate_names_are_refused() {
    refused(
        "duplicate.json",
        &[
            counter("/VMM/Exits"),
            counter("/VMM/Other"),
            counter("/VMM/Exits"),
        ],
        &["sample 2", "\"/VMM/Exits\"", "already used by sample 0"],
    );
}

#[test]
fn values_that_do_not_fit_their_type_are_refused() {
    let profile =
        json!({ "profile": { "periods": 1, "ticks": 5, "ticks_max": 5, "ticks_min": 5 } });
    refused(
        "counter-profile.json",
        &[sample("/VMM/Exits", "COUNTER", profile)],
        &[
            "\"/VMM/Exits\"",
            "type COUNTER holds a counter value, not a profile value",
        ],
    );
    refused(
        "u8-too-big.json",
        &[sample("/VMM/Byte", "U8", json!({ "unsigned": 256 }))],
        &["\"/VMM/Byte\"", "256", "U8"],
    );
    refused(
        "sentinel-min.json",
        &[sample(
            "/VMM/Prof",
            "PROFILE",
            json!({ "profile": { "periods": 0, "ticks": 0, "ticks_max": null,
                                 "ticks_min": u64::MAX } }),
        )],
        &[
            "\"/VMM/Prof\"",
            "ticks_min 18446744073709551615",
            "must be null",
        ],
    );
    refused(
        "unknown-type.json",
        &[
            counter("/a"),
            sample("/VMM/Odd", "COUNTER32", json!({ "counter": { "c": 1 } })),
        ],
        &["sample 1", "\"/VMM/Odd\"", "COUNTER32"],
    );
}

#[test]
fn a_valid_document_renders_with_absent_extremes() {
    let doc = run_doc(&[
        counter("/VMM/Exits"),
        sample(
            "/VMM/Prof",
            "PROFILE_ADV",
            json!({ "profile": { "periods": 0, "ticks": 0, "ticks_max": null, "ticks_min": null } }),
        ),
    ]);
    let ok = |format: &str| {
        let o = stats_from("valid.json", &doc, format);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{format}: {err}");
        String::from_utf8(o.stdout).unwrap()
    };
    let text = ok("text");
    assert!(text.contains("max         -, min       -)"), "{text}");
    let xml = ok("xml");
    assert!(!xml.contains("cTicksMin"), "{xml}");
    let prom = ok("prometheus");
    assert!(!prom.contains("stam_profile_ticks_min"), "{prom}");
    let j: Value = serde_json::from_str(&ok("json")).unwrap();
    assert_eq!(
        j["samples"][1]["value"]["profile"]["ticks_min"],
        Value::Null
    );
}
