//! The snapshot table: what the host kernel records before and after every
//! call, as data that generates the recording code.

use std::fmt;
use std::sync::Arc;

use iced_x86::code_asm::CodeAssembler;
use iced_x86::IcedError;

use super::{
    LAPIC_LVT_LINT0, LAPIC_LVT_LINT1, LAPIC_LVT_PERF, LAPIC_LVT_THERM, LAPIC_SVR, LAPIC_VIRT,
    MAGIC_VIRT,
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

/// Emits code leaving a custom snapshot value in EAX (may use ECX and EDX;
/// must not touch EDI, ESP or the stack).
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

/// The default snapshot table, in index order. Every index is stable: a
/// skipped item keeps its place with a zero mask.
///
/// EFLAGS is compared on every bit except the six status flags
/// ([`EFLAGS_STATUS_BITS`]), which cdecl does not preserve.
pub fn default_items() -> Vec<SnapItem> {
    use cpum::regs::{MSR_APIC_BASE, MSR_EFER, MSR_SYSENTER_CS};
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
        SnapItem::new("lvt_lint0", S::Mem(LAPIC_VIRT + LAPIC_LVT_LINT0)),
        SnapItem::new("lvt_lint1", S::Mem(LAPIC_VIRT + LAPIC_LVT_LINT1)),
        SnapItem::new("lvt_perf", S::Mem(LAPIC_VIRT + LAPIC_LVT_PERF)),
        SnapItem::new("lvt_therm", S::Mem(LAPIC_VIRT + LAPIC_LVT_THERM)),
        SnapItem::new("apic_svr", S::Mem(LAPIC_VIRT + LAPIC_SVR)),
        SnapItem::new(
            "apic_base_msr",
            S::Msr {
                index: MSR_APIC_BASE,
                high: false,
            },
        ),
        SnapItem::new("fs0", S::FsDword(0)),
        SnapItem::new("magic", S::Mem(MAGIC_VIRT)),
        SnapItem::new("dr7", S::Dr(7)),
    ]
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
    }
}
