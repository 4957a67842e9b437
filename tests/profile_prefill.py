#!/usr/bin/env python3
"""Where a prefill's time goes, block by block, in DeepScope and in transformers.

Usage: python tests/profile_prefill.py --deepscope target/release/deepscope
           --out docs/benchmarks.md [--threads 2] [--repeats 5]

The bench model of tests/bench_transformers.py (built if missing), a 4 x 256
prefill, the same threads. transformers (eager) is timed with forward pre- and
post-hooks on its modules; DeepScope with `deepscope bench --profile`, which
stamps the time at block boundaries through identity hooks. Both are summed
into the same kinds of block:

  embedding, attention (the whole attention module: norms inside it,
  projections, RoPE, scores, softmax, output projection), norms and residuals
  (the layer norms around attention and MLP, residual adds), dense MLP, router
  (gate and top-k choice), routed + shared experts, final norm + LM head, and
  what neither hook sees (transformers: rotary tables, masks, Python between
  modules).

Each side reports its run with the median total of --repeats runs after a
warm-up, whole (medians taken block by block need not add up to a run). The table replaces the
bench:profile section of --out.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_transformers import BATCH, MODEL_CONFIG, SEQ, build_model, write_section  # noqa: E402

START = "<!-- bench:profile:start -->"
END = "<!-- bench:profile:end -->"
KINDS = ["embedding", "attention", "norms and residuals", "dense MLP", "router", "routed + shared experts",
         "final norm + LM head"]


def profile_transformers(model_dir, threads, repeats, dtype="f32", batch=BATCH, seq=SEQ, plain=None):
    """The transformers run with the median total of `repeats` (after a
    warm-up), block by block. With `plain` (a dict), the prefill is first
    timed without hooks (warm-up, then the median of `repeats`) into
    plain["prefill_ms"] and plain["runs_ms"]."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    kind = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=kind).eval()
    cfg = model.config
    torch.manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (batch, seq))
    if plain is not None:
        def bare():
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(ids, use_cache=False)
            return 1e3 * (time.perf_counter() - t0)

        bare()
        plain["runs_ms"] = [bare() for _ in range(repeats)]
        plain["prefill_ms"] = statistics.median(plain["runs_ms"])
    spans = {}

    def timed(name, module):
        def pre(*_):
            spans[name] = [time.perf_counter(), None]

        def post(*_):
            spans[name][1] = time.perf_counter()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    inner = model.model
    timed("embed", inner.embed_tokens)
    timed("norm", inner.norm)
    timed("lm_head", model.lm_head)
    for i, layer in enumerate(inner.layers):
        timed(f"layer{i}", layer)
        timed(f"attn{i}", layer.self_attn)
        timed(f"mlp{i}", layer.mlp)
        if hasattr(layer.mlp, "experts"):
            timed(f"experts{i}", layer.mlp.experts)
            timed(f"shared{i}", layer.mlp.shared_experts)

    def one():
        spans.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=False)
        total = time.perf_counter() - t0
        d = lambda k: spans[k][1] - spans[k][0]  # noqa: E731
        acc = dict.fromkeys(KINDS, 0.0)
        acc["embedding"] = d("embed")
        for i, layer in enumerate(inner.layers):
            attn, mlp = d(f"attn{i}"), d(f"mlp{i}")
            acc["attention"] += attn
            acc["norms and residuals"] += d(f"layer{i}") - attn - mlp
            if hasattr(layer.mlp, "experts"):
                experts = d(f"experts{i}") + d(f"shared{i}")
                acc["routed + shared experts"] += experts
                acc["router"] += mlp - experts
            else:
                acc["dense MLP"] += mlp
        acc["final norm + LM head"] = d("norm") + d("lm_head")
        acc = {k: 1e3 * v for k, v in acc.items()}
        acc["total"] = 1e3 * total
        return acc

    one()
    runs = sorted((one() for _ in range(repeats)), key=lambda r: r["total"])
    return runs[len(runs) // 2]  # the run with the median total, whole


def block_gflop(c, absorbed=True, batch=BATCH, seq=SEQ):
    """Multiply-add FLOPs (2 per MAC) of each block of a batch x seq prefill
    of config `c` (causal scores counted for the lower triangle only), with
    the attention core of the absorbed path (latent-wide scores) or of the
    naive one (keys and values expanded per head)."""
    n, d, h = batch * seq, c["hidden_size"], c["num_attention_heads"]
    nope, rope, v, kvl, ql = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"], c.get("q_lora_rank")
    layers, dense = c["num_hidden_layers"], c["first_k_dense_replace"]
    moe = layers - dense
    pairs = batch * h * seq * (seq + 1) / 2  # causal (query, key) pairs per layer
    q_proj = d * h * (nope + rope) if ql is None else d * ql + ql * h * (nope + rope)
    attn = n * (q_proj + d * (kvl + rope) + h * v * d)  # projections
    if absorbed:
        attn += n * h * nope * kvl + pairs * (kvl + rope) + pairs * kvl + n * h * kvl * v
    else:  # expand keys and values, then (nope + rope)-wide scores and v-wide values
        attn += n * kvl * h * (nope + v) + pairs * (nope + rope + v)
    g = {
        "attention": 2 * layers * attn,
        "dense MLP": 2 * dense * n * 3 * d * c["intermediate_size"],
        "router": 2 * moe * n * d * c["n_routed_experts"],
        "routed + shared experts": 2 * moe * n * (c["num_experts_per_tok"] + c["n_shared_experts"]) * 3 * d * c["moe_intermediate_size"],
        "final norm + LM head": 2 * n * d * c["vocab_size"],
    }
    return {k: x / 1e9 for k, x in g.items()}


def gemm_rate(threads, c=MODEL_CONFIG, n=BATCH * SEQ, dtype="f32", tries=30):
    """This machine's matmul rate (GFLOP/s) in `dtype` on the model's largest
    shapes, best of several runs: the limit the blocks are measured against."""
    import torch
    torch.set_num_threads(threads)
    kind = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    best = 0.0
    for k, m in ((c["hidden_size"], c["vocab_size"]), (c["hidden_size"], c["intermediate_size"]), (c["intermediate_size"], c["hidden_size"])):
        a, b = torch.randn(n, k, dtype=kind), torch.randn(k, m, dtype=kind)
        torch.mm(a, b)
        for _ in range(tries):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n * k * m / (time.perf_counter() - t) / 1e9)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deepscope", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="target/bench/model")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.model, "config.json")):
        build_model(a.model)
    hf = profile_transformers(a.model, a.threads, a.repeats)
    cmd = [a.deepscope, "bench", "--model", a.model, "--device", "cpu", "--threads", str(a.threads), "--batch", str(BATCH),
           "--seq", str(SEQ), "--new", "1", "--prompt-len", "4", "--repeats", str(a.repeats), "--profile"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ds = json.loads(out.strip().splitlines()[-1])["profile_ms"]
    rate = gemm_rate(a.threads)
    gf = block_gflop(MODEL_CONFIG, absorbed=False)  # `--attn auto` runs a prompt on the naive path
    total_gf = sum(gf.values())
    hf["not seen by hooks"] = hf["total"] - sum(hf[k] for k in KINDS)
    ds["not seen by hooks"] = ds["total"] - sum(ds[k] for k in KINDS)
    lines = [START, "## Where a prefill's time goes (CPU)", "",
             f"`make bench-profile`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{os.cpu_count()} CPUs, {a.threads} threads: the bench model (section above), a {BATCH} x {SEQ} prefill, "
             f"the run with the median total of {a.repeats}. transformers (eager) is timed with forward hooks on its modules; DeepScope "
             "with `deepscope bench --profile` (identity hooks at block boundaries). Times in ms, summed over layers.", "",
             f"The limit: this machine's fp32 matmul rate on the model's largest shapes, measured in the same run: "
             f"**{rate:.0f} GFLOP/s**. GFLOP counts multiply-adds as 2 (naive attention, which `--attn auto` picks for a prompt; causal pairs only).", "",
             "| block | transformers | DeepScope | DeepScope / transformers (time) | GFLOP | DeepScope GFLOP/s | of the limit |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in KINDS + ["not seen by hooks", "total"]:
        h, d = hf[k], ds[k]
        ratio = f"{d / h:.2f}" if h > 0.05 else "-"
        g = total_gf if k == "total" else gf.get(k)
        flops = f"{g:.2f} | {g / d * 1e3:.0f} | {100 * g / d * 1e3 / rate:.0f}%" if g and d > 0.05 else "- | - | -"
        lines.append(f"| {k} | {h:.1f} | {d:.1f} | {ratio} | {flops} |")
    floor_ms = total_gf / rate * 1e3
    lines += [
        "",
        f"- At the measured rate the whole prefill needs at least {floor_ms:.0f} ms ({total_gf:.1f} GFLOP); transformers took "
        f"{hf['total']:.0f} ms and DeepScope {ds['total']:.0f} ms, {100 * floor_ms / ds['total']:.0f}% of the limit. "
        f"1.5x transformers would be {hf['total'] / 1.5:.0f} ms, "
        + ("below" if hf["total"] / 1.5 < floor_ms else "above") + " that floor.",
        f"- DeepScope command: `{' '.join(cmd)}`",
        END,
    ]
    text = "\n".join(lines) + "\n"
    write_section(a.out, text, START, END)
    print(text)


if __name__ == "__main__":
    main()
