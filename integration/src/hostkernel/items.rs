//! The snapshot table: what the host kernel records before and after every
//! call, as data that generates the recording code.

use std::fmt;
use std::sync::Arc;

use iced_x86::code_asm::{eax, ecx, CodeAssembler};
use iced_x86::IcedError;

use super::{
    LAPIC_VIRT, MAGIC_VIRT, MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_SFMASK,
    MSR_STAR,
};

/// A segment register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Seg {
    /// CS.
    Cs,
    /// DS.
    Ds,
    /// ES.
    Es,
    /// FS.
    Fs,
    /// GS.
    Gs,
    /// SS.
    Ss,
}

/// Emits code leaving a custom snapshot value in EAX (RAX for a
/// [`SnapSource64::Custom`]); may use ECX and EDX (RCX, RDX); must not touch
/// EDI/RDI, ESP/RSP or the stack.
pub type CustomSource = Arc<dyn Fn(&mut CodeAssembler) -> Result<(), IcedError> + Send + Sync>;

/// Where a snapshot item's 32-bit value comes from.
#[derive(Clone)]
pub enum SnapSource {
    /// EBX at the call site.
    Ebx,
    /// ESI at the call site.
    Esi,
    /// EDI at the call site.
    Edi,
    /// EBP at the call site.
    Ebp,
    /// ESP at the call site (before the arguments are pushed).
    Esp,
    /// EFLAGS at the call site.
    Eflags,
    /// A segment selector.
    Seg(Seg),
    /// GDTR base (`sgdt`).
    GdtrBase,
    /// GDTR limit.
    GdtrLimit,
    /// IDTR base (`sidt`).
    IdtrBase,
    /// IDTR limit.
    IdtrLimit,
    /// LDTR selector (`sldt`).
    Ldtr,
    /// TR selector (`str`).
    Tr,
    /// The second dword of the host TSS descriptor in the GDT (type/busy bit).
    TssDescriptorHigh,
    /// A control register (0, 2, 3 or 4).
    Cr(u8),
    /// A debug register (0–3, 6 or 7).
    Dr(u8),
    /// Low or high half of an MSR. EFER, SYSENTER_CS and APIC_BASE read as 0
    /// when CPUID says the CPU lacks them.
    Msr {
        /// MSR index.
        index: u32,
        /// `true` for EDX, `false` for EAX.
        high: bool,
    },
    /// The dword at a host-virtual address.
    Mem(u32),
    /// The dword at FS:`offset`, read only while FS holds the host's LDT
    /// selector (otherwise `0xFFFF_FFFF`, so a wrong FS shows as a mismatch
    /// instead of a fault).
    FsDword(u32),
    /// Custom code.
    Custom(CustomSource),
}

impl fmt::Debug for SnapSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapSource::Ebx => f.write_str("Ebx"),
            SnapSource::Esi => f.write_str("Esi"),
            SnapSource::Edi => f.write_str("Edi"),
            SnapSource::Ebp => f.write_str("Ebp"),
            SnapSource::Esp => f.write_str("Esp"),
            SnapSource::Eflags => f.write_str("Eflags"),
            SnapSource::Seg(s) => write!(f, "Seg({s:?})"),
            SnapSource::GdtrBase => f.write_str("GdtrBase"),
            SnapSource::GdtrLimit => f.write_str("GdtrLimit"),
            SnapSource::IdtrBase => f.write_str("IdtrBase"),
            SnapSource::IdtrLimit => f.write_str("IdtrLimit"),
            SnapSource::Ldtr => f.write_str("Ldtr"),
            SnapSource::Tr => f.write_str("Tr"),
            SnapSource::TssDescriptorHigh => f.write_str("TssDescriptorHigh"),
            SnapSource::Cr(n) => write!(f, "Cr({n})"),
            SnapSource::Dr(n) => write!(f, "Dr({n})"),
            SnapSource::Msr { index, high } => write!(f, "Msr({index:#x}, high={high})"),
            SnapSource::Mem(a) => write!(f, "Mem({a:#010x})"),
            SnapSource::FsDword(o) => write!(f, "FsDword({o:#x})"),
            SnapSource::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// EFLAGS bits a cdecl callee may change: CF, PF, AF, ZF, SF, OF.
pub const EFLAGS_STATUS_BITS: u32 = 0x8d5;

/// One named snapshot item.
#[derive(Clone, Debug)]
pub struct SnapItem {
    /// Name printed in `MISMATCH` lines (one token: no spaces or `=`).
    pub name: String,
    /// Where the value comes from.
    pub source: SnapSource,
    /// Bits compared (a skipped item keeps its index with mask 0).
    pub mask: u32,
}

impl SnapItem {
    /// An item compared on all 32 bits.
    pub fn new(name: &str, source: SnapSource) -> Self {
        Self {
            name: name.to_owned(),
            source,
            mask: u32::MAX,
        }
    }

    /// The same item with another compare mask.
    pub fn with_mask(mut self, mask: u32) -> Self {
        self.mask = mask;
        self
    }
}

/// The default snapshot table of the 32-bit kernels, in index order. Every
/// index is stable: a skipped item keeps its place with a zero mask.
///
/// EFLAGS is compared on every bit except the six status flags
/// ([`EFLAGS_STATUS_BITS`]), which cdecl does not preserve.
pub fn default_items() -> Vec<SnapItem> {
    default_items_for(false)
}

/// The local APIC registers the snapshots record: name and xAPIC offset.
pub const APIC_ITEMS: [(&str, u32); 5] = [
    ("lvt_lint0", apic::reg::LVT_LINT0),
    ("lvt_lint1", apic::reg::LVT_LINT1),
    ("lvt_perf", apic::reg::LVT_PC),
    ("lvt_therm", apic::reg::LVT_THMR),
    ("apic_svr", apic::reg::SVR),
];

/// [`default_items`] for a kernel whose local APIC is in x2APIC mode
/// (`x2apic` true): the LVTs and the SVR are read through their x2APIC MSRs
/// (`0x800 + (offset >> 4)`) instead of the MMIO page. Same names, same indexes.
pub fn default_items_x2apic() -> Vec<SnapItem> {
    default_items_for(true)
}

fn default_items_for(x2apic: bool) -> Vec<SnapItem> {
    let mut items = default_items_xapic();
    for (name, off) in APIC_ITEMS {
        if let Some(it) = items.iter_mut().find(|it| it.name == name) {
            it.source = if x2apic {
                SnapSource::Msr {
                    index: apic::x2apic_msr(off),
                    high: false,
                }
            } else {
                SnapSource::Mem(LAPIC_VIRT + off)
            };
        }
    }
    items
}

fn default_items_xapic() -> Vec<SnapItem> {
    use cpum::regs::{MSR_EFER, MSR_SYSENTER_CS};
    use SnapSource as S;
    vec![
        SnapItem::new("ebx", S::Ebx),
        SnapItem::new("esi", S::Esi),
        SnapItem::new("edi", S::Edi),
        SnapItem::new("ebp", S::Ebp),
        SnapItem::new("esp", S::Esp),
        SnapItem::new("eflags", S::Eflags).with_mask(!EFLAGS_STATUS_BITS),
        SnapItem::new("cs", S::Seg(Seg::Cs)),
        SnapItem::new("ds", S::Seg(Seg::Ds)),
        SnapItem::new("es", S::Seg(Seg::Es)),
        SnapItem::new("fs", S::Seg(Seg::Fs)),
        SnapItem::new("gs", S::Seg(Seg::Gs)),
        SnapItem::new("ss", S::Seg(Seg::Ss)),
        SnapItem::new("gdtr_base", S::GdtrBase),
        SnapItem::new("gdtr_limit", S::GdtrLimit),
        SnapItem::new("idtr_base", S::IdtrBase),
        SnapItem::new("idtr_limit", S::IdtrLimit),
        SnapItem::new("ldtr", S::Ldtr),
        SnapItem::new("tr", S::Tr),
        SnapItem::new("tss_desc_hi", S::TssDescriptorHigh),
        SnapItem::new("cr0", S::Cr(0)),
        SnapItem::new("cr3", S::Cr(3)),
        SnapItem::new("cr4", S::Cr(4)),
        SnapItem::new(
            "efer_lo",
            S::Msr {
                index: MSR_EFER,
                high: false,
            },
        ),
        SnapItem::new(
            "efer_hi",
            S::Msr {
                index: MSR_EFER,
                high: true,
            },
        ),
        SnapItem::new(
            "sysenter_cs",
            S::Msr {
                index: MSR_SYSENTER_CS,
                high: false,
            },
        ),
        SnapItem::new("lvt_lint0", S::Mem(LAPIC_VIRT + apic::reg::LVT_LINT0)),
        SnapItem::new("lvt_lint1", S::Mem(LAPIC_VIRT + apic::reg::LVT_LINT1)),
        SnapItem::new("lvt_perf", S::Mem(LAPIC_VIRT + apic::reg::LVT_PC)),
        SnapItem::new("lvt_therm", S::Mem(LAPIC_VIRT + apic::reg::LVT_THMR)),
        SnapItem::new("apic_svr", S::Mem(LAPIC_VIRT + apic::reg::SVR)),
        SnapItem::new(
            "apic_base_msr",
            S::Msr {
                index: apic::APIC_BASE_MSR,
                high: false,
            },
        ),
        SnapItem::new("fs0", S::FsDword(0)),
        SnapItem::new("magic", S::Mem(MAGIC_VIRT)),
        SnapItem::new("dr7", S::Dr(7)),
    ]
}

/// Where a 64-bit snapshot item's value comes from ([`HostMode::Amd64`]
/// kernel; every value is a qword).
///
/// [`HostMode::Amd64`]: crate::paging::HostMode::Amd64
#[derive(Clone)]
pub enum SnapSource64 {
    /// RBX at the call site.
    Rbx,
    /// RBP at the call site.
    Rbp,
    /// R12 at the call site.
    R12,
    /// R13 at the call site.
    R13,
    /// R14 at the call site.
    R14,
    /// R15 at the call site.
    R15,
    /// RSP at the call site (16-byte aligned).
    Rsp,
    /// RFLAGS at the call site.
    Rflags,
    /// A segment selector.
    Seg(Seg),
    /// GDTR base (`sgdt`, 64 bits).
    GdtrBase,
    /// GDTR limit.
    GdtrLimit,
    /// IDTR base (`sidt`, 64 bits).
    IdtrBase,
    /// IDTR limit.
    IdtrLimit,
    /// LDTR selector (`sldt`).
    Ldtr,
    /// TR selector (`str`).
    Tr,
    /// The host TSS descriptor in the GDT: the low qword (limit, base 31:0,
    /// type with the busy bit 41) or, with `high`, the high qword (base 63:32).
    TssDescriptor {
        /// The high qword instead of the low one.
        high: bool,
    },
    /// A control register (0, 2, 3, 4 or 8).
    Cr(u8),
    /// A debug register (0–3, 6 or 7).
    Dr(u8),
    /// A whole MSR (EDX:EAX). SYSENTER_CS reads as 0 when CPUID says the CPU
    /// lacks SYSENTER.
    Msr(u32),
    /// The dword at a host-virtual address, zero-extended (one 32-bit
    /// access: safe for MMIO).
    Mem32(u64),
    /// The qword at a host-virtual address.
    Mem64(u64),
    /// The dword at FS:`offset`, read only while FS.base holds the host's
    /// [`FS_BASE64`](super::FS_BASE64) (otherwise all ones, so a lost base
    /// shows as a mismatch instead of a fault).
    FsDword(u32),
    /// The dword at GS:`offset`, read only while GS.base holds
    /// [`GS_BASE64`](super::GS_BASE64).
    GsDword(u32),
    /// Custom code leaving the value in RAX.
    Custom(CustomSource),
}

impl fmt::Debug for SnapSource64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use SnapSource64 as S;
        match self {
            S::Rbx => f.write_str("Rbx"),
            S::Rbp => f.write_str("Rbp"),
            S::R12 => f.write_str("R12"),
            S::R13 => f.write_str("R13"),
            S::R14 => f.write_str("R14"),
            S::R15 => f.write_str("R15"),
            S::Rsp => f.write_str("Rsp"),
            S::Rflags => f.write_str("Rflags"),
            S::Seg(s) => write!(f, "Seg({s:?})"),
            S::GdtrBase => f.write_str("GdtrBase"),
            S::GdtrLimit => f.write_str("GdtrLimit"),
            S::IdtrBase => f.write_str("IdtrBase"),
            S::IdtrLimit => f.write_str("IdtrLimit"),
            S::Ldtr => f.write_str("Ldtr"),
            S::Tr => f.write_str("Tr"),
            S::TssDescriptor { high } => write!(f, "TssDescriptor(high={high})"),
            S::Cr(n) => write!(f, "Cr({n})"),
            S::Dr(n) => write!(f, "Dr({n})"),
            S::Msr(i) => write!(f, "Msr({i:#x})"),
            S::Mem32(a) => write!(f, "Mem32({a:#x})"),
            S::Mem64(a) => write!(f, "Mem64({a:#x})"),
            S::FsDword(o) => write!(f, "FsDword({o:#x})"),
            S::GsDword(o) => write!(f, "GsDword({o:#x})"),
            S::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// One named 64-bit snapshot item ([`HostMode::Amd64`] kernel).
///
/// [`HostMode::Amd64`]: crate::paging::HostMode::Amd64
#[derive(Clone, Debug)]
pub struct SnapItem64 {
    /// Name printed in `MISMATCH` lines (one token: no spaces or `=`).
    pub name: String,
    /// Where the value comes from.
    pub source: SnapSource64,
    /// Bits compared (a skipped item keeps its index with mask 0).
    pub mask: u64,
}

impl SnapItem64 {
    /// An item compared on all 64 bits.
    pub fn new(name: &str, source: SnapSource64) -> Self {
        Self {
            name: name.to_owned(),
            source,
            mask: u64::MAX,
        }
    }

    /// The same item with another compare mask.
    pub fn with_mask(mut self, mask: u64) -> Self {
        self.mask = mask;
        self
    }
}

/// The default snapshot table of the AMD64 host kernel, in index order:
/// the System V callee-saved registers (RBX, RBP, R12–R15), RSP, RFLAGS
/// (without the status flags), the six selectors, FS.base, GS.base,
/// KERNEL_GS_BASE, GDTR, IDTR, LDTR, TR and the TSS descriptor (busy bit),
/// CR0/CR3/CR4/CR8, EFER, SYSENTER_CS, STAR, LSTAR, SFMASK, the LVTs and SVR
/// (MMIO, or the x2APIC MSRs when `x2apic`), the APIC base MSR, `fs:0`,
/// `gs:0`, the magic page and DR7.
pub fn default_items64(x2apic: bool) -> Vec<SnapItem64> {
    use cpum::regs::{MSR_EFER, MSR_SYSENTER_CS};
    use SnapSource64 as S;
    let mut items = vec![
        SnapItem64::new("rbx", S::Rbx),
        SnapItem64::new("rbp", S::Rbp),
        SnapItem64::new("r12", S::R12),
        SnapItem64::new("r13", S::R13),
        SnapItem64::new("r14", S::R14),
        SnapItem64::new("r15", S::R15),
        SnapItem64::new("rsp", S::Rsp),
        SnapItem64::new("rflags", S::Rflags).with_mask(!u64::from(EFLAGS_STATUS_BITS)),
        SnapItem64::new("cs", S::Seg(Seg::Cs)),
        SnapItem64::new("ds", S::Seg(Seg::Ds)),
        SnapItem64::new("es", S::Seg(Seg::Es)),
        SnapItem64::new("fs", S::Seg(Seg::Fs)),
        SnapItem64::new("gs", S::Seg(Seg::Gs)),
        SnapItem64::new("ss", S::Seg(Seg::Ss)),
        SnapItem64::new("fs_base", S::Msr(MSR_FS_BASE)),
        SnapItem64::new("gs_base", S::Msr(MSR_GS_BASE)),
        SnapItem64::new("kernel_gs_base", S::Msr(MSR_KERNEL_GS_BASE)),
        SnapItem64::new("gdtr_base", S::GdtrBase),
        SnapItem64::new("gdtr_limit", S::GdtrLimit),
        SnapItem64::new("idtr_base", S::IdtrBase),
        SnapItem64::new("idtr_limit", S::IdtrLimit),
        SnapItem64::new("ldtr", S::Ldtr),
        SnapItem64::new("tr", S::Tr),
        SnapItem64::new("tss_desc", S::TssDescriptor { high: false }),
        SnapItem64::new("tss_desc_hi", S::TssDescriptor { high: true }),
        SnapItem64::new("cr0", S::Cr(0)),
        SnapItem64::new("cr3", S::Cr(3)),
        SnapItem64::new("cr4", S::Cr(4)),
        SnapItem64::new("cr8", S::Cr(8)),
        SnapItem64::new("efer", S::Msr(MSR_EFER)),
        SnapItem64::new("sysenter_cs", S::Msr(MSR_SYSENTER_CS)),
        SnapItem64::new("star", S::Msr(MSR_STAR)),
        SnapItem64::new("lstar", S::Msr(MSR_LSTAR)),
        SnapItem64::new("sfmask", S::Msr(MSR_SFMASK)),
    ];
    for (name, off) in APIC_ITEMS {
        let source = if x2apic {
            S::Msr(apic::x2apic_msr(off))
        } else {
            S::Mem32(u64::from(LAPIC_VIRT + off))
        };
        items.push(SnapItem64::new(name, source));
    }
    items.extend([
        SnapItem64::new("apic_base_msr", S::Msr(apic::APIC_BASE_MSR)),
        SnapItem64::new("fs0", S::FsDword(0)),
        SnapItem64::new("gs0", S::GsDword(0)),
        SnapItem64::new("magic", S::Mem32(u64::from(MAGIC_VIRT))),
        SnapItem64::new("dr7", S::Dr(7)),
    ]);
    items
}

/// The `pkru` item: PKRU read with RDPKRU (only with CR4.PKE set, as
/// [`HostKernelBuilder::cr4_today`](super::HostKernelBuilder::cr4_today)
/// has it).
pub fn pkru_item() -> SnapItem64 {
    let read: CustomSource = Arc::new(|a: &mut CodeAssembler| {
        a.xor(ecx, ecx)?;
        a.rdpkru()?;
        a.mov(eax, eax)
    });
    SnapItem64::new("pkru", SnapSource64::Custom(read))
}

/// `true` if `name` can appear as one token on the serial line.
pub(crate) fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'=' && b != b'@')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_unique_tokens() {
        let items = default_items();
        for (i, it) in items.iter().enumerate() {
            assert!(is_token(&it.name), "{}", it.name);
            assert!(
                items[..i].iter().all(|o| o.name != it.name),
                "duplicate {}",
                it.name
            );
        }
        assert_eq!(items[0].name, "ebx");
        assert_eq!(items[3].name, "ebp");
        for items in [default_items64(false), default_items64(true)] {
            for (i, it) in items.iter().enumerate() {
                assert!(is_token(&it.name), "{}", it.name);
                assert!(items[..i].iter().all(|o| o.name != it.name), "{}", it.name);
            }
        }
    }

    #[test]
    fn x2apic_items_read_the_msrs_at_the_same_indexes() {
        let x = default_items_x2apic();
        let m = default_items();
        assert_eq!(x.len(), m.len());
        let lint0 = x.iter().position(|i| i.name == "lvt_lint0").unwrap();
        assert_eq!(m[lint0].name, "lvt_lint0");
        assert!(matches!(
            x[lint0].source,
            SnapSource::Msr {
                index: 0x835,
                high: false
            }
        ));
        let svr = x.iter().find(|i| i.name == "apic_svr").unwrap();
        assert!(matches!(svr.source, SnapSource::Msr { index: 0x80f, .. }));
        let therm = default_items64(true)
            .into_iter()
            .find(|i| i.name == "lvt_therm")
            .unwrap();
        assert!(matches!(therm.source, SnapSource64::Msr(0x833)));
    }
}
