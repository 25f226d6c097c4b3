//! Finding GPUs and opening one: a CUDA context, a stream, and the kernel modules compiled for the
//! device's architecture (once per device, on first use).

use std::fmt::Display;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{CUdevice_P2PAttribute, CUdevice_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
    result,
};

use super::source::{self, SOURCES, Source};
use crate::{KernelError, Result};

/// What a worker registers about one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// Model name, for example "NVIDIA H200".
    pub name: String,
    /// Global memory in bytes.
    pub memory_bytes: u64,
    /// Compute capability (major, minor): (9, 0) for H100/H200/H800.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Ordinals this GPU can access directly (peer-to-peer, over NVLink or PCIe).
    pub p2p_peers: Vec<usize>,
    /// The subset of `p2p_peers` with native atomics over the link, which NVLink has and PCIe
    /// does not: the NVLink peers.
    pub nvlink_peers: Vec<usize>,
}

impl GpuInfo {
    /// The NVRTC architecture of the device (`sm_90`).
    pub fn arch(&self) -> String {
        source::arch_of(self.compute_capability.0, self.compute_capability.1)
    }
}

/// Whether the CUDA driver library (`libcuda.so`) can be loaded. Checked before any driver call:
/// cudarc panics when a dynamically loaded library is missing.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library with `libloading`; no function of it is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn unavailable(reason: impl Display) -> KernelError {
    KernelError::CudaUnavailable {
        reason: reason.to_string(),
    }
}

/// Maps a driver error of `kernel` on `shapes` to a [`KernelError::Cuda`].
pub(crate) fn cuda_err(
    kernel: &'static str,
    shapes: impl Display,
) -> impl FnOnce(result::DriverError) -> KernelError {
    move |e| KernelError::Cuda {
        kernel,
        shapes: shapes.to_string(),
        reason: e.to_string(),
    }
}

/// Every GPU the driver reports. Fails with [`KernelError::CudaUnavailable`] when the driver is
/// missing or reports no device.
pub fn probe() -> Result<Vec<GpuInfo>> {
    if !driver_present() {
        return Err(unavailable(
            "the NVIDIA driver library (libcuda.so) was not found",
        ));
    }
    result::init().map_err(|e| unavailable(format!("cuInit failed: {e}")))?;
    let n = result::device::get_count()
        .map_err(|e| unavailable(format!("cuDeviceGetCount failed: {e}")))?;
    if n <= 0 {
        return Err(unavailable("the driver reports no CUDA device"));
    }
    let devs: Vec<_> = (0..n)
        .map(|i| result::device::get(i).map_err(|e| unavailable(format!("cuDeviceGet({i}): {e}"))))
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(devs.len());
    for (i, &dev) in devs.iter().enumerate() {
        let attr = |a: CUdevice_attribute| {
            // SAFETY: `dev` is a valid device handle from cuDeviceGet after cuInit.
            unsafe { result::device::get_attribute(dev, a) }
                .map_err(|e| unavailable(format!("device {i}: attribute {a:?}: {e}")))
        };
        let major = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        // SAFETY: as above.
        let memory = unsafe { result::device::total_mem(dev) }
            .map_err(|e| unavailable(format!("device {i}: total memory: {e}")))?;
        let name = result::device::get_name(dev)
            .map_err(|e| unavailable(format!("device {i}: name: {e}")))?;
        let mut p2p_peers = Vec::new();
        let mut nvlink_peers = Vec::new();
        for (j, &peer) in devs.iter().enumerate() {
            if i == j {
                continue;
            }
            let p2p = |a: CUdevice_P2PAttribute| -> i32 {
                let mut v = 0i32;
                // SAFETY: both handles are valid devices; `v` outlives the call.
                let r =
                    unsafe { cudarc::driver::sys::cuDeviceGetP2PAttribute(&mut v, a, dev, peer) };
                if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                    v
                } else {
                    0
                }
            };
            if p2p(CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_ACCESS_SUPPORTED) != 0 {
                p2p_peers.push(j);
                if p2p(CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED) != 0
                {
                    nvlink_peers.push(j);
                }
            }
        }
        out.push(GpuInfo {
            ordinal: i,
            name,
            memory_bytes: memory as u64,
            compute_capability: (major, minor),
            sms: u32::try_from(sms).unwrap_or(0),
            p2p_peers,
            nvlink_peers,
        });
    }
    Ok(out)
}

/// One open GPU: its context, one stream, and the kernel modules (compiled by NVRTC for the
/// device's architecture on first use, then cached for the life of the `Gpu`).
pub struct Gpu {
    info: GpuInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: [OnceLock<Arc<CudaModule>>; SOURCES.len()],
    defines: Vec<&'static str>,
    blas: OnceLock<cudarc::cublas::CudaBlas>,
    /// The cuBLASLt handle and workspace, created on first use (see `blaslt.rs`).
    pub(super) lt: OnceLock<super::blaslt::LtState>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens GPU `ordinal`.
    pub fn open(ordinal: usize) -> Result<Self> {
        Self::open_with(ordinal, &[])
    }

    /// Opens GPU `ordinal` with its kernels compiled with extra preprocessor `defines` (for
    /// example `SHOAL_SOFT_FP8`, the software FP8 encoder, for cross-checks).
    pub fn open_with(ordinal: usize, defines: &[&'static str]) -> Result<Self> {
        let all = probe()?;
        let info = all
            .into_iter()
            .nth(ordinal)
            .ok_or_else(|| unavailable(format!("no CUDA device with ordinal {ordinal}")))?;
        let ctx =
            CudaContext::new(ordinal).map_err(cuda_err("open", format!("device {ordinal}")))?;
        let stream = ctx
            .new_stream()
            .map_err(cuda_err("open", format!("device {ordinal}")))?;
        Ok(Self {
            info,
            ctx,
            stream,
            modules: Default::default(),
            defines: defines.to_vec(),
            blas: OnceLock::new(),
            lt: OnceLock::new(),
        })
    }

    /// What the device is.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every operation of this `Gpu` is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernel `kernel` of `source`, compiling and loading the source on first use.
    pub(crate) fn function(
        &self,
        source: &'static Source,
        kernel: &'static str,
    ) -> Result<CudaFunction> {
        let slot = SOURCES
            .iter()
            .position(|s| std::ptr::eq(*s, source))
            .ok_or_else(|| {
                KernelError::invalid("cuda.source", format!("{} is not registered", source.name))
            })?;
        let module = match self.modules[slot].get() {
            Some(m) => m.clone(),
            None => {
                let ptx = source::compile(source, &self.info.arch(), &self.defines)?;
                let m = self
                    .ctx
                    .load_module(ptx)
                    .map_err(cuda_err(kernel, format!("loading {}.cu", source.name)))?;
                // Another thread may have won the race; both modules are equivalent.
                self.modules[slot].get_or_init(|| m).clone()
            }
        };
        module.load_function(kernel).map_err(cuda_err(
            kernel,
            format!("looking up in {}.cu", source.name),
        ))
    }

    /// The cuBLAS handle of this GPU's stream, created on first use.
    pub(crate) fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        // SAFETY: only tries to open the library with `libloading`; no function of it is called.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(unavailable(
                "the cuBLAS library (libcublas.so) was not found",
            ));
        }
        let b =
            cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(|e| KernelError::Cuda {
                kernel: "cublas_create",
                shapes: String::new(),
                reason: format!("{e:?}"),
            })?;
        Ok(self.blas.get_or_init(|| b))
    }

    /// Copies `data` to a new device buffer.
    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        what: &'static str,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.zeros(what, 0);
        }
        self.stream
            .clone_htod(data)
            .map_err(cuda_err(what, format!("upload of {} elements", data.len())))
    }

    /// A new zeroed device buffer of `n` elements (at least one, so that empty shapes still have
    /// a valid pointer).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        what: &'static str,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(cuda_err(what, format!("allocation of {n} elements")))
    }

    /// Copies the first `n` elements of a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr + Clone + Default>(
        &self,
        what: &'static str,
        buf: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        let mut v = self
            .stream
            .clone_dtoh(buf)
            .map_err(cuda_err(what, format!("download of {n} elements")))?;
        v.truncate(n);
        Ok(v)
    }

    /// Waits for everything queued so far; a fault of an earlier kernel surfaces here, named
    /// after `kernel` and `shapes`.
    pub fn synchronize(&self, kernel: &'static str, shapes: impl Display) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err(kernel, shapes))
    }
}
