//! The conformance suite every [`Store`] backend runs: one test body for all of them.

use super::{Expect, Store};

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
