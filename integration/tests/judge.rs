//! The judge has teeth: real transcripts from QEMU runs (a 32-bit host and
//! an AMD64 host, 2 VCPUs x 3 trips), every single mutation of each kind
//! applied, and none of the mutants judged verified. Also: forged
//! transcripts (bad content with a recomputed checksum), the build a
//! transcript names, and CPUs without what a switcher needs.
//!
//! Tests that boot QEMU skip loudly when it is missing, unless `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use integration::hostkernel::CpuFeature;
use integration::qemu::{Outcome, QemuConfig, RunResult};
use integration::scenario::{build, judge, run, Built, Scenario, ScenarioResult};
use integration::transcript::Report;
use vmm_switcher::templates::Revision;
use vmm_switcher::SwitcherKind;

/// The outcome a captured transcript implies, as `worldswitch decode`
/// derives it (no exit status is known).
fn outcome_of(r: &Report) -> Outcome {
    if let Some(e) = &r.exception {
        return Outcome::HostException(Some(e.clone()));
    }
    if let Some(f) = &r.far_exception {
        return Outcome::FarException(Some(f.clone()));
    }
    match r.result {
        Some(true) => Outcome::Pass,
        Some(false) => Outcome::VerificationFailed,
        None => Outcome::Other(-1),
    }
}

/// Judges a transcript of `b` the way `decode` does.
fn judged(s: &Scenario, b: &Built, serial: &[u8]) -> ScenarioResult {
    let report = Report::parse(serial);
    let run = RunResult {
        outcome: outcome_of(&report),
        status: None,
        serial: serial.to_vec(),
        stderr: String::new(),
        report,
        wall: Duration::ZERO,
    };
    judge(s, b, run)
}

/// A small scenario of `kind`, built and booted: its transcript verifies.
fn capture(kind: SwitcherKind, q: &QemuConfig) -> (Scenario, Built, Vec<u8>) {
    let mut s = Scenario::new(kind);
    s.trips = 3;
    s.vcpus = 2;
    let b = build(&s).unwrap();
    let r = b.testbed.run(q).unwrap();
    let serial = r.serial.clone();
    let v = judged(&s, &b, &serial);
    assert!(
        v.verified,
        "{}: {:?}\n{}",
        kind.cli_name(),
        v.failures,
        r.transcript()
    );
    (s, b, serial)
}

/// The transcript with its `CRC` line recomputed (a forger who knows the
/// checksum): what the judge's other checks must catch on their own.
fn reseal(serial: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(serial).into_owned();
    let cut = text.rfind("@@CRC ").unwrap_or(text.len());
    let mut body = text[..cut].to_owned();
    let probe = format!("{body}@@CRC crc32=00000000\n");
    let Some(crc) = Report::parse(probe.as_bytes()).crc_computed else {
        return serial.to_vec();
    };
    body.push_str(&format!("@@CRC crc32={crc:08x}\n"));
    body.into_bytes()
}

/// Lines with their `\n`.
fn lines(serial: &[u8]) -> Vec<Vec<u8>> {
    serial
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

/// Every variant of one numeric value: +1, -1, 0 and the maximum of its
/// width (hex keeps its digit count).
fn numeric_variants(v: &str) -> Vec<String> {
    let hex = v.len() >= 8 && v.bytes().all(|b| b.is_ascii_hexdigit());
    let mut out = Vec::new();
    if hex && v.len() <= 16 {
        let n = u64::from_str_radix(v, 16).unwrap();
        let w = v.len();
        let max = if w == 16 {
            u64::MAX
        } else {
            (1u64 << (4 * w)) - 1
        };
        for x in [n.wrapping_add(1) & max, n.wrapping_sub(1) & max, 0, max] {
            out.push(format!("{x:0w$x}"));
        }
    } else if hex {
        // An `H` payload: its last byte +1, -1, and all bytes 0 or ff.
        let last = u8::from_str_radix(&v[v.len() - 2..], 16).unwrap();
        let head = &v[..v.len() - 2];
        for x in [last.wrapping_add(1), last.wrapping_sub(1)] {
            out.push(format!("{head}{x:02x}"));
        }
        out.push("0".repeat(v.len()));
        out.push("f".repeat(v.len()));
    } else if v.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = v.parse().unwrap();
        for x in [n + 1, n.saturating_sub(1), 0, u64::from(u32::MAX)] {
            out.push(x.to_string());
        }
    }
    out.retain(|x| x != v);
    out
}

/// Every mutant of one line: each numeric value of each field (and an
/// `H` payload) replaced by its variants.
fn field_mutants(line: &[u8]) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(line);
    let body = text.trim_end_matches('\n');
    let tokens: Vec<&str> = body.split(' ').collect();
    let mut out = Vec::new();
    for (i, tok) in tokens.iter().enumerate() {
        let (prefix, value) = match tok.split_once('=') {
            Some((k, v)) => (format!("{k}="), v),
            None if i > 0 && tokens[0] == "@@H" => (String::new(), *tok),
            None => continue,
        };
        for v in numeric_variants(value) {
            let mut t = tokens.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
            t[i] = format!("{prefix}{v}");
            out.push(format!("{}\n", t.join(" ")).into_bytes());
        }
    }
    out
}

/// Counts of one kind of mutation.
#[derive(Default)]
struct Tally {
    tried: usize,
    refused: usize,
    same: usize,
    accepted: Vec<String>,
}

impl Tally {
    fn add(
        &mut self,
        original: &[u8],
        mutant: &[u8],
        what: String,
        verified: impl Fn(&[u8]) -> bool,
    ) {
        if mutant == original {
            self.same += 1;
            return;
        }
        self.tried += 1;
        if verified(mutant) {
            self.accepted.push(what);
        } else {
            self.refused += 1;
        }
    }
}

/// Every mutation of `serial`, by kind.
fn mutate_all(
    serial: &[u8],
    flips: bool,
    verified: &dyn Fn(&[u8]) -> bool,
) -> Vec<(&'static str, Tally)> {
    let ls = lines(serial);
    let join = |v: &[Vec<u8>]| v.concat();
    let mut fields = Tally::default();
    let mut deleted = Tally::default();
    let mut duplicated = Tally::default();
    let mut swapped = Tally::default();
    let mut flipped = Tally::default();
    for i in 0..ls.len() {
        for m in field_mutants(&ls[i]) {
            let mut v = ls.clone();
            let what = format!("line {}: {}", i + 1, String::from_utf8_lossy(&m).trim_end());
            v[i] = m;
            fields.add(serial, &join(&v), what, verified);
        }
        let mut v = ls.clone();
        v.remove(i);
        deleted.add(
            serial,
            &join(&v),
            format!("line {} deleted", i + 1),
            verified,
        );
        let mut v = ls.clone();
        v.insert(i, ls[i].clone());
        duplicated.add(
            serial,
            &join(&v),
            format!("line {} duplicated", i + 1),
            verified,
        );
        if i + 1 < ls.len() {
            let mut v = ls.clone();
            v.swap(i, i + 1);
            swapped.add(
                serial,
                &join(&v),
                format!("lines {} and {} swapped", i + 1, i + 2),
                verified,
            );
        }
    }
    for pos in (0..serial.len()).filter(|_| flips) {
        let mut v = serial.to_vec();
        v[pos] ^= 0x01;
        flipped.add(serial, &v, format!("byte {pos} xor 1"), verified);
    }
    vec![
        ("numeric field", fields),
        ("line deleted", deleted),
        ("line duplicated", duplicated),
        ("adjacent lines swapped", swapped),
        ("byte flipped", flipped),
    ]
}

#[test]
fn no_single_mutation_of_a_real_transcript_is_verified() {
    let Some(q) = support::qemu() else { return };
    for kind in [SwitcherKind::Legacy32ToAmd64, SwitcherKind::Amd64ToAmd64] {
        let (s, b, serial) = capture(kind, &q);
        let verified = |t: &[u8]| judged(&s, &b, t).verified;
        let mut total = (0, 0);
        for (what, t) in mutate_all(&serial, true, &verified) {
            eprintln!(
                "judge mutations, {} ({} bytes): {what}: tried {}, refused {} (no-ops skipped: {})",
                kind.cli_name(),
                serial.len(),
                t.tried,
                t.refused,
                t.same
            );
            total.0 += t.tried;
            total.1 += t.refused;
            assert!(
                t.accepted.is_empty(),
                "{}: {what}: judged verified: {:?}",
                kind.cli_name(),
                &t.accepted[..t.accepted.len().min(8)]
            );
        }
        eprintln!(
            "judge mutations, {}: total tried {}, refused {}",
            kind.cli_name(),
            total.0,
            total.1
        );
    }
}

/// The same line mutations with the checksum recomputed: what the other
/// checks catch by themselves (the counts are printed; changes to values
/// nothing cross-checks — a TRIP line's `ret`, a HOST register, dump bytes
/// outside the decoded structures — are caught only by the checksum).
#[test]
fn forged_line_mutations_are_mostly_caught_without_the_checksum() {
    let Some(q) = support::qemu() else { return };
    let (s, b, serial) = capture(SwitcherKind::Legacy32ToAmd64, &q);
    let verified = |t: &[u8]| judged(&s, &b, &reseal(t)).verified;
    let last = lines(&serial).len();
    for (what, t) in mutate_all(&serial, false, &verified) {
        if what == "byte flipped" {
            continue;
        }
        eprintln!(
            "forged (CRC recomputed) {what}: tried {}, refused {}",
            t.tried, t.refused
        );
        if what != "numeric field" {
            // Deleting, duplicating or swapping whole lines changes the
            // line sequence or the VCPU/TRIP order: always caught.
            let allowed: Vec<&String> = t
                .accepted
                .iter()
                // Deleting the CRC line is undone by resealing.
                .filter(|a| !a.contains("swapped") && **a != format!("line {last} deleted"))
                .collect();
            assert!(allowed.is_empty(), "{what}: {allowed:?}");
        }
    }
}

/// Replaces the first line starting with `start` by `by` (all of it).
fn replace_line(serial: &[u8], start: &str, by: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(serial);
    let mut done = false;
    let mut out = String::new();
    for l in text.split_inclusive('\n') {
        if !done && l.starts_with(start) {
            out.push_str(by);
            done = true;
        } else {
            out.push_str(l);
        }
    }
    assert!(done, "no line starts with {start}");
    out.into_bytes()
}

fn insert_before(serial: &[u8], start: &str, line: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(serial);
    let at = text.find(start).unwrap();
    format!("{}{line}{}", &text[..at], &text[at..]).into_bytes()
}

/// Each input the old judge passed is refused, with and without a
/// recomputed checksum.
#[test]
fn bad_transcripts_the_old_judge_passed_are_refused() {
    let Some(q) = support::qemu() else { return };
    let (s, b, serial) = capture(SwitcherKind::Legacy32ToAmd64, &q);
    let text = String::from_utf8_lossy(&serial).into_owned();
    let vcpu0 = text
        .lines()
        .find(|l| l.starts_with("@@VCPU vcpu=0"))
        .unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "VCPU mismatches=5",
            replace_line(
                &serial,
                "@@VCPU vcpu=0",
                &format!("{}\n", vcpu0.replace("mismatches=0", "mismatches=5")),
            ),
        ),
        (
            "RETFAIL line",
            insert_before(
                &serial,
                "@@VCPU",
                "@@RETFAIL trip=1 vcpu=0 got=00000001 want=00000002\n",
            ),
        ),
        (
            "ERROR line",
            insert_before(&serial, "@@VCPU", "@@ERROR something broke\n"),
        ),
        (
            "EXC2 line",
            insert_before(
                &serial,
                "@@RESULT",
                "@@EXC2 vec=0e err=00000002 eip=00101234\n",
            ),
        ),
        (
            "unknown line",
            insert_before(&serial, "@@VCPU", "@@BOGUS x=1\n"),
        ),
        (
            "unparseable line",
            insert_before(&serial, "@@VCPU", "@@TRIP trip=x\n"),
        ),
        (
            "noise after BOOT",
            insert_before(&serial, "@@VCPU", "hello\n"),
        ),
        ("no RESULT", replace_line(&serial, "@@RESULT", "")),
        ("no mailbox dump", {
            let t = String::from_utf8_lossy(&serial).into_owned();
            let a = t.find("@@DUMP addr=").unwrap();
            let a = a + t[a..].find("name=mailbox").map(|_| 0).unwrap();
            let start = t[..]
                .find("name=mailbox")
                .map(|m| t[..m].rfind("@@DUMP").unwrap())
                .unwrap_or(a);
            let end = start + t[start..].find("@@END\n").unwrap() + "@@END\n".len();
            format!("{}{}", &t[..start], &t[end..]).into_bytes()
        }),
    ];
    let no_crc = replace_line(&serial, "@@CRC", "");
    // The old-judge cases forged with a valid checksum, plus the raw ones.
    let forged: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(w, t)| (format!("{w} (CRC recomputed)"), reseal(t)))
        .collect();
    cases.push(("no CRC line", no_crc));
    let wrong = replace_line(&serial, "@@CRC", "@@CRC crc32=00000000\n");
    cases.push(("wrong CRC", wrong));
    for (what, t) in cases
        .iter()
        .map(|(w, t)| ((*w).to_owned(), t.clone()))
        .chain(forged)
    {
        let r = judged(&s, &b, &t);
        assert!(!r.verified, "{what}: judged verified");
        eprintln!(
            "{what}: refused: {:?}",
            &r.failures[..r.failures.len().min(3)]
        );
    }
    // The untouched transcript, resealed, is still fine.
    assert!(judged(&s, &b, &reseal(&serial)).verified);
}

/// A transcript names its build; judged against another build (here the
/// other revision) it is refused even with a valid checksum.
#[test]
fn a_transcript_is_judged_only_against_the_build_it_names() {
    let Some(q) = support::qemu() else { return };
    let (s, _, serial) = capture(SwitcherKind::Legacy32ToAmd64, &q);
    let report = Report::parse(&serial);
    let named = Scenario::from_boot(report.boot.as_ref().unwrap()).unwrap();
    assert_eq!(named, s, "the BOOT line rebuilds the scenario");
    let mut other = s.clone();
    other.options.revision = Revision::A;
    let ob = build(&other).unwrap();
    let r = judged(&other, &ob, &serial);
    assert!(!r.verified);
    assert!(
        r.failures.iter().any(|f| f.contains("another scenario")),
        "{:?}",
        r.failures
    );
    // The AMD64 host's 64-bit entry survives the round trip.
    let (s64, _, serial64) = capture(SwitcherKind::Amd64ToAmd64, &q);
    let boot = Report::parse(&serial64).boot.unwrap();
    assert!(boot.entry64 > u64::from(u32::MAX), "{boot:?}");
    assert_eq!(Scenario::from_boot(&boot).unwrap(), s64);
}

/// A switcher built with trace characters verifies: those are the only
/// foreign bytes the judge accepts.
#[test]
fn trace_characters_are_the_only_tolerated_foreign_bytes() {
    let Some(q) = support::qemu() else { return };
    let mut s = Scenario::new(SwitcherKind::Legacy32ToAmd64);
    s.trips = 2;
    s.options.trace = true;
    let r = run(&s, &q).unwrap();
    assert!(r.verified, "{:?}", r.failures);
    assert!(!r.run.report.foreign.is_empty(), "trace characters printed");
}

/// A CPU without what the switcher needs is refused before the first
/// call, with a `NOCPU` line naming the feature, a distinct outcome and a
/// valid checksum.
#[test]
fn a_cpu_without_what_the_switcher_needs_is_refused() {
    let Some(q) = support::qemu() else { return };
    for (kind, cpu, feature) in [
        (
            SwitcherKind::Legacy32ToAmd64,
            "qemu64,-pae",
            CpuFeature::Pae,
        ),
        (SwitcherKind::Amd64ToAmd64, "486", CpuFeature::LongMode),
        (SwitcherKind::Amd64ToAmd64, "qemu64,-pae", CpuFeature::Pae),
        (SwitcherKind::PaeToAmd64, "qemu64,-nx", CpuFeature::Nx),
        (SwitcherKind::Legacy32To32, "486", CpuFeature::Fxsr),
    ] {
        let mut s = Scenario::new(kind);
        s.trips = 2;
        let cfg = QemuConfig {
            cpu: Some(cpu.into()),
            ..q.clone()
        };
        let r = run(&s, &cfg).unwrap();
        let what = format!("{} on {cpu}", kind.cli_name());
        assert!(!r.verified, "{what}");
        assert_eq!(
            r.outcome,
            "CpuUnsupported",
            "{what}: {}",
            r.run.transcript()
        );
        let c = r.cpu_refusal().unwrap();
        assert_eq!(c.feature, feature.name(), "{what}");
        assert!(r.run.report.crc_ok(), "{what}: {}", r.run.transcript());
        assert!(r.run.report.summary.is_none(), "{what}: no call was made");
    }
}

/// `line` with each `key=value` of `set` replaced.
fn with_fields(line: &str, set: &[(&str, String)]) -> String {
    let fields: Vec<String> = line
        .trim_end()
        .split(' ')
        .map(|f| match f.split_once('=') {
            Some((k, _)) => match set.iter().find(|(key, _)| *key == k) {
                Some((_, v)) => format!("{k}={v}"),
                None => f.to_owned(),
            },
            None => f.to_owned(),
        })
        .collect();
    format!("{}\n", fields.join(" "))
}

/// A field of a protocol line, as a number.
fn field(line: &str, key: &str) -> u64 {
    line.split(' ')
        .find_map(|f| f.trim_end().strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// The accounts of an NMI storm on two host CPUs (`STORMCPU` lines),
/// forged with a recomputed checksum: an NMI in transit, a CPU whose
/// LINT0 never took an edge, no edge inside any call, accounts that do
/// not add up or disagree with the `CPU` line, a missing account, a PIT
/// edge one instruction late. Each is refused for its own reason. (Two
/// boots of the image give byte-identical transcripts.)
#[test]
fn forged_interleaved_storm_accounts_are_refused() {
    let Some(q) = support::qemu() else { return };
    let mut s = Scenario::new(SwitcherKind::Legacy32ToAmd64);
    (s.trips, s.vcpus, s.cpus, s.nmi_storm) = (40, 2, 2, true);
    let b = build(&s).unwrap();
    let q = QemuConfig { smp: 2, ..q };
    let serial = b.testbed.run(&q).unwrap().serial;
    let v = judged(&s, &b, &serial);
    assert!(v.verified, "{:?}", v.failures);
    let again = b.testbed.run(&q).unwrap().serial;
    assert!(serial == again, "two boots of one image differ");
    let text = String::from_utf8_lossy(&serial).into_owned();
    let account = |cpu: u32| {
        text.lines()
            .find(|l| l.starts_with(&format!("@@STORMCPU cpu={cpu} ")))
            .unwrap()
            .to_owned()
    };
    let (one, zero) = (account(1), account(0));
    let n = |key: &str| field(&one, key);
    let start = "@@STORMCPU cpu=1 ";
    let forge = |set: &[(&str, String)]| replace_line(&serial, start, &with_fields(&one, set));
    let no_edges = |t: Vec<u8>| {
        let set = [("edges", "0".to_owned()), ("hidden", "0".to_owned())];
        replace_line(&t, "@@STORMCPU cpu=0 ", &with_fields(&zero, &set))
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "NMI in transit on CPU 1",
            forge(&[
                ("transit", "1".into()),
                ("host", (n("in_call") - 1).to_string()),
                ("ip", "c0400000".into()),
                ("ctx", "00000001".into()),
            ]),
        ),
        (
            "CPU 1 took no NMI",
            forge(&[
                ("nmis", "0".into()),
                ("in_call", "0".into()),
                ("host", "0".into()),
                ("hidden", n("edges").to_string()),
            ]),
        ),
        (
            "no PIT edge fell inside any round trip",
            no_edges(forge(&[("edges", "0".into()), ("hidden", "0".into())])),
        ),
        (
            "its CPU line has",
            forge(&[("calls", (n("calls") + 1).to_string())]),
        ),
        (
            "NMIs in calls, but",
            forge(&[("host", (n("host") + 1).to_string())]),
        ),
        (
            "do not nest",
            forge(&[("hidden", (n("edges") + 1).to_string())]),
        ),
        (
            "STORMCPU lines for 2 host CPUs",
            replace_line(&serial, start, ""),
        ),
    ];
    for (want, forged) in cases {
        let v = judged(&s, &b, &reseal(&forged));
        assert!(!v.verified, "{want}: judged verified");
        assert!(
            v.failures.iter().any(|f| f.contains(want)),
            "{want}: {:?}",
            v.failures
        );
    }
}
