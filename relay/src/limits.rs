//! The relay's admission limits, without I/O: where a connection comes
//! from, how many connections each source holds (still authenticating, and
//! in all), rates per identity, and rate-limited refusal logging.
//!
//! The I/O layer (`server.rs`) takes a [`SourceSlot`] for every accepted
//! connection and holds it until the connection closes, so a source's
//! count covers hop channels, data connections and spliced tunnels alike,
//! not only connections still in their handshake. Time is passed in, so
//! tests drive the rate limits on a virtual clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where a connection comes from, for per-source limits: an IPv4 address,
/// or the /64 of an IPv6 address (one host usually holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Source::V6Prefix(prefix)
                }
            },
        }
    }
}

/// Connection counts: still authenticating (in total and per source), and
/// all connections per source.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    pending_total: usize,
    pending: HashMap<Source, usize>,
    open: HashMap<Source, usize>,
}

/// The limits [`Sources`] enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceLimits {
    pub max_pending_total: usize,
    pub max_pending_per_source: usize,
    pub max_per_source: usize,
}

/// Why a new connection was refused before reading a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceRefusal {
    /// Too many connections still authenticating, from everywhere.
    PendingTotal(usize),
    /// Too many connections still authenticating from this source.
    PendingPerSource(usize),
    /// Too many connections of any kind from this source.
    PerSource(usize),
}

impl Sources {
    /// Counts a new connection from `source` (open, and authenticating), or
    /// says which limit it would break.
    pub(crate) fn admit(
        &mut self,
        source: Source,
        limits: SourceLimits,
    ) -> Result<(), SourceRefusal> {
        if self.pending_total >= limits.max_pending_total {
            return Err(SourceRefusal::PendingTotal(limits.max_pending_total));
        }
        if self.pending.get(&source).copied().unwrap_or(0) >= limits.max_pending_per_source {
            return Err(SourceRefusal::PendingPerSource(
                limits.max_pending_per_source,
            ));
        }
        if self.open.get(&source).copied().unwrap_or(0) >= limits.max_per_source {
            return Err(SourceRefusal::PerSource(limits.max_per_source));
        }
        self.pending_total += 1;
        *self.pending.entry(source).or_insert(0) += 1;
        *self.open.entry(source).or_insert(0) += 1;
        Ok(())
    }

    /// The connection from `source` finished (or failed) its handshake.
    pub(crate) fn authenticated(&mut self, source: Source) {
        self.pending_total = self.pending_total.saturating_sub(1);
        decrement(&mut self.pending, source);
    }

    /// The connection from `source` closed (after [`Sources::authenticated`]).
    pub(crate) fn closed(&mut self, source: Source) {
        decrement(&mut self.open, source);
    }

    /// Connections open from `source`.
    #[cfg(test)]
    pub(crate) fn open_from(&self, source: Source) -> usize {
        self.open.get(&source).copied().unwrap_or(0)
    }
}

/// Decrements a per-key count, forgetting keys that reach zero.
pub(crate) fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(count) = map.get_mut(&key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(&key);
        }
    }
}

/// A token bucket: `rate` events per second on average, bursts of up to
/// `burst`.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn full(burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again (nothing to remember about it).
    pub(crate) fn is_full(&self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * f64::from(rate) >= f64::from(burst)
    }
}

/// Lets through at most a few log lines per second for one kind of event
/// ([`RateLimited::BURST`]), and says how many were not logged meanwhile: a
/// flood must not become a flood of log lines, and a handful of odd
/// connections is still logged one by one.
#[derive(Debug)]
pub(crate) struct RateLimited {
    start: Instant,
    /// Start of the current one-second window, ms since `start` plus one
    /// window (so that 0 means "never").
    window_ms: AtomicU64,
    /// Events in the current window.
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimited {
    const WINDOW: Duration = Duration::from_secs(1);
    /// Events logged per window.
    pub(crate) const BURST: u64 = 5;

    pub(crate) fn new() -> Self {
        RateLimited {
            start: Instant::now(),
            window_ms: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last one logged)` when this event may be
    /// logged.
    pub(crate) fn permit(&self) -> Option<u64> {
        self.permit_at(Instant::now())
    }

    fn permit_at(&self, now: Instant) -> Option<u64> {
        let window = u64::try_from(Self::WINDOW.as_millis()).unwrap_or(u64::MAX);
        let now = u64::try_from(now.saturating_duration_since(self.start).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(window);
        let started = self.window_ms.load(Ordering::Relaxed);
        let fresh = now.saturating_sub(started) >= window
            && self
                .window_ms
                .compare_exchange(started, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        let in_window = if fresh {
            self.count.store(1, Ordering::Relaxed);
            1
        } else {
            self.count.fetch_add(1, Ordering::Relaxed) + 1
        };
        if in_window <= Self::BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// One [`RateLimited`] per kind of refusal the relay logs.
#[derive(Debug)]
pub(crate) struct RefusalLogs {
    /// Connections refused at a connection limit.
    pub connections: RateLimited,
    /// Connections cut at the handshake deadline.
    pub cuts: RateLimited,
    /// Connections that are not Postern (unknown preambles).
    pub preambles: RateLimited,
    /// Failed hop handshakes.
    pub handshakes: RateLimited,
    /// Hop channels refused or ended by the relay (revoked, bad credential).
    pub sessions: RateLimited,
    /// Refused data connections and attaches.
    pub attaches: RateLimited,
    /// Refused opens.
    pub opens: RateLimited,
    /// Refused registrations.
    pub registrations: RateLimited,
}

impl RefusalLogs {
    pub(crate) fn new() -> Self {
        RefusalLogs {
            connections: RateLimited::new(),
            cuts: RateLimited::new(),
            preambles: RateLimited::new(),
            handshakes: RateLimited::new(),
            sessions: RateLimited::new(),
            attaches: RateLimited::new(),
            opens: RateLimited::new(),
            registrations: RateLimited::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SourceLimits = SourceLimits {
        max_pending_total: 4,
        max_pending_per_source: 2,
        max_per_source: 3,
    };

    fn src(n: u8) -> Source {
        Source::of(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn per_source_limits_cover_authenticated_connections() {
        let mut s = Sources::default();
        let a = src(1);
        s.admit(a, LIMITS).unwrap();
        s.admit(a, LIMITS).unwrap();
        assert_eq!(s.admit(a, LIMITS), Err(SourceRefusal::PendingPerSource(2)));
        // Once authenticated they no longer count as pending, but still as
        // connections from that source.
        s.authenticated(a);
        s.authenticated(a);
        s.admit(a, LIMITS).unwrap();
        assert_eq!(s.admit(a, LIMITS), Err(SourceRefusal::PerSource(3)));
        assert_eq!(s.open_from(a), 3);
        // Another source is not affected.
        s.admit(src(2), LIMITS).unwrap();
        s.closed(a);
        s.authenticated(a);
        s.admit(a, LIMITS).unwrap();
    }

    #[test]
    fn total_pending_limit() {
        let mut s = Sources::default();
        for n in 0..4 {
            s.admit(src(n), LIMITS).unwrap();
        }
        assert_eq!(s.admit(src(9), LIMITS), Err(SourceRefusal::PendingTotal(4)));
        s.authenticated(src(0));
        s.admit(src(9), LIMITS).unwrap();
    }

    #[test]
    fn ipv6_counts_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(mapped), src(1));
    }

    #[test]
    fn token_bucket_refills_on_a_virtual_clock() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        assert!(b.try_take(10, 3, t0));
        assert!(b.try_take(10, 3, t0));
        assert!(b.try_take(10, 3, t0));
        assert!(!b.try_take(10, 3, t0), "burst spent");
        assert!(!b.try_take(10, 3, t0 + Duration::from_millis(50)));
        assert!(b.try_take(10, 3, t0 + Duration::from_millis(160)));
        assert!(!b.is_full(10, 3, t0 + Duration::from_millis(160)));
        assert!(b.is_full(10, 3, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn refusal_logs_are_rate_limited() {
        let r = RateLimited::new();
        let t0 = r.start;
        for i in 0..RateLimited::BURST {
            assert_eq!(r.permit_at(t0 + Duration::from_millis(i)), Some(0));
        }
        assert_eq!(r.permit_at(t0 + Duration::from_millis(10)), None);
        assert_eq!(r.permit_at(t0 + Duration::from_millis(500)), None);
        // A new window: logged again, saying how many were not.
        assert_eq!(r.permit_at(t0 + Duration::from_millis(1001)), Some(2));
        assert_eq!(r.permit_at(t0 + Duration::from_millis(1002)), Some(0));
        // A flood of 10,000 in one window logs only the burst.
        let t1 = t0 + Duration::from_secs(5);
        let logged = (0..10_000).filter(|_| r.permit_at(t1).is_some()).count();
        assert_eq!(u64::try_from(logged).unwrap(), RateLimited::BURST);
    }
}
