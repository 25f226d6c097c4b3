//! Leader election among coordinators that share a store (etcd in production): the leader holds
//! the [`LEADER_KEY`] key on a lease it renews; a standby watches the key and takes it the moment
//! it goes (the leader resigned, or its lease expired because it died or lost the store).
//!
//! A leader that cannot renew its lease steps down *before* the store can expire it: the keeper
//! counts the lease from the moment it sent the last renewal that succeeded (the store counts
//! from when it received it, which is later), and reports the leadership lost once 4/5 of the TTL
//! have passed since. So two coordinators never both believe they lead, as long as their clocks
//! run at about the same rate.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout};

use crate::jobs::now_ms;
use crate::store::{Ephemeral, Store, WatchEvent};
use crate::{CoordinatorError, Result};

/// The key the leader holds.
pub const LEADER_KEY: &str = "leader";

/// The leader lease's TTL in milliseconds, unless configured otherwise: a standby takes over
/// within it. A leader rides out a store outage shorter than 4/5 of it less one renewal period
/// (an etcd restart or re-election takes seconds), so it is Kubernetes' leader-election default.
pub const DEFAULT_LEADER_LEASE_MS: u64 = 15_000;

/// Who holds (or wants) the leadership; the value of [`LEADER_KEY`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The coordinator's name.
    pub name: String,
    /// Where it serves once it leads.
    pub url: String,
    /// When it took the lead (ms since the Unix epoch; 0 for a candidate).
    #[serde(default)]
    pub since_unix_ms: u64,
}

/// Held leadership. Dropping it stops renewing the lease (which then expires); [`resign`]
/// hands the lead over at once.
///
/// [`resign`]: Leadership::resign
#[derive(Debug)]
pub struct Leadership<S: Store> {
    store: S,
    lease: Ephemeral,
    lost: oneshot::Receiver<String>,
    stop: Option<oneshot::Sender<()>>,
}

impl<S: Store> Leadership<S> {
    /// Resolves when the leadership is lost, with why: the caller must stop acting as leader
    /// at once (a standby may take over from then on).
    pub async fn lost(&mut self) -> String {
        (&mut self.lost)
            .await
            .unwrap_or_else(|_| "the leader lease keeper ended".to_string())
    }

    /// Stops renewing and revokes the lease, so that a standby takes over without waiting for
    /// it to expire.
    pub async fn resign(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.store.revoke(self.lease.lease).await.map(|_| ())
    }
}

impl<S: Store> Drop for Leadership<S> {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits until `me` holds the lead of `store` on a lease of `ttl`, then keeps the lease alive in
/// the background. While another coordinator leads, `standing_by` hears of each new holder.
pub async fn campaign<S: Store>(
    store: S,
    me: &Candidate,
    ttl: Duration,
    mut standing_by: impl FnMut(&Candidate) + Send,
) -> Result<Leadership<S>> {
    if ttl < Duration::from_millis(500) {
        return Err(CoordinatorError::invalid(
            "leader lease",
            format!("must be at least 500 ms, got {} ms", ttl.as_millis()),
        ));
    }
    let mut last_seen: Option<Candidate> = None;
    loop {
        // Watch first, so that a deletion between the attempt and the wait is not missed.
        let mut watch = store.watch(LEADER_KEY).await.ok();
        let mine = Candidate {
            since_unix_ms: now_ms(),
            ..me.clone()
        };
        let value = serde_json::to_vec(&mine)
            .map_err(|e| CoordinatorError::Store(format!("encode leader: {e}")))?;
        // The lease counts from no later than this.
        let asked = Instant::now();
        if let Some(lease) = store.create_ephemeral(LEADER_KEY, value, ttl).await? {
            tracing::info!(name = %me.name, lease = %lease.lease, "leading");
            let (lost_tx, lost) = oneshot::channel();
            let (stop, stopped) = oneshot::channel();
            tokio::spawn(keep(store.clone(), lease, ttl, asked, lost_tx, stopped));
            return Ok(Leadership {
                store,
                lease,
                lost,
                stop: Some(stop),
            });
        }
        if let Some(v) = store.get(LEADER_KEY).await? {
            let holder: Candidate = serde_json::from_slice(&v.value)
                .map_err(|e| CoordinatorError::Store(format!("decode {LEADER_KEY:?}: {e}")))?;
            if last_seen.as_ref() != Some(&holder) {
                tracing::info!(leader = %holder.name, url = %holder.url, "standing by");
                standing_by(&holder);
                last_seen = Some(holder);
            }
        }
        // Until the key goes; a poll every half TTL covers a watch that failed.
        let gone = async {
            match watch.as_mut() {
                Some(w) => loop {
                    match w.next().await {
                        Some(Ok(WatchEvent::Delete { key, .. })) if key == LEADER_KEY => break,
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => std::future::pending::<()>().await,
                    }
                },
                None => std::future::pending::<()>().await,
            }
        };
        let _ = timeout(ttl / 2, gone).await;
    }
}

/// Renews `lease` every fifth of `ttl`; reports the leadership lost when the store says the
/// lease is gone, or when no renewal has succeeded for 4/5 of `ttl` (counted from when the last
/// good one was sent, `renewed` at first).
async fn keep<S: Store>(
    store: S,
    lease: Ephemeral,
    ttl: Duration,
    mut renewed: Instant,
    lost: oneshot::Sender<String>,
    mut stop: oneshot::Receiver<()>,
) {
    let every = ttl / 5;
    let deadline = ttl * 4 / 5;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            () = sleep(every) => {}
        }
        let sent = Instant::now();
        let left = (renewed + deadline).saturating_duration_since(sent);
        match timeout(
            left.max(Duration::from_millis(1)),
            store.keep_alive(lease.lease),
        )
        .await
        {
            Ok(Ok(true)) => renewed = sent,
            Ok(Ok(false)) => {
                let _ = lost.send("the leader lease expired in the store".to_string());
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the leader lease"),
            Err(_) => tracing::warn!("renewing the leader lease timed out"),
        }
        if renewed.elapsed() >= deadline {
            let _ = lost.send(format!(
                "the leader lease could not be renewed for {} ms (TTL {} ms)",
                renewed.elapsed().as_millis(),
                ttl.as_millis()
            ));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    fn candidate(name: &str) -> Candidate {
        Candidate {
            name: name.into(),
            url: format!("http://{name}"),
            since_unix_ms: 0,
        }
    }

    fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        (dir, s)
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_takes_over_when_the_leader_resigns() {
        let (_dir, s) = store();
        let ttl = Duration::from_secs(2);
        let a = campaign(s.clone(), &candidate("a"), ttl, |_| {})
            .await
            .unwrap();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let b = tokio::spawn({
            let s = s.clone();
            async move {
                campaign(s, &candidate("b"), ttl, move |c| {
                    let _ = seen_tx.send(c.name.clone());
                })
                .await
            }
        });
        assert_eq!(seen.recv().await.as_deref(), Some("a"), "b stands by for a");
        // Longer than the TTL: a's keeper renews, so b keeps waiting.
        sleep(ttl * 2).await;
        assert!(!b.is_finished(), "b took the lead from a living leader");
        let t = Instant::now();
        a.resign().await.unwrap();
        let b = b.await.unwrap().unwrap();
        assert!(t.elapsed() < ttl / 2, "took over in {:?}", t.elapsed());
        let held: Candidate =
            serde_json::from_slice(&s.get(LEADER_KEY).await.unwrap().unwrap().value).unwrap();
        assert_eq!(held.name, "b");
        assert!(held.since_unix_ms > 0);
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_leaders_lease_expires_and_a_standby_takes_over_within_it() {
        let (_dir, s) = store();
        let ttl = Duration::from_secs(1);
        let a = campaign(s.clone(), &candidate("a"), ttl, |_| {})
            .await
            .unwrap();
        let b = tokio::spawn({
            let s = s.clone();
            async move { campaign(s, &candidate("b"), ttl, |_| {}).await }
        });
        sleep(Duration::from_millis(100)).await;
        // The leader dies: nothing renews its lease any more.
        let t = Instant::now();
        drop(a);
        let _b = b.await.unwrap().unwrap();
        let took = t.elapsed();
        assert!(
            took >= ttl / 2 && took < ttl * 2,
            "took over after {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_lease_is_gone_hears_it_lost() {
        let (_dir, s) = store();
        let ttl = Duration::from_secs(1);
        let mut a = campaign(s.clone(), &candidate("a"), ttl, |_| {})
            .await
            .unwrap();
        // Someone (an operator, or the store after an outage) ends the lease.
        assert!(s.revoke(a.lease.lease).await.unwrap());
        let why = timeout(ttl * 2, a.lost()).await.expect("lost in time");
        assert!(why.contains("expired"), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_lease_is_refused_naming_the_field() {
        let (_dir, s) = store();
        let e = campaign(s, &candidate("a"), Duration::from_millis(100), |_| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("leader lease") && e.contains("500 ms"), "{e}");
    }
}
