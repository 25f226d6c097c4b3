//! Expert-parallel dispatch and combine over the warp-specialized two-hop kernel (dispatch.cu),
//! and the CPU transport it must agree with.
//!
//! The layout (where each row lands) is computed on the host from the routing, source-major, so
//! a transfer's result does not depend on timing. [`Gpu::two_hop`] runs several ranks on one GPU
//! through exactly the protocol ranks on several GPUs use (each rank's rings are its own buffer);
//! [`two_hop_across`] places ranks on several GPUs of the process, their rings in their own GPU's
//! memory and reached by the others through peer access (NVLink where the GPUs have it).

use cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use super::device::{Gpu, cuda_err};
use super::launch::launch;
use super::source::DISPATCH;
pub use crate::two_hop::{
    Geometry, Layout, Received, Routing, Rows, Transfer, TransferConfig, TwoHopRank, check_inputs,
    cpu_combine_reduce, cpu_transfer,
};
use crate::{KernelError, Result};

/// A device-side copy of [`TwoHopRank`] (the orphan rule keeps the cudarc traits off the host type).
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct DevRank(TwoHopRank);

// SAFETY: `TwoHopRank` is `repr(C)` plain old data matching the CUDA struct (pointers as u64).
unsafe impl DeviceRepr for DevRank {}
// SAFETY: all fields are integers, for which all-zero bits are valid.
unsafe impl ValidAsZeroBits for DevRank {}

/// Device buffers of one rank for one transfer.
struct RankBufs {
    in0: CudaSlice<u8>,
    in1: CudaSlice<u8>,
    dest: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    out0: CudaSlice<u8>,
    out1: CudaSlice<u8>,
    meta: CudaSlice<i32>,
    rings: CudaSlice<u8>,
    rows: usize,
}

impl Gpu {
    /// Moves rows between `routing.ranks` ranks that all live on this GPU, through the
    /// warp-specialized two-hop kernel: `combine == false` routes dispatch-style (inter-node hop
    /// first), `true` combine-style (intra-node hop first). The result equals [`cpu_transfer`].
    pub fn two_hop(
        &self,
        routing: &Routing,
        layout: &Layout,
        inputs: &[Rows],
        parts: (usize, usize),
        combine: bool,
        cfg: TransferConfig,
    ) -> Result<Transfer> {
        two_hop_across(
            &[self],
            &[routing.ranks],
            routing,
            layout,
            inputs,
            parts,
            combine,
            cfg,
        )
    }
}

/// Lets `a`'s kernels read and write `b`'s memory (peer access; NVLink or PCIe). Nothing to do for
/// one device; an error naming both when the hardware cannot.
fn enable_peer_access(a: &Gpu, b: &Gpu) -> Result<()> {
    use cudarc::driver::sys::{CUresult, cuCtxEnablePeerAccess};
    let (ia, ib) = (a.info(), b.info());
    if ia.ordinal == ib.ordinal {
        return Ok(());
    }
    if !ia.p2p_peers.contains(&ib.ordinal) {
        return Err(KernelError::invalid(
            "dispatch.placement",
            format!(
                "GPU {} cannot reach GPU {}'s memory directly (no peer-to-peer access between them)",
                ia.ordinal, ib.ordinal
            ),
        ));
    }
    let what = format!("GPU {} -> GPU {}", ia.ordinal, ib.ordinal);
    a.context()
        .bind_to_thread()
        .map_err(cuda_err("enable_peer_access", &what))?;
    // SAFETY: both contexts are alive (held by the `Gpu`s); the call only maps `b`'s memory
    // into `a`'s context, which is current on this thread.
    let r = unsafe { cuCtxEnablePeerAccess(b.context().cu_ctx(), 0) };
    match r {
        CUresult::CUDA_SUCCESS | CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
        other => Err(KernelError::Cuda {
            kernel: "enable_peer_access",
            shapes: what,
            reason: format!("{other:?}"),
        }),
    }
}

/// The checks every transfer makes before touching a GPU; returns each rank's rows and a
/// description of the transfer for errors.
fn check_transfer(
    routing: &Routing,
    layout: &Layout,
    (len0, len1): (usize, usize),
    cfg: &TransferConfig,
) -> Result<(Vec<usize>, String)> {
    let rows = routing.validate()?;
    if len0 % 4 != 0 || len1 % 4 != 0 || len0 == 0 {
        return Err(KernelError::invalid(
            "dispatch.row_bytes",
            format!("parts of {len0} and {len1} bytes must be non-empty multiples of 4"),
        ));
    }
    layout.validate(routing)?;
    if cfg.sms == 0 || cfg.slots == 0 || cfg.receivers == 0 {
        return Err(KernelError::invalid(
            "dispatch.config",
            "sms, slots and receivers must be at least 1",
        ));
    }
    let shapes = format!(
        "{} ranks in nodes of {}, rows {rows:?}, {len0} + {len1} bytes per row, {} SMs per rank",
        routing.ranks, routing.local, cfg.sms
    );
    Ok((rows, shapes))
}

/// Refuses, by name, `ranks` ranks' blocks that cannot all be resident on `g` at once (the
/// protocol needs every block running).
fn check_resident(g: &Gpu, ranks: usize, cfg: &TransferConfig, shapes: &str) -> Result<()> {
    let threads = block_threads(cfg);
    let f = g.function(&DISPATCH, "two_hop")?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
        .map_err(cuda_err("two_hop", shapes))? as usize;
    let blocks = cfg.sms * ranks;
    if blocks > per_sm * g.info().sms as usize {
        return Err(KernelError::invalid(
            "dispatch.sms",
            format!(
                "{blocks} blocks ({} SMs x {ranks} ranks) cannot all be resident on GPU {}'s {} SMs ({per_sm} per SM); the protocol needs every block running at once",
                cfg.sms,
                g.info().ordinal,
                g.info().sms
            ),
        ));
    }
    Ok(())
}

/// Threads per block: the sender and forwarder warps and the receivers.
fn block_threads(cfg: &TransferConfig) -> u32 {
    32 * (2 + cfg.receivers) as u32
}

/// Rank `s`'s buffers on its GPU; its rings too unless they live elsewhere (`rings: false`).
#[allow(clippy::too_many_arguments)]
fn rank_buffers(
    gpu: &Gpu,
    s: usize,
    routing: &Routing,
    layout: &Layout,
    input: &Rows,
    (len0, len1): (usize, usize),
    rows: usize,
    ring_bytes: usize,
) -> Result<RankBufs> {
    let n = layout.received[s];
    Ok(RankBufs {
        in0: gpu.upload("dispatch.input", &input.part0)?,
        in1: gpu.upload("dispatch.input", &input.part1)?,
        dest: gpu.upload("dispatch.dest", &routing.dest[s])?,
        pos: gpu.upload("dispatch.pos", &layout.pos[s])?,
        out0: gpu.zeros("dispatch.output", n * len0)?,
        out1: gpu.zeros("dispatch.output", n * len1)?,
        meta: gpu.zeros("dispatch.output", n * 3)?,
        rings: gpu.zeros("dispatch.rings", ring_bytes)?,
        rows,
    })
}

/// The kernel's descriptor of a rank held here, its rings at `rings` (its own buffer, or shared
/// memory).
fn descriptor(b: &RankBufs, gpu: &Gpu, rings: Option<u64>) -> DevRank {
    let stream = gpu.stream();
    let p = |s: &CudaSlice<u8>| s.device_ptr(stream).0;
    let q = |s: &CudaSlice<i32>| s.device_ptr(stream).0;
    DevRank(TwoHopRank {
        in0: p(&b.in0),
        in1: p(&b.in1),
        dest: q(&b.dest),
        pos: q(&b.pos),
        rows: b.rows as i32,
        pad: 0,
        out0: p(&b.out0),
        out1: p(&b.out1),
        out_meta: q(&b.meta),
        rings: rings.unwrap_or_else(|| p(&b.rings)),
    })
}

/// Launches the kernel on `g` for ranks `base..base + count` with the descriptor table `desc`.
#[allow(clippy::too_many_arguments)]
fn launch_ranks(
    g: &Gpu,
    desc: &CudaSlice<DevRank>,
    error: &mut CudaSlice<i32>,
    base: usize,
    count: usize,
    routing: &Routing,
    (len0, len1): (usize, usize),
    combine: bool,
    cfg: &TransferConfig,
    shapes: &str,
) -> Result<()> {
    let geo = Geometry::new(routing.ranks, (len0, len1), cfg);
    let (base, nranks, local) = (base as i32, routing.ranks as i32, routing.local as i32);
    let (l0, l1, maxd) = (len0 as i32, len1 as i32, routing.maxd as i32);
    let (slots, sb, rb) = (
        cfg.slots as i32,
        geo.slot_bytes as i32,
        geo.ring_bytes as i64,
    );
    let comb = i32::from(combine);
    let spin = cfg.spin_limit_cycles;
    let lc = LaunchConfig {
        grid_dim: (cfg.sms as u32, count as u32, 1),
        block_dim: (block_threads(cfg), 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(g, DISPATCH, "two_hop", shapes, lc;
        desc, &base, &nranks, &local, &l0, &l1, &maxd, &slots, &sb, &rb, &comb, &spin, error);
    Ok(())
}

/// The kernel's timeout flag on `g`, as an error naming the role that waited.
fn check_error(g: &Gpu, error: &CudaSlice<i32>, cfg: &TransferConfig, shapes: &str) -> Result<()> {
    let e = g.download("dispatch.error", error, 1)?;
    if let Some(&code) = e.first().filter(|&&c| c != 0) {
        let role = match code {
            1 => "a sender or forwarder found a ring full",
            2 => "a forwarder found its inbound rings empty",
            _ => "a receiver found its inbound rings empty",
        };
        return Err(KernelError::Cuda {
            kernel: "two_hop",
            shapes: shapes.to_string(),
            reason: format!(
                "timed out on GPU {}: {role} for {} cycles",
                g.info().ordinal,
                cfg.spin_limit_cycles
            ),
        });
    }
    Ok(())
}

/// What rank `s` received, downloaded.
fn received(gpu: &Gpu, b: &RankBufs, n: usize, (len0, len1): (usize, usize)) -> Result<Received> {
    let meta = gpu.download("dispatch.output", &b.meta, n * 3)?;
    Ok(Received {
        rows: Rows {
            part0: gpu.download("dispatch.output", &b.out0, n * len0)?,
            part1: gpu.download("dispatch.output", &b.out1, n * len1)?,
        },
        meta: meta.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
    })
}

/// [`Gpu::two_hop`] over ranks on several GPUs of this process: `placement[g]` consecutive ranks
/// live on `gpus[g]` (the same GPU may appear more than once). Each rank's rings and outputs are
/// in its own GPU's memory, which the other GPUs reach through peer access (enabled here); every
/// GPU runs one launch for its ranks, and all launches run at once. The result equals
/// [`cpu_transfer`].
#[allow(clippy::too_many_arguments)]
pub fn two_hop_across(
    gpus: &[&Gpu],
    placement: &[usize],
    routing: &Routing,
    layout: &Layout,
    inputs: &[Rows],
    parts: (usize, usize),
    combine: bool,
    cfg: TransferConfig,
) -> Result<Transfer> {
    let (rows, shapes) = check_transfer(routing, layout, parts, &cfg)?;
    crate::two_hop::check_inputs(&rows, inputs, parts.0, parts.1)?;
    if gpus.is_empty()
        || placement.len() != gpus.len()
        || placement.contains(&0)
        || placement.iter().sum::<usize>() != routing.ranks
    {
        return Err(KernelError::invalid(
            "dispatch.placement",
            format!(
                "{placement:?} ranks on {} GPUs: every GPU needs at least one, and they must add up to the {} ranks",
                gpus.len(),
                routing.ranks
            ),
        ));
    }
    let shapes = format!("{shapes}, placement {placement:?}");
    // Every block of every launch must be resident at once: count per physical device.
    let mut per_device: Vec<(usize, usize, &Gpu)> = Vec::new();
    for (g, &n) in gpus.iter().zip(placement) {
        match per_device
            .iter_mut()
            .find(|(o, _, _)| *o == g.info().ordinal)
        {
            Some(e) => e.1 += n,
            None => per_device.push((g.info().ordinal, n, g)),
        }
    }
    for &(_, n, g) in &per_device {
        check_resident(g, n, &cfg, &shapes)?;
    }
    for a in gpus {
        for b in gpus {
            enable_peer_access(a, b)?;
        }
    }
    let geo = Geometry::new(routing.ranks, parts, &cfg);
    // The GPU of each rank.
    let owner: Vec<&Gpu> = gpus
        .iter()
        .zip(placement)
        .flat_map(|(g, &n)| std::iter::repeat_n(*g, n))
        .collect();
    let bufs = owner
        .iter()
        .enumerate()
        .map(|(s, g)| {
            rank_buffers(
                g,
                s,
                routing,
                layout,
                &inputs[s],
                parts,
                rows[s],
                geo.rings_per_rank,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let descs: Vec<DevRank> = bufs
        .iter()
        .zip(&owner)
        .map(|(b, g)| descriptor(b, g, None))
        .collect();
    let mut launches = Vec::with_capacity(gpus.len());
    for g in gpus {
        launches.push((
            g.upload("dispatch.ranks", &descs)?,
            g.zeros::<i32>("dispatch.error", 1)?,
        ));
    }
    for g in gpus {
        g.synchronize("two_hop", "uploads")?;
    }
    let started = std::time::Instant::now();
    let mut base = 0;
    for ((g, &n), (desc, error)) in gpus.iter().zip(placement).zip(launches.iter_mut()) {
        launch_ranks(
            g, desc, error, base, n, routing, parts, combine, &cfg, &shapes,
        )?;
        base += n;
    }
    for g in gpus {
        g.synchronize("two_hop", &shapes)?;
    }
    let kernel_seconds = started.elapsed().as_secs_f64();
    for (g, (_, error)) in gpus.iter().zip(&launches) {
        check_error(g, error, &cfg, &shapes)?;
    }
    let received = bufs
        .iter()
        .zip(&owner)
        .enumerate()
        .map(|(s, (b, g))| received(g, b, layout.received[s], parts))
        .collect::<Result<Vec<_>>>()?;
    Ok(Transfer {
        received,
        kernel_seconds,
    })
}

impl Gpu {
    /// This process's ranks `first..first + inputs.len()` of a transfer whose other ranks run in
    /// other processes (each on its GPU): `rings[s]` is the device address of rank `s`'s inbound
    /// rings ([`Geometry::rings_per_rank`] zeroed bytes), this process's own
    /// ([`super::ipc::SharedBuffer`]) and the others' mapped through CUDA IPC
    /// ([`Gpu::import`]). Every process must launch its part while the others run theirs (a
    /// wait with no progress ends in a timeout error). Returns what the local ranks received.
    /// Rings serve one transfer: zero them, and let every process see that done, before the next.
    #[allow(clippy::too_many_arguments)]
    pub fn two_hop_ranks(
        &self,
        first: usize,
        routing: &Routing,
        layout: &Layout,
        inputs: &[Rows],
        rings: &[u64],
        parts: (usize, usize),
        combine: bool,
        cfg: TransferConfig,
    ) -> Result<Transfer> {
        let (rows, shapes) = check_transfer(routing, layout, parts, &cfg)?;
        let count = inputs.len();
        if count == 0 || first + count > routing.ranks || rings.len() != routing.ranks {
            return Err(KernelError::invalid(
                "dispatch.placement",
                format!(
                    "ranks {first}..{} with {} ring addresses for {} ranks",
                    first + count,
                    rings.len(),
                    routing.ranks
                ),
            ));
        }
        crate::two_hop::check_inputs(&rows[first..first + count], inputs, parts.0, parts.1)?;
        let shapes = format!("{shapes}, ranks {first}..{} here", first + count);
        check_resident(self, count, &cfg, &shapes)?;
        let bufs = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let s = first + i;
                rank_buffers(self, s, routing, layout, input, parts, rows[s], 0)
            })
            .collect::<Result<Vec<_>>>()?;
        // Other ranks' entries carry only their rings: the kernel reads nothing else of them.
        let descs: Vec<DevRank> = (0..routing.ranks)
            .map(|s| match s.checked_sub(first).and_then(|i| bufs.get(i)) {
                Some(b) => descriptor(b, self, Some(rings[s])),
                None => DevRank(TwoHopRank {
                    rings: rings[s],
                    ..Default::default()
                }),
            })
            .collect();
        let desc = self.upload("dispatch.ranks", &descs)?;
        let mut error = self.zeros::<i32>("dispatch.error", 1)?;
        self.synchronize("two_hop", "uploads")?;
        let started = std::time::Instant::now();
        launch_ranks(
            self, &desc, &mut error, first, count, routing, parts, combine, &cfg, &shapes,
        )?;
        self.synchronize("two_hop", &shapes)?;
        let kernel_seconds = started.elapsed().as_secs_f64();
        check_error(self, &error, &cfg, &shapes)?;
        let received = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| received(self, b, layout.received[first + i], parts))
            .collect::<Result<Vec<_>>>()?;
        Ok(Transfer {
            received,
            kernel_seconds,
        })
    }
}

impl Gpu {
    /// The combine's reduction on a source rank: `out[row] = sum_j staged[row * maxd + j]` over
    /// the row's used entries in entry order (BF16 in, FP32 sums), `[rows, hidden]`.
    pub fn combine_reduce(
        &self,
        staged: &[u16],
        dest: &[i32],
        rows: usize,
        maxd: usize,
        hidden: usize,
    ) -> Result<Vec<f32>> {
        if staged.len() != rows * maxd * hidden || dest.len() != rows * maxd {
            return Err(KernelError::shape(
                "combine.staged",
                format!("{rows} x {maxd} x {hidden} values"),
                format!("{} values, {} entries", staged.len(), dest.len()),
            ));
        }
        let st = self.upload("combine.staged", staged)?;
        let de = self.upload("combine.dest", dest)?;
        let mut out = self.zeros::<f32>("combine.out", rows * hidden)?;
        if rows * hidden > 0 {
            let (r, m, h) = (rows as i32, maxd as i32, hidden as i32);
            let lc = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, DISPATCH, "combine_reduce", format!("[{rows}, {maxd}, {hidden}]"), lc; &st, &de, &mut out, &r, &m, &h);
        }
        self.download("combine.out", &out, rows * hidden)
    }
}
