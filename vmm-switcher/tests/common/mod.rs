//! Shared fixtures for the vmm-switcher tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use vmm_switcher::reloc::{CpuFacts, HyperSelectors, InterCr3};
use vmm_switcher::templates::{legacy_amd64, Revision, TemplateOptions, VmLayout};
use vmm_switcher::{HcAddr, PhysAddr, RcAddr, RelocContext, SwitcherDef};

pub const VM: VmLayout = VmLayout {
    size: 0x8000,
    cpum: 0x100,
    cpum_size: 0x2000,
    stat_to_gc: 0x40,
    stat_to_hc: 0x68,
};

pub fn ctx() -> RelocContext {
    RelocContext {
        code_hc: HcAddr(0xc040_0000),
        code_id: PhysAddr(0x0040_0000),
        code_rc: RcAddr(0xa010_0000),
        vm_hc: HcAddr(0xc050_0000),
        vm_rc: RcAddr(0xa000_0000),
        vm_size: VM.size,
        cpum_off: VM.cpum,
        cpum_size: VM.cpum_size,
        cpumcpu0_off: 64,
        inter_cr3: InterCr3 {
            legacy32: PhysAddr(0x60_0000),
            pae: PhysAddr(0x60_1000),
            amd64: PhysAddr(0x60_2000),
        },
        sel: HyperSelectors {
            cs: 0x08,
            ds: 0x10,
            tss: 0x20,
            cs64: 0x18,
        },
        gdt_rc: RcAddr(0xa000_8000),
        cpu: CpuFacts {
            nx: true,
            fxsr: true,
            host_sysenter: true,
            host_syscall: true,
        },
        apic_rc: None,
    }
}

pub fn all_options() -> Vec<TemplateOptions> {
    let mut v = Vec::new();
    for stats in [false, true] {
        for apic in [false, true] {
            for revision in [Revision::A, Revision::B] {
                for trace in [false, true] {
                    for crash_markers in [false, true] {
                        for x2apic in [false, true] {
                            v.push(TemplateOptions {
                                stats,
                                apic_nmi_masking: apic,
                                revision,
                                trace,
                                crash_markers,
                                x2apic,
                            });
                        }
                    }
                }
            }
        }
    }
    v
}

pub fn both(o: &TemplateOptions) -> Vec<SwitcherDef> {
    [
        legacy_amd64::HostPaging::Legacy32,
        legacy_amd64::HostPaging::Pae,
    ]
    .into_iter()
    .map(|h| legacy_amd64::build(h, o, &VM).expect("template builds"))
    .collect()
}
