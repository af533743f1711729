//! Running an image under QEMU's full-system emulator (TCG) and classifying
//! how it ended.
//!
//! The command line is fixed (see [`QemuConfig::args`]): TCG, no default
//! devices, COM1 on stdout, `isa-debug-exit` at port 0xF4, no reboot, and
//! `-icount shift=0,align=off,sleep=off` so RDTSC counts guest instructions and
//! the transcript repeats byte for byte. The guest writes a value `v` to port
//! 0xF4 and QEMU exits with status `(v << 1) | 1`; a triple fault ends QEMU
//! with status 0 under `-no-reboot`; status 1 means QEMU refused to start.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::transcript::{ExceptionInfo, FarExceptionInfo, Report};

/// The QEMU binary the testbed runs.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// How to install it on Debian/Ubuntu.
pub const INSTALL_HINT: &str = "apt-get install -y --no-install-recommends qemu-system-x86";

/// isa-debug-exit I/O base.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Guest value: every check passed.
pub const EXIT_PASS: u32 = 0x10;
/// Guest value: a check failed.
pub const EXIT_FAIL: u32 = 0x11;
/// Guest value: an exception in the host context.
pub const EXIT_HOST_EXCEPTION: u32 = 0x12;
/// Guest value: an exception on the far side of the switch.
pub const EXIT_FAR_EXCEPTION: u32 = 0x13;

/// QEMU's exit status for a guest value written to isa-debug-exit.
pub const fn exit_status(guest_value: u32) -> i32 {
    ((guest_value << 1) | 1) as i32
}

/// Why QEMU could not be run.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The binary is not on PATH.
    #[error("`{QEMU_BINARY}` was not found on PATH; install it with `{INSTALL_HINT}`")]
    QemuMissing,
    /// The binary named explicitly ([`QemuConfig::binary`]) is not there.
    #[error("QEMU binary `{}` {why}", path.display())]
    BinaryMissing {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it (`does not exist`, `is not a file`, …).
        why: String,
    },
    /// QEMU exited with status 1 before the guest printed anything: it
    /// refused the command line (an unknown `-cpu` model, a `-D` log file it
    /// cannot open, …) or the binary is not QEMU.
    #[error("`{}` refused to start: {}", binary.display(), refusal_text(stderr))]
    Refused {
        /// The binary run.
        binary: PathBuf,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Spawning failed.
    #[error("cannot start `{}`: {source}", binary.display())]
    Spawn {
        /// The binary tried.
        binary: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Waiting for or killing the process failed.
    #[error("lost track of the QEMU process: {0}")]
    Wait(std::io::Error),
    /// The image could not be written.
    #[error("cannot write the image to a temporary file: {0}")]
    WriteImage(std::io::Error),
    /// A zero timeout.
    #[error("timeout must be positive, got {0:?}")]
    ZeroTimeout(Duration),
    /// A timeout past [`MAX_TIMEOUT`].
    #[error("timeout {0:?} is longer than the maximum, {MAX_TIMEOUT:?}")]
    TimeoutTooLong(Duration),
    /// `--version` printed no version.
    #[error("cannot read QEMU's version from {output:?}")]
    NoVersion {
        /// The first line QEMU printed.
        output: String,
    },
}

/// QEMU's own words from its stderr, on one line.
fn refusal_text(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "it exited with status 1 and printed nothing (is it QEMU?)".into()
    } else {
        lines.join("; ")
    }
}

/// Finds `qemu-system-x86_64` on PATH.
pub fn find_qemu() -> Result<PathBuf, QemuError> {
    let path = std::env::var_os("PATH").ok_or(QemuError::QemuMissing)?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|p| p.is_file())
        .ok_or(QemuError::QemuMissing)
}

/// The binary `config` runs: [`QemuConfig::binary`] when it names an
/// existing file, else `qemu-system-x86_64` from PATH.
///
/// # Errors
/// [`QemuError::BinaryMissing`] for a named binary that is not a file,
/// [`QemuError::QemuMissing`] when PATH has none.
pub fn resolve_binary(config: &QemuConfig) -> Result<PathBuf, QemuError> {
    let Some(path) = &config.binary else {
        return find_qemu();
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(path.clone()),
        Ok(_) => Err(QemuError::BinaryMissing {
            path: path.clone(),
            why: "is not a file".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(QemuError::BinaryMissing {
            path: path.clone(),
            why: "does not exist".into(),
        }),
        Err(e) => Err(QemuError::BinaryMissing {
            path: path.clone(),
            why: format!("cannot be read: {e}"),
        }),
    }
}

/// The first QEMU major version whose TCG emulates x2APIC.
pub const X2APIC_MIN_MAJOR: u32 = 9;

/// The CPU model the testbed asks for when the host runs its APIC in x2APIC mode.
pub const X2APIC_CPU: &str = "qemu64,+x2apic";

/// The version QEMU reports (`major.minor.micro`), from `--version`.
///
/// # Errors
/// QEMU is missing or cannot be run, or its answer has no version.
pub fn qemu_version() -> Result<(u32, u32, u32), QemuError> {
    let bin = find_qemu()?;
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| QemuError::Spawn {
            binary: bin.clone(),
            source: e,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(|v| {
            v.split('.')
                .map(|p| {
                    p.trim_matches(|c: char| !c.is_ascii_digit())
                        .parse::<u32>()
                        .ok()
                })
                .collect::<Vec<_>>()
        });
    match v.as_deref() {
        Some([Some(a), Some(b), Some(c), ..]) => Ok((*a, *b, *c)),
        _ => Err(QemuError::NoVersion {
            output: text.lines().next().unwrap_or_default().to_string(),
        }),
    }
}

/// How to run QEMU.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// The binary; `None` searches PATH.
    pub binary: Option<PathBuf>,
    /// `-cpu` model (QEMU's default, `qemu64`, when `None`).
    pub cpu: Option<String>,
    /// `Some(port)`: add `-gdb tcp:127.0.0.1:<port> -S`, wait for gdb on
    /// that local TCP port before the first instruction.
    pub gdb: Option<u16>,
    /// Add `-d int,cpu_reset,guest_errors -D <file>`.
    pub debug_log: Option<PathBuf>,
    /// Add `-plugin <value>`: a TCG plugin library and its `,key=value`
    /// arguments (the cost model of `worldswitch run --cost`).
    pub plugin: Option<std::ffi::OsString>,
    /// Wall-clock limit; QEMU is killed when it expires.
    pub timeout: Duration,
    /// Host CPUs: `-smp` when more than 1 (`-icount` keeps them on one
    /// thread, round robin).
    pub smp: u32,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: None,
            cpu: None,
            gdb: None,
            debug_log: None,
            plugin: None,
            timeout: Duration::from_secs(30),
            smp: 1,
        }
    }
}

impl QemuConfig {
    /// The argument list for `image` (without the binary).
    pub fn args(&self, image: &Path) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = [
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-icount",
            "shift=0,align=off,sleep=off",
        ]
        .iter()
        .map(Into::into)
        .collect();
        if self.smp > 1 {
            args.push("-smp".into());
            args.push(self.smp.to_string().into());
        }
        if let Some(cpu) = &self.cpu {
            args.push("-cpu".into());
            args.push(cpu.into());
        }
        if let Some(port) = self.gdb {
            args.push("-gdb".into());
            args.push(format!("tcp:127.0.0.1:{port}").into());
            args.push("-S".into());
        }
        if let Some(log) = &self.debug_log {
            args.push("-d".into());
            args.push("int,cpu_reset,guest_errors".into());
            args.push("-D".into());
            args.push(log.into());
        }
        if let Some(plugin) = &self.plugin {
            args.push("-plugin".into());
            args.push(plugin.clone());
        }
        args.push("-kernel".into());
        args.push(image.into());
        args
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote [`EXIT_PASS`] (status 33).
    Pass,
    /// The guest wrote [`EXIT_FAIL`] (status 35).
    VerificationFailed,
    /// The guest wrote [`EXIT_HOST_EXCEPTION`] (status 37); the details come
    /// from the transcript's `EXC` line when present.
    HostException(Option<ExceptionInfo>),
    /// The guest wrote [`EXIT_FAR_EXCEPTION`] (status 39); details from a
    /// `FAREXC` line when present.
    FarException(Option<FarExceptionInfo>),
    /// QEMU ended with status 0: a triple fault or reset under `-no-reboot`.
    TripleFault,
    /// The wall-clock limit expired and QEMU was killed.
    Timeout,
    /// QEMU refused to start (status 1 before the guest printed anything);
    /// its stderr. [`RunResult::refusal`] turns it into a [`QemuError`].
    QemuRefused(String),
    /// Any other status (signals as 128 + signal number).
    Other(i32),
    /// The engine stopped the machine itself (a Bochs panic other than a
    /// triple fault); its words.
    EnginePanic(String),
}

impl Outcome {
    /// Classifies an exit status, taking exception details from `report`.
    /// Status 1 is a refusal only when the guest never printed its `BOOT`
    /// line; after it, status 1 is a guest exit like any other.
    pub fn classify(status: i32, stderr: &str, report: &Report) -> Self {
        match status {
            s if s == exit_status(EXIT_PASS) => Outcome::Pass,
            s if s == exit_status(EXIT_FAIL) => Outcome::VerificationFailed,
            s if s == exit_status(EXIT_HOST_EXCEPTION) => {
                Outcome::HostException(report.exception.clone())
            }
            s if s == exit_status(EXIT_FAR_EXCEPTION) => {
                Outcome::FarException(report.far_exception.clone())
            }
            0 => Outcome::TripleFault,
            1 if report.boot.is_none() => Outcome::QemuRefused(stderr.to_owned()),
            s => Outcome::Other(s),
        }
    }
}

/// The result of one QEMU run.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// How it ended.
    pub outcome: Outcome,
    /// Raw exit status (`None` after a timeout).
    pub status: Option<i32>,
    /// Everything the guest wrote to COM1.
    pub serial: Vec<u8>,
    /// QEMU's stderr.
    pub stderr: String,
    /// The decoded transcript.
    pub report: Report,
    /// Wall-clock duration of the run.
    pub wall: Duration,
}

impl RunResult {
    /// The transcript as text (lossy).
    pub fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }

    /// The refusal as an error naming the binary `config` ran, when QEMU
    /// refused to start.
    pub fn refusal(&self, config: &QemuConfig) -> Option<QemuError> {
        match &self.outcome {
            Outcome::QemuRefused(stderr) => Some(QemuError::Refused {
                binary: config.binary.clone().unwrap_or_else(|| QEMU_BINARY.into()),
                stderr: stderr.clone(),
            }),
            _ => None,
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return code;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    -1
}

/// The longest wall-clock limit a boot may have (one day): a deadline
/// further away is refused rather than risk an `Instant` overflow.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(MAX_TIMEOUT_SECS);

/// [`MAX_TIMEOUT`] in seconds, for command-line range checks.
pub const MAX_TIMEOUT_SECS: u64 = 86_400;

/// Boots `image` under QEMU and waits for it to end or time out.
pub fn run_image(image: &Path, config: &QemuConfig) -> Result<RunResult, QemuError> {
    if config.timeout.is_zero() {
        return Err(QemuError::ZeroTimeout(config.timeout));
    }
    if config.timeout > MAX_TIMEOUT {
        return Err(QemuError::TimeoutTooLong(config.timeout));
    }
    let binary = resolve_binary(config)?;
    let start = Instant::now();
    let mut child = Command::new(&binary)
        .args(config.args(image))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match (source.kind(), &config.binary) {
            (std::io::ErrorKind::NotFound, None) => QemuError::QemuMissing,
            _ => QemuError::Spawn {
                binary: binary.clone(),
                source,
            },
        })?;
    // Drain both pipes on threads so a chatty guest cannot block QEMU.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let deadline = start + config.timeout;
    let status = loop {
        match child.try_wait().map_err(QemuError::Wait)? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                child.kill().map_err(QemuError::Wait)?;
                child.wait().map_err(QemuError::Wait)?;
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let wall = start.elapsed();
    let serial = out_thread.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err_thread.join().unwrap_or_default()).into_owned();
    let report = Report::parse(&serial);
    let (outcome, status) = match status {
        None => (Outcome::Timeout, None),
        Some(st) => {
            let code = exit_code(st);
            (Outcome::classify(code, &stderr, &report), Some(code))
        }
    };
    Ok(RunResult {
        outcome,
        status,
        serial,
        stderr,
        report,
        wall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        let r = Report::default();
        assert_eq!(exit_status(EXIT_PASS), 33);
        assert_eq!(Outcome::classify(33, "", &r), Outcome::Pass);
        assert_eq!(Outcome::classify(35, "", &r), Outcome::VerificationFailed);
        assert_eq!(Outcome::classify(37, "", &r), Outcome::HostException(None));
        assert_eq!(Outcome::classify(39, "", &r), Outcome::FarException(None));
        assert_eq!(Outcome::classify(0, "", &r), Outcome::TripleFault);
        assert_eq!(
            Outcome::classify(1, "bad", &r),
            Outcome::QemuRefused("bad".into())
        );
        assert_eq!(Outcome::classify(7, "", &r), Outcome::Other(7));
    }

    #[test]
    fn status_1_after_boot_is_not_a_refusal() {
        let r = Report::parse(
            b"@@BOOT mode=pae mbeax=2badb002 trips=2 vcpus=1 items=3 entry=c0000000\n",
        );
        assert!(r.boot.is_some(), "{r:?}");
        assert_eq!(Outcome::classify(1, "", &r), Outcome::Other(1));
    }

    #[test]
    fn a_refusal_is_one_line_with_qemus_words() {
        let run = |stderr: &str| RunResult {
            outcome: Outcome::QemuRefused(stderr.into()),
            status: Some(1),
            serial: Vec::new(),
            stderr: stderr.into(),
            report: Report::default(),
            wall: Duration::ZERO,
        };
        let cfg = QemuConfig {
            binary: Some("/bin/false".into()),
            ..QemuConfig::default()
        };
        let msg = run("").refusal(&cfg).map(|e| e.to_string());
        let msg = msg.unwrap_or_default();
        assert!(
            msg.contains("/bin/false") && msg.contains("printed nothing"),
            "{msg}"
        );
        let msg = run("qemu: unable to find CPU model 'x'\nmore\n")
            .refusal(&QemuConfig::default())
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            msg,
            format!("`{QEMU_BINARY}` refused to start: qemu: unable to find CPU model 'x'; more")
        );
        let pass = RunResult {
            outcome: Outcome::Pass,
            ..run("")
        };
        assert!(pass.refusal(&cfg).is_none());
    }

    #[test]
    fn a_named_binary_must_exist() {
        for (path, why) in [
            ("/nonexistent/qemu", "does not exist"),
            ("/", "is not a file"),
        ] {
            let c = QemuConfig {
                binary: Some(path.into()),
                ..QemuConfig::default()
            };
            let msg = resolve_binary(&c).map_err(|e| e.to_string());
            assert_eq!(msg, Err(format!("QEMU binary `{path}` {why}")));
        }
    }

    #[test]
    fn command_line_has_the_fixed_flags() {
        let c = QemuConfig {
            cpu: Some("max".into()),
            gdb: Some(1234),
            debug_log: Some("/tmp/x.log".into()),
            ..QemuConfig::default()
        };
        let args: Vec<String> = c
            .args(Path::new("/tmp/k.bin"))
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.starts_with(
            "-accel tcg -nodefaults -display none -monitor none -serial stdio -no-reboot \
             -device isa-debug-exit,iobase=0xf4,iosize=0x04 -icount shift=0,align=off,sleep=off"
        ));
        assert!(line.contains(
            "-cpu max -gdb tcp:127.0.0.1:1234 -S -d int,cpu_reset,guest_errors -D /tmp/x.log"
        ));
        assert!(line.ends_with("-kernel /tmp/k.bin"));
    }

    #[test]
    fn missing_qemu_names_the_install_command() {
        let msg = QemuError::QemuMissing.to_string();
        assert!(msg.contains(INSTALL_HINT), "{msg}");
    }

    #[test]
    fn a_timeout_past_the_maximum_is_refused() {
        for timeout in [MAX_TIMEOUT + Duration::from_nanos(1), Duration::MAX] {
            let c = QemuConfig {
                timeout,
                ..QemuConfig::default()
            };
            assert!(matches!(
                run_image(Path::new("/nonexistent"), &c),
                Err(QemuError::TimeoutTooLong(t)) if t == timeout
            ));
        }
    }

    #[test]
    fn zero_timeout_is_refused() {
        let c = QemuConfig {
            timeout: Duration::ZERO,
            ..QemuConfig::default()
        };
        assert!(matches!(
            run_image(Path::new("/nonexistent"), &c),
            Err(QemuError::ZeroTimeout(_))
        ));
    }
}
