//! The `deepscope` command line: the forward contract, info, generate, and a
//! clear non-zero exit (never a panic) on bad input.

mod common;

use std::process::{Command, Output};

use common::*;
use tch::Tensor;

fn deepscope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepscope"))
        .args(args)
        .env_clear() // the binary must run with no environment (rpath to libtorch)
        .output()
        .expect("run deepscope")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: exit code 1, an `error:` line mentioning `needle`.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("error:"), "stderr: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

fn ids_args(ids: &Tensor) -> Vec<String> {
    let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(ids).expect("ids");
    rows.iter()
        .flat_map(|r| ["--ids".to_string(), r.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")])
        .collect()
}

#[test]
fn forward_writes_logits_and_sorted_routing_matching_transformers() {
    let case = case("v3_base");
    let r = reference(&case);
    let out = Scratch::temp("deepscope-cli-forward", ".safetensors");
    for attn in ["naive", "absorbed"] {
        let mut args = vec!["forward", "--model", case.dir.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu", "--attn", attn];
        let ids = ids_args(&r["input_ids"]);
        args.extend(ids.iter().map(|s| s.as_str()));
        let o = deepscope(&args);
        assert!(o.status.success(), "stderr: {}", stderr(&o));
        let got = read(&out);
        assert_eq!(got["logits"].kind(), tch::Kind::Float);
        assert!(max_abs_diff(&got["logits"], &r["logits"]) <= 1e-4);
        for &l in &case.moe_layers {
            let idx = &got[&format!("layers.{l}.topk_indices")];
            assert_eq!(idx.kind(), tch::Kind::Int64);
            assert!(idx.equal(&r[&format!("layers.{l}.topk_indices")]), "layer {l}");
            assert!(max_abs_diff(&got[&format!("layers.{l}.topk_weights")], &r[&format!("layers.{l}.topk_weights")]) <= 1e-4);
        }
    }
}

#[test]
fn forward_defaults_to_the_absorbed_path_and_cpu_when_no_gpu() {
    let case = case("v2_greedy");
    let out = Scratch::temp("deepscope-cli-default", ".safetensors");
    let o = deepscope(&["forward", "--model", case.dir.to_str().unwrap(), "--ids", "1,2,3", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(read(&out)["logits"].size()[..2], [1, 3]);
}

#[test]
fn unknown_model_directory_fails_cleanly() {
    let o = deepscope(&["forward", "--model", "/nonexistent/model", "--ids", "1,2", "--out", "/tmp/x.safetensors"]);
    assert_clean_failure(&o, "/nonexistent/model");
}

#[test]
fn token_id_beyond_the_vocabulary_fails_cleanly() {
    let case = case("v3_base");
    let o = deepscope(&["forward", "--model", case.dir.to_str().unwrap(), "--ids", "1,2,100000", "--out", "/tmp/x.safetensors"]);
    assert_clean_failure(&o, "token id 100000");
}

#[test]
fn empty_ids_fail_cleanly() {
    let case = case("v3_base");
    let o = deepscope(&["forward", "--model", case.dir.to_str().unwrap(), "--ids", "", "--out", "/tmp/x.safetensors"]);
    assert_clean_failure(&o, "no token ids");
    let o = deepscope(&["forward", "--model", case.dir.to_str().unwrap(), "--ids", "1,x", "--out", "/tmp/x.safetensors"]);
    assert_clean_failure(&o, "`x`");
}

#[test]
fn sequences_of_unequal_length_fail_cleanly() {
    let case = case("v3_base");
    let o = deepscope(&["forward", "--model", case.dir.to_str().unwrap(), "--ids", "1,2,3", "--ids", "4,5", "--out", "/tmp/x.safetensors"]);
    assert_clean_failure(&o, "equal lengths");
}

#[test]
fn unknown_attention_path_and_device_fail_cleanly() {
    let case = case("v3_base");
    let dir = case.dir.to_str().unwrap();
    assert_clean_failure(&deepscope(&["forward", "--model", dir, "--ids", "1", "--out", "/tmp/x.safetensors", "--attn", "fast"]), "fast");
    assert_clean_failure(&deepscope(&["forward", "--model", dir, "--ids", "1", "--out", "/tmp/x.safetensors", "--device", "tpu"]), "tpu");
}

#[test]
fn info_reports_parameters_and_cache_bytes() {
    let case = case("v3_base");
    let o = deepscope(&["info", "--model", case.dir.to_str().unwrap()]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let model = load_cpu(&case.dir);
    let p = deepscope::stats::ParamCounts::of(&model.config);
    assert!(text.contains(&format!("total {}", p.total)), "{text}");
    assert!(text.contains(&format!("active per token {}", p.active_per_token)), "{text}");
    let absorbed = model.config.kv_lora_rank + model.config.qk_rope_head_dim;
    assert!(text.contains(&format!("({absorbed} elements/layer)")), "{text}");
}

#[test]
fn generate_streams_greedy_tokens_that_match_the_library() {
    let case = case("v3_base");
    let o = deepscope(&["generate", "--model", case.dir.to_str().unwrap(), "--ids", "5,6,7", "-n", "6", "--device", "cpu"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let printed: Vec<i64> = String::from_utf8_lossy(&o.stdout).split_whitespace().map(|t| t.parse().unwrap()).collect();
    let model = load_cpu(&case.dir);
    let mut opts = deepscope::model::GenerateOptions::greedy(&model, 6);
    opts.stop_tokens.clear();
    let g = model.generate(&[5, 6, 7], &opts, |_| true).unwrap();
    let expected: Vec<i64> = g.tokens.iter().copied().take_while(|t| !model.config.eos_token_ids.contains(t)).collect();
    assert_eq!(&printed[..], &expected[..printed.len()]);
    assert!(stderr(&o).contains("compressed KV cache"), "{}", stderr(&o));
}

#[test]
fn generate_without_a_tokenizer_asks_for_ids() {
    let case = case("v3_base");
    let o = deepscope(&["generate", "--model", case.dir.to_str().unwrap(), "--prompt", "hello", "-n", "2"]);
    assert_clean_failure(&o, "tokenizer");
}

#[test]
fn import_reads_an_sglang_dump_writes_the_statistics_and_plans_eplb() {
    let dir = fixtures().join("records");
    let out = std::env::temp_dir().join(format!("deepscope-cli-import-{}.json", std::process::id()));
    let per_token = dir.join("sglang_per_token");
    let o = deepscope(&[
        "import", "sglang", per_token.to_str().unwrap(), "--config", "published:deepseek-v3", "--token-layers", "3",
        "--eplb", "32,4,8,32", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("SGLang per_token dump") && text.contains("EPLB plan (hierarchical)"), "{text}");
    let written = deepscope::inspect::RoutingStats::load_from(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let mut files: Vec<_> = std::fs::read_dir(&per_token).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let (cfg, _) = deepscope::model::published::by_name("deepseek-v3").unwrap();
    let direct = deepscope::inspect::RoutingStats::from_sglang(&files, &cfg, &deepscope::inspect::ImportOptions::default().token_layers([3])).unwrap();
    assert_eq!(written, direct, "the CLI writes what the library reads");
    // bad input: a clean failure naming the file and the fault
    let bad = dir.join("bad").join("opcode.pt");
    assert_clean_failure(&deepscope(&["import", "sglang", bad.to_str().unwrap(), "--config", "published:deepseek-v3"]), "unknown pickle opcode 0xff");
    let o = deepscope(&["import", "vllm", dir.join("vllm_state.pt").to_str().unwrap(), "--config", "published:deepseek-v3", "--eplb", "7"]);
    assert_clean_failure(&o, "do not split evenly over 7 GPUs");
}
