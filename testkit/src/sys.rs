//! Process resources the tests and benches set or measure: the descriptor limit, open
//! descriptors, thread CPU time, resident memory (Linux).

use std::io;
use std::time::Duration;

/// The soft and hard limits on open descriptors.
fn fd_limits() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

fn set_fd_limits(limit: &libc::rlimit) -> io::Result<()> {
    // SAFETY: `limit` is a valid `rlimit` that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit on open descriptors towards `wanted`, up to the hard limit, and
/// returns the soft limit now in effect (1024, the usual default, if it cannot be read).
/// Never lowers it. Failure is not fatal: callers size their work from the result.
pub fn raise_fd_limit(wanted: u64) -> u64 {
    let Ok(mut limit) = fd_limits() else {
        return 1024;
    };
    if limit.rlim_cur < wanted {
        let old = limit.rlim_cur;
        limit.rlim_cur = wanted.min(limit.rlim_max);
        if set_fd_limits(&limit).is_err() {
            return old;
        }
    }
    limit.rlim_cur
}

/// Sets the soft limit on open descriptors to `soft` (at most the hard limit) and returns
/// the previous one. Panics when the limit cannot be read or set: a test that lowers it
/// relies on it.
pub fn set_fd_soft_limit(soft: u64) -> u64 {
    let mut limit = fd_limits().expect("getrlimit(RLIMIT_NOFILE)");
    let old = limit.rlim_cur;
    limit.rlim_cur = soft.min(limit.rlim_max);
    set_fd_limits(&limit).expect("setrlimit(RLIMIT_NOFILE)");
    old
}

/// Descriptors open in this process (entries of `/proc/self/fd`, the one `read_dir` holds
/// included); 0 without `/proc`.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_THREAD_CPUTIME_ID always exists
    // on Linux.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(ret, 0, "clock_gettime: {}", io::Error::last_os_error());
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Resident memory of this process in KiB (`VmRSS` of `/proc/self/status`); 0 without
/// `/proc`.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_readable() {
        let limit = raise_fd_limit(0);
        assert!(limit > 0);
        assert_eq!(raise_fd_limit(limit), limit, "never lowered");
        if std::path::Path::new("/proc/self/fd").exists() {
            assert!(open_fds() >= 3);
            assert!(rss_kib() > 0);
        }
        let before = thread_cpu();
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu() >= before);
    }
}
