//! Relocating the seed's switcher family (32 → AMD64 and PAE → AMD64) into
//! fresh copies, as the VMM core does whenever the hypervisor area moves.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use vmm_switcher::reloc::{CpuFacts, HyperSelectors, InterCr3};
use vmm_switcher::templates::{legacy_amd64, TemplateOptions, VmLayout};
use vmm_switcher::{relocate, HcAddr, PhysAddr, RcAddr, RelocContext};

fn bench(c: &mut Criterion) {
    let vm = VmLayout {
        size: 0x8000,
        cpum: 0x100,
        cpum_size: 0x2000,
        stat_to_gc: 0x40,
        stat_to_hc: 0x68,
    };
    let defs: Vec<_> = [
        legacy_amd64::HostPaging::Legacy32,
        legacy_amd64::HostPaging::Pae,
    ]
    .into_iter()
    .filter_map(|h| legacy_amd64::build(h, &TemplateOptions::default(), &vm).ok())
    .collect();
    let ctx = RelocContext {
        code_hc: HcAddr(0xc040_0000),
        code_id: PhysAddr(0x0040_0000),
        code_rc: RcAddr(0xa010_0000),
        vm_hc: HcAddr(0xc050_0000),
        vm_rc: RcAddr(0xa000_0000),
        vm_size: vm.size,
        cpum_off: vm.cpum,
        cpum_size: vm.cpum_size,
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
    };
    let mut bufs: Vec<Vec<u8>> = defs.iter().map(|d| d.code.clone()).collect();
    c.bench_function("relocate both switchers", |b| {
        b.iter(|| {
            for (d, buf) in defs.iter().zip(bufs.iter_mut()) {
                let r = relocate(d, buf, black_box(&ctx));
                black_box(r.is_ok());
            }
        })
    });
    c.bench_function("build both templates", |b| {
        b.iter(|| {
            for h in [
                legacy_amd64::HostPaging::Legacy32,
                legacy_amd64::HostPaging::Pae,
            ] {
                black_box(legacy_amd64::build(h, &TemplateOptions::default(), &vm).is_ok());
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
