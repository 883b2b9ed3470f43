//! What a session hands the driver: [`Output`] from [`Session::poll_output`](super::Session::poll_output),
//! the [`Transmit`] it carries, and the [`Outcome`] a session ends with.

use std::time::Instant;

use crate::packet::ErrorCode;

#[cfg(doc)]
use super::{Session, SessionConfig};
#[cfg(doc)]
use crate::stats::TransferStats;

/// How a session ended.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Every block was sent and acknowledged, or the client acknowledged every byte and
    /// then closed with an ERROR (its message is kept in
    /// [`TransferStats::peer_error`]).
    Completed,
    /// Every block was sent, but the ACK of the last one never came (the client most
    /// likely has the whole file).
    FinalAckMissing,
    /// The client stopped answering before the end; retries exhausted.
    TimedOut,
    /// The client answered our OACK with ERROR 8: a size probe (UEFI firmware does this
    /// before the real request). Not a failure.
    Probe,
    /// The client sent an ERROR with this code.
    PeerError(ErrorCode),
    /// The client sent a packet that has no place in a read transfer (DATA, a request,
    /// an OACK); it got ERROR 4.
    IllegalOperation,
    /// The source failed to read; the client got ERROR 0.
    ReadFailed,
    /// The source stayed not ready for longer than the source timeout; the client got
    /// ERROR 0.
    SourceStalled,
    /// User code (handler or source) panicked; the client got ERROR 0.
    Panicked,
    /// The server shut down before the transfer ended; the client got ERROR 0.
    ShutDown,
    /// The session never got an ACK and gave way to a newer request (a full server, the
    /// client's cap of unverified sessions, or a different request from the same address
    /// and port); nothing more was sent.
    Evicted,
    /// The source refused the request once it opened (a deferred open, see
    /// [`deferred`](crate::deferred)): the client got its ERROR (any code but 0, e.g.
    /// ERROR 1 for a name the backend does not have) instead of any OACK. An answer, not
    /// a failure, like a refusal from `open` itself; a source that failed to open (ERROR 0)
    /// ends [`ReadFailed`](Outcome::ReadFailed).
    Refused,
    /// The kernel reported the client unreachable (an ICMP port or host unreachable for a
    /// session socket of the normal mode: nobody listens there, or the request was
    /// spoofed); nothing more was sent.
    PeerUnreachable,
}

impl Outcome {
    /// Every outcome, one of each kind ([`PeerError`](Outcome::PeerError) with code 0):
    /// what a metrics exporter lists so that each series exists from the start.
    pub const ALL: [Outcome; 13] = [
        Outcome::Completed,
        Outcome::FinalAckMissing,
        Outcome::Probe,
        Outcome::TimedOut,
        Outcome::PeerError(ErrorCode::NotDefined),
        Outcome::IllegalOperation,
        Outcome::ReadFailed,
        Outcome::SourceStalled,
        Outcome::Panicked,
        Outcome::ShutDown,
        Outcome::Evicted,
        Outcome::Refused,
        Outcome::PeerUnreachable,
    ];

    /// The outcome named `name` by [`as_str`](Self::as_str) (`peer_error` gives
    /// `PeerError` with code 0).
    pub fn from_name(name: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == name)
    }

    /// True for outcomes that are not failures: completed, final ACK missing, probe, and a
    /// deferred source's refusal (an answer, as an immediate refusal is).
    pub fn is_success(self) -> bool {
        matches!(
            self,
            Outcome::Completed | Outcome::FinalAckMissing | Outcome::Probe | Outcome::Refused
        )
    }

    /// A short lower-case name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::FinalAckMissing => "final_ack_missing",
            Outcome::TimedOut => "timed_out",
            Outcome::Probe => "probe",
            Outcome::PeerError(_) => "peer_error",
            Outcome::IllegalOperation => "illegal_operation",
            Outcome::ReadFailed => "read_failed",
            Outcome::SourceStalled => "source_stalled",
            Outcome::Panicked => "panicked",
            Outcome::ShutDown => "shut_down",
            Outcome::Evicted => "evicted",
            Outcome::Refused => "refused",
            Outcome::PeerUnreachable => "peer_unreachable",
        }
    }
}

/// Datagrams to send to the peer: one, or several DATA packets back to back for one UDP
/// GSO send (when the driver allowed more than one, see [`Session::poll_output`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// The datagrams, back to back: each [`segment_size`](Self::segment_size) bytes long
    /// but the last, which may be shorter.
    pub contents: &'a [u8],
    /// The length of every datagram but the last (the whole of `contents` when there is
    /// one datagram).
    pub segment_size: usize,
    /// How many datagrams `contents` holds (at least 1).
    pub datagrams: usize,
    /// DATA payload bytes they carry, headers excluded (0 for an OACK or an ERROR).
    pub payload: u64,
    /// Set on the first transmission after a retransmission timer fired: these datagrams
    /// start the resend it caused (counted in [`TransferStats::retransmits`](crate::stats::TransferStats::retransmits) or
    /// [`TransferStats::early_retransmits`](crate::stats::TransferStats::early_retransmits)).
    pub retransmission: Option<Retransmission>,
}

impl<'a> Transmit<'a> {
    /// A transmit of one datagram.
    pub(super) fn single(
        contents: &'a [u8],
        payload: u64,
        retransmission: Option<Retransmission>,
    ) -> Self {
        Transmit {
            contents,
            segment_size: contents.len(),
            datagrams: 1,
            payload,
            retransmission,
        }
    }

    /// The datagrams one by one, cut at `segment_size` (for a driver that cannot send
    /// them in one call).
    pub fn segments(&self) -> impl Iterator<Item = &'a [u8]> {
        self.contents.chunks(self.segment_size.max(1))
    }
}

/// Which retransmission timer caused a resend (see [`SessionConfig::adaptive`](super::SessionConfig::adaptive)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retransmission {
    /// The full timeout: one retry spent.
    Timeout,
    /// An early, adaptive one: no retry spent.
    Early,
}

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<'a> {
    /// Send these datagrams to the peer, then call `poll_output` again.
    Transmit(Transmit<'a>),
    /// Nothing to send; call `handle_timeout` at this instant (or earlier input).
    Wait(Instant),
    /// The session is over.
    Done(Outcome),
}
