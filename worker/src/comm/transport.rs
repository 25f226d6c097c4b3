//! Point-to-point transports between the ranks of a job.
//!
//! A [`Transport`] moves tagged byte frames from one rank to another. Receivers match on the
//! sender and the [`Tag`] (step, operation, sequence number), so frames that arrive early wait in
//! a stash until their operation asks for them, and a frame for another step is never taken for
//! this one. Every wait has a deadline; when it passes, or when another rank of the mesh fails,
//! the error names this rank, the peer, the operation and the step.
//!
//! [`LocalMesh`] connects ranks that share a process (one node): frames are handed over through
//! in-memory queues (the shared-memory transport of a node; NVLink on GPUs). Bytes are counted
//! per link kind, so reports can say what each transport carried.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Result, WorkerError};

/// The operation a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommOp {
    /// Gradient reduce-scatter (ZeRO-1).
    ReduceScatter,
    /// Parameter all-gather (ZeRO-1).
    AllGather,
    /// A small all-reduce (gradient norm, expert loads).
    AllReduce,
    /// MoE dispatch: tokens to the ranks holding their experts.
    Dispatch,
    /// MoE combine: expert outputs back to the tokens' ranks.
    Combine,
    /// A pipeline stage's output, to the next stage (`seq`: direction << 32 | micro-batch).
    Activation,
    /// A pipeline stage's input gradient, to the previous stage (`seq` as for activations).
    Gradient,
    /// Hierarchical dispatch: a relay forwards a source's tokens to a member of its node
    /// (`seq`: exchange << 20 | source member).
    DispatchForward,
    /// Hierarchical combine: a member hands a remote source's rows to its node's relay for that
    /// source (`seq` as for dispatch forwarding).
    CombineForward,
}

impl fmt::Display for CommOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ReduceScatter => "reduce-scatter",
            Self::AllGather => "all-gather",
            Self::AllReduce => "all-reduce",
            Self::Dispatch => "dispatch",
            Self::Combine => "combine",
            Self::Activation => "activation",
            Self::Gradient => "gradient",
            Self::DispatchForward => "dispatch-forward",
            Self::CombineForward => "combine-forward",
        })
    }
}

/// Identifies a frame: which step, which operation, and which instance of it in the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag {
    /// The optimizer step (1-based).
    pub step: u64,
    /// The operation.
    pub op: CommOp,
    /// Distinguishes instances of the operation within the step (a counter, or a layer and
    /// micro-batch key).
    pub seq: u64,
}

impl Tag {
    /// The tag of a pipeline transfer of micro-batch `mb` of direction `dir`.
    pub fn pipeline(step: u64, op: CommOp, dir: u8, mb: usize) -> Self {
        Self {
            step,
            op,
            seq: (u64::from(dir) << 32) | mb as u64,
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            CommOp::Activation | CommOp::Gradient => write!(
                f,
                "{} of micro-batch {}.{} (step {})",
                self.op,
                self.seq >> 32,
                self.seq & 0xffff_ffff,
                self.step
            ),
            _ => write!(f, "{} #{} (step {})", self.op, self.seq, self.step),
        }
    }
}

/// The kind of link a frame crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// Inside a node: shared memory here, NVLink on GPUs.
    Shm,
    /// Between nodes: TCP here, InfiniBand on GPUs.
    Tcp,
}

/// Bytes sent, per link kind and operation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteCounts {
    /// Bytes sent inside the node.
    pub shm: u64,
    /// Bytes sent to other nodes.
    pub tcp: u64,
    /// Bytes of MoE dispatch frames (both links).
    pub dispatch: u64,
    /// Bytes of MoE combine frames (both links).
    pub combine: u64,
    /// Bytes of data-parallel collectives (both links).
    pub collective: u64,
    /// Bytes of pipeline activations and gradients between stages (both links).
    #[serde(default)]
    pub pipeline: u64,
    /// Bytes of MoE dispatch that crossed nodes (part of `tcp` and `dispatch`).
    #[serde(default)]
    pub tcp_dispatch: u64,
    /// Bytes of MoE combine that crossed nodes (part of `tcp` and `combine`).
    #[serde(default)]
    pub tcp_combine: u64,
}

impl ByteCounts {
    fn add(&mut self, link: Link, op: CommOp, n: u64) {
        if link == Link::Tcp {
            match op {
                CommOp::Dispatch | CommOp::DispatchForward => self.tcp_dispatch += n,
                CommOp::Combine | CommOp::CombineForward => self.tcp_combine += n,
                _ => {}
            }
        }
        match link {
            Link::Shm => self.shm += n,
            Link::Tcp => self.tcp += n,
        }
        match op {
            CommOp::Dispatch | CommOp::DispatchForward => self.dispatch += n,
            CommOp::Combine | CommOp::CombineForward => self.combine += n,
            CommOp::Activation | CommOp::Gradient => self.pipeline += n,
            _ => self.collective += n,
        }
    }

    /// Adds another rank's counts.
    pub fn merge(&mut self, o: &ByteCounts) {
        self.shm += o.shm;
        self.tcp += o.tcp;
        self.dispatch += o.dispatch;
        self.combine += o.combine;
        self.collective += o.collective;
        self.pipeline += o.pipeline;
        self.tcp_dispatch += o.tcp_dispatch;
        self.tcp_combine += o.tcp_combine;
    }

    /// What was sent after `earlier` (a snapshot of the same counters).
    pub fn since(&self, earlier: &ByteCounts) -> ByteCounts {
        ByteCounts {
            shm: self.shm - earlier.shm,
            tcp: self.tcp - earlier.tcp,
            dispatch: self.dispatch - earlier.dispatch,
            combine: self.combine - earlier.combine,
            collective: self.collective - earlier.collective,
            pipeline: self.pipeline - earlier.pipeline,
            tcp_dispatch: self.tcp_dispatch - earlier.tcp_dispatch,
            tcp_combine: self.tcp_combine - earlier.tcp_combine,
        }
    }

    /// The counters in order (shm, tcp, dispatch, combine, collective, pipeline, tcp_dispatch,
    /// tcp_combine), for a sum over ranks.
    pub fn to_vec(&self) -> Vec<u64> {
        vec![
            self.shm,
            self.tcp,
            self.dispatch,
            self.combine,
            self.collective,
            self.pipeline,
            self.tcp_dispatch,
            self.tcp_combine,
        ]
    }

    /// The counters of [`Self::to_vec`]'s order (missing ones are 0).
    pub fn from_vec(v: &[u64]) -> Self {
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Self {
            shm: at(0),
            tcp: at(1),
            dispatch: at(2),
            combine: at(3),
            collective: at(4),
            pipeline: at(5),
            tcp_dispatch: at(6),
            tcp_combine: at(7),
        }
    }

    /// All bytes sent.
    pub fn total(&self) -> u64 {
        self.shm + self.tcp
    }
}

/// Moves tagged frames between the ranks of a mesh.
pub trait Transport: Send {
    /// This rank's index in the mesh.
    fn rank(&self) -> usize;
    /// Ranks in the mesh.
    fn world(&self) -> usize;
    /// Sends `payload` to rank `to` (not this rank).
    fn send(&mut self, to: usize, tag: Tag, payload: Vec<u8>) -> Result<()>;
    /// Waits for the frame with `tag` from rank `from`.
    fn recv(&mut self, from: usize, tag: Tag) -> Result<Vec<u8>>;
    /// Waits at most `wait` for the frame with `tag` from rank `from`: `None` if it has not
    /// come yet (the caller decides how long to keep asking; see [`Self::timeout`]). Threads
    /// that share an endpoint wait in such slices, so none blocks the others' sends for long.
    fn recv_within(&mut self, from: usize, tag: Tag, wait: Duration) -> Result<Option<Vec<u8>>>;
    /// How long a wait for a frame may take in all.
    fn timeout(&self) -> Duration;
    /// Bytes this rank has sent so far.
    fn bytes(&self) -> &ByteCounts;
    /// Seconds this rank has spent blocked waiting for frames (exposed communication and
    /// peers' compute), and seconds its network writers have spent writing (in the background).
    fn times(&self) -> (f64, f64) {
        (0.0, 0.0)
    }
    /// The node holding rank `rank` (ranks of one node reach each other without the network).
    fn node(&self, rank: usize) -> usize {
        let _ = rank;
        0
    }
    /// Tells the other ranks of the mesh to stop waiting: this rank has failed.
    fn abort(&self);
}

/// The error of a failed exchange.
pub fn comm_error(rank: usize, peer: usize, tag: Tag, reason: impl ToString) -> WorkerError {
    WorkerError::Comm {
        rank,
        peer,
        op: tag.to_string(),
        reason: reason.to_string(),
    }
}

/// The prefix of the reason given by ranks that stopped because another rank failed.
pub const PEER_FAILED: &str = "stopped: another rank failed";

/// What arrives in a rank's inbox.
pub(crate) enum Msg {
    /// A frame from a peer.
    Frame {
        from: usize,
        tag: Tag,
        payload: Vec<u8>,
    },
    /// The link to a peer broke (closed, reset, or sent bytes that are not a frame).
    Gone { from: usize, reason: String },
}

/// How a rank reaches one peer.
pub(crate) enum PeerLink {
    /// This rank itself.
    Me,
    /// A rank of this process: its inbox.
    Local(mpsc::Sender<Msg>),
    /// A rank of another process: a TCP connection and its writer thread.
    Tcp(TcpLink),
}

/// A frame queued for a connection's writer thread.
pub(crate) struct Outgoing {
    pub(crate) head: Vec<u8>,
    pub(crate) payload: Vec<u8>,
}

/// A TCP connection to a peer, written by its own thread (see [`super::tcp`]).
pub(crate) struct TcpLink {
    /// The socket, to close it when the endpoint goes.
    pub(crate) stream: std::net::TcpStream,
    /// Frames for the writer; `None` once closed.
    pub(crate) queue: Option<mpsc::Sender<Outgoing>>,
    /// Signalled when the writer has written everything queued (or failed).
    pub(crate) done: mpsc::Receiver<()>,
    /// Nanoseconds the writer has spent writing.
    pub(crate) busy: Arc<std::sync::atomic::AtomicU64>,
}

/// The ranks of one process, connected by in-memory queues.
pub struct LocalMesh;

impl LocalMesh {
    /// `world` connected endpoints, one per rank, whose waits give up after `timeout`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize, timeout: Duration) -> Vec<LocalTransport> {
        Self::with_nodes(&vec![0; world], timeout)
    }

    /// [`Self::new`] for ranks that stand for devices of several nodes (`node_of[r]` is rank
    /// `r`'s): the same in-memory queues, with the topology that node-aware exchanges read.
    pub fn with_nodes(node_of: &[usize], timeout: Duration) -> Vec<LocalTransport> {
        let world = node_of.len();
        let abort = Arc::new(AtomicBool::new(false));
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..world).map(|_| mpsc::channel()).unzip();
        inboxes
            .into_iter()
            .enumerate()
            .map(|(rank, inbox)| {
                let links = senders
                    .iter()
                    .enumerate()
                    .map(|(q, s)| {
                        if q == rank {
                            PeerLink::Me
                        } else {
                            PeerLink::Local(s.clone())
                        }
                    })
                    .collect();
                LocalTransport::from_parts(
                    rank,
                    links,
                    node_of.to_vec(),
                    inbox,
                    abort.clone(),
                    timeout,
                )
            })
            .collect()
    }
}

/// One rank's endpoint of a mesh: peers in this process through their inboxes, peers in
/// other processes over TCP (see [`super::tcp`]).
pub struct LocalTransport {
    rank: usize,
    /// Time spent blocked in [`Transport::recv`].
    waited: Duration,
    links: Vec<PeerLink>,
    /// The node of every rank.
    nodes: Vec<usize>,
    inbox: mpsc::Receiver<Msg>,
    stash: HashMap<(usize, Tag), VecDeque<Vec<u8>>>,
    gone: HashMap<usize, String>,
    abort: Arc<AtomicBool>,
    timeout: Duration,
    bytes: ByteCounts,
}

/// The frame header on a TCP link: magic, sender, step, operation, sequence, payload length.
pub(crate) const TCP_HEADER: usize = 4 + 4 + 8 + 1 + 8 + 8;
pub(crate) const TCP_MAGIC: [u8; 4] = *b"SHT1";

pub(crate) fn op_code(op: CommOp) -> u8 {
    match op {
        CommOp::ReduceScatter => 1,
        CommOp::AllGather => 2,
        CommOp::AllReduce => 3,
        CommOp::Dispatch => 4,
        CommOp::Combine => 5,
        CommOp::Activation => 6,
        CommOp::Gradient => 7,
        CommOp::DispatchForward => 8,
        CommOp::CombineForward => 9,
    }
}

pub(crate) fn op_of(code: u8) -> Option<CommOp> {
    Some(match code {
        1 => CommOp::ReduceScatter,
        2 => CommOp::AllGather,
        3 => CommOp::AllReduce,
        4 => CommOp::Dispatch,
        5 => CommOp::Combine,
        6 => CommOp::Activation,
        7 => CommOp::Gradient,
        8 => CommOp::DispatchForward,
        9 => CommOp::CombineForward,
        _ => return None,
    })
}

impl LocalTransport {
    pub(crate) fn from_parts(
        rank: usize,
        links: Vec<PeerLink>,
        nodes: Vec<usize>,
        inbox: mpsc::Receiver<Msg>,
        abort: Arc<AtomicBool>,
        timeout: Duration,
    ) -> Self {
        Self {
            rank,
            waited: Duration::ZERO,
            links,
            nodes,
            inbox,
            stash: HashMap::new(),
            gone: HashMap::new(),
            abort,
            timeout,
            bytes: ByteCounts::default(),
        }
    }
}

/// How long an endpoint going away waits for its writers to send what it queued.
const FLUSH: Duration = Duration::from_secs(10);

impl Drop for LocalTransport {
    /// Lets the writers send every queued frame (for at most [`FLUSH`]), then closes the TCP
    /// links both ways, so the peers' readers (and this rank's) see the end.
    fn drop(&mut self) {
        for link in &mut self.links {
            if let PeerLink::Tcp(l) = link {
                l.queue = None;
            }
        }
        let deadline = Instant::now() + FLUSH;
        for link in &self.links {
            if let PeerLink::Tcp(l) = link {
                let _ = l
                    .done
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()));
                let _ = l.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.links.len()
    }

    fn send(&mut self, to: usize, tag: Tag, payload: Vec<u8>) -> Result<()> {
        if matches!(self.links.get(to), Some(PeerLink::Tcp(_))) && crate::fault::cut("send") {
            for link in &self.links {
                if let PeerLink::Tcp(l) = link {
                    let _ = l.stream.shutdown(std::net::Shutdown::Both);
                }
            }
        }
        let rank = self.rank;
        let n = payload.len() as u64;
        let link = match self.links.get_mut(to) {
            Some(PeerLink::Local(s)) => {
                s.send(Msg::Frame {
                    from: rank,
                    tag,
                    payload,
                })
                .map_err(|_| comm_error(rank, to, tag, "the peer has gone away"))?;
                Link::Shm
            }
            Some(PeerLink::Tcp(link)) => {
                let mut head = Vec::with_capacity(TCP_HEADER);
                head.extend_from_slice(&TCP_MAGIC);
                head.extend_from_slice(&u32::try_from(rank).unwrap_or(u32::MAX).to_le_bytes());
                head.extend_from_slice(&tag.step.to_le_bytes());
                head.push(op_code(tag.op));
                head.extend_from_slice(&tag.seq.to_le_bytes());
                head.extend_from_slice(&n.to_le_bytes());
                // The connection's writer sends it while this rank goes on.
                link.queue
                    .as_ref()
                    .ok_or(())
                    .and_then(|q| q.send(Outgoing { head, payload }).map_err(|_| ()))
                    .map_err(|()| comm_error(rank, to, tag, "the peer has gone away"))?;
                Link::Tcp
            }
            _ => {
                return Err(comm_error(
                    rank,
                    to,
                    tag,
                    format!("no such peer in a mesh of {} ranks", self.links.len()),
                ));
            }
        };
        self.bytes.add(link, tag.op, n);
        Ok(())
    }

    fn recv(&mut self, from: usize, tag: Tag) -> Result<Vec<u8>> {
        if let Some(p) = self.stashed(from, tag)? {
            return Ok(p);
        }
        // Blocked from here on: the wait shows in a trace and counts as exposed time.
        let _span = tracing::debug_span!("wait", from, op = %tag.op, seq = tag.seq).entered();
        let started = Instant::now();
        let r = self.poll(from, tag, started + self.timeout);
        self.waited += started.elapsed();
        r?.ok_or_else(|| {
            comm_error(
                self.rank,
                from,
                tag,
                format!("no frame after {:?}", self.timeout),
            )
        })
    }

    fn recv_within(&mut self, from: usize, tag: Tag, wait: Duration) -> Result<Option<Vec<u8>>> {
        if let Some(p) = self.stashed(from, tag)? {
            return Ok(Some(p));
        }
        let started = Instant::now();
        let r = self.poll(from, tag, started + wait);
        self.waited += started.elapsed();
        r
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn bytes(&self) -> &ByteCounts {
        &self.bytes
    }

    fn times(&self) -> (f64, f64) {
        let wire: u64 = self
            .links
            .iter()
            .map(|l| match l {
                PeerLink::Tcp(t) => t.busy.load(Ordering::Relaxed),
                _ => 0,
            })
            .sum();
        (self.waited.as_secs_f64(), wire as f64 / 1e9)
    }

    fn node(&self, rank: usize) -> usize {
        self.nodes.get(rank).copied().unwrap_or(usize::MAX)
    }

    fn abort(&self) {
        self.abort.store(true, Ordering::Relaxed);
    }
}

impl LocalTransport {
    /// The flag that, once set, makes every endpoint of this process's part of the mesh give
    /// up its waits (as [`Transport::abort`] does): for stopping a job from outside.
    pub fn abort_handle(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.abort)
    }

    /// The frame `tag` from `from` if it arrived earlier; an error if a frame of a step this
    /// rank has left is still waiting (the peer is out of step).
    fn stashed(&mut self, from: usize, tag: Tag) -> Result<Option<Vec<u8>>> {
        if let Some(q) = self.stash.get_mut(&(from, tag))
            && let Some(p) = q.pop_front()
        {
            // Emptied queues go, so the stash (scanned below) holds only waiting frames.
            if q.is_empty() {
                self.stash.remove(&(from, tag));
            }
            return Ok(Some(p));
        }
        if let Some(&(f, t)) = self
            .stash
            .iter()
            .find(|((_, t), q)| t.step < tag.step && !q.is_empty())
            .map(|(k, _)| k)
        {
            return Err(comm_error(
                self.rank,
                f,
                t,
                format!(
                    "a frame of step {} was never taken and this rank is in step {}: the peer \
                     is out of step",
                    t.step, tag.step
                ),
            ));
        }
        Ok(None)
    }

    /// Waits until `until` for the frame `tag` from `from` (it is not in the stash): `None` if
    /// it has not come by then.
    fn poll(&mut self, from: usize, tag: Tag, until: Instant) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(reason) = self.gone.get(&from) {
                return Err(comm_error(
                    self.rank,
                    from,
                    tag,
                    format!("the peer has gone away: {reason}"),
                ));
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(comm_error(self.rank, from, tag, PEER_FAILED));
            }
            // A zero wait still takes a frame that is already there.
            let wait = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            match self.inbox.recv_timeout(wait) {
                Ok(Msg::Frame {
                    from: f,
                    tag: t,
                    payload,
                }) => {
                    if f == from && t == tag {
                        return Ok(Some(payload));
                    }
                    // Ranks move through steps together: a frame of a step this rank has
                    // left was never going to be taken, so the peer is out of step.
                    if t.step < tag.step {
                        return Err(comm_error(
                            self.rank,
                            f,
                            t,
                            format!(
                                "a frame of step {} arrived while this rank waits in step {}: \
                                 the peer is out of step",
                                t.step, tag.step
                            ),
                        ));
                    }
                    self.stash.entry((f, t)).or_default().push_back(payload);
                }
                Ok(Msg::Gone { from: f, reason }) => {
                    self.gone.insert(f, reason);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= until {
                        return Ok(None);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(comm_error(self.rank, from, tag, "the mesh has shut down"));
                }
            }
        }
    }
}
