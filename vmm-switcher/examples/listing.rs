//! Prints the annotated listing of the 32-bit → AMD64 switcher at a sample placement.
use vmm_switcher::reloc::{CpuFacts, HyperSelectors, InterCr3};
use vmm_switcher::templates::{legacy_amd64, TemplateOptions, VmLayout};
use vmm_switcher::{disasm, relocate, HcAddr, PhysAddr, RcAddr, RelocContext};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vm = VmLayout {
        size: 0x4000,
        cpum: 0x100,
        cpum_size: 0x2000,
        stat_to_gc: 0x40,
        stat_to_hc: 0x68,
    };
    let def = legacy_amd64::build(
        legacy_amd64::HostPaging::Legacy32,
        &TemplateOptions::default(),
        &vm,
    )?;
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
    let mut code = def.code.clone();
    let rel = relocate(&def, &mut code, &ctx)?;
    print!("{}", disasm::listing(&def, &code, &ctx, &rel));
    Ok(())
}
