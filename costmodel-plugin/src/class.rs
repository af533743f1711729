//! The expensive instruction classes and the decoder that puts an x86
//! instruction into one.
//!
//! QEMU hands the plugin each instruction's bytes and exact length, so the
//! decoder only has to read prefixes, the opcode and (where the class depends
//! on it) the ModRM byte; it never has to find the instruction's end.

/// A class of expensive operation the cost model counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// `mov cr0, r`, `clts`, `lmsw`: every write to CR0 (a serialising
    /// instruction; with a PG or PE change, a mode switch).
    Cr0Write,
    /// `mov cr3, r` (serialising; flushes non-global TLB entries).
    Cr3Write,
    /// `mov cr4, r` (serialising; may flush the whole TLB).
    Cr4Write,
    /// `wrmsr` (serialising for most MSRs).
    Wrmsr,
    /// `rdmsr`.
    Rdmsr,
    /// `lgdt` (serialising).
    Lgdt,
    /// `lidt` (serialising).
    Lidt,
    /// `ltr` (serialising; reads and writes the GDT).
    Ltr,
    /// `lldt` (serialising).
    Lldt,
    /// A far `jmp` or far `call` (`ea`, `9a`, `ff /5`, `ff /3`): loads CS
    /// from a descriptor.
    FarJump,
    /// `retf`.
    FarReturn,
    /// `iret`/`iretd`/`iretq`.
    Iret,
    /// A data or stack segment load: `mov sreg, r/m`, `pop sreg`, `lss`,
    /// `lfs`, `lgs`, `lds`, `les` (a descriptor read and checks).
    SegmentLoad,
    /// `fxsave`/`fxsave64`.
    Fxsave,
    /// `fxrstor`/`fxrstor64`.
    Fxrstor,
    /// `mov drN, r` (serialising).
    DrWrite,
    /// A load from the local APIC's MMIO page (uncached).
    ApicMmioRead,
    /// A store to the local APIC's MMIO page (uncached).
    ApicMmioWrite,
}

/// Number of classes.
pub const N_CLASSES: usize = 18;

impl Class {
    /// Every class, in report order.
    pub const ALL: [Class; N_CLASSES] = [
        Class::Cr0Write,
        Class::Cr3Write,
        Class::Cr4Write,
        Class::Wrmsr,
        Class::Rdmsr,
        Class::Lgdt,
        Class::Lidt,
        Class::Ltr,
        Class::Lldt,
        Class::FarJump,
        Class::FarReturn,
        Class::Iret,
        Class::SegmentLoad,
        Class::Fxsave,
        Class::Fxrstor,
        Class::DrWrite,
        Class::ApicMmioRead,
        Class::ApicMmioWrite,
    ];

    /// The class's name in the report and in JSON (`cr0_write`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Class::Cr0Write => "cr0_write",
            Class::Cr3Write => "cr3_write",
            Class::Cr4Write => "cr4_write",
            Class::Wrmsr => "wrmsr",
            Class::Rdmsr => "rdmsr",
            Class::Lgdt => "lgdt",
            Class::Lidt => "lidt",
            Class::Ltr => "ltr",
            Class::Lldt => "lldt",
            Class::FarJump => "far_jump",
            Class::FarReturn => "far_return",
            Class::Iret => "iret",
            Class::SegmentLoad => "segment_load",
            Class::Fxsave => "fxsave",
            Class::Fxrstor => "fxrstor",
            Class::DrWrite => "dr_write",
            Class::ApicMmioRead => "apic_mmio_read",
            Class::ApicMmioWrite => "apic_mmio_write",
        }
    }

    /// The class named `name`.
    pub fn from_name(name: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Index into a per-class counter array.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The class of the instruction `bytes` (exactly one instruction, as QEMU
/// reports it), or `None` for an instruction the model counts as ordinary.
/// `long` is true for code that runs in 64-bit mode, where 0x40..0x4f are
/// REX prefixes; elsewhere they are one-byte `inc`/`dec`.
pub fn classify(bytes: &[u8], long: Option<bool>) -> Option<Class> {
    let mut i = 0;
    while let Some(&p) = bytes.get(i) {
        match p {
            0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x66 | 0x67 => i += 1,
            _ => break,
        }
    }
    // A 0x40..0x4f byte with more bytes behind it can only be a REX prefix:
    // in 32-bit code `inc`/`dec` are complete in that one byte.
    let rex = match bytes.get(i) {
        Some(&b)
            if b & 0xf0 == 0x40
                && (long == Some(true) || (long.is_none() && bytes.len() > i + 1)) =>
        {
            i += 1;
            b
        }
        _ => 0,
    };
    let op = *bytes.get(i)?;
    let modrm = bytes.get(i + 1).copied();
    if op == 0x0f {
        let op2 = *bytes.get(i + 1)?;
        return classify_0f(op2, bytes.get(i + 2).copied(), rex);
    }
    let reg = modrm.map(|m| (m >> 3) & 7);
    let mem = modrm.is_some_and(|m| m >> 6 != 3);
    match op {
        0x8e => Some(Class::SegmentLoad),
        // pop es/ss/ds: invalid in 64-bit mode, one byte elsewhere.
        0x07 | 0x17 | 0x1f if bytes.len() == i + 1 => Some(Class::SegmentLoad),
        // les/lds exist only outside 64-bit mode and only with a memory operand
        // (with mod = 11 the bytes are a VEX prefix).
        0xc4 | 0xc5 if mem && long != Some(true) => Some(Class::SegmentLoad),
        0xea | 0x9a => Some(Class::FarJump),
        0xff if mem && matches!(reg, Some(3 | 5)) => Some(Class::FarJump),
        0xca | 0xcb => Some(Class::FarReturn),
        0xcf => Some(Class::Iret),
        _ => None,
    }
}

/// The class of a two-byte (`0f xx`) opcode.
fn classify_0f(op2: u8, modrm: Option<u8>, rex: u8) -> Option<Class> {
    let reg = modrm.map(|m| (m >> 3) & 7);
    let mem = modrm.is_some_and(|m| m >> 6 != 3);
    match op2 {
        0x22 => {
            let cr = reg? | if rex & 4 != 0 { 8 } else { 0 };
            match cr {
                0 => Some(Class::Cr0Write),
                3 => Some(Class::Cr3Write),
                4 => Some(Class::Cr4Write),
                _ => None,
            }
        }
        0x06 => Some(Class::Cr0Write), // clts
        0x23 => Some(Class::DrWrite),
        0x30 => Some(Class::Wrmsr),
        0x32 => Some(Class::Rdmsr),
        0xa1 | 0xa9 | 0xb2 | 0xb4 | 0xb5 => Some(Class::SegmentLoad),
        0x01 => match (reg?, mem) {
            (2, true) => Some(Class::Lgdt),
            (3, true) => Some(Class::Lidt),
            (6, _) => Some(Class::Cr0Write), // lmsw
            _ => None,
        },
        0x00 => match reg? {
            2 => Some(Class::Lldt),
            3 => Some(Class::Ltr),
            _ => None,
        },
        0xae if mem => match reg? {
            0 => Some(Class::Fxsave),
            1 => Some(Class::Fxrstor),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(bytes: &[u8]) -> Option<Class> {
        classify(bytes, None)
    }

    #[test]
    fn names_round_trip() {
        for (i, class) in Class::ALL.into_iter().enumerate() {
            assert_eq!(class.index(), i);
            assert_eq!(Class::from_name(class.name()), Some(class));
        }
        assert_eq!(Class::from_name("cr2_write"), None);
    }

    #[test]
    fn control_and_debug_registers() {
        assert_eq!(c(&[0x0f, 0x22, 0xc0]), Some(Class::Cr0Write)); // mov cr0, eax
        assert_eq!(c(&[0x0f, 0x22, 0xd8]), Some(Class::Cr3Write)); // mov cr3, eax
        assert_eq!(c(&[0x0f, 0x22, 0xe0]), Some(Class::Cr4Write)); // mov cr4, eax
        assert_eq!(c(&[0x44, 0x0f, 0x22, 0xc0]), None); // mov cr8, rax
        assert_eq!(c(&[0x0f, 0x20, 0xc0]), None); // mov eax, cr0: a read
        assert_eq!(c(&[0x0f, 0x06]), Some(Class::Cr0Write)); // clts
        assert_eq!(c(&[0x0f, 0x01, 0xf0]), Some(Class::Cr0Write)); // lmsw ax
        assert_eq!(c(&[0x0f, 0x23, 0xc0]), Some(Class::DrWrite)); // mov dr0, eax
        assert_eq!(c(&[0x0f, 0x21, 0xc0]), None); // mov eax, dr0
    }

    #[test]
    fn msrs_tables_and_far_transfers() {
        assert_eq!(c(&[0x0f, 0x30]), Some(Class::Wrmsr));
        assert_eq!(c(&[0x0f, 0x32]), Some(Class::Rdmsr));
        assert_eq!(c(&[0x0f, 0x31]), None); // rdtsc
        assert_eq!(c(&[0x0f, 0x01, 0x10]), Some(Class::Lgdt)); // lgdt [eax]
        assert_eq!(c(&[0x0f, 0x01, 0x18]), Some(Class::Lidt)); // lidt [eax]
        assert_eq!(c(&[0x0f, 0x01, 0x00]), None); // sgdt [eax]
        assert_eq!(c(&[0x0f, 0x00, 0x18]), Some(Class::Ltr)); // ltr [eax]
        assert_eq!(c(&[0x0f, 0x00, 0xd0]), Some(Class::Lldt)); // lldt ax
        assert_eq!(c(&[0x0f, 0x00, 0x08]), None); // str [eax]
        assert_eq!(c(&[0xea, 1, 2, 3, 4, 5, 6]), Some(Class::FarJump));
        assert_eq!(c(&[0xff, 0x2d, 1, 2, 3, 4]), Some(Class::FarJump)); // jmp fword [abs]
        assert_eq!(c(&[0xff, 0xe0]), None); // jmp eax
        assert_eq!(c(&[0x48, 0xcb]), Some(Class::FarReturn)); // retfq
        assert_eq!(c(&[0xcb]), Some(Class::FarReturn));
        assert_eq!(c(&[0x48, 0xcf]), Some(Class::Iret)); // iretq
    }

    #[test]
    fn segments_and_fpu_state() {
        assert_eq!(c(&[0x8e, 0xd8]), Some(Class::SegmentLoad)); // mov ds, ax
        assert_eq!(c(&[0x1f]), Some(Class::SegmentLoad)); // pop ds
        assert_eq!(c(&[0x0f, 0xb2, 0x20]), Some(Class::SegmentLoad)); // lss esp, [eax]
        assert_eq!(c(&[0x0f, 0xa1]), Some(Class::SegmentLoad)); // pop fs
        assert_eq!(c(&[0x8c, 0xd8]), None); // mov ax, ds
        assert_eq!(c(&[0x0f, 0xae, 0x00]), Some(Class::Fxsave)); // fxsave [eax]
        assert_eq!(c(&[0x48, 0x0f, 0xae, 0x08]), Some(Class::Fxrstor)); // fxrstor64 [rax]
        assert_eq!(c(&[0x0f, 0xae, 0xf0]), None); // mfence
        assert_eq!(classify(&[0xc4, 0xe2, 0x79, 0x18, 0x00], Some(true)), None);
        // VEX
    }

    #[test]
    fn rex_versus_inc_dec() {
        assert_eq!(c(&[0x40]), None); // inc eax
        assert_eq!(
            classify(&[0x41, 0x0f, 0x22, 0xc0], Some(true)),
            Some(Class::Cr0Write)
        );
        assert_eq!(c(&[]), None);
        assert_eq!(c(&[0x66]), None);
    }
}
