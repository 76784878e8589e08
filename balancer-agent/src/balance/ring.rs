//! Consistent hashing: a ring of points, [`POINTS`] per endpoint, placed by a hash of the
//! endpoint's address (Karger's ring, as Envoy's `RING_HASH` and ketama do). A call's key (a
//! request header's value, hashed with [`key`]) goes to the first point at or after it; when
//! that endpoint cannot take the call (ejected, unhealthy, tried already), the walk goes on to
//! the next distinct endpoint on the ring, so a key's calls fall back to the same second
//! choice on every node.
//!
//! The hash is fixed (FNV-1a with a 64-bit finalizer, no per-process seed): every agent on
//! every node puts a key on the same endpoint, and a new ring built after a change moves only
//! the keys whose points changed hands: adding an endpoint to ten moves about 1/11 of the keys,
//! all of them to the new one.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

/// Points per endpoint. More points even out the shares (the share of one endpoint among n
/// varies by about `1/sqrt(POINTS)` of itself) at 16 bytes each.
pub const POINTS: usize = 256;

/// The hash of a call's key (a header value), as the ring places it. Stable across processes.
pub fn key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finalizer: FNV-1a alone leaves close inputs (`10.0.0.1:80#1`, `#2`) close.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The ring over a list of endpoints (by their index in that list).
#[derive(Debug, Default)]
pub struct Ring {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, u32)>,
    endpoints: usize,
}

impl Ring {
    /// The ring of `addrs`.
    pub fn new(addrs: &[SocketAddr]) -> Self {
        let mut points = Vec::with_capacity(addrs.len() * POINTS);
        let mut buf = Vec::with_capacity(64);
        for (i, a) in addrs.iter().enumerate() {
            for p in 0..POINTS {
                buf.clear();
                use std::io::Write;
                let _ = write!(buf, "{a}#{p}");
                points.push((key(&buf), i as u32));
            }
        }
        points.sort_unstable();
        Self {
            points,
            endpoints: addrs.len(),
        }
    }

    /// The endpoints in the order a call with key `hash` tries them: the owner of the first
    /// point at or after `hash`, then each next distinct endpoint on the ring, until `take`
    /// accepts one.
    pub fn find(&self, hash: u64, mut take: impl FnMut(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < hash);
        let mut seen = 0u64;
        let mut seen_big: Vec<bool> = Vec::new();
        let mut distinct = 0;
        for k in 0..self.points.len() {
            let i = self.points[(start + k) % self.points.len()].1 as usize;
            let new = if i < 64 {
                let bit = 1u64 << i;
                let new = seen & bit == 0;
                seen |= bit;
                new
            } else {
                if seen_big.is_empty() {
                    seen_big = vec![false; self.endpoints];
                }
                !std::mem::replace(&mut seen_big[i], true)
            };
            if !new {
                continue;
            }
            if take(i) {
                return Some(i);
            }
            distinct += 1;
            if distinct == self.endpoints {
                break;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| {
                format!("10.0.{}.{}:50051", i / 200, i % 200 + 1)
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn adding_one_endpoint_to_ten_moves_about_one_key_in_eleven_all_to_it() {
        let ten = addrs(10);
        let eleven = addrs(11);
        let (a, b) = (Ring::new(&ten), Ring::new(&eleven));
        let mut moved = 0;
        for k in 0..10_000u32 {
            let h = key(format!("user-{k}").as_bytes());
            let before = a.find(h, |_| true).unwrap();
            let after = b.find(h, |_| true).unwrap();
            if before != after {
                assert_eq!(after, 10, "a key moved between old endpoints");
                moved += 1;
            }
        }
        // 10000/11 = 909; the new endpoint's share varies by about 1/16 of itself.
        assert!((700..=1050).contains(&moved), "{moved} keys moved");
    }

    #[test]
    fn a_refused_owner_falls_back_to_the_next_endpoint_on_the_ring() {
        let r = Ring::new(&addrs(5));
        for k in 0..200u32 {
            let h = key(&k.to_le_bytes());
            let first = r.find(h, |_| true).unwrap();
            let second = r.find(h, |i| i != first).unwrap();
            assert_ne!(first, second);
            // Always the same second choice.
            assert_eq!(r.find(h, |i| i != first), Some(second));
            assert_eq!(r.find(h, |_| false), None);
        }
    }

    #[test]
    fn shares_are_even_within_a_few_percent() {
        let r = Ring::new(&addrs(4));
        let mut counts = [0; 4];
        for k in 0..40_000u32 {
            counts[r.find(key(format!("k{k}").as_bytes()), |_| true).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|c| (8_000..=12_000).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn more_than_64_endpoints() {
        let r = Ring::new(&addrs(100));
        let h = key(b"x");
        let first = r.find(h, |_| true).unwrap();
        let mut refused = vec![first];
        for _ in 0..99 {
            let next = r.find(h, |i| !refused.contains(&i)).unwrap();
            refused.push(next);
        }
        assert_eq!(r.find(h, |i| !refused.contains(&i)), None);
    }
}
