//! Training data: token sources, batching, resumption and the synthetic corpus.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use shoal_worker::WorkerError;
use shoal_worker::data::synthetic::{
    COPY_REACH, COPY_TOKEN, COUNT_TOKEN, NUMBER_BASE, NUMBER_COUNT,
};
use shoal_worker::data::{
    Batch, Batcher, DataPosition, DataSpec, TokenDtype, TokenSource, sequential_batches,
};

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).expect("create test file");
    f.write_all(bytes).expect("write test file");
    path
}

fn u16_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter()
        .flat_map(|&i| u16::try_from(i).expect("id fits u16").to_le_bytes())
        .collect()
}

fn u32_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|&i| i.to_le_bytes()).collect()
}

/// A source whose token at position `p` is `p`, so windows can be checked by value.
fn counting_source(n: usize) -> TokenSource {
    TokenSource::from_tokens("counting", (0..n as u32).collect(), n).expect("ids below n")
}

fn all_tokens(source: &TokenSource) -> Vec<u32> {
    source.tokens(0..source.len()).expect("whole range")
}

#[test]
fn token_file_round_trip_u16() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..1000).map(|i| (i * 37 + 5) % 65535).collect();
    let path = write_file(dir.path(), "t.bin", &u16_bytes(&ids));
    let spec = DataSpec::TokenFile {
        path: path.clone(),
        dtype: TokenDtype::U16,
    };
    let source = TokenSource::load(&spec, 65536).unwrap();
    assert_eq!(source.len(), ids.len());
    assert!(!source.is_empty());
    assert_eq!(source.name(), path.display().to_string());
    assert_eq!(source.vocab(), 65536);
    assert_eq!(all_tokens(&source), ids);
    assert_eq!(source.get(3), Some(ids[3]));
    assert_eq!(source.get(ids.len()), None);
    assert_eq!(source.tokens(10..20).unwrap(), ids[10..20]);
    assert!(source.tokens(990..1001).is_none());
}

#[test]
fn token_file_round_trip_u32_across_read_chunks() {
    let dir = tempfile::tempdir().unwrap();
    // More than one internal read chunk (2^18 tokens), and ids beyond u16.
    let ids: Vec<u32> = (0..600_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 200_000)
        .collect();
    let path = write_file(dir.path(), "t.bin", &u32_bytes(&ids));
    let spec = DataSpec::TokenFile {
        path,
        dtype: TokenDtype::U32,
    };
    let source = TokenSource::load(&spec, 200_000).unwrap();
    assert_eq!(all_tokens(&source), ids);
}

#[test]
fn out_of_vocab_id_names_file_position_and_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids: Vec<u32> = (0..300_000).map(|i| i % 100).collect();
    ids[299_990] = 4242;
    for (dtype, bytes) in [
        (TokenDtype::U16, u16_bytes(&ids)),
        (TokenDtype::U32, u32_bytes(&ids)),
    ] {
        let path = write_file(dir.path(), &format!("bad_{dtype}.bin"), &bytes);
        let err = TokenSource::load(&DataSpec::TokenFile { path, dtype }, 4096).unwrap_err();
        assert!(matches!(err, WorkerError::Data { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("bad_{dtype}.bin")), "{msg}");
        assert!(msg.contains("299990"), "{msg}");
        assert!(msg.contains("4242"), "{msg}");
        assert!(msg.contains("4096"), "{msg}");
    }
    // The vocabulary bound is exclusive.
    let path = write_file(dir.path(), "edge.bin", &u16_bytes(&[0, 1, 100]));
    let spec = DataSpec::TokenFile {
        path,
        dtype: TokenDtype::U16,
    };
    assert!(TokenSource::load(&spec, 101).is_ok());
    let msg = TokenSource::load(&spec, 100).unwrap_err().to_string();
    assert!(
        msg.contains("edge.bin") && msg.contains("position 2"),
        "{msg}"
    );

    let msg = TokenSource::from_tokens("mem", vec![1, 2, 9], 9)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("mem") && msg.contains("position 2") && msg.contains('9'),
        "{msg}"
    );
}

#[test]
fn odd_size_token_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "odd.bin", &[1, 0, 2, 0, 3]);
    let err = TokenSource::load(
        &DataSpec::TokenFile {
            path: path.clone(),
            dtype: TokenDtype::U16,
        },
        4096,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("odd.bin") && msg.contains('5'), "{msg}");

    let path = write_file(dir.path(), "six.bin", &[0; 6]);
    let msg = TokenSource::load(
        &DataSpec::TokenFile {
            path: path.clone(),
            dtype: TokenDtype::U32,
        },
        4096,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("six.bin") && msg.contains("u32"), "{msg}");
    // The same six bytes are three u16 tokens.
    let source = TokenSource::load(
        &DataSpec::TokenFile {
            path,
            dtype: TokenDtype::U16,
        },
        4096,
    )
    .unwrap();
    assert_eq!(source.len(), 3);
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.bin");
    for spec in [
        DataSpec::TokenFile {
            path: path.clone(),
            dtype: TokenDtype::U16,
        },
        DataSpec::TextFile { path: path.clone() },
    ] {
        let err = TokenSource::load(&spec, 4096).unwrap_err();
        assert!(matches!(err, WorkerError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.bin"), "{err}");
    }
}

#[test]
fn text_file_tokens_are_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let text = "héllo, wörld\n\u{1F980}".as_bytes().to_vec();
    let path = write_file(dir.path(), "t.txt", &text);
    let source = TokenSource::load(&DataSpec::TextFile { path: path.clone() }, 256).unwrap();
    let expect: Vec<u32> = text.iter().map(|&b| u32::from(b)).collect();
    assert_eq!(all_tokens(&source), expect);
    assert!(expect.iter().any(|&b| b > 127));

    let err = TokenSource::load(&DataSpec::TextFile { path }, 255).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("t.txt") && msg.contains("256") && msg.contains("255"),
        "{msg}"
    );
}

#[test]
fn spec_from_path_and_dtype_parsing() {
    assert_eq!(
        DataSpec::from_path("a/b.BIN", TokenDtype::U32),
        DataSpec::TokenFile {
            path: "a/b.BIN".into(),
            dtype: TokenDtype::U32
        }
    );
    assert_eq!(
        DataSpec::from_path("a/b.txt", TokenDtype::U32),
        DataSpec::TextFile {
            path: "a/b.txt".into()
        }
    );
    assert_eq!("u16".parse::<TokenDtype>().unwrap(), TokenDtype::U16);
    assert_eq!("U32".parse::<TokenDtype>().unwrap(), TokenDtype::U32);
    assert!("f32".parse::<TokenDtype>().is_err());
    assert_eq!(TokenDtype::U16.to_string(), "u16");
    let spec = DataSpec::synthetic(7);
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<DataSpec>(&json).unwrap(), spec);
}

#[test]
fn short_source_is_an_error_naming_it_and_both_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "short.bin", &u16_bytes(&[1; 10]));
    let source = TokenSource::load(
        &DataSpec::TokenFile {
            path,
            dtype: TokenDtype::U16,
        },
        4096,
    )
    .unwrap();
    let msg = Batcher::new(source.clone(), 16, 2, 0)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("short.bin") && msg.contains("10") && msg.contains("17"),
        "{msg}"
    );
    let msg = sequential_batches(&source, 16, 2).unwrap_err().to_string();
    assert!(
        msg.contains("short.bin") && msg.contains("10") && msg.contains("17"),
        "{msg}"
    );
    // Exactly one window is enough.
    assert_eq!(Batcher::new(source, 9, 2, 0).unwrap().windows(), 1);

    let empty = TokenSource::load(&DataSpec::Synthetic { seed: 1, tokens: 0 }, 4096).unwrap();
    assert!(empty.is_empty());
    let msg = Batcher::new(empty, 8, 1, 0).unwrap_err().to_string();
    assert!(msg.contains("synthetic"), "{msg}");
}

#[test]
fn zero_sizes_are_refused() {
    let source = counting_source(100);
    assert!(Batcher::new(source.clone(), 0, 2, 0).is_err());
    assert!(Batcher::new(source.clone(), 4, 0, 0).is_err());
    assert!(sequential_batches(&source, 0, 2).is_err());
    assert!(sequential_batches(&source, 4, 0).is_err());
    assert!(TokenSource::load(&DataSpec::synthetic(0), 0).is_err());
}

fn check_rows(batch: &Batch) {
    let l = batch.seq_len;
    assert_eq!(batch.inputs.len(), batch.batch * l);
    assert_eq!(batch.targets.len(), batch.batch * l);
    assert_eq!(batch.window_ids.len(), batch.batch);
    for (r, &w) in batch.window_ids.iter().enumerate() {
        let start = (w * (l + 1)) as u32;
        let inputs = &batch.inputs[r * l..(r + 1) * l];
        let targets = &batch.targets[r * l..(r + 1) * l];
        let expect: Vec<u32> = (start..start + l as u32).collect();
        assert_eq!(inputs, expect.as_slice(), "window {w}");
        assert_eq!(&targets[..l - 1], &inputs[1..]);
        assert_eq!(targets[l - 1], start + l as u32);
    }
}

#[test]
fn windows_are_non_overlapping_and_targets_are_inputs_shifted() {
    // 103 tokens, seq_len 9: windows of 10 tokens, 10 of them, 3 tokens left over.
    let mut batcher = Batcher::new(counting_source(103), 9, 4, 5).unwrap();
    assert_eq!(batcher.windows(), 10);
    assert_eq!(batcher.seq_len(), 9);
    assert_eq!(batcher.batch_size(), 4);
    for _ in 0..6 {
        let b = batcher.next_batch();
        assert_eq!((b.batch, b.seq_len), (4, 9));
        check_rows(&b);
    }
}

#[test]
fn shuffle_is_a_permutation_per_epoch_and_differs_between_epochs() {
    let windows = 50;
    // Batch 7 does not divide 50, so batches straddle epochs.
    let mut batcher = Batcher::new(counting_source(windows * 17 + 5), 16, 7, 42).unwrap();
    assert_eq!(batcher.windows(), windows);
    let mut served = Vec::new();
    while served.len() < 4 * windows {
        let b = batcher.next_batch();
        check_rows(&b);
        served.extend(b.window_ids);
    }
    let epochs: Vec<&[usize]> = served.chunks(windows).take(4).collect();
    for epoch in &epochs {
        let mut sorted = epoch.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..windows).collect::<Vec<_>>());
        assert_ne!(*epoch, (0..windows).collect::<Vec<_>>().as_slice());
    }
    for i in 0..epochs.len() {
        for j in i + 1..epochs.len() {
            assert_ne!(epochs[i], epochs[j], "epochs {i} and {j}");
        }
    }

    // The same seed gives the same order; another seed another.
    let mut same = Batcher::new(counting_source(windows * 17 + 5), 16, 7, 42).unwrap();
    let mut other = Batcher::new(counting_source(windows * 17 + 5), 16, 7, 43).unwrap();
    let first: Vec<usize> = served[..7].to_vec();
    assert_eq!(same.next_batch().window_ids, first);
    assert_ne!(other.next_batch().window_ids, first);
}

#[test]
fn position_tracks_epochs() {
    let mut batcher = Batcher::new(counting_source(10 * 5), 4, 3, 1).unwrap();
    assert_eq!(batcher.windows(), 10);
    assert_eq!(batcher.position(), DataPosition::default());
    batcher.next_batch();
    assert_eq!(batcher.position(), DataPosition { epoch: 0, index: 3 });
    batcher.next_batch();
    batcher.next_batch();
    assert_eq!(batcher.position(), DataPosition { epoch: 0, index: 9 });
    batcher.next_batch(); // last window of epoch 0, first two of epoch 1
    assert_eq!(batcher.position(), DataPosition { epoch: 1, index: 2 });
    // A batch that ends an epoch exactly reads as the start of the next.
    let mut exact = Batcher::new(counting_source(10 * 5), 4, 5, 1).unwrap();
    exact.next_batch();
    exact.next_batch();
    assert_eq!(exact.position(), DataPosition { epoch: 1, index: 0 });
}

#[test]
fn resumed_batcher_serves_the_same_batches() {
    let make = || {
        let source = TokenSource::load(
            &DataSpec::Synthetic {
                seed: 3,
                tokens: 40_000,
            },
            4096,
        )
        .unwrap();
        Batcher::new(source, 63, 8, 99).unwrap()
    };
    assert_eq!(make().windows(), 625);
    let mut full = make();
    let reference: Vec<Batch> = (0..250).map(|_| full.next_batch()).collect();
    // Stop points inside an epoch, at batch 78 (624 windows: one before the epoch ends),
    // and past an epoch boundary.
    for stop in [0usize, 1, 17, 78, 79, 120, 200] {
        let mut first = make();
        for b in &reference[..stop] {
            assert_eq!(&first.next_batch(), b);
        }
        let saved = serde_json::to_string(&first.position()).unwrap();
        drop(first);
        let mut resumed = make();
        resumed
            .seek(serde_json::from_str::<DataPosition>(&saved).unwrap())
            .unwrap();
        for (k, b) in reference[stop..].iter().take(60).enumerate() {
            assert_eq!(&resumed.next_batch(), b, "stop {stop}, batch {k} after");
        }
    }
    // Seeking backwards within a live batcher works too.
    let mut again = make();
    for _ in 0..100 {
        again.next_batch();
    }
    again.seek(DataPosition { epoch: 0, index: 8 }).unwrap();
    assert_eq!(again.next_batch(), reference[1]);
}

#[test]
fn seek_refuses_an_index_past_the_epoch() {
    let mut batcher = Batcher::new(counting_source(50), 4, 2, 0).unwrap();
    assert_eq!(batcher.windows(), 10);
    let err = batcher
        .seek(DataPosition {
            epoch: 0,
            index: 11,
        })
        .unwrap_err();
    assert!(err.to_string().contains("11"), "{err}");
    // The end of an epoch is the start of the next.
    batcher
        .seek(DataPosition {
            epoch: 2,
            index: 10,
        })
        .unwrap();
    assert_eq!(batcher.position(), DataPosition { epoch: 3, index: 0 });
}

#[test]
fn sequential_batches_cover_every_window_in_order() {
    let source = counting_source(23 * 11 + 4);
    let batches: Vec<Batch> = sequential_batches(&source, 10, 5).unwrap().collect();
    assert_eq!(
        batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
        vec![5, 5, 5, 5, 3]
    );
    let ids: Vec<usize> = batches.iter().flat_map(|b| b.window_ids.clone()).collect();
    assert_eq!(ids, (0..23).collect::<Vec<_>>());
    for b in &batches {
        check_rows(b);
    }
    let it = sequential_batches(&source, 10, 5).unwrap();
    assert_eq!((it.len(), it.windows()), (5, 23));
    assert_eq!(sequential_batches(&source, 10, 100).unwrap().count(), 1);
}

fn synthetic_corpus(seed: u64, tokens: usize, vocab: usize) -> Vec<u32> {
    all_tokens(
        &TokenSource::load(&DataSpec::Synthetic { seed, tokens }, vocab).expect("synthetic corpus"),
    )
}

#[test]
fn synthetic_corpus_is_deterministic_and_in_vocab() {
    for vocab in [256, 300, 4096, 50_000] {
        let a = synthetic_corpus(11, 100_000, vocab);
        assert_eq!(a.len(), 100_000);
        assert_eq!(a, synthetic_corpus(11, 100_000, vocab), "vocab {vocab}");
        assert_ne!(a, synthetic_corpus(12, 100_000, vocab), "vocab {vocab}");
        assert!(a.iter().all(|&t| (t as usize) < vocab), "vocab {vocab}");
        // A shorter corpus is a prefix of a longer one.
        assert_eq!(synthetic_corpus(11, 1000, vocab), a[..1000]);
        // It uses a fair part of the vocabulary.
        let distinct: HashSet<u32> = a.iter().copied().collect();
        assert!(
            distinct.len() >= 200.min(vocab / 2),
            "vocab {vocab}: {}",
            distinct.len()
        );
    }
    let err = TokenSource::load(&DataSpec::synthetic(0), 255).unwrap_err();
    assert!(err.to_string().contains("256"), "{err}");
}

fn entropy(counts: impl Iterator<Item = usize>) -> f64 {
    let counts: Vec<usize> = counts.collect();
    let total: usize = counts.iter().sum();
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.log2()
        })
        .sum()
}

/// Unigram entropy and the empirical conditional entropy of a token given the previous one.
fn entropies(tokens: &[u32]) -> (f64, f64) {
    let mut unigram: HashMap<u32, usize> = HashMap::new();
    let mut bigram: HashMap<(u32, u32), usize> = HashMap::new();
    let mut prev: HashMap<u32, usize> = HashMap::new();
    for &t in tokens {
        *unigram.entry(t).or_default() += 1;
    }
    for w in tokens.windows(2) {
        *bigram.entry((w[0], w[1])).or_default() += 1;
        *prev.entry(w[0]).or_default() += 1;
    }
    // H(next | prev) = H(prev, next) - H(prev).
    let joint = entropy(bigram.values().copied());
    let marginal = entropy(prev.values().copied());
    (entropy(unigram.values().copied()), joint - marginal)
}

#[test]
fn synthetic_corpus_has_next_token_structure() {
    for vocab in [256usize, 4096] {
        let tokens = synthetic_corpus(5, 1 << 20, vocab);
        let (h1, h2) = entropies(&tokens);
        let max = (vocab as f64).log2();
        eprintln!("vocab {vocab}: log2 {max:.2}, unigram {h1:.2}, next|prev {h2:.2} bits");
        assert!(
            h2 < 0.5 * max,
            "vocab {vocab}: H(next|prev) {h2:.2} of {max:.2}"
        );
        assert!(
            h2 < h1 - 1.5,
            "vocab {vocab}: H(next|prev) {h2:.2}, unigram {h1:.2}"
        );
    }
    // A uniform random stream has no such structure: the measure can fail.
    let noise = synthetic_noise(1 << 20, 256);
    let (h1, h2) = entropies(&noise);
    assert!(h2 > 7.8 && h1 > 7.9, "{h1} {h2}");
}

fn synthetic_noise(n: usize, vocab: u32) -> Vec<u32> {
    // splitmix64
    let mut x: u64 = 0;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z % u64::from(vocab)) as u32
        })
        .collect()
}

fn is_number(t: u32) -> bool {
    (NUMBER_BASE..NUMBER_BASE + NUMBER_COUNT).contains(&t)
}

#[test]
fn synthetic_counting_runs_and_copies_are_there() {
    let tokens = synthetic_corpus(9, 200_000, 4096);
    // Counting: any three consecutive number tokens step alike (mod NUMBER_COUNT).
    let mut triples = 0;
    for w in tokens.windows(3) {
        if w.iter().all(|&t| is_number(t)) {
            triples += 1;
            let d1 = (w[1] + NUMBER_COUNT - w[0]) % NUMBER_COUNT;
            let d2 = (w[2] + NUMBER_COUNT - w[1]) % NUMBER_COUNT;
            assert_eq!(d1, d2, "{w:?}");
        }
    }
    assert!(triples > 10_000, "{triples}");
    let counts = tokens.iter().filter(|&&t| t == COUNT_TOKEN).count();
    assert!(counts > 600, "{counts}");

    // Copies: the 8 tokens after a copy marker occurred within the reach before it.
    let mut markers = 0;
    let mut found = 0;
    for p in 0..tokens.len() - 9 {
        if tokens[p] != COPY_TOKEN {
            continue;
        }
        markers += 1;
        let span = &tokens[p + 1..p + 9];
        let lo = p.saturating_sub(COPY_REACH);
        if tokens[lo..p].windows(8).any(|w| w == span) {
            found += 1;
        }
    }
    assert!(markers > 600, "{markers}");
    assert!(found as f64 > 0.9 * markers as f64, "{found} of {markers}");
    // In noise the same check finds nothing.
    let noise = synthetic_noise(10_000, 256);
    let span = &noise[5000..5008];
    assert!(!noise[5000 - COPY_REACH..5000].windows(8).any(|w| w == span));
}
