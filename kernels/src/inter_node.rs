//! A multi-node transfer cut into its two hops, for when nodes do not share memory: the rows
//! cross nodes once, between ranks of the same local index (phase 1: the network hop, NCCL
//! point-to-point between processes), then each node moves them to their destinations inside
//! the node (phase 2: the two-hop kernel with one node, over NVLink).
//!
//! [`plan`] computes both phases from the global routing and layout, on every rank alike: what
//! each rank sends to each other node's proxy, and each node's own routing, whose rows are the
//! proxy's own rows for its node followed by what it received, in source order. Phase 2 keeps the
//! global positions, so every destination's rows land exactly where [`cpu_transfer`] puts them;
//! [`restore_provenance`] turns phase 2's provenance back into the original sources'.

use crate::two_hop::{Layout, Received, Routing, Rows, check_inputs};
use crate::{KernelError, Result};

/// One node's phase 2.
#[derive(Clone, Debug)]
pub struct NodePhase {
    /// The node's routing: its `local` ranks as one node, destinations as local indices.
    pub routing: Routing,
    /// Global positions of every entry, and the global receive counts of the node's ranks.
    pub layout: Layout,
    /// Per local rank, per phase-2 row: the original source rank and row, and for each entry of
    /// the phase-2 row the original entry index.
    pub origin: Vec<Vec<(usize, usize, Vec<usize>)>>,
}

/// Both phases of a transfer.
#[derive(Clone, Debug)]
pub struct InterNode {
    /// Per source rank: `(proxy rank, rows in order)` for every other node it sends rows to.
    pub sends: Vec<Vec<(usize, Vec<usize>)>>,
    /// Per node, its phase 2.
    pub nodes: Vec<NodePhase>,
}

/// Plans `routing` (with its `layout`) as the two phases. See the module documentation.
pub fn plan(routing: &Routing, layout: &Layout) -> Result<InterNode> {
    routing.validate()?;
    layout.validate(routing)?;
    let (local, maxd) = (routing.local, routing.maxd);
    let nodes = routing.ranks / local;
    let node_of = |r: usize| r / local;
    // Phase 1: each source's rows with a destination on another node, to that node's proxy.
    let mut sends: Vec<Vec<(usize, Vec<usize>)>> = Vec::with_capacity(routing.ranks);
    for (s, dest) in routing.dest.iter().enumerate() {
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); nodes];
        for (row, d) in dest.chunks(maxd).enumerate() {
            let mut seen = vec![false; nodes];
            for &r in d.iter().filter(|&&r| r >= 0) {
                let n = node_of(r as usize);
                if n != node_of(s) && !seen[n] {
                    seen[n] = true;
                    per_node[n].push(row);
                }
            }
        }
        sends.push(
            per_node
                .into_iter()
                .enumerate()
                .filter(|(_, rows)| !rows.is_empty())
                .map(|(n, rows)| (n * local + s % local, rows))
                .collect(),
        );
    }
    // Phase 2 of node n: each local rank q forwards, in order, its own rows with a destination on
    // node n, then the rows of the other nodes' rank q, by source node.
    let mut out = Vec::with_capacity(nodes);
    for n in 0..nodes {
        let mut dest = Vec::with_capacity(local);
        let mut pos = Vec::with_capacity(local);
        let mut origin = Vec::with_capacity(local);
        for q in 0..local {
            let me = n * local + q;
            let (mut d2, mut p2, mut o2) = (Vec::new(), Vec::new(), Vec::new());
            let mut add = |s: usize, row: usize| {
                let base = row * maxd;
                let mut entries = Vec::new();
                for j in 0..maxd {
                    let r = routing.dest[s][base + j];
                    if r >= 0 && node_of(r as usize) == n {
                        d2.push(r - (n * local) as i32);
                        p2.push(layout.pos[s][base + j]);
                        entries.push(j);
                    }
                }
                for _ in entries.len()..maxd {
                    d2.push(-1);
                    p2.push(-1);
                }
                o2.push((s, row, entries));
            };
            for sn in 0..nodes {
                let s = sn * local + q;
                if sn == n {
                    for row in 0..routing.dest[s].len() / maxd {
                        if routing.dest[s][row * maxd..(row + 1) * maxd]
                            .iter()
                            .any(|&r| r >= 0 && node_of(r as usize) == n)
                        {
                            add(s, row);
                        }
                    }
                } else if let Some((_, rows)) = sends[s].iter().find(|(p, _)| *p == me) {
                    for &row in rows {
                        add(s, row);
                    }
                }
            }
            dest.push(d2);
            pos.push(p2);
            origin.push(o2);
        }
        let node_routing = Routing {
            ranks: local,
            local,
            maxd,
            dest,
        };
        let node_layout = Layout {
            pos,
            received: layout.received[n * local..(n + 1) * local].to_vec(),
        };
        node_layout.validate(&node_routing)?;
        out.push(NodePhase {
            routing: node_routing,
            layout: node_layout,
            origin,
        });
    }
    Ok(InterNode { sends, nodes: out })
}

/// Phase 2's inputs of node `n`: each local rank's rows in the order [`plan`] gives them, from
/// the sources' `inputs` (its own, and what phase 1 brought from the other nodes).
pub fn node_inputs(
    plan: &InterNode,
    n: usize,
    inputs: &[Rows],
    (len0, len1): (usize, usize),
) -> Result<Vec<Rows>> {
    let phase = plan
        .nodes
        .get(n)
        .ok_or_else(|| KernelError::invalid("inter_node.node", format!("no node {n}")))?;
    phase
        .origin
        .iter()
        .map(|rows| {
            let mut r = Rows::default();
            for &(s, row, _) in rows {
                let inp = inputs.get(s).ok_or_else(|| {
                    KernelError::invalid("inter_node.inputs", format!("no rank {s}"))
                })?;
                let (a, b) = (
                    inp.part0.get(row * len0..(row + 1) * len0),
                    inp.part1.get(row * len1..(row + 1) * len1),
                );
                match (a, b) {
                    (Some(a), Some(b)) => {
                        r.part0.extend_from_slice(a);
                        r.part1.extend_from_slice(b);
                    }
                    _ => {
                        return Err(KernelError::shape(
                            "inter_node.inputs",
                            format!("row {row} of rank {s}"),
                            format!("{} bytes", inp.part0.len()),
                        ));
                    }
                }
            }
            Ok(r)
        })
        .collect()
}

/// Turns phase 2's provenance (local source, phase-2 row, entry) of node `n`'s received rows into
/// the original sources' (rank, row, entry), in place.
pub fn restore_provenance(plan: &InterNode, n: usize, received: &mut [Received]) -> Result<()> {
    let phase = plan
        .nodes
        .get(n)
        .ok_or_else(|| KernelError::invalid("inter_node.node", format!("no node {n}")))?;
    for r in received.iter_mut() {
        for m in &mut r.meta {
            let (q, row, j) = (m[0] as usize, m[1] as usize, m[2] as usize);
            let (s, orow, entries) =
                phase
                    .origin
                    .get(q)
                    .and_then(|o| o.get(row))
                    .ok_or_else(|| {
                        KernelError::invalid(
                            "inter_node.meta",
                            format!("no phase-2 row {row} at {q}"),
                        )
                    })?;
            let e = entries.get(j).ok_or_else(|| {
                KernelError::invalid(
                    "inter_node.meta",
                    format!("no entry {j} of row {row} at {q}"),
                )
            })?;
            *m = [*s as i32, *orow as i32, *e as i32];
        }
    }
    Ok(())
}

/// The whole transfer through both phases on the CPU (phase 1 as copies, phase 2 by `node`,
/// which moves one node's rows: [`crate::two_hop::cpu_transfer`], or a GPU's kernel). Equals the
/// one-phase transfer; what the tests hold the plan to.
pub fn transfer_in_phases(
    routing: &Routing,
    layout: &Layout,
    inputs: &[Rows],
    parts: (usize, usize),
    mut node: impl FnMut(&NodePhase, &[Rows]) -> Result<Vec<Received>>,
) -> Result<Vec<Received>> {
    let rows = routing.validate()?;
    check_inputs(&rows, inputs, parts.0, parts.1)?;
    let p = plan(routing, layout)?;
    let mut out = Vec::with_capacity(routing.ranks);
    for n in 0..p.nodes.len() {
        let ins = node_inputs(&p, n, inputs, parts)?;
        let mut got = node(&p.nodes[n], &ins)?;
        restore_provenance(&p, n, &mut got)?;
        out.extend(got);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::two_hop::cpu_transfer;

    fn routing(seed: u64, ranks: usize, local: usize, rows: usize, maxd: usize) -> Routing {
        let mut state = seed;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let dest = (0..ranks)
            .map(|_| {
                (0..rows)
                    .flat_map(|_| {
                        let mut d: Vec<i32> =
                            (0..ranks as i32).filter(|_| next() % 3 == 0).collect();
                        d.truncate(maxd);
                        d.resize(maxd, -1);
                        d
                    })
                    .collect()
            })
            .collect();
        Routing {
            ranks,
            local,
            maxd,
            dest,
        }
    }

    #[test]
    fn the_two_phases_deliver_what_one_transfer_does() {
        for (seed, ranks, local) in [(1, 8, 4), (2, 12, 4), (3, 6, 1), (4, 4, 4)] {
            let r = routing(seed, ranks, local, 17, 4);
            let layout = r.layout().unwrap();
            let inputs: Vec<Rows> = (0..ranks)
                .map(|s| Rows {
                    part0: (0..17 * 8).map(|i| (s * 31 + i) as u8).collect(),
                    part1: (0..17 * 4).map(|i| (s * 7 + i) as u8).collect(),
                })
                .collect();
            let want = cpu_transfer(&r, &layout, &inputs, 8, 4).unwrap();
            let got = transfer_in_phases(&r, &layout, &inputs, (8, 4), |phase, ins| {
                cpu_transfer(&phase.routing, &phase.layout, ins, 8, 4)
            })
            .unwrap();
            assert_eq!(got, want, "{ranks} ranks in nodes of {local}");
            // Phase 1 crosses nodes once per (row, destination node), always to the same local
            // index.
            let p = plan(&r, &layout).unwrap();
            for (s, sends) in p.sends.iter().enumerate() {
                for (proxy, rows) in sends {
                    assert_eq!(proxy % local, s % local);
                    assert_ne!(proxy / local, s / local);
                    assert!(rows.windows(2).all(|w| w[0] < w[1]));
                }
            }
        }
    }

    #[test]
    fn a_bad_layout_or_node_is_refused_by_name() {
        let r = routing(5, 8, 4, 5, 3);
        let mut layout = r.layout().unwrap();
        let p = plan(&r, &layout).unwrap();
        assert!(
            node_inputs(&p, 9, &[], (8, 4))
                .unwrap_err()
                .to_string()
                .contains("inter_node.node")
        );
        if let Some(x) = layout.pos[0].iter_mut().find(|x| **x >= 0) {
            *x = 10_000;
        }
        assert!(
            plan(&r, &layout)
                .unwrap_err()
                .to_string()
                .contains("dispatch.layout")
        );
    }
}
