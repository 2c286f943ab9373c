#!/usr/bin/env python3
"""PEFT -> d9d-peft, differential: fresh LoRA, IA3, LoHa, LoKr, OFT and VeRA adapters written by real Hugging Face PEFT.

Makes COUNT cases from SEED (case i uses seed SEED + i, so one case is
reproduced alone with --seed SEED+i --count 1). Each case draws a toy
transformer's sizes and weights (tests/peft_reference/twins.py: Toy), a PEFT
LoraConfig (random r and lora_alpha; rsLoRA; DoRA; embeddings; biased and
unbiased layers; rank_pattern / alpha_pattern; target_modules as a list or a
regex; exclude_modules as a list or a regex; init_lora_weights=False so that B
is not zero) or, for about one case in four, an IA3Config (targets as above
without the embedding; feedforward_modules; init_ia3_weights=False so that the
vectors are not ones) or, for about one case in seven and at least MIN_LOHA
per run, a LoHaConfig (random r and alpha, rank_pattern / alpha_pattern,
targets and exclusions as for IA3, use_effective_conv2d either way (no effect
on linear layers), init_weights=False so that w2_b is not zero) or, for
about one case in seven and at least MIN_OFT per run, an OFTConfig (r or
oft_block_size, sizes that PEFT must adjust included, coft with several eps,
block_share, the Cayley-Neumann series with 1 to 8 terms or the exact inverse,
init_weights=False so that R is not the identity) or, for about one case in
seven and at least MIN_LOKR per run, a LoKrConfig (random r, so that w1/w2 are
whole or factored, decompose_both, decompose_factor, patterns, targets as for
LoHa, init_weights=False so that w1 is not zero) or, for about one case in
seven and at least MIN_VERA per run, a VeraConfig (random r, d_initial,
projection_prng_key, save_projection either way, targets as names or a regex
over layers of different sizes so the shared projections are sliced,
init_weights=False and lambda_b moved off ones), applies it with
get_peft_model and writes, under
OUT/case_NNN/:

  config.json                 the toy's sizes, the case seed, the PEFT config (for the log)
  model.safetensors           the base weights (standard keys)
  inputs.safetensors          input_ids
  adapter/                    PEFT's save_pretrained
  expected.safetensors        logits (adapter active), merged_logits (after
                              merge_and_unload) and merged.<key> for every base weight

tests/peft_reference/reference_tool.cpp (`check`) then loads each case in C++.
The seed is printed first; without --seed a fresh one is drawn.
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
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, VeraConfig, get_peft_model
from peft.utils.error import NoMatchingPeftModuleError
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from twins import Toy  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["up_proj", "down_proj"]  # biased
OTHERS = ["lm_head", "embed_tokens"]


def module_names(n_layers):
    names = ["embed_tokens", "lm_head"]
    for i in range(n_layers):
        names += [f"layers.{i}.attention.{p}" for p in ATTENTION]
        names += [f"layers.{i}.mlp.{p}" for p in MLP]
    return names


def draw_ia3(rng, names):
    """An IA3Config over the linear layers: targets as names or a regex, some feed-forward."""
    linear = ATTENTION + MLP + (["lm_head"] if rng.random() < 0.3 else [])
    if rng.random() < 0.7:
        targets = sorted(rng.sample(linear, rng.randint(1, len(linear))))
        feedforward = sorted(rng.sample(targets, rng.randint(0, len(targets))))
    else:
        targets = r"layers\.\d+\.(attention|mlp)\.\w+_proj"
        feedforward = rng.choice([r".*mlp\.(up|down)_proj", r".*\.down_proj", r"layers\.0\..*"])
    exclude = [rng.choice(names)] if rng.random() < 0.2 else None
    return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
            "exclude_modules": exclude, "init_ia3_weights": False}


MIN_LOHA = 10  # LoHa cases per run, whatever the draws


def draw_loha(rng, names):
    """A LoHaConfig over the linear layers: random r and alpha, patterns, list or regex targets."""
    linear = ATTENTION + MLP + (["lm_head"] if rng.random() < 0.3 else [])
    if rng.random() < 0.7:
        targets = sorted(rng.sample(linear, rng.randint(1, len(linear))))
    else:
        targets = rng.choice([r"layers\.\d+\.(attention|mlp)\.\w+_proj", r"layers\.0\.attention\.(q|v)_proj|lm_head",
                              r".*\.mlp\.(up|down)_proj"])
    r = rng.randint(1, 8)
    config = {"peft_type": "LOHA", "r": r,
              "alpha": rng.choice([r, 2 * r, rng.randint(1, 32), round(rng.uniform(0.5, 20.0), 3)]),
              "target_modules": targets,
              "exclude_modules": [rng.choice(names)] if rng.random() < 0.2 else None,
              "use_effective_conv2d": rng.random() < 0.2, "init_weights": False,
              "rank_pattern": {}, "alpha_pattern": {}}
    if rng.random() < 0.4:
        config["rank_pattern"][rng.choice(["q_proj", "down_proj", r"layers\.\d+\.mlp\.up_proj"])] = rng.randint(1, 8)
    if rng.random() < 0.4:
        config["alpha_pattern"][rng.choice(["v_proj", "up_proj", "layers.0.mlp.down_proj"])] = \
            rng.choice([1, 3, 16, round(rng.uniform(0.5, 20.0), 3)])
    return config


MIN_OFT = 10  # OFT cases per run, whatever the draws


def draw_oft(rng, names):
    """An OFTConfig over the linear layers: r or oft_block_size (adjusted by PEFT where it does not divide),
    coft, block_share, Cayley-Neumann or exact."""
    linear = ATTENTION + MLP + (["lm_head"] if rng.random() < 0.3 else [])
    if rng.random() < 0.7:
        targets = sorted(rng.sample(linear, rng.randint(1, len(linear))))
    else:
        targets = rng.choice([r"layers\.\d+\.(attention|mlp)\.\w+_proj", r"layers\.0\.attention\.(q|v)_proj|lm_head",
                              r".*\.mlp\.(up|down)_proj"])
    by_rank = rng.random() < 0.4
    return {"peft_type": "OFT", "r": rng.randint(2, 8) if by_rank else 0,
            "oft_block_size": 0 if by_rank else rng.choice([2, 3, 4, 4, 5, 6, 8]),
            "coft": rng.random() < 0.3, "eps": rng.choice([6e-5, 1e-2, 0.1, 1.0]),
            "block_share": rng.random() < 0.3, "use_cayley_neumann": rng.random() < 0.6,
            "num_cayley_neumann_terms": rng.randint(1, 8), "module_dropout": rng.choice([0.0, 0.0, 0.1]),
            "target_modules": targets,
            "exclude_modules": [rng.choice(names)] if rng.random() < 0.2 else None,
            "init_weights": False}


MIN_LOKR = 10  # LoKr cases per run, whatever the draws


def draw_lokr(rng, names):
    """A LoKrConfig over the linear layers: r small and large (factored or whole w2; w1 too with
    decompose_both), decompose_factor, rank/alpha patterns, list or regex targets."""
    config = draw_loha(rng, names)
    r = rng.choice([1, 1, 2, 3, rng.randint(1, 8), rng.randint(4, 24)])
    config.update({"peft_type": "LOKR", "r": r,
                   "alpha": rng.choice([r, 2 * r, rng.randint(1, 32), round(rng.uniform(0.5, 20.0), 3)]),
                   "decompose_both": rng.random() < 0.5,
                   "decompose_factor": rng.choice([-1, -1, -1, 2, 3, 4, 8]),
                   "rank_dropout_scale": rng.random() < 0.3})
    config["rank_pattern"] = {k: rng.choice([1, 2, 6, 16]) for k in config["rank_pattern"]}
    return config


MIN_VERA = 10  # VeRA cases per run, whatever the draws


def draw_vera(rng):
    """A VeraConfig over linear layers of different sizes (d x d, f x d, d x f, vocab x d): one pair of
    projections sized for the largest, sliced per layer; save_projection either way."""
    linear = ATTENTION + MLP + (["lm_head"] if rng.random() < 0.4 else [])
    if rng.random() < 0.7:
        targets = sorted(rng.sample(linear, rng.randint(1, len(linear))))
    else:
        targets = rng.choice([r"layers\.\d+\.(attention|mlp)\.\w+_proj", r"layers\.0\.attention\.(q|v)_proj|lm_head",
                              r".*\.mlp\.(up|down)_proj", r".*\.(k_proj|down_proj)"])
    return {"peft_type": "VERA", "r": rng.randint(1, 16), "target_modules": targets,
            "projection_prng_key": rng.choice([0, rng.randint(1, 2**31 - 1)]),
            "save_projection": rng.random() < 0.5, "d_initial": rng.choice([0.1, round(rng.uniform(-1.0, 1.0), 3)]),
            "vera_dropout": rng.choice([0.0, 0.1]), "init_weights": False}


# Methods with a per-run minimum: past COUNT, cases of the first one short of its minimum.
MINIMUMS = {"LOHA": MIN_LOHA, "LOKR": MIN_LOKR, "OFT": MIN_OFT, "VERA": MIN_VERA}
DRAWS = {"LOHA": draw_loha, "LOKR": draw_lokr, "OFT": draw_oft, "VERA": lambda rng, names: draw_vera(rng)}


def draw_case(seed, force=None):
    rng = random.Random(seed)
    sizes = {
        "vocab": rng.randint(9, 41),
        "d": rng.choice([8, 12, 16, 24]),
        "f": rng.randint(6, 40),
        "n_layers": rng.randint(1, 2),
    }
    use_dora = rng.random() < 0.3
    names = module_names(sizes["n_layers"])
    if force:
        return sizes, DRAWS[force](rng, names), (rng.randint(1, 3), rng.randint(2, 9))
    for peft_type in MINIMUMS:  # 15% each, in turn: about one case in seven or eight
        if rng.random() < 0.15:
            return sizes, DRAWS[peft_type](rng, names), (rng.randint(1, 3), rng.randint(2, 9))
    if rng.random() < 0.25:
        return sizes, draw_ia3(rng, names), (rng.randint(1, 3), rng.randint(2, 9))
    # Targets: a list of short names (PEFT matches a name or a dotted suffix of it),
    # a list with full paths, or a regex over the whole path.
    style = rng.choice(["names", "names", "paths", "regex"])
    pool = ATTENTION + MLP + ([o for o in OTHERS if o in names] if rng.random() < 0.5 else [])
    if style == "names":
        targets = sorted(rng.sample(pool, rng.randint(1, len(pool))))
    elif style == "paths":
        targets = sorted(rng.sample(names, rng.randint(1, min(6, len(names)))))
    else:
        picked = sorted(rng.sample(pool, rng.randint(1, 3)))
        layer = rng.choice([r"\d+", "0"])
        alts = "|".join(p for p in picked if p not in OTHERS)
        parts = []
        if alts:
            parts.append(rf"layers\.{layer}\.(attention|mlp)\.({alts})")
        parts += [p for p in picked if p in OTHERS]
        targets = "|".join(parts)
    exclude = None
    if rng.random() < 0.3:
        if rng.random() < 0.5:
            exclude = [rng.choice(names)]
        else:
            exclude = r"layers\.0\.attention\..*"
    r = rng.randint(1, 8)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": rng.choice([r, 2 * r, rng.randint(1, 32), round(rng.uniform(0.5, 20.0), 3)]),
        "lora_dropout": rng.choice([0.0, 0.0, 0.1]),
        "target_modules": targets,
        "exclude_modules": exclude,
        "use_rslora": rng.random() < 0.3,
        "use_dora": use_dora,
        "init_lora_weights": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if rng.random() < 0.4:
        key = rng.choice(["q_proj", "up_proj", "down_proj", "layers.0.attention.v_proj", r"layers\.\d+\.mlp\.up_proj"])
        config["rank_pattern"][key] = rng.randint(1, 8)
    if rng.random() < 0.4:
        key = rng.choice(["k_proj", "o_proj", "down_proj", "lm_head", "layers.0.mlp.down_proj"])
        config["alpha_pattern"][key] = rng.choice([1, 3, 16, round(rng.uniform(0.5, 20.0), 3)])
    batch, time = rng.randint(1, 3), rng.randint(2, 9)
    return sizes, config, (batch, time)


def make_case(seed, out_dir, force=None):
    sizes, config, (batch, time) = draw_case(seed, force)
    torch.manual_seed(seed)
    base = Toy(**sizes)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:  # LayerNorm away from identity, so its affine terms matter
                p.add_(0.1 * torch.randn_like(p))
    base_state = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
    ids = torch.randint(0, sizes["vocab"], (batch, time))

    kwargs = {k: v for k, v in config.items() if k != "peft_type"}
    peft_config = {"IA3": IA3Config, "LOHA": LoHaConfig, "LOKR": LoKrConfig, "LORA": LoraConfig, "OFT": OFTConfig,
                   "VERA": VeraConfig}[config["peft_type"]](**kwargs)
    try:
        model = get_peft_model(base, peft_config).eval()
    except (NoMatchingPeftModuleError, ValueError):
        return None  # the exclusions left nothing to adapt: draw another case
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if any("default" in v for a in ("r", "ia3_l", "hada_w1_a")
                            # (OFT's rotation module has an integer r of its own)
                            if isinstance(v := getattr(m, a, {}), (dict, torch.nn.ModuleDict, torch.nn.ParameterDict))))
    if not adapted:
        return None
    lokr_keys = sorted({n.split(".")[-2] for n, _ in model.named_parameters() if ".lokr_" in n})
    if config.get("use_dora"):
        # DoRA's magnitude starts as the weight norm; move it so the scaling shows.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.2 * torch.rand_like(p))
    if config["peft_type"] == "VERA":
        # init_weights=False leaves lambda_b at ones; move it so that its role shows.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "vera_lambda_b" in n:
                    p.mul_(0.5 + torch.rand_like(p))
    with torch.no_grad():
        logits = model(ids)
    case = out_dir / f"case_{seed}"
    case.mkdir(parents=True)
    model.save_pretrained(str(case / "adapter"))
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        merged_logits = merged(ids)
    expected = {"logits": logits, "merged_logits": merged_logits}
    for k, v in merged.state_dict().items():
        expected[f"merged.{k}"] = v.contiguous()
    save_file(base_state, str(case / "model.safetensors"))
    save_file({"input_ids": ids}, str(case / "inputs.safetensors"))
    save_file(expected, str(case / "expected.safetensors"))
    (case / "config.json").write_text(json.dumps({"seed": seed, "sizes": sizes, "peft_config": config,
                                                  "adapted_modules": adapted, "lokr_keys": lokr_keys}, indent=1))
    return case


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory for the cases (emptied first)")
    parser.add_argument("--seed", type=int, help="first case's seed (default: $D9D_PEFT_SEED, else drawn fresh)")
    parser.add_argument("--count", type=int, default=60, help="number of cases (default 60)")
    args = parser.parse_args()
    seed = args.seed
    if seed is None and os.environ.get("D9D_PEFT_SEED"):
        seed = int(os.environ["D9D_PEFT_SEED"])
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") % 1_000_000_000
    print(f"peft-reference: generating {args.count} PEFT LoRA, IA3, LoHa, LoKr, OFT and VeRA cases (at least "
          + ", ".join(f"{n} {t}" for t, n in MINIMUMS.items()) + f") from seed {seed} "
          f"(reproduce: bash scripts/peft-reference.sh --seed {seed} --count {args.count})", flush=True)
    for old in args.out.glob("case_*"):
        shutil.rmtree(old)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # PEFT's notes on unmatched rank_pattern keys and the like
    made, s = 0, seed
    counts = {"vera": 0, "vera without projections": 0, "oft": 0, "oft r": 0, "oft coft": 0, "oft block_share": 0, "oft exact": 0,
              "lokr": 0, "lokr factored w2": 0, "lokr factored w1": 0, "lokr decompose_factor": 0,
              "loha": 0, "loha rank/alpha_pattern": 0, "ia3": 0, "ia3 feed-forward": 0, "dora": 0, "rslora": 0,
              "embedding": 0, "regex": 0, "exclude": 0, "rank_pattern": 0, "alpha_pattern": 0, "biased": 0}

    def short():
        """The first method still short of its per-run minimum, if any."""
        return next((t for t, n in MINIMUMS.items() if counts[t.lower()] < n), None)

    while made < args.count or short():
        # Past COUNT, only cases of methods short of their minimum.
        case = make_case(s, args.out, force=short() if made >= args.count else None)
        s += 1
        if case is None:
            continue
        made += 1
        info = json.loads((case / "config.json").read_text())
        c = info["peft_config"]
        counts["biased"] += any(".mlp." in m for m in info["adapted_modules"])
        if c["peft_type"] == "VERA":
            counts["vera"] += 1
            counts["vera without projections"] += not c["save_projection"]
            continue
        if c["peft_type"] == "OFT":
            counts["oft"] += 1
            counts["oft r"] += c["r"] != 0
            counts["oft coft"] += c["coft"]
            counts["oft block_share"] += c["block_share"]
            counts["oft exact"] += not c["use_cayley_neumann"]
            continue
        if c["peft_type"] == "LOKR":
            counts["lokr"] += 1
            counts["lokr factored w2"] += "lokr_w2_a" in info["lokr_keys"]
            counts["lokr factored w1"] += "lokr_w1_a" in info["lokr_keys"]
            counts["lokr decompose_factor"] += c["decompose_factor"] != -1
            continue
        if c["peft_type"] == "LOHA":
            counts["loha"] += 1
            counts["loha rank/alpha_pattern"] += bool(c["rank_pattern"] or c["alpha_pattern"])
            continue
        if c["peft_type"] == "IA3":
            counts["ia3"] += 1
            counts["ia3 feed-forward"] += bool(c["feedforward_modules"])
            continue
        counts["dora"] += c["use_dora"]
        counts["rslora"] += c["use_rslora"]
        counts["embedding"] += "embed_tokens" in info["adapted_modules"]
        counts["regex"] += isinstance(c["target_modules"], str)
        counts["exclude"] += c["exclude_modules"] is not None
        counts["rank_pattern"] += bool(c["rank_pattern"])
        counts["alpha_pattern"] += bool(c["alpha_pattern"])
    print(f"peft-reference: wrote {made} cases to {args.out} (seeds {seed}..{s - 1}); cases with "
          + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)


if __name__ == "__main__":
    main()
