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
//!
//! Each rank runs its own side of phase 1 from the plan alone: [`phase1_messages`] (what it
//! sends, one message per proxy), [`phase1_receives`] (what it expects, and from whom) and
//! [`phase2_input`] (its phase-2 rows, from its own rows and the messages). The messages carry
//! only row bytes; both ends know their sizes from the plan. `cuda::Gpu::inter_node_phase1`
//! exchanges them through NCCL.

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

/// Rank `me`'s place: its node and local index, checked against the plan.
fn place(plan: &InterNode, me: usize) -> Result<(usize, usize, usize)> {
    let ranks = plan.sends.len();
    let local = plan.nodes.first().map_or(1, |n| n.routing.local.max(1));
    if me >= ranks {
        return Err(KernelError::IndexOutOfRange {
            operand: "inter_node.rank",
            position: 0,
            index: me,
            bound: ranks,
        });
    }
    Ok((me / local, me % local, local))
}

/// The bytes of row `row` of `rows`, both parts, or an error naming the source.
fn row_of<'a>(
    rows: &'a Rows,
    row: usize,
    (len0, len1): (usize, usize),
    what: &'static str,
    source: usize,
) -> Result<(&'a [u8], &'a [u8])> {
    match (
        rows.part0.get(row * len0..(row + 1) * len0),
        rows.part1.get(row * len1..(row + 1) * len1),
    ) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(KernelError::shape(
            what,
            format!("row {row} of rank {source}"),
            format!("{} + {} bytes", rows.part0.len(), rows.part1.len()),
        )),
    }
}

/// Rank `me`'s phase-1 messages: one per proxy it sends to (in [`plan`]'s order), holding the
/// rows `plan.sends[me]` lists for it, their first parts back to back, then their second parts.
/// The receiver knows the row count from the plan, so a message carries nothing else.
pub fn phase1_messages(
    plan: &InterNode,
    me: usize,
    own: &Rows,
    parts: (usize, usize),
) -> Result<Vec<(usize, Vec<u8>)>> {
    place(plan, me)?;
    plan.sends[me]
        .iter()
        .map(|(proxy, rows)| {
            let mut head = Vec::with_capacity(rows.len() * (parts.0 + parts.1));
            let mut tail = Vec::with_capacity(rows.len() * parts.1);
            for &row in rows {
                let (a, b) = row_of(own, row, parts, "inter_node.inputs", me)?;
                head.extend_from_slice(a);
                tail.extend_from_slice(b);
            }
            head.extend_from_slice(&tail);
            Ok((*proxy, head))
        })
        .collect()
}

/// The phase-1 messages rank `me` receives: `(source rank, rows)` for each rank of the same local
/// index on another node that sends to it, by node.
pub fn phase1_receives(plan: &InterNode, me: usize) -> Result<Vec<(usize, usize)>> {
    let (n, q, local) = place(plan, me)?;
    Ok((0..plan.nodes.len())
        .filter(|&sn| sn != n)
        .filter_map(|sn| {
            let s = sn * local + q;
            plan.sends[s]
                .iter()
                .find(|(p, _)| *p == me)
                .map(|(_, rows)| (s, rows.len()))
        })
        .collect())
}

/// Rank `me`'s phase-2 input, in the order [`plan`] gives its rows: its own rows with a
/// destination on its node and the rows of `received`, the messages [`phase1_receives`] lists
/// (one each, in that order). Every message must have the size its row count gives.
pub fn phase2_input(
    plan: &InterNode,
    me: usize,
    own: &Rows,
    received: &[Vec<u8>],
    (len0, len1): (usize, usize),
) -> Result<Rows> {
    let (n, q, _) = place(plan, me)?;
    let expected = phase1_receives(plan, me)?;
    if received.len() != expected.len() {
        return Err(KernelError::shape(
            "inter_node.received",
            format!("{} messages (one per sending rank)", expected.len()),
            format!("{}", received.len()),
        ));
    }
    // Each message as rows: the k-th row from source s is its k-th row in phase 2's order.
    let mut messages = Vec::with_capacity(expected.len());
    for (&(s, rows), msg) in expected.iter().zip(received) {
        if msg.len() != rows * (len0 + len1) {
            return Err(KernelError::shape(
                "inter_node.received",
                format!("{} bytes from rank {s} ({rows} rows)", rows * (len0 + len1)),
                format!("{}", msg.len()),
            ));
        }
        let (a, b) = msg.split_at(rows * len0);
        messages.push((
            s,
            Rows {
                part0: a.to_vec(),
                part1: b.to_vec(),
            },
            0usize,
        ));
    }
    let mut out = Rows::default();
    for &(s, row, _) in &plan.nodes[n].origin[q] {
        let (a, b) = if s == me {
            row_of(own, row, (len0, len1), "inter_node.inputs", s)?
        } else {
            let (_, rows, next) = messages
                .iter_mut()
                .find(|(src, _, _)| *src == s)
                .ok_or_else(|| {
                    KernelError::invalid("inter_node.received", format!("no message from rank {s}"))
                })?;
            *next += 1;
            row_of(rows, *next - 1, (len0, len1), "inter_node.received", s)?
        };
        out.part0.extend_from_slice(a);
        out.part1.extend_from_slice(b);
    }
    for ((s, _, used), &(_, rows)) in messages.iter().zip(&expected) {
        if *used != rows {
            return Err(KernelError::invalid(
                "inter_node.received",
                format!("the plan reads {used} of the {rows} rows of rank {s}'s message"),
            ));
        }
    }
    Ok(out)
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

/// The whole transfer through both phases in this process: phase 1 as each rank's messages
/// ([`phase1_messages`]) handed to their proxies, which build their phase-2 inputs
/// ([`phase2_input`]) as they would from the network; phase 2 by `node`, which moves one node's
/// rows ([`crate::two_hop::cpu_transfer`], or a GPU's kernel). Equals the one-phase transfer;
/// what the tests hold the protocol to.
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
    // Phase 1: every rank's messages, delivered to their proxies' mailboxes.
    let mut mailbox: Vec<Vec<(usize, Vec<u8>)>> = vec![Vec::new(); routing.ranks];
    for (s, own) in inputs.iter().enumerate() {
        for (proxy, msg) in phase1_messages(&p, s, own, parts)? {
            mailbox[proxy].push((s, msg));
        }
    }
    let local = routing.local.max(1);
    let mut out = Vec::with_capacity(routing.ranks);
    for n in 0..p.nodes.len() {
        let mut ins = Vec::with_capacity(local);
        for me in n * local..(n + 1) * local {
            let mut got = std::mem::take(&mut mailbox[me]);
            let msgs = phase1_receives(&p, me)?
                .into_iter()
                .map(|(s, _)| {
                    let i = got.iter().position(|(src, _)| *src == s).ok_or_else(|| {
                        KernelError::invalid(
                            "inter_node.received",
                            format!("no message from rank {s}"),
                        )
                    })?;
                    Ok(got.swap_remove(i).1)
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some((s, _)) = got.first() {
                return Err(KernelError::invalid(
                    "inter_node.received",
                    format!("rank {me} got a message from rank {s} that the plan does not send"),
                ));
            }
            ins.push(phase2_input(&p, me, &inputs[me], &msgs, parts)?);
        }
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
            // index, and every message is what its proxy expects from that rank.
            let p = plan(&r, &layout).unwrap();
            for (s, own) in inputs.iter().enumerate() {
                for (proxy, msg) in phase1_messages(&p, s, own, (8, 4)).unwrap() {
                    let rows = phase1_receives(&p, proxy)
                        .unwrap()
                        .into_iter()
                        .find(|&(src, _)| src == s)
                        .map(|(_, n)| n);
                    assert_eq!(Some(msg.len()), rows.map(|n| n * 12), "{s} -> {proxy}");
                }
            }
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
        let own = Rows {
            part0: vec![1; 5 * 8],
            part1: vec![2; 5 * 4],
        };
        let e = phase1_messages(&p, 9, &own, (8, 4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("inter_node.rank"), "{e}");
        // A proxy that expects messages: a missing one, and one of the wrong size, are refused.
        let me = (0..8)
            .find(|&m| !phase1_receives(&p, m).unwrap().is_empty())
            .unwrap();
        let expected = phase1_receives(&p, me).unwrap();
        let e = phase2_input(&p, me, &own, &[], (8, 4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("inter_node.received") && e.contains("messages"),
            "{e}"
        );
        let short: Vec<Vec<u8>> = expected.iter().map(|&(_, n)| vec![0; n * 12 - 1]).collect();
        let e = phase2_input(&p, me, &own, &short, (8, 4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("inter_node.received") && e.contains("bytes"),
            "{e}"
        );
        // Rows the rank does not have are refused by name.
        let e = phase1_messages(&p, me, &Rows::default(), (8, 4)).map(|_| ());
        if !p.sends[me].is_empty() {
            assert!(e.unwrap_err().to_string().contains("inter_node.inputs"));
        }
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
