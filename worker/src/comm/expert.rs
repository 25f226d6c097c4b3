//! The expert-parallel exchange over a [`Transport`]: the all-to-all behind MoE dispatch and
//! combine.
//!
//! The `n`-th exchange of a step is tagged `seq = n` on every member (members run the same
//! layers and micro-batches in the same order), so frames of different layers, micro-batches or
//! directions never mix; a member that falls out of step times out naming the exchange.
//!
//! When the group spans nodes and some node holds several members, the exchange is
//! hierarchical, as in the DeepSeek-V3 report: a token bound for experts on another node crosses
//! the network once, to the member of that node with the same local index as its own rank (the
//! relay), which forwards it inside the node to the members holding its experts. The source
//! sends the relay the union of the rows its node's members need, with each member's list; the
//! relay cuts the members' frames out of it. Combine goes the other way: members hand a remote
//! source's rows to their node's relay for that source, which sends them on in one message.
//! Every member receives byte for byte the frames of the direct exchange, so the results do not
//! depend on the route; only the bytes on the network (dispatch) and the message count change.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::transport::{CommOp, Tag, Transport, comm_error};
use super::wire::select_rows;
use crate::model::ep::{ExchangePhase, ExpertExchange};
use crate::{Result, WorkerError};

/// Lanes of an [`EpLink`] (see [`EpLane`]).
const LANES: usize = 2;
/// Where a frame's lane sits in its tag's sequence number (above the exchange counter and the
/// forwarding source).
const LANE_SHIFT: u32 = 60;
/// The longest a waiting thread holds the endpoint at a time.
const SLICE: Duration = Duration::from_millis(1);

/// One rank's end of its expert-parallel group for one step.
pub struct EpLink<'t> {
    transport: Mutex<&'t mut dyn Transport>,
    /// Mesh ranks of the group's members, in member order.
    group: Vec<usize>,
    /// The node of each member.
    nodes: Vec<usize>,
    /// Route through relays (the group spans nodes and some node holds several members).
    hierarchical: bool,
    me: usize,
    step: u64,
    /// Exchanges started so far on each lane.
    next: [AtomicU64; LANES],
    /// The most other nodes one token of this member was dispatched to.
    max_nodes: AtomicU64,
}

impl<'t> EpLink<'t> {
    /// The exchange of the member at `position` of `group` (mesh ranks) during `step`.
    pub fn new(
        transport: &'t mut dyn Transport,
        group: Vec<usize>,
        position: usize,
        step: u64,
    ) -> Result<Self> {
        if group.get(position) != Some(&transport.rank()) {
            return Err(WorkerError::invalid(
                "ep",
                format!(
                    "rank {} is not member {position} of the group {group:?}",
                    transport.rank()
                ),
            ));
        }
        let nodes: Vec<usize> = group.iter().map(|&r| transport.node(r)).collect();
        let mut distinct = nodes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let hierarchical = distinct.len() > 1 && distinct.len() < nodes.len();
        Ok(Self {
            transport: Mutex::new(transport),
            group,
            nodes,
            hierarchical,
            me: position,
            step,
            next: [AtomicU64::new(0), AtomicU64::new(0)],
            max_nodes: AtomicU64::new(0),
        })
    }

    /// Exchanges run so far (on all lanes).
    pub fn exchanges(&self) -> u64 {
        self.next.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// The exchange on `lane` (0 or 1; see [`EpLane`]).
    pub fn lane(&self, lane: u8) -> EpLane<'_, 't> {
        EpLane {
            link: self,
            lane: lane.min(LANES as u8 - 1),
        }
    }

    /// The most nodes other than its own that one of this member's tokens was dispatched to so
    /// far (what node-limited routing bounds).
    pub fn max_target_nodes(&self) -> u64 {
        self.max_nodes.load(Ordering::Relaxed)
    }

    /// Counts, per token of `rows` (each member's ascending token list), the other nodes it goes
    /// to, and keeps the most.
    fn count_target_nodes(&self, rows: &[Vec<usize>]) {
        let mine = self.nodes[self.me];
        // A group inside one node sends nothing over the network: nothing to count.
        if self.nodes.iter().all(|&n| n == mine) {
            return;
        }
        let mut per_token: std::collections::HashMap<usize, Vec<usize>> = Default::default();
        for (q, list) in rows.iter().enumerate() {
            let node = self.nodes[q];
            if node == mine {
                continue;
            }
            for &t in list {
                let nodes = per_token.entry(t).or_default();
                if !nodes.contains(&node) {
                    nodes.push(node);
                }
            }
        }
        let most = per_token.values().map(Vec::len).max().unwrap_or(0) as u64;
        self.max_nodes.fetch_max(most, Ordering::Relaxed);
    }

    /// Every member reached directly, whatever the nodes (the peer of the hierarchical route).
    pub fn direct(mut self) -> Self {
        self.hierarchical = false;
        self
    }

    /// Whether tokens cross nodes once and are forwarded inside them.
    pub fn is_hierarchical(&self) -> bool {
        self.hierarchical
    }

    /// The members on `node`, in member order.
    fn members_on(&self, node: usize) -> Vec<usize> {
        (0..self.group.len())
            .filter(|&q| self.nodes[q] == node)
            .collect()
    }

    /// The member of `node` that relays member `s`'s traffic: the one with `s`'s local index
    /// (modulo the node's members).
    fn relay(&self, s: usize, node: usize) -> usize {
        let own = self.members_on(self.nodes[s]);
        let local = own.iter().position(|&q| q == s).unwrap_or(0);
        let there = self.members_on(node);
        there[local % there.len()]
    }

    /// The members of other nodes whose traffic to and from this node this member relays.
    fn relayed_by_me(&self) -> Vec<usize> {
        let mine = self.nodes[self.me];
        (0..self.group.len())
            .filter(|&s| self.nodes[s] != mine && self.relay(s, mine) == self.me)
            .collect()
    }

    /// The other nodes of the group, in the order their first members appear.
    fn remote_nodes(&self) -> Vec<usize> {
        let mine = self.nodes[self.me];
        let mut out: Vec<usize> = Vec::new();
        for &n in &self.nodes {
            if n != mine && !out.contains(&n) {
                out.push(n);
            }
        }
        out
    }

    fn tag(&self, lane: u8, op: CommOp, n: u64, src: Option<usize>) -> Tag {
        Tag {
            step: self.step,
            op,
            seq: (u64::from(lane) << LANE_SHIFT)
                | match src {
                    Some(s) => (n << 20) | s as u64,
                    None => n,
                },
        }
    }

    /// Sends `frame` to mesh rank `to`, holding the endpoint only for the send.
    fn send(&self, to: usize, tag: Tag, frame: Vec<u8>) -> Result<()> {
        self.lock()?.send(to, tag, frame)
    }

    /// Waits for the frame `tag` from mesh rank `from`, holding the endpoint for at most
    /// [`SLICE`] at a time, so a thread on the other lane can send meanwhile; gives up after the
    /// transport's timeout.
    fn recv(&self, from: usize, tag: Tag) -> Result<Vec<u8>> {
        if let Some(b) = self.lock()?.recv_within(from, tag, Duration::ZERO)? {
            return Ok(b);
        }
        // Blocked from here on: the wait shows in a trace.
        let _span = tracing::debug_span!("wait", from, op = %tag.op, seq = tag.seq).entered();
        let (timeout, started) = (self.lock()?.timeout(), Instant::now());
        loop {
            if let Some(b) = self.lock()?.recv_within(from, tag, SLICE)? {
                return Ok(b);
            }
            // Between slices the endpoint is free: let a thread of the other lane take it.
            std::thread::yield_now();
            if started.elapsed() >= timeout {
                return Err(comm_error(
                    self.group[self.me],
                    from,
                    tag,
                    format!("no frame after {timeout:?}"),
                ));
            }
        }
    }

    fn hierarchical_dispatch(
        &self,
        lane: u8,
        rows: &[Vec<usize>],
        encode: &mut dyn FnMut(&[usize]) -> Result<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        let n = self.next[usize::from(lane)].fetch_add(1, Ordering::Relaxed);
        let tag = self.tag(lane, CommOp::Dispatch, n, None);
        let _span =
            tracing::debug_span!("all_to_all", op = %tag.op, seq = tag.seq, hierarchical = true)
                .entered();
        let (me, ep) = (self.me, self.group.len());
        let mine = self.nodes[me];
        let mut got: Vec<Option<Vec<u8>>> = vec![None; ep];
        // Each other node once: the union of its members' rows, to the relay.
        for node in self.remote_nodes() {
            let qs = self.members_on(node);
            let mut union: Vec<usize> = qs.iter().flat_map(|&q| rows[q].iter().copied()).collect();
            union.sort_unstable();
            union.dedup();
            let lists: Vec<Vec<u32>> = qs
                .iter()
                .map(|&q| {
                    rows[q]
                        .iter()
                        .map(|r| union.binary_search(r).unwrap_or(0) as u32)
                        .collect()
                })
                .collect();
            let msg = relay_message(&lists, &encode(&union)?);
            self.send(self.group[self.relay(me, node)], tag, msg)?;
        }
        // Then this node's members directly (after the network sends, which take longer).
        for q in self.members_on(mine) {
            let frame = encode(&rows[q])?;
            if q == me {
                got[me] = Some(frame);
            } else {
                self.send(self.group[q], tag, frame)?;
            }
        }
        // Relay duty: cut the frames of this node's members out of what remote sources sent.
        let local = self.members_on(mine);
        for s in self.relayed_by_me() {
            let msg = self.recv(self.group[s], tag)?;
            let (lists, frame) = read_relay(&msg, local.len())
                .map_err(|why| comm_error(self.group[self.me], self.group[s], tag, why))?;
            for (list, &q) in lists.iter().zip(&local) {
                let part = select_rows(frame, list)?;
                if q == me {
                    got[s] = Some(part);
                } else {
                    self.send(
                        self.group[q],
                        self.tag(lane, CommOp::DispatchForward, n, Some(s)),
                        part,
                    )?;
                }
            }
        }
        // What every source sent this member, in member order.
        let mut out = Vec::with_capacity(ep);
        for (s, slot) in got.into_iter().enumerate() {
            out.push(match slot {
                Some(f) => f,
                None if self.nodes[s] == mine => self.recv(self.group[s], tag)?,
                None => {
                    let relay = self.relay(s, mine);
                    self.recv(
                        self.group[relay],
                        self.tag(lane, CommOp::DispatchForward, n, Some(s)),
                    )?
                }
            });
        }
        Ok(out)
    }

    fn hierarchical_combine(&self, lane: u8, mut frames: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let n = self.next[usize::from(lane)].fetch_add(1, Ordering::Relaxed);
        let tag = self.tag(lane, CommOp::Combine, n, None);
        let _span =
            tracing::debug_span!("all_to_all", op = %tag.op, seq = tag.seq, hierarchical = true)
                .entered();
        let (me, ep) = (self.me, self.group.len());
        let mine = self.nodes[me];
        let own = std::mem::take(&mut frames[me]);
        // Rows for a remote source that this member relays itself wait here.
        let mut kept: Vec<Option<Vec<u8>>> = vec![None; ep];
        for (s, frame) in frames.into_iter().enumerate() {
            if s == me {
                continue;
            }
            if self.nodes[s] == mine {
                self.send(self.group[s], tag, frame)?;
            } else {
                let relay = self.relay(s, mine);
                if relay == me {
                    kept[s] = Some(frame);
                } else {
                    self.send(
                        self.group[relay],
                        self.tag(lane, CommOp::CombineForward, n, Some(s)),
                        frame,
                    )?;
                }
            }
        }
        // Relay duty: each remote source this member relays gets its node's rows in one message.
        let local = self.members_on(mine);
        for s in self.relayed_by_me() {
            let mut parts = Vec::with_capacity(local.len());
            for &q in &local {
                parts.push(if q == me {
                    kept[s].take().unwrap_or_default()
                } else {
                    self.recv(
                        self.group[q],
                        self.tag(lane, CommOp::CombineForward, n, Some(s)),
                    )?
                });
            }
            self.send(self.group[s], tag, bundle(&parts))?;
        }
        // Sources' rows: this node's directly, each other node's in one bundle from its relay.
        let mut out: Vec<Option<Vec<u8>>> = vec![None; ep];
        out[me] = Some(own);
        for q in self.members_on(mine) {
            if q != me {
                out[q] = Some(self.recv(self.group[q], tag)?);
            }
        }
        for node in self.remote_nodes() {
            let relay = self.relay(me, node);
            let msg = self.recv(self.group[relay], tag)?;
            let qs = self.members_on(node);
            let parts = unbundle(&msg, qs.len())
                .map_err(|why| comm_error(self.group[self.me], self.group[relay], tag, why))?;
            for (q, part) in qs.into_iter().zip(parts) {
                out[q] = Some(part);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}

/// A relay message: per member of the relay's node, the rows of the frame it needs (u32 count,
/// then u32 row indices), then the frame.
fn relay_message(lists: &[Vec<u32>], frame: &[u8]) -> Vec<u8> {
    let n: usize = lists.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(4 + 4 * (lists.len() + n) + frame.len());
    out.extend_from_slice(&(lists.len() as u32).to_le_bytes());
    for l in lists {
        out.extend_from_slice(&(l.len() as u32).to_le_bytes());
        for &r in l {
            out.extend_from_slice(&r.to_le_bytes());
        }
    }
    out.extend_from_slice(frame);
    out
}

fn u32_at(b: &[u8], at: usize) -> std::result::Result<u32, String> {
    b.get(at..at + 4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .ok_or_else(|| format!("relay message of {} bytes, truncated at byte {at}", b.len()))
}

/// Reads [`relay_message`]; `members` is how many lists the relay's node needs.
fn read_relay(b: &[u8], members: usize) -> std::result::Result<(Vec<Vec<usize>>, &[u8]), String> {
    let count = u32_at(b, 0)? as usize;
    if count != members {
        return Err(format!("{count} row lists for a node of {members} members"));
    }
    let mut at = 4;
    let mut lists = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32_at(b, at)? as usize;
        at += 4;
        if len > b.len().saturating_sub(at) / 4 {
            return Err(format!("a list of {len} rows in {} bytes", b.len()));
        }
        let mut list = Vec::with_capacity(len);
        for i in 0..len {
            list.push(u32_at(b, at + 4 * i)? as usize);
        }
        at += 4 * len;
        lists.push(list);
    }
    Ok((lists, &b[at..]))
}

/// Frames in one message: u32 count, then each frame as a u64 length and its bytes.
fn bundle(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + parts.iter().map(|p| 8 + p.len()).sum::<usize>());
    out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Reads [`bundle`]: exactly `count` frames, nothing after them.
fn unbundle(b: &[u8], count: usize) -> std::result::Result<Vec<Vec<u8>>, String> {
    let n = u32_at(b, 0)? as usize;
    if n != count {
        return Err(format!(
            "{n} frames in a bundle from a node of {count} members"
        ));
    }
    let mut at = 4;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = b
            .get(at..at + 8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])))
            .ok_or_else(|| format!("bundle of {} bytes, truncated at byte {at}", b.len()))?;
        at += 8;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > b.len() - at {
            return Err(format!(
                "a frame of {len} bytes at byte {at} of {}",
                b.len()
            ));
        }
        out.push(b[at..at + len].to_vec());
        at += len;
    }
    if at != b.len() {
        return Err(format!("{} bytes after the bundle's frames", b.len() - at));
    }
    Ok(out)
}

impl fmt::Debug for EpLink<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpLink")
            .field("group", &self.group)
            .field("me", &self.me)
            .field("step", &self.step)
            .finish()
    }
}

/// An endpoint that several parts of a rank's thread use in turn: a pipeline rank's transfers
/// to its neighbours share it with the rank's expert exchanges.
pub(crate) trait SharedEndpoint: Sync {
    /// Sends `frame` to mesh rank `to`.
    fn send_to(&self, to: usize, tag: Tag, frame: Vec<u8>) -> Result<()>;
    /// Waits for the frame `tag` from mesh rank `from`.
    fn recv_from(&self, from: usize, tag: Tag) -> Result<Vec<u8>>;
    /// Tells the other ranks of the mesh to stop waiting: this rank has failed.
    fn abort(&self);
}

impl<'t> EpLink<'t> {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, &'t mut dyn Transport>> {
        self.transport
            .lock()
            .map_err(|_| WorkerError::invalid("ep", "the transport's lock was poisoned"))
    }
}

impl SharedEndpoint for EpLink<'_> {
    fn send_to(&self, to: usize, tag: Tag, frame: Vec<u8>) -> Result<()> {
        self.lock()?.send(to, tag, frame)
    }

    fn recv_from(&self, from: usize, tag: Tag) -> Result<Vec<u8>> {
        self.recv(from, tag)
    }

    fn abort(&self) {
        ExpertExchange::abort(self);
    }
}

impl EpLink<'_> {
    fn dispatch_on(
        &self,
        lane: u8,
        rows: &[Vec<usize>],
        encode: &mut dyn FnMut(&[usize]) -> Result<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        crate::fault::point("dispatch");
        if rows.len() != self.group.len() {
            return Err(WorkerError::invalid(
                "ep",
                format!(
                    "{} row lists for a group of {}",
                    rows.len(),
                    self.group.len()
                ),
            ));
        }
        self.count_target_nodes(rows);
        if self.hierarchical {
            return self.hierarchical_dispatch(lane, rows, encode);
        }
        // Each frame goes out as soon as it is encoded, other nodes' first: the network
        // writers start while this member encodes the rest.
        let tag = self.tag(
            lane,
            CommOp::Dispatch,
            self.next[usize::from(lane)].fetch_add(1, Ordering::Relaxed),
            None,
        );
        let _span = tracing::debug_span!("all_to_all", op = %tag.op, seq = tag.seq).entered();
        for q in self.send_order() {
            self.send(self.group[q], tag, encode(&rows[q])?)?;
        }
        let own = encode(&rows[self.me])?;
        self.receive(tag, own)
    }

    fn exchange_on(
        &self,
        lane: u8,
        phase: ExchangePhase,
        mut frames: Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        crate::fault::point(match phase {
            ExchangePhase::Dispatch => "dispatch",
            ExchangePhase::Combine => "combine",
        });
        if frames.len() != self.group.len() {
            return Err(WorkerError::invalid(
                "ep",
                format!(
                    "{} frames for a group of {}",
                    frames.len(),
                    self.group.len()
                ),
            ));
        }
        if self.hierarchical && phase == ExchangePhase::Combine {
            return self.hierarchical_combine(lane, frames);
        }
        let op = match phase {
            ExchangePhase::Dispatch => CommOp::Dispatch,
            ExchangePhase::Combine => CommOp::Combine,
        };
        let n = self.next[usize::from(lane)].fetch_add(1, Ordering::Relaxed);
        let tag = self.tag(lane, op, n, None);
        let _span = tracing::debug_span!("all_to_all", op = %tag.op, seq = tag.seq).entered();
        let own = std::mem::take(&mut frames[self.me]);
        for q in self.send_order() {
            self.send(self.group[q], tag, std::mem::take(&mut frames[q]))?;
        }
        self.receive(tag, own)
    }
}

impl ExpertExchange for EpLink<'_> {
    fn ep(&self) -> usize {
        self.group.len()
    }

    fn position(&self) -> usize {
        self.me
    }

    fn dispatch(
        &self,
        rows: &[Vec<usize>],
        encode: &mut dyn FnMut(&[usize]) -> Result<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        self.dispatch_on(0, rows, encode)
    }

    fn exchange(&self, phase: ExchangePhase, frames: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.exchange_on(0, phase, frames)
    }

    fn abort(&self) {
        if let Ok(t) = self.lock() {
            t.abort();
        }
    }
}

/// One lane of an [`EpLink`]: exchanges numbered on their own (frames tagged with the lane),
/// so two threads of a member can exchange at once, one per lane, and still meet the other
/// members' exchanges of the same lane in order. DualPipe runs direction `d`'s chunks on lane
/// `d`, the forward and backward chunks of an overlapped pair on two threads. Lane 0 is the
/// link itself.
#[derive(Debug)]
pub struct EpLane<'l, 't> {
    link: &'l EpLink<'t>,
    lane: u8,
}

impl ExpertExchange for EpLane<'_, '_> {
    fn ep(&self) -> usize {
        self.link.group.len()
    }

    fn position(&self) -> usize {
        self.link.me
    }

    fn dispatch(
        &self,
        rows: &[Vec<usize>],
        encode: &mut dyn FnMut(&[usize]) -> Result<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        self.link.dispatch_on(self.lane, rows, encode)
    }

    fn exchange(&self, phase: ExchangePhase, frames: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.link.exchange_on(self.lane, phase, frames)
    }

    fn abort(&self) {
        ExpertExchange::abort(self.link);
    }
}

impl EpLink<'_> {
    /// The other members in the order a direct exchange sends to them: other nodes' first (the
    /// slower link starts earliest), then this node's, each in member order.
    fn send_order(&self) -> Vec<usize> {
        let mine = self.nodes[self.me];
        let (mut remote, local): (Vec<usize>, Vec<usize>) = (0..self.group.len())
            .filter(|&q| q != self.me)
            .partition(|&q| self.nodes[q] != mine);
        remote.extend(local);
        remote
    }

    /// The frame every member sent this one under `tag`, in member order (`own` is this
    /// member's).
    fn receive(&self, tag: Tag, own: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(self.group.len());
        let mut own = Some(own);
        for (q, &peer) in self.group.iter().enumerate() {
            if q == self.me {
                out.push(own.take().unwrap_or_default());
            } else {
                out.push(self.recv(peer, tag)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_messages_and_bundles_round_trip_and_refuse_malformed_bytes() {
        let lists = vec![vec![0u32, 2], vec![], vec![1]];
        let msg = relay_message(&lists, b"FRAME");
        let (got, frame) = read_relay(&msg, 3).unwrap();
        assert_eq!(got, vec![vec![0, 2], vec![], vec![1]]);
        assert_eq!(frame, b"FRAME");
        assert!(read_relay(&msg, 2).unwrap_err().contains("3 row lists"));
        for n in 0..4 + 4 * 3 + 4 * 3 {
            assert!(read_relay(&msg[..n], 3).is_err(), "{n} bytes");
        }
        let mut huge = msg.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_relay(&huge, 3).is_err());

        let parts = vec![b"one".to_vec(), Vec::new(), b"three".to_vec()];
        let b = bundle(&parts);
        assert_eq!(unbundle(&b, 3).unwrap(), parts);
        assert!(unbundle(&b, 2).is_err());
        for n in 0..b.len() {
            assert!(unbundle(&b[..n], 3).is_err(), "{n} bytes");
        }
        let mut padded = b.clone();
        padded.push(0);
        assert!(unbundle(&padded, 3).unwrap_err().contains("after"));
        let mut long = b;
        long[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(unbundle(&long, 3).is_err());
    }
}
