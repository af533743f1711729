//! The VM's STAM samples, registered over the VM structure image.
//!
//! The samples live inside the VM structure, which machine code updates in
//! place; the registry records only their offsets. Read them from any image
//! of the VM — the core's own [`crate::Vmm::hma`], or a memory dump taken
//! after a run — by handing the bytes to a [`stam::Backing`].

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, IntoBytes};

use cpum::CpumCpu32;
use stam::{
    Backing, RegionId, Registry, SampleDef, StamError, StamProfileAdv, StamType, StamUnit,
    StamVisibility,
};

use crate::layout::{self, VmFixed};

/// Name of the ToGC profile.
pub const TO_GC: &str = "/VMM/Switcher/ToGC";
/// Name of the ToHC profile.
pub const TO_HC: &str = "/VMM/Switcher/ToHC";

/// Adds the periods of `from` to `to`.
fn add_profile(to: &mut StamProfileAdv, from: &StamProfileAdv) {
    let (t, f) = (&mut to.core, &from.core);
    if f.periods != 0 {
        t.periods = t.periods.wrapping_add(f.periods);
        t.ticks = t.ticks.wrapping_add(f.ticks);
        t.ticks_max = t.ticks_max.max(f.ticks_max);
        t.ticks_min = t.ticks_min.min(f.ticks_min);
    }
    if to.ts_start == 0 {
        to.ts_start = from.ts_start;
    }
}

/// Name of VCPU `i`'s ToGC profile (`/VMM/CPU<i>/Switcher/ToGC`).
pub fn vcpu_to_gc(i: u32) -> String {
    format!("/VMM/CPU{i}/Switcher/ToGC")
}

/// Name of VCPU `i`'s ToHC profile (`/VMM/CPU<i>/Switcher/ToHC`).
pub fn vcpu_to_hc(i: u32) -> String {
    format!("/VMM/CPU{i}/Switcher/ToHC")
}

/// The VM's registry and the region id of the VM structure in it.
#[derive(Debug)]
pub struct VmStats {
    /// The registry.
    pub registry: Registry,
    /// Region of the VM structure image.
    pub vm: RegionId,
    /// VCPUs registered.
    vcpus: u32,
}

impl VmStats {
    /// The registry for a VM with `vcpus` VCPUs: the VM-wide switcher
    /// profiles and, per VCPU, its own switcher profiles (the switchers
    /// update these; the VM-wide ones are their sums, see
    /// [`VmStats::with_totals`]), the masked-vector set, the last return
    /// code and the use flags.
    ///
    /// # Errors
    /// [`StamError::OutOfBounds`] for the first VCPU past
    /// [`layout::MAX_VCPUS`]: the region is the largest VM structure.
    pub fn new(vcpus: u32) -> Result<Self, StamError> {
        let mut registry = Registry::new();
        let size = layout::vm_size(vcpus.min(layout::MAX_VCPUS)).unwrap_or(0);
        let vm = registry.add_region("vm", size as usize);
        registry.register_as::<StamProfileAdv>(
            SampleDef::new(TO_GC, StamType::ProfileAdv, StamUnit::TicksPerCall)
                .description("Host context to the hypervisor helper: C entry to the helper call."),
            vm,
            offset_of!(VmFixed, header.stat_switcher_to_gc),
        )?;
        registry.register_as::<StamProfileAdv>(
            SampleDef::new(TO_HC, StamType::ProfileAdv, StamUnit::TicksPerCall)
                .description("Hypervisor helper's return back to the host: helper return to the C entry's return."),
            vm,
            offset_of!(VmFixed, header.stat_switcher_to_hc),
        )?;
        for i in 0..vcpus {
            let base = layout::off_cpumcpu(i)
                .map_or(usize::MAX, |o| layout::OFF_CPUM.saturating_add(o as usize));
            let per = [
                (
                    "ApicDisVectors",
                    offset_of!(CpumCpu32, apic_dis_vectors),
                    "NMI LVTs masked by the last switch (1 LINT0, 2 LINT1, 4 PC, 8 THMR).",
                ),
                (
                    "RetCode",
                    offset_of!(CpumCpu32, ret_code),
                    "Status the hypervisor helper returned last.",
                ),
                (
                    "UseFlags",
                    offset_of!(CpumCpu32, use_flags),
                    "fUseFlags after the last switch.",
                ),
            ];
            for (leaf, off, desc) in per {
                let name = format!("/VMM/CPU{i}/{leaf}");
                registry.register_as::<u32>(
                    SampleDef::new(&name, StamType::X32, StamUnit::None)
                        .visibility(StamVisibility::Always)
                        .description(desc),
                    vm,
                    base.saturating_add(off),
                )?;
            }
            for (name, off, desc) in [
                (
                    vcpu_to_gc(i),
                    offset_of!(CpumCpu32, stat_to_gc),
                    "This VCPU's switches to the hypervisor helper.",
                ),
                (
                    vcpu_to_hc(i),
                    offset_of!(CpumCpu32, stat_to_hc),
                    "This VCPU's switches back to the host.",
                ),
            ] {
                registry.register_as::<StamProfileAdv>(
                    SampleDef::new(&name, StamType::ProfileAdv, StamUnit::TicksPerCall)
                        .description(desc),
                    vm,
                    base.saturating_add(off),
                )?;
            }
        }
        Ok(Self {
            registry,
            vm,
            vcpus,
        })
    }

    /// A copy of `vm_image` whose VM-wide [`TO_GC`] and [`TO_HC`] profiles
    /// include every VCPU's own (periods and ticks added, the extremes
    /// merged; running if any is). Switchers on several host CPUs update
    /// only the per-VCPU profiles, so that none loses an update; hand the
    /// copy to [`VmStats::backing`] for the VM-wide figures. VCPUs the image
    /// is too short for are left out.
    pub fn with_totals(&self, vm_image: &[u8]) -> Vec<u8> {
        let mut out = vm_image.to_vec();
        let Ok((mut fixed, _)) = VmFixed::read_from_prefix(vm_image) else {
            return out;
        };
        for i in 0..self.vcpus {
            let Some(at) =
                layout::off_cpumcpu(i).and_then(|o| layout::OFF_CPUM.checked_add(o as usize))
            else {
                break;
            };
            let Some(Ok((c, _))) = vm_image.get(at..).map(CpumCpu32::read_from_prefix) else {
                break;
            };
            add_profile(&mut fixed.header.stat_switcher_to_gc, &c.stat_to_gc);
            add_profile(&mut fixed.header.stat_switcher_to_hc, &c.stat_to_hc);
        }
        if let Some(head) = out.get_mut(..size_of::<VmFixed>()) {
            head.copy_from_slice(fixed.as_bytes());
        }
        out
    }

    /// A backing over `vm_image` (the VM structure's bytes).
    pub fn backing<'a>(&self, vm_image: &'a [u8]) -> Backing<'a> {
        Backing::new().with(self.vm, vm_image)
    }
}
