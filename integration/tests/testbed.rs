//! Boots the generated host kernel under QEMU with a dummy "switcher" and
//! with mutants of it that the testbed must catch.
//!
//! Needs `qemu-system-x86_64`. Without it the QEMU tests print a loud notice
//! and return, unless `CI=true`, where they fail.
// Test helpers outside `#[test]` functions panic on purpose.
#![allow(clippy::expect_used, clippy::panic)]

mod support;

use core::mem::size_of;
use std::time::Instant;

use iced_x86::code_asm::*;
use integration::hostkernel::{
    cookie, BuildError, Expected, HostKernelBuilder, Mapping, Testbed, LAPIC_VIRT, MAGIC_VIRT,
    SEL_DATA32, SEL_DATA32_ALT,
};
use integration::image::ImageError;
use integration::paging::{HostMode, PagingError};
use integration::qemu::{Outcome, QemuConfig, RunResult};
use integration::transcript::Phase;
use zerocopy::IntoBytes;

/// XOR key of the dummy's return value.
const K: u32 = 0x1234_5678;
/// Physical page of the dummy.
const DUMMY_PHYS: u32 = 0x0060_0000;
/// Offset of the cookie inside the dummy's page.
const COOKIE_OFF: u32 = 0x800;
/// Offset of an all-zero IDT pseudo-descriptor inside the dummy's page.
const ZERO_IDTR_OFF: u32 = 0x900;

/// How the dummy misbehaves.
#[derive(Clone, Copy, Debug)]
enum Mutant {
    None,
    ClobberEbx,
    ClobberEbp,
    Cli,
    ChangeDs,
    ChangeFs,
    Cr3Pwt,
    Cr3Other(u32),
    MaskLint0,
    WrongReturn,
    Ud2,
    TripleFault,
    Hang,
}

/// A cdecl `u32 f(u32, u32)` at host-virtual `hc` returning
/// `[cookie] ^ K`, preceded or followed by the mutation. One page: code at 0,
/// the cookie at `COOKIE_OFF`, a zero IDTR image at `ZERO_IDTR_OFF`.
fn dummy(hc: u32, mutant: Mutant) -> Vec<u8> {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(32)?;
        match mutant {
            Mutant::None | Mutant::WrongReturn => {}
            Mutant::ClobberEbx => a.mov(ebx, 0x0bad_0bad)?,
            Mutant::ClobberEbp => a.xor(ebp, ebp)?,
            Mutant::Cli => a.cli()?,
            Mutant::ChangeDs => {
                a.mov(ax, u32::from(SEL_DATA32_ALT))?;
                a.mov(ds, ax)?;
            }
            Mutant::ChangeFs => {
                a.mov(ax, u32::from(SEL_DATA32))?;
                a.mov(fs, ax)?;
            }
            Mutant::Cr3Pwt => {
                a.mov(eax, cr3)?;
                a.or(eax, 8)?;
                a.mov(cr3, eax)?;
            }
            Mutant::Cr3Other(root) => {
                a.mov(eax, root)?;
                a.mov(cr3, eax)?;
            }
            Mutant::MaskLint0 => {
                a.or(
                    dword_ptr(LAPIC_VIRT + apic::reg::LVT_LINT0),
                    apic::lvt::MASKED,
                )?;
            }
            Mutant::Ud2 => {
                // Debug-trace characters first, as a switcher built with tracing prints them.
                a.mov(dx, 0x3f8u32)?;
                for c in *b"AB" {
                    a.mov(al, u32::from(c))?;
                    a.out(dx, al)?;
                }
                a.ud2()?;
            }
            Mutant::TripleFault => {
                a.lidt(ptr(hc + ZERO_IDTR_OFF))?;
                a.int3()?;
            }
            Mutant::Hang => {
                let mut l = a.create_label();
                a.set_label(&mut l)?;
                a.jmp(l)?;
            }
        }
        a.mov(eax, dword_ptr(hc + COOKIE_OFF))?;
        a.xor(eax, K)?;
        if matches!(mutant, Mutant::WrongReturn) {
            a.inc(eax)?;
        }
        a.ret()?;
        a.assemble(u64::from(hc))
    };
    let mut page = build().expect("dummy assembles");
    page.resize(0x1000, 0);
    page
}

/// The standard testbed: the dummy at `hc` (physical `DUMMY_PHYS`), two VCPUs.
fn builder(mode: HostMode, hc: u32, mutant: Mutant, trips: u32) -> HostKernelBuilder {
    HostKernelBuilder::new(mode)
        .blob_mapped("dummy", DUMMY_PHYS, hc, dummy(hc, mutant), true)
        .entry(hc)
        .cookie_at(hc + COOKIE_OFF)
        .expect(Expected::CookieXor(K))
        .vcpus([0x40, 0x40 + 2560])
        .trips(trips)
}

fn run(tb: &Testbed) -> RunResult {
    let r = tb.run(&QemuConfig::default()).expect("QEMU runs");
    eprintln!(
        "{} boot: {:?} in {:.3} s",
        tb.mode,
        r.outcome,
        r.wall.as_secs_f64()
    );
    r
}

fn run_mutant(mode: HostMode, mutant: Mutant) -> (Testbed, RunResult) {
    let tb = builder(mode, DUMMY_PHYS, mutant, 4)
        .build()
        .expect("testbed builds");
    let r = run(&tb);
    (tb, r)
}

fn assert_mismatch(mode: HostMode, mutant: Mutant, names: &[&str]) {
    if support::qemu().is_none() {
        return;
    }
    let (_, r) = run_mutant(mode, mutant);
    assert_eq!(
        r.outcome,
        Outcome::VerificationFailed,
        "{mutant:?}:\n{}",
        r.transcript()
    );
    assert_eq!(r.report.mismatch_names(), names, "{}", r.transcript());
    let m = &r.report.mismatches[0];
    assert_eq!((m.trip, m.vcpu), (0, 0), "caught on the first call");
    assert_eq!(r.report.result, Some(false));
}

fn baseline(mode: HostMode) {
    if support::qemu().is_none() {
        return;
    }
    let tb = builder(mode, DUMMY_PHYS, Mutant::None, 1000)
        .build()
        .expect("testbed builds");
    let start = Instant::now();
    let first = run(&tb);
    let second = run(&tb);
    let wall = start.elapsed().as_secs_f64();
    eprintln!("{mode}: 2 boots in {wall:.3} s ({:.1} boots/s)", 2.0 / wall);
    for r in [&first, &second] {
        assert_eq!(r.outcome, Outcome::Pass, "{}", r.transcript());
        let rep = &r.report;
        assert!(rep.mismatches.is_empty() && rep.ret_failures.is_empty());
        assert!(rep.malformed.is_empty(), "{:?}", rep.malformed);
        assert_eq!(rep.trace, "", "no stray output");
        let boot = rep.boot.as_ref().expect("BOOT line");
        assert_eq!(boot.mode, mode.name());
        assert_eq!(boot.mb_eax, integration::image::MULTIBOOT_BOOTLOADER_MAGIC);
        assert_eq!(boot.items as usize, tb.items.len());
        let host = rep.host.as_ref().expect("HOST line");
        assert_eq!(host.magic, integration::hostkernel::MAGIC_VALUE);
        assert_eq!(host.fs0, integration::hostkernel::FS_MAGIC);
        assert_eq!(host.cr3, tb.addrs.cr3);
        assert_eq!(host.cr4 & 0x20 != 0, mode == HostMode::Pae, "CR4.PAE");
        assert_eq!(host.cr0 & 0x8001_0033, 0x8001_0033, "PG WP NE ET MP PE");
        assert_ne!(host.efer & 1, 0, "EFER.SCE");
        assert_eq!(host.sysenter_cs, 0x08);
        let apic = rep.apic.as_ref().expect("APIC line");
        assert_eq!(
            (apic.lint0, apic.lint1, apic.perf, apic.therm),
            (0x400, 0x400, 0x400, 0x10400)
        );
        let s = rep.summary.as_ref().expect("SUMMARY line");
        assert_eq!(
            (s.trips, s.calls, s.mismatches, s.retfails),
            (1000, 2000, 0, 0)
        );
        assert_eq!(rep.nmi_count, Some(0));
        assert_eq!(rep.vcpus.len(), 2);
        assert!(rep.vcpus.iter().all(|v| v.calls == 1000));
        // Trip lines carry the expected return values.
        for t in &rep.trips {
            assert_eq!(t.ret, cookie(t.trip, t.vcpu) ^ K);
        }
        assert_eq!(rep.trips.len(), 4);
    }
    // icount: identical figures and identical transcripts.
    assert_eq!(first.report.vcpus, second.report.vcpus);
    assert_eq!(first.report.summary, second.report.summary);
    assert_eq!(first.serial, second.serial);
    let s = first.report.summary.as_ref().expect("summary");
    assert_eq!(s.tsc_min, s.tsc_max, "every call costs the same");
    assert_eq!(s.tsc_sum, u64::from(s.tsc_min) * 2000);
}

#[test]
fn legacy32_host_passes_1000_trips_deterministically() {
    baseline(HostMode::Legacy32);
}

#[test]
fn pae_host_passes_1000_trips_deterministically() {
    baseline(HostMode::Pae);
}

#[test]
fn clobbered_ebx_is_caught() {
    assert_mismatch(HostMode::Legacy32, Mutant::ClobberEbx, &["ebx"]);
}

#[test]
fn clobbered_ebp_is_caught() {
    assert_mismatch(HostMode::Pae, Mutant::ClobberEbp, &["ebp"]);
}

#[test]
fn lost_interrupt_flag_is_caught() {
    assert_mismatch(HostMode::Legacy32, Mutant::Cli, &["eflags"]);
}

#[test]
fn changed_ds_is_caught() {
    assert_mismatch(HostMode::Legacy32, Mutant::ChangeDs, &["ds"]);
}

#[test]
fn changed_fs_is_caught() {
    assert_mismatch(HostMode::Pae, Mutant::ChangeFs, &["fs", "fs0"]);
}

#[test]
fn changed_cr3_value_is_caught() {
    assert_mismatch(HostMode::Legacy32, Mutant::Cr3Pwt, &["cr3"]);
    assert_mismatch(HostMode::Pae, Mutant::Cr3Pwt, &["cr3"]);
}

#[test]
fn masked_lint0_is_caught() {
    assert_mismatch(HostMode::Legacy32, Mutant::MaskLint0, &["lvt_lint0"]);
}

#[test]
fn skipped_item_is_not_compared() {
    if support::qemu().is_none() {
        return;
    }
    let tb = builder(HostMode::Legacy32, DUMMY_PHYS, Mutant::ClobberEbx, 2)
        .skip_item("ebx")
        .build()
        .expect("testbed builds");
    let r = run(&tb);
    assert_eq!(r.outcome, Outcome::Pass, "{}", r.transcript());
}

#[test]
fn wrong_return_value_is_caught() {
    if support::qemu().is_none() {
        return;
    }
    let (_, r) = run_mutant(HostMode::Legacy32, Mutant::WrongReturn);
    assert_eq!(r.outcome, Outcome::VerificationFailed, "{}", r.transcript());
    assert!(r.report.mismatches.is_empty());
    let f = &r.report.ret_failures[0];
    assert_eq!(f.want, cookie(0, 0) ^ K);
    assert_eq!(f.got, f.want.wrapping_add(1));
}

#[test]
fn ud2_is_a_host_exception_with_its_eip() {
    if support::qemu().is_none() {
        return;
    }
    let (tb, r) = run_mutant(HostMode::Pae, Mutant::Ud2);
    let Outcome::HostException(Some(e)) = &r.outcome else {
        panic!("{:?}\n{}", r.outcome, r.transcript());
    };
    let code = dummy(DUMMY_PHYS, Mutant::Ud2);
    let ud2 = code
        .windows(2)
        .position(|w| w == [0x0f, 0x0b])
        .expect("ud2") as u32;
    assert_eq!(e.vector, 6);
    assert_eq!(e.eip, DUMMY_PHYS + ud2);
    assert_eq!(tb.symbolize(e.eip), None, "not kernel code");
    assert_eq!(e.phase, Phase::Call);
    assert_eq!((e.trip, e.vcpu), (0, 0));
    assert_eq!(r.report.trace, "AB", "trace characters kept apart");
    assert_eq!(r.report.last_trace_char(), Some('B'));
    assert!(r.report.malformed.is_empty());
}

#[test]
fn zero_limit_idt_is_a_triple_fault() {
    if support::qemu().is_none() {
        return;
    }
    let tb = builder(HostMode::Legacy32, DUMMY_PHYS, Mutant::TripleFault, 4)
        .build()
        .expect("testbed builds");
    let (r, text) = support::run_with_int_log(&tb, "wstb-int");
    assert_eq!(r.outcome, Outcome::TripleFault, "{}", r.transcript());
    assert_eq!(r.status, Some(0));
    assert!(text.contains("Triple fault"), "QEMU's -d int log says why");
}

#[test]
fn foreign_cr3_faults_on_the_magic_page() {
    if support::qemu().is_none() {
        return;
    }
    // The host's page directory without the magic page's PDE, as a blob.
    const OTHER_PD: u32 = 0x0070_0000;
    let probe = builder(HostMode::Legacy32, DUMMY_PHYS, Mutant::None, 1)
        .build()
        .expect("testbed builds");
    let mut pd = probe.page_tables.bytes[..0x1000].to_vec();
    let pde = (MAGIC_VIRT >> 22) as usize * 4;
    pd[pde..pde + 4].fill(0);
    let tb = builder(
        HostMode::Legacy32,
        DUMMY_PHYS,
        Mutant::Cr3Other(OTHER_PD),
        4,
    )
    .blob("other page directory", OTHER_PD, pd)
    .build()
    .expect("testbed builds");
    assert_eq!(
        tb.page_tables, probe.page_tables,
        "same mappings, same tables"
    );
    let r = run(&tb);
    let Outcome::HostException(Some(e)) = &r.outcome else {
        panic!("{:?}\n{}", r.outcome, r.transcript());
    };
    assert_eq!((e.vector, e.cr2), (14, MAGIC_VIRT));
    assert_eq!(e.phase, Phase::Snapshot);
    assert_eq!(tb.symbolize(e.eip).map(|(n, _)| n), Some("snap"));
}

#[test]
fn switcher_at_a_host_virtual_address_updates_the_vm_structure() {
    if support::qemu().is_none() {
        return;
    }
    // A VM structure (CPUM + two CPUMCPUs) at HC 0xC010_0000, physical 9 MiB;
    // the dummy at HC 0xC000_0000, physical 6 MiB. The dummy stores its
    // result into `CpumCpu32::ret_code` of the VCPU arg2 designates.
    const HC: u32 = 0xc000_0000;
    const VM_HC: u32 = 0xc010_0000;
    const VM_PHYS: u32 = 0x0090_0000;
    let first = cpum::CPUM_SIZE as u32;
    let offs = [
        cpum::cpumcpu_offset(first, 0).expect("offset"),
        cpum::cpumcpu_offset(first, 1).expect("offset"),
    ];
    let vm_len = first as usize + 2 * size_of::<cpum::CpumCpu32>();
    let mut vm = vec![0u8; vm_len];
    let cpum0 = cpum::Cpum {
        off_cpumcpu0: first,
        cb_cpumcpu: cpum::CPUMCPU_SIZE as u32,
        cpu_count: 2,
        ..Default::default()
    };
    vm[..first as usize].copy_from_slice(cpum0.as_bytes());
    let ret_code = cpum::layout::disp(cpum::layout::RET_CODE);
    let code = (|| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(32)?;
        a.mov(eax, dword_ptr(HC + COOKIE_OFF))?;
        a.xor(eax, K)?;
        a.mov(edx, dword_ptr(esp + 4))?; // arg1: the VM
        a.mov(ecx, dword_ptr(esp + 8))?; // arg2: offset of the CPUMCPU
        a.mov(dword_ptr(edx + ecx + ret_code), eax)?;
        a.ret()?;
        a.assemble(u64::from(HC))
    })()
    .expect("dummy assembles");
    let mut page = code;
    page.resize(0x1000, 0);
    let trips = 100;
    let tb = HostKernelBuilder::new(HostMode::Pae)
        .blob_mapped("dummy", DUMMY_PHYS, HC, page, true)
        .blob("vm", VM_PHYS, vm)
        .map(Mapping {
            name: "vm".into(),
            virt: VM_HC,
            phys: VM_PHYS,
            len: vm_len as u32,
            writable: true,
        })
        .entry(HC)
        .arg1(VM_HC)
        .vcpus(offs)
        .cookie_at(HC + COOKIE_OFF)
        .expect(Expected::CookieXor(K))
        .trips(trips)
        .dump("vm", VM_HC, vm_len as u32)
        .build()
        .expect("testbed builds");
    assert_eq!(tb.translate(HC + 4).map(|t| t.phys), Some(DUMMY_PHYS + 4));
    assert_eq!(tb.translate(DUMMY_PHYS), None, "not identity mapped");
    let r = run(&tb);
    assert_eq!(r.outcome, Outcome::Pass, "{}", r.transcript());
    let dump = r.report.dump("vm").expect("vm dump");
    assert!(dump.complete);
    let cpum_back: cpum::Cpum = dump.read(0).expect("CPUM decodes");
    assert_eq!(cpum_back, cpum0);
    for (i, off) in offs.iter().enumerate() {
        let vcpu: cpum::CpumCpu32 = dump.read(*off as usize).expect("CPUMCPU decodes");
        assert_eq!(vcpu.ret_code, cookie(trips - 1, i as u32) ^ K, "VCPU {i}");
    }
}

#[test]
fn hooks_drive_arguments_checks_and_failures() {
    if support::qemu().is_none() {
        return;
    }
    // The dummy returns arg1 + arg2. The pre-hook passes the trip as arg1;
    // the expected value is computed by code; the post-hook fails trip 3, VCPU 1.
    let hc = DUMMY_PHYS;
    let code = (|| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(32)?;
        a.mov(eax, dword_ptr(esp + 4))?;
        a.add(eax, dword_ptr(esp + 8))?;
        a.ret()?;
        a.assemble(u64::from(hc))
    })()
    .expect("dummy assembles");
    let tb = HostKernelBuilder::new(HostMode::Legacy32)
        .blob_mapped("dummy", DUMMY_PHYS, hc, code, false)
        .entry(hc)
        .vcpus([100, 200])
        .trips(10)
        .pre_call(|a, ctx| {
            a.mov(eax, dword_ptr(ctx.trip_slot))?;
            a.mov(dword_ptr(ctx.arg1_slot), eax)?;
            let mut skip = a.create_label();
            a.cmp(dword_ptr(ctx.trip_slot), 0)?;
            a.jne(skip)?;
            a.cmp(dword_ptr(ctx.vcpu_slot), 0)?;
            a.jne(skip)?;
            ctx.emit_log(a, "hello from the pre-call hook")?;
            a.set_label(&mut skip)?;
            a.zero_bytes()
        })
        .expect(Expected::Code(Box::new(|a, ctx| {
            a.mov(eax, dword_ptr(ctx.arg1_slot))?;
            a.add(eax, dword_ptr(ctx.arg2_slot))
        })))
        .post_call(|a, ctx| {
            let mut skip = a.create_label();
            a.cmp(dword_ptr(ctx.trip_slot), 3)?;
            a.jne(skip)?;
            a.cmp(dword_ptr(ctx.vcpu_slot), 1)?;
            a.jne(skip)?;
            a.mov(dword_ptr(ctx.hook_fail_slot), 0xfa11u32)?;
            a.set_label(&mut skip)?;
            a.zero_bytes()
        })
        .build()
        .expect("testbed builds");
    assert!(tb.symbol("pre_hook").is_some() && tb.symbol("post_hook").is_some());
    let r = run(&tb);
    assert_eq!(r.outcome, Outcome::VerificationFailed, "{}", r.transcript());
    assert_eq!(
        r.report.logs,
        vec!["hello from the pre-call hook".to_owned()]
    );
    assert!(r.report.ret_failures.is_empty(), "{}", r.transcript());
    let f = &r.report.hook_failures;
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].trip, f[0].vcpu, f[0].code), (3, 1, 0xfa11));
    let s = r.report.summary.as_ref().expect("summary");
    assert_eq!(
        (s.calls, s.hookfails, s.trips),
        (8, 1, 3),
        "stopped at the failure"
    );
    let t = &r.report.trips[3];
    assert_eq!((t.trip, t.vcpu, t.ret), (1, 1, 201));
}

#[test]
fn timeouts_and_refusals_are_outcomes() {
    if support::qemu().is_none() {
        return;
    }
    let tb = builder(HostMode::Legacy32, DUMMY_PHYS, Mutant::Hang, 1)
        .build()
        .expect("testbed builds");
    let cfg = QemuConfig {
        timeout: std::time::Duration::from_millis(600),
        ..QemuConfig::default()
    };
    let r = tb.run(&cfg).expect("QEMU runs");
    assert_eq!(r.outcome, Outcome::Timeout);
    assert_eq!(r.status, None);
    assert!(r.report.boot.is_some(), "the kernel got as far as booting");
    let cfg = QemuConfig {
        cpu: Some("no-such-cpu-model".into()),
        ..QemuConfig::default()
    };
    let r = tb.run(&cfg).expect("QEMU runs");
    let Outcome::QemuRefused(stderr) = &r.outcome else {
        panic!("{:?}", r.outcome);
    };
    assert!(stderr.contains("no-such-cpu-model"), "{stderr}");
}

#[test]
fn x2apic_option_in_the_32_bit_hosts() {
    if support::qemu().is_none() {
        return;
    }
    for mode in [HostMode::Legacy32, HostMode::Pae] {
        let tb = builder(mode, DUMMY_PHYS, Mutant::None, 4)
            .x2apic(true)
            .build()
            .expect("testbed builds");
        assert!(
            tb.items.iter().any(|n| n == "lvt_lint0"),
            "same item names in x2APIC mode"
        );
        for cpu in ["max", "qemu64,+x2apic"] {
            let cfg = QemuConfig {
                cpu: Some(cpu.into()),
                ..QemuConfig::default()
            };
            let r = tb.run(&cfg).expect("QEMU runs");
            // QEMU < 9.0 (TCG) has no x2APIC: the kernel must say so and fail
            // before the first call; a QEMU that has it must pass.
            let absent = r
                .report
                .errors
                .iter()
                .any(|e| e.contains("CPUID.1:ECX.x2APIC (bit 21) is 0"))
                || r.report
                    .cpu_refusal
                    .as_ref()
                    .is_some_and(|c| c.feature == "x2apic");
            if absent {
                assert_eq!(r.outcome, Outcome::VerificationFailed, "{}", r.transcript());
                assert!(r.report.summary.is_none(), "no call was made");
            } else {
                assert_eq!(r.outcome, Outcome::Pass, "{mode} {cpu}: {}", r.transcript());
                let apic = r.report.apic.as_ref().expect("APIC line");
                assert_eq!(apic.base & 0xc00, 0xc00, "EN and EXTD");
                assert_eq!(
                    (apic.lint0, apic.lint1, apic.perf, apic.therm),
                    (0x400, 0x400, 0x400, 0x10400)
                );
            }
        }
    }
}

#[test]
fn hooks_see_a_32_bit_context() {
    if support::qemu().is_none() {
        return;
    }
    let tb = builder(HostMode::Pae, DUMMY_PHYS, Mutant::None, 1)
        .pre_call(|a, ctx| {
            assert_eq!(ctx.bitness, 32);
            ctx.emit_print(a, "@@LOG edx:eax=")?;
            a.mov(edx, 0x0123_4567u32)?;
            a.mov(eax, 0x89ab_cdefu32)?;
            a.call(ctx.puthex64)?;
            a.call(ctx.putnl)
        })
        .build()
        .expect("testbed builds");
    let r = run(&tb);
    assert_eq!(r.outcome, Outcome::Pass, "{}", r.transcript());
    assert_eq!(r.report.logs[0], "edx:eax=0123456789abcdef");
}

// ---- no QEMU needed below -------------------------------------------------------

#[test]
fn layout_symbols_and_tables_are_consistent() {
    for mode in [HostMode::Legacy32, HostMode::Pae] {
        let tb = builder(mode, 0xc000_0000, Mutant::None, 1)
            .build()
            .expect("testbed builds");
        for name in [
            "entry",
            "start",
            "call_site",
            "after_call",
            "snap",
            "putc",
            "exc_common",
            "vec_0e",
            "gdt",
            "idt",
            "tss",
            "ldt",
            "cookie",
            "trip",
            "summary",
        ] {
            assert!(tb.symbol(name).is_some(), "{mode}: symbol {name}");
        }
        assert_eq!(tb.item_index("ebx"), Some(0));
        assert!(tb.item_index("lvt_therm").is_some());
        // Everything the kernel uses is identity mapped; page 0 is not.
        for addr in [
            tb.addrs.code,
            tb.addrs.gdt,
            tb.addrs.idt,
            tb.addrs.stack_top - 4,
        ] {
            assert_eq!(tb.translate(addr).map(|t| t.phys), Some(addr), "{addr:#x}");
        }
        assert_eq!(tb.translate(0), None);
        assert_eq!(
            tb.translate(MAGIC_VIRT).map(|t| t.phys),
            Some(tb.addrs.magic_page)
        );
        assert_eq!(
            tb.translate(0xc000_0010).map(|t| t.phys),
            Some(DUMMY_PHYS + 0x10)
        );
        let mut regions = tb.layout.clone();
        regions.sort_by_key(|r| r.start);
        for w in regions.windows(2) {
            assert!(w[0].end <= w[1].start, "{:?} overlaps {:?}", w[0], w[1]);
        }
        assert_eq!(&tb.image[..4], &0x1bad_b002u32.to_le_bytes());
        let gdb = tb.gdb_commands();
        assert!(gdb.contains("target remote :1234"));
        assert!(gdb.contains(&format!(
            "set $call_site = {:#010x}",
            tb.symbol("call_site").unwrap_or(0)
        )));
    }
}

#[test]
fn bad_configurations_are_typed_errors() {
    // A blob on top of the kernel.
    let err = builder(HostMode::Legacy32, DUMMY_PHYS, Mutant::None, 1)
        .blob("intruder", 0x0010_1800, vec![1, 2, 3])
        .build()
        .expect_err("overlap");
    assert!(
        matches!(&err, BuildError::Image(ImageError::Overlap { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("intruder"), "{err}");
    // A mapping over the kernel's identity map.
    let err = builder(HostMode::Pae, DUMMY_PHYS, Mutant::None, 1)
        .map(Mapping {
            name: "clash".into(),
            virt: 0x0020_0000,
            phys: 0x0080_0000,
            len: 0x1000,
            writable: true,
        })
        .build()
        .expect_err("conflict");
    assert!(
        matches!(&err, BuildError::Paging(PagingError::Conflict { .. })),
        "{err}"
    );
    // An unmapped entry.
    let err = HostKernelBuilder::new(HostMode::Legacy32)
        .entry(0x0800_0000)
        .vcpus([0])
        .build()
        .expect_err("unmapped");
    assert!(
        matches!(
            err,
            BuildError::Unmapped {
                addr: 0x0800_0000,
                ..
            }
        ),
        "{err}"
    );
    // A read-only cookie address.
    let err = builder(HostMode::Legacy32, DUMMY_PHYS, Mutant::None, 1)
        .cookie_at(MAGIC_VIRT)
        .build()
        .expect_err("read-only");
    assert!(matches!(err, BuildError::ReadOnly { .. }), "{err}");
    // Unknown item, no VCPUs, no entry, zero trips, bad dump name.
    let err = builder(HostMode::Legacy32, DUMMY_PHYS, Mutant::None, 1)
        .skip_item("eax")
        .build()
        .expect_err("unknown item");
    assert!(
        matches!(&err, BuildError::UnknownItem(n) if n == "eax"),
        "{err}"
    );
    assert!(matches!(
        HostKernelBuilder::new(HostMode::Pae).entry(0x1000).build(),
        Err(BuildError::NoVcpus)
    ));
    assert!(matches!(
        HostKernelBuilder::new(HostMode::Pae).vcpus([1]).build(),
        Err(BuildError::MissingEntry)
    ));
    assert!(matches!(
        builder(HostMode::Pae, DUMMY_PHYS, Mutant::None, 0).build(),
        Err(BuildError::ZeroTrips(0))
    ));
    assert!(matches!(
        builder(HostMode::Pae, DUMMY_PHYS, Mutant::None, 1)
            .dump("two words", DUMMY_PHYS, 4)
            .build(),
        Err(BuildError::BadName { .. })
    ));
    // 64-bit values a 32-bit host cannot take.
    for (what, b) in [
        (
            "arg1",
            builder(HostMode::Pae, DUMMY_PHYS, Mutant::None, 1).arg1_64(1 << 32),
        ),
        (
            "cookie address",
            builder(HostMode::Pae, DUMMY_PHYS, Mutant::None, 1).cookie_at64(1 << 40),
        ),
        (
            "dump address",
            builder(HostMode::Legacy32, DUMMY_PHYS, Mutant::None, 1).dump64("x", 1 << 33, 4),
        ),
    ] {
        let err = b.build().expect_err("too wide");
        assert!(
            matches!(&err, BuildError::TooWide { what: w, .. } if *w == what),
            "{err}"
        );
    }
}
