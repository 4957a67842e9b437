#!/usr/bin/env python3
"""Benchmark the DeepScope Jupyter kernel through a real jupyter_client.

    python tests/bench_kernel.py --deepscope target/release/deepscope --out docs/benchmarks.md [--cold]
        [--evcxr-jupyter PATH]

Measures, each in the same run:
  start (warm cache): kernel process start -> kernel_info reply, and -> first
                      `1 + 1` result;
  trivial cell:       median round trip of `1 + 1` (execute_request -> reply), 20 cells;
  trace cell:         median of `let t = model.trace(PROMPT)?; t` (5 cells) after
                      `let model = Model::load_default()?;`;
  --cold:             start -> first result with an empty build cache (a fresh
                      DEEPSCOPE_CACHE_DIR): the library and tch built inside evcxr;
  --levers:           the trivial and trace cells again under each combination of
                      the two levers the kernel sets (src/kernel/exec.rs): how cells
                      link the library (DEEPSCOPE_CELL_LINKING=dylib|static) and the
                      opt-level of the cells' own code (DEEPSCOPE_CELL_OPT_LEVEL=0|2);
                      static + 2 is evcxr's way, the kernel's before the change.
With --evcxr-jupyter (an installed `evcxr_jupyter` binary) the same figures
are taken for it, with the ratio beside ours. To compare like with like, its
session first adds the DeepScope library the way a user would
(`:dep deepscope = { path = ..., default-features = false }` and
`use deepscope::prelude::*;`), with a persistent EVCXR_TMPDIR warmed by one
untimed session; "first result" for it includes those two cells.
Replaces the section between the bench:kernel markers of --out.
"""
import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from jupyter_client import KernelManager

START = "<!-- bench:kernel:start -->"
END = "<!-- bench:kernel:end -->"
PROMPT = "And God said, Let there be light: and there was light."


def install(binary, args, name, prefix):
    if name == "deepscope":
        # without DEEPSCOPE_CACHE_DIR, so the kernel.json does not pin the build cache: each
        # kernel takes it from the environment measure() gives it (the cold run's is empty)
        env = {k: v for k, v in os.environ.items() if k != "DEEPSCOPE_CACHE_DIR"}
        subprocess.run([binary, "install", "--prefix", prefix], check=True, capture_output=True, env=env)
    else:
        d = os.path.join(prefix, "share", "jupyter", "kernels", name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "kernel.json"), "w") as f:
            json.dump({"argv": [binary, "--control_file", "{connection_file}"], "display_name": name,
                       "language": "rust", "interrupt_mode": "message"}, f)


def timed_execute(kc, code, timeout=1200):
    t = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda m: None)
    took = time.perf_counter() - t
    assert reply["content"]["status"] == "ok", (code, reply["content"])
    return took


def measure(name, env_extra=None, trace=True, setup=()):
    saved = dict(os.environ)
    os.environ.update(env_extra or {})
    try:
        t0 = time.perf_counter()
        km = KernelManager(kernel_name=name)
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        ready = time.perf_counter() - t0
        for code in setup:
            timed_execute(kc, code)
        timed_execute(kc, "1 + 1")
        first = time.perf_counter() - t0
        trivial = statistics.median(timed_execute(kc, "1 + 1") for _ in range(20))
        out = {"ready_s": ready, "first_result_s": first, "trivial_s": trivial}
        if trace:
            timed_execute(kc, "let model = Model::load_default()?;")
            out["trace_s"] = statistics.median(timed_execute(kc, f'let t = model.trace("{PROMPT}")?; t') for _ in range(5))
        kc.stop_channels()
        km.shutdown_kernel(now=False)
        return out
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deepscope", required=True)
    ap.add_argument("--out")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--evcxr-jupyter")
    ap.add_argument("--levers", action="store_true")
    a = ap.parse_args()
    prefix = tempfile.mkdtemp()
    install(os.path.abspath(a.deepscope), [], "deepscope", prefix)
    if a.evcxr_jupyter:
        install(os.path.abspath(a.evcxr_jupyter), [], "evcxr_bench", prefix)
    os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")

    ours = measure("deepscope")
    cold = measure("deepscope", {"DEEPSCOPE_CACHE_DIR": tempfile.mkdtemp()}, trace=False) if a.cold else None
    levers = []
    if a.levers:
        for linking, opt in (("static", "2"), ("static", "0"), ("dylib", "2"), ("dylib", "0")):
            got = measure("deepscope", {"DEEPSCOPE_CELL_LINKING": linking, "DEEPSCOPE_CELL_OPT_LEVEL": opt})
            levers.append((linking, opt, got))
    anchor = None
    if a.evcxr_jupyter:
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        setup = [f':dep deepscope = {{ path = "{src}", default-features = false }}', "use deepscope::prelude::*;"]
        import sysconfig
        # evcxr_jupyter's runner is not linked against libtorch: the loader must find it.
        torch_lib = os.path.join(sysconfig.get_paths()["purelib"], "torch", "lib")
        tmp = {"EVCXR_TMPDIR": os.path.join(tempfile.gettempdir(), "deepscope-bench-evcxr-jupyter"),
               "LD_LIBRARY_PATH": os.pathsep.join(p for p in (torch_lib, os.environ.get("LD_LIBRARY_PATH")) if p),
               "LIBTORCH_USE_PYTORCH": "1"}
        measure("evcxr_bench", tmp, trace=False, setup=setup)  # warm its build directory
        anchor = measure("evcxr_bench", tmp, trace=True, setup=setup)

    def row(label, key, src, ref=None):
        v = src[key]
        r = f"{ref[key]:.2f} s" if ref else "n/a"
        ratio = f"{ref[key] / v:.2f}x" if ref else "n/a"
        return f"| {label} | {v:.2f} s | {r} | {ratio} |"

    lines = [START, "## Jupyter kernel", "",
             f"`python tests/bench_kernel.py` on {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores; "
             "jupyter_client, one kernel at a time. Ratio = evcxr_jupyter time / DeepScope time (above 1: DeepScope faster).", "",
             "evcxr_jupyter gets the DeepScope library the way a user would give it (`:dep deepscope = { path = ..., "
             "default-features = false }` + `use deepscope::prelude::*;`, counted in its first result), so both kernels "
             "link the same library into every cell; its build directory was warmed by one untimed session.", "",
             "| measurement | DeepScope | evcxr_jupyter | ratio |", "|---|---:|---:|---:|",
             row("start -> kernel_info reply (warm cache)", "ready_s", ours, anchor),
             row("start -> first `1 + 1` result (warm cache)", "first_result_s", ours, anchor),
             row("trivial cell round trip (median of 20)", "trivial_s", ours, anchor),
             row("`model.trace(...)` cell, tiny model (median of 5)", "trace_s", ours, anchor)]
    if cold:
        lines.append(f"| start -> first result, cold cache (library + tch built in evcxr) | {cold['first_result_s']:.1f} s | n/a | n/a |")
    if not a.evcxr_jupyter:
        lines += ["", "evcxr_jupyter was not measured in this run (pass `--evcxr-jupyter PATH`)."]
    if levers:
        base = levers[0][2]
        lines += ["", "Levers, measured in the same run (one kernel each, warm cache; speed-up = the first row's time / "
                  "this row's). `static` + opt-level 2 is how cells were linked and optimised before; the patched evcxr's "
                  "other changes (one compile per cell, the cell's rustc run without cargo, rust-analyzer only for cells "
                  "that define variables: patches/evcxr/PATCH.md) apply to every row.", "",
                  "| cells link the library | cells' opt-level | trivial cell | speed-up | `model.trace` cell | speed-up |",
                  "|---|---:|---:|---:|---:|---:|"]
        for linking, opt, got in levers:
            lines.append(f"| {linking} | {opt} | {got['trivial_s']:.2f} s | {base['trivial_s'] / got['trivial_s']:.2f}x "
                         f"| {got['trace_s']:.2f} s | {base['trace_s'] / got['trace_s']:.2f}x |")
    lines += [END]
    section = "\n".join(lines)
    print(section)
    if a.out:
        text = open(a.out).read() if os.path.exists(a.out) else "# Benchmarks\n"
        if START in text:
            text = text[:text.index(START)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        open(a.out, "w").write(text)


if __name__ == "__main__":
    main()
