//! The inter-node transport: the ranks of a mesh that live in other processes are reached over
//! TCP (InfiniBand on GPUs), the ranks of this process through their inboxes.
//!
//! Every process listens on one address. For each pair of ranks on different nodes, the higher
//! rank connects to the lower rank's node and opens with a handshake (magic `SHC1`, the mesh id,
//! its rank and the rank it wants), so connections of another mesh or a stray client are refused.
//! Each connection has two communication threads: a writer that sends the frames its rank
//! queues, in order, while the rank goes on computing, and a reader that turns the byte stream
//! into frames in the receiving rank's inbox (so a sender never blocks on a peer that is itself
//! sending). When the stream ends, or carries bytes that are not a frame, the reader reports the
//! peer gone and every wait for it fails at once with the reason.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::transport::{
    LocalTransport, Msg, Outgoing, PeerLink, TCP_HEADER, TCP_MAGIC, Tag, TcpLink, op_of,
};
use crate::{Result, WorkerError};

const HELLO_MAGIC: [u8; 4] = *b"SHC1";
/// The largest frame a peer may announce (a step's gradients of a large stage fit).
pub const MAX_FRAME: u64 = 1 << 34;

/// Where the ranks of a mesh live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshLayout {
    /// Identifies the mesh (a job and attempt): connections of another mesh are refused.
    pub mesh_id: u64,
    /// The node of every rank.
    pub node_of: Vec<usize>,
    /// Every node's listening address.
    pub addrs: Vec<SocketAddr>,
}

fn mesh_err(reason: impl Into<String>) -> WorkerError {
    WorkerError::invalid("mesh", reason.into())
}

fn hello(mesh_id: u64, from: usize, to: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&HELLO_MAGIC);
    b.extend_from_slice(&mesh_id.to_le_bytes());
    b.extend_from_slice(&u32::try_from(from).unwrap_or(u32::MAX).to_le_bytes());
    b.extend_from_slice(&u32::try_from(to).unwrap_or(u32::MAX).to_le_bytes());
    b
}

/// Reads a greeting: the mesh, the dialing rank and the rank it wants.
fn read_hello(s: &mut TcpStream) -> std::result::Result<(u64, usize, usize), String> {
    let mut b = [0u8; 20];
    s.read_exact(&mut b)
        .map_err(|e| format!("handshake: {e}"))?;
    if b[..4] != HELLO_MAGIC {
        return Err(format!("handshake magic {:?}", &b[..4]));
    }
    let id = u64::from_le_bytes(b[4..12].try_into().unwrap_or([0; 8]));
    let from = u32::from_le_bytes(b[12..16].try_into().unwrap_or([0; 4])) as usize;
    let to = u32::from_le_bytes(b[16..20].try_into().unwrap_or([0; 4])) as usize;
    Ok((id, from, to))
}

/// A greeted connection handed to its mesh: the dialing rank, the rank it wants, the socket.
type Greeted = (usize, usize, TcpStream);

/// How long a connection for a mesh that is not registered yet waits for it (its job may start
/// connecting a little later on this node than on the dialing one).
const PENDING: Duration = Duration::from_secs(60);

/// A mesh asking for its connections.
struct Register {
    mesh_id: u64,
    tx: mpsc::Sender<Greeted>,
}

/// A node's data-plane listener as an actor: a thread owns the socket, accepts every
/// connection, reads its greeting and hands it to the mesh it names, so the meshes of several
/// jobs share the node's one address. A connection for a mesh not registered yet waits up to a
/// minute; one with a bad greeting is dropped. The handle is cheap to clone; the thread ends
/// when every handle is gone.
#[derive(Clone, Debug)]
pub struct Acceptor {
    tx: mpsc::Sender<Register>,
    addr: SocketAddr,
}

impl Acceptor {
    /// Starts accepting on `listener`.
    pub fn start(listener: TcpListener) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map_err(|e| mesh_err(format!("listener: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| mesh_err(format!("listener: {e}")))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("mesh-listen".into())
            .spawn(move || accept_loop(&listener, &rx))
            .map_err(|e| mesh_err(format!("cannot start the listening thread: {e}")))?;
        Ok(Self { tx, addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connections greeting with `mesh_id`, from now until the receiver is dropped.
    fn register(&self, mesh_id: u64) -> Result<mpsc::Receiver<Greeted>> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Register { mesh_id, tx })
            .map_err(|_| mesh_err("the listening thread has stopped"))?;
        Ok(rx)
    }
}

fn accept_loop(listener: &TcpListener, registrations: &mpsc::Receiver<Register>) {
    let mut meshes: HashMap<u64, mpsc::Sender<Greeted>> = HashMap::new();
    let mut pending: Vec<(Instant, u64, Greeted)> = Vec::new();
    loop {
        loop {
            match registrations.try_recv() {
                Ok(Register { mesh_id, tx }) => {
                    let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut pending)
                        .into_iter()
                        .partition(|(_, id, _)| *id == mesh_id);
                    pending = others;
                    for (_, _, g) in mine {
                        let _ = tx.send(g);
                    }
                    meshes.insert(mesh_id, tx);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        match listener.accept() {
            Ok((mut s, _)) => {
                let greeted = s
                    .set_nonblocking(false)
                    .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(5))))
                    .map_err(|e| e.to_string())
                    .and_then(|()| read_hello(&mut s))
                    .and_then(|g| {
                        s.set_read_timeout(None).map_err(|e| e.to_string())?;
                        Ok(g)
                    });
                // A stray or malformed connection is dropped.
                let Ok((id, from, to)) = greeted else {
                    continue;
                };
                let g = match meshes.get(&id) {
                    Some(tx) => match tx.send((from, to, s)) {
                        Ok(()) => continue,
                        // That mesh has finished connecting: the dial is for a later one of
                        // the same id, which waits for it like an unregistered mesh.
                        Err(mpsc::SendError(g)) => {
                            meshes.remove(&id);
                            g
                        }
                    },
                    None => (from, to, s),
                };
                pending.push((Instant::now(), id, g));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a data-plane connection");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        pending.retain(|(at, _, _)| at.elapsed() < PENDING);
    }
}

/// The sending side of a connection, on its own thread: writes the frames the rank queued, in
/// order, while the rank computes; counts the time it spends writing. When the queue closes it
/// has written every frame and closes its half; when a write fails it tells the rank's inbox
/// that the peer is gone (later sends then fail too: the queue is closed).
fn writer(
    mut s: TcpStream,
    peer: usize,
    outgoing: &mpsc::Receiver<Outgoing>,
    inbox: &mpsc::Sender<Msg>,
    busy: &AtomicU64,
) {
    while let Ok(Outgoing { head, payload }) = outgoing.recv() {
        let t0 = Instant::now();
        let r = s.write_all(&head).and_then(|()| s.write_all(&payload));
        busy.fetch_add(
            u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Err(e) = r {
            let _ = inbox.send(Msg::Gone {
                from: peer,
                reason: format!("sending: {e}"),
            });
            return;
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// Reads frames from `peer` into `inbox` until the stream ends or breaks.
fn reader(mut s: TcpStream, peer: usize, inbox: mpsc::Sender<Msg>) {
    let gone = |reason: String| Msg::Gone { from: peer, reason };
    loop {
        let mut h = [0u8; TCP_HEADER];
        if let Err(e) = s.read_exact(&mut h) {
            let reason = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the connection closed".to_string()
            } else {
                format!("reading: {e}")
            };
            let _ = inbox.send(gone(reason));
            return;
        }
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        let from = u32::from_le_bytes(h[4..8].try_into().unwrap_or([0; 4])) as usize;
        let (step, op, seq, len) = (u64_at(8), op_of(h[16]), u64_at(17), u64_at(25));
        let bad = if h[..4] != TCP_MAGIC {
            Some(format!("a frame with magic {:?}", &h[..4]))
        } else if from != peer {
            Some(format!("a frame claiming to come from rank {from}"))
        } else if op.is_none() {
            Some(format!("a frame of unknown operation {}", h[16]))
        } else if len > MAX_FRAME {
            Some(format!("a frame of {len} bytes (at most {MAX_FRAME})"))
        } else {
            None
        };
        let (Some(op), None) = (op, bad.clone()) else {
            let _ = inbox.send(gone(format!("malformed: {}", bad.unwrap_or_default())));
            return;
        };
        let mut payload = vec![0u8; len as usize];
        if let Err(e) = s.read_exact(&mut payload) {
            let _ = inbox.send(gone(format!(
                "the connection broke inside a frame of {len} bytes: {e}"
            )));
            return;
        }
        let tag = Tag { step, op, seq };
        if inbox
            .send(Msg::Frame {
                from: peer,
                tag,
                payload,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Connects this node's ranks (`layout.node_of[r] == node`) to every rank of the mesh and
/// returns their endpoints, in rank order. `listener` is this node's listening socket
/// (`layout.addrs[node]`), used by this mesh alone. Fails, naming the missing peers, when the
/// mesh is not complete within `timeout`.
pub fn connect(
    layout: &MeshLayout,
    node: usize,
    listener: TcpListener,
    timeout: Duration,
) -> Result<Vec<LocalTransport>> {
    connect_via(layout, node, &Acceptor::start(listener)?, timeout)
}

/// [`connect`] through a node's [`Acceptor`], which other meshes may share.
pub fn connect_via(
    layout: &MeshLayout,
    node: usize,
    acceptor: &Acceptor,
    timeout: Duration,
) -> Result<Vec<LocalTransport>> {
    let world = layout.node_of.len();
    if let Some(r) = layout.node_of.iter().position(|&n| n >= layout.addrs.len()) {
        return Err(mesh_err(format!(
            "rank {r} is on node {} of {}",
            layout.node_of[r],
            layout.addrs.len()
        )));
    }
    let local: Vec<usize> = (0..world).filter(|&r| layout.node_of[r] == node).collect();
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..world).map(|_| mpsc::channel()).unzip();
    let mut streams: HashMap<(usize, usize), TcpStream> = HashMap::new();
    let deadline = Instant::now() + timeout;

    // Accept the connections of higher remote ranks to this node's lower ranks.
    let expected: usize = local
        .iter()
        .map(|&a| {
            (a + 1..world)
                .filter(|&b| layout.node_of[b] != node)
                .count()
        })
        .sum();
    let incoming = acceptor.register(layout.mesh_id)?;
    let accepter = {
        let node_of = layout.node_of.clone();
        std::thread::Builder::new()
            .name("mesh-accept".into())
            .spawn(
                move || -> std::result::Result<Vec<(usize, usize, TcpStream)>, String> {
                    let mut got = Vec::new();
                    while got.len() < expected {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let Ok((from, to, s)) = incoming.recv_timeout(left) else {
                            return Err(format!(
                                "{} of {expected} peer connections arrived",
                                got.len()
                            ));
                        };
                        // A connection that does not belong here is dropped; the mesh waits on.
                        let valid = from < node_of.len()
                            && to < node_of.len()
                            && node_of[to] == node
                            && node_of[from] != node
                            && to < from
                            && !got.iter().any(|(f, t, _)| (*f, *t) == (from, to));
                        if valid {
                            got.push((from, to, s));
                        }
                    }
                    Ok(got)
                },
            )
            .map_err(|e| mesh_err(format!("cannot start the accepting thread: {e}")))?
    };

    // Connect this node's higher ranks to lower remote ranks.
    for &b in &local {
        for a in (0..b).filter(|&a| layout.node_of[a] != node) {
            let addr = layout.addrs[layout.node_of[a]];
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(mesh_err(format!(
                            "rank {b} cannot reach rank {a} at {addr}: {e}"
                        )));
                    }
                }
            };
            s.write_all(&hello(layout.mesh_id, b, a))
                .map_err(|e| mesh_err(format!("rank {b} greeting rank {a} at {addr}: {e}")))?;
            streams.insert((b, a), s);
        }
    }
    let accepted = accepter
        .join()
        .map_err(|_| mesh_err("the accepting thread panicked"))?
        .map_err(|e| mesh_err(format!("node {node}: {e}")))?;
    for (from, to, s) in accepted {
        streams.insert((to, from), s);
    }

    let abort = Arc::new(AtomicBool::new(false));
    let mut out = Vec::with_capacity(local.len());
    let mut inboxes: Vec<Option<mpsc::Receiver<Msg>>> = inboxes.into_iter().map(Some).collect();
    for &r in &local {
        let mut links = Vec::with_capacity(world);
        for q in 0..world {
            let link = if q == r {
                PeerLink::Me
            } else if layout.node_of[q] == node {
                PeerLink::Local(senders[q].clone())
            } else {
                let s = streams
                    .remove(&(r, q))
                    .ok_or_else(|| mesh_err(format!("rank {r} has no connection to rank {q}")))?;
                s.set_nodelay(true)
                    .map_err(|e| mesh_err(format!("rank {r} to rank {q}: {e}")))?;
                let read = s
                    .try_clone()
                    .map_err(|e| mesh_err(format!("rank {r} to rank {q}: {e}")))?;
                let write = s
                    .try_clone()
                    .map_err(|e| mesh_err(format!("rank {r} to rank {q}: {e}")))?;
                let inbox = senders[r].clone();
                std::thread::Builder::new()
                    .name(format!("mesh-read-{r}-{q}"))
                    .spawn(move || reader(read, q, inbox))
                    .map_err(|e| mesh_err(format!("cannot start a reader thread: {e}")))?;
                let (queue, outgoing) = mpsc::channel();
                let (done_tx, done) = mpsc::channel();
                let busy = Arc::new(AtomicU64::new(0));
                let (inbox, wire) = (senders[r].clone(), Arc::clone(&busy));
                std::thread::Builder::new()
                    .name(format!("mesh-write-{r}-{q}"))
                    .spawn(move || {
                        writer(write, q, &outgoing, &inbox, &wire);
                        let _ = done_tx.send(());
                    })
                    .map_err(|e| mesh_err(format!("cannot start a writer thread: {e}")))?;
                PeerLink::Tcp(TcpLink {
                    stream: s,
                    queue: Some(queue),
                    done,
                    busy,
                })
            };
            links.push(link);
        }
        let inbox = inboxes[r]
            .take()
            .ok_or_else(|| mesh_err(format!("rank {r} listed twice")))?;
        out.push(LocalTransport::from_parts(
            r,
            links,
            layout.node_of.clone(),
            inbox,
            abort.clone(),
            timeout,
        ));
    }
    Ok(out)
}
