//! Boots the AMD64 host kernel (`HostMode::Amd64`) under QEMU with a dummy
//! 64-bit "switcher" (a System V function at a high canonical address) and
//! with mutants of it that the testbed must catch.
//!
//! Needs `qemu-system-x86_64`. Without it the QEMU tests print a loud notice
//! and return, unless `CI=true`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Instant;

use iced_x86::code_asm::*;
use integration::hostkernel::{
    cookie, pattern64, BuildError, Expected, HostKernelBuilder, Mapping64, SnapItem, SnapItem64,
    SnapSource, SnapSource64, Testbed, FS_BASE64, FS_MAGIC, GS_BASE64, KERNEL_GS_BASE64,
    LAPIC_VIRT, LSTAR_VALUE, MAGIC_VALUE, MAGIC_VIRT, MSR_GS_BASE, PATTERN_RBX, SEL64_CODE,
    SEL64_DATA, SEL64_LDT, SEL64_TSS, SFMASK_VALUE, STAR_VALUE,
};
use integration::paging::{HostMode, PagingError};
use integration::qemu::{Outcome, QemuConfig, RunResult};
use integration::transcript::Phase;

/// XOR key of the dummy's return value.
const K: u32 = 0x1234_5678;
/// Where the dummy lives: a high canonical HC address, as AMD64 kernels map modules.
const HC: u64 = 0xffff_ffff_c040_0000;
/// Physical page of the dummy.
const DUMMY_PHYS: u32 = 0x0060_0000;
/// Offset of the cookie inside the dummy's page.
const COOKIE_OFF: u64 = 0x800;
/// Offset of an all-zero IDT pseudo-descriptor inside the dummy's page.
const ZERO_IDTR_OFF: u64 = 0x900;

/// How the dummy misbehaves.
#[derive(Clone, Copy, Debug)]
enum Mutant {
    None,
    ClobberRbx,
    ClobberR12,
    ClobberR15,
    ReloadFs,
    GsBaseWrmsr,
    Cli,
    MaskLint0,
    MaskLint0Msr,
    WrongReturn,
    Ud2,
    TripleFault,
}

/// A System V `u32 f(u64, u32)` at `hc` returning `[cookie] ^ K`, preceded by
/// the mutation. One page: code at 0, the cookie at `COOKIE_OFF`, a zero
/// IDTR image at `ZERO_IDTR_OFF`.
fn dummy(hc: u64, mutant: Mutant) -> Vec<u8> {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        match mutant {
            Mutant::None | Mutant::WrongReturn => {}
            Mutant::ClobberRbx => a.mov(rbx, 0x0bad_0bad_0bad_0badu64)?,
            Mutant::ClobberR12 => a.xor(r12d, r12d)?,
            Mutant::ClobberR15 => a.not(r15)?,
            Mutant::ReloadFs => {
                // The same selector the host has: only FS.base changes.
                a.mov(ax, u32::from(SEL64_DATA))?;
                a.mov(fs, ax)?;
            }
            Mutant::GsBaseWrmsr => {
                a.mov(ecx, MSR_GS_BASE)?;
                a.rdmsr()?;
                a.xor(eax, 0x1000)?;
                a.wrmsr()?;
            }
            Mutant::Cli => a.cli()?,
            Mutant::MaskLint0 => {
                a.mov(eax, LAPIC_VIRT + apic::reg::LVT_LINT0)?;
                a.or(dword_ptr(rax), apic::lvt::MASKED)?;
            }
            Mutant::MaskLint0Msr => {
                a.mov(ecx, apic::x2apic_msr(apic::reg::LVT_LINT0))?;
                a.rdmsr()?;
                a.or(eax, apic::lvt::MASKED)?;
                a.wrmsr()?;
            }
            Mutant::Ud2 => {
                a.mov(dx, 0x3f8u32)?;
                for c in *b"AB" {
                    a.mov(al, u32::from(c))?;
                    a.out(dx, al)?;
                }
                a.ud2()?;
            }
            Mutant::TripleFault => {
                a.mov(rax, hc + ZERO_IDTR_OFF)?;
                a.lidt(ptr(rax))?;
                a.int3()?;
            }
        }
        a.mov(rax, hc + COOKIE_OFF)?;
        a.mov(eax, dword_ptr(rax))?;
        a.xor(eax, K)?;
        if matches!(mutant, Mutant::WrongReturn) {
            a.inc(eax)?;
        }
        a.ret()?;
        a.assemble(hc)
    };
    let mut page = build().expect("dummy assembles");
    page.resize(0x1000, 0);
    page
}

/// The standard AMD64 testbed: the dummy at `HC` (physical `DUMMY_PHYS`), two VCPUs.
fn builder(mutant: Mutant, trips: u32) -> HostKernelBuilder {
    HostKernelBuilder::new(HostMode::Amd64)
        .blob_mapped64("dummy", DUMMY_PHYS, HC, dummy(HC, mutant), true)
        .entry64(HC)
        .cookie_at64(HC + COOKIE_OFF)
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

fn run_mutant(mutant: Mutant) -> (Testbed, RunResult) {
    let tb = builder(mutant, 4).build().expect("testbed builds");
    let r = run(&tb);
    (tb, r)
}

fn assert_mismatch(mutant: Mutant, names: &[&str]) -> RunResult {
    let (_, r) = run_mutant(mutant);
    assert_eq!(
        r.outcome,
        Outcome::VerificationFailed,
        "{mutant:?}:\n{}",
        r.transcript()
    );
    assert!(r.report.malformed.is_empty(), "{:?}", r.report.malformed);
    assert_eq!(r.report.mismatch_names(), names, "{}", r.transcript());
    let m = &r.report.mismatches[0];
    assert_eq!((m.trip, m.vcpu), (0, 0), "caught on the first call");
    assert_eq!(r.report.result, Some(false));
    r
}

#[test]
fn amd64_host_passes_1000_trips_deterministically() {
    if support::qemu().is_none() {
        return;
    }
    let tb = builder(Mutant::None, 1000).build().expect("testbed builds");
    let start = Instant::now();
    let first = run(&tb);
    let second = run(&tb);
    let wall = start.elapsed().as_secs_f64();
    eprintln!("amd64: 2 boots in {wall:.3} s ({:.1} boots/s)", 2.0 / wall);
    for r in [&first, &second] {
        assert_eq!(r.outcome, Outcome::Pass, "{}", r.transcript());
        let rep = &r.report;
        assert!(rep.mismatches.is_empty() && rep.ret_failures.is_empty());
        assert!(rep.malformed.is_empty(), "{:?}", rep.malformed);
        assert_eq!(rep.trace, "", "no stray output");
        let boot = rep.boot.as_ref().expect("BOOT line");
        assert_eq!(boot.mode, "amd64");
        assert_eq!(boot.entry64, HC);
        assert_eq!(boot.mb_eax, integration::image::MULTIBOOT_BOOTLOADER_MAGIC);
        assert_eq!(boot.items as usize, tb.items.len());
        let host = rep.host.as_ref().expect("HOST line");
        assert_eq!(host.magic, MAGIC_VALUE);
        assert_eq!(host.fs0, FS_MAGIC);
        assert_eq!(host.cr3, tb.addrs.cr3);
        assert_eq!(host.cr4 & 0xa0, 0xa0, "CR4.PAE|PGE");
        assert_eq!(host.cr0 & 0x8001_0033, 0x8001_0033, "PG WP NE ET MP PE");
        // SCE, LME, LMA, NXE.
        assert_eq!(host.efer & 0xd01, 0xd01, "EFER {:#x}", host.efer);
        assert_eq!(host.sysenter_cs, u32::from(SEL64_CODE));
        let h64 = rep.host64.as_ref().expect("HOST64 line");
        assert_eq!(
            (h64.fs_base, h64.gs_base, h64.kernel_gs_base),
            (FS_BASE64, GS_BASE64, KERNEL_GS_BASE64)
        );
        assert_eq!(
            (h64.star, h64.lstar, h64.sfmask, h64.cr8),
            (STAR_VALUE, LSTAR_VALUE, SFMASK_VALUE, 0)
        );
        let apic = rep.apic.as_ref().expect("APIC line");
        assert_eq!(
            (apic.lint0, apic.lint1, apic.perf, apic.therm),
            (0x400, 0x400, 0x400, 0x10400)
        );
        assert_eq!(apic.base & 0x400, 0, "xAPIC mode");
        let s = rep.summary.as_ref().expect("SUMMARY line");
        assert_eq!(
            (s.trips, s.calls, s.mismatches, s.retfails),
            (1000, 2000, 0, 0)
        );
        assert_eq!(rep.nmi_count, Some(0));
        assert_eq!(rep.vcpus.len(), 2);
        assert!(rep.vcpus.iter().all(|v| v.calls == 1000));
        for t in &rep.trips {
            assert_eq!(t.ret, cookie(t.trip, t.vcpu) ^ K);
        }
        assert_eq!(rep.trips.len(), 4);
    }
    assert_eq!(first.report.vcpus, second.report.vcpus);
    assert_eq!(first.report.summary, second.report.summary);
    assert_eq!(first.serial, second.serial, "byte-identical transcripts");
    let s = first.report.summary.as_ref().expect("summary");
    assert_eq!(s.tsc_min, s.tsc_max, "every call costs the same");
    assert_eq!(s.tsc_sum, u64::from(s.tsc_min) * 2000);
}

#[test]
fn clobbered_rbx_r12_r15_are_caught() {
    if support::qemu().is_none() {
        return;
    }
    let r = assert_mismatch(Mutant::ClobberRbx, &["rbx"]);
    let m = &r.report.mismatches[0];
    assert_eq!(m.before64, pattern64(cookie(0, 0), PATTERN_RBX));
    assert_eq!(m.after64, 0x0bad_0bad_0bad_0bad);
    assert_mismatch(Mutant::ClobberR12, &["r12"]);
    let r = assert_mismatch(Mutant::ClobberR15, &["r15"]);
    let m = &r.report.mismatches[0];
    assert_eq!(m.after64, !m.before64, "all 64 bits compared");
}

#[test]
fn fs_reload_loses_fs_base_and_is_caught() {
    if support::qemu().is_none() {
        return;
    }
    // Same selector, so `fs` itself does not change: the base does.
    let r = assert_mismatch(Mutant::ReloadFs, &["fs_base", "fs0"]);
    let m = &r.report.mismatches[0];
    assert_eq!((m.before64, m.after64), (FS_BASE64, 0));
}

#[test]
fn gs_base_changed_by_wrmsr_is_caught() {
    if support::qemu().is_none() {
        return;
    }
    let r = assert_mismatch(Mutant::GsBaseWrmsr, &["gs_base", "gs0"]);
    let m = &r.report.mismatches[0];
    assert_eq!((m.before64, m.after64), (GS_BASE64, GS_BASE64 ^ 0x1000));
}

#[test]
fn lost_interrupt_flag_and_masked_lint0_are_caught() {
    if support::qemu().is_none() {
        return;
    }
    let r = assert_mismatch(Mutant::Cli, &["rflags"]);
    let m = &r.report.mismatches[0];
    assert_eq!(m.before64 ^ m.after64, 0x200, "IF only");
    assert_mismatch(Mutant::MaskLint0, &["lvt_lint0"]);
}

#[test]
fn wrong_return_value_is_caught() {
    if support::qemu().is_none() {
        return;
    }
    let (_, r) = run_mutant(Mutant::WrongReturn);
    assert_eq!(r.outcome, Outcome::VerificationFailed, "{}", r.transcript());
    assert!(r.report.mismatches.is_empty());
    let f = &r.report.ret_failures[0];
    assert_eq!(f.want, cookie(0, 0) ^ K);
    assert_eq!(f.got, f.want.wrapping_add(1));
}

#[test]
fn ud2_is_a_host_exception_with_its_64_bit_rip() {
    if support::qemu().is_none() {
        return;
    }
    let (tb, r) = run_mutant(Mutant::Ud2);
    let Outcome::HostException(Some(e)) = &r.outcome else {
        panic!("{:?}\n{}", r.outcome, r.transcript());
    };
    let code = dummy(HC, Mutant::Ud2);
    let ud2 = code
        .windows(2)
        .position(|w| w == [0x0f, 0x0b])
        .expect("ud2") as u64;
    assert_eq!(e.vector, 6);
    assert_eq!(e.rip, HC + ud2);
    assert_eq!(u64::from(e.eip), (HC + ud2) & 0xffff_ffff);
    assert_eq!(e.cs, u32::from(SEL64_CODE));
    assert_eq!(tb.symbolize(e.eip), None, "not kernel code");
    assert_eq!(e.phase, Phase::Call);
    assert_eq!((e.trip, e.vcpu), (0, 0));
    // The return address of the call is on the stack the fault interrupted.
    let fault_rsp = e.rsp.expect("rsp field");
    assert_eq!(fault_rsp % 16, 8, "RSP at the call was 16-byte aligned");
    assert_eq!(fault_rsp + 8, u64::from(tb.addrs.stack_top));
    assert_eq!(r.report.trace, "AB", "trace characters kept apart");
    assert!(r.report.malformed.is_empty(), "{:?}", r.report.malformed);
}

#[test]
fn zero_limit_idt_is_a_triple_fault() {
    if support::qemu().is_none() {
        return;
    }
    let tb = builder(Mutant::TripleFault, 4)
        .build()
        .expect("testbed builds");
    let (r, text) = support::run_with_int_log(&tb, "wstb64-int");
    assert_eq!(r.outcome, Outcome::TripleFault, "{}", r.transcript());
    assert_eq!(r.status, Some(0));
    assert!(text.contains("Triple fault"), "QEMU's -d int log says why");
}

#[test]
fn switcher_gets_a_64_bit_vm_address_and_updates_the_vm_structure() {
    if support::qemu().is_none() {
        return;
    }
    // A "VM structure" at HC 0xffff_ffff_c050_0000 (physical 9 MiB). The
    // dummy stores `cookie ^ K` at [RDI + RSI + 0x10] and returns it.
    const VM_HC: u64 = 0xffff_ffff_c050_0000;
    const VM_PHYS: u32 = 0x0090_0000;
    const VM_LEN: u32 = 0x100;
    let code = (|| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        a.mov(rax, HC + COOKIE_OFF)?;
        a.mov(eax, dword_ptr(rax))?;
        a.xor(eax, K)?;
        a.mov(dword_ptr(rdi + rsi + 0x10), eax)?;
        a.mov(qword_ptr(rdi + rsi + 0x18), rdi)?;
        a.ret()?;
        a.assemble(HC)
    })()
    .expect("dummy assembles");
    let mut page = code;
    page.resize(0x1000, 0);
    let trips = 100;
    let offs = [0u32, 0x40];
    let tb = HostKernelBuilder::new(HostMode::Amd64)
        .blob_mapped64("dummy", DUMMY_PHYS, HC, page, true)
        .blob("vm", VM_PHYS, vec![0; VM_LEN as usize])
        .map64(Mapping64 {
            name: "vm".into(),
            virt: VM_HC,
            phys: VM_PHYS,
            len: VM_LEN,
            writable: true,
        })
        .entry64(HC)
        .arg1_64(VM_HC)
        .vcpus(offs)
        .cookie_at64(HC + COOKIE_OFF)
        .expect(Expected::CookieXor(K))
        .trips(trips)
        .dump64("vm", VM_HC, VM_LEN)
        .build()
        .expect("testbed builds");
    assert_eq!(tb.translate64(HC + 4).map(|t| t.phys), Some(DUMMY_PHYS + 4));
    assert_eq!(tb.translate64(VM_HC).map(|t| t.phys), Some(VM_PHYS));
    let r = run(&tb);
    assert_eq!(r.outcome, Outcome::Pass, "{}", r.transcript());
    let dump = r.report.dump("vm").expect("vm dump");
    assert!(dump.complete);
    assert_eq!(dump.addr64, VM_HC);
    for (i, off) in offs.iter().enumerate() {
        let off = *off as usize;
        assert_eq!(
            dump.u32_at(off + 0x10),
            Some(cookie(trips - 1, i as u32) ^ K),
            "VCPU {i}"
        );
        assert_eq!(dump.read::<u64>(off + 0x18), Some(VM_HC), "RDI is 64-bit");
    }
}

#[test]
fn hooks_run_as_64_bit_code() {
    if support::qemu().is_none() {
        return;
    }
    // The dummy returns arg1 (low half) + arg2 + (arg1 >> 32). The pre-hook
    // passes (trip << 32) | 7 as arg1; the expected value is computed by
    // code; the post-hook fails trip 3, VCPU 1.
    let code = (|| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        a.mov(rax, rdi)?;
        a.shr(rax, 32)?;
        a.add(eax, edi)?;
        a.add(eax, esi)?;
        a.ret()?;
        a.assemble(HC)
    })()
    .expect("dummy assembles");
    let tb = HostKernelBuilder::new(HostMode::Amd64)
        .blob_mapped64("dummy", DUMMY_PHYS, HC, code, false)
        .entry64(HC)
        .arg1_64(0xdead_beef_0000_0000)
        .vcpus([100, 200])
        .trips(10)
        .pre_call(|a, ctx| {
            assert_eq!(ctx.bitness, 64);
            a.mov(eax, dword_ptr(ctx.trip_slot))?;
            a.shl(rax, 32)?;
            a.or(rax, 7)?;
            a.mov(qword_ptr(ctx.arg1_slot), rax)?;
            let mut skip = a.create_label();
            a.cmp(dword_ptr(ctx.trip_slot), 0)?;
            a.jne(skip)?;
            a.cmp(dword_ptr(ctx.vcpu_slot), 0)?;
            a.jne(skip)?;
            ctx.emit_log(a, "hello from a 64-bit hook")?;
            ctx.emit_print(a, "@@LOG rsp=")?;
            a.mov(rax, rsp)?;
            a.call(ctx.puthex64)?;
            a.call(ctx.putnl)?;
            a.set_label(&mut skip)?;
            a.zero_bytes()
        })
        .expect(Expected::Code(Box::new(|a, ctx| {
            a.mov(eax, dword_ptr(ctx.arg1_slot + 4))?;
            a.add(eax, dword_ptr(ctx.arg1_slot))?;
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
    assert_eq!(r.report.logs[0], "hello from a 64-bit hook");
    let hook_rsp =
        u64::from_str_radix(r.report.logs[1].trim_start_matches("rsp="), 16).expect("hex");
    assert_eq!(hook_rsp % 16, 0, "hooks start with an aligned stack");
    assert!(r.report.ret_failures.is_empty(), "{}", r.transcript());
    let f = &r.report.hook_failures;
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].trip, f[0].vcpu, f[0].code), (3, 1, 0xfa11));
    let s = r.report.summary.as_ref().expect("summary");
    assert_eq!((s.calls, s.hookfails, s.trips), (8, 1, 3));
    let t = &r.report.trips[3];
    assert_eq!((t.trip, t.vcpu, t.ret), (1, 1, 1 + 7 + 200));
}

#[test]
fn custom_64_bit_item_and_skips() {
    if support::qemu().is_none() {
        return;
    }
    // R15 clobbered but skipped; a custom item watching KERNEL_GS_BASE.
    let tb = builder(Mutant::ClobberR15, 2)
        .skip_item("r15")
        .snapshot_item64(SnapItem64::new(
            "kgs_custom",
            SnapSource64::Msr(integration::hostkernel::MSR_KERNEL_GS_BASE),
        ))
        .build()
        .expect("testbed builds");
    assert_eq!(tb.items.last().map(String::as_str), Some("kgs_custom"));
    let r = run(&tb);
    assert_eq!(r.outcome, Outcome::Pass, "{}", r.transcript());
}

#[test]
fn x2apic_option_in_the_amd64_host() {
    if support::qemu().is_none() {
        return;
    }
    let tb = builder(Mutant::None, 4)
        .x2apic(true)
        .build()
        .expect("testbed builds");
    let cfg = QemuConfig {
        cpu: Some("max".into()),
        ..QemuConfig::default()
    };
    let r = tb.run(&cfg).expect("QEMU runs");
    if judge_x2apic(&r) {
        // x2APIC present (QEMU >= 9.0): the LVTs are compared through the MSRs.
        let tb = builder(Mutant::MaskLint0Msr, 4)
            .x2apic(true)
            .build()
            .expect("testbed builds");
        let r = tb.run(&cfg).expect("QEMU runs");
        assert_eq!(r.outcome, Outcome::VerificationFailed, "{}", r.transcript());
        assert_eq!(r.report.mismatch_names(), ["lvt_lint0"]);
    }
}

/// QEMU < 9.0 (TCG) has no x2APIC: the kernel must say so and fail before
/// the first call; a QEMU that has it must pass in x2APIC mode. Returns
/// whether x2APIC was present.
fn judge_x2apic(r: &RunResult) -> bool {
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
        assert!(r.report.boot.is_some());
        assert!(r.report.summary.is_none(), "no call was made");
        eprintln!("x2APIC absent in this QEMU: {}", r.report.errors[0]);
        false
    } else {
        assert_eq!(r.outcome, Outcome::Pass, "{}", r.transcript());
        let host = r.report.host.as_ref().expect("HOST line");
        let on = integration::hostkernel::FEATURE_X2APIC_ON;
        assert_eq!(host.features & on, on);
        let apic = r.report.apic.as_ref().expect("APIC line");
        assert_eq!(apic.base & 0xc00, 0xc00, "EN and EXTD");
        assert_eq!(
            (apic.lint0, apic.lint1, apic.perf, apic.therm),
            (0x400, 0x400, 0x400, 0x10400)
        );
        true
    }
}

// ---- no QEMU needed below -------------------------------------------------------

#[test]
fn amd64_layout_symbols_and_tables_are_consistent() {
    let tb = builder(Mutant::None, 1).build().expect("testbed builds");
    assert_eq!(tb.mode, HostMode::Amd64);
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
        assert!(tb.symbol(name).is_some(), "symbol {name}");
    }
    for (i, name) in ["rbx", "rbp", "r12", "r13", "r14", "r15", "rsp", "rflags"]
        .iter()
        .enumerate()
    {
        assert_eq!(tb.item_index(name), Some(i));
    }
    for name in [
        "fs_base",
        "gs_base",
        "kernel_gs_base",
        "tss_desc",
        "cr8",
        "efer",
        "star",
        "lstar",
        "sfmask",
        "lvt_therm",
        "apic_base_msr",
        "magic",
        "dr7",
    ] {
        assert!(tb.item_index(name).is_some(), "item {name}");
    }
    for addr in [
        tb.addrs.code,
        tb.addrs.gdt,
        tb.addrs.idt,
        tb.addrs.stack_top - 8,
    ] {
        assert_eq!(tb.translate(addr).map(|t| t.phys), Some(addr), "{addr:#x}");
    }
    assert_eq!(tb.translate(0), None);
    assert_eq!(
        tb.translate(MAGIC_VIRT).map(|t| t.phys),
        Some(tb.addrs.magic_page)
    );
    assert_eq!(
        tb.translate64(HC + 0x10).map(|t| t.phys),
        Some(DUMMY_PHYS + 0x10)
    );
    assert_eq!(
        tb.translate64(FS_BASE64).map(|t| t.phys),
        Some(tb.addrs.fs_page)
    );
    assert_eq!(tb.translate64(0x0000_8000_0000_0000), None);
    // The GDT: 64-bit code (L=1), the 16-byte TSS and LDT descriptors.
    let gdt_off = (tb.addrs.gdt - integration::image::LOAD_ADDR) as usize;
    let entry = |sel: u16| {
        let o = gdt_off + usize::from(sel);
        u64::from_le_bytes(tb.image[o..o + 8].try_into().expect("8 bytes"))
    };
    assert_eq!(entry(SEL64_CODE) >> 52 & 0xf, 0xa, "G and L");
    assert_eq!(entry(SEL64_TSS) >> 40 & 0xff, 0x89, "available 64-bit TSS");
    assert_eq!(entry(SEL64_TSS) & 0xffff, 103);
    assert_eq!(entry(SEL64_LDT) >> 40 & 0xff, 0x82);
    assert!(tb.gdb_commands().contains("i386:x86-64"));
}

#[test]
fn amd64_bad_configurations_are_typed_errors() {
    // 64-bit addresses in a 32-bit host.
    let err = HostKernelBuilder::new(HostMode::Pae)
        .entry64(HC)
        .vcpus([0])
        .build()
        .expect_err("too wide");
    assert!(
        matches!(
            err,
            BuildError::TooWide {
                value: HC,
                mode: HostMode::Pae,
                ..
            }
        ),
        "{err}"
    );
    let err = HostKernelBuilder::new(HostMode::Legacy32)
        .blob_mapped64("hi", DUMMY_PHYS, HC, vec![0xc3], false)
        .entry(DUMMY_PHYS)
        .vcpus([0])
        .build()
        .expect_err("too wide");
    assert!(
        matches!(
            &err,
            BuildError::Paging(PagingError::VirtTooWide { virt: HC, .. })
        ),
        "{err}"
    );
    // Non-canonical and unmapped.
    let err = builder(Mutant::None, 1)
        .map64(Mapping64 {
            name: "hole".into(),
            virt: 0x0000_8000_0000_0000,
            phys: 0x0070_0000,
            len: 0x1000,
            writable: false,
        })
        .build()
        .expect_err("non-canonical");
    assert!(
        matches!(&err, BuildError::Paging(PagingError::NonCanonical { .. })),
        "{err}"
    );
    let err = builder(Mutant::None, 1)
        .entry64(HC + 0x10_0000)
        .build()
        .expect_err("unmapped");
    assert!(
        matches!(&err, BuildError::Unmapped { addr, .. } if *addr == HC + 0x10_0000),
        "{err}"
    );
    // Items of the wrong width.
    let err = builder(Mutant::None, 1)
        .snapshot_item(SnapItem::new("x", SnapSource::Ebx))
        .build()
        .expect_err("32-bit item");
    assert!(
        matches!(
            &err,
            BuildError::ItemWidth {
                width: 32,
                mode: HostMode::Amd64,
                ..
            }
        ),
        "{err}"
    );
    let err = HostKernelBuilder::new(HostMode::Legacy32)
        .blob_mapped("d", DUMMY_PHYS, DUMMY_PHYS, vec![0xc3], false)
        .entry(DUMMY_PHYS)
        .vcpus([0])
        .snapshot_item64(SnapItem64::new("x", SnapSource64::Rbx))
        .build()
        .expect_err("64-bit item");
    assert!(
        matches!(&err, BuildError::ItemWidth { width: 64, .. }),
        "{err}"
    );
    // A read-only cookie address at a high address.
    let err = HostKernelBuilder::new(HostMode::Amd64)
        .blob_mapped64("dummy", DUMMY_PHYS, HC, dummy(HC, Mutant::None), false)
        .entry64(HC)
        .vcpus([0])
        .cookie_at64(HC + COOKIE_OFF)
        .build()
        .expect_err("read-only");
    assert!(
        matches!(&err, BuildError::ReadOnly { addr, .. } if *addr == HC + COOKIE_OFF),
        "{err}"
    );
    // Duplicate and unknown names.
    let err = builder(Mutant::None, 1)
        .snapshot_item64(SnapItem64::new("rbx", SnapSource64::Rbx))
        .build()
        .expect_err("duplicate");
    assert!(
        matches!(&err, BuildError::DuplicateItem(n) if n == "rbx"),
        "{err}"
    );
    let err = builder(Mutant::None, 1)
        .skip_item("ebx")
        .build()
        .expect_err("unknown");
    assert!(
        matches!(&err, BuildError::UnknownItem(n) if n == "ebx"),
        "{err}"
    );
}
