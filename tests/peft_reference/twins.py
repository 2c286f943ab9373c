"""PyTorch twins of the C++ models the reference checks use, module for module.

`Toy` is tests/toy_model.h (the toy transformer of tests/fixtures/hf_peft/toy,
whose README gives its forward); `Gpt` is examples/trainer/gpt.h. Module names
and parameter keys are the C++ ones, so a checkpoint or adapter written by either
side loads into the other unchanged.
"""
import math

import torch
from torch import nn


class ToyAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        t = h.shape[1]
        scores = q @ k.transpose(-2, -1) / math.sqrt(h.shape[-1])
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return self.o_proj(scores.softmax(-1) @ v)


class ToyMlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class ToyLayer(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.norm, self.attention, self.mlp = nn.LayerNorm(d, eps=1e-5), ToyAttention(d), ToyMlp(d, f)

    def forward(self, x):
        x = x + self.attention(self.norm(x))
        return x + self.mlp(x)


class Toy(nn.Module):
    """The toy transformer; sizes as tests/toy_model.h's ToyConfig."""

    def __init__(self, vocab=37, d=16, f=40, n_layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyLayer(d, f) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class GptAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        dh = d // self.n_heads

        def heads(y):
            return y.view(b, t, self.n_heads, dh).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(dh)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class GptMlp(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class GptBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attention = GptAttention(d_model, n_heads)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = GptMlp(d_model, d_ff)

    def forward(self, x):
        x = x + self.attention(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Gpt(nn.Module):
    """examples/trainer/gpt.h; sizes as its GptConfig."""

    def __init__(self, vocab, context, d_model, n_layers, n_heads, d_ff):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d_model)
        self.embed_positions = nn.Embedding(context, d_model)
        self.layers = nn.ModuleList(GptBlock(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids) + self.embed_positions(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))
