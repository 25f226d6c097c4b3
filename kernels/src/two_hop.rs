//! The transport of expert-parallel dispatch and combine, host side: which rank each row goes
//! to, where it lands (the layout), and the CPU transport every accelerated one must equal.
//!
//! The layout is computed from the routing, source-major, so a transfer's result does not depend
//! on timing. The warp-specialized two-hop kernel (`kernels/cuda/dispatch.cu`, run by
//! `cuda::dispatch` on GPUs) moves rows to these positions; [`TwoHopRank`] and [`Geometry`]
//! describe its buffers.

use crate::{KernelError, Result};

/// Ring slot header and ring header sizes (must match dispatch.cu).
const SLOT_HDR: usize = 128;
const RING_HDR: usize = 256;
/// Ranks per node at most (an NVLink domain of eight GPUs).
pub const MAX_LOCAL: usize = 8;

/// Where every row of every rank goes.
#[derive(Clone, Debug)]
pub struct Routing {
    /// Ranks, node-major (`rank = node * local + local_index`).
    pub ranks: usize,
    /// Ranks per node (the NVLink domain), at most [`MAX_LOCAL`].
    pub local: usize,
    /// Entries per row.
    pub maxd: usize,
    /// Per rank, `[rows, maxd]` destination ranks, ascending without repeats, `-1` for unused.
    pub dest: Vec<Vec<i32>>,
}

/// Where each entry lands: `pos[s][row * maxd + j]` is the row index at rank `dest` of the entry,
/// and `received[d]` the number of rows rank `d` receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Positions, shaped like [`Routing::dest`] (`-1` for unused entries).
    pub pos: Vec<Vec<i32>>,
    /// Rows received per rank.
    pub received: Vec<usize>,
}

impl Layout {
    /// Checks the layout against `routing`: a position for every entry (`-1` exactly where the
    /// entry is unused), inside the destination's received rows, no two entries on one row.
    pub fn validate(&self, routing: &Routing) -> Result<()> {
        if self.pos.len() != routing.ranks || self.received.len() != routing.ranks {
            return Err(KernelError::shape(
                "dispatch.layout",
                format!("{} ranks", routing.ranks),
                format!(
                    "{} positions, {} receive counts",
                    self.pos.len(),
                    self.received.len()
                ),
            ));
        }
        let mut taken: Vec<Vec<bool>> = self.received.iter().map(|&n| vec![false; n]).collect();
        for (s, (dest, pos)) in routing.dest.iter().zip(&self.pos).enumerate() {
            if dest.len() != pos.len() {
                return Err(KernelError::shape(
                    "dispatch.layout",
                    format!("{} positions at rank {s}", dest.len()),
                    format!("{}", pos.len()),
                ));
            }
            for (e, (&d, &p)) in dest.iter().zip(pos).enumerate() {
                if d < 0 {
                    if p != -1 {
                        return Err(KernelError::invalid(
                            "dispatch.layout",
                            format!("rank {s} entry {e} is unused but has position {p}"),
                        ));
                    }
                    continue;
                }
                let slot = usize::try_from(p)
                    .ok()
                    .and_then(|p| taken[d as usize].get_mut(p));
                match slot {
                    Some(t) if !*t => *t = true,
                    Some(_) => {
                        return Err(KernelError::invalid(
                            "dispatch.layout",
                            format!("rank {s} entry {e}: position {p} at rank {d} is taken twice"),
                        ));
                    }
                    None => {
                        return Err(KernelError::IndexOutOfRange {
                            operand: "dispatch.layout",
                            position: e,
                            index: p.max(0) as usize,
                            bound: self.received[d as usize],
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl Routing {
    /// Checks the routing; returns the row count of each rank.
    pub fn validate(&self) -> Result<Vec<usize>> {
        if self.local == 0
            || self.local > MAX_LOCAL
            || self.ranks == 0
            || !self.ranks.is_multiple_of(self.local)
        {
            return Err(KernelError::invalid(
                "dispatch.local",
                format!(
                    "{} ranks in nodes of {} (1..={MAX_LOCAL} per node, whole nodes)",
                    self.ranks, self.local
                ),
            ));
        }
        if self.ranks / self.local > 64 || self.local > 64 {
            return Err(KernelError::invalid("dispatch.ranks", "at most 64 nodes"));
        }
        if self.dest.len() != self.ranks {
            return Err(KernelError::shape(
                "dispatch.dest",
                format!("{} ranks", self.ranks),
                format!("{} ranks", self.dest.len()),
            ));
        }
        if self.maxd == 0 {
            return Err(KernelError::invalid("dispatch.maxd", "must be at least 1"));
        }
        let mut rows = Vec::with_capacity(self.ranks);
        for (s, d) in self.dest.iter().enumerate() {
            if d.len() % self.maxd != 0 {
                return Err(KernelError::shape(
                    "dispatch.dest",
                    format!("[rows, {}]", self.maxd),
                    format!("{} entries at rank {s}", d.len()),
                ));
            }
            for (i, row) in d.chunks(self.maxd).enumerate() {
                let mut last = -1i32;
                for &r in row.iter().filter(|&&r| r >= 0) {
                    if r as usize >= self.ranks {
                        return Err(KernelError::IndexOutOfRange {
                            operand: "dispatch.dest",
                            position: s * 1_000_000 + i,
                            index: r as usize,
                            bound: self.ranks,
                        });
                    }
                    if r <= last {
                        return Err(KernelError::invalid(
                            "dispatch.dest",
                            format!("rank {s} row {i}: destinations must ascend without repeats"),
                        ));
                    }
                    last = r;
                }
            }
            rows.push(d.len() / self.maxd);
        }
        Ok(rows)
    }

    /// The source-major layout: rank `d` receives the rows of rank 0 first (in row order), then
    /// those of rank 1, and so on.
    pub fn layout(&self) -> Result<Layout> {
        self.validate()?;
        let mut counts = vec![vec![0usize; self.ranks]; self.ranks];
        for (s, d) in self.dest.iter().enumerate() {
            for &r in d.iter().filter(|&&r| r >= 0) {
                counts[s][r as usize] += 1;
            }
        }
        let mut next = vec![vec![0usize; self.ranks]; self.ranks];
        let mut received = vec![0usize; self.ranks];
        for d in 0..self.ranks {
            let mut acc = 0;
            for s in 0..self.ranks {
                next[s][d] = acc;
                acc += counts[s][d];
            }
            received[d] = acc;
        }
        let pos = self
            .dest
            .iter()
            .enumerate()
            .map(|(s, d)| {
                d.iter()
                    .map(|&r| {
                        if r < 0 {
                            return -1;
                        }
                        let p = next[s][r as usize];
                        next[s][r as usize] += 1;
                        p as i32
                    })
                    .collect()
            })
            .collect();
        Ok(Layout { pos, received })
    }
}

/// One rank's rows: `rows` rows of `len0` bytes in `part0` and `len1` bytes in `part1`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    /// First part (FP8 codes, or BF16 values for combine).
    pub part0: Vec<u8>,
    /// Second part (FP32 tile scales for dispatch; empty for combine).
    pub part1: Vec<u8>,
}

/// What one rank received: rows in layout order and, per row, (source rank, source row, entry).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Received {
    /// The rows.
    pub rows: Rows,
    /// Where each came from.
    pub meta: Vec<[i32; 3]>,
}

/// The CPU transport: every entry's row copied to its place. The reference the GPU must equal.
pub fn cpu_transfer(
    routing: &Routing,
    layout: &Layout,
    inputs: &[Rows],
    len0: usize,
    len1: usize,
) -> Result<Vec<Received>> {
    let rows = routing.validate()?;
    layout.validate(routing)?;
    check_inputs(&rows, inputs, len0, len1)?;
    let mut out: Vec<Received> = layout
        .received
        .iter()
        .map(|&n| Received {
            rows: Rows {
                part0: vec![0; n * len0],
                part1: vec![0; n * len1],
            },
            meta: vec![[0; 3]; n],
        })
        .collect();
    for (s, (dest, pos)) in routing.dest.iter().zip(&layout.pos).enumerate() {
        for (e, (&d, &p)) in dest.iter().zip(pos).enumerate() {
            if d < 0 {
                continue;
            }
            let (row, j) = (e / routing.maxd, e % routing.maxd);
            let (d, p) = (d as usize, p as usize);
            out[d].rows.part0[p * len0..(p + 1) * len0]
                .copy_from_slice(&inputs[s].part0[row * len0..(row + 1) * len0]);
            out[d].rows.part1[p * len1..(p + 1) * len1]
                .copy_from_slice(&inputs[s].part1[row * len1..(row + 1) * len1]);
            out[d].meta[p] = [s as i32, row as i32, j as i32];
        }
    }
    Ok(out)
}

/// Checks each rank's input rows against its row count.
pub fn check_inputs(rows: &[usize], inputs: &[Rows], len0: usize, len1: usize) -> Result<()> {
    if inputs.len() != rows.len() {
        return Err(KernelError::shape(
            "dispatch.inputs",
            format!("{} ranks", rows.len()),
            format!("{} ranks", inputs.len()),
        ));
    }
    for (s, (inp, &n)) in inputs.iter().zip(rows).enumerate() {
        if inp.part0.len() != n * len0 || inp.part1.len() != n * len1 {
            return Err(KernelError::shape(
                "dispatch.inputs",
                format!("rank {s}: {n} rows of {len0} + {len1} bytes"),
                format!("{} + {} bytes", inp.part0.len(), inp.part1.len()),
            ));
        }
    }
    Ok(())
}

/// A transfer's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transfer {
    /// What each rank received.
    pub received: Vec<Received>,
    /// Wall time of the kernel alone (launch to completion), without the host copies.
    pub kernel_seconds: f64,
}

/// Kernel geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferConfig {
    /// Blocks (SMs) per rank; the paper gives 20 SMs to communication.
    pub sms: usize,
    /// Slots per ring.
    pub slots: usize,
    /// Receiver warps per block.
    pub receivers: usize,
    /// Clock cycles a warp may wait without progress before the kernel reports a timeout.
    pub spin_limit_cycles: i64,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            sms: 20,
            slots: 8,
            receivers: 2,
            spin_limit_cycles: 20_000_000_000,
        }
    }
}

/// `repr(C)` mirror of `struct TwoHopRank` in dispatch.cu: one rank's buffers, as addresses (device
/// pointers on a GPU, host pointers under the CPU emulation of the kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TwoHopRank {
    /// Input part 0, `[rows, len0]` bytes.
    pub in0: u64,
    /// Input part 1, `[rows, len1]` bytes.
    pub in1: u64,
    /// `[rows, maxd]` destination ranks.
    pub dest: u64,
    /// `[rows, maxd]` positions.
    pub pos: u64,
    /// Rows.
    pub rows: i32,
    /// Padding (the CUDA struct's alignment).
    pub pad: i32,
    /// Output part 0.
    pub out0: u64,
    /// Output part 1.
    pub out1: u64,
    /// `[received, 3]` provenance.
    pub out_meta: u64,
    /// This rank's inbound rings ([`Geometry::rings_per_rank`] bytes, zeroed).
    pub rings: u64,
}

/// Sizes of the rings for rows of `len0 + len1` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per slot (header and both parts, each rounded up to 16 bytes).
    pub slot_bytes: usize,
    /// Bytes per ring (its head/tail header and its slots).
    pub ring_bytes: usize,
    /// Bytes of inbound rings per rank (two hops x SMs x senders).
    pub rings_per_rank: usize,
}

impl Geometry {
    /// The geometry of a transfer among `ranks` ranks with `cfg`.
    pub fn new(ranks: usize, (len0, len1): (usize, usize), cfg: &TransferConfig) -> Self {
        let slot_bytes = SLOT_HDR + len0.next_multiple_of(16) + len1.next_multiple_of(16);
        let ring_bytes = RING_HDR + cfg.slots * slot_bytes;
        Self {
            slot_bytes,
            ring_bytes,
            rings_per_rank: 2 * cfg.sms * ranks * ring_bytes,
        }
    }
}

/// The CPU reference of `Gpu::combine_reduce` (feature `cuda`).
pub fn cpu_combine_reduce(
    staged: &[u16],
    dest: &[i32],
    rows: usize,
    maxd: usize,
    hidden: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * hidden];
    for r in 0..rows {
        for j in 0..maxd {
            if dest[r * maxd + j] < 0 {
                continue;
            }
            let src = &staged[(r * maxd + j) * hidden..(r * maxd + j + 1) * hidden];
            for (o, &v) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(src) {
                *o += half::bf16::from_bits(v).to_f32();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing() -> Routing {
        // 4 ranks in 2 nodes of 2, two rows each, up to 2 destinations per row.
        Routing {
            ranks: 4,
            local: 2,
            maxd: 2,
            dest: vec![
                vec![1, 3, 0, -1],
                vec![1, -1, -1, -1],
                vec![0, 1, 2, 3],
                vec![-1, -1, 3, -1],
            ],
        }
    }

    #[test]
    fn the_layout_is_source_major_and_the_cpu_transfer_follows_it() {
        let r = routing();
        let l = r.layout().unwrap();
        assert_eq!(l.received, vec![2, 3, 1, 3]);
        // Rank 1 receives rank 0's row 0, then rank 1's row 0, then rank 2's row 0.
        assert_eq!(
            l.pos,
            vec![
                vec![0, 0, 0, -1],
                vec![1, -1, -1, -1],
                vec![1, 2, 0, 1],
                vec![-1, -1, 2, -1]
            ]
        );
        let inputs: Vec<Rows> = (0..4)
            .map(|s| Rows {
                part0: vec![s as u8 * 10, s as u8 * 10 + 1],
                part1: vec![],
            })
            .collect();
        let out = cpu_transfer(&r, &l, &inputs, 1, 0).unwrap();
        assert_eq!(out[1].rows.part0, vec![0, 10, 20]);
        assert_eq!(out[1].meta, vec![[0, 0, 0], [1, 0, 0], [2, 0, 1]]);
        assert_eq!(out[3].rows.part0, vec![0, 21, 31]);
    }

    #[test]
    fn bad_routings_and_layouts_are_refused_by_name() {
        let mut r = routing();
        r.dest[2][1] = 0; // not ascending
        assert!(matches!(
            r.layout(),
            Err(KernelError::InvalidArgument {
                name: "dispatch.dest",
                ..
            })
        ));
        let mut r = routing();
        r.dest[0][0] = 9;
        assert!(matches!(
            r.layout(),
            Err(KernelError::IndexOutOfRange {
                operand: "dispatch.dest",
                ..
            })
        ));
        let r = routing();
        let mut l = r.layout().unwrap();
        l.pos[2][3] = 0; // collides with rank 0's row 0 at rank 3
        assert!(matches!(
            l.validate(&r),
            Err(KernelError::InvalidArgument {
                name: "dispatch.layout",
                ..
            })
        ));
        let mut l = r.layout().unwrap();
        l.pos[1][0] = 7;
        assert!(matches!(
            l.validate(&r),
            Err(KernelError::IndexOutOfRange {
                operand: "dispatch.layout",
                ..
            })
        ));
        let bad = Routing {
            ranks: 3,
            local: 2,
            maxd: 1,
            dest: vec![vec![]; 3],
        };
        assert!(matches!(
            bad.validate(),
            Err(KernelError::InvalidArgument {
                name: "dispatch.local",
                ..
            })
        ));
    }
}
