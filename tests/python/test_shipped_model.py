"""The shipped default model (models/deepscope-tiny) as transformers sees it:
it loads with AutoModelForCausalLM, and its logits equal DeepScope's."""
import os
import subprocess
import tempfile

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "deepscope-tiny")
BIN = os.path.join(ROOT, "target", "release", "deepscope")


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()


def deepscope_logits(ids: list[list[int]]) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.safetensors")
        args = [BIN, "forward", "--model", MODEL, "--out", out, "--device", "cpu"]
        for row in ids:
            args += ["--ids", ",".join(map(str, row))]
        subprocess.run(args, check=True, capture_output=True)
        return load_file(out)["logits"]


def test_transformers_gives_the_same_logits_as_deepscope(hf_model):
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(MODEL, "tokenizer.json"))
    texts = ["In the beginning God created the heaven and the earth.",
             "A hacker is a person who enjoys exploring the details of programmable systems."]
    enc = [tok(t)["input_ids"][:12] for t in texts]
    assert all(len(e) == 12 for e in enc)
    with torch.no_grad():
        ref = hf_model(torch.tensor(enc)).logits
    ours = deepscope_logits(enc)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_tokenizer_json_encodes_as_deepscope_expects():
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(MODEL, "tokenizer.json"))
    ids = tok("And God said")["input_ids"]
    assert ids[0] == 0, "encoding starts with <|bos|>"
    assert tok.decode(ids, skip_special_tokens=True) == "And God said"
