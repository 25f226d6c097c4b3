//! The in-process transport and the collectives over it: sums in a fixed order on every rank,
//! frames matched by tag whatever order they arrive in, and failures that name the rank, the
//! peer and the operation instead of hanging.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use proptest::prelude::*;
use shoal_worker::WorkerError;
use shoal_worker::comm::collective::{
    Group, all_gather, all_reduce_f64, all_reduce_u64, even_bounds, reduce_scatter,
};
use shoal_worker::comm::transport::{CommOp, LocalMesh, Tag, Transport};

fn tag(op: CommOp, seq: u64) -> Tag {
    Tag { step: 1, op, seq }
}

/// Runs `f(rank, transport)` on one thread per rank and returns the results in rank order.
fn on_ranks<R: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, &mut dyn Transport) -> R + Sync,
) -> Vec<R> {
    let mut mesh = LocalMesh::new(world, timeout);
    std::thread::scope(|s| {
        let handles: Vec<_> = mesh
            .iter_mut()
            .enumerate()
            .map(|(r, t)| {
                let f = &f;
                s.spawn(move || f(r, t))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn reduce_scatter_then_all_gather_is_an_all_reduce_in_rank_order(
        world in 1usize..5,
        len in 0usize..300,
        seed in any::<u64>(),
    ) {
        let data: Vec<Vec<f32>> = (0..world)
            .map(|r| {
                (0..len)
                    .map(|i| ((seed as usize ^ (r * 7919 + i * 31)) % 1000) as f32 / 7.0 - 60.0)
                    .collect()
            })
            .collect();
        // The expected sum, taken in rank order.
        let mut want = data[0].clone();
        for d in &data[1..] {
            for (w, v) in want.iter_mut().zip(d) {
                *w += v;
            }
        }
        let bounds = even_bounds(len, world);
        let g = Group { ranks: (0..world).collect() };
        let got = on_ranks(world, Duration::from_secs(10), |r, t| {
            let piece = reduce_scatter(t, &g, tag(CommOp::ReduceScatter, 0), &data[r], &bounds)
                .unwrap();
            all_gather(t, &g, tag(CommOp::AllGather, 0), &piece, &bounds).unwrap()
        });
        for g in got {
            prop_assert_eq!(&g, &want);
        }
    }
}

#[test]
fn small_all_reduces_agree_and_count_bytes() {
    let g = Group {
        ranks: vec![0, 1, 2],
    };
    let out = on_ranks(3, Duration::from_secs(10), |r, t| {
        let f = all_reduce_f64(t, &g, tag(CommOp::AllReduce, 0), &[r as f64 + 0.5]).unwrap();
        let u = all_reduce_u64(t, &g, tag(CommOp::AllReduce, 1), &[r as u64, 10]).unwrap();
        (f, u, t.bytes().clone())
    });
    for (f, u, bytes) in out {
        assert_eq!(f, vec![4.5]);
        assert_eq!(u, vec![3, 30]);
        // Two peers, one f64 and two u64 each.
        assert_eq!(bytes.shm, 2 * (8 + 16));
        assert_eq!(bytes.collective, bytes.shm);
        assert_eq!((bytes.tcp, bytes.dispatch, bytes.combine), (0, 0, 0));
    }
}

#[test]
fn frames_wait_for_their_own_tag() {
    let out = on_ranks(2, Duration::from_secs(10), |r, t| {
        if r == 0 {
            // Sent in the opposite order to the one rank 1 asks for them.
            t.send(1, tag(CommOp::Combine, 2), vec![2]).unwrap();
            t.send(1, tag(CommOp::Dispatch, 1), vec![1]).unwrap();
            Vec::new()
        } else {
            let a = t.recv(0, tag(CommOp::Dispatch, 1)).unwrap();
            let b = t.recv(0, tag(CommOp::Combine, 2)).unwrap();
            vec![a, b]
        }
    });
    assert_eq!(out[1], vec![vec![1], vec![2]]);
}

#[test]
fn a_silent_peer_times_out_naming_the_peer_and_operation() {
    let t0 = Instant::now();
    let out = on_ranks(2, Duration::from_millis(200), |r, t| {
        if r == 1 {
            let g = Group { ranks: vec![0, 1] };
            all_reduce_u64(t, &g, tag(CommOp::AllReduce, 4), &[1]).err()
        } else {
            None
        }
    });
    let err = out[1].as_ref().expect("timed out").to_string();
    assert!(
        err.contains("rank 1") && err.contains("rank 0") && err.contains("all-reduce #4"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_failing_rank_stops_the_others_and_malformed_frames_are_named() {
    let out = on_ranks(3, Duration::from_secs(30), |r, t| match r {
        // Rank 0 sends a frame of the wrong length to rank 1.
        0 => {
            t.send(1, tag(CommOp::AllReduce, 0), vec![0; 5]).unwrap();
            None
        }
        // Rank 1 refuses it, and fails.
        1 => {
            let g = Group { ranks: vec![0, 1] };
            let e = all_reduce_u64(t, &g, tag(CommOp::AllReduce, 0), &[1]).err();
            t.abort();
            e
        }
        _ => {
            // Rank 2 waits for a frame that never comes: rank 1's failure releases it.
            let t0 = Instant::now();
            let e = t.recv(0, tag(CommOp::AllGather, 9)).err();
            assert!(t0.elapsed() < Duration::from_secs(5));
            e
        }
    });
    let malformed = out[1].as_ref().unwrap();
    assert!(
        matches!(malformed, WorkerError::Comm { peer: 0, reason, .. } if reason.contains("5 bytes")),
        "{malformed}"
    );
    let stopped = out[2].as_ref().unwrap().to_string();
    assert!(stopped.contains("another rank failed"), "{stopped}");
    // Sending to itself or outside the mesh is refused.
    let mut mesh = LocalMesh::new(2, Duration::from_secs(1));
    assert!(mesh[0].send(0, tag(CommOp::Dispatch, 0), vec![]).is_err());
    assert!(mesh[0].send(5, tag(CommOp::Dispatch, 0), vec![]).is_err());
}
