//! The `polyhub` binary as a child process, for tests that meet it as an operator does.
//!
//! [`polyhub_command`] builds the command with a clean environment; [`finish`] runs one that
//! ends by itself; [`PolyhubProcess`] keeps one running and reads its standard error line by
//! line on a thread, so a test can wait for a log line. Every wait is bounded (a hung child is
//! killed, and killed too when its handle is dropped). The binary's path comes from the caller
//! (`env!("CARGO_BIN_EXE_polyhub")` exists only in the `polyhub` crate's tests).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Upper bound on anything waited for: a start-up, a log line, a command that ends by itself.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// `binary` with `args`, run in `dir`, stdin closed, with none of the test's own `POLYHUB_*`
/// or `RUST_LOG` variables, and the REST API on a free port (`POLYHUB_HTTP_LISTEN=127.0.0.1:0`)
/// because tests run in parallel. Callers may set variables on the result.
pub fn polyhub_command(binary: impl AsRef<OsStr>, dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(binary);
    command.args(args).current_dir(dir).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("POLYHUB_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command.env("POLYHUB_HTTP_LISTEN", "127.0.0.1:0");
    command
}

/// Runs a command expected to end by itself, capturing its output; kills it and panics after
/// [`TIMEOUT`].
pub fn finish(mut command: Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn polyhub");
    let pid = child.id();
    // `wait_with_output` has no timeout: it waits on a thread while this one keeps the clock.
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(TIMEOUT) {
        Ok(output) => output.expect("wait for polyhub"),
        Err(_) => {
            send_signal(pid, "KILL");
            panic!("polyhub did not exit within {TIMEOUT:?}");
        }
    }
}

/// Sends `signal` (a name such as `TERM`, `INT`, `KILL`) to `pid` with kill(1); panics if
/// that fails.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A polyhub process that runs until told to stop, its standard error read line by line
/// (standard output is discarded). Killed when dropped if still running.
#[derive(Debug)]
pub struct PolyhubProcess {
    child: Child,
    lines: Receiver<String>,
    /// Every line read so far, in order.
    seen: Vec<String>,
}

impl PolyhubProcess {
    /// Spawns `command` (typically from [`polyhub_command`]).
    pub fn start(mut command: Command) -> PolyhubProcess {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn polyhub");
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        PolyhubProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line containing `needle`, already read or waited for (at most [`TIMEOUT`]);
    /// panics with everything read so far if it does not come.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|line| line.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {needle:?} within {TIMEOUT:?}; saw:\n{}",
                        self.log()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "polyhub ended ({status:?}) before printing {needle:?}; saw:\n{}",
                        self.log()
                    )
                }
            }
        }
    }

    /// The address of the `<what> listening on <addr>` line (`what` is `MQTT`, `MQTTS`, …).
    pub fn listening_address(&mut self, what: &str) -> SocketAddr {
        let needle = format!("{what} listening on ");
        let line = self.wait_for_line(&needle);
        let (_, address) = line.split_once(&needle).expect("needle is in the line");
        address
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not an address in {line:?}"))
    }

    /// Sends `signal` and waits, at most `limit`, for the process to end; returns its status
    /// and how long it took. What it printed last is read into the log.
    pub fn stop_with(&mut self, signal: &str, limit: Duration) -> (ExitStatus, Duration) {
        let sent = Instant::now();
        send_signal(self.child.id(), signal);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll polyhub") {
                let took = sent.elapsed();
                // The reader thread ends with the pipe; the bound only guards a grandchild
                // that inherited it.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return (status, took);
            }
            if sent.elapsed() > limit {
                panic!(
                    "polyhub still running {limit:?} after SIG{signal}; saw:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything read so far, plus what is already buffered, one line per line.
    pub fn log(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

impl Drop for PolyhubProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
