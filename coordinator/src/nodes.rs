//! Nodes: what the coordinator knows of each worker node, as stored under `nodes/<name>`.

use serde::{Deserialize, Serialize};
use shoal_proto::v1 as pb;

/// Where a node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Attached and heartbeating; takes new work.
    Healthy,
    /// Attached, but takes no new work.
    Cordoned,
    /// Cordoned, with its jobs moved off.
    Draining,
    /// Its agent's session ended.
    Failed,
    /// Attached and idle, held back as a replacement.
    Spare,
}

/// A node as stored. The epoch survives restarts, so a node registering again always fences
/// its older sessions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's name.
    pub name: String,
    /// Devices it offers.
    pub devices: usize,
    /// What each device is; empty for CPU shares registered by older agents.
    #[serde(default)]
    pub models: Vec<DeviceModel>,
    /// NVLink domain.
    pub nvlink_domain: String,
    /// InfiniBand rail.
    pub ib_rail: u32,
    /// Data-plane address (`host:port`).
    #[serde(default)]
    pub data_addr: String,
    /// The current (or last) session's epoch.
    pub epoch: u64,
    /// State.
    pub state: NodeState,
}

/// What one device of a node is, as its agent registered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceModel {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// Model name ("cpu", "NVIDIA H200").
    pub name: String,
    /// Memory in bytes (0 for CPU shares).
    pub memory_bytes: u64,
    /// CUDA compute capability ("9.0"); empty otherwise.
    #[serde(default)]
    pub compute_capability: String,
    /// Indices of the node's devices this one reaches over NVLink.
    #[serde(default)]
    pub nvlink_peers: Vec<u32>,
}

impl DeviceModel {
    /// From a registered device.
    pub fn from_wire(d: &pb::Device) -> Self {
        let kind = match pb::DeviceKind::try_from(d.kind) {
            Ok(pb::DeviceKind::Cuda) => "cuda",
            Ok(pb::DeviceKind::Sim) => "sim",
            _ => "cpu",
        };
        Self {
            kind: kind.into(),
            name: d.name.clone(),
            memory_bytes: d.memory_bytes,
            compute_capability: d.compute_capability.clone(),
            nvlink_peers: d.nvlink_peers.clone(),
        }
    }

    /// To the wire, at `index` within the node.
    pub fn to_wire(&self, index: u32, job_id: String) -> pb::Device {
        let kind = match self.kind.as_str() {
            "cuda" => pb::DeviceKind::Cuda,
            "sim" => pb::DeviceKind::Sim,
            _ => pb::DeviceKind::Cpu,
        };
        pb::Device {
            index,
            kind: kind as i32,
            name: self.name.clone(),
            memory_bytes: self.memory_bytes,
            job_id,
            compute_capability: self.compute_capability.clone(),
            nvlink_peers: self.nvlink_peers.clone(),
        }
    }
}

/// Refuses unusable registrations, naming the field.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1-63 characters of letters, digits, '-', '_', '.', got {name:?}"
        ))
    }
}
