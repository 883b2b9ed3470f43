//! The process: its descriptor limit, and (for tests) its user.

use std::io;
use std::mem::zeroed;

/// The soft limit on open file descriptors, raised to the hard limit first when possible.
pub fn raise_fd_limit() -> io::Result<u64> {
    // SAFETY: rlimit is a plain C struct; getrlimit/setrlimit only read/write it.
    unsafe {
        let mut limit: libc::rlimit = zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        Ok(limit.rlim_cur)
    }
}

/// Whether the process runs as root (effective user ID 0), which some tests need and
/// some checks (file permissions) do not apply to.
#[cfg(test)]
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_is_positive() {
        assert!(raise_fd_limit().unwrap() > 0);
    }
}
