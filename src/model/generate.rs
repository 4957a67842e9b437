//! Autoregressive generation over the compressed (MLA) cache: the prompt is
//! run once, then each new token is one forward step that appends its
//! `c_kv` / `k_pe` to the cache.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use super::hooks::{Hooks, NoHooks};
use super::mla::AttnImpl;
use super::model::{ForwardOptions, ForwardOutput, Model};
use crate::error::{Error, Result};

/// How the next token is picked from the logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Temperature, then nucleus (top-p) sampling with a seeded generator.
    TopP { temperature: f64, top_p: f64, seed: u64 },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops after emitting any of these.
    pub stop_tokens: Vec<i64>,
    pub attn: AttnImpl,
}

impl GenerateOptions {
    /// Greedy decoding of `n` tokens, stopping at the model's EOS tokens.
    pub fn greedy(model: &Model, n: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: n,
            sampling: Sampling::Greedy,
            stop_tokens: model.config.eos_token_ids.clone(),
            attn: AttnImpl::Auto,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxNewTokens,
    StopToken(i64),
    /// The token callback asked to stop.
    Cancelled,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::MaxNewTokens => write!(f, "max new tokens"),
            StopReason::StopToken(t) => write!(f, "stop token {t}"),
            StopReason::Cancelled => write!(f, "cancelled"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt: Vec<i64>,
    /// The new tokens (a stop token, when hit, is included).
    pub tokens: Vec<i64>,
    pub stop: StopReason,
    /// Bytes of the compressed KV cache at the end.
    pub cache_bytes: usize,
    /// Cached positions at the end.
    pub cache_len: i64,
}

impl Model {
    /// Generates after `prompt`. `on_token` sees each new token as it comes and
    /// returns `false` to stop.
    pub fn generate(&self, prompt: &[i64], opts: &GenerateOptions, on_token: impl FnMut(i64) -> bool) -> Result<Generation> {
        self.generate_hooked(prompt, opts, &mut NoHooks, |_, _| Ok(()), on_token)
    }

    /// [`generate`](Self::generate) with `hooks` observing or editing every
    /// pass (the prompt's, then one per new token, over the cache);
    /// `on_pass` gets the hooks back with each pass's output. What
    /// `Model::generate_with` (interventions and a trace of the generation)
    /// is built on.
    pub fn generate_hooked<H: Hooks>(
        &self,
        prompt: &[i64],
        opts: &GenerateOptions,
        hooks: &mut H,
        mut on_pass: impl FnMut(&mut H, &ForwardOutput) -> Result<()>,
        mut on_token: impl FnMut(i64) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::Input("the prompt is empty: give at least one token".into()));
        }
        if let Sampling::TopP { temperature, top_p, .. } = opts.sampling {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(Error::Input(format!("temperature must be > 0, got {temperature}")));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::Input(format!("top_p must be in (0, 1], got {top_p}")));
            }
        }
        let mut rng = match opts.sampling {
            Sampling::TopP { seed, .. } => Some(StdRng::seed_from_u64(seed)),
            Sampling::Greedy => None,
        };
        let fwd = ForwardOptions {
            attn: opts.attn,
            ..Default::default()
        };
        let mut cache = self.new_cache();
        let mut tokens = Vec::new();
        let mut stop = StopReason::MaxNewTokens;
        let mut input = Tensor::f_from_slice(prompt)?.f_unsqueeze(0)?;
        let interrupt = crate::interrupt::Interrupt::new();
        for _ in 0..opts.max_new_tokens {
            interrupt.check()?;
            let out = self.forward_hooked(&input, Some(&mut cache), fwd, hooks)?;
            on_pass(hooks, &out)?;
            let last = out.logits.f_select(1, -1)?.f_select(0, 0)?.f_to_kind(Kind::Float)?; // [V]
            let next = match (&opts.sampling, rng.as_mut()) {
                (Sampling::TopP { temperature, top_p, .. }, Some(rng)) => sample_top_p(&last, *temperature, *top_p, rng)?,
                _ => last.f_argmax(0, false)?.int64_value(&[]),
            };
            tokens.push(next);
            if opts.stop_tokens.contains(&next) {
                stop = StopReason::StopToken(next);
                break;
            }
            if !on_token(next) {
                stop = StopReason::Cancelled;
                break;
            }
            input = Tensor::f_from_slice(&[next])?.f_unsqueeze(0)?;
        }
        Ok(Generation {
            prompt: prompt.to_vec(),
            tokens,
            stop,
            cache_bytes: cache.bytes(),
            cache_len: cache.len(),
        })
    }
}

/// Samples from `softmax(logits / temperature)` restricted to the smallest set
/// of most likely tokens whose probability reaches `top_p`.
pub fn sample_top_p(logits: &Tensor, temperature: f64, top_p: f64, rng: &mut StdRng) -> Result<i64> {
    let probs = logits.f_div_scalar(temperature)?.f_softmax(-1, Kind::Float)?;
    let (sorted, order) = probs.f_sort(-1, true)?;
    let sorted = Vec::<f32>::try_from(sorted.f_to_device(tch::Device::Cpu)?)?;
    let order = Vec::<i64>::try_from(order.f_to_device(tch::Device::Cpu)?)?;
    let mut keep = 0;
    let mut mass = 0.0f64;
    for &p in &sorted {
        keep += 1;
        mass += p as f64;
        if mass >= top_p {
            break;
        }
    }
    let mut u = rng.random::<f64>() * mass;
    for i in 0..keep {
        u -= sorted[i] as f64;
        if u <= 0.0 {
            return Ok(order[i]);
        }
    }
    Ok(order[keep - 1])
}
