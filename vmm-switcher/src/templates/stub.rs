//! The stub switchers (`VMMSWITCHER_X86_STUB`, `VMMSWITCHER_AMD64_STUB`).
//!
//! Selected when the hypervisor context is not used at all (VirtualBox forces
//! them when raw mode is off): every entry point returns [`STUB_STATUS`] and
//! the RC call trampoline is an endless `int3` loop. They carry no fixups, so
//! relocating them changes nothing.

use iced_x86::code_asm::*;

use super::TemplateOptions;
use crate::builder::{BuildError, Builder};
use crate::def::{EntryOffsets, Region, SwitcherDef, SwitcherKind, View};

/// What every stub entry returns (VirtualBox's `VERR_VMM_SWITCHER_STUB`
/// plays this role; the value is this project's).
pub const STUB_STATUS: u32 = (-2906i32) as u32;

/// Builds the stub for 32-bit (`bits == 32`, x86 builds) or 64-bit
/// (`bits == 64`, AMD64 builds) hosts. Options do not apply to stubs.
///
/// # Errors
/// `bits` is neither 32 nor 64 (reported by iced), or assembly failed.
pub fn build(bits: u32, _o: &TemplateOptions) -> Result<SwitcherDef, BuildError> {
    let kind = if bits == 64 {
        SwitcherKind::Amd64Stub
    } else {
        SwitcherKind::X86Stub
    };
    let mut b = Builder::new(bits)?;
    for name in [
        "vmmR0HostToGuest",
        "vmmGCGuestToHost",
        "VMMGCGuestToHostAsm",
        "VMMGCGuestToHostAsmHyperCtx",
        "VMMGCGuestToHostAsmGuestCtx",
    ] {
        b.label(name)?;
        b.a().mov(eax, STUB_STATUS)?;
        b.a().ret()?;
    }
    b.section(bits)?;
    let tramp = b.label("vmmGCCallTrampoline")?;
    b.a().int3()?;
    b.a().jmp(tramp)?;
    let t = b.finish()?;
    let at = |n: &'static str| t.labels.get(n).copied().unwrap_or(0);
    let end = u32::try_from(t.code.len()).map_err(|_| BuildError::TooLarge)?;
    let gc = at("vmmGCCallTrampoline");
    Ok(SwitcherDef {
        kind,
        description: format!("{}-bit stub", bits),
        code: t.code,
        fixups: t.fixups,
        entries: EntryOffsets {
            r0_host_to_guest: at("vmmR0HostToGuest"),
            rc_guest_to_host: at("vmmGCGuestToHost"),
            rc_call_trampoline: gc,
            rc_guest_to_host_asm: at("VMMGCGuestToHostAsm"),
            rc_guest_to_host_asm_hyper_ctx: at("VMMGCGuestToHostAsmHyperCtx"),
            rc_guest_to_host_asm_guest_ctx: at("VMMGCGuestToHostAsmGuestCtx"),
        },
        regions: vec![
            Region {
                name: "HC0",
                view: View::Hc,
                bits,
                range: 0..gc,
            },
            Region {
                name: "GC",
                view: View::Rc,
                bits,
                range: gc..end,
            },
        ],
        labels: t.labels,
        data: t.data,
    })
}
