//! `shoal bench comm`: the expert-parallel exchange (dispatch then combine, as a MoE layer runs
//! it: FP8 token rows with their routes out, BF16 rows back) between ranks of one node (the
//! in-process transport) against a plain memory copy of the same bytes, and between nodes (the
//! TCP transport over loopback) against raw TCP loopback throughput; then training tokens/s of
//! the tiny model with data and expert parallelism against one rank. Peers are measured in the
//! same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use shoal_kernels::Tensor;
use shoal_kernels::ops::linear::Precision;
use shoal_worker::comm::expert::EpLink;
use shoal_worker::comm::tcp::{MeshLayout, connect};
use shoal_worker::comm::transport::{LocalMesh, LocalTransport, Transport};
use shoal_worker::comm::wire::{CombineFrame, DispatchFrame, RowCodec};
use shoal_worker::data::{Batcher, DataSpec, TokenSource};
use shoal_worker::model::Model;
use shoal_worker::model::ep::{ExchangePhase, ExpertExchange};
use shoal_worker::train::{TrainOptions, Trainer};

use super::median;

/// Options of `shoal bench comm`.
#[derive(Debug, Clone, clap::Args)]
pub struct CommBenchArgs {
    /// Tokens per rank and exchange.
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Hidden size of the token rows.
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    /// Routed experts (spread evenly over the two ranks).
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 8)]
    pub topk: usize,
    /// Timed exchanges per transport (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Training steps timed per configuration (after one warm-up step); 0 skips training.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Exchange {
    transport: &'static str,
    /// Bytes one rank sends to the other per exchange (dispatch + combine).
    bytes_per_rank: u64,
    /// Median seconds of one exchange (both ranks, dispatch then combine: frames cut out of the
    /// quantized tokens, exchanged, checked and decoded; outputs encoded in BF16, exchanged,
    /// checked and added into the tokens' rows).
    seconds: f64,
    /// Bytes per second each rank moved.
    gbps: f64,
    /// The peer: a memory copy (in a node) or raw TCP loopback (across nodes), GB/s per rank.
    peer_gbps: f64,
    /// `gbps / peer_gbps`.
    ratio: f64,
    /// Median seconds of the quantization before dispatch (E4M3, 1x128 tiles, once per token).
    quantize_seconds: f64,
    /// The ratio counting the quantization as part of the exchange.
    ratio_with_quantize: f64,
}

impl Exchange {
    fn of(transport: &'static str, t: &ExchangeTimes, peer_gbps: f64) -> Self {
        let gbps = t.bytes as f64 / t.exchange / 1e9;
        Self {
            transport,
            bytes_per_rank: t.bytes,
            seconds: t.exchange,
            gbps,
            peer_gbps,
            ratio: gbps / peer_gbps,
            quantize_seconds: t.quantize,
            ratio_with_quantize: t.bytes as f64 / (t.exchange + t.quantize) / 1e9 / peer_gbps,
        }
    }
}

#[derive(Debug, Serialize)]
struct TrainRow {
    shape: &'static str,
    tokens_per_s: f64,
    vs_single: f64,
    bytes_per_step: u64,
    /// MoE dispatch bytes that crossed nodes per step.
    network_dispatch_per_step: u64,
    /// Share of the step a device spent blocked on other devices' frames.
    exposed_comm_share: f64,
    /// Share of the step a device's network writers spent sending, behind its compute.
    wire_share: f64,
}

impl TrainRow {
    fn of(shape: &'static str, t: &Timed, single: f64) -> Self {
        Self {
            shape,
            tokens_per_s: t.tokens_per_s,
            vs_single: t.tokens_per_s / single,
            bytes_per_step: t.bytes,
            network_dispatch_per_step: t.net_dispatch,
            exposed_comm_share: t.exposed,
            wire_share: t.wire,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    cores: usize,
    tokens: usize,
    hidden: usize,
    experts: usize,
    topk: usize,
    /// Dispatch bytes of FP8 rows over BF16 rows for the same tokens (routes included).
    fp8_over_bf16_dispatch: f64,
    exchanges: Vec<Exchange>,
    training: Vec<TrainRow>,
}

/// One rank's tokens and routes: deterministic, each token's experts distinct.
fn workload(a: &CommBenchArgs, rank: usize) -> Result<(Tensor<f32>, Vec<u32>, Vec<f32>)> {
    let (t, h, k, e) = (a.tokens, a.hidden, a.topk, a.experts);
    let x: Vec<f32> = (0..t * h)
        .map(|i| (((i * 2_654_435_761 + rank * 97) % 10_007) as f32 / 10_007.0 - 0.5) * 4.0)
        .collect();
    let mut routes = Vec::with_capacity(t * k);
    for tok in 0..t {
        let start = (tok * 7 + rank * 13) % e;
        routes.extend((0..k).map(|j| ((start + j * (e / k).max(1)) % e) as u32));
    }
    let weights = vec![0.25f32; t * k];
    Ok((Tensor::new(vec![t, h], x)?, routes, weights))
}

/// One rank's side of a MoE layer's exchange.
struct Work {
    x: Tensor<f32>,
    routes: Vec<u32>,
    weights: Vec<f32>,
    /// Stand-ins for the experts' outputs (the combine's input): one row per token.
    outputs: Tensor<f32>,
    /// `0..tokens`, to cut the first rows of `outputs`.
    first: Vec<usize>,
}

impl Work {
    fn new(a: &CommBenchArgs, rank: usize) -> Result<Self> {
        let (x, routes, weights) = workload(a, rank)?;
        let outputs = x.map(|v| v * 0.5);
        Ok(Self {
            x,
            routes,
            weights,
            outputs,
            first: (0..a.tokens).collect(),
        })
    }
}

/// The layer's tokens quantized once (E4M3, 1x128 tiles), with their routes: what the layer
/// does before dispatch (and what DeepEP's dispatch takes as input).
fn quantize(a: &CommBenchArgs, w: &Work) -> Result<DispatchFrame> {
    Ok(DispatchFrame::encode_rows(
        &w.x,
        a.topk,
        w.routes.clone(),
        w.weights.clone(),
        RowCodec::Fp8 { pow2_scales: false },
    )?)
}

/// Dispatch then combine through `ex` as a MoE layer runs them, with the library's code (no
/// expert compute): each other member's frame cut out of the quantized tokens, exchanged,
/// checked and decoded to the FP8 rows the experts take (this member's own rows selected in
/// memory); then the experts' outputs back in BF16, exchanged, checked and added into the
/// tokens' rows (its own rounded to BF16 in memory).
fn exchange_once(
    ex: &EpLink<'_>,
    a: &CommBenchArgs,
    w: &Work,
    quantized: &DispatchFrame,
    y: &mut [f32],
) -> Result<()> {
    let (k, per, h) = (a.topk, a.experts / 2, a.hidden);
    let mut sent: Vec<Vec<usize>> = vec![Vec::new(); 2];
    for tok in 0..w.x.rows() {
        let r = &w.routes[tok * k..(tok + 1) * k];
        for (q, rows) in sent.iter_mut().enumerate() {
            if r.iter().any(|&j| j as usize / per == q) {
                rows.push(tok);
            }
        }
    }
    // As the layer does, this member's own rows stay here (an empty frame stands in).
    let me = ex.position();
    let mut lists = sent.clone();
    lists[me].clear();
    let got = ex.dispatch(&lists, &mut |rows| quantized.encode_selected(rows))?;
    let received = got
        .iter()
        .enumerate()
        .map(|(s, b)| match s == me {
            true => Ok(quantized.select(&sent[me])?.tokens.rows()),
            false => Ok(DispatchFrame::decode(b, a.experts)?.tokens.rows()),
        })
        .collect::<Result<Vec<_>>>()?;
    let back = received
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let n = if s == me { 0 } else { n };
            Ok(CombineFrame::encode_f32_selected(
                &w.outputs,
                &w.first[..n],
                false,
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    let combined = ex.exchange(ExchangePhase::Combine, back)?;
    for (q, b) in combined.iter().enumerate() {
        if q == me {
            let n = sent[me].len();
            let own = Tensor::new(vec![n, h], w.outputs.data()[..n * h].to_vec())?;
            let part = CombineFrame::round_trip(&own, false);
            for (i, &t) in sent[me].iter().enumerate() {
                let src = &part.data()[i * h..(i + 1) * h];
                for (o, v) in y[t * h..(t + 1) * h].iter_mut().zip(src) {
                    *o += v;
                }
            }
            continue;
        }
        let view = CombineFrame::view(b)?;
        if view.rows != sent[q].len() || view.cols != h {
            bail!("member {q} combined {} x {}", view.rows, view.cols);
        }
        for (i, &t) in sent[q].iter().enumerate() {
            view.add_row(i, &mut y[t * h..(t + 1) * h], |o, v| *o += v);
        }
    }
    Ok(())
}

/// What timing the exchange on two endpoints measured (medians over iterations, the slower
/// rank's time each).
struct ExchangeTimes {
    /// Seconds of dispatch and combine.
    exchange: f64,
    /// Seconds of the quantization before dispatch.
    quantize: f64,
    /// Bytes one rank sent to the other per exchange.
    bytes: u64,
}

/// Times `iters` exchanges on two endpoints.
fn time_exchanges(a: &CommBenchArgs, mut mesh: Vec<LocalTransport>) -> Result<ExchangeTimes> {
    let works = [Work::new(a, 0)?, Work::new(a, 1)?];
    type PerRank = (Vec<f64>, Vec<f64>, u64);
    let results: Vec<Result<PerRank>> = std::thread::scope(|s| {
        let hs: Vec<_> = mesh
            .iter_mut()
            .zip(&works)
            .enumerate()
            .map(|(r, (t, work))| {
                s.spawn(move || -> Result<PerRank> {
                    let (mut times, mut quant) = (Vec::new(), Vec::new());
                    let mut bytes = 0;
                    let mut y = vec![0f32; a.tokens * a.hidden];
                    for i in 0..=a.iters {
                        let t0 = Instant::now();
                        let quantized = quantize(a, work)?;
                        let q = t0.elapsed().as_secs_f64();
                        let before = t.bytes().total();
                        let t0 = Instant::now();
                        {
                            let link =
                                EpLink::new(t as &mut dyn Transport, vec![0, 1], r, i as u64 + 1)?;
                            exchange_once(&link, a, work, &quantized, &mut y)?;
                        }
                        if i > 0 {
                            times.push(t0.elapsed().as_secs_f64());
                            quant.push(q);
                            bytes = t.bytes().total() - before;
                        }
                    }
                    std::hint::black_box(&y);
                    Ok((times, quant, bytes))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))
            })
            .collect()
    });
    let mut per_iter = vec![0f64; a.iters];
    let mut per_quant = vec![0f64; a.iters];
    let mut bytes = 0;
    for r in results {
        let (times, quant, b) = r?;
        for (m, t) in per_iter.iter_mut().zip(times) {
            *m = m.max(t);
        }
        for (m, t) in per_quant.iter_mut().zip(quant) {
            *m = m.max(t);
        }
        bytes = bytes.max(b);
    }
    Ok(ExchangeTimes {
        exchange: median(per_iter),
        quantize: median(per_quant),
        bytes,
    })
}

/// GB/s of two threads each copying `bytes` between buffers of their own (median of `iters`).
fn memcpy_gbps(bytes: usize, iters: usize) -> f64 {
    let per: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(move || {
                    let src = vec![1u8; bytes];
                    let mut dst = vec![0u8; bytes];
                    let mut rates = Vec::new();
                    for i in 0..=iters {
                        let t0 = Instant::now();
                        dst.copy_from_slice(std::hint::black_box(&src));
                        std::hint::black_box(&dst);
                        if i > 0 {
                            rates.push(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9);
                        }
                    }
                    median(rates)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(f64::NAN))
            .collect()
    });
    per.iter().copied().fold(f64::INFINITY, f64::min)
}

/// GB/s each way of two loopback TCP connections' ends sending `bytes` to each other at once.
fn raw_tcp_gbps(bytes: usize, iters: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let a = TcpStream::connect(addr)?;
    let (b, _) = listener.accept()?;
    for s in [&a, &b] {
        s.set_nodelay(true)?;
    }
    let mut rates = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let mut hs = Vec::new();
            for sock in [&a, &b] {
                let (mut w, mut r) = (sock.try_clone()?, sock.try_clone()?);
                hs.push(s.spawn(move || -> std::io::Result<()> {
                    let buf = vec![7u8; 1 << 20];
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(buf.len());
                        w.write_all(&buf[..n])?;
                        left -= n;
                    }
                    Ok(())
                }));
                hs.push(s.spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(buf.len());
                        r.read_exact(&mut buf[..n])?;
                        left -= n;
                    }
                    Ok(())
                }));
            }
            for h in hs {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a socket thread panicked"))??;
            }
            Ok(())
        })?;
        if i > 0 {
            rates.push(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9);
        }
    }
    Ok(median(rates))
}

fn tcp_pair(timeout: Duration) -> Result<Vec<LocalTransport>> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    let layout = MeshLayout {
        mesh_id: 0xbe4c,
        node_of: vec![0, 1],
        addrs: vec![listeners[0].local_addr()?, listeners[1].local_addr()?],
    };
    let [l0, l1] = listeners;
    let (a, b) = std::thread::scope(|s| {
        let h = s.spawn(|| connect(&layout, 1, l1, timeout));
        let a = connect(&layout, 0, l0, timeout);
        (
            a,
            h.join()
                .unwrap_or_else(|_| Err(shoal_worker::WorkerError::invalid("mesh", "panicked"))),
        )
    });
    let mut out = a?;
    out.extend(b?);
    Ok(out)
}

/// A TCP mesh over loopback of `node_of.len()` ranks on the nodes `node_of` names (numbered from
/// 0): each node's endpoints, in node order.
fn tcp_nodes(node_of: &[usize], timeout: Duration) -> Result<Vec<Vec<LocalTransport>>> {
    let nodes = node_of.iter().copied().max().map_or(0, |n| n + 1);
    let listeners = (0..nodes)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let layout = MeshLayout {
        mesh_id: 0xbe4d,
        node_of: node_of.to_vec(),
        addrs: listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<Vec<_>>>()?,
    };
    let layout = &layout;
    std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(n, l)| s.spawn(move || connect(layout, n, l, timeout)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(shoal_worker::WorkerError::invalid("mesh", "panicked")))
                    .map_err(anyhow::Error::from)
            })
            .collect()
    })
}

/// A training shape of the tiny model.
struct Shape {
    dp: usize,
    ep: usize,
    /// Pipeline ranks and schedule.
    pipeline: Option<(usize, &'static str)>,
    direct_dispatch: bool,
    /// Run DualPipe's overlapped pairs on two threads at once.
    overlap: bool,
}

fn tiny_trainer(dp: usize, ep: usize, mesh: Option<Vec<LocalTransport>>) -> Result<Trainer> {
    shaped_trainer(
        &Shape {
            dp,
            ep,
            pipeline: None,
            direct_dispatch: false,
            overlap: true,
        },
        mesh,
    )
}

fn shaped_trainer(shape: &Shape, mesh: Option<Vec<LocalTransport>>) -> Result<Trainer> {
    let (dp, ep) = (shape.dp, shape.ep);
    let cfg = shoal_spec::ModelConfig::tiny();
    let model = Model::<f32>::new(&cfg, Precision::Fp8, 1)?;
    let source = TokenSource::load(
        &DataSpec::Synthetic {
            seed: 1,
            tokens: 1 << 20,
        },
        cfg.vocab_size,
    )?;
    let batcher = Batcher::new(source, 256, 8, 1)?;
    let mut o = TrainOptions::defaults(100, Precision::Fp8);
    o.dp = dp;
    o.ep = ep;
    o.micro_batches = 8 / dp;
    o.direct_dispatch = shape.direct_dispatch;
    if let Some((pp, schedule)) = shape.pipeline {
        o.pipeline = Some(shoal_worker::train::PipelineOptions {
            pp,
            schedule: schedule.into(),
            overlap: shape.overlap,
        });
    }
    Ok(Trainer::new_on(model, batcher, o, mesh)?)
}

/// What a training shape measured.
struct Timed {
    tokens_per_s: f64,
    bytes: u64,
    net_dispatch: u64,
    /// Median share of the step a device spent blocked on peers' frames.
    exposed: f64,
    /// Median share of the step a device's network writers were sending.
    wire: f64,
}

/// Median tokens/s, bytes per step, network dispatch bytes per step and communication shares of
/// `steps` steps (after a warm-up) of every trainer, stepping them together (they are the
/// processes of one job).
fn time_training(mut trainers: Vec<Trainer>, steps: usize) -> Result<Timed> {
    let mut rates = Vec::new();
    let mut bytes = 0;
    let mut net_dispatch = 0;
    let (mut exposed, mut wire) = (Vec::new(), Vec::new());
    for i in 0..=steps {
        let results: Vec<shoal_worker::Result<shoal_worker::train::StepMetrics>> =
            std::thread::scope(|s| {
                let hs: Vec<_> = trainers
                    .iter_mut()
                    .map(|t| s.spawn(move || t.train_step()))
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(shoal_worker::WorkerError::invalid("bench", "panicked"))
                        })
                    })
                    .collect()
            });
        let mut step_s: f64 = 0.0;
        let mut tokens = 0;
        let (mut b, mut nd, mut ex, mut wi) = (0, 0, 0.0, 0.0);
        for (j, r) in results.into_iter().enumerate() {
            let m = r?;
            step_s = step_s.max(m.seconds);
            tokens = m.tokens;
            b += m.bytes_sent;
            // Every process reports the whole job's mesh traffic and times.
            if j == 0 {
                b += m.comm.total();
                nd = m.comm.tcp_dispatch;
                (ex, wi) = (m.exposed_comm_s, m.wire_s);
            }
        }
        if i > 0 {
            rates.push(tokens as f64 / step_s);
            exposed.push(ex / step_s);
            wire.push(wi / step_s);
            bytes = b;
            net_dispatch = nd;
        }
    }
    Ok(Timed {
        tokens_per_s: median(rates),
        bytes,
        net_dispatch,
        exposed: median(exposed),
        wire: median(wire),
    })
}

/// Runs the benchmark.
pub fn run(a: &CommBenchArgs) -> Result<()> {
    if a.tokens == 0 || a.hidden == 0 || a.iters == 0 {
        bail!("--tokens, --hidden and --iters must be at least 1");
    }
    if a.topk == 0 || a.experts < 2 || !a.experts.is_multiple_of(2) || a.topk > a.experts {
        bail!("--experts must be even and at least 2, --topk in 1..=experts");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // FP8 against BF16 dispatch frames for the same rows.
    let (x, routes, weights) = workload(a, 0)?;
    let fp8 = DispatchFrame::encode_rows(
        &x,
        a.topk,
        routes.clone(),
        weights.clone(),
        RowCodec::Fp8 { pow2_scales: false },
    )?
    .encode()
    .len();
    let bf16 = DispatchFrame::encode_rows(&x, a.topk, routes, weights, RowCodec::Bf16)?
        .encode()
        .len();
    drop(x);

    let timeout = Duration::from_secs(120);
    let mut exchanges = Vec::new();
    let t = time_exchanges(a, LocalMesh::new(2, timeout))?;
    let peer = memcpy_gbps(t.bytes as usize, a.iters);
    exchanges.push(Exchange::of("shm (in-process, one node)", &t, peer));
    let t = time_exchanges(a, tcp_pair(timeout).context("a TCP mesh of two nodes")?)?;
    let peer = raw_tcp_gbps(t.bytes as usize, a.iters)?;
    exchanges.push(Exchange::of("tcp (loopback, two nodes)", &t, peer));

    let mut training = Vec::new();
    if a.steps > 0 {
        let one = time_training(vec![tiny_trainer(1, 1, None)?], a.steps)?;
        let single = one.tokens_per_s;
        training.push(TrainRow::of("1 rank", &one, single));
        for (shape, dp, ep) in [("dp 2 (one node)", 2, 1), ("dp 2 ep 2 (one node)", 2, 2)] {
            let t = time_training(vec![tiny_trainer(dp, ep, None)?], a.steps)?;
            training.push(TrainRow::of(shape, &t, single));
        }
        let shapes: [(&'static str, Shape, Vec<usize>); 6] = [
            (
                "dp 2 ep 2 (two nodes over TCP)",
                Shape {
                    dp: 2,
                    ep: 2,
                    pipeline: None,
                    direct_dispatch: false,
                    overlap: true,
                },
                vec![0, 1],
            ),
            (
                "main job: pp 2 dualpipe x dp 2, ep 2 (2 x 2)",
                Shape {
                    dp: 2,
                    ep: 2,
                    pipeline: Some((2, "dualpipe")),
                    direct_dispatch: false,
                    overlap: true,
                },
                vec![0, 0, 1, 1],
            ),
            (
                "same, F&B pairs one after the other (2 x 2)",
                Shape {
                    dp: 2,
                    ep: 2,
                    pipeline: Some((2, "dualpipe")),
                    direct_dispatch: false,
                    overlap: false,
                },
                vec![0, 0, 1, 1],
            ),
            (
                "same shape, 1f1b (2 x 2)",
                Shape {
                    dp: 2,
                    ep: 2,
                    pipeline: Some((2, "1f1b")),
                    direct_dispatch: false,
                    overlap: true,
                },
                vec![0, 0, 1, 1],
            ),
            (
                "dp 4 ep 4, hierarchical dispatch (2 x 2)",
                Shape {
                    dp: 4,
                    ep: 4,
                    pipeline: None,
                    direct_dispatch: false,
                    overlap: true,
                },
                vec![0, 0, 1, 1],
            ),
            (
                "dp 4 ep 4, direct dispatch (2 x 2)",
                Shape {
                    dp: 4,
                    ep: 4,
                    pipeline: None,
                    direct_dispatch: true,
                    overlap: true,
                },
                vec![0, 0, 1, 1],
            ),
        ];
        for (name, shape, node_of) in shapes {
            let trainers = tcp_nodes(&node_of, timeout)?
                .into_iter()
                .map(|mesh| shaped_trainer(&shape, Some(mesh)))
                .collect::<Result<Vec<_>>>()?;
            let t = time_training(trainers, a.steps)?;
            training.push(TrainRow::of(name, &t, single));
        }
    }

    let report = Report {
        cores,
        tokens: a.tokens,
        hidden: a.hidden,
        experts: a.experts,
        topk: a.topk,
        fp8_over_bf16_dispatch: fp8 as f64 / bf16 as f64,
        exchanges,
        training,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "expert-parallel exchange: 2 ranks x {} tokens x {} hidden, top-{} of {} experts ({cores} cores)",
        a.tokens, a.hidden, a.topk, a.experts
    );
    println!(
        "FP8 dispatch carries {:.3} of BF16's bytes (routes included)",
        report.fp8_over_bf16_dispatch
    );
    for e in &report.exchanges {
        println!(
            "  {:<28} {:>7.1} MB/rank in {:>7.1} ms: {:>6.2} GB/s, peer {:>6.2} GB/s, ratio {:.2} \
             (goal >= {}) | with the quantization before it (+{:.1} ms): ratio {:.2}",
            e.transport,
            e.bytes_per_rank as f64 / 1e6,
            e.seconds * 1e3,
            e.gbps,
            e.peer_gbps,
            e.ratio,
            if e.transport.starts_with("shm") {
                "0.5"
            } else {
                "0.7"
            },
            e.quantize_seconds * 1e3,
            e.ratio_with_quantize
        );
    }
    if !report.training.is_empty() {
        println!("tiny model, fp8, 8 x 256 tokens per step:");
        for t in &report.training {
            println!(
                "  {:<44} {:>6.0} tok/s {:.2}x  {:>6.1} MB/step  net dispatch {:>5.2} MB  blocked {:>3.0}%  sending {:>3.0}%",
                t.shape,
                t.tokens_per_s,
                t.vs_single,
                t.bytes_per_step as f64 / 1e6,
                t.network_dispatch_per_step as f64 / 1e6,
                100.0 * t.exposed_comm_share,
                100.0 * t.wire_share
            );
        }
    }
    Ok(())
}
