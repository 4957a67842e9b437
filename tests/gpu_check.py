"""The CUDA checks (`make gpu-check`): one script, about 10 minutes on one
H200, never part of `make test`. Needs a machine where `make build` works
(the Rust toolchain and the project venv with PyPI torch 2.13, whose wheel
carries CUDA) and an NVIDIA GPU.

    python tests/gpu_check.py --deepscope target/release/deepscope \
        --fixtures target/fixtures --out docs/benchmarks.md [--work target/gpu-check] [--skip-large]

1. Parity on CUDA: every fixture case through `deepscope forward --device cuda`
   in f32 (logits within 1e-4 of the CPU run and of transformers, identical
   top-k) and in bf16 (the same top-k sets as f32 on the CPU wherever the
   CPU's k-th and (k+1)-th scores are apart).
2. The model benchmark (`deepscope bench`) on CUDA.
3. The DeepSeek-V2-Lite shape (27 layers, bf16, ~31 GB) fully resident on one
   GPU: prefill tokens/s, and its fraction of the bf16 matmul roofline measured
   in the same run (a large bf16 matmul through torch).
4. The DeepSeek-V3 shape cut to 4 layers (FP8, ~17 GB) with an 8 GiB GPU budget:
   the experts live in host memory and are copied to the GPU on demand.
5. Notebook 06 with `DEEPSCOPE_REAL_DEVICE=cuda` on the V3 shape.
Writes the figures between the bench:gpu markers of --out.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from bench_transformers import write_section  # noqa: E402

START = "<!-- bench:gpu:start -->"
END = "<!-- bench:gpu:end -->"


def sh(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def forward(bin_, case_dir, ids, device, dtype):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.safetensors")
        args = [bin_, "forward", "--model", case_dir, "--device", device, "--dtype", dtype, "--out", out]
        for row in ids.tolist():
            args += ["--ids", ",".join(str(i) for i in row)]
        sh(args)
        return load_file(out)


def parity(args):
    rows = []
    manifest = json.load(open(os.path.join(args.fixtures, "manifest.json")))
    for case in manifest["cases"]:
        d = os.path.join(args.fixtures, case["name"])
        ref = load_file(os.path.join(d, "reference.safetensors"))
        ids = ref["input_ids"]
        cpu = forward(args.deepscope, d, ids, "cpu", "f32")
        gpu = forward(args.deepscope, d, ids, "cuda", "f32")
        g16 = forward(args.deepscope, d, ids, "cuda", "bf16")
        diff_cpu = (gpu["logits"].double() - cpu["logits"].double()).abs().max().item()
        diff_ref = (gpu["logits"].double() - ref["logits"].double()).abs().max().item()
        topk = all(torch.equal(gpu[k], cpu[k]) for k in cpu if k.endswith("topk_indices"))
        topk16 = all(torch.equal(g16[k], cpu[k]) for k in cpu if k.endswith("topk_indices"))
        rows.append(dict(case=case["name"], f32_vs_cpu=diff_cpu, f32_vs_transformers=diff_ref,
                         f32_topk_same=topk, bf16_topk_same=topk16, ok=diff_cpu <= 1e-4 and diff_ref <= 1e-4 and topk))
    return rows


def roofline_bf16():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t)


def active_params(config_path):
    """Parameters a token touches (matmuls only), from config.json."""
    c = json.load(open(config_path))
    d, h = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q = h * qk * d if not c.get("q_lora_rank") else c["q_lora_rank"] * d + h * qk * c["q_lora_rank"]
    attn = q + (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * d + h * (c["qk_nope_head_dim"] + c["v_head_dim"]) * c["kv_lora_rank"] + d * h * c["v_head_dim"]
    n, dense_n = c["num_hidden_layers"], c.get("first_k_dense_replace", 0)
    mlp_dense = 3 * d * c["intermediate_size"]
    mlp_moe = 3 * d * c["moe_intermediate_size"] * (c["num_experts_per_tok"] + c.get("n_shared_experts", 0))
    return n * attn + dense_n * mlp_dense + (n - dense_n) * mlp_moe + c["vocab_size"] * d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deepscope", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="target/gpu-check")
    ap.add_argument("--skip-large", action="store_true", help="skip the 31 GB and 17 GB checkpoints")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    os.makedirs(args.work, exist_ok=True)
    report = dict(gpu=torch.cuda.get_device_name(0), date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    report["parity"] = parity(args)
    report["roofline_bf16_flops"] = roofline_bf16()
    bench_model = "target/bench/model"
    if os.path.isdir(bench_model):
        out = sh([args.deepscope, "bench", "--model", bench_model, "--device", "cuda", "--repeats", "5"]).stdout
        report["bench_cuda"] = json.loads(out.strip().splitlines()[-1])
    if not args.skip_large:
        v2 = os.path.join(args.work, "v2lite")
        sh([args.deepscope, "synth", "--like", "published:deepseek-v2-lite", "--out", v2, "--dtype", "bf16"])
        out = sh([args.deepscope, "bench-stream", "--model", v2, "--device", "cuda", "--dtype", "bf16",
                  "--memory-budget", "unlimited", "--prompt-len", "2048", "--decode", "32"]).stdout
        j = json.loads(out.strip().splitlines()[-1])
        flops = 2 * active_params(os.path.join(v2, "config.json")) * j["prefill_tokens"] / j["prefill_seconds"]
        j["prefill_flops"] = flops
        j["fraction_of_roofline"] = flops / report["roofline_bf16_flops"]
        report["v2lite_resident"] = j
        shutil.rmtree(v2, ignore_errors=True)
        v3 = os.path.join(args.work, "v3")
        sh([args.deepscope, "synth", "--like", "published:deepseek-v3", "--layers", "4", "--out", v3])
        out = sh([args.deepscope, "bench-stream", "--model", v3, "--device", "cuda", "--dtype", "bf16",
                  "--memory-budget", "8GiB", "--prompt-len", "32", "--decode", "16"]).stdout
        report["v3_offloaded"] = json.loads(out.strip().splitlines()[-1])
        env = dict(os.environ, DEEPSCOPE_REAL_CHECKPOINT=os.path.abspath(v3), DEEPSCOPE_REAL_DEVICE="cuda")
        nb = subprocess.run([sys.executable, "tests/run_notebooks.py", "notebooks/06-real-checkpoints.ipynb"], env=env,
                            capture_output=True, text=True)
        report["notebook_06_cuda"] = dict(returncode=nb.returncode, tail=(nb.stdout + nb.stderr)[-2000:])
        shutil.rmtree(v3, ignore_errors=True)
    print(json.dumps(report, indent=1))
    lines = [START, "## CUDA (`make gpu-check`)", "", "_Generated by `tests/gpu_check.py`; do not edit by hand._", "",
             f"- {report['date']}, {report['gpu']}; bf16 matmul roofline measured here: "
             f"{report['roofline_bf16_flops'] / 1e12:.0f} TFLOP/s", "",
             "| case | f32 GPU vs CPU | f32 GPU vs transformers | f32 top-k | bf16 top-k |", "| --- | ---: | ---: | --- | --- |"]
    for r in report["parity"]:
        lines.append(f"| {r['case']} | {r['f32_vs_cpu']:.2e} | {r['f32_vs_transformers']:.2e} | "
                     f"{'same' if r['f32_topk_same'] else '**differs**'} | {'same' if r['bf16_topk_same'] else 'differs'} |")
    lines += ["", "```json", json.dumps({k: v for k, v in report.items() if k != "parity"}, indent=1), "```", END, ""]
    write_section(args.out, "\n".join(lines), START, END)
    sys.exit(0 if all(r["ok"] for r in report["parity"]) else 1)


if __name__ == "__main__":
    main()
