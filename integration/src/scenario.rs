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
use vmm::{ExtraMapping, Installed, Placement, Vmm, VmmConfig, VmmError};
use vmm_switcher::templates::{Step, TemplateOptions};
use vmm_switcher::{RcAddr, SideMode, SwitcherKind, View};

use crate::farside::intermediate_amd64::{self, FarConfig, FarLayout, Mailbox};
use crate::farside::{self, hyper, hyper_amd64, hyper_legacy, FarError};
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
/// The core code's HC address on a 5-level host ([`Scenario::set_la57`]):
/// canonical in 57 bits but not in 48 (PML5 entry 256), so the run proves
/// the 5-level tables. The hypervisor area keeps its 48-bit address.
pub const LA57_CODE_HC: u64 = 0xff00_0000_c040_0000;
/// Table pages of a 5-level host's VMM core (both contexts; the default
/// 64 hold the three other flavours).
pub const LA57_TABLE_PAGES: u32 = 96;

/// A deliberately broken switcher: one instruction of the relocated code is
/// replaced by NOPs (or, for [`Mutation::SysenterCsNotRestored`], one jump
/// is made unconditional).
///
/// Each has a command-line name ([`Mutation::name`], also what the `BOOT`
/// line and the JSON say) and applies to some switchers only
/// ([`Mutation::applies_to`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
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
    /// Switchers with RC code: the host FPU state is not restored after the RC code used the FPU.
    HostFpuNotRestored,
    /// Switchers with RC code: the host SYSENTER_CS is not restored.
    SysenterCsNotRestored,
    /// Switchers with RC code: the hyper TSS busy bit is not cleared before `ltr`.
    HyperTssBusyNotCleared,
    /// 32-bit/PAE hypervisor contexts: `Hyper.cr3` is not loaded (RC code runs on the intermediate CR3).
    HyperCr3NotLoaded,
    /// Set-up: every VCPU's `Hyper.esp` is VCPU 0's stack top (harmless
    /// while one host CPU switches at a time; caught by `--cpus` ≥ 2 with
    /// deadlines).
    SharedHyperStack,
    /// Testbed: every VCPU's far side and the host's hooks use VCPU 0's
    /// mailbox (as on one host CPU; caught by `--cpus` ≥ 2 with deadlines).
    SharedFarMailbox,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 12] = [
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
        Self::SharedHyperStack,
        Self::SharedFarMailbox,
    ];

    /// The command-line name (`pae-left-on`, …), as `--mutate`, the `BOOT`
    /// line and the JSON spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TssBusyNotCleared => "tss-busy-not-cleared",
            Self::HostEbxNotRestored => "host-ebx-not-restored",
            Self::LvtNotUnmasked => "lvt-not-unmasked",
            Self::PaeLeftOn => "pae-left-on",
            Self::FpuNotSynced => "fpu-not-synced",
            Self::DisVectorsNotCleared => "dis-vectors-not-cleared",
            Self::HostFpuNotRestored => "host-fpu-not-restored",
            Self::SysenterCsNotRestored => "sysenter-cs-not-restored",
            Self::HyperTssBusyNotCleared => "hyper-tss-busy-not-cleared",
            Self::HyperCr3NotLoaded => "hyper-cr3-not-loaded",
            Self::SharedHyperStack => "shared-hyper-stack",
            Self::SharedFarMailbox => "shared-far-mailbox",
        }
    }

    /// The mutation whose command-line name is `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// What breaks, in one line (the command line's help).
    pub const fn description(self) -> &'static str {
        match self {
            Self::TssBusyNotCleared => "the host TSS busy bit is not cleared before `ltr`",
            Self::HostEbxNotRestored => "host EBX is not restored",
            Self::LvtNotUnmasked => "LINT0 is not unmasked after the trip",
            Self::PaeLeftOn => "CR4.PAE stays on when returning to a 32-bit host",
            Self::FpuNotSynced => "`Guest.fpu` is not loaded although sync was asked",
            Self::DisVectorsNotCleared => {
                "the masked-vector register is not cleared first (VirtualBox's bug)"
            }
            Self::HostFpuNotRestored => {
                "the host FPU state is not restored after the RC code used the FPU"
            }
            Self::SysenterCsNotRestored => "the host SYSENTER_CS is not restored",
            Self::HyperTssBusyNotCleared => "the hyper TSS busy bit is not cleared before `ltr`",
            Self::HyperCr3NotLoaded => {
                "`Hyper.cr3` is not loaded (the RC code runs on the intermediate CR3)"
            }
            Self::SharedHyperStack => {
                "every VCPU runs on VCPU 0's hyper stack (needs --cpus 2 or more to show)"
            }
            Self::SharedFarMailbox => {
                "every VCPU's far side shares one mailbox (needs --cpus 2 or more to show)"
            }
        }
    }

    /// Whether the switcher `kind` has the code this mutation breaks (with
    /// the default template options; an option that removes that code, such
    /// as no NMI masking for [`Mutation::LvtNotUnmasked`], makes
    /// [`build`] refuse the mutation too).
    ///
    /// The stubs have none. The host-side restores of EBX and the host TSS
    /// are the 32-bit/PAE hosts'; the lazy-FPU restore, the SYSENTER_CS
    /// restore and the hyper TSS belong to the switchers with RC code (all
    /// but 32-bit/PAE → AMD64), `Guest.fpu` sync to those without; CR4.PAE
    /// is cleared on the way back where a 32-bit host's switcher turned it on
    /// (`32-to-pae`, `32-to-amd64`); `Hyper.cr3` is loaded on the way in by
    /// the switchers entering a 32-bit/PAE hypervisor context.
    pub const fn applies_to(self, kind: SwitcherKind) -> bool {
        let Some(guest) = kind.guest() else {
            return false;
        };
        let host = kind.host();
        let legacy_host = !matches!(host, SideMode::Amd64);
        let far_helper = legacy_host && matches!(guest, SideMode::Amd64);
        match self {
            Self::TssBusyNotCleared | Self::HostEbxNotRestored => legacy_host,
            Self::LvtNotUnmasked | Self::DisVectorsNotCleared => true,
            Self::PaeLeftOn => {
                matches!(host, SideMode::Bits32) && !matches!(guest, SideMode::Bits32)
            }
            Self::FpuNotSynced => far_helper,
            Self::HostFpuNotRestored
            | Self::SysenterCsNotRestored
            | Self::HyperTssBusyNotCleared => !far_helper,
            Self::HyperCr3NotLoaded => !matches!(guest, SideMode::Amd64),
            Self::SharedHyperStack | Self::SharedFarMailbox => true,
        }
    }

    /// The mutation breaks the set-up (the VCPUs' data, the far side), not
    /// the switcher's code.
    pub const fn is_setup(self) -> bool {
        matches!(self, Self::SharedHyperStack | Self::SharedFarMailbox)
    }

    /// The switchers this mutation applies to, in [`SwitcherKind::ALL`] order.
    pub fn switchers(self) -> Vec<SwitcherKind> {
        SwitcherKind::ALL
            .into_iter()
            .filter(|k| self.applies_to(*k))
            .collect()
    }

    /// Whether `insn` (in `view`; `in_id_exit`: inside the identity-mapped
    /// section of the way back) is the instruction this mutation replaces.
    fn matches(self, insn: &Instruction, view: View, in_id_exit: bool) -> bool {
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
            // Set-up mutations patch no code.
            Self::SharedHyperStack | Self::SharedFarMailbox => false,
            Self::HostEbxNotRestored => {
                insn.code() == Code::Mov_r32_rm32
                    && insn.op0_register() == Register::EBX
                    && insn.memory_displacement32() as usize == cl::HOST32_EBX
            }
            // Revisions A and B clear the mask bit (`and`); revision C
            // writes the saved value back from EDI (its masking writes EAX).
            Self::LvtNotUnmasked => {
                mem_disp(apic::reg::LVT_LINT0 as usize)
                    && (insn.code() == Code::And_rm32_imm32
                        && insn.immediate32() == !apic::lvt::MASKED
                        || insn.code() == Code::Mov_rm32_r32
                            && insn.op1_register() == Register::EDI)
            }
            Self::PaeLeftOn => {
                in_id_exit
                    && insn.code() == Code::Mov_cr_r32
                    && insn.op0_register() == Register::CR4
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

impl core::fmt::Display for Mutation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Switchers' command-line names, comma-separated.
fn cli_names(kinds: &[SwitcherKind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|k| k.cli_name()).collect();
    names.join(", ")
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
    /// The NMI storm: the host places an NMI edge at every instruction
    /// offset of the round trip, one offset per call (see [`crate::storm`]).
    pub nmi_storm: bool,
    /// The CPU facts the switcher is relocated for (from the CPUID bits of
    /// the CPU it will run on, e.g. [`crate::cpumodel::CpuModel::facts`]);
    /// the host kernel refuses a CPU whose NX, FXSR, SEP or SYSCALL bit
    /// differs (`NOCPU`, `CPUEXTRA`).
    pub cpu: vmm::CpuFacts,
    /// The AMD64 host's CR4 and protection features.
    pub host_cr4: HostCr4,
    /// Host CPUs switching at once (QEMU `-smp`); VCPU `v` runs on CPU
    /// `v % cpus` (see [`crate::hostkernel::smp`]).
    pub cpus: u32,
    /// With several CPUs: the PIT deadlines that interleave them mid-switch
    /// (without, each CPU runs until it waits and no calls overlap).
    pub deadlines: bool,
}

/// The control-register configuration of an AMD64 host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostCr4 {
    /// Only what the testbed needs: PAE, PGE, OSFXSR, OSXMMEXCPT.
    #[default]
    Base,
    /// A host as current kernels run it: also SMEP, SMAP, UMIP, PKE (with a
    /// non-zero PKRU) and FSGSBASE.
    Today,
    /// [`Self::Today`] plus CR4.PCIDE with a non-zero PCID in CR3
    /// ([`crate::hostkernel::HOST_PCID`]). QEMU TCG does not emulate PCID:
    /// Bochs runs it.
    #[serde(rename = "today+pcid")]
    TodayPcid,
    /// [`Self::TodayPcid`] plus CR4.CET (IA32_S_CET left 0), which Bochs
    /// runs and QEMU TCG does not emulate.
    #[serde(rename = "today+pcid+cet")]
    TodayPcidCet,
}

impl HostCr4 {
    /// Every configuration QEMU TCG can run.
    pub const ALL: [HostCr4; 2] = [Self::Base, Self::Today];
    /// The configurations only Bochs can run (TCG has no PCID).
    pub const BOCHS_ONLY: [HostCr4; 2] = [Self::TodayPcid, Self::TodayPcidCet];

    /// The command-line name (`base`, `today`, `today+pcid`,
    /// `today+pcid+cet`), as `--host-cr4`, the `BOOT` line and the JSON
    /// spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Today => "today",
            Self::TodayPcid => "today+pcid",
            Self::TodayPcidCet => "today+pcid+cet",
        }
    }

    /// The configuration named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::BOCHS_ONLY)
            .find(|c| c.name() == name)
    }

    /// Whether today's CR4 bits (SMEP, SMAP, UMIP, PKE, FSGSBASE) are on.
    pub const fn today(self) -> bool {
        matches!(self, Self::Today | Self::TodayPcid | Self::TodayPcidCet)
    }

    /// Whether CR4.PCIDE is on, with [`crate::hostkernel::HOST_PCID`] in CR3.
    pub const fn pcid(self) -> bool {
        matches!(self, Self::TodayPcid | Self::TodayPcidCet)
    }

    /// Whether CR4.CET is on.
    pub const fn cet(self) -> bool {
        matches!(self, Self::TodayPcidCet)
    }

    /// Whether QEMU TCG can run this configuration (it emulates neither
    /// PCID nor CET).
    pub const fn qemu_can_run(self) -> bool {
        !self.pcid() && !self.cet()
    }
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
            nmi_storm: false,
            cpu: vmm::CpuFacts::common(),
            host_cr4: HostCr4::Base,
            cpus: 1,
            deadlines: true,
        }
    }

    /// Whether the host runs 5-level paging (CR4.LA57): the switchers are
    /// built with [`TemplateOptions::la57`].
    pub fn la57(&self) -> bool {
        self.options.la57
    }

    /// Asks for (or drops) a 5-level host: sets [`TemplateOptions::la57`]
    /// and, on an AMD64 host whose core code is at its default HC address,
    /// moves the core code to [`LA57_CODE_HC`]. A 32-bit host with LA57 is
    /// refused when the scenario is built ([`crate::cpumodel::check_host`]).
    pub fn set_la57(&mut self, on: bool) {
        self.options.la57 = on;
        let default_hc = VmmConfig::amd64_host().placement.code_hc;
        if self.amd64_host() {
            if on && self.placement.code_hc == default_hc {
                self.placement.code_hc = vmm::HcAddr(LA57_CODE_HC);
            } else if !on && self.placement.code_hc.0 == LA57_CODE_HC {
                self.placement.code_hc = default_hc;
            }
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
    Far(#[from] FarError),
    /// The host kernel did not build.
    #[error("host kernel: {0}")]
    Kernel(#[from] BuildError),
    /// The trampoline exists only for 32-bit/PAE hypervisor contexts here.
    #[error("the call trampoline is not exercised for {}", .0.cli_name())]
    NoTrampoline(SwitcherKind),
    /// Too many trampoline arguments.
    #[error("{0} trampoline arguments; at most {max}", max = hyper::MAX_TARGET_ARGS)]
    TooManyArgs(usize),
    /// The mutation does not apply to this switcher.
    #[error(
        "mutation {} does not apply to {} (only to {})",
        mutation.name(),
        kind.cli_name(),
        cli_names(&mutation.switchers())
    )]
    MutationNotApplicable {
        /// The mutation.
        mutation: Mutation,
        /// The switcher.
        kind: SwitcherKind,
    },
    /// The mutation applies to this switcher, but the template options left
    /// out the code it breaks.
    #[error(
        "mutation {} finds nothing to break in {} as built with these options",
        mutation.name(),
        kind.cli_name()
    )]
    MutationTargetMissing {
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
    /// The host configuration does not fit the switcher or the CPU model.
    #[error("{0}")]
    Host(#[from] crate::cpumodel::HostConfigError),
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
    pub rc_mailbox: Option<hyper::RcMailbox>,
    /// The last trace step printed (trace option only).
    pub last_step: Option<Step>,
    /// The VM structure's bytes as dumped after the run (read its STAM
    /// samples with `vmm::stats::VmStats`).
    #[serde(skip)]
    pub vm_image: Option<Vec<u8>>,
    /// The crash-dump scratch page's first dword (last marker written while paging was off).
    pub scratch_marker: Option<u32>,
    /// What the NMI storm found (`None` without one).
    pub nmi_storm: Option<crate::storm::StormReport>,
    /// Several host CPUs: how they shared the work and how often their
    /// calls overlapped (`None` with one CPU).
    pub smp: Option<SmpReport>,
}

/// What a run on several host CPUs reports (`CPU` and `SMP` lines).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SmpReport {
    /// Host CPUs.
    pub cpus: u32,
    /// The PIT divisor whose timer deadlines interleave the CPUs.
    pub deadline_divisor: u32,
    /// Calls during which another CPU was inside its own call.
    pub overlapping_trips: u64,
    /// Every CPU's figures, by CPU index.
    pub per_cpu: Vec<CpuFigures>,
}

/// One host CPU's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuFigures {
    /// CPU index (0: the bootstrap CPU).
    pub cpu: u32,
    /// Calls it made (its VCPUs' round trips).
    pub calls: u32,
    /// Of those, calls during which another CPU was inside its own call.
    pub overlapping_trips: u32,
    /// Calls that failed a check.
    pub failed: u32,
    /// Smallest and largest RDTSC delta of its calls.
    pub tsc_min: u32,
    /// Largest RDTSC delta of its calls.
    pub tsc_max: u32,
}

/// The [`SmpReport`] of a transcript (`None` without an `SMP` line).
fn smp_report(r: &crate::transcript::Report) -> Option<SmpReport> {
    let smp = r.smp.as_ref()?;
    let mut per_cpu: Vec<CpuFigures> = r
        .cpu_lines
        .iter()
        .map(|c| CpuFigures {
            cpu: c.cpu,
            calls: c.calls,
            overlapping_trips: c.overlapping,
            failed: c
                .mismatches
                .saturating_add(c.retfails)
                .saturating_add(c.hookfails),
            tsc_min: c.tsc_min,
            tsc_max: c.tsc_max,
        })
        .collect();
    per_cpu.sort_by_key(|c| c.cpu);
    Some(SmpReport {
        cpus: smp.cpus,
        deadline_divisor: smp.divisor,
        overlapping_trips: u64::from(smp.overlapping),
        per_cpu,
    })
}

/// Several host CPUs: one clean `CPU` line per CPU with its share of the
/// calls, and an `SMP` line with the sums.
fn smp_failures(s: &Scenario, r: &crate::transcript::Report) -> Vec<String> {
    let mut f = Vec::new();
    let mut cpus: Vec<u32> = r.cpu_lines.iter().map(|c| c.cpu).collect();
    cpus.sort_unstable();
    if cpus != (0..s.cpus).collect::<Vec<_>>() {
        f.push(format!(
            "CPU lines for CPUs {cpus:?}, the run has {} CPUs",
            s.cpus
        ));
    }
    for c in &r.cpu_lines {
        let mine = (0..s.vcpus).filter(|v| v % s.cpus == c.cpu).count() as u64;
        let clean = c.mismatches == 0 && c.retfails == 0 && c.hookfails == 0;
        if c.trips != s.trips
            || u64::from(c.calls) != mine * u64::from(s.trips)
            || c.overlapping > c.calls
            || !clean
        {
            f.push(format!(
                "CPU {} made {} calls in {} trips ({} overlapping), not a clean {} trips of its {mine} VCPUs",
                c.cpu, c.calls, c.trips, c.overlapping, s.trips
            ));
        }
    }
    let Some(smp) = &r.smp else {
        f.push("no SMP line".into());
        return f;
    };
    let calls: u64 = r.cpu_lines.iter().map(|c| u64::from(c.calls)).sum();
    let overlapping: u64 = r.cpu_lines.iter().map(|c| u64::from(c.overlapping)).sum();
    let storm = s
        .nmi_storm
        .then(crate::hostkernel::storm::NmiStorm::default);
    let divisor = u32::from(crate::hostkernel::smp::deadline_divisor(s.deadlines, storm));
    if smp.cpus != s.cpus
        || smp.divisor != divisor
        || u64::from(smp.calls) != calls
        || u64::from(smp.overlapping) != overlapping
    {
        f.push(format!(
            "SMP cpus={} divisor={} overlapping={} calls={} disagrees with the CPU lines ({calls} calls, {overlapping} overlapping)",
            smp.cpus, smp.divisor, smp.overlapping, smp.calls
        ));
    }
    f
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
    pub rc: Option<hyper::RcEntries>,
    /// Host-virtual address of the mailbox.
    pub mailbox_hc: u32,
}

fn u32_addr(what: &'static str, addr: u64) -> Result<u32, ScenarioError> {
    u32::try_from(addr).map_err(|_| ScenarioError::AddressTooWide { what, addr })
}

/// Builds the VMM core, writes the far-side code, and generates the host kernel image.
///
/// The steps: check the trampoline request, build and activate the VMM core,
/// work out the addresses the host and the far side use, write the far-side
/// code and point every VCPU's hyper context at it, take the relocated core
/// code (broken by the scenario's mutation, if any), and generate the host
/// kernel that maps all of it and calls the switcher.
///
/// # Errors
/// [`ScenarioError`] for anything that cannot be set up.
pub fn build(s: &Scenario) -> Result<Built, ScenarioError> {
    build_over(s, |cfg| Ok(Vmm::new(cfg)?))
}

/// [`build`] over a core that `make` builds from the scenario's VMM
/// configuration: in pages of its own choosing ([`vmm::Vmm::with_pages`]),
/// or checked against images made elsewhere (by an embedder through the C
/// API) before the testbed boots them. The core must keep the
/// configuration's placement (its table pages may lie anywhere).
///
/// # Errors
/// What `make` returns, and as [`build`].
pub fn build_over(
    s: &Scenario,
    make: impl FnOnce(VmmConfig) -> Result<Vmm, ScenarioError>,
) -> Result<Built, ScenarioError> {
    check_trampoline(s)?;
    if s.cpus > 1 && s.options.trace {
        // The trace characters go to COM1 outside the host's line lock.
        return Err(BuildError::SmpUnsupported("the switcher trace").into());
    }
    crate::cpumodel::check_host(s)?;
    let mut vmm = make(vmm_config(s))?;
    let sw = vmm.activate(s.kind)?.clone();
    let at = Addresses::new(s, &vmm)?;
    let rc_entries = write_far_side(s, &mut vmm, &sw, &at)?;
    init_vcpus(s, &mut vmm, &at, rc_entries.as_ref())?;
    let core = mutated_core(s, &vmm, &sw)?;
    let kb = HostKernelBuilder::new(s.host_mode())
        .x2apic(s.host_x2apic)
        .cr4_today(s.host_cr4.today())
        .pcid(s.host_cr4.pcid())
        .cet(s.host_cr4.cet())
        .la57(s.la57());
    let kb = map_core_and_hma(kb, s, &vmm, &sw, &at, core)?;
    let kb = add_tables_and_trips(kb, s, &vmm)?;
    let kb = add_checks(kb, s, &vmm, &sw, &at, rc_entries.as_ref())?;
    let kb = add_storm(kb, s, &at);
    let testbed = kb
        .boot_fields(s.boot_fields())
        .require_cpu(s.cpu_requirements())
        .forbid_cpu(s.cpu_refusals())
        .build()?;
    Ok(Built {
        vmm,
        testbed,
        far: at.far_layout,
        rc: rc_entries,
        mailbox_hc: at.mailbox_hc,
    })
}

/// The trampoline is exercised only with the RC code (not with the far
/// helper of the 32-bit/PAE → AMD64 switchers), with at most
/// [`hyper::MAX_TARGET_ARGS`] arguments.
fn check_trampoline(s: &Scenario) -> Result<(), ScenarioError> {
    if s.trampoline_args.is_some() && s.uses_far_helper() {
        return Err(ScenarioError::NoTrampoline(s.kind));
    }
    if let Some(args) = &s.trampoline_args {
        if args.len() > hyper::MAX_TARGET_ARGS {
            return Err(ScenarioError::TooManyArgs(args.len()));
        }
    }
    Ok(())
}

/// The VMM core's configuration: the scenario's placement, VCPUs and
/// options, the host's width, and the local APIC page mapped (uncached) in
/// the intermediate context at the address the host kernel maps it.
fn vmm_config(s: &Scenario) -> VmmConfig {
    VmmConfig {
        placement: s.placement,
        vcpus: s.vcpus,
        options: s.options,
        cpu: s.cpu,
        extra_mappings: vec![ExtraMapping {
            virt: u64::from(LAPIC_VIRT),
            phys: u64::from(LAPIC_VIRT),
            len: 0x1000,
            uncached: true,
        }],
        host_bits: if s.host_mode() == HostMode::Amd64 {
            64
        } else {
            32
        },
        // The 5-level tables of both contexts need room of their own.
        table_pages: if s.la57() {
            LA57_TABLE_PAGES
        } else {
            VmmConfig::default().table_pages
        },
        ..VmmConfig::default()
    }
}

/// The addresses the host kernel, its hooks and the far side use.
///
/// Hooks address the HMA with 32-bit addresses: on an AMD64 host through a
/// low alias of its high canonical HC mapping (`vm_hc`, `hma_hc` and every
/// HC address derived from them are such aliases there).
struct Addresses {
    /// The host is in long mode.
    wide: bool,
    /// RC address of the helper area (the far-side code).
    helper_rc: u32,
    /// Size of the helper area in bytes.
    helper_size: u32,
    /// Layout of the helper area.
    far_layout: FarLayout,
    /// The VM structure's HC address, full width.
    vm_hc64: u64,
    /// The VM structure's HC address for hooks.
    vm_hc: u32,
    /// The HMA's HC address for hooks.
    hma_hc: u32,
    /// The HMA's HC address, full width.
    hma_hc64: u64,
    /// The HMA's RC address.
    hma_rc: u32,
    /// HC address of the mailbox (VCPU 0's when each has its own).
    mailbox_hc: u32,
    /// Far-side mailboxes: one per VCPU on several host CPUs, else one.
    mailboxes: u32,
    /// HC address of `Cpum`.
    cpum_hc: u32,
    /// RC address of `Cpum`.
    cpum_rc: u32,
    /// Physical address of the crash-marker scratch page.
    scratch_phys: u64,
}

impl Addresses {
    fn new(s: &Scenario, vmm: &Vmm) -> Result<Self, ScenarioError> {
        let p = s.placement;
        let (helper_rc, _, helper_size) = vmm.helper_area();
        let far_layout = FarLayout::new(helper_rc.0);
        let (vm_hc64, vm_rc, _) = vmm.vm_addrs();
        let wide = s.host_mode() == HostMode::Amd64;
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
        Ok(Self {
            wide,
            helper_rc: helper_rc.0,
            helper_size,
            far_layout,
            vm_hc64: vm_hc64.0,
            vm_hc,
            hma_hc,
            hma_hc64: p.hma_hc.0,
            hma_rc: p.hma_rc.0,
            mailbox_hc: hma_hc + (far_layout.mailbox_rc() - p.hma_rc.0),
            mailboxes: mailboxes(s),
            cpum_hc: vm_hc + OFF_CPUM as u32,
            cpum_rc: vm_rc.0 + OFF_CPUM as u32,
            scratch_phys: hma_phys_of(vmm, helper_rc.0 - p.hma_rc.0 + far_layout.scratch_off)?,
        })
    }

    /// The HC address (for hooks) of the HMA's RC address `rc`.
    fn hc_of(&self, rc: u32) -> u32 {
        self.hma_hc + (rc - self.hma_rc)
    }

    /// HC address (for hooks) of the crash-marker scratch page.
    fn scratch_hc(&self) -> u32 {
        self.hc_of(self.helper_rc + self.far_layout.scratch_off)
    }

    /// Distance between two VCPUs' mailboxes (0: one shared mailbox).
    fn mailbox_stride(&self) -> u32 {
        if self.mailboxes > 1 {
            farside::MAILBOX_STRIDE
        } else {
            0
        }
    }

    /// RC address of VCPU `i`'s mailbox.
    fn mailbox_rc(&self, i: u32) -> u32 {
        self.far_layout.mailbox_rc() + i * self.mailbox_stride()
    }

    /// Bytes from the first mailbox to the end of the last.
    fn mailboxes_len(&self, one: usize) -> u32 {
        (self.mailboxes - 1) * farside::MAILBOX_STRIDE + one as u32
    }

    /// The full-width HC address of the hook address `lo` (the HMA's high
    /// canonical mapping on an AMD64 host).
    fn hi(&self, lo: u32) -> u64 {
        self.hma_hc64 + u64::from(lo - self.hma_hc)
    }
}

/// Writes the far-side code into the helper area: nothing for the stubs,
/// the 64-bit helper for the 32-bit/PAE → AMD64 switchers, else the RC code
/// of the hypervisor context with the hyper IDT's gates pointing at its
/// handlers. Returns the RC code's entry points.
fn write_far_side(
    s: &Scenario,
    vmm: &mut Vmm,
    sw: &Installed,
    at: &Addresses,
) -> Result<Option<hyper::RcEntries>, ScenarioError> {
    let helper_size = at.helper_size as usize;
    if s.is_stub() {
        // Nothing runs on the far side.
        return Ok(None);
    }
    if s.uses_far_helper() {
        let far_cfg = FarConfig {
            layout: at.far_layout,
            cs64: vmm::layout::sel::CS64,
            apic: LAPIC_VIRT,
            com1: 0x3f8,
            exit_port: 0xf4,
            exit_far_exception: EXIT_FAR_EXCEPTION,
            mailboxes: at.mailboxes,
        };
        vmm.write_helper(&intermediate_amd64::build(&far_cfg, helper_size)?)?;
        return Ok(None);
    }
    let rc64 = s.kind == SwitcherKind::Amd64ToAmd64;
    let rc_cfg = hyper::RcConfig {
        rc: at.helper_rc,
        mailbox_off: at.far_layout.mailbox_off,
        mailboxes: at.mailboxes,
        cpum_rc: at.cpum_rc,
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
        hyper_amd64::build(&rc_cfg, helper_size)?
    } else {
        hyper_legacy::build(&rc_cfg, helper_size)?
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
    Ok(Some(e))
}

/// The RC offset of VCPU `i`'s hyper stack top, or the VMM's error for a
/// VCPU the layout has no stack for.
fn stack_top(l: &vmm::layout::HmaLayout, i: u32, vcpus: u32) -> Result<u32, ScenarioError> {
    l.stack_top(i)
        .ok_or(ScenarioError::Vmm(VmmError::NoSuchVcpu {
            index: i,
            count: vcpus,
        }))
}

/// Every VCPU's CPUM data: the APIC base when NMI masking is on, the host's
/// x2APIC mode, the initial `Guest.fpu`, the crash-marker scratch page and,
/// with RC code, the hyper registers it is entered with.
fn init_vcpus(
    s: &Scenario,
    vmm: &mut Vmm,
    at: &Addresses,
    rc_entries: Option<&hyper::RcEntries>,
) -> Result<(), ScenarioError> {
    let stack0 = at.hma_rc + stack_top(vmm.hma_layout(), 0, s.vcpus)?;
    for i in 0..s.vcpus {
        let rc_entry = rc_entries.map(|e| e.entry);
        let cpumcpu_rc = at.cpum_rc + vmm.vcpu_arg(i)?;
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
            c.guest.dr[5] = at.scratch_phys;
            if s.mutation == Some(Mutation::SharedHyperStack) {
                c.hyper.rsp = u64::from(stack0);
            }
            if at.mailboxes > 1 {
                // The far helper finds its VCPU's mailbox here.
                c.hyper.rdi = u64::from(at.mailbox_rc(i));
            }
            if let Some(entry) = rc_entry {
                c.hyper.rip = u64::from(entry);
                c.hyper.rsi = u64::from(cpumcpu_rc);
                c.hyper.rdi = u64::from(at.mailbox_rc(i));
                c.hyper.rbp = u64::from(hyper::ebp_magic(i));
                c.hyper.rbx = 0;
                c.hyper.dr[7] = cpum::regs::DR7_INIT;
            }
        })?;
    }
    Ok(())
}

/// The relocated core code, broken by the scenario's mutation if it has one.
fn mutated_core(s: &Scenario, vmm: &Vmm, sw: &Installed) -> Result<Vec<u8>, ScenarioError> {
    let mut core = vmm.core_code().to_vec();
    let Some(m) = s.mutation else {
        return Ok(core);
    };
    if !m.applies_to(s.kind) {
        return Err(ScenarioError::MutationNotApplicable {
            mutation: m,
            kind: s.kind,
        });
    }
    if m.is_setup() {
        return Ok(core);
    }
    let patched = if m == Mutation::SysenterCsNotRestored {
        skip_sysenter_cs_restore(&mut core, sw)
    } else {
        nop_out(&mut core, sw, m)?
    };
    if patched.is_none() {
        return Err(ScenarioError::MutationTargetMissing {
            mutation: m,
            kind: s.kind,
        });
    }
    Ok(core)
}

/// Makes the way back's "host does not use SYSENTER" jump unconditional, so
/// the host's SYSENTER_CS is not restored although it is used. `None` when
/// the switcher has no such jump.
fn skip_sysenter_cs_restore(core: &mut [u8], sw: &Installed) -> Option<()> {
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
        .find(|f| f.kind == vmm_switcher::FixupKind::NoSysenterJmp && f.off >= exit)?;
    let next = rec.off.checked_add(5)?;
    let rel = rec.operand.unwrap_or(next).wrapping_sub(next);
    let at = usize::try_from(sw.offset.checked_add(rec.off)?).ok()?;
    let jmp = core.get_mut(at..at.checked_add(5)?)?;
    jmp[0] = 0xe9;
    jmp[1..].copy_from_slice(&rel.to_le_bytes());
    Some(())
}

/// Replaces the first instruction `m` matches in the switcher's relocated
/// code by NOPs. `None` when no instruction matches.
fn nop_out(core: &mut [u8], sw: &Installed, m: Mutation) -> Result<Option<()>, ScenarioError> {
    let code = sw.code(core).to_vec();
    let id_exit = identity_exit(&sw.def);
    let lines =
        vmm_switcher::disasm::lines(&sw.def, &code, &sw.ctx, &sw.reloc).map_err(VmmError::from)?;
    let Some(hit) = lines.iter().find(|l| {
        l.insn
            .as_ref()
            .is_some_and(|i| m.matches(i, l.view, id_exit.contains(&l.off)))
    }) else {
        return Ok(None);
    };
    let insn = sw
        .offset
        .checked_add(hit.off)
        .and_then(|at| usize::try_from(at).ok())
        .and_then(|at| core.get_mut(at..at.checked_add(hit.bytes.len())?));
    Ok(insn.map(|bytes| bytes.fill(0x90)))
}

/// The identity-mapped section of the way back: from `IDExitTarget` to the
/// next host-context label after it (`ICExitTarget` in the 32-bit/PAE →
/// AMD64 switchers, `HCExitTarget` in the 32-bit/PAE ones); empty when the
/// switcher has no such section.
fn identity_exit(def: &vmm_switcher::SwitcherDef) -> core::ops::Range<u32> {
    let Some(&start) = def.labels.get("IDExitTarget") else {
        return 0..0;
    };
    let end = ["ICExitTarget", "HCExitTarget"]
        .into_iter()
        .filter_map(|l| def.labels.get(l).copied())
        .filter(|&off| off > start)
        .min()
        .unwrap_or(start);
    start..end
}

/// The physical address of HMA offset `off` (the HMA's pages need not be
/// adjacent).
fn hma_phys_of(vmm: &Vmm, off: u32) -> Result<u64, ScenarioError> {
    let page = vmm.hma_pages().get((off / 4096) as usize);
    let phys = page.map(|p| p.0 + u64::from(off % 4096));
    let beyond = vmm::PlacementError::LayoutTooLarge {
        what: "HMA offset",
        value: u64::from(off),
    };
    Ok(phys.ok_or(VmmError::Placement(beyond))?)
}

/// The HMA as runs of physically adjacent pages: (offset in the HMA,
/// physical address, bytes), each physical address below 4 GiB.
fn hma_runs(vmm: &Vmm) -> Result<Vec<(u32, u32, Vec<u8>)>, ScenarioError> {
    let mut runs: Vec<(u32, u32, Vec<u8>)> = Vec::new();
    let pages = vmm.hma_pages().iter().zip(vmm.hma().chunks(4096));
    for (i, (page, bytes)) in pages.enumerate() {
        let phys = u32_addr("HMA page", page.0)?;
        if let Some((_, start, run)) = runs.last_mut() {
            if u64::from(*start) + run.len() as u64 == u64::from(phys) {
                run.extend_from_slice(bytes);
                continue;
            }
        }
        runs.push(((i * 4096) as u32, phys, bytes.to_vec()));
    }
    Ok(runs)
}

/// Maps the core code and the HMA at their host addresses and names the
/// switcher entry, its argument, the cookie slot and the dumps (the VM
/// structure, the scratch page). On an AMD64 host the HMA also gets the low
/// alias the hooks address it through.
fn map_core_and_hma(
    mut kb: HostKernelBuilder,
    s: &Scenario,
    vmm: &Vmm,
    sw: &Installed,
    at: &Addresses,
    core: Vec<u8>,
) -> Result<HostKernelBuilder, ScenarioError> {
    let p = s.placement;
    // HC page i of the HMA is its physical page i.
    let hma_runs = hma_runs(vmm)?;
    let code_phys = u32_addr("core code", p.code_phys.0)?;
    let vm_size = vmm.hma_layout().vm_size;
    if !at.wide {
        let entry = u32_addr("switcher entry", sw.entries.r0_host_to_guest_hc.0)?;
        kb = kb.blob_mapped(
            "core-code",
            code_phys,
            u32_addr("core code HC", p.code_hc.0)?,
            core,
            true,
        );
        for (off, phys, bytes) in hma_runs {
            kb = kb.blob_mapped("hma", phys, at.hma_hc + off, bytes, true);
        }
        return Ok(kb
            .entry(entry)
            .arg1(at.vm_hc)
            .cookie_at(at.mailbox_hc + offset_of!(Mailbox, cookie) as u32)
            .cookie_stride(at.mailbox_stride())
            .dump("vm", at.vm_hc, vm_size)
            .dump("scratch", at.scratch_hc(), 4));
    }
    kb = kb.blob_mapped64("core-code", code_phys, p.code_hc.0, core, true);
    for (off, phys, bytes) in &hma_runs {
        let virt = p.hma_hc.0 + u64::from(*off);
        kb = kb.blob_mapped64("hma", *phys, virt, bytes.clone(), true);
    }
    // Hook code reaches the HMA with 32-bit addresses: zero-extended
    // through `[reg+disp]` and sign-extended as absolute displacements.
    // Map whichever of the two aliases the HC mapping is not.
    let zero_ext = u64::from(at.hma_hc);
    let sign_ext = i64::from(at.hma_hc as i32) as u64;
    for (name, virt) in [("hma-alias", zero_ext), ("hma-alias-sx", sign_ext)] {
        if virt != p.hma_hc.0 && !(name == "hma-alias-sx" && sign_ext == zero_ext) {
            for (off, phys, bytes) in &hma_runs {
                kb = kb.map64(crate::hostkernel::Mapping64 {
                    name: name.into(),
                    virt: virt + u64::from(*off),
                    phys: *phys,
                    len: bytes.len() as u32,
                    writable: true,
                });
            }
        }
    }
    Ok(kb
        .entry64(sw.entries.r0_host_to_guest_hc.0)
        .arg1_64(at.vm_hc64)
        .cookie_at64(at.hi(at.mailbox_hc) + offset_of!(Mailbox, cookie) as u64)
        .cookie_stride(at.mailbox_stride())
        .dump64("vm", at.vm_hc64, vm_size)
        .dump64("scratch", at.hi(at.scratch_hc()), 4))
}

/// The intermediate and hyper page tables at their physical addresses, the
/// VCPUs the host calls in turn, and the round trips.
fn add_tables_and_trips(
    kb: HostKernelBuilder,
    s: &Scenario,
    vmm: &Vmm,
) -> Result<HostKernelBuilder, ScenarioError> {
    let (tables_phys, tables) = vmm.tables();
    let (hyper_phys, hyper_tables) = vmm.hyper_tables();
    let vcpu_args = (0..s.vcpus)
        .map(|i| vmm.vcpu_arg(i))
        .collect::<Result<Vec<u32>, _>>()?;
    Ok(kb
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
        .cpus(s.cpus)
        .deadlines(s.deadlines)
        .trips(s.trips))
}

/// What the host expects back from each call and the hooks around it, by
/// far side: the stub's status; the far helper's verdict; a trampoline
/// target's value; or the RC code's verdict with the host FPU and debug
/// registers checked. The far side's mailbox is dumped after the run.
fn add_checks(
    kb: HostKernelBuilder,
    s: &Scenario,
    vmm: &Vmm,
    sw: &Installed,
    at: &Addresses,
    rc_entries: Option<&hyper::RcEntries>,
) -> Result<HostKernelBuilder, ScenarioError> {
    let apic_on = s.options.apic_nmi_masking;
    let x2 = s.host_x2apic;
    let mailbox_hc = at.mailbox_hc;
    let stride = at.mailbox_stride();
    let cpum_hc = at.cpum_hc;
    Ok(if s.is_stub() {
        kb.expect(Expected::Value(vmm_switcher::templates::stub::STUB_STATUS))
    } else if s.uses_far_helper() {
        long_hooks(kb, apic_on, x2, (mailbox_hc, stride), cpum_hc)
            .expect(Expected::CookieXor(intermediate_amd64::RET_XOR))
            .dump(
                "mailbox",
                mailbox_hc,
                at.mailboxes_len(size_of::<Mailbox>()),
            )
    } else if let (Some(args), Some(e)) = (&s.trampoline_args, rc_entries) {
        let target = e.targets[args.len()];
        let tramp = sw.entries.rc_call_trampoline.0;
        let l = *vmm.hma_layout();
        let frames = (0..s.vcpus)
            .map(|i| {
                let top = s.placement.hma_rc.0 + stack_top(&l, i, s.vcpus)?;
                Ok((at.hc_of(top), top))
            })
            .collect::<Result<Vec<(u32, u32)>, ScenarioError>>()?;
        trampoline_hooks(kb, cpum_hc, target, tramp, args.clone(), frames)
            .expect(Expected::Value(hyper::target_result(args)))
    } else {
        // Long mode runs with CR4.PAE set as well.
        let pae = vmm::target_flavour(s.kind) != vmm::Flavour::Legacy32;
        rc_hooks(kb, apic_on, x2, pae, (mailbox_hc, stride), cpum_hc)
            .expect(Expected::CookieXor(hyper::RET_XOR))
            .dump(
                "mailbox",
                mailbox_hc,
                at.mailboxes_len(size_of::<hyper::RcMailbox>()),
            )
    })
}

/// With [`Scenario::nmi_storm`]: the storm, with the far side's NMI counter
/// and first NMI address (in its mailbox) on each `STORM` line; NMIs do not
/// fail the kernel's own verdict (the judge weighs them).
fn add_storm(kb: HostKernelBuilder, s: &Scenario, at: &Addresses) -> HostKernelBuilder {
    if !s.nmi_storm {
        return kb;
    }
    let fields = if s.is_stub() {
        None
    } else if s.uses_far_helper() {
        Some((offset_of!(Mailbox, nmis), offset_of!(Mailbox, nmi_ip)))
    } else {
        Some((
            offset_of!(hyper::RcMailbox, nmis),
            offset_of!(hyper::RcMailbox, nmi_ip),
        ))
    };
    let addr = |f: usize| {
        let lo = at.mailbox_hc + f as u32;
        if at.wide {
            at.hi(lo)
        } else {
            u64::from(lo)
        }
    };
    kb.nmi_storm(crate::hostkernel::storm::NmiStorm {
        far_nmis: fields.map(|(n, _)| addr(n)),
        far_ip: fields.map(|(_, ip)| addr(ip)),
        ..crate::hostkernel::storm::NmiStorm::default()
    })
    .allow_nmis(true)
}

/// Hooks for the long-mode family: Guest FPU/debug sync requests and the far helper's verdict.
fn long_hooks(
    kb: HostKernelBuilder,
    apic_on: bool,
    x2: bool,
    (mailbox_hc, stride): (u32, u32),
    cpum_hc: u32,
) -> HostKernelBuilder {
    let mbox = MailboxAt {
        hc: mailbox_hc,
        stride,
    };
    let pre = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        if apic_on {
            apic_version_once(a, h, cpum_hc, x2)?;
        }
        mbox.load(a, h)?;
        let mut no_fpu = a.create_label();
        let mut no_dbg = a.create_label();
        a.mov(esi, dword_ptr(h.trip_slot))?;
        a.mov(ebx, dword_ptr(h.arg2_slot))?;
        a.add(ebx, cpum_hc)?;
        a.xor(edx, edx)?;
        if apic_on {
            a.or(edx, intermediate_amd64::expect::APIC)?;
        }
        if x2 {
            a.or(edx, intermediate_amd64::expect::X2APIC)?;
        }
        a.mov(mbox.field(h, offset_of!(Mailbox, want_dis)), 0x7u32)?;
        // Even trips load Guest.fpu in the far world.
        a.test(esi, 1)?;
        a.jnz(no_fpu)?;
        a.or(edx, intermediate_amd64::expect::FPU)?;
        a.or(
            dword_ptr(ebx + cl::USE_FLAGS as i32),
            UseFlags::SYNC_FPU_STATE.bits(),
        )?;
        guest_fpu_values(a, h, ebx, esi)?;
        a.set_label(&mut no_fpu)?;
        // Trips 2 and 3 mod 4 load Guest DR0-3 and DR6.
        a.test(esi, 2)?;
        a.jz(no_dbg)?;
        a.or(edx, intermediate_amd64::expect::DBG)?;
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
        a.mov(mbox.field(h, offset_of!(Mailbox, expect)), edx)?;
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
        mbox.load(a, h)?;
        far_fails(a, h, mbox.field(h, offset_of!(Mailbox, fails)))
    };
    kb.pre_call(pre).post_call(post)
}

/// The VMM's set-up step for revision C's masking: the first call of each
/// VCPU reads the host APIC's version register (MMIO, or the x2APIC MSR)
/// into `CpumCpu::apic_version`, where the switcher looks up whether the
/// thermal LVT exists instead of reading the APIC on every switch.
/// Clobbers EAX, EBX, ECX, EDX.
fn apic_version_once(
    a: &mut CodeAssembler,
    h: &HookCtx,
    cpum_hc: u32,
    x2: bool,
) -> Result<(), IcedError> {
    let mut done = a.create_label();
    a.mov(ebx, dword_ptr(h.arg2_slot))?;
    a.add(ebx, cpum_hc)?;
    a.cmp(dword_ptr(ebx + cl::APIC_VERSION as i32), 0)?;
    a.jne(done)?;
    if x2 {
        a.mov(ecx, apic::x2apic_msr(apic::reg::VERSION))?;
        a.rdmsr()?;
    } else if h.bitness == 64 {
        a.mov(eax, LAPIC_VIRT)?;
        a.mov(eax, dword_ptr(rax + apic::reg::VERSION as i32))?;
    } else {
        a.mov(eax, LAPIC_VIRT)?;
        a.mov(eax, dword_ptr(eax + apic::reg::VERSION as i32))?;
    }
    a.mov(dword_ptr(ebx + cl::APIC_VERSION as i32), eax)?;
    a.set_label(&mut done)?;
    Ok(())
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

/// Where the hooks find the far side's mailbox: at `hc`, or, with a
/// `stride`, VCPU `i`'s at `hc + i * stride` (EDI/RDI holds `i * stride`
/// after [`MailboxAt::load`]).
#[derive(Clone, Copy)]
struct MailboxAt {
    /// HC address (for hooks) of the (first) mailbox.
    hc: u32,
    /// Distance between two VCPUs' mailboxes; 0 for one shared mailbox.
    stride: u32,
}

impl MailboxAt {
    /// With per-VCPU mailboxes: EDI/RDI = this call's VCPU index times the
    /// stride. Nothing otherwise.
    fn load(self, a: &mut CodeAssembler, h: &HookCtx) -> Result<(), IcedError> {
        if self.stride != 0 {
            a.mov(edi, dword_ptr(h.vcpu_slot))?;
            a.imul_3(edi, edi, self.stride)?;
        }
        Ok(())
    }

    /// The dword at offset `f` of this call's mailbox (after
    /// [`MailboxAt::load`], EDI/RDI intact).
    fn field(self, h: &HookCtx, f: usize) -> AsmMemoryOperand {
        let addr = self.hc + f as u32;
        if self.stride == 0 {
            dword_ptr(abs_addr(h, addr))
        } else if h.bitness == 64 {
            dword_ptr(rdi + addr as i32)
        } else {
            dword_ptr(edi + addr as i32)
        }
    }
}

/// Reports the far side's failure bits (the dword `fails`) as a `HOOKFAIL`.
fn far_fails(a: &mut CodeAssembler, h: &HookCtx, fails: AsmMemoryOperand) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.mov(eax, fails)?;
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

/// What the 32-bit/PAE family's hooks need to know.
#[derive(Clone, Copy)]
struct RcHookParams {
    /// NMI masking is on.
    apic_on: bool,
    /// The host APIC is in x2APIC mode.
    x2: bool,
    /// The hypervisor context has CR4.PAE set.
    pae: bool,
    /// The RC code's mailbox(es).
    mbox: MailboxAt,
    /// HC address of `Cpum`.
    cpum_hc: u32,
}

/// Hooks for the 32-bit/PAE family: expectations for the RC code, hyper
/// debug registers on some trips, and the host FPU and DR0–3 checked after
/// every trip (the lazy-FPU and debug-register rules seen from the host).
fn rc_hooks(
    kb: HostKernelBuilder,
    apic_on: bool,
    x2: bool,
    pae: bool,
    (mailbox_hc, stride): (u32, u32),
    cpum_hc: u32,
) -> HostKernelBuilder {
    let p = RcHookParams {
        apic_on,
        x2,
        pae,
        mbox: MailboxAt {
            hc: mailbox_hc,
            stride,
        },
        cpum_hc,
    };
    let pre = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        let host_fcw = h.alloc(&HOST_FCW.to_le_bytes(), 4);
        if p.apic_on {
            apic_version_once(a, h, p.cpum_hc, p.x2)?;
        }
        rc_expectations(a, h, p)?;
        load_host_fpu_and_dr(a, h, host_fcw)
    };
    let post = move |a: &mut CodeAssembler, h: &mut HookCtx| -> Result<(), IcedError> {
        check_host_fpu_and_dr(a, h)?;
        check_guest_fpu_saved(a, h, p)?;
        p.mbox.load(a, h)?;
        far_fails(a, h, p.mbox.field(h, offset_of!(hyper::RcMailbox, fails)))
    };
    kb.pre_call(pre).post_call(post)
}

/// Before a trip: the RC code's expectations in its mailbox, and the
/// `CpumCpu` state they describe — on even trips `Guest.fpu` values for the
/// RC code to find, on trips 2 and 3 mod 4 the hyper debug registers in use.
fn rc_expectations(
    a: &mut CodeAssembler,
    h: &mut HookCtx,
    p: RcHookParams,
) -> Result<(), IcedError> {
    use hyper::{expect as ex, RcMailbox};
    let mut no_fpu = a.create_label();
    let mut no_dbg = a.create_label();
    let mut dbg_done = a.create_label();
    p.mbox.load(a, h)?;
    a.mov(esi, dword_ptr(h.trip_slot))?;
    a.mov(ebx, dword_ptr(h.arg2_slot))?;
    a.add(ebx, p.cpum_hc)?;
    a.xor(edx, edx)?;
    if p.apic_on {
        a.or(edx, ex::APIC)?;
    }
    if p.x2 {
        a.or(edx, ex::X2APIC)?;
    }
    a.mov(p.mbox.field(h, offset_of!(RcMailbox, want_dis)), 0x7u32)?;
    a.mov(
        p.mbox.field(h, offset_of!(RcMailbox, want_pae)),
        u32::from(p.pae),
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
    a.mov(p.mbox.field(h, offset_of!(RcMailbox, expect)), edx)
}

/// Before a trip: the host's own FPU state (FCW [`HOST_FCW`], XMM0 the
/// cookie; `host_fcw` is the FCW's data slot) and DR0–3, which must come
/// back.
fn load_host_fpu_and_dr(
    a: &mut CodeAssembler,
    h: &mut HookCtx,
    host_fcw: u32,
) -> Result<(), IcedError> {
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
}

/// After a trip: the host's FPU state and DR0–3 are back.
fn check_host_fpu_and_dr(a: &mut CodeAssembler, h: &mut HookCtx) -> Result<(), IcedError> {
    let tmp = h.alloc(&[0; 4], 4);
    let mut fpu_bad = a.create_label();
    let mut fpu_ok = a.create_label();
    let mut dr_bad = a.create_label();
    let mut dr_ok = a.create_label();
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
    a.set_label(&mut dr_ok)
}

/// After an FPU trip: the FPU state the RC code left is in `Guest.fpu`.
fn check_guest_fpu_saved(
    a: &mut CodeAssembler,
    h: &mut HookCtx,
    p: RcHookParams,
) -> Result<(), IcedError> {
    let mut saved = a.create_label();
    a.test(dword_ptr(h.trip_slot), 1)?;
    a.jnz(saved)?;
    a.mov(ebx, dword_ptr(h.arg2_slot))?;
    a.add(ebx, p.cpum_hc)?;
    a.movzx(
        eax,
        word_ptr(ebx + (cl::GUEST_FPU + offset_of!(cpum::FxSaveArea, fcw)) as i32),
    )?;
    p.mbox.load(a, h)?;
    a.cmp(
        eax,
        p.mbox.field(h, offset_of!(hyper::RcMailbox, guest_fcw)),
    )?;
    a.je(saved)?;
    a.mov(dword_ptr(h.hook_fail_slot), HOOKFAIL_GUEST_FPU_SAVE)?;
    a.set_label(&mut saved)
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

/// Each VCPU's own switcher profiles: one period per round trip of its
/// own, none left running.
fn vcpu_profile_failures(s: &Scenario, cpumcpu: &[CpumCpu32], pass: bool) -> Vec<String> {
    let mut f = Vec::new();
    for (i, c) in cpumcpu.iter().enumerate() {
        for (name, p) in [
            (vmm::stats::vcpu_to_gc(i as u32), &c.stat_to_gc),
            (vmm::stats::vcpu_to_hc(i as u32), &c.stat_to_hc),
        ] {
            if p.core.periods != u64::from(s.trips) && pass {
                f.push(format!(
                    "{name} has {} periods, expected {}",
                    p.core.periods, s.trips
                ));
            }
            if p.ts_start != 0 {
                f.push(format!("{name} left running"));
            }
        }
    }
    f
}

/// The far side's mailboxes: one per VCPU on several host CPUs (unless
/// [`Mutation::SharedFarMailbox`]), else one for all.
fn mailboxes(s: &Scenario) -> u32 {
    if s.cpus > 1 && s.mutation != Some(Mutation::SharedFarMailbox) {
        s.vcpus
    } else {
        1
    }
}

/// The VCPUs' `n` mailboxes in the dump (each [`farside::MAILBOX_STRIDE`]
/// after the one before) as one: VCPU 0's, with the others' counters
/// added by `merge`. `None` when the dump lacks one of them.
fn merged_mailbox<M: zerocopy::FromBytes>(
    d: &crate::transcript::Dump,
    n: u32,
    merge: fn(&mut M, &M),
) -> Option<M> {
    let mut all = d.read::<M>(0)?;
    for i in 1..n {
        let other = d.read::<M>((i * farside::MAILBOX_STRIDE) as usize)?;
        merge(&mut all, &other);
    }
    Some(all)
}

/// Adds the far helper's counters of `o` to `m` (failures ORed).
fn merge_long(m: &mut Mailbox, o: &Mailbox) {
    m.calls = m.calls.wrapping_add(o.calls);
    m.nmis = m.nmis.wrapping_add(o.nmis);
    m.fails |= o.fails;
    if m.first_fail_cookie == 0 {
        m.first_fail_cookie = o.first_fail_cookie;
    }
}

/// Adds the RC code's counters of `o` to `m` (failures ORed).
fn merge_rc(m: &mut hyper::RcMailbox, o: &hyper::RcMailbox) {
    m.calls = m.calls.wrapping_add(o.calls);
    m.nm_count = m.nm_count.wrapping_add(o.nm_count);
    m.c_exits = m.c_exits.wrapping_add(o.c_exits);
    m.nmis = m.nmis.wrapping_add(o.nmis);
    m.fails |= o.fails;
    if m.first_fail_cookie == 0 {
        m.first_fail_cookie = o.first_fail_cookie;
    }
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

/// What a run's dumps decode to: the VM structure (its switcher profiles
/// with each VCPU's own added in), every VCPU's CPUM data and the far side's
/// mailbox of the run's family (the VCPUs' mailboxes merged).
struct Dumps {
    vm: Option<VmFixed>,
    cpumcpu: Vec<CpumCpu32>,
    mailbox: Option<Mailbox>,
    rc_mailbox: Option<hyper::RcMailbox>,
}

impl Dumps {
    fn decode(s: &Scenario, b: &Built, r: &crate::transcript::Report) -> Self {
        let vm_dump = r.dump("vm");
        // The VM-wide switcher profiles as every consumer of the samples sees
        // them: with each VCPU's own added in.
        let vm = vm_dump.and_then(|d| {
            let totals = b.vmm.stam().ok()?.with_totals(&d.bytes);
            <VmFixed as zerocopy::FromBytes>::read_from_prefix(&totals)
                .ok()
                .map(|(v, _)| v)
        });
        let cpumcpu = (0..s.vcpus)
            .filter_map(|i| {
                let at = OFF_CPUM + b.vmm.vcpu_arg(i).ok()? as usize;
                vm_dump.and_then(|d| d.read::<CpumCpu32>(at))
            })
            .collect();
        let long = s.uses_far_helper();
        let boxes = mailboxes(s);
        let dump = r.dump("mailbox");
        Self {
            vm,
            cpumcpu,
            mailbox: dump
                .filter(|_| long)
                .and_then(|d| merged_mailbox(d, boxes, merge_long)),
            rc_mailbox: dump
                .filter(|_| !long)
                .and_then(|d| merged_mailbox(d, boxes, merge_rc)),
        }
    }

    /// The far side's calls, failure bits and NMIs, whichever family ran.
    fn far_counts(&self) -> Option<(u32, u32, u32)> {
        match (&self.mailbox, &self.rc_mailbox) {
            (Some(m), _) => Some((m.calls, m.fails, m.nmis)),
            (_, Some(m)) => Some((m.calls, m.fails, m.nmis)),
            _ => None,
        }
    }
}

/// Names the far side's failure bits in the words of the family that ran.
fn far_fail_names(s: &Scenario, bits: u32) -> String {
    if s.uses_far_helper() {
        intermediate_amd64::fail_names(bits).join(", ")
    } else {
        hyper::fail_names(bits).join(", ")
    }
}

/// The host's own account: the summary's counts.
fn summary_failures(r: &crate::transcript::Report, calls: u64) -> Vec<String> {
    let mut failures = Vec::new();
    match &r.summary {
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
    failures
}

/// The first host items that did not come back, each with its values.
fn mismatch_failures(r: &crate::transcript::Report) -> Vec<String> {
    r.mismatches
        .iter()
        .take(4)
        .map(|m| {
            format!(
                "trip {} vcpu {}: {} was {:#x}, now {:#x}",
                m.trip, m.vcpu, m.name, m.before, m.after
            )
        })
        .collect()
}

/// The first host hook failures, each in words.
fn hook_failures(s: &Scenario, r: &crate::transcript::Report) -> Vec<String> {
    r.hook_failures
        .iter()
        .take(2)
        .map(|h| {
            let what = match h.code {
                c if c & HOOKFAIL_FAR != 0 => {
                    format!("far side saw {}", far_fail_names(s, c & !HOOKFAIL_FAR))
                }
                HOOKFAIL_SYNC_LEFT => "a SYNC flag was left set".into(),
                HOOKFAIL_HOST_FPU => "the host FPU state did not come back".into(),
                HOOKFAIL_HOST_DR => "the host DR0-DR3 did not come back".into(),
                HOOKFAIL_GUEST_FPU_SAVE => {
                    "the RC code's FPU state was not saved to Guest.fpu".into()
                }
                c => format!("hook failure {c:#x}"),
            };
            format!("trip {} vcpu {}: {what}", h.trip, h.vcpu)
        })
        .collect()
}

/// The far side's account: it ran once per call, saw nothing wrong, took no
/// NMI (outside a storm) and, in the RC family, exactly one lazy-FPU trap
/// per FPU trip.
fn far_side_failures(s: &Scenario, d: &Dumps, calls: u64, pass: bool) -> Vec<String> {
    let mut failures = Vec::new();
    let Some((far_calls, far_fails, far_nmis)) = d.far_counts() else {
        return failures;
    };
    if u64::from(far_calls) != calls && pass && s.trampoline_args.is_none() {
        failures.push(format!("far side ran {far_calls} times, expected {calls}"));
    }
    if far_fails != 0 {
        failures.push(format!(
            "far side failures: {}",
            far_fail_names(s, far_fails)
        ));
    }
    if far_nmis != 0 && !s.nmi_storm {
        failures.push(format!("the hypervisor context took {far_nmis} NMIs"));
    }
    if let (Some(m), None) = (&d.rc_mailbox, &s.trampoline_args) {
        // Every even trip uses the FPU once: exactly one #NM each.
        let fpu_trips = u64::from(s.trips.div_ceil(2)) * u64::from(s.vcpus);
        if u64::from(m.nm_count) != fpu_trips && pass {
            failures.push(format!(
                "{} lazy-FPU traps, expected {fpu_trips}",
                m.nm_count
            ));
        }
    }
    failures
}

/// The switcher profiles: one period per round trip (VM-wide and per
/// VCPU), none left running. Returns the failures and the ToGC and ToHC
/// averages.
fn profile_failures(
    s: &Scenario,
    d: &Dumps,
    vm: &VmFixed,
    calls: u64,
    pass: bool,
) -> (Vec<String>, Option<u64>, Option<u64>) {
    let mut failures = Vec::new();
    if !s.options.stats || s.is_stub() {
        return (failures, None, None);
    }
    let h = &vm.header;
    for (name, p) in [
        ("ToGC", &h.stat_switcher_to_gc),
        ("ToHC", &h.stat_switcher_to_hc),
    ] {
        if p.core.periods != calls && pass {
            failures.push(format!(
                "/VMM/Switcher/{name} has {} periods, expected {calls}",
                p.core.periods
            ));
        }
        if p.ts_start != 0 {
            failures.push(format!("/VMM/Switcher/{name} left running"));
        }
    }
    failures.extend(vcpu_profile_failures(s, &d.cpumcpu, pass));
    let average = |p: &stam::StamProfileAdv| p.core.ticks.checked_div(p.core.periods);
    (
        failures,
        average(&h.stat_switcher_to_gc),
        average(&h.stat_switcher_to_hc),
    )
}

/// Every VCPU's switcher recorded LINT0, LINT1 and the performance LVT as
/// the ones it masked.
fn masking_failures(s: &Scenario, d: &Dumps, pass: bool) -> Vec<String> {
    if !s.options.apic_nmi_masking || !pass || s.is_stub() {
        return Vec::new();
    }
    d.cpumcpu
        .iter()
        .enumerate()
        .filter(|(_, c)| c.apic_dis_vectors != 0x7)
        .map(|(i, c)| {
            format!(
                "vcpu {i}: fApicDisVectors {:#x}, expected 0x7",
                c.apic_dis_vectors
            )
        })
        .collect()
}

/// Adds `more` to `failures`, leaving out lines already there.
fn push_new(failures: &mut Vec<String>, more: Vec<String>) {
    for f in more {
        if !failures.contains(&f) {
            failures.push(f);
        }
    }
}

/// Judges a finished run of `s` (built as `b`): every check of the testbed,
/// the far helper and the STAM profiles. Also used to judge a transcript
/// captured elsewhere (e.g. from real hardware).
pub fn judge(s: &Scenario, b: &Built, run: RunResult) -> ScenarioResult {
    let r = &run.report;
    let pass = run.outcome == Outcome::Pass;
    let calls = u64::from(s.trips) * u64::from(s.vcpus);
    let mut failures = Vec::new();
    if !pass {
        failures.push(format!("outcome {:?}", run.outcome));
    }
    // What went wrong first, in the testbed's words; then the counts and
    // the transcript's own accounting.
    let dumps = Dumps::decode(s, b, r);
    failures.extend(mismatch_failures(r));
    failures.extend(hook_failures(s, r));
    failures.extend(far_side_failures(s, &dumps, calls, pass));
    failures.extend(summary_failures(r, calls));
    push_new(&mut failures, transcript_failures(s, b, r));
    let nmi_storm = s.nmi_storm.then(|| {
        let (report, storm_failures) = crate::storm::analyze(s, b, &run);
        push_new(&mut failures, storm_failures);
        report
    });
    let (mut to_gc, mut to_hc) = (None, None);
    match &dumps.vm {
        Some(vm) => {
            let (profile, gc, hc) = profile_failures(s, &dumps, vm, calls, pass);
            failures.extend(profile);
            (to_gc, to_hc) = (gc, hc);
            failures.extend(masking_failures(s, &dumps, pass));
        }
        None if pass => failures.push("no VM dump".into()),
        None => {}
    }
    result(s, run, failures, dumps, (to_gc, to_hc), nmi_storm)
}

/// Assembles the result of a judged run.
fn result(
    s: &Scenario,
    run: RunResult,
    failures: Vec<String>,
    dumps: Dumps,
    (to_gc, to_hc): (Option<u64>, Option<u64>),
    nmi_storm: Option<crate::storm::StormReport>,
) -> ScenarioResult {
    let r = &run.report;
    let summary = r.summary.as_ref().filter(|sm| sm.calls > 0);
    ScenarioResult {
        scenario: s.clone(),
        outcome: match &r.cpu_refusal {
            Some(_) => "CpuUnsupported".into(),
            None => format!("{:?}", run.outcome),
        },
        verified: failures.is_empty(),
        failures,
        round_trips: r.summary.as_ref().map_or(0, |sm| u64::from(sm.calls)),
        instructions_to_guest: to_gc,
        instructions_to_host: to_hc,
        // Trips differ by design (FPU and debug sync on alternate trips),
        // so report the cheapest and the dearest.
        instructions_per_round_trip: summary.map(|sm| u64::from(sm.tsc_min)),
        instructions_per_round_trip_max: summary.map(|sm| u64::from(sm.tsc_max)),
        vm: dumps.vm.map(|v| v.header),
        cpumcpu: dumps.cpumcpu,
        mailbox: dumps.mailbox,
        rc_mailbox: dumps.rc_mailbox,
        last_step: r
            .last_trace_char()
            .and_then(|c| u8::try_from(c).ok())
            .and_then(Step::from_ch),
        scratch_marker: r.dump("scratch").and_then(|d| d.u32_at(0)),
        nmi_storm,
        smp: smp_report(r),
        vm_image: r.dump("vm").filter(|d| d.complete).map(|d| d.bytes.clone()),
        run,
    }
}

const _: () = assert!(CPUMCPU_SIZE % 64 == 0);

/// A `BOOT` line whose scenario fields cannot be read back.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("BOOT line: {0}")]
pub struct BootFieldError(pub String);

/// The names of the CPU facts, in the `BOOT` line's `cpu_facts` order.
const FACT_NAMES: [&str; 4] = ["nx", "fxsr", "sep", "syscall"];

/// The `BOOT` line's `cpu_facts` value: the facts present, comma-separated
/// (`nx,fxsr,sep,syscall`), or `none`.
pub fn cpu_facts_field(c: &vmm::CpuFacts) -> String {
    let on = [c.nx, c.fxsr, c.host_sysenter, c.host_syscall];
    let names: Vec<&str> = FACT_NAMES
        .iter()
        .zip(on)
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

/// The inverse of [`cpu_facts_field`]: `None` for an unknown or repeated
/// name, an empty item, or names out of order.
fn parse_cpu_facts(v: &str) -> Option<vmm::CpuFacts> {
    let mut on = [false; 4];
    if v != "none" {
        let mut last = None;
        for name in v.split(',') {
            let i = FACT_NAMES.iter().position(|n| *n == name)?;
            if last.is_some_and(|l| l >= i) {
                return None;
            }
            last = Some(i);
            on[i] = true;
        }
    }
    Some(vmm::CpuFacts {
        nx: on[0],
        fxsr: on[1],
        host_sysenter: on[2],
        host_syscall: on[3],
    })
}

/// `Mutation`'s kebab-case name, as the `BOOT` line and the CLI spell it.
pub fn mutation_name(m: Mutation) -> String {
    m.name().to_owned()
}

const BOOT_KEYS: [&str; 14] = [
    "switcher",
    "revision",
    "stats",
    "apic",
    "trace",
    "crash_markers",
    "x2apic",
    "host_x2apic",
    "code_hc",
    "code_phys",
    "hma_rc",
    "hma_hc",
    "hma_phys",
    "tables_phys",
];

impl Scenario {
    /// What the `BOOT` line says about this scenario after `entry`: the
    /// switcher, every template option, the host's x2APIC mode, the
    /// placement, the mutation and the trampoline arguments — everything
    /// [`Scenario::from_boot`] needs to rebuild it (the trips and VCPUs are
    /// the line's own `trips` and `vcpus`).
    pub fn boot_fields(&self) -> Vec<(String, String)> {
        let o = &self.options;
        let p = &self.placement;
        let flag = |b: bool| if b { "1" } else { "0" }.to_owned();
        let rev = match o.revision {
            vmm_switcher::templates::Revision::A => "a",
            vmm_switcher::templates::Revision::B => "b",
            vmm_switcher::templates::Revision::C => "c",
        };
        let values = [
            self.kind.cli_name().to_owned(),
            rev.to_owned(),
            flag(o.stats),
            flag(o.apic_nmi_masking),
            flag(o.trace),
            flag(o.crash_markers),
            flag(o.x2apic),
            flag(self.host_x2apic),
            format!("{:x}", p.code_hc.0),
            format!("{:x}", p.code_phys.0),
            format!("{:x}", p.hma_rc.0),
            format!("{:x}", p.hma_hc.0),
            format!("{:x}", p.hma_phys.0),
            format!("{:x}", p.tables_phys.0),
        ];
        let mut out: Vec<(String, String)> = BOOT_KEYS
            .iter()
            .map(|k| (*k).to_owned())
            .zip(values)
            .collect();
        out.push((
            "mutation".into(),
            self.mutation.map_or_else(|| "none".into(), mutation_name),
        ));
        let tramp = match &self.trampoline_args {
            None => "none".to_owned(),
            Some(a) => {
                let list: Vec<String> = a.iter().map(|v| format!("{v:x}")).collect();
                format!("{}:{}", a.len(), list.join(","))
            }
        };
        out.push(("trampoline".into(), tramp));
        out.push(("cpu_facts".into(), cpu_facts_field(&self.cpu)));
        out.push(("host_cr4".into(), self.host_cr4.name().into()));
        out.push(("nmi_storm".into(), flag(self.nmi_storm)));
        out.push(("la57".into(), flag(self.options.la57)));
        out.push(("cpus".into(), self.cpus.to_string()));
        out.push(("deadlines".into(), flag(self.deadlines)));
        out
    }

    /// The scenario a `BOOT` line names: the inverse of
    /// [`Scenario::boot_fields`], with `trips` and `vcpus` from the line.
    ///
    /// # Errors
    /// A field missing, repeated, unknown or with a value that does not
    /// parse, or a switcher this name does not denote.
    pub fn from_boot(boot: &crate::transcript::BootLine) -> Result<Scenario, BootFieldError> {
        let bad = |k: &str, v: &str| BootFieldError(format!("`{k}={v}` is not a valid value"));
        let mut keys: Vec<&str> = BOOT_KEYS.to_vec();
        keys.extend([
            "mutation",
            "trampoline",
            "cpu_facts",
            "host_cr4",
            "nmi_storm",
            "la57",
            "cpus",
            "deadlines",
        ]);
        for (k, _) in &boot.scenario {
            if !keys.contains(&k.as_str()) {
                return Err(BootFieldError(format!("unknown field `{k}`")));
            }
            if boot.scenario.iter().filter(|(o, _)| o == k).count() > 1 {
                return Err(BootFieldError(format!("field `{k}` appears twice")));
            }
        }
        let get = |k: &str| {
            boot.field(k).ok_or_else(|| {
                BootFieldError(format!(
                    "no `{k}` field (an image built before the BOOT line named its scenario?)"
                ))
            })
        };
        let flag = |k: &str| -> Result<bool, BootFieldError> {
            match get(k)? {
                "0" => Ok(false),
                "1" => Ok(true),
                v => Err(bad(k, v)),
            }
        };
        let addr = |k: &str| -> Result<u64, BootFieldError> {
            let v = get(k)?;
            if v.is_empty() || v.len() > 16 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(k, v));
            }
            u64::from_str_radix(v, 16).map_err(|_| bad(k, v))
        };
        let name = get("switcher")?;
        let kind = SwitcherKind::from_cli_name(name).ok_or_else(|| bad("switcher", name))?;
        let mut s = Scenario::new(kind);
        s.options.revision = match get("revision")? {
            "a" => vmm_switcher::templates::Revision::A,
            "b" => vmm_switcher::templates::Revision::B,
            "c" => vmm_switcher::templates::Revision::C,
            v => return Err(bad("revision", v)),
        };
        s.options.stats = flag("stats")?;
        s.options.apic_nmi_masking = flag("apic")?;
        s.options.trace = flag("trace")?;
        s.options.crash_markers = flag("crash_markers")?;
        s.options.x2apic = flag("x2apic")?;
        s.host_x2apic = flag("host_x2apic")?;
        let rc = addr("hma_rc")?;
        s.placement = Placement {
            code_hc: vmm_switcher::HcAddr(addr("code_hc")?),
            code_phys: vmm_switcher::PhysAddr(addr("code_phys")?),
            hma_rc: RcAddr(
                u32::try_from(rc).map_err(|_| bad("hma_rc", get("hma_rc").unwrap_or("")))?,
            ),
            hma_hc: vmm_switcher::HcAddr(addr("hma_hc")?),
            hma_phys: vmm_switcher::PhysAddr(addr("hma_phys")?),
            tables_phys: vmm_switcher::PhysAddr(addr("tables_phys")?),
        };
        s.mutation = match get("mutation")? {
            "none" => None,
            v => Some(
                Mutation::ALL
                    .into_iter()
                    .find(|m| mutation_name(*m) == v)
                    .ok_or_else(|| bad("mutation", v))?,
            ),
        };
        s.trampoline_args = match get("trampoline")? {
            "none" => None,
            v => {
                let (n, list) = v.split_once(':').ok_or_else(|| bad("trampoline", v))?;
                let args: Vec<u32> = if list.is_empty() {
                    Vec::new()
                } else {
                    list.split(',')
                        .map(|a| u32::from_str_radix(a, 16).map_err(|_| bad("trampoline", v)))
                        .collect::<Result<_, _>>()?
                };
                if n.parse::<usize>().ok() != Some(args.len()) {
                    return Err(bad("trampoline", v));
                }
                Some(args)
            }
        };
        let facts = get("cpu_facts")?;
        s.cpu = parse_cpu_facts(facts).ok_or_else(|| bad("cpu_facts", facts))?;
        let cr4_name = get("host_cr4")?;
        s.host_cr4 = HostCr4::from_name(cr4_name).ok_or_else(|| bad("host_cr4", cr4_name))?;
        s.nmi_storm = flag("nmi_storm")?;
        s.options.la57 = flag("la57")?;
        let cpus = get("cpus")?;
        s.cpus = cpus
            .parse()
            .ok()
            .filter(|n| (1..=crate::hostkernel::smp::MAX_CPUS).contains(n))
            .ok_or_else(|| bad("cpus", cpus))?;
        s.deadlines = flag("deadlines")?;
        s.trips = boot.trips;
        s.vcpus = boot.vcpus;
        if s.host_mode().name() != boot.mode {
            return Err(BootFieldError(format!(
                "mode={} but {} runs on a {} host",
                boot.mode,
                kind.cli_name(),
                s.host_mode().name()
            )));
        }
        Ok(s)
    }

    /// The CPU features the image refuses to run with: those its CPU facts
    /// say are absent (NX, SEP, SYSCALL; FXSR is always required), since the
    /// code was relocated for a CPU without them.
    pub fn cpu_refusals(&self) -> Vec<crate::hostkernel::CpuFeature> {
        crate::cpumodel::fact_features(&self.cpu)
            .into_iter()
            .filter(|(_, present)| !present)
            .map(|(f, _)| f)
            .collect()
    }

    /// The CPU features this scenario needs beyond what the host kernel
    /// itself checks: PAE and long mode for the hypervisor context's paging,
    /// FXSR, every feature the CPU facts say is present (NX, SEP, SYSCALL:
    /// the code was relocated for a CPU with them), SSE2 for the 32-bit
    /// family's hooks, x2APIC for an x2APIC host.
    pub fn cpu_requirements(&self) -> Vec<crate::hostkernel::CpuFeature> {
        use crate::hostkernel::CpuFeature as F;
        let mut v = vec![F::Fxsr, F::Apic];
        let flavour = vmm::target_flavour(self.kind);
        if self.host_mode() != HostMode::Legacy32 || flavour != vmm::Flavour::Legacy32 {
            v.push(F::Pae);
        }
        if self.host_mode() == HostMode::Amd64 || self.long_mode_target() {
            v.push(F::LongMode);
        }
        for (f, present) in crate::cpumodel::fact_features(&self.cpu) {
            if present {
                v.push(f);
            }
        }
        if !self.is_stub() && !self.uses_far_helper() && self.trampoline_args.is_none() {
            v.push(F::Sse2);
        }
        v.extend(
            crate::cpumodel::host_needs(self)
                .into_iter()
                .map(|(_, f)| f),
        );
        v
    }
}

impl ScenarioResult {
    /// The CPU lacked a feature the build needs, so nothing ran (a `NOCPU`
    /// line; the outcome is `CpuUnsupported`).
    pub fn cpu_refusal(&self) -> Option<&crate::transcript::CpuRefusal> {
        self.run.report.cpu_refusal.as_ref()
    }
}

/// Several host CPUs print their `TRIP`, `VCPU`, `CPU` and `STORMCPU`
/// lines as they run: the run of such lines, in the order a single CPU
/// prints them (every `TRIP`, then every `VCPU`, every `CPU`, every
/// `STORMCPU` line).
fn smp_canonical(keywords: &mut [&str]) {
    let rank = |k: &str| {
        ["TRIP", "VCPU", "CPU", "STORMCPU"]
            .iter()
            .position(|&r| r == k)
    };
    let Some(start) = keywords.iter().position(|k| rank(k).is_some()) else {
        return;
    };
    let len = keywords[start..]
        .iter()
        .take_while(|k| rank(k).is_some())
        .count();
    keywords[start..start + len].sort_by_key(|k| rank(k));
}

/// The keyword of a protocol line body.
fn keyword(line: &str) -> &str {
    line.split(' ').next().unwrap_or("")
}

/// The protocol lines a passing run of `b` prints, by keyword, in order.
///
/// With the NMI storm, a `PIT` line follows `APIC`, and each call the storm
/// targeted prints a `STORM` line before its `TRIP` line; how many calls it
/// targets is the storm's to decide (see [`crate::storm`]), so their number
/// is `storm_lines`.
fn expected_keywords(s: &Scenario, b: &Built, storm_lines: usize) -> Vec<String> {
    let t = &b.testbed;
    let mut k: Vec<String> = vec!["BOOT".into(), "HOST".into()];
    if t.mode == HostMode::Amd64 {
        k.push("HOST64".into());
    }
    k.push("APIC".into());
    if s.nmi_storm {
        k.push("PIT".into());
    }
    let n_vcpus = t.vcpus.len();
    let storm_lines = if s.nmi_storm { storm_lines } else { 0 };
    let traced = s.trips.min(t.trace_trips) as usize * n_vcpus;
    let calls = (s.trips as usize * n_vcpus).max(traced).max(storm_lines);
    for call in 0..calls {
        if call < storm_lines {
            k.push("STORM".into());
        }
        if call < traced {
            k.push("TRIP".into());
        }
    }
    k.extend(std::iter::repeat_n("VCPU".to_owned(), t.vcpus.len()));
    if s.cpus > 1 {
        k.extend(std::iter::repeat_n("CPU".to_owned(), s.cpus as usize));
        if s.nmi_storm {
            k.extend(std::iter::repeat_n("STORMCPU".to_owned(), s.cpus as usize));
        }
        k.push("SMP".into());
    }
    k.extend(["SUMMARY".into(), "NMI".into()]);
    for d in &t.dumps {
        k.push("DUMP".into());
        k.extend(std::iter::repeat_n(
            "H".to_owned(),
            d.len.div_ceil(32) as usize,
        ));
        k.push("END".into());
    }
    k.extend(["RESULT".into(), "CRC".into()]);
    k
}

/// The host the kernel reports (`HOST` line) is the one the scenario asks
/// for: today's CR4 bits all set, the APIC in x2APIC mode when asked.
fn host_config_failures(s: &Scenario, r: &crate::transcript::Report) -> Vec<String> {
    let mut f = Vec::new();
    let Some(h) = &r.host else {
        return f;
    };
    if s.host_cr4.today() {
        let want = crate::hostkernel::CR4_TODAY;
        if u64::from(h.cr4) & want != want {
            f.push(format!(
                "the host ran with CR4 {:#x}, not today's (bits {want:#x} set)",
                h.cr4
            ));
        }
    }
    if s.host_cr4.pcid() {
        let pcide = cpum::regs::Cr4::PCIDE.bits();
        let pcid = u64::from(h.cr3) & 0xfff;
        if u64::from(h.cr4) & pcide == 0 || pcid != crate::hostkernel::HOST_PCID {
            f.push(format!(
                "the host ran with CR4 {:#x} and CR3 {:#x}, not with PCIDE and PCID {:#x}",
                h.cr4,
                h.cr3,
                crate::hostkernel::HOST_PCID
            ));
        }
    }
    if s.host_cr4.cet() && u64::from(h.cr4) & crate::hostkernel::CR4_CET == 0 {
        f.push(format!("the host ran with CR4 {:#x}, without CET", h.cr4));
    }
    let la57 = cpum::regs::Cr4::LA57.bits();
    if s.la57() && u64::from(h.cr4) & la57 == 0 {
        f.push(format!(
            "the host ran with CR4 {:#x}, without LA57 (5-level paging)",
            h.cr4
        ));
    }
    let x2_on = h.features & crate::hostkernel::FEATURE_X2APIC_ON != 0;
    if s.host_x2apic && !x2_on {
        f.push("the host APIC did not run in x2APIC mode".into());
    }
    f
}

/// Every check of the transcript itself: integrity (checksum, nothing
/// unknown, nothing foreign), completeness (the line sequence of a passing
/// run, every dump) and consistency (the `BOOT` line names this scenario;
/// `TRIP`, `VCPU` and `SUMMARY` lines agree with each other).
fn transcript_failures(s: &Scenario, b: &Built, r: &crate::transcript::Report) -> Vec<String> {
    let mut f = Vec::new();
    // Integrity.
    match (r.crc, r.crc_computed) {
        (Some(got), Some(want)) if got != want => f.push(format!(
            "CRC line says {got:08x}, the protocol lines sum to {want:08x}: the transcript was altered"
        )),
        (Some(_), Some(_)) => {}
        _ => f.push("no valid CRC line: the transcript is cut short or altered".into()),
    }
    for m in r.malformed.iter().take(4) {
        f.push(format!("unknown or unparseable line `@@{m}`"));
    }
    f.extend(r.problems.iter().take(4).cloned());
    let foreign_ok = s.options.trace && r.foreign.bytes().all(|c| Step::from_ch(c).is_some());
    if !r.foreign.is_empty() && !foreign_ok {
        f.push(format!(
            "{} bytes outside the protocol after the first protocol line (e.g. {:?})",
            r.foreign.len(),
            r.foreign.chars().take(16).collect::<String>()
        ));
    }
    // Failure lines.
    if let Some(c) = &r.cpu_refusal {
        if c.present {
            f.push(format!(
                "the CPU has {} (CPUID {}), which the image was relocated without",
                c.feature, c.cpuid
            ));
        } else {
            f.push(format!("the CPU has no {} (CPUID {})", c.feature, c.cpuid));
        }
    }
    for e in r.errors.iter().take(2) {
        f.push(format!("ERROR {e}"));
    }
    for (what, n) in [
        ("MISMATCH", r.mismatches.len()),
        ("RETFAIL", r.ret_failures.len()),
        ("HOOKFAIL", r.hook_failures.len()),
        ("LOG", r.logs.len()),
        ("EXC", usize::from(r.exception.is_some())),
        ("EXC2", usize::from(r.nested_exception.is_some())),
        ("FAREXC", usize::from(r.far_exception.is_some())),
    ] {
        if n > 0 {
            f.push(format!("{n} {what} line(s)"));
        }
    }
    if r.result != Some(true) {
        f.push(match r.result {
            Some(false) => "RESULT FAIL".into(),
            _ => "no RESULT line".into(),
        });
    }
    // Completeness: the exact line sequence of a passing run.
    let want = expected_keywords(s, b, r.storm.len());
    let mut got: Vec<&str> = r.lines.iter().map(|l| keyword(l)).collect();
    if s.cpus > 1 {
        smp_canonical(&mut got);
    }
    let first_diff = (0..want.len().max(got.len()))
        .find(|&i| got.get(i).copied() != want.get(i).map(String::as_str));
    if let Some(i) = first_diff {
        let found = match r.lines.get(i) {
            Some(l) => format!("`@@{}`", l.chars().take(48).collect::<String>()),
            None => "the end".into(),
        };
        f.push(format!(
            "protocol line {}: expected {}, found {found}",
            i + 1,
            want.get(i).map_or("the end", String::as_str)
        ));
    }
    f.extend(boot_failures(s, b, r));
    f.extend(count_failures(s, b, r));
    f.extend(host_config_failures(s, r));
    for d in &b.testbed.dumps {
        match r.dump(&d.name) {
            None => f.push(format!("no `{}` dump", d.name)),
            Some(got) if !got.complete || got.addr64 != d.addr || got.len != d.len => {
                f.push(format!(
                    "dump `{}` is not the {} bytes at {:#x} the image dumps",
                    d.name, d.len, d.addr
                ))
            }
            Some(_) => {}
        }
    }
    f
}

/// The `BOOT` and `HOST` lines name this build: host mode, multiboot magic,
/// trips, VCPUs, items, entry, the scenario fields; the host's magic values.
fn boot_failures(s: &Scenario, b: &Built, r: &crate::transcript::Report) -> Vec<String> {
    let mut f = Vec::new();
    let Some(boot) = &r.boot else {
        f.push("no BOOT line".into());
        return f;
    };
    let t = &b.testbed;
    let entry = b
        .vmm
        .switcher(s.kind)
        .map(|sw| sw.entries.r0_host_to_guest_hc.0)
        .ok();
    let checks: [(&str, String, String); 6] = [
        ("mode", boot.mode.clone(), t.mode.name().to_owned()),
        (
            "mbeax",
            format!("{:#x}", boot.mb_eax),
            format!("{:#x}", crate::image::MULTIBOOT_BOOTLOADER_MAGIC),
        ),
        ("trips", boot.trips.to_string(), s.trips.to_string()),
        ("vcpus", boot.vcpus.to_string(), s.vcpus.to_string()),
        ("items", boot.items.to_string(), t.items.len().to_string()),
        (
            "entry",
            format!("{:#x}", boot.entry64),
            entry.map_or("?".into(), |e| format!("{e:#x}")),
        ),
    ];
    for (k, got, want) in checks {
        if got != want {
            f.push(format!("BOOT {k}={got}, this build has {want}"));
        }
    }
    if boot.scenario != t.boot_fields {
        f.push("the BOOT line names another scenario than this build".into());
    }
    if let Some(h) = &r.host {
        use crate::hostkernel::{FS_MAGIC, HOST_PCID, MAGIC_VALUE};
        // With PCIDE the host's CR3 carries its PCID in bits 11:0.
        let want_cr3 = if s.host_cr4.pcid() {
            t.addrs.cr3 | HOST_PCID as u32
        } else {
            t.addrs.cr3
        };
        if h.magic != MAGIC_VALUE || h.fs0 != FS_MAGIC || h.cr3 != want_cr3 {
            f.push(format!(
                "HOST magic={:#x} fs0={:#x} cr3={:#x}, expected {MAGIC_VALUE:#x}, {FS_MAGIC:#x}, {want_cr3:#x}",
                h.magic, h.fs0, h.cr3
            ));
        }
    }
    f
}

/// `TRIP`, `VCPU` and `SUMMARY` lines agree with each other and with the
/// scenario: one `VCPU` line per VCPU with its `arg2`, every call made and
/// clean, the summary the sum over the VCPUs, the traced trips' deltas the
/// VCPUs' first and second ones, every delta within the VCPU's range.
fn count_failures(s: &Scenario, b: &Built, r: &crate::transcript::Report) -> Vec<String> {
    let mut f = Vec::new();
    let t = &b.testbed;
    // Several host CPUs print in the order they run.
    let mut vcpu_lines = r.vcpus.clone();
    let mut trip_lines = r.trips.clone();
    if s.cpus > 1 {
        vcpu_lines.sort_by_key(|v| v.vcpu);
        trip_lines.sort_by_key(|l| (l.trip, l.vcpu));
        f.extend(smp_failures(s, r));
    }
    for (i, v) in vcpu_lines.iter().enumerate() {
        let want_arg2 = t.vcpus.get(i).copied();
        let sum_lo = u64::from(v.calls) * u64::from(v.tsc_min);
        let sum_hi = u64::from(v.calls) * u64::from(v.tsc_max);
        let inside = |x: u32| v.tsc_min <= x && x <= v.tsc_max;
        let second_ok = if s.trips >= 2 {
            inside(v.tsc_second)
        } else {
            v.tsc_second == 0
        };
        let ok = v.vcpu as usize == i
            && Some(v.arg2) == want_arg2
            && v.calls == s.trips
            && v.mismatches == 0
            && v.retfails == 0
            && v.hookfails == 0
            && v.tsc_min <= v.tsc_max
            && (sum_lo..=sum_hi).contains(&v.tsc_sum)
            && inside(v.tsc_first)
            && second_ok;
        if !ok {
            f.push(format!(
                "VCPU line {i} (vcpu={} arg2={:#x} calls={} mismatches={} retfails={} hookfails={} \
                 tsc {}..{} sum {} first {} second {}) is not a clean, consistent run of {} calls",
                v.vcpu,
                v.arg2,
                v.calls,
                v.mismatches,
                v.retfails,
                v.hookfails,
                v.tsc_min,
                v.tsc_max,
                v.tsc_sum,
                v.tsc_first,
                v.tsc_second,
                s.trips
            ));
        }
    }
    if r.vcpus.len() != t.vcpus.len() {
        f.push(format!(
            "{} VCPU lines, the image runs {} VCPUs",
            r.vcpus.len(),
            t.vcpus.len()
        ));
    }
    let mut traced = Vec::new();
    for trip in 0..s.trips.min(t.trace_trips) {
        for vcpu in 0..s.vcpus {
            traced.push((trip, vcpu));
        }
    }
    let got: Vec<(u32, u32)> = trip_lines.iter().map(|l| (l.trip, l.vcpu)).collect();
    if got != traced {
        f.push(format!(
            "TRIP lines for (trip, vcpu) {got:?}, expected {traced:?}"
        ));
    }
    for l in &trip_lines {
        let v = vcpu_lines.get(l.vcpu as usize);
        let want = v.map(|v| match l.trip {
            0 => v.tsc_first,
            _ => v.tsc_second,
        });
        if l.trip < 2 && want != Some(l.tsc) {
            f.push(format!(
                "TRIP trip={} vcpu={} tsc={} disagrees with its VCPU line",
                l.trip, l.vcpu, l.tsc
            ));
        }
    }
    let Some(sm) = &r.summary else {
        return f;
    };
    // In u128: a forged transcript may carry sums near u64::MAX.
    let sum = |g: fn(&crate::transcript::VcpuSummary) -> u64| {
        r.vcpus.iter().map(|v| u128::from(g(v))).sum::<u128>()
    };
    let w = |x: u32| u128::from(x);
    let checks = [
        ("trips", w(sm.trips), w(s.trips)),
        ("calls", w(sm.calls), sum(|v| u64::from(v.calls))),
        (
            "mismatches",
            w(sm.mismatches),
            sum(|v| u64::from(v.mismatches)),
        ),
        ("retfails", w(sm.retfails), sum(|v| u64::from(v.retfails))),
        (
            "hookfails",
            w(sm.hookfails),
            sum(|v| u64::from(v.hookfails)),
        ),
        ("tsc_sum", u128::from(sm.tsc_sum), sum(|v| v.tsc_sum)),
        (
            "tsc_min",
            w(sm.tsc_min),
            w(r.vcpus.iter().map(|v| v.tsc_min).min().unwrap_or(u32::MAX)),
        ),
        (
            "tsc_max",
            w(sm.tsc_max),
            w(r.vcpus.iter().map(|v| v.tsc_max).max().unwrap_or(0)),
        ),
        ("nmis", w(sm.nmis), w(r.nmi_count.unwrap_or(u32::MAX))),
        ("nmis", w(sm.nmis), if s.nmi_storm { w(sm.nmis) } else { 0 }),
    ];
    for (k, got, want) in checks {
        if got != want {
            f.push(format!(
                "SUMMARY {k}={got}, the VCPU lines and the scenario give {want}"
            ));
        }
    }
    f
}
