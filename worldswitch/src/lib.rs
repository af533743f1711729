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
//! Output is assembled in a `String` and written once, so a closed pipe
//! (`worldswitch disasm … | head`) ends the program quietly. Errors are one
//! line on stderr. Exit status ([`Exit`]): 0 every switcher verified, 1 a
//! switcher failed verification, 2 a usage or environment error.
//!
//! The JSON document of `run --json` and `decode --json` is described in
//! [`report`].

pub mod args;
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
    /// QEMU is missing.
    #[error("{0}")]
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
    /// The transcript has no `BOOT` line.
    #[error("no @@BOOT line in the transcript: not a COM1 log of a worldswitch image")]
    NoBoot,
    /// The transcript does not fit the options.
    #[error("{0}")]
    Transcript(String),
    /// STAM could not read the samples.
    #[error("STAM: {0}")]
    Stam(#[from] stam::StamError),
    /// JSON output failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
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

/// Runs a parsed command line, appending what it prints to `out`.
///
/// # Errors
/// [`CliError`] for usage and environment errors (exit status 2).
pub fn execute(cli: &Cli, out: &mut String) -> Result<Exit, CliError> {
    match &cli.command {
        Command::List(a) => inspect::list(a, out),
        Command::Show(a) => inspect::show(a, out),
        Command::Disasm(a) => inspect::disasm(a, out),
        Command::Relocate(a) => inspect::relocate(a, out),
        Command::Run(a) => runs::run(a, out),
        Command::Image(a) => runs::image(a, out),
        Command::Decode(a) => runs::decode(a, out),
        Command::Stats(a) => runs::stats(a, out),
    }
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

fn write_stdout(out: &str) {
    let mut so = std::io::stdout().lock();
    // A closed pipe is the reader's choice, not an error.
    let _ = so.write_all(out.as_bytes()).and_then(|()| so.flush());
}

/// The program: parses `std::env::args`, runs, prints, and returns the exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            write_stdout(&e.to_string());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("worldswitch: error: {}", one_line(&e));
            return ExitCode::from(Exit::Error as u8);
        }
    };
    let mut out = String::new();
    let result = execute(&cli, &mut out);
    write_stdout(&out);
    match result {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            eprintln!("worldswitch: error: {msg}");
            ExitCode::from(Exit::Error as u8)
        }
    }
}
