//! `list`, `show`, `disasm` and `relocate`: the switchers as data.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};
use vmm_switcher::{SwitcherKind, View};

use crate::args::{BuildArgs, DisasmArgs, ListArgs, PlacementArgs, RelocateArgs, ShowArgs};
use crate::{setup, to_json, CliError, Exit};

fn summary_description(kind: SwitcherKind) -> String {
    let host = setup::host_modes(kind).join(" or ");
    let guest = setup::guest_mode(kind).unwrap_or("no");
    match kind {
        SwitcherKind::X86Stub => "stub for x86 builds (raw mode unsupported)".into(),
        SwitcherKind::Amd64Stub => "stub for AMD64 builds (raw mode unsupported)".into(),
        SwitcherKind::Amd64ToAmd64 => {
            "AMD64 host to AMD64 hypervisor context (VirtualBox never implemented it)".into()
        }
        _ => format!("{host} host to {guest} hypervisor context"),
    }
}

/// `worldswitch list`.
///
/// # Errors
/// The VMM core could not be built.
pub fn list(a: &ListArgs, out: &mut String) -> Result<Exit, CliError> {
    let mut rows = Vec::new();
    for kind in SwitcherKind::ALL {
        let vmm = setup::vmm(&default_build(), &PlacementArgs::default(), kind)?;
        let sw = vmm.switcher(kind).ok();
        rows.push(json!({
            "switcher": kind.cli_name(),
            "vbox_name": kind.vbox_name(),
            "type": kind as u32,
            "host_mode": kind.host().name(),
            "host_modes": setup::host_modes(kind),
            "host_options": setup::host_options(kind),
            "guest_mode": setup::guest_mode(kind),
            "available": sw.is_some(),
            "code_size": sw.map(|s| s.def.code_len()),
            "fixups": sw.map(|s| s.def.fixups.len()),
            "description": sw.map_or_else(|| summary_description(kind), |s| s.def.description.clone()),
        }));
    }
    if a.json {
        out.push_str(&to_json(&json!({ "switchers": rows }))?);
        return Ok(Exit::Ok);
    }
    let _ = writeln!(
        out,
        "{:<15} {:<10} {:<6} {:<9} {:>6} {:>6}  DESCRIPTION",
        "SWITCHER", "HOST", "GUEST", "AVAILABLE", "CODE", "FIXUPS"
    );
    for (r, kind) in rows.iter().zip(SwitcherKind::ALL) {
        let num = |k: &str| r[k].as_u64().map_or_else(|| "-".into(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<15} {:<10} {:<6} {:<9} {:>6} {:>6}  {}",
            r["switcher"].as_str().unwrap_or(""),
            setup::host_modes(kind).join("/"),
            r["guest_mode"].as_str().unwrap_or("-"),
            if r["available"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            num("code_size"),
            num("fixups"),
            r["description"].as_str().unwrap_or("")
        );
    }
    Ok(Exit::Ok)
}

fn default_build() -> BuildArgs {
    BuildArgs {
        revision: crate::args::RevisionArg::C,
        no_apic: false,
        no_stats: false,
        trace: false,
        x2apic: false,
        vcpus: 2,
    }
}

fn view_name(v: View) -> &'static str {
    match v {
        View::Hc => "HC",
        View::Id => "ID",
        View::Rc => "RC",
    }
}

/// `worldswitch show`.
///
/// # Errors
/// The switcher is not available, or the VMM core could not be built.
pub fn show(a: &ShowArgs, out: &mut String) -> Result<Exit, CliError> {
    setup::require(a.switcher)?;
    let vmm = setup::vmm(&a.build, &PlacementArgs::default(), a.switcher)?;
    let sw = vmm.switcher(a.switcher)?;
    let def = &sw.def;
    let c = def.to_c(0, 0, 0, 0);
    let fields: Vec<(&str, u32)> = vec![
        ("enmType", c.enm_type),
        ("cbCode", c.cb_code),
        ("offR0HostToGuest", c.off_r0_host_to_guest),
        ("offGCGuestToHost", c.off_gc_guest_to_host),
        ("offGCCallTrampoline", c.off_gc_call_trampoline),
        ("offGCGuestToHostAsm", c.off_gc_guest_to_host_asm),
        (
            "offGCGuestToHostAsmHyperCtx",
            c.off_gc_guest_to_host_asm_hyper_ctx,
        ),
        (
            "offGCGuestToHostAsmGuestCtx",
            c.off_gc_guest_to_host_asm_guest_ctx,
        ),
        ("offHCCode0", c.off_hc_code0),
        ("cbHCCode0", c.cb_hc_code0),
        ("offHCCode1", c.off_hc_code1),
        ("cbHCCode1", c.cb_hc_code1),
        ("offIDCode0", c.off_id_code0),
        ("cbIDCode0", c.cb_id_code0),
        ("offIDCode1", c.off_id_code1),
        ("cbIDCode1", c.cb_id_code1),
        ("offGCCode", c.off_gc_code),
        ("cbGCCode", c.cb_gc_code),
    ];
    let stream_len = def.fixup_stream().map(|s| s.len()).ok();
    // Entry points in offset order (a stable sort keeps VirtualBox's order
    // among entries at one offset).
    let mut entries = def.entries.named().to_vec();
    entries.sort_by_key(|(_, o)| *o);
    if a.json {
        let doc = json!({
            "switcher": def.kind.cli_name(),
            "vbox_name": def.kind.vbox_name(),
            "description": def.description,
            "host_options": setup::host_options(def.kind),
            "vmmswitcherdef": fields.iter().map(|(k, v)| ((*k).to_string(), json!(v))).collect::<serde_json::Map<String, Value>>(),
            "regions": regions_json(def),
            "entries": entries.iter().map(|(n, o)| json!({"name": n, "offset": o})).collect::<Vec<_>>(),
            "labels": def.labels.iter().map(|(n, o)| json!({"name": n, "offset": o})).collect::<Vec<_>>(),
            "data": def.data.iter().map(|d| json!({"start": d.start, "end": d.end})).collect::<Vec<_>>(),
            "fixup_stream_bytes": stream_len,
            "fixups": def.fixups.iter().map(|f| json!({
                "offset": f.off, "kind": f.kind.vbox_name(), "kind_value": f.kind as u8, "operand": f.operand,
            })).collect::<Vec<_>>(),
        });
        out.push_str(&to_json(&doc)?);
        return Ok(Exit::Ok);
    }
    let _ = writeln!(
        out,
        "{} ({}): {}",
        def.kind.cli_name(),
        def.kind.vbox_name(),
        def.description
    );
    let _ = writeln!(out, "hosts: {}", setup::host_options(def.kind).join(", "));
    let _ = writeln!(out, "\nVMMSWITCHERDEF");
    for (k, v) in &fields {
        let _ = writeln!(out, "  {k:<28} {v:#06x}  ({v})");
    }
    let _ = writeln!(out, "\nregions (offset range, view, bitness)");
    for r in &def.regions {
        let _ = writeln!(
            out,
            "  {:#06x}..{:#06x}  {}  {}-bit  {}",
            r.range.start,
            r.range.end,
            view_name(r.view),
            r.bits,
            r.name
        );
    }
    let _ = writeln!(out, "\nentry points");
    for (n, o) in &entries {
        let _ = writeln!(out, "  {o:#06x}  {n}");
    }
    let _ = writeln!(out, "\nlabels");
    let mut labels: Vec<_> = def.labels.iter().collect();
    labels.sort_by_key(|(_, o)| **o);
    for (n, o) in labels {
        let _ = writeln!(out, "  {o:#06x}  {n}");
    }
    if !def.data.is_empty() {
        let _ = writeln!(out, "\ndata slots");
        for d in &def.data {
            let _ = writeln!(out, "  {:#06x}..{:#06x}", d.start, d.end);
        }
    }
    let _ = writeln!(
        out,
        "\nfixup records ({}, stream of {} bytes)",
        def.fixups.len(),
        stream_len.map_or_else(|| "?".into(), |n| n.to_string())
    );
    let _ = writeln!(out, "  {:<8} {:<30} OPERAND", "OFFSET", "KIND");
    for f in &def.fixups {
        let _ = writeln!(
            out,
            "  {:#06x}   {:<30} {}",
            f.off,
            f.kind.vbox_name(),
            f.operand.map_or_else(String::new, |o| format!("{o:#x}"))
        );
    }
    Ok(Exit::Ok)
}

#[derive(Serialize)]
struct LineJson {
    offset: u32,
    addr: u64,
    view: &'static str,
    bits: u32,
    bytes: String,
    text: String,
    labels: Vec<String>,
    fixups: Vec<FixupValue>,
}

#[derive(Serialize)]
struct FixupValue {
    kind: String,
    value: u64,
}

/// The whole relocation context: every field of
/// [`vmm_switcher::RelocContext`] under its own name (addresses as numbers,
/// `apic_rc` `null` without an APIC page), plus `efer_or_mask`, the value
/// `FIX_EFER_OR_MASK` writes, derived from `cpu.nx`.
fn context_json(ctx: &vmm_switcher::RelocContext) -> Result<Value, CliError> {
    let mut v = serde_json::to_value(ctx)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("efer_or_mask".into(), json!(ctx.cpu.efer_or_mask()));
    }
    Ok(v)
}

/// The regions of a switcher's code (name, view, bitness, offset range).
fn regions_json(def: &vmm_switcher::SwitcherDef) -> Vec<Value> {
    def.regions
        .iter()
        .map(|r| {
            json!({
                "name": r.name, "view": view_name(r.view), "bits": r.bits,
                "start": r.range.start, "end": r.range.end,
            })
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `worldswitch disasm`.
///
/// # Errors
/// The switcher is not available, or the placement is bad.
pub fn disasm(a: &DisasmArgs, out: &mut String) -> Result<Exit, CliError> {
    setup::require(a.switcher)?;
    let vmm = setup::vmm(&a.build, &a.placement, a.switcher)?;
    let sw = vmm.switcher(a.switcher)?;
    let code = sw.code(vmm.core_code());
    if a.json {
        let lines: Vec<LineJson> = vmm_switcher::disasm::lines(&sw.def, code, &sw.ctx, &sw.reloc)
            .map_err(vmm::VmmError::from)?
            .into_iter()
            .map(|l| LineJson {
                offset: l.off,
                addr: l.addr,
                view: view_name(l.view),
                bits: l.bits,
                bytes: hex(&l.bytes),
                text: l.text,
                labels: l.labels,
                fixups: l
                    .fixups
                    .into_iter()
                    .map(|(kind, value)| FixupValue { kind, value })
                    .collect(),
            })
            .collect();
        let doc = json!({
            "switcher": sw.def.kind.cli_name(),
            "context": context_json(&sw.ctx)?,
            "lines": lines,
        });
        out.push_str(&to_json(&doc)?);
        return Ok(Exit::Ok);
    }
    out.push_str(
        &vmm_switcher::disasm::listing(&sw.def, code, &sw.ctx, &sw.reloc)
            .map_err(vmm::VmmError::from)?,
    );
    Ok(Exit::Ok)
}

fn entries_json(e: &vmm_switcher::reloc::EntryAddrs) -> Vec<(&'static str, &'static str, u64)> {
    vec![
        ("R0HostToGuest", "HC", e.r0_host_to_guest_hc.0),
        ("GCGuestToHost", "RC", u64::from(e.rc_guest_to_host.0)),
        ("GCCallTrampoline", "RC", u64::from(e.rc_call_trampoline.0)),
        (
            "GCGuestToHostAsm",
            "RC",
            u64::from(e.rc_guest_to_host_asm.0),
        ),
        (
            "GCGuestToHostAsmHyperCtx",
            "RC",
            u64::from(e.rc_guest_to_host_asm_hyper_ctx.0),
        ),
        (
            "GCGuestToHostAsmGuestCtx",
            "RC",
            u64::from(e.rc_guest_to_host_asm_guest_ctx.0),
        ),
        (
            "GCGuestToHostAsm (identity)",
            "ID",
            e.rc_guest_to_host_asm_id.0,
        ),
    ]
}

/// `worldswitch relocate`.
///
/// # Errors
/// The switcher is not available, the placement is bad, or the file cannot be written.
pub fn relocate(a: &RelocateArgs, out: &mut String) -> Result<Exit, CliError> {
    setup::require(a.switcher)?;
    let vmm = setup::vmm(&a.build, &a.placement, a.switcher)?;
    let sw = vmm.switcher(a.switcher)?;
    let code = sw.code(vmm.core_code());
    std::fs::write(&a.out, code).map_err(|source| CliError::Write {
        path: a.out.clone(),
        source,
    })?;
    let entries = entries_json(&sw.entries);
    if a.json {
        let doc = json!({
            "switcher": sw.def.kind.cli_name(),
            "out": a.out,
            "bytes": code.len(),
            "context": context_json(&sw.ctx)?,
            "regions": regions_json(&sw.def),
            "entries": entries.iter().map(|(n, v, addr)| json!({"name": n, "view": v, "addr": addr})).collect::<Vec<_>>(),
            "fixups": sw.reloc.applied.iter().map(|f| json!({
                "offset": f.record.off,
                "kind": f.record.kind.vbox_name(),
                "operand": f.record.operand,
                "value": f.value,
                "len": f.len,
            })).collect::<Vec<_>>(),
        });
        out.push_str(&to_json(&doc)?);
        return Ok(Exit::Ok);
    }
    let ctx = &sw.ctx;
    let _ = writeln!(
        out,
        "wrote {} bytes of {} to {}: HC {}, ID {}, RC {}; {} fixups applied",
        code.len(),
        sw.def.kind.cli_name(),
        a.out.display(),
        ctx.code_hc,
        ctx.code_id,
        ctx.code_rc,
        sw.reloc.applied.len()
    );
    let _ = writeln!(out, "\nentry points");
    for (n, v, addr) in &entries {
        let _ = writeln!(out, "  {v}  {addr:#010x}  {n}");
    }
    let _ = writeln!(out, "\nfixups");
    let _ = writeln!(
        out,
        "  {:<8} {:<30} {:<10} {:>3}  VALUE",
        "OFFSET", "KIND", "OPERAND", "LEN"
    );
    for f in &sw.reloc.applied {
        let _ = writeln!(
            out,
            "  {:#06x}   {:<30} {:<10} {:>3}  {:#x}",
            f.record.off,
            f.record.kind.vbox_name(),
            f.record
                .operand
                .map_or_else(String::new, |o| format!("{o:#x}")),
            f.len,
            f.value
        );
    }
    Ok(Exit::Ok)
}
