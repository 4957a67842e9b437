# DeepScope: every target sets itself up from a fresh clone.
#   make lab     the main job: build, install the kernel, open JupyterLab on notebooks/
#   make test    everything CI checks
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(CURDIR)/$(VENV)/bin/python
STAMP     := $(VENV)/.deps-stamp
FIXTURES  := target/fixtures
BIN       := target/release/deepscope

# torch-sys finds libtorch through the venv's PyPI torch: `python` on PATH
# with VIRTUAL_ENV set. Everything cargo runs below sees these.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export LIBTORCH_USE_PYTORCH := 1

.PHONY: help setup build kernel soak bench-kernel bench-scale bench-real bench-import bench-profile gpu-check test fixtures records corpus browser bench lab demo notebooks train-tiny gallery clean

help:
	@echo "make lab    build DeepScope, install its Jupyter kernel, open JupyterLab on notebooks/ (main job)"
	@echo "make notebooks  re-run every notebook and store its outputs"
	@echo "make demo   the command-line demo on the shipped model"
	@echo "make test   set up, build, generate reference fixtures, run all tests"
	@echo "make bench  benchmark against transformers (writes docs/benchmarks.md)"
	@echo "make soak   soak and fault tests of the kernel (~25 min; figures into docs/benchmarks.md)"
	@echo "make bench-real   prefill at real dimensions (V2-Lite shapes, 2 layers, fp32 and bf16) vs transformers and the matmul limit (~10 min)"
	@echo "make bench-scale  streaming at real dimensions under an 8 GiB budget (~50 GB of disk, about an hour)"
	@echo "make gpu-check  the CUDA checks (a machine with an NVIDIA GPU; never part of make test)"
	@echo "make setup  create .venv with torch==2.13.0 and the Python dev deps"
	@echo "make build  release build of the library and the deepscope CLI"
	@echo "make gallery  every chart type as SVG/PNG in target/gallery"

# --- setup: the venv is created once and refreshed when requirements change
setup: $(STAMP)
$(STAMP): requirements-dev.txt
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first"; exit 1; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

build: setup
	cargo build --release

# --- reference fixtures: tiny random checkpoints + transformers outputs
fixtures: $(FIXTURES)/manifest.json $(FIXTURES)/records/expected.json
$(FIXTURES)/manifest.json: tests/gen_fixtures.py $(STAMP)
	$(PY) tests/gen_fixtures.py $(FIXTURES)
# routing records of SGLang and vLLM in the engines' structures (a few MB)
# EPLB's reference is SGLang's copy of DeepSeek's algorithm, taken from its
# wheel (downloaded once, without dependencies; the file needs only torch)
SGLANG_WHEELS := $(VENV)/wheels/sglang
$(SGLANG_WHEELS)/.done: $(STAMP)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps sglang==0.5.23 -d $(SGLANG_WHEELS)
	@touch $@
$(FIXTURES)/records/expected.json: tests/gen_routing_records.py $(SGLANG_WHEELS)/.done
	$(PY) tests/gen_routing_records.py $(FIXTURES)/records --sglang-wheel $$(ls $(SGLANG_WHEELS)/sglang-*.whl | head -1)

# --- a synthetic SGLang / vLLM routing record of DeepSeek-V3's shape, for
# notebook 06 (seconds; random skewed loads, not a real model's routing)
RECORDS := target/records
records: $(RECORDS)/expected.json
$(RECORDS)/expected.json: tests/gen_routing_records.py $(STAMP)
	$(PY) tests/gen_routing_records.py $(RECORDS)

# --- the training corpus: public-domain texts from Debian packages
CORPUS_PKGS := bible-kjv fortunes jargon-text
corpus:
	@missing=$$(for p in $(CORPUS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing the corpus packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# --- the Jupyter kernel: kernelspec into the venv, and the library built once
# into the kernel's evcxr cache (~3 min cold, seconds when warm), so the first
# cell of a notebook does not wait for it.
kernel: build
	$(BIN) install --sys-prefix
	$(BIN) kernel --prebuild

# --- Debian's chromium for the browser test (Playwright drives it; no downloads)
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing chromium for the browser test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

# Both suites always run, so one report shows every failure; the target fails
# if either did.
test: build fixtures records corpus kernel browser
	@status=0; \
	DEEPSCOPE_FIXTURES=$(CURDIR)/$(FIXTURES) cargo test --release --no-fail-fast || { status=1; echo "make test: Rust tests FAILED (the Python tests run anyway)"; }; \
	$(PY) -m pytest -q -p no:cacheprovider tests/python || { status=1; echo "make test: Python tests FAILED"; }; \
	exit $$status

# soak and fault tests of the kernel (~25 min): 2,000 mixed cells, malformed
# frames on every channel, processes killed mid-cell; figures into docs/benchmarks.md
SOAK_CELLS ?= 2000
soak: kernel
	DEEPSCOPE_SOAK=1 DEEPSCOPE_SOAK_CELLS=$(SOAK_CELLS) DEEPSCOPE_SOAK_REPORT=$(CURDIR)/docs/benchmarks.md \
		$(PY) -m pytest -q -p no:cacheprovider -s tests/python/test_kernel_soak.py

bench: build
	$(PY) tests/bench_transformers.py --deepscope $(BIN) --out docs/benchmarks.md

# real-scale streaming: random checkpoints of the published shapes (V3 cut to 4
# layers, 17 GB FP8; V2-Lite, 31 GB bf16), written one at a time and deleted
BENCH_BUDGET ?= 8GiB
bench-scale: build
	$(PY) tests/bench_scale.py --deepscope $(BIN) --out docs/benchmarks.md --budget $(BENCH_BUDGET) $(BENCH_SCALE_ARGS)

# where a 4 x 256 prefill's time goes, block by block, in DeepScope and in
# transformers (the bench model; hooks on both sides); table into docs/benchmarks.md
bench-profile: build
	$(PY) tests/profile_prefill.py --deepscope $(BIN) --out docs/benchmarks.md --threads 2

# prefill at real dimensions: V2-Lite shapes cut to 2 layers (4 GiB, written by
# `deepscope synth` and deleted after), fp32 and bf16, DeepScope vs transformers
# against the matmul rate measured in the same run; into docs/benchmarks.md
BENCH_REAL_RUNS ?= 3
bench-real: build
	$(PY) tests/bench_real.py --deepscope $(BIN) --out docs/benchmarks.md --runs $(BENCH_REAL_RUNS)

# importing an SGLang per_token record of a million tokens (~2 GB, written
# with torch.save in the same run): throughput against reading the bytes, and
# peak memory; figures into docs/benchmarks.md
BENCH_IMPORT_TOKENS ?= 1000000
bench-import: build
	$(PY) tests/bench_import.py --deepscope $(BIN) --out docs/benchmarks.md --tokens $(BENCH_IMPORT_TOKENS)

# the CUDA checks: parity on the GPU, the model benchmark, V2-Lite resident in
# bf16 against the matmul roofline, V3 with experts offloaded to the host
gpu-check: build fixtures
	$(PY) tests/gpu_check.py --deepscope $(BIN) --fixtures $(FIXTURES) --out docs/benchmarks.md

# kernel timings; EVCXR_JUPYTER=/path/to/evcxr_jupyter adds the anchor beside them
bench-kernel: kernel
	$(PY) tests/bench_kernel.py --deepscope $(BIN) --out docs/benchmarks.md --cold --levers $(if $(EVCXR_JUPYTER),--evcxr-jupyter $(EVCXR_JUPYTER))

# --- the command-line demo on the shipped default model
DEFAULT_MODEL := models/deepscope-tiny
demo: build
	$(BIN) info --model $(DEFAULT_MODEL)
	$(BIN) generate --model $(DEFAULT_MODEL) --device auto --prompt "And the LORD said unto Moses," -n 40 --seed 1 --temperature 0.8 --top-p 0.95
	$(BIN) generate --model $(DEFAULT_MODEL) --device auto --prompt "Murphy's Law:" -n 40 --seed 1 --temperature 0.8 --top-p 0.95

# --- the main job: JupyterLab on the notebooks, with the DeepScope kernel
LAB_PORT ?= 8888
lab: kernel corpus records
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(LAB_PORT) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# --- re-run every notebook through the kernel and keep the outputs
notebooks: kernel corpus records
	$(PY) notebooks/make_notebooks.py
	$(PY) tests/run_notebooks.py --write notebooks/0*.ipynb

# --- the shipped default model (about an hour on 2 CPU cores; see its README)
train-tiny: build corpus
	mkdir -p target/train-tiny
	set -o pipefail; $(BIN) train --out target/train-tiny --steps 3000 --device cpu --threads 2 2>&1 | tee target/train-tiny/train_output.txt
	rm -rf models/deepscope-tiny && mkdir -p models
	cp -r target/train-tiny/model models/deepscope-tiny
	cp target/train-tiny/train_log.csv target/train-tiny/eval_log.csv target/train-tiny/train_output.txt models/deepscope-tiny/
	$(PY) tests/model_card.py models/deepscope-tiny

# --- every chart type as SVG and PNG, for visual review (index.html shows them all)
gallery: setup
	cargo run --release --example gallery -- target/gallery

clean:
	cargo clean
	rm -rf $(VENV)
