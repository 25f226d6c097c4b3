//! The job-spec fuzz corpus (`tests/corpus/*.toml`) and a mutation fuzzer seeded from it.
//!
//! Each corpus file starts with `# expect: OUTCOME`: `ok`, `parse` (the TOML is refused), `model`
//! (the model names no preset), or the field path validation must name. The fuzzer mutates corpus
//! files (byte edits, insertions, truncation, spliced lines from other files) and checks that
//! parsing and validation never panic, and that every spec validation accepts can be planned.
//! Failing cases proptest finds are kept in `tests/corpus/proptest-regressions.txt` and replayed
//! first on every run.

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use shoal_spec::ModelConfig;
use shoal_spec::job::JobSpec;
use shoal_spec::plan::{Cluster, plan};

fn corpus() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("the corpus directory")
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let bytes = std::fs::read(&p).expect("a corpus file");
            (
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the corpus has {} files", files.len());
    files
}

/// What happens to a job file: `ok`, `parse`, `model`, or the field validation names.
fn outcome(text: &str) -> String {
    let spec = match JobSpec::from_toml(text, "corpus") {
        Ok(s) => s,
        Err(_) => return "parse".into(),
    };
    let Ok(model) = ModelConfig::preset(&spec.model) else {
        return "model".into();
    };
    match spec.validate(&model) {
        Ok(()) => {
            // An accepted spec plans on a cluster with one device per rank.
            let par = spec
                .parallelism()
                .expect("an accepted spec has a parallelism");
            let cluster = Cluster::uniform(par.pp * par.dp, 1);
            plan(&model, &par, &cluster).expect("an accepted spec plans");
            "ok".into()
        }
        Err(shoal_spec::SpecError::Invalid { field, .. }) => field,
        Err(e) => format!("other: {e}"),
    }
}

#[test]
fn every_corpus_file_gives_its_expected_outcome() {
    for (name, text) in corpus() {
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name}: the first line must be `# expect: OUTCOME`"))
            .trim()
            .to_string();
        assert_eq!(outcome(&text), expect, "{name}");
    }
}

#[derive(Clone, Debug)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, Vec<u8>),
    Truncate(usize),
    Splice(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (
            any::<usize>(),
            prop::collection::vec(
                prop_oneof![
                    Just(b'0'),
                    Just(b'9'),
                    Just(b'-'),
                    Just(b'"'),
                    Just(b'['),
                    Just(b'\n'),
                    Just(b'='),
                    any::<u8>()
                ],
                1..8
            )
        )
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(f, l)| Edit::Splice(f, l)),
    ]
}

fn apply(files: &[(String, String)], base: &str, edits: &[Edit]) -> String {
    let mut bytes = base.as_bytes().to_vec();
    for e in edits {
        let n = bytes.len().max(1);
        match e {
            Edit::Replace(i, b) => {
                if !bytes.is_empty() {
                    bytes[i % n] = *b;
                }
            }
            Edit::Insert(i, v) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, v.iter().copied());
            }
            Edit::Truncate(i) => bytes.truncate(i % (bytes.len() + 1)),
            Edit::Splice(f, l) => {
                let other = &files[f % files.len()].1;
                let lines: Vec<&str> = other.lines().collect();
                if !lines.is_empty() {
                    bytes.push(b'\n');
                    bytes.extend_from_slice(lines[l % lines.len()].as_bytes());
                }
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/proptest-regressions.txt"),
        ))),
        ..ProptestConfig::default()
    })]
    /// Mutated corpus files never make parsing, validation or planning panic.
    #[test]
    fn mutated_job_files_never_panic(pick in any::<usize>(), edits in prop::collection::vec(edit(), 1..6)) {
        let files = corpus();
        let base = &files[pick % files.len()].1;
        let text = apply(&files, base, &edits);
        let out = outcome(&text);
        prop_assert!(!out.starts_with("other"), "{out}");
    }
}
