//! The window memory budget: how many bytes the running sessions' windows (the rings of
//! DATA packets each keeps for retransmission) may hold together, and the limits a new
//! session gets so that the sum stays within it. Socket-free: the table reserves and
//! releases, the driver asks for limits before it creates a session.
//!
//! A session reserves the most its ring can hold, `(4 + blksize) × window` as negotiated,
//! when it starts, and releases it when it ends: a fixed number per session, whatever the
//! transfer does in between. A new session gets what is left:
//!
//! - its window is cut to the bytes left ([`Limits::max_window_bytes`]), down to one
//!   block;
//! - when not even one block of the largest block size allowed fits, its block size is
//!   cut too, down to [`BUDGET_FLOOR_BLKSIZE`] (a full Ethernet frame).
//!
//! So the rings of all sessions stay within the budget, except that a session started
//! while it is spent still gets one block of at most `4 + 1468` bytes (and the 4-byte
//! headers, up to 4 × window bytes per session, are not part of the payload cut).

use crate::options::Limits;
use crate::packet::DATA_HEADER_LEN;

/// The block size a session is cut to when the budget cannot hold one larger block: a
/// 1500-byte Ethernet MTU minus the IPv4 (20), UDP (8) and TFTP (4) headers, the largest
/// block that is never fragmented there.
pub const BUDGET_FLOOR_BLKSIZE: u16 = 1468;

/// Bytes of window the running sessions hold, against a total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WindowBudget {
    total: usize,
    reserved: usize,
}

impl WindowBudget {
    /// A budget of `total` bytes, nothing reserved.
    pub(crate) fn new(total: usize) -> WindowBudget {
        WindowBudget { total, reserved: 0 }
    }

    /// Bytes reserved by running sessions.
    #[cfg(test)]
    pub(crate) fn reserved(&self) -> usize {
        self.reserved
    }

    /// `limits` cut to what is left of the budget (see the [module documentation](self)).
    pub(crate) fn limits(&self, limits: Limits) -> Limits {
        let left = self.total.saturating_sub(self.reserved);
        let max_blksize = if left >= usize::from(limits.max_blksize) {
            limits.max_blksize
        } else {
            // `left` is below a u16 block size here.
            let floor = left.max(usize::from(BUDGET_FLOOR_BLKSIZE)) as u16;
            limits.max_blksize.min(floor)
        };
        Limits {
            max_blksize,
            max_window_bytes: limits.max_window_bytes.min(left),
            ..limits
        }
    }

    /// A session started with a ring of `bytes`.
    pub(crate) fn reserve(&mut self, bytes: usize) {
        self.reserved = self.reserved.saturating_add(bytes);
    }

    /// A session with a ring of `bytes` ended.
    pub(crate) fn release(&mut self, bytes: usize) {
        debug_assert!(bytes <= self.reserved, "released more than reserved");
        self.reserved = self.reserved.saturating_sub(bytes);
    }
}

/// The most bytes the ring of a session with these parameters holds: `window` DATA
/// packets of `blksize` bytes and their headers.
pub(crate) fn ring_bytes(blksize: u16, window: u16) -> usize {
    (DATA_HEADER_LEN + usize::from(blksize)) * usize::from(window.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::negotiate;
    use crate::packet::Options;

    /// What a client asking for `blksize` and `windowsize` gets under `budget`.
    fn granted(budget: &WindowBudget, blksize: u16, window: u16) -> (u16, u16) {
        let raw = format!("blksize\0{blksize}\0windowsize\0{window}\0");
        let options = Options::parse(raw.as_bytes()).unwrap();
        let n = negotiate(options, &budget.limits(Limits::default()), None);
        (n.blksize, n.window)
    }

    #[test]
    fn with_room_the_limits_are_unchanged() {
        let budget = WindowBudget::new(256 << 20);
        assert_eq!(budget.limits(Limits::default()), Limits::default());
        assert_eq!(granted(&budget, 1468, 64), (1468, 64));
        assert_eq!(granted(&budget, 65464, 64), (65464, 16));
    }

    #[test]
    fn windows_shrink_as_the_budget_fills_and_grow_back_when_sessions_end() {
        let mut budget = WindowBudget::new(100_000);
        // First session: 64 × 1468 = 93,952 payload bytes fit.
        let (blksize, window) = granted(&budget, 1468, 64);
        assert_eq!((blksize, window), (1468, 64));
        let first = ring_bytes(blksize, window);
        assert_eq!(first, 64 * 1472);
        budget.reserve(first);
        // Second: 5,792 bytes left, 3 blocks.
        let (blksize, window) = granted(&budget, 1468, 64);
        assert_eq!((blksize, window), (1468, 3));
        let second = ring_bytes(blksize, window);
        budget.reserve(second);
        // Third: 1,376 bytes left, less than one 1468-byte block: one block, and a
        // larger block size is cut to 1468, not to 1376.
        assert_eq!(granted(&budget, 1468, 64), (1468, 1));
        assert_eq!(granted(&budget, 65464, 64), (1468, 1));
        assert_eq!(granted(&budget, 512, 64), (512, 2));
        // A lock-step client asking for a huge block is cut too.
        let options = Options::parse(b"blksize\x0065464\x00").unwrap();
        assert_eq!(
            negotiate(options, &budget.limits(Limits::default()), None).blksize,
            1468
        );
        // The first session ends: room again.
        budget.release(first);
        assert_eq!(budget.reserved(), second);
        assert_eq!(granted(&budget, 1468, 64), (1468, 64));
        budget.release(second);
        assert_eq!(budget.reserved(), 0);
    }

    #[test]
    fn a_spent_budget_leaves_one_block_of_at_most_1468_bytes() {
        let mut budget = WindowBudget::new(0);
        assert_eq!(granted(&budget, 65464, 64), (1468, 1));
        assert_eq!(granted(&budget, 8, 64), (8, 1));
        // Reservations beyond the total do not wrap.
        budget.reserve(usize::MAX);
        budget.reserve(10);
        assert_eq!(granted(&budget, 65464, 16), (1468, 1));
        let limits = Limits {
            max_blksize: 1024,
            ..Limits::default()
        };
        assert_eq!(budget.limits(limits).max_blksize, 1024, "never raised");
    }

    #[test]
    fn ring_bytes_count_headers_and_at_least_one_block() {
        assert_eq!(ring_bytes(512, 1), 516);
        assert_eq!(ring_bytes(1468, 8), 8 * 1472);
        assert_eq!(ring_bytes(512, 0), 516);
    }
}
