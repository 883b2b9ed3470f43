//! Real client programs (curl, tftp-hpa's `tftp`, atftp) and other host tools: found on
//! `PATH`, skipped loudly when missing (unless `DYNTFTP_REQUIRE_CLIENTS=1`), run with a
//! deadline.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::files::{big, pseudo_random, SMALL};

/// True when `DYNTFTP_REQUIRE_CLIENTS=1`: a missing client program fails the test.
pub fn require_clients() -> bool {
    std::env::var("DYNTFTP_REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}

/// The path of an executable `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The program's path, or `None` after a loud SKIPPED line; panics instead when clients
/// are required.
pub fn client_or_skip(program: &str, test: &str) -> Option<PathBuf> {
    match which(program) {
        Some(path) => Some(path),
        None if require_clients() => {
            panic!("{test}: {program} is not installed, and DYNTFTP_REQUIRE_CLIENTS=1")
        }
        None => {
            eprintln!(
                "SKIPPED: {test}: {program} not installed (set DYNTFTP_REQUIRE_CLIENTS=1 to make this fail)"
            );
            None
        }
    }
}

/// 512 × 1428: an exact multiple of both block sizes the real-client tests use.
pub const MULT_LEN: usize = 512 * 1428;

/// The files every real client fetches: a small one, an exact multiple ([`MULT_LEN`]),
/// the 3 MiB one, an empty one.
pub fn client_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("small.txt", SMALL.to_vec()),
        ("mult.bin", pseudo_random(MULT_LEN, 11)),
        ("big.bin", big().to_vec()),
        ("empty.bin", Vec::new()),
    ]
}

/// Every client run is killed after this long.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// A finished client process.
pub struct Run {
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Run {
    /// Status and output, for a failure message.
    pub fn describe(&self) -> String {
        format!(
            "status {}\nstdout: {}\nstderr: {}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `program` with `args` in `dir` (which also receives its output files), killing it
/// after [`CLIENT_DEADLINE`] (the test then fails).
pub fn run(program: &Path, args: &[&str], dir: &Path) -> Run {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let out_path = dir.join(format!(".stdout-{n}"));
    let err_path = dir.join(format!(".stderr-{n}"));
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let deadline = Instant::now() + CLIENT_DEADLINE;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} {args:?} still running after {CLIENT_DEADLINE:?}; killed\nstderr: {}",
                    program.display(),
                    fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    Run {
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    }
}
