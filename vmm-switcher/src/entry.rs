//! The contract of every switcher entry point, in one place.
//!
//! [`EntryPoint`] names the six entries of a `VMMSWITCHERDEF`;
//! [`EntryPoint::contract`] gives, for a switcher kind, the calling
//! convention, the arguments, the return value, what is preserved and the
//! interrupt state. The C header of the C API carries the same text.
//!
//! The host-side entry ([`EntryPoint::R0HostToGuest`]) is the one an
//! embedder calls:
//!
//! | host | convention | arguments | returns | preserved |
//! |---|---|---|---|---|
//! | 32-bit or PAE (`Legacy32*`, `Pae*`, `X86Stub`) | cdecl, `u32 entry(u32 vm, u32 off_cpumcpu)` | `[esp+4]` = HC address of the VM structure, `[esp+8]` = the VCPU's `CPUMCPU` offset from `CPUM` | EAX | EBX, ESI, EDI, EBP, ESP, EFLAGS |
//! | AMD64 (`Amd64*`) | System V, `u32 entry(u64 vm, u32 off_cpumcpu)` | RDI = HC address of the VM structure, ESI = the VCPU's `CPUMCPU` offset | EAX | RBX, RBP, R12–R15, RSP, RFLAGS |
//!
//! Beyond the registers, a switch preserves the host's segment selectors
//! (and on AMD64 FS.base/GS.base), GDTR, IDTR, LDTR, TR, CR0, CR3, CR4,
//! EFER, the debug registers, SYSENTER_CS and the local APIC's LVTs. It is
//! called in ring 0; it disables interrupts itself for the whole switch and
//! returns with the caller's EFLAGS.IF.

use core::fmt;

use serde::Serialize;

use crate::SwitcherKind;

/// One entry point of a switcher (`VMMSWITCHERDEF::off*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum EntryPoint {
    /// `offR0HostToGuest`: the host's C-callable entry into the hypervisor
    /// context; returns the status the hypervisor context exits with.
    R0HostToGuest,
    /// `offGCGuestToHost`: the hypervisor context's C-callable exit, the
    /// status as its argument.
    GcGuestToHost,
    /// `offGCCallTrampoline`: where `Hyper.eip` points to call a function in
    /// the hypervisor context (frame written by `Vmm::push_trampoline_call`).
    GcCallTrampoline,
    /// `offGCGuestToHostAsm`: the hypervisor context's assembly exit, the
    /// status in EAX.
    GcGuestToHostAsm,
    /// `offGCGuestToHostAsmHyperCtx`: not implemented (an `int3`).
    GcGuestToHostAsmHyperCtx,
    /// `offGCGuestToHostAsmGuestCtx`: not implemented (an `int3`).
    GcGuestToHostAsmGuestCtx,
}

/// Calling convention of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Convention {
    /// 32-bit cdecl: arguments on the stack right to left, caller pops,
    /// EAX/ECX/EDX scratch, result in EAX.
    Cdecl32,
    /// The System V AMD64 ABI: arguments in RDI, RSI, RDX, RCX, R8, R9,
    /// result in EAX/RAX.
    SysV64,
    /// Reached with `call` from hypervisor-context code; does not return to
    /// the caller until the next entry from the host resumes it.
    ExitCall,
    /// Jumped to by the switcher (`Hyper.eip`), not called.
    Resume,
    /// Not usable: the entry traps.
    Trap,
}

/// What an entry expects and guarantees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct EntryContract {
    /// The entry.
    pub entry: EntryPoint,
    /// The calling convention.
    pub convention: Convention,
    /// The C prototype, or how it is reached.
    pub prototype: &'static str,
    /// What each argument is.
    pub arguments: &'static str,
    /// What comes back, and where.
    pub returns: &'static str,
    /// What the caller gets back unchanged.
    pub preserved: &'static str,
    /// The interrupt state on entry, during and on return.
    pub interrupts: &'static str,
}

impl EntryPoint {
    /// Every entry point, in `VMMSWITCHERDEF` order.
    pub const ALL: [EntryPoint; 6] = [
        Self::R0HostToGuest,
        Self::GcGuestToHost,
        Self::GcCallTrampoline,
        Self::GcGuestToHostAsm,
        Self::GcGuestToHostAsmHyperCtx,
        Self::GcGuestToHostAsmGuestCtx,
    ];

    /// VirtualBox's name of the entry.
    pub const fn vbox_name(self) -> &'static str {
        match self {
            Self::R0HostToGuest => "R0HostToGuest",
            Self::GcGuestToHost => "GCGuestToHost",
            Self::GcCallTrampoline => "GCCallTrampoline",
            Self::GcGuestToHostAsm => "GCGuestToHostAsm",
            Self::GcGuestToHostAsmHyperCtx => "GCGuestToHostAsmHyperCtx",
            Self::GcGuestToHostAsmGuestCtx => "GCGuestToHostAsmGuestCtx",
        }
    }

    /// The contract of this entry in a switcher of `kind`.
    pub const fn contract(self, kind: SwitcherKind) -> EntryContract {
        let host64 = matches!(
            kind,
            SwitcherKind::Amd64To32
                | SwitcherKind::Amd64ToPae
                | SwitcherKind::Amd64ToAmd64
                | SwitcherKind::Amd64Stub
        );
        let stub = matches!(kind, SwitcherKind::X86Stub | SwitcherKind::Amd64Stub);
        let rc64 = matches!(kind, SwitcherKind::Amd64ToAmd64);
        let far_helper = matches!(
            kind,
            SwitcherKind::Legacy32ToAmd64 | SwitcherKind::PaeToAmd64
        );
        let (convention, prototype, arguments, returns, preserved, interrupts) = match self {
            Self::R0HostToGuest if host64 => (
                Convention::SysV64,
                "uint32_t entry(uint64_t vm_hc, uint32_t off_cpumcpu)",
                R0_ARGS64,
                if stub { STUB_RETURNS } else { R0_RETURNS },
                PRESERVED64,
                R0_INTERRUPTS,
            ),
            Self::R0HostToGuest => (
                Convention::Cdecl32,
                "uint32_t entry(uint32_t vm_hc, uint32_t off_cpumcpu)",
                R0_ARGS32,
                if stub { STUB_RETURNS } else { R0_RETURNS },
                PRESERVED32,
                R0_INTERRUPTS,
            ),
            _ if stub => (
                Convention::Trap,
                "not reachable: the stub switches nothing",
                "none",
                "the stub's entries return STUB_STATUS; its trampoline loops on int3",
                "nothing",
                "not applicable",
            ),
            Self::GcGuestToHost => (
                if rc64 {
                    Convention::SysV64
                } else {
                    Convention::Cdecl32
                },
                "void exit(uint32_t status)",
                if rc64 {
                    "EDI = status"
                } else {
                    "[esp+4] = status"
                },
                "never returns to its caller; the host's R0HostToGuest returns the status",
                EXIT_PRESERVED,
                RC_INTERRUPTS,
            ),
            Self::GcGuestToHostAsm => (
                Convention::ExitCall,
                "call GCGuestToHostAsm",
                if far_helper {
                    "EAX = status (the 64-bit helper at Hyper.rip returns with ret instead, EAX = status)"
                } else {
                    "EAX = status"
                },
                "the host's R0HostToGuest returns EAX; the next entry resumes after the call",
                EXIT_PRESERVED,
                RC_INTERRUPTS,
            ),
            Self::GcCallTrampoline => (
                Convention::Resume,
                "Hyper.eip = GCCallTrampoline, frame [target, argument bytes, arguments...] on the hyper stack",
                if rc64 {
                    "up to six 32-bit arguments passed to the target in RDI, RSI, RDX, RCX, R8, R9"
                } else {
                    "the arguments passed to the target cdecl, on the hyper stack"
                },
                "exits with the target's EAX; resumed, exits again with TRAMPOLINE_RESUMED",
                "the target's callee-saved registers per its convention",
                RC_INTERRUPTS,
            ),
            Self::GcGuestToHostAsmHyperCtx | Self::GcGuestToHostAsmGuestCtx => (
                Convention::Trap,
                "not implemented: int3",
                "none",
                "does not return",
                "nothing",
                "not applicable",
            ),
        };
        EntryContract {
            entry: self,
            convention,
            prototype,
            arguments,
            returns,
            preserved,
            interrupts,
        }
    }
}

const R0_ARGS32: &str = "[esp+4] = HC address of the VM structure (Vmm::vm_addrs().0); \
[esp+8] = the VCPU's CPUMCPU offset from CPUM (Vmm::vcpu_arg(i))";
const R0_ARGS64: &str = "RDI = HC address of the VM structure (Vmm::vm_addrs().0); \
ESI = the VCPU's CPUMCPU offset from CPUM (Vmm::vcpu_arg(i))";
const R0_RETURNS: &str =
    "EAX = the status the hypervisor context exited with (also in CPUMCPU.ret_code)";
const STUB_RETURNS: &str = "EAX = STUB_STATUS; nothing is switched and ret_code is left alone";
const PRESERVED32: &str = "EBX, ESI, EDI, EBP, ESP, EFLAGS (EAX, ECX, EDX are scratch); \
segment selectors, GDTR, IDTR, LDTR, TR, CR0, CR3, CR4, EFER, DR0-DR7, SYSENTER_CS, the APIC LVTs";
const PRESERVED64: &str =
    "RBX, RBP, R12-R15, RSP, RFLAGS (the other general registers are scratch); \
segment selectors, FS.base, GS.base, GDTR, IDTR, LDTR, TR, CR0, CR3, CR4, EFER, DR0-DR7, \
SYSENTER_CS, the APIC LVTs";
const R0_INTERRUPTS: &str = "called in ring 0 with interrupts in any state; the entry saves \
EFLAGS and disables interrupts for the whole switch, and returns with the caller's EFLAGS.IF";
const EXIT_PRESERVED: &str = "every hyper register is saved in CPUMCPU.hyper (the return \
address becomes Hyper.eip)";
const RC_INTERRUPTS: &str = "runs with interrupts disabled; the hypervisor context's \
EFLAGS is saved in Hyper.eflags";

impl fmt::Display for EntryContract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({:?}): {}",
            self.entry.vbox_name(),
            self.convention,
            self.prototype
        )?;
        writeln!(f, "  arguments:  {}", self.arguments)?;
        writeln!(f, "  returns:    {}", self.returns)?;
        writeln!(f, "  preserved:  {}", self.preserved)?;
        write!(f, "  interrupts: {}", self.interrupts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_entry_convention_follows_the_host_width() {
        for kind in [SwitcherKind::PaeToAmd64, SwitcherKind::Legacy32To32] {
            let c = EntryPoint::R0HostToGuest.contract(kind);
            assert_eq!(c.convention, Convention::Cdecl32);
            assert!(c.arguments.contains("[esp+8]"));
        }
        for kind in [SwitcherKind::Amd64ToPae, SwitcherKind::Amd64ToAmd64] {
            let c = EntryPoint::R0HostToGuest.contract(kind);
            assert_eq!(c.convention, Convention::SysV64);
            assert!(c.arguments.starts_with("RDI"));
            assert!(c.preserved.contains("R12-R15"));
        }
        let stub = EntryPoint::R0HostToGuest.contract(SwitcherKind::X86Stub);
        assert!(stub.returns.contains("STUB_STATUS"));
        assert_eq!(
            EntryPoint::GcGuestToHostAsmGuestCtx
                .contract(SwitcherKind::PaeToPae)
                .convention,
            Convention::Trap
        );
        let text = EntryPoint::R0HostToGuest
            .contract(SwitcherKind::PaeToPae)
            .to_string();
        assert!(text.starts_with("R0HostToGuest (Cdecl32)"), "{text}");
    }
}
