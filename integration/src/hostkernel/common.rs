//! Code both kernels share: CPUID feature detection and the local APIC
//! (xAPIC through the MMIO page, or x2APIC through MSRs), emitted into a
//! 32-bit or a 64-bit assembler.

use iced_x86::code_asm::*;

use cpum::regs::MSR_APIC_BASE;

use super::{
    BuildError, LayoutRegion, FEATURE_APIC, FEATURE_EFER, FEATURE_NX, FEATURE_SCE, FEATURE_SEP,
    FEATURE_X2APIC, FEATURE_X2APIC_ON, FS_PAGE_PHYS, LAPIC_LVT_LINT0, LAPIC_LVT_LINT1,
    LAPIC_LVT_PERF, LAPIC_LVT_THERM, LAPIC_SVR, LAPIC_VER, LAPIC_VIRT, LVT_DM_NMI, LVT_MASKED,
    MAGIC_PAGE_PHYS, MAGIC_VALUE, SPURIOUS_VECTOR, STUB_ADDR, TABLES_BASE,
};
use crate::image::ImageBuilder;
use crate::paging::PAGE;
use crate::qemu::EXIT_FAIL;
use crate::transcript::PREFIX;

pub(super) type R<T = ()> = Result<T, BuildError>;

/// IA32_APIC_BASE.EN: the local APIC is globally enabled.
const APIC_BASE_EN: u32 = apic::APIC_BASE_EN as u32;
/// IA32_APIC_BASE.EXTD: x2APIC mode.
const APIC_BASE_EXTD: u32 = apic::APIC_BASE_EXTD as u32;
/// CPUID.1:ECX.x2APIC.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;

/// The LVT values the kernel programs: LINT0, LINT1 and PERF to NMI
/// delivery unmasked, THERM to NMI delivery masked.
pub(super) const LVT_SETUP: [(u32, u32); 4] = [
    (LAPIC_LVT_LINT0, LVT_DM_NMI),
    (LAPIC_LVT_LINT1, LVT_DM_NMI),
    (LAPIC_LVT_PERF, LVT_DM_NMI),
    (LAPIC_LVT_THERM, LVT_DM_NMI | LVT_MASKED),
];

/// The `APIC` line's register fields: key and xAPIC offset.
const APIC_LINE: [(&str, u32); 5] = [
    ("lint0", LAPIC_LVT_LINT0),
    ("lint1", LAPIC_LVT_LINT1),
    ("perf", LAPIC_LVT_PERF),
    ("therm", LAPIC_LVT_THERM),
    ("svr", LAPIC_SVR),
];

/// What the shared emitters need from a kernel generator.
pub(super) trait Emitter {
    /// The assembler.
    fn asm(&mut self) -> &mut CodeAssembler;
    /// `true` for the 64-bit kernel.
    fn bits64(&self) -> bool;
    /// Binds a label here.
    fn mark(&mut self, l: &mut CodeLabel) -> R;
    /// Prints a constant text.
    fn text(&mut self, s: &str) -> R;
    /// Exits through isa-debug-exit with `value`.
    fn exit_with(&mut self, value: u32) -> R;
    /// Address of the feature-bits dword.
    fn features_slot(&self) -> u32;
    /// Address of the APIC version dword.
    fn apic_ver_slot(&self) -> u32;
    /// `puthex` (EAX, 8 digits).
    fn puthex(&self) -> CodeLabel;
    /// `putnl`.
    fn putnl(&self) -> CodeLabel;

    /// The LAPIC register at `off`, with the base in EBX (RBX).
    fn lapic(&self, off: u32) -> AsmMemoryOperand {
        if self.bits64() {
            dword_ptr(rbx + off)
        } else {
            dword_ptr(ebx + off)
        }
    }
}

/// Sets feature bits from CPUID: APIC, SEP, x2APIC (leaf 1), NX, SYSCALL or
/// long mode (leaf 0x8000_0001). Clobbers EAX, EBX, ECX, EDX.
pub(super) fn emit_cpuid_features(g: &mut impl Emitter) -> R {
    let feat = g.features_slot();
    g.asm().mov(eax, 1u32)?;
    g.asm().cpuid()?;
    for (reg, bit, flag) in [
        (edx, 1u32 << 9, FEATURE_APIC),
        (edx, 1 << 11, FEATURE_SEP),
        (ecx, CPUID1_ECX_X2APIC, FEATURE_X2APIC),
    ] {
        let mut no = g.asm().create_label();
        g.asm().test(reg, bit)?;
        g.asm().jz(no)?;
        g.asm().or(dword_ptr(feat), flag)?;
        g.mark(&mut no)?;
    }
    let mut no_ext = g.asm().create_label();
    g.asm().mov(eax, 0x8000_0000u32)?;
    g.asm().cpuid()?;
    g.asm().cmp(eax, 0x8000_0001u32)?;
    g.asm().jb(no_ext)?;
    g.asm().mov(eax, 0x8000_0001u32)?;
    g.asm().cpuid()?;
    for (bits, flags) in [
        (1u32 << 20, FEATURE_NX | FEATURE_EFER),
        ((1 << 29) | (1 << 11), FEATURE_SCE | FEATURE_EFER),
    ] {
        let mut no = g.asm().create_label();
        g.asm().test(edx, bits)?;
        g.asm().jz(no)?;
        g.asm().or(dword_ptr(feat), flags)?;
        g.mark(&mut no)?;
    }
    g.mark(&mut no_ext)?;
    Ok(())
}

/// Enables the local APIC (SVR = 0x100 | [`SPURIOUS_VECTOR`]), records its
/// version, and programs [`LVT_SETUP`] — through the MMIO page, or, with
/// `x2apic`, after switching to x2APIC mode, through the x2APIC MSRs. Exits
/// with an `ERROR` line when the CPU has no APIC, the base is not
/// [`LAPIC_VIRT`], or x2APIC is asked for but absent. Clobbers EAX, EBX,
/// ECX, EDX.
pub(super) fn emit_apic_setup(g: &mut impl Emitter, x2apic: bool) -> R {
    let feat = g.features_slot();
    let mut have_apic = g.asm().create_label();
    g.asm().test(dword_ptr(feat), FEATURE_APIC)?;
    g.asm().jnz(have_apic)?;
    g.text(&format!(
        "{PREFIX}ERROR no local APIC (CPUID.1:EDX.APIC=0)\n"
    ))?;
    g.exit_with(EXIT_FAIL)?;
    g.mark(&mut have_apic)?;
    if x2apic {
        let mut have_x2 = g.asm().create_label();
        g.asm().test(dword_ptr(feat), FEATURE_X2APIC)?;
        g.asm().jnz(have_x2)?;
        g.text(&format!(
            "{PREFIX}ERROR x2APIC requested but CPUID.1:ECX.x2APIC (bit 21) is 0: \
             this CPU cannot run an x2APIC host (QEMU TCG emulates x2APIC from 9.0 on)\n"
        ))?;
        g.exit_with(EXIT_FAIL)?;
        g.mark(&mut have_x2)?;
    }
    g.asm().mov(ecx, MSR_APIC_BASE)?;
    g.asm().rdmsr()?;
    g.asm().or(eax, APIC_BASE_EN)?; // globally enabled
    g.asm().wrmsr()?;
    g.asm().mov(ebx, eax)?;
    g.asm().and(ebx, 0xffff_f000u32)?;
    g.asm().cmp(ebx, LAPIC_VIRT)?;
    let mut base_ok = g.asm().create_label();
    g.asm().je(base_ok)?;
    g.text(&format!(
        "{PREFIX}ERROR the APIC base MSR does not point at {LAPIC_VIRT:#010x}\n"
    ))?;
    g.exit_with(EXIT_FAIL)?;
    g.mark(&mut base_ok)?;

    if !x2apic {
        g.asm().mov(ebx, LAPIC_VIRT)?;
        let svr = g.lapic(LAPIC_SVR);
        g.asm().mov(eax, svr)?;
        g.asm().and(eax, !0x1ffu32)?;
        g.asm().or(eax, 0x100u32 | u32::from(SPURIOUS_VECTOR))?;
        g.asm().mov(svr, eax)?;
        let ver = g.lapic(LAPIC_VER);
        g.asm().mov(eax, ver)?;
        let slot = g.apic_ver_slot();
        g.asm().mov(dword_ptr(slot), eax)?;
        for (off, value) in LVT_SETUP {
            let lvt = g.lapic(off);
            g.asm().mov(lvt, value)?;
        }
        return Ok(());
    }

    // xAPIC -> x2APIC (EN is already set: EN=0, EXTD=1 is invalid).
    g.asm().or(eax, APIC_BASE_EXTD)?;
    g.asm().wrmsr()?;
    g.asm().rdmsr()?;
    let mut extd_ok = g.asm().create_label();
    g.asm().test(eax, APIC_BASE_EXTD)?;
    g.asm().jnz(extd_ok)?;
    g.text(&format!(
        "{PREFIX}ERROR x2APIC: IA32_APIC_BASE.EXTD did not stick after wrmsr\n"
    ))?;
    g.exit_with(EXIT_FAIL)?;
    g.mark(&mut extd_ok)?;
    g.asm().or(dword_ptr(feat), FEATURE_X2APIC_ON)?;
    g.asm().mov(ecx, apic::x2apic_msr(LAPIC_SVR))?;
    g.asm().rdmsr()?;
    g.asm().and(eax, !0x1ffu32)?;
    g.asm().or(eax, 0x100u32 | u32::from(SPURIOUS_VECTOR))?;
    g.asm().wrmsr()?;
    g.asm().mov(ecx, apic::x2apic_msr(LAPIC_VER))?;
    g.asm().rdmsr()?;
    let slot = g.apic_ver_slot();
    g.asm().mov(dword_ptr(slot), eax)?;
    for (off, value) in LVT_SETUP {
        g.asm().mov(ecx, apic::x2apic_msr(off))?;
        g.asm().mov(eax, value)?;
        g.asm().xor(edx, edx)?;
        g.asm().wrmsr()?;
    }
    Ok(())
}

/// Prints the `APIC` line (base MSR, version, LVTs, SVR), reading the
/// registers the way [`emit_apic_setup`] programmed them. Clobbers EAX, EBX,
/// ECX, EDX.
pub(super) fn emit_apic_line(g: &mut impl Emitter, x2apic: bool) -> R {
    let (puthex, putnl) = (g.puthex(), g.putnl());
    g.text(&format!("{PREFIX}APIC base="))?;
    g.asm().mov(ecx, MSR_APIC_BASE)?;
    g.asm().rdmsr()?;
    g.asm().call(puthex)?;
    g.text(" ver=")?;
    let slot = g.apic_ver_slot();
    g.asm().mov(eax, dword_ptr(slot))?;
    g.asm().call(puthex)?;
    g.asm().mov(ebx, LAPIC_VIRT)?;
    for (key, off) in APIC_LINE {
        g.text(&format!(" {key}="))?;
        if x2apic {
            g.asm().mov(ecx, apic::x2apic_msr(off))?;
            g.asm().rdmsr()?;
        } else {
            let reg = g.lapic(off);
            g.asm().mov(eax, reg)?;
        }
        g.asm().call(puthex)?;
    }
    g.asm().call(putnl)?;
    Ok(())
}

/// The pieces of a kernel image.
pub(super) struct ImageParts<'t> {
    /// The boot stub (at [`STUB_ADDR`]).
    pub stub: Vec<u8>,
    /// The FS page (at [`FS_PAGE_PHYS`]).
    pub fs_page: Vec<u8>,
    /// The host page tables (at [`TABLES_BASE`]).
    pub tables: &'t [u8],
    /// Where the data area starts.
    pub data_base: u32,
    /// The data area.
    pub data: Vec<u8>,
    /// Where the code starts.
    pub code_base: u32,
    /// The code.
    pub code: Vec<u8>,
    /// The caller's blobs: name, physical address, bytes.
    pub blobs: Vec<(String, u32, Vec<u8>)>,
}

/// Places the kernel's parts (plus the magic page) and the caller's blobs;
/// returns the image and its physical layout, sorted by address.
pub(super) fn build_image(p: ImageParts<'_>) -> R<(Vec<u8>, Vec<LayoutRegion>)> {
    let mut magic = vec![0u8; PAGE as usize];
    magic[..4].copy_from_slice(&MAGIC_VALUE.to_le_bytes());
    let len = |b: &[u8]| u32::try_from(b.len()).unwrap_or(u32::MAX);
    let region = |name: &str, start: u32, end: u32| LayoutRegion {
        name: name.to_owned(),
        start,
        end,
    };
    let mut layout = vec![
        region("multiboot header", crate::image::LOAD_ADDR, STUB_ADDR),
        region("boot stub", STUB_ADDR, STUB_ADDR + len(&p.stub)),
        region("magic page", MAGIC_PAGE_PHYS, MAGIC_PAGE_PHYS + PAGE),
        region("FS page", FS_PAGE_PHYS, FS_PAGE_PHYS + PAGE),
        region("host page tables", TABLES_BASE, TABLES_BASE + len(p.tables)),
        region("kernel data", p.data_base, p.data_base + len(&p.data)),
        region("kernel code", p.code_base, p.code_base + len(&p.code)),
    ];
    let mut img = ImageBuilder::new();
    img.place("boot stub", STUB_ADDR, p.stub)?;
    img.place("magic page", MAGIC_PAGE_PHYS, magic)?;
    img.place("FS page", FS_PAGE_PHYS, p.fs_page)?;
    img.place("host page tables", TABLES_BASE, p.tables.to_vec())?;
    img.place("kernel data", p.data_base, p.data)?;
    img.place("kernel code", p.code_base, p.code)?;
    for (name, phys, bytes) in p.blobs {
        let end = phys.saturating_add(len(&bytes));
        img.place(name.clone(), phys, bytes)?;
        layout.push(region(&name, phys, end));
    }
    layout.sort_by_key(|r| r.start);
    Ok((img.build(STUB_ADDR)?, layout))
}
