//! Sharded background checkpoints and recovery from them: a run stopped part-way and continued
//! from its newest committed checkpoint ends with the same weights, bit for bit, as one that
//! never stopped; a corrupt or torn newest checkpoint is skipped for the one before; and a
//! checkpoint taken under one split restores under another.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::Path;

use shoal_spec::job::JobSpec;
use shoal_worker::checkpoint::sharded::{self, MANIFEST_FILE};
use shoal_worker::job::{RunEnd, RunEvent, RunOptions, run_with};

fn spec(dir: &Path, dp: usize, ep: usize, precision: &str) -> JobSpec {
    let text = format!(
        "name = \"r\"\nprecision = \"{precision}\"\n[training]\nsteps = 6\nseq_len = 32\nbatch = 4\n\
         [parallelism]\ndp = {dp}\nep = {ep}\nmicro_batches = 1\n\
         [checkpointing]\ndir = \"{}\"\ninterval = 2\nkeep = 2",
        dir.display()
    );
    JobSpec::from_toml(&text, "r.toml").unwrap()
}

/// Runs to the end (or stops after step `stop_after`); returns the steps it started after and
/// the final weights file's bytes. `recover` continues from the newest checkpoint.
fn go(spec: &JobSpec, recover: bool, stop_after: Option<u64>) -> (u64, Option<Vec<u8>>) {
    go_from(spec, recover.then_some(u64::MAX), stop_after)
}

/// [`go`], restoring the newest checkpoint at or before `restore`.
fn go_from(
    spec: &JobSpec,
    restore: Option<u64>,
    stop_after: Option<u64>,
) -> (u64, Option<Vec<u8>>) {
    let mut start = u64::MAX;
    let end = run_with(
        spec,
        None,
        RunOptions { restore, gpu: None },
        |ev| match ev {
            RunEvent::Started { step, .. } => {
                start = step;
                true
            }
            RunEvent::Step(m) => stop_after.is_none_or(|s| m.step < s),
            _ => true,
        },
    )
    .unwrap();
    let weights = match end {
        RunEnd::Finished(s) => {
            Some(std::fs::read(Path::new(&s.checkpoint).join("model.safetensors")).unwrap())
        }
        RunEnd::Stopped(_) => None,
    };
    (start, weights)
}

fn committed(root: &Path) -> Vec<u64> {
    sharded::step_dirs(root)
        .unwrap()
        .into_iter()
        .filter(|(_, d)| d.join(MANIFEST_FILE).is_file())
        .map(|(s, _)| s)
        .collect()
}

#[test]
fn a_run_continued_from_its_checkpoint_ends_bit_identical() {
    for precision in ["fp32", "bf16"] {
        let whole = tempfile::tempdir().unwrap();
        let (start, reference) = go(&spec(whole.path(), 2, 2, precision), false, None);
        assert_eq!(start, 0);
        let reference = reference.unwrap();
        let root = whole.path().join("checkpoints");
        assert_eq!(
            committed(&root),
            vec![6, 4],
            "keep = 2 of the checkpoints at 2, 4 and the last step, 6"
        );
        // The last one holds the final weights: loaded whole, they are the consolidated
        // checkpoint's, bit for bit.
        let (_, last) =
            shoal_worker::train::snapshot::load_weights(&root.join("step-00000006")).unwrap();
        let consolidated = shoal_worker::checkpoint::load_safetensors(
            &whole.path().join("checkpoint").join("model.safetensors"),
        )
        .unwrap();
        assert_eq!(last.len(), consolidated.len());
        for (name, t) in &consolidated {
            let bits = |t: &shoal_kernels::Tensor<f32>| {
                t.data().iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
            };
            assert!(bits(&last[name]) == bits(t), "{precision}: {name} differs");
        }
        let m = sharded::verify(&root.join("step-00000004")).unwrap();
        assert_eq!((m.step, m.devices), (4, 2));
        assert!(m.files.iter().any(|f| f.name == "shard-00001.safetensors"));

        // Stopped after step 5 (as a failure would), then continued: back to step 4.
        let cut = tempfile::tempdir().unwrap();
        let s = spec(cut.path(), 2, 2, precision);
        assert_eq!(go(&s, false, Some(5)), (0, None));
        let (start, weights) = go(&s, true, None);
        assert_eq!(
            start, 4,
            "{precision}: continued from the newest checkpoint"
        );
        assert!(
            weights.unwrap() == reference,
            "{precision}: final weights differ"
        );
        let lines = std::fs::read_to_string(cut.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = lines
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            steps,
            vec![1, 2, 3, 4, 5, 6],
            "step 5 of the failed attempt is redone once"
        );
        // A recovery after the last step's checkpoint (the job failed while finishing) takes
        // no further step and ends with the same weights.
        let (start, weights) = go(&s, true, None);
        assert_eq!(start, 6, "{precision}");
        assert!(
            weights.unwrap() == reference,
            "{precision}: weights changed"
        );
        // A recovery told to restore at most step 5 (its coordinator had not heard of the
        // checkpoint of step 6 when it sent the attempt) goes back to step 4, drops the newer
        // checkpoint, and ends the same.
        let (start, weights) = go_from(&s, Some(5), None);
        assert_eq!(
            start, 4,
            "{precision}: the newest checkpoint at or before step 5"
        );
        assert!(
            weights.unwrap() == reference,
            "{precision}: weights changed"
        );
        assert_eq!(committed(&cut.path().join("checkpoints")), vec![6, 4]);
    }
}

#[test]
fn a_corrupt_or_torn_newest_checkpoint_falls_back_to_the_one_before() {
    let whole = tempfile::tempdir().unwrap();
    let reference = go(&spec(whole.path(), 2, 1, "fp32"), false, None)
        .1
        .unwrap();
    for damage in ["flip", "truncate", "no-manifest"] {
        let cut = tempfile::tempdir().unwrap();
        let s = spec(cut.path(), 2, 1, "fp32");
        go(&s, false, Some(5));
        let newest = cut.path().join("checkpoints").join("step-00000004");
        let shard = newest.join("shard-00001.safetensors");
        let mut bytes = std::fs::read(&shard).unwrap();
        match damage {
            "flip" => {
                let n = bytes.len() - 3;
                bytes[n] ^= 0x40;
                std::fs::write(&shard, &bytes).unwrap();
            }
            "truncate" => std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap(),
            _ => std::fs::remove_file(newest.join(MANIFEST_FILE)).unwrap(),
        }
        let e = sharded::verify(&newest)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let expect = match damage {
            "flip" => "corrupt",
            "truncate" => "torn",
            _ => "manifest.json",
        };
        assert!(e.contains(expect), "{damage}: {e}");
        let (start, weights) = go(&s, true, None);
        assert_eq!(
            start, 2,
            "{damage}: the step-2 checkpoint is the newest valid one"
        );
        assert!(
            weights.unwrap() == reference,
            "{damage}: final weights differ"
        );
        assert!(
            !newest.join("shard-00001.safetensors").exists() || sharded::verify(&newest).is_ok(),
            "{damage}: the damaged checkpoint was replaced"
        );
    }
}

#[test]
fn a_checkpoint_restores_under_another_split() {
    // Written by dp 2 x ep 2 (each device owns half the optimizer state and half the experts),
    // continued by one device: the same weights and moments, so the losses follow closely.
    let whole = tempfile::tempdir().unwrap();
    go(&spec(whole.path(), 1, 1, "fp32"), false, None);
    let reference: Vec<f64> = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(whole.path().join("summary.json")).unwrap(),
    )
    .unwrap()["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let cut = tempfile::tempdir().unwrap();
    go(&spec(cut.path(), 2, 2, "fp32"), false, Some(5));
    let (start, _) = go(&spec(cut.path(), 1, 1, "fp32"), true, None);
    assert_eq!(start, 4);
    let lines = std::fs::read_to_string(cut.path().join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["main_loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 6);
    for (i, (a, b)) in losses.iter().zip(&reference).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "step {}: {a} vs {b}",
            i + 1
        );
    }
}
