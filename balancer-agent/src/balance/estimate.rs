//! What the balancer knows of one endpoint's latency and of its overload answers.
//!
//! Latency is smoothed as TCP smooths round-trip times (RFC 6298): a mean (`srtt`) and a mean
//! deviation (`jitter`), so that the picker can tell a measured difference from noise: two
//! endpoints whose means differ by less than their jitter are equal, and calls go round-robin
//! between them. Two rules keep one odd call from deciding anything:
//!
//! - an observation far above the mean (more than [`CLAMP_DEVIATIONS`] deviations) moves the
//!   mean only that far, while the deviation takes all of it: one slow call widens the band
//!   instead of marking the endpoint slow; a lasting change moves the mean within two or three
//!   calls, because the band it widened lets the next ones through;
//! - the mean decays toward zero while the endpoint is not observed (linkerd's decay, 10 s), so
//!   an endpoint that was slow is tried again after a while and measured anew.
//!
//! A rise moves the mean by half the (clamped) difference and a fall by an eighth: the
//! estimate reacts fast to an endpoint that slows down (linkerd's peak sensitivity, tamed) and
//! forgets slowly.
//!
//! Overload answers (RESOURCE_EXHAUSTED, UNAVAILABLE) and lost calls feed a penalty: the share
//! of recent answers that were such, an EWMA over answers that also decays with time. The
//! picker weighs an endpoint's load by it, so an endpoint that says it is overloaded sheds
//! calls before outlier detection ejects it (linkerd's failure accrual, Finagle's penalty).
#![forbid(unsafe_code)]

use std::time::Duration;

use tokio::time::Instant;

/// How fast the latency of an endpoint that is not observed decays (linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// How fast the penalty of an endpoint that is not answering decays.
pub const PENALTY_DECAY: Duration = Duration::from_secs(5);
/// An observation moves the mean by at most this many deviations above it.
pub const CLAMP_DEVIATIONS: f64 = 4.0;
/// The latency assumed for an endpoint that has not answered yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

const GAIN_UP: f64 = 0.5;
const GAIN_DOWN: f64 = 0.125;
const JITTER_GAIN: f64 = 0.25;
const PENALTY_GAIN: f64 = 0.25;

/// One endpoint's latency and penalty estimates.
#[derive(Debug, Clone)]
pub struct Estimate {
    srtt_ns: f64,
    jitter_ns: f64,
    samples: u32,
    stamp: Instant,
    penalty: f64,
    penalty_stamp: Instant,
}

/// An estimate as read at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Mean latency, decayed for the time since the last observation, ns.
    pub latency_ns: f64,
    /// Mean deviation of the latency, ns.
    pub jitter_ns: f64,
    /// Share of recent answers that said overloaded or unavailable, 0..=1.
    pub penalty: f64,
    /// Observations so far.
    pub samples: u32,
}

impl Estimate {
    /// An estimate with no observation yet.
    pub fn new(now: Instant) -> Self {
        let rtt = DEFAULT_RTT.as_nanos() as f64;
        Self {
            srtt_ns: rtt,
            jitter_ns: rtt / 2.0,
            samples: 0,
            stamp: now,
            penalty: 0.0,
            penalty_stamp: now,
        }
    }

    /// A latency was observed (from the request sent to the first response byte).
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if self.samples == 0 {
            self.srtt_ns = rtt;
            self.jitter_ns = rtt / 2.0;
        } else {
            let srtt = self.decayed(now);
            let err = rtt - srtt;
            // The clamp uses the deviation known before this observation; the noise floor
            // keeps it open when a quiet endpoint's deviation is near zero.
            let deviation = self.jitter_ns.max(TIE_RELATIVE * srtt).max(TIE_FLOOR_NS);
            self.srtt_ns = if err > 0.0 {
                srtt + err.min(CLAMP_DEVIATIONS * deviation) * GAIN_UP
            } else {
                srtt + err * GAIN_DOWN
            };
            self.jitter_ns += (err.abs() - self.jitter_ns) * JITTER_GAIN;
        }
        self.samples = self.samples.saturating_add(1);
        self.stamp = now;
    }

    /// An answer came: `overloaded` when it said RESOURCE_EXHAUSTED or UNAVAILABLE (or the call
    /// was lost).
    pub fn answered(&mut self, overloaded: bool, now: Instant) {
        let p = self.penalty_at(now);
        self.penalty = if overloaded {
            p + (1.0 - p) * PENALTY_GAIN
        } else {
            p * (1.0 - PENALTY_GAIN)
        };
        self.penalty_stamp = now;
    }

    fn decayed(&self, now: Instant) -> f64 {
        self.srtt_ns * decay(now.saturating_duration_since(self.stamp), DECAY)
    }

    fn penalty_at(&self, now: Instant) -> f64 {
        if self.penalty == 0.0 {
            return 0.0;
        }
        self.penalty
            * decay(
                now.saturating_duration_since(self.penalty_stamp),
                PENALTY_DECAY,
            )
    }

    /// The estimate at `now`.
    pub fn read(&self, now: Instant) -> Reading {
        Reading {
            latency_ns: self.decayed(now),
            jitter_ns: self.jitter_ns,
            penalty: self.penalty_at(now),
            samples: self.samples,
        }
    }
}

/// `exp(-elapsed / tau)`.
fn decay(elapsed: Duration, tau: Duration) -> f64 {
    if elapsed.is_zero() {
        return 1.0;
    }
    (-elapsed.as_secs_f64() / tau.as_secs_f64()).exp()
}

/// Latencies closer than this are equal whatever their jitter says (timer and scheduling
/// noise), ns.
pub const TIE_FLOOR_NS: f64 = 50_000.0;
/// Latencies observed on each endpoint before a difference between them counts.
pub const MIN_SAMPLES: u32 = 4;
/// Latencies within this fraction of the smaller one are equal.
pub const TIE_RELATIVE: f64 = 0.2;

impl Reading {
    /// Whether the latencies of `self` and `other` differ by more than their jitter and the
    /// noise floor: a measured difference.
    pub fn latency_differs(&self, other: &Reading) -> bool {
        // A reading of a call or two is the connection's first calls (cold paths on both
        // ends), not the endpoint's latency: no difference until both have enough.
        if self.samples.min(other.samples) < MIN_SAMPLES {
            return false;
        }
        let band = (self.jitter_ns + other.jitter_ns)
            .max(TIE_RELATIVE * self.latency_ns.min(other.latency_ns))
            .max(TIE_FLOOR_NS);
        (self.latency_ns - other.latency_ns).abs() > band
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_call_is_no_difference_until_enough_calls_are_seen() {
        let now = Instant::now();
        let (mut a, mut b) = (Estimate::new(now), Estimate::new(now));
        a.observe(ms(5.0), now);
        b.observe(ms(0.3), now);
        assert!(!a.read(now).latency_differs(&b.read(now)));
        for _ in 1..MIN_SAMPLES {
            a.observe(ms(0.3), now);
            b.observe(ms(0.3), now);
        }
        // The first call still weighs in; its jitter keeps the two even.
        assert!(!a.read(now).latency_differs(&b.read(now)));
        // A lasting difference shows once both have enough calls.
        for _ in 0..20 {
            a.observe(ms(3.0), now);
            b.observe(ms(0.3), now);
        }
        assert!(a.read(now).latency_differs(&b.read(now)));
    }

    #[tokio::test(start_paused = true)]
    async fn one_slow_call_widens_the_band_and_a_lasting_change_shows() {
        let now = Instant::now();
        let (mut a, mut b) = (Estimate::new(now), Estimate::new(now));
        for _ in 0..20 {
            a.observe(ms(0.3), now);
            b.observe(ms(0.32), now);
        }
        assert!(
            !a.read(now).latency_differs(&b.read(now)),
            "noise is no difference"
        );
        // One call 20x slower: still equal.
        b.observe(ms(6.0), now);
        assert!(
            !a.read(now).latency_differs(&b.read(now)),
            "{:?} vs {:?}",
            a.read(now),
            b.read(now)
        );
        for _ in 0..10 {
            b.observe(ms(0.3), now);
        }
        // The endpoint really slows down to 50 ms: a difference within three calls.
        let mut calls = 0;
        while !a.read(now).latency_differs(&b.read(now)) {
            b.observe(ms(50.0), now);
            calls += 1;
            assert!(calls <= 3, "{:?}", b.read(now));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn latency_and_penalty_decay_while_unobserved() {
        let now = Instant::now();
        let mut e = Estimate::new(now);
        e.observe(ms(100.0), now);
        e.answered(true, now);
        assert!(e.read(now).penalty > 0.2);
        let later = now + Duration::from_secs(30);
        let r = e.read(later);
        assert!(r.latency_ns < 6e6, "{r:?}");
        assert!(r.penalty < 0.01, "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn successes_wash_a_penalty_out() {
        let now = Instant::now();
        let mut e = Estimate::new(now);
        for _ in 0..4 {
            e.answered(true, now);
        }
        let high = e.read(now).penalty;
        assert!(high > 0.6, "{high}");
        for _ in 0..10 {
            e.answered(false, now);
        }
        assert!(e.read(now).penalty < 0.05 * high / 0.6);
    }
}
