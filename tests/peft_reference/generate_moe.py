#!/usr/bin/env python3
"""PEFT LoRA with target_parameters on 3-D expert parameters: reference cases, and a proof of the format spec.

For every combination of --experts, --r, --top-k, --rslora and --layout (the
default grid is E in {4, 8}, r in {2, 4}, top_k in {1, 2}, rsLoRA off/on, both
layouts: 32 cases), builds the MoE twin (moe_twin.py) from a seed, applies
PEFT's LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"], init_lora_weights=False, so lora_B is not zero; every
second case also a rank_pattern and an alpha_pattern for layer 1's down_proj)
and writes OUT/<case>/:

  config.json            the twin's sizes and layout, the case seed, PEFT's config
  model.safetensors      the base weights (the twin's state_dict)
  inputs.safetensors     input_ids [2, 7]
  adapter/               PEFT's save_pretrained
  expected.safetensors   logits (adapter active, unmerged), merged_logits (after
                         merge_and_unload) and merged.<key> for every base weight

Before writing, it checks moe_target_parameters.md against PEFT: the deltas
rebuilt from the saved lora_A / lora_B with the spec's formula equal PEFT's
get_delta_weight and merged weights, one expert's output computed in the
grouped form (x @ W + s * (x @ A_g) @ B_g, gate and up split) equals PEFT's
forward of that expert, and the twin with the spec-merged weights gives PEFT's
logits. A mismatch fails the script. The spec checks run on a float64 copy of
PEFT's model, to 1e-6; the float32 outputs written agree with them to 1e-5, and
PEFT's merged float32 weights with the spec's to 1e-6.
"""
import argparse
import copy
import itertools
import json
import math
import os
import pathlib
import random
import shutil
import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from moe_twin import MoeTwin, MoeTwinConfig  # noqa: E402

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# PEFT nests one ParamWrapper per targeted parameter of a module, the first
# registered innermost: gate_up_proj is registered first, so its adapter sits
# under `experts.base_layer.` and down_proj's under `experts.`.
INFIX = {"gate_up_proj": "base_layer.", "down_proj": ""}
TOL = dict(atol=1e-6, rtol=1e-6)


def close(what, got, want, tol=TOL):
    try:
        torch.testing.assert_close(got, want, **tol)
    except AssertionError as e:
        raise SystemExit(f"generate_moe: spec check failed: {what}: {e}")


def spec_factors(adapter, key_prefix, num_experts):
    """Per expert (A_e [r, in], B_e [out, r]) from the file, as the spec says: A's rows in blocks
    of r per expert (expert-major), B's columns interleaved (column j * E + e is expert e's j-th)."""
    a, b = adapter[key_prefix + "lora_A.weight"], adapter[key_prefix + "lora_B.weight"]
    r = a.shape[0] // num_experts
    assert a.shape[0] == r * num_experts and b.shape[1] == r * num_experts, (a.shape, b.shape)
    return [(a[e * r:(e + 1) * r, :], b[:, e::num_experts]) for e in range(num_experts)], r


def spec_delta(factors, scale, transposed):
    """delta[e] = scale * B_e @ A_e ([out, in]); a parameter stored [E, in, out] gets its transpose."""
    deltas = [scale * (b @ a) for a, b in factors]
    return torch.stack([d.T if transposed else d for d in deltas])


def make_case(out_dir, seed, experts, r, top_k, rslora, layout, with_patterns):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cfg = MoeTwinConfig(vocab=37, d=16, ff=12, layers=2, experts=experts, top_k=top_k, layout=layout)
    base = MoeTwin(cfg).eval()
    base_state = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    alpha = rng.choice([1, 4, 8, 16])
    rank_pattern, alpha_pattern = {}, {}
    if with_patterns:  # keyed by the full parameter name (PEFT matches it as a suffix pattern)
        rank_pattern = {"model.layers.1.mlp.experts.down_proj": 2 * r}
        alpha_pattern = {"model.layers.1.mlp.experts.down_proj": alpha + 3}
    lora = LoraConfig(r=r, lora_alpha=alpha, target_parameters=list(TARGETS), use_rslora=rslora,
                      init_lora_weights=False, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model = MoeTwin(cfg).eval()
    model.load_state_dict(base_state)
    peft_model = get_peft_model(model, lora).eval()
    ids = torch.randint(0, cfg.vocab, (2, 7), generator=torch.Generator().manual_seed(seed))

    case = out_dir / f"moe_{layout}_e{experts}_r{r}_k{top_k}_{'rs' if rslora else 'std'}_{seed}"
    case.mkdir(parents=True)
    with torch.no_grad():
        logits = peft_model(ids).detach().clone()
    peft_model.save_pretrained(str(case / "adapter"))
    adapter = load_file(str(case / "adapter" / "adapter_model.safetensors"))
    # The spec is checked in float64, where rounding (~1e-15) cannot hide a wrong
    # formula and cannot fail a right one; PEFT computes in the dtype of the parameter.
    peft64 = copy.deepcopy(peft_model).double()
    adapter64 = {k: v.double() for k, v in adapter.items()}
    base64 = {k: v.double() for k, v in base_state.items()}
    saved_config = json.loads((case / "adapter" / "adapter_config.json").read_text())

    # --- the spec, checked against PEFT ---
    expected_keys = set()
    spec_merged = dict(base64)
    grouped = {}  # (layer, param) -> per-expert (A_g [in, r], B_g [r, out]) and scale
    for i in range(cfg.layers):
        wrapper_prefix = f"model.layers.{i}.mlp.experts."
        for param in ("gate_up_proj", "down_proj"):
            key_prefix = f"base_model.model.{wrapper_prefix}{INFIX[param]}"
            expected_keys |= {key_prefix + "lora_A.weight", key_prefix + "lora_B.weight"}
            name = wrapper_prefix + param
            rank = rank_pattern.get(name, r)
            a_alpha = alpha_pattern.get(name, alpha)
            scale = a_alpha / math.sqrt(rank) if rslora else a_alpha / rank
            w = base64[name]
            transposed = layout == "fused_in_out"
            n_in, n_out = (w.shape[1], w.shape[2]) if transposed else (w.shape[2], w.shape[1])
            a, b = adapter[key_prefix + "lora_A.weight"], adapter[key_prefix + "lora_B.weight"]
            if list(a.shape) != [rank * experts, n_in] or list(b.shape) != [n_out, rank * experts]:
                raise SystemExit(f"generate_moe: spec check failed: {key_prefix}: lora_A {list(a.shape)}, lora_B "
                                 f"{list(b.shape)}, expected [{rank}*{experts}, {n_in}] and [{n_out}, {rank}*{experts}]")
            factors, got_rank = spec_factors(adapter64, key_prefix, experts)
            assert got_rank == rank
            delta = spec_delta(factors, scale, transposed)
            spec_merged[name] = w + delta
            grouped[(i, param)] = ([(a_e.T, b_e.T) for a_e, b_e in factors], scale)
            # PEFT's own delta for this parameter.
            layer = peft64.base_model.model.model.layers[i].mlp.experts
            wrapper = layer if param == "down_proj" else layer.base_layer
            assert wrapper.parameter_name == param, (wrapper.parameter_name, param)
            close(f"{name}: delta", delta, wrapper.get_delta_weight("default").detach())
    if set(adapter) != expected_keys:
        raise SystemExit(f"generate_moe: spec check failed: adapter keys {sorted(adapter)} != {sorted(expected_keys)}")

    # One expert's output in the grouped form, against PEFT's forward of that expert.
    x = torch.randn(5, cfg.d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    experts_module = peft64.base_model.model.model.layers[0].mlp.experts
    base_experts = copy.deepcopy(base).double().model.layers[0].mlp.experts
    ff = cfg.ff
    for e in range(experts):
        with torch.no_grad():
            peft_out = experts_module(x, torch.full((5, 1), e), torch.ones(5, 1, dtype=torch.float64))
        gu_factors, gu_scale = grouped[(0, "gate_up_proj")]
        dn_factors, dn_scale = grouped[(0, "down_proj")]
        a_g, b_g = gu_factors[e]  # [d, r], [r, 2*ff]
        w_gu = base_experts.gate_up_proj[e].detach()
        w_gu = w_gu if layout == "fused_in_out" else w_gu.T  # as [in, out]
        w_dn = base_experts.down_proj[e].detach()
        w_dn = w_dn if layout == "fused_in_out" else w_dn.T
        # gate and up as two grouped linears sharing A: B's first ff columns (of B_g) are gate's.
        gate = x @ w_gu[:, :ff] + gu_scale * (x @ a_g) @ b_g[:, :ff]
        up = x @ w_gu[:, ff:] + gu_scale * (x @ a_g) @ b_g[:, ff:]
        h = torch.nn.functional.silu(gate) * up
        a_d, b_d = dn_factors[e]
        hand = h @ w_dn + dn_scale * (h @ a_d) @ b_d
        close(f"layer 0 expert {e}: output", hand, peft_out)

    # The twin with the spec-merged weights computes PEFT's logits.
    hand_model = MoeTwin(cfg).double().eval()
    hand_model.load_state_dict(spec_merged)
    with torch.no_grad():
        close("logits of the spec-merged twin (float64)", hand_model(ids), peft64(ids))
        close("logits of the spec-merged twin (float32)", hand_model.float()(ids), logits, dict(atol=1e-5, rtol=1e-5))

    merged_model = peft_model.merge_and_unload().eval()
    merged_state = {k: v.detach().clone().contiguous() for k, v in merged_model.state_dict().items()}
    if set(merged_state) != set(base_state):
        raise SystemExit(f"generate_moe: merged keys differ from the base keys: {sorted(merged_state)}")
    for key, value in merged_state.items():
        if key in spec_merged and "experts" not in key:
            if not torch.equal(value, base_state[key]):
                raise SystemExit(f"generate_moe: merge changed an untargeted weight {key}")
        close(f"merged {key}", value, spec_merged[key].float())
    with torch.no_grad():
        merged_logits = merged_model(ids).detach().clone()
    close("merged logits vs unmerged", merged_logits, logits, dict(atol=1e-5, rtol=1e-5))

    save_file(base_state, str(case / "model.safetensors"))
    save_file({"input_ids": ids}, str(case / "inputs.safetensors"))
    expected = {"logits": logits, "merged_logits": merged_logits}
    expected.update({f"merged.{k}": v for k, v in merged_state.items()})
    save_file(expected, str(case / "expected.safetensors"))
    (case / "config.json").write_text(json.dumps({
        "seed": seed, "twin": cfg.to_dict(), "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "target_parameters": TARGETS,
        "adapter_config": saved_config}, indent=2, sort_keys=True) + "\n")
    return case


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory for the cases (emptied first)")
    parser.add_argument("--seed", type=int, help="first case's seed (default: $D9D_PEFT_SEED, else drawn fresh)")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--r", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rslora", choices=["off", "on", "both"], default="both")
    parser.add_argument("--layout", choices=["fused", "fused_in_out", "both"], default="both")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(os.environ.get("D9D_PEFT_SEED", random.randrange(2**31)))
    print(f"generate_moe: seed {seed}", flush=True)
    rslora = {"off": [False], "on": [True], "both": [False, True]}[args.rslora]
    layouts = ["fused", "fused_in_out"] if args.layout == "both" else [args.layout]
    warnings.filterwarnings("ignore")
    shutil.rmtree(args.out, ignore_errors=True)
    grid = list(itertools.product(layouts, args.experts, args.r, args.top_k, rslora))
    for i, (layout, experts, r, top_k, rs) in enumerate(grid):
        case = make_case(args.out, seed + i, experts, r, top_k, rs, layout, with_patterns=i % 2 == 1)
        print(f"generate_moe: {case.name}: spec checks passed", flush=True)
    print(f"generate_moe: {len(grid)} cases in {args.out}")


if __name__ == "__main__":
    main()
