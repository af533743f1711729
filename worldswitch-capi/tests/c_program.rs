//! End to end through C: `tests/c/embed.c` is compiled with the system C
//! compiler against `include/worldswitch.h` and the static library, builds
//! a core at addresses of its own and writes its images; the testbed checks
//! they are byte for byte the images it boots, boots them under QEMU and the
//! run verifies.
//!
//! Under `CI=true` a missing C compiler, static library or QEMU fails the
//! test; elsewhere it is skipped with a notice on stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration::qemu::{find_qemu, QemuConfig};
use integration::scenario::{build_over, run_built, Scenario};
use vmm::{HcAddr, PhysAddr, Placement, Purpose, RcAddr, SwitcherKind, Vmm};

/// Fails under `CI=true`; elsewhere prints a notice libtest does not capture.
fn skip(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {why}");
    }
    let notice = format!("\n!!! SKIPPING the C embedding test: {why}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), notice.as_bytes());
}

/// The static library cargo built with this test: in `deps/` beside the
/// test binary (where `cargo test` writes it), else in the profile
/// directory (where `cargo build` copies it).
fn static_lib() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    let found = [deps, deps.parent()?]
        .into_iter()
        .map(|d| d.join("libworldswitch_capi.a"))
        .find(|lib| lib.exists());
    found
}

/// Compiles `tests/c/embed.c`; `None` (skipped) without a C compiler.
fn compile(out: &Path) -> Option<PathBuf> {
    let Some(lib) = static_lib() else {
        skip("libworldswitch_capi.a was not built next to the test binary");
        return None;
    };
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = out.join("embed");
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg("-I")
        .arg(dir.join("include"))
        .arg(dir.join("tests/c/embed.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-o"])
        .arg(&exe)
        .status();
    match status {
        Ok(s) if s.success() => Some(exe),
        Ok(s) => panic!("{cc} failed on embed.c: {s}"),
        Err(e) => {
            skip(&format!("no C compiler ({cc}: {e})"));
            None
        }
    }
}

/// `key value` lines of `info.txt`; repeated keys collect every value.
fn info(out: &Path) -> BTreeMap<String, Vec<u64>> {
    let text = std::fs::read_to_string(out.join("info.txt")).unwrap();
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in text.lines() {
        let (k, v) = line.split_once(' ').unwrap();
        let v = v
            .strip_prefix("0x")
            .map_or_else(|| v.parse(), |h| u64::from_str_radix(h, 16))
            .unwrap();
        m.entry(k.into()).or_default().push(v);
    }
    m
}

fn one(m: &BTreeMap<String, Vec<u64>>, k: &str) -> u64 {
    m.get(k)
        .and_then(|v| v.first())
        .copied()
        .unwrap_or_else(|| panic!("{k} missing"))
}

/// The table pages `vmm` uses in set `which`, as (physical address, bytes).
fn pages_of(vmm: &Vmm, which: Purpose) -> Vec<(u64, Vec<u8>)> {
    vmm.table_pages(which)
        .into_iter()
        .map(|(p, b)| (p.0, b.to_vec()))
        .collect()
}

/// The pages the C program wrote for a set.
fn c_pages(out: &Path, file: &str, phys: &[u64]) -> Vec<(u64, Vec<u8>)> {
    let bytes = std::fs::read(out.join(file)).unwrap();
    assert_eq!(bytes.len(), phys.len() * 4096, "{file}");
    phys.iter()
        .zip(bytes.chunks(4096))
        .map(|(p, b)| (*p, b.to_vec()))
        .collect()
}

#[test]
fn a_c_embedder_builds_images_the_testbed_boots() {
    let out = std::env::temp_dir().join(format!("ws-capi-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let Some(exe) = compile(&out) else { return };
    let run = Command::new(&exe).arg(&out).output().unwrap();
    assert!(
        run.status.success(),
        "embed failed: {}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let m = info(&out);
    let kind = SwitcherKind::ALL
        .into_iter()
        .find(|k| *k as u64 == one(&m, "kind"))
        .unwrap();
    assert_eq!(kind, SwitcherKind::PaeToAmd64);
    let placement = Placement {
        code_hc: HcAddr(one(&m, "code_hc")),
        code_phys: PhysAddr(one(&m, "code_phys")),
        hma_rc: RcAddr(one(&m, "hma_rc") as u32),
        hma_hc: HcAddr(one(&m, "hma_hc")),
        hma_phys: PhysAddr(one(&m, "hma_phys")),
        tables_phys: PhysAddr(one(&m, "tables_phys")),
    };
    // Addresses of the C program's own, not the testbed's defaults.
    assert_ne!(placement, Placement::default());
    assert_eq!(placement.code_phys, PhysAddr(0x0080_0000));
    let core = std::fs::read(out.join("core.bin")).unwrap();
    let hma = std::fs::read(out.join("hma.bin")).unwrap();
    let tables = c_pages(&out, "tables.bin", &m["table"]);
    let hyper = c_pages(&out, "hyper.bin", &m["hyper"]);
    let prom = std::fs::read_to_string(out.join("stam.prom")).unwrap();
    assert!(prom.contains("/VMM/Switcher/ToGC"), "{prom}");

    let Some(q) = find_qemu()
        .map(|_| QemuConfig::default())
        .map_err(|e| skip(&e.to_string()))
        .ok()
    else {
        return;
    };
    let mut s = Scenario::new(kind);
    s.placement = placement;
    s.trips = 100;
    let built = build_over(&s, |cfg| {
        let mut vmm = Vmm::new(cfg)?;
        vmm.activate(kind)?;
        // What the testbed boots is exactly what the C program made.
        assert_eq!(vmm.config().placement, placement);
        assert!(
            vmm.core_code() == core,
            "core code differs from the C program's"
        );
        assert!(vmm.hma() == hma, "HMA differs from the C program's");
        let hma_pages: Vec<u64> = vmm.hma_pages().iter().map(|p| p.0).collect();
        assert_eq!(hma_pages, m["hma_page"], "HMA pages differ");
        assert!(
            pages_of(&vmm, Purpose::Tables) == tables,
            "intermediate tables differ"
        );
        assert!(
            pages_of(&vmm, Purpose::HyperTables) == hyper,
            "hyper tables differ"
        );
        assert_eq!(
            vmm.switcher(kind)?.entries.r0_host_to_guest_hc.0,
            one(&m, "entry")
        );
        assert_eq!(vmm.vm_addrs().0 .0, one(&m, "vm_hc"));
        assert_eq!(u64::from(vmm.vcpu_arg(1).unwrap()), one(&m, "vcpu1_arg"));
        Ok(vmm)
    })
    .unwrap();
    let r = run_built(&s, &built, &q).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    assert!(r.verified, "{:?} {:?}", r.run.outcome, r.failures);
    assert_eq!(r.round_trips, 200);
}
