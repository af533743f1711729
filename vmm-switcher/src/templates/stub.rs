//! The stub switchers (`VMMSWITCHER_X86_STUB`, `VMMSWITCHER_AMD64_STUB`).
//!
//! Selected when the hypervisor context is not used at all (VirtualBox forces
//! them when raw mode is off): every entry point returns [`STUB_STATUS`] and
//! the RC call trampoline is an endless `int3` loop. They carry no fixups, so
//! relocating them changes nothing.
//!
//! Unlike every other family, a stub leaves `CpumCpu::ret_code`
//! (`/VMM/CPUn/RetCode`) alone: it switches nothing and, without fixups, does
//! not know where the CPUM structure lies in the VM (the C entry gets the VM
//! and the VCPU's offset from CPUM only). Its status reaches the caller in
//! EAX, and `ret_code` keeps the status of the last real switch, if any.

use iced_x86::code_asm::*;

use super::{finish, TemplateOptions};
use crate::builder::{BuildError, Builder};
use crate::def::{SwitcherDef, SwitcherKind, View};

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
    finish(
        kind,
        format!("{}-bit stub", bits),
        b,
        &[
            ("HC0", View::Hc, bits, "vmmR0HostToGuest"),
            ("GC", View::Rc, bits, "vmmGCCallTrampoline"),
        ],
    )
}
