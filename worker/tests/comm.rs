//! The transports and the collectives over them: sums in a fixed order on every rank, frames
//! matched by tag whatever order they arrive in, and failures that name the rank, the peer and
//! the operation instead of hanging. One test body runs against every mesh: in-process queues,
//! TCP between every rank (one node each), and two nodes of two ranks (queues inside, TCP
//! across).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use proptest::prelude::*;
use shoal_worker::WorkerError;
use shoal_worker::comm::collective::{
    Group, all_gather, all_reduce_f64, all_reduce_u64, even_bounds, reduce_scatter,
};
use shoal_worker::comm::tcp::{MeshLayout, connect};
use shoal_worker::comm::transport::{CommOp, LocalMesh, LocalTransport, Tag, Transport};

fn tag(op: CommOp, seq: u64) -> Tag {
    Tag { step: 1, op, seq }
}

/// A mesh of `world` ranks over TCP loopback, `per_node` ranks per node (process-like: each
/// node connects on its own thread, as separate processes would).
fn tcp_mesh(world: usize, per_node: usize, timeout: Duration) -> Vec<LocalTransport> {
    let nodes = world.div_ceil(per_node);
    let listeners: Vec<std::net::TcpListener> = (0..nodes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let layout = MeshLayout {
        mesh_id: 0x5eed,
        node_of: (0..world).map(|r| r / per_node).collect(),
        addrs: listeners.iter().map(|l| l.local_addr().unwrap()).collect(),
    };
    let mut per: Vec<Vec<LocalTransport>> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(n, l)| {
                let layout = &layout;
                s.spawn(move || connect(layout, n, l, timeout).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    per.iter_mut().flat_map(std::mem::take).collect()
}

type MeshFn = fn(usize, Duration) -> Vec<LocalTransport>;

/// Every kind of mesh, by name.
fn meshes() -> [(&'static str, MeshFn); 3] {
    [
        ("local", LocalMesh::new),
        ("tcp", |w, t| tcp_mesh(w, 1, t)),
        ("two nodes", |w, t| tcp_mesh(w, 2, t)),
    ]
}

/// Runs `f(rank, transport)` on one thread per rank of the mesh `make` builds and returns the
/// results in rank order.
fn on_ranks<R: Send>(
    world: usize,
    timeout: Duration,
    make: MeshFn,
    f: impl Fn(usize, &mut dyn Transport) -> R + Sync,
) -> Vec<R> {
    let mut mesh = make(world, timeout);
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
        for (name, make) in meshes() {
            let got = on_ranks(world, Duration::from_secs(10), make, |r, t| {
                let piece =
                    reduce_scatter(t, &g, tag(CommOp::ReduceScatter, 0), &data[r], &bounds)
                        .unwrap();
                all_gather(t, &g, tag(CommOp::AllGather, 0), &piece, &bounds).unwrap()
            });
            for g in got {
                prop_assert_eq!(&g, &want, "{}", name);
            }
        }
    }
}

#[test]
fn small_all_reduces_agree_and_count_bytes() {
    let g = Group {
        ranks: vec![0, 1, 2],
    };
    for (name, make) in meshes() {
        let out = on_ranks(3, Duration::from_secs(10), make, |r, t| {
            let f = all_reduce_f64(t, &g, tag(CommOp::AllReduce, 0), &[r as f64 + 0.5]).unwrap();
            let u = all_reduce_u64(t, &g, tag(CommOp::AllReduce, 1), &[r as u64, 10]).unwrap();
            (f, u, t.bytes().clone())
        });
        for (r, (f, u, bytes)) in out.into_iter().enumerate() {
            assert_eq!(f, vec![4.5], "{name}");
            assert_eq!(u, vec![3, 30], "{name}");
            // Two peers, one f64 and two u64 each, over the link that reaches each peer.
            assert_eq!(bytes.shm + bytes.tcp, 2 * (8 + 16), "{name}");
            let remote = match name {
                "local" => 0,
                "tcp" => 2,
                // Ranks 0 and 1 share node 0; rank 2 is alone on node 1.
                _ => {
                    if r == 2 {
                        2
                    } else {
                        1
                    }
                }
            };
            assert_eq!(bytes.tcp, remote * (8 + 16), "{name} rank {r}");
            assert_eq!(bytes.collective, bytes.shm + bytes.tcp);
            assert_eq!((bytes.dispatch, bytes.combine), (0, 0));
        }
    }
}

#[test]
fn frames_wait_for_their_own_tag() {
    for (name, make) in meshes() {
        let out = on_ranks(2, Duration::from_secs(10), make, |r, t| {
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
        assert_eq!(out[1], vec![vec![1], vec![2]], "{name}");
    }
}

#[test]
fn a_frame_of_an_earlier_step_is_an_error_naming_the_peer_and_step() {
    let step2 = Tag {
        step: 2,
        op: CommOp::AllReduce,
        seq: 0,
    };
    let stale = tag(CommOp::AllGather, 9);
    let current = tag(CommOp::AllReduce, 0);
    for (name, make) in meshes() {
        // The stale frame stashed during step 1, or arriving while rank 1 waits in step 2.
        for stale_first in [true, false] {
            let out = on_ranks(2, Duration::from_secs(10), make, |r, t| {
                if r == 0 {
                    let order = if stale_first {
                        [stale, current]
                    } else {
                        [current, stale]
                    };
                    for tg in order {
                        t.send(1, tg, vec![1]).unwrap();
                    }
                    t.send(1, step2, vec![2]).unwrap();
                    None
                } else {
                    t.recv(0, current).unwrap();
                    t.recv(0, step2).err()
                }
            });
            let err = out[1].as_ref().expect("refused").to_string();
            assert!(
                err.contains("rank 0") && err.contains("step 1") && err.contains("out of step"),
                "{name}, stale first {stale_first}: {err}"
            );
        }
    }
}

#[test]
fn a_silent_peer_times_out_naming_the_peer_and_operation() {
    for (name, make) in meshes() {
        let t0 = Instant::now();
        let out = on_ranks(2, Duration::from_millis(400), make, |r, t| {
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
            "{name}: {err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn a_failing_rank_stops_the_others_and_malformed_frames_are_named() {
    // The abort flag is shared by the ranks of one process.
    let out = on_ranks(3, Duration::from_secs(30), LocalMesh::new, |r, t| match r {
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

#[test]
fn a_peer_that_disappears_mid_exchange_is_named_at_once() {
    // Rank 0 (its own node) sends one frame and goes away; rank 1 waits for a second one.
    let t0 = Instant::now();
    let mut mesh = tcp_mesh(2, 1, Duration::from_secs(30));
    let mut one = mesh.pop().unwrap();
    let mut zero = mesh.pop().unwrap();
    let gone = std::thread::spawn(move || {
        zero.send(1, tag(CommOp::Dispatch, 0), vec![7; 1000])
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(zero);
    });
    assert_eq!(
        one.recv(0, tag(CommOp::Dispatch, 0)).unwrap(),
        vec![7; 1000]
    );
    let out = [None, one.recv(0, tag(CommOp::Combine, 0)).err()];
    gone.join().unwrap();
    let err = out[1].as_ref().expect("failed").to_string();
    assert!(
        err.contains("rank 0") && err.contains("gone away") && err.contains("combine #0"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "not at once");
}

#[test]
fn strangers_and_malformed_bytes_on_the_wire_are_refused() {
    use std::io::Write;
    let listeners: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let layout = MeshLayout {
        mesh_id: 42,
        node_of: vec![0, 1],
        addrs: listeners.iter().map(|l| l.local_addr().unwrap()).collect(),
    };
    // A stranger connects to node 0 first, with another mesh's greeting: ignored.
    let mut stranger = std::net::TcpStream::connect(layout.addrs[0]).unwrap();
    let mut hello = b"SHC1".to_vec();
    hello.extend_from_slice(&7u64.to_le_bytes());
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&0u32.to_le_bytes());
    stranger.write_all(&hello).unwrap();
    let mut it = listeners.into_iter();
    let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
    let (mut a, b) = std::thread::scope(|s| {
        let h0 = s.spawn(|| connect(&layout, 0, l0, Duration::from_secs(10)).unwrap());
        let h1 = s.spawn(|| connect(&layout, 1, l1, Duration::from_secs(10)).unwrap());
        (h0.join().unwrap(), h1.join().unwrap())
    });
    // The mesh formed despite the stranger; frames flow.
    let mut b1 = b.into_iter().next().unwrap();
    b1.send(0, tag(CommOp::AllReduce, 3), vec![1, 2, 3])
        .unwrap();
    assert_eq!(
        a[0].recv(1, tag(CommOp::AllReduce, 3)).unwrap(),
        vec![1, 2, 3]
    );
    // A frame header announcing an unknown operation breaks the link with a reason.
    drop(b1);
    let err = a[0]
        .recv(1, tag(CommOp::AllReduce, 4))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gone away"), "{err}");
    // An unreachable node is named with its address.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let lone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let layout = MeshLayout {
        mesh_id: 1,
        node_of: vec![0, 1],
        addrs: vec![addr, lone.local_addr().unwrap()],
    };
    let err = connect(&layout, 1, lone, Duration::from_millis(300))
        .err()
        .expect("unreachable")
        .to_string();
    assert!(err.contains(&addr.to_string()), "{err}");
}

#[test]
fn garbage_from_a_peer_is_reported_as_a_malformed_link() {
    use std::io::Write;
    // Node 1 is played by hand: it greets correctly, then sends a frame with a bad magic.
    let l0 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let layout = MeshLayout {
        mesh_id: 9,
        node_of: vec![0, 1],
        addrs: vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()],
    };
    let addr0 = layout.addrs[0];
    let fake = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr0).unwrap();
        let mut hello = b"SHC1".to_vec();
        hello.extend_from_slice(&9u64.to_le_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&0u32.to_le_bytes());
        s.write_all(&hello).unwrap();
        s.write_all(&[0xAB; 33]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(l1);
    });
    let mut a = connect(&layout, 0, l0, Duration::from_secs(10)).unwrap();
    let err = a[0]
        .recv(1, tag(CommOp::Dispatch, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("malformed") && err.contains("magic"), "{err}");
    fake.join().unwrap();
}

#[test]
fn the_meshes_of_two_jobs_share_each_nodes_listener() {
    use shoal_worker::comm::tcp::{Acceptor, connect_via};
    let acceptors: Vec<Acceptor> = (0..2)
        .map(|_| Acceptor::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap())
        .collect();
    let addrs: Vec<_> = acceptors.iter().map(Acceptor::local_addr).collect();
    // Two jobs of two ranks on each of the two nodes, connecting at the same time.
    let sums: Vec<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = [(11u64, 0usize), (22, 1), (22, 0), (11, 1)]
            .into_iter()
            .map(|(mesh, node)| {
                let (acceptors, addrs) = (&acceptors, &addrs);
                s.spawn(move || {
                    let layout = MeshLayout {
                        mesh_id: mesh,
                        node_of: vec![0, 0, 1, 1],
                        addrs: addrs.clone(),
                    };
                    let eps = connect_via(&layout, node, &acceptors[node], Duration::from_secs(30))
                        .unwrap();
                    std::thread::scope(|s| {
                        let hs: Vec<_> = eps
                            .into_iter()
                            .map(|mut t| {
                                s.spawn(move || {
                                    let g = Group {
                                        ranks: (0..4).collect(),
                                    };
                                    let v = [mesh * 100 + t.rank() as u64];
                                    all_reduce_u64(&mut t, &g, tag(CommOp::AllReduce, 0), &v)
                                        .unwrap()[0]
                                })
                            })
                            .collect();
                        hs.into_iter().map(|h| h.join().unwrap()).collect()
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (sum, mesh) in sums.iter().zip([11u64, 22, 22, 11]) {
        assert_eq!(sum, &vec![4 * mesh * 100 + 6; 2], "mesh {mesh}");
    }
}
