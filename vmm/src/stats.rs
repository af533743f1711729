//! The VM's STAM samples, registered over the VM structure image.
//!
//! The samples live inside the VM structure, which machine code updates in
//! place; the registry records only their offsets. Read them from any image
//! of the VM — the core's own [`crate::Vmm::hma`], or a memory dump taken
//! after a run — by handing the bytes to a [`stam::Backing`].

use core::mem::offset_of;

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

/// The VM's registry and the region id of the VM structure in it.
#[derive(Debug)]
pub struct VmStats {
    /// The registry.
    pub registry: Registry,
    /// Region of the VM structure image.
    pub vm: RegionId,
}

impl VmStats {
    /// The registry for a VM with `vcpus` VCPUs: the switcher profiles and,
    /// per VCPU, the masked-vector set, the last return code and the use flags.
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
        }
        Ok(Self { registry, vm })
    }

    /// A backing over `vm_image` (the VM structure's bytes).
    pub fn backing<'a>(&self, vm_image: &'a [u8]) -> Backing<'a> {
        Backing::new().with(self.vm, vm_image)
    }
}
