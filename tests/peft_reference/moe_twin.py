"""A small mixture-of-experts language model written the way transformers 5.x writes them.

The routed experts are 3-D `nn.Parameter`s, as in transformers' `Qwen3MoeExperts`
(`models/qwen3_moe/modeling_qwen3_moe.py`) and `Llama4TextExperts`
(`models/llama4/modeling_llama4.py`), so PEFT can only reach them with
`LoraConfig(target_parameters=[...])`. Two layouts (`MoeTwinConfig.layout`):

- "fused" (Qwen3-MoE, Mixtral, DeepSeek in transformers 5): `gate_up_proj` [E, 2*ff, d],
  `down_proj` [E, d, ff]; each expert is an nn.Linear weight [out, in]:
  `gate, up = F.linear(x, gate_up_proj[e]).chunk(2, -1)`, `out = F.linear(h, down_proj[e])`.
- "fused_in_out" (Llama 4): `gate_up_proj` [E, d, 2*ff], `down_proj` [E, ff, d], [in, out]:
  `gate, up = (x @ gate_up_proj[e]).chunk(2, -1)`, `out = h @ down_proj[e]`. The module
  sets `is_transposed = True`, the attribute PEFT's ParamWrapper reads to tell the two apart.

Keys (E experts, L layers):
  model.embed_tokens.weight [V, d]
  model.layers.<i>.mix_norm.{weight,bias} [d]      LayerNorm, eps 1e-5
  model.layers.<i>.mix.{weight [d, d], bias [d]}   Linear on the causal running mean
  model.layers.<i>.moe_norm.{weight,bias} [d]      LayerNorm, eps 1e-5
  model.layers.<i>.mlp.router.weight [E, d]        Linear, no bias
  model.layers.<i>.mlp.experts.gate_up_proj        see above
  model.layers.<i>.mlp.experts.down_proj           see above
  model.norm.{weight,bias} [d]                     LayerNorm, eps 1e-5
  lm_head.weight [V, d]                            Linear, no bias

Forward (ids [B, T] -> logits [B, T, V]):
  h = embed_tokens[ids]
  per layer:
    a = mix_norm(h); m[:, t] = mean(a[:, :t+1]) (causal running mean); h = h + mix(m)
    x = moe_norm(h) as [B*T, d]
    p = softmax(router(x), -1) (fp32); w, idx = topk(p, top_k, -1) (torch.topk order);
    w = w / w.sum(-1, keepdim=True)
    y[n] = sum_k w[n, k] * expert_{idx[n, k]}(x[n]),  expert_e(x) = down_e(silu(gate_e(x)) * up_e(x))
    h = h + y as [B, T, d]
  logits = lm_head(norm(h))
"""
import torch
import torch.nn.functional as F
from torch import nn


class MoeTwinConfig:
    def __init__(self, vocab=37, d=16, ff=12, layers=2, experts=4, top_k=2, layout="fused"):
        if layout not in ("fused", "fused_in_out"):
            raise ValueError(f"layout must be 'fused' or 'fused_in_out', not {layout!r}")
        self.vocab, self.d, self.ff, self.layers = vocab, d, ff, layers
        self.experts, self.top_k, self.layout = experts, top_k, layout

    def to_dict(self):
        return dict(vocab=self.vocab, d=self.d, ff=self.ff, layers=self.layers, experts=self.experts,
                    top_k=self.top_k, layout=self.layout)


class MoeTwinExperts(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        e, d, ff = cfg.experts, cfg.d, cfg.ff
        self.num_experts = e
        self.is_transposed = cfg.layout == "fused_in_out"
        if self.is_transposed:
            self.gate_up_proj = nn.Parameter(torch.randn(e, d, 2 * ff) / d**0.5)
            self.down_proj = nn.Parameter(torch.randn(e, ff, d) / ff**0.5)
        else:
            self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * ff, d) / d**0.5)
            self.down_proj = nn.Parameter(torch.randn(e, d, ff) / ff**0.5)

    def expert(self, e, x):
        """Expert e on tokens x [n, d]."""
        if self.is_transposed:
            gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ self.down_proj[e]
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = self.expert(e, x[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y)
        return out


class MoeTwinSparseBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.d, cfg.experts, bias=False)
        self.experts = MoeTwinExperts(cfg)

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return self.experts(x, index, weights)


class MoeTwinLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mix_norm = nn.LayerNorm(cfg.d, eps=1e-5)
        self.mix = nn.Linear(cfg.d, cfg.d)
        self.moe_norm = nn.LayerNorm(cfg.d, eps=1e-5)
        self.mlp = MoeTwinSparseBlock(cfg)

    def forward(self, h):
        a = self.mix_norm(h)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)[None, :, None]
        h = h + self.mix(a.cumsum(dim=1) / steps)
        b, t, d = h.shape
        return h + self.mlp(self.moe_norm(h).reshape(b * t, d)).reshape(b, t, d)


class MoeTwinModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.d)
        self.layers = nn.ModuleList(MoeTwinLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d, eps=1e-5)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class MoeTwin(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = MoeTwinModel(cfg)
        self.lm_head = nn.Linear(cfg.d, cfg.vocab, bias=False)

    def forward(self, input_ids):
        return self.lm_head(self.model(input_ids))
