//! The whole network: embeddings, decoder layers, final norm, LM head.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::config::Config;
use super::decoder::{DecoderLayer, FeedForward};
use super::loader::Checkpoint;
use super::hooks::{HookPoint, Hooks, NoHooks};
use super::mla::{AttnImpl, LatentCache};
use super::moe::RouterOutput;
use super::nn::{Placement, RmsNorm};
use super::rope::Rope;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// Where to put the model and in which dtype.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the weights (`Float`, `BFloat16` or `Half`). Router
    /// weights and `e_score_correction_bias` stay f32.
    pub kind: Kind,
}

impl Default for LoadOptions {
    /// CUDA when available, else CPU; f32.
    fn default() -> Self {
        LoadOptions {
            device: Device::cuda_if_available(),
            kind: Kind::Float,
        }
    }
}

/// Where [`Model::load_default`] looks: `$DEEPSCOPE_MODEL`, else
/// `models/deepscope-tiny` in the DeepScope source tree.
pub fn default_model_dir() -> PathBuf {
    std::env::var_os("DEEPSCOPE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join("deepscope-tiny"))
}

/// Parses `cpu`, `cuda`, `cuda:N` or `auto`.
pub fn parse_device(s: &str) -> Result<Device> {
    let count = tch::Cuda::device_count().max(0) as usize;
    let cuda = |i: usize| {
        if i < count {
            Ok(Device::Cuda(i))
        } else {
            Err(Error::Device(s.to_string(), count))
        }
    };
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => cuda(i),
            None => Err(Error::Input(format!(
                "device `{s}` is unknown (expected cpu, cuda, cuda:N or auto)"
            ))),
        },
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        other => Err(Error::Input(format!(
            "dtype `{other}` is unknown (expected f32, bf16 or f16)"
        ))),
    }
}

/// The compressed KV cache of a whole model: one [`LatentCache`] per layer.
#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<LatentCache>,
}

impl KvCache {
    /// Cached positions.
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the cache holds now (`c_kv` and `k_pe` of every layer).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }
}

/// What to compute besides logits.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    pub attn: AttnImpl,
    /// Record the autograd graph (training); off by default.
    pub grad: bool,
}

/// Logits plus what each layer recorded.
#[derive(Debug)]
pub struct ForwardOutput {
    /// [B, T, V] in the model dtype.
    pub logits: Tensor,
    /// Per layer: the router's decisions (MoE layers only).
    pub routing: Vec<Option<RouterOutput>>,
}

#[derive(Debug)]
pub struct Model {
    pub config: Config,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// [V, D]; the embedding matrix itself when `tie_word_embeddings`.
    pub lm_head: Tensor,
    pub rope: Rope,
    pub tokenizer: Option<Tokenizer>,
    pub device: Device,
    pub kind: Kind,
    pub dir: PathBuf,
    /// Things worth telling the user about the load (skipped tensors...).
    pub load_notes: Vec<String>,
}

impl Model {
    /// Loads a Hugging Face checkpoint directory (`config.json`, weights and,
    /// when present, `tokenizer.json`).
    pub fn load(dir: impl AsRef<Path>, opts: LoadOptions) -> Result<Model> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = Config::from_dir(dir)?;
        let ck = Checkpoint::open(dir, config.quantization.as_ref().map(|q| q.weight_block_size))?;
        let p = Placement {
            device: opts.device,
            kind: opts.kind,
        };
        let _guard = tch::no_grad_guard();
        let (v, d) = (config.vocab_size as i64, config.hidden_size as i64);
        let embed_tokens = ck.tensor("model.embed_tokens.weight", &[v, d], p.kind, p.device)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&ck, i, &config, p))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&ck, "model.norm", config.hidden_size, config.rms_norm_eps, p)?;
        let lm_head = match ck.optional("lm_head.weight", &[v, d], p.kind, p.device)? {
            Some(w) => w,
            None if config.tie_word_embeddings => embed_tokens.shallow_clone(),
            None => {
                return Err(Error::MissingTensor {
                    name: "lm_head.weight".into(),
                    dir: dir.to_path_buf(),
                })
            }
        };
        let (unexpected, extra) = ck.unread(config.num_hidden_layers);
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedTensors {
                dir: dir.to_path_buf(),
                count: unexpected.len(),
                examples: unexpected.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let mut load_notes = Vec::new();
        if !extra.is_empty() {
            load_notes.push(format!(
                "skipped {} tensor(s) of layers >= num_hidden_layers ({}): multi-token-prediction modules are not used for inference",
                extra.len(),
                config.num_hidden_layers
            ));
        }
        let tokenizer = Tokenizer::from_dir(dir)?;
        let rope = Rope::new(&config, opts.device)?;
        Ok(Model {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            tokenizer,
            device: opts.device,
            kind: opts.kind,
            dir: dir.to_path_buf(),
            load_notes,
        })
    }

    /// Loads the shipped default model (`models/deepscope-tiny`, or the
    /// directory named by `$DEEPSCOPE_MODEL`) on the CPU in f32.
    pub fn load_default() -> Result<Model> {
        Model::load(
            default_model_dir(),
            LoadOptions {
                device: Device::Cpu,
                kind: Kind::Float,
            },
        )
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        let empty = || Tensor::empty([0], (self.kind, self.device));
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|_| LatentCache {
                    c_kv: empty(),
                    k_pe: empty(),
                })
                .collect(),
        }
    }

    /// Checks token ids: a non-empty [B, T] integer tensor with every id < vocab.
    pub fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let size = ids.size();
        if size.len() != 2 {
            return Err(Error::Input(format!(
                "token ids must be a [batch, seq] tensor, got shape {size:?}"
            )));
        }
        if size[0] == 0 || size[1] == 0 {
            return Err(Error::Input(format!("token ids are empty (shape {size:?})")));
        }
        if !matches!(ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
            return Err(Error::Input(format!("token ids must be integers, got {:?}", ids.kind())));
        }
        let flat = Vec::<i64>::try_from(ids.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
        let vocab = self.config.vocab_size;
        if let Some((pos, &id)) = flat.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= vocab) {
            return Err(Error::TokenOutOfRange {
                id,
                position: pos,
                vocab_size: vocab,
            });
        }
        Ok(())
    }

    /// Full forward over `ids` [B, T] (no cache).
    pub fn forward(&self, ids: &Tensor) -> Result<ForwardOutput> {
        self.forward_with(ids, None, ForwardOptions::default())
    }

    /// Forward over `ids` [B, T]. With a cache, the ids continue the cached
    /// sequence and their latents are appended to it.
    pub fn forward_with(&self, ids: &Tensor, cache: Option<&mut KvCache>, opts: ForwardOptions) -> Result<ForwardOutput> {
        self.forward_hooked(ids, cache, opts, &mut NoHooks)
    }

    /// Forward with `hooks` observing or editing every [`HookPoint`].
    pub fn forward_hooked(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        opts: ForwardOptions,
        hooks: &mut dyn Hooks,
    ) -> Result<ForwardOutput> {
        self.check_ids(ids)?;
        let _guard = (!opts.grad).then(tch::no_grad_guard);
        let ids = ids.f_to_kind(Kind::Int64)?.f_to_device(self.device)?;
        let t = ids.size()[1];
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = &cache {
            if c.layers.len() != self.layers.len() {
                return Err(Error::Input(format!(
                    "the cache has {} layers, the model {}",
                    c.layers.len(),
                    self.layers.len()
                )));
            }
            let cached_batch = c.layers.first().map(|l| l.c_kv.size()[0]);
            if past > 0 && cached_batch != Some(ids.size()[0]) {
                return Err(Error::Input(format!(
                    "the cache holds batch {:?}, the ids have batch {}",
                    cached_batch,
                    ids.size()[0]
                )));
            }
        }
        let angles = self.rope.angles(past, t, self.kind)?;
        let mut h = hooks.visit(HookPoint::Embed, Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?)?;
        let mut routing = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let out = layer.forward(&h, &self.rope, &angles, layer_cache, opts.attn, hooks)?;
            h = out.hidden;
            routing.push(out.routing);
        }
        let h = hooks.visit(HookPoint::FinalNorm, self.norm.forward(&h)?)?;
        let logits = hooks.visit(HookPoint::Logits, h.f_linear(&self.lm_head, None::<Tensor>)?)?;
        Ok(ForwardOutput { logits, routing })
    }

    /// Bytes of the weights as loaded (tied matrices counted once).
    pub fn weight_bytes(&self) -> usize {
        self.named_weights()
            .iter()
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// Every weight tensor under its checkpoint name (gate and up projections
    /// appear as their stacked matrix `...gate_up_proj.weight`).
    pub fn named_weights(&self) -> Vec<(String, &Tensor)> {
        let mut out: Vec<(String, &Tensor)> = vec![("model.embed_tokens.weight".into(), &self.embed_tokens)];
        for l in &self.layers {
            let p = format!("model.layers.{}", l.index);
            out.push((format!("{p}.input_layernorm.weight"), &l.input_layernorm.weight));
            out.push((format!("{p}.post_attention_layernorm.weight"), &l.post_attention_layernorm.weight));
            let a = &l.self_attn;
            push_linear(&mut out, format!("{p}.self_attn.kv_a_proj_with_mqa"), &a.kv_a_proj_with_mqa);
            push_linear(&mut out, format!("{p}.self_attn.kv_b_proj"), &a.kv_b_proj);
            push_linear(&mut out, format!("{p}.self_attn.o_proj"), &a.o_proj);
            out.push((format!("{p}.self_attn.kv_a_layernorm.weight"), &a.kv_a_layernorm.weight));
            match &a.q {
                super::mla::QProj::Full(q) => push_linear(&mut out, format!("{p}.self_attn.q_proj"), q),
                super::mla::QProj::LowRank { a: qa, norm, b } => {
                    push_linear(&mut out, format!("{p}.self_attn.q_a_proj"), qa);
                    out.push((format!("{p}.self_attn.q_a_layernorm.weight"), &norm.weight));
                    push_linear(&mut out, format!("{p}.self_attn.q_b_proj"), b);
                }
            }
            match &l.mlp {
                FeedForward::Dense(m) => push_mlp(&mut out, format!("{p}.mlp"), m),
                FeedForward::Moe(m) => {
                    out.push((format!("{p}.mlp.gate.weight"), &m.gate.weight));
                    if let Some(b) = &m.gate.e_score_correction_bias {
                        out.push((format!("{p}.mlp.gate.e_score_correction_bias"), b));
                    }
                    for (e, x) in m.experts.iter().enumerate() {
                        push_mlp(&mut out, format!("{p}.mlp.experts.{e}"), x);
                    }
                    if let Some(s) = &m.shared_experts {
                        push_mlp(&mut out, format!("{p}.mlp.shared_experts"), s);
                    }
                }
            }
        }
        out.push(("model.norm.weight".into(), &self.norm.weight));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".into(), &self.lm_head));
        }
        out
    }

    /// Encodes text with the model's tokenizer.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        self.tokenizer()?.encode(text)
    }

    /// The tokenizer, or an error saying the model has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Input(format!(
                "the model in {} has no tokenizer.json: pass token ids instead of text",
                self.dir.display()
            ))
        })
    }
}

fn push_linear<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, l: &'a super::nn::Linear) {
    out.push((format!("{name}.weight"), &l.weight));
    if let Some(b) = &l.bias {
        out.push((format!("{name}.bias"), b));
    }
}

fn push_mlp<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, m: &'a super::moe::Mlp) {
    push_linear(out, format!("{name}.gate_up_proj"), &m.gate_up);
    push_linear(out, format!("{name}.down_proj"), &m.down_proj);
}
