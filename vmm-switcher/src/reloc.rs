//! The relocator: patches a copy of a switcher for where it and the VM live.
//!
//! Follows VirtualBox's generic relocator record by record, with every debug
//! assertion turned into an always-on check that returns a [`RelocError`]:
//! field and operand bounds, source and target regions, 32-bit values that
//! must fit, CR3s below 4 GiB, a non-null 64-bit code selector and the range
//! of every rel32. Each record overwrites its field completely from the
//! context, so relocating twice yields the same bytes.

use alloc::vec;
use alloc::vec::Vec;

use serde::Serialize;
use thiserror::Error;

use crate::addr::{HcAddr, PhysAddr, RcAddr};
use crate::def::{SwitcherDef, View};
use crate::fixup::{FixupKind, FixupRecord};

/// Physical addresses of the three intermediate page-table roots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterCr3 {
    /// 32-bit page directory (`HCPhysInterPD`).
    pub legacy32: PhysAddr,
    /// PAE PDPT (`HCPhysInterPaePDPT`).
    pub pae: PhysAddr,
    /// PML4 (`HCPhysInterPaePML4`).
    pub amd64: PhysAddr,
    /// PML5 of the 5-level tables, for hosts with CR4.LA57
    /// ([`FixupKind::InterLa57Cr3`]); `None` when the context has none.
    pub la57: Option<PhysAddr>,
}

/// The hypervisor selectors the switcher loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HyperSelectors {
    /// 32-bit code selector.
    pub cs: u16,
    /// Data selector.
    pub ds: u16,
    /// TSS selector.
    pub tss: u16,
    /// 64-bit code selector (0 when the hypervisor context has none).
    pub cs64: u16,
}

/// CPU and host facts some fixups depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuFacts {
    /// CPUID 0x8000_0001 EDX bit 20: EFER.NXE may be set.
    pub nx: bool,
    /// CPUID 1 EDX bit 24: FXSAVE/FXRSTOR.
    pub fxsr: bool,
    /// The host uses SYSENTER (SYSENTER_CS ≠ 0).
    pub host_sysenter: bool,
    /// The host uses SYSCALL (EFER.SCE).
    pub host_syscall: bool,
}

/// The CPUID output registers CPU facts are read from (what an embedder
/// gets from the `cpuid` instruction on the host CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuidLeaves {
    /// CPUID.1:EDX.
    pub leaf1_edx: u32,
    /// CPUID.8000_0001:EDX (0 when the CPU has no such leaf).
    pub ext1_edx: u32,
}

impl CpuidLeaves {
    /// CPUID.1:EDX bit 11: SYSENTER/SYSEXIT.
    pub const LEAF1_EDX_SEP: u32 = 1 << 11;
    /// CPUID.1:EDX bit 24: FXSAVE/FXRSTOR.
    pub const LEAF1_EDX_FXSR: u32 = 1 << 24;
    /// CPUID.8000_0001:EDX bit 11: SYSCALL/SYSRET.
    pub const EXT1_EDX_SYSCALL: u32 = 1 << 11;
    /// CPUID.8000_0001:EDX bit 20: no-execute pages (EFER.NXE).
    pub const EXT1_EDX_NX: u32 = 1 << 20;

    /// The bits of a CPU with SYSENTER, FXSR, SYSCALL and NX: every x86-64
    /// CPU of the last twenty years (and QEMU's default `qemu64`).
    pub const COMMON: CpuidLeaves = CpuidLeaves {
        leaf1_edx: Self::LEAF1_EDX_SEP | Self::LEAF1_EDX_FXSR,
        ext1_edx: Self::EXT1_EDX_SYSCALL | Self::EXT1_EDX_NX,
    };
}

/// `bit` when `on`, else 0.
const fn bit_if(on: bool, bit: u32) -> u32 {
    if on {
        bit
    } else {
        0
    }
}

impl CpuFacts {
    /// The facts a host on a CPU with these CPUID values has: NX and FXSR as
    /// reported; the host uses SYSENTER and SYSCALL exactly when the CPU has
    /// them (as every operating system that knows them does).
    pub const fn from_cpuid(c: &CpuidLeaves) -> Self {
        Self {
            nx: c.ext1_edx & CpuidLeaves::EXT1_EDX_NX != 0,
            fxsr: c.leaf1_edx & CpuidLeaves::LEAF1_EDX_FXSR != 0,
            host_sysenter: c.leaf1_edx & CpuidLeaves::LEAF1_EDX_SEP != 0,
            host_syscall: c.ext1_edx & CpuidLeaves::EXT1_EDX_SYSCALL != 0,
        }
    }

    /// The common case: [`CpuFacts::from_cpuid`] of [`CpuidLeaves::COMMON`]
    /// (NX, FXSR, SYSENTER and SYSCALL all present).
    pub const fn common() -> Self {
        Self::from_cpuid(&CpuidLeaves::COMMON)
    }

    /// The facts as the CPUID bits they stand for (the inverse of
    /// [`CpuFacts::from_cpuid`] on the bits it reads).
    pub const fn to_cpuid(&self) -> CpuidLeaves {
        CpuidLeaves {
            leaf1_edx: bit_if(self.host_sysenter, CpuidLeaves::LEAF1_EDX_SEP)
                | bit_if(self.fxsr, CpuidLeaves::LEAF1_EDX_FXSR),
            ext1_edx: bit_if(self.host_syscall, CpuidLeaves::EXT1_EDX_SYSCALL)
                | bit_if(self.nx, CpuidLeaves::EXT1_EDX_NX),
        }
    }

    /// The value `FIX_EFER_OR_MASK` writes: LME | SCE, plus NXE with NX.
    pub fn efer_or_mask(&self) -> u32 {
        let mut m = (cpum::regs::Efer::LME | cpum::regs::Efer::SCE).bits();
        if self.nx {
            m |= cpum::regs::Efer::NXE.bits();
        }
        // The named bits all sit in the low dword.
        u32::try_from(m).unwrap_or(u32::MAX)
    }
}

/// Everything the relocator writes, with named fields (the relocation context).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RelocContext {
    /// HC address of this switcher's copy.
    pub code_hc: HcAddr,
    /// Physical (= identity) address of this switcher's copy.
    pub code_id: PhysAddr,
    /// RC address of this switcher's copy.
    pub code_rc: RcAddr,
    /// HC address of the VM structure.
    pub vm_hc: HcAddr,
    /// RC address of the VM structure.
    pub vm_rc: RcAddr,
    /// Size of the VM structure.
    pub vm_size: u32,
    /// Offset of `Cpum` in the VM structure.
    pub cpum_off: u32,
    /// Size of the CPUM area (`Cpum` and every `CpumCpu`).
    pub cpum_size: u32,
    /// Offset of VCPU 0's `CpumCpu` from `Cpum`.
    pub cpumcpu0_off: u32,
    /// Intermediate CR3s.
    pub inter_cr3: InterCr3,
    /// Hypervisor selectors.
    pub sel: HyperSelectors,
    /// RC address of the hypervisor GDT.
    pub gdt_rc: RcAddr,
    /// CPU and host facts.
    pub cpu: CpuFacts,
    /// RC address of the APIC page, for `FIX_GC_APIC_BASE_32BIT`.
    pub apic_rc: Option<RcAddr>,
}

/// One patched field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// The record.
    pub record: FixupRecord,
    /// The value written (for far pointers: offset | selector << 32; for the
    /// conditional jumps: 1 if the jump was written, 0 if the original bytes).
    pub value: u64,
    /// Bytes written at `record.off`.
    pub len: u32,
}

/// Addresses of every entry point in every view; how each is called is
/// [`crate::entry::EntryPoint::contract`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EntryAddrs {
    /// Ring-0 C entry, host view.
    pub r0_host_to_guest_hc: HcAddr,
    /// RC C exit.
    pub rc_guest_to_host: RcAddr,
    /// RC trampoline.
    pub rc_call_trampoline: RcAddr,
    /// RC assembly exit (status in EAX).
    pub rc_guest_to_host_asm: RcAddr,
    /// RC exit saving a hyper context core.
    pub rc_guest_to_host_asm_hyper_ctx: RcAddr,
    /// RC exit saving a guest context core.
    pub rc_guest_to_host_asm_guest_ctx: RcAddr,
    /// The assembly exit at its identity address (the 64-bit-world exit of the
    /// long-mode switchers runs there).
    pub rc_guest_to_host_asm_id: PhysAddr,
}

/// The result of relocating one switcher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Relocated {
    /// Every field written.
    pub applied: Vec<Applied>,
    /// Entry addresses.
    pub entries: EntryAddrs,
}

/// Relocation failed; nothing useful was produced.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RelocError {
    /// The buffer is not the switcher's size.
    #[error("buffer is {got:#x} bytes but the switcher's code is {want:#x}")]
    BufferSize {
        /// Buffer length.
        got: usize,
        /// Code length.
        want: usize,
    },
    /// A field runs past the code.
    #[error("{kind:?} field at {off:#x} ({len} bytes) runs past the {code_len:#x}-byte code")]
    FieldOutsideCode {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
        /// Field length.
        len: u32,
        /// Code length.
        code_len: u32,
    },
    /// The field is not in the region the kind requires.
    #[error("{kind:?} field at {off:#x} is in {actual:?} code, must be in {want:?} code")]
    SourceRegion {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
        /// Required view.
        want: View,
        /// Where it is.
        actual: Option<View>,
    },
    /// The target offset is not in the region the kind requires.
    #[error(
        "{kind:?} at {off:#x}: target {target:#x} is in {actual:?} code, must be in {want:?} code"
    )]
    TargetRegion {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
        /// Target offset.
        target: u32,
        /// Required view.
        want: View,
        /// Where it is.
        actual: Option<View>,
    },
    /// A record that needs an operand has none.
    #[error("{kind:?} at {off:#x} has no operand")]
    MissingOperand {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
    },
    /// A structure offset is past the structure.
    #[error("{kind:?} at {off:#x}: structure offset {operand:#x} is not below {limit:#x}")]
    OperandOutOfRange {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
        /// The operand.
        operand: u32,
        /// The structure size.
        limit: u32,
    },
    /// A computed value does not fit its 32-bit field.
    #[error("{kind:?} at {off:#x}: value {value:#x} does not fit in 32 bits")]
    ValueTooWide {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
        /// The value.
        value: u64,
    },
    /// An intermediate CR3 is at or above 4 GiB.
    #[error("intermediate {which} CR3 {value} is not below 4 GiB")]
    Cr3Above4G {
        /// Which root.
        which: &'static str,
        /// Its address.
        value: PhysAddr,
    },
    /// A `FIX_INTER_LA57_CR3` record, and the intermediate context has no
    /// 5-level tables (the switcher was built for an LA57 host, the
    /// context was not).
    #[error("FIX_INTER_LA57_CR3 at offset {off:#x}: the intermediate context has no 5-level (LA57) tables")]
    NoLa57Root {
        /// The record's offset in the code.
        off: u32,
    },
    /// The switcher's physical copy is at or above 4 GiB.
    #[error("switcher physical address {0} is not below 4 GiB")]
    IdAbove4G(PhysAddr),
    /// `FIX_ID_FAR32_TO_64BIT_MODE` with a null 64-bit code selector.
    #[error("{kind:?} at {off:#x}: the 64-bit hypervisor code selector is 0")]
    NullCs64 {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
    },
    /// A rel32 does not reach.
    #[error("{kind:?} at {off:#x}: displacement {delta:#x} does not fit in rel32")]
    Rel32OutOfRange {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
        /// The displacement.
        delta: i64,
    },
    /// The kind is one VirtualBox never implemented or dropped.
    #[error("{kind:?} at {off:#x} is not supported: {why}")]
    Unsupported {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
        /// Why.
        why: &'static str,
    },
    /// An address computation runs past the end of its view: 2^64 for HC
    /// addresses, 4 GiB for RC and identity addresses.
    #[error("{what} at {base:#x} + {len:#x} runs past 2^{bits}")]
    AddressOverflow {
        /// What was computed.
        what: &'static str,
        /// The base address.
        base: u64,
        /// The offset or length added to it.
        len: u64,
        /// Width of the view's address space in bits (32 or 64).
        bits: u32,
    },
    /// A region of the definition is not a 32- or 64-bit range inside the code.
    #[error("region {name} ({bits}-bit, {start:#x}..{end:#x}) is not 32- or 64-bit code inside the {code_len:#x}-byte code")]
    BadRegion {
        /// Region name.
        name: &'static str,
        /// Its bitness.
        bits: u32,
        /// Start offset.
        start: u32,
        /// End offset.
        end: u32,
        /// Code length.
        code_len: u32,
    },
    /// An entry point lies outside the code.
    #[error("entry point {name} at {off:#x} is outside the {code_len:#x}-byte code")]
    EntryOutsideCode {
        /// Entry name.
        name: &'static str,
        /// Its offset.
        off: u32,
        /// Code length.
        code_len: u32,
    },
    /// `FIX_GC_APIC_BASE_32BIT` without an APIC address in the context.
    #[error("{kind:?} at {off:#x}: the context has no RC APIC address")]
    NoApicAddress {
        /// Kind.
        kind: FixupKind,
        /// Field offset.
        off: u32,
    },
}

/// Width of the placeholder field a kind patches (far pointers: the offset
/// part; 0 = no placeholder, the field holds real template bytes).
pub const fn field_width(kind: FixupKind) -> usize {
    use FixupKind as K;
    match kind {
        K::HyperCs | K::HyperDs | K::HyperTss | K::Hc64BitCs => 2,
        K::Hc64Bit | K::Hc64BitCpum | K::Id64Bit | K::Hc64BitNoCheck | K::Gc64BitCpumOff => 8,
        K::NoFxsaveJmp | K::NoSysenterJmp | K::NoSyscallJmp | K::TheEnd => 0,
        K::Cr4Mask | K::Cr4Osfsxr => 0,
        _ => 4,
    }
}

/// Bytes a kind writes at its offset.
pub const fn patch_len(kind: FixupKind) -> u32 {
    use FixupKind as K;
    match kind {
        K::GcFar32 | K::IdFar32To64BitMode => 6,
        K::NoFxsaveJmp | K::NoSysenterJmp | K::NoSyscallJmp => 5,
        _ => field_width(kind) as u32,
    }
}

/// The `(source, target)` views a kind requires.
pub const fn required_views(kind: FixupKind) -> (Option<View>, Option<View>) {
    use FixupKind as K;
    match kind {
        K::Hc2GcNearRel => (Some(View::Hc), Some(View::Rc)),
        K::Hc2IdNearRel => (Some(View::Hc), Some(View::Id)),
        K::Gc2HcNearRel => (Some(View::Rc), Some(View::Hc)),
        K::Gc2IdNearRel => (Some(View::Rc), Some(View::Id)),
        K::Id2HcNearRel => (Some(View::Id), Some(View::Hc)),
        K::Id2GcNearRel => (Some(View::Id), Some(View::Rc)),
        K::GcFar32 => (None, Some(View::Rc)),
        K::Hc32Bit | K::Hc64Bit => (None, Some(View::Hc)),
        K::Id32Bit | K::Id64Bit | K::IdFar32To64BitMode => (None, Some(View::Id)),
        _ => (None, None),
    }
}

struct Ctx<'a> {
    def: &'a SwitcherDef,
    c: &'a RelocContext,
    id: u32,
}

/// `base + len` in a view `bits` wide, or [`RelocError::AddressOverflow`].
fn add(what: &'static str, base: u64, len: u64, bits: u32) -> Result<u64, RelocError> {
    let limit = if bits >= 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    base.checked_add(len)
        .filter(|&v| v <= limit)
        .ok_or(RelocError::AddressOverflow {
            what,
            base,
            len,
            bits,
        })
}

/// `base..base + len` must end at or below 2^`bits` (its last byte inside the view).
fn area(what: &'static str, base: u64, len: u64, bits: u32) -> Result<(), RelocError> {
    if len == 0 {
        return Ok(());
    }
    add(what, base, len - 1, bits).map(|_| ())
}

impl Ctx<'_> {
    fn view_of(&self, off: u32) -> Option<View> {
        self.def.region_of(off).map(|r| r.view)
    }

    /// Address of code offset `off` in `view`.
    fn addr(&self, view: View, off: u32) -> Result<u64, RelocError> {
        let off = u64::from(off);
        match view {
            View::Hc => add("HC code address", self.c.code_hc.0, off, 64),
            View::Id => add("identity code address", u64::from(self.id), off, 32),
            View::Rc => add("RC code address", u64::from(self.c.code_rc.0), off, 32),
        }
    }

    /// The rel32 of a `kind` field at `off` from `from` code to `target` in `to` code.
    fn rel32(
        &self,
        kind: FixupKind,
        off: u32,
        (from, to): (View, View),
        target: u32,
    ) -> Result<u32, RelocError> {
        let src = add("rel32 source", self.addr(from, off)?, 4, 64)?;
        let dst = self.addr(to, target)?;
        let bits = self.def.region_of(off).map_or(32, |r| r.bits);
        if bits == 64 {
            // RIP-relative: the displacement itself must fit.
            let delta = i128::from(dst) - i128::from(src);
            return i32::try_from(delta).map(|d| d as u32).map_err(|_| {
                RelocError::Rel32OutOfRange {
                    kind,
                    off,
                    delta: i64::try_from(delta).unwrap_or(if delta < 0 {
                        i64::MIN
                    } else {
                        i64::MAX
                    }),
                }
            });
        }
        // 32-bit code: EIP arithmetic wraps modulo 2^32, so any two
        // addresses below 4 GiB reach each other.
        let s32 = fit32(kind, off, src)?;
        let d32 = fit32(kind, off, dst)?;
        Ok(d32.wrapping_sub(s32))
    }
}

fn fit32(kind: FixupKind, off: u32, v: u64) -> Result<u32, RelocError> {
    u32::try_from(v).map_err(|_| RelocError::ValueTooWide {
        kind,
        off,
        value: v,
    })
}

fn cr3(which: &'static str, value: PhysAddr) -> Result<u32, RelocError> {
    u32::try_from(value.0).map_err(|_| RelocError::Cr3Above4G { which, value })
}

/// Checks the definition's regions and entry points, and that the code and
/// the VM and CPUM areas fit their views (HC below 2^64, RC and identity
/// below 4 GiB).
fn check_def_and_context(def: &SwitcherDef, ctx: &RelocContext, id: u32) -> Result<(), RelocError> {
    let code_len = def.code_len();
    for r in &def.regions {
        if !matches!(r.bits, 32 | 64) || r.range.start > r.range.end || r.range.end > code_len {
            return Err(RelocError::BadRegion {
                name: r.name,
                bits: r.bits,
                start: r.range.start,
                end: r.range.end,
                code_len,
            });
        }
    }
    for (name, off) in def.entries.named() {
        if off > code_len {
            return Err(RelocError::EntryOutsideCode {
                name,
                off,
                code_len,
            });
        }
    }
    let len = u64::from(code_len);
    area("HC code", ctx.code_hc.0, len, 64)?;
    area("identity code", u64::from(id), len, 32)?;
    area("RC code", u64::from(ctx.code_rc.0), len, 32)?;
    area("HC VM structure", ctx.vm_hc.0, u64::from(ctx.vm_size), 64)?;
    area(
        "RC VM structure",
        u64::from(ctx.vm_rc.0),
        u64::from(ctx.vm_size),
        32,
    )?;
    let cpum_end = u64::from(ctx.cpum_off) + u64::from(ctx.cpum_size);
    area("HC CPUM area", ctx.vm_hc.0, cpum_end, 64)?;
    area("RC CPUM area", u64::from(ctx.vm_rc.0), cpum_end, 32)
}

/// Relocates `code` (a copy of `def.code`) for `ctx`, in place.
///
/// All address arithmetic is checked: a value that would run past its view
/// (2^64 for HC, 4 GiB for RC and identity addresses) is a
/// [`RelocError::AddressOverflow`], in debug and release builds alike.
///
/// # Errors
/// [`RelocError`] for any failed check; the buffer may then be partly patched
/// and must not be executed.
pub fn relocate(
    def: &SwitcherDef,
    code: &mut [u8],
    ctx: &RelocContext,
) -> Result<Relocated, RelocError> {
    if code.len() != def.code.len() {
        return Err(RelocError::BufferSize {
            got: code.len(),
            want: def.code.len(),
        });
    }
    let id = ctx
        .code_id
        .as_id32()
        .ok_or(RelocError::IdAbove4G(ctx.code_id))?;
    check_def_and_context(def, ctx, id)?;
    let cx = Ctx { def, c: ctx, id };
    let mut applied = Vec::with_capacity(def.fixups.len());
    for rec in &def.fixups {
        let Some((value, bytes)) = patch_for(&cx, rec)? else {
            continue;
        };
        let at = rec.off as usize;
        let field = at
            .checked_add(bytes.len())
            .and_then(|end| code.get_mut(at..end))
            .ok_or(RelocError::FieldOutsideCode {
                kind: rec.kind,
                off: rec.off,
                len: bytes.len() as u32,
                code_len: def.code_len(),
            })?;
        field.copy_from_slice(&bytes);
        applied.push(Applied {
            record: *rec,
            value,
            len: patch_len(rec.kind).max(bytes.len() as u32),
        });
    }
    Ok(Relocated {
        applied,
        entries: entry_addrs(def, ctx, id)?,
    })
}

/// Entry addresses in every view.
fn entry_addrs(def: &SwitcherDef, ctx: &RelocContext, id: u32) -> Result<EntryAddrs, RelocError> {
    let e = &def.entries;
    let rc = |o: u32| {
        add("RC entry", u64::from(ctx.code_rc.0), u64::from(o), 32).map(|a| RcAddr(a as u32))
    };
    Ok(EntryAddrs {
        r0_host_to_guest_hc: HcAddr(add(
            "HC entry",
            ctx.code_hc.0,
            u64::from(e.r0_host_to_guest),
            64,
        )?),
        rc_guest_to_host: rc(e.rc_guest_to_host)?,
        rc_call_trampoline: rc(e.rc_call_trampoline)?,
        rc_guest_to_host_asm: rc(e.rc_guest_to_host_asm)?,
        rc_guest_to_host_asm_hyper_ctx: rc(e.rc_guest_to_host_asm_hyper_ctx)?,
        rc_guest_to_host_asm_guest_ctx: rc(e.rc_guest_to_host_asm_guest_ctx)?,
        rc_guest_to_host_asm_id: PhysAddr(add(
            "identity entry",
            u64::from(id),
            u64::from(e.rc_guest_to_host_asm),
            32,
        )?),
    })
}

/// Checks one record's field bounds and source region.
fn check_record(cx: &Ctx<'_>, rec: &FixupRecord) -> Result<(), RelocError> {
    let (kind, off) = (rec.kind, rec.off);
    let len = patch_len(kind);
    let code_len = cx.def.code_len();
    if u64::from(off) + u64::from(len) > u64::from(code_len) {
        return Err(RelocError::FieldOutsideCode {
            kind,
            off,
            len,
            code_len,
        });
    }
    let (want_src, _) = required_views(kind);
    if let Some(want) = want_src {
        let actual = cx.view_of(off);
        if actual != Some(want) {
            return Err(RelocError::SourceRegion {
                kind,
                off,
                want,
                actual,
            });
        }
    }
    Ok(())
}

/// What one record writes: `(value, bytes)`, or `None` for the terminator.
fn patch_for(cx: &Ctx<'_>, rec: &FixupRecord) -> Result<Option<(u64, Vec<u8>)>, RelocError> {
    use FixupKind as K;
    if rec.kind == K::TheEnd {
        return Ok(None);
    }
    check_record(cx, rec)?;
    let (kind, off, ctx) = (rec.kind, rec.off, cx.c);
    let operand = || rec.operand.ok_or(RelocError::MissingOperand { kind, off });
    let target = |want: View| -> Result<u32, RelocError> {
        let t = operand()?;
        let actual = cx.view_of(t);
        if actual != Some(want) {
            return Err(RelocError::TargetRegion {
                kind,
                off,
                target: t,
                want,
                actual,
            });
        }
        Ok(t)
    };
    let in_struct = |limit: u32| -> Result<u64, RelocError> {
        let o = operand()?;
        if o >= limit {
            return Err(RelocError::OperandOutOfRange {
                kind,
                off,
                operand: o,
                limit,
            });
        }
        Ok(u64::from(o))
    };
    let rel32 = |views: (View, View)| cx.rel32(kind, off, views, target(views.1)?);
    let cpum_off = u64::from(ctx.cpum_off);
    let cpum_hc = || add("HC CPUM address", ctx.vm_hc.0, cpum_off, 64);
    let cpum_rc = || add("RC CPUM address", u64::from(ctx.vm_rc.0), cpum_off, 32);
    let vm_rc = u64::from(ctx.vm_rc.0);
    let fit = |v: u64| fit32(kind, off, v);
    Ok(Some(match kind {
        K::Hc2GcNearRel => one32(rel32((View::Hc, View::Rc))?),
        K::Hc2IdNearRel => one32(rel32((View::Hc, View::Id))?),
        K::Gc2HcNearRel => one32(rel32((View::Rc, View::Hc))?),
        K::Gc2IdNearRel => one32(rel32((View::Rc, View::Id))?),
        K::Id2HcNearRel => one32(rel32((View::Id, View::Hc))?),
        K::Id2GcNearRel => one32(rel32((View::Id, View::Rc))?),
        K::GcFar32 => far(fit(cx.addr(View::Rc, target(View::Rc)?)?)?, ctx.sel.cs),
        K::GcCpumOff => one32(fit(add(
            "RC CPUM field",
            cpum_rc()?,
            in_struct(ctx.cpum_size)?,
            32,
        )?)?),
        K::GcVmOff => one32(fit(add(
            "RC VM field",
            vm_rc,
            in_struct(ctx.vm_size)?,
            32,
        )?)?),
        K::HcCpumOff => one32(fit(add(
            "HC CPUM field",
            cpum_hc()?,
            in_struct(ctx.cpum_size)?,
            64,
        )?)?),
        K::HcVmOff => one32(fit(add(
            "HC VM field",
            ctx.vm_hc.0,
            in_struct(ctx.vm_size)?,
            64,
        )?)?),
        K::Inter32BitCr3 => one32(cr3("32-bit", ctx.inter_cr3.legacy32)?),
        K::InterPaeCr3 => one32(cr3("PAE", ctx.inter_cr3.pae)?),
        K::InterAmd64Cr3 => one32(cr3("AMD64", ctx.inter_cr3.amd64)?),
        K::InterLa57Cr3 => one32(cr3(
            "5-level",
            ctx.inter_cr3.la57.ok_or(RelocError::NoLa57Root { off })?,
        )?),
        K::Hyper32BitCr3 | K::HyperPaeCr3 | K::HyperAmd64Cr3 => {
            return Err(RelocError::Unsupported {
                kind,
                off,
                why: "VirtualBox 2.1 only; switchers load Hyper.cr3",
            })
        }
        K::HyperCs => one16(ctx.sel.cs),
        K::HyperDs => one16(ctx.sel.ds),
        K::HyperTss => one16(ctx.sel.tss),
        K::GcTssGdteDw2 => {
            let dw2 = u64::from(ctx.sel.tss & !7) + 4;
            one32(fit(add(
                "RC TSS descriptor",
                u64::from(ctx.gdt_rc.0),
                dw2,
                32,
            )?)?)
        }
        K::Cr4Mask | K::Cr4Osfsxr => {
            return Err(RelocError::Unsupported {
                kind,
                off,
                why: "never implemented by VirtualBox",
            })
        }
        K::NoFxsaveJmp | K::NoSysenterJmp | K::NoSyscallJmp => {
            cond_jump(cx, rec, in_struct(cx.def.code_len())?)?
        }
        K::Hc32Bit => one32(fit(cx.addr(View::Hc, target(View::Hc)?)?)?),
        K::Hc64Bit => one64(cx.addr(View::Hc, target(View::Hc)?)?),
        K::Hc64BitCpum => one64(cpum_hc()?),
        K::Hc64BitCs => {
            return Err(RelocError::Unsupported {
                kind,
                off,
                why: "Darwin hybrid-kernel hosts only",
            })
        }
        K::Id32Bit => one32(fit(cx.addr(View::Id, target(View::Id)?)?)?),
        K::Id64Bit => one64(cx.addr(View::Id, target(View::Id)?)?),
        K::IdFar32To64BitMode => {
            let t = target(View::Id)?;
            if ctx.sel.cs64 == 0 {
                return Err(RelocError::NullCs64 { kind, off });
            }
            far(fit(cx.addr(View::Id, t)?)?, ctx.sel.cs64)
        }
        K::GcApicBase32Bit => one32(
            ctx.apic_rc
                .ok_or(RelocError::NoApicAddress { kind, off })?
                .0,
        ),
        K::Hc64BitNoCheck => one64(cx.addr(View::Id, operand()?)?),
        K::Gc64BitCpumOff => one64(add(
            "RC CPUM field",
            cpum_rc()?,
            in_struct(ctx.cpum_size)?,
            32,
        )?),
        K::GcCpumCpuOff => {
            let cpumcpu = add("RC CPUMCPU", cpum_rc()?, u64::from(ctx.cpumcpu0_off), 32)?;
            let limit = ctx.cpum_size.saturating_sub(ctx.cpumcpu0_off);
            one32(fit(add(
                "RC CPUMCPU field",
                cpumcpu,
                in_struct(limit)?,
                32,
            )?)?)
        }
        K::EferOrMask => one32(ctx.cpu.efer_or_mask()),
        K::TheEnd => return Ok(None),
    }))
}

/// A conditional `jmp rel32` to code offset `t` (when the CPU or host lacks
/// the feature), or the original five template bytes.
fn cond_jump(cx: &Ctx<'_>, rec: &FixupRecord, t: u64) -> Result<(u64, Vec<u8>), RelocError> {
    let jump = match rec.kind {
        FixupKind::NoFxsaveJmp => !cx.c.cpu.fxsr,
        FixupKind::NoSysenterJmp => !cx.c.cpu.host_sysenter,
        _ => !cx.c.cpu.host_syscall,
    };
    let at = rec.off as usize;
    if jump {
        let delta = i128::from(t) - (i128::from(rec.off) + 5);
        let rel = i32::try_from(delta).map_err(|_| RelocError::Rel32OutOfRange {
            kind: rec.kind,
            off: rec.off,
            delta: i64::try_from(delta).unwrap_or(i64::MIN),
        })?;
        let mut b = vec![0xe9];
        b.extend_from_slice(&rel.to_le_bytes());
        Ok((1, b))
    } else {
        // check_record proved the five bytes lie inside the code.
        let orig = cx.def.code.get(at..at + 5).unwrap_or_default().to_vec();
        Ok((0, orig))
    }
}

fn one16(v: u16) -> (u64, Vec<u8>) {
    (u64::from(v), v.to_le_bytes().to_vec())
}

fn one32(v: u32) -> (u64, Vec<u8>) {
    (u64::from(v), v.to_le_bytes().to_vec())
}

fn one64(v: u64) -> (u64, Vec<u8>) {
    (v, v.to_le_bytes().to_vec())
}

fn far(offset: u32, sel: u16) -> (u64, Vec<u8>) {
    let mut b = offset.to_le_bytes().to_vec();
    b.extend_from_slice(&sel.to_le_bytes());
    (u64::from(offset) | (u64::from(sel) << 32), b)
}
