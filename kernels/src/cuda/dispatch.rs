//! Expert-parallel dispatch and combine over the warp-specialized two-hop kernel (dispatch.cu),
//! and the CPU transport it must agree with.
//!
//! The layout (where each row lands) is computed on the host from the routing, source-major, so
//! a transfer's result does not depend on timing. [`Gpu::two_hop`] runs several ranks on one GPU
//! through exactly the protocol ranks on several GPUs use (each rank's rings are its own buffer);
//! only the pointers differ.

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
        (len0, len1): (usize, usize),
        combine: bool,
        cfg: TransferConfig,
    ) -> Result<Transfer> {
        let rows = routing.validate()?;
        if len0 % 4 != 0 || len1 % 4 != 0 || len0 == 0 {
            return Err(KernelError::invalid(
                "dispatch.row_bytes",
                format!("parts of {len0} and {len1} bytes must be non-empty multiples of 4"),
            ));
        }
        layout.validate(routing)?;
        crate::two_hop::check_inputs(&rows, inputs, len0, len1)?;
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
        let threads = 32 * (2 + cfg.receivers) as u32;
        let f = self.function(&DISPATCH, "two_hop")?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
            .map_err(cuda_err("two_hop", &shapes))? as usize;
        let blocks = cfg.sms * routing.ranks;
        if blocks > per_sm * self.info().sms as usize {
            return Err(KernelError::invalid(
                "dispatch.sms",
                format!(
                    "{blocks} blocks ({} SMs x {} ranks) cannot all be resident on {} SMs ({per_sm} per SM); the protocol needs every block running at once",
                    cfg.sms,
                    routing.ranks,
                    self.info().sms
                ),
            ));
        }
        let geo = Geometry::new(routing.ranks, (len0, len1), &cfg);

        let mut bufs = Vec::with_capacity(routing.ranks);
        for s in 0..routing.ranks {
            let n = layout.received[s];
            bufs.push(RankBufs {
                in0: self.upload("dispatch.input", &inputs[s].part0)?,
                in1: self.upload("dispatch.input", &inputs[s].part1)?,
                dest: self.upload("dispatch.dest", &routing.dest[s])?,
                pos: self.upload("dispatch.pos", &layout.pos[s])?,
                out0: self.zeros("dispatch.output", n * len0)?,
                out1: self.zeros("dispatch.output", n * len1)?,
                meta: self.zeros("dispatch.output", n * 3)?,
                rings: self.zeros("dispatch.rings", geo.rings_per_rank)?,
                rows: rows[s],
            });
        }
        let stream = self.stream().clone();
        let descs: Vec<DevRank> = bufs
            .iter()
            .map(|b| {
                let p = |s: &CudaSlice<u8>| s.device_ptr(&stream).0;
                let q = |s: &CudaSlice<i32>| s.device_ptr(&stream).0;
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
                    rings: p(&b.rings),
                })
            })
            .collect();
        let desc = self.upload("dispatch.ranks", &descs)?;
        let mut error = self.zeros::<i32>("dispatch.error", 1)?;
        let (base, nranks, local) = (0i32, routing.ranks as i32, routing.local as i32);
        let (l0, l1, maxd) = (len0 as i32, len1 as i32, routing.maxd as i32);
        let (slots, sb, rb) = (
            cfg.slots as i32,
            geo.slot_bytes as i32,
            geo.ring_bytes as i64,
        );
        let comb = i32::from(combine);
        let spin = cfg.spin_limit_cycles;
        let lc = LaunchConfig {
            grid_dim: (cfg.sms as u32, routing.ranks as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        self.synchronize("two_hop", "uploads")?;
        let started = std::time::Instant::now();
        launch!(self, DISPATCH, "two_hop", &shapes, lc;
            &desc, &base, &nranks, &local, &l0, &l1, &maxd, &slots, &sb, &rb, &comb, &spin, &mut error);
        self.synchronize("two_hop", &shapes)?;
        let kernel_seconds = started.elapsed().as_secs_f64();
        let e = self.download("dispatch.error", &error, 1)?;
        if let Some(&code) = e.first().filter(|&&c| c != 0) {
            let role = match code {
                1 => "a sender or forwarder found a ring full",
                2 => "a forwarder found its inbound rings empty",
                _ => "a receiver found its inbound rings empty",
            };
            return Err(KernelError::Cuda {
                kernel: "two_hop",
                shapes,
                reason: format!("timed out: {role} for {} cycles", cfg.spin_limit_cycles),
            });
        }
        let mut out = Vec::with_capacity(routing.ranks);
        for (s, b) in bufs.iter().enumerate() {
            let n = layout.received[s];
            let meta = self.download("dispatch.output", &b.meta, n * 3)?;
            out.push(Received {
                rows: Rows {
                    part0: self.download("dispatch.output", &b.out0, n * len0)?,
                    part1: self.download("dispatch.output", &b.out1, n * len1)?,
                },
                meta: meta.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
            });
        }
        Ok(Transfer {
            received: out,
            kernel_seconds,
        })
    }

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
