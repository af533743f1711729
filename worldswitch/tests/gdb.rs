//! `run --gdb` as a person uses it: the port option, the symbol file gdb
//! loads, the files removed when the run ends, and a whole gdb session
//! (breakpoint on the C entry, the stop named, `ws-x` decoding 32-bit code).
//!
//! Tests that need QEMU or gdb skip loudly when one is missing, unless
//! `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../integration/tests/support/mod.rs"]
mod support;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use integration::scenario::{build, Scenario};
use serde_json::Value;
use vmm_switcher::SwitcherKind;
use worldswitch::gdb::port_in_use;

const BIN: &str = env!("CARGO_BIN_EXE_worldswitch");

/// Fails under `CI=true`; elsewhere prints a notice libtest does not capture.
fn skip(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {why}");
    }
    let notice = format!("\n!!! SKIPPING a gdb test: {why}\n");
    let _ = std::io::stderr().write_all(notice.as_bytes());
}

/// Whether `gdb` runs (a loud skip when not).
fn have_gdb() -> bool {
    let ok = Command::new("gdb")
        .args(["-nx", "-batch", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip("gdb is not installed (apt-get install gdb)");
    }
    ok
}

/// A fresh, empty directory for one test's temporary files.
fn tmp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gdb-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The files left in `dir`.
fn left_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `gdb -batch` with `args`; its stdout and stderr together.
fn gdb_batch(args: &[String]) -> String {
    let o = Command::new("gdb")
        .args(["-q", "-nx", "-batch"])
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_busy_port_is_one_line_naming_it() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tmp_dir("busy");
    let o = Command::new(BIN)
        .args([
            "run",
            "pae-to-amd64",
            "--gdb",
            "--gdb-port",
            &port.to_string(),
        ])
        .env("TMPDIR", &dir)
        .output()
        .unwrap();
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with(&format!("worldswitch: error: gdb port {port} is busy (")),
        "{e}"
    );
    assert!(e.contains("--gdb-port"), "{e}");
    assert!(left_in(&dir).is_empty(), "{:?}", left_in(&dir));
}

#[test]
fn the_port_is_checked_and_needs_gdb() {
    for args in [
        &["run", "pae-to-amd64", "--gdb-port", "5000"][..],
        &["run", "pae-to-amd64", "--gdb", "--gdb-port", "0"],
        &["run", "pae-to-amd64", "--gdb", "--gdb-port", "65536"],
    ] {
        let o = Command::new(BIN).args(args).output().unwrap();
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(e.contains("--gdb"), "{args:?}: {e}");
    }
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--gdb-port <PORT>") && help.contains("[default: 1234]"),
        "{help}"
    );
}

#[test]
fn the_files_go_when_qemu_refuses_to_start() {
    let dir = tmp_dir("refused");
    let fake = dir.join("fake-qemu");
    std::fs::write(&fake, "#!/bin/sh\necho 'fake-qemu: refusing' >&2\nexit 1\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let port = free_port().to_string();
    let o = Command::new(BIN)
        .args([
            "run",
            "pae-to-amd64",
            "--gdb",
            "--gdb-port",
            &port,
            "--qemu",
        ])
        .arg(&fake)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("gdb -q -x "), "the banner was printed: {e}");
    assert!(e.contains("fake-qemu: refusing"), "{e}");
    assert!(left_in(&tmp).is_empty(), "left behind: {:?}", left_in(&tmp));
}

/// Expected `info symbol` answers for `kind`'s symbol file: each view of
/// `IDEnterTarget` (and 3 bytes into it), and the host kernel's call site.
fn symbol_cases(kind: SwitcherKind) -> (Vec<u8>, Vec<(u64, String)>) {
    let s = Scenario::new(kind);
    let built = build(&s).unwrap();
    let sym = worldswitch::gdb::symbols(&s, &built).unwrap();
    let elf = worldswitch::elf::write(&sym.areas, &sym.symbols).unwrap();
    let sw = built.vmm.switcher(kind).unwrap();
    let off = u64::from(sw.def.labels["IDEnterTarget"]);
    let section = format!(".{}", kind.cli_name().replace('-', "_"));
    let mut cases = Vec::new();
    for (view, base) in [
        ("HC", sw.ctx.code_hc.0),
        ("ID", sw.ctx.code_id.0),
        ("RC", u64::from(sw.ctx.code_rc.0)),
    ] {
        let sect = if view == "ID" {
            // The identity view shares its bytes with the image's blob of
            // the HMA, so the two areas are one section.
            String::new()
        } else {
            format!(" in section {section}.{view}")
        };
        cases.push((base + off, format!("IDEnterTarget@{view}{sect}")));
        cases.push((base + off + 3, format!("IDEnterTarget@{view} + 3{sect}")));
    }
    let call_site = u64::from(built.testbed.symbol("call_site").unwrap());
    cases.push((call_site, "call_site in section .kernel_code".into()));
    (elf, cases)
}

#[test]
fn gdb_names_every_view_and_the_host_kernel_from_the_symbol_file() {
    if !have_gdb() {
        return;
    }
    let dir = tmp_dir("symbols");
    for kind in [SwitcherKind::PaeToAmd64, SwitcherKind::Amd64ToPae] {
        let (elf, cases) = symbol_cases(kind);
        let path = dir.join(format!("{}.elf", kind.cli_name()));
        std::fs::write(&path, elf).unwrap();
        let mut args = vec!["-ex".into(), format!("symbol-file {}", path.display())];
        for (addr, _) in &cases {
            args.push("-ex".into());
            args.push(format!("info symbol {addr:#x}"));
        }
        let out = gdb_batch(&args);
        let answers: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("Reading symbols") && !l.starts_with("(No debugging"))
            .collect();
        assert_eq!(answers.len(), cases.len(), "{}: {out}", kind.cli_name());
        for ((addr, want), got) in cases.iter().zip(&answers) {
            // Only the ID view's section name depends on the layout.
            assert!(
                got.starts_with(want.as_str()),
                "{}: info symbol {addr:#x}: {got:?}, want {want:?}",
                kind.cli_name()
            );
        }
    }
}

/// The running `worldswitch run --gdb`: when dropped before it ended, gdb's
/// kill packet ends QEMU (and so the program), then the program is killed.
struct Running {
    child: Child,
    port: u16,
}

impl Running {
    /// Waits up to two minutes for the program to end.
    fn wait(&mut self) -> Option<std::process::ExitStatus> {
        for _ in 0..1200 {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) {
            let _ = s.write_all(b"+$k#6b");
        }
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The listing's instruction texts from `addr` on (`worldswitch disasm --json`).
fn listing_from(kind: &str, addr: u64, n: usize) -> Vec<String> {
    let o = Command::new(BIN)
        .args(["disasm", kind, "--json"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let lines = doc["lines"].as_array().unwrap();
    let first = lines
        .iter()
        .position(|l| l["addr"].as_u64() == Some(addr))
        .unwrap_or_else(|| panic!("no listing line at {addr:#x}"));
    lines[first..first + n]
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_owned())
        .collect()
}

/// Starts `worldswitch run KIND --gdb --gdb-port PORT` with its temporary
/// files in `dir`; returns it (once QEMU listens) and the script's path.
fn start_run(kind: &str, dir: &Path, port: u16) -> (Running, PathBuf) {
    let child = Command::new(BIN)
        .args(["run", kind, "--round-trips", "1", "--gdb", "--gdb-port"])
        .arg(port.to_string())
        .env("TMPDIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = Running { child, port };
    let (tx, rx) = mpsc::channel();
    let stderr = run.child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = String::new();
    let script = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("no gdb command line ({e}): {banner}"));
        banner.push_str(&line);
        banner.push('\n');
        if let Some(p) = line.trim().strip_prefix("gdb -q -x ") {
            break PathBuf::from(p);
        }
    };
    assert!(
        banner.contains(&format!("gdbstub on 127.0.0.1:{port}")),
        "{banner}"
    );
    assert!(script.starts_with(dir), "{script:?}");
    let mut listening = false;
    for _ in 0..1200 {
        listening = port_in_use(port);
        if listening || run.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(listening, "QEMU never listened on {port}");
    (run, script)
}

#[test]
fn a_gdb_session_stops_at_the_named_entry_and_decodes_32_bit_code() {
    if support::qemu().is_none() || !have_gdb() {
        return;
    }
    let kind = "pae-to-amd64";
    let dir = tmp_dir("session");
    let (mut run, script) = start_run(kind, &dir, free_port());
    let out = gdb_batch(&[
        "-x".into(),
        script.display().to_string(),
        "-ex".into(),
        "continue".into(),
        "-ex".into(),
        "info symbol $pc".into(),
        "-ex".into(),
        "ws-x 3".into(),
        "-ex".into(),
        "x/3i $pc".into(),
        "-ex".into(),
        "kill".into(),
    ]);
    eprintln!("---- gdb session ----\n{out}---- end ----");

    // The C entry's HC address, as `relocate --json` reports it.
    let o = Command::new(BIN)
        .args(["relocate", kind, "--out", "/dev/null", "--json"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let addr = doc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "R0HostToGuest")
        .and_then(|e| e["addr"].as_u64())
        .unwrap();
    let entry = listing_from(kind, addr, 3);
    assert!(
        out.contains(&format!(
            "Breakpoint 1, {addr:#018x} in vmmR0HostToGuest@HC ()"
        )),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            == format!(
                "vmmR0HostToGuest@HC in section .{}.HC",
                kind.replace('-', "_")
            )),
        "{out}"
    );
    let head = "32-bit code (switcher region HC0, HC view):";
    let at = out.find(head).unwrap_or_else(|| panic!("{out}"));
    let decoded: Vec<&str> = out[at..].lines().skip(1).take(3).collect();
    assert!(
        decoded[0].starts_with(&format!("=> {addr:#x} <vmmR0HostToGuest@HC>:")),
        "{out}"
    );
    for (line, want) in decoded.iter().zip(&entry) {
        assert!(
            line.ends_with(want.as_str()),
            "{line:?} is not {want:?}\n{out}"
        );
    }
    // The second instruction (the VCPU's profile: HC CPUM plus the VCPU
    // offset argument) is decoded as 32-bit code, `[esp+8]`, not `[rsp+8]`.
    assert_eq!(entry[1], "add     ecx,[esp+8]");

    let status = run.wait().expect("the run ends once gdb kills QEMU");
    assert!(status.code().is_some(), "{status:?}");
    assert!(
        left_in(&dir).is_empty(),
        "the script, symbol file and scratch file are removed: {:?}",
        left_in(&dir)
    );
}
