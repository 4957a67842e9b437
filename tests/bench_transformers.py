#!/usr/bin/env python3
"""Benchmark DeepScope's model core against Hugging Face transformers (CPU, eager).

Usage:
  python tests/bench_transformers.py --deepscope target/release/deepscope \\
      --out docs/benchmarks.md [--threads N]
  python tests/bench_transformers.py --hf-only [--threads N]

Steps
  1. Build a seeded random DeepSeek-V3-architecture model (float32) in transformers
     and save it to target/bench/model (per-expert tensor names on disk).
  2. Measure transformers (attn_implementation="eager"), each measurement in a
     fresh subprocess of this script (`--worker load|prefill|decode`):
       load    : RSS delta of from_pretrained, and the bytes of the state dict;
       prefill : full forward of 4 x 256 random ids, use_cache=False;
       decode  : 1 x 16 prompt, then 64 greedy tokens with a KV cache, timed
                 both ways in DECODE_METHODS; the faster one is reported.
  3. Run `<deepscope> bench ...`, which prints one line of JSON.
  Steps 2 and 3 are repeated --rounds times (default 3), alternating, so a
  slow spell of the machine falls on both sides; every figure is the median
  over the rounds and each ratio's min-max over the rounds is its spread.
  4. Replace the "Model core" section of docs/benchmarks.md (between the
     bench:model-core markers), keeping everything else in the file.
With --hf-only, steps 3 and 4 are skipped and the transformers figures are printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

BATCH, SEQ = 4, 256  # prefill shape
PROMPT_LEN, NEW_TOKENS = 16, 64  # decode shape
REPEATS = 3  # timed runs after one warm-up; the median is reported
SEED = 1234

MARK_START = "<!-- bench:model-core:start -->"
MARK_END = "<!-- bench:model-core:end -->"
CAPTURE_START = "<!-- bench:capture:start -->"
CAPTURE_END = "<!-- bench:capture:end -->"

MODEL_CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    intermediate_size=1024,
    moe_intermediate_size=256,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Two ways to time transformers' greedy decode; the table uses whichever is faster
# (the more favourable figure for transformers, so the ratio is conservative).
DECODE_METHODS = {
    "manual loop": (
        f"prefill the {PROMPT_LEN}-token prompt into a DynamicCache (untimed), then time {NEW_TOKENS} "
        f"steps that each feed one greedy (argmax) token with past_key_values; "
        f"tokens/s = {NEW_TOKENS} / loop time"
    ),
    "generate()": (
        f"generate(max_new_tokens={NEW_TOKENS}, min_new_tokens={NEW_TOKENS}, do_sample=False) minus a "
        f"prompt-only forward; that difference covers {NEW_TOKENS - 1} single-token forwards (the first "
        f"new token comes from the prompt forward), so tokens/s = {NEW_TOKENS - 1} / (generate - prompt)"
    ),
}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def proc_status_bytes(field: str) -> int:
    """A memory field (VmRSS, VmHWM, ...) of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_time(fn, repeats: int = REPEATS) -> tuple[float, list[float]]:
    """One warm-up call, then the median wall time of `repeats` calls."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def fmt_mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------
# Step 1: build the benchmark model
# ----------------------------------------------------------------------------

def build_model(model_dir: str) -> None:
    import torch
    from safetensors import safe_open
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    config = DeepseekV3Config(**MODEL_CONFIG)
    model = DeepseekV3ForCausalLM(config).eval()  # HF's own seeded init (normal, std 0.02)
    with torch.no_grad():  # a non-zero router bias, as in real V3 checkpoints
        gen = torch.Generator().manual_seed(SEED)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.01)
    os.makedirs(model_dir, exist_ok=True)
    for f in os.listdir(model_dir):  # idempotent: no stale shards
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".json")):
            os.remove(os.path.join(model_dir, f))
    model.save_pretrained(model_dir, safe_serialization=True)

    # The Rust loader expects per-expert names; transformers 5.x writes them
    # (it fuses experts only in memory).  Fail loudly if that ever changes.
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    want = "model.layers.1.mlp.experts.0.gate_proj.weight"
    if want not in names or any(n.endswith("experts.gate_up_proj") for n in names):
        raise RuntimeError(f"{model_dir}: unexpected expert layout on disk")


# ----------------------------------------------------------------------------
# Step 2: transformers measurements (run in fresh subprocesses)
# ----------------------------------------------------------------------------

def worker(kind: str, model_dir: str, threads: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    # Import the model's code now so that the load measurement covers weights,
    # not Python modules that from_pretrained would otherwise import lazily.
    import transformers.models.deepseek_v3.modeling_deepseek_v3  # noqa: F401

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    # initialise the torch runtime and start the intra-op thread pool (a 1M-element
    # op), exactly as the DeepScope side does before its baseline reading
    _ = torch.ones(1 << 20).sum().item()

    def load():
        return AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="eager", dtype=torch.float32
        ).eval()

    if kind == "load":
        rss_before = proc_status_bytes("VmRSS")
        hwm_reset = reset_peak_rss()
        t0 = time.perf_counter()
        model = load()
        load_s = time.perf_counter() - t0
        hwm_after = proc_status_bytes("VmHWM")
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return {
            "load_rss_delta_bytes": hwm_after - rss_before,
            "weight_bytes": weight_bytes,
            "rss_before_bytes": rss_before,
            "hwm_after_bytes": hwm_after,
            "hwm_reset": hwm_reset,
            "load_s": load_s,
        }

    model = load()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(SEED)

    if kind == "prefill":
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)

        def run():
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)

        t, times = median_time(run)
        return {"prefill_tokens_per_s": BATCH * SEQ / t, "prefill_s": t, "prefill_runs_s": times}

    if kind == "decode":
        from transformers import DynamicCache

        prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=gen)
        loop_times = []

        # (1) Manual loop: the prompt forward is untimed; each timed step feeds one token.
        def manual():
            with torch.inference_mode():
                cache = DynamicCache(config=model.config)
                out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(NEW_TOKENS):
                    out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
                    tok = out.logits[:, -1:].argmax(-1)
                loop_times.append(time.perf_counter() - t0)

        manual()  # warm-up
        loop_times.clear()
        for _ in range(REPEATS):
            manual()
        loop_s = statistics.median(loop_times)

        # (2) generate(): time minus a prompt-only forward (reference figure).
        mask = torch.ones_like(prompt)

        def generate():
            with torch.inference_mode():
                model.generate(
                    input_ids=prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS, do_sample=False,
                    pad_token_id=model.config.eos_token_id,
                )

        def prompt_forward():
            with torch.inference_mode():
                model(input_ids=prompt, use_cache=True)

        gen_s, _ = median_time(generate)
        prompt_s, _ = median_time(prompt_forward)
        return {
            "loop_decode_tokens_per_s": NEW_TOKENS / loop_s,
            "decode_loop_s": loop_s,
            "decode_loop_runs_s": loop_times,
            "generate_s": gen_s,
            "prompt_forward_s": prompt_s,
            "generate_decode_tokens_per_s": (NEW_TOKENS - 1) / max(gen_s - prompt_s, 1e-9),
        }

    if kind == "floor":
        # The matrix-vector products one decode step cannot avoid: every 2-D
        # weight but the embedding table (attention, dense MLP, routers,
        # shared experts, LM head) and num_experts_per_tok experts of each MoE
        # layer (any k have the same shapes), each times a 1-token input,
        # timed back to back in torch; no attention over the cache, no
        # routing, no Python between layers.  Its rate is the ceiling for
        # decode on this machine with these kernels.
        k = model.config.num_experts_per_tok
        mats = []
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                continue
            if p.dim() == 2:
                mats.append(p.detach())
            elif p.dim() == 3:  # fused experts in memory: [E, out, in]
                mats.extend(p.detach()[e] for e in range(k))
        xs = [torch.randn(1, m.shape[1]) for m in mats]

        def step():
            with torch.inference_mode():
                for m, x in zip(mats, xs):
                    torch.nn.functional.linear(x, m)

        for _ in range(10):
            step()
        reps = 200
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        s = (time.perf_counter() - t0) / reps

        # The same products for the decode actually timed above: the same
        # prompt and greedy steps, each step's routed experts the ones its
        # router chose (recorded by hooks on the gates), replayed step after
        # step. Experts change from step to step, so the weights no longer
        # all stay in the caches as they do when the same k experts repeat.
        import re
        prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=gen)  # the decode worker's prompt
        chosen: dict[int, list[list[int]]] = {}

        def on_gate(name):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))

            def hook(_mod, _inp, out):
                chosen.setdefault(layer, []).append(out[2].reshape(-1).tolist())
            return hook

        handles = [m.register_forward_hook(on_gate(n)) for n, m in model.named_modules() if n.endswith("mlp.gate")]
        from transformers import DynamicCache
        with torch.inference_mode():
            out = model(input_ids=prompt, past_key_values=DynamicCache(config=model.config), use_cache=True)
            chosen.clear()  # the prompt's routing is not a decode step
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(NEW_TOKENS):
                out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
        for h in handles:
            h.remove()
        dense = [p.detach() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
        experts = {}  # layer -> [fused experts [E, out, in]]
        for n, p in model.named_parameters():
            if p.dim() == 3:
                experts.setdefault(int(re.search(r"layers\.(\d+)\.", n).group(1)), []).append(p.detach())
        steps = []
        for i in range(NEW_TOKENS):
            mats_i = list(dense)
            for layer, fused in experts.items():
                mats_i.extend(f[e] for e in chosen[layer][i] for f in fused)
            steps.append([(m, torch.randn(1, m.shape[1])) for m in mats_i])

        def replay():
            with torch.inference_mode():
                for step_mats in steps:
                    for m, x in step_mats:
                        torch.nn.functional.linear(x, m)

        replay_s, replay_runs = median_time(replay, repeats=5)
        touched = {(l, e) for l in experts for step in chosen[l] for e in step}

        # The machine's limit for any f32 decode: a step must read every one
        # of these weight bytes once, and this reads them once, as one
        # contiguous buffer, in one reduction on all threads (no products, no
        # per-matrix overhead). Whatever caches hold the step's weights hold
        # this buffer too.
        buf = torch.cat([m.reshape(-1) for m in mats])
        for _ in range(10):
            buf.sum()
        read_s, _ = median_time(lambda: buf.sum(), repeats=200)
        return {"read_limit_steps_per_s": 1.0 / read_s, "read_limit_gb_per_s": buf.numel() * buf.element_size() / read_s / 1e9,
                "floor_steps_per_s": 1.0 / s, "floor_step_bytes": sum(m.numel() * m.element_size() for m in mats),
                "floor_matrices": len(mats), "replay_steps_per_s": NEW_TOKENS / replay_s,
                "replay_runs_s": replay_runs, "replay_experts_touched": len(touched)}

    if kind == "prefill_floor":
        # The matrix products a 4 x 256 prefill cannot avoid, timed back to
        # back in torch with nothing between them: every 2-D weight but the
        # embedding table (attention projections, dense MLP, routers, shared
        # experts, LM head) times all the tokens; each routed expert times the
        # tokens the model's own router sent it on this prompt (counts from a
        # hooked forward of the same ids as the prefill); and per layer the
        # attention core, queries in blocks of 64 scored against the keys up
        # to each block's end (scores, then probabilities times values; the
        # blocking DeepScope uses, five eighths of the full T x T square).
        # No norms, softmax, RoPE, routing or copies.
        import re
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)  # the prefill's ids
        counts: dict[int, list[int]] = {}

        def on_gate(name):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
            n_exp = model.config.n_routed_experts

            def hook(_mod, _inp, out):
                counts[layer] = torch.bincount(out[2].reshape(-1), minlength=n_exp).tolist()
            return hook

        handles = [m.register_forward_hook(on_gate(n)) for n, m in model.named_modules() if n.endswith("mlp.gate")]
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        rows = BATCH * SEQ
        products = []  # (weight [out, in], rows)
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                continue
            if p.dim() == 2:
                products.append((p.detach(), rows))
            elif p.dim() == 3:  # fused experts in memory: [E, out, in]
                layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
                products.extend((p.detach()[e], c) for e, c in enumerate(counts[layer]) if c > 0)
        xs = [torch.randn(r, m.shape[1]) for m, r in products]
        cfg = model.config
        heads, dq, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        q = torch.randn(BATCH * heads, SEQ, dq)
        k = torch.randn(BATCH * heads, SEQ, dq)
        v = torch.randn(BATCH * heads, SEQ, dv)
        block = 64
        flops = sum(2 * r * m.shape[0] * m.shape[1] for m, r in products)
        for start in range(0, SEQ, block):
            n = min(block, SEQ - start)
            flops += cfg.num_hidden_layers * 2 * BATCH * heads * n * (start + n) * (dq + dv)

        def prefill_products():
            with torch.inference_mode():
                for m, x in zip(products, xs):
                    torch.nn.functional.linear(x, m[0])
                for _ in range(cfg.num_hidden_layers):
                    for start in range(0, SEQ, block):
                        n = min(block, SEQ - start)
                        s = torch.bmm(q[:, start:start + n], k[:, :start + n].transpose(1, 2))
                        torch.bmm(s, v[:, :start + n])

        t, times = median_time(prefill_products, repeats=9)

        # The machine's f32 compute limit: the best rate of one large square
        # product (the shape BLAS runs fastest), which no mix of the
        # prefill's smaller products can beat.
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        peak_s = min(median_time(lambda: torch.mm(a, b), repeats=5)[1])
        return {"peak_gflop_per_s": 2 * n ** 3 / peak_s / 1e9, "prefill_floor_s": t, "prefill_floor_runs_s": times, "prefill_floor_products": len(products)
                + cfg.num_hidden_layers * 2 * ((SEQ + block - 1) // block), "prefill_floor_gflop": flops / 1e9}

    raise ValueError(kind)


def run_worker(kind: str, model_dir: str, threads: int) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
           "--model-dir", model_dir, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"transformers {kind} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_transformers(model_dir: str, threads: int) -> dict:
    result = {}
    for kind in ("load", "prefill", "decode", "floor", "prefill_floor"):
        print(f"[bench] transformers {kind} ...", file=sys.stderr, flush=True)
        result.update(run_worker(kind, model_dir, threads))
    # Pick the decode figure that favours transformers (see DECODE_METHODS).
    if result["generate_decode_tokens_per_s"] > result["loop_decode_tokens_per_s"]:
        result["decode_method"] = "generate()"
        result["decode_tokens_per_s"] = result["generate_decode_tokens_per_s"]
    else:
        result["decode_method"] = "manual loop"
        result["decode_tokens_per_s"] = result["loop_decode_tokens_per_s"]
    return result


# ----------------------------------------------------------------------------
# Step 3: DeepScope
# ----------------------------------------------------------------------------

# (name, DeepScope key, transformers key) of each ratio whose spread over rounds is reported
RATIOS = (("prefill", "prefill_tokens_per_s", "prefill_tokens_per_s"),
          ("corpus", "routing_stats_tokens_per_s", "prefill_tokens_per_s"),
          ("decode", "decode_tokens_per_s", "decode_tokens_per_s"))


def median_of(results: list[dict]) -> dict:
    """One result from several rounds: each number the median over the rounds,
    anything else (text, lists of single runs) as the first round had it."""
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(values)
    if len(results) > 1 and "loop_decode_tokens_per_s" in out:
        loop, gen = out["loop_decode_tokens_per_s"], out["generate_decode_tokens_per_s"]
        out["decode_method"] = "manual loop" if loop >= gen else "generate()"
        out["decode_tokens_per_s"] = max(loop, gen)
    return out


def deepscope_cmd(binary: str, model_dir: str, threads: int) -> list[str]:
    return [binary, "bench", "--model", model_dir, "--threads", str(threads),
            "--batch", str(BATCH), "--seq", str(SEQ), "--new", str(NEW_TOKENS),
            "--prompt-len", str(PROMPT_LEN)]


def measure_deepscope(cmd: list[str]) -> dict:
    print(f"[bench] {shlex.join(cmd)} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"deepscope bench failed (exit {proc.returncode})")
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    if not lines:
        raise RuntimeError("deepscope bench printed nothing on stdout")
    result = json.loads(lines[-1])
    needed = ("load_rss_delta_bytes", "weight_bytes", "prefill_tokens_per_s", "decode_tokens_per_s", "routing_stats_tokens_per_s")
    missing = [k for k in needed if k not in result]
    if missing:
        raise RuntimeError(f"deepscope bench JSON lacks {missing}: {lines[-1]}")
    return result


# ----------------------------------------------------------------------------
# Step 4: docs/benchmarks.md
# ----------------------------------------------------------------------------

def render_section(hf: dict, ds: dict, threads: int, command: str, ds_command: str, spread: dict) -> str:
    import torch
    import transformers

    prefill_ratio = ds["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"]
    corpus_ratio = ds["routing_stats_tokens_per_s"] / hf["prefill_tokens_per_s"]
    decode_ratio = ds["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
    prefill_limit = BATCH * SEQ / (hf["prefill_floor_gflop"] / hf["peak_gflop_per_s"])
    hf_rss_per_w = hf["load_rss_delta_bytes"] / hf["weight_bytes"]
    ds_rss_per_w = ds["load_rss_delta_bytes"] / ds["weight_bytes"]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    rounds = len(spread["decode"])

    def ratio(name: str, value: float) -> str:
        if rounds < 2:
            return f"{value:.2f}x"
        return f"{value:.2f}x ({min(spread[name]):.2f}-{max(spread[name]):.2f}x over {rounds} rounds)"

    rows = [
        ("metric", "transformers", "DeepScope", "ratio (DeepScope / transformers)", "target", "met"),
        ("---", "---:", "---:", "---:", "---", "---"),
        (f"prefill tokens/s ({BATCH} x {SEQ})", f"{hf['prefill_tokens_per_s']:.1f}",
         f"{ds['prefill_tokens_per_s']:.1f}", ratio("prefill", prefill_ratio), ">= 1.5x", met(prefill_ratio >= 1.5)),
        (f"prefill floor: the prefill's matrix products alone ({hf['prefill_floor_products']} products, "
         f"{hf['prefill_floor_gflop']:.2f} GFLOP, torch back to back), tokens/s", f"{BATCH * SEQ / hf['prefill_floor_s']:.1f}", "",
         f"DeepScope prefill at {100 * ds['prefill_tokens_per_s'] * hf['prefill_floor_s'] / (BATCH * SEQ):.0f}% of it; "
         f"transformers at {100 * hf['prefill_tokens_per_s'] * hf['prefill_floor_s'] / (BATCH * SEQ):.0f}%; "
         f"1.5x transformers = {1.5 * hf['prefill_tokens_per_s'] * hf['prefill_floor_s'] / (BATCH * SEQ):.2f}x the floor", "", ""),
        (f"prefill compute limit: the same {hf['prefill_floor_gflop']:.2f} GFLOP at the machine's best f32 rate "
         f"(one 2048 x 2048 x 2048 product: {hf['peak_gflop_per_s']:.0f} GFLOP/s), tokens/s", f"{prefill_limit:.1f}", "",
         f"DeepScope prefill at {100 * ds['prefill_tokens_per_s'] / prefill_limit:.0f}% of it; "
         f"transformers at {100 * hf['prefill_tokens_per_s'] / prefill_limit:.0f}%; "
         f"1.5x transformers = {1.5 * hf['prefill_tokens_per_s'] / prefill_limit:.2f}x the limit", "", ""),
        (f"corpus routing statistics tokens/s (DeepScope: `routing_stats`, {BATCH} documents of {SEQ}, windows "
         f"of 256; transformers: its prefill above)", f"{hf['prefill_tokens_per_s']:.1f}",
         f"{ds['routing_stats_tokens_per_s']:.1f}", ratio("corpus", corpus_ratio), ">= 1.3x", met(corpus_ratio >= 1.3)),
        (f"decode tokens/s (1 x {PROMPT_LEN} prompt, {NEW_TOKENS} new)", f"{hf['decode_tokens_per_s']:.1f}",
         f"{ds['decode_tokens_per_s']:.1f}", ratio("decode", decode_ratio), ">= 5x", met(decode_ratio >= 5.0)),
        (f"decode floor: the step's matrix-vector products alone ({hf['floor_matrices']} products, "
         f"{fmt_mib(hf['floor_step_bytes'])}, torch back to back), steps/s", f"{hf['floor_steps_per_s']:.1f}", "",
         f"DeepScope decode at {100 * ds['decode_tokens_per_s'] / hf['floor_steps_per_s']:.0f}% of it; "
         f"transformers at {100 * hf['decode_tokens_per_s'] / hf['floor_steps_per_s']:.0f}%; "
         f"5x transformers = {5 * hf['decode_tokens_per_s'] / hf['floor_steps_per_s']:.2f}x the floor", "", ""),
        (f"decode floor for this decode: the same products with each step's own routed experts (as its router "
         f"chose them; {hf['replay_experts_touched']} distinct experts over the {NEW_TOKENS} steps), replayed back to back, steps/s",
         f"{hf['replay_steps_per_s']:.1f}", "",
         f"DeepScope decode at {100 * ds['decode_tokens_per_s'] / hf['replay_steps_per_s']:.0f}% of it; "
         f"transformers at {100 * hf['decode_tokens_per_s'] / hf['replay_steps_per_s']:.0f}%; "
         f"5x transformers = {5 * hf['decode_tokens_per_s'] / hf['replay_steps_per_s']:.2f}x the floor", "", ""),
        (f"decode memory limit: the step's {fmt_mib(hf['floor_step_bytes'])} of weights read once, as one buffer in one "
         f"reduction ({hf['read_limit_gb_per_s']:.1f} GB/s), steps/s", f"{hf['read_limit_steps_per_s']:.1f}", "",
         f"DeepScope decode at {100 * ds['decode_tokens_per_s'] / hf['read_limit_steps_per_s']:.0f}% of it; "
         f"transformers at {100 * hf['decode_tokens_per_s'] / hf['read_limit_steps_per_s']:.0f}%; "
         f"5x transformers = {5 * hf['decode_tokens_per_s'] / hf['read_limit_steps_per_s']:.2f}x the limit", "", ""),
        ("weight bytes", fmt_mib(hf["weight_bytes"]), fmt_mib(ds["weight_bytes"]),
         f"{ds['weight_bytes'] / hf['weight_bytes']:.2f}x", "", ""),
        ("load RSS delta", fmt_mib(hf["load_rss_delta_bytes"]), fmt_mib(ds["load_rss_delta_bytes"]),
         f"{ds['load_rss_delta_bytes'] / hf['load_rss_delta_bytes']:.2f}x", "", ""),
        ("load RSS delta / weight bytes", f"{hf_rss_per_w:.2f}x", f"{ds_rss_per_w:.2f}x", "",
         "DeepScope <= 1.2x", met(ds_rss_per_w <= 1.2)),
    ]
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    cfg = ", ".join(f"{k}={v}" for k, v in MODEL_CONFIG.items())
    attn = ds.get("attn", "unreported")
    return f"""{MARK_START}
## Model core: DeepScope vs transformers (CPU)

_Generated by `tests/bench_transformers.py`; do not edit by hand (re-run `make bench`)._

- Date: {dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Machine: {len(os.sched_getaffinity(0))} CPUs (nproc), {cpu_model()}; Python {platform.python_version()},
  torch {torch.__version__}, transformers {transformers.__version__}
- Threads: {threads} (transformers: `torch.set_num_threads({threads})`; DeepScope: `--threads {threads}`)
- Command: `{command}`
- DeepScope command: `{ds_command}` (attention: {attn})
- Model: random DeepSeek-V3 architecture, float32, {fmt_mib(hf['weight_bytes'])} of weights ({cfg})
- Rounds: {rounds}, each measuring transformers then DeepScope, so a slow spell of the machine
  falls on both; every figure is the median over the rounds (ratios of the medians), and the
  parentheses give each ratio's min-max over the rounds.
- transformers: `attn_implementation="eager"`, each measurement in a fresh process; one warm-up
  then the median of {REPEATS} runs. Prefill is a full forward with `use_cache=False`.
  Decode is timed two ways and the faster (more favourable to transformers) is used; here
  that was **{hf['decode_method']}**.
  - manual loop ({hf['loop_decode_tokens_per_s']:.1f} tokens/s): {DECODE_METHODS['manual loop']}.
  - generate() ({hf['generate_decode_tokens_per_s']:.1f} tokens/s): {DECODE_METHODS['generate()']}.
- Load RSS delta = peak RSS (VmHWM, reset through /proc/self/clear_refs) during the load minus
  VmRSS before it. Both sides first initialise libtorch and start its thread pool with the same
  1M-element op (transformers also imports the model code first), so the delta is the load's own.
- DeepScope: the same shapes and thread count; prefill is `Model::forward` (full logits;
  `--attn auto`: the naive path for the prompt, attention computed explicitly on the CPU), decode
  is 64 single-token steps over the compressed MLA cache (absorbed) after an untimed 16-token
  prompt. Corpus routing statistics are `Model::routing_stats` over the prefill's tokens, each
  row a document: no logits, full windows four to a pass, the top-k counted per layer.

{table}
{MARK_END}
"""


def render_capture_section(ds: dict, ds_command: str) -> str:
    """The capture-overhead section: Model::trace with the default capture vs a plain forward."""
    plain, traced, routing = ds["plain_forward_ms"], ds["trace_default_ms"], ds["trace_routing_only_ms"]
    over = traced / plain - 1.0
    return f"""{CAPTURE_START}
## Capture overhead: `Model::trace` vs a plain forward (CPU)

_Generated by `tests/bench_transformers.py` from the DeepScope runs above (medians over the rounds); do not edit by hand._

- Command: `{ds_command}` (same model; one 1 x {ds['capture_seq']} sequence, one warm-up, then the median of
  interleaved runs).
- The default capture records routing (with the counterfactual top-k), attention patterns (which
  keeps every layer's probabilities for the hook; on the CPU attention is explicit either way, on CUDA
  it leaves the fused kernel) and activation statistics.

| run | ms | ratio to plain forward |
| --- | ---: | ---: |
| plain forward (`Model::forward_with`) | {plain:.2f} | 1.00x |
| `trace` with `Capture::routing_only()` | {routing:.2f} | {routing / plain:.2f}x |
| `trace` with `Capture::default()` | {traced:.2f} | {traced / plain:.2f}x |

Overhead of the default capture: **{100 * over:+.1f}%** (target <= 10%: {"met" if over <= 0.10 else "**not met**"}).
{CAPTURE_END}
"""


def write_section(path: str, section: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Replace the marked section of `path`, or append it; other content is kept."""
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + section.rstrip("\n") + tail
    elif text:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = "# Benchmarks\n\n" + section
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepscope", default="target/release/deepscope", help="DeepScope binary")
    ap.add_argument("--out", default="docs/benchmarks.md", help="markdown file to update")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model-dir", default="target/bench/model")
    ap.add_argument("--hf-only", action="store_true", help="measure transformers only and print")
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")),
                    help="rounds of transformers then DeepScope; figures are medians over them (env BENCH_ROUNDS)")
    ap.add_argument("--worker", choices=("load", "prefill", "decode", "floor", "prefill_floor"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.threads)))
        return 0

    if not args.hf_only and not (os.path.isfile(args.deepscope) and os.access(args.deepscope, os.X_OK)):
        ap.error(f"{args.deepscope} is not an executable; build it (cargo build --release) "
                 "or pass --hf-only to measure transformers alone")

    print(f"[bench] building {args.model_dir} ...", file=sys.stderr, flush=True)
    build_model(args.model_dir)
    hf = measure_transformers(args.model_dir, args.threads)

    if args.hf_only:
        print(json.dumps({k: v for k, v in hf.items() if not k.endswith("_runs_s")}, indent=2))
        print(
            f"transformers ({args.threads} threads): prefill {hf['prefill_tokens_per_s']:.1f} tok/s, "
            f"decode {hf['decode_tokens_per_s']:.1f} tok/s via {hf['decode_method']} (manual loop "
            f"{hf['loop_decode_tokens_per_s']:.1f}, generate() {hf['generate_decode_tokens_per_s']:.1f}), "
            f"load RSS delta {fmt_mib(hf['load_rss_delta_bytes'])} "
            f"for {fmt_mib(hf['weight_bytes'])} of weights "
            f"({hf['load_rss_delta_bytes'] / hf['weight_bytes']:.2f}x)"
        )
        return 0

    ds_cmd = deepscope_cmd(args.deepscope, args.model_dir, args.threads)
    rounds = [(hf, measure_deepscope(ds_cmd))]
    for r in range(1, args.rounds):
        print(f"[bench] round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
        rounds.append((measure_transformers(args.model_dir, args.threads), measure_deepscope(ds_cmd)))
    hf, ds = median_of([h for h, _ in rounds]), median_of([d for _, d in rounds])
    spread = {name: [d[dk] / h[hk] for h, d in rounds] for name, dk, hk in RATIOS}
    command = shlex.join(["python", "tests/bench_transformers.py", "--deepscope", args.deepscope,
                          "--out", args.out, "--threads", str(args.threads), "--rounds", str(args.rounds)]
                         + (["--model-dir", args.model_dir] if args.model_dir != "target/bench/model" else []))
    section = render_section(hf, ds, args.threads, command, shlex.join(ds_cmd), spread)
    write_section(args.out, section)
    print(section)
    capture = render_capture_section(ds, shlex.join(ds_cmd))
    write_section(args.out, capture, CAPTURE_START, CAPTURE_END)
    print(capture)
    print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
