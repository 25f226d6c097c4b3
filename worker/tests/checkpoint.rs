//! The checkpoint file layer: safetensors round trips, FP8 dequantization, model directories and
//! atomic checkpoint directories.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use shoal_kernels::{Fp8Format, Tensor};
use shoal_spec::ModelConfig;
use shoal_worker::WorkerError;
use shoal_worker::checkpoint::{
    CheckpointWriter, StoreDtype, load_model_dir, load_safetensors, save_model_dir,
    save_safetensors, write_file_atomic,
};
use tempfile::tempdir;

/// Deterministic awkward values: signs, tiny and large magnitudes, values BF16 must round.
fn sample(shape: &[usize], seed: u32) -> Tensor<f32> {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            let m = f32::from(u16::try_from(x >> 16).expect("test fixture")) / 65536.0;
            let sign = if x & 1 == 0 { 1.0 } else { -1.0 };
            sign * (m + 1e-3) * 10f32.powi(i32::try_from(x % 7).expect("test fixture") - 3)
        })
        .collect();
    Tensor::new(shape.to_vec(), data).expect("test fixture")
}

fn named<'a>(items: &[(&str, &'a Tensor<f32>)]) -> Vec<(String, &'a Tensor<f32>)> {
    items.iter().map(|(n, t)| (n.to_string(), *t)).collect()
}

/// Writes raw `(name, dtype, shape, bytes)` entries with the safetensors crate directly.
fn write_raw(path: &Path, entries: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                TensorView::new(*d, s.clone(), b).expect("test fixture"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).expect("test fixture");
    fs::write(path, bytes).expect("test fixture");
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn message(e: WorkerError) -> String {
    e.to_string()
}

fn tiny_config_json() -> String {
    serde_json::to_string_pretty(&ModelConfig::tiny().to_hf_json()).expect("test fixture")
}

#[test]
fn f32_round_trip_is_exact() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let a = sample(&[3, 5], 1);
    let b = sample(&[7], 2);
    let scalar = Tensor::new(Vec::<usize>::new(), vec![-2.5f32]).unwrap();
    let empty = Tensor::<f32>::zeros([0, 4]);
    let special = Tensor::new([4], vec![f32::MIN_POSITIVE / 4.0, -0.0, f32::MAX, 1e-40]).unwrap();
    let tensors = named(&[
        ("model.layers.0.w", &a),
        ("lm_head.weight", &b),
        ("scalar", &scalar),
        ("empty", &empty),
        ("special", &special),
    ]);
    save_safetensors(&path, &tensors, StoreDtype::F32).unwrap();
    let loaded = load_safetensors(&path).unwrap();
    assert_eq!(loaded.len(), 5);
    for (name, t) in &tensors {
        let got = &loaded[name];
        assert_eq!(got.shape(), t.shape(), "{name}");
        let same_bits = got
            .data()
            .iter()
            .zip(t.data())
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same_bits, "{name}");
    }
    // No temporary files are left beside the result.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("model.safetensors")]);
}

#[test]
fn header_has_pt_format_metadata_and_dtypes() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let a = sample(&[2, 3], 3);
    save_safetensors(&path, &named(&[("a", &a)]), StoreDtype::Bf16).unwrap();
    let bytes = fs::read(&path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let expected = HashMap::from([("format".to_string(), "pt".to_string())]);
    assert_eq!(meta.metadata().as_ref(), Some(&expected));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("a").unwrap().dtype(), Dtype::BF16);
}

#[test]
fn bf16_round_trip_equals_rounding() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let a = sample(&[17, 9], 4);
    // Ties: 1 + 2^-8 rounds down to 1 (even), 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
    let ties = Tensor::new([2], vec![1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)]).unwrap();
    save_safetensors(
        &path,
        &named(&[("a", &a), ("ties", &ties)]),
        StoreDtype::Bf16,
    )
    .unwrap();
    let loaded = load_safetensors(&path).unwrap();
    let want = a.map(|v| bf16::from_f32(v).to_f32());
    assert_eq!(loaded["a"], want);
    assert_eq!(loaded["ties"].data(), &[1.0, 1.0 + 2f32.powi(-6)]);
    assert_ne!(loaded["a"], a, "bf16 must actually round these values");
}

#[test]
fn f16_tensors_load_exactly() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("f16.safetensors");
    let values = [0.5f32, -1.25, 65504.0, 6.1035156e-5, 0.0, -3.0];
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    write_raw(&path, &[("h", Dtype::F16, vec![2, 3], bytes)]);
    let loaded = load_safetensors(&path).unwrap();
    assert_eq!(loaded["h"].shape(), &[2, 3]);
    assert_eq!(loaded["h"].data(), &values);
}

#[test]
fn fp8_e4m3_with_scale_inv_dequantizes_blockwise_with_partial_blocks() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("fp8.safetensors");
    let (rows, cols) = (130usize, 200usize);
    // 0x38 encodes 1.0 in E4M3 (exponent 7 = bias, mantissa 0), 0x40 is 2.0, 0xB8 is -1.0,
    // 0x3C is 1.5, 0x00 is 0.
    let mut codes = vec![0u8; rows * cols];
    for (i, c) in codes.iter_mut().enumerate() {
        *c = match i % 5 {
            0 => 0x38,
            1 => 0x40,
            2 => 0xB8,
            3 => 0x3C,
            _ => 0x00,
        };
    }
    let code_value = |i: usize| [1.0f32, 2.0, -1.0, 1.5, 0.0][i % 5];
    // Scales [ceil(130/128), ceil(200/128)] = [2, 2]: blocks rows 0..128 / 128..130 by
    // columns 0..128 / 128..200.
    let scales = [0.5f32, 0.25, 4.0, 0.125];
    write_raw(
        &path,
        &[
            ("m.weight", Dtype::F8_E4M3, vec![rows, cols], codes.clone()),
            (
                "m.weight_scale_inv",
                Dtype::F32,
                vec![2, 2],
                f32_bytes(&scales),
            ),
            ("m.bias", Dtype::F32, vec![2], f32_bytes(&[7.0, 8.0])),
        ],
    );
    let loaded = load_safetensors(&path).unwrap();
    assert_eq!(
        loaded.keys().collect::<Vec<_>>(),
        vec!["m.bias", "m.weight"],
        "the scale entry is consumed"
    );
    let w = &loaded["m.weight"];
    assert_eq!(w.shape(), &[rows, cols]);
    // Hand-computed entries: element (r, c) is code i = 200 r + c, value [1, 2, -1, 1.5, 0][i % 5],
    // times the scale of block (r / 128, c / 128).
    let at = |r: usize, c: usize| w.data()[r * cols + c];
    assert_eq!(at(0, 0), 0.5); // i = 0: 1.0 * 0.5
    assert_eq!(at(0, 1), 1.0); // i = 1: 2.0 * 0.5
    assert_eq!(at(0, 127), -0.5); // i = 127: -1.0 * 0.5
    assert_eq!(at(0, 128), 0.375); // i = 128: 1.5 * 0.25 (block (0, 1))
    assert_eq!(at(127, 198), 0.375); // i = 25598: 1.5 * 0.25
    assert_eq!(at(127, 199), 0.0); // i = 25599: 0
    assert_eq!(at(128, 0), 4.0); // i = 25600: 1.0 * 4.0 (block (1, 0), partial rows)
    assert_eq!(at(129, 127), -4.0); // i = 25927: -1.0 * 4.0
    assert_eq!(at(128, 128), 0.1875); // i = 25728: 1.5 * 0.125 (block (1, 1), partial both)
    assert_eq!(at(129, 197), -0.125); // i = 25997: -1.0 * 0.125
    // The codes mean what the comments say.
    for (code, v) in [
        (0x38u8, 1.0f32),
        (0x40, 2.0),
        (0xB8, -1.0),
        (0x3C, 1.5),
        (0x00, 0.0),
    ] {
        assert_eq!(Fp8Format::E4M3.decode(code), v);
    }
    // Every element.
    for r in 0..rows {
        for c in 0..cols {
            let scale = scales[(r / 128) * 2 + c / 128];
            assert_eq!(at(r, c), code_value(r * cols + c) * scale, "({r}, {c})");
        }
    }
    assert_eq!(loaded["m.bias"].data(), &[7.0, 8.0]);
}

#[test]
fn fp8_without_scale_is_an_error_naming_tensor_and_file() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("noscale.safetensors");
    write_raw(
        &path,
        &[("x.weight", Dtype::F8_E4M3, vec![2, 2], vec![0x38; 4])],
    );
    let msg = message(load_safetensors(&path).unwrap_err());
    assert!(msg.contains("x.weight"), "{msg}");
    assert!(msg.contains("x.weight_scale_inv"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn fp8_with_misshapen_scale_is_an_error() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("badscale.safetensors");
    write_raw(
        &path,
        &[
            ("x.weight", Dtype::F8_E4M3, vec![130, 2], vec![0x38; 260]),
            (
                "x.weight_scale_inv",
                Dtype::F32,
                vec![1, 1],
                f32_bytes(&[1.0]),
            ),
        ],
    );
    let msg = message(load_safetensors(&path).unwrap_err());
    assert!(msg.contains("x.weight_scale_inv"), "{msg}");
    assert!(msg.contains("[2, 1]"), "{msg}");
}

#[test]
fn scale_inv_without_fp8_weight_is_an_ordinary_tensor() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("plain.safetensors");
    let w = sample(&[2, 2], 5);
    let s = sample(&[1, 1], 6);
    save_safetensors(
        &path,
        &named(&[("x.weight", &w), ("x.weight_scale_inv", &s)]),
        StoreDtype::F32,
    )
    .unwrap();
    let loaded = load_safetensors(&path).unwrap();
    assert_eq!(loaded["x.weight"], w);
    assert_eq!(loaded["x.weight_scale_inv"], s);
}

#[test]
fn unsupported_dtype_error_names_tensor_and_dtype() {
    let dir = tempdir().unwrap();
    for (dtype, bytes) in [(Dtype::I8, vec![1u8, 2]), (Dtype::I64, vec![0u8; 16])] {
        let path = dir.path().join(format!("{dtype}.safetensors"));
        let n = bytes.len() * 8 / dtype.bitsize();
        write_raw(
            &path,
            &[
                ("ok", Dtype::F32, vec![1], f32_bytes(&[1.0])),
                ("model.layers.3.counts", dtype, vec![n], bytes),
            ],
        );
        let msg = message(load_safetensors(&path).unwrap_err());
        assert!(msg.contains("model.layers.3.counts"), "{msg}");
        assert!(msg.contains(&dtype.to_string()), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}

#[test]
fn truncated_or_garbage_files_error_naming_the_file() {
    let dir = tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let a = sample(&[8, 8], 7);
    save_safetensors(&good, &named(&[("a", &a)]), StoreDtype::F32).unwrap();
    let bytes = fs::read(&good).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() - 10].to_vec()),
        ("header_only_cut", bytes[..20].to_vec()),
        ("tiny", vec![1, 2, 3]),
        ("empty", Vec::new()),
        ("huge_header_len", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("garbage_json", {
            let mut b = 8u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"not json");
            b
        }),
        (
            "random",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
    ];
    for (name, content) in cases {
        let path = dir.path().join(format!("{name}.safetensors"));
        fs::write(&path, content).unwrap();
        let msg = message(load_safetensors(&path).unwrap_err());
        assert!(msg.contains(&path.display().to_string()), "{name}: {msg}");
    }
    let missing = dir.path().join("missing.safetensors");
    let msg = message(load_safetensors(&missing).unwrap_err());
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
}

#[test]
fn save_rejects_duplicate_and_reserved_names() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("dup.safetensors");
    let a = sample(&[2], 8);
    let msg = message(
        save_safetensors(&path, &named(&[("a", &a), ("a", &a)]), StoreDtype::F32).unwrap_err(),
    );
    assert!(msg.contains("tensor a"), "{msg}");
    let msg = message(
        save_safetensors(&path, &named(&[("__metadata__", &a)]), StoreDtype::F32).unwrap_err(),
    );
    assert!(msg.contains("__metadata__"), "{msg}");
    assert!(!path.exists());
}

#[test]
fn save_into_missing_directory_errors_naming_it() {
    let dir = tempdir().unwrap();
    let parent = dir.path().join("nope");
    let a = sample(&[2], 9);
    let err = save_safetensors(
        &parent.join("w.safetensors"),
        &named(&[("a", &a)]),
        StoreDtype::F32,
    )
    .unwrap_err();
    assert!(message(err).contains(&parent.display().to_string()));
}

/// A sharded directory: an FP8 weight in one shard with its scale in another.
fn write_sharded(dir: &Path) -> (Tensor<f32>, Tensor<f32>) {
    fs::write(dir.join("config.json"), tiny_config_json()).expect("test fixture");
    let a = sample(&[4, 3], 10);
    let b = sample(&[5], 11);
    save_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &named(&[("a", &a)]),
        StoreDtype::F32,
    )
    .expect("test fixture");
    write_raw(
        &dir.join("model-00002-of-00002.safetensors"),
        &[
            ("b", Dtype::F32, vec![5], f32_bytes(b.data())),
            (
                "q.weight",
                Dtype::F8_E4M3,
                vec![2, 3],
                vec![0x38, 0x40, 0xB8, 0x3C, 0x00, 0x38],
            ),
        ],
    );
    write_raw(
        &dir.join("model-00003-of-00002.safetensors"),
        &[(
            "q.weight_scale_inv",
            Dtype::F32,
            vec![1, 1],
            f32_bytes(&[3.0]),
        )],
    );
    let index = serde_json::json!({
        "metadata": {"total_size": 0},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "q.weight": "model-00002-of-00002.safetensors",
            "q.weight_scale_inv": "model-00003-of-00002.safetensors",
        }
    });
    fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).expect("test fixture"),
    )
    .expect("test fixture");
    (a, b)
}

#[test]
fn sharded_index_loads_every_shard() {
    let dir = tempdir().expect("test fixture");
    let (a, b) = write_sharded(dir.path());
    let (config, tensors) = load_model_dir(dir.path()).expect("test fixture");
    assert_eq!(config, ModelConfig::tiny());
    assert_eq!(
        tensors.keys().collect::<Vec<_>>(),
        vec!["a", "b", "q.weight"]
    );
    assert_eq!(tensors["a"], a);
    assert_eq!(tensors["b"], b);
    assert_eq!(tensors["q.weight"].data(), &[3.0, 6.0, -3.0, 4.5, 0.0, 3.0]);
}

#[test]
fn single_file_model_dir_round_trip() {
    let dir = tempdir().unwrap();
    let model = dir.path().join("model");
    let a = sample(&[3, 4], 12);
    let config = ModelConfig::tiny();
    save_model_dir(&model, &config, &named(&[("embed", &a)]), StoreDtype::F32).unwrap();
    assert!(model.join("config.json").is_file());
    assert!(model.join("model.safetensors").is_file());
    let (c, t) = load_model_dir(&model).unwrap();
    assert_eq!(c, config);
    assert_eq!(t["embed"], a);
}

#[test]
fn load_model_dir_missing_config_is_named() {
    let dir = tempdir().unwrap();
    let a = sample(&[2], 13);
    save_safetensors(
        &dir.path().join("model.safetensors"),
        &named(&[("a", &a)]),
        StoreDtype::F32,
    )
    .unwrap();
    let msg = message(load_model_dir(dir.path()).unwrap_err());
    assert!(
        msg.contains(&dir.path().join("config.json").display().to_string()),
        "{msg}"
    );
}

#[test]
fn load_model_dir_invalid_config_is_named() {
    let dir = tempdir().unwrap();
    fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let msg = message(load_model_dir(dir.path()).unwrap_err());
    assert!(
        msg.contains(&dir.path().join("config.json").display().to_string()),
        "{msg}"
    );
}

#[test]
fn load_model_dir_missing_weights_is_named() {
    let dir = tempdir().unwrap();
    fs::write(dir.path().join("config.json"), tiny_config_json()).unwrap();
    let msg = message(load_model_dir(dir.path()).unwrap_err());
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn load_model_dir_missing_shard_is_named() {
    let dir = tempdir().unwrap();
    write_sharded(dir.path());
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    fs::remove_file(&shard).unwrap();
    let msg = message(load_model_dir(dir.path()).unwrap_err());
    assert!(msg.contains(&shard.display().to_string()), "{msg}");
}

#[test]
fn load_model_dir_tensor_absent_from_its_shard_is_named() {
    let dir = tempdir().unwrap();
    write_sharded(dir.path());
    let index = serde_json::json!({"weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "ghost": "model-00001-of-00002.safetensors",
    }});
    fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let msg = message(load_model_dir(dir.path()).unwrap_err());
    assert!(msg.contains("ghost"), "{msg}");
    assert!(msg.contains("model-00001-of-00002.safetensors"), "{msg}");
}

#[test]
fn load_model_dir_rejects_bad_index() {
    let dir = tempdir().unwrap();
    fs::write(dir.path().join("config.json"), tiny_config_json()).unwrap();
    let index_path = dir.path().join("model.safetensors.index.json");
    for bad in [
        "not json".to_string(),
        r#"{"metadata": {}}"#.to_string(),
        r#"{"weight_map": {"a": 3}}"#.to_string(),
        r#"{"weight_map": {"a": "../escape.safetensors"}}"#.to_string(),
        r#"{"weight_map": {"a": "/abs.safetensors"}}"#.to_string(),
    ] {
        fs::write(&index_path, &bad).unwrap();
        let msg = message(load_model_dir(dir.path()).unwrap_err());
        assert!(
            msg.contains(&index_path.display().to_string()),
            "{bad}: {msg}"
        );
    }
}

#[test]
fn load_model_dir_tensor_in_two_shards_is_an_error() {
    let dir = tempdir().unwrap();
    write_sharded(dir.path());
    let a = sample(&[4, 3], 10);
    save_safetensors(
        &dir.path().join("model-00003-of-00002.safetensors"),
        &named(&[("a", &a)]),
        StoreDtype::F32,
    )
    .unwrap();
    let msg = message(load_model_dir(dir.path()).unwrap_err());
    assert!(msg.contains("tensor a"), "{msg}");
}

#[test]
fn writer_commit_produces_the_directory() {
    let root = tempdir().unwrap();
    let final_dir = root.path().join("step-100");
    let a = sample(&[3, 3], 14);
    let writer = CheckpointWriter::begin(&final_dir).unwrap();
    assert_ne!(writer.path(), final_dir.as_path());
    assert_eq!(writer.path().parent(), Some(root.path()));
    assert_eq!(writer.final_dir(), final_dir.as_path());
    writer
        .write_json("trainer.json", &serde_json::json!({"step": 100}))
        .unwrap();
    writer
        .write_safetensors("model.safetensors", &named(&[("a", &a)]), StoreDtype::F32)
        .unwrap();
    writer
        .write_safetensors(
            "optim/state.safetensors",
            &named(&[("m.a", &a)]),
            StoreDtype::Bf16,
        )
        .unwrap();
    fs::write(writer.path().join("notes.txt"), "direct write").unwrap();
    assert!(
        !final_dir.exists(),
        "nothing under the final name before commit"
    );
    writer.commit().unwrap();

    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(final_dir.join("trainer.json")).unwrap()).unwrap();
    assert_eq!(json["step"], 100);
    assert_eq!(
        load_safetensors(&final_dir.join("model.safetensors")).unwrap()["a"],
        a
    );
    assert!(final_dir.join("optim/state.safetensors").is_file());
    assert_eq!(
        fs::read_to_string(final_dir.join("notes.txt")).unwrap(),
        "direct write"
    );
    // Only the committed directory remains.
    let entries: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("step-100")]);
}

#[test]
fn uncommitted_writer_leaves_nothing_behind() {
    let root = tempdir().unwrap();
    let final_dir = root.path().join("ckpt");
    let tmp;
    {
        let writer = CheckpointWriter::begin(&final_dir).unwrap();
        writer
            .write_json("config.json", &serde_json::json!({}))
            .unwrap();
        tmp = writer.path().to_path_buf();
        assert!(tmp.is_dir());
    }
    assert!(!tmp.exists());
    assert!(!final_dir.exists());
    assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
}

#[test]
fn commit_over_existing_checkpoint_replaces_it() {
    let root = tempdir().unwrap();
    let final_dir = root.path().join("latest");
    let writer = CheckpointWriter::begin(&final_dir).unwrap();
    writer
        .write_json("a.json", &serde_json::json!({"v": 1}))
        .unwrap();
    writer
        .write_json("old_only.json", &serde_json::json!({}))
        .unwrap();
    writer.commit().unwrap();

    let writer = CheckpointWriter::begin(&final_dir).unwrap();
    writer
        .write_json("a.json", &serde_json::json!({"v": 2}))
        .unwrap();
    writer.commit().unwrap();

    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(final_dir.join("a.json")).unwrap()).unwrap();
    assert_eq!(v["v"], 2);
    assert!(!final_dir.join("old_only.json").exists());
    let entries: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("latest")]);
}

#[test]
fn commit_refuses_to_replace_a_regular_file() {
    let root = tempdir().unwrap();
    let final_dir = root.path().join("taken");
    fs::write(&final_dir, "precious").unwrap();
    let writer = CheckpointWriter::begin(&final_dir).unwrap();
    let msg = message(writer.commit().unwrap_err());
    assert!(msg.contains(&final_dir.display().to_string()), "{msg}");
    assert_eq!(fs::read_to_string(&final_dir).unwrap(), "precious");
    assert_eq!(
        fs::read_dir(root.path()).unwrap().count(),
        1,
        "temporary directory removed"
    );
}

#[test]
fn unwritable_parent_is_an_error_naming_it() {
    let root = tempdir().unwrap();
    let file = root.path().join("plain-file");
    fs::write(&file, "x").unwrap();
    let msg = message(CheckpointWriter::begin(&file.join("ckpt")).unwrap_err());
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    let msg = message(write_file_atomic(&file.join("a.json"), b"{}").unwrap_err());
    assert!(msg.contains(&file.display().to_string()), "{msg}");
}

#[test]
fn writer_rejects_names_escaping_the_directory() {
    let root = tempdir().unwrap();
    let writer = CheckpointWriter::begin(&root.path().join("c")).unwrap();
    for bad in ["../x.json", "/abs.json", "", "a/../../b.json"] {
        assert!(
            writer.write_json(bad, &serde_json::json!({})).is_err(),
            "{bad}"
        );
    }
    assert!(!root.path().join("x.json").exists());
}

#[test]
fn write_file_atomic_replaces_contents_without_leftovers() {
    let root = tempdir().unwrap();
    let path = root.path().join("state.json");
    write_file_atomic(&path, b"one").unwrap();
    write_file_atomic(&path, b"two").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"two");
    assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
}

#[test]
fn loaded_map_is_sorted_and_complete() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let tensors: Vec<Tensor<f32>> = (0..20).map(|i| sample(&[i + 1], i as u32)).collect();
    let names: Vec<String> = (0..20).map(|i| format!("model.layers.{i}.w")).collect();
    let pairs: Vec<(String, &Tensor<f32>)> = names.iter().cloned().zip(tensors.iter()).collect();
    save_safetensors(&path, &pairs, StoreDtype::F32).unwrap();
    let loaded: BTreeMap<String, Tensor<f32>> = load_safetensors(&path).unwrap();
    for (n, t) in &pairs {
        assert_eq!(&loaded[n], *t);
    }
}

#[test]
fn fp8_tensor_that_is_not_a_matrix_is_an_error() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("fp8vec.safetensors");
    write_raw(
        &path,
        &[
            ("v.weight", Dtype::F8_E4M3, vec![4], vec![0x38; 4]),
            ("v.weight_scale_inv", Dtype::F32, vec![1], f32_bytes(&[1.0])),
        ],
    );
    let msg = message(load_safetensors(&path).unwrap_err());
    assert!(msg.contains("v.weight"), "{msg}");
    assert!(msg.contains("[4]"), "{msg}");
}

#[cfg(unix)]
#[test]
fn saved_files_are_world_readable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let a = sample(&[2], 15);
    save_safetensors(&path, &named(&[("a", &a)]), StoreDtype::F32).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);
}
