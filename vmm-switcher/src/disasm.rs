//! Annotated listing of relocated switcher code.
//!
//! Each region is decoded with its own bitness at its own view's address;
//! labels and entry points are named, and every instruction that holds a fixup
//! field shows the fixup kind and the value written. Bytes outside all regions
//! (alignment padding) are summarised as "nowhere".

use std::fmt::Write as _;
use std::ops::Range;

use iced_x86::{
    Code, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, MemorySize, OpKind,
    Register,
};
use thiserror::Error;

use crate::def::{Region, SwitcherDef, View};
use crate::reloc::{RelocContext, Relocated};
use crate::templates::{Step, COM1};

/// One decoded instruction of a listing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Line {
    /// Offset from the code start.
    pub off: u32,
    /// Address in the view the region executes in.
    pub addr: u64,
    /// View.
    pub view: View,
    /// Bitness the region was decoded with.
    pub bits: u32,
    /// Raw bytes.
    pub bytes: Vec<u8>,
    /// Intel-syntax text.
    pub text: String,
    /// Labels at this offset.
    pub labels: Vec<String>,
    /// Fixups whose field lies in this instruction: `(kind name, value)`.
    pub fixups: Vec<(String, u64)>,
    /// What a recognised instrumentation instruction reports: the trace
    /// step a COM1 `out` prints, or the crash marker a store writes.
    pub note: Option<String>,
    /// The decoded instruction (`None` for a data slot).
    #[serde(skip)]
    pub insn: Option<Instruction>,
}

/// The code, its definition or a region cannot be listed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DisasmError {
    /// A region's bitness is not one x86 decodes.
    #[error("region {name} has bitness {bits}; only 16, 32 and 64 decode")]
    Bitness {
        /// Region name.
        name: &'static str,
        /// Its bitness.
        bits: u32,
    },
    /// The code is not the switcher's size.
    #[error("code is {got:#x} bytes but the switcher's is {want:#x}")]
    CodeSize {
        /// Bytes given.
        got: usize,
        /// The definition's code length.
        want: usize,
    },
    /// A region does not lie inside the code.
    #[error("region {name} ({start:#x}..{end:#x}) is not inside the {code_len:#x}-byte code")]
    RegionOutsideCode {
        /// Region name.
        name: &'static str,
        /// Start offset.
        start: u32,
        /// End offset.
        end: u32,
        /// Code length.
        code_len: usize,
    },
    /// A region's addresses in its view run past what its bitness addresses.
    #[error("region {name} at {base:#x} + {len:#x} runs past the {bits}-bit address space")]
    AddressOverflow {
        /// Region name.
        name: &'static str,
        /// Address of the region's start.
        base: u64,
        /// Region length.
        len: u64,
        /// The region's bitness.
        bits: u32,
    },
}

/// The base address of `view` for this switcher copy.
pub fn view_base(ctx: &RelocContext, view: View) -> u64 {
    match view {
        View::Hc => ctx.code_hc.0,
        View::Id => ctx.code_id.0,
        View::Rc => u64::from(ctx.code_rc.0),
    }
}

/// Checks a region against the code and its view; returns its start address.
fn check_region(r: &Region, code_len: usize, ctx: &RelocContext) -> Result<u64, DisasmError> {
    if !matches!(r.bits, 16 | 32 | 64) {
        return Err(DisasmError::Bitness {
            name: r.name,
            bits: r.bits,
        });
    }
    if r.range.start > r.range.end || r.range.end as usize > code_len {
        return Err(DisasmError::RegionOutsideCode {
            name: r.name,
            start: r.range.start,
            end: r.range.end,
            code_len,
        });
    }
    let base = view_base(ctx, r.view);
    let start = base.checked_add(u64::from(r.range.start));
    let len = u64::from(r.range.end - r.range.start);
    // 16-bit code still runs at a 32-bit linear address.
    let limit = if r.bits == 64 { u64::MAX } else { 0xffff_ffff };
    match start.and_then(|s| Some((s, s.checked_add(len.saturating_sub(1))?))) {
        Some((s, last)) if last <= limit => Ok(s),
        _ => Err(DisasmError::AddressOverflow {
            name: r.name,
            base: start.unwrap_or(base),
            len,
            bits: r.bits,
        }),
    }
}

/// The region's code runs and data slots, in order: `(range, is_data)`.
fn pieces(def: &SwitcherDef, region: &Region) -> Vec<(Range<u32>, bool)> {
    let mut out = Vec::new();
    let mut at = region.range.start;
    for d in &def.data {
        // Slots outside the region, malformed or overlapping an earlier one are skipped.
        if d.start < at || d.start > d.end || d.end > region.range.end {
            continue;
        }
        if d.start > at {
            out.push((at..d.start, false));
        }
        out.push((d.clone(), true));
        at = d.end;
    }
    if at < region.range.end {
        out.push((at..region.range.end, false));
    }
    out
}

/// Labels and entry points at `off`.
fn labels_at(def: &SwitcherDef, off: u32) -> Vec<String> {
    def.labels
        .iter()
        .filter(|(_, &o)| o == off)
        .map(|(n, _)| (*n).to_string())
        .chain(
            def.entries
                .named()
                .iter()
                .filter(|(_, o)| *o == off)
                .map(|(n, _)| format!("entry:{n}")),
        )
        .collect()
}

/// Fixups whose field starts inside `off..off + len`.
fn fixups_in(rel: &Relocated, off: u32, len: u32) -> Vec<(String, u64)> {
    let end = off.saturating_add(len);
    rel.applied
        .iter()
        .filter(|f| f.record.off >= off && f.record.off < end)
        .map(|f| (f.record.kind.vbox_name().to_string(), f.value))
        .collect()
}

/// A data slot as a `db`/`dw`/`dd`/`dq` line.
fn data_line(region: &Region, addr: u64, off: u32, bytes: &[u8]) -> Line {
    let hex = bytes
        .iter()
        .rev()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let dir = match bytes.len() {
        2 => "dw",
        4 => "dd",
        8 => "dq",
        _ => "db",
    };
    Line {
        off,
        addr,
        view: region.view,
        bits: region.bits,
        bytes: bytes.to_vec(),
        text: format!("{dir:<8}0x{hex}"),
        labels: Vec::new(),
        fixups: Vec::new(),
        note: None,
        insn: None,
    }
}

/// Decodes every region of `code` (a relocated copy of `def`), each with its
/// own bitness at its own view's address, and names trace steps and crash
/// markers.
///
/// # Errors
/// [`DisasmError`] when `code` is not the definition's size, a region's
/// bitness is not 16, 32 or 64, a region lies outside the code, or its
/// addresses run past its view.
pub fn lines(
    def: &SwitcherDef,
    code: &[u8],
    ctx: &RelocContext,
    rel: &Relocated,
) -> Result<Vec<Line>, DisasmError> {
    if code.len() != def.code.len() {
        return Err(DisasmError::CodeSize {
            got: code.len(),
            want: def.code.len(),
        });
    }
    let mut out = Vec::new();
    let mut fmt = IntelFormatter::new();
    fmt.options_mut().set_first_operand_char_index(8);
    for region in &def.regions {
        let region_addr = check_region(region, code.len(), ctx)?;
        for (range, is_data) in pieces(def, region) {
            let Some(bytes) = code.get(range.start as usize..range.end as usize) else {
                continue;
            };
            // check_region proved every address of the region fits its view.
            let addr = region_addr + u64::from(range.start - region.range.start);
            if is_data {
                let mut l = data_line(region, addr, range.start, bytes);
                l.labels = labels_at(def, range.start);
                l.fixups = fixups_in(rel, range.start, range.end - range.start);
                out.push(l);
                continue;
            }
            let first = out.len();
            let mut dec = Decoder::with_ip(region.bits, bytes, addr, DecoderOptions::NONE);
            let mut insn = Instruction::default();
            while dec.can_decode() {
                let pos = dec.position();
                dec.decode_out(&mut insn);
                let off = range.start + pos as u32;
                let len = insn.len() as u32;
                let mut text = String::new();
                fmt.format(&insn, &mut text);
                out.push(Line {
                    off,
                    addr: insn.ip(),
                    view: region.view,
                    bits: region.bits,
                    bytes: bytes
                        .get(pos..pos + len as usize)
                        .unwrap_or_default()
                        .to_vec(),
                    text,
                    labels: labels_at(def, off),
                    fixups: fixups_in(rel, off, len),
                    note: None,
                    insn: Some(insn),
                });
            }
            annotate(out.get_mut(first..).unwrap_or_default());
        }
    }
    Ok(out)
}

/// Names the trace steps and crash markers in one run of decoded code.
fn annotate(run: &mut [Line]) {
    let insns: Vec<Option<Instruction>> = run.iter().map(|l| l.insn).collect();
    for (i, line) in run.iter_mut().enumerate() {
        let prev = |k: usize| {
            i.checked_sub(k)
                .and_then(|j| insns.get(j).copied().flatten())
        };
        let Some(insn) = insns.get(i).copied().flatten() else {
            continue;
        };
        line.note = trace_note(&insn, prev(1), prev(2)).or_else(|| marker_note(&insn, prev(1)));
    }
}

/// `mov dx, COM1` / `mov al, ch` / `out dx, al`: the trace step `ch` reports.
fn trace_note(
    insn: &Instruction,
    mov_al: Option<Instruction>,
    mov_dx: Option<Instruction>,
) -> Option<String> {
    if insn.code() != Code::Out_DX_AL {
        return None;
    }
    let (mov_al, mov_dx) = (mov_al?, mov_dx?);
    let is_mov_imm = |i: &Instruction, reg: Register| {
        i.mnemonic() == iced_x86::Mnemonic::Mov
            && i.op0_kind() == OpKind::Register
            && i.op0_register() == reg
            && matches!(i.op1_kind(), OpKind::Immediate8 | OpKind::Immediate16)
    };
    if !is_mov_imm(&mov_al, Register::AL) || !is_mov_imm(&mov_dx, Register::DX) {
        return None;
    }
    if mov_dx.immediate(1) != u64::from(COM1) {
        return None;
    }
    let ch = u8::try_from(mov_al.immediate(1)).ok()?;
    let step = Step::from_ch(ch)?;
    Some(format!(
        "trace '{}' {step:?}: {}",
        char::from(ch),
        step.describe()
    ))
}

/// Offset of `Guest.dr[4]` in `CpumCpu32`, where crash markers go.
const GUEST_DR4: u64 = cpum::layout::GUEST_DR as u64 + 4 * 8;

/// A crash marker: `mov dword [edx/rdx + Guest.dr[4]], n`, or, while paging
/// is off, `mov eax, cr2` / `mov dword [eax], n` (the scratch page).
fn marker_note(insn: &Instruction, prev: Option<Instruction>) -> Option<String> {
    if insn.code() != Code::Mov_rm32_imm32
        || insn.op0_kind() != OpKind::Memory
        || insn.memory_size() != MemorySize::UInt32
        || insn.memory_index() != Register::None
    {
        return None;
    }
    let n = insn.immediate(1);
    let base = insn.memory_base();
    if matches!(base, Register::EDX | Register::RDX) && insn.memory_displacement64() == GUEST_DR4 {
        return Some(format!("crash marker {n} (Guest.dr[4])"));
    }
    let after_cr2 = prev.is_some_and(|p| {
        p.mnemonic() == iced_x86::Mnemonic::Mov
            && p.op0_register() == Register::EAX
            && p.op1_kind() == OpKind::Register
            && p.op1_register() == Register::CR2
    });
    (base == Register::EAX && insn.memory_displacement64() == 0 && after_cr2)
        .then(|| format!("crash marker {n} (scratch page)"))
}

/// Renders the listing as text: a header, then per region a header with its
/// view, bitness, range and instruction count, then one line per
/// instruction. Addresses of 16- and 32-bit code have 8 digits, of 64-bit
/// code 16.
///
/// # Errors
/// As [`lines`].
pub fn listing(
    def: &SwitcherDef,
    code: &[u8],
    ctx: &RelocContext,
    rel: &Relocated,
) -> Result<String, DisasmError> {
    let all = lines(def, code, ctx, rel)?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "; {} ({}) — {} bytes, {} fixups",
        def.description,
        def.kind.vbox_name(),
        code.len(),
        def.fixups.len()
    );
    let _ = writeln!(
        s,
        "; HC {}  ID {}  RC {}  VM hc {} rc {}  CR3 32/pae/amd64 {}/{}/{}  CS {:#x} DS {:#x} CS64 {:#x} TSS {:#x}",
        ctx.code_hc, ctx.code_id, ctx.code_rc, ctx.vm_hc, ctx.vm_rc,
        ctx.inter_cr3.legacy32, ctx.inter_cr3.pae, ctx.inter_cr3.amd64,
        ctx.sel.cs, ctx.sel.ds, ctx.sel.cs64, ctx.sel.tss
    );
    let mut covered = 0u32;
    let mut region_iter = def.regions.iter().peekable();
    for line in &all {
        while let Some(r) = region_iter.next_if(|r| r.range.start <= line.off) {
            if r.range.start > covered {
                let _ = writeln!(
                    s,
                    "; {:#06x}..{:#06x} nowhere ({} padding bytes)",
                    covered,
                    r.range.start,
                    r.range.start - covered
                );
            }
            let count = all
                .iter()
                .filter(|l| l.insn.is_some() && r.range.contains(&l.off))
                .count();
            let _ = writeln!(
                s,
                "\n; ---- {} ({:?} view, {}-bit) {:#06x}..{:#06x}, {count} instructions",
                r.name, r.view, r.bits, r.range.start, r.range.end
            );
            covered = r.range.end;
        }
        render_line(&mut s, line);
    }
    Ok(s)
}

/// One listing line: labels, offset, address, bytes, text and annotations.
fn render_line(s: &mut String, line: &Line) {
    for l in &line.labels {
        let _ = writeln!(s, "{l}:");
    }
    let hex: String = line.bytes.iter().map(|b| format!("{b:02x}")).collect();
    let width = if line.bits == 64 { 16 } else { 8 };
    let _ = write!(
        s,
        "  {:#06x} {:0width$x}  {:<22} {}",
        line.off, line.addr, hex, line.text
    );
    for (k, v) in &line.fixups {
        let _ = write!(s, "    ; {k} = {v:#x}");
    }
    if let Some(n) = &line.note {
        let _ = write!(s, "    ; {n}");
    }
    s.push('\n');
}
