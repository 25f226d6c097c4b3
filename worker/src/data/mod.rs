//! Training data: token sources and batching.
//!
//! # Sources
//!
//! A [`DataSpec`] names where tokens come from, and [`TokenSource::load`] reads it, checking
//! every token id against the model's vocabulary:
//!
//! * [`DataSpec::Synthetic`]: a built-in, seeded corpus with structure at several ranges (topic
//!   Markov chains, counting runs, long-range copies), generated up front in memory; see
//!   [`synthetic`] for the generator. It needs a vocabulary of at least 256 tokens.
//! * [`DataSpec::TokenFile`]: a flat file of little-endian token ids, `u16` or `u32`
//!   ([`TokenDtype`], chosen by the caller: nothing in the file says which). A size that is not a
//!   multiple of the element size is an error naming the file.
//! * [`DataSpec::TextFile`]: any file read as raw bytes, each byte one token id `0..=255`; it needs
//!   a vocabulary of at least 256 tokens.
//!
//! An id at or above the vocabulary size is an error naming the file, the token position and the
//! id. Sources are kept in memory at their own width (one byte a token for text, two for `u16`
//! files), never widened to `u32` as a whole.
//!
//! # Batching
//!
//! A source of `n` tokens is cut into `n / (seq_len + 1)` consecutive, non-overlapping windows:
//! window `i` covers tokens `[i * (seq_len + 1), (i + 1) * (seq_len + 1))`; its first `seq_len`
//! tokens are the inputs and its last `seq_len` the targets (the inputs shifted by one). The
//! trailing `n % (seq_len + 1)` tokens are never used.
//!
//! [`Batcher`] serves training batches: the windows of each epoch in an order shuffled by a
//! permutation derived from `(seed, epoch)` alone, a fresh one each epoch, wrapping into the next
//! epoch when an epoch's windows run out (so one batch may hold windows of two epochs). Its
//! [`DataPosition`] (epoch and index within the epoch) can be saved and restored with
//! [`Batcher::seek`]: a resumed run over the same source, `seq_len` and seed sees exactly the
//! batches the uninterrupted run would have seen.
//!
//! [`sequential_batches`] serves every window once, in file order, for evaluation.
//!
//! Randomness comes from `rand`'s [`StdRng`] seeded explicitly, so the same seed gives the same
//! corpus and the same batches (for a given `rand` version).

mod batch;
mod source;
pub mod synthetic;

pub use batch::{Batch, Batcher, DataPosition, SequentialBatches, sequential_batches};
pub use source::{DEFAULT_SYNTHETIC_TOKENS, DataSpec, TokenDtype, TokenSource};

use rand::SeedableRng;
use rand::rngs::StdRng;

/// A generator seeded from `seed`, a `stream` number and a domain `tag`, so that the corpus and
/// each epoch's permutation draw from independent streams of the same seed.
pub(crate) fn seeded_rng(seed: u64, stream: u64, tag: &[u8; 16]) -> StdRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&stream.to_le_bytes());
    bytes[16..].copy_from_slice(tag);
    StdRng::from_seed(bytes)
}
