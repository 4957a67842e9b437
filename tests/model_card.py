#!/usr/bin/env python3
"""Write README.md (the model card) of a model trained by `deepscope train`.

Every figure comes from files the run wrote (eval_report.json, config.json,
train_log.csv, train_output.txt) or from running the DeepScope CLI on the
shipped model (`deepscope info`, `deepscope generate`); nothing is typed in.

Usage: python tests/model_card.py MODEL_DIR [--deepscope target/release/deepscope]
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_transformers import cpu_model  # noqa: E402


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def corpus_table(model_dir: str) -> str:
    """The corpus summary lines `deepscope train` printed (train_output.txt)."""
    path = os.path.join(model_dir, "train_output.txt")
    rows = []
    if os.path.exists(path):
        for line in open(path):
            m = re.match(r"\s+(bible|fortunes|jargon)\s+(train|held-out)\s+(\d+) docs\s+(\d+) bytes", line)
            if m:
                rows.append(f"| {m[1]} | {m[2]} | {int(m[3]):,} | {int(m[4]):,} |")
    if not rows:
        return "(train_output.txt not found: corpus sizes unavailable)"
    return "| domain | split | documents | bytes |\n|---|---|---:|---:|\n" + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--deepscope", default="target/release/deepscope")
    a = ap.parse_args()
    d = a.model_dir
    rep = json.load(open(os.path.join(d, "eval_report.json")))
    cfg = json.load(open(os.path.join(d, "config.json")))
    log = list(csv.DictReader(open(os.path.join(d, "train_log.csv"))))
    info = run([a.deepscope, "info", "--model", d])
    prompts = {
        "Bible": "And the LORD said unto Moses,",
        "Fortune": "Murphy's Law:",
        "Fortune (2)": "You will",
        "Jargon": "A hacker is",
    }
    samples = []
    for name, prompt in prompts.items():
        out = run([a.deepscope, "generate", "--model", d, "--device", "cpu", "--prompt", prompt,
                   "-n", "48", "--seed", "1", "--temperature", "0.8", "--top-p", "0.95"])
        samples.append(f"**{name}** (`--prompt {json.dumps(prompt)} -n 48 --seed 1 --temperature 0.8 --top-p 0.95`):\n\n> "
                       + out.strip().replace("\n", "\n> "))

    per = rep["per_domain"]
    loss_rows = "\n".join(
        f"| {dom} | {v['bits_per_byte']:.3f} | {v['loss_nats_per_token']:.3f} | {v['tokens']:,} | {v['bytes']:,} |"
        for dom, v in per.items())
    bal = rep["load_max_over_mean"]
    mix = rep.get("load_max_over_mean_training_mix", {})
    by_dom = rep.get("load_max_over_mean_by_domain", {})
    doms = sorted(by_dom)
    bal_rows = "\n".join(
        f"| {layer} | {v:.2f} | {mix.get(layer, float('nan')):.2f} | "
        + " | ".join(f"{by_dom[d][layer]:.2f}" for d in doms) + " |"
        for layer, v in bal.items())
    share = rep.get("train_domain_share", {})
    share_text = ", ".join(f"{d} {100 * share[d]:.0f}%" for d in sorted(share))
    held_tokens = sum(v["tokens"] for v in rep["per_domain"].values())
    held_text = ", ".join(f"{d} {100 * v['tokens'] / held_tokens:.0f}%" for d, v in sorted(rep["per_domain"].items()))
    jsd = rep["domain_jsd_bits"]
    pairs = sorted({p for v in jsd.values() for p in v})
    jsd_rows = "\n".join(f"| {layer} | " + " | ".join(f"{v[p]:.3f}" for p in pairs) + " |" for layer, v in jsd.items())
    best_layer, best = max(((l, max(v.values())) for l, v in jsd.items()), key=lambda x: x[1])
    alpha = rep["settings"].get("seq_balance_alpha", 0.0)
    seq_text = (f"Plus DeepSeek-V3's sequence-wise balance loss with alpha = {alpha}." if alpha > 0 else
                "No sequence-wise balance loss (`--seq-balance-alpha`, off by default): the bias alone balances the load.")
    last = log[-1]
    hours = rep["train_seconds"] / 3600
    rev = per["bible"]["bits_per_byte"]
    uni = rep["revelation_unigram_bits_per_byte"]

    card = f"""# deepscope-tiny

A DeepSeek-V3-shaped model in miniature, trained from scratch by DeepScope's own
code (`deepscope train`) on three public-domain / freely redistributable text
collections, so that DeepScope works offline with a model whose experts have
actually specialised. It is a teaching and research toy: {per['bible']['bits_per_byte']:.2f} bits per
byte on held-out Revelation, not a language model to rely on.

Stored in the Hugging Face layout (`config.json` with `model_type: deepseek_v3`,
`model.safetensors` in bf16 with the router bias in f32, `tokenizer.json`,
`generation_config.json`): `transformers` loads it too, and a test checks that
it gives the same logits as DeepScope.

## Architecture

```
{info.rstrip()}
```

MLA with q and kv compression and decoupled (interleaved) RoPE; layer 0 is a
dense SwiGLU MLP, layers 1-{cfg['num_hidden_layers'] - 1} are DeepSeekMoE blocks with
{cfg['n_shared_experts']} shared + {cfg['n_routed_experts']} routed experts, top-{cfg['num_experts_per_tok']}, sigmoid router
with {cfg['n_group']} groups (top {cfg['topk_group']}), `norm_topk_prob`, and DeepSeek-V3's
auxiliary-loss-free balancing (after each step `b_i += gamma * sign(mean_load - load_i)`,
gamma = {rep['settings']['bias_update_rate']}). {seq_text}

## Corpus and licences

| domain | Debian package | licence |
|---|---|---|
| King James Bible | `bible-kjv` (`bible -f gen1:1-rev22:21`) | public domain (the KJV text; Debian packages it as free) |
| fortune cookies | `fortunes` (`/usr/share/games/fortunes`, non-offensive files) | BSD-licensed fortune-mod data, redistributable (see `/usr/share/doc/fortunes/copyright`) |
| Jargon File 4.4.x | `jargon-text` (`jargon.txt.gz`) | public domain ("to be freely used, shared, and modified") |

Split (deterministic, `src/train/corpus.rs`): the whole Book of Revelation is
held out; of the fortunes (in sorted file order) and of the Jargon File's ~1 KB
paragraph groups, every 67th is held out: the rate at which Revelation is held
out of the Bible (62 KB of 4.14 MB), so every domain is held out at the same rate
and the held-out split mixes the domains as the training split does. Bible verse
references are stripped; one document per chapter.

{corpus_table(d)}

Tokenizer: byte-level BPE trained with the `tokenizers` crate on the training
split, {cfg['vocab_size']} entries, special tokens `<|bos|>` (0), `<|eos|>` (1), `<|pad|>` (2);
encoding prepends `<|bos|>`.

## Training

- Command: `{rep['command']}` (or `make train-tiny`, which also copies the result here and writes this card).
- {rep['steps']} steps of {rep['settings']['batch_size']} x {rep['settings']['seq_len']} tokens, AdamW (lr {rep['settings']['lr']}, betas {rep['settings']['beta1']}/{rep['settings']['beta2']},
  weight decay {rep['settings']['weight_decay']}), {rep['settings']['warmup_steps']} warmup steps then cosine decay to lr/10,
  gradient clipping at {rep['settings']['grad_clip']}, seed {rep['settings']['seed']}.
- Time: {hours:.2f} h on {rep['device']} with {rep['threads']} threads ({cpu_model()}, {os.cpu_count()} cores).
- Final training loss {float(last['loss']):.3f} nats/token; the loss and balance curves are in
  `train_log.csv` and the periodic held-out figures in `eval_log.csv`.

## Held-out results (measured on the shipped bf16 weights)

| domain | bits per byte | loss (nats/token) | tokens | bytes |
|---|---:|---:|---:|---:|
{loss_rows}

Revelation: **{rev:.3f} bits per byte**, against **{uni:.3f}** for a unigram model over
the same tokenizer (token frequencies of the training split, add-one smoothed).

### Expert load balance (max / mean expert load on the held-out split)

| MoE layer | held-out as is | held-out, domains mixed as in training | {' | '.join(doms)} |
|---|---:|---:|{'---:|' * len(doms)}
{bal_rows}

The bias update balances the load of the *training* mixture ({share_text} of the
training tokens); the held-out split mixes the domains in about the same proportions
({held_text} of its tokens), so "as is" tests the balancing on unseen text of the
distribution it was tuned on, and the reweighted column removes what difference in
mix remains. Within a single domain the load is uneven by design: the experts have
specialised by domain (measured below), so text from one domain alone leans on that
domain's experts.

### Domain specialisation

Jensen-Shannon divergence (bits, 0 = identical, 1 = disjoint) between the
per-domain distributions of expert choices on the held-out split:

| MoE layer | {' | '.join(pairs)} |
|---|{'---:|' * len(pairs)}
{jsd_rows}

The largest divergence is {best:.3f} bits, in layer {best_layer}.

## Samples

{chr(10).join(s + chr(10) for s in samples)}
"""
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write(card)
    print(f"wrote {os.path.join(d, 'README.md')}")


if __name__ == "__main__":
    main()
