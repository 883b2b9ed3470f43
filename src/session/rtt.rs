//! The round-trip estimate of one session (RFC 6298 §2) and the early retransmission
//! interval derived from it.

use std::time::Duration;

/// Round-trip samples needed before retransmitting early: one sample says little about
/// how much the round trip varies.
const MIN_SAMPLES: u32 = 3;

/// Smoothed round-trip time, its mean deviation and the largest sample, from the ACKs of
/// packets sent once (Karn's rule is the caller's: never sample a resent packet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct RttEstimator {
    /// Smoothed round-trip time and its mean deviation, once measured.
    smoothed: Option<(Duration, Duration)>,
    samples: u32,
    max: Duration,
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
        self.max = self.max.max(rtt);
    }

    /// The smoothed round-trip time, once measured.
    pub(super) fn srtt(&self) -> Option<Duration> {
        self.smoothed.map(|(srtt, _)| srtt)
    }

    /// The retransmission interval the estimate allows, `srtt + 4 × rttvar`, never below
    /// 1.5 × the slowest round trip seen (a client whose answers vary a lot is not resent
    /// to while it is merely slow) nor `min`. `None` before [`MIN_SAMPLES`] samples.
    pub(super) fn rto(&self, min: Duration) -> Option<Duration> {
        let (srtt, rttvar) = self.smoothed?;
        if self.samples < MIN_SAMPLES {
            return None;
        }
        Some((srtt + rttvar * 4).max(self.max + self.max / 2).max(min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_estimate_before_three_samples() {
        let mut rtt = RttEstimator::default();
        assert_eq!((rtt.srtt(), rtt.rto(MS)), (None, None));
        rtt.sample(10 * MS);
        rtt.sample(10 * MS);
        assert_eq!(rtt.srtt(), Some(10 * MS));
        assert_eq!(rtt.rto(MS), None);
        rtt.sample(10 * MS);
        assert!(rtt.rto(MS).is_some());
    }

    #[test]
    fn smoothing_follows_rfc_6298() {
        let mut rtt = RttEstimator::default();
        // rttvar 5 → 3.75 → 2.8125 ms: srtt + 4 × rttvar = 21.25 ms.
        for _ in 0..3 {
            rtt.sample(10 * MS);
        }
        assert_eq!(rtt.srtt(), Some(10 * MS));
        assert_eq!(rtt.rto(MS), Some(Duration::from_micros(21_250)));
        // A larger sample moves srtt by an eighth of the difference.
        rtt.sample(18 * MS);
        assert_eq!(rtt.srtt(), Some(11 * MS));
    }

    #[test]
    fn the_interval_respects_the_slowest_sample_and_the_floor() {
        let mut rtt = RttEstimator::default();
        for sample in [MS, MS, MS, MS, MS, MS, MS, 20 * MS] {
            rtt.sample(sample);
        }
        // srtt + 4 rttvar is below 1.5 × 20 ms.
        assert_eq!(rtt.rto(MS), Some(30 * MS));
        let mut fast = RttEstimator::default();
        for _ in 0..3 {
            fast.sample(Duration::from_micros(10));
        }
        assert_eq!(fast.rto(2 * MS), Some(2 * MS));
    }
}
