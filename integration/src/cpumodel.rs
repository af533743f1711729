//! What a QEMU `-cpu` model reports through CPUID, without asking QEMU.
//!
//! The testbed relocates a switcher for the CPU it will boot, so it needs
//! that CPU's facts (NX, FXSR, SYSENTER, SYSCALL) before QEMU runs. A small
//! table holds the CPUID bits of the models the tests and the program use
//! under TCG (QEMU 9 and 10), for every feature [`CpuFeature`] names, and a
//! model string's `+flag`/`-flag`/`flag=on|off` items are applied on top:
//! deterministic and offline. The host kernel checks the same bits at boot
//! (`NOCPU`, `CPUEXTRA`), so a table entry that disagrees with the QEMU at
//! hand shows up as a refusal, never as a wrong verdict.
//!
//! A model the table does not know is taken as `qemu64` with the flags
//! applied ([`CpuModel::known`] is false); the boot-time check then refuses
//! a CPU whose bits differ.

use std::collections::BTreeSet;

use vmm::{CpuFacts, CpuidLeaves};

use crate::hostkernel::CpuFeature;
use crate::scenario::Scenario;
use thiserror::Error;

/// The model QEMU runs when none is given.
pub const DEFAULT_MODEL: &str = "qemu64";

/// A `-cpu` model string and the features it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuModel {
    /// The model string as given (`qemu64,-nx`).
    pub spec: String,
    /// The base model is in the table.
    pub known: bool,
    features: BTreeSet<CpuFeature>,
}

/// The features of the base models the table knows.
fn base_features(name: &str) -> Option<&'static [CpuFeature]> {
    use CpuFeature as F;
    const QEMU64: &[CpuFeature] = &[
        F::LongMode,
        F::Pae,
        F::Fxsr,
        F::Sse2,
        F::Apic,
        F::Nx,
        F::Sep,
        F::Syscall,
    ];
    const QEMU32: &[CpuFeature] = &[F::Pae, F::Fxsr, F::Sse2, F::Apic, F::Sep];
    Some(match name {
        // Not `kvm64`: with Intel's vendor string, CPUID hides SYSCALL
        // outside 64-bit mode, so its facts depend on the host's mode.
        "qemu64" => QEMU64,
        "qemu32" => QEMU32,
        "486" => &[],
        // TCG's `max` is everything TCG emulates: not PCID, not CET.
        "max" => &TCG_MAX,
        _ => return None,
    })
}

/// Every feature of [`CpuFeature::ALL`] QEMU's TCG emulates (its `max`).
const TCG_MAX: [CpuFeature; 15] = [
    CpuFeature::LongMode,
    CpuFeature::Pae,
    CpuFeature::Fxsr,
    CpuFeature::Sse2,
    CpuFeature::Apic,
    CpuFeature::X2apic,
    CpuFeature::Nx,
    CpuFeature::Sep,
    CpuFeature::Syscall,
    CpuFeature::La57,
    CpuFeature::Smep,
    CpuFeature::Smap,
    CpuFeature::Umip,
    CpuFeature::Pku,
    CpuFeature::Fsgsbase,
];

/// The feature a QEMU flag name stands for (with QEMU's aliases).
fn flag_feature(flag: &str) -> Option<CpuFeature> {
    match flag {
        "xd" => Some(CpuFeature::Nx),
        "i64" => Some(CpuFeature::LongMode),
        _ => CpuFeature::ALL.into_iter().find(|f| f.qemu_flag() == flag),
    }
}

impl CpuModel {
    /// The features `spec` reports: the base model's, with each `+flag`,
    /// `-flag`, `flag=on` or `flag=off` item applied in order (items that
    /// name no feature the table tracks, such as `level=13`, are ignored).
    pub fn parse(spec: &str) -> Self {
        let mut items = spec.split(',');
        let base = items.next().unwrap_or_default();
        let (known, base) = match base_features(base) {
            Some(f) => (true, f),
            None => (false, base_features(DEFAULT_MODEL).unwrap_or_default()),
        };
        let mut features: BTreeSet<CpuFeature> = base.iter().copied().collect();
        for item in items {
            let (flag, on) = if let Some(f) = item.strip_prefix('+') {
                (f, true)
            } else if let Some(f) = item.strip_prefix('-') {
                (f, false)
            } else if let Some((f, v)) = item.split_once('=') {
                match v {
                    "on" | "true" | "yes" => (f, true),
                    "off" | "false" | "no" => (f, false),
                    _ => continue,
                }
            } else {
                continue;
            };
            if let Some(feat) = flag_feature(flag) {
                if on {
                    features.insert(feat);
                } else {
                    features.remove(&feat);
                }
            }
        }
        Self {
            spec: spec.to_owned(),
            known,
            features,
        }
    }

    /// The model QEMU runs without `-cpu`.
    pub fn qemu_default() -> Self {
        Self::parse(DEFAULT_MODEL)
    }

    /// The `-cpu` argument QEMU needs for this model: `None` for QEMU's
    /// own default.
    pub fn qemu_arg(&self) -> Option<String> {
        (self.spec != DEFAULT_MODEL).then(|| self.spec.clone())
    }

    /// Whether the model reports `f`.
    pub fn has(&self, f: CpuFeature) -> bool {
        self.features.contains(&f)
    }

    /// The CPUID bits the CPU facts are read from.
    pub fn cpuid(&self) -> CpuidLeaves {
        let bit = |f: CpuFeature, b: u32| if self.has(f) { b } else { 0 };
        CpuidLeaves {
            leaf1_edx: bit(CpuFeature::Sep, CpuidLeaves::LEAF1_EDX_SEP)
                | bit(CpuFeature::Fxsr, CpuidLeaves::LEAF1_EDX_FXSR),
            ext1_edx: bit(CpuFeature::Syscall, CpuidLeaves::EXT1_EDX_SYSCALL)
                | bit(CpuFeature::Nx, CpuidLeaves::EXT1_EDX_NX),
        }
    }

    /// The facts a switcher is relocated for on this CPU.
    pub fn facts(&self) -> CpuFacts {
        CpuFacts::from_cpuid(&self.cpuid())
    }
}

/// A host configuration this CPU model cannot run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HostConfigError {
    /// The option exists only for another host.
    #[error("{option} needs an AMD64 host, and {switcher} runs on a {host} host")]
    NeedsAmd64Host {
        /// The option (`--la57`, `--host-cr4 today`).
        option: &'static str,
        /// The switcher.
        switcher: &'static str,
        /// Its host mode.
        host: &'static str,
    },
    /// The CPU model lacks a feature the host configuration needs.
    #[error(
        "{option} needs a CPU with {feature}, and the --cpu model `{model}` has none (add +{flag})"
    )]
    ModelLacks {
        /// The option asking for it.
        option: &'static str,
        /// The feature's name.
        feature: &'static str,
        /// QEMU's flag for it.
        flag: &'static str,
        /// The model given.
        model: String,
    },
}

/// The features the scenario's host configuration needs from the CPU, each
/// with the option asking for it.
pub fn host_needs(s: &Scenario) -> Vec<(&'static str, CpuFeature)> {
    let mut v = Vec::new();
    if s.host_x2apic {
        v.push(("--host-apic x2apic", CpuFeature::X2apic));
    }
    if s.host_cr4.today() {
        for f in TODAY_FEATURES {
            v.push(("--host-cr4 today", f));
        }
    }
    if s.host_cr4.pcid() {
        v.push(("--host-cr4 today+pcid", CpuFeature::Pcid));
    }
    if s.host_cr4.cet() {
        v.push(("--host-cr4 today+pcid+cet", CpuFeature::CetSs));
    }
    if s.la57() {
        v.push(("--la57", CpuFeature::La57));
    }
    v
}

/// The CPU features `--host-cr4 today` turns on.
pub const TODAY_FEATURES: [CpuFeature; 5] = [
    CpuFeature::Smep,
    CpuFeature::Smap,
    CpuFeature::Umip,
    CpuFeature::Pku,
    CpuFeature::Fsgsbase,
];

/// Refuses host options the switcher's host cannot have: today's CR4 (and
/// LA57) exist for AMD64 hosts only.
///
/// # Errors
/// See above.
pub fn check_host(s: &Scenario) -> Result<(), HostConfigError> {
    for (asked, option) in [
        (s.host_cr4.today(), "--host-cr4 today"),
        (s.la57(), "--la57"),
    ] {
        if asked && !s.amd64_host() {
            return Err(HostConfigError::NeedsAmd64Host {
                option,
                switcher: s.kind.cli_name(),
                host: s.kind.host().name(),
            });
        }
    }
    Ok(())
}

/// The CPU model `s` boots: `given` (a `--cpu` model), or `qemu64` with a
/// `+flag` for every feature the host configuration needs.
///
/// # Errors
/// The switcher's host cannot have the host options ([`check_host`]), or a
/// known `given` model lacks a feature the host configuration needs (an
/// unknown one is left to the boot-time check).
pub fn model_for(s: &Scenario, given: Option<&str>) -> Result<CpuModel, HostConfigError> {
    check_host(s)?;
    let needs = host_needs(s);
    let Some(given) = given else {
        let mut spec = DEFAULT_MODEL.to_owned();
        for (_, f) in &needs {
            spec.push_str(",+");
            spec.push_str(f.qemu_flag());
        }
        return Ok(CpuModel::parse(&spec));
    };
    let m = CpuModel::parse(given);
    if m.known {
        if let Some((option, f)) = needs.into_iter().find(|(_, f)| !m.has(*f)) {
            return Err(HostConfigError::ModelLacks {
                option,
                feature: f.name(),
                flag: f.qemu_flag(),
                model: given.to_owned(),
            });
        }
    }
    Ok(m)
}

/// The CPU features the facts speak about, with their value in `facts`:
/// what the image requires (`true`) or refuses (`false`) at boot.
pub fn fact_features(facts: &CpuFacts) -> [(CpuFeature, bool); 4] {
    [
        (CpuFeature::Nx, facts.nx),
        (CpuFeature::Fxsr, facts.fxsr),
        (CpuFeature::Sep, facts.host_sysenter),
        (CpuFeature::Syscall, facts.host_syscall),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn flags_apply_in_order_on_the_base_model() {
        let m = CpuModel::parse("qemu64,-nx");
        assert!(m.known);
        assert!(!m.facts().nx);
        assert!(m.facts().host_sysenter && m.facts().host_syscall && m.facts().fxsr);
        assert_eq!(CpuModel::qemu_default().facts(), CpuFacts::common());
        let m = CpuModel::parse("qemu64,-sep,+x2apic,la57=on,level=13");
        assert!(!m.facts().host_sysenter);
        assert!(m.has(CpuFeature::X2apic) && m.has(CpuFeature::La57));
        assert!(!CpuModel::parse("qemu64,-syscall").facts().host_syscall);
        assert!(!CpuModel::parse("qemu64,-xd").facts().nx);
        assert!(CpuModel::parse("qemu64,-nx,+nx").facts().nx);
        assert!(!CpuModel::parse("qemu64,nx=off").facts().nx);
        let max = CpuModel::parse("max");
        for f in CpuFeature::ALL {
            let tcg = !matches!(f, CpuFeature::Pcid | CpuFeature::CetSs);
            assert_eq!(max.has(f), tcg, "{f:?}");
        }
        assert!(!CpuModel::parse("486").has(CpuFeature::LongMode));
        assert!(!CpuModel::parse("qemu32").facts().nx);
    }

    #[test]
    fn an_unknown_model_is_taken_as_qemu64() {
        let m = CpuModel::parse("no-such-cpu-model,-sep");
        assert!(!m.known);
        assert!(!m.facts().host_sysenter);
        assert!(m.facts().nx);
    }

    #[test]
    fn facts_round_trip_through_cpuid_bits() {
        for spec in [
            "qemu64",
            "qemu64,-nx",
            "qemu64,-sep",
            "qemu64,-syscall",
            "486",
        ] {
            let f = CpuModel::parse(spec).facts();
            assert_eq!(CpuFacts::from_cpuid(&f.to_cpuid()), f, "{spec}");
        }
    }
}
