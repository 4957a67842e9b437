#!/usr/bin/env python3
"""Routing records of serving engines, written in the engines' own structures,
with the totals DeepScope's importers must reproduce.

Usage: python tests/gen_routing_records.py OUT_DIR [--tokens-per-record N --records N --ranks N --only per_token]

Writes OUT_DIR/ holding, for DeepSeek-V3's shape (61 decoder layers, the
first 3 dense, 256 routed experts, top-8, 8 groups) and 32 redundant experts
(288 physical experts, a different physical-to-logical map per layer):

  sglang_stat/        mode stat: expert_distribution_recorder_<t>.pt,
                      {rank, logical_count int32 [passes, 61, 256] (a ring
                      buffer with unused zero rows), average_utilization_rate_over_window}
  sglang_stat.json    the JSON form of a stat record (--init-expert-location reads it)
  sglang_per_pass/    mode per_pass: one file per rank, {records: [{forward_pass_id,
                      rank, gatherer_key, global_physical_count int32 [61, 288]}],
                      last_physical_to_logical_map int64 [61, 288]}
  sglang_per_token/   mode per_token: one file per rank, records with input_ids,
                      positions, extend_seq_lens, forward_mode, misc_objects and
                      topk_ids_of_layer int32 [61, tokens, 8] (physical ids; -1 in
                      dense layers and for padding tokens); rank 1 repeats one of
                      rank 0's records, as ranks under tensor parallelism do
  routed_experts.json / .jsonl / .b64: SGLang responses with
                      meta_info.routed_experts = base64 of int32 [tokens - 1, 61, 8]
                      (zeros in dense layers)
  vllm_state.pt / vllm_state.safetensors: EplbModelState fields
                      expert_load_window int32 [window, 58, 288] (the .pt) or
                      expert_load_pass [58, 288] (the safetensors) and
                      physical_to_logical_map int64 [58, 288]
  bad/                a truncated archive, an unknown pickle opcode, a dump of
                      another model's shape
  expected.json       what every importer must report: tokens, load per layer,
                      co-activation of layer 3, transitions 3-4, per-token counts

The structures follow SGLang's srt/eplb/expert_distribution.py and
srt/layers/moe/routed_experts_capturer.py, and vLLM's
distributed/eplb/eplb_state.py. Deterministic (fixed seed), CPU only.

With --sglang-wheel WHEEL (the Makefile downloads sglang's wheel without its
dependencies), expected.json also holds the EPLB plans SGLang's own copy of
DeepSeek's algorithm (sglang/srt/eplb/eplb_algorithms/deepseek.py, which needs
only torch) makes from the per-token loads: replica counts and per-GPU loads.
"""

import argparse
import base64
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file

LAYERS, FIRST_DENSE, EXPERTS, TOP_K, SLOTS = 61, 3, 256, 8, 8
REDUNDANT = 32
PHYSICAL = EXPERTS + REDUNDANT
MOE = list(range(FIRST_DENSE, LAYERS))
VOCAB = 129280


def physical_maps(rng):
    """[LAYERS, PHYSICAL]: every logical expert once plus 32 replicas of
    popular ones, shuffled per layer."""
    maps = []
    for _ in range(LAYERS):
        extra = rng.choice(EXPERTS, REDUNDANT, replace=False)
        row = np.concatenate([np.arange(EXPERTS), extra])
        rng.shuffle(row)
        maps.append(row)
    return np.stack(maps).astype(np.int64)


def popularity(rng):
    """Per MoE layer, skewed expert probabilities (some experts far busier)."""
    return {l: rng.dirichlet(np.full(EXPERTS, 0.6)) for l in MOE}


def choose(rng, pop, n):
    """Logical choices [LAYERS, n, SLOTS], -1 in dense layers."""
    out = np.full((LAYERS, n, SLOTS), -1, dtype=np.int64)
    for l in MOE:
        for t in range(n):
            out[l, t, :TOP_K] = rng.choice(EXPERTS, TOP_K, replace=False, p=pop[l])
    return out


def to_physical(rng, logical, pmap):
    """Each logical id to one of its physical replicas, at random."""
    phys = logical.copy()
    for l in MOE:
        slots = {e: np.nonzero(pmap[l] == e)[0] for e in range(EXPERTS)}
        for idx in np.ndindex(logical.shape[1:]):
            e = logical[(l,) + idx]
            if e >= 0:
                phys[(l,) + idx] = rng.choice(slots[e])
    return phys


class Totals:
    """What DeepScope must count: load, co-activation, transitions, tokens."""

    def __init__(self, coact_layer=3, pair=(3, 4)):
        self.tokens = 0
        self.load = {l: np.zeros(EXPERTS, dtype=np.int64) for l in MOE}
        self.coact_layer, self.pair = coact_layer, pair
        self.coact = np.zeros((EXPERTS, EXPERTS), dtype=np.int64)
        self.trans = np.zeros((EXPERTS, EXPERTS), dtype=np.int64)
        self.token_expert = {}

    def add(self, logical, ids=None):
        """logical [LAYERS, n, SLOTS]; padding rows are all -1."""
        n = logical.shape[1]
        self.tokens += int((logical[MOE[0]] >= 0).any(-1).sum())
        for l in MOE:
            for t in range(n):
                row = [int(x) for x in logical[l, t] if x >= 0]
                for x in row:
                    self.load[l][x] += 1
                    if l == self.coact_layer:
                        for y in row:
                            self.coact[x, y] += 1
                        if ids is not None:
                            self.token_expert.setdefault(int(ids[t]), np.zeros(EXPERTS, dtype=np.int64))[x] += 1
        a, b = self.pair
        for t in range(n):
            for x in logical[a, t]:
                for y in logical[b, t]:
                    if x >= 0 and y >= 0:
                        self.trans[x, y] += 1

    def add_load(self, logical_counts):
        """logical_counts [LAYERS, EXPERTS]."""
        for l in MOE:
            self.load[l] += logical_counts[l]
        self.tokens = int(self.load[MOE[0]].sum() // TOP_K)

    def json(self, per_token=True):
        d = {"tokens": self.tokens, "load": {str(l): self.load[l].tolist() for l in MOE}}
        if per_token:
            d["coactivation"] = {"layer": self.coact_layer, "counts": self.coact.flatten().tolist()}
            d["transitions"] = {"pair": f"{self.pair[0]}-{self.pair[1]}", "counts": self.trans.flatten().tolist()}
            d["token_expert"] = {str(k): v.tolist() for k, v in sorted(self.token_expert.items())}
        return d


# the deployments the EPLB test plans for: (gpus, nodes, groups, redundant)
EPLB_CASES = [(32, 4, 8, 32), (6, 3, 8, 8), (8, 1, 8, 0)]


def eplb_reference(wheel, load):
    """SGLang's EPLB on `load` {layer: [EXPERTS]} for every case in EPLB_CASES."""
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        path = z.extract("sglang/srt/eplb/eplb_algorithms/deepseek.py", tmp)
        spec = importlib.util.spec_from_file_location("sglang_eplb_deepseek", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    weight = torch.tensor(np.stack([load[l] for l in MOE]))
    out = []
    for gpus, nodes, groups, redundant in EPLB_CASES:
        phy2log, _, logcnt = mod.rebalance_experts(weight, EXPERTS + redundant, groups, nodes, gpus,
                                                   enable_hierarchical=groups % nodes == 0)
        per_gpu = (EXPERTS + redundant) // gpus
        w = weight.double()
        gpu_load = []
        for i in range(len(MOE)):
            share = w[i] / logcnt[i].double()
            gpu_load.append([float(share[phy2log[i, g * per_gpu:(g + 1) * per_gpu]].sum()) for g in range(gpus)])
        out.append({"gpus": gpus, "nodes": nodes, "groups": groups, "redundant": redundant,
                    "count": logcnt.tolist(), "gpu_load": gpu_load})
    return out


def save_per_token(out, rng, pmap, pop, ranks, records, tokens_per_record, totals):
    os.makedirs(out, exist_ok=True)
    first_of_rank0 = None
    for rank in range(ranks):
        recs = []
        for i in range(records):
            n = tokens_per_record + rank  # ranks see different token counts (data parallel)
            ids = rng.integers(0, VOCAB, n)
            logical = choose(rng, pop, n)
            if i == 0:
                logical[:, -2:, :] = -1  # two padding tokens (the router sets their ids to -1)
            totals.add(logical, ids)
            phys = to_physical(rng, logical, pmap)
            rec = {
                "forward_pass_id": i,
                "rank": rank,
                "gatherer_key": "primary",
                "input_ids": ids.tolist(),
                "positions": list(range(n)),
                "extend_seq_lens": [n],
                "forward_mode": 1,
                "topk_ids_of_layer": torch.from_numpy(phys).to(torch.int32),
                "misc_objects": [],
                # SGLang's per-token gatherer also keeps the pass's physical counts
                "global_physical_count": torch.from_numpy(
                    np.stack([np.bincount(phys[l][phys[l] >= 0], minlength=PHYSICAL) for l in range(LAYERS)])).to(torch.int32),
            }
            recs.append(rec)
            if rank == 0 and i == 1:
                first_of_rank0 = rec
        if rank == 1 and first_of_rank0 is not None:
            # tensor parallelism: this rank recorded rank 0's pass 1 as well
            recs.append(dict(first_of_rank0, rank=1))
        torch.save({"records": recs, "last_physical_to_logical_map": torch.from_numpy(pmap)},
                   os.path.join(out, f"expert_distribution_recorder_1700000000.0_{rank}.pt"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens-per-record", type=int, default=24)
    ap.add_argument("--records", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--only", choices=["per_token"], help="write only the per-token dump (benchmarks)")
    ap.add_argument("--sglang-wheel", help="sglang's wheel: add the plans of its EPLB to expected.json")
    a = ap.parse_args()
    rng = np.random.default_rng(20261130)
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    pmap = physical_maps(rng)
    pop = popularity(rng)
    expected = {"shape": {"layers": LAYERS, "first_dense": FIRST_DENSE, "experts": EXPERTS, "top_k": TOP_K,
                          "physical": PHYSICAL}}

    # per_token, several ranks, one duplicate record
    t = Totals()
    save_per_token(os.path.join(a.out, "sglang_per_token"), rng, pmap, pop, a.ranks, a.records,
                   a.tokens_per_record, t)
    expected["sglang_per_token"] = t.json()
    if a.sglang_wheel:
        expected["eplb"] = eplb_reference(a.sglang_wheel, t.load)
    if a.only:
        json.dump(expected, open(os.path.join(a.out, "expected.json"), "w"))
        return

    # per_pass: physical counts per pass and rank
    os.makedirs(os.path.join(a.out, "sglang_per_pass"))
    t = Totals()
    for rank in range(2):
        recs = []
        for i in range(4):
            logical = choose(rng, pop, 16)
            phys = to_physical(rng, logical, pmap)
            count = np.zeros((LAYERS, PHYSICAL), dtype=np.int64)
            for l in range(LAYERS):
                ids = phys[l][phys[l] >= 0]
                count[l] += np.bincount(ids, minlength=PHYSICAL)
            logical_count = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
            for l in range(LAYERS):
                np.add.at(logical_count[l], pmap[l], count[l])
            t.add_load(logical_count)
            recs.append({"forward_pass_id": i, "rank": rank, "gatherer_key": "primary",
                         "global_physical_count": torch.from_numpy(count).to(torch.int32)})
        torch.save({"records": recs, "last_physical_to_logical_map": torch.from_numpy(pmap)},
                   os.path.join(a.out, "sglang_per_pass", f"expert_distribution_recorder_1700000001.0_{rank}.pt"))
    expected["sglang_per_pass"] = t.json(per_token=False)

    # stat: a ring buffer of 8 rows, 5 used, in two dumps
    os.makedirs(os.path.join(a.out, "sglang_stat"))
    t = Totals()
    for d in range(2):
        ring = torch.zeros(8, LAYERS, EXPERTS, dtype=torch.int32)
        for row in range(5):
            logical = choose(rng, pop, 12)
            for l in MOE:
                ring[row, l] += torch.from_numpy(np.bincount(logical[l][logical[l] >= 0], minlength=EXPERTS)).to(torch.int32)
        t.add_load(ring.sum(0).numpy().astype(np.int64))
        torch.save({"rank": 0, "logical_count": ring, "average_utilization_rate_over_window": 0.61 if d == 0 else None},
                   os.path.join(a.out, "sglang_stat", f"expert_distribution_recorder_170000000{2 + d}.0.pt"))
    expected["sglang_stat"] = t.json(per_token=False)
    # the JSON form SGLang's --init-expert-location reads: {"logical_count": [passes][layers][experts]}
    t = Totals()
    t.add_load(ring.sum(0).numpy().astype(np.int64))
    json.dump({"logical_count": ring.tolist()}, open(os.path.join(a.out, "sglang_stat.json"), "w"))
    expected["sglang_stat.json"] = t.json(per_token=False)

    # routed experts of three requests (no redundant experts: ids are logical)
    t = Totals()
    responses = []
    for r in range(3):
        prompt, output = rng.integers(0, VOCAB, 7 + r).tolist(), rng.integers(0, VOCAB, 4).tolist()
        n = len(prompt) + len(output) - 1
        logical = choose(rng, pop, n)
        t.add(logical, np.array(prompt + output)[:n])
        arr = np.transpose(logical, (1, 0, 2))[:, :, :TOP_K].copy()  # [tokens, layers, top-k]
        arr[arr < 0] = 0  # dense layers are zeros in SGLang's capture
        b64 = base64.b64encode(arr.astype(np.int32).tobytes()).decode()
        responses.append({"text": "", "input_ids": prompt, "output_ids": output,
                          "meta_info": {"id": f"req{r}", "prompt_tokens": len(prompt), "completion_tokens": len(output),
                                        "routed_experts": b64}})
    json.dump(responses, open(os.path.join(a.out, "routed_experts.json"), "w"))
    with open(os.path.join(a.out, "routed_experts.jsonl"), "w") as f:
        for x in responses:
            f.write(json.dumps(x) + "\n")
    with open(os.path.join(a.out, "routed_experts.b64"), "w") as f:
        for x in responses:
            f.write(x["meta_info"]["routed_experts"] + "\n")
    expected["routed_experts"] = t.json()

    # vLLM: MoE layers only
    moe_map = pmap[FIRST_DENSE:]
    window = torch.from_numpy(rng.integers(0, 50, (4, len(MOE), PHYSICAL))).to(torch.int32)
    t = Totals()
    logical_count = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
    summed = window.sum(0).numpy().astype(np.int64)
    for i, l in enumerate(MOE):
        np.add.at(logical_count[l], moe_map[i], summed[i])
    t.add_load(logical_count)
    torch.save({"expert_load_window": window, "physical_to_logical_map": torch.from_numpy(moe_map)},
               os.path.join(a.out, "vllm_state.pt"))
    expected["vllm_state.pt"] = t.json(per_token=False)
    one = window[0].contiguous()
    t = Totals()
    logical_count = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
    for i, l in enumerate(MOE):
        np.add.at(logical_count[l], moe_map[i], one.numpy()[i].astype(np.int64))
    t.add_load(logical_count)
    save_file({"expert_load_pass": one, "physical_to_logical_map": torch.from_numpy(moe_map.copy())},
              os.path.join(a.out, "vllm_state.safetensors"))
    expected["vllm_state.safetensors"] = t.json(per_token=False)

    # bad input
    bad = os.path.join(a.out, "bad")
    os.makedirs(bad)
    src = os.path.join(a.out, "sglang_per_token", "expert_distribution_recorder_1700000000.0_0.pt")
    data = open(src, "rb").read()
    open(os.path.join(bad, "truncated.pt"), "wb").write(data[: len(data) * 6 // 10])
    with zipfile.ZipFile(os.path.join(bad, "opcode.pt"), "w") as z:
        z.writestr("opcode/data.pkl", b"\x80\x02}q\x00\xff.")
        z.writestr("opcode/version", "3\n")
    torch.save({"rank": 0, "logical_count": torch.zeros(2, 27, 64, dtype=torch.int32)},
               os.path.join(bad, "v2_lite_shaped_stat.pt"))
    dense = torch.zeros(1, LAYERS, EXPERTS, dtype=torch.int32)
    dense[0, 0, 5] = 3  # counts in layer 0, which is dense in V3
    torch.save({"rank": 0, "logical_count": dense}, os.path.join(bad, "dense_layer_counts.pt"))

    json.dump(expected, open(os.path.join(a.out, "expected.json"), "w"))


if __name__ == "__main__":
    main()
