//! Process resources and socket options: CPU time, buffer sizes.

use std::io;

use mio::net::UdpSocket;

/// CPU time of this process, in seconds.
#[derive(Clone, Copy)]
pub struct Cpu {
    pub user: f64,
    pub sys: f64,
}

impl Cpu {
    pub fn total(self) -> f64 {
        self.user + self.sys
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, rhs: Cpu) -> Cpu {
        Cpu {
            user: self.user - rhs.user,
            sys: self.sys - rhs.sys,
        }
    }
}

pub fn cpu_times() -> Cpu {
    let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    // SAFETY: `rusage` is plain data for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage` that outlives the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Cpu {
            user: 0.0,
            sys: 0.0,
        };
    }
    Cpu {
        user: seconds(usage.ru_utime),
        sys: seconds(usage.ru_stime),
    }
}

/// Asks for a receive buffer of `bytes` on `socket`: past `net.core.rmem_max` when
/// privileged (`SO_RCVBUFFORCE`), else capped at it. Best effort: a refusal leaves the
/// default.
pub fn set_rcvbuf(socket: &UdpSocket, bytes: usize) {
    if set_int_option(socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes).is_err() {
        let _ = set_int_option(socket, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
    }
}

/// Sets an integer socket option (values beyond `c_int` are capped).
pub fn set_int_option(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is open for the duration of the call, and `value` is a valid
    // `c_int` whose size is passed as the option length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
