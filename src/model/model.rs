//! The whole network: embeddings, decoder layers, final norm, LM head.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::budget::{DeviceMap, MemoryBudget};
use super::config::Config;
use super::decoder::DecoderLayer;
use super::hooks::{HookPoint, Hooks, NoHooks, PassInfo};
use super::layout::weight_specs;
use super::loader::{Checkpoint, Loader};
use super::mla::{AttnImpl, LatentCache};
use super::moe::RouterOutput;
use super::nn::RmsNorm;
use super::plan::{Plan, PlanOptions, Tier};
use super::rope::{Rope, RopeAngles};
use super::stream::{ForwardCost, Streamer, Traffic};
use super::tokenizer::Tokenizer;
use super::weight::Weight;
use crate::error::{Error, IndexKind, Result};
use crate::stats::human_bytes;

/// Where to put the model, in which dtype, and how much memory it may take.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the weights (`Float`, `BFloat16` or `Half`). Router
    /// weights and `e_score_correction_bias` stay f32.
    pub kind: Kind,
    /// Memory the weights may take on each compute device. `Auto` (the
    /// default): everything resident when the model fits in what is
    /// available, else streaming within it. See [`super::plan`].
    pub memory_budget: MemoryBudget,
    /// Host memory for weights offloaded from GPUs (unused on the CPU).
    pub host_budget: MemoryBudget,
    /// Expand FP8 weights to the compute dtype at load, as DeepScope did
    /// before weights were kept FP8 (4x the memory in f32, 2x in bf16).
    pub dequantize: bool,
    /// Which device each layer runs on (several GPUs).
    pub device_map: DeviceMap,
    /// Drop streamed weights from the operating system's page cache after
    /// reading them, so a checkpoint that fits in RAM behaves like one that
    /// does not (benchmarks).
    pub drop_page_cache: bool,
}

impl Default for LoadOptions {
    /// CUDA when available, else CPU; f32; automatic budget; FP8 kept.
    fn default() -> Self {
        LoadOptions {
            device: Device::cuda_if_available(),
            kind: Kind::Float,
            memory_budget: MemoryBudget::Auto,
            host_budget: MemoryBudget::Auto,
            dequantize: false,
            device_map: DeviceMap::Single,
            drop_page_cache: false,
        }
    }
}

impl LoadOptions {
    /// `device` and `kind`, everything else default.
    pub fn new(device: Device, kind: Kind) -> LoadOptions {
        LoadOptions { device, kind, ..Default::default() }
    }

    /// The same options with a memory budget.
    pub fn with_budget(mut self, budget: MemoryBudget) -> LoadOptions {
        self.memory_budget = budget;
        self
    }

    /// What the plan needs of these options.
    pub fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            device: self.device,
            kind: self.kind,
            memory_budget: self.memory_budget,
            host_budget: self.host_budget,
            dequantize: self.dequantize,
            device_map: self.device_map.clone(),
            gpus: None,
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
    /// How far the pass runs (default: through the LM head).
    pub until: Until,
}

/// How far a forward pass runs. Stopping early skips work a caller does not
/// read (corpus routing statistics read only the routers' choices); the hooks
/// of skipped points do not fire, and the output's `logits` are an empty
/// [B, T, 0] tensor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Until {
    /// Every layer, the final norm and the LM head.
    #[default]
    Logits,
    /// Every layer; no final norm, no LM head.
    LastLayer,
    /// Until the last MoE layer's router has chosen: its experts, the layers
    /// after it, the final norm and the LM head are skipped. Every router's
    /// choice is the same as in a whole pass (nothing skipped feeds a router).
    LastRouter,
}

/// Logits plus what each layer recorded.
#[derive(Debug)]
pub struct ForwardOutput {
    /// [B, T, V] in the model dtype.
    pub logits: Tensor,
    /// Per layer: the router's decisions (MoE layers only).
    pub routing: Vec<Option<RouterOutput>>,
    /// Time and weight traffic of this pass.
    pub cost: ForwardCost,
}

#[derive(Debug)]
pub struct Model {
    pub config: Config,
    /// [V, D]
    pub embed_tokens: Weight,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// [V, D]; the embedding matrix itself when `tie_word_embeddings`.
    pub lm_head: Weight,
    pub rope: Rope,
    /// Where every weight lives (see [`Model::plan`]).
    pub plan: Plan,
    /// Reads streamed weights and counts the traffic; `None` when every
    /// weight is resident.
    pub streamer: Option<Arc<Streamer>>,
    pub tokenizer: Option<Tokenizer>,
    pub device: Device,
    pub kind: Kind,
    pub dir: PathBuf,
    /// Things worth telling the user about the load (skipped tensors...).
    pub load_notes: Vec<String>,
    /// Bytes of the weights the load left in memory, counted once after it
    /// (they do not change; the expert cache and read buffers are added in
    /// [`Model::weight_bytes`]).
    loaded_bytes: usize,
    /// Every tensor the loader handed out, under its name (see [`Loader`]).
    weight_record: Vec<super::loader::NamedTensor>,
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
        let plan = Model::plan_checkpoint(&ck, &config, &opts.plan_options())?;
        let streamer = if plan.placements.iter().any(|p| matches!(p.tier, Tier::Disk | Tier::Host)) {
            let s = Arc::new(Streamer::open(&ck.file_paths(), opts.drop_page_cache)?);
            for d in &plan.devices {
                s.set_cache_capacity(d.device, d.cache_capacity as usize);
            }
            // reused read buffers: half the reserve, the rest for reads in flight
            s.set_pool_limit(plan.devices.iter().map(|d| d.reserve / 2).max().unwrap_or(0) as usize);
            Some(s)
        } else {
            None
        };
        let ld = Loader::new(&ck, &plan, streamer.clone());
        let _guard = tch::no_grad_guard();
        let root = ld.root();
        let body = root.pp("model");
        let embed_tokens = body.weight("embed_tokens.weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&body.pp("layers"), i, &config))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&body.pp("norm"), config.hidden_size, config.rms_norm_eps)?;
        // a tied model's own lm_head.weight, when the checkpoint has one, is used as before
        let lm_head = if plan.placement_of("lm_head.weight").is_some() {
            root.weight("lm_head.weight")?
        } else {
            embed_tokens.share("lm_head.weight")
        };
        let weight_record = ld.into_record();
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
        if plan.streaming() {
            let disk: u64 = plan
                .specs
                .iter()
                .zip(&plan.placements)
                .zip(&plan.stored)
                .filter(|((_, p), _)| p.tier == Tier::Disk)
                .map(|((s, _), st)| st.bytes(&s.shape))
                .sum();
            for d in plan.devices.iter().filter(|d| d.streaming) {
                load_notes.push(format!(
                    "streaming on {}: the model ({} stored) does not fit the memory budget ({}); {} of weights resident, {} read from disk as passes need them, expert cache {}",
                    format!("{:?}", d.device).to_lowercase(),
                    human_bytes(plan.stored_bytes()),
                    d.budget.map_or("unlimited".into(), human_bytes),
                    human_bytes(d.resident),
                    human_bytes(disk),
                    human_bytes(d.cache_capacity)
                ));
            }
        }
        if let Some(s) = &streamer {
            // the routed experts' read buffers, made ready while nothing computes
            let refs: Vec<&super::stream::TensorRef> = layers
                .iter()
                .flat_map(|l| l.weights())
                .filter_map(|w| match &w.store {
                    super::weight::Store::Mapped(m) if m.cached && m.host.is_none() && w.device == Device::Cpu => Some(m.parts.iter()),
                    _ => None,
                })
                .flatten()
                .collect();
            if !refs.is_empty() {
                let t = Instant::now();
                let bytes = s.prefault_cache(&refs);
                if bytes > 0 {
                    load_notes.push(format!(
                        "expert cache: {} of read buffers made ready at load ({:.1} s), so that first passes do not wait for fresh memory",
                        human_bytes(bytes as u64),
                        t.elapsed().as_secs_f64()
                    ));
                }
            }
        }
        let tokenizer = Tokenizer::from_dir(dir)?;
        let main = plan.layer_devices.first().copied().unwrap_or(opts.device);
        let rope = Rope::new(&config, main)?;
        let loaded_bytes = loaded_bytes(&config, &embed_tokens, &lm_head, &norm, &layers);
        Ok(Model {
            loaded_bytes,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            plan,
            streamer,
            tokenizer,
            device: main,
            kind: opts.kind,
            dir: dir.to_path_buf(),
            load_notes,
            weight_record,
        })
    }

    /// Where `Model::load(dir, opts)` would put every weight, from the
    /// checkpoint's headers alone (nothing is read).
    pub fn plan(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Plan> {
        Model::plan_with(dir, &opts.plan_options())
    }

    /// Like [`Model::plan`], with plan options (e.g. for GPUs this machine
    /// does not have).
    pub fn plan_with(dir: impl AsRef<Path>, opts: &PlanOptions) -> Result<Plan> {
        let dir = dir.as_ref();
        let config = Config::from_dir(dir)?;
        let ck = Checkpoint::open(dir, config.quantization.as_ref().map(|q| q.weight_block_size))?;
        Model::plan_checkpoint(&ck, &config, opts)
    }

    fn plan_checkpoint(ck: &Checkpoint, config: &Config, opts: &PlanOptions) -> Result<Plan> {
        let mut specs = weight_specs(config);
        if config.tie_word_embeddings && ck.contains("lm_head.weight") {
            let (v, d) = (config.vocab_size as i64, config.hidden_size as i64);
            specs.push(super::layout::WeightSpec {
                name: "lm_head.weight".into(),
                sources: vec!["lm_head.weight".into()],
                shape: vec![v, d],
                unit: super::layout::Unit::LmHead,
                matrix: true,
            });
        }
        let stored = specs
            .iter()
            .map(|s| match s.sources.iter().find(|n| !ck.contains(n)) {
                Some(missing) => Err(Error::MissingTensor { name: missing.clone(), dir: ck.dir().to_path_buf() }),
                None => ck.stored(&s.sources[0]),
            })
            .collect::<Result<Vec<_>>>()?;
        Plan::new(config, specs, stored, opts)
    }

    /// Loads the shipped default model (`models/deepscope-tiny`, or the
    /// directory named by `$DEEPSCOPE_MODEL`) on the CPU in f32.
    pub fn load_default() -> Result<Model> {
        Model::load(default_model_dir(), LoadOptions::new(Device::Cpu, Kind::Float))
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        let empty = |d: Device| Tensor::empty([0], (self.kind, d));
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LatentCache {
                    c_kv: empty(l.device),
                    k_pe: empty(l.device),
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
        let started = Instant::now();
        let before = self.traffic();
        if let Some(s) = &self.streamer {
            s.begin_pass();
        }
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
        hooks.begin_pass(PassInfo { batch: ids.size()[0], past, tokens: t });
        let mut angles_on: Vec<(Device, RopeAngles)> = vec![(self.device, self.rope.angles(past, t, self.kind)?)];
        let mut h = hooks.visit(HookPoint::Embed, self.embed_tokens.embedding(&ids)?)?;
        let mut routing = Vec::with_capacity(self.layers.len());
        let last_router = self.layers.iter().rposition(|l| l.moe().is_some());
        if let Some(first) = self.layers.first() {
            first.prefetch();
        }
        for (i, layer) in self.layers.iter().enumerate() {
            // read the next layer's streamed weights while this one computes
            if let Some(next) = self.layers.get(i + 1) {
                next.prefetch();
            }
            if h.device() != layer.device {
                h = h.f_to_device(layer.device)?;
            }
            if !angles_on.iter().any(|(d, _)| *d == layer.device) {
                let a = angles_on[0].1.to_device(layer.device)?;
                angles_on.push((layer.device, a));
            }
            let angles = &angles_on.iter().find(|(d, _)| *d == layer.device).ok_or_else(|| Error::Input("no RoPE angles".into()))?.1;
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let route_only = opts.until == Until::LastRouter && Some(i) == last_router;
            let out = layer.forward(&h, &self.rope, angles, layer_cache, opts.attn, hooks, route_only)?;
            h = out.hidden;
            routing.push(out.routing);
            if route_only {
                break;
            }
        }
        routing.resize_with(self.layers.len(), || None); // layers after a stop route nothing
        let logits = if opts.until == Until::Logits {
            let norm_device = self.norm.weight.device();
            if h.device() != norm_device {
                h = h.f_to_device(norm_device)?;
            }
            let mut h = hooks.visit(HookPoint::FinalNorm, self.norm.forward(&h)?)?;
            if h.device() != self.lm_head.device {
                h = h.f_to_device(self.lm_head.device)?;
            }
            hooks.visit(HookPoint::Logits, self.lm_head.linear(&h)?)?
        } else {
            Tensor::f_empty([ids.size()[0], t, 0], (self.kind, h.device()))?
        };
        if let Some(s) = &self.streamer {
            s.end_pass();
        }
        let cost = self.cost_since(started, &before, ids.numel() as u64);
        Ok(ForwardOutput { logits, routing, cost })
    }

    /// Checks that `point` exists in this model: its layer is in range
    /// ([`Error::OutOfRange`]), an MoE point names an MoE layer, and the block
    /// it names is there (`q_lora`, group-limited routing, shared experts,
    /// the expert). The error does not name the point; callers add it with
    /// [`Error::in_context`].
    pub fn check_hook_point(&self, point: HookPoint) -> Result<()> {
        let Some(l) = point.layer() else { return Ok(()) };
        Error::check_index(IndexKind::Layer, l, self.layers.len())?;
        let moe = self.layers[l].moe();
        if point.is_moe() && moe.is_none() {
            return Err(Error::Input(format!("layer {l} is a dense layer (MoE layers: {:?})", self.config.moe_layers())));
        }
        let never = match point {
            HookPoint::QLatent(_) => self.config.q_lora_rank.is_none().then_some("the model has no q_lora_rank (queries come from q_proj)"),
            HookPoint::ChosenGroups(_) => moe
                .filter(|m| m.gate.settings.method == super::config::TopkMethod::Greedy || m.gate.settings.n_group <= 1)
                .map(|_| "this router does not limit groups"),
            HookPoint::SharedOut(_) => moe.filter(|m| m.shared_experts.is_none()).map(|_| "the layer has no shared experts"),
            HookPoint::ExpertOut(_, e) => {
                return moe.map_or(Ok(()), |m| Error::check_index(IndexKind::Expert, e, m.experts.len()));
            }
            _ => None,
        };
        match never {
            Some(why) => Err(Error::Input(why.to_string())),
            None => Ok(()),
        }
    }

    /// Every hook point of this model, in the order a forward pass visits
    /// them (per-expert outputs after the routing of their layer).
    pub fn hook_points(&self) -> Vec<HookPoint> {
        use HookPoint::*;
        let mut all = vec![Embed];
        for (l, layer) in self.layers.iter().enumerate() {
            all.extend([ResidPre(l), AttnIn(l), QLatent(l), QPe(l), CKv(l), KPe(l), Pattern(l), HeadOut(l), AttnOut(l), ResidMid(l), MlpIn(l)]);
            all.extend([RouterLogits(l), RouterScores(l), ChosenGroups(l), TopkIndices(l), TopkWeights(l)]);
            all.extend((0..layer.moe().map_or(0, |m| m.experts.len())).map(|e| ExpertOut(l, e)));
            all.extend([SharedOut(l), MlpOut(l), ResidPost(l)]);
        }
        all.extend([FinalNorm, Logits]);
        all.retain(|p| self.check_hook_point(*p).is_ok());
        all
    }

    /// The traffic counters of the model's streamer so far (zeros when every
    /// weight is resident).
    pub fn traffic(&self) -> Traffic {
        self.streamer.as_ref().map(|s| s.traffic()).unwrap_or_default()
    }

    fn cost_since(&self, started: Instant, before: &Traffic, tokens: u64) -> ForwardCost {
        ForwardCost {
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            traffic: self.traffic().since(before),
            resident_bytes: self.weight_bytes() as u64,
            cache_bytes: self.streamer.as_ref().map_or(0, |s| s.cached_bytes() as u64),
        }
    }

    /// Parameters of the loaded weights, however they are stored (tied
    /// matrices counted once).
    pub fn parameter_count(&self) -> u64 {
        let numel = |shape: &[i64]| shape.iter().product::<i64>().max(0) as u64;
        let mut n = numel(&self.embed_tokens.shape) + self.norm.weight.numel() as u64;
        if !self.config.tie_word_embeddings {
            n += numel(&self.lm_head.shape);
        }
        for l in &self.layers {
            n += l.weights().iter().map(|w| numel(&w.shape)).sum::<u64>();
            n += l.small_tensors().iter().map(|t| t.numel() as u64).sum::<u64>();
        }
        n
    }

    /// Bytes of the weights held in memory now (tied matrices counted once),
    /// the expert cache and the read buffers kept for reuse included.
    pub fn weight_bytes(&self) -> usize {
        self.loaded_bytes + self.streamer.as_ref().map_or(0, |s| s.cached_bytes() + s.pooled_bytes())
    }

    /// Every weight tensor under its checkpoint name, in load order, as the
    /// loader recorded them (gate and up projections appear as their stacked
    /// matrix `...gate_up_proj.weight`). Fails, naming
    /// the first such weight, when a weight is not a plain resident tensor
    /// (FP8 kept packed, or streamed): load with `dequantize` and an
    /// unlimited budget for training or saving.
    pub fn named_weights(&self) -> Result<Vec<(String, &Tensor)>> {
        self.weight_record
            .iter()
            // a tied head is the embedding: saved and trained once, under its name
            .filter(|n| !(self.config.tie_word_embeddings && n.name == "lm_head.weight"))
            .map(|n| match &n.tensor {
                Ok(t) => Ok((n.name.clone(), t)),
                Err(why) => Err(Error::Input(why.clone())),
            })
            .collect()
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

/// Bytes of the weights a load left in memory (tied matrices counted once).
fn loaded_bytes(config: &Config, embed_tokens: &Weight, lm_head: &Weight, norm: &RmsNorm, layers: &[DecoderLayer]) -> usize {
    let tensor = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let mut total = embed_tokens.resident_bytes() + tensor(&norm.weight);
    if !config.tie_word_embeddings {
        total += lm_head.resident_bytes();
    }
    for l in layers {
        total += l.weights().iter().map(|w| w.resident_bytes()).sum::<usize>();
        total += l.small_tensors().into_iter().map(tensor).sum::<usize>();
    }
    total
}


