//! Annotated listing of relocated switcher code.
//!
//! Each region is decoded with its own bitness at its own view's address;
//! labels and entry points are named, and every instruction that holds a fixup
//! field shows the fixup kind and the value written. Bytes outside all regions
//! (alignment padding) are summarised as "nowhere".

use std::fmt::Write as _;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

use crate::def::{SwitcherDef, View};
use crate::reloc::{RelocContext, Relocated};

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
    /// The decoded instruction (`None` for a data slot).
    #[serde(skip)]
    pub insn: Option<Instruction>,
}

/// The base address of `view` for this switcher copy.
pub fn view_base(ctx: &RelocContext, view: View) -> u64 {
    match view {
        View::Hc => ctx.code_hc.0,
        View::Id => ctx.code_id.0,
        View::Rc => u64::from(ctx.code_rc.0),
    }
}

/// Decodes every region of `code` (a relocated copy of `def`).
pub fn lines(def: &SwitcherDef, code: &[u8], ctx: &RelocContext, rel: &Relocated) -> Vec<Line> {
    let mut out = Vec::new();
    let mut fmt = IntelFormatter::new();
    fmt.options_mut().set_first_operand_char_index(8);
    for region in &def.regions {
        let view_base = view_base(ctx, region.view);
        // Split the region into code runs and data slots.
        let mut pieces: Vec<(u32, u32, bool)> = Vec::new();
        let mut at = region.range.start;
        for d in def
            .data
            .iter()
            .filter(|d| d.start >= region.range.start && d.end <= region.range.end)
        {
            if d.start > at {
                pieces.push((at, d.start, false));
            }
            pieces.push((d.start, d.end, true));
            at = d.end;
        }
        if at < region.range.end {
            pieces.push((at, region.range.end, false));
        }
        for (start, end, is_data) in pieces {
            let Some(bytes) = code.get(start as usize..(end as usize).min(code.len())) else {
                continue;
            };
            let fixups_in = |off: u32, len: u32| -> Vec<(String, u64)> {
                rel.applied
                    .iter()
                    .filter(|f| f.record.off >= off && f.record.off < off + len)
                    .map(|f| (f.record.kind.vbox_name().to_string(), f.value))
                    .collect()
            };
            let labels_at = |off: u32| -> Vec<String> {
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
            };
            if is_data {
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
                out.push(Line {
                    off: start,
                    addr: view_base.wrapping_add(u64::from(start)),
                    view: region.view,
                    bits: region.bits,
                    bytes: bytes.to_vec(),
                    text: format!("{dir:<8}0x{hex}"),
                    labels: labels_at(start),
                    fixups: fixups_in(start, end - start),
                    insn: None,
                });
                continue;
            }
            let mut dec = Decoder::with_ip(
                region.bits,
                bytes,
                view_base.wrapping_add(u64::from(start)),
                DecoderOptions::NONE,
            );
            let mut insn = Instruction::default();
            while dec.can_decode() {
                let pos = dec.position();
                dec.decode_out(&mut insn);
                let off = start + pos as u32;
                let len = insn.len() as u32;
                let mut text = String::new();
                fmt.format(&insn, &mut text);
                out.push(Line {
                    off,
                    addr: insn.ip(),
                    view: region.view,
                    bits: region.bits,
                    bytes: bytes[pos..pos + len as usize].to_vec(),
                    text,
                    labels: labels_at(off),
                    fixups: fixups_in(off, len),
                    insn: Some(insn),
                });
            }
        }
    }
    out
}

/// Renders the listing as text: a header, then one line per instruction.
pub fn listing(def: &SwitcherDef, code: &[u8], ctx: &RelocContext, rel: &Relocated) -> String {
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
    let all = lines(def, code, ctx, rel);
    for line in &all {
        while let Some(r) = region_iter.peek() {
            if r.range.start <= line.off {
                if r.range.start > covered {
                    let _ = writeln!(
                        s,
                        "; {:#06x}..{:#06x} nowhere ({} padding bytes)",
                        covered,
                        r.range.start,
                        r.range.start - covered
                    );
                }
                let _ = writeln!(
                    s,
                    "\n; ---- {} ({:?} view, {}-bit) {:#06x}..{:#06x}",
                    r.name, r.view, r.bits, r.range.start, r.range.end
                );
                covered = r.range.end;
                region_iter.next();
            } else {
                break;
            }
        }
        for l in &line.labels {
            let _ = writeln!(s, "{l}:");
        }
        let hex: String = line.bytes.iter().map(|b| format!("{b:02x}")).collect();
        let _ = write!(
            s,
            "  {:#06x} {:016x}  {:<22} {}",
            line.off, line.addr, hex, line.text
        );
        for (k, v) in &line.fixups {
            let _ = write!(s, "    ; {k} = {v:#x}");
        }
        s.push('\n');
    }
    s
}
