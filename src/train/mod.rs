//! Training DeepSeek-V3-shaped models with DeepScope's own forward pass:
//! the corpus, the tokenizer, the training loop with aux-loss-free balancing,
//! held-out evaluation and the model card of the shipped default model.

pub mod bpe;
pub mod checkpoint;
pub mod corpus;
pub mod data;
pub mod eval;
pub mod trainer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind};

use crate::error::{Error, Result};
use crate::model::{Config, LoadOptions, Model, Tokenizer};
use corpus::{Corpus, CorpusSources, Domain};
use data::{tokenize_doc, TokenDoc, TrainStream};
use trainer::{run_paths, TrainSettings, Trainer, TRAIN_LOG_HEADER};

/// The architecture of the shipped default model: DeepSeek-V3 in miniature
/// (MLA with q and kv compression, decoupled RoPE, one dense layer then MoE
/// layers with 1 shared + 16 routed experts, sigmoid router with 4 groups).
pub fn tiny_config(vocab_size: usize) -> Config {
    let text = json!({
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size, "hidden_size": 256, "intermediate_size": 768,
        "moe_intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4,
        "q_lora_rank": 96, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
        "v_head_dim": 32, "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
        "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "norm_topk_prob": true,
        "routed_scaling_factor": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_interleave": true, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "tie_word_embeddings": false
    });
    // the literal above is valid by construction; validation is still run
    Config::from_json_str(&text.to_string(), "<tiny_config>").expect("the built-in tiny config is valid")
}

/// Everything `deepscope train` needs.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Run directory: tokenizer, checkpoint/, logs, and the final model/.
    pub out: PathBuf,
    pub settings: TrainSettings,
    pub vocab_size: usize,
    pub init_std: f64,
    pub eval_every: u64,
    /// Held-out documents per domain scored during training (all at the end).
    pub eval_docs_per_domain: usize,
    pub device: Device,
    pub resume: bool,
    pub sources: CorpusSources,
    /// The command line, recorded in the model card.
    pub command: String,
}

/// Trains, evaluates the saved bf16 model on the full held-out split, and
/// writes `out/model/` (HF layout + tokenizer + README model card).
pub fn run(job: &TrainJob) -> Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    eprintln!("reading the corpus (bible-kjv, fortunes, jargon-text)...");
    let corpus = Corpus::load(&job.sources)?;
    for (d, held, n, bytes) in corpus.summary() {
        eprintln!("  {:<8} {:<8} {:>6} docs {:>9} bytes", d.name(), if held { "held-out" } else { "train" }, n, bytes);
    }
    let (ckpt, train_log, eval_log) = run_paths(&job.out);
    let resuming = job.resume && ckpt.join("train_state.json").exists();
    let tok_path = job.out.join("tokenizer.json");
    if resuming {
        // the checkpoint's embeddings index this tokenizer: it must be the same file
        if !tok_path.exists() {
            return Err(Error::Input(format!("cannot resume: {} is missing (the tokenizer of the checkpoint)", tok_path.display())));
        }
    } else {
        // a fresh run always trains its own tokenizer: one left in OUT by an
        // earlier run may come from another corpus split
        eprintln!("training a byte-level BPE tokenizer ({} entries)...", job.vocab_size);
        bpe::train_bpe(corpus.train().map(|d| d.text.as_str()), job.vocab_size, &tok_path)?;
    }
    let tok = Tokenizer::from_file(&tok_path)?;
    let vocab = tok.inner.get_vocab_size(true);
    let eos = tok.token_id(bpe::EOS).ok_or_else(|| Error::Input("tokenizer has no <|eos|>".into()))?;
    let stream = TrainStream::new(&tok, &corpus, eos)?;
    let heldout: Vec<TokenDoc> = corpus.heldout().map(|d| tokenize_doc(&tok, d, eos)).collect::<Result<_>>()?;
    eprintln!("{} training tokens, {} held-out tokens", stream.ids.len(), heldout.iter().map(|d| d.ids.len()).sum::<usize>());

    let cfg = tiny_config(vocab);
    if !resuming {
        checkpoint::init_checkpoint(&cfg, &ckpt, job.init_std, job.settings.seed as i64)?;
    }
    std::fs::copy(&tok_path, ckpt.join("tokenizer.json")).map_err(|e| Error::io(&ckpt, e))?;
    let model = Model::load(&ckpt, LoadOptions::new(job.device, Kind::Float))?;
    let mut trainer = Trainer::new(&model, job.settings.clone())?;
    if resuming {
        trainer.restore(&ckpt)?;
        eprintln!("resuming at step {}", trainer.step);
    }
    let mut log = open_log(&train_log, TRAIN_LOG_HEADER, resuming)?;
    let mut elog = open_log(&eval_log, "step,domain,bits_per_byte,loss,tokens", resuming)?;
    let sample = sample_docs(&heldout, job.eval_docs_per_domain);
    let seq = job.settings.seq_len;
    let mut eval_cb = |m: &Model, step: u64| -> Result<()> {
        let r = eval::evaluate(m, &sample, seq)?;
        for (d, s) in &r.per_domain {
            writeln!(elog, "{step},{d},{:.4},{:.4},{}", s.bits_per_byte(), s.loss(), s.tokens).map_err(|e| Error::io(&eval_log, e))?;
            eprintln!("  eval step {step}: {d} {:.3} bits/byte", s.bits_per_byte());
        }
        elog.flush().map_err(|e| Error::io(&eval_log, e))
    };
    trainer.run(&stream, &ckpt, &mut log, job.eval_every, &mut eval_cb)?;
    let train_secs = t0.elapsed().as_secs_f64();

    // ship bf16, and report figures measured on exactly what is shipped
    let final_dir = job.out.join("model");
    checkpoint::save_model(&model, &final_dir, Kind::BFloat16)?;
    std::fs::copy(&tok_path, final_dir.join("tokenizer.json")).map_err(|e| Error::io(&final_dir, e))?;
    drop(trainer);
    drop(model);
    let shipped = Model::load(&final_dir, LoadOptions::new(job.device, Kind::Float))?;
    eprintln!("evaluating the shipped model on the whole held-out split...");
    let mut figures = heldout_report(&shipped, &stream, &heldout, vocab, seq)?;
    if let Some(obj) = figures.as_object_mut() {
        obj.insert("train_seconds".into(), json!(train_secs));
        obj.insert("train_tokens".into(), json!(stream.ids.len()));
        obj.insert("steps".into(), json!(job.settings.steps));
        obj.insert("settings".into(), json!(job.settings));
        obj.insert("command".into(), json!(job.command));
        obj.insert("threads".into(), json!(tch::get_num_threads()));
        obj.insert("device".into(), json!(format!("{:?}", job.device)));
    }
    let path = final_dir.join("eval_report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures).unwrap_or_default()).map_err(|e| Error::io(&path, e))?;
    eprintln!("wrote {} (figures in eval_report.json)", final_dir.display());
    Ok(())
}

/// Held-out figures of `model`: bits per byte and loss per domain, the
/// unigram baseline on Revelation, expert-load balance (overall, per domain,
/// and with the domains mixed as in training) and per-domain routing JSD.
pub fn heldout_report(model: &Model, stream: &TrainStream, heldout: &[TokenDoc], vocab: usize, seq: usize) -> Result<serde_json::Value> {
    let report = eval::evaluate(model, heldout, seq)?;
    let revelation: Vec<TokenDoc> = heldout.iter().filter(|d| d.domain == Domain::Bible).cloned().collect();
    let unigram = eval::unigram_bits_per_byte(&stream.ids, vocab, &revelation);
    let mut share = std::collections::BTreeMap::new();
    for d in &stream.domains {
        *share.entry(d.name().to_string()).or_insert(0.0) += 1.0 / stream.domains.len() as f64;
    }
    Ok(json!({
        "per_domain": report.per_domain.iter().map(|(d, s)| (d.clone(), json!({
            "bits_per_byte": s.bits_per_byte(), "loss_nats_per_token": s.loss(), "tokens": s.tokens, "bytes": s.bytes,
        }))).collect::<serde_json::Map<_, _>>(),
        "revelation_unigram_bits_per_byte": unigram,
        "load_max_over_mean": report.load_max_over_mean(),
        "load_max_over_mean_by_domain": report.load_max_over_mean_by_domain(),
        "train_domain_share": share,
        "load_max_over_mean_training_mix": report.load_max_over_mean_weighted(&share),
        "domain_jsd_bits": report.domain_jsd(),
    }))
}

/// Evaluates a trained model (directory with tokenizer.json) on the held-out
/// split of the corpus, with the figures of [`heldout_report`].
pub fn evaluate_model(dir: &Path, seq: usize, device: Device, sources: &CorpusSources) -> Result<serde_json::Value> {
    let model = Model::load(dir, LoadOptions::new(device, Kind::Float))?;
    let tok = model.tokenizer()?;
    let eos = tok.token_id(bpe::EOS).ok_or_else(|| Error::Input("tokenizer has no <|eos|>".into()))?;
    let corpus = Corpus::load(sources)?;
    let stream = TrainStream::new(tok, &corpus, eos)?;
    let heldout: Vec<TokenDoc> = corpus.heldout().map(|d| tokenize_doc(tok, d, eos)).collect::<Result<_>>()?;
    heldout_report(&model, &stream, &heldout, tok.inner.get_vocab_size(true), seq)
}

fn open_log(path: &Path, header: &str, append: bool) -> Result<std::fs::File> {
    let exists = path.exists();
    if append && exists {
        // rows are appended under the existing header: it must be the same one
        use std::io::BufRead;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut found = String::new();
        std::io::BufReader::new(file).read_line(&mut found).map_err(|e| Error::io(path, e))?;
        let found = found.trim_end();
        if found != header {
            return Err(Error::Input(format!(
                "{}: cannot resume into this log, its columns are `{found}` but this version writes `{header}`; move the file away and resume again",
                path.display()
            )));
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if !append || !exists {
        writeln!(f, "{header}").map_err(|e| Error::io(path, e))?;
    }
    Ok(f)
}

/// The first `n` documents of each domain (deterministic).
fn sample_docs(docs: &[TokenDoc], n: usize) -> Vec<TokenDoc> {
    let mut out = Vec::new();
    for d in Domain::ALL {
        out.extend(docs.iter().filter(|x| x.domain == d).take(n).cloned());
    }
    out
}
