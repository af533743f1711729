//! `run --gdb`: QEMU's gdbstub, a gdb script, a symbol file and a decoder
//! that knows the bitness of the code under the PC.
//!
//! [`Session::start`] writes three files into the temporary directory and
//! removes them when the session drops (the run ended, also in failure):
//!
//! * a symbol file ([`crate::elf`]): every switcher label at its address in
//!   each view (`IDEnterTarget@HC`, `@ID`, `@RC`), the host kernel's labels
//!   and data, the far side's entry points; gdb names every stop with it;
//! * the gdb script: loads the symbol file (`file`, so gdb does not warn
//!   that it has no executable; memory still comes from QEMU), connects to `127.0.0.1:PORT`,
//!   defines `$<symbol>` for the host kernel and `$sw_<label>` for the
//!   switcher, sets a hardware breakpoint on the switcher's C entry and
//!   defines `ws-x`;
//! * the scratch file `ws-x` dumps code bytes into.
//!
//! QEMU's x86-64 gdbstub makes gdb decode every instruction as 64-bit code,
//! and gdb refuses `set architecture i386` against it. `ws-x [N]` decodes N
//! instructions at the PC with the bitness the CPU executes them in: the
//! switcher region's bitness when the PC lies in one (the region table has
//! it per region and view); elsewhere 16 with `CR0.PE` clear, 64 with
//! `EFER.LMA` set and 32 otherwise. It dumps the bytes with gdb's
//! `dump binary memory` and runs the hidden `worldswitch gdb-x` ([`x`]) on
//! them.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

use clap::Args;
use iced_x86::{
    Decoder, DecoderError, DecoderOptions, Formatter as _, Instruction, IntelFormatter,
};
use thiserror::Error;
use vmm_switcher::disasm::view_base;
use vmm_switcher::View;

use crate::elf::{self, Area, ElfError, ReadSymbol, Symbol};
use crate::{setup, CliError, Exit};
use integration::scenario::{Built, Scenario};

/// The gdbstub port without `--gdb-port`.
pub const DEFAULT_PORT: u16 = 1234;

/// Instructions `ws-x` decodes without an argument.
pub const DEFAULT_COUNT: u32 = 8;

/// The longest x86 instruction, in bytes.
const MAX_INSN: u32 = 15;

/// Why a gdb session cannot be set up.
#[derive(Debug, Error)]
pub enum GdbError {
    /// The gdbstub's port is taken.
    #[error("gdb port {port} is busy ({source}); choose a free one with --gdb-port")]
    PortBusy {
        /// The port.
        port: u16,
        /// The OS error.
        source: std::io::Error,
    },
    /// The symbol file could not be made.
    #[error("gdb symbol file: {0}")]
    Elf(#[from] ElfError),
    /// A switcher view runs past the 64-bit address space.
    #[error("switcher {view} view at {base:#x} + {len:#x} bytes runs past the address space")]
    Address {
        /// The view.
        view: &'static str,
        /// Its base.
        base: u64,
        /// The code length.
        len: u32,
    },
    /// gdb's `dump` cannot take this file name.
    #[error(
        "temporary file {} has a blank, quote, backslash or % in its name, which gdb's \
         `dump` cannot take; set TMPDIR to a plainer directory",
        .0.display()
    )]
    TempPath(PathBuf),
}

/// Fails with [`GdbError::PortBusy`] unless `port` can be listened on at
/// 127.0.0.1 (where QEMU's gdbstub listens) right now.
///
/// # Errors
/// See above.
pub fn check_port(port: u16) -> Result<(), GdbError> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(()),
        Err(source) => Err(GdbError::PortBusy { port, source }),
    }
}

/// Whether `port` is listened on at 127.0.0.1 (binding it fails with
/// "address in use").
pub fn port_in_use(port: u16) -> bool {
    matches!(
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)),
        Err(e) if e.kind() == ErrorKind::AddrInUse
    )
}

/// `HC`, `ID` or `RC`.
pub fn view_name(v: View) -> &'static str {
    match v {
        View::Hc => "HC",
        View::Id => "ID",
        View::Rc => "RC",
    }
}

/// A run of switcher code at one bitness, at its address in the view it
/// executes in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeRange {
    /// The region's name (`HC0`, `ID0/64`, …).
    pub name: &'static str,
    /// Its view.
    pub view: View,
    /// Code bitness.
    pub bits: u32,
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
}

/// What gdb is told about a built scenario.
#[derive(Clone, Debug)]
pub struct Symbols {
    /// The address ranges the symbol file has sections for.
    pub areas: Vec<Area>,
    /// Every symbol.
    pub symbols: Vec<Symbol>,
    /// The switcher's regions at their addresses, for `ws-x`.
    pub code: Vec<CodeRange>,
    /// The switcher's C entry (`R0HostToGuest`, HC view).
    pub entry: u64,
}

/// The views the switcher's code is mapped in: a stub has no hypervisor
/// context, so no RC view.
fn views(s: &Scenario) -> &'static [View] {
    if s.kind.guest().is_some() {
        &[View::Hc, View::Id, View::Rc]
    } else {
        &[View::Hc, View::Id]
    }
}

/// `name` with everything but `[A-Za-z0-9_]` as `_` (a gdb variable name).
fn ident(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The switcher: one area per view, every label in each view, entry points
/// without a label of their own, and the regions at their addresses.
fn switcher_symbols(s: &Scenario, sw: &vmm::Installed, out: &mut Symbols) -> Result<(), GdbError> {
    let def = &sw.def;
    let len = def.code_len();
    let in_data = |off: u32| def.data.iter().any(|d| d.contains(&off));
    let mut names: Vec<(String, u32)> = def
        .labels
        .iter()
        .map(|(n, o)| ((*n).to_string(), *o))
        .collect();
    for (n, o) in def.entries.named() {
        if !def.labels.values().any(|&l| l == o) {
            names.push((format!("entry_{n}"), o));
        }
    }
    names.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    for &view in views(s) {
        let base = view_base(&sw.ctx, view);
        let v = view_name(view);
        let end =
            base.checked_add(u64::from(len))
                .ok_or(GdbError::Address { view: v, base, len })?;
        out.areas.push(Area {
            name: format!("{}.{v}", s.kind.cli_name()),
            start: base,
            end,
            code: true,
        });
        for (name, off) in &names {
            out.symbols.push(Symbol {
                name: format!("{name}@{v}"),
                addr: base + u64::from(*off),
                code: !in_data(*off),
            });
        }
    }
    for r in &def.regions {
        let base = view_base(&sw.ctx, r.view);
        // Regions lie inside the code, whose end was checked above.
        out.code.push(CodeRange {
            name: r.name,
            view: r.view,
            bits: r.bits,
            start: base + u64::from(r.range.start),
            end: base + u64::from(r.range.end),
        });
    }
    Ok(())
}

/// The host kernel: its layout regions (the boot stub and kernel code as
/// code) and its labels and data.
fn kernel_symbols(built: &Built, out: &mut Symbols) {
    let tb = &built.testbed;
    for r in tb.layout.iter().filter(|r| r.end > r.start) {
        out.areas.push(Area {
            name: r.name.clone(),
            start: u64::from(r.start),
            end: u64::from(r.end),
            code: r.name == "kernel code" || r.name == "boot stub",
        });
    }
    for (name, &addr) in &tb.symbols {
        out.symbols.push(Symbol {
            name: name.clone(),
            addr: u64::from(addr),
            code: (addr >= tb.addrs.code && addr < tb.addrs.code_end) || addr == tb.addrs.entry,
        });
    }
}

/// The far side (RC view): the helper area's code, and the RC code's entry,
/// exception handlers and trampoline targets when it has them.
fn far_symbols(s: &Scenario, built: &Built, out: &mut Symbols) {
    if s.kind.guest().is_none() {
        return;
    }
    let rc = u64::from(built.far.rc);
    out.areas.push(Area {
        name: "far side.RC".into(),
        start: rc,
        end: rc + u64::from(built.far.scratch_off),
        code: true,
    });
    let mut add = |name: String, addr: u32| {
        out.symbols.push(Symbol {
            name,
            addr: u64::from(addr),
            code: true,
        });
    };
    match &built.rc {
        Some(e) => {
            add("rc_entry@RC".into(), e.entry);
            for (v, &h) in e.handlers.iter().enumerate() {
                add(format!("rc_vector_{v:02x}@RC"), h);
            }
            for (n, &t) in e.targets.iter().enumerate() {
                add(format!("rc_target_{n}@RC"), t);
            }
        }
        None => add("far_helper@RC".into(), built.far.rc),
    }
}

/// Everything gdb is told about `s` as `built`.
///
/// # Errors
/// The switcher is not in the VMM, or a view runs past the address space.
pub fn symbols(s: &Scenario, built: &Built) -> Result<Symbols, CliError> {
    let sw = built.vmm.switcher(s.kind)?;
    let mut out = Symbols {
        areas: Vec::new(),
        symbols: Vec::new(),
        code: Vec::new(),
        entry: sw.entries.r0_host_to_guest_hc.0,
    };
    switcher_symbols(s, sw, &mut out)?;
    kernel_symbols(built, &mut out);
    far_symbols(s, built, &mut out);
    Ok(out)
}

/// `path` as gdb's `dump` and a `printf` format take it, or
/// [`GdbError::TempPath`].
fn plain(path: &Path) -> Result<&str, GdbError> {
    path.to_str()
        .filter(|p| {
            !p.chars()
                .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '%'))
        })
        .ok_or_else(|| GdbError::TempPath(path.to_path_buf()))
}

/// `s` single-quoted for `/bin/sh`, then escaped for a gdb `eval` format
/// string (inside double quotes).
pub fn shell_in_eval(s: &str) -> String {
    let quoted = format!("'{}'", s.replace('\'', r"'\''"));
    quoted
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
}

/// The files of one gdb session.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The gdb script.
    pub script: PathBuf,
    /// The symbol file.
    pub symbols: PathBuf,
    /// Where `ws-x` dumps code bytes.
    pub scratch: PathBuf,
    /// The `worldswitch` binary `ws-x` runs.
    pub exe: PathBuf,
}

/// `ws-x`: the bitness from CR0.PE, EFER.LMA and the region table, the
/// bytes dumped up to the page end, and `worldswitch gdb-x` on them.
fn ws_x(sym: &Symbols, p: &Paths) -> Result<String, GdbError> {
    let scratch = plain(&p.scratch)?;
    let elf = plain(&p.symbols)?;
    let exe = shell_in_eval(&p.exe.to_string_lossy());
    let mut d = String::new();
    let _ = writeln!(
        d,
        "define ws-x\n  \
           if $argc > 0\n    set $_ws_n = $arg0\n  else\n    set $_ws_n = {DEFAULT_COUNT}\n  end\n  \
           if ($cr0 & 1) == 0\n    \
             set $_ws_bits = 16\n    set $_ws_why = \"CR0.PE clear\"\n    \
             set $_ws_at = ((unsigned long long) $cs << 4) + ((unsigned long long) $pc & 0xffff)\n  \
           else\n    \
             set $_ws_at = (unsigned long long) $pc\n    \
             if ($efer & 0x400) != 0\n      \
               set $_ws_bits = 64\n      set $_ws_why = \"EFER.LMA set\"\n    \
             else\n      \
               set $_ws_bits = 32\n      set $_ws_why = \"protected mode, EFER.LMA clear\"\n    \
             end\n  \
           end"
    );
    for r in &sym.code {
        let _ = writeln!(
            d,
            "  if $_ws_at >= {:#x} && $_ws_at < {:#x}\n    set $_ws_bits = {}\n    \
             set $_ws_why = \"switcher region {}, {} view\"\n  end",
            r.start,
            r.end,
            r.bits,
            r.name,
            view_name(r.view)
        );
    }
    let _ = writeln!(
        d,
        "  set $_ws_end = $_ws_at + $_ws_n * {MAX_INSN}\n  \
           if (($_ws_end - 1) >> 12) != ($_ws_at >> 12)\n    \
             set $_ws_end = (($_ws_at >> 12) + 1) << 12\n  \
           end\n  \
           printf \"%d-bit code (%s):\\n\", $_ws_bits, $_ws_why\n  \
           eval \"dump binary memory {scratch} 0x%llx 0x%llx\", $_ws_at, $_ws_end\n  \
           eval \"shell {exe} gdb-x --bits %d --at 0x%llx --count %d --symbols {elf} {scratch}\", \
                $_ws_bits, $_ws_at, $_ws_n\n\
         end\n\
         document ws-x\n\
         ws-x [N]: decode N (default {DEFAULT_COUNT}) instructions at the PC as the CPU runs them:\n\
         as 16-bit code with CR0.PE clear, as the switcher region's bitness inside one,\n\
         else as 64-bit code with EFER.LMA set and 32-bit code without.\n\
         Stops at the end of the PC's page.\n\
         end"
    );
    Ok(d)
}

/// The gdb script: symbols, connection, variables, the entry breakpoint
/// and `ws-x`.
///
/// # Errors
/// A temporary path gdb cannot take; the switcher is not in the VMM.
pub fn script(
    s: &Scenario,
    built: &Built,
    sym: &Symbols,
    port: u16,
    p: &Paths,
) -> Result<String, CliError> {
    let kind = s.kind.cli_name();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# worldswitch run {kind} --gdb: QEMU's gdbstub on 127.0.0.1:{port}\n\
         file {}\n\
         target remote 127.0.0.1:{port}",
        plain(&p.symbols)?
    );
    for (name, addr) in &built.testbed.symbols {
        let _ = writeln!(out, "set ${} = {addr:#010x}", ident(name));
    }
    // `$sw_<label>`: each label and entry point in the view its region runs in.
    for l in setup::labels(built.vmm.switcher(s.kind)?) {
        let _ = writeln!(out, "set $sw_{} = {:#010x}", ident(&l.name), l.addr);
    }
    let _ = writeln!(
        out,
        "hbreak *{:#010x}\n# continue: run to the switcher's C entry",
        sym.entry
    );
    out.push_str(&ws_x(sym, p)?);
    Ok(out)
}

/// A `run --gdb` session's files; dropping it removes them.
#[derive(Debug)]
pub struct Session {
    paths: Paths,
    banner: String,
}

impl Session {
    /// Writes the symbol file and the script for `s` (QEMU's gdbstub on
    /// `port`) and prepares the banner.
    ///
    /// # Errors
    /// A file cannot be written, or the symbols cannot be made.
    pub fn start(s: &Scenario, built: &Built, port: u16) -> Result<Self, CliError> {
        let kind = s.kind.cli_name();
        let stem = format!("worldswitch-{kind}-{}", std::process::id());
        let dir = std::env::temp_dir();
        let exe = std::env::current_exe().map_err(|source| CliError::Read {
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        let mut session = Self {
            paths: Paths {
                script: dir.join(format!("{stem}.gdb")),
                symbols: dir.join(format!("{stem}.elf")),
                scratch: dir.join(format!("{stem}.bin")),
                exe,
            },
            banner: String::new(),
        };
        let sym = symbols(s, built)?;
        let elf = elf::write(&sym.areas, &sym.symbols).map_err(GdbError::from)?;
        let script = script(s, built, &sym, port, &session.paths)?;
        for (path, bytes) in [
            (&session.paths.symbols, elf.as_slice()),
            (&session.paths.script, script.as_bytes()),
        ] {
            std::fs::write(path, bytes).map_err(|source| CliError::Write {
                path: path.clone(),
                source,
            })?;
        }
        session.banner = banner(s, built, port, &session.paths)?;
        Ok(session)
    }

    /// What to tell the person at the terminal.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// The session's files.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for p in [&self.paths.script, &self.paths.symbols, &self.paths.scratch] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The banner: how to start gdb, what the script gives, every label.
fn banner(s: &Scenario, built: &Built, port: u16, p: &Paths) -> Result<String, CliError> {
    let sw = built.vmm.switcher(s.kind)?;
    let kind = s.kind.cli_name();
    let mut b = String::new();
    let _ = writeln!(
        b,
        "QEMU is starting halted with its gdbstub on 127.0.0.1:{port} ({kind}).\n\
         In another terminal run:\n\n    gdb -q -x {}\n\n\
         The script loads symbols for every switcher label in each view (e.g. IDEnterTarget@ID) \
         and the host kernel (e.g. call_site), connects, defines $<symbol> for the host kernel \
         and $sw_<label> for the switcher, and sets a hardware breakpoint on the C entry. \
         `ws-x [N]` decodes N instructions at the PC with the bitness the CPU runs them in \
         (gdb's own x/i decodes everything as 64-bit code here).",
        p.script.display()
    );
    let _ = writeln!(b, "Switcher labels ({kind}):");
    for l in setup::labels(sw) {
        let view = l.view.map_or("--", view_name);
        let _ = writeln!(
            b,
            "    {view}  {:#010x}  +{:#06x}  {}",
            l.addr, l.offset, l.name
        );
    }
    let _ = writeln!(
        b,
        "Host kernel: call_site {:#010x}, after_call {:#010x}. Quit gdb with `kill` to end the run; \
         the script and symbol file are removed when the run ends.",
        built.testbed.symbol("call_site").unwrap_or(0),
        built.testbed.symbol("after_call").unwrap_or(0)
    );
    Ok(b)
}

/// `worldswitch gdb-x` (hidden; `ws-x` runs it): decodes code bytes gdb
/// dumped.
#[derive(Debug, Args)]
pub struct XArgs {
    /// Code bitness: 16, 32 or 64.
    #[arg(long, value_parser = parse_bits)]
    pub bits: u32,
    /// Address of the first byte.
    #[arg(long, value_name = "ADDR", value_parser = crate::args::parse_addr)]
    pub at: u64,
    /// Instructions to decode.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_COUNT, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub count: u32,
    /// A symbol file to name the addresses with.
    #[arg(long, value_name = "ELF")]
    pub symbols: Option<PathBuf>,
    /// The bytes.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// `16`, `32` or `64`.
fn parse_bits(s: &str) -> Result<u32, String> {
    match s {
        "16" => Ok(16),
        "32" => Ok(32),
        "64" => Ok(64),
        _ => Err(format!("bitness {s} is not 16, 32 or 64")),
    }
}

/// `addr` as `<symbol+off>` from `syms` (sorted by address), when a symbol
/// covers it.
fn name_of(syms: &[ReadSymbol], addr: u64) -> Option<String> {
    let s = syms
        .iter()
        .filter(|s| s.addr <= addr && addr - s.addr < s.size.max(1))
        .max_by_key(|s| s.addr)?;
    Some(match addr - s.addr {
        0 => format!("<{}>", s.name),
        off => format!("<{}+{off}>", s.name),
    })
}

/// Decodes up to `count` instructions of `bytes` at `at` as `bits`-bit
/// code, one line each: a `=>` on the first, the address (8 hex digits
/// below 64-bit code), its symbol, the bytes and the Intel-syntax text
/// (as `worldswitch disasm` prints it). An instruction cut off by the end
/// of `bytes` is reported as such.
pub fn decode(bits: u32, at: u64, count: u32, bytes: &[u8], syms: &[ReadSymbol]) -> String {
    let mut dec = Decoder::with_ip(bits, bytes, at, DecoderOptions::NONE);
    let mut fmt = IntelFormatter::new();
    fmt.options_mut().set_first_operand_char_index(8);
    let mut insn = Instruction::default();
    // (where, what) per line; `where` is padded to one width at the end.
    let mut rows: Vec<(String, String)> = Vec::new();
    for i in 0..count {
        if !dec.can_decode() {
            break;
        }
        let pos = dec.position();
        dec.decode_out(&mut insn);
        let mark = if i == 0 { "=>" } else { "  " };
        let addr = if bits == 64 {
            format!("{:#018x}", insn.ip())
        } else {
            format!("{:#010x}", insn.ip())
        };
        let name = name_of(syms, insn.ip())
            .map(|n| format!(" {n}"))
            .unwrap_or_default();
        let place = format!("{mark} {addr}{name}:");
        if dec.last_error() == DecoderError::NoMoreBytes {
            rows.push((place, "(cut off at the end of the page)".into()));
            break;
        }
        let raw: String = bytes
            .get(pos..pos + insn.len())
            .unwrap_or_default()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut text = String::new();
        fmt.format(&insn, &mut text);
        rows.push((place, format!("{raw:<22} {text}")));
    }
    let width = rows.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (place, what) in rows {
        let _ = writeln!(out, "{place:<width$}  {what}");
    }
    out
}

/// `worldswitch gdb-x`.
///
/// # Errors
/// A file cannot be read, or the symbol file is not one.
pub fn x(a: &XArgs, out: &mut String) -> Result<Exit, CliError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| CliError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let bytes = read(&a.file)?;
    let syms = match &a.symbols {
        Some(p) => elf::read(&read(p)?).map_err(|e| CliError::Document {
            path: p.clone(),
            why: e.to_string(),
        })?,
        None => Vec::new(),
    };
    out.push_str(&decode(a.bits, a.at, a.count, &bytes, &syms));
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_byte_decodes_by_bitness() {
        // 50 = push eax (32-bit) / push rax (64-bit); 48 89 c3 is
        // `dec eax; mov ebx,eax` as 32-bit code.
        let code = [0x50, 0x48, 0x89, 0xc3];
        let d32 = decode(32, 0xc040_1dc0, 3, &code, &[]);
        let d64 = decode(64, 0xc040_1dc0, 3, &code, &[]);
        assert!(d32.starts_with("=> 0xc0401dc0:  50"), "{d32}");
        assert!(
            d32.contains("push    eax") && d32.contains("dec     eax"),
            "{d32}"
        );
        assert!(
            d64.contains("push    rax") && d64.contains("mov     rbx,rax"),
            "{d64}"
        );
        assert!(d64.contains("0x00000000c0401dc1"), "{d64}");
    }

    #[test]
    fn a_cut_instruction_is_named_and_symbols_show() {
        let syms = [ReadSymbol {
            name: "IDEnterTarget@ID".into(),
            addr: 0x40_2000,
            size: 0x50,
            section: None,
        }];
        let d = decode(32, 0x40_2000, 8, &[0x90, 0xb8, 0x01], &syms);
        let lines: Vec<String> = d
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            lines,
            [
                "=> 0x00402000 <IDEnterTarget@ID>: 90 nop",
                "0x00402001 <IDEnterTarget@ID+1>: (cut off at the end of the page)"
            ],
            "{d}"
        );
        // The address column is padded to the longest.
        let raw: Vec<&str> = d.lines().collect();
        assert_eq!(raw[0].find(" 90 "), raw[1].find(" (cut"), "{d}");
    }

    #[test]
    fn quoting_survives_shell_and_eval() {
        assert_eq!(shell_in_eval("/a b/ws"), "'/a b/ws'");
        assert_eq!(shell_in_eval("/it's"), r"'/it'\\''s'");
        assert_eq!(shell_in_eval("/100%\"x"), "'/100%%\\\"x'");
        assert!(plain(Path::new("/tmp/a b")).is_err());
        assert!(plain(Path::new("/tmp/ws-1.bin")).is_ok());
    }

    #[test]
    fn a_busy_port_is_named() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(port_in_use(port));
        let e = check_port(port).unwrap_err().to_string();
        assert!(e.starts_with(&format!("gdb port {port} is busy (")), "{e}");
        assert!(!e.contains('\n'), "{e}");
        drop(l);
        assert!(check_port(port).is_ok());
    }
}
