//! A TFTP server binary under test as a [`Background`] process: waited for until it
//! answers, signalled, and killed (by its own PID) and reaped when dropped, whatever the
//! test did.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use dyntftp::Packet;

use crate::client::Raw;
use crate::netns::Background;

/// A running server process; killed and reaped on drop.
pub struct Daemon {
    process: Background,
    /// Where it serves TFTP (as the test knows it: set at start, or once read back).
    pub addr: SocketAddr,
    /// The file its output goes to.
    pub log_path: PathBuf,
}

impl Daemon {
    /// Starts `command` with no input and its output in `log`; `addr` is where the test
    /// will reach it.
    pub fn spawn(command: Command, addr: SocketAddr, log: &Path) -> Daemon {
        Daemon {
            process: Background::spawn(command, "the server", log),
            addr,
            log_path: log.to_path_buf(),
        }
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Panics, with the log, if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.process.exited() {
            panic!("the server exited: {status}\n{}", self.log());
        }
    }

    /// Sends a request for `name` every 100 ms until the server answers it and `ready`
    /// accepts the answer; panics (with the log) on an answer `ready` refuses, when the
    /// process exits, or after 10 s.
    pub fn wait_until_answered(&mut self, name: &[u8], ready: impl Fn(&Packet<'_>) -> bool) {
        let probe = Raw::new(self.addr);
        for _ in 0..100 {
            self.assert_running();
            probe.rrq(self.addr, name, "octet", &[]);
            if let Some((reply, _)) = probe.recv_within(Duration::from_millis(100)) {
                match Packet::parse(&reply) {
                    Ok(packet) if ready(&packet) => return,
                    other => panic!("unexpected answer to the readiness probe {other:?}"),
                }
            }
        }
        panic!("the server did not answer within 10 s\n{}", self.log());
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        self.process.signal(signal);
    }

    /// Waits (bounded) for the process to exit; panics, with the log, when it does not.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        self.process
            .wait_exit(within)
            .unwrap_or_else(|| panic!("the server did not exit within {within:?}\n{}", self.log()))
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago (bound, read, released).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
