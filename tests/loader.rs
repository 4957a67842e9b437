//! Checkpoint reading: FP8 dequantization, shards, skipped MTP layers, and a
//! clear error for every kind of broken checkpoint.

mod common;

use std::path::Path;

use common::*;
use deepscope::model::loader::{dequantize_blocks, Checkpoint};
use deepscope::model::{LoadOptions, Model};
use deepscope::Error;
use tch::{Device, Kind, Tensor};

fn load(dir: &Path) -> Result<Model, Error> {
    Model::load(dir, LoadOptions::new(Device::Cpu, Kind::Float))
}

/// Rewrites `model.safetensors` of `dir` through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).expect("read");
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &file).expect("write");
}

#[test]
fn fp8_block_dequantization_matches_the_reference() {
    let file = Checkpoint::open_file(case("v3_fp8").dir.join("fp8_reference.safetensors")).expect("open");
    let fp8 = file.raw("weight").expect("weight");
    assert_eq!(fp8.kind(), Kind::Float8e4m3fn);
    let w = dequantize_blocks(&fp8, &file.raw("scale_inv").expect("scale"), [128, 128]).expect("dequantize");
    let d = max_abs_diff(&w, &file.raw("dequantized").expect("dequantized"));
    assert!(d == 0.0, "dequantized weight differs by {d:e}");
}

#[test]
fn fp8_checkpoint_skips_multi_token_prediction_layers_with_a_notice() {
    let model = load(&case("v3_fp8").dir).expect("load");
    assert_eq!(model.layers.len(), model.config.num_hidden_layers);
    assert!(
        model.load_notes.iter().any(|n| n.contains("multi-token-prediction")),
        "notes: {:?}",
        model.load_notes
    );
}

#[test]
fn sharded_checkpoint_reads_every_shard() {
    let case = case("v3_sharded_noqlora");
    let shards = std::fs::read_dir(&case.dir)
        .expect("dir")
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".safetensors") && e.file_name() != "reference.safetensors"))
        .count();
    assert!(shards >= 2, "fixture should be sharded, found {shards} file(s)");
    load(&case.dir).expect("sharded load");
}

#[test]
fn loaded_weights_add_up_to_the_config_parameter_count() {
    for case in cases() {
        let model = load(&case.dir).expect("load");
        let loaded = model.parameter_count();
        let counted = deepscope::stats::ParamCounts::of(&model.config).total;
        assert_eq!(loaded, counted, "{}: loaded {loaded} params, config says {counted}", case.name);
        // plain tensors (what training and saving use) wherever FP8 is not kept packed
        match model.named_weights() {
            Ok(named) => assert_eq!(named.iter().map(|(_, t)| t.numel() as u64).sum::<u64>(), counted, "{}", case.name),
            Err(e) => assert!(case.name.contains("fp8") && e.to_string().contains("packed FP8"), "{}: {e}", case.name),
        }
    }
}

#[test]
fn truncated_file_is_reported_with_its_path() {
    let dir = copy_case(&case("v3_base"), "truncated");
    let file = dir.join("model.safetensors");
    let len = std::fs::metadata(&file).expect("meta").len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).expect("open");
    f.set_len(len / 2).expect("truncate");
    let err = load(&dir).expect_err("truncated file must fail");
    assert!(matches!(err, Error::BadCheckpointFile { .. }), "got {err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_shape_names_tensor_file_and_both_shapes() {
    let dir = copy_case(&case("v3_base"), "shape");
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    edit_weights(&dir, |ts| {
        for (n, t) in ts.iter_mut() {
            if n == name {
                *t = t.narrow(0, 0, t.size()[0] - 1);
            }
        }
    });
    let err = load(&dir).expect_err("wrong shape must fail");
    match &err {
        Error::ShapeMismatch { name: n, file, expected, found } => {
            assert_eq!(n, name);
            assert!(file.ends_with("model.safetensors"));
            assert_eq!(expected[0], found[0] + 1);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(name) && msg.contains("expected"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_case(&case("v3_base"), "missing");
    let name = "model.layers.2.mlp.experts.3.up_proj.weight";
    edit_weights(&dir, |ts| ts.retain(|(n, _)| n != name));
    let err = load(&dir).expect_err("missing tensor must fail");
    assert!(matches!(&err, Error::MissingTensor { name: n, .. } if n == name), "got {err}");
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = copy_case(&case("v3_base"), "unexpected");
    edit_weights(&dir, |ts| ts.push(("model.layers.0.mlp.mystery.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu)))));
    let err = load(&dir).expect_err("unexpected tensor must fail");
    assert!(matches!(err, Error::UnexpectedTensors { .. }), "got {err}");
    assert!(err.to_string().contains("model.layers.0.mlp.mystery.weight"), "{err}");
}

#[test]
fn missing_weights_file_is_reported() {
    let dir = copy_case(&case("v3_base"), "noweights");
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    let err = load(&dir).expect_err("no weights must fail");
    assert!(matches!(err, Error::NoWeights { .. }), "got {err}");
}

#[test]
fn bad_config_json_names_the_file() {
    let dir = copy_case(&case("v3_base"), "badjson");
    std::fs::write(dir.join("config.json"), "{ not json").expect("write");
    let err = load(&dir).expect_err("bad json must fail");
    assert!(matches!(err, Error::Json { .. }), "got {err}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn invalid_config_combination_names_the_field() {
    let dir = copy_case(&case("v3_base"), "badcfg");
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    cfg["n_group"] = serde_json::json!(3); // 8 experts do not split into 3 groups
    std::fs::write(&path, cfg.to_string()).expect("write");
    let err = load(&dir).expect_err("bad config must fail");
    match &err {
        Error::Config { field, .. } => assert_eq!(field, "n_group"),
        other => panic!("expected Config error, got {other}"),
    }
}

#[test]
fn missing_model_directory_is_reported() {
    let err = load(Path::new("/nonexistent/deepscope-model")).expect_err("must fail");
    assert!(err.to_string().contains("/nonexistent/deepscope-model"), "{err}");
}

#[test]
fn the_names_the_loader_recorded_are_the_checkpoint_names() {
    // the writer's names come from the loader's record: the same set as the
    // checkpoint read (multi-token-prediction layers, which are skipped, aside)
    for name in ["v3_base", "v3_sharded_noqlora", "v2_greedy"] {
        let case = case(name);
        let model = load(&case.dir).expect("load");
        let ck = Checkpoint::open(&case.dir, None).expect("open");
        let n = model.config.num_hidden_layers;
        let beyond = |s: &str| {
            s.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| l >= n)
        };
        let mut in_checkpoint: Vec<String> = ck.names().filter(|s| !beyond(s)).cloned().collect();
        let mut written: Vec<String> =
            deepscope::train::checkpoint::hf_state_dict(&model).expect("state dict").into_iter().map(|(s, _)| s).collect();
        in_checkpoint.sort();
        written.sort();
        assert_eq!(written, in_checkpoint, "{name}");
        // and each recorded tensor is the model's own storage, not a copy
        let (_, embed) = model.named_weights().unwrap().into_iter().find(|(s, _)| s == "model.embed_tokens.weight").unwrap();
        assert_eq!(embed.data_ptr(), model.embed_tokens.ready_or_err().unwrap().data_ptr());
    }
}
