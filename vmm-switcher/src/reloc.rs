//! The relocator: patches a copy of a switcher for where it and the VM live.
//!
//! Follows VirtualBox's generic relocator record by record, with every debug
//! assertion turned into an always-on check that returns a [`RelocError`]:
//! field and operand bounds, source and target regions, 32-bit values that
//! must fit, CR3s below 4 GiB, a non-null 64-bit code selector and the range
//! of every rel32. Each record overwrites its field completely from the
//! context, so relocating twice yields the same bytes.

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

impl CpuFacts {
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

/// Addresses of every entry point in every view.
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

impl Ctx<'_> {
    fn view_of(&self, off: u32) -> Option<View> {
        self.def.region_of(off).map(|r| r.view)
    }

    fn addr(&self, view: View, off: u32) -> i64 {
        match view {
            View::Hc => self.c.code_hc.0.wrapping_add(u64::from(off)) as i64,
            View::Id => i64::from(self.id) + i64::from(off),
            View::Rc => i64::from(self.c.code_rc.0) + i64::from(off),
        }
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

/// Relocates `code` (a copy of `def.code`) for `ctx`, in place.
///
/// # Errors
/// [`RelocError`] for any failed check; the buffer may then be partly patched
/// and must not be executed.
pub fn relocate(
    def: &SwitcherDef,
    code: &mut [u8],
    ctx: &RelocContext,
) -> Result<Relocated, RelocError> {
    use FixupKind as K;
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
    let cx = Ctx { def, c: ctx, id };
    let code_len = def.code_len();
    let mut applied = Vec::with_capacity(def.fixups.len());
    for rec in &def.fixups {
        let (kind, off) = (rec.kind, rec.off);
        let len = patch_len(kind);
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
        let in_struct = |limit: u32| -> Result<u32, RelocError> {
            let o = operand()?;
            if o >= limit {
                return Err(RelocError::OperandOutOfRange {
                    kind,
                    off,
                    operand: o,
                    limit,
                });
            }
            Ok(o)
        };
        let rel32 = |from: View, to: View| -> Result<u32, RelocError> {
            let t = target(to)?;
            let (src, dst) = (cx.addr(from, off) + 4, cx.addr(to, t));
            let bits = cx.def.region_of(off).map_or(32, |r| r.bits);
            if bits == 64 {
                // RIP-relative: the displacement itself must fit.
                let delta = dst - src;
                return i32::try_from(delta)
                    .map(|d| d as u32)
                    .map_err(|_| RelocError::Rel32OutOfRange { kind, off, delta });
            }
            // 32-bit code: EIP arithmetic wraps modulo 2^32, so any two
            // addresses below 4 GiB reach each other.
            let s32 = fit32(kind, off, src as u64)?;
            let d32 = fit32(kind, off, dst as u64)?;
            Ok(d32.wrapping_sub(s32))
        };
        let cpum_hc = ctx.vm_hc.0.wrapping_add(u64::from(ctx.cpum_off));
        let cpum_rc = u64::from(ctx.vm_rc.0) + u64::from(ctx.cpum_off);
        let at = off as usize;
        let (value, bytes): (u64, Vec<u8>) = match kind {
            K::Hc2GcNearRel => one32(rel32(View::Hc, View::Rc)?),
            K::Hc2IdNearRel => one32(rel32(View::Hc, View::Id)?),
            K::Gc2HcNearRel => one32(rel32(View::Rc, View::Hc)?),
            K::Gc2IdNearRel => one32(rel32(View::Rc, View::Id)?),
            K::Id2HcNearRel => one32(rel32(View::Id, View::Hc)?),
            K::Id2GcNearRel => one32(rel32(View::Id, View::Rc)?),
            K::GcFar32 => far(
                fit32(kind, off, cx.addr(View::Rc, target(View::Rc)?) as u64)?,
                ctx.sel.cs,
            ),
            K::GcCpumOff => one32(fit32(
                kind,
                off,
                cpum_rc + u64::from(in_struct(ctx.cpum_size)?),
            )?),
            K::GcVmOff => one32(fit32(
                kind,
                off,
                u64::from(ctx.vm_rc.0) + u64::from(in_struct(ctx.vm_size)?),
            )?),
            K::HcCpumOff => one32(fit32(
                kind,
                off,
                cpum_hc.wrapping_add(u64::from(in_struct(ctx.cpum_size)?)),
            )?),
            K::HcVmOff => one32(fit32(
                kind,
                off,
                ctx.vm_hc.0.wrapping_add(u64::from(in_struct(ctx.vm_size)?)),
            )?),
            K::Inter32BitCr3 => one32(cr3("32-bit", ctx.inter_cr3.legacy32)?),
            K::InterPaeCr3 => one32(cr3("PAE", ctx.inter_cr3.pae)?),
            K::InterAmd64Cr3 => one32(cr3("AMD64", ctx.inter_cr3.amd64)?),
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
            K::GcTssGdteDw2 => one32(fit32(
                kind,
                off,
                u64::from(ctx.gdt_rc.0) + u64::from(ctx.sel.tss & !7) + 4,
            )?),
            K::Cr4Mask | K::Cr4Osfsxr => {
                return Err(RelocError::Unsupported {
                    kind,
                    off,
                    why: "never implemented by VirtualBox",
                })
            }
            K::NoFxsaveJmp | K::NoSysenterJmp | K::NoSyscallJmp => {
                let t = in_struct(code_len)?;
                let jump = match kind {
                    K::NoFxsaveJmp => !ctx.cpu.fxsr,
                    K::NoSysenterJmp => !ctx.cpu.host_sysenter,
                    _ => !ctx.cpu.host_syscall,
                };
                if jump {
                    let rel = i64::from(t) - (i64::from(off) + 5);
                    let mut b = vec![0xe9];
                    b.extend_from_slice(&(rel as i32).to_le_bytes());
                    (1, b)
                } else {
                    (0, def.code[at..at + 5].to_vec())
                }
            }
            K::Hc32Bit => one32(fit32(
                kind,
                off,
                cx.addr(View::Hc, target(View::Hc)?) as u64,
            )?),
            K::Hc64Bit => one64(cx.addr(View::Hc, target(View::Hc)?) as u64),
            K::Hc64BitCpum => one64(cpum_hc),
            K::Hc64BitCs => {
                return Err(RelocError::Unsupported {
                    kind,
                    off,
                    why: "Darwin hybrid-kernel hosts only",
                })
            }
            K::Id32Bit => one32(fit32(
                kind,
                off,
                cx.addr(View::Id, target(View::Id)?) as u64,
            )?),
            K::Id64Bit => one64(cx.addr(View::Id, target(View::Id)?) as u64),
            K::IdFar32To64BitMode => {
                let t = target(View::Id)?;
                if ctx.sel.cs64 == 0 {
                    return Err(RelocError::NullCs64 { kind, off });
                }
                far(fit32(kind, off, cx.addr(View::Id, t) as u64)?, ctx.sel.cs64)
            }
            K::GcApicBase32Bit => one32(
                ctx.apic_rc
                    .ok_or(RelocError::NoApicAddress { kind, off })?
                    .0,
            ),
            K::Hc64BitNoCheck => one64(cx.addr(View::Id, operand()?) as u64),
            K::Gc64BitCpumOff => one64(cpum_rc + u64::from(in_struct(ctx.cpum_size)?)),
            K::GcCpumCpuOff => one32(fit32(
                kind,
                off,
                cpum_rc
                    + u64::from(ctx.cpumcpu0_off)
                    + u64::from(in_struct(ctx.cpum_size.saturating_sub(ctx.cpumcpu0_off))?),
            )?),
            K::EferOrMask => one32(ctx.cpu.efer_or_mask()),
            K::TheEnd => continue,
        };
        code[at..at + bytes.len()].copy_from_slice(&bytes);
        applied.push(Applied {
            record: *rec,
            value,
            len: len.max(bytes.len() as u32),
        });
    }
    let e = &def.entries;
    let rc = |o: u32| RcAddr(ctx.code_rc.0.wrapping_add(o));
    Ok(Relocated {
        applied,
        entries: EntryAddrs {
            r0_host_to_guest_hc: HcAddr(ctx.code_hc.0.wrapping_add(u64::from(e.r0_host_to_guest))),
            rc_guest_to_host: rc(e.rc_guest_to_host),
            rc_call_trampoline: rc(e.rc_call_trampoline),
            rc_guest_to_host_asm: rc(e.rc_guest_to_host_asm),
            rc_guest_to_host_asm_hyper_ctx: rc(e.rc_guest_to_host_asm_hyper_ctx),
            rc_guest_to_host_asm_guest_ctx: rc(e.rc_guest_to_host_asm_guest_ctx),
            rc_guest_to_host_asm_id: PhysAddr(u64::from(id) + u64::from(e.rc_guest_to_host_asm)),
        },
    })
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
