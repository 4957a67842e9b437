//! Training: the tokenizer round-trips every domain, a few steps lower the
//! loss and move the router bias as the aux-loss-free rule says, and
//! checkpoints round-trip. Needs the Debian corpus packages (`make test`
//! installs them).

mod common;
use common::Scratch;
use std::path::PathBuf;

use deepscope::model::{Config, ForwardOptions, LoadOptions, Model, Tokenizer};
use deepscope::train::checkpoint::{init_checkpoint, save_model};
use deepscope::train::corpus::{Corpus, CorpusSources, Domain, HELDOUT_EVERY};
use deepscope::train::trainer::{TrainSettings, Trainer};
use tch::{Device, Kind, Tensor};

/// A fresh temp folder, removed when the test ends (also when it fails).
fn tmp(tag: &str) -> Scratch {
    let d = Scratch::temp(&format!("deepscope-train-{tag}"), "");
    std::fs::create_dir_all(&*d).unwrap();
    d
}

fn small_config(vocab: usize) -> Config {
    let text = serde_json::json!({
        "model_type": "deepseek_v3", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": 16,
        "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "first_k_dense_replace": 1, "bos_token_id": 0, "eos_token_id": 1
    });
    Config::from_json_str(&text.to_string(), "test").unwrap()
}

fn load(dir: &std::path::Path) -> Model {
    Model::load(dir, LoadOptions::new(Device::Cpu, Kind::Float)).unwrap()
}

#[test]
fn tokenizer_round_trips_text_of_all_three_domains() {
    let corpus = Corpus::load(&CorpusSources::default()).expect("corpus: install bible-kjv fortunes jargon-text");
    let dir = tmp("tok");
    let path = dir.join("tokenizer.json");
    // a quick tokenizer on a slice of each domain
    let texts: Vec<&str> = Domain::ALL
        .iter()
        .flat_map(|d| corpus.train().filter(move |x| x.domain == *d).take(200).map(|x| x.text.as_str()))
        .collect();
    deepscope::train::bpe::train_bpe(texts.into_iter(), 600, &path).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    for d in Domain::ALL {
        let docs: Vec<_> = corpus.heldout().filter(|x| x.domain == d).take(20).collect();
        assert!(!docs.is_empty(), "no held-out {d:?}");
        for doc in docs {
            let ids = tok.encode(&doc.text).unwrap();
            assert_eq!(ids[0], 0, "encoding starts with <|bos|>");
            assert_eq!(tok.decode(&ids).unwrap(), doc.text, "{d:?} round trip");
        }
    }
}

#[test]
fn corpus_split_holds_out_revelation_and_one_in_67_of_the_rest() {
    let corpus = Corpus::load(&CorpusSources::default()).unwrap();
    let held_bible: Vec<_> = corpus.heldout().filter(|d| d.domain == Domain::Bible).collect();
    assert_eq!(held_bible.len(), 22, "Revelation has 22 chapters");
    assert!(held_bible[0].text.starts_with("The Revelation of Jesus Christ"));
    assert!(corpus.train().all(|d| !d.text.contains("The Revelation of Jesus Christ, which God gave unto him")));
    // (domain, held out?) -> (documents, bytes)
    let summary: std::collections::HashMap<(Domain, bool), (usize, usize)> =
        corpus.summary().into_iter().map(|(d, held, n, bytes)| ((d, held), (n, bytes))).collect();
    for d in [Domain::Fortunes, Domain::Jargon] {
        let (held, all) = (summary[&(d, true)].0, summary[&(d, true)].0 + summary[&(d, false)].0);
        assert_eq!(held, all.div_ceil(HELDOUT_EVERY), "{d:?}: {held}/{all} held out");
        assert!(held >= 10, "{d:?}: only {held} documents held out");
    }
    // The held-out split mixes the domains (by bytes) about as training does.
    let share = |held: bool, d: Domain| {
        summary[&(d, held)].1 as f64 / Domain::ALL.iter().map(|x| summary[&(*x, held)].1).sum::<usize>() as f64
    };
    for d in Domain::ALL {
        let (train, held) = (share(false, d), share(true, d));
        assert!((train - held).abs() < 0.03, "{d:?}: {:.1}% of training bytes but {:.1}% of held-out bytes", 100.0 * train, 100.0 * held);
    }
}

#[test]
fn a_few_steps_lower_the_loss_and_move_the_bias_by_the_rule() {
    let dir = tmp("steps");
    let cfg = small_config(64);
    init_checkpoint(&cfg, &dir, 0.02, 7).unwrap();
    let model = load(&dir);
    let settings = TrainSettings { steps: 30, lr: 1e-2, warmup_steps: 1, bias_update_rate: 0.01, ..Default::default() };
    let mut trainer = Trainer::new(&model, settings).unwrap();
    tch::manual_seed(3);
    let x = Tensor::randint(64, [4, 16], (Kind::Int64, Device::Cpu));
    let y = x.roll([-1], [1]);

    // the bias update the rule predicts for the first step, from its routing
    let moe_layer = model.config.moe_layers()[0];
    let before = model.forward_with(&x, None, ForwardOptions::default()).unwrap();
    let load = before.routing[moe_layer].as_ref().unwrap().topk_indices.flatten(0, -1).bincount(None::<Tensor>, 8).to_kind(Kind::Float);
    let expected = (load.mean(Kind::Float) - &load).sign() * 0.01;
    let bias = model.layers[moe_layer].moe().unwrap().gate.e_score_correction_bias.as_ref().unwrap().shallow_clone();
    let bias0 = bias.copy();

    let first = trainer.step(&x, &y).unwrap();
    let moved = &bias - &bias0;
    assert!(moved.allclose(&expected, 1e-6, 1e-7, false), "bias moved {moved:?}, rule says {expected:?}");
    let mut last = first.loss;
    for _ in 0..20 {
        last = trainer.step(&x, &y).unwrap().loss;
    }
    assert!(last < first.loss * 0.8, "loss {} -> {last}", first.loss);
}

#[test]
fn saved_checkpoints_reload_to_the_same_logits_and_optimizer_state() {
    let dir = tmp("ckpt");
    let cfg = small_config(64);
    init_checkpoint(&cfg, &dir.join("a"), 0.02, 1).unwrap();
    let model = load(&dir.join("a"));
    let mut trainer = Trainer::new(&model, TrainSettings { steps: 5, warmup_steps: 1, ..Default::default() }).unwrap();
    let x = Tensor::randint(64, [2, 8], (Kind::Int64, Device::Cpu));
    trainer.step(&x, &x.roll([-1], [1])).unwrap();
    trainer.save(&dir.join("b")).unwrap();
    save_model(&model, &dir.join("c"), Kind::BFloat16).unwrap();

    let reloaded = load(&dir.join("b"));
    let want = model.forward(&x).unwrap().logits;
    assert!(reloaded.forward(&x).unwrap().logits.allclose(&want, 1e-6, 1e-6, false));
    let mut again = Trainer::new(&reloaded, TrainSettings::default()).unwrap();
    again.restore(&dir.join("b")).unwrap();
    assert_eq!(again.step, 1);

    // bf16 shipping keeps the router bias in f32 and stays close
    let shipped = load(&dir.join("c"));
    let d = (shipped.forward(&x).unwrap().logits - &want).abs().max().double_value(&[]);
    assert!(d < 0.05, "bf16 copy differs by {d}");
}

#[test]
fn written_configs_read_back_to_the_same_config() {
    use deepscope::train::checkpoint::config_json;
    let root = std::env::var_os("DEEPSCOPE_FIXTURES").map(PathBuf::from).unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    for case in ["v3_base", "v3_yarn", "v2_group_limited", "v3_sharded_noqlora"] {
        let mut cfg = Config::from_dir(root.join(case)).unwrap();
        let back = Config::from_json_str(&config_json(&cfg, Kind::Float).to_string(), "roundtrip").unwrap();
        // the writer saves plain (dequantized) weights without MTP layers
        cfg.num_nextn_predict_layers = 0;
        cfg.quantization = None;
        assert_eq!(back, cfg, "{case}");
    }
}

#[test]
fn sequence_balance_term_is_one_when_spread_and_e_over_k_when_collapsed() {
    use deepscope::train::trainer::sequence_balance_loss;
    // 2 sequences x 4 tokens, 8 experts, top-2
    let even_idx = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]).view([4, 2]).repeat([2, 1]);
    let even_scores = Tensor::full([8, 8], 0.5, (Kind::Float, Device::Cpu));
    let v = sequence_balance_loss(&even_scores, &even_idx, 2).unwrap().double_value(&[]);
    assert!((v - 1.0).abs() < 1e-6, "even spread gives {v}");

    let collapsed_idx = Tensor::from_slice(&[0i64, 1]).view([1, 2]).repeat([8, 1]);
    let mut s = vec![0.0f32; 64];
    for row in 0..8 {
        s[row * 8] = 1.0;
        s[row * 8 + 1] = 1.0;
    }
    let collapsed_scores = Tensor::from_slice(&s).view([8, 8]);
    let v = sequence_balance_loss(&collapsed_scores, &collapsed_idx, 2).unwrap().double_value(&[]);
    assert!((v - 4.0).abs() < 1e-6, "collapse onto 2 of 8 experts gives {v}, E/K is 4");

    // balanced over the batch but each sequence collapsed: the term sees it
    let per_seq = Tensor::cat(&[Tensor::from_slice(&[0i64, 1]).view([1, 2]).repeat([4, 1]), Tensor::from_slice(&[2i64, 3]).view([1, 2]).repeat([4, 1])], 0);
    let v = sequence_balance_loss(&collapsed_scores, &per_seq, 2).unwrap().double_value(&[]);
    assert!(v > 1.5, "per-sequence collapse gives {v}");

    let err = sequence_balance_loss(&even_scores, &even_idx, 3).unwrap_err().to_string();
    assert!(err.contains("3 sequences"), "{err}");
}

#[test]
fn the_sequence_balance_loss_evens_out_routing_within_sequences() {
    // same init and batches, no bias balancing; only alpha differs
    let run = |alpha: f64| {
        let dir = tmp(&format!("seqbal-{alpha}"));
        init_checkpoint(&small_config(64), &dir, 0.02, 5).unwrap();
        let model = load(&dir);
        let settings = TrainSettings { steps: 40, lr: 1e-2, warmup_steps: 1, bias_update_rate: 0.0, seq_balance_alpha: alpha, ..Default::default() };
        let mut trainer = Trainer::new(&model, settings).unwrap();
        tch::manual_seed(11);
        let x = Tensor::randint(64, [4, 16], (Kind::Int64, Device::Cpu));
        let y = x.roll([-1], [1]);
        let first = trainer.step(&x, &y).unwrap();
        let mut last = first.clone();
        for _ in 0..30 {
            last = trainer.step(&x, &y).unwrap();
        }
        (first, last)
    };
    let (off0, off) = run(0.0);
    let (on0, on) = run(0.5);
    // the first step's measurement is the same (same init), the loss term is not part of it
    assert!((off0.seq_balance - on0.seq_balance).abs() < 1e-9 && (off0.loss - on0.loss).abs() < 1e-9);
    // without the loss, routing within sequences drifts away from even (1) as
    // the model learns; with it, at most half that excess remains
    assert!(off.seq_balance > off0.seq_balance, "no drift to correct: {} -> {}", off0.seq_balance, off.seq_balance);
    assert!(
        on.seq_balance - 1.0 < 0.5 * (off.seq_balance - 1.0),
        "with the loss {} vs without {}",
        on.seq_balance,
        off.seq_balance
    );
    assert!(on.seq_balance < on0.seq_balance, "the loss did not lower the term: {} -> {}", on0.seq_balance, on.seq_balance);
    // and the model still learns
    assert!(on.loss < on0.loss * 0.8, "loss {} -> {}", on0.loss, on.loss);
}
