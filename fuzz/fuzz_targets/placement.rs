//! The VMM core (`vmm::Vmm::new`) with an arbitrary placement, VCPU count,
//! page budgets, host width and options: a placement that cannot work must
//! give a `VmmError`, never a panic. A core that builds is then moved to an
//! arbitrary RC address, asked for every switcher and VCPU, and dumped.
#![no_main]

use fuzz_input::Input;
use libfuzzer_sys::fuzz_target;
use vmm::{Placement, Vmm, VmmConfig};
use vmm_switcher::{HcAddr, PhysAddr, RcAddr};

/// An address: raw, or (more often) 32-bit and page-aligned, so that the
/// input reaches past the first range checks.
fn addr(i: &mut Input) -> u64 {
    let shape = i.u8();
    let v = i.u64();
    let v = if shape & 1 == 0 { v & 0xffff_ffff } else { v };
    let v = if shape & 2 == 0 { v & !0xfff } else { v };
    if shape & 4 == 0 {
        // High canonical half (AMD64 kernel addresses).
        v | 0xffff_8000_0000_0000
    } else {
        v
    }
}

fn rc(i: &mut Input) -> RcAddr {
    RcAddr(addr(i) as u32)
}

fn placement(i: &mut Input) -> Placement {
    Placement {
        code_hc: HcAddr(addr(i)),
        code_phys: PhysAddr(addr(i)),
        hma_rc: rc(i),
        hma_hc: HcAddr(addr(i)),
        hma_phys: PhysAddr(addr(i)),
        tables_phys: PhysAddr(addr(i)),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut i = Input::new(data);
    let mut cfg = if i.bool() {
        VmmConfig::amd64_host()
    } else {
        VmmConfig::default()
    };
    if i.bool() {
        cfg.placement = placement(&mut i);
    }
    let tweak = i.u8();
    if tweak & 1 != 0 {
        cfg.vcpus = u32::from(i.u8() % 40);
    }
    if tweak & 2 != 0 {
        cfg.helper_pages = u32::from(i.u8());
    }
    if tweak & 4 != 0 {
        cfg.table_pages = u32::from(i.u8());
    }
    if tweak & 8 != 0 {
        cfg.host_bits = [32, 64, 0, 16][usize::from(i.u8() % 4)];
    }
    if tweak & 16 != 0 {
        cfg.options.stats = i.bool();
        cfg.options.apic_nmi_masking = i.bool();
        cfg.options.trace = i.bool();
        cfg.options.crash_markers = i.bool();
        cfg.options.x2apic = i.bool();
    }
    if tweak & 32 != 0 {
        cfg.extra_mappings.push(vmm::ExtraMapping {
            virt: addr(&mut i),
            phys: addr(&mut i),
            len: u64::from(i.u32()),
            uncached: i.bool(),
        });
    }
    let Ok(mut v) = Vmm::new(cfg) else {
        return;
    };
    let kinds: Vec<_> = v.switchers().iter().map(|s| s.def.kind).collect();
    for k in kinds {
        let _ = v.activate(k);
    }
    for n in 0..34 {
        let _ = v.vcpu_arg(n);
        let _ = v.cpumcpu(n);
    }
    let _ = v.header();
    let _ = v.stam();
    let _ = v.relocate_hma(rc(&mut i));
    let _ = v.header();
});
