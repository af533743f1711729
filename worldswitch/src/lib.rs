//! The `worldswitch` command-line program: see, run, measure and debug
//! world switchers.
//!
//! The binary (`src/main.rs`) only calls [`main`]; everything
//! else lives here so it is documented, tested and reusable:
//!
//! | subcommand | does |
//! |---|---|
//! | `list` | every switcher kind: modes, availability, code size, fixups |
//! | `show` | one `VMMSWITCHERDEF`: fields, regions, entries, labels, fixup records |
//! | `disasm` | the annotated listing of the relocated code |
//! | `relocate` | writes the relocated bytes; `--json` lists every fixup written |
//! | `run` | boots the testbed under QEMU: verdict, instruction counts, STAM |
//! | `image` | writes the bootable multiboot test image |
//! | `decode` | judges a captured COM1 transcript of such an image |
//! | `stats` | the VM's STAM samples in text, XML, JSON or Prometheus format |
//!
//! Output goes to a [`Sink`]: `run` writes each switcher's report as soon as
//! its boot ends, the other commands write theirs once. A closed pipe
//! (`worldswitch disasm … | head`) ends the output quietly. Errors are one
//! line on stderr. Exit status ([`Exit`]): 0 every switcher verified, 1 a
//! switcher failed verification, 2 a usage or environment error (bad
//! argument or placement, QEMU missing or refusing to start).
//!
//! The JSON document of `run --json` and `decode --json` is described in
//! [`report`].

pub mod args;
pub mod cost;
pub mod elf;
pub mod gdb;
pub mod inspect;
pub mod progress;
pub mod report;
pub mod runs;
pub mod setup;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser as _;
use thiserror::Error;

use args::{Cli, Command};

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// How the program ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Every switcher verified (status 0).
    Ok = 0,
    /// A switcher failed verification (status 1).
    Failed = 1,
    /// A usage or environment error (status 2).
    Error = 2,
}

/// A usage or environment error: the program prints it on one line and exits 2.
#[derive(Debug, Error)]
pub enum CliError {
    /// Bad command-line usage.
    #[error("{0}")]
    Usage(String),
    /// An address option cannot be used.
    #[error("{option} {value:#x} {why}")]
    Address {
        /// The option.
        option: &'static str,
        /// Its value.
        value: u64,
        /// Why not.
        why: &'static str,
    },
    /// The switcher is not built.
    #[error("switcher {kind} is not available in this build (available: {available})")]
    Unavailable {
        /// The switcher.
        kind: &'static str,
        /// What is available.
        available: String,
    },
    /// The VMM core refused the configuration (bad placement, VCPU count).
    #[error("{0}")]
    Vmm(#[from] vmm::VmmError),
    /// A switcher could not be selected.
    #[error("{0}")]
    Select(#[from] vmm::mode::SelectError),
    /// The testbed could not be set up (placement, QEMU missing).
    #[error("{0}")]
    Scenario(#[from] integration::scenario::ScenarioError),
    /// QEMU is missing or refused to start.
    #[error("QEMU: {0}")]
    Qemu(#[from] integration::qemu::QemuError),
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A `--from` document is unusable.
    #[error("{}: {why}", path.display())]
    Document {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `run --cost` cannot measure: no plugin library, a QEMU without
    /// plugin support, or a damaged plugin report.
    #[error("cost model: {0}")]
    Cost(String),
    /// The transcript has no `BOOT` line.
    #[error("no @@BOOT line in the transcript: not a COM1 log of a worldswitch image")]
    NoBoot,
    /// The transcript does not fit the options.
    #[error("{0}")]
    Transcript(String),
    /// STAM could not read the samples.
    #[error("STAM: {0}")]
    Stam(#[from] stam::StamError),
    /// A `run --gdb` session cannot be set up (busy port, symbol file).
    #[error("{0}")]
    Gdb(#[from] gdb::GdbError),
    /// JSON output failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Bochs is missing, refused to start, or the image cannot be made
    /// into a Bochs disk.
    #[error("Bochs: {0}")]
    Bochs(#[from] integration::bochs::BochsError),
}

/// Pretty JSON with a final newline.
///
/// # Errors
/// Serialisation failed.
pub fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, CliError> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s)
}

/// Where a command's output goes, piece by piece as it is produced.
pub trait Sink {
    /// Appends `text`.
    fn put(&mut self, text: &str);
}

impl Sink for String {
    fn put(&mut self, text: &str) {
        self.push_str(text);
    }
}

/// Standard output, written and flushed piece by piece. Once the reader has
/// closed the pipe, the rest is dropped without a word: a closed pipe is the
/// reader's choice, not an error.
#[derive(Debug, Default)]
pub struct Stdout {
    closed: bool,
}

impl Sink for Stdout {
    fn put(&mut self, text: &str) {
        if self.closed {
            return;
        }
        let mut so = std::io::stdout().lock();
        if so
            .write_all(text.as_bytes())
            .and_then(|()| so.flush())
            .is_err()
        {
            self.closed = true;
        }
    }
}

/// Runs a parsed command line, writing what it prints to `out` (a `String`
/// collects it). `run` writes each report as soon as its boot ends; the
/// other commands write their output once, also when they then fail.
///
/// # Errors
/// [`CliError`] for usage and environment errors (exit status 2).
pub fn execute(cli: &Cli, out: &mut dyn Sink) -> Result<Exit, CliError> {
    let mut buf = String::new();
    let result = match &cli.command {
        Command::Run(a) => return runs::run(a, out),
        Command::List(a) => inspect::list(a, &mut buf),
        Command::Show(a) => inspect::show(a, &mut buf),
        Command::Disasm(a) => inspect::disasm(a, &mut buf),
        Command::Relocate(a) => inspect::relocate(a, &mut buf),
        Command::Image(a) => runs::image(a, &mut buf),
        Command::Decode(a) => runs::decode(a, &mut buf),
        Command::Stats(a) => runs::stats(a, &mut buf),
        Command::GdbX(a) => gdb::x(a, &mut buf),
    };
    out.put(&buf);
    result
}

/// A clap error on one line: the message without the usage block.
pub fn one_line(e: &clap::Error) -> String {
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        || e.kind() == ErrorKind::MissingSubcommand
    {
        return "a subcommand is required: list, show, disasm, relocate, run, image, decode or \
                stats (try --help)"
            .into();
    }
    let text = e.to_string();
    let mut parts: Vec<&str> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Usage:") {
            break;
        }
        if t.is_empty() || t.starts_with("For more information") {
            continue;
        }
        parts.push(t);
    }
    let msg = parts.join(" ");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    format!("{msg} (try --help)")
}

/// The program: parses `std::env::args`, runs, prints, and returns the exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            Stdout::default().put(&e.to_string());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("worldswitch: error: {}", one_line(&e));
            return ExitCode::from(Exit::Error as u8);
        }
    };
    match execute(&cli, &mut Stdout::default()) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            eprintln!("worldswitch: error: {msg}");
            ExitCode::from(Exit::Error as u8)
        }
    }
}
