//! systemd integration without libsystemd: socket activation (`LISTEN_PID`, `LISTEN_FDS`)
//! and readiness notification (`NOTIFY_SOCKET`), as described in sd_listen_fds(3) and
//! sd_notify(3).

use std::io;
use std::net::UdpSocket;
use std::os::fd::{FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Takes the UDP sockets systemd passed to this process, if it passed any, and removes the
/// activation variables from the environment so no child inherits them.
///
/// Like `sd_listen_fds`, it only looks at `LISTEN_FDS` when `LISTEN_PID` is this process's
/// id. Each descriptor must be an IPv4 or IPv6 datagram socket; anything else is an error
/// (a `.socket` unit with `ListenStream=` instead of `ListenDatagram=`, say).
///
/// Call it before any thread starts: it changes the environment.
pub fn listen_fds() -> Result<Vec<UdpSocket>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        // Meant for another process (our parent, say).
        return Ok(Vec::new());
    }
    let count: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| format!("invalid LISTEN_FDS {count:?}"))?;
    let mut sockets = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        check_udp(fd).map_err(|why| format!("inherited descriptor {fd}: {why}"))?;
        // SAFETY: the descriptor is open (checked above), was handed to this process by
        // its service manager for this purpose, and nothing else in the process owns it.
        let socket = unsafe { UdpSocket::from_raw_fd(fd) };
        // SAFETY: fcntl on an open descriptor; the result is checked.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(format!(
                "inherited descriptor {fd}: {}",
                io::Error::last_os_error()
            ));
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Checks that `fd` is an open IPv4/IPv6 datagram socket.
fn check_udp(fd: RawFd) -> Result<(), String> {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!("not a socket ({})", io::Error::last_os_error()));
    }
    if kind != libc::SOCK_DGRAM {
        return Err("not a datagram socket (use ListenDatagram= in the .socket unit)".into());
    }
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || !(domain == libc::AF_INET || domain == libc::AF_INET6) {
        return Err("not an IPv4 or IPv6 socket".into());
    }
    Ok(())
}

/// Sends state changes to the service manager over `NOTIFY_SOCKET` (sd_notify(3)). Not to
/// be confused with [`dyntftp::Notifier`], which wakes the event loop for a source.
pub struct ServiceManager {
    socket: UnixDatagram,
    addr: UnixAddr,
}

impl ServiceManager {
    /// The service manager listening on the socket `NOTIFY_SOCKET` names (a path, or
    /// `@name` in the abstract namespace), or `None` when it is unset. The variable is
    /// removed from the environment. Call it before any thread starts.
    pub fn from_env() -> Result<Option<ServiceManager>, String> {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        std::env::remove_var("NOTIFY_SOCKET");
        let text = value.to_string_lossy();
        let addr = if let Some(name) = text.strip_prefix('@') {
            UnixAddr::from_abstract_name(name.as_bytes())
        } else if text.starts_with('/') {
            UnixAddr::from_pathname(&value)
        } else {
            return Err(format!("unsupported NOTIFY_SOCKET {text:?}"));
        }
        .map_err(|e| format!("invalid NOTIFY_SOCKET {text:?}: {e}"))?;
        let socket = UnixDatagram::unbound()
            .map_err(|e| format!("cannot create a notification socket: {e}"))?;
        Ok(Some(ServiceManager { socket, addr }))
    }

    /// Sends `state`, newline-separated `KEY=value` assignments such as `READY=1`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            return Err(io::Error::other("notification truncated"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn notifies_a_path_and_an_abstract_address() {
        let dir = std::env::temp_dir().join(format!("dyntftpd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let by_path = UnixDatagram::bind(&path).unwrap();
        let name = format!("dyntftpd-test-{}", std::process::id());
        let by_name =
            UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        for (socket, addr) in [
            (&by_path, UnixAddr::from_pathname(&path).unwrap()),
            (
                &by_name,
                UnixAddr::from_abstract_name(name.as_bytes()).unwrap(),
            ),
        ] {
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let service_manager = ServiceManager {
                socket: UnixDatagram::unbound().unwrap(),
                addr,
            };
            service_manager.notify("READY=1\nSTATUS=serving").unwrap();
            let mut buf = [0u8; 64];
            let n = socket.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_inet_datagram_sockets_are_accepted() {
        use std::os::fd::AsRawFd;
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(check_udp(udp.as_raw_fd()), Ok(()));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(check_udp(tcp.as_raw_fd()).unwrap_err().contains("datagram"));
        let (unix, _) = UnixDatagram::pair().unwrap();
        assert!(check_udp(unix.as_raw_fd()).unwrap_err().contains("IPv4"));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(check_udp(file.as_raw_fd())
            .unwrap_err()
            .contains("not a socket"));
    }
}
