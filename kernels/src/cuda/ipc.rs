//! Device memory shared between processes through CUDA IPC: how the two-hop kernel's ranks in
//! different processes (one GPU each, on one node) write into each other's rings
//! ([`Gpu::two_hop_ranks`]).
//!
//! A [`SharedBuffer`] is allocated with `cuMemAlloc` (IPC cannot export memory of the
//! stream-ordered pool the rest of the crate allocates from). Its [`IpcHandle`] is 64 opaque
//! bytes the owner sends to its peers (over the worker's connections: this crate does no IO);
//! a peer maps it with [`Gpu::import`] and gets the buffer's address in its own context.

use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::driver::sys::{self, CUdeviceptr, CUresult};

use super::device::Gpu;
use crate::{KernelError, Result};

/// An exported buffer's handle: what a peer process needs to map it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcHandle(pub [u8; 64]);

fn check(what: &'static str, shapes: String, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Cuda {
            kernel: what,
            shapes,
            reason: format!("{r:?}"),
        })
    }
}

/// Zeroed device memory other processes can map. Freed on drop.
pub struct SharedBuffer {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
    bytes: usize,
}

impl SharedBuffer {
    /// The device address (valid in this process's context).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed once, here; peers
            // that mapped it keep their mapping until they close it (the driver keeps the memory).
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

/// A peer's buffer mapped into this process. Unmapped on drop.
pub struct PeerBuffer {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
}

impl PeerBuffer {
    /// The peer buffer's address in this process's context.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for PeerBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuIpcOpenMemHandle in this context and is closed once.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

impl Gpu {
    /// `bytes` zeroed bytes that can be exported to other processes.
    pub fn shared_zeros(&self, bytes: usize) -> Result<SharedBuffer> {
        let shapes = format!("{bytes} bytes");
        self.context()
            .bind_to_thread()
            .map_err(super::device::cuda_err("ipc.alloc", &shapes))?;
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: the context is current; `ptr` outlives the call.
        check("ipc.alloc", shapes.clone(), unsafe {
            sys::cuMemAlloc_v2(&mut ptr, bytes.max(1))
        })?;
        let buf = SharedBuffer {
            ctx: Arc::clone(self.context()),
            ptr,
            bytes,
        };
        // SAFETY: `ptr` holds `bytes.max(1)` bytes just allocated in the current context.
        check("ipc.zero", shapes, unsafe {
            sys::cuMemsetD8_v2(ptr, 0, bytes.max(1))
        })?;
        Ok(buf)
    }

    /// Zeroes a shared buffer again (rings before their next transfer); waits for it.
    pub fn zero_shared(&self, b: &SharedBuffer) -> Result<()> {
        let shapes = format!("{} bytes", b.bytes);
        self.synchronize("ipc.zero", &shapes)?;
        // SAFETY: the buffer is alive and holds `bytes.max(1)` bytes of this context.
        check("ipc.zero", shapes, unsafe {
            sys::cuMemsetD8_v2(b.ptr, 0, b.bytes.max(1))
        })
    }

    /// The handle a peer process maps `b` with.
    pub fn export(&self, b: &SharedBuffer) -> Result<IpcHandle> {
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: `b` is cuMemAlloc memory of this GPU's context; `h` outlives the call.
        check("ipc.export", format!("{} bytes", b.bytes), unsafe {
            sys::cuIpcGetMemHandle(&mut h, b.ptr)
        })?;
        Ok(IpcHandle(h.reserved.map(|c| c as u8)))
    }

    /// Maps a buffer another process exported (on this GPU, or on a peer GPU of this node).
    pub fn import(&self, h: &IpcHandle) -> Result<PeerBuffer> {
        self.context()
            .bind_to_thread()
            .map_err(super::device::cuda_err("ipc.import", ""))?;
        let handle = sys::CUipcMemHandle_st {
            reserved: h.0.map(|b| b as std::ffi::c_char),
        };
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: the context is current; the handle is 64 bytes as the driver defines it (a
        // wrong one is an error, not a fault); `ptr` outlives the call.
        check("ipc.import", String::new(), unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        Ok(PeerBuffer {
            ctx: Arc::clone(self.context()),
            ptr,
        })
    }
}
