//! A thin builder over iced-x86's [`CodeAssembler`] for switcher templates.
//!
//! A template is a sequence of *sections*, each assembled by its own
//! `CodeAssembler` at its own bitness, laid out back to back (16-byte aligned,
//! `int3` padding) with offsets relative to the template start. The builder
//! keeps named labels across sections and records a fixup on an instruction:
//! after assembly it decodes that instruction, asks iced where its immediate or
//! displacement lies, checks the placeholder value is there, and stores the
//! record at that exact byte.

use std::collections::BTreeMap;

use iced_x86::code_asm::{CodeAssembler, CodeLabel};
use iced_x86::{BlockEncoderOptions, Decoder, DecoderOptions, IcedError};
use thiserror::Error;

use crate::fixup::{FixupKind, FixupRecord};

/// Which part of the fixed-up instruction the field is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The instruction's immediate operand.
    Imm,
    /// The instruction's memory displacement.
    Disp,
    /// A byte offset inside the instruction (data directives, hand-encoded jumps).
    At(u32),
}

/// A fixup operand, resolved when the template is finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operand {
    /// The kind takes no operand.
    None,
    /// A structure offset or other value.
    Value(u32),
    /// The code offset of a named label.
    Label(&'static str),
}

/// The placeholder each field must hold before relocation, by field width.
pub const PLACEHOLDER_U16: u16 = 0xffff;
/// 32-bit placeholder.
pub const PLACEHOLDER_U32: u32 = 0xffff_ffff;
/// 64-bit placeholder.
pub const PLACEHOLDER_U64: u64 = u64::MAX;

/// Building a template failed. These are programming errors in a template,
/// reported with enough detail to find the instruction.
#[derive(Debug, Error)]
pub enum BuildError {
    /// iced refused an instruction or the assembly.
    #[error("iced-x86: {0}")]
    Iced(#[from] IcedError),
    /// A label name was defined twice.
    #[error("label {0:?} defined twice")]
    DuplicateLabel(&'static str),
    /// A fixup names a label that was never defined.
    #[error("fixup {kind:?} refers to undefined label {label:?}")]
    UndefinedLabel {
        /// The fixup's kind.
        kind: FixupKind,
        /// The missing label.
        label: &'static str,
    },
    /// The fixed-up instruction has no such constant.
    #[error("fixup {kind:?} at template offset {insn_off:#x}: the instruction has no {slot:?}")]
    NoSuchSlot {
        /// The fixup's kind.
        kind: FixupKind,
        /// Offset of the instruction.
        insn_off: u32,
        /// The slot asked for.
        slot: Slot,
    },
    /// The field does not hold the placeholder.
    #[error(
        "fixup {kind:?} at template offset {off:#x}: field holds {found:#x}, not a placeholder"
    )]
    NotAPlaceholder {
        /// The fixup's kind.
        kind: FixupKind,
        /// Offset of the field.
        off: u32,
        /// What is there.
        found: u64,
    },
    /// A fixup was requested with no instruction following it.
    #[error("fixup {0:?} is not followed by an instruction")]
    DanglingFixup(FixupKind),
    /// A section bitness x86 does not have.
    #[error("section bitness {0} is not 16, 32 or 64")]
    Bitness(u32),
    /// The template grew past 4 GiB (impossible in practice).
    #[error("template too large")]
    TooLarge,
}

struct PendingFixup {
    insn: usize,
    kind: FixupKind,
    slot: Slot,
    operand: Operand,
}

struct Section {
    asm: CodeAssembler,
    start: u32,
    names: Vec<(&'static str, CodeLabel)>,
    fixups: Vec<PendingFixup>,
    raw_code: Vec<usize>,
}

/// The output of [`Builder::finish`].
#[derive(Clone, Debug)]
pub struct Assembled {
    /// The template bytes, placeholders in place.
    pub code: Vec<u8>,
    /// Fixup records in code order.
    pub fixups: Vec<FixupRecord>,
    /// Named labels and their code offsets.
    pub labels: BTreeMap<&'static str, u32>,
    /// `(start, end, bitness)` of every section.
    pub sections: Vec<(u32, u32, u32)>,
    /// Byte ranges emitted as data (`db`/`dw`/`dd`/`dq`), never executed.
    pub data: Vec<core::ops::Range<u32>>,
}

/// Builds a template section by section.
pub struct Builder {
    code: Vec<u8>,
    fixups: Vec<(FixupRecord, Option<&'static str>)>,
    labels: BTreeMap<&'static str, u32>,
    sections: Vec<(u32, u32, u32)>,
    cur: Option<Section>,
    placed: Vec<&'static str>,
    data: Vec<core::ops::Range<u32>>,
}

impl core::fmt::Debug for Builder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Builder")
            .field("code_len", &self.code.len())
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// An empty template whose first section has `bitness` (16, 32 or 64).
    ///
    /// # Errors
    /// [`BuildError::Bitness`] when `bitness` is not 16, 32 or 64.
    pub fn new(bitness: u32) -> Result<Self, BuildError> {
        let mut b = Self {
            code: Vec::new(),
            fixups: Vec::new(),
            labels: BTreeMap::new(),
            sections: Vec::new(),
            cur: None,
            placed: Vec::new(),
            data: Vec::new(),
        };
        b.section(bitness)?;
        Ok(b)
    }

    /// The assembler of the current section.
    pub fn a(&mut self) -> &mut CodeAssembler {
        match self.cur.as_mut() {
            Some(s) => &mut s.asm,
            // `cur` is only `None` between `flush` and the next `section`,
            // which never hands control back to a caller.
            None => unreachable!("builder has no open section"),
        }
    }

    /// Closes the current section and opens a new one of `bitness`, 16-byte aligned.
    ///
    /// # Errors
    /// [`BuildError::Bitness`] (checked before the current section is
    /// closed, so the builder stays usable), or assembly of the closed
    /// section failed.
    pub fn section(&mut self, bitness: u32) -> Result<(), BuildError> {
        if !matches!(bitness, 16 | 32 | 64) {
            return Err(BuildError::Bitness(bitness));
        }
        self.flush()?;
        while self.code.len() % 16 != 0 {
            self.code.push(0xcc);
        }
        let start = u32::try_from(self.code.len()).map_err(|_| BuildError::TooLarge)?;
        self.cur = Some(Section {
            asm: CodeAssembler::new(bitness)?,
            start,
            names: Vec::new(),
            fixups: Vec::new(),
            raw_code: Vec::new(),
        });
        Ok(())
    }

    /// A named label of the current section, created on first use, so code can
    /// branch to a name before [`Builder::label`] places it.
    pub fn named(&mut self, name: &'static str) -> CodeLabel {
        if let Some(s) = self.cur.as_mut() {
            if let Some((_, l)) = s.names.iter().find(|(n, _)| *n == name) {
                return *l;
            }
            let l = s.asm.create_label();
            s.names.push((name, l));
            return l;
        }
        CodeLabel::default()
    }

    /// Places the named label at the next instruction of the current section
    /// and returns it (for RIP-relative or branch references).
    ///
    /// # Errors
    /// The name was already placed.
    pub fn label(&mut self, name: &'static str) -> Result<CodeLabel, BuildError> {
        if self.labels.contains_key(name) || self.placed.contains(&name) {
            return Err(BuildError::DuplicateLabel(name));
        }
        let mut l = self.named(name);
        self.a().set_label(&mut l)?;
        // The placed copy carries the instruction index; keep that one.
        if let Some(s) = self.cur.as_mut() {
            if let Some(entry) = s.names.iter_mut().find(|(n, _)| *n == name) {
                entry.1 = l;
            }
        }
        self.placed.push(name);
        Ok(l)
    }

    /// Emits a hand-encoded instruction (executed code, unlike `db` data).
    ///
    /// # Errors
    /// iced rejects the bytes.
    pub fn raw_code(&mut self, bytes: &[u8]) -> Result<(), BuildError> {
        if let Some(s) = self.cur.as_mut() {
            s.raw_code.push(s.asm.instructions().len());
            s.asm.db(bytes)?;
        }
        Ok(())
    }

    /// Records a fixup on the next instruction emitted in this section.
    pub fn fixup(&mut self, kind: FixupKind, slot: Slot, operand: Operand) {
        if let Some(s) = self.cur.as_mut() {
            let insn = s.asm.instructions().len();
            s.fixups.push(PendingFixup {
                insn,
                kind,
                slot,
                operand,
            });
        }
    }

    fn flush(&mut self) -> Result<(), BuildError> {
        let Some(mut s) = self.cur.take() else {
            return Ok(());
        };
        if s.asm.instructions().is_empty() {
            return Ok(());
        }
        let bitness = s.asm.bitness();
        let res = s.asm.assemble_options(
            u64::from(s.start),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?;
        let bytes = &res.inner.code_buffer;
        for (name, l) in &s.names {
            let ip = res.label_ip(l)?;
            let off = u32::try_from(ip).map_err(|_| BuildError::TooLarge)?;
            if self.labels.insert(name, off).is_some() {
                return Err(BuildError::DuplicateLabel(name));
            }
        }
        for f in &s.fixups {
            let rel = *res
                .inner
                .new_instruction_offsets
                .get(f.insn)
                .ok_or(BuildError::DanglingFixup(f.kind))?;
            let field_in_insn = match f.slot {
                Slot::At(n) => n,
                Slot::Imm | Slot::Disp => {
                    let slice = bytes.get(rel as usize..).unwrap_or_default();
                    let mut dec = Decoder::with_ip(
                        bitness,
                        slice,
                        u64::from(s.start + rel),
                        DecoderOptions::NONE,
                    );
                    let insn = dec.decode();
                    let co = dec.get_constant_offsets(&insn);
                    let n = if f.slot == Slot::Imm {
                        co.has_immediate().then(|| co.immediate_offset())
                    } else {
                        co.has_displacement().then(|| co.displacement_offset())
                    };
                    n.map(|n| n as u32).ok_or(BuildError::NoSuchSlot {
                        kind: f.kind,
                        insn_off: s.start + rel,
                        slot: f.slot,
                    })?
                }
            };
            let local = rel + field_in_insn;
            let width = crate::reloc::field_width(f.kind);
            let found = read_le(bytes, local as usize, width);
            let is_placeholder = match width {
                // The conditional-jump kinds patch real template bytes.
                0 => true,
                2 => found == u64::from(PLACEHOLDER_U16) || found == 0xfffe,
                4 => found >> 16 == 0xffff || found == u64::from(PLACEHOLDER_U16),
                8 => found == PLACEHOLDER_U64,
                _ => false,
            };
            if !is_placeholder {
                return Err(BuildError::NotAPlaceholder {
                    kind: f.kind,
                    off: s.start + local,
                    found,
                });
            }
            let (operand, label) = match &f.operand {
                Operand::None => (None, None),
                Operand::Value(v) => (Some(*v), None),
                Operand::Label(n) => (Some(0), Some(*n)),
            };
            self.fixups.push((
                FixupRecord {
                    kind: f.kind,
                    off: s.start + local,
                    operand,
                },
                label,
            ));
        }
        for (i, insn) in s.asm.instructions().iter().enumerate() {
            if s.raw_code.contains(&i) {
                continue;
            }
            let elem = match insn.code() {
                iced_x86::Code::DeclareByte => 1,
                iced_x86::Code::DeclareWord => 2,
                iced_x86::Code::DeclareDword => 4,
                iced_x86::Code::DeclareQword => 8,
                _ => continue,
            };
            let Some(&rel) = res.inner.new_instruction_offsets.get(i) else {
                continue;
            };
            let start = s.start + rel;
            let end = start + (elem * insn.declare_data_len()) as u32;
            // One range per directive, so each slot keeps its own label.
            self.data.push(start..end);
        }
        let end = s.start + u32::try_from(bytes.len()).map_err(|_| BuildError::TooLarge)?;
        self.code.extend_from_slice(bytes);
        self.sections.push((s.start, end, bitness));
        Ok(())
    }

    /// Assembles the last section, resolves label operands and returns the template.
    ///
    /// # Errors
    /// Assembly failed or a fixup names an undefined label.
    pub fn finish(mut self) -> Result<Assembled, BuildError> {
        self.flush()?;
        let mut fixups = Vec::with_capacity(self.fixups.len());
        for (mut rec, label) in self.fixups {
            if let Some(name) = label {
                let off = self.labels.get(name).ok_or(BuildError::UndefinedLabel {
                    kind: rec.kind,
                    label: name,
                })?;
                rec.operand = Some(*off);
            }
            fixups.push(rec);
        }
        fixups.sort_by_key(|r| r.off);
        Ok(Assembled {
            code: self.code,
            fixups,
            labels: self.labels,
            sections: self.sections,
            data: self.data,
        })
    }
}

fn read_le(bytes: &[u8], at: usize, width: usize) -> u64 {
    bytes
        .get(at..at + width)
        .map(|b| {
            b.iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    #[test]
    fn records_exact_field_offsets_across_sections() -> Result<(), BuildError> {
        let mut b = Builder::new(32)?;
        b.label("start")?;
        b.a().nop()?;
        b.fixup(FixupKind::HcVmOff, Slot::Imm, Operand::Value(0x40));
        b.a().mov(edx, 0xffff_ffffu32)?;
        b.section(64)?;
        b.label("sixty_four")?;
        b.fixup(
            FixupKind::Hc64BitNoCheck,
            Slot::At(0),
            Operand::Label("start"),
        );
        b.a().dq(&[u64::MAX])?;
        let t = b.finish()?;
        assert_eq!(t.labels.get("sixty_four"), Some(&16));
        assert_eq!(t.fixups.len(), 2);
        assert_eq!(t.fixups[0].off, 2); // nop, then BA imm32
        assert_eq!(t.code[1], 0xba);
        assert_eq!(t.fixups[1].off, 16);
        assert_eq!(t.fixups[1].operand, Some(0));
        assert_eq!(t.sections, vec![(0, 6, 32), (16, 24, 64)]);
        Ok(())
    }

    #[test]
    fn bad_bitness_is_refused_and_leaves_the_builder_usable() -> Result<(), BuildError> {
        for bits in [0, 8, 33, 128] {
            assert!(matches!(Builder::new(bits), Err(BuildError::Bitness(b)) if b == bits));
        }
        let mut b = Builder::new(32)?;
        b.a().nop()?;
        assert!(matches!(b.section(8), Err(BuildError::Bitness(8))));
        // The open section is still there.
        b.a().nop()?;
        assert_eq!(b.finish()?.code, vec![0x90, 0x90]);
        Ok(())
    }

    #[test]
    fn rejects_non_placeholder_and_missing_slot() -> Result<(), BuildError> {
        let mut b = Builder::new(32)?;
        b.fixup(FixupKind::HcVmOff, Slot::Imm, Operand::Value(0));
        b.a().mov(edx, 0x1234u32)?;
        assert!(matches!(
            b.finish(),
            Err(BuildError::NotAPlaceholder { found: 0x1234, .. })
        ));
        let mut b = Builder::new(32)?;
        b.fixup(FixupKind::HcVmOff, Slot::Disp, Operand::Value(0));
        b.a().mov(edx, 0xffff_ffffu32)?;
        assert!(matches!(b.finish(), Err(BuildError::NoSuchSlot { .. })));
        let mut b = Builder::new(32)?;
        b.fixup(FixupKind::Hc32Bit, Slot::Imm, Operand::Label("nowhere"));
        b.a().mov(edx, 0xffff_ffffu32)?;
        assert!(matches!(
            b.finish(),
            Err(BuildError::UndefinedLabel {
                label: "nowhere",
                ..
            })
        ));
        Ok(())
    }
}
