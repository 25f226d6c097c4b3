//! The built-in synthetic corpus: seeded, with structure at several ranges.
//!
//! The corpus is meant to let a small transformer show a clearly falling loss within a few
//! hundred steps, and to give attention and the MoE experts something to learn. It is a stream
//! of *segments*, each opened by a marker token, of three kinds:
//!
//! * **Topic segments** (60% of segments), opened by [`SEP_TOKEN`], 24 to 96 tokens long. There
//!   are [`TOPICS`] topics; each owns a sparse set of `S` tokens from the topic range
//!   `[TOPIC_BASE, vocab)` (`S = clamp((vocab - TOPIC_BASE) / TOPICS, 32, 256)`; the sets are
//!   disjoint while the vocabulary allows, and wrap around into each other when it does not),
//!   a Zipf-like unigram distribution over them, and a first-order Markov chain: each token has
//!   four successors in its topic, taken with probabilities 0.45, 0.225, 0.135 and 0.09, and with
//!   probability 0.1 the chain restarts at a token drawn from the topic's unigram distribution.
//!   A topic segment keeps the previous topic segment's topic with probability 0.75, so topics
//!   persist over hundreds of tokens (a document-like range that experts can specialise on).
//! * **Counting segments** (20%), opened by [`COUNT_TOKEN`], 8 to 32 tokens long: the number
//!   tokens `NUMBER_BASE + (a + i * d) mod NUMBER_COUNT` for a random start `a` and step
//!   `d` in {1, 2, 3, 5}: predictable exactly from the two previous tokens.
//! * **Copy segments** (20%), opened by [`COPY_TOKEN`], 8 to 48 tokens long: a verbatim repeat of
//!   a span that started at most [`COPY_REACH`] tokens earlier, so that it usually lies in the same
//!   training window; after its first token or two, the rest is predictable only by attending
//!   back to the earlier occurrence (induction).
//!
//! The corpus opens with a topic segment and always has at least 64 tokens of history before a
//! copy. The stream is cut at the requested length. Token ids `0..NUMBER_BASE` other than the
//! three markers are never produced; ids in the topic range may go unused when the vocabulary is
//! large. All draws come from one `StdRng` seeded from the seed, so a seed and vocabulary give the
//! same corpus; generation costs one random draw per token (tens of milliseconds for 4 Mi tokens
//! in an optimised build).

use rand::RngExt;
use rand::rngs::StdRng;

use super::seeded_rng;
use crate::{Result, WorkerError};

/// The smallest vocabulary the generator supports.
pub const MIN_VOCAB: usize = 256;
/// Marker opening a topic segment.
pub const SEP_TOKEN: u32 = 0;
/// Marker opening a copy segment.
pub const COPY_TOKEN: u32 = 1;
/// Marker opening a counting segment.
pub const COUNT_TOKEN: u32 = 2;
/// First number token of counting segments.
pub const NUMBER_BASE: u32 = 8;
/// Number of number tokens; counting runs modulo it.
pub const NUMBER_COUNT: u32 = 64;
/// First token of the topic range, which runs to the end of the vocabulary.
pub const TOPIC_BASE: u32 = NUMBER_BASE + NUMBER_COUNT;
/// Number of topics.
pub const TOPICS: usize = 8;
/// How far back, in tokens, a copied span may start.
pub const COPY_REACH: usize = 192;

const RESTART: f32 = 0.1;
/// Cumulative probabilities of the four successors, given no restart.
const SUCCESSOR_CDF: [f32; 3] = [0.5, 0.75, 0.9];
const STEPS: [u32; 4] = [1, 2, 3, 5];
const KEEP_TOPIC: f32 = 0.75;
const TOPIC_SHARE: f32 = 0.6;
const COUNT_SHARE: f32 = 0.2;

/// One topic: its tokens, unigram CDF and Markov successors (as indices into `tokens`).
struct Topic {
    tokens: Vec<u32>,
    unigram_cdf: Vec<f32>,
    successors: Vec<[u32; 4]>,
}

impl Topic {
    /// Index of the first CDF entry above `u` (a unigram draw).
    fn draw(&self, u: f32) -> usize {
        self.unigram_cdf
            .partition_point(|&c| c <= u)
            .min(self.tokens.len() - 1)
    }
}

/// Generates `len` tokens of the synthetic corpus of `seed` for a vocabulary of `vocab` tokens.
///
/// Errors: `vocab` below [`MIN_VOCAB`] or beyond `u32` ids; memory for `len` tokens unavailable.
pub fn generate(seed: u64, len: usize, vocab: usize) -> Result<Vec<u32>> {
    if vocab < MIN_VOCAB {
        return Err(WorkerError::invalid(
            "vocab",
            format!("the synthetic corpus needs at least {MIN_VOCAB} tokens, got {vocab}"),
        ));
    }
    let Ok(vocab32) = u32::try_from(vocab) else {
        return Err(WorkerError::invalid(
            "vocab",
            format!("{vocab} does not fit 32-bit token ids"),
        ));
    };
    let mut out: Vec<u32> = Vec::new();
    out.try_reserve_exact(len).map_err(|e| {
        WorkerError::data("synthetic", format!("cannot allocate {len} tokens: {e}"))
    })?;

    let mut rng = seeded_rng(seed, 0, b"shoal synthetic ");
    let topics = make_topics(&mut rng, vocab32);
    let mut topic = rng.random_range(0..TOPICS);

    while out.len() < len {
        let kind: f32 = rng.random();
        if kind < TOPIC_SHARE || out.len() < 64 {
            if rng.random::<f32>() >= KEEP_TOPIC {
                topic = rng.random_range(0..TOPICS);
            }
            topic_segment(&mut rng, &topics[topic], &mut out);
        } else if kind < TOPIC_SHARE + COUNT_SHARE {
            count_segment(&mut rng, &mut out);
        } else {
            copy_segment(&mut rng, &mut out);
        }
    }
    out.truncate(len);
    Ok(out)
}

/// Draws the topics: token sets from the topic range, Zipf-like unigrams, successors.
fn make_topics(rng: &mut StdRng, vocab: u32) -> Vec<Topic> {
    // Distinct ids from the topic range, in random order: all of it when it is small.
    let range = (vocab - TOPIC_BASE) as usize;
    let size = (range / TOPICS).clamp(32, 256).min(range);
    let pool: Vec<u32> = rand::seq::index::sample(rng, range, (TOPICS * size).min(range))
        .iter()
        .map(|i| TOPIC_BASE + i as u32)
        .collect();
    let weights: Vec<f32> = (0..size).map(|r| 1.0 / (r as f32 + 1.0)).collect();
    let total: f32 = weights.iter().sum();
    let mut acc = 0.0;
    let unigram_cdf: Vec<f32> = weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect();
    (0..TOPICS)
        .map(|k| {
            let tokens = (0..size)
                .map(|j| pool[(k * size + j) % pool.len()])
                .collect();
            let successors = (0..size)
                .map(|_| std::array::from_fn(|_| rng.random_range(0..size as u32)))
                .collect();
            Topic {
                tokens,
                unigram_cdf: unigram_cdf.clone(),
                successors,
            }
        })
        .collect()
}

fn topic_segment(rng: &mut StdRng, topic: &Topic, out: &mut Vec<u32>) {
    out.push(SEP_TOKEN);
    let len = rng.random_range(24..=96);
    let mut cur = topic.draw(rng.random());
    out.push(topic.tokens[cur]);
    for _ in 1..len {
        let u: f32 = rng.random();
        cur = if u < RESTART {
            topic.draw(u / RESTART)
        } else {
            let v = (u - RESTART) / (1.0 - RESTART);
            let which = SUCCESSOR_CDF.partition_point(|&c| c <= v);
            topic.successors[cur][which] as usize
        };
        out.push(topic.tokens[cur]);
    }
}

fn count_segment(rng: &mut StdRng, out: &mut Vec<u32>) {
    out.push(COUNT_TOKEN);
    let len = rng.random_range(8..=32u32);
    let start = rng.random_range(0..NUMBER_COUNT);
    let step = STEPS[rng.random_range(0..STEPS.len())];
    out.extend((0..len).map(|i| NUMBER_BASE + (start + i * step) % NUMBER_COUNT));
}

/// Copies a span that starts at most [`COPY_REACH`] tokens back; needs 48 tokens of history.
fn copy_segment(rng: &mut StdRng, out: &mut Vec<u32>) {
    let pos = out.len();
    let len = rng.random_range(8..=48usize);
    let lo = pos.saturating_sub(COPY_REACH);
    let hi = pos.saturating_sub(len);
    if hi < lo {
        return;
    }
    let from = rng.random_range(lo..=hi);
    out.push(COPY_TOKEN);
    out.extend_from_within(from..from + len);
}
