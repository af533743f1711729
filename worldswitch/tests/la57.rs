//! `--la57` on the command line: the AMD64-host switchers on a 5-level host,
//! what `run --json` and `decode` say about it, the refusals in one line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::support;
use common::{boot_serial, decode_json, err, ws};

use serde_json::Value;

#[test]
fn la57_runs_report_it_and_decode_rebuilds_it() {
    let Some(q) = support::qemu() else {
        return;
    };
    let o = ws(&[
        "run",
        "--json",
        "--round-trips",
        "5",
        "--la57",
        "amd64-to-32",
        "32-to-32",
    ]);
    // 32-to-32 runs on a 32-bit host: refused before anything boots.
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    let o = ws(&[
        "run",
        "--json",
        "--round-trips",
        "5",
        "--la57",
        "amd64-to-amd64",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &doc["runs"][0];
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["la57"], true);
    assert_eq!(
        r["placement"]["code_hc"].as_u64(),
        Some(0xff00_0000_c040_0000)
    );
    let o = ws(&["run", "--json", "--round-trips", "2", "amd64-to-32"]);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["runs"][0]["la57"], false);

    let img = std::env::temp_dir().join(format!("ws-la57-{}.bin", std::process::id()));
    let o = ws(&[
        "image",
        "amd64-to-pae",
        "--out",
        img.to_str().unwrap(),
        "--round-trips",
        "3",
        "--la57",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let cfg = integration::qemu::QemuConfig {
        cpu: Some("qemu64,+la57".into()),
        ..q
    };
    let serial = boot_serial(&img, &cfg);
    let _ = std::fs::remove_file(&img);
    let doc = decode_json(&serial);
    assert_eq!(doc["runs"][0]["verified"], true, "{doc}");
    assert_eq!(doc["runs"][0]["la57"], true);
}

#[test]
fn bad_la57_combinations_are_one_line_errors() {
    for (args, words) in [
        (
            vec!["run", "pae-to-pae", "--la57"],
            vec!["--la57 needs an AMD64 host", "pae-to-pae", "PAE"],
        ),
        (
            vec!["run", "amd64-to-32", "--la57", "--cpu", "qemu64"],
            vec!["--la57 needs a CPU with la57", "qemu64", "+la57"],
        ),
    ] {
        let o = ws(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", err(&o));
        let e = err(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        for w in words {
            assert!(e.contains(w), "{args:?}: {e}");
        }
    }
    let o = ws(&["list", "--json"]);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    for r in doc["switchers"].as_array().unwrap() {
        let has = r["host_options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "--la57");
        assert_eq!(has, r["host_mode"] == "AMD64", "{r}");
    }
}
