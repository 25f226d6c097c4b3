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

/// A value collectives move: fixed-width little-endian on the wire, and summable.
pub trait Elem: Copy + std::ops::AddAssign {
    /// Bytes per value.
    const WIDTH: usize;
    /// Appends the value's bytes.
    fn put(self, out: &mut Vec<u8>);
    /// Reads a value from `WIDTH` bytes.
    fn get(b: &[u8]) -> Self;
}

macro_rules! elem {
    ($t:ty, $w:expr) => {
        impl Elem for $t {
            const WIDTH: usize = $w;
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; $w];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
        }
    };
}
elem!(f32, 4);
elem!(f64, 8);
elem!(u64, 8);

/// The values' bytes.
pub fn encode<V: Elem>(x: &[V]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() * V::WIDTH);
    for v in x {
        v.put(&mut out);
    }
    out
}

/// The `want` values of a frame from `peer`; a frame of another length is an error naming the
/// peer and the operation.
pub fn decode<V: Elem>(
    t: &dyn Transport,
    peer: usize,
    tag: Tag,
    bytes: &[u8],
    want: usize,
) -> Result<Vec<V>> {
    if bytes.len() != want * V::WIDTH {
        return Err(comm_error(
            t.rank(),
            peer,
            tag,
            format!(
                "frame of {} bytes, expected {} ({} values)",
                bytes.len(),
                want * V::WIDTH,
                want
            ),
        ));
    }
    Ok(bytes.chunks_exact(V::WIDTH).map(V::get).collect())
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

/// Sends member `i` the values `piece(i)`, receives this member's `want` values from every
/// other member, and sums all contributions to this member (its own `piece(me)` included) in
/// member order.
fn sum_in_member_order<'v, V: Elem + 'v>(
    t: &mut dyn Transport,
    g: &Group,
    tag: Tag,
    piece: impl Fn(usize) -> &'v [V],
) -> Result<Vec<V>> {
    let me = member(t, g, tag)?;
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i != me {
            t.send(peer, tag, encode(piece(i)))?;
        }
    }
    let want = piece(me).len();
    let mut acc: Option<Vec<V>> = None;
    for (i, &peer) in g.ranks.iter().enumerate() {
        let v = if i == me {
            piece(me).to_vec()
        } else {
            let b = t.recv(peer, tag)?;
            decode(t, peer, tag, &b, want)?
        };
        match acc.as_mut() {
            None => acc = Some(v),
            Some(a) => {
                for (x, y) in a.iter_mut().zip(v) {
                    *x += y;
                }
            }
        }
    }
    Ok(acc.unwrap_or_default())
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
    sum_in_member_order(t, g, tag, |i| &data[bounds[i].clone()])
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
    let bytes = encode(own);
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i != me {
            t.send(peer, tag, bytes.clone())?;
        }
    }
    let mut out = vec![0f32; len];
    out[bounds[me].clone()].copy_from_slice(own);
    for (i, &peer) in g.ranks.iter().enumerate() {
        if i != me {
            let b = t.recv(peer, tag)?;
            let v: Vec<f32> = decode(t, peer, tag, &b, bounds[i].len())?;
            out[bounds[i].clone()].copy_from_slice(&v);
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
    sum_in_member_order(t, g, tag, |_| values)
}

/// Sums counters over the group (exact).
pub fn all_reduce_u64(
    t: &mut dyn Transport,
    g: &Group,
    tag: Tag,
    values: &[u64],
) -> Result<Vec<u64>> {
    sum_in_member_order(t, g, tag, |_| values)
}

/// Splits `0..len` into `parts` consecutive ranges whose lengths differ by at most one.
pub fn even_bounds(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| len * i / parts..len * (i + 1) / parts)
        .collect()
}
