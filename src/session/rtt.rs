//! The round-trip estimate of one session (RFC 6298 §2) and the retransmission intervals
//! derived from it.

use std::time::Duration;

/// Round-trip samples needed before the estimate alone sets the early retransmission
/// interval: one or two say little about how much the round trip varies (the first is
/// often an OACK's, with no window of data queued ahead of it). Before that the interval
/// is at least [`UNSETTLED_MIN_RTO`]. (A loss signal from the client needs less, see
/// [`RttEstimator::loss_evidence`].)
const MIN_SAMPLES: u32 = 3;

/// The shortest early retransmission interval while the estimate has fewer than
/// [`MIN_SAMPLES`] samples: a loss in the first windows costs this, not the full timeout
/// (a windowed client that lost an ACK, or a window's tail, sends nothing until its own
/// timer). It is above a LAN's round trip with a window queued ahead (1 MiB at
/// 100 Mbit/s takes 84 ms); a slower first sample raises the interval (three times it),
/// and a resend that was needless doubles it (the backoff).
pub(super) const UNSETTLED_MIN_RTO: Duration = Duration::from_millis(200);

/// RFC 6298's clock granularity `G`, the least variation the interval allows for:
/// `srtt + max(G, 4 × rttvar)`. A steady path drives `rttvar` towards zero, and an
/// interval of exactly `srtt` would resend whenever an ACK is a tick late. The driver's
/// timer wheel ticks every 100 µs.
const GRANULARITY: Duration = Duration::from_micros(100);

/// Smoothed round-trip time and its mean deviation, from the ACKs of packets sent once
/// (Karn's rule is the caller's: never sample a resent packet).
///
/// Nothing is kept for good: a slow sample raises `rttvar` by a quarter of its distance
/// from `srtt`, and every later sample takes a quarter of that away again, so the
/// interval follows the path back down once it is fast again (from 20 ms to a 2 ms floor
/// within 20 samples of 100 µs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct RttEstimator {
    /// Smoothed round-trip time and its mean deviation, once measured.
    smoothed: Option<(Duration, Duration)>,
    samples: u32,
}

impl RttEstimator {
    /// Feeds one round-trip sample.
    pub(super) fn sample(&mut self, rtt: Duration) {
        self.smoothed = Some(match self.smoothed {
            None => (rtt, rtt / 2),
            Some((srtt, rttvar)) => {
                let delta = srtt.abs_diff(rtt);
                ((srtt * 7 + rtt) / 8, (rttvar * 3 + delta) / 4)
            }
        });
        self.samples = self.samples.saturating_add(1);
    }

    /// The smoothed round-trip time, once measured.
    pub(super) fn srtt(&self) -> Option<Duration> {
        self.smoothed.map(|(srtt, _)| srtt)
    }

    /// The mean deviation of the round-trip time, once measured.
    pub(super) fn rttvar(&self) -> Option<Duration> {
        self.smoothed.map(|(_, rttvar)| rttvar)
    }

    /// The retransmission interval the estimate allows for the timer alone, RFC 6298's
    /// `srtt + max(G, 4 × rttvar)` ([`GRANULARITY`]), never below `min`, nor below
    /// [`UNSETTLED_MIN_RTO`] before [`MIN_SAMPLES`] samples. `None` before any sample.
    pub(super) fn rto(&self, min: Duration) -> Option<Duration> {
        let interval = self.loss_evidence(min)?;
        if self.samples < MIN_SAMPLES {
            return Some(interval.max(UNSETTLED_MIN_RTO));
        }
        Some(interval)
    }

    /// How long a packet must have been out before a loss signal from the client (a
    /// repeated ACK) counts as evidence that it was lost rather than still on its way:
    /// the same interval, from the first sample on (after one sample, three times it, as
    /// RFC 6298 starts). `None` before any sample.
    pub(super) fn loss_evidence(&self, min: Duration) -> Option<Duration> {
        let (srtt, rttvar) = self.smoothed?;
        Some((srtt + (rttvar * 4).max(GRANULARITY)).max(min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_estimate_alone_sets_the_interval_from_the_third_sample() {
        let mut rtt = RttEstimator::default();
        assert_eq!((rtt.srtt(), rtt.rto(MS)), (None, None));
        assert_eq!(rtt.loss_evidence(MS), None);
        rtt.sample(10 * MS);
        // A loss signal needs one sample: srtt + 4 × srtt / 2.
        assert_eq!(rtt.loss_evidence(MS), Some(30 * MS));
        // The timer alone waits 200 ms at least until the third.
        assert_eq!(rtt.rto(MS), Some(UNSETTLED_MIN_RTO));
        rtt.sample(10 * MS);
        assert_eq!(rtt.srtt(), Some(10 * MS));
        assert_eq!(rtt.rto(MS), Some(UNSETTLED_MIN_RTO));
        rtt.sample(10 * MS);
        assert_eq!(rtt.rto(MS), Some(Duration::from_micros(21_250)));
        // A slow first sample sets an interval above the floor.
        let mut slow = RttEstimator::default();
        slow.sample(100 * MS);
        assert_eq!(slow.rto(MS), Some(300 * MS));
    }

    #[test]
    fn smoothing_follows_rfc_6298() {
        let mut rtt = RttEstimator::default();
        // rttvar 5 → 3.75 → 2.8125 ms: srtt + 4 × rttvar = 21.25 ms.
        for _ in 0..3 {
            rtt.sample(10 * MS);
        }
        assert_eq!(rtt.srtt(), Some(10 * MS));
        assert_eq!(rtt.rttvar(), Some(Duration::from_nanos(2_812_500)));
        assert_eq!(rtt.rto(MS), Some(Duration::from_micros(21_250)));
        assert_eq!(rtt.loss_evidence(MS), rtt.rto(MS));
        // A larger sample moves srtt by an eighth of the difference.
        rtt.sample(18 * MS);
        assert_eq!(rtt.srtt(), Some(11 * MS));
    }

    #[test]
    fn the_interval_has_a_floor() {
        let mut fast = RttEstimator::default();
        for _ in 0..3 {
            fast.sample(Duration::from_micros(10));
        }
        assert_eq!(fast.rto(2 * MS), Some(2 * MS));
        assert_eq!(fast.loss_evidence(2 * MS), Some(2 * MS));
    }

    #[test]
    fn after_a_slow_outlier_the_interval_comes_back_down_within_twenty_samples() {
        // A lock-step transfer on a 100 µs path: one ACK comes 20 ms late (a busy
        // client). The interval jumps, then follows the path back down: no slowest
        // sample is kept for good (1.5 × the slowest sample used to hold it at 30 ms for
        // the rest of the session, so every later loss cost 30 ms).
        let mut rtt = RttEstimator::default();
        for _ in 0..20 {
            rtt.sample(100 * US);
        }
        let floor = 2 * MS;
        assert_eq!(rtt.rto(floor), Some(floor));
        rtt.sample(20 * MS);
        let mut intervals = vec![rtt.rto(floor).unwrap()];
        assert!(intervals[0] > 20 * MS, "{intervals:?}");
        for _ in 0..20 {
            rtt.sample(100 * US);
            intervals.push(rtt.rto(floor).unwrap());
        }
        // Down with every fast sample until the floor, reached within 20 of them
        // (RFC 6298's gains: srtt and rttvar both lose about an eighth a sample).
        let above: Vec<_> = intervals.iter().take_while(|&&i| i > floor).collect();
        assert!(above.windows(2).all(|w| w[1] < w[0]), "{intervals:?}");
        assert!(above.len() > 10, "{intervals:?}");
        assert_eq!(intervals[20], floor, "{intervals:?}");
        // Below the floor it goes on down towards the path's own round trip.
        for _ in 0..20 {
            rtt.sample(100 * US);
        }
        let (srtt, rttvar) = (rtt.srtt().unwrap(), rtt.rttvar().unwrap());
        assert!(srtt + rttvar * 4 < 250 * US, "{srtt:?} {rttvar:?}");
        // With no floor, the interval is the round trip plus the granularity.
        assert_eq!(rtt.rto(Duration::ZERO), Some(srtt + GRANULARITY));
    }

    #[test]
    fn a_steady_path_keeps_the_granularity_above_the_round_trip() {
        let mut rtt = RttEstimator::default();
        for _ in 0..100 {
            rtt.sample(10 * MS);
        }
        assert_eq!(rtt.rttvar(), Some(Duration::ZERO));
        assert_eq!(rtt.rto(2 * MS), Some(10 * MS + 100 * US));
    }
}
