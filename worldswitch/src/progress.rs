//! A spinner on stderr for runs that take more than a moment.
//!
//! Nothing is drawn when stderr is not a terminal, nor during the first
//! 300 ms, so quick runs and redirected output stay clean.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
const DELAY: Duration = Duration::from_millis(300);
const TICK: Duration = Duration::from_millis(100);

/// The drawing thread and what it shares.
#[derive(Debug)]
struct Spinner {
    stop: Arc<AtomicBool>,
    message: Arc<Mutex<String>>,
    thread: JoinHandle<()>,
}

/// A running spinner; stops and clears its line when dropped.
#[derive(Debug)]
pub struct Progress {
    inner: Option<Spinner>,
}

impl Progress {
    /// Starts a spinner showing `message` (a no-op when stderr is not a terminal).
    pub fn start(message: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { inner: None };
        }
        let stop = Arc::new(AtomicBool::new(false));
        let msg = Arc::new(Mutex::new(message.to_owned()));
        let (stop2, msg2) = (Arc::clone(&stop), Arc::clone(&msg));
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let mut drawn = false;
            let mut frame = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                if start.elapsed() < DELAY || stop2.load(Ordering::Relaxed) {
                    continue;
                }
                // The message lock is held while drawing, so `above` never
                // prints into a half-drawn line.
                let Ok(text) = msg2.lock() else { break };
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[2K{} {} ({:.1} s)",
                    FRAMES[frame % FRAMES.len()],
                    *text,
                    start.elapsed().as_secs_f64()
                );
                let _ = err.flush();
                drop(err);
                drop(text);
                drawn = true;
                frame += 1;
            }
            if drawn {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K");
                let _ = err.flush();
            }
        });
        Self {
            inner: Some(Spinner {
                stop,
                message: msg,
                thread: handle,
            }),
        }
    }

    /// Runs `print` (which writes to stdout) with the spinner's line erased,
    /// so output on a terminal never lands after the spinner's text; the
    /// spinner draws again on its next tick.
    pub fn above<T>(&self, print: impl FnOnce() -> T) -> T {
        let Some(sp) = &self.inner else {
            return print();
        };
        let guard = sp.message.lock();
        {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
        let out = print();
        drop(guard);
        out
    }

    /// Changes the message.
    pub fn set(&self, message: &str) {
        if let Some(sp) = &self.inner {
            if let Ok(mut m) = sp.message.lock() {
                message.clone_into(&mut m);
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(sp) = self.inner.take() {
            sp.stop.store(true, Ordering::Relaxed);
            let _ = sp.thread.join();
        }
    }
}
