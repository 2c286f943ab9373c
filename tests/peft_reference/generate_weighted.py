#!/usr/bin/env python3
"""PEFT -> d9d-peft, differential: adapters combined by real PEFT's add_weighted_adapter.

Makes COUNT cases from SEED (case i uses seed SEED + i and combination type
TYPES[i % 11], so every type is drawn COUNT / 11 times; --types narrows the
cycle, e.g. to reproduce one failed case). Each case draws a toy
transformer (twins.py: Toy), two or three LoRA adapters a0, a1, a2 (random r
and lora_alpha, rsLoRA, embeddings, target lists or regexes that overlap only
in part, rank_pattern for the types that allow differing ranks,
init_lora_weights=False) and add_weighted_adapter's arguments (random weights,
some negative; density; majority_sign_method; svd_rank, svd_clamp,
svd_full_matrices), lets PEFT combine them into adapter "w" and writes, under
OUT/case_<seed>/:

  config.json              sizes, the adapters' configs, the call's arguments
  model.safetensors        the base weights
  inputs.safetensors       input_ids
  adapters/a0, a1, ..., w  PEFT's save_pretrained of each adapter
  adapters/w_unclamped     with svd_clamp only: the same call without the clamp
  spectra.safetensors      *_svd types only: per module path, the singular values of
                           the delta PEFT decomposed (before truncating to svd_rank)
  expected.safetensors     logits with "w" active

DARE draws its masks with torch.bernoulli from the default generator, after
PEFT has drawn the new adapter's initial weights from it too. To make the draws
repeatable elsewhere, torch.bernoulli is given a generator seeded with the case
seed for the call (PEFT's code is otherwise run as is): the draws are those of
torch.bernoulli on a fresh torch.Generator().manual_seed(seed), in PEFT's order.

OUT/rng_check.safetensors holds Bernoulli masks drawn from such generators, so
the C++ side can tell whether its LibTorch draws the same ones.
"""
import argparse
import json
import os
import pathlib
import random
import shutil
import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from twins import Toy  # noqa: E402

TYPES = ["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
         "magnitude_prune", "magnitude_prune_svd"]
ONE_RANK = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
POOL = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def draw_case(seed, combination_type):
    rng = random.Random(seed)
    sizes = {"vocab": rng.randint(9, 41), "d": rng.choice([8, 12, 16, 24]), "f": rng.randint(8, 40),
             "n_layers": rng.randint(1, 2)}
    n = rng.randint(2, 3)
    regex = rng.random() < 0.25
    embeddings = rng.random() < 0.4
    common_r = rng.randint(1, 8)
    configs = []
    for i in range(n):
        r = common_r if combination_type in ONE_RANK else rng.randint(1, 8)
        pool = POOL + (["embed_tokens", "lm_head"] if embeddings else [])
        picked = sorted(rng.sample(pool, rng.randint(1, 4)))
        if regex:
            targets = "|".join(rf".*\.{p}" if p in POOL else p for p in picked)
        else:
            targets = picked
        config = {"r": r, "lora_alpha": rng.choice([r, 2 * r, rng.randint(1, 32), round(rng.uniform(0.5, 20.0), 3)]),
                  "lora_dropout": 0.0, "target_modules": targets,
                  "use_rslora": rng.random() < (0.2 if i == 0 else 0.4), "init_lora_weights": False,
                  "rank_pattern": {}}
        # A rank_pattern key names a module this adapter targets, and leaves
        # some targeted layer at r: PEFT takes the new adapter's rank from the
        # config (max(r, *rank_pattern.values())), the model from the layers,
        # and under rsLoRA the combined scale depends on it (docs/combining-adapters.md).
        keys = [k for k in ("q_proj", "up_proj") if k in picked and len(picked) > 1]
        keys += ["layers.0.attention.v_proj"] if "v_proj" in picked else []
        if combination_type not in ONE_RANK and keys and rng.random() < 0.25:
            config["rank_pattern"] = {rng.choice(keys): rng.randint(1, 8)}
        configs.append(config)
    call = {"adapters": [f"a{i}" for i in range(n)],
            "weights": [round(rng.uniform(-1.0, 1.5), 3) for _ in range(n)],
            "combination_type": combination_type}
    if combination_type not in ("cat", "linear", "svd"):
        call["density"] = rng.choice([round(rng.uniform(0.1, 0.95), 3), round(rng.uniform(0.1, 0.95), 3), 1.0])
    if "ties" in combination_type:
        call["majority_sign_method"] = rng.choice(["total", "frequency"])
    if combination_type.endswith("svd"):
        if rng.random() < 0.3:
            # The clamp's quantile runs over every entry of the factors, so it is defined only where they
            # are: a rank above a layer's delta's rank takes arbitrary null-space vectors (LAPACK's choice).
            # Within the smallest input rank every layer's delta has full rank.
            # rank_pattern counts: a layer at a lower rank than its config's r (CI seed 910648678).
            call["svd_rank"] = rng.randint(1, min(min([c["r"], *c["rank_pattern"].values()]) for c in configs))
            call["svd_clamp"] = round(rng.uniform(0.9, 0.999), 3)
        elif rng.random() < 0.5:
            call["svd_rank"] = rng.randint(1, 8)
        call["svd_full_matrices"] = rng.random() < 0.5
    return sizes, configs, call, (rng.randint(1, 3), rng.randint(2, 9))


def record_spectra(model):
    """Has `model`'s add_weighted_adapter keep, per module path, every singular value of the delta its
    *_svd types decompose (PEFT truncates them after torch.linalg.svd): the gap at the truncation tells
    the C++ check how far another LAPACK may move the truncated delta. Returns the dict it fills."""
    lora_model = model.base_model
    names = {id(m): n for n, m in lora_model.model.named_modules()}
    inner = lora_model._svd_generalized_task_arithmetic_weighted_adapter
    spectra = {}

    def wrapped(combination_type, adapters, weights, new_rank, target, *args, **kwargs):
        svd = torch.linalg.svd
        seen = []

        def recording_svd(*a, **k):
            out = svd(*a, **k)
            seen.append(out[1].detach().clone())
            return out

        torch.linalg.svd = recording_svd
        try:
            result = inner(combination_type, adapters, weights, new_rank, target, *args, **kwargs)
        finally:
            torch.linalg.svd = svd
        spectra[names[id(target)]] = seen[-1]
        return result

    lora_model._svd_generalized_task_arithmetic_weighted_adapter = wrapped
    return spectra


def make_case(seed, combination_type, out_dir):
    sizes, configs, call, (batch, time) = draw_case(seed, combination_type)
    torch.manual_seed(seed)
    base = Toy(**sizes)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    base_state = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
    ids = torch.randint(0, sizes["vocab"], (batch, time))
    try:
        model = get_peft_model(base, LoraConfig(**configs[0]), adapter_name="a0").eval()
        for i, c in enumerate(configs[1:], start=1):
            model.add_adapter(f"a{i}", LoraConfig(**c))
    except ValueError:
        return None  # a target that matches nothing: draw another case
    saved = call["adapters"] + ["w"]
    spectra = record_spectra(model) if combination_type.endswith("svd") else {}
    bernoulli = torch.bernoulli
    generator = torch.Generator().manual_seed(seed)
    torch.bernoulli = lambda p, *args, **kwargs: bernoulli(p, generator=generator)
    try:
        kwargs = {k: v for k, v in call.items() if k not in ("adapters", "weights")}
        model.add_weighted_adapter(call["adapters"], call["weights"], "w", **kwargs)
        if "svd_clamp" in call:
            # The same SVD without the clamp: its factors are in the basis PEFT's LAPACK chose, which the
            # C++ check aligns with before clamping (the matrix fixes them only up to signs and subspaces).
            generator.manual_seed(seed)
            kwargs["svd_clamp"] = None
            model.add_weighted_adapter(call["adapters"], call["weights"], "w_unclamped", **kwargs)
            saved.append("w_unclamped")
    except (ValueError, RuntimeError) as e:  # e.g. a rank larger than a layer: PEFT refuses too
        print(f"peft-reference: case {seed} ({combination_type}): PEFT refused ({e}); drawing another", flush=True)
        return None
    finally:
        torch.bernoulli = bernoulli
    model.set_adapter("w")
    with torch.no_grad():
        logits = model(ids)
    case = out_dir / f"case_{seed}"
    case.mkdir(parents=True)
    model.save_pretrained(str(case / "adapters"), selected_adapters=saved)
    save_file(base_state, str(case / "model.safetensors"))
    save_file({"input_ids": ids}, str(case / "inputs.safetensors"))
    save_file({"logits": logits}, str(case / "expected.safetensors"))
    if spectra:
        save_file(spectra, str(case / "spectra.safetensors"))
    (case / "config.json").write_text(json.dumps({"seed": seed, "sizes": sizes, "adapters": configs, "call": call},
                                                 indent=1))
    return case


def rng_check(out_dir, seed):
    masks = {}
    for i, (shape, density) in enumerate([((7, 13), 0.3), ((64, 256), 0.77), ((4, 5, 6), 0.5)]):
        generator = torch.Generator().manual_seed(seed + i)
        masks[f"mask_{i}"] = torch.bernoulli(torch.full(shape, density), generator=generator)
    save_file(masks, str(out_dir / "rng_check.safetensors"),
              metadata={"seed": str(seed), "shapes": "[[7,13],[64,256],[4,5,6]]", "densities": "[0.3,0.77,0.5]"})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory for the cases (emptied first)")
    parser.add_argument("--seed", type=int, help="first case's seed (default: $D9D_PEFT_SEED, else drawn fresh)")
    parser.add_argument("--count", type=int, default=33, help="number of cases (default 33: each type 3 times)")
    parser.add_argument("--types", default=",".join(TYPES),
                        help="comma-separated combination types, cycled through (default: all of them)")
    args = parser.parse_args()
    types = args.types.split(",")
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        parser.error(f"--types: unknown combination type(s) {unknown}; known: {TYPES}")
    seed = args.seed
    if seed is None and os.environ.get("D9D_PEFT_SEED"):
        seed = int(os.environ["D9D_PEFT_SEED"])
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") % 1_000_000_000
    print(f"peft-reference: generating {args.count} add_weighted_adapter cases from seed {seed}", flush=True)
    for old in args.out.glob("case_*"):
        shutil.rmtree(old)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rng_check(args.out, seed)
    made, s = 0, seed
    while made < args.count:
        combination_type = types[made % len(types)]
        case = make_case(s, combination_type, args.out)
        s += 1
        made += case is not None
    print(f"peft-reference: wrote {made} add_weighted_adapter cases to {args.out} (seeds {seed}..{s - 1})", flush=True)


if __name__ == "__main__":
    main()
