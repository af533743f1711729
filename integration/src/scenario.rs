//! A switcher executed for real: the VMM core, the far helper and the host
//! kernel put together, booted under QEMU, and the outcome judged.
//!
//! A [`Scenario`] names the switcher, its template options, the placement,
//! the VCPUs and round trips, and optionally a [`Mutation`] — a deliberately
//! broken switcher used to prove the testbed catches it. [`run`] returns a
//! [`ScenarioResult`] with the typed outcome, the decoded VM structure (STAM
//! profiles, every `CpumCpu32`), the far helper's mailbox, the exact
//! instruction counts per direction and per round trip, and `verified`.

use core::mem::{offset_of, size_of};

use cpum::layout as cl;
use cpum::{CpumCpu32, UseFlags, CPUMCPU_SIZE};
use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, OpKind, Register};
use serde::Serialize;
use thiserror::Error;
use vmm::layout::{VmFixed, VmHeader, OFF_CPUM};
use vmm::{ExtraMapping, Placement, Vmm, VmmConfig, VmmError};
use vmm_switcher::templates::{Step, TemplateOptions};
use vmm_switcher::{SwitcherKind, View};

use crate::far::{self, FarConfig, FarLayout, Mailbox};
use crate::hostkernel::{BuildError, Expected, HookCtx, HostKernelBuilder, Testbed, LAPIC_VIRT};
use crate::paging::HostMode;
use crate::qemu::{Outcome, QemuConfig, RunResult};

/// isa-debug-exit value for an exception in the far world.
pub const EXIT_FAR_EXCEPTION: u32 = 0x13;
/// `HOOKFAIL` code: the switcher left a SYNC flag set in `fUseFlags`.
pub const HOOKFAIL_SYNC_LEFT: u32 = 0x5c;
/// `HOOKFAIL` codes with this bit carry the far helper's failure bits below it.
pub const HOOKFAIL_FAR: u32 = 0x1_0000;

/// A deliberately broken switcher: one instruction of the relocated code is
/// replaced by NOPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Mutation {
    /// The host TSS busy bit is not cleared before `ltr`.
    TssBusyNotCleared,
    /// Host EBX is not restored.
    HostEbxNotRestored,
    /// LINT0 is not unmasked after the trip.
    LvtNotUnmasked,
    /// CR4.PAE stays on when returning to a 32-bit host.
    PaeLeftOn,
    /// `Guest.fpu` is not loaded although sync was asked.
    FpuNotSynced,
    /// The register collecting masked vectors is not cleared first (VirtualBox's bug).
    DisVectorsNotCleared,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 6] = [
        Self::TssBusyNotCleared,
        Self::HostEbxNotRestored,
        Self::LvtNotUnmasked,
        Self::PaeLeftOn,
        Self::FpuNotSynced,
        Self::DisVectorsNotCleared,
    ];

    fn matches(self, insn: &Instruction, view: View, in_id1: bool) -> bool {
        let mem_disp = |d: usize| {
            insn.op_kind(0) == OpKind::Memory && insn.memory_displacement32() as usize == d
        };
        match self {
            Self::TssBusyNotCleared => {
                insn.code() == Code::And_rm32_imm32
                    && insn.memory_base() == Register::EAX
                    && insn.immediate32() == !0x200
            }
            Self::HostEbxNotRestored => {
                insn.code() == Code::Mov_r32_rm32
                    && insn.op0_register() == Register::EBX
                    && insn.memory_displacement32() as usize == cl::HOST32_EBX
            }
            Self::LvtNotUnmasked => {
                insn.code() == Code::And_rm32_imm32
                    && mem_disp(apic::reg::LVT_LINT0 as usize)
                    && insn.immediate32() == !apic::lvt::MASKED
            }
            Self::PaeLeftOn => {
                in_id1 && insn.code() == Code::Mov_cr_r32 && insn.op0_register() == Register::CR4
            }
            Self::FpuNotSynced => {
                view == View::Id && insn.mnemonic() == iced_x86::Mnemonic::Fxrstor
            }
            Self::DisVectorsNotCleared => {
                insn.code() == Code::Xor_rm32_r32
                    && insn.op0_register() == Register::EDI
                    && insn.op1_register() == Register::EDI
                    || insn.code() == Code::Xor_r32_rm32
                        && insn.op0_register() == Register::EDI
                        && insn.op1_register() == Register::EDI
            }
        }
    }
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Scenario {
    /// The switcher.
    pub kind: SwitcherKind,
    /// Template options.
    pub options: TemplateOptions,
    /// Addresses.
    pub placement: Placement,
    /// VCPUs called in turn.
    pub vcpus: u32,
    /// Round trips per VCPU.
    pub trips: u32,
    /// A deliberate breakage.
    pub mutation: Option<Mutation>,
}

impl Scenario {
    /// `kind` with default options and placement, 2 VCPUs × 1000 trips.
    pub fn new(kind: SwitcherKind) -> Self {
        Self {
            kind,
            options: TemplateOptions::default(),
            placement: Placement::default(),
            vcpus: 2,
            trips: 1000,
            mutation: None,
        }
    }

    /// The host mode a switcher needs.
    ///
    /// # Errors
    /// The switcher has no 32-bit or PAE host side in this testbed.
    pub fn host_mode(&self) -> Result<HostMode, ScenarioError> {
        match self.kind {
            SwitcherKind::Legacy32ToAmd64
            | SwitcherKind::Legacy32To32
            | SwitcherKind::Legacy32ToPae => Ok(HostMode::Legacy32),
            SwitcherKind::PaeToAmd64 | SwitcherKind::PaeTo32 | SwitcherKind::PaeToPae => {
                Ok(HostMode::Pae)
            }
            k => Err(ScenarioError::NoHost(k)),
        }
    }
}

/// Setting a scenario up failed (before QEMU ran).
#[derive(Debug, Error)]
pub enum ScenarioError {
    /// The VMM core refused the configuration.
    #[error("VMM core: {0}")]
    Vmm(#[from] VmmError),
    /// The switcher is not built.
    #[error("{0}")]
    Select(#[from] vmm::mode::SelectError),
    /// The testbed has no host environment for this switcher.
    #[error("no testbed host environment for switcher {}", .0.cli_name())]
    NoHost(SwitcherKind),
    /// The far helper did not build.
    #[error("far helper: {0}")]
    Far(#[from] far::FarError),
    /// The host kernel did not build.
    #[error("host kernel: {0}")]
    Kernel(#[from] BuildError),
    /// The mutation does not apply to this switcher.
    #[error("mutation {mutation:?} does not apply to {}", kind.cli_name())]
    MutationNotApplicable {
        /// The mutation.
        mutation: Mutation,
        /// The switcher.
        kind: SwitcherKind,
    },
    /// An address does not fit the 32-bit host.
    #[error("{what} address {addr:#x} does not fit a 32-bit host")]
    AddressTooWide {
        /// Which address.
        what: &'static str,
        /// The address.
        addr: u64,
    },
    /// QEMU could not be run at all.
    #[error("QEMU: {0}")]
    Qemu(#[from] crate::qemu::QemuError),
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    /// The scenario.
    pub scenario: Scenario,
    /// The QEMU outcome.
    #[serde(skip)]
    pub run: RunResult,
    /// Outcome name.
    pub outcome: String,
    /// Every check passed.
    pub verified: bool,
    /// Why not, one line each.
    pub failures: Vec<String>,
    /// Round trips completed (calls), over all VCPUs.
    pub round_trips: u64,
    /// Exact guest instructions host → far side (ToGC profile average).
    pub instructions_to_guest: Option<u64>,
    /// Exact guest instructions far side → host (ToHC profile average).
    pub instructions_to_host: Option<u64>,
    /// Guest instructions of the cheapest call as the host measures it
    /// (helper included; a trip without FPU or debug sync).
    pub instructions_per_round_trip: Option<u64>,
    /// Guest instructions of the dearest call (FPU and debug sync).
    pub instructions_per_round_trip_max: Option<u64>,
    /// The decoded VM header (STAM profiles), if dumped.
    #[serde(skip)]
    pub vm: Option<VmHeader>,
    /// Every VCPU's CPUM data, if dumped.
    #[serde(skip)]
    pub cpumcpu: Vec<CpumCpu32>,
    /// The far helper's mailbox, if dumped.
    pub mailbox: Option<Mailbox>,
    /// The last trace step printed (trace option only).
    pub last_step: Option<Step>,
    /// The VM structure's bytes as dumped after the run (read its STAM
    /// samples with `vmm::stats::VmStats`).
    #[serde(skip)]
    pub vm_image: Option<Vec<u8>>,
    /// The crash-dump scratch page's first dword (last marker written while paging was off).
    pub scratch_marker: Option<u32>,
}

/// A built scenario: the VMM core and the bootable testbed.
#[derive(Debug)]
pub struct Built {
    /// The VMM core (relocated, HMA initialised).
    pub vmm: Vmm,
    /// The host kernel image and its symbols.
    pub testbed: Testbed,
    /// The far helper's layout.
    pub far: FarLayout,
}

fn u32_addr(what: &'static str, addr: u64) -> Result<u32, ScenarioError> {
    u32::try_from(addr).map_err(|_| ScenarioError::AddressTooWide { what, addr })
}

/// Builds the VMM core, writes the far helper, and generates the host kernel image.
///
/// # Errors
/// [`ScenarioError`] for anything that cannot be set up.
pub fn build(s: &Scenario) -> Result<Built, ScenarioError> {
    let host = s.host_mode()?;
    let cfg = VmmConfig {
        placement: s.placement,
        vcpus: s.vcpus,
        options: s.options,
        extra_mappings: vec![ExtraMapping {
            virt: u64::from(LAPIC_VIRT),
            phys: u64::from(LAPIC_VIRT),
            len: 0x1000,
            uncached: true,
        }],
        ..VmmConfig::default()
    };
    let mut vmm = Vmm::new(cfg)?;
    let sw = vmm.switcher(s.kind)?.clone();
    let (helper_rc, _, helper_size) = vmm.helper_area();
    let far_layout = FarLayout::new(helper_rc.0);
    let far_cfg = FarConfig {
        layout: far_layout,
        cs64: vmm::layout::sel::CS64,
        apic: LAPIC_VIRT,
        com1: 0x3f8,
        exit_port: 0xf4,
        exit_far_exception: EXIT_FAR_EXCEPTION,
    };
    vmm.write_helper(&far::build(&far_cfg, helper_size as usize)?)?;
    for i in 0..s.vcpus {
        vmm.with_cpumcpu(i, |c| {
            c.apic_base = if s.options.apic_nmi_masking {
                u64::from(LAPIC_VIRT)
            } else {
                0
            };
            c.guest.fpu = cpum::FxSaveArea::initial();
            // Crash markers: progress in Guest.dr[4]; while paging is off, the
            // scratch page at the physical address in Guest.dr[5].
            c.guest.dr[5] = s.placement.hma_phys.0
                + u64::from(helper_rc.0 - s.placement.hma_rc.0 + far_layout.scratch_off);
        })?;
    }

    // The relocated core code, possibly mutated.
    let mut core = vmm.core_code().to_vec();
    if let Some(m) = s.mutation {
        let code = sw.code(&core).to_vec();
        let id1 = sw.def.labels.get("IDExitTarget").copied().unwrap_or(0)
            ..sw.def.labels.get("ICExitTarget").copied().unwrap_or(0);
        let lines = vmm_switcher::disasm::lines(&sw.def, &code, &sw.ctx, &sw.reloc);
        let hit = lines
            .iter()
            .find(|l| {
                l.insn
                    .as_ref()
                    .is_some_and(|i| m.matches(i, l.view, id1.contains(&l.off)))
            })
            .ok_or(ScenarioError::MutationNotApplicable {
                mutation: m,
                kind: s.kind,
            })?;
        let at = (sw.offset + hit.off) as usize;
        core[at..at + hit.bytes.len()].fill(0x90);
    }

    let p = s.placement;
    let (vm_hc, _, _) = vmm.vm_addrs();
    let vm_hc = u32_addr("VM structure HC", vm_hc.0)?;
    let hma_hc = u32_addr("HMA HC", p.hma_hc.0)?;
    let mailbox_hc = hma_hc + (far_layout.mailbox_rc() - p.hma_rc.0);
    let cpum_hc = vm_hc + OFF_CPUM as u32;
    let (tables_phys, tables) = vmm.tables();
    let apic_on = s.options.apic_nmi_masking;

    let pre = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        let mb = |f: usize| mailbox_hc + f as u32;
        let mut no_fpu = a.create_label();
        let mut no_dbg = a.create_label();
        a.mov(esi, dword_ptr(h.trip_slot))?;
        a.mov(ebx, dword_ptr(h.arg2_slot))?;
        a.add(ebx, cpum_hc)?;
        a.xor(edx, edx)?;
        if apic_on {
            a.or(edx, far::expect::APIC)?;
        }
        a.mov(
            dword_ptr(mb(offset_of!(Mailbox, want_dis))),
            apic::DisVectors::from_bits_retain(0x7).bits(),
        )?;
        // Even trips load Guest.fpu in the far world.
        a.test(esi, 1)?;
        a.jnz(no_fpu)?;
        a.or(edx, far::expect::FPU)?;
        a.or(
            dword_ptr(ebx + cl::USE_FLAGS as i32),
            UseFlags::SYNC_FPU_STATE.bits(),
        )?;
        let fpu = |f: usize| (cl::GUEST_FPU + f) as i32;
        a.mov(eax, esi)?;
        a.and(eax, 0xc)?;
        a.shl(eax, 8)?;
        a.xor(eax, u32::from(cpum::FxSaveArea::FCW_INIT))?;
        a.mov(word_ptr(ebx + fpu(offset_of!(cpum::FxSaveArea, fcw))), ax)?;
        a.mov(eax, esi)?;
        a.and(eax, 0x30)?;
        a.shl(eax, 9)?;
        a.or(eax, cpum::FxSaveArea::MXCSR_INIT)?;
        a.mov(
            dword_ptr(ebx + fpu(offset_of!(cpum::FxSaveArea, mxcsr))),
            eax,
        )?;
        a.mov(eax, dword_ptr(h.cookie_slot))?;
        let xmm_off = offset_of!(cpum::FxSaveArea, xmm);
        a.mov(dword_ptr(ebx + fpu(xmm_off)), eax)?;
        a.mov(dword_ptr(ebx + fpu(xmm_off + 4)), esi)?;
        a.not(eax)?;
        a.mov(dword_ptr(ebx + fpu(xmm_off + 8)), eax)?;
        a.mov(dword_ptr(ebx + fpu(xmm_off + 12)), 0x1234_5678u32)?;
        a.set_label(&mut no_fpu)?;
        // Trips 2 and 3 mod 4 load Guest DR0-3 and DR6.
        a.test(esi, 2)?;
        a.jz(no_dbg)?;
        a.or(edx, far::expect::DBG)?;
        a.or(
            dword_ptr(ebx + cl::USE_FLAGS as i32),
            UseFlags::SYNC_DEBUG_STATE.bits(),
        )?;
        a.mov(eax, dword_ptr(h.cookie_slot))?;
        for n in 0..4 {
            let d = (cl::GUEST_DR + 8 * n) as i32;
            a.mov(dword_ptr(ebx + d), eax)?;
            a.mov(dword_ptr(ebx + d + 4), 0u32)?;
            a.add(eax, 0x1000)?;
        }
        a.mov(eax, esi)?;
        a.and(eax, 0xf)?;
        a.or(eax, cpum::regs::DR6_INIT as u32)?;
        let d6 = (cl::GUEST_DR + 8 * 6) as i32;
        a.mov(dword_ptr(ebx + d6), eax)?;
        a.mov(dword_ptr(ebx + d6 + 4), 0u32)?;
        a.set_label(&mut no_dbg)?;
        a.mov(dword_ptr(mb(offset_of!(Mailbox, expect))), edx)?;
        Ok(())
    };
    let post = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        // The switcher must have consumed the sync requests, and the far side
        // must have seen everything right.
        let mut ok = a.create_label();
        let mut ok2 = a.create_label();
        a.mov(ebx, dword_ptr(h.arg2_slot))?;
        a.add(ebx, cpum_hc)?;
        a.test(
            dword_ptr(ebx + cl::USE_FLAGS as i32),
            (UseFlags::SYNC_FPU_STATE | UseFlags::SYNC_DEBUG_STATE).bits(),
        )?;
        a.jz(ok)?;
        a.mov(dword_ptr(h.hook_fail_slot), HOOKFAIL_SYNC_LEFT)?;
        a.set_label(&mut ok)?;
        a.mov(
            eax,
            dword_ptr(mailbox_hc + offset_of!(Mailbox, fails) as u32),
        )?;
        a.test(eax, eax)?;
        a.jz(ok2)?;
        a.or(eax, HOOKFAIL_FAR)?;
        a.mov(dword_ptr(h.hook_fail_slot), eax)?;
        a.set_label(&mut ok2)?;
        a.nop()?;
        Ok(())
    };

    let vcpu_args: Vec<u32> = (0..s.vcpus).map(|i| vmm.vcpu_arg(i)).collect();
    let entry = u32_addr("switcher entry", sw.entries.r0_host_to_guest_hc.0)?;
    let testbed = HostKernelBuilder::new(host)
        .blob_mapped(
            "core-code",
            u32_addr("core code", p.code_phys.0)?,
            u32_addr("core code HC", p.code_hc.0)?,
            core,
            true,
        )
        .blob_mapped(
            "hma",
            u32_addr("HMA", p.hma_phys.0)?,
            hma_hc,
            vmm.hma().to_vec(),
            true,
        )
        .blob(
            "intermediate-tables",
            u32_addr("tables", tables_phys.0)?,
            tables.to_vec(),
        )
        .entry(entry)
        .arg1(vm_hc)
        .vcpus(vcpu_args)
        .trips(s.trips)
        .cookie_at(mailbox_hc + offset_of!(Mailbox, cookie) as u32)
        .expect(Expected::CookieXor(far::RET_XOR))
        .pre_call(pre)
        .post_call(post)
        .dump("vm", vm_hc, vmm.hma_layout().vm_size)
        .dump("mailbox", mailbox_hc, size_of::<Mailbox>() as u32)
        .dump(
            "scratch",
            hma_hc + (helper_rc.0 - p.hma_rc.0) + far_layout.scratch_off,
            4,
        )
        .build()?;
    Ok(Built {
        vmm,
        testbed,
        far: far_layout,
    })
}

/// Boots a built scenario and judges it.
///
/// # Errors
/// QEMU could not be started (missing binary, I/O). A failed switcher is not
/// an error: it is a [`ScenarioResult`] with `verified == false`.
pub fn run_built(s: &Scenario, b: &Built, q: &QemuConfig) -> Result<ScenarioResult, ScenarioError> {
    let run = b.testbed.run(q)?;
    Ok(judge(s, b, run))
}

/// Builds and runs `s`.
///
/// # Errors
/// See [`build`] and [`run_built`].
pub fn run(s: &Scenario, q: &QemuConfig) -> Result<ScenarioResult, ScenarioError> {
    let b = build(s)?;
    run_built(s, &b, q)
}

fn judge(s: &Scenario, b: &Built, run: RunResult) -> ScenarioResult {
    let r = &run.report;
    let mut failures = Vec::new();
    if run.outcome != Outcome::Pass {
        failures.push(format!("outcome {:?}", run.outcome));
    }
    let calls = u64::from(s.trips) * u64::from(s.vcpus);
    let vm_dump = r.dump("vm");
    let vm: Option<VmFixed> = vm_dump.and_then(|d| d.read::<VmFixed>(0));
    let cpumcpu: Vec<CpumCpu32> = (0..s.vcpus)
        .filter_map(|i| {
            vm_dump.and_then(|d| d.read::<CpumCpu32>(OFF_CPUM + b.vmm.vcpu_arg(i) as usize))
        })
        .collect();
    let mailbox: Option<Mailbox> = r.dump("mailbox").and_then(|d| d.read::<Mailbox>(0));
    let summary = r.summary.as_ref();
    match summary {
        Some(sm) => {
            if u64::from(sm.calls) != calls {
                failures.push(format!("{} calls, expected {calls}", sm.calls));
            }
            for (what, n) in [
                ("mismatches", sm.mismatches),
                ("return-code failures", sm.retfails),
                ("hook failures", sm.hookfails),
            ] {
                if n != 0 {
                    failures.push(format!("{n} {what}"));
                }
            }
        }
        None => failures.push("no summary line".into()),
    }
    for m in r.mismatches.iter().take(4) {
        failures.push(format!(
            "trip {} vcpu {}: {} was {:#x}, now {:#x}",
            m.trip, m.vcpu, m.name, m.before, m.after
        ));
    }
    for h in r.hook_failures.iter().take(2) {
        if h.code & HOOKFAIL_FAR != 0 {
            failures.push(format!(
                "trip {} vcpu {}: far side saw {}",
                h.trip,
                h.vcpu,
                far::fail_names(h.code & !HOOKFAIL_FAR).join(", ")
            ));
        } else if h.code == HOOKFAIL_SYNC_LEFT {
            failures.push(format!(
                "trip {} vcpu {}: a SYNC flag was left set",
                h.trip, h.vcpu
            ));
        }
    }
    if let Some(mb) = &mailbox {
        if u64::from(mb.calls) != calls && run.outcome == Outcome::Pass {
            failures.push(format!(
                "far helper ran {} times, expected {calls}",
                mb.calls
            ));
        }
        if mb.fails != 0 {
            failures.push(format!(
                "far helper failures: {}",
                far::fail_names(mb.fails).join(", ")
            ));
        }
    }
    let (mut to_gc, mut to_hc) = (None, None);
    if let Some(vm) = &vm {
        let h = &vm.header;
        if s.options.stats {
            for (name, p) in [
                ("ToGC", &h.stat_switcher_to_gc),
                ("ToHC", &h.stat_switcher_to_hc),
            ] {
                if p.core.periods != calls && run.outcome == Outcome::Pass {
                    failures.push(format!(
                        "/VMM/Switcher/{name} has {} periods, expected {calls}",
                        p.core.periods
                    ));
                }
                if p.ts_start != 0 {
                    failures.push(format!("/VMM/Switcher/{name} left running"));
                }
            }
            to_gc = h
                .stat_switcher_to_gc
                .core
                .ticks
                .checked_div(h.stat_switcher_to_gc.core.periods);
            to_hc = h
                .stat_switcher_to_hc
                .core
                .ticks
                .checked_div(h.stat_switcher_to_hc.core.periods);
        }
        if s.options.apic_nmi_masking && run.outcome == Outcome::Pass {
            for (i, c) in cpumcpu.iter().enumerate() {
                if c.apic_dis_vectors != 0x7 {
                    failures.push(format!(
                        "vcpu {i}: fApicDisVectors {:#x}, expected 0x7",
                        c.apic_dis_vectors
                    ));
                }
            }
        }
    } else if run.outcome == Outcome::Pass {
        failures.push("no VM dump".into());
    }
    let last_step = r
        .last_trace_char()
        .and_then(|c| u8::try_from(c).ok())
        .and_then(Step::from_ch);
    // Trips differ by design (FPU and debug sync on alternate trips), so
    // report the cheapest and the dearest.
    let per_trip = summary
        .filter(|sm| sm.calls > 0)
        .map(|sm| u64::from(sm.tsc_min));
    let per_trip_max = summary
        .filter(|sm| sm.calls > 0)
        .map(|sm| u64::from(sm.tsc_max));
    ScenarioResult {
        scenario: s.clone(),
        outcome: format!("{:?}", run.outcome),
        verified: failures.is_empty(),
        failures,
        round_trips: summary.map_or(0, |sm| u64::from(sm.calls)),
        instructions_to_guest: to_gc,
        instructions_to_host: to_hc,
        instructions_per_round_trip: per_trip,
        instructions_per_round_trip_max: per_trip_max,
        vm: vm.map(|v| v.header),
        cpumcpu,
        mailbox,
        last_step,
        scratch_marker: r.dump("scratch").and_then(|d| d.u32_at(0)),
        vm_image: vm_dump.filter(|d| d.complete).map(|d| d.bytes.clone()),
        run,
    }
}

const _: () = assert!(CPUMCPU_SIZE % 64 == 0);
