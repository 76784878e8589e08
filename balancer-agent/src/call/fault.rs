//! Faults a route injects into its calls, for chaos tests (Istio `fault`, the file's `fault`):
//! a delay before the call is sent on, for a share of calls, and an abort with a gRPC status,
//! for a share of calls. Both are drawn for each call on its own; a call drawn for both is
//! delayed, then aborted, as Envoy's fault filter does. Every fault injected is counted in
//! `balancer_faults_injected_total{service,route,kind}` so that a chaos test can be read
//! afterwards.
#![forbid(unsafe_code)]

use std::{fmt, time::Duration};

use serde::{Serialize, Serializer};

use super::grpc::{Code, Status};

/// A share of calls, in millionths (Istio's `percentage.value` keeps four decimals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(u32);

impl Percent {
    /// Every call.
    pub const ALL: Self = Self(1_000_000);

    /// `p` percent (0 to 100; outside, `None`).
    pub fn new(p: f64) -> Option<Self> {
        (0.0..=100.0)
            .contains(&p)
            .then(|| Self((p * 10_000.0).round() as u32))
    }

    /// As a percentage.
    pub fn get(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }

    /// A draw: true for this share of calls.
    pub fn draw(self) -> bool {
        self.0 > 0 && (self.0 >= Self::ALL.0 || fastrand::u32(..Self::ALL.0) < self.0)
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.get())
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.get())
    }
}

/// A delay injected before calls are sent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FaultDelay {
    /// How long (Istio `fixedDelay`).
    #[serde(serialize_with = "millis")]
    pub fixed: Duration,
    /// For this share of calls.
    pub percent: Percent,
}

/// An abort: the proxy answers calls itself with a gRPC status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FaultAbort {
    /// The status (Istio `grpcStatus`).
    pub code: Code,
    /// For this share of calls.
    pub percent: Percent,
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

/// Faults injected into a route's calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaultPolicy {
    /// A delay.
    pub delay: Option<FaultDelay>,
    /// An abort.
    pub abort: Option<FaultAbort>,
}

impl fmt::Display for FaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(d) = self.delay {
            parts.push(format!("delay {} ms on {}", d.fixed.as_millis(), d.percent));
        }
        if let Some(a) = self.abort {
            parts.push(format!("abort {} on {}", a.code.name(), a.percent));
        }
        f.write_str(&parts.join(", "))
    }
}

/// The faults drawn for one call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    /// Sent on only after this long.
    pub delay: Option<Duration>,
    /// Answered by the proxy with this status (after the delay, if any).
    pub abort: Option<Status>,
}

impl Injected {
    /// Nothing injected.
    pub fn is_none(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

impl FaultPolicy {
    /// Draws the faults of one call of `route`.
    pub fn draw(&self, route: &str) -> Injected {
        Injected {
            delay: self.delay.filter(|d| d.percent.draw()).map(|d| d.fixed),
            abort: self.abort.filter(|a| a.percent.draw()).map(|a| Status {
                code: a.code,
                message: format!("fault injected by route {route}: abort {}", a.code.name()),
            }),
        }
    }
}

/// A rule's `fault` from the file (checked by `config`; an unchecked bad value injects
/// nothing).
pub fn from_config(f: &crate::config::resilience::FaultConfig) -> FaultPolicy {
    let share = |p: Option<f64>| p.map_or(Some(Percent::ALL), Percent::new);
    FaultPolicy {
        delay: f.delay.as_ref().and_then(|d| {
            Some(FaultDelay {
                fixed: Duration::from_millis(d.fixed_delay_ms),
                percent: share(d.percent)?,
            })
        }),
        abort: f.abort.as_ref().and_then(|a| {
            Some(FaultAbort {
                code: Code::parse(&a.grpc_status)?,
                percent: share(a.percent)?,
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_drawn_as_written() {
        assert_eq!(Percent::new(25.0).unwrap().get(), 25.0);
        assert_eq!(Percent::new(0.0001).unwrap(), Percent(1));
        assert!(Percent::new(100.5).is_none() && Percent::new(-1.0).is_none());
        assert!(!Percent::new(0.0).unwrap().draw());
        assert!((0..1000).all(|_| Percent::ALL.draw()));
        let policy = FaultPolicy {
            delay: Some(FaultDelay {
                fixed: Duration::from_millis(100),
                percent: Percent::new(50.0).unwrap(),
            }),
            abort: Some(FaultAbort {
                code: Code::Unavailable,
                percent: Percent::new(25.0).unwrap(),
            }),
        };
        let n = 20_000;
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..n {
            let i = policy.draw("chaos");
            delayed += usize::from(i.delay == Some(Duration::from_millis(100)));
            if let Some(s) = i.abort {
                assert_eq!(s.code, Code::Unavailable);
                assert!(s.message.contains("route chaos"), "{}", s.message);
                aborted += 1;
            }
        }
        let share = |k: usize| k as f64 / n as f64;
        assert!((0.48..=0.52).contains(&share(delayed)), "{delayed}");
        assert!((0.23..=0.27).contains(&share(aborted)), "{aborted}");
        assert_eq!(
            policy.to_string(),
            "delay 100 ms on 50%, abort UNAVAILABLE on 25%"
        );
    }
}
