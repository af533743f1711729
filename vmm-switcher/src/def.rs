//! The switcher definition (`VMMSWITCHERDEF`): code, fixups, entry points and regions.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

use serde::Serialize;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::fixup::FixupRecord;

/// The switcher types (`VMMSWITCHER`), with VirtualBox's numeric values.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum SwitcherKind {
    /// 32-bit host → 32-bit hypervisor context.
    Legacy32To32 = 1,
    /// 32-bit host → PAE hypervisor context.
    Legacy32ToPae = 2,
    /// 32-bit host → long mode.
    Legacy32ToAmd64 = 3,
    /// PAE host → 32-bit.
    PaeTo32 = 4,
    /// PAE host → PAE.
    PaeToPae = 5,
    /// PAE host → long mode.
    PaeToAmd64 = 6,
    /// AMD64 host → 32-bit.
    Amd64To32 = 7,
    /// AMD64 host → PAE.
    Amd64ToPae = 8,
    /// AMD64 host → AMD64 (VirtualBox never implemented it).
    Amd64ToAmd64 = 9,
    /// Stub for x86 builds.
    X86Stub = 10,
    /// Stub for AMD64 builds.
    Amd64Stub = 11,
}

impl SwitcherKind {
    /// Every kind, in numeric order.
    pub const ALL: [SwitcherKind; 11] = [
        Self::Legacy32To32,
        Self::Legacy32ToPae,
        Self::Legacy32ToAmd64,
        Self::PaeTo32,
        Self::PaeToPae,
        Self::PaeToAmd64,
        Self::Amd64To32,
        Self::Amd64ToPae,
        Self::Amd64ToAmd64,
        Self::X86Stub,
        Self::Amd64Stub,
    ];

    /// The command-line name (`32-to-amd64`, …).
    pub const fn cli_name(self) -> &'static str {
        match self {
            Self::Legacy32To32 => "32-to-32",
            Self::Legacy32ToPae => "32-to-pae",
            Self::Legacy32ToAmd64 => "32-to-amd64",
            Self::PaeTo32 => "pae-to-32",
            Self::PaeToPae => "pae-to-pae",
            Self::PaeToAmd64 => "pae-to-amd64",
            Self::Amd64To32 => "amd64-to-32",
            Self::Amd64ToPae => "amd64-to-pae",
            Self::Amd64ToAmd64 => "amd64-to-amd64",
            Self::X86Stub => "x86-stub",
            Self::Amd64Stub => "amd64-stub",
        }
    }

    /// VirtualBox's enum name.
    pub const fn vbox_name(self) -> &'static str {
        match self {
            Self::Legacy32To32 => "VMMSWITCHER_32_TO_32",
            Self::Legacy32ToPae => "VMMSWITCHER_32_TO_PAE",
            Self::Legacy32ToAmd64 => "VMMSWITCHER_32_TO_AMD64",
            Self::PaeTo32 => "VMMSWITCHER_PAE_TO_32",
            Self::PaeToPae => "VMMSWITCHER_PAE_TO_PAE",
            Self::PaeToAmd64 => "VMMSWITCHER_PAE_TO_AMD64",
            Self::Amd64To32 => "VMMSWITCHER_AMD64_TO_32",
            Self::Amd64ToPae => "VMMSWITCHER_AMD64_TO_PAE",
            Self::Amd64ToAmd64 => "VMMSWITCHER_AMD64_TO_AMD64",
            Self::X86Stub => "VMMSWITCHER_X86_STUB",
            Self::Amd64Stub => "VMMSWITCHER_AMD64_STUB",
        }
    }

    /// The kind with command-line name `name`.
    pub fn from_cli_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.cli_name() == name)
    }

    /// The host paging mode the switcher leaves and comes back to. The x86
    /// stub serves 32-bit and PAE hosts alike and reports [`SideMode::Bits32`].
    pub const fn host(self) -> SideMode {
        match self {
            Self::Legacy32To32 | Self::Legacy32ToPae | Self::Legacy32ToAmd64 | Self::X86Stub => {
                SideMode::Bits32
            }
            Self::PaeTo32 | Self::PaeToPae | Self::PaeToAmd64 => SideMode::Pae,
            Self::Amd64To32 | Self::Amd64ToPae | Self::Amd64ToAmd64 | Self::Amd64Stub => {
                SideMode::Amd64
            }
        }
    }

    /// The paging mode of the hypervisor context the switcher enters; `None`
    /// for the stubs, which enter none.
    pub const fn guest(self) -> Option<SideMode> {
        match self {
            Self::Legacy32To32 | Self::PaeTo32 | Self::Amd64To32 => Some(SideMode::Bits32),
            Self::Legacy32ToPae | Self::PaeToPae | Self::Amd64ToPae => Some(SideMode::Pae),
            Self::Legacy32ToAmd64 | Self::PaeToAmd64 | Self::Amd64ToAmd64 => Some(SideMode::Amd64),
            Self::X86Stub | Self::Amd64Stub => None,
        }
    }
}

/// The paging mode on one side of a switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum SideMode {
    /// 32-bit paging.
    Bits32,
    /// PAE paging.
    Pae,
    /// Long mode, 4-level paging.
    Amd64,
}

impl SideMode {
    /// How VirtualBox names the mode in its switcher names (`32-bit`, `PAE`, `AMD64`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bits32 => "32-bit",
            Self::Pae => "PAE",
            Self::Amd64 => "AMD64",
        }
    }
}

/// Which address view a piece of code executes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum View {
    /// Host ring-0 address.
    Hc,
    /// Identity address (virtual = physical).
    Id,
    /// Hypervisor-context address.
    Rc,
}

/// A run of code that executes in one view at one bitness.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Region {
    /// Short name (`HC0`, `ID0`, …).
    pub name: &'static str,
    /// The view it executes in.
    pub view: View,
    /// Code bitness (32 or 64).
    pub bits: u32,
    /// Byte range within the code.
    pub range: Range<u32>,
}

/// The five VirtualBox regions (`offHCCode0`/`cbHCCode0` …), as ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VboxRegions {
    /// First host-context range (entry side).
    pub hc0: Range<u32>,
    /// Second host-context range (exit side).
    pub hc1: Range<u32>,
    /// First identity range (entry side).
    pub id0: Range<u32>,
    /// Second identity range (exit side).
    pub id1: Range<u32>,
    /// Hypervisor-context range.
    pub gc: Range<u32>,
}

/// Entry-point offsets (from the code start). The calling convention,
/// arguments, preserved registers and interrupt state of each are
/// [`crate::entry::EntryPoint::contract`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EntryOffsets {
    /// C-callable ring-0 entry: go to the hypervisor context (`offR0HostToGuest`).
    pub r0_host_to_guest: u32,
    /// C-callable RC entry: return to the host with a status argument (`offGCGuestToHost`).
    pub rc_guest_to_host: u32,
    /// RC call trampoline (`offGCCallTrampoline`).
    pub rc_call_trampoline: u32,
    /// Assembly RC exit, status in EAX (`offGCGuestToHostAsm`).
    pub rc_guest_to_host_asm: u32,
    /// Exit saving a hyper `CPUMCTXCORE` (`offGCGuestToHostAsmHyperCtx`).
    pub rc_guest_to_host_asm_hyper_ctx: u32,
    /// Exit saving a guest `CPUMCTXCORE` (`offGCGuestToHostAsmGuestCtx`).
    pub rc_guest_to_host_asm_guest_ctx: u32,
}

impl EntryOffsets {
    /// `(name, offset)` of every entry point.
    pub fn named(&self) -> [(&'static str, u32); 6] {
        [
            ("R0HostToGuest", self.r0_host_to_guest),
            ("GCGuestToHost", self.rc_guest_to_host),
            ("GCCallTrampoline", self.rc_call_trampoline),
            ("GCGuestToHostAsm", self.rc_guest_to_host_asm),
            (
                "GCGuestToHostAsmHyperCtx",
                self.rc_guest_to_host_asm_hyper_ctx,
            ),
            (
                "GCGuestToHostAsmGuestCtx",
                self.rc_guest_to_host_asm_guest_ctx,
            ),
        ]
    }
}

/// A switcher ready to be copied and relocated (`VMMSWITCHERDEF`).
#[derive(Clone, Debug, Serialize)]
pub struct SwitcherDef {
    /// The switcher type.
    pub kind: SwitcherKind,
    /// Human-readable description.
    pub description: String,
    /// The pristine template bytes (`pvCode`, `cbCode`).
    pub code: Vec<u8>,
    /// The fixup records (`pvFixups`), in code order.
    pub fixups: Vec<FixupRecord>,
    /// Entry points.
    pub entries: EntryOffsets,
    /// Fine-grained regions with view and bitness, in code order.
    pub regions: Vec<Region>,
    /// Named labels and their offsets.
    pub labels: BTreeMap<&'static str, u32>,
    /// Byte ranges inside regions that hold data (pointer slots), not code.
    pub data: Vec<Range<u32>>,
}

impl SwitcherDef {
    /// `cbCode`.
    pub fn code_len(&self) -> u32 {
        u32::try_from(self.code.len()).unwrap_or(u32::MAX)
    }

    /// The region containing `off`, if any.
    pub fn region_of(&self, off: u32) -> Option<&Region> {
        self.regions.iter().find(|r| r.range.contains(&off))
    }

    /// The five VirtualBox ranges. Each region's name starts with the slot it
    /// belongs to (`HC0`, `HC1`, `ID0`, `ID1`, `GC`); a slot is the span of its
    /// regions, or empty when the switcher has none.
    pub fn vbox_regions(&self) -> VboxRegions {
        let slot = |prefix: &str| -> Range<u32> {
            let mut it = self.regions.iter().filter(|r| r.name.starts_with(prefix));
            let Some(first) = it.next() else { return 0..0 };
            let mut span = first.range.clone();
            for r in it {
                span.start = span.start.min(r.range.start);
                span.end = span.end.max(r.range.end);
            }
            span
        };
        VboxRegions {
            hc0: slot("HC0"),
            hc1: slot("HC1"),
            id0: slot("ID0"),
            id1: slot("ID1"),
            gc: slot("GC"),
        }
    }

    /// The VirtualBox fixup byte stream.
    ///
    /// # Errors
    /// A record does not match its kind (cannot happen for built templates).
    pub fn fixup_stream(&self) -> Result<Vec<u8>, crate::fixup::EncodeError> {
        crate::fixup::encode(&self.fixups)
    }

    /// The C export with VirtualBox's field list, for embedders that consume
    /// the C layout. The four pointers are supplied by the caller (where it
    /// keeps the code, the fixup stream, the NUL-terminated description and
    /// its relocate callback).
    pub fn to_c(
        &self,
        pv_code: u64,
        pv_fixups: u64,
        psz_desc: u64,
        pfn_relocate: u64,
    ) -> VmmSwitcherDefC {
        let r = self.vbox_regions();
        let off = |x: &Range<u32>| x.start;
        let cb = |x: &Range<u32>| x.end - x.start;
        let e = &self.entries;
        VmmSwitcherDefC {
            pv_code,
            pv_fixups,
            psz_desc,
            pfn_relocate,
            enm_type: self.kind as u32,
            cb_code: self.code_len(),
            off_r0_host_to_guest: e.r0_host_to_guest,
            off_gc_guest_to_host: e.rc_guest_to_host,
            off_gc_call_trampoline: e.rc_call_trampoline,
            off_gc_guest_to_host_asm: e.rc_guest_to_host_asm,
            off_gc_guest_to_host_asm_hyper_ctx: e.rc_guest_to_host_asm_hyper_ctx,
            off_gc_guest_to_host_asm_guest_ctx: e.rc_guest_to_host_asm_guest_ctx,
            off_hc_code0: off(&r.hc0),
            cb_hc_code0: cb(&r.hc0),
            off_hc_code1: off(&r.hc1),
            cb_hc_code1: cb(&r.hc1),
            off_id_code0: off(&r.id0),
            cb_id_code0: cb(&r.id0),
            off_id_code1: off(&r.id1),
            cb_id_code1: cb(&r.id1),
            off_gc_code: off(&r.gc),
            cb_gc_code: cb(&r.gc),
        }
    }
}

/// `VMMSWITCHERDEF` as VirtualBox lays it out (`#pragma pack(1)`, ≤ 4.1 field
/// list, 64-bit pointers): 4 × u64 + 18 × u32 = 104 bytes.
#[repr(C, packed)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VmmSwitcherDefC {
    /// `pvCode`.
    pub pv_code: u64,
    /// `pvFixups`.
    pub pv_fixups: u64,
    /// `pszDesc`.
    pub psz_desc: u64,
    /// `pfnRelocate`.
    pub pfn_relocate: u64,
    /// `enmType`.
    pub enm_type: u32,
    /// `cbCode`.
    pub cb_code: u32,
    /// `offR0HostToGuest`.
    pub off_r0_host_to_guest: u32,
    /// `offGCGuestToHost`.
    pub off_gc_guest_to_host: u32,
    /// `offGCCallTrampoline`.
    pub off_gc_call_trampoline: u32,
    /// `offGCGuestToHostAsm`.
    pub off_gc_guest_to_host_asm: u32,
    /// `offGCGuestToHostAsmHyperCtx`.
    pub off_gc_guest_to_host_asm_hyper_ctx: u32,
    /// `offGCGuestToHostAsmGuestCtx`.
    pub off_gc_guest_to_host_asm_guest_ctx: u32,
    /// `offHCCode0`.
    pub off_hc_code0: u32,
    /// `cbHCCode0`.
    pub cb_hc_code0: u32,
    /// `offHCCode1`.
    pub off_hc_code1: u32,
    /// `cbHCCode1`.
    pub cb_hc_code1: u32,
    /// `offIDCode0`.
    pub off_id_code0: u32,
    /// `cbIDCode0`.
    pub cb_id_code0: u32,
    /// `offIDCode1`.
    pub off_id_code1: u32,
    /// `cbIDCode1`.
    pub cb_id_code1: u32,
    /// `offGCCode`.
    pub off_gc_code: u32,
    /// `cbGCCode`.
    pub cb_gc_code: u32,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<VmmSwitcherDefC>() == 104);
    assert!(offset_of!(VmmSwitcherDefC, enm_type) == 32);
    assert!(offset_of!(VmmSwitcherDefC, off_hc_code0) == 64);
    assert!(offset_of!(VmmSwitcherDefC, cb_gc_code) == 100);
};
