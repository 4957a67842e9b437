#!/usr/bin/env python3
"""Write the demo checkpoint used by `make lab` until the trained default model lands.

It is the benchmark's DeepSeek-V3-shaped model (random weights, written by
transformers in the Hugging Face layout), so the demo exercises the real loader
and model on a real checkpoint layout; its text output is meaningless.

Usage: python tests/make_demo_model.py OUT_DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_transformers import build_model  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build_model(sys.argv[1])
    print(f"demo checkpoint written to {sys.argv[1]}")
