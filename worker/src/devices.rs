//! The devices a node offers: `--devices cpu:N`, `cuda:all` or `cuda:0,1,...`, resolved against
//! what the machine has. A CUDA request on a machine (or build) without a usable GPU falls back to
//! one CPU device and says why; it never panics.

use crate::{Result, WorkerError};

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// `cpu:N`: N shares of the host's cores.
    Cpu(u32),
    /// `cuda:all`: every GPU the driver reports.
    CudaAll,
    /// `cuda:0,1`: these GPU ordinals.
    Cuda(Vec<usize>),
}

/// The kind of one offered device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A share of the host's cores.
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
}

/// One offered device, as registered with the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Kind.
    pub kind: DeviceKind,
    /// Model name ("cpu", "NVIDIA H200").
    pub name: String,
    /// Memory in bytes (0 for CPU shares).
    pub memory_bytes: u64,
    /// CUDA compute capability (major, minor).
    pub compute_capability: Option<(i32, i32)>,
    /// Indices (among this node's offered devices) reached over NVLink.
    pub nvlink_peers: Vec<u32>,
    /// The CUDA ordinal of a GPU (`None` for a CPU share).
    pub ordinal: Option<usize>,
}

impl Device {
    /// A CPU share.
    pub fn cpu() -> Self {
        Self {
            kind: DeviceKind::Cpu,
            name: "cpu".into(),
            memory_bytes: 0,
            compute_capability: None,
            nvlink_peers: Vec::new(),
            ordinal: None,
        }
    }
}

/// The devices a node offers, and the note to print when a request could not be met as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offered {
    /// The devices.
    pub devices: Vec<Device>,
    /// Why the node offers something else than was asked (a CUDA request that fell back).
    pub fallback: Option<String>,
}

fn invalid(s: &str, reason: impl Into<String>) -> WorkerError {
    WorkerError::InvalidArgument {
        name: "devices".into(),
        reason: format!("{s}: {}", reason.into()),
    }
}

impl std::str::FromStr for DeviceRequest {
    type Err = WorkerError;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(n) = s.strip_prefix("cpu:") {
            let n: u32 = n
                .parse()
                .map_err(|_| invalid(s, "expected cpu:N with N a number"))?;
            if n == 0 {
                return Err(invalid(s, "at least one device"));
            }
            return Ok(Self::Cpu(n));
        }
        if let Some(list) = s.strip_prefix("cuda:") {
            if list == "all" {
                return Ok(Self::CudaAll);
            }
            let mut ords = Vec::new();
            for part in list.split(',') {
                let o: usize = part.trim().parse().map_err(|_| {
                    invalid(
                        s,
                        format!(
                            "{part:?} is not a GPU ordinal (expected cuda:all or cuda:0,1,...)"
                        ),
                    )
                })?;
                if ords.contains(&o) {
                    return Err(invalid(s, format!("GPU {o} is listed twice")));
                }
                ords.push(o);
            }
            return Ok(Self::Cuda(ords));
        }
        Err(invalid(s, "expected cpu:N, cuda:all or cuda:0,1,..."))
    }
}

impl DeviceRequest {
    /// The devices this machine can offer for the request.
    pub fn resolve(&self) -> Result<Offered> {
        match self {
            Self::Cpu(n) => Ok(Offered {
                devices: (0..*n).map(|_| Device::cpu()).collect(),
                fallback: None,
            }),
            Self::CudaAll | Self::Cuda(_) => match cuda_devices(self) {
                Ok(devices) => Ok(Offered {
                    devices,
                    fallback: None,
                }),
                Err(CudaMissing(reason)) => Ok(Offered {
                    devices: vec![Device::cpu()],
                    fallback: Some(format!("no usable GPU ({reason}); offering cpu:1 instead")),
                }),
            },
        }
    }
}

/// Why no GPU could be offered (the request then falls back to the CPU).
struct CudaMissing(String);

#[cfg(not(feature = "cuda"))]
fn cuda_devices(_: &DeviceRequest) -> std::result::Result<Vec<Device>, CudaMissing> {
    Err(CudaMissing(
        "this build has no CUDA support; rebuild with --features cuda".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda_devices(req: &DeviceRequest) -> std::result::Result<Vec<Device>, CudaMissing> {
    let all = shoal_kernels::cuda::probe().map_err(|e| CudaMissing(e.to_string()))?;
    let chosen: Vec<usize> = match req {
        DeviceRequest::Cuda(ords) => {
            if let Some(&o) = ords.iter().find(|&&o| o >= all.len()) {
                return Err(CudaMissing(format!(
                    "GPU {o} does not exist ({} found)",
                    all.len()
                )));
            }
            ords.clone()
        }
        _ => (0..all.len()).collect(),
    };
    Ok(chosen
        .iter()
        .map(|&o| {
            let g = &all[o];
            Device {
                kind: DeviceKind::Cuda,
                name: g.name.clone(),
                memory_bytes: g.memory_bytes,
                compute_capability: Some(g.compute_capability),
                nvlink_peers: g
                    .nvlink_peers
                    .iter()
                    .filter_map(|p| chosen.iter().position(|c| c == p).map(|i| i as u32))
                    .collect(),
                ordinal: Some(o),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_name_the_flag_and_the_reason() {
        assert_eq!(
            "cpu:4".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cpu(4)
        );
        assert_eq!(
            "cuda:all".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::CudaAll
        );
        assert_eq!(
            "cuda:0,2".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(vec![0, 2])
        );
        for (bad, why) in [
            ("cpu:0", "at least one"),
            ("cpu:x", "number"),
            ("cuda:a", "not a GPU ordinal"),
            ("cuda:1,1", "twice"),
            ("tpu:1", "expected cpu:N"),
        ] {
            let e = bad.parse::<DeviceRequest>().unwrap_err().to_string();
            assert!(
                e.contains("devices") && e.contains(bad) && e.contains(why),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn cpu_requests_offer_that_many_cpu_shares() {
        let o = DeviceRequest::Cpu(3).resolve().unwrap();
        assert_eq!(o.devices, vec![Device::cpu(); 3]);
        assert_eq!(o.fallback, None);
    }

    #[test]
    fn a_cuda_request_without_a_usable_gpu_falls_back_to_one_cpu_share_and_says_why() {
        // On a machine with a GPU and a CUDA build this offers GPUs instead; both are checked.
        let o = DeviceRequest::CudaAll.resolve().unwrap();
        match &o.fallback {
            Some(why) => {
                assert_eq!(o.devices, vec![Device::cpu()]);
                assert!(why.contains("offering cpu:1"), "{why}");
                if cfg!(not(feature = "cuda")) {
                    assert!(why.contains("--features cuda"), "{why}");
                }
            }
            None => {
                let cuda_build = cfg!(feature = "cuda");
                assert!(cuda_build, "only a CUDA build can offer GPUs");
                assert!(
                    o.devices
                        .iter()
                        .all(|d| d.kind == DeviceKind::Cuda && d.memory_bytes > 0)
                );
            }
        }
    }
}
