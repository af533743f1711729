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
use vmm_switcher::{RcAddr, SideMode, SwitcherKind, View};

use crate::far::{self, FarConfig, FarLayout, Mailbox};
use crate::hostkernel::{BuildError, Expected, HookCtx, HostKernelBuilder, Testbed, LAPIC_VIRT};
use crate::paging::HostMode;
use crate::qemu::{Outcome, QemuConfig, RunResult, EXIT_FAR_EXCEPTION};

/// `HOOKFAIL` code: the switcher left a SYNC flag set in `fUseFlags`.
pub const HOOKFAIL_SYNC_LEFT: u32 = 0x5c;
/// `HOOKFAIL` codes with this bit carry the far helper's failure bits below it.
pub const HOOKFAIL_FAR: u32 = 0x1_0000;
/// `HOOKFAIL` code: the host's FPU state did not come back.
pub const HOOKFAIL_HOST_FPU: u32 = 0x70;
/// `HOOKFAIL` code: the host's DR0–DR3 did not come back.
pub const HOOKFAIL_HOST_DR: u32 = 0x71;
/// `HOOKFAIL` code: the FPU state the RC code left was not saved to `Guest.fpu`.
pub const HOOKFAIL_GUEST_FPU_SAVE: u32 = 0x72;
/// The host's FCW during the runs (round toward zero, all exceptions masked).
pub const HOST_FCW: u32 = 0x0f7f;

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
    /// 32-bit/PAE family: the host FPU state is not restored after the RC code used the FPU.
    HostFpuNotRestored,
    /// 32-bit/PAE family: the host SYSENTER_CS is not restored.
    SysenterCsNotRestored,
    /// 32-bit/PAE family: the hyper TSS busy bit is not cleared before `ltr`.
    HyperTssBusyNotCleared,
    /// 32-bit/PAE family: `Hyper.cr3` is not loaded (RC code runs on the intermediate CR3).
    HyperCr3NotLoaded,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 10] = [
        Self::TssBusyNotCleared,
        Self::HostEbxNotRestored,
        Self::LvtNotUnmasked,
        Self::PaeLeftOn,
        Self::FpuNotSynced,
        Self::DisVectorsNotCleared,
        Self::HostFpuNotRestored,
        Self::SysenterCsNotRestored,
        Self::HyperTssBusyNotCleared,
        Self::HyperCr3NotLoaded,
    ];

    fn matches(self, insn: &Instruction, view: View, in_id1: bool) -> bool {
        let mem_disp = |d: usize| {
            insn.op_kind(0) == OpKind::Memory && insn.memory_displacement32() as usize == d
        };
        match self {
            Self::TssBusyNotCleared => {
                view == View::Hc
                    && insn.code() == Code::And_rm32_imm32
                    && insn.memory_base() == Register::EAX
                    && insn.immediate32() == !0x200
            }
            Self::HyperTssBusyNotCleared => {
                view == View::Rc
                    && insn.code() == Code::And_rm32_imm32
                    && matches!(insn.memory_base(), Register::EAX | Register::RAX)
                    && insn.immediate32() == !0x200
            }
            Self::HostFpuNotRestored => {
                insn.mnemonic() == iced_x86::Mnemonic::Fxrstor
                    && insn.memory_displacement32() as usize == cl::HOST32_FPU
            }
            Self::HyperCr3NotLoaded => {
                view == View::Rc
                    && insn.code() == Code::Mov_cr_r32
                    && insn.op0_register() == Register::CR3
                    && insn.op1_register() == Register::EBP
            }
            // Handled through the switcher's own conditional-jump fixup.
            Self::SysenterCsNotRestored => false,
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
    /// Run the host's local APIC in x2APIC mode (`fX2Apic` set for every
    /// VCPU); needs a CPU with x2APIC (QEMU ≥ 9 under TCG) and the template's
    /// `x2apic` option.
    pub host_x2apic: bool,
    /// 32-bit/PAE family only: instead of the checking RC code, call a target
    /// function with these arguments through the switcher's call trampoline
    /// on every trip.
    pub trampoline_args: Option<Vec<u32>>,
}

impl Scenario {
    /// `kind` with default options and placement, 2 VCPUs × 1000 trips.
    pub fn new(kind: SwitcherKind) -> Self {
        let amd64_host = matches!(
            kind,
            SwitcherKind::Amd64To32
                | SwitcherKind::Amd64ToPae
                | SwitcherKind::Amd64ToAmd64
                | SwitcherKind::Amd64Stub
        );
        Self {
            kind,
            options: TemplateOptions::default(),
            placement: if amd64_host {
                VmmConfig::amd64_host().placement
            } else {
                Placement::default()
            },
            vcpus: 2,
            trips: 1000,
            mutation: None,
            host_x2apic: false,
            trampoline_args: None,
        }
    }

    /// True when the host is in long mode.
    pub fn amd64_host(&self) -> bool {
        self.host_mode() == HostMode::Amd64
    }

    /// True for the stub switchers.
    pub fn is_stub(&self) -> bool {
        matches!(self.kind, SwitcherKind::X86Stub | SwitcherKind::Amd64Stub)
    }

    /// True for the switchers whose far side is the long-mode helper run in
    /// the intermediate context (32-bit/PAE host → AMD64).
    pub fn uses_far_helper(&self) -> bool {
        matches!(
            self.kind,
            SwitcherKind::Legacy32ToAmd64 | SwitcherKind::PaeToAmd64
        )
    }

    /// True when the switcher enters a long-mode hypervisor context.
    pub fn long_mode_target(&self) -> bool {
        vmm::target_flavour(self.kind) == vmm::Flavour::Long
    }

    /// The host mode the testbed runs the switcher on (a 32-bit host for the
    /// x86 stub).
    pub fn host_mode(&self) -> HostMode {
        match self.kind.host() {
            SideMode::Bits32 => HostMode::Legacy32,
            SideMode::Pae => HostMode::Pae,
            SideMode::Amd64 => HostMode::Amd64,
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
    /// The far helper did not build.
    #[error("far helper: {0}")]
    Far(#[from] far::FarError),
    /// The host kernel did not build.
    #[error("host kernel: {0}")]
    Kernel(#[from] BuildError),
    /// The trampoline exists only for 32-bit/PAE hypervisor contexts here.
    #[error("the call trampoline is not exercised for {}", .0.cli_name())]
    NoTrampoline(SwitcherKind),
    /// Too many trampoline arguments.
    #[error("{0} trampoline arguments; at most {max}", max = crate::rc::MAX_TARGET_ARGS)]
    TooManyArgs(usize),
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
    /// The far helper's mailbox (long-mode family), if dumped.
    pub mailbox: Option<Mailbox>,
    /// The RC code's mailbox (32-bit/PAE family), if dumped.
    pub rc_mailbox: Option<crate::rc::RcMailbox>,
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
    /// The RC code's entry points (32-bit/PAE family).
    pub rc: Option<crate::rc::RcEntries>,
    /// Host-virtual address of the mailbox.
    pub mailbox_hc: u32,
}

fn u32_addr(what: &'static str, addr: u64) -> Result<u32, ScenarioError> {
    u32::try_from(addr).map_err(|_| ScenarioError::AddressTooWide { what, addr })
}

/// Builds the VMM core, writes the far-side code, and generates the host kernel image.
///
/// # Errors
/// [`ScenarioError`] for anything that cannot be set up.
pub fn build(s: &Scenario) -> Result<Built, ScenarioError> {
    let host = s.host_mode();
    let long = s.uses_far_helper();
    if s.trampoline_args.is_some() && long {
        return Err(ScenarioError::NoTrampoline(s.kind));
    }
    if let Some(args) = &s.trampoline_args {
        if args.len() > crate::rc::MAX_TARGET_ARGS {
            return Err(ScenarioError::TooManyArgs(args.len()));
        }
    }
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
        host_bits: if host == HostMode::Amd64 { 64 } else { 32 },
        ..VmmConfig::default()
    };
    let mut vmm = Vmm::new(cfg)?;
    let sw = vmm.activate(s.kind)?.clone();
    let (helper_rc, _, helper_size) = vmm.helper_area();
    let far_layout = FarLayout::new(helper_rc.0);
    let p = s.placement;
    let (vm_hc64, vm_rc, _) = vmm.vm_addrs();
    let wide = host == HostMode::Amd64;
    // Hooks address the HMA with 32-bit addresses: on an AMD64 host through a
    // low alias of its high canonical HC mapping.
    let vm_hc = if wide {
        vm_hc64.0 as u32
    } else {
        u32_addr("VM structure HC", vm_hc64.0)?
    };
    let hma_hc = if wide {
        p.hma_hc.0 as u32
    } else {
        u32_addr("HMA HC", p.hma_hc.0)?
    };
    let hc_of = |rc: u32| hma_hc + (rc - p.hma_rc.0);
    let mailbox_hc = hc_of(far_layout.mailbox_rc());
    let cpum_hc = vm_hc + OFF_CPUM as u32;
    let cpum_rc = vm_rc.0 + OFF_CPUM as u32;
    let scratch_phys = p.hma_phys.0 + u64::from(helper_rc.0 - p.hma_rc.0 + far_layout.scratch_off);
    let mut rc_entries = None;
    if s.is_stub() {
        // Nothing runs on the far side.
    } else if long {
        let far_cfg = FarConfig {
            layout: far_layout,
            cs64: vmm::layout::sel::CS64,
            apic: LAPIC_VIRT,
            com1: 0x3f8,
            exit_port: 0xf4,
            exit_far_exception: EXIT_FAR_EXCEPTION,
        };
        vmm.write_helper(&far::build(&far_cfg, helper_size as usize)?)?;
    } else {
        let rc64 = s.kind == SwitcherKind::Amd64ToAmd64;
        let rc_cfg = crate::rc::RcConfig {
            rc: helper_rc.0,
            mailbox_off: far_layout.mailbox_off,
            cpum_rc,
            exit_rc: sw.entries.rc_guest_to_host_asm.0,
            c_exit_rc: sw.entries.rc_guest_to_host.0,
            cs: if rc64 {
                vmm::layout::sel::CS64
            } else {
                vmm::layout::sel::CS
            },
            ds: vmm::layout::sel::DS,
            apic: LAPIC_VIRT,
            com1: 0x3f8,
            exit_port: 0xf4,
            exit_code: EXIT_FAR_EXCEPTION,
        };
        let (blob, e) = if rc64 {
            crate::rc64::build(&rc_cfg, helper_size as usize)?
        } else {
            crate::rc::build(&rc_cfg, helper_size as usize)?
        };
        vmm.write_helper(&blob)?;
        let gates: Vec<(u8, RcAddr)> = e
            .handlers
            .iter()
            .enumerate()
            .map(|(v, h)| (v as u8, RcAddr(*h)))
            .collect();
        if rc64 {
            vmm.set_hyper_idt_gates64(&gates);
        } else {
            vmm.set_hyper_idt_gates(&gates);
        }
        rc_entries = Some(e);
    }
    for i in 0..s.vcpus {
        let rc_entry = rc_entries.as_ref().map(|e| e.entry);
        let cpumcpu_rc = cpum_rc + vmm.vcpu_arg(i);
        vmm.with_cpumcpu(i, |c| {
            c.apic_base = if s.options.apic_nmi_masking {
                u64::from(LAPIC_VIRT)
            } else {
                0
            };
            c.x2apic = u32::from(s.host_x2apic);
            c.guest.fpu = cpum::FxSaveArea::initial();
            // Crash markers: progress in Guest.dr[4]; while paging is off, the
            // scratch page at the physical address in Guest.dr[5].
            c.guest.dr[5] = scratch_phys;
            if let Some(entry) = rc_entry {
                c.hyper.rip = u64::from(entry);
                c.hyper.rsi = u64::from(cpumcpu_rc);
                c.hyper.rdi = u64::from(far_layout.mailbox_rc());
                c.hyper.rbp = u64::from(crate::rc::ebp_magic(i));
                c.hyper.rbx = 0;
                c.hyper.dr[7] = cpum::regs::DR7_INIT;
            }
        })?;
    }

    // The relocated core code, possibly mutated.
    let mut core = vmm.core_code().to_vec();
    if let Some(m) = s.mutation {
        let code = sw.code(&core).to_vec();
        let id1 = sw.def.labels.get("IDExitTarget").copied().unwrap_or(0)
            ..sw.def.labels.get("ICExitTarget").copied().unwrap_or(0);
        if m == Mutation::SysenterCsNotRestored {
            // Take the exit path's "host does not use SYSENTER" jump although it does.
            let exit = sw
                .def
                .labels
                .get("HCExitTarget")
                .copied()
                .unwrap_or(u32::MAX);
            let rec = sw
                .def
                .fixups
                .iter()
                .find(|f| f.kind == vmm_switcher::FixupKind::NoSysenterJmp && f.off >= exit)
                .ok_or(ScenarioError::MutationNotApplicable {
                    mutation: m,
                    kind: s.kind,
                })?;
            let target = rec.operand.unwrap_or(rec.off + 5);
            let rel = target.wrapping_sub(rec.off + 5);
            let at = (sw.offset + rec.off) as usize;
            core[at] = 0xe9;
            core[at + 1..at + 5].copy_from_slice(&rel.to_le_bytes());
        } else {
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
    }

    let (tables_phys, tables) = vmm.tables();
    let (hyper_phys, hyper_tables) = vmm.hyper_tables();
    let apic_on = s.options.apic_nmi_masking;
    let x2 = s.host_x2apic;
    let vcpu_args: Vec<u32> = (0..s.vcpus).map(|i| vmm.vcpu_arg(i)).collect();
    let entry = if wide {
        0
    } else {
        u32_addr("switcher entry", sw.entries.r0_host_to_guest_hc.0)?
    };
    let hma_bytes = vmm.hma().to_vec();
    let hma_len = hma_bytes.len() as u32;
    let hma_phys = u32_addr("HMA", p.hma_phys.0)?;
    let code_phys = u32_addr("core code", p.code_phys.0)?;
    let hi = |lo: u32| p.hma_hc.0 + u64::from(lo - hma_hc);
    let mut kb = HostKernelBuilder::new(host).x2apic(x2);
    if wide {
        kb = kb
            .blob_mapped64("core-code", code_phys, p.code_hc.0, core, true)
            .blob_mapped64("hma", hma_phys, p.hma_hc.0, hma_bytes, true);
        // Hook code reaches the HMA with 32-bit addresses: zero-extended
        // through `[reg+disp]` and sign-extended as absolute displacements.
        // Map whichever of the two aliases the HC mapping is not.
        let zero_ext = u64::from(hma_hc);
        let sign_ext = i64::from(hma_hc as i32) as u64;
        for (name, virt) in [("hma-alias", zero_ext), ("hma-alias-sx", sign_ext)] {
            if virt != p.hma_hc.0 && !(name == "hma-alias-sx" && sign_ext == zero_ext) {
                kb = kb.map64(crate::hostkernel::Mapping64 {
                    name: name.into(),
                    virt,
                    phys: hma_phys,
                    len: hma_len,
                    writable: true,
                });
            }
        }
        kb = kb
            .entry64(sw.entries.r0_host_to_guest_hc.0)
            .arg1_64(vm_hc64.0)
            .cookie_at64(hi(mailbox_hc) + offset_of!(Mailbox, cookie) as u64)
            .dump64("vm", vm_hc64.0, vmm.hma_layout().vm_size)
            .dump64(
                "scratch",
                hi(hc_of(helper_rc.0 + far_layout.scratch_off)),
                4,
            );
    } else {
        kb = kb
            .blob_mapped(
                "core-code",
                code_phys,
                u32_addr("core code HC", p.code_hc.0)?,
                core,
                true,
            )
            .blob_mapped("hma", hma_phys, hma_hc, hma_bytes, true)
            .entry(entry)
            .arg1(vm_hc)
            .cookie_at(mailbox_hc + offset_of!(Mailbox, cookie) as u32)
            .dump("vm", vm_hc, vmm.hma_layout().vm_size)
            .dump("scratch", hc_of(helper_rc.0 + far_layout.scratch_off), 4);
    }
    kb = kb
        .blob(
            "intermediate-tables",
            u32_addr("tables", tables_phys.0)?,
            tables.to_vec(),
        )
        .blob(
            "hyper-tables",
            u32_addr("hyper tables", hyper_phys.0)?,
            hyper_tables.to_vec(),
        )
        .vcpus(vcpu_args)
        .trips(s.trips);
    if s.is_stub() {
        kb = kb.expect(Expected::Value(vmm_switcher::templates::stub::STUB_STATUS));
    } else if long {
        kb = long_hooks(kb, apic_on, x2, mailbox_hc, cpum_hc)
            .expect(Expected::CookieXor(far::RET_XOR))
            .dump("mailbox", mailbox_hc, size_of::<Mailbox>() as u32);
    } else if let (Some(args), Some(e)) = (&s.trampoline_args, &rc_entries) {
        let target = e.targets[args.len()];
        let tramp = sw.entries.rc_call_trampoline.0;
        let l = *vmm.hma_layout();
        let frames: Vec<(u32, u32)> = (0..s.vcpus)
            .map(|i| {
                (
                    hc_of(p.hma_rc.0 + l.stack_top(i)),
                    p.hma_rc.0 + l.stack_top(i),
                )
            })
            .collect();
        kb = trampoline_hooks(kb, cpum_hc, target, tramp, args.clone(), frames)
            .expect(Expected::Value(crate::rc::target_result(args)));
    } else {
        // Long mode runs with CR4.PAE set as well.
        let pae = vmm::target_flavour(s.kind) != vmm::Flavour::Legacy32;
        kb = rc_hooks(kb, apic_on, x2, pae, mailbox_hc, cpum_hc)
            .expect(Expected::CookieXor(crate::rc::RET_XOR))
            .dump(
                "mailbox",
                mailbox_hc,
                size_of::<crate::rc::RcMailbox>() as u32,
            );
    }
    let testbed = kb.build()?;
    Ok(Built {
        vmm,
        testbed,
        far: far_layout,
        rc: rc_entries,
        mailbox_hc,
    })
}

/// Hooks for the long-mode family: Guest FPU/debug sync requests and the far helper's verdict.
fn long_hooks(
    kb: HostKernelBuilder,
    apic_on: bool,
    x2: bool,
    mailbox_hc: u32,
    cpum_hc: u32,
) -> HostKernelBuilder {
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
        if x2 {
            a.or(edx, far::expect::X2APIC)?;
        }
        a.mov(
            dword_ptr(abs_addr(h, mb(offset_of!(Mailbox, want_dis)))),
            0x7u32,
        )?;
        // Even trips load Guest.fpu in the far world.
        a.test(esi, 1)?;
        a.jnz(no_fpu)?;
        a.or(edx, far::expect::FPU)?;
        a.or(
            dword_ptr(ebx + cl::USE_FLAGS as i32),
            UseFlags::SYNC_FPU_STATE.bits(),
        )?;
        guest_fpu_values(a, h, ebx, esi)?;
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
        a.mov(dword_ptr(abs_addr(h, mb(offset_of!(Mailbox, expect)))), edx)?;
        Ok(())
    };
    let post = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        // The switcher must have consumed the sync requests, and the far side
        // must have seen everything right.
        let mut ok = a.create_label();
        a.mov(ebx, dword_ptr(h.arg2_slot))?;
        a.add(ebx, cpum_hc)?;
        a.test(
            dword_ptr(ebx + cl::USE_FLAGS as i32),
            (UseFlags::SYNC_FPU_STATE | UseFlags::SYNC_DEBUG_STATE).bits(),
        )?;
        a.jz(ok)?;
        a.mov(dword_ptr(h.hook_fail_slot), HOOKFAIL_SYNC_LEFT)?;
        a.set_label(&mut ok)?;
        far_fails(a, h, mailbox_hc + offset_of!(Mailbox, fails) as u32)
    };
    kb.pre_call(pre).post_call(post)
}

/// Guest FPU values for trip ESI into the `CpumCpu` at `base`: FCW and MXCSR
/// rounding from the trip, XMM0 from the cookie.
fn guest_fpu_values(
    a: &mut CodeAssembler,
    h: &HookCtx,
    base: AsmRegister32,
    trip: AsmRegister32,
) -> Result<(), IcedError> {
    let fpu = |f: usize| (cl::GUEST_FPU + f) as i32;
    a.mov(eax, trip)?;
    a.and(eax, 0xc)?;
    a.shl(eax, 8)?;
    a.xor(eax, u32::from(cpum::FxSaveArea::FCW_INIT))?;
    a.mov(word_ptr(base + fpu(offset_of!(cpum::FxSaveArea, fcw))), ax)?;
    a.mov(eax, trip)?;
    a.and(eax, 0x30)?;
    a.shl(eax, 9)?;
    a.or(eax, cpum::FxSaveArea::MXCSR_INIT)?;
    a.mov(
        dword_ptr(base + fpu(offset_of!(cpum::FxSaveArea, mxcsr))),
        eax,
    )?;
    a.mov(eax, dword_ptr(h.cookie_slot))?;
    let xmm_off = offset_of!(cpum::FxSaveArea, xmm);
    a.mov(dword_ptr(base + fpu(xmm_off)), eax)?;
    a.mov(dword_ptr(base + fpu(xmm_off + 4)), trip)?;
    a.not(eax)?;
    a.mov(dword_ptr(base + fpu(xmm_off + 8)), eax)?;
    a.mov(dword_ptr(base + fpu(xmm_off + 12)), 0x1234_5678u32)?;
    Ok(())
}

/// An absolute 32-bit address as a memory-operand displacement: in 64-bit hook
/// code it is sign-extended, which for the HMA's low alias in the top 2 GiB
/// is the high canonical HC mapping itself.
fn abs_addr(h: &HookCtx, addr: u32) -> u64 {
    if h.bitness == 64 {
        i64::from(addr as i32) as u64
    } else {
        u64::from(addr)
    }
}

/// Reports the far side's failure bits (the dword at `fails_hc`) as a `HOOKFAIL`.
fn far_fails(a: &mut CodeAssembler, h: &HookCtx, fails_hc: u32) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.mov(eax, dword_ptr(abs_addr(h, fails_hc)))?;
    a.test(eax, eax)?;
    a.jz(ok)?;
    a.or(eax, HOOKFAIL_FAR)?;
    a.mov(dword_ptr(h.hook_fail_slot), eax)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    Ok(())
}

/// Host DR0–DR3 values for a trip: distinct per register and per cookie.
fn host_dr(a: &mut CodeAssembler, h: &HookCtx, n: u32) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(h.cookie_slot))?;
    a.xor(eax, 0x1111_0000u32.wrapping_mul(n + 1))?;
    Ok(())
}

/// Hooks for the 32-bit/PAE family: expectations for the RC code, hyper
/// debug registers on some trips, and the host FPU and DR0–3 checked after
/// every trip (the lazy-FPU and debug-register rules seen from the host).
fn rc_hooks(
    kb: HostKernelBuilder,
    apic_on: bool,
    x2: bool,
    pae: bool,
    mailbox_hc: u32,
    cpum_hc: u32,
) -> HostKernelBuilder {
    use crate::rc::{expect as ex, RcMailbox};
    let mb = move |f: usize| mailbox_hc + f as u32;
    let pre = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        let host_fcw = h.alloc(&HOST_FCW.to_le_bytes(), 4);
        let mut no_fpu = a.create_label();
        let mut no_dbg = a.create_label();
        let mut dbg_done = a.create_label();
        a.mov(esi, dword_ptr(h.trip_slot))?;
        a.mov(ebx, dword_ptr(h.arg2_slot))?;
        a.add(ebx, cpum_hc)?;
        a.xor(edx, edx)?;
        if apic_on {
            a.or(edx, ex::APIC)?;
        }
        if x2 {
            a.or(edx, ex::X2APIC)?;
        }
        a.mov(
            dword_ptr(abs_addr(h, mb(offset_of!(RcMailbox, want_dis)))),
            0x7u32,
        )?;
        a.mov(
            dword_ptr(abs_addr(h, mb(offset_of!(RcMailbox, want_pae)))),
            u32::from(pae),
        )?;
        // Even trips: the RC code uses the FPU, finding these Guest values.
        a.test(esi, 1)?;
        a.jnz(no_fpu)?;
        a.or(edx, ex::FPU)?;
        guest_fpu_values(a, h, ebx, esi)?;
        a.set_label(&mut no_fpu)?;
        // Trips 2 and 3 mod 4: hyper debug registers in use.
        a.test(esi, 2)?;
        a.jz(no_dbg)?;
        a.or(edx, ex::DBG)?;
        a.or(
            dword_ptr(ebx + cl::USE_FLAGS as i32),
            UseFlags::USE_DEBUG_REGS.bits(),
        )?;
        a.mov(eax, dword_ptr(h.cookie_slot))?;
        for n in 0..4 {
            let d = (cl::HYPER_DR + 8 * n) as i32;
            a.mov(dword_ptr(ebx + d), eax)?;
            a.add(eax, 0x100)?;
        }
        a.jmp(dbg_done)?;
        a.set_label(&mut no_dbg)?;
        a.and(
            dword_ptr(ebx + cl::USE_FLAGS as i32),
            !UseFlags::USE_DEBUG_REGS.bits(),
        )?;
        a.set_label(&mut dbg_done)?;
        a.mov(
            dword_ptr(abs_addr(h, mb(offset_of!(RcMailbox, expect)))),
            edx,
        )?;
        // The host's own FPU and debug registers, which must come back.
        a.fninit()?;
        a.fldcw(word_ptr(abs_addr(h, host_fcw)))?;
        a.mov(eax, dword_ptr(h.cookie_slot))?;
        a.movd(xmm0, eax)?;
        for (n, dr) in [dr0, dr1, dr2, dr3].into_iter().enumerate() {
            host_dr(a, h, n as u32)?;
            if h.bitness == 64 {
                a.mov(dr, rax)?;
            } else {
                a.mov(dr, eax)?;
            }
        }
        Ok(())
    };
    let post = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        let tmp = h.alloc(&[0; 4], 4);
        let mut fpu_bad = a.create_label();
        let mut fpu_ok = a.create_label();
        let mut dr_bad = a.create_label();
        let mut dr_ok = a.create_label();
        let mut saved = a.create_label();
        a.fnstcw(word_ptr(abs_addr(h, tmp)))?;
        a.movzx(eax, word_ptr(abs_addr(h, tmp)))?;
        a.cmp(eax, HOST_FCW)?;
        a.jne(fpu_bad)?;
        a.movd(eax, xmm0)?;
        a.cmp(eax, dword_ptr(h.cookie_slot))?;
        a.je(fpu_ok)?;
        a.set_label(&mut fpu_bad)?;
        a.mov(dword_ptr(h.hook_fail_slot), HOOKFAIL_HOST_FPU)?;
        a.set_label(&mut fpu_ok)?;
        for (n, dr) in [dr0, dr1, dr2, dr3].into_iter().enumerate() {
            host_dr(a, h, n as u32)?;
            if h.bitness == 64 {
                a.mov(rcx, dr)?;
            } else {
                a.mov(ecx, dr)?;
            }
            a.cmp(ecx, eax)?;
            a.jne(dr_bad)?;
        }
        a.jmp(dr_ok)?;
        a.set_label(&mut dr_bad)?;
        a.mov(dword_ptr(h.hook_fail_slot), HOOKFAIL_HOST_DR)?;
        a.set_label(&mut dr_ok)?;
        // On FPU trips the state the RC code left must be in Guest.fpu now.
        a.test(dword_ptr(h.trip_slot), 1)?;
        a.jnz(saved)?;
        a.mov(ebx, dword_ptr(h.arg2_slot))?;
        a.add(ebx, cpum_hc)?;
        a.movzx(
            eax,
            word_ptr(ebx + (cl::GUEST_FPU + offset_of!(cpum::FxSaveArea, fcw)) as i32),
        )?;
        a.cmp(
            eax,
            dword_ptr(abs_addr(h, mb(offset_of!(RcMailbox, guest_fcw)))),
        )?;
        a.je(saved)?;
        a.mov(dword_ptr(h.hook_fail_slot), HOOKFAIL_GUEST_FPU_SAVE)?;
        a.set_label(&mut saved)?;
        far_fails(a, h, mb(offset_of!(RcMailbox, fails)))
    };
    kb.pre_call(pre).post_call(post)
}

/// Hooks for a trampoline run: before every trip, push the call frame on the
/// VCPU's hyper stack and point `Hyper.eip` at the trampoline.
fn trampoline_hooks(
    kb: HostKernelBuilder,
    cpum_hc: u32,
    target: u32,
    trampoline: u32,
    args: Vec<u32>,
    stack_tops: Vec<(u32, u32)>,
) -> HostKernelBuilder {
    let words = vmm::layout::trampoline_frame(target, &args);
    let pre = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        let bytes = (words.len() * 4) as u32;
        let mut done = a.create_label();
        a.mov(ebx, dword_ptr(h.arg2_slot))?;
        a.add(ebx, cpum_hc)?;
        for (i, (top_hc, top_rc)) in stack_tops.iter().enumerate() {
            let mut next = a.create_label();
            a.cmp(dword_ptr(h.vcpu_slot), i as u32)?;
            a.jne(next)?;
            for (k, w) in words.iter().enumerate() {
                a.mov(dword_ptr(abs_addr(h, top_hc - bytes + 4 * k as u32)), *w)?;
            }
            a.mov(dword_ptr(ebx + cl::HYPER_RSP as i32), top_rc - bytes)?;
            a.mov(dword_ptr(ebx + cl::HYPER_RIP as i32), trampoline)?;
            a.jmp(done)?;
            a.set_label(&mut next)?;
        }
        // The last VCPU's `next` and `done` need separate instructions.
        a.nop()?;
        a.set_label(&mut done)?;
        a.nop()?;
        Ok(())
    };
    kb.pre_call(pre)
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

/// Judges a finished run of `s` (built as `b`): every check of the testbed,
/// the far helper and the STAM profiles. Also used to judge a transcript
/// captured elsewhere (e.g. from real hardware).
pub fn judge(s: &Scenario, b: &Built, run: RunResult) -> ScenarioResult {
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
    let long = s.uses_far_helper();
    let mailbox: Option<Mailbox> = r
        .dump("mailbox")
        .filter(|_| long)
        .and_then(|d| d.read::<Mailbox>(0));
    let rc_mailbox: Option<crate::rc::RcMailbox> = r
        .dump("mailbox")
        .filter(|_| !long)
        .and_then(|d| d.read::<crate::rc::RcMailbox>(0));
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
    let names = |bits: u32| {
        if long {
            far::fail_names(bits).join(", ")
        } else {
            crate::rc::fail_names(bits).join(", ")
        }
    };
    for h in r.hook_failures.iter().take(2) {
        let what = match h.code {
            c if c & HOOKFAIL_FAR != 0 => format!("far side saw {}", names(c & !HOOKFAIL_FAR)),
            HOOKFAIL_SYNC_LEFT => "a SYNC flag was left set".into(),
            HOOKFAIL_HOST_FPU => "the host FPU state did not come back".into(),
            HOOKFAIL_HOST_DR => "the host DR0-DR3 did not come back".into(),
            HOOKFAIL_GUEST_FPU_SAVE => "the RC code's FPU state was not saved to Guest.fpu".into(),
            c => format!("hook failure {c:#x}"),
        };
        failures.push(format!("trip {} vcpu {}: {what}", h.trip, h.vcpu));
    }
    let pass = run.outcome == Outcome::Pass;
    let (far_calls, far_fails) = match (&mailbox, &rc_mailbox) {
        (Some(m), _) => (Some(m.calls), m.fails),
        (_, Some(m)) => (Some(m.calls), m.fails),
        _ => (None, 0),
    };
    if let Some(n) = far_calls {
        if u64::from(n) != calls && pass && s.trampoline_args.is_none() {
            failures.push(format!("far side ran {n} times, expected {calls}"));
        }
    }
    if far_fails != 0 {
        failures.push(format!("far side failures: {}", names(far_fails)));
    }
    if let (Some(m), None) = (&rc_mailbox, &s.trampoline_args) {
        // Every even trip uses the FPU once: exactly one #NM each.
        let fpu_trips = u64::from(s.trips.div_ceil(2)) * u64::from(s.vcpus);
        if u64::from(m.nm_count) != fpu_trips && pass {
            failures.push(format!(
                "{} lazy-FPU traps, expected {fpu_trips}",
                m.nm_count
            ));
        }
    }
    let (mut to_gc, mut to_hc) = (None, None);
    if let Some(vm) = &vm {
        let h = &vm.header;
        if s.options.stats && !s.is_stub() {
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
        if s.options.apic_nmi_masking && run.outcome == Outcome::Pass && !s.is_stub() {
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
        rc_mailbox,
        last_step,
        scratch_marker: r.dump("scratch").and_then(|d| d.u32_at(0)),
        vm_image: vm_dump.filter(|d| d.complete).map(|d| d.bytes.clone()),
        run,
    }
}

const _: () = assert!(CPUMCPU_SIZE % 64 == 0);
