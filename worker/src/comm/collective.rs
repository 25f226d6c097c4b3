//! Collectives over a [`Transport`]: reduce-scatter, all-gather and all-reduce within a group of
//! ranks.
//!
//! Sums are taken in the group's rank order (member 0's contribution, plus member 1's, ...) on
//! every member, so every rank computes bit-identical results whatever order frames arrive in.
//! Each member sends its pieces directly to the others (one hop; the groups of a tiny model are
//! small). Malformed frames (a length that does not match the piece) are errors naming the peer.

use std::ops::Range;

use super::transport::{Tag, Transport, comm_error};
use crate::Result;

/// The ranks taking part in a collective, in the order their contributions are summed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Member ranks (mesh indices).
    pub ranks: Vec<usize>,
}

impl Group {
    /// This rank's position in the group, if it is a member.
    pub fn position(&self, rank: usize) -> Option<usize> {
        self.ranks.iter().position(|&r| r == rank)
    }
}

fn encode_f32(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_into(
    t: &dyn Transport,
    peer: usize,
    tag: Tag,
    bytes: &[u8],
    elem: usize,
    want: usize,
) -> Result<()> {
    if bytes.len() != want * elem {
        return Err(comm_error(
            t.rank(),
            peer,
            tag,
            format!(
                "frame of {} bytes, expected {} ({} values)",
                bytes.len(),
                want * elem,
                want
            ),
        ));
    }
    Ok(())
}

fn member(t: &dyn Transport, g: &Group, tag: Tag) -> Result<usize> {
    g.position(t.rank()).ok_or_else(|| {
        comm_error(
            t.rank(),
            t.rank(),
            tag,
            format!("not a member of the group {:?}", g.ranks),
        )
    })
}

/// Sums `data` (the whole vector, the same length on every member) over the group and returns
/// this member's piece of the sum: `bounds[i]` is the piece member `i` keeps.
pub fn reduce_scatter(
    t: &mut dyn Transport,
    g: &Group,
    tag: Tag,
    data: &[f32],
    bounds: &[Range<usize>],
) -> Result<Vec<f32>> {
    let me = member(t, g, tag)?;
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i != me {
            t.send(peer, tag, encode_f32(&data[bounds[i].clone()]))?;
        }
    }
    let mine = bounds[me].clone();
    let mut acc: Option<Vec<f32>> = None;
    for (i, &peer) in g.ranks.iter().enumerate() {
        let piece: Vec<f32> = if i == me {
            data[mine.clone()].to_vec()
        } else {
            let bytes = t.recv(peer, tag)?;
            decode_into(t, peer, tag, &bytes, 4, mine.len())?;
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        match acc.as_mut() {
            None => acc = Some(piece),
            Some(a) => {
                for (x, y) in a.iter_mut().zip(&piece) {
                    *x += y;
                }
            }
        }
    }
    Ok(acc.unwrap_or_default())
}

/// Every member contributes its piece `bounds[me]` (`own`); returns the whole vector.
pub fn all_gather(
    t: &mut dyn Transport,
    g: &Group,
    tag: Tag,
    own: &[f32],
    bounds: &[Range<usize>],
) -> Result<Vec<f32>> {
    let me = member(t, g, tag)?;
    let len = bounds.iter().map(|b| b.end).max().unwrap_or(0);
    let bytes = encode_f32(own);
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i != me {
            t.send(peer, tag, bytes.clone())?;
        }
    }
    let mut out = vec![0f32; len];
    out[bounds[me].clone()].copy_from_slice(own);
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i == me {
            continue;
        }
        let b = t.recv(peer, tag)?;
        decode_into(t, peer, tag, &b, 4, bounds[i].len())?;
        for (o, c) in out[bounds[i].clone()].iter_mut().zip(b.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(out)
}

/// Sums `values` over the group, in member order; every member gets the same result.
pub fn all_reduce_f64(
    t: &mut dyn Transport,
    g: &Group,
    tag: Tag,
    values: &[f64],
) -> Result<Vec<f64>> {
    let me = member(t, g, tag)?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i != me {
            t.send(peer, tag, bytes.clone())?;
        }
    }
    let mut acc: Option<Vec<f64>> = None;
    for (i, &peer) in g.ranks.iter().enumerate() {
        let v: Vec<f64> = if i == me {
            values.to_vec()
        } else {
            let b = t.recv(peer, tag)?;
            decode_into(t, peer, tag, &b, 8, values.len())?;
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        };
        match acc.as_mut() {
            None => acc = Some(v),
            Some(a) => {
                for (x, y) in a.iter_mut().zip(&v) {
                    *x += y;
                }
            }
        }
    }
    Ok(acc.unwrap_or_default())
}

/// Sums counters over the group (exact).
pub fn all_reduce_u64(
    t: &mut dyn Transport,
    g: &Group,
    tag: Tag,
    values: &[u64],
) -> Result<Vec<u64>> {
    let me = member(t, g, tag)?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i != me {
            t.send(peer, tag, bytes.clone())?;
        }
    }
    let mut acc = values.to_vec();
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i == me {
            continue;
        }
        let b = t.recv(peer, tag)?;
        decode_into(t, peer, tag, &b, 8, values.len())?;
        for (x, c) in acc.iter_mut().zip(b.chunks_exact(8)) {
            *x += u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
    }
    Ok(acc)
}

/// Splits `0..len` into `parts` consecutive ranges whose lengths differ by at most one.
pub fn even_bounds(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| len * i / parts..len * (i + 1) / parts)
        .collect()
}
