//! Nodes: what the coordinator knows of each worker node, as stored under `nodes/<name>`.

use serde::{Deserialize, Serialize};

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
    /// Devices it offers (CPU devices here).
    pub devices: usize,
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
