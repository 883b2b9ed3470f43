//! Loss recovery driven by the client's signals: the go-back clock that lets an ACK inside
//! the window, a duplicate ACK or an early retransmission resend from the first
//! unacknowledged block at most once per round trip (a token bucket of [`GO_BACK_BURST`]),
//! whatever a forged ACK stream pretends.

use std::time::{Duration, Instant};

use super::{Session, State};

/// The shortest interval between two go-back-Ns that ACKs or early retransmissions cause
/// (unless the base timeout is shorter): a peer cannot shrink it, so whatever round trips
/// a forged ACK stream pretends, ACKs release at most one window per 100 µs on top of
/// what they acknowledge (after a burst of [`GO_BACK_BURST`]), and never more than one
/// window per ACK.
pub const MIN_GO_BACK_INTERVAL: Duration = Duration::from_micros(100);

/// The interval between go-back-Ns while the session has measured no round trip yet:
/// short enough that a loss in the first windows costs milliseconds, not a timeout.
pub const UNMEASURED_GO_BACK_INTERVAL: Duration = Duration::from_millis(20);

/// How long the first unacknowledged block must have been out before a duplicate ACK is
/// evidence of its loss while the session has no round-trip sample (its first reply was
/// sent twice, so Karn's rule kept the ACK out): below the shortest interval at which
/// firmware repeats an ACK (iPXE 250 ms, GRUB 400 ms), above most round trips.
pub const UNMEASURED_LOSS_EVIDENCE: Duration = Duration::from_millis(200);

/// Go-back-Ns that ACKs may cause in a burst, each within one interval of the last: a
/// client that loses several blocks of one flight recovers each at once, while the long
/// run stays at one go-back per interval (a token bucket of this size, refilled one token
/// per interval).
pub const GO_BACK_BURST: u32 = 4;

impl Session {
    /// A duplicate ACK: the block after it was most likely lost. Resend from it when the
    /// retransmission estimate has passed since the last go-back-N and since that block
    /// was first sent (a duplicate that crossed it on the way is no evidence), and the
    /// go-back clock allows it. With adaptive retransmission, a duplicate that comes
    /// sooner makes that go-back owed once the estimate has passed, unless an ACK that
    /// acknowledges everything sent comes first: a client that answers a gap at once
    /// (EDK2 with a window) is not left waiting for the early timer's 200 ms floor (or
    /// the full timeout) while the session has too few samples for its estimate alone
    /// to set that timer. (It is an early retransmission
    /// that the client's signal arms; without adaptive retransmission only the fixed
    /// schedule runs.)
    pub(super) fn on_duplicate_ack(&mut self) {
        if self.next == self.base {
            return;
        }
        let first_sent = self.sent_at[self.slot(self.base)].0;
        let since = self
            .last_go_back
            .map_or(first_sent, |at| at.max(first_sent));
        let due = since + self.duplicate_evidence();
        if self.now >= due && self.go_back_allowed() {
            self.back_off();
            self.go_back(true);
            return;
        }
        self.stats.go_back_held += 1;
        if self.config.adaptive {
            let due = due.max(self.now);
            self.go_back_owed = Some(self.go_back_owed.map_or(due, |owed| owed.min(due)));
        }
    }

    /// How long the first unacknowledged block must have been out, and the last go-back-N
    /// ago, before a duplicate ACK counts as evidence that it was lost: the retransmission
    /// estimate, `srtt + max(100 µs, 4 × rttvar)` from the first round-trip sample on
    /// ([`SessionConfig::min_rto`] at least; [`UNMEASURED_LOSS_EVIDENCE`] before any
    /// sample), never below the go-back interval nor above the base timeout. Not one round
    /// trip: the client answers a go-back's redundant resends with duplicates of its last
    /// ACK one round trip later, and those must not make the next window go twice (with
    /// the bare round trip, one stray duplicate ACK had every later window sent twice).
    /// Doubled for every resend made on time since the last round-trip sample (see
    /// [`back_off`](Self::back_off)).
    pub(super) fn duplicate_evidence(&self) -> Duration {
        let base = self.params.timeout.unwrap_or(self.config.timeout);
        self.rtt
            .loss_evidence(self.config.min_rto)
            .unwrap_or(UNMEASURED_LOSS_EVIDENCE)
            .max(self.go_back_interval())
            .saturating_mul(1 << self.backoff.min(16))
            .min(base)
    }

    /// A resend is made on evidence of time (an early retransmission, a go-back on a
    /// duplicate ACK's evidence, an owed one): it doubles the early retransmission
    /// interval and the evidence a duplicate ACK needs, until a round-trip sample (an ACK
    /// of a block sent once) or a go-back answered in time (a loss, and a client that
    /// keeps up: see [`go_back_answered`](Self::go_back_answered)) starts them over. Progress alone does not: a client that
    /// falls behind acknowledges only resent blocks, and the estimate then knows nothing
    /// of how late it answers (Karn's algorithm, as TCP keeps its backed-off timer).
    pub(super) fn back_off(&mut self) {
        self.backoff = self.backoff.saturating_add(1);
    }

    /// The last go-back-N was answered (an ACK of the block it resent from, or a later
    /// one) `answered_in` after it: that times the go-back clock, and an answer within
    /// the estimate ends the backoff — the resend was needed (a loss) and the client
    /// keeps up. Not one sooner than half the smoothed round trip: no answer to the
    /// resend comes that fast, so it answers the first send, and the resend was needless
    /// (TFTP has no timestamps to tell them apart, as TCP's Eifel detection does).
    pub(super) fn go_back_answered(&mut self, answered_in: Duration) {
        let evidence = self.rtt.loss_evidence(self.config.min_rto);
        let soonest = self.rtt.srtt().unwrap_or_default() / 2;
        if answered_in >= soonest && evidence.is_some_and(|evidence| answered_in <= evidence) {
            self.backoff = 0;
        }
        self.recovery_rtt.sample(answered_in);
        self.go_back_from = None;
    }

    /// When the go-back clock next allows a go-back-N (`None`: now, nothing was spent).
    pub(super) fn go_back_allowed_at(&self) -> Option<Instant> {
        let tolerance = self.go_back_interval() * (GO_BACK_BURST - 1);
        self.go_back_clock
            .map(|clock| clock.checked_sub(tolerance).unwrap_or(clock))
    }

    /// Whether an ACK (or an early retransmission) may cause a go-back-N now.
    pub(super) fn go_back_allowed(&self) -> bool {
        self.go_back_allowed_at().is_none_or(|at| self.now >= at)
    }

    /// The least time between two go-back-Ns an ACK (or an early retransmission) causes:
    /// one round trip, as TCP's fast recovery — the smoothed round trip or the smoothed
    /// time go-back-Ns took to be answered, whichever is shorter
    /// ([`UNMEASURED_GO_BACK_INTERVAL`] before either exists) — never below
    /// [`MIN_GO_BACK_INTERVAL`], never above the base timeout (the client's or the
    /// server's, undoubled: a returning ACK shows the path works, so there is nothing to
    /// back off from). An ACK inside the window is a loss signal, not a guess, so the
    /// floor is far below the early timer's [`SessionConfig::min_rto`].
    pub(super) fn go_back_interval(&self) -> Duration {
        let base = self.params.timeout.unwrap_or(self.config.timeout);
        let measured = [self.rtt.srtt(), self.recovery_rtt.srtt()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(UNMEASURED_GO_BACK_INTERVAL);
        measured.max(MIN_GO_BACK_INTERVAL).min(base)
    }

    /// When a go-back-N that an in-window ACK asked for, and the clock did not allow, is
    /// due.
    pub(super) fn owed_go_back_at(&self) -> Option<Instant> {
        let owed = self.go_back_owed?;
        if self.state != State::Transfer || self.next == self.base {
            return None;
        }
        Some(self.go_back_allowed_at().map_or(owed, |at| at.max(owed)))
    }

    /// Sends again from the first unacknowledged block: because of an ACK (counted in
    /// [`TransferStats::go_back_acks`]) or of the timer (counted by the caller).
    pub(super) fn go_back(&mut self, ack: bool) {
        self.next = self.base;
        self.last_go_back = Some(self.now);
        self.spend_go_back_token();
        self.go_back_from = Some(self.base);
        self.go_back_owed = None;
        if ack {
            self.stats.go_back_acks += 1;
        }
    }

    /// Moves the go-back clock on by one interval (see [`go_back_allowed_at`]).
    ///
    /// [`go_back_allowed_at`]: Self::go_back_allowed_at
    pub(super) fn spend_go_back_token(&mut self) {
        let clock = self
            .go_back_clock
            .map_or(self.now, |clock| clock.max(self.now));
        self.go_back_clock = Some(clock + self.go_back_interval());
    }
}
