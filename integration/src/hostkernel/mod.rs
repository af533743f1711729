//! The generated host kernel: it plays the embedding hypervisor.
//!
//! [`HostKernelBuilder`] produces a bootable [`Testbed`]: a multiboot image
//! holding a small kernel generated with iced-x86's code assembler, its page
//! tables (built as data by [`crate::paging`]), its GDT/IDT/TSS/LDT, and the
//! caller's blobs (a switcher, a VM structure, …) at the caller's physical
//! addresses, mapped where the caller says.
//!
//! The image is always a 32-bit multiboot kernel. In [`HostMode::Legacy32`]
//! and [`HostMode::Pae`] the whole kernel is 32-bit code; in
//! [`HostMode::Amd64`] a 32-bit boot stub enters long mode and the kernel
//! runs as 64-bit code (see [the AMD64 host](#the-amd64-host)).
//!
//! # What the 32-bit kernel does
//!
//! 1. Loads its own GDT (writable, so a switcher can clear the TSS busy bit),
//!    IDT (vectors 0–31 print `EXC` and exit with 0x12; NMI counts; the APIC
//!    spurious vector counts), `ltr`, `lldt`, and FS from the LDT (a data
//!    segment based at the FS page, whose first dword is [`FS_MAGIC`]).
//! 2. Masks the 8259 PIC, turns on paging in the chosen [`HostMode`]
//!    (CR4 = PGE|OSFXSR|OSXMMEXCPT (+PSE, +PAE); CR0 |= PG|WP|NE|MP|ET|PE),
//!    sets EFER.NXE (if CPUID has NX) and EFER.SCE (if it has SYSCALL or long
//!    mode), SYSENTER_CS = the kernel code selector, COM1 to 115200 8N1.
//! 3. Software-enables the local APIC (SVR = 0x1FF) and programs LINT0, LINT1
//!    and PERF to NMI delivery unmasked and THERM to NMI delivery masked.
//! 4. For each trip and each VCPU (`arg2` value): runs the pre-call hook,
//!    loads EBX/ESI/EDI/EBP with trip-dependent patterns, snapshots the
//!    state ([`items::default_items`]), calls `u32 entry(u32 arg1, u32 arg2)`
//!    (cdecl) with IF=1 between two RDTSCs, snapshots again, compares, checks
//!    the return value ([`Expected`]) and runs the post-call hook.
//! 5. Prints per-VCPU and global counters, dumps the requested regions as hex,
//!    and exits through isa-debug-exit: 0x10 pass, 0x11 fail.
//!
//! Right after the `BOOT` line the kernel checks the CPU features the build
//! needs ([`HostKernelBuilder::require_cpu`]) and stops with a `NOCPU` line
//! without one. Every byte it prints goes into a running CRC-32, printed in
//! a final `CRC` line by the exit routine on every way out (see
//! [`crate::transcript`]).
//!
//! # The AMD64 host
//!
//! With [`HostMode::Amd64`] the 32-bit boot stub checks CPUID for long mode
//! and PAE (a constant `NOCPU` and `CRC` line and the failure code without
//! them), loads the kernel's
//! GDT, sets CR4.PAE|PGE|OSFXSR|OSXMMEXCPT, CR3 (the 4-level tables are
//! data, built by [`crate::paging`], PML4 at [`TABLES_BASE`]), EFER.LME and
//! CR0.PG|WP|NE|MP|ET|PE, and far-jumps to [`SEL64_CODE`]. The 64-bit kernel
//! then:
//!
//! 1. loads its writable GDT (64-bit code [`SEL64_CODE`], data
//!    [`SEL64_DATA`] and an alias [`SEL64_DATA_ALT`], a 16-byte TSS
//!    descriptor [`SEL64_TSS`], a 16-byte LDT descriptor [`SEL64_LDT`], a
//!    32-bit code segment [`SEL64_CODE32`] for compatibility mode, then the
//!    caller's entries from [`SEL64_FIRST_EXTRA`]); a 64-bit IDT (16-byte
//!    gates; exceptions on IST1, NMI on IST2) whose handlers print the same
//!    `EXC` line with 64-bit `eip`/`cr2`; `ltr`, `lldt`;
//! 2. loads DS/ES/SS/FS/GS with [`SEL64_DATA`], then FS.base =
//!    [`FS_BASE64`], GS.base = [`GS_BASE64`] and KERNEL_GS_BASE =
//!    [`KERNEL_GS_BASE64`] through their MSRs (FS.base and GS.base map the
//!    FS page, so `fs:0` reads [`FS_MAGIC`] and `gs:0` reads [`GS_MAGIC`]);
//! 3. sets EFER.NXE/SCE as the 32-bit kernel does, SYSENTER_CS =
//!    [`SEL64_CODE`], STAR = [`STAR_VALUE`], LSTAR = [`LSTAR_VALUE`],
//!    SFMASK = [`SFMASK_VALUE`], CR8 = 0, and programs the local APIC like
//!    the 32-bit kernel;
//! 4. for each trip and VCPU runs the pre-call hook, loads RBX, RBP and
//!    R12–R15 with trip-dependent patterns ([`pattern64`]), snapshots
//!    ([`items::default_items64`]), calls the entry with the System V AMD64
//!    convention, `u32 entry(u64 arg1 /* RDI */, u32 arg2 /* ESI */)`, with
//!    RSP 16-byte aligned at the `call`, DF=0 and IF=1, snapshots again,
//!    compares (64-bit items; `MISMATCH` values are 16 hex digits), checks
//!    EAX (the upper half of RAX is not checked), runs the post-call hook,
//!    and reloads DS/ES/SS/FS/GS and the three base MSRs for the next call.
//!    The callee may clobber RAX, RCX, RDX, RSI, RDI, R8–R11 and the status
//!    flags, as System V allows; everything else is compared.
//!
//! Hooks get a 64-bit [`CodeAssembler`] there ([`HookCtx::bitness`] is 64);
//! every slot is still a 32-bit address in low memory, usable as an
//! absolute `dword_ptr(slot)` operand in both bitnesses.
//!
//! # x2APIC
//!
//! [`HostKernelBuilder::x2apic`] switches the local APIC to x2APIC mode in
//! every host mode (IA32_APIC_BASE.EXTD with EN), when CPUID.1:ECX.x2APIC
//! (bit 21) reports it, programs and reads the LVTs through the x2APIC MSRs
//! (`0x800 + (offset >> 4)`), and snapshots them through MSRs. Without the
//! CPUID bit the kernel prints `@@NOCPU feature=x2apic …` and exits with
//! the failure code before the first call. QEMU 7.2's TCG never reports the
//! bit (and silently ignores EXTD; the x2APIC MSRs read 0 without a fault);
//! QEMU 9.0 and later emulate x2APIC under TCG (checked with 10.0.2 for all
//! three host modes).

mod arena;
mod common;
mod emit;
mod emit64;
pub mod items;
pub mod smp;
pub mod storm;

use std::collections::BTreeMap;
use std::fmt;

use iced_x86::code_asm::{CodeAssembler, CodeLabel};
use iced_x86::IcedError;

pub use arena::DataArena;
pub use items::{
    default_items, default_items64, default_items_x2apic, Seg, SnapItem, SnapItem64, SnapSource,
    SnapSource64, EFLAGS_STATUS_BITS,
};

use crate::image::{ImageError, TempImage};
use crate::paging::{HostMode, PageMap, PageTables, PagingError, Translation, PAGE};
use crate::qemu::{run_image, QemuConfig, QemuError, RunResult};

/// Kernel 32-bit code selector (GDT index 1).
pub const SEL_CODE32: u16 = 0x08;
/// Kernel flat data selector (GDT index 2).
pub const SEL_DATA32: u16 = 0x10;
/// A second flat data selector (GDT index 3): same segment, different value.
pub const SEL_DATA32_ALT: u16 = 0x18;
/// The host's 32-bit TSS (GDT index 4).
pub const SEL_TSS32: u16 = 0x20;
/// The host's LDT (GDT index 5).
pub const SEL_LDT: u16 = 0x28;
/// First selector of caller-supplied GDT entries.
pub const SEL_FIRST_EXTRA: u16 = 0x30;
/// FS: LDT entry 0 (TI = 1, RPL 0), based at the FS page.
pub const SEL_LDT_FS: u16 = 0x04;

/// AMD64 host: kernel 64-bit code selector (GDT index 1, L = 1).
pub const SEL64_CODE: u16 = 0x08;
/// AMD64 host: kernel flat data selector (GDT index 2); also in FS and GS.
pub const SEL64_DATA: u16 = 0x10;
/// AMD64 host: a second flat data selector (GDT index 3).
pub const SEL64_DATA_ALT: u16 = 0x18;
/// AMD64 host: the 64-bit TSS (16-byte descriptor, GDT indexes 4–5).
pub const SEL64_TSS: u16 = 0x20;
/// AMD64 host: the LDT (16-byte descriptor, GDT indexes 6–7).
pub const SEL64_LDT: u16 = 0x30;
/// AMD64 host: a 32-bit code segment (compatibility mode, GDT index 8).
pub const SEL64_CODE32: u16 = 0x40;
/// AMD64 host: first selector of caller-supplied GDT entries.
pub const SEL64_FIRST_EXTRA: u16 = 0x48;

pub use cpum::regs::{
    MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_SFMASK, MSR_STAR,
};

/// AMD64 host: FS.base (maps the FS page: `fs:0` reads [`FS_MAGIC`]).
pub const FS_BASE64: u64 = 0xffff_8000_f5f5_0000;
/// AMD64 host: GS.base (the second half of the FS page: `gs:0` reads [`GS_MAGIC`]).
pub const GS_BASE64: u64 = FS_BASE64 + GS_MAGIC_OFF as u64;
/// AMD64 host: KERNEL_GS_BASE (the user GS base a real kernel keeps there).
pub const KERNEL_GS_BASE64: u64 = 0x0000_7fff_4b47_5000;
/// Offset of [`GS_MAGIC`] in the FS page.
pub const GS_MAGIC_OFF: u32 = 0x800;
/// The dword at [`GS_MAGIC_OFF`] of the FS page.
pub const GS_MAGIC: u32 = 0x6565_abcd;
/// AMD64 host: IA32_STAR (SYSRET CS base 0x23, SYSCALL CS [`SEL64_CODE`], EIP "STAR").
pub const STAR_VALUE: u64 = 0x0023_0008_5354_4152;
/// AMD64 host: IA32_LSTAR (a kernel-looking address, never called).
pub const LSTAR_VALUE: u64 = 0xffff_ffff_8157_a000;
/// AMD64 host: IA32_FMASK (TF, IF, DF, IOPL, NT, AC: what Linux masks).
pub const SFMASK_VALUE: u64 = 0x0004_7700;

/// The CR4 bits [`HostKernelBuilder::cr4_today`] adds to the AMD64 host's.
pub const CR4_TODAY: u64 = cpum::regs::Cr4::SMEP.bits()
    | cpum::regs::Cr4::SMAP.bits()
    | cpum::regs::Cr4::UMIP.bits()
    | cpum::regs::Cr4::PKE.bits()
    | cpum::regs::Cr4::FSGSBASE.bits();
/// PKRU under [`HostKernelBuilder::cr4_today`]: key 0 (every page here)
/// allowed, keys 1–15 access-disabled, as a kernel restricting user keys
/// would have it.
pub const PKRU_TODAY: u32 = 0x5555_5554;
/// The PCID in the AMD64 host's CR3 under [`HostKernelBuilder::pcid`]
/// (CR3 bits 11:0, with CR4.PCIDE set).
pub const HOST_PCID: u64 = 0x05a;
/// CR4.CET (bit 23): control-flow enforcement on; it cannot be set while
/// CR0.WP = 0, nor WP cleared while it is set.
pub const CR4_CET: u64 = 1 << 23;
/// IA32_S_CET: the supervisor CET controls (shadow stack, IBT), snapshot
/// as `s_cet` under [`HostKernelBuilder::cet`].
pub const MSR_S_CET: u32 = 0x6a2;

/// Virtual address of the magic page (mapped only by the host's tables).
pub const MAGIC_VIRT: u32 = 0x4000_0000;
/// First dword of the magic page.
pub const MAGIC_VALUE: u32 = 0xc0ff_ee42;
/// First dword of the FS page.
pub const FS_MAGIC: u32 = 0xf5f5_abcd;

/// Where the local APIC is mapped (identity, PCD).
pub const LAPIC_VIRT: u32 = 0xfee0_0000;
/// Spurious vector the kernel programs (also handled by the IDT).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Entry point (right after the multiboot header).
pub const STUB_ADDR: u32 = crate::image::LOAD_ADDR + crate::image::HEADER_SIZE;
/// Physical address of the magic page.
pub const MAGIC_PAGE_PHYS: u32 = 0x0010_1000;
/// Physical (= virtual) address of the FS page.
pub const FS_PAGE_PHYS: u32 = 0x0010_2000;
/// Physical address of the first page-table page.
pub const TABLES_BASE: u32 = 0x0010_3000;
/// Default end of the identity mapping of low memory (page 0 excluded).
pub const DEFAULT_IDENTITY_LIMIT: u32 = 0x0040_0000;

/// Feature bit in the `HOST features=` field: the CPU has EFER.
pub const FEATURE_EFER: u32 = 1 << 0;
/// The CPU has NX (EFER.NXE set).
pub const FEATURE_NX: u32 = 1 << 1;
/// The CPU has SYSCALL or long mode (EFER.SCE set).
pub const FEATURE_SCE: u32 = 1 << 2;
/// The CPU has SYSENTER (SYSENTER_CS set).
pub const FEATURE_SEP: u32 = 1 << 3;
/// The CPU has a local APIC.
pub const FEATURE_APIC: u32 = 1 << 4;
/// The CPU has x2APIC (CPUID.1:ECX bit 21).
pub const FEATURE_X2APIC: u32 = 1 << 5;
/// The local APIC was switched to x2APIC mode ([`HostKernelBuilder::x2apic`]).
pub const FEATURE_X2APIC_ON: u32 = 1 << 6;

/// A CPU feature the kernel can require before it runs anything
/// ([`HostKernelBuilder::require_cpu`]). Without it the kernel prints a
/// `NOCPU` line naming the feature and the CPUID bit, then its `CRC` line,
/// and exits with the failure code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CpuFeature {
    /// Long mode (CPUID.80000001:EDX bit 29).
    LongMode,
    /// Physical address extension (CPUID.1:EDX bit 6).
    Pae,
    /// FXSAVE/FXRSTOR (CPUID.1:EDX bit 24).
    Fxsr,
    /// SSE2 (CPUID.1:EDX bit 26): the hooks move XMM registers.
    Sse2,
    /// A local APIC (CPUID.1:EDX bit 9).
    Apic,
    /// x2APIC (CPUID.1:ECX bit 21).
    X2apic,
    /// No-execute pages (CPUID.80000001:EDX bit 20).
    Nx,
    /// SYSENTER/SYSEXIT (CPUID.1:EDX bit 11).
    Sep,
    /// SYSCALL/SYSRET (CPUID.80000001:EDX bit 11).
    Syscall,
    /// 5-level paging (CPUID.7.0:ECX bit 16).
    La57,
    /// Supervisor-mode execution prevention (CPUID.7.0:EBX bit 7).
    Smep,
    /// Supervisor-mode access prevention (CPUID.7.0:EBX bit 20).
    Smap,
    /// User-mode instruction prevention (CPUID.7.0:ECX bit 2).
    Umip,
    /// Protection keys for user pages (CPUID.7.0:ECX bit 3).
    Pku,
    /// RDFSBASE and friends (CPUID.7.0:EBX bit 0).
    Fsgsbase,
    /// Process-context identifiers (CPUID.1:ECX bit 17).
    Pcid,
    /// CET shadow stacks (CPUID.7.0:ECX bit 7), which makes CR4.CET
    /// settable.
    CetSs,
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidReg {
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl CpuFeature {
    /// Every feature, in the order the kernel checks them.
    pub const ALL: [CpuFeature; 17] = [
        Self::LongMode,
        Self::Pae,
        Self::Fxsr,
        Self::Sse2,
        Self::Apic,
        Self::X2apic,
        Self::Nx,
        Self::Sep,
        Self::Syscall,
        Self::La57,
        Self::Smep,
        Self::Smap,
        Self::Umip,
        Self::Pku,
        Self::Fsgsbase,
        Self::Pcid,
        Self::CetSs,
    ];

    /// The name the `NOCPU` line carries.
    pub fn name(self) -> &'static str {
        match self {
            Self::LongMode => "long-mode",
            Self::Pae => "pae",
            Self::Fxsr => "fxsr",
            Self::Sse2 => "sse2",
            Self::Apic => "apic",
            Self::X2apic => "x2apic",
            Self::Nx => "nx",
            Self::Sep => "sep",
            Self::Syscall => "syscall",
            Self::La57 => "la57",
            Self::Smep => "smep",
            Self::Smap => "smap",
            Self::Umip => "umip",
            Self::Pku => "pku",
            Self::Fsgsbase => "fsgsbase",
            Self::Pcid => "pcid",
            Self::CetSs => "cet-ss",
        }
    }

    /// QEMU's name of the `-cpu` flag (`+lm`, `-nx`, …) for this feature.
    pub fn qemu_flag(self) -> &'static str {
        match self {
            Self::LongMode => "lm",
            f => f.name(),
        }
    }

    /// The feature a `NOCPU` name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// CPUID leaf, output register and bit.
    pub fn cpuid(self) -> (u32, CpuidReg, u32) {
        match self {
            Self::LongMode => (0x8000_0001, CpuidReg::Edx, 29),
            Self::Pae => (1, CpuidReg::Edx, 6),
            Self::Fxsr => (1, CpuidReg::Edx, 24),
            Self::Sse2 => (1, CpuidReg::Edx, 26),
            Self::Apic => (1, CpuidReg::Edx, 9),
            Self::X2apic => (1, CpuidReg::Ecx, 21),
            Self::Nx => (0x8000_0001, CpuidReg::Edx, 20),
            Self::Sep => (1, CpuidReg::Edx, 11),
            Self::Syscall => (0x8000_0001, CpuidReg::Edx, 11),
            Self::La57 => (7, CpuidReg::Ecx, 16),
            Self::Smep => (7, CpuidReg::Ebx, 7),
            Self::Smap => (7, CpuidReg::Ebx, 20),
            Self::Umip => (7, CpuidReg::Ecx, 2),
            Self::Pku => (7, CpuidReg::Ecx, 3),
            Self::Fsgsbase => (7, CpuidReg::Ebx, 0),
            Self::Pcid => (1, CpuidReg::Ecx, 17),
            Self::CetSs => (7, CpuidReg::Ecx, 7),
        }
    }

    /// Where CPUID reports the feature, as the `NOCPU` and `CPUEXTRA` lines
    /// spell it: `leaf.register.bit` (e.g. `80000001.edx.20`).
    pub fn cpuid_text(self) -> String {
        let (leaf, reg, bit) = self.cpuid();
        let reg = match reg {
            CpuidReg::Ebx => "ebx",
            CpuidReg::Ecx => "ecx",
            CpuidReg::Edx => "edx",
        };
        format!("{leaf:08x}.{reg}.{bit}")
    }

    /// The `NOCPU` line (with its newline) for this feature.
    pub fn refusal_line(self) -> String {
        format!(
            "{}NOCPU feature={} cpuid={}\n",
            crate::transcript::PREFIX,
            self.name(),
            self.cpuid_text()
        )
    }

    /// The `CPUEXTRA` line (with its newline): the CPU has this feature
    /// although the image was built (relocated) for a CPU without it.
    pub fn extra_line(self) -> String {
        format!(
            "{}CPUEXTRA feature={} cpuid={}\n",
            crate::transcript::PREFIX,
            self.name(),
            self.cpuid_text()
        )
    }
}

/// Seed of [`cookie`].
pub const COOKIE_SEED: u32 = 0x5eed_c0de;
/// EBX pattern: `cookie ^ PATTERN_EBX` is in EBX at the call.
pub const PATTERN_EBX: u32 = 0xb0b0_b0b0;
/// ESI pattern.
pub const PATTERN_ESI: u32 = 0x5151_5151;
/// EDI pattern.
pub const PATTERN_EDI: u32 = 0xd1d1_d1d1;
/// EBP pattern.
pub const PATTERN_EBP: u32 = 0xbebe_bebe;

/// The cookie the kernel computes for `(trip, vcpu)` and writes to its cookie
/// slot (and to [`HostKernelBuilder::cookie_at`]) before each call.
pub const fn cookie(trip: u32, vcpu: u32) -> u32 {
    trip.wrapping_mul(0x9e37_79b9) ^ vcpu.wrapping_mul(0x85eb_ca6b) ^ COOKIE_SEED
}

/// AMD64 host: RBX pattern (see [`pattern64`]).
pub const PATTERN_RBX: u64 = 0xb0b0_b0b0_0b0b_0b0b;
/// AMD64 host: RBP pattern.
pub const PATTERN_RBP: u64 = 0xbebe_bebe_ebeb_ebeb;
/// AMD64 host: R12 pattern.
pub const PATTERN_R12: u64 = 0x1212_1212_2121_2121;
/// AMD64 host: R13 pattern.
pub const PATTERN_R13: u64 = 0x1313_1313_3131_3131;
/// AMD64 host: R14 pattern.
pub const PATTERN_R14: u64 = 0x1414_1414_4141_4141;
/// AMD64 host: R15 pattern.
pub const PATTERN_R15: u64 = 0x1515_1515_5151_5151;

/// AMD64 host: the value a callee-saved register holds at the call, for a
/// trip's cookie: `(cookie << 32 | !cookie) ^ pattern`.
pub const fn pattern64(cookie: u32, pattern: u64) -> u64 {
    (((cookie as u64) << 32) | (!cookie) as u64) ^ pattern
}

/// A caller mapping in the host page tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Name for errors and listings.
    pub name: String,
    /// Host-virtual address (page aligned).
    pub virt: u32,
    /// Physical address (page aligned).
    pub phys: u32,
    /// Length in bytes (rounded up to pages).
    pub len: u32,
    /// Writable (CR0.WP is set, so read-only holds in ring 0 too).
    pub writable: bool,
}

/// A caller mapping with a 64-bit virtual address (any canonical address in
/// [`HostMode::Amd64`], e.g. a switcher at `0xffff_ffff_c040_0000`; below
/// 4 GiB in the 32-bit modes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping64 {
    /// Name for errors and listings.
    pub name: String,
    /// Host-virtual address (page aligned, canonical).
    pub virt: u64,
    /// Physical address (page aligned).
    pub phys: u32,
    /// Length in bytes (rounded up to pages).
    pub len: u32,
    /// Writable (CR0.WP is set, so read-only holds in ring 0 too).
    pub writable: bool,
}

impl From<Mapping> for Mapping64 {
    fn from(m: Mapping) -> Self {
        Self {
            name: m.name,
            virt: u64::from(m.virt),
            phys: m.phys,
            len: m.len,
            writable: m.writable,
        }
    }
}

/// A dump region with a 64-bit host-virtual address
/// ([`HostKernelBuilder::dump64`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpRegion64 {
    /// Name (one token).
    pub name: String,
    /// Host-virtual address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A region the kernel prints as hex at the end of the run (and, by default,
/// after an exception).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpRegion {
    /// Name (one token).
    pub name: String,
    /// Host-virtual address.
    pub addr: u32,
    /// Length in bytes.
    pub len: u32,
}

/// What the hooks see: where the loop keeps its state, and the kernel's print
/// routines. Every slot is a host-virtual (= physical) address below 2 GiB
/// (a `u32`), so `dword_ptr(slot)` works as an absolute operand in 32-bit
/// and in 64-bit code.
///
/// Hooks may clobber every general register except ESP/RSP, must leave the
/// stack balanced, and run with DS = ES = the kernel data selector. In
/// [`HostMode::Amd64`] hooks are emitted into the 64-bit kernel:
/// [`HookCtx::bitness`] is 64, the assembler is a 64-bit one, RSP is 16-byte
/// aligned at the hook's first instruction, `puts` takes RSI, and
/// [`HookCtx::arg1_slot`] holds a qword.
pub struct HookCtx<'a> {
    /// Bitness of the code the hook is emitted into: 32, or 64 in [`HostMode::Amd64`].
    pub bitness: u32,
    /// Current trip index.
    pub trip_slot: u32,
    /// Current VCPU index (into the `vcpus` list).
    pub vcpu_slot: u32,
    /// `arg1` for this call (a pre-call hook may overwrite it). A dword in
    /// the 32-bit kernels; a qword (RDI) in [`HostMode::Amd64`].
    pub arg1_slot: u32,
    /// `arg2` for this call (a pre-call hook may overwrite it).
    pub arg2_slot: u32,
    /// The cookie for this call.
    pub cookie_slot: u32,
    /// The value the entry returned (valid in the post-call hook).
    pub ret_slot: u32,
    /// RDTSC delta of the call (valid in the post-call hook).
    pub tsc_delta_slot: u32,
    /// Store a non-zero code here to fail this call (`HOOKFAIL`).
    pub hook_fail_slot: u32,
    /// `putc`: prints AL; preserves all registers.
    pub putc: CodeLabel,
    /// `puts`: prints the NUL-terminated string at ESI (RSI in 64-bit code);
    /// preserves all registers.
    pub puts: CodeLabel,
    /// `puthex`: prints EAX as 8 hex digits; preserves all registers.
    pub puthex: CodeLabel,
    /// `puthex64`: prints EDX:EAX (32-bit code) or RAX (64-bit code) as 16
    /// hex digits; preserves all registers.
    pub puthex64: CodeLabel,
    /// `putdec`: prints EAX in decimal; preserves all registers.
    pub putdec: CodeLabel,
    /// `putnl`: prints a newline; preserves all registers.
    pub putnl: CodeLabel,
    arena: &'a mut DataArena,
}

impl fmt::Debug for HookCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookCtx")
            .field("bitness", &self.bitness)
            .field("trip_slot", &format_args!("{:#x}", self.trip_slot))
            .field("vcpu_slot", &format_args!("{:#x}", self.vcpu_slot))
            .field("ret_slot", &format_args!("{:#x}", self.ret_slot))
            .finish_non_exhaustive()
    }
}

impl HookCtx<'_> {
    /// Allocates initialised data in the kernel's data area; returns its address.
    pub fn alloc(&mut self, bytes: &[u8], align: u32) -> u32 {
        self.arena.bytes(bytes, align)
    }

    /// A NUL-terminated string in the kernel's data area.
    pub fn string(&mut self, s: &str) -> u32 {
        self.arena.string(s)
    }

    /// Emits code printing `text` (no newline); preserves all registers.
    pub fn emit_print(&mut self, a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
        use iced_x86::code_asm::{esi, rsi};
        let addr = self.arena.string(text);
        if self.bitness == 64 {
            a.push(rsi)?;
            a.mov(esi, addr)?;
            a.call(self.puts)?;
            a.pop(rsi)
        } else {
            a.push(esi)?;
            a.mov(esi, addr)?;
            a.call(self.puts)?;
            a.pop(esi)
        }
    }

    /// Emits code printing a `LOG <text>` protocol line.
    pub fn emit_log(&mut self, a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
        self.emit_print(a, &format!("{}LOG {text}\n", crate::transcript::PREFIX))
    }
}

/// A code hook: emits machine code into the kernel's call loop.
pub type HookFn = Box<dyn FnMut(&mut CodeAssembler, &mut HookCtx<'_>) -> Result<(), IcedError>>;

/// How the kernel checks the entry's return value.
pub enum Expected {
    /// Not checked.
    Any,
    /// Must equal this value.
    Value(u32),
    /// Must equal `cookie ^ k` (see [`cookie`]).
    CookieXor(u32),
    /// Emitted code leaves the expected value in EAX (the returned value is
    /// in the `ret_slot`).
    Code(HookFn),
}

impl fmt::Debug for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Any => f.write_str("Any"),
            Expected::Value(v) => write!(f, "Value({v:#010x})"),
            Expected::CookieXor(k) => write!(f, "CookieXor({k:#010x})"),
            Expected::Code(_) => f.write_str("Code(..)"),
        }
    }
}

/// Why a testbed cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Placing a blob failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A mapping failed.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// iced-x86 refused an instruction or could not assemble.
    #[error("code generation failed: {0}")]
    Asm(#[from] IcedError),
    /// No entry address was given.
    #[error("no entry address: call `HostKernelBuilder::entry`")]
    MissingEntry,
    /// The VCPU list is empty.
    #[error("the VCPU list is empty: call `HostKernelBuilder::vcpus` with at least one arg2")]
    NoVcpus,
    /// Zero trips.
    #[error("trip count must be at least 1, got {0}")]
    ZeroTrips(u32),
    /// A host CPU count outside 1..=[`smp::MAX_CPUS`], or above the VCPU
    /// count (every CPU runs at least one VCPU).
    #[error("host CPUs must be 1 to {max} and at most the VCPU count ({vcpus}), got {cpus}")]
    BadCpus {
        /// The CPU count asked for.
        cpus: u32,
        /// The VCPU count.
        vcpus: u32,
        /// [`smp::MAX_CPUS`].
        max: u32,
    },
    /// Several host CPUs with a feature the multiprocessor kernel lacks.
    #[error("several host CPUs cannot be combined with {0}")]
    SmpUnsupported(&'static str),
    /// Several host CPUs, the NMI storm and no deadlines: the storm's PIT
    /// makes the deadlines that interleave the CPUs, it cannot leave them off.
    #[error(
        "the NMI storm on several host CPUs runs the PIT, whose deadlines interleave the CPUs: \
         it cannot be combined with running them without deadlines"
    )]
    StormWithoutDeadlines,
    /// A skip names no snapshot item.
    #[error("no snapshot item is named `{0}`")]
    UnknownItem(String),
    /// Two snapshot items share a name.
    #[error("two snapshot items are named `{0}`")]
    DuplicateItem(String),
    /// A name cannot be printed as one token.
    #[error("{what} name `{name}` must be one printable token without `=` or `@`")]
    BadName {
        /// What is named.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A dump region has no bytes.
    #[error("dump region `{name}` at {addr:#010x} is empty")]
    EmptyDump {
        /// Region name.
        name: String,
        /// Its address.
        addr: u64,
    },
    /// An address the kernel uses is not mapped by the host tables.
    #[error("{what} at {addr:#010x} is not mapped by the host page tables")]
    Unmapped {
        /// What the address is.
        what: String,
        /// The address.
        addr: u64,
    },
    /// An address the kernel writes is mapped read-only.
    #[error("{what} at {addr:#010x} is mapped read-only")]
    ReadOnly {
        /// What the address is.
        what: String,
        /// The address.
        addr: u64,
    },
    /// [`HostKernelBuilder::la57`] for a 32-bit host.
    #[error("5-level paging (CR4.LA57) is built for AMD64 hosts only, not {0}")]
    La57NeedsAmd64(HostMode),
    /// [`HostKernelBuilder::cr4_today`], [`HostKernelBuilder::pcid`] or
    /// [`HostKernelBuilder::cet`] for a 32-bit host.
    #[error("today's CR4 (SMEP, SMAP, UMIP, PKE, FSGSBASE, PCIDE, CET) is built for AMD64 hosts only, not {0}")]
    Cr4TodayNeedsAmd64(HostMode),
    /// A 64-bit value given to a 32-bit host (`entry64`, `arg1_64`,
    /// `cookie_at64`, `dump64` above 4 GiB in [`HostMode::Legacy32`] or
    /// [`HostMode::Pae`]).
    #[error("{what} {value:#x} does not fit the 32-bit {mode} host")]
    TooWide {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: u64,
        /// The host mode.
        mode: HostMode,
    },
    /// A snapshot item of the wrong width: [`SnapItem`] in an AMD64 host or
    /// [`SnapItem64`] in a 32-bit host.
    #[error(
        "snapshot item `{name}` is for a {width}-bit kernel, but the {mode} host kernel is not"
    )]
    ItemWidth {
        /// Item name.
        name: String,
        /// The item's width (32 or 64).
        width: u32,
        /// The host mode.
        mode: HostMode,
    },
    /// The identity limit is not a page multiple in (kernel end, 64 MiB].
    #[error("identity limit {0:#010x} must be page aligned and at most 64 MiB")]
    BadIdentityLimit(u32),
    /// The kernel outgrew its identity mapping.
    #[error("the kernel ends at {end:#010x}, beyond the identity-mapped limit {limit:#010x}")]
    KernelTooLarge {
        /// Kernel end.
        end: u32,
        /// Identity limit.
        limit: u32,
    },
    /// Too many GDT entries for a 16-bit selector.
    #[error("{0} extra GDT entries do not fit in a GDT")]
    GdtTooLarge(usize),
    /// A `BOOT` line field is not one `key=value` token.
    #[error("BOOT line field `{key}={value}`: keys are [a-z0-9_]+, values one printable token without `=` or `@`")]
    BadBootField {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// A bug in this crate (a generated address left the data area).
    #[error("internal testbed error: {0}")]
    Internal(String),
}

/// Builds a [`Testbed`].
pub struct HostKernelBuilder {
    pub(crate) mode: HostMode,
    pub(crate) pse: bool,
    pub(crate) trips: u32,
    pub(crate) arg1: u64,
    pub(crate) vcpus: Vec<u32>,
    pub(crate) entry: Option<u64>,
    pub(crate) expected: Expected,
    pub(crate) cookie_addr: Option<u64>,
    pub(crate) cookie_stride: u32,
    pub(crate) mappings: Vec<Mapping64>,
    pub(crate) blobs: Vec<(String, u32, Vec<u8>)>,
    pub(crate) dumps: Vec<DumpRegion64>,
    pub(crate) skip: Vec<String>,
    pub(crate) extra_items: Vec<SnapItem>,
    pub(crate) extra_items64: Vec<SnapItem64>,
    pub(crate) x2apic: bool,
    pub(crate) pre_hook: Option<HookFn>,
    pub(crate) post_hook: Option<HookFn>,
    pub(crate) trace_trips: u32,
    pub(crate) max_report_lines: u32,
    pub(crate) stop_on_failure: bool,
    pub(crate) allow_nmis: bool,
    pub(crate) extra_gdt: Vec<u64>,
    pub(crate) dump_on_exception: bool,
    pub(crate) identity_limit: u32,
    pub(crate) boot_fields: Vec<(String, String)>,
    pub(crate) required: Vec<CpuFeature>,
    pub(crate) forbidden: Vec<CpuFeature>,
    pub(crate) cr4_today: bool,
    pub(crate) pcid: bool,
    pub(crate) cet: bool,
    pub(crate) la57: bool,
    pub(crate) storm: Option<storm::NmiStorm>,
    pub(crate) cpus: u32,
    pub(crate) deadlines: bool,
}

impl fmt::Debug for HostKernelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostKernelBuilder")
            .field("mode", &self.mode)
            .field("x2apic", &self.x2apic)
            .field("trips", &self.trips)
            .field("vcpus", &self.vcpus)
            .field("entry", &self.entry)
            .field("expected", &self.expected)
            .field("mappings", &self.mappings)
            .field("dumps", &self.dumps)
            .finish_non_exhaustive()
    }
}

impl HostKernelBuilder {
    /// A kernel for `mode`: 1 trip, no VCPUs, no entry yet, return value not
    /// checked, stop at the first failing call, 64 report lines, `TRIP` lines
    /// for the first 2 trips, dumps after exceptions.
    pub fn new(mode: HostMode) -> Self {
        Self {
            mode,
            pse: false,
            trips: 1,
            arg1: 0,
            vcpus: Vec::new(),
            entry: None,
            expected: Expected::Any,
            cookie_addr: None,
            cookie_stride: 0,
            mappings: Vec::new(),
            blobs: Vec::new(),
            dumps: Vec::new(),
            skip: Vec::new(),
            extra_items: Vec::new(),
            extra_items64: Vec::new(),
            x2apic: false,
            pre_hook: None,
            post_hook: None,
            trace_trips: 2,
            max_report_lines: 64,
            stop_on_failure: true,
            allow_nmis: false,
            extra_gdt: Vec::new(),
            dump_on_exception: true,
            identity_limit: DEFAULT_IDENTITY_LIMIT,
            boot_fields: Vec::new(),
            required: Vec::new(),
            forbidden: Vec::new(),
            cr4_today: false,
            pcid: false,
            cet: false,
            la57: false,
            storm: None,
            cpus: 1,
            deadlines: true,
        }
    }

    /// [`HostMode::Amd64`] only: run the host with 5-level paging. The
    /// boot stub checks CPUID.(EAX=7,ECX=0):ECX.LA57 (bit 16; a `NOCPU`
    /// line without it) and sets CR4.LA57 before it turns paging on with
    /// EFER.LME; the host tables get a PML5 ([`PageMap::new_la57`]), so
    /// mappings may use addresses canonical in 57 bits (e.g.
    /// `0xff00_0000_c040_0000`). The 32-bit hosts refuse it
    /// ([`BuildError::La57NeedsAmd64`]).
    pub fn la57(mut self, on: bool) -> Self {
        self.la57 = on;
        self
    }

    /// [`HostMode::Amd64`] only: run the host as current kernels do, with
    /// CR4.SMEP, SMAP, UMIP, PKE (PKRU = [`PKRU_TODAY`]) and FSGSBASE set
    /// ([`CR4_TODAY`]), and snapshot PKRU (`pkru`) around every call. The
    /// kernel then requires those CPU features (`NOCPU` without one). The
    /// 32-bit hosts refuse it ([`BuildError::Cr4TodayNeedsAmd64`]).
    pub fn cr4_today(mut self, on: bool) -> Self {
        self.cr4_today = on;
        self
    }

    /// [`HostMode::Amd64`] only: run the host with CR4.PCIDE set and
    /// [`HOST_PCID`] in CR3 bits 11:0 (PCIDE is set in IA-32e mode with
    /// CR3 bits 11:0 clear, then CR3 is loaded with the PCID). The kernel then
    /// requires PCID (`NOCPU` without it). The 32-bit hosts refuse it
    /// ([`BuildError::Cr4TodayNeedsAmd64`]).
    pub fn pcid(mut self, on: bool) -> Self {
        self.pcid = on;
        self
    }

    /// [`HostMode::Amd64`] only: run the host with CR4.CET set ([`CR4_CET`];
    /// CR0.WP is on already) and IA32_S_CET left 0 — no supervisor shadow
    /// stack or IBT is enabled — and snapshot IA32_S_CET (`s_cet`) around
    /// every call. The kernel then requires CET_SS (`NOCPU` without it).
    /// The 32-bit hosts refuse it ([`BuildError::Cr4TodayNeedsAmd64`]).
    pub fn cet(mut self, on: bool) -> Self {
        self.cet = on;
        self
    }

    /// Appends `key=value` fields to the `BOOT` line (after `entry`), e.g.
    /// what the image was built for. Keys are lowercase letters, digits and
    /// `_`; values are one printable token without `=` or `@`
    /// ([`BuildError::BadBootField`] otherwise).
    pub fn boot_fields(mut self, fields: impl IntoIterator<Item = (String, String)>) -> Self {
        self.boot_fields.extend(fields);
        self
    }

    /// CPU features the kernel checks with CPUID right after the `BOOT` line
    /// (the AMD64 host's boot stub checks [`CpuFeature::Pae`] and
    /// [`CpuFeature::LongMode`] before it leaves 32-bit mode). The kernel
    /// always requires [`CpuFeature::Fxsr`] and [`CpuFeature::Apic`], PAE in
    /// [`HostMode::Pae`], PAE and long mode in [`HostMode::Amd64`], and
    /// x2APIC with [`HostKernelBuilder::x2apic`].
    pub fn require_cpu(mut self, features: impl IntoIterator<Item = CpuFeature>) -> Self {
        self.required.extend(features);
        self
    }

    /// CPU features the kernel refuses to run with (after the required
    /// ones are checked): for each one CPUID reports, it prints a
    /// `CPUEXTRA` line naming it, then its `CRC` line, and exits with the
    /// failure code. For code built for a CPU without the feature (e.g. no
    /// SYSENTER), which is only right on such a CPU. A feature both
    /// required and forbidden is required.
    pub fn forbid_cpu(mut self, features: impl IntoIterator<Item = CpuFeature>) -> Self {
        self.forbidden.extend(features);
        self
    }

    /// Every feature the kernel refuses, each once, in [`CpuFeature::ALL`] order.
    pub fn forbidden_cpu(&self) -> Vec<CpuFeature> {
        let required = self.required_cpu();
        CpuFeature::ALL
            .into_iter()
            .filter(|f| self.forbidden.contains(f) && !required.contains(f))
            .collect()
    }

    /// Every feature the kernel checks, each once, in [`CpuFeature::ALL`] order.
    pub fn required_cpu(&self) -> Vec<CpuFeature> {
        let mut want = self.required.clone();
        want.extend([CpuFeature::Fxsr, CpuFeature::Apic]);
        if self.mode != HostMode::Legacy32 {
            want.push(CpuFeature::Pae);
        }
        if self.mode.is_long() {
            want.push(CpuFeature::LongMode);
        }
        if self.x2apic {
            want.push(CpuFeature::X2apic);
        }
        if self.la57 {
            want.push(CpuFeature::La57);
        }
        if self.cr4_today {
            want.extend([
                CpuFeature::Smep,
                CpuFeature::Smap,
                CpuFeature::Umip,
                CpuFeature::Pku,
                CpuFeature::Fsgsbase,
            ]);
        }
        if self.pcid {
            want.push(CpuFeature::Pcid);
        }
        if self.cet {
            want.push(CpuFeature::CetSs);
        }
        CpuFeature::ALL
            .into_iter()
            .filter(|f| want.contains(f))
            .collect()
    }

    /// Sets CR4.PSE as well (the tables still use 4 KiB pages).
    pub fn pse(mut self, on: bool) -> Self {
        self.pse = on;
        self
    }

    /// Number of trips (each calls the entry once per VCPU).
    pub fn trips(mut self, n: u32) -> Self {
        self.trips = n;
        self
    }

    /// The `arg1` passed on every call (e.g. the HC address of the VM).
    pub fn arg1(mut self, value: u32) -> Self {
        self.arg1 = u64::from(value);
        self
    }

    /// A 64-bit `arg1` (RDI in [`HostMode::Amd64`], e.g. the VM at a high
    /// canonical HC address). The 32-bit hosts refuse values above 4 GiB
    /// ([`BuildError::TooWide`]).
    pub fn arg1_64(mut self, value: u64) -> Self {
        self.arg1 = value;
        self
    }

    /// The `arg2` values, one per VCPU, called in this order each trip.
    pub fn vcpus(mut self, arg2s: impl IntoIterator<Item = u32>) -> Self {
        self.vcpus = arg2s.into_iter().collect();
        self
    }

    /// Host-virtual address of `u32 entry(u32 arg1, u32 arg2)` (cdecl) in
    /// the 32-bit hosts, or of `u32 entry(u64 arg1, u32 arg2)` (System V
    /// AMD64: RDI, ESI; result in EAX) in [`HostMode::Amd64`].
    pub fn entry(mut self, hc_addr: u32) -> Self {
        self.entry = Some(u64::from(hc_addr));
        self
    }

    /// [`HostKernelBuilder::entry`] at a 64-bit host-virtual address.
    pub fn entry64(mut self, hc_addr: u64) -> Self {
        self.entry = Some(hc_addr);
        self
    }

    /// How to check the return value.
    pub fn expect(mut self, expected: Expected) -> Self {
        self.expected = expected;
        self
    }

    /// Also write the cookie to this host-virtual address before each call.
    pub fn cookie_at(mut self, hc_addr: u32) -> Self {
        self.cookie_addr = Some(u64::from(hc_addr));
        self
    }

    /// [`HostKernelBuilder::cookie_at`] at a 64-bit host-virtual address.
    pub fn cookie_at64(mut self, hc_addr: u64) -> Self {
        self.cookie_addr = Some(hc_addr);
        self
    }

    /// Writes the cookie of the VCPU at index `i` (into the `vcpus` list)
    /// to the [`HostKernelBuilder::cookie_at`] address plus `i * stride`
    /// (one far-side mailbox per VCPU); 0, the default, is one address for all.
    pub fn cookie_stride(mut self, stride: u32) -> Self {
        self.cookie_stride = stride;
        self
    }

    /// Adds a mapping to the host page tables.
    pub fn map(mut self, mapping: Mapping) -> Self {
        self.mappings.push(mapping.into());
        self
    }

    /// Adds a mapping with a 64-bit virtual address to the host page tables.
    pub fn map64(mut self, mapping: Mapping64) -> Self {
        self.mappings.push(mapping);
        self
    }

    /// Places `bytes` at physical `phys` in the image (not mapped by itself).
    pub fn blob(mut self, name: &str, phys: u32, bytes: Vec<u8>) -> Self {
        self.blobs.push((name.to_owned(), phys, bytes));
        self
    }

    /// Places `bytes` at physical `phys` and maps them at host-virtual `virt`.
    pub fn blob_mapped(
        self,
        name: &str,
        phys: u32,
        virt: u32,
        bytes: Vec<u8>,
        writable: bool,
    ) -> Self {
        self.blob_mapped64(name, phys, u64::from(virt), bytes, writable)
    }

    /// [`HostKernelBuilder::blob_mapped`] at a 64-bit host-virtual address.
    pub fn blob_mapped64(
        mut self,
        name: &str,
        phys: u32,
        virt: u64,
        bytes: Vec<u8>,
        writable: bool,
    ) -> Self {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.mappings.push(Mapping64 {
            name: name.to_owned(),
            virt,
            phys,
            len,
            writable,
        });
        self.blobs.push((name.to_owned(), phys, bytes));
        self
    }

    /// Dumps `len` bytes at host-virtual `addr` as hex at the end of the run.
    pub fn dump(self, name: &str, addr: u32, len: u32) -> Self {
        self.dump64(name, u64::from(addr), len)
    }

    /// [`HostKernelBuilder::dump`] at a 64-bit host-virtual address (the
    /// `DUMP` line then carries 16 hex digits; see [`crate::transcript::Dump::addr64`]).
    pub fn dump64(mut self, name: &str, addr: u64, len: u32) -> Self {
        self.dumps.push(DumpRegion64 {
            name: name.to_owned(),
            addr,
            len,
        });
        self
    }

    /// Excludes a snapshot item (by name) from the comparison; its index stays.
    pub fn skip_item(mut self, name: &str) -> Self {
        self.skip.push(name.to_owned());
        self
    }

    /// Appends a snapshot item after the default ones (32-bit hosts only;
    /// see [`HostKernelBuilder::snapshot_item64`]).
    pub fn snapshot_item(mut self, item: SnapItem) -> Self {
        self.extra_items.push(item);
        self
    }

    /// Appends a 64-bit snapshot item after the default ones
    /// ([`HostMode::Amd64`] only).
    pub fn snapshot_item64(mut self, item: SnapItem64) -> Self {
        self.extra_items64.push(item);
        self
    }

    /// Switch the local APIC to x2APIC mode and access it through MSRs
    /// (see [the module docs](self#x2apic)); fails the run with an `ERROR`
    /// line when CPUID does not report x2APIC.
    pub fn x2apic(mut self, on: bool) -> Self {
        self.x2apic = on;
        self
    }

    /// Code run before each call (before the snapshot).
    pub fn pre_call(
        mut self,
        hook: impl FnMut(&mut CodeAssembler, &mut HookCtx<'_>) -> Result<(), IcedError> + 'static,
    ) -> Self {
        self.pre_hook = Some(Box::new(hook));
        self
    }

    /// Code run after each call (after the checks).
    pub fn post_call(
        mut self,
        hook: impl FnMut(&mut CodeAssembler, &mut HookCtx<'_>) -> Result<(), IcedError> + 'static,
    ) -> Self {
        self.post_hook = Some(Box::new(hook));
        self
    }

    /// Print a `TRIP` line for trips below `n`.
    pub fn trace_trips(mut self, n: u32) -> Self {
        self.trace_trips = n;
        self
    }

    /// At most `n` `MISMATCH`/`RETFAIL`/`HOOKFAIL` lines (all are counted).
    pub fn max_report_lines(mut self, n: u32) -> Self {
        self.max_report_lines = n;
        self
    }

    /// Stop the loop after the first call that failed a check.
    pub fn stop_on_failure(mut self, on: bool) -> Self {
        self.stop_on_failure = on;
        self
    }

    /// Do not fail the run because NMIs arrived.
    pub fn allow_nmis(mut self, on: bool) -> Self {
        self.allow_nmis = on;
        self
    }

    /// Appends a raw descriptor to the host GDT (selectors from
    /// [`SEL_FIRST_EXTRA`], or [`SEL64_FIRST_EXTRA`] in [`HostMode::Amd64`]).
    pub fn gdt_entry(mut self, descriptor: u64) -> Self {
        self.extra_gdt.push(descriptor);
        self
    }

    /// Print the dump regions after an exception too (default on).
    pub fn dump_on_exception(mut self, on: bool) -> Self {
        self.dump_on_exception = on;
        self
    }

    /// Identity-map low memory `[4 KiB, limit)` instead of `[4 KiB, 4 MiB)`.
    pub fn identity_limit(mut self, limit: u32) -> Self {
        self.identity_limit = limit;
        self
    }

    /// Generates the kernel and the image.
    pub fn build(self) -> Result<Testbed, BuildError> {
        if self.mode.is_long() {
            emit64::build(self)
        } else if self.la57 {
            Err(BuildError::La57NeedsAmd64(self.mode))
        } else if self.cr4_today || self.pcid || self.cet {
            Err(BuildError::Cr4TodayNeedsAmd64(self.mode))
        } else {
            emit::build(self)
        }
    }
}

/// One range of the physical layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutRegion {
    /// What lives there.
    pub name: String,
    /// First byte.
    pub start: u32,
    /// One past the last byte.
    pub end: u32,
}

/// Addresses of the kernel's parts (all identity-mapped unless noted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelAddrs {
    /// Multiboot entry (the boot stub).
    pub entry: u32,
    /// Start of the generated code.
    pub code: u32,
    /// End of the generated code.
    pub code_end: u32,
    /// Host CR3.
    pub cr3: u32,
    /// The GDT.
    pub gdt: u32,
    /// GDT limit.
    pub gdt_limit: u16,
    /// The IDT (256 gates; 16-byte gates in [`HostMode::Amd64`]).
    pub idt: u32,
    /// The TSS (a 64-bit TSS in [`HostMode::Amd64`]).
    pub tss: u32,
    /// The LDT.
    pub ldt: u32,
    /// Physical address of the magic page (virtual [`MAGIC_VIRT`]).
    pub magic_page: u32,
    /// The FS page.
    pub fs_page: u32,
    /// Trip index slot.
    pub trip: u32,
    /// VCPU index slot.
    pub vcpu: u32,
    /// arg1 slot.
    pub arg1: u32,
    /// arg2 slot.
    pub arg2: u32,
    /// Cookie slot.
    pub cookie: u32,
    /// Return-value slot.
    pub ret: u32,
    /// Hook failure slot.
    pub hook_fail: u32,
    /// NMI counter.
    pub nmi_count: u32,
    /// Snapshot before the call (one dword per item).
    pub snap_before: u32,
    /// Snapshot after the call.
    pub snap_after: u32,
    /// Top of the kernel stack.
    pub stack_top: u32,
    /// End of everything the kernel occupies.
    pub kernel_end: u32,
}

/// A built image plus everything needed to run and debug it.
#[derive(Clone)]
pub struct Testbed {
    /// Host paging mode.
    pub mode: HostMode,
    /// The multiboot image.
    pub image: Vec<u8>,
    /// Label and data names → addresses (for gdb and listings).
    pub symbols: BTreeMap<String, u32>,
    /// Physical layout, sorted by address (kernel parts and caller blobs).
    pub layout: Vec<LayoutRegion>,
    /// Kernel addresses.
    pub addrs: KernelAddrs,
    /// Snapshot item names by index.
    pub items: Vec<String>,
    /// The host page tables as placed in the image.
    pub page_tables: PageTables,
    /// Trips configured.
    pub trips: u32,
    /// `arg2` per VCPU.
    pub vcpus: Vec<u32>,
    /// `TRIP` lines are printed for trips below this.
    pub trace_trips: u32,
    /// At most this many `MISMATCH`/`RETFAIL`/`HOOKFAIL` lines.
    pub max_report_lines: u32,
    /// The dump regions, in the order the kernel prints them.
    pub dumps: Vec<DumpRegion64>,
    /// The fields the `BOOT` line carries after `entry`.
    pub boot_fields: Vec<(String, String)>,
    /// The CPU features the kernel checks before it runs.
    pub required_cpu: Vec<CpuFeature>,
    /// The CPU features the kernel refuses to run with.
    pub forbidden_cpu: Vec<CpuFeature>,
    /// Host CPUs ([`HostKernelBuilder::cpus`]).
    pub cpus: u32,
}

impl fmt::Debug for Testbed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Testbed")
            .field("mode", &self.mode)
            .field("image_len", &self.image.len())
            .field("layout", &self.layout)
            .field("addrs", &self.addrs)
            .field("items", &self.items.len())
            .field("trips", &self.trips)
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

impl Testbed {
    /// Writes the image to a temporary file (removed when dropped).
    pub fn write_image(&self) -> std::io::Result<TempImage> {
        TempImage::write(&self.image)
    }

    /// Boots the image under QEMU.
    pub fn run(&self, config: &QemuConfig) -> Result<RunResult, QemuError> {
        let config = &QemuConfig {
            smp: self.cpus,
            ..config.clone()
        };
        let image = self.write_image().map_err(QemuError::WriteImage)?;
        run_image(image.path(), config)
    }

    /// Address of a symbol.
    pub fn symbol(&self, name: &str) -> Option<u32> {
        self.symbols.get(name).copied()
    }

    /// Index of a snapshot item.
    pub fn item_index(&self, name: &str) -> Option<usize> {
        self.items.iter().position(|n| n == name)
    }

    /// Walks the host page tables for `virt`.
    pub fn translate(&self, virt: u32) -> Option<Translation> {
        self.page_tables.translate(virt)
    }

    /// Walks the host page tables for a 64-bit `virt`.
    pub fn translate64(&self, virt: u64) -> Option<Translation> {
        self.page_tables.translate64(virt)
    }

    /// gdb commands for a run with [`QemuConfig::gdb`]: connect to QEMU's
    /// gdbstub and define `$name` for every symbol (e.g. `hbreak *$call_site`).
    pub fn gdb_commands(&self) -> String {
        let arch = if self.mode.is_long() {
            "i386:x86-64"
        } else {
            "i386"
        };
        let mut out = format!("set architecture {arch}\ntarget remote :1234\n");
        for (name, addr) in &self.symbols {
            out.push_str(&format!("set ${name} = {addr:#010x}\n"));
        }
        out
    }

    /// The kernel code symbol at or before `addr` and the offset from it
    /// (for EIPs); `None` outside the kernel's code.
    pub fn symbolize(&self, addr: u32) -> Option<(&str, u32)> {
        if addr < self.addrs.code || addr >= self.addrs.code_end {
            return None;
        }
        self.symbols
            .iter()
            .filter(|(_, &a)| a <= addr && a >= self.addrs.code && a < self.addrs.code_end)
            .max_by_key(|(_, &a)| a)
            .map(|(n, &a)| (n.as_str(), addr - a))
    }
}

pub(crate) fn page_align(x: u32) -> u32 {
    x.div_ceil(PAGE) * PAGE
}

/// Checks what every host mode needs; returns the entry address.
pub(crate) fn validate(b: &HostKernelBuilder) -> Result<u64, BuildError> {
    let entry = b.entry.ok_or(BuildError::MissingEntry)?;
    if b.vcpus.is_empty() {
        return Err(BuildError::NoVcpus);
    }
    if b.trips == 0 {
        return Err(BuildError::ZeroTrips(b.trips));
    }
    smp::validate(b)?;
    if b.identity_limit % PAGE != 0 || b.identity_limit > crate::image::PHYS_LIMIT {
        return Err(BuildError::BadIdentityLimit(b.identity_limit));
    }
    if b.extra_gdt.len() > 8000 {
        return Err(BuildError::GdtTooLarge(b.extra_gdt.len()));
    }
    for (key, value) in &b.boot_fields {
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
        if !key_ok || !items::is_token(value) {
            return Err(BuildError::BadBootField {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    for d in &b.dumps {
        if !items::is_token(&d.name) {
            return Err(BuildError::BadName {
                what: "dump region",
                name: d.name.clone(),
            });
        }
        if d.len == 0 {
            return Err(BuildError::EmptyDump {
                name: d.name.clone(),
                addr: d.addr,
            });
        }
    }
    Ok(entry)
}

/// Every snapshot item name is one token, and no two are equal.
pub(crate) fn check_item_names<'n>(
    names: impl Iterator<Item = &'n str> + Clone,
) -> Result<(), BuildError> {
    for (i, name) in names.clone().enumerate() {
        if !items::is_token(name) {
            return Err(BuildError::BadName {
                what: "snapshot item",
                name: name.to_owned(),
            });
        }
        if names.clone().take(i).any(|o| o == name) {
            return Err(BuildError::DuplicateItem(name.to_owned()));
        }
    }
    Ok(())
}

/// The host's mappings: low memory identity (page 0 excluded), the magic
/// page, the local APIC, and the caller's mappings.
pub(crate) fn host_page_map(b: &HostKernelBuilder) -> Result<PageMap, BuildError> {
    use crate::paging::{PTE_PCD, PTE_RW};
    let mut map = if b.la57 && b.mode.is_long() {
        PageMap::new_la57()
    } else {
        PageMap::new(b.mode)
    };
    map.map(
        "kernel identity",
        PAGE,
        PAGE,
        b.identity_limit.saturating_sub(PAGE).max(PAGE),
        PTE_RW,
    )?;
    map.map("magic page", MAGIC_VIRT, MAGIC_PAGE_PHYS, PAGE, 0)?;
    map.map("local APIC", LAPIC_VIRT, LAPIC_VIRT, PAGE, PTE_RW | PTE_PCD)?;
    for m in &b.mappings {
        map.map64(
            &m.name,
            m.virt,
            m.phys,
            m.len,
            if m.writable { PTE_RW } else { 0 },
        )?;
    }
    Ok(map)
}

/// The entry, the cookie address and the dump regions are mapped (the
/// cookie address writable).
pub(crate) fn check_addresses(
    tables: &PageTables,
    b: &HostKernelBuilder,
    entry: u64,
) -> Result<(), BuildError> {
    check_maps(tables, "entry", entry, 1, false)?;
    if let Some(c) = b.cookie_addr {
        check_maps(tables, "cookie address", c, 4, true)?;
    }
    for d in &b.dumps {
        check_maps(
            tables,
            &format!("dump region `{}`", d.name),
            d.addr,
            d.len,
            false,
        )?;
    }
    Ok(())
}

/// `value` as a `u32` for a 32-bit host, or [`BuildError::TooWide`].
pub(crate) fn narrow(what: &'static str, value: u64, mode: HostMode) -> Result<u32, BuildError> {
    u32::try_from(value).map_err(|_| BuildError::TooWide { what, value, mode })
}

pub(crate) fn check_maps(
    tables: &PageTables,
    what: &str,
    addr: u64,
    len: u32,
    write: bool,
) -> Result<(), BuildError> {
    let page_mask = u64::from(PAGE) - 1;
    let last = addr.saturating_add(u64::from(len.max(1) - 1));
    let mut page = addr & !page_mask;
    loop {
        let probe = page.max(addr);
        let t = tables
            .translate64(probe)
            .ok_or_else(|| BuildError::Unmapped {
                what: what.to_owned(),
                addr: probe,
            })?;
        if write && t.pte & crate::paging::PTE_RW == 0 {
            return Err(BuildError::ReadOnly {
                what: what.to_owned(),
                addr: probe,
            });
        }
        match page.checked_add(u64::from(PAGE)) {
            Some(next) if next <= last => page = next,
            _ => return Ok(()),
        }
    }
}
