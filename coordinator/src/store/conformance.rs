//! The conformance suite every [`Store`] backend runs: one test body for all of them.

use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};

use super::{Expect, Store, Watch, WatchEvent};

/// The TTL of the suite's leases (etcd raises it to its minimum, 2 s by default).
const TTL: Duration = Duration::from_secs(1);
/// How long the suite keeps a lease alive: longer than any backend's TTL for [`TTL`].
const KEPT_FOR: Duration = Duration::from_millis(3500);
/// Longest wait for a watch event.
const EVENT_WAIT: Duration = Duration::from_secs(5);

/// Runs every check against an empty store. Panics (with the check's name) on a failure.
pub async fn run<S: Store>(s: &S) {
    assert_eq!(s.get("jobs/a").await.expect("get"), None, "absent key");
    let r1 = s.put("jobs/a", b"one".to_vec()).await.expect("put");
    let got = s
        .get("jobs/a")
        .await
        .expect("get")
        .expect("present after put");
    assert_eq!(got.value, b"one");
    assert_eq!(got.revision, r1);
    let r2 = s.put("jobs/a", b"two".to_vec()).await.expect("put");
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");

    // Compare-and-set: absent, right revision, stale revision.
    let created = s
        .compare_and_set("jobs/b", Expect::Absent, b"b".to_vec())
        .await
        .expect("cas");
    let rb = created.expect("creating an absent key succeeds");
    let again = s
        .compare_and_set("jobs/b", Expect::Absent, b"x".to_vec())
        .await
        .expect("cas");
    let current = again.expect_err("creating an existing key fails");
    assert_eq!(current.map(|v| v.value), Some(b"b".to_vec()));
    let rb2 = s
        .compare_and_set("jobs/b", Expect::Revision(rb), b"b2".to_vec())
        .await
        .expect("cas")
        .expect("the right revision succeeds");
    let stale = s
        .compare_and_set("jobs/b", Expect::Revision(rb), b"b3".to_vec())
        .await
        .expect("cas");
    let current = stale.expect_err("a stale revision fails");
    assert_eq!(
        current.map(|v| (v.value, v.revision)),
        Some((b"b2".to_vec(), rb2))
    );
    let missing = s
        .compare_and_set("jobs/none", Expect::Revision(1), b"x".to_vec())
        .await
        .expect("cas");
    assert_eq!(
        missing,
        Err(None),
        "expecting a revision of an absent key fails"
    );

    // Listing by prefix, in key order, not leaking neighbours.
    s.put("jobs-seq", b"7".to_vec()).await.expect("put");
    s.put("nodes/n1", b"n".to_vec()).await.expect("put");
    let jobs: Vec<String> = s
        .list("jobs/")
        .await
        .expect("list")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(jobs, ["jobs/a", "jobs/b"]);
    assert!(s.list("zzz/").await.expect("list").is_empty());

    // Delete.
    assert!(s.delete("nodes/n1").await.expect("delete"));
    assert!(
        !s.delete("nodes/n1").await.expect("delete"),
        "second delete"
    );
    assert_eq!(s.get("nodes/n1").await.expect("get"), None);

    // Concurrent compare-and-set: of many writers expecting the same revision, exactly one wins.
    let base = s.put("race", b"0".to_vec()).await.expect("put");
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.compare_and_set("race", Expect::Revision(base), vec![i])
                .await
                .expect("cas")
                .is_ok()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.expect("task"));
    }
    assert_eq!(wins, 1, "exactly one compare-and-set wins");

    watches(s).await;
    leases(s).await;
    elections(s).await;
}

/// The next event of `w`, or a panic naming what was expected.
async fn next_event(w: &mut Watch, what: &str) -> WatchEvent {
    match timeout(EVENT_WAIT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed waiting for {what}: {e}"),
        Ok(None) => panic!("watch ended waiting for {what}"),
        Err(_) => panic!("no watch event within {EVENT_WAIT:?} waiting for {what}"),
    }
}

fn put_event(key: &str, value: &[u8], revision: u64) -> WatchEvent {
    WatchEvent::Put {
        key: key.into(),
        value: value.to_vec(),
        revision,
    }
}

/// A watch sees the puts and deletions under its prefix, in order, with their revisions, and
/// nothing outside it.
async fn watches<S: Store>(s: &S) {
    s.put("w/before", b"0".to_vec()).await.expect("put");
    let mut w = s.watch("w/").await.expect("watch");
    let r1 = s.put("w/a", b"1".to_vec()).await.expect("put");
    s.put("wx", b"outside".to_vec()).await.expect("put");
    s.put("other/w/a", b"outside".to_vec()).await.expect("put");
    let r2 = s.put("w/b", b"2".to_vec()).await.expect("put");
    assert!(s.delete("w/a").await.expect("delete"));
    assert!(!s.delete("w/never").await.expect("delete"));
    let r3 = s
        .compare_and_set("w/b", Expect::Revision(r2), b"3".to_vec())
        .await
        .expect("cas")
        .expect("the right revision succeeds");
    let e = s
        .put_ephemeral("w/e", b"4".to_vec(), Duration::from_secs(60))
        .await
        .expect("put_ephemeral");
    assert!(s.revoke(e.lease).await.expect("revoke"));
    let r4 = s.put("w/end", b"5".to_vec()).await.expect("put");

    assert_eq!(
        next_event(&mut w, "w/a put").await,
        put_event("w/a", b"1", r1)
    );
    assert_eq!(
        next_event(&mut w, "w/b put").await,
        put_event("w/b", b"2", r2)
    );
    let del = next_event(&mut w, "w/a delete").await;
    assert!(
        matches!(&del, WatchEvent::Delete { key, revision } if key == "w/a" && *revision > r2),
        "{del:?}"
    );
    assert_eq!(
        next_event(&mut w, "w/b cas").await,
        put_event("w/b", b"3", r3)
    );
    assert_eq!(
        next_event(&mut w, "w/e put").await,
        put_event("w/e", b"4", e.revision)
    );
    let del = next_event(&mut w, "w/e revoked").await;
    assert!(
        matches!(&del, WatchEvent::Delete { key, revision } if key == "w/e" && *revision > e.revision && *revision < r4),
        "{del:?}"
    );
    assert_eq!(
        next_event(&mut w, "w/end put").await,
        put_event("w/end", b"5", r4)
    );
    assert!(
        timeout(Duration::from_millis(200), w.next()).await.is_err(),
        "no further events"
    );
}

/// An ephemeral key expires after its TTL without keep-alives (and its watchers hear of it),
/// lives on with them, and goes with its revoked lease.
async fn leases<S: Store>(s: &S) {
    let mut w = s.watch("live/").await.expect("watch");
    let t0 = Instant::now();
    let kept = s
        .put_ephemeral("live/kept", b"k".to_vec(), TTL)
        .await
        .expect("put_ephemeral");
    let lapsed = s
        .put_ephemeral("live/lapsed", b"l".to_vec(), TTL)
        .await
        .expect("put_ephemeral");
    assert_ne!(
        kept.lease, lapsed.lease,
        "each put_ephemeral has its own lease"
    );
    let got = s.get("live/kept").await.expect("get").expect("present");
    assert_eq!((got.value, got.revision), (b"k".to_vec(), kept.revision));
    assert!(s.get("live/lapsed").await.expect("get").is_some());

    let mut lapsed_at = None;
    while t0.elapsed() < KEPT_FOR {
        assert!(
            s.keep_alive(kept.lease).await.expect("keep_alive"),
            "a kept-alive lease lives ({:?} in)",
            t0.elapsed()
        );
        if lapsed_at.is_none() && s.get("live/lapsed").await.expect("get").is_none() {
            lapsed_at = Some(t0.elapsed());
        }
        sleep(Duration::from_millis(200)).await;
    }
    let lapsed_at = lapsed_at.expect("a lease without keep-alives expires");
    assert!(
        lapsed_at >= TTL,
        "expired after {lapsed_at:?}, before its TTL"
    );
    assert!(
        !s.keep_alive(lapsed.lease).await.expect("keep_alive"),
        "an expired lease cannot be kept alive"
    );
    let got = s
        .get("live/kept")
        .await
        .expect("get")
        .expect("still present");
    assert_eq!(
        got.revision, kept.revision,
        "keep-alives do not write the key"
    );
    let live: Vec<String> = s
        .list("live/")
        .await
        .expect("list")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(live, ["live/kept"]);

    // Revoking deletes the key at once; the lease is gone after that.
    assert!(s.revoke(kept.lease).await.expect("revoke"));
    assert_eq!(s.get("live/kept").await.expect("get"), None);
    assert!(
        !s.revoke(kept.lease).await.expect("revoke"),
        "second revoke"
    );
    assert!(!s.keep_alive(kept.lease).await.expect("keep_alive"));

    // The watch saw both puts, the expiry and the revocation, in that order.
    let mut seen = Vec::new();
    for what in ["put", "put", "expiry", "revocation"] {
        seen.push(next_event(&mut w, what).await);
    }
    assert_eq!(seen[0], put_event("live/kept", b"k", kept.revision));
    assert_eq!(seen[1], put_event("live/lapsed", b"l", lapsed.revision));
    assert!(
        matches!(&seen[2], WatchEvent::Delete { key, .. } if key == "live/lapsed"),
        "{seen:?}"
    );
    assert!(
        matches!(&seen[3], WatchEvent::Delete { key, .. } if key == "live/kept"),
        "{seen:?}"
    );
    assert!(seen[3].revision() > seen[2].revision(), "{seen:?}");
}

/// `create_ephemeral` takes a key only while it is absent (an election): the loser gets `None`
/// and nothing changes; once the holder's lease goes, the key can be taken again.
async fn elections<S: Store>(s: &S) {
    let won = s
        .create_ephemeral("elect/leader", b"a".to_vec(), TTL * 10)
        .await
        .expect("create_ephemeral")
        .expect("an absent key is taken");
    let lost = s
        .create_ephemeral("elect/leader", b"b".to_vec(), TTL * 10)
        .await
        .expect("create_ephemeral");
    assert_eq!(lost, None, "a taken key is not taken again");
    let got = s.get("elect/leader").await.expect("get").expect("present");
    assert_eq!((got.value, got.revision), (b"a".to_vec(), won.revision));
    // An ordinary key counts as taken too.
    s.put("elect/plain", b"p".to_vec()).await.expect("put");
    assert_eq!(
        s.create_ephemeral("elect/plain", b"b".to_vec(), TTL)
            .await
            .expect("create_ephemeral"),
        None
    );
    assert!(s.revoke(won.lease).await.expect("revoke"));
    let again = s
        .create_ephemeral("elect/leader", b"b".to_vec(), TTL * 10)
        .await
        .expect("create_ephemeral")
        .expect("a key whose lease went is free");
    assert!(again.revision > won.revision);
    assert_eq!(
        s.get("elect/leader").await.expect("get").map(|v| v.value),
        Some(b"b".to_vec())
    );
    assert!(s.revoke(again.lease).await.expect("revoke"));
    assert!(s.delete("elect/plain").await.expect("delete"));
}

/// After [`run`] and a reopen: the data written is still there.
pub async fn check_persisted<S: Store>(s: &S) {
    let a = s
        .get("jobs/a")
        .await
        .expect("get")
        .expect("jobs/a persisted");
    assert_eq!(a.value, b"two");
    let b = s
        .get("jobs/b")
        .await
        .expect("get")
        .expect("jobs/b persisted");
    assert_eq!(b.value, b"b2");
    let next = s.put("jobs/c", b"c".to_vec()).await.expect("put");
    assert!(next > b.revision, "revisions keep growing after a reopen");
}
