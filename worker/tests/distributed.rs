//! Trainers whose data- and expert-parallel ranks live in different "processes" (here threads
//! that share nothing but TCP connections): the same losses as one rank, and one consolidated
//! checkpoint written by the node holding rank 0.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::net::TcpListener;
use std::time::Duration;

mod common;

use common::{batcher, opts, small_cfg as cfg};
use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::comm::tcp::{MeshLayout, connect};
use shoal_worker::model::Model;
use shoal_worker::train::{PipelineOptions, StepMetrics, TrainOptions, Trainer};

/// Runs `steps` steps of `o` on `nodes` trainers of `dp / nodes` ranks each, connected over
/// TCP, with the model in `precision`; checkpoints into `ckpt`; returns every node's metrics.
fn distributed_in(
    o: TrainOptions,
    steps: u64,
    nodes: usize,
    ckpt: &std::path::Path,
    precision: Precision,
) -> Vec<Vec<StepMetrics>> {
    distributed_model(o, steps, nodes, ckpt, precision, &cfg())
}

/// [`distributed_in`] with the model `model_cfg`.
fn distributed_model(
    o: TrainOptions,
    steps: u64,
    nodes: usize,
    ckpt: &std::path::Path,
    precision: Precision,
    model_cfg: &ModelConfig,
) -> Vec<Vec<StepMetrics>> {
    // One device per pipeline rank of each data-parallel rank, stage-major over the nodes.
    let world = o.dp * o.pipeline.as_ref().map_or(1, |p| p.pp);
    let listeners: Vec<TcpListener> = (0..nodes)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let layout = MeshLayout {
        mesh_id: 77,
        node_of: (0..world).map(|r| r * nodes / world).collect(),
        addrs: listeners.iter().map(|l| l.local_addr().unwrap()).collect(),
    };
    std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(n, l)| {
                let (layout, o) = (&layout, o.clone());
                s.spawn(move || {
                    let mesh = connect(layout, n, l, Duration::from_secs(30)).unwrap();
                    let model = Model::<f32>::new(model_cfg, precision, 3).unwrap();
                    let mut t = Trainer::new_on(model, batcher(3), o, Some(mesh)).unwrap();
                    let m: Vec<StepMetrics> = (0..steps).map(|_| t.train_step().unwrap()).collect();
                    t.save_checkpoint(ckpt).unwrap();
                    m
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn ranks_on_two_nodes_match_one_rank_and_write_one_checkpoint() {
    for (pp, dp, ep, schedule) in [
        (1, 2, 1, ""),
        (1, 2, 2, ""),
        (1, 4, 2, ""),
        // An expert-parallel group across both nodes: hierarchical dispatch.
        (1, 4, 4, ""),
        // Pipeline stages on different nodes: activations and gradients cross over TCP.
        (2, 1, 1, "1f1b"),
        (2, 2, 1, "zb1p"),
        // The main job's shape: each stage's expert-parallel group inside a node.
        (2, 2, 2, "dualpipe"),
        // The V: four stages over two pipeline ranks, turning on the second node.
        (2, 2, 2, "dualpipev"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        // DualPipe and DualPipeV need at least 2 x pp micro-batches per rank; DualPipeV cuts
        // the model into 2 x pp stages, so its model has four layers.
        let dual = schedule.starts_with("dualpipe");
        let micro = if dual { 4 } else { 4 / dp };
        let model_cfg = ModelConfig {
            num_hidden_layers: if schedule == "dualpipev" {
                4
            } else {
                cfg().num_hidden_layers
            },
            ..cfg()
        };
        let mut o = opts(Precision::Fp32, 4, dp, ep, micro);
        if pp > 1 {
            o.pipeline = Some(PipelineOptions {
                pp,
                schedule: schedule.into(),
                overlap: true,
            });
        }
        let runs = distributed_model(o, 3, 2, &ckpt, Precision::Fp32, &model_cfg);
        let model = Model::<f32>::new(&model_cfg, Precision::Fp32, 3).unwrap();
        let mut one = Trainer::new(model, batcher(3), opts(Precision::Fp32, 4, 1, 1, 4)).unwrap();
        let want: Vec<StepMetrics> = (0..3).map(|_| one.train_step().unwrap()).collect();
        for (node, run) in runs.iter().enumerate() {
            for (w, g) in want.iter().zip(run) {
                assert!(
                    ((g.loss - w.loss) / w.loss).abs() < 1e-5,
                    "pp {pp} dp {dp} ep {ep} node {node} step {}: {} against {}",
                    w.step,
                    g.loss,
                    w.loss
                );
                assert_eq!(g.max_vio, w.max_vio, "pp {pp} dp {dp} ep {ep}: loads");
                // Every node crossed the network.
                assert!(
                    g.comm.tcp > 0,
                    "pp {pp} dp {dp} ep {ep} node {node}: {:?}",
                    g.comm
                );
                if pp > 1 {
                    assert!(g.comm.pipeline > 0, "pp {pp}: {:?}", g.comm);
                }
            }
            for (a, b) in run.iter().zip(&runs[0]) {
                assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm), "nodes agree");
                // Every node reports the whole job's traffic and communication times.
                assert_eq!(a.comm, b.comm, "pp {pp} dp {dp} ep {ep}: bytes");
                assert_eq!((a.exposed_comm_s, a.wire_s), (b.exposed_comm_s, b.wire_s));
                // The network writers sent in the background; the devices waited some.
                assert!(a.wire_s > 0.0 && a.exposed_comm_s > 0.0, "{a:?}");
            }
        }
        // Node 0 wrote one checkpoint with every expert: one rank resumes from it and takes the
        // same fourth step as the single-rank run.
        let state = Trainer::read_state(&ckpt).unwrap();
        assert_eq!(state.step, 3);
        let o = TrainOptions {
            dp: 1,
            ep: 1,
            micro_batches: 4,
            steps: 4,
            pipeline: None,
            ..state.options
        };
        let mut resumed = Trainer::resume(&ckpt, batcher(3), o).unwrap();
        let got = resumed.train_step().unwrap();
        let w = one.train_step().unwrap();
        assert!(
            ((got.loss - w.loss) / w.loss).abs() < 1e-5,
            "pp {pp} dp {dp} ep {ep}: resumed {} against {}",
            got.loss,
            w.loss
        );
    }
}

/// Hierarchical dispatch (each token crosses to another node once, then is forwarded inside
/// it) against every member reached directly, in FP8 on two nodes of two ranks in one
/// expert-parallel group: the same frames arrive, so the losses are bit-identical, and fewer
/// bytes cross the network.
#[test]
fn hierarchical_dispatch_matches_direct_dispatch_and_crosses_the_network_less() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(Precision::Fp8, 4, 4, 4, 1);
    let run = |o: TrainOptions, name: &str| {
        let runs = distributed_in(o, 2, 2, &dir.path().join(name), Precision::Fp8);
        runs.into_iter().next().unwrap()
    };
    let hier = run(o.clone(), "hier");
    o.direct_dispatch = true;
    let direct = run(o, "direct");
    for (h, d) in hier.iter().zip(&direct) {
        eprintln!(
            "step {}: network dispatch {} (hierarchical) vs {} (direct), combine {} vs {}",
            h.step,
            h.comm.tcp_dispatch,
            d.comm.tcp_dispatch,
            h.comm.tcp_combine,
            d.comm.tcp_combine
        );
        assert_eq!(h.loss, d.loss, "step {}", h.step);
        assert_eq!(h.max_vio, d.max_vio, "step {}", h.step);
        // The same collectives; dispatch crosses less, combine the same rows in fewer messages.
        assert_eq!(h.comm.collective, d.comm.collective);
        assert!(
            h.comm.tcp_dispatch < d.comm.tcp_dispatch && h.comm.tcp < d.comm.tcp,
            "step {}: hierarchical {:?}, direct {:?}",
            h.step,
            h.comm,
            d.comm
        );
    }
}

/// Node-limited routing on real shards: with each routing group's experts on one node (8
/// experts in 4 groups over 4 nodes of one expert-parallel member each) and top-4 routing, a
/// token limited to `topk_group = 2` groups reaches at most 2 other nodes; unlimited, some reach
/// more.
#[test]
fn node_limited_routing_keeps_each_token_on_at_most_m_nodes() {
    use shoal_worker::comm::transport::LocalMesh;
    let most = |topk_group: usize| {
        let mut c = cfg();
        c.num_experts_per_tok = 4;
        c.topk_group = topk_group;
        let mesh = LocalMesh::with_nodes(&[0, 1, 2, 3], Duration::from_secs(60));
        let model = Model::<f32>::new(&c, Precision::Fp32, 5).unwrap();
        let mut t = Trainer::new_on(
            model,
            batcher(5),
            opts(Precision::Fp32, 2, 4, 4, 1),
            Some(mesh),
        )
        .unwrap();
        (0..2)
            .map(|_| t.train_step().unwrap().max_target_nodes)
            .max()
            .unwrap()
    };
    let limited = most(2);
    assert!((1..=2).contains(&limited), "{limited}");
    let free = most(4);
    eprintln!("most other nodes per token: {limited} with topk_group 2, {free} unlimited");
    assert!(free > 2, "{free}");
}
