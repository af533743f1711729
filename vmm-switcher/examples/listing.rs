//! Prints the annotated listing of the 32-bit → AMD64 switcher at a sample placement.
use vmm_switcher::templates::{legacy_amd64, sample_context, TemplateOptions, VmLayout};
use vmm_switcher::{disasm, relocate};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vm = VmLayout::sample();
    let def = legacy_amd64::build(
        legacy_amd64::HostPaging::Legacy32,
        &TemplateOptions::default(),
        &vm,
    )?;
    let ctx = sample_context(&vm);
    let mut code = def.code.clone();
    let rel = relocate(&def, &mut code, &ctx)?;
    print!("{}", disasm::listing(&def, &code, &ctx, &rel)?);
    Ok(())
}
