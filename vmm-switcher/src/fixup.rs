//! Fixup records: the VirtualBox-compatible byte stream that tells the
//! relocator which bytes of a switcher to patch and with what.
//!
//! A record is `u8 kind`, `u32 offSrc` (the byte offset of the field inside the
//! code), then zero or one `u32` operand, all little-endian and unaligned. The
//! stream ends with a single [`FixupKind::TheEnd`] byte (255).

use alloc::vec::Vec;

use serde::Serialize;
use thiserror::Error;

macro_rules! fixup_kinds {
    ($($(#[$m:meta])* $name:ident = $val:literal, $vbox:literal, $ops:literal;)*) => {
        /// Every fixup code VirtualBox defines (`FIX_*`), with its numeric value.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        pub enum FixupKind {
            $($(#[$m])* $name = $val,)*
        }

        impl FixupKind {
            /// All kinds, in numeric order (the terminator last).
            pub const ALL: &'static [FixupKind] = &[$(FixupKind::$name),*];

            /// The kind with numeric value `v`.
            pub fn from_u8(v: u8) -> Option<Self> {
                match v {
                    $($val => Some(FixupKind::$name),)*
                    _ => None,
                }
            }

            /// VirtualBox's name for the code.
            pub const fn vbox_name(self) -> &'static str {
                match self {
                    $(FixupKind::$name => $vbox,)*
                }
            }

            /// How many `u32` operands follow `offSrc` in the stream.
            pub const fn operand_count(self) -> usize {
                match self {
                    $(FixupKind::$name => $ops,)*
                }
            }
        }
    };
}

fixup_kinds! {
    /// rel32 from HC code to GC code (unused by the templates).
    Hc2GcNearRel = 1, "FIX_HC_2_GC_NEAR_REL", 1;
    /// rel32 from HC code to ID code.
    Hc2IdNearRel = 2, "FIX_HC_2_ID_NEAR_REL", 1;
    /// rel32 from GC code to HC code.
    Gc2HcNearRel = 3, "FIX_GC_2_HC_NEAR_REL", 1;
    /// rel32 from GC code to ID code.
    Gc2IdNearRel = 4, "FIX_GC_2_ID_NEAR_REL", 1;
    /// rel32 from ID code to HC code.
    Id2HcNearRel = 5, "FIX_ID_2_HC_NEAR_REL", 1;
    /// rel32 from ID code to GC code.
    Id2GcNearRel = 6, "FIX_ID_2_GC_NEAR_REL", 1;
    /// ptr16:32 far pointer to GC code with the hyper CS.
    GcFar32 = 7, "FIX_GC_FAR32", 1;
    /// RC address of CPUM + operand.
    GcCpumOff = 8, "FIX_GC_CPUM_OFF", 1;
    /// RC address of the VM + operand.
    GcVmOff = 9, "FIX_GC_VM_OFF", 1;
    /// HC address of CPUM + operand (32-bit).
    HcCpumOff = 10, "FIX_HC_CPUM_OFF", 1;
    /// HC address of the VM + operand (32-bit).
    HcVmOff = 11, "FIX_HC_VM_OFF", 1;
    /// Physical address of the intermediate 32-bit page directory.
    Inter32BitCr3 = 12, "FIX_INTER_32BIT_CR3", 0;
    /// Physical address of the intermediate PAE PDPT.
    InterPaeCr3 = 13, "FIX_INTER_PAE_CR3", 0;
    /// Physical address of the intermediate PML4.
    InterAmd64Cr3 = 14, "FIX_INTER_AMD64_CR3", 0;
    /// Shadow 32-bit CR3 (VirtualBox 2.1 only).
    Hyper32BitCr3 = 15, "FIX_HYPER_32BIT_CR3", 0;
    /// Shadow PAE CR3 (VirtualBox 2.1 only).
    HyperPaeCr3 = 16, "FIX_HYPER_PAE_CR3", 0;
    /// Shadow AMD64 CR3 (VirtualBox 2.1 only).
    HyperAmd64Cr3 = 17, "FIX_HYPER_AMD64_CR3", 0;
    /// Hypervisor code selector (u16).
    HyperCs = 18, "FIX_HYPER_CS", 0;
    /// Hypervisor data selector (u16).
    HyperDs = 19, "FIX_HYPER_DS", 0;
    /// Hypervisor TSS selector (u16).
    HyperTss = 20, "FIX_HYPER_TSS", 0;
    /// RC address of the hyper TSS descriptor's second dword.
    GcTssGdteDw2 = 21, "FIX_GC_TSS_GDTE_DW2", 0;
    /// Never implemented by VirtualBox.
    Cr4Mask = 22, "FIX_CR4_MASK", 0;
    /// Never implemented by VirtualBox.
    Cr4Osfsxr = 23, "FIX_CR4_OSFSXR", 0;
    /// `jmp rel32` to the operand if the CPU lacks FXSAVE; else original bytes.
    NoFxsaveJmp = 24, "FIX_NO_FXSAVE_JMP", 1;
    /// `jmp rel32` to the operand if the host does not use SYSENTER.
    NoSysenterJmp = 25, "FIX_NO_SYSENTER_JMP", 1;
    /// `jmp rel32` to the operand if the host does not use SYSCALL.
    NoSyscallJmp = 26, "FIX_NO_SYSCALL_JMP", 1;
    /// HC address of a code offset (u32).
    Hc32Bit = 27, "FIX_HC_32BIT", 1;
    /// HC address of a code offset (u64).
    Hc64Bit = 28, "FIX_HC_64BIT", 1;
    /// HC address of CPUM (u64).
    Hc64BitCpum = 29, "FIX_HC_64BIT_CPUM", 0;
    /// 64-bit host code selector (Darwin hybrid kernels only).
    Hc64BitCs = 30, "FIX_HC_64BIT_CS", 0;
    /// ID address of a code offset (u32).
    Id32Bit = 31, "FIX_ID_32BIT", 1;
    /// ID address of a code offset (u64).
    Id64Bit = 32, "FIX_ID_64BIT", 1;
    /// ptr16:32 far pointer to ID code with the 64-bit hyper CS.
    IdFar32To64BitMode = 33, "FIX_ID_FAR32_TO_64BIT_MODE", 1;
    /// RC address of the APIC page (u32).
    GcApicBase32Bit = 34, "FIX_GC_APIC_BASE_32BIT", 0;
    /// u64 identity address of a code offset (the name says HC; VirtualBox writes ID).
    Hc64BitNoCheck = 35, "FIX_HC_64BIT_NOCHECK", 1;
    /// RC address of CPUM + operand, zero-extended to u64.
    Gc64BitCpumOff = 36, "FIX_GC_64_BIT_CPUM_OFF", 1;
    /// RC address of VCPU 0's CPUMCPU + operand.
    GcCpumCpuOff = 37, "FIX_GC_CPUMCPU_OFF", 1;
    /// The EFER bits to set for long mode (LME, SCE, NXE when available).
    EferOrMask = 38, "FIX_EFER_OR_MASK", 0;
    /// Physical address of the intermediate PML5 (5-level paging), for
    /// AMD64 hosts running with CR4.LA57. Not a VirtualBox code.
    InterLa57Cr3 = 39, "FIX_INTER_LA57_CR3", 0;
    /// Stream terminator.
    TheEnd = 255, "FIX_THE_END", 0;
}

/// One fixup record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FixupRecord {
    /// What to write.
    pub kind: FixupKind,
    /// Byte offset of the field in the code (`offSrc`).
    pub off: u32,
    /// The operand, for kinds that take one (a code offset or a structure offset).
    pub operand: Option<u32>,
}

/// Decoding a fixup stream failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A kind byte that names no fixup code.
    #[error("unknown fixup kind {kind} at stream byte {at}")]
    UnknownKind {
        /// The byte.
        kind: u8,
        /// Its position in the stream.
        at: usize,
    },
    /// The stream ended inside a record.
    #[error("fixup record {kind:?} at stream byte {at} is truncated ({have} of {need} bytes)")]
    Truncated {
        /// The record's kind.
        kind: FixupKind,
        /// Where the record starts.
        at: usize,
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A record's field offset lies outside the code.
    #[error("fixup {kind:?} at stream byte {at}: offset {off:#x} is outside the {code_len:#x}-byte code")]
    OffsetOutsideCode {
        /// The record's kind.
        kind: FixupKind,
        /// Where the record starts.
        at: usize,
        /// The offending offset.
        off: u32,
        /// Size of the code.
        code_len: usize,
    },
    /// The stream has no terminator.
    #[error("fixup stream of {len} bytes has no FIX_THE_END terminator")]
    MissingTerminator {
        /// Stream length.
        len: usize,
    },
    /// Bytes follow the terminator.
    #[error("{extra} bytes follow FIX_THE_END at stream byte {at}")]
    TrailingBytes {
        /// Position of the terminator.
        at: usize,
        /// How many bytes follow it.
        extra: usize,
    },
}

/// Encoding a record list failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The record's operand presence does not match its kind.
    #[error("fixup {kind:?} at offset {off:#x} takes {need} operand(s) but has {have}")]
    OperandMismatch {
        /// The record's kind.
        kind: FixupKind,
        /// Its field offset.
        off: u32,
        /// Operands the kind takes.
        need: usize,
        /// Operands given.
        have: usize,
    },
    /// The terminator cannot appear as a record.
    #[error("FIX_THE_END cannot be encoded as a record (at offset {off:#x})")]
    TerminatorAsRecord {
        /// Its field offset.
        off: u32,
    },
}

/// Encodes `records` as a VirtualBox fixup stream, terminator included.
///
/// # Errors
/// [`EncodeError`] when a record's operand does not match its kind.
pub fn encode(records: &[FixupRecord]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(records.len() * 9 + 1);
    for r in records {
        if r.kind == FixupKind::TheEnd {
            return Err(EncodeError::TerminatorAsRecord { off: r.off });
        }
        let have = usize::from(r.operand.is_some());
        if have != r.kind.operand_count() {
            return Err(EncodeError::OperandMismatch {
                kind: r.kind,
                off: r.off,
                need: r.kind.operand_count(),
                have,
            });
        }
        out.push(r.kind as u8);
        out.extend_from_slice(&r.off.to_le_bytes());
        if let Some(op) = r.operand {
            out.extend_from_slice(&op.to_le_bytes());
        }
    }
    out.push(FixupKind::TheEnd as u8);
    Ok(out)
}

/// Decodes a fixup stream for code of `code_len` bytes. Never panics.
///
/// # Errors
/// [`DecodeError`] for unknown kinds, truncated records, offsets outside the
/// code, a missing terminator or bytes after it.
pub fn decode(stream: &[u8], code_len: usize) -> Result<Vec<FixupRecord>, DecodeError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    loop {
        let Some(&kind_byte) = stream.get(at) else {
            return Err(DecodeError::MissingTerminator { len: stream.len() });
        };
        let kind = FixupKind::from_u8(kind_byte).ok_or(DecodeError::UnknownKind {
            kind: kind_byte,
            at,
        })?;
        if kind == FixupKind::TheEnd {
            let extra = stream.len() - at - 1;
            if extra != 0 {
                return Err(DecodeError::TrailingBytes { at, extra });
            }
            return Ok(out);
        }
        let need = 1 + 4 * (1 + kind.operand_count());
        let rec = stream.get(at..at + need).ok_or(DecodeError::Truncated {
            kind,
            at,
            have: stream.len() - at,
            need,
        })?;
        let word = |i: usize| u32::from_le_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
        let off = word(1);
        if off as usize >= code_len {
            return Err(DecodeError::OffsetOutsideCode {
                kind,
                at,
                off,
                code_len,
            });
        }
        let operand = (kind.operand_count() == 1).then(|| word(5));
        out.push(FixupRecord { kind, off, operand });
        at += need;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_codes_have_vbox_values() {
        assert_eq!(FixupKind::ALL.len(), 40);
        for (i, k) in FixupKind::ALL.iter().take(39).enumerate() {
            assert_eq!(*k as u8 as usize, i + 1, "{k:?}");
            assert_eq!(FixupKind::from_u8(*k as u8), Some(*k));
        }
        assert_eq!(FixupKind::EferOrMask as u8, 38);
        assert_eq!(FixupKind::TheEnd as u8, 255);
        assert_eq!(FixupKind::InterLa57Cr3 as u8, 39);
        assert_eq!(FixupKind::from_u8(40), None);
        assert_eq!(
            FixupKind::IdFar32To64BitMode.vbox_name(),
            "FIX_ID_FAR32_TO_64BIT_MODE"
        );
    }

    #[test]
    fn round_trip() {
        let recs = vec![
            FixupRecord {
                kind: FixupKind::HcVmOff,
                off: 1,
                operand: Some(0x40),
            },
            FixupRecord {
                kind: FixupKind::Inter32BitCr3,
                off: 0x20,
                operand: None,
            },
            FixupRecord {
                kind: FixupKind::IdFar32To64BitMode,
                off: 0x31,
                operand: Some(0x80),
            },
        ];
        let s = encode(&recs).ok();
        assert_eq!(s.as_ref().map(Vec::len), Some(9 + 5 + 9 + 1));
        assert_eq!(s.as_ref().and_then(|s| s.last().copied()), Some(255));
        let back = s.map(|s| decode(&s, 0x100));
        assert_eq!(back, Some(Ok(recs)));
    }

    #[test]
    fn every_error_class() {
        assert_eq!(
            decode(&[], 10),
            Err(DecodeError::MissingTerminator { len: 0 })
        );
        assert_eq!(
            decode(&[200, 255], 10),
            Err(DecodeError::UnknownKind { kind: 200, at: 0 })
        );
        assert!(matches!(
            decode(&[11, 1, 0], 10),
            Err(DecodeError::Truncated {
                need: 9,
                have: 3,
                ..
            })
        ));
        assert!(matches!(
            decode(&[12, 10, 0, 0, 0, 255], 10),
            Err(DecodeError::OffsetOutsideCode {
                off: 10,
                code_len: 10,
                ..
            })
        ));
        assert_eq!(
            decode(&[255, 0], 10),
            Err(DecodeError::TrailingBytes { at: 0, extra: 1 })
        );
        assert!(matches!(
            encode(&[FixupRecord {
                kind: FixupKind::HcVmOff,
                off: 0,
                operand: None
            }]),
            Err(EncodeError::OperandMismatch {
                need: 1,
                have: 0,
                ..
            })
        ));
        assert!(matches!(
            encode(&[FixupRecord {
                kind: FixupKind::TheEnd,
                off: 3,
                operand: None
            }]),
            Err(EncodeError::TerminatorAsRecord { off: 3 })
        ));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64), len in 0usize..512) {
            let _ = decode(&bytes, len);
        }

        #[test]
        fn encode_decode_round_trips(recs in proptest::collection::vec((0usize..38, 0u32..4096, proptest::num::u32::ANY), 0..32)) {
            let recs: Vec<FixupRecord> = recs.into_iter().map(|(k, off, op)| {
                let kind = FixupKind::ALL[k];
                FixupRecord { kind, off, operand: (kind.operand_count() == 1).then_some(op) }
            }).collect();
            let s = encode(&recs);
            proptest::prop_assert!(s.is_ok());
            let back = decode(&s.unwrap_or_default(), 4096);
            proptest::prop_assert_eq!(back, Ok(recs));
        }
    }
}
