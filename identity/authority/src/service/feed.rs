//! Revocation feeds: what the authority sends a follower, and when.
//!
//! A follower (a node on an end-to-end channel, or a relay on the
//! authority's own hop channel) names the newest sequence number it holds;
//! the feed then sends every entry after it, oldest first, in messages of
//! at most [`MAX_REVOCATIONS_PER_MESSAGE`] entries, then each new entry as
//! soon as [`Authority::revoke`] records it (the authority's
//! [`Authority::watch_revocations`] wakes the feed; nothing polls the
//! store), and an empty message whenever it has been quiet for a heartbeat
//! interval ([`FEED_HEARTBEAT`] by default), so the follower can tell a
//! quiet feed from a dead one and bound how stale its list is.
//!
//! [`FeedCursor`] decides, without I/O and with the time passed in;
//! [`run_feed`] drives it over a [`FeedSink`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_identity::credential::RevocationEntry;
pub use postern_identity::revocation::FEED_HEARTBEAT;
pub use postern_identity::wire::MAX_REVOCATIONS_PER_MESSAGE;
use postern_node::NodeError;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::Authority;

/// Where a feed stands: the newest entry it sent, the newest sequence
/// number it read up to, and when it last sent anything.
#[derive(Debug, Clone)]
pub struct FeedCursor {
    /// The newest sequence number the follower holds.
    after: u64,
    /// The newest sequence number already read from the store.
    read_up_to: u64,
    /// When the last message went out (`None`: nothing yet).
    last_sent: Option<Instant>,
    heartbeat: Duration,
    batch: usize,
}

/// What a feed does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedStep {
    /// Read the entries after `after` from the store and send them
    /// ([`FeedCursor::batches`]).
    Read {
        /// The newest sequence number the follower holds.
        after: u64,
    },
    /// Send an empty message: nothing happened for a heartbeat interval.
    Heartbeat,
    /// Nothing to send until `until`, or until a new revocation.
    Wait {
        /// When the next heartbeat is due.
        until: Instant,
    },
}

impl FeedCursor {
    /// A feed for a follower that holds everything up to `after`, saying
    /// "nothing new" every `heartbeat`, with at most `batch` entries per
    /// message (at least 1).
    pub fn new(after: u64, heartbeat: Duration, batch: usize) -> Self {
        FeedCursor {
            after,
            read_up_to: after,
            last_sent: None,
            heartbeat,
            batch: batch.max(1),
        }
    }

    /// The newest sequence number the follower holds, as far as this feed
    /// sent it.
    pub fn after(&self) -> u64 {
        self.after
    }

    /// What to do at `now`, when the newest recorded revocation is
    /// `newest`. The first step always reads (and sends, even nothing), so
    /// a follower is current as soon as the feed opens.
    pub fn step(&self, newest: u64, now: Instant) -> FeedStep {
        let Some(last_sent) = self.last_sent else {
            return FeedStep::Read { after: self.after };
        };
        if newest > self.read_up_to {
            return FeedStep::Read { after: self.after };
        }
        let due = last_sent + self.heartbeat;
        if now >= due {
            FeedStep::Heartbeat
        } else {
            FeedStep::Wait { until: due }
        }
    }

    /// The messages to send for `entries`, the store's answer to
    /// [`FeedStep::Read`] read when the newest revocation was `newest`:
    /// the entries after the cursor, oldest first, in batches of at most
    /// the batch size; one empty message on the first step when there are
    /// none (nothing at all otherwise). Moves the cursor past them, as sent
    /// at `now`.
    pub fn batches(
        &mut self,
        mut entries: Vec<RevocationEntry>,
        newest: u64,
        now: Instant,
    ) -> Vec<Vec<RevocationEntry>> {
        entries.retain(|e| e.seq > self.after);
        entries.sort_by_key(|e| e.seq);
        self.read_up_to = self.read_up_to.max(newest);
        let first = self.last_sent.is_none();
        if entries.is_empty() {
            if first {
                self.last_sent = Some(now);
                return vec![Vec::new()];
            }
            return Vec::new();
        }
        if let Some(last) = entries.last() {
            self.after = last.seq;
            self.read_up_to = self.read_up_to.max(last.seq);
        }
        self.last_sent = Some(now);
        entries.chunks(self.batch).map(<[_]>::to_vec).collect()
    }

    /// Records that a heartbeat went out at `now`.
    pub fn heartbeat_sent(&mut self, now: Instant) {
        self.last_sent = Some(now);
    }
}

/// Where a feed's messages go.
pub(crate) trait FeedSink {
    /// Sends one message: `entries` oldest first, or none (a heartbeat).
    async fn send(&mut self, entries: Vec<RevocationEntry>) -> Result<(), NodeError>;
    /// Resolves when the follower has gone away. Cancel-safe.
    async fn gone(&mut self);
}

/// Why a feed ended.
#[derive(Debug)]
pub(crate) enum FeedEnd {
    /// The follower left, or the authority is stopping.
    Closed,
    /// Sending to the follower failed.
    Send(NodeError),
    /// The store could not be read (logged here).
    Store,
}

/// Runs a feed for a follower that holds everything up to `after`, until
/// it goes away, sending fails or `stop`.
pub(crate) async fn run_feed(
    authority: &Arc<Authority>,
    after: u64,
    heartbeat: Duration,
    sink: &mut impl FeedSink,
    stop: &CancellationToken,
) -> FeedEnd {
    let mut newest = authority.watch_revocations();
    let mut cursor = FeedCursor::new(after, heartbeat, MAX_REVOCATIONS_PER_MESSAGE);
    loop {
        let latest = *newest.borrow_and_update();
        let now = tokio::time::Instant::now().into_std();
        match cursor.step(latest, now) {
            FeedStep::Read { after } => {
                let read = authority.blocking(move |a| a.revocations_since(after));
                let entries = tokio::select! {
                    () = stop.cancelled() => return FeedEnd::Closed,
                    entries = read => entries,
                };
                let entries = match entries {
                    Ok(entries) => entries,
                    Err(e) => {
                        warn!(error = %e, "cannot read revocations for a feed; closing it (the follower reconnects)");
                        return FeedEnd::Store;
                    }
                };
                for batch in cursor.batches(entries, latest, now) {
                    if let Err(e) = sink.send(batch).await {
                        return FeedEnd::Send(e);
                    }
                }
            }
            FeedStep::Heartbeat => {
                if let Err(e) = sink.send(Vec::new()).await {
                    return FeedEnd::Send(e);
                }
                cursor.heartbeat_sent(now);
            }
            FeedStep::Wait { until } => {
                tokio::select! {
                    () = stop.cancelled() => return FeedEnd::Closed,
                    () = sink.gone() => return FeedEnd::Closed,
                    changed = newest.changed() => {
                        if changed.is_err() {
                            // The authority itself is gone.
                            return FeedEnd::Closed;
                        }
                    }
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(until)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuthorityConfig, MemoryStore};
    use postern_identity::credential::RevocationTarget;
    use postern_identity::Identity;
    use tokio::sync::mpsc;

    fn entry(seq: u64) -> RevocationEntry {
        RevocationEntry {
            seq,
            revocation: postern_identity::credential::Revocation {
                target: RevocationTarget::Identity(Identity::generate().identifier()),
                revoked_at: 1_700_000_000,
            },
        }
    }

    fn seqs(batch: &[RevocationEntry]) -> Vec<u64> {
        batch.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn cursor_sends_first_then_news_then_heartbeats() {
        let t0 = Instant::now();
        let beat = Duration::from_secs(5);
        let mut c = FeedCursor::new(2, beat, 2);
        // The first step reads, and sends even when there is nothing new.
        assert_eq!(c.step(2, t0), FeedStep::Read { after: 2 });
        assert_eq!(c.batches(vec![entry(1), entry(2)], 2, t0), vec![Vec::new()]);
        assert_eq!(c.step(2, t0), FeedStep::Wait { until: t0 + beat });
        // New entries: read, in batches, oldest first.
        assert_eq!(c.step(5, t0), FeedStep::Read { after: 2 });
        let out = c.batches(vec![entry(5), entry(3), entry(4)], 5, t0);
        assert_eq!(
            out.iter().map(|b| seqs(b)).collect::<Vec<_>>(),
            [vec![3, 4], vec![5]]
        );
        assert_eq!(c.after(), 5);
        // Quiet: a heartbeat once the interval has passed since the last message.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(c.step(5, t1), FeedStep::Wait { until: t0 + beat });
        assert_eq!(c.step(5, t0 + beat), FeedStep::Heartbeat);
        c.heartbeat_sent(t0 + beat);
        assert_eq!(
            c.step(5, t0 + beat),
            FeedStep::Wait {
                until: t0 + 2 * beat
            }
        );
        // A read that finds nothing new (a stale wake-up) sends nothing and
        // does not loop.
        assert_eq!(c.step(6, t1), FeedStep::Read { after: 5 });
        assert!(c.batches(Vec::new(), 6, t1).is_empty());
        assert!(matches!(c.step(6, t1), FeedStep::Wait { .. }));
    }

    #[test]
    fn a_full_batch_fits_one_control_frame() {
        // The largest target (an identity) in every entry, and the largest
        // numbers CBOR can carry.
        let batch: Vec<RevocationEntry> = (0..MAX_REVOCATIONS_PER_MESSAGE)
            .map(|i| {
                let mut e = entry(u64::MAX - i as u64);
                e.revocation.revoked_at = u64::MAX;
                e
            })
            .collect();
        let control = postern_identity::wire::Control::Revocations {
            entries: batch.clone(),
        };
        let control = postern_identity::wire::encode(&control).unwrap();
        assert!(
            control.len() + postern_identity::frame::TAG_LEN
                <= postern_identity::link::MAX_CONTROL_FRAME,
            "{} bytes",
            control.len()
        );
        let reply =
            postern_identity::authority_wire::AuthorityReply::Revocations { entries: batch };
        let reply = postern_identity::wire::encode(&reply).unwrap();
        assert!(reply.len() < postern_identity::frame::MAX_NOISE_MESSAGE - 64);
    }

    /// A sink that hands each message to the test, stamped with the
    /// (virtual) time it was sent.
    struct Recorder(mpsc::UnboundedSender<(tokio::time::Instant, Vec<RevocationEntry>)>);

    impl FeedSink for Recorder {
        async fn send(&mut self, entries: Vec<RevocationEntry>) -> Result<(), NodeError> {
            let _ = self.0.send((tokio::time::Instant::now(), entries));
            Ok(())
        }
        async fn gone(&mut self) {
            std::future::pending().await
        }
    }

    fn authority() -> Arc<Authority> {
        Arc::new(
            Authority::new(
                Identity::generate(),
                Box::new(MemoryStore::new()),
                AuthorityConfig::default(),
            )
            .unwrap(),
        )
    }

    fn revoke(a: &Authority) -> u64 {
        a.revoke(
            RevocationTarget::Identity(Identity::generate().identifier()),
            1_700_000_000,
        )
        .unwrap()
        .seq
    }

    /// The relay-push producer on virtual time: the entries after `after`
    /// at once (in frame-sized batches), then each new one when it is
    /// recorded, with no time passing, then heartbeats every 5 s.
    #[tokio::test(start_paused = true)]
    async fn feed_sends_backlog_news_and_heartbeats_on_virtual_time() {
        let a = authority();
        for _ in 0..300 {
            revoke(&a);
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let feed = tokio::spawn({
            let (a, stop) = (Arc::clone(&a), stop.clone());
            async move { run_feed(&a, 10, FEED_HEARTBEAT, &mut Recorder(tx), &stop).await }
        });
        let mut backlog = Vec::new();
        for _ in 0..3 {
            let (at, batch) = rx.recv().await.unwrap();
            assert_eq!(at, start, "the backlog went out at once");
            assert!(batch.len() <= MAX_REVOCATIONS_PER_MESSAGE);
            backlog.extend(seqs(&batch));
        }
        assert_eq!(backlog, (11..=300).collect::<Vec<_>>());

        // A revocation 2 s later goes out when it is recorded.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let recorded = tokio::time::Instant::now();
        let seq = revoke(&a);
        let (at, batch) = rx.recv().await.unwrap();
        assert_eq!((at, seqs(&batch)), (recorded, vec![seq]));

        // Then quiet: an empty message every 5 s after the last one.
        for n in 1..=3u32 {
            let (at, batch) = rx.recv().await.unwrap();
            assert!(batch.is_empty(), "{batch:?}");
            assert_eq!(at, recorded + FEED_HEARTBEAT * n);
        }
        assert!(rx.try_recv().is_err());
        stop.cancel();
        assert!(matches!(feed.await.unwrap(), FeedEnd::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_feed_ends_when_its_follower_goes() {
        struct Leaving(Option<tokio::sync::oneshot::Receiver<()>>);
        impl FeedSink for Leaving {
            async fn send(&mut self, _: Vec<RevocationEntry>) -> Result<(), NodeError> {
                Ok(())
            }
            async fn gone(&mut self) {
                match self.0.as_mut() {
                    Some(rx) => {
                        let _ = rx.await;
                    }
                    None => std::future::pending().await,
                }
            }
        }
        let a = authority();
        let (leave, left) = tokio::sync::oneshot::channel();
        let feed = tokio::spawn({
            let a = Arc::clone(&a);
            async move {
                run_feed(
                    &a,
                    0,
                    FEED_HEARTBEAT,
                    &mut Leaving(Some(left)),
                    &CancellationToken::new(),
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(!feed.is_finished());
        drop(leave);
        assert!(matches!(feed.await.unwrap(), FeedEnd::Closed));
    }
}
