//! Waking the loop on time for short waits.
//!
//! `mio`'s poll timeout is in whole milliseconds, rounded up, so a retransmission due in
//! 300 µs would fire a millisecond late — several round trips on a fast network. For a
//! wait shorter than [`PRECISE_BELOW`] the loop arms a `timerfd` (nanoseconds) as well,
//! and the poll returns when it expires. Setting it is a system call, so it is set only
//! when it would otherwise wake the loop too late (it is not set, or set for later than
//! the new deadline, or already expired); a timer set earlier than the deadline of the
//! moment, because the deadline moved later since, wakes the loop once for nothing,
//! which then sets it again. So a busy loop pays at most one set and one read per
//! expiry, not one per datagram.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::sys;

/// Waits at least this long use the poll's millisecond timeout alone (at most a
/// millisecond late, an eighth of the wait); shorter ones set the timer.
pub(super) const PRECISE_BELOW: Duration = Duration::from_millis(8);

/// The loop's precise timer (see the module documentation).
#[derive(Debug)]
pub(super) struct PreciseWake {
    timer: OwnedFd,
    /// When the timer is set to expire, while it is set.
    armed: Option<Instant>,
}

impl PreciseWake {
    /// A disarmed timer, registered with `registry` under `token`.
    pub(super) fn new(registry: &Registry, token: Token) -> io::Result<PreciseWake> {
        let timer = sys::timer_fd()?;
        registry.register(&mut SourceFd(&timer.as_raw_fd()), token, Interest::READABLE)?;
        Ok(PreciseWake { timer, armed: None })
    }

    /// Before the loop waits at `now` for `wake`: sets the timer when the wait is short
    /// and the timer would not wake the loop by then.
    pub(super) fn before_wait(&mut self, now: Instant, wake: Instant) -> io::Result<()> {
        let wait = wake.saturating_duration_since(now);
        if !needs_setting(self.armed, now, wake, wait) {
            return Ok(());
        }
        sys::set_timer(&self.timer, wait)?;
        self.armed = Some(wake);
        Ok(())
    }

    /// The timer's event came: clears its expiry.
    pub(super) fn expired(&mut self) -> io::Result<()> {
        self.armed = None;
        sys::read_timer(&self.timer).map(drop)
    }
}

/// Whether a timer set for `armed` must be set again for a wait of `wait` from `now` to
/// `wake`: the wait is short but not zero (the poll returns at once), and the timer is
/// not set, or set for after `wake`, or already expired.
fn needs_setting(armed: Option<Instant>, now: Instant, wake: Instant, wait: Duration) -> bool {
    if wait.is_zero() || wait >= PRECISE_BELOW {
        return false;
    }
    armed.is_none_or(|armed| armed > wake || armed <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn only_short_waits_set_the_timer() {
        let now = Instant::now();
        assert!(needs_setting(None, now, now + 300 * US, 300 * US));
        assert!(!needs_setting(None, now, now, Duration::ZERO));
        assert!(!needs_setting(
            None,
            now,
            now + PRECISE_BELOW,
            PRECISE_BELOW
        ));
    }

    #[test]
    fn a_timer_that_wakes_the_loop_in_time_is_left_alone() {
        let now = Instant::now();
        let wake = now + 500 * US;
        // Set for the same deadline, or for an earlier one (it wakes the loop early
        // once): not set again.
        assert!(!needs_setting(Some(wake), now, wake, 500 * US));
        assert!(!needs_setting(Some(now + 100 * US), now, wake, 500 * US));
        // Set for later, or expired already: set again.
        assert!(needs_setting(Some(now + 900 * US), now, wake, 500 * US));
        assert!(needs_setting(Some(now), now, wake, 500 * US));
    }

    #[test]
    fn the_poll_returns_when_the_timer_expires() {
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(4);
        let mut wake = PreciseWake::new(poll.registry(), Token(7)).unwrap();
        let start = Instant::now();
        wake.before_wait(start, start + 200 * US).unwrap();
        // The poll's own timeout (a minute) is not what ends it.
        poll.poll(&mut events, Some(Duration::from_secs(60)))
            .unwrap();
        assert!(start.elapsed() >= 200 * US);
        assert!(start.elapsed() < Duration::from_secs(30));
        assert_eq!(
            events.iter().map(|e| e.token()).collect::<Vec<_>>(),
            [Token(7)]
        );
        wake.expired().unwrap();
        // Set again after it expired: it fires again.
        let again = Instant::now();
        wake.before_wait(again, again + 200 * US).unwrap();
        poll.poll(&mut events, Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.token()).collect::<Vec<_>>(),
            [Token(7)]
        );
    }
}
