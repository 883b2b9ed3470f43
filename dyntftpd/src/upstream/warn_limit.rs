//! A global limit on the upstream's warning lines: a hostile client asking for many
//! failing names must not flood the log.

use std::time::{Duration, Instant};

/// Lets at most `burst` lines through per `period`; counts the rest and says how many were
/// dropped with the first line of the next period.
pub struct WarnLimit {
    period: Duration,
    burst: u32,
    started: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

/// What to do with one warning.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines were dropped before it (say so when non-zero).
    Log { suppressed: u64 },
    /// Drop it.
    Drop,
}

impl WarnLimit {
    /// `burst` lines per `period`.
    pub fn new(burst: u32, period: Duration) -> WarnLimit {
        WarnLimit {
            period,
            burst,
            started: None,
            lines: 0,
            suppressed: 0,
        }
    }

    /// Whether a warning at `now` may be logged.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let expired = self
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= self.period);
        if expired {
            self.started = Some(now);
            self.lines = 0;
        }
        if self.lines < self.burst {
            self.lines += 1;
            Verdict::Log {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_a_count_of_the_dropped() {
        let start = Instant::now();
        let mut limit = WarnLimit::new(3, Duration::from_secs(10));
        for _ in 0..3 {
            assert_eq!(limit.check(start), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(limit.check(start + Duration::from_secs(9)), Verdict::Drop);
        }
        assert_eq!(
            limit.check(start + Duration::from_secs(10)),
            Verdict::Log { suppressed: 1000 }
        );
        assert_eq!(
            limit.check(start + Duration::from_secs(11)),
            Verdict::Log { suppressed: 0 }
        );
    }
}
