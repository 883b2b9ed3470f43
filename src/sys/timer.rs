//! A one-shot `timerfd`: a descriptor that becomes readable when a monotonic timer set
//! with nanosecond precision expires, for waits shorter than a poll timeout can express.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A non-blocking, close-on-exec timer on `CLOCK_MONOTONIC` (the clock of
/// `std::time::Instant` on Linux), disarmed.
pub fn timer_fd() -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes no pointers; a non-negative result is a new descriptor.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arms `timer` to expire once, `after` from now (at least 1 ns: a zero time would
/// disarm it). Setting it clears any expiry not read yet.
pub fn set_timer(timer: &OwnedFd, after: Duration) -> io::Result<()> {
    let after = after.max(Duration::from_nanos(1));
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: after.subsec_nanos() as libc::c_long,
        },
    };
    // SAFETY: timerfd_settime reads an itimerspec from a pointer to a live local; the old
    // value pointer may be null.
    let rc = unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads (and so clears) the expiries of `timer`: how many there were, 0 when none.
pub fn read_timer(timer: &OwnedFd) -> io::Result<u64> {
    let mut expiries = 0u64;
    // SAFETY: read writes at most 8 bytes into a live local of 8 bytes.
    let n = unsafe {
        libc::read(
            timer.as_raw_fd(),
            (&mut expiries as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
    if n == 8 {
        return Ok(expiries);
    }
    let e = io::Error::last_os_error();
    if n < 0 && e.kind() == io::ErrorKind::WouldBlock {
        Ok(0)
    } else if n < 0 {
        Err(e)
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short timerfd read",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_timer_expires_once_after_its_time_and_not_before() {
        let timer = timer_fd().unwrap();
        assert_eq!(read_timer(&timer).unwrap(), 0, "disarmed");
        let start = Instant::now();
        set_timer(&timer, Duration::from_micros(300)).unwrap();
        // Poll the descriptor (no sleep): it must not expire before its time.
        loop {
            let expiries = read_timer(&timer).unwrap();
            if expiries > 0 {
                assert_eq!(expiries, 1);
                assert!(start.elapsed() >= Duration::from_micros(300));
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "never expired");
            std::hint::spin_loop();
        }
        assert_eq!(read_timer(&timer).unwrap(), 0, "one shot");
    }

    #[test]
    fn setting_a_timer_again_replaces_the_earlier_time() {
        let timer = timer_fd().unwrap();
        set_timer(&timer, Duration::from_nanos(1)).unwrap();
        let start = Instant::now();
        while read_timer(&timer).unwrap() == 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "never expired");
        }
        set_timer(&timer, Duration::from_secs(3600)).unwrap();
        set_timer(&timer, Duration::ZERO).unwrap();
        let start = Instant::now();
        while read_timer(&timer).unwrap() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "zero means at once"
            );
        }
    }
}
