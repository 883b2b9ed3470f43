//! Network namespaces and the background processes run in them, for tests that need a
//! network of their own (the firmware netboot tests: a tap device, a DHCP server,
//! dyntftpd and a qemu guest). A namespace is deleted on drop; a process is killed by its
//! own PID and reaped on drop, so nothing outlives a test, also when it panics.
//!
//! Creating a namespace needs root (`CAP_SYS_ADMIN`) and `ip` from iproute2; where either
//! is missing, [`NetNs::create_or_skip`] says so loudly and the test is skipped, unless
//! `DYNTFTP_REQUIRE_CLIENTS=1` ([`require_clients`]) makes that a failure.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::real::{require_clients, which};

/// How often a waiting test looks at a log or a process again.
const POLL: Duration = Duration::from_millis(50);

/// A test prerequisite (a program, a firmware file, namespaces) is missing: prints a loud
/// `SKIPPED:` line and returns `None`, or panics when [`require_clients`] says every
/// prerequisite must be there.
pub fn skip_missing<T>(test: &str, missing: &str) -> Option<T> {
    if require_clients() {
        panic!("{test}: {missing}, and DYNTFTP_REQUIRE_CLIENTS=1");
    }
    eprintln!("SKIPPED: {test}: {missing} (set DYNTFTP_REQUIRE_CLIENTS=1 to make this fail)");
    None
}

/// The path of `program` on `PATH`, or in the system directories (`/usr/sbin`, `/sbin`)
/// that a non-root `PATH` often lacks (`ip`, `dnsmasq`).
pub fn system_program(program: &str) -> Option<PathBuf> {
    which(program).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(program))
            .find(|path| path.is_file())
    })
}

/// Runs `command` to completion; its standard error on failure.
fn run_checked(command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A network namespace named `dyntftp-<tag>-<pid>-<n>`, with its loopback up; deleted
/// (with the devices in it) on drop.
pub struct NetNs {
    name: String,
    ip: PathBuf,
}

impl NetNs {
    /// Creates the namespace, or says why it cannot be (not root, no `ip`, no namespace
    /// support).
    pub fn create(tag: &str) -> Result<NetNs, String> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let ip = system_program("ip").ok_or("`ip` (iproute2) is not installed")?;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("dyntftp-{tag}-{}-{n}", std::process::id());
        run_checked(Command::new(&ip).args(["netns", "add", &name]))
            .map_err(|e| format!("cannot create a network namespace (root needed): {e}"))?;
        // From here on, drop deletes it.
        let ns = NetNs { name, ip };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// [`NetNs::create`], or `None` after [`skip_missing`].
    pub fn create_or_skip(tag: &str, test: &str) -> Option<NetNs> {
        NetNs::create(tag).map_or_else(|why| skip_missing(test, &why), Some)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <namespace> <args>` (e.g. `["addr", "add", …]`).
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        run_checked(Command::new(&self.ip).args(["-n", &self.name]).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which execs
    /// it: the child's PID is the program's own).
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(&self.ip);
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_checked(Command::new(&self.ip).args(["netns", "del", &self.name])) {
            eprintln!("warning: network namespace {} not deleted: {e}", self.name);
        }
    }
}

/// Runs `f` on a new thread in the network namespace named `name`: sockets it makes, and
/// threads it starts, belong to that namespace.
pub fn in_namespace<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns with a namespace descriptor that stays open for the call; it
        // changes only this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// A process started for a test, its standard output and error appended to a log file;
/// killed (by its own PID) and reaped on drop.
pub struct Background {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Background {
    /// Starts `command` with no input, its output in `log`; `what` names it in messages.
    pub fn spawn(mut command: Command, what: &str, log: &Path) -> Background {
        let out = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({command:?}): {e}"));
        Background {
            child,
            what: what.to_string(),
            log: log.to_path_buf(),
        }
    }

    /// The process's ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has written so far (lossy UTF-8).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits until `done` holds for the log or the process has exited, at most `within`;
    /// returns the log then, or an error saying which of the three happened.
    pub fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if done(&log) {
                return Ok(log);
            }
            if let Some(status) = self.exited() {
                // It may have written the last of its output just before exiting.
                let log = self.log();
                if done(&log) {
                    return Ok(log);
                }
                return Err(format!(
                    "{} exited ({status}) before {what}; its output:\n{log}",
                    self.what
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {what} from {} within {within:?}; its output:\n{log}",
                    self.what
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// [`Background::wait_for`] a line containing `needle`, panicking when it does not
    /// come.
    pub fn expect_in_log(&mut self, needle: &str, within: Duration) -> String {
        self.wait_for(within, &format!("{needle:?}"), |log| log.contains(needle))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits at most `within` for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill(2) with the PID of our own child, which has not been reaped yet
        // (Background owns the Child and only reaps it in stop, or when it has exited).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Kills the process (if it still runs) and reaps it.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::TempDir;

    #[test]
    fn background_logs_are_read_and_the_process_is_reaped() {
        let Some(sh) = system_program("sh") else {
            return;
        };
        let dir = TempDir::new("background");
        let mut command = Command::new(&sh);
        command.args(["-c", "echo ready; echo oops >&2; exec sleep 30"]);
        let mut child = Background::spawn(command, "sh", &dir.path().join("sh.log"));
        let log = child.expect_in_log("oops", Duration::from_secs(10));
        assert!(log.contains("ready"), "{log}");
        assert!(child.exited().is_none(), "still sleeping");
        child.stop();
        assert!(child.exited().is_some(), "killed and reaped");
        let early = child.wait_for(Duration::from_secs(1), "never", |log| log.contains("never"));
        assert!(early.unwrap_err().contains("exited"));
    }

    #[test]
    fn a_namespace_is_created_and_deleted() {
        let Ok(ns) = NetNs::create("selftest") else {
            eprintln!("SKIPPED: a_namespace_is_created_and_deleted: no network namespaces here");
            return;
        };
        let name = ns.name().to_string();
        let ip = system_program("ip").unwrap();
        let listed = |name: &str| {
            let out = Command::new(&ip).args(["netns", "list"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
        };
        assert!(listed(&name));
        ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "lo"])
            .unwrap();
        assert!(ns.ip(&["link", "set", "nosuchdevice", "up"]).is_err());
        drop(ns);
        assert!(!listed(&name), "{name} still listed after drop");
    }
}
