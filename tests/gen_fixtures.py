#!/usr/bin/env python3
"""Generate parity fixtures for DeepScope from Hugging Face `transformers`.

Usage: python tests/gen_fixtures.py OUT_DIR

For every case below this writes OUT_DIR/<case>/ holding
  * a Hugging Face checkpoint (config.json + safetensors, per-expert tensor names
    `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`),
  * reference.safetensors: input_ids, logits and, per MoE layer L,
    layers.L.{topk_indices,topk_weights,router_logits} captured from the HF router,
and OUT_DIR/manifest.json listing the cases.

Everything is deterministic (fixed seeds), CPU-only, float32 and offline.
Re-running overwrites each case directory.

Design notes
  * Weights are re-initialised at unit scale (std = 1/sqrt(fan_in), embeddings
    N(0, 1), norm weights 1 + 0.1*N(0, 1)).  With HF's default std of 0.02 the
    attention scores are ~0, attention is uniform and a wrong RoPE would still
    "pass"; at unit scale every part of the model visibly matters.
  * Router weights get std ROUTER_LOGIT_STD/sqrt(hidden): the router input is
    RMS-normalised (unit scale), so its logits have std ~ROUTER_LOGIT_STD.  That
    is large enough to separate experts but small enough that sigmoid does not
    saturate (at std 1.0 the logits would have std ~8 and many sigmoid scores
    would round to exactly 1.0, i.e. exact ties).
  * Each case is checked for near-ties in the routing decision (k-th vs
    (k+1)-th choice score, and the group choice); if any gap is <= MIN_GAP the
    case is rebuilt with the next seed.  A Rust implementation whose hidden
    states differ from HF by ~1e-6 therefore picks the same experts.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)
from transformers.utils import logging as hf_logging

BATCH = 2
MIN_GAP = 1e-3  # minimum separation of routing scores at every decision
ROUTER_LOGIT_STD = 2.0
MAX_ATTEMPTS = 200
ROUNDTRIP_TOL = 1e-5
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn value

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}

# Shared tiny architecture; each case overrides what it needs.
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    kv_lora_rank=32,
    q_lora_rank=48,
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

CASES = [
    dict(
        name="v3_base",
        family="deepseek_v3",
        seed=1000,
        seq_len=7,
        description="V3 router (sigmoid + bias, 4 groups / top-2 groups, norm_topk_prob, scale 2.5), "
        "interleaved default RoPE, q_lora",
        config=dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                    rope_interleave=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    dict(
        name="v3_yarn",
        family="deepseek_v3",
        seed=2000,
        seq_len=40,
        description="V3 with YaRN RoPE (factor 4, original 32, mscale 1.0 / mscale_all_dim 0.8), "
        "non-interleaved RoPE, no top-k renormalisation, 2 groups / top-1 group, T=40 > original context",
        config=dict(n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                    rope_interleave=False, rope_parameters=dict(YARN)),
    ),
    dict(
        name="v3_sharded_noqlora",
        family="deepseek_v3",
        seed=3000,
        seq_len=7,
        shard=True,
        description="V3 without q_lora (plain q_proj), single expert group, checkpoint sharded with an index",
        config=dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=True,
                    routed_scaling_factor=2.5, rope_interleave=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    dict(
        name="v2_greedy",
        family="deepseek_v2",
        seed=4000,
        seq_len=7,
        description="V2-Lite style: softmax router, greedy top-k, no q_lora, 2 shared experts",
        config=dict(topk_method="greedy", q_lora_rank=None, n_group=1, topk_group=1,
                    norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    dict(
        name="v2_group_limited",
        family="deepseek_v2",
        seed=5000,
        seq_len=40,
        description="V2 style: softmax router, group_limited_greedy (4 groups / top-2), q_lora, "
        "routed_scaling_factor 16, YaRN RoPE, T=40",
        config=dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=48,
                    norm_topk_prob=False, routed_scaling_factor=16.0, rope_parameters=dict(YARN)),
    ),
    dict(
        name="v3_bf16",
        family="deepseek_v3",
        seed=6000,
        seq_len=7,
        bf16=True,
        description="as v3_base but the checkpoint is bfloat16 (e_score_correction_bias float32); "
        "reference computed in float32 from the bf16-rounded weights",
        config=dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                    rope_interleave=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    dict(
        name="v3_fp8",
        family="deepseek_v3",
        seed=7000,
        seq_len=7,
        fp8=True,
        description="V3 with block-quantised float8_e4m3fn projections (+ weight_scale_inv, 128x128 blocks, "
        "partial edge blocks) and an extra MTP layer model.layers.3.* to skip; reference uses the "
        "dequantised weights",
        config=dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=160, kv_lora_rank=144,
                    q_lora_rank=136, n_group=4, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5, rope_interleave=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
]


# ----------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------

def build_model(case: dict, seed: int):
    """Build the HF model of a case with deterministic unit-scale weights."""
    kwargs = dict(BASE)
    kwargs.update(case["config"])
    if case["family"] == "deepseek_v3":
        config_cls, model_cls = DeepseekV3Config, DeepseekV3ForCausalLM
    else:
        config_cls, model_cls = DeepseekV2Config, DeepseekV2ForCausalLM
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    reinit_weights(model, seed)
    return model


@torch.no_grad()
def reinit_weights(model, seed: int) -> None:
    """Overwrite every weight with a seeded unit-scale value (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            p.copy_(normal(p.shape, 1.0))
        elif p.dim() == 1:  # RMSNorm weights
            p.copy_(1.0 + normal(p.shape, 0.1))
        elif name.endswith("mlp.gate.weight"):  # router
            p.copy_(normal(p.shape, ROUTER_LOGIT_STD / math.sqrt(hidden)))
        elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            # fused [E, out, in]
            p.copy_(normal(p.shape, 1.0 / math.sqrt(p.shape[-1])))
        elif p.dim() == 2:  # nn.Linear [out, in]
            p.copy_(normal(p.shape, 1.0 / math.sqrt(p.shape[1])))
        else:
            raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(normal(b.shape, 0.1))


def disk_views(model) -> dict[str, torch.Tensor]:
    """Map every on-disk (DeepSeek/HF) tensor name to a view of the live model tensor.

    transformers 5.x keeps the routed experts fused in memory
    (experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]); on disk each
    expert has its own gate/up/down.  gate = rows [0, I) of gate_up_proj[e],
    up = rows [I, 2I).  Views share storage, so editing a view edits the model.
    """
    views: dict[str, torch.Tensor] = {}
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        t = t.data
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                views[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter]
                views[f"{prefix}{e}.up_proj.weight"] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                views[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            views[name] = t
    return views


# ----------------------------------------------------------------------------
# Reference forward pass and routing checks
# ----------------------------------------------------------------------------

def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def run_reference(model, input_ids):
    """Forward pass capturing every router's (router_logits, topk_weights, topk_indices)."""
    captured: dict[int, tuple] = {}
    handles = []
    for li in moe_layers(model):
        def hook(_module, _inp, out, li=li):
            captured[li] = tuple(o.detach().clone() for o in out)
        handles.append(model.model.layers[li].mlp.gate.register_forward_hook(hook))
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, captured


def kth_gap(scores: torch.Tensor, k: int) -> float:
    """Smallest (over rows) gap between the k-th and (k+1)-th largest score (inf if n <= k)."""
    if scores.shape[-1] <= k:
        return math.inf
    top = scores.topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]).min().item()


def check_routing(model, captured) -> tuple[float, float]:
    """Recompute each router's decision from its logits, confirm it matches HF and
    return the smallest (expert gap, group gap) over all tokens and MoE layers."""
    cfg = model.config
    v3 = cfg.model_type == "deepseek_v3"
    n_exp, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    min_expert_gap, min_group_gap = math.inf, math.inf
    for li, (logits, hf_w, hf_idx) in captured.items():
        gate = model.model.layers[li].mlp.gate
        grouped = v3 or cfg.topk_method == "group_limited_greedy"
        if v3:
            scores = logits.sigmoid()
            choice = scores + gate.e_score_correction_bias
        else:
            scores = logits.softmax(dim=-1)
            choice = scores
        n_tok = choice.shape[0]
        if grouped:
            per_group = choice.view(n_tok, cfg.n_group, n_exp // cfg.n_group)
            if v3:  # group score = sum of the group's top-2 choice scores
                group_scores = per_group.topk(2, dim=-1).values.sum(-1)
            else:  # V2 group_limited_greedy: group score = the group's max
                group_scores = per_group.max(dim=-1).values
            min_group_gap = min(min_group_gap, kth_gap(group_scores, cfg.topk_group))
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
            keep = keep.repeat_interleave(n_exp // cfg.n_group, dim=1)
            # (HF's V2 router fills excluded experts with 0.0 rather than -inf; softmax
            # scores are > 0, so the choice is the same while allowed > k.)
            masked = choice.masked_fill(~keep, -math.inf)
            allowed = int(keep[0].sum())
        else:
            masked, allowed = choice, n_exp
        if allowed > k:
            min_expert_gap = min(min_expert_gap, kth_gap(masked, k))
        idx = masked.topk(k, dim=-1).indices.sort(dim=-1).values
        weights = scores.gather(1, idx)
        if v3 and cfg.norm_topk_prob:  # V2 in transformers 5.x never renormalises
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        hf_sorted, order = hf_idx.sort(dim=-1)
        if not torch.equal(idx, hf_sorted):
            raise AssertionError(f"layer {li}: recomputed expert choice differs from transformers")
        if not torch.allclose(weights, hf_w.gather(1, order), rtol=1e-6, atol=1e-6):
            raise AssertionError(f"layer {li}: recomputed routing weights differ from transformers")
    return min_expert_gap, min_group_gap


def reference_tensors(captured, input_ids, logits) -> dict[str, torch.Tensor]:
    out = {"input_ids": input_ids.to(torch.int64).contiguous(), "logits": logits.float().contiguous()}
    for li, (router_logits, weights, indices) in sorted(captured.items()):
        idx_sorted, order = indices.sort(dim=-1)
        out[f"layers.{li}.topk_indices"] = idx_sorted.to(torch.int64).contiguous()
        out[f"layers.{li}.topk_weights"] = weights.gather(1, order).float().contiguous()
        out[f"layers.{li}.router_logits"] = router_logits.float().contiguous()
    return out


# ----------------------------------------------------------------------------
# FP8 block quantisation (DeepSeek-V3 checkpoint format)
# ----------------------------------------------------------------------------

def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D float32 weight per 128x128 block.

    scale = max|block| / 448; fp8 = (block / scale) -> float8_e4m3fn.
    Returns (fp8 weight, scale_inv [ceil(out/128), ceil(in/128)]) where
    dequantised = fp8.float() * scale_inv (broadcast over each block).
    """
    rows, cols = w.shape
    nbr, nbc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(nbr, nbc, dtype=torch.float32)
    for br in range(nbr):
        for bc in range(nbc):
            rs = slice(br * FP8_BLOCK, min((br + 1) * FP8_BLOCK, rows))
            cs = slice(bc * FP8_BLOCK, min((bc + 1) * FP8_BLOCK, cols))
            block = w[rs, cs].float()
            scale = block.abs().max() / FP8_MAX
            if scale == 0:
                scale = torch.tensor(1.0)
            q[rs, cs] = (block / scale).to(torch.float8_e4m3fn)
            scale_inv[br, bc] = scale
    return q, scale_inv


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    s = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
    return q.float() * s


def is_fp8_target(name: str) -> bool:
    """2-D projections: attention (incl. kv_a_proj_with_mqa), dense MLP, experts,
    shared experts, MTP eh_proj.  Not embeddings, lm_head, norms or the router."""
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


def mtp_tensors(model, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors for one multi-token-prediction layer with index num_hidden_layers.

    Mirrors the V3 layout: enorm/hnorm/eh_proj, a full attention block, a dense
    MLP and the shared_head; any loader must skip these.
    """
    cfg = model.config
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    p = f"model.layers.{cfg.num_hidden_layers}."
    shapes = {
        "enorm.weight": [d],
        "hnorm.weight": [d],
        "eh_proj.weight": [d, 2 * d],
        "input_layernorm.weight": [d],
        "self_attn.q_a_proj.weight": [cfg.q_lora_rank, d],
        "self_attn.q_a_layernorm.weight": [cfg.q_lora_rank],
        "self_attn.q_b_proj.weight": [h * qk, cfg.q_lora_rank],
        "self_attn.kv_a_proj_with_mqa.weight": [cfg.kv_lora_rank + cfg.qk_rope_head_dim, d],
        "self_attn.kv_a_layernorm.weight": [cfg.kv_lora_rank],
        "self_attn.kv_b_proj.weight": [h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank],
        "self_attn.o_proj.weight": [d, h * cfg.v_head_dim],
        "post_attention_layernorm.weight": [d],
        "mlp.gate_proj.weight": [cfg.intermediate_size, d],
        "mlp.up_proj.weight": [cfg.intermediate_size, d],
        "mlp.down_proj.weight": [d, cfg.intermediate_size],
        "shared_head.norm.weight": [d],
        "shared_head.head.weight": [cfg.vocab_size, d],
    }
    tensors = {}
    for n, shape in shapes.items():
        if len(shape) == 1:  # norm weight
            tensors[p + n] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[p + n] = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
    return tensors


# ----------------------------------------------------------------------------
# Checkpoint writing and verification
# ----------------------------------------------------------------------------

def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for fn in files:
        with safe_open(os.path.join(path, fn), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors


def check_disk_names(model, on_disk: dict[str, torch.Tensor], dtype=None) -> None:
    """The checkpoint must hold exactly the per-expert DeepSeek names, with the model's values."""
    views = disk_views(model)
    if set(views) != set(on_disk):
        missing, extra = sorted(set(views) - set(on_disk)), sorted(set(on_disk) - set(views))
        raise AssertionError(f"on-disk names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, view in views.items():
        want = view if dtype is None or name.endswith("e_score_correction_bias") else view.to(dtype)
        if on_disk[name].dtype != want.dtype or not torch.equal(on_disk[name], want):
            raise AssertionError(f"{name}: on-disk tensor differs from the model")


@torch.no_grad()
def roundtrip_diff(path: str, input_ids, logits) -> float:
    """Load the checkpoint back through transformers and compare logits."""
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    diff = (loaded(input_ids=input_ids, use_cache=False).logits - logits).abs().max().item()
    if diff >= ROUNDTRIP_TOL:
        raise AssertionError(f"{path}: reloaded logits differ by {diff:.3g}")
    return diff


@torch.no_grad()
def quantize_model(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Block-quantise every FP8 target of the model; the model's weights are replaced
    by their dequantised values (these are what the reference is computed from).
    Returns on-disk name -> (fp8 weight, scale_inv)."""
    quantised = {}
    for name, view in disk_views(model).items():
        if is_fp8_target(name):
            q, s = fp8_quantize(view)
            view.copy_(fp8_dequantize(q, s))
            quantised[name] = (q, s)
    return quantised


def write_fp8_checkpoint(model, quantised, case_dir: str, gen: torch.Generator) -> None:
    """Write the FP8 checkpoint by hand: fp8 projections + weight_scale_inv, the
    remaining tensors in float32, plus a random MTP layer."""
    tensors: dict[str, torch.Tensor] = {}
    for name, view in disk_views(model).items():
        if name in quantised:
            q, s = quantised[name]
            tensors[name] = q
            tensors[name[: -len(".weight")] + ".weight_scale_inv"] = s
        else:
            tensors[name] = view.clone().contiguous()
    for name, t in mtp_tensors(model, gen).items():
        if is_fp8_target(name):
            q, s = fp8_quantize(t)
            tensors[name] = q
            tensors[name[: -len(".weight")] + ".weight_scale_inv"] = s
        else:
            tensors[name] = t
    save_file(tensors, os.path.join(case_dir, "model.safetensors"), metadata={"format": "pt"})

    # config.json: what save_pretrained writes, plus the quantisation block.
    model.config.save_pretrained(case_dir)
    cfg_path = os.path.join(case_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    # Verify: dequantising what is on disk gives exactly the reference weights.
    on_disk = read_checkpoint(case_dir)
    for name, view in disk_views(model).items():
        got = on_disk[name]
        if is_fp8_target(name):
            got = fp8_dequantize(got, on_disk[name[: -len(".weight")] + ".weight_scale_inv"])
        if not torch.equal(got, view):
            raise AssertionError(f"{name}: dequantised checkpoint differs from the reference weights")
    mtp_prefix = f"model.layers.{model.config.num_hidden_layers}."
    if not any(k.startswith(mtp_prefix) for k in on_disk):
        raise AssertionError("MTP layer missing from the fp8 checkpoint")

    # Unit-test material for the dequantiser: a weight with partial blocks on both axes.
    wname = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    sname = wname[: -len(".weight")] + ".weight_scale_inv"
    save_file(
        {"weight": on_disk[wname], "scale_inv": on_disk[sname],
         "dequantized": fp8_dequantize(on_disk[wname], on_disk[sname])},
        os.path.join(case_dir, "fp8_reference.safetensors"),
        metadata={"format": "pt"},
    )


def build_case(case: dict, out_dir: str) -> dict:
    """Build, check and write one case; returns its manifest entry."""
    t0 = time.time()
    # 1. Find a seed whose routing decisions have no near-ties.
    for attempt in range(MAX_ATTEMPTS):
        seed = case["seed"] + attempt
        model = build_model(case, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        quantised = None
        if case.get("bf16"):
            # The reference model holds the bf16-rounded weights (in float32).
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
        if case.get("fp8"):
            # Quantise now so the routing check and the reference see the
            # dequantised weights; the checkpoint itself is written in step 2.
            quantised = quantize_model(model)
        vocab = model.config.vocab_size
        input_ids = torch.randint(0, vocab, (BATCH, case["seq_len"]), generator=gen)
        logits, captured = run_reference(model, input_ids)
        expert_gap, group_gap = check_routing(model, captured)
        if expert_gap > MIN_GAP and group_gap > MIN_GAP:
            break
    else:
        raise RuntimeError(f"{case['name']}: no tie-free seed in {MAX_ATTEMPTS} attempts")

    # 2. Write the checkpoint.
    case_dir = os.path.join(out_dir, case["name"])
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    roundtrip = None
    if case.get("fp8"):
        write_fp8_checkpoint(model, quantised, case_dir, gen)
    elif case.get("bf16"):
        to_save = copy.deepcopy(model).to(torch.bfloat16)
        for li in moe_layers(model):  # keep the bias float32, as real V3 checkpoints do
            to_save.model.layers[li].mlp.gate.e_score_correction_bias.data = (
                model.model.layers[li].mlp.gate.e_score_correction_bias.data.clone())
        to_save.save_pretrained(case_dir, safe_serialization=True)
        check_disk_names(model, read_checkpoint(case_dir), dtype=torch.bfloat16)
        roundtrip = roundtrip_diff(case_dir, input_ids, logits)
    else:
        shard = {"max_shard_size": "250KB"} if case.get("shard") else {}
        model.save_pretrained(case_dir, safe_serialization=True, **shard)
        check_disk_names(model, read_checkpoint(case_dir))
        roundtrip = roundtrip_diff(case_dir, input_ids, logits)

    # 3. Reference outputs.
    save_file(reference_tensors(captured, input_ids, logits),
              os.path.join(case_dir, "reference.safetensors"), metadata={"format": "pt"})

    files = sorted(f for f in os.listdir(case_dir) if f.startswith("model"))
    n_shards = sum(1 for f in files if f.endswith(".safetensors"))
    if case.get("shard") and n_shards < 3:
        raise AssertionError(f"{case['name']}: expected >= 3 shards, got {n_shards}")
    summary = (
        f"{case['name']:<20} seed={seed} (attempt {attempt + 1}) T={case['seq_len']} "
        f"min expert gap={expert_gap:.4f} min group gap={group_gap:.4f} "
        f"|logits|max={logits.abs().max().item():.3f} "
        + (f"reload diff={roundtrip:.2e} " if roundtrip is not None else "reload=n/a (fp8) ")
        + f"shards={n_shards}"
        + (f" fp8 tensors={len(quantised)}" if quantised else "")
        + f" ({time.time() - t0:.1f}s)"
    )
    print(summary, flush=True)
    return {
        "name": case["name"],
        "family": case["family"],
        "description": case["description"],
        "moe_layers": moe_layers(model),
        "top_k": model.config.num_experts_per_tok,
        "vocab_size": model.config.vocab_size,
        "batch": BATCH,
        "seq_len": case["seq_len"],
        "checkpoint_dtype": "float8_e4m3fn" if case.get("fp8") else ("bfloat16" if case.get("bf16") else "float32"),
        "seed": seed,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    out_dir = argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    torch.set_default_dtype(torch.float32)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.time()
    entries = [build_case(case, out_dir) for case in CASES]
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"cases": entries}, f, indent=2)
        f.write("\n")
    print(f"wrote {len(entries)} cases to {out_dir} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
