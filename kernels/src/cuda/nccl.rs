//! ZeRO-1 collectives and point-to-point transfers through NCCL (cudarc's `nccl` feature): the
//! gradient reduce-scatter and the parameter all-gather of the data-parallel ranks, and the
//! inter-node hop of dispatch/combine until a GPUDirect path exists.

use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp, result};

use super::device::Gpu;
use crate::inter_node::{self, InterNode};
use crate::two_hop::Rows;
use crate::{KernelError, Result};

/// Whether the NCCL library (`libnccl.so`) can be loaded; checked before any NCCL call.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to open the library with `libloading`; no function of it is called.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(op: &'static str, shapes: String) -> impl FnOnce(result::NcclError) -> KernelError {
    move |e| KernelError::Cuda {
        kernel: op,
        shapes,
        reason: format!("{e:?}"),
    }
}

fn require_nccl() -> Result<()> {
    if nccl_present() {
        Ok(())
    } else {
        Err(KernelError::CudaUnavailable {
            reason: "the NCCL library (libnccl.so) was not found; install nvidia-nccl-cu12 or the \
                     system package and put it on LD_LIBRARY_PATH"
                .into(),
        })
    }
}

/// The communicators of one process: one per GPU it drives (ranks `0..gpus.len()` of the group),
/// or its single rank of a group spread over processes.
pub struct Collectives {
    comms: Vec<Comm>,
}

impl std::fmt::Debug for Collectives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collectives")
            .field("ranks", &self.comms.len())
            .finish()
    }
}

/// A new NCCL group identifier (rank 0 creates it and the coordinator hands it to the others).
pub fn unique_id() -> Result<[i8; 128]> {
    require_nccl()?;
    let id = Id::new().map_err(nccl_err("nccl_unique_id", String::new()))?;
    // `c_char` is `i8` here but `u8` on some targets.
    #[allow(clippy::unnecessary_cast)]
    Ok(id.internal().map(|c| c as i8))
}

impl Collectives {
    /// One communicator per GPU, all in this process (NCCL needs distinct GPUs).
    pub fn single_process(gpus: &[&Gpu]) -> Result<Self> {
        require_nccl()?;
        let streams = gpus.iter().map(|g| g.stream().clone()).collect();
        let comms = Comm::from_devices(streams)
            .map_err(nccl_err("nccl_init", format!("{} GPUs", gpus.len())))?;
        Ok(Self { comms })
    }

    /// Rank `rank` of `world` ranks in different processes, joined through `id`.
    pub fn from_rank(gpu: &Gpu, rank: usize, world: usize, id: [i8; 128]) -> Result<Self> {
        require_nccl()?;
        let id = Id::uninit(id.map(|c| c as std::ffi::c_char));
        let comm = Comm::from_rank(gpu.stream().clone(), rank, world, id)
            .map_err(nccl_err("nccl_init", format!("rank {rank} of {world}")))?;
        Ok(Self { comms: vec![comm] })
    }

    /// Communicators in this process.
    pub fn local_ranks(&self) -> usize {
        self.comms.len()
    }

    /// Reduce-scatter (sum) of the gradients: `recv[i]` gets shard `rank(i)` of the sum of every
    /// `send`. `send[i]` holds `world * recv[i].len()` elements.
    pub fn reduce_scatter_sum(
        &self,
        send: &[CudaSlice<f32>],
        recv: &mut [CudaSlice<f32>],
    ) -> Result<()> {
        self.check("reduce_scatter", send.len(), recv.len())?;
        for (c, (s, r)) in self.comms.iter().zip(send.iter().zip(recv.iter())) {
            if s.len() != r.len() * c.world_size() {
                return Err(KernelError::shape(
                    "reduce_scatter.send",
                    format!("{} x {} elements", c.world_size(), r.len()),
                    format!("{} elements", s.len()),
                ));
            }
        }
        let shapes = format!("{} elements per shard", recv.first().map_or(0, |r| r.len()));
        result::group_start().map_err(nccl_err("reduce_scatter", shapes.clone()))?;
        let mut res = Ok(());
        for (c, (s, r)) in self.comms.iter().zip(send.iter().zip(recv.iter_mut())) {
            if let Err(e) = c.reduce_scatter(s, r, &ReduceOp::Sum) {
                res = Err(e);
            }
        }
        result::group_end().map_err(nccl_err("reduce_scatter", shapes.clone()))?;
        res.map(|_| ()).map_err(nccl_err("reduce_scatter", shapes))
    }

    /// All-gather of the updated parameter shards: `recv[i]` gets every rank's `send` in rank
    /// order.
    pub fn all_gather(&self, send: &[CudaSlice<f32>], recv: &mut [CudaSlice<f32>]) -> Result<()> {
        self.check("all_gather", send.len(), recv.len())?;
        for (c, (s, r)) in self.comms.iter().zip(send.iter().zip(recv.iter())) {
            if r.len() != s.len() * c.world_size() {
                return Err(KernelError::shape(
                    "all_gather.recv",
                    format!("{} x {} elements", c.world_size(), s.len()),
                    format!("{} elements", r.len()),
                ));
            }
        }
        let shapes = format!("{} elements per shard", send.first().map_or(0, |s| s.len()));
        result::group_start().map_err(nccl_err("all_gather", shapes.clone()))?;
        let mut res = Ok(());
        for (c, (s, r)) in self.comms.iter().zip(send.iter().zip(recv.iter_mut())) {
            if let Err(e) = c.all_gather(s, r) {
                res = Err(e);
            }
        }
        result::group_end().map_err(nccl_err("all_gather", shapes.clone()))?;
        res.map(|_| ()).map_err(nccl_err("all_gather", shapes))
    }

    /// Point-to-point exchange of this process's rank (`from_rank` communicators): sends each
    /// `(peer, rows)` and receives each `(peer, buffer)` in one NCCL group, so the pairs may be
    /// in any order without deadlock. The inter-node hop of dispatch/combine between processes.
    pub fn exchange(
        &self,
        sends: &[(usize, &CudaSlice<u8>)],
        recvs: &mut [(usize, &mut CudaSlice<u8>)],
    ) -> Result<()> {
        let [comm] = self.comms.as_slice() else {
            return Err(KernelError::invalid(
                "exchange",
                "needs the single communicator of a rank in its own process",
            ));
        };
        let world = comm.world_size();
        if let Some(&(p, _)) = sends.iter().find(|(p, _)| *p >= world) {
            return Err(KernelError::IndexOutOfRange {
                operand: "exchange.sends",
                position: 0,
                index: p,
                bound: world,
            });
        }
        if let Some((p, _)) = recvs.iter().find(|(p, _)| *p >= world) {
            return Err(KernelError::IndexOutOfRange {
                operand: "exchange.recvs",
                position: 0,
                index: *p,
                bound: world,
            });
        }
        let shapes = format!("{} sends, {} receives", sends.len(), recvs.len());
        result::group_start().map_err(nccl_err("exchange", shapes.clone()))?;
        let mut res = Ok(());
        for (p, buf) in sends {
            if let Err(e) = comm.send(*buf, *p as i32) {
                res = Err(e);
            }
        }
        for (p, buf) in recvs.iter_mut() {
            if let Err(e) = comm.recv(*buf, *p as i32) {
                res = Err(e);
            }
        }
        result::group_end().map_err(nccl_err("exchange", shapes.clone()))?;
        res.map_err(nccl_err("exchange", shapes))
    }

    /// Rank `me`'s side of a multi-node transfer's phase 1 (see [`crate::inter_node`]): its
    /// messages to the other nodes' proxies go out and the ones addressed to it come in, all in
    /// one NCCL group, and it returns its phase-2 input. This process's communicator must be rank
    /// `me` of the transfer's ranks (`from_rank`). The rows are staged through host memory, as
    /// the transfers of `dispatch.rs` take and return them.
    pub fn inter_node_phase1(
        &self,
        gpu: &Gpu,
        plan: &InterNode,
        me: usize,
        own: &Rows,
        parts: (usize, usize),
    ) -> Result<Rows> {
        if let [comm] = self.comms.as_slice()
            && comm.rank() != me
        {
            return Err(KernelError::invalid(
                "inter_node.rank",
                format!("rank {me} through the communicator of rank {}", comm.rank()),
            ));
        }
        let sends = inter_node::phase1_messages(plan, me, own, parts)?;
        let expected = inter_node::phase1_receives(plan, me)?;
        let (len0, len1) = parts;
        let send_bufs = sends
            .iter()
            .map(|(p, m)| Ok((*p, gpu.upload("inter_node.send", m)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut recv_bufs = expected
            .iter()
            .map(|&(s, rows)| Ok((s, gpu.zeros::<u8>("inter_node.recv", rows * (len0 + len1))?)))
            .collect::<Result<Vec<_>>>()?;
        let send_refs: Vec<(usize, &CudaSlice<u8>)> =
            send_bufs.iter().map(|(p, b)| (*p, b)).collect();
        let mut recv_refs: Vec<(usize, &mut CudaSlice<u8>)> =
            recv_bufs.iter_mut().map(|(s, b)| (*s, b)).collect();
        self.exchange(&send_refs, &mut recv_refs)?;
        let received = recv_bufs
            .iter()
            .zip(&expected)
            .map(|((_, b), &(_, rows))| gpu.download("inter_node.recv", b, rows * (len0 + len1)))
            .collect::<Result<Vec<_>>>()?;
        inter_node::phase2_input(plan, me, own, &received, parts)
    }

    fn check(&self, op: &'static str, send: usize, recv: usize) -> Result<()> {
        if send != self.comms.len() || recv != self.comms.len() {
            return Err(KernelError::shape(
                op,
                format!(
                    "one send and one receive buffer per local rank ({})",
                    self.comms.len()
                ),
                format!("{send} and {recv}"),
            ));
        }
        Ok(())
    }
}
