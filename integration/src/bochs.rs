//! Running an image under Bochs, the second, stricter engine.
//!
//! Bochs checks architectural rules of mode transitions that QEMU's TCG lets
//! through (clearing CR0.PG with CR4.PCIDE set, clearing CR0.WP with CR4.CET
//! set, writing EFER.LME with paging on, …) and names the rule in its log
//! when it raises the fault. It has no multiboot loader and no
//! `isa-debug-exit`, so this module provides both ends:
//!
//! - [`disk_image`] turns a flat multiboot image (a.out kludge, as
//!   [`crate::image::ImageBuilder`] makes them) into a disk whose boot sector,
//!   generated here with iced-x86, enters protected mode, zeroes the image's
//!   memory, reads the non-zero sectors to their physical addresses with
//!   polled ATA PIO and enters the kernel the way a multiboot loader does
//!   (EAX = `0x2BADB002`, EBX = the multiboot information, flat segments,
//!   paging and interrupts off);
//! - [`run_image`] boots that disk headless (the `rfb` display with
//!   `timeout=0`; Debian's Bochs has no `nogui`) with COM1 in a file and ends
//!   the run when the transcript's last line, `@@CRC …`, has been written,
//!   when Bochs stops by itself (a triple fault or a panic) or at the
//!   wall-clock limit. The outcome comes from the transcript (`RESULT`,
//!   `EXC`, `FAREXC`), and the lines in which Bochs names a broken rule are
//!   kept in [`RunResult::stderr`].
//!
//! Bochs has no instruction counter: with `clock: sync=none` its RDTSC
//! counts emulated TSC ticks, which follow the instruction count but are not
//! equal to it. Every figure the host kernel measures with RDTSC is therefore
//! a tick count under Bochs ([`COUNTER_UNIT`]).

use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction};

use crate::image::{MULTIBOOT_BOOTLOADER_MAGIC, MULTIBOOT_MAGIC};
use crate::qemu::{Outcome, RunResult, MAX_TIMEOUT};
use crate::transcript::Report;

/// The Bochs binary (Debian's `/usr/bin/bochs` is a wrapper around it).
pub const BOCHS_BINARY: &str = "bochs-bin";
/// How to install Bochs headless on Debian/Ubuntu: `bochs` itself (with the
/// `rfb` display), the BIOS images, and `bochs-term`, the smallest provider
/// of the `bochs-gui` dependency.
pub const BOCHS_INSTALL_HINT: &str =
    "apt-get install -y --no-install-recommends bochs bochsbios vgabios bochs-term";
/// The CPU model runs use unless told otherwise: Intel, with PCID, SMEP,
/// SMAP, PKU, x2APIC and CET.
pub const DEFAULT_CPU: &str = "tigerlake";
/// What the host kernel's RDTSC figures count under Bochs.
pub const COUNTER_UNIT: &str = "tsc-ticks";
/// The BIOS image.
pub const BIOS_IMAGE: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// The VGA BIOS image.
pub const VGA_BIOS_IMAGE: &str = "/usr/share/vgabios/vgabios.bin";
/// Guest RAM in MiB (QEMU's default).
pub const MEMORY_MB: u32 = 128;

/// The Bochs 2.7 CPU models with long mode the testbed boots, and whether
/// each is AMD's (`true`) or Intel's. Intel CPUs hide SYSCALL from CPUID
/// outside 64-bit mode, which changes the facts of 32-bit and PAE hosts.
pub const MODELS: [(&str, bool); 18] = [
    ("core2_penryn_t9600", false),
    ("corei5_lynnfield_750", false),
    ("corei5_arrandale_m520", false),
    ("corei7_sandy_bridge_2600k", false),
    ("corei7_ivy_bridge_3770k", false),
    ("corei7_haswell_4770", false),
    ("broadwell_ult", false),
    ("corei7_skylake_x", false),
    ("corei3_cnl", false),
    ("corei7_icelake_u", false),
    ("tigerlake", false),
    ("athlon64_clawhammer", true),
    ("athlon64_venice", true),
    ("turion64_tyler", true),
    ("phenom_8650_toliman", true),
    ("zambezi", true),
    ("trinity_apu", true),
    ("ryzen", true),
];

/// The models of [`MODELS`] whose CPUID reports PCID (CPUID.1:ECX bit 17),
/// which `--host-cr4 today+pcid` needs: Intel's from Sandy Bridge on.
pub const PCID_MODELS: [&str; 8] = [
    "corei7_sandy_bridge_2600k",
    "corei7_ivy_bridge_3770k",
    "corei7_haswell_4770",
    "broadwell_ult",
    "corei7_skylake_x",
    "corei3_cnl",
    "corei7_icelake_u",
    "tigerlake",
];

/// The models of [`MODELS`] with CET (CPUID.7.0:ECX bit 7), which
/// `--host-cr4 today+pcid+cet` needs.
pub const CET_MODELS: [&str; 1] = ["tigerlake"];

/// The AMD model the tests boot next to the Intel [`DEFAULT_CPU`].
pub const AMD_CPU: &str = "ryzen";

/// The CPU facts a switcher for a `host` host is relocated for on the Bochs
/// model `model`: NX, FXSR and SYSENTER on every model of [`MODELS`];
/// SYSCALL as CPUID shows it in the host's mode (Intel hides it outside
/// 64-bit mode).
///
/// # Errors
/// [`BochsError::UnknownModel`] for a model not in [`MODELS`].
pub fn model_facts(model: &str, host: vmm_switcher::SideMode) -> Result<vmm::CpuFacts, BochsError> {
    let amd = MODELS
        .iter()
        .find(|(m, _)| *m == model)
        .map(|&(_, amd)| amd)
        .ok_or_else(|| BochsError::UnknownModel(model.to_owned()))?;
    Ok(vmm::CpuFacts {
        nx: true,
        fxsr: true,
        host_sysenter: true,
        host_syscall: amd || host == vmm_switcher::SideMode::Amd64,
    })
}

/// Bytes per disk sector.
const SECTOR: usize = 512;
/// Bochs detects the geometry of a flat disk of whole 16-head, 63-sector
/// cylinders.
const CYLINDER: usize = 16 * 63 * SECTOR;
/// Where the boot sector puts the extent table.
const TABLE_ADDR: u32 = 0x0002_0000;
/// The largest extent table (it must stay below the EBDA).
const TABLE_MAX: usize = 0x0007_0000;
/// Where the boot sector builds the multiboot information structure.
const MBI_ADDR: u32 = 0x9000;
/// Where the BIOS loads the boot sector.
const BOOT_ADDR: u32 = 0x7c00;
/// Offset of the 32-bit code in the boot sector.
const PM_OFFSET: u32 = 0x40;
/// Offset of the GDT in the boot sector.
const GDT_OFFSET: usize = 0x1e0;
/// Code and data selectors of the loader's flat GDT.
const SEL_CODE: u16 = 0x08;
const SEL_DATA: u32 = 0x10;
/// Merge non-zero sector runs separated by fewer zero sectors than this.
const MERGE_GAP: usize = 8;

/// Why an image could not be run under Bochs.
#[derive(Debug, thiserror::Error)]
pub enum BochsError {
    /// `bochs-bin` is not on PATH.
    #[error("`{BOCHS_BINARY}` was not found on PATH; install Bochs with `{BOCHS_INSTALL_HINT}`")]
    BochsMissing,
    /// A BIOS image Bochs needs is not installed.
    #[error("the Bochs BIOS image `{0}` is missing; install it with `{BOCHS_INSTALL_HINT}`")]
    BiosMissing(&'static str),
    /// The image has no valid multiboot header with the a.out kludge.
    #[error("the image has no multiboot header with load addresses in its first 8 KiB")]
    NoHeader,
    /// The header's addresses do not describe the file.
    #[error("multiboot header: {0}")]
    BadHeader(String),
    /// The extent table does not fit below the EBDA.
    #[error("the image needs {0} extents, more than the boot loader's table holds")]
    TooManyExtents(usize),
    /// The boot sector could not be assembled or is too long.
    #[error("boot sector: {0}")]
    Loader(String),
    /// A CPU model name Bochs would not accept in its configuration.
    #[error("Bochs CPU model {0:?} is not a plain model name (see `bochs-bin --help cpu`)")]
    BadModel(String),
    /// A model the testbed does not know.
    #[error("Bochs CPU model {0:?} is not one the testbed knows; use one of: {names}", names = model_names())]
    UnknownModel(String),
    /// A zero timeout.
    #[error("timeout must be positive, got {0:?}")]
    ZeroTimeout(Duration),
    /// A timeout past [`MAX_TIMEOUT`].
    #[error("timeout {0:?} is longer than the maximum, {MAX_TIMEOUT:?}")]
    TimeoutTooLong(Duration),
    /// Files of the run could not be written or read.
    #[error("Bochs run files in {}: {source}", dir.display())]
    Io {
        /// The run's directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Spawning or waiting failed.
    #[error("cannot run `{BOCHS_BINARY}`: {0}")]
    Spawn(std::io::Error),
    /// Bochs stopped before the guest printed anything, without a triple
    /// fault: it refused its configuration (an unknown CPU model, …).
    #[error("Bochs refused to start: {0}")]
    Refused(String),
}

impl From<IcedError> for BochsError {
    fn from(e: IcedError) -> Self {
        BochsError::Loader(e.to_string())
    }
}

fn model_names() -> String {
    MODELS.map(|(m, _)| m).join(", ")
}

/// How to run Bochs.
#[derive(Clone, Debug)]
pub struct BochsConfig {
    /// `cpu: model=…` (see `bochs-bin --help cpu`).
    pub cpu: String,
    /// Wall-clock limit; Bochs is killed when it expires.
    pub timeout: Duration,
    /// Keep the run's files (disk, configuration, COM1, log) in this
    /// directory instead of a temporary one that is removed.
    pub keep: Option<PathBuf>,
}

impl Default for BochsConfig {
    fn default() -> Self {
        Self {
            cpu: DEFAULT_CPU.into(),
            timeout: Duration::from_secs(60),
            keep: None,
        }
    }
}

/// Finds `bochs-bin` on PATH and checks the BIOS images.
///
/// # Errors
/// [`BochsError::BochsMissing`] or [`BochsError::BiosMissing`], both naming
/// the install command.
pub fn find_bochs() -> Result<PathBuf, BochsError> {
    let path = std::env::var_os("PATH").ok_or(BochsError::BochsMissing)?;
    let bin = std::env::split_paths(&path)
        .map(|dir| dir.join(BOCHS_BINARY))
        .find(|p| p.is_file())
        .ok_or(BochsError::BochsMissing)?;
    for bios in [BIOS_IMAGE, VGA_BIOS_IMAGE] {
        if !Path::new(bios).is_file() {
            return Err(BochsError::BiosMissing(bios));
        }
    }
    Ok(bin)
}

/// The multiboot header fields the loader needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    /// File offset of the byte loaded at `load`.
    file_start: usize,
    load: u32,
    load_end: u32,
    bss_end: u32,
    entry: u32,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Finds the multiboot header (in the first 8 KiB, 4-aligned, valid
/// checksum, a.out-kludge flag) and checks its addresses against the file.
fn parse_header(image: &[u8]) -> Result<Header, BochsError> {
    let bad = |s: String| BochsError::BadHeader(s);
    let at = (0..8192usize.min(image.len()))
        .step_by(4)
        .find(|&o| {
            matches!(
                (le32(image, o), le32(image, o + 4), le32(image, o + 8)),
                (Some(MULTIBOOT_MAGIC), Some(f), Some(c))
                    if MULTIBOOT_MAGIC.wrapping_add(f).wrapping_add(c) == 0 && f & (1 << 16) != 0
            )
        })
        .ok_or(BochsError::NoHeader)?;
    let field = |i: usize| le32(image, at + 12 + 4 * i).ok_or(BochsError::NoHeader);
    let (header_addr, load, load_end, bss_end, entry) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    let into_file = header_addr
        .checked_sub(load)
        .and_then(|d| at.checked_sub(d as usize))
        .ok_or_else(|| {
            bad(format!(
                "header_addr {header_addr:#x} lies below load_addr {load:#x}"
            ))
        })?;
    let file_len = u32::try_from(image.len() - into_file)
        .map_err(|_| bad(format!("{} bytes is too long an image", image.len())))?;
    let load_end = match load_end {
        0 => load.checked_add(file_len),
        e if e >= load && e - load <= file_len => Some(e),
        _ => None,
    }
    .ok_or_else(|| bad(format!("load_end_addr {load_end:#x} does not fit the file")))?;
    if load < 0x0010_0000 {
        return Err(bad(format!("load_addr {load:#x} is below 1 MiB")));
    }
    if !(load..load_end).contains(&entry) {
        return Err(bad(format!("entry {entry:#x} is outside the loaded bytes")));
    }
    Ok(Header {
        file_start: into_file,
        load,
        load_end,
        bss_end: bss_end.max(load_end),
        entry,
    })
}

/// One run of sectors the loader reads: to physical `phys`, from `lba`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    phys: u32,
    lba: u32,
    sectors: u32,
}

/// The non-zero 512-byte sectors of `bytes` as runs,
/// merged across gaps of fewer than [`MERGE_GAP`] zero sectors: (first
/// sector, sector count).
fn extents(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, chunk) in bytes.chunks(SECTOR).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        match runs.last_mut() {
            Some((start, n)) if i - (*start + *n) < MERGE_GAP => *n = i + 1 - *start,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// Turns a flat multiboot image into a Bochs disk: the generated boot
/// sector, the extent table, the image's non-zero sectors, padded to whole
/// cylinders.
///
/// # Errors
/// No or an inconsistent multiboot header, too many extents, a boot sector
/// that does not assemble into 512 bytes.
pub fn disk_image(image: &[u8]) -> Result<Vec<u8>, BochsError> {
    let h = parse_header(image)?;
    let len = (h.load_end - h.load) as usize;
    let bytes = image
        .get(h.file_start..h.file_start + len)
        .ok_or_else(|| BochsError::BadHeader("the loaded bytes run past the file".into()))?;
    let runs = extents(bytes);
    let table_len = runs.len() * 12;
    if table_len > TABLE_MAX {
        return Err(BochsError::TooManyExtents(runs.len()));
    }
    let table_sectors = table_len.div_ceil(SECTOR).max(1);
    let mut lba = 1 + table_sectors;
    let mut table = Vec::with_capacity(table_sectors * SECTOR);
    let mut data = Vec::new();
    let mut list = Vec::new();
    for &(start, n) in &runs {
        let from = start * SECTOR;
        let to = (from + n * SECTOR).min(bytes.len());
        let e = Extent {
            // Below the 64 MiB image limit, so these fit.
            phys: h.load + from as u32,
            lba: lba as u32,
            sectors: n as u32,
        };
        for v in [e.phys, e.lba, e.sectors] {
            table.extend_from_slice(&v.to_le_bytes());
        }
        data.extend_from_slice(&bytes[from..to]);
        data.resize(data.len().next_multiple_of(SECTOR), 0);
        lba += n;
        list.push(e);
    }
    table.resize(table_sectors * SECTOR, 0);
    let boot = boot_sector(&h, table_sectors as u32, list.len() as u32)?;
    let mut disk = boot;
    disk.extend_from_slice(&table);
    disk.extend_from_slice(&data);
    disk.resize(disk.len().next_multiple_of(CYLINDER).max(CYLINDER), 0);
    Ok(disk)
}

/// The boot sector: real mode → flat protected mode → zero, read, enter.
fn boot_sector(h: &Header, table_sectors: u32, n_extents: u32) -> Result<Vec<u8>, BochsError> {
    let pm_addr = BOOT_ADDR + PM_OFFSET;
    let gdt_addr = BOOT_ADDR + GDT_OFFSET as u32;
    let gdtr_addr = gdt_addr + 24;

    let mut r = CodeAssembler::new(16)?;
    r.cli()?;
    r.cld()?;
    r.xor(ax, ax)?;
    r.mov(ds, ax)?;
    r.mov(ss, ax)?;
    r.mov(sp, BOOT_ADDR)?;
    // A20 through the system control port.
    r.in_(al, 0x92)?;
    r.or(al, 2)?;
    r.and(al, 0xfe)?;
    r.out(0x92, al)?;
    r.lgdt(ptr(gdtr_addr))?;
    r.mov(eax, cr0)?;
    r.or(al, 1)?;
    r.mov(cr0, eax)?;
    r.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1616,
        SEL_CODE,
        pm_addr,
    )?)?;
    let real = r.assemble(u64::from(BOOT_ADDR))?;
    if real.len() > PM_OFFSET as usize {
        return Err(BochsError::Loader(format!(
            "real-mode part is {} bytes",
            real.len()
        )));
    }

    let mut p = CodeAssembler::new(32)?;
    let mut read = p.create_label();
    let mut fail = p.create_label();
    p.mov(eax, SEL_DATA)?;
    for s in [ds, es, fs, gs, ss] {
        p.mov(s, ax)?;
    }
    p.mov(esp, BOOT_ADDR)?;
    // ATA: interrupts off (nIEN), we poll.
    p.mov(dx, 0x3f6u32)?;
    p.mov(al, 2)?;
    p.out(dx, al)?;
    // Zero [load, bss_end).
    p.mov(edi, h.load)?;
    p.mov(ecx, (h.bss_end - h.load).div_ceil(4))?;
    p.xor(eax, eax)?;
    p.rep().stosd()?;
    // The extent table, then each extent.
    p.mov(edi, TABLE_ADDR)?;
    p.mov(ebx, 1u32)?;
    p.mov(ecx, table_sectors)?;
    p.call(read)?;
    p.mov(esi, TABLE_ADDR)?;
    p.mov(ebp, n_extents)?;
    let mut next = p.create_label();
    p.set_label(&mut next)?;
    p.mov(edi, dword_ptr(esi))?;
    p.mov(ebx, dword_ptr(esi + 4))?;
    p.mov(ecx, dword_ptr(esi + 8))?;
    p.call(read)?;
    p.add(esi, 12)?;
    p.dec(ebp)?;
    p.jnz(next)?;
    // Multiboot information: flags = mem_lower/mem_upper.
    p.mov(dword_ptr(MBI_ADDR), 1u32)?;
    p.mov(dword_ptr(MBI_ADDR + 4), 639u32)?;
    p.mov(dword_ptr(MBI_ADDR + 8), (MEMORY_MB - 1) * 1024)?;
    p.mov(eax, MULTIBOOT_BOOTLOADER_MAGIC)?;
    p.mov(ebx, MBI_ADDR)?;
    p.mov(ecx, h.entry)?;
    p.jmp(ecx)?;

    // read: EBX = LBA, ECX = sectors (> 0), EDI = destination.
    p.set_label(&mut read)?;
    p.mov(dx, 0x1f7u32)?;
    let mut idle = p.create_label();
    p.set_label(&mut idle)?;
    p.in_(al, dx)?;
    p.test(al, 0x80)?;
    p.jnz(idle)?;
    p.mov(dx, 0x1f2u32)?;
    p.mov(al, 1)?;
    p.out(dx, al)?;
    p.mov(eax, ebx)?;
    for _ in 0..3 {
        p.inc(dx)?;
        p.out(dx, al)?;
        p.shr(eax, 8)?;
    }
    p.and(al, 0x0f)?;
    p.or(al, 0xe0)?;
    p.inc(dx)?;
    p.out(dx, al)?;
    p.inc(dx)?;
    p.mov(al, 0x20)?; // READ SECTORS
    p.out(dx, al)?;
    let mut poll = p.create_label();
    p.set_label(&mut poll)?;
    p.in_(al, dx)?;
    p.test(al, 0x80)?;
    p.jnz(poll)?;
    p.test(al, 0x21)?; // ERR or DF
    p.jnz(fail)?;
    p.test(al, 0x08)?; // DRQ
    p.jz(poll)?;
    p.push(ecx)?;
    p.mov(ecx, 256u32)?;
    p.mov(dx, 0x1f0u32)?;
    p.rep().insw()?;
    p.pop(ecx)?;
    p.inc(ebx)?;
    p.dec(ecx)?;
    p.jnz(read)?;
    p.ret()?;

    // A disk error: `E` on port 0xE9, then the BIOS shutdown port.
    p.set_label(&mut fail)?;
    p.mov(dx, 0xe9u32)?;
    p.mov(al, u32::from(b'E'))?;
    p.out(dx, al)?;
    p.mov(dx, 0x8900u32)?;
    for c in b"Shutdown" {
        p.mov(al, u32::from(*c))?;
        p.out(dx, al)?;
    }
    let mut halt = p.create_label();
    p.set_label(&mut halt)?;
    p.hlt()?;
    p.jmp(halt)?;
    let pm = p.assemble(u64::from(pm_addr))?;

    let mut sector = vec![0u8; SECTOR];
    sector[..real.len()].copy_from_slice(&real);
    let pm_end = PM_OFFSET as usize + pm.len();
    if pm_end > GDT_OFFSET {
        return Err(BochsError::Loader(format!(
            "protected-mode part ends at {pm_end:#x}, past the GDT at {GDT_OFFSET:#x}"
        )));
    }
    sector[PM_OFFSET as usize..pm_end].copy_from_slice(&pm);
    let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        sector[GDT_OFFSET + 8 * i..GDT_OFFSET + 8 * i + 8].copy_from_slice(&d.to_le_bytes());
    }
    let gdtr = GDT_OFFSET + 24;
    sector[gdtr..gdtr + 2].copy_from_slice(&23u16.to_le_bytes());
    sector[gdtr + 2..gdtr + 6].copy_from_slice(&gdt_addr.to_le_bytes());
    debug_assert_eq!(gdtr as u32 + BOOT_ADDR, gdtr_addr);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    Ok(sector)
}

/// The Bochs configuration of one run.
fn bochsrc(cfg: &BochsConfig, disk: &Path, com1: &Path, log: &Path) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "memory: guest={MEMORY_MB}, host={MEMORY_MB}");
    let _ = writeln!(s, "romimage: file={BIOS_IMAGE}, options=fastboot");
    let _ = writeln!(s, "vgaromimage: file={VGA_BIOS_IMAGE}");
    let _ = writeln!(
        s,
        "cpu: model={}, count=1, ips=1000000, reset_on_triple_fault=0, ignore_bad_msrs=0",
        cfg.cpu
    );
    let _ = writeln!(
        s,
        "ata0-master: type=disk, mode=flat, path=\"{}\"",
        disk.display()
    );
    let _ = writeln!(s, "ata0-slave: type=cdrom, path=none, status=ejected");
    s.push_str(
        "boot: disk\nfloppy_bootsig_check: disabled=1\n\
         display_library: rfb, options=\"timeout=0\"\n",
    );
    let _ = writeln!(s, "com1: enabled=1, mode=file, dev=\"{}\"", com1.display());
    let _ = writeln!(s, "log: \"{}\"", log.display());
    s.push_str(
        "port_e9_hack: enabled=1\nclock: sync=none, time0=1\n\
         panic: action=fatal\nerror: action=report\ninfo: action=report\ndebug: action=ignore\n\
         speaker: enabled=0\nsound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n",
    );
    s
}

/// A directory for one run's files, removed on drop unless kept.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    fn new(keep: Option<&Path>) -> Result<Self, BochsError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let io = |dir: &Path| {
            let dir = dir.to_path_buf();
            move |source| BochsError::Io { dir, source }
        };
        if let Some(k) = keep {
            fs::create_dir_all(k).map_err(io(k))?;
            return Ok(Self {
                path: k.to_path_buf(),
                keep: true,
            });
        }
        let base = std::env::temp_dir();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("wsbochs-{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&base)(e)),
            }
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Why the runner stopped Bochs, or Bochs stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The transcript's last line, `@@CRC …`, is complete.
    Crc,
    /// The guest halted with interrupts off before its `BOOT` line (a
    /// refusal it printed) and the transcript stopped growing.
    HaltedEarly,
    /// Bochs exited by itself.
    Exited,
    /// The wall-clock limit.
    Timeout,
}

/// The transcript ends with a complete `@@CRC` line.
fn crc_complete(serial: &[u8]) -> bool {
    let text = String::from_utf8_lossy(serial);
    text.ends_with('\n')
        && text
            .trim_end()
            .rsplit('\n')
            .next()
            .is_some_and(|l| l.trim_start().starts_with("@@CRC "))
}

/// The lines of a Bochs log that name a broken rule (`e[CPU…]`) or a panic.
pub fn fault_lines(log: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in log.lines() {
        let body = line.trim_start_matches(|c: char| c.is_ascii_digit());
        let cpu_error = body.starts_with("e[CPU");
        let panic = body.starts_with("p[") || body.contains(">>PANIC<<");
        if (cpu_error || panic) && !out.iter().any(|l| l == body) {
            out.push(body.trim_end().to_owned());
        }
        if out.len() >= 16 {
            break;
        }
    }
    out
}

/// The outcome of a run from how it stopped, the transcript and the log.
fn classify(stop: Stop, report: &Report, log: &str) -> Outcome {
    if stop == Stop::Timeout {
        return Outcome::Timeout;
    }
    if log.contains("exception with no resolution") || log.contains("triple fault") {
        return Outcome::TripleFault;
    }
    if let Some(p) = log
        .lines()
        .find(|l| l.contains(">>PANIC<<"))
        .map(|l| l.split(">>PANIC<<").nth(1).unwrap_or(l).trim().to_owned())
    {
        return Outcome::EnginePanic(p);
    }
    if report.exception.is_some() {
        Outcome::HostException(report.exception.clone())
    } else if report.far_exception.is_some() {
        Outcome::FarException(report.far_exception.clone())
    } else {
        match (report.result, stop) {
            (Some(true), Stop::Crc) => Outcome::Pass,
            (Some(false), _) | (None, Stop::HaltedEarly | Stop::Crc) => Outcome::VerificationFailed,
            _ => Outcome::Other(1),
        }
    }
}

/// Boots `image` (a flat multiboot image) under Bochs and waits for the end
/// of its transcript, a stop or the timeout.
///
/// # Errors
/// Bochs or its BIOS missing, a bad image, run files that cannot be
/// written, a configuration Bochs refuses.
pub fn run_image(image: &[u8], cfg: &BochsConfig) -> Result<RunResult, BochsError> {
    if cfg.timeout.is_zero() {
        return Err(BochsError::ZeroTimeout(cfg.timeout));
    }
    if cfg.timeout > MAX_TIMEOUT {
        return Err(BochsError::TimeoutTooLong(cfg.timeout));
    }
    if cfg.cpu.is_empty()
        || !cfg
            .cpu
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(BochsError::BadModel(cfg.cpu.clone()));
    }
    let binary = find_bochs()?;
    let disk = disk_image(image)?;
    let mut attempt = 0u64;
    loop {
        match boot_once(&binary, &disk, cfg) {
            Err(BochsError::Refused(why)) if why.contains(RFB_RACE) && attempt < RFB_RETRIES => {
                // Two Bochs starting at once can both bind the same VNC port
                // (SO_REUSEADDR, neither listening yet); the one whose
                // listen() then fails keeps its bound socket, every later
                // bind fails and Bochs gives up. Nothing ran: start again,
                // staggered.
                attempt += 1;
                let stagger = 25 * attempt + u64::from(std::process::id() % 13);
                std::thread::sleep(Duration::from_millis(stagger));
            }
            result => return result,
        }
    }
}

/// What Bochs says when its `rfb` display found no VNC port to listen on.
const RFB_RACE: &str = "RFB could not bind any port";

/// How often a start that lost the VNC port race is tried again.
const RFB_RETRIES: u64 = 8;

/// One Bochs boot of `disk` in a fresh run folder.
fn boot_once(binary: &Path, disk: &[u8], cfg: &BochsConfig) -> Result<RunResult, BochsError> {
    let dir = RunDir::new(cfg.keep.as_deref())?;
    let io = |source| BochsError::Io {
        dir: dir.path.clone(),
        source,
    };
    let (disk_path, com1, log, rc, cont) = (
        dir.path.join("disk.img"),
        dir.path.join("com1.txt"),
        dir.path.join("bochs.log"),
        dir.path.join("bochsrc.txt"),
        dir.path.join("cont.rc"),
    );
    fs::write(&disk_path, disk).map_err(io)?;
    fs::write(&com1, b"").map_err(io)?;
    fs::write(&rc, bochsrc(cfg, &disk_path, &com1, &log)).map_err(io)?;
    fs::write(&cont, "continue\nquit\n").map_err(io)?;
    let stdout = fs::File::create(dir.path.join("stdout.txt")).map_err(io)?;
    let stderr = fs::File::create(dir.path.join("stderr.txt")).map_err(io)?;
    let start = Instant::now();
    let mut child = Command::new(binary)
        .args(["-q", "-unlock", "-f"])
        .arg(&rc)
        .arg("-rc")
        .arg(&cont)
        .current_dir(&dir.path)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(BochsError::Spawn)?;
    let stop = watch(&mut child, &com1, &log, start + cfg.timeout)?;
    let wall = start.elapsed();
    let serial = read_bytes(&com1);
    let log_text = String::from_utf8_lossy(&read_bytes(&log)).into_owned();
    let report = Report::parse(&serial);
    let faults = fault_lines(&log_text);
    if stop == Stop::Exited
        && serial.is_empty()
        && !log_text.contains("exception with no resolution")
    {
        let why = faults
            .first()
            .cloned()
            .unwrap_or_else(|| last_words(&log_text, &dir.path));
        return Err(BochsError::Refused(why));
    }
    let outcome = classify(stop, &report, &log_text);
    Ok(RunResult {
        outcome,
        status: None,
        serial,
        stderr: faults.join("\n"),
        report,
        wall,
    })
}

/// Bochs' own last words when it stopped without a fault line: the last
/// log line, or what it printed on stderr.
fn last_words(log: &str, dir: &Path) -> String {
    let err = String::from_utf8_lossy(&read_bytes(&dir.join("stderr.txt"))).into_owned();
    err.lines()
        .chain(log.lines())
        .filter(|l| !l.trim().is_empty())
        .find(|l| l.contains("PANIC") || l.contains("ERROR") || l.contains("could not"))
        .or_else(|| log.lines().last())
        .unwrap_or("it exited without output")
        .trim()
        .to_owned()
}

fn read_bytes(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    if let Ok(mut f) = fs::File::open(p) {
        let _ = f.read_to_end(&mut v);
    }
    v
}

/// Polls a running Bochs until the transcript is complete, it stops by
/// itself, or the deadline; kills it unless it exited.
fn watch(
    child: &mut std::process::Child,
    com1: &Path,
    log: &Path,
    deadline: Instant,
) -> Result<Stop, BochsError> {
    let mut last_len = 0usize;
    let mut quiet_since = Instant::now();
    let stop = loop {
        if child.try_wait().map_err(BochsError::Spawn)?.is_some() {
            break Stop::Exited;
        }
        let serial = read_bytes(com1);
        if serial.len() != last_len {
            last_len = serial.len();
            quiet_since = Instant::now();
        }
        if crc_complete(&serial) {
            break Stop::Crc;
        }
        if quiet_since.elapsed() > Duration::from_millis(300)
            && !String::from_utf8_lossy(&serial).contains("@@BOOT")
            && String::from_utf8_lossy(&read_bytes(log)).contains("HLT instruction with IF=0")
        {
            break Stop::HaltedEarly;
        }
        if Instant::now() >= deadline {
            break Stop::Timeout;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if stop != Stop::Exited {
        let _ = child.kill();
    }
    child.wait().map_err(BochsError::Spawn)?;
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageBuilder;

    fn image() -> Vec<u8> {
        let mut b = ImageBuilder::new();
        let mut code = vec![0x90u8; 0x3000];
        code[0x1000..0x2000].fill(0);
        b.place("code", 0x0020_0000, code).unwrap_or_default();
        b.set_bss_end(0x0030_0000).unwrap_or_default();
        b.build(0x0020_0000).unwrap_or_default()
    }

    #[test]
    fn the_disk_has_a_boot_sector_a_table_and_only_non_zero_sectors() {
        let img = image();
        let h = parse_header(&img);
        assert!(
            matches!(
                h,
                Ok(Header {
                    load: 0x0010_0000,
                    entry: 0x0020_0000,
                    bss_end: 0x0030_0000,
                    ..
                })
            ),
            "{h:?}"
        );
        let disk = disk_image(&img).map_err(|e| e.to_string());
        let disk = disk.unwrap_or_default();
        assert_eq!(disk.len() % CYLINDER, 0);
        assert_eq!(&disk[510..512], &[0x55, 0xaa]);
        // Header sector, then the two non-zero runs of the code blob.
        let t = &disk[SECTOR..2 * SECTOR];
        let e = |i: usize| le32(t, 4 * i).unwrap_or(0);
        assert_eq!((e(0), e(1), e(2)), (0x0010_0000, 2, 1));
        assert_eq!((e(3), e(4), e(5)), (0x0020_0000, 3, 8));
        assert_eq!((e(6), e(7), e(8)), (0x0020_2000, 11, 8));
        assert_eq!(e(9), 0);
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        assert!(matches!(disk_image(&[0u8; 100]), Err(BochsError::NoHeader)));
        let mut img = image();
        // entry outside the loaded bytes
        img[28..32].copy_from_slice(&0x0500_0000u32.to_le_bytes());
        let msg = disk_image(&img).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(
            msg,
            Err("multiboot header: entry 0x5000000 is outside the loaded bytes".into())
        );
    }

    #[test]
    fn end_of_transcript_and_fault_lines() {
        assert!(crc_complete(b"@@RESULT PASS\n@@CRC crc32=12345678\n"));
        assert!(!crc_complete(b"@@RESULT PASS\n@@CRC crc32=1234"));
        assert!(!crc_complete(b"@@RESULT PASS\n"));
        let log = "00000000000i[CPU0  ] info\n\
                   00001234567e[CPU0  ] SetCR0(): attempt to clear CR0.PG with CR4.PCIDE set\n\
                   00001234567e[CPU0  ] SetCR0(): attempt to clear CR0.PG with CR4.PCIDE set\n\
                   00001234999p[CPU0  ] >>PANIC<< exception(): 3rd (13) exception with no resolution\n";
        assert_eq!(
            fault_lines(log),
            vec![
                "e[CPU0  ] SetCR0(): attempt to clear CR0.PG with CR4.PCIDE set".to_string(),
                "p[CPU0  ] >>PANIC<< exception(): 3rd (13) exception with no resolution".into()
            ]
        );
        let r = Report::default();
        assert_eq!(classify(Stop::Exited, &r, log), Outcome::TripleFault);
        assert_eq!(
            classify(Stop::Exited, &r, "p[X] >>PANIC<< boom\n"),
            Outcome::EnginePanic("boom".into())
        );
        assert_eq!(classify(Stop::Timeout, &r, log), Outcome::Timeout);
        let pass = Report::parse(b"@@RESULT PASS\n");
        assert_eq!(classify(Stop::Crc, &pass, ""), Outcome::Pass);
        // A transcript cut short is never a pass.
        assert_eq!(classify(Stop::Exited, &pass, ""), Outcome::Other(1));
    }

    #[test]
    fn odd_model_names_and_timeouts_are_refused() {
        let img = image();
        for cpu in ["", "ryzen, count=2", "a b"] {
            let c = BochsConfig {
                cpu: cpu.into(),
                ..BochsConfig::default()
            };
            assert!(matches!(run_image(&img, &c), Err(BochsError::BadModel(m)) if m == cpu));
        }
        let c = BochsConfig {
            timeout: Duration::ZERO,
            ..BochsConfig::default()
        };
        assert!(matches!(
            run_image(&img, &c),
            Err(BochsError::ZeroTimeout(_))
        ));
    }
}
