#!/usr/bin/env python3
"""Importing a large SGLang per-token record: throughput and peak memory.

Usage: python tests/bench_import.py --deepscope target/release/deepscope
           --out docs/benchmarks.md [--tokens 1000000] [--work target/bench-import] [--keep]

Writes one SGLang `per_token` dump of DeepSeek-V3's shape with `--tokens`
tokens (records of 4096 tokens, as forward passes; topk_ids_of_layer int32
[61, tokens, 8] is about 2 GB per million tokens) with torch.save, then in
the same run measures:

  * the limit: reading the file's bytes (`cat > /dev/null`, page cache warm,
    so this is memory bandwidth; the import is timed warm too);
  * the anchor: `torch.load` of the same file in Python (deserialising only,
    no statistics);
  * `deepscope import sglang` on it: wall time, throughput, and peak RSS
    (ru_maxrss of the child), which must stay far below the file's size.

The result replaces the bench:import section of --out. The work folder is
deleted afterwards unless --keep.
"""
import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_transformers import write_section  # noqa: E402

START = "<!-- bench:import:start -->"
END = "<!-- bench:import:end -->"
LAYERS, FIRST_DENSE, EXPERTS, TOP_K, SLOTS, REDUNDANT = 61, 3, 256, 8, 8, 32
PHYSICAL = EXPERTS + REDUNDANT
PASS = 4096


def write_dump(path, tokens, seed=0):
    """A per_token dump: records of PASS tokens, physical ids, skewed routing."""
    g = torch.Generator().manual_seed(seed)
    maps, replicas = [], []
    for _ in range(LAYERS):
        extra = torch.randperm(EXPERTS, generator=g)[:REDUNDANT]
        row = torch.cat([torch.arange(EXPERTS), extra])[torch.randperm(PHYSICAL, generator=g)]
        maps.append(row)
        # replicas of each logical expert: [EXPERTS, 2] slots (the second = the first when single)
        slots = [torch.nonzero(row == e).flatten() for e in range(EXPERTS)]
        replicas.append(torch.stack([torch.stack([s[0], s[-1]]) for s in slots]))
    pmap = torch.stack(maps)
    popularity = torch.distributions.Dirichlet(torch.full((EXPERTS,), 0.6)).sample((LAYERS,)).log()
    def draw(n):
        ids = torch.full((LAYERS, n, SLOTS), -1, dtype=torch.int32)
        for l in range(FIRST_DENSE, LAYERS):
            # Gumbel top-k: k distinct experts drawn by popularity
            gumbel = -torch.log(-torch.log(torch.rand(n, EXPERTS, generator=g).clamp_min(1e-12)))
            logical = (popularity[l] + gumbel).topk(TOP_K, dim=-1).indices
            pick = (torch.rand(n, TOP_K, generator=g) < 0.5).long()
            ids[l, :, :TOP_K] = replicas[l][logical, pick].to(torch.int32)
        count = torch.stack([torch.bincount(ids[l][ids[l] >= 0].long(), minlength=PHYSICAL) for l in range(LAYERS)])
        return ids, count.to(torch.int32)

    # eight passes drawn, the rest their tokens shuffled (each record its own
    # storage, as in a real dump): drawing every pass would take minutes
    pool = {}
    records, done, i = [], 0, 0
    while done < tokens:
        n = min(PASS, tokens - done)
        key = (i % 8, n)
        if key not in pool:
            pool[key] = draw(n)
        base, count = pool[key]
        ids = base[:, torch.randperm(n, generator=g), :].contiguous()
        records.append({"forward_pass_id": i, "rank": 0, "gatherer_key": "primary",
                        "input_ids": torch.randint(0, 129280, (n,), generator=g).tolist(),
                        "positions": list(range(n)), "extend_seq_lens": [n], "forward_mode": 1,
                        "topk_ids_of_layer": ids, "misc_objects": [],
                        "global_physical_count": count.clone()})
        done += n
        i += 1
    torch.save({"records": records, "last_physical_to_logical_map": pmap}, path)
    return len(records)


def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return took, r.stdout


def timed_with_peak(cmd):
    """Wall time, stdout and peak RSS of `cmd`, sampled every 5 ms (ru_maxrss
    of children would count the pages this Python process shares at fork)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.005)
    out, err = p.communicate()
    took = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    return took, out, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deepscope", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--work", default="target/bench-import")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    dump = os.path.join(a.work, f"expert_distribution_recorder_bench_{a.tokens}_0.pt")
    t = time.perf_counter()
    records = write_dump(dump, a.tokens)
    write_s = time.perf_counter() - t
    size = os.path.getsize(dump)
    print(f"wrote {dump}: {records} records, {size / 2**30:.2f} GiB in {write_s:.0f} s", flush=True)

    timed(["sh", "-c", f"cat '{dump}' > /dev/null"])  # warm the page cache for every reader alike
    cat_s, _ = timed(["sh", "-c", f"cat '{dump}' > /dev/null"])
    t = time.perf_counter()
    torch.load(dump, weights_only=True)
    load_s = time.perf_counter() - t
    # the process's own size (libtorch mapped in): a record of 64 tokens
    small = os.path.join(a.work, "expert_distribution_recorder_bench_64_0.pt")
    write_dump(small, 64, seed=1)
    _, _, base_rss = timed_with_peak([a.deepscope, "import", "sglang", small, "--config", "published:deepseek-v3"])
    runs, peak_rss = [], 0
    for _ in range(3):
        took, out, peak = timed_with_peak([a.deepscope, "import", "sglang", dump, "--config", "published:deepseek-v3"])
        runs.append(took)
        peak_rss = max(peak_rss, peak)
    best = min(runs)
    print(out.splitlines()[0])
    gib = size / 2**30
    lines = [
        START, "## Importing routing records (CPU)", "",
        f"`make bench-import`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; the file written by torch.save in the same run.", "",
        f"One SGLang `per_token` dump of DeepSeek-V3's shape: {a.tokens:,} tokens in {records} records "
        f"(forward passes of {PASS} tokens), 61 layers x 8 slots of int32, 32 redundant experts; "
        f"{gib:.2f} GiB. `deepscope import sglang` counts load, co-activation (E x E per layer) and "
        "layer-to-layer transitions for every token, reading each record in chunks of 8192 tokens across its layers and counting the layers on all cores.", "",
        "| reader | seconds | GiB/s | vs reading the bytes |",
        "|---|---:|---:|---:|",
        f"| `cat > /dev/null` (page cache warm: the limit) | {cat_s:.2f} | {gib / cat_s:.2f} | 1.00 |",
        f"| `torch.load` in Python (deserialise only, no statistics) | {load_s:.2f} | {gib / load_s:.2f} | {cat_s / load_s:.2f} |",
        f"| `deepscope import sglang` (best of {len(runs)}) | {best:.2f} | {gib / best:.2f} | {cat_s / best:.2f} |",
        "",
        f"- Runs: {', '.join(f'{r:.2f}' for r in runs)} s. Tokens per second: {a.tokens / best:,.0f}.",
        f"- Peak RSS of the import (max over the runs, sampled every 5 ms): {peak_rss / 2**20:.0f} MiB; "
        f"importing a 64-token record peaks at {base_rss / 2**20:.0f} MiB (the process with libtorch mapped), "
        f"so the record adds {max(peak_rss - base_rss, 0) / 2**20:.0f} MiB, {100 * max(peak_rss - base_rss, 0) / size:.1f}% "
        "of the file's size: it is streamed, not loaded. What grows is the statistics: two 256 x 256 "
        "count matrices per layer (co-activation, transitions), about 60 MiB for 58 layers.",
        f"- Reproduce: `make bench-import` (`BENCH_IMPORT_TOKENS={a.tokens}`; needs ~{max(gib, 0.1):.1f} GiB of free disk "
        "and as much memory for torch.save while writing).",
        END,
    ]
    write_section(a.out, "\n".join(lines) + "\n", START, END)
    print("\n".join(lines))
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
