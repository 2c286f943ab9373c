#!/usr/bin/env python3
"""Loads adapters saved by d9d-peft with Hugging Face PEFT and compares logits.

For a machine with PyTorch, safetensors and peft (the GPU machine has them).
First export from C++ (the test writes the adapters it saves and the logits
the C++ model computed with them):

    D9D_HF_EXPORT_DIR=/tmp/d9d-export ./build/tests/d9d_peft_tests \
        --gtest_filter='HfAdapter.ExportsAdaptersForPythonCheck'
    python3 tests/hf_peft_check.py /tmp/d9d-export

Each exported adapter directory holds adapter_config.json,
adapter_model.safetensors (written by d9d::peft::hf::save_adapter) and
cpp_logits.safetensors. The toy model is rebuilt here from the fixture
README's forward, its base weights loaded from the fixture, the adapter
loaded with PeftModel.from_pretrained, and the logits compared (1e-5).
Exit status 0 when every adapter matches.
"""
import math
import pathlib
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_peft" / "toy"


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        t = h.shape[1]
        scores = q @ k.transpose(-2, -1) / math.sqrt(h.shape[-1])
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return self.o_proj(scores.softmax(-1) @ v)


class Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.norm, self.attention, self.mlp = nn.LayerNorm(d, eps=1e-5), Attention(d), Mlp(d, f)

    def forward(self, x):
        x = x + self.attention(self.norm(x))
        return x + self.mlp(x)


class Toy(nn.Module):
    def __init__(self, vocab=37, d=16, f=40, n_layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, f) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def main(export_dir: str) -> int:
    ids = load_file(str(FIXTURES / "inputs.safetensors"))["input_ids"]
    failures = 0
    dirs = sorted(p for p in pathlib.Path(export_dir).iterdir() if (p / "adapter_config.json").exists())
    if not dirs:
        print(f"no adapter directories under {export_dir}", file=sys.stderr)
        return 1
    for adapter in dirs:
        base = Toy()
        base.load_state_dict(load_file(str(FIXTURES / "model.safetensors")))
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        with torch.no_grad():
            logits = model(ids)
        expected = load_file(str(adapter / "cpp_logits.safetensors"))["logits"]
        diff = (logits - expected).abs().max().item()
        ok = diff <= 1e-5
        failures += not ok
        print(f"{adapter.name:28s} max |peft - d9d| = {diff:.2e}  {'ok' if ok else 'MISMATCH'}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
