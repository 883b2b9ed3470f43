//! The start of a session: its source opening (at once, or later for a deferred source),
//! then the first answer negotiated with the size the source knows.

use std::task::Poll;
use std::time::Instant;

use super::{Outcome, Session, State};
use crate::family::too_large_without_rollover;
use crate::handler::Reject;
use crate::packet::ErrorCode;

impl Session {
    /// When a session still opening gives up: the open timeout after its start, never
    /// later than the progress timeout.
    pub(super) fn open_deadline(&self) -> Instant {
        let wait = self.config.open_timeout.min(self.config.progress_timeout);
        self.stats.started + wait
    }

    /// Asks a deferred source whether it has opened, unless it said `Pending` and nothing
    /// woke it since. Returns true when the session moved on (transfer or ERROR).
    pub(super) fn poll_opening(&mut self) -> bool {
        if self.source_blocked {
            return false;
        }
        match self.source.poll_open() {
            Poll::Pending => {
                self.source_blocked = true;
                false
            }
            Poll::Ready(Ok(())) => {
                self.stats.open_wait = Some(self.now.saturating_duration_since(self.stats.started));
                self.announced = self.source.size();
                self.params.set_tsize(self.announced);
                self.stats.negotiated = self.params.clone();
                if self.too_large_for_the_client() {
                    self.fail(
                        ErrorCode::DiskFull,
                        "file too large for this client (no block rollover)",
                        Outcome::Refused,
                    );
                } else {
                    self.start_transfer();
                }
                true
            }
            Poll::Ready(Err(reject)) => {
                self.refuse(&reject);
                true
            }
        }
    }

    /// The open source's first answer: the OACK when any option was accepted, else DATA 1.
    pub(super) fn start_transfer(&mut self) {
        self.source_blocked = false;
        self.control.clear();
        self.params.write_oack(&mut self.control);
        self.control_pending = !self.control.is_empty();
        self.state = if self.params.has_oack() {
            State::Oack
        } else {
            State::Transfer
        };
    }

    /// The source refused the request when it opened: its ERROR, then the end.
    pub(super) fn refuse(&mut self, reject: &Reject) {
        self.fail(reject.code, &reject.message, Outcome::Refused);
    }

    /// The open timeout passed with the source still unopened: ERROR 0.
    pub(super) fn open_timed_out(&mut self) {
        if self.now >= self.open_deadline() {
            self.fail(
                ErrorCode::NotDefined,
                "timed out opening file",
                Outcome::SourceStalled,
            );
        }
    }

    /// A client that cannot roll block numbers over asked for more than 65,535 blocks
    /// (see [`SessionConfig::block_rollover`](super::SessionConfig::block_rollover)). A
    /// netascii source has no size, so it is never refused here.
    fn too_large_for_the_client(&self) -> bool {
        !self.config.block_rollover
            && self
                .announced
                .is_some_and(|size| too_large_without_rollover(size, self.params.blksize))
    }
}
