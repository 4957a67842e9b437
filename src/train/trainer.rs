//! The training loop: AdamW, warmup + cosine schedule, global-norm gradient
//! clipping, and DeepSeek-V3's auxiliary-loss-free load balancing (after each
//! step, `b_i += gamma * sign(mean_load - load_i)` per MoE layer; the bias
//! steers the choice of experts only, never their weights), optionally with
//! DeepSeek-V3's small sequence-wise balance loss ([`sequence_balance_loss`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::checkpoint::{save_model, write_atomically};
use super::data::TrainStream;
use crate::error::{Error, Result};
use crate::model::{AttnImpl, ForwardOptions, Model};

/// Optimisation settings of a run (saved with each checkpoint).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSettings {
    pub steps: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    /// gamma of the bias update (0 disables balancing).
    pub bias_update_rate: f64,
    /// alpha of the sequence-wise balance loss added to the language-model
    /// loss (DeepSeek-V3 uses 1e-4; 0, the default, leaves it out).
    #[serde(default)]
    pub seq_balance_alpha: f64,
    pub seed: u64,
    pub log_every: u64,
    pub checkpoint_every: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            steps: 3000,
            batch_size: 16,
            seq_len: 256,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            bias_update_rate: 1e-2,
            seq_balance_alpha: 0.0,
            seed: 0,
            log_every: 10,
            checkpoint_every: 250,
        }
    }
}

impl TrainSettings {
    /// Learning rate at `step`: linear warmup, then cosine decay to `min_lr`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.steps.saturating_sub(self.warmup_steps)).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// One trainable tensor with its AdamW moments.
struct Param {
    name: String,
    value: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// What one step measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Mean over MoE layers of max/mean expert load in this batch.
    pub load_max_over_mean: f64,
    /// Mean over MoE layers of the sequence-wise balance term
    /// `sum_i f_i P_i` (1 when every sequence spreads evenly, E/K when each
    /// sends everything to the same K experts); measured whether or not it
    /// is part of the loss.
    pub seq_balance: f64,
}

/// DeepSeek-V3's sequence-wise balance term for one MoE layer, averaged over
/// the `batch` sequences: `sum_i f_i P_i`, where, within a sequence of T
/// tokens, `f_i = E / (K T) * #{t : expert i in top-K(t)}` and
/// `P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t}` (`s` the router scores).
/// `scores` is [batch*T, E] (the graph is kept, so it can be trained on),
/// `topk_indices` [batch*T, K]. An even spread (every `f_i` = 1) gives 1;
/// sending everything to the same K experts gives up to E/K.
pub fn sequence_balance_loss(scores: &Tensor, topk_indices: &Tensor, batch: i64) -> Result<Tensor> {
    let (n, e) = scores.size2()?;
    let (nk, k) = topk_indices.size2()?;
    if batch <= 0 || n % batch != 0 || nk != n {
        return Err(Error::Input(format!(
            "sequence balance loss: {n} score rows and {nk} top-k rows do not split into {batch} sequences"
        )));
    }
    let t = n / batch;
    let p = scores
        .f_div(&scores.f_sum_dim_intlist(-1, true, Kind::Float)?.f_clamp_min(1e-20)?)?
        .f_view([batch, t, e])?
        .f_mean_dim(1, false, Kind::Float)?;
    let opts = (Kind::Float, scores.device());
    let counts = Tensor::f_zeros([batch, e], opts)?.f_scatter_add(
        1,
        &topk_indices.f_view([batch, t * k])?.f_to_device(scores.device())?,
        &Tensor::f_ones([batch, t * k], opts)?,
    )?;
    let f = counts.f_mul_scalar(e as f64 / (k * t) as f64)?;
    Ok(f.f_mul(&p)?.f_sum_dim_intlist(-1, false, Kind::Float)?.f_mean(Kind::Float)?)
}

pub struct Trainer<'a> {
    pub model: &'a Model,
    pub settings: TrainSettings,
    params: Vec<Param>,
    /// Next step to run.
    pub step: u64,
}

impl<'a> Trainer<'a> {
    /// Marks every weight but the router bias as trainable.
    pub fn new(model: &'a Model, settings: TrainSettings) -> Result<Trainer<'a>> {
        if settings.seq_len < 2 || settings.batch_size == 0 {
            return Err(Error::Input(format!(
                "training needs seq_len >= 2 and batch_size >= 1, got {} and {}",
                settings.seq_len, settings.batch_size
            )));
        }
        let mut params = Vec::new();
        for (name, t) in model.named_weights()? {
            if name.ends_with("e_score_correction_bias") {
                continue;
            }
            let value = t.set_requires_grad(true);
            // no decay on norms, embeddings or biases
            let decay = t.dim() == 2 && !name.contains("embed_tokens");
            params.push(Param {
                m: t.f_zeros_like()?,
                v: t.f_zeros_like()?,
                name,
                value,
                decay,
            });
        }
        Ok(Trainer { model, settings, params, step: 0 })
    }

    /// One optimisation step on `(x, y)` [B, T].
    pub fn step(&mut self, x: &Tensor, y: &Tensor) -> Result<StepStats> {
        let s = self.settings.clone();
        let vocab = self.model.config.vocab_size as i64;
        let out = self.model.forward_with(
            x,
            None,
            ForwardOptions {
                attn: AttnImpl::Naive,
                grad: true,
                ..Default::default()
            },
        )?;
        let loss = out
            .logits
            .f_view([-1, vocab])?
            .f_cross_entropy_loss::<Tensor>(&y.f_view([-1])?.f_to_device(self.model.device)?, None, tch::Reduction::Mean, -100, 0.0)?;
        // the balance term per MoE layer; outside the graph when only measured
        let batch = x.size().first().copied().unwrap_or(1);
        let train_balance = s.seq_balance_alpha > 0.0;
        let balance = {
            let _measure_only = (!train_balance).then(tch::no_grad_guard);
            out.routing
                .iter()
                .flatten()
                .map(|r| sequence_balance_loss(&r.scores, &r.topk_indices, batch))
                .collect::<Result<Vec<_>>>()?
        };
        let mut total = loss.shallow_clone();
        if train_balance {
            for b in &balance {
                total = total.f_add(&b.f_mul_scalar(s.seq_balance_alpha)?)?;
            }
        }
        for p in &mut self.params {
            if p.value.grad().defined() {
                p.value.zero_grad();
            }
        }
        total.f_backward()?;
        let _guard = tch::no_grad_guard();
        // global gradient norm and clipping factor
        let mut sq = 0.0;
        for p in &self.params {
            let g = p.value.f_grad()?;
            if g.defined() {
                sq += g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        let grad_norm = sq.sqrt();
        // grad_clip 0 means no clipping
        let clip = if s.grad_clip > 0.0 && grad_norm > s.grad_clip { s.grad_clip / (grad_norm + 1e-6) } else { 1.0 };
        let lr = s.lr_at(self.step);
        let t = (self.step + 1) as f64;
        let (bc1, bc2) = (1.0 - s.beta1.powf(t), 1.0 - s.beta2.powf(t));
        for p in &mut self.params {
            let g = p.value.f_grad()?;
            if !g.defined() {
                continue;
            }
            let g = g.f_mul_scalar(clip)?;
            // m = b1 m + (1-b1) g ; v = b2 v + (1-b2) g^2
            let _ = p.m.f_mul_scalar_(s.beta1)?.f_add_(&g.f_mul_scalar(1.0 - s.beta1)?)?;
            let _ = p.v.f_mul_scalar_(s.beta2)?.f_add_(&g.f_square()?.f_mul_scalar(1.0 - s.beta2)?)?;
            let update = p
                .m
                .f_div_scalar(bc1)?
                .f_div(&p.v.f_div_scalar(bc2)?.f_sqrt()?.f_add_scalar(1e-8)?)?;
            if p.decay {
                let _ = p.value.f_mul_scalar_(1.0 - lr * s.weight_decay)?;
            }
            let _ = p.value.f_sub_(&update.f_mul_scalar(lr)?)?;
        }
        let seq_balance = balance.iter().map(|b| b.f_double_value(&[])).collect::<std::result::Result<Vec<_>, _>>()?;
        // aux-loss-free balancing: b_i += gamma * sign(mean_load - load_i)
        let mut imbalance = Vec::new();
        for (layer, routing) in self.model.layers.iter().zip(&out.routing) {
            let (Some(moe), Some(r)) = (layer.moe(), routing) else { continue };
            let e = moe.gate.num_experts();
            let load = r.topk_indices.f_flatten(0, -1)?.f_bincount(None::<Tensor>, e)?.f_to_kind(Kind::Float)?;
            let mean = load.f_mean(Kind::Float)?;
            imbalance.push(load.f_max()?.f_double_value(&[])? / mean.f_double_value(&[])?.max(1e-9));
            if let (Some(bias), true) = (&moe.gate.e_score_correction_bias, s.bias_update_rate > 0.0) {
                let delta = mean.f_sub(&load)?.f_sign()?.f_mul_scalar(s.bias_update_rate)?;
                let mut b = bias.shallow_clone();
                let _ = b.f_add_(&delta.f_to_device(b.device())?)?;
            }
        }
        let stats = StepStats {
            step: self.step,
            loss: loss.f_double_value(&[])?,
            lr,
            grad_norm,
            load_max_over_mean: mean_or_one(&imbalance),
            seq_balance: mean_or_one(&seq_balance),
        };
        self.step += 1;
        Ok(stats)
    }

    /// Saves the model (HF layout, f32) and the optimiser state to `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_model(self.model, dir, Kind::Float)?;
        let mut tensors = Vec::new();
        for p in &self.params {
            tensors.push((format!("{}.exp_avg", p.name), p.m.shallow_clone()));
            tensors.push((format!("{}.exp_avg_sq", p.name), p.v.shallow_clone()));
        }
        write_atomically(&dir.join("optimizer.safetensors"), |tmp| Ok(Tensor::write_safetensors(&tensors, tmp)?))?;
        let state = serde_json::json!({ "next_step": self.step, "settings": self.settings });
        let path = dir.join("train_state.json");
        write_atomically(&path, |tmp| std::fs::write(tmp, state.to_string()).map_err(|e| Error::io(tmp, e)))
    }

    /// Restores the optimiser state and step written by [`Trainer::save`].
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("train_state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let state: serde_json::Value = serde_json::from_str(&text).map_err(|cause| Error::Json { path: path.clone(), cause })?;
        self.step = state["next_step"].as_u64().ok_or_else(|| Error::Input(format!("{}: no next_step", path.display())))?;
        let ck = crate::model::loader::Checkpoint::open_file(dir.join("optimizer.safetensors"))?;
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let shape = p.m.size();
            p.m = ck.tensor(&format!("{}.exp_avg", p.name), &shape, Kind::Float, p.m.device())?;
            p.v = ck.tensor(&format!("{}.exp_avg_sq", p.name), &shape, Kind::Float, p.v.device())?;
        }
        Ok(())
    }

    /// Runs until `settings.steps`, logging every `log_every` steps to stderr
    /// and `log` (CSV), checkpointing to `ckpt_dir`, and calling `eval` every
    /// `eval_every` steps (and at the end).
    pub fn run(
        &mut self,
        stream: &TrainStream,
        ckpt_dir: &Path,
        log: &mut dyn Write,
        eval_every: u64,
        eval: &mut dyn FnMut(&Model, u64) -> Result<()>,
    ) -> Result<()> {
        let s = self.settings.clone();
        let start = Instant::now();
        let first = self.step;
        let tokens_per_step = (s.batch_size * s.seq_len) as f64;
        // In a notebook, an interrupt stops training between steps; the
        // trainer (and its model) stay usable and can continue from here.
        let interrupt = crate::interrupt::Interrupt::new();
        while self.step < s.steps {
            interrupt.check()?;
            let (x, y) = stream.batch(s.seed, self.step, s.batch_size, s.seq_len)?;
            let st = self.step(&x, &y)?;
            let elapsed = start.elapsed().as_secs_f64();
            let done = (self.step - first) as f64;
            let tps = done * tokens_per_step / elapsed.max(1e-9);
            writeln!(
                log,
                "{},{},{:.5},{:.3e},{:.4},{:.3},{:.1},{:.1},{:.4}",
                st.step,
                (st.step + 1) as f64 * tokens_per_step,
                st.loss,
                st.lr,
                st.grad_norm,
                st.load_max_over_mean,
                tps,
                elapsed,
                st.seq_balance
            )
            .map_err(|e| Error::io(ckpt_dir.join("train_log.csv"), e))?;
            if (s.log_every > 0 && st.step % s.log_every == 0) || self.step == s.steps {
                let eta = (s.steps - self.step) as f64 * elapsed / done.max(1.0);
                eprintln!(
                    "step {:>5}/{} loss {:.4} lr {:.2e} |g| {:.3} load max/mean {:.2} {:.0} tok/s eta {:.0} min",
                    st.step + 1,
                    s.steps,
                    st.loss,
                    st.lr,
                    st.grad_norm,
                    st.load_max_over_mean,
                    tps,
                    eta / 60.0
                );
                log.flush().map_err(|e| Error::io(ckpt_dir, e))?;
            }
            if (s.checkpoint_every > 0 && self.step.is_multiple_of(s.checkpoint_every)) || self.step == s.steps {
                self.save(ckpt_dir)?;
            }
            if eval_every > 0 && (self.step.is_multiple_of(eval_every) || self.step == s.steps) {
                eval(self.model, self.step)?;
            }
        }
        Ok(())
    }
}

/// Where a run keeps its files.
pub fn run_paths(out: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (out.join("checkpoint"), out.join("train_log.csv"), out.join("eval_log.csv"))
}

/// Mean of per-MoE-layer figures; 1 (balanced) for a model without MoE layers.
fn mean_or_one(v: &[f64]) -> f64 {
    if v.is_empty() {
        1.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Header of the training log.
pub const TRAIN_LOG_HEADER: &str = "step,tokens,loss,lr,grad_norm,load_max_over_mean,tokens_per_s,elapsed_s,seq_balance";
