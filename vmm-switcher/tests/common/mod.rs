//! Shared fixtures for the vmm-switcher tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use vmm_switcher::templates::{legacy_amd64, sample_context, Revision, TemplateOptions, VmLayout};
use vmm_switcher::{RelocContext, SwitcherDef};

pub const VM: VmLayout = VmLayout::sample();

pub fn ctx() -> RelocContext {
    sample_context(&VM)
}

pub fn all_options() -> Vec<TemplateOptions> {
    let mut v = Vec::new();
    for stats in [false, true] {
        for apic in [false, true] {
            for revision in Revision::ALL {
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
                                la57: false,
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
