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

    /// The source refused the request when it opened: its ERROR, then the end. ERROR 0
    /// says the source could not be opened (the backend failed): a failure,
    /// [`Outcome::ReadFailed`]; any other code is an answer ([`Outcome::Refused`]).
    pub(super) fn refuse(&mut self, reject: &Reject) {
        let outcome = match reject.code {
            ErrorCode::NotDefined => Outcome::ReadFailed,
            _ => Outcome::Refused,
        };
        self.fail(reject.code, &reject.message, outcome);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::deferred::{deferred, Opener};
    use crate::handler::Notifier;
    use crate::packet::{Mode, Options, Packet};
    use crate::response::BytesSource;
    use crate::session::{Output, SessionConfig};

    fn opening(options: &[u8], config: SessionConfig) -> (Opener, Session, Instant) {
        let (opener, source) = deferred(&Notifier::detached());
        let now = Instant::now();
        let options = Options::parse(options).unwrap();
        let session = Session::new(now, options, Mode::Octet, Box::new(source), config);
        (opener, session, now)
    }

    /// The next datagram the session sends, if any.
    fn sent(s: &mut Session) -> Option<Vec<u8>> {
        match s.poll_output(1) {
            Output::Transmit(t) => Some(t.contents.to_vec()),
            Output::Wait(_) | Output::Done(_) => None,
        }
    }

    #[test]
    fn nothing_is_sent_until_the_source_opens_then_the_oack_has_its_size() {
        let (opener, mut s, start) = opening(
            b"tsize\x000\x00blksize\x001024\x00",
            SessionConfig::default(),
        );
        assert_eq!(
            s.poll_output(1),
            Output::Wait(start + Duration::from_secs(2))
        );
        assert_eq!(s.deadline(), Some(start + Duration::from_secs(2)));
        // A repeat, an ACK: absorbed; an ACK does not verify a session that sent nothing.
        s.handle_repeated_request(start);
        s.handle_datagram(start, b"\x00\x04\x00\x00");
        assert!(!s.is_verified());
        assert_eq!(sent(&mut s), None);
        // Not woken: not asked again.
        opener.open(Box::new(BytesSource::new(vec![7u8; 3000])));
        assert_eq!(sent(&mut s), None);
        s.handle_source_ready(start + Duration::from_millis(40));
        let oack = sent(&mut s).expect("the OACK");
        assert_eq!(oack, b"\x00\x06tsize\x003000\x00blksize\x001024\x00");
        assert_eq!(s.stats().open_wait, Some(Duration::from_millis(40)));
        assert_eq!(s.stats().repeated_requests, 1);
        assert_eq!(s.stats().negotiated.tsize, Some(3000));
    }

    #[test]
    fn without_a_size_tsize_is_left_out_and_alone_it_leaves_no_oack() {
        struct Unsized;
        impl crate::response::ResponseData for Unsized {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Ok(0)
            }
        }
        let (opener, mut s, start) = opening(
            b"blksize\x001024\x00tsize\x000\x00",
            SessionConfig::default(),
        );
        opener.open(Box::new(Unsized));
        s.handle_source_ready(start);
        assert_eq!(sent(&mut s).unwrap(), b"\x00\x06blksize\x001024\x00");

        let (opener, mut s, start) = opening(b"tsize\x000\x00", SessionConfig::default());
        opener.open(Box::new(Unsized));
        s.handle_source_ready(start);
        assert_eq!(sent(&mut s).unwrap(), b"\x00\x03\x00\x01", "DATA 1 at once");
    }

    #[test]
    fn a_refusal_is_sent_instead_of_any_oack() {
        let (opener, mut s, start) = opening(b"tsize\x000\x00", SessionConfig::default());
        opener.refuse(Reject::not_found());
        s.handle_source_ready(start);
        let error = sent(&mut s).unwrap();
        assert!(matches!(
            Packet::parse(&error),
            Ok(Packet::Error {
                code: ErrorCode::FileNotFound,
                ..
            })
        ));
        assert_eq!(s.poll_output(1), Output::Done(Outcome::Refused));

        // A backend that failed (ERROR 0) is a failure.
        let (opener, mut s, start) = opening(b"", SessionConfig::default());
        drop(opener);
        s.handle_source_ready(start);
        assert!(sent(&mut s).is_some());
        assert_eq!(s.poll_output(1), Output::Done(Outcome::ReadFailed));
    }

    #[test]
    fn the_open_timeout_ends_with_error_0_and_never_outlasts_the_progress_timeout() {
        let config = SessionConfig {
            open_timeout: Duration::from_millis(500),
            ..SessionConfig::default()
        };
        let (opener, mut s, start) = opening(b"", config);
        s.handle_timeout(start + Duration::from_millis(499));
        assert_eq!(sent(&mut s), None);
        s.handle_timeout(start + Duration::from_millis(500));
        let error = sent(&mut s).unwrap();
        assert!(matches!(
            Packet::parse(&error),
            Ok(Packet::Error {
                code: ErrorCode::NotDefined,
                ..
            })
        ));
        assert_eq!(s.poll_output(1), Output::Done(Outcome::SourceStalled));
        drop(s);
        assert!(opener.is_abandoned());

        let config = SessionConfig {
            open_timeout: Duration::from_secs(90),
            ..SessionConfig::default()
        };
        let (_opener, s, start) = opening(b"", config);
        assert_eq!(s.deadline(), Some(start + Duration::from_secs(60)));
    }

    #[test]
    fn a_client_without_block_rollover_is_refused_a_file_too_large_once_it_opens() {
        let config = SessionConfig {
            block_rollover: false,
            ..SessionConfig::default()
        };
        // 65,535 blocks of 1024 bytes is the most: one byte more needs block 65,536.
        for (size, refused) in [(65_535 * 1024 - 1, false), (65_535 * 1024, true)] {
            let (opener, mut s, start) = opening(b"blksize\x001024\x00", config);
            opener.open(Box::new(BytesSource::new(vec![0u8; size])));
            s.handle_source_ready(start);
            let first = sent(&mut s).unwrap();
            let is_error = matches!(
                Packet::parse(&first),
                Ok(Packet::Error {
                    code: ErrorCode::DiskFull,
                    ..
                })
            );
            assert_eq!(is_error, refused, "{size}");
        }
    }
}
