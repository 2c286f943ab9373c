#!/usr/bin/env python3
"""LoRA, DoRA, IA3, LoHa, LoKr and OFT on Conv2d layers: random cases from real PEFT, and PEFT's verdict on d9d-peft's adapters.

  generate_conv.py generate --out DIR [--cases N] [--ia3-cases M] [--loha-cases L] [--lokr-cases K]
                                       [--oft-cases O] [--seed S]
                                       (S: else $D9D_PEFT_SEED, else fresh)
      N random LoRA cases (default 12; DoRA in every other one), each a conv net
      conv1 -> relu -> conv2 -> relu -> flatten -> head with random channels,
      kernels, strides and paddings, and a PEFT LoraConfig with random r,
      lora_alpha, use_rslora, targets (a mix of conv and Linear layers, at
      least one conv) and in some cases a rank_pattern / alpha_pattern, built
      with init_lora_weights=False (lora_B is not zero) and, for DoRA, a
      magnitude moved off its initial norm. Writes DIR/conv_<i>/:
        net.json               the net's geometry
        model.safetensors      the base weights
        adapter/               PEFT's save_pretrained
        expected.safetensors   x, logits (adapter active), merged_logits (after
                               merge_and_unload), merged.<key> for each adapted
                               layer's weight and bias
      and M random IA3 cases (default 10) in DIR/conv_ia3_<j>/, laid out the
      same but conv2 grouped (groups 2 or 4), an IA3Config with random
      targets and feedforward_modules among them, its vectors drawn around 1;
      and L random LoHa cases (default 10) in DIR/conv_loha_<k>/, conv2 grouped
      too, a LoHaConfig with random r, alpha, targets (conv and Linear),
      use_effective_conv2d (the CP form on kernels larger than 1x1) in about
      half, sometimes a rank_pattern / alpha_pattern, every factor drawn from
      N(0, 0.5²); and K random LoKr cases (default 10) in DIR/conv_lokr_<k>/,
      the same nets, a LoKrConfig with r from 1 to 4 (w2 whole, factored flat,
      or in the CP form with use_effective_conv2d), decompose_both,
      decompose_factor, patterns, every factor drawn from N(0, 0.5²); and O
      random OFT cases (default 10) in DIR/conv_oft_<o>/, nets whose conv2 is
      ungrouped (PEFT's oft.Conv2d cannot merge grouped convs), an OFTConfig
      with oft_block_size or r, COFT (eps 0.5-1), block_share, Cayley-Neumann
      or exact, the rotation parameters drawn from N(0, 0.1²) (0.3 with the
      exact Cayley transform). PEFT's unmerged forward on kernels larger than
      1x1 folds overlapping patches and is not its merged model, so
      net.json says "unmerged_logits": false where an OFT target has such a
      kernel, and only merged logits and weights are compared there.

  generate_conv.py check-exports DIR
      For every DIR/<case>/ that `peft_conv_tool export` wrote (net.json,
      model.safetensors, adapter/ from hf::save_adapter, cpp.safetensors with x,
      d9d-peft's logits and merged.<key>): PEFT loads the adapter with
      PeftModel.from_pretrained; its state dict must be exactly the file's,
      its logits (which the adapter must change) and merge_and_unload weights
      d9d-peft's to 1e-5.

Fails (never skips) when torch, peft or safetensors are missing.
"""
import argparse
import json
import os
import pathlib
import random
import sys
import warnings

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

TOL = 1e-5


class ConvNet(torch.nn.Module):
    def __init__(self, g):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(g["c0"], g["c1"], g["k1"], stride=g["s1"], padding=g["p1"])
        self.conv2 = torch.nn.Conv2d(g["c1"], g["c2"], g["k2"], stride=g["s2"], padding=g["p2"],
                                     groups=g.get("g2", 1))
        self.head = torch.nn.Linear(g["features"], 5)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 1))


def out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def random_geometry(rng, grouped=False, kernels=(1, 2, 3, 5), inputs=(1, 3, 4)):
    g = dict(c0=rng.choice(inputs), c1=rng.choice([4, 6, 8]), c2=rng.choice([4, 5, 8]), size=rng.choice([7, 8, 10]))
    if grouped:  # conv2 in 2 or 4 groups
        g["c2"] = rng.choice([4, 6, 8])
        g["g2"] = rng.choice([d for d in (2, 4) if g["c1"] % d == 0 and g["c2"] % d == 0])
    for i in (1, 2):
        g[f"k{i}"] = rng.choice(kernels)
        g[f"s{i}"] = rng.choice([1, 2])
        g[f"p{i}"] = rng.choice([0, 1, 2])
    h = out_size(out_size(g["size"], g["k1"], g["s1"], g["p1"]), g["k2"], g["s2"], g["p2"])
    if h < 1:
        return random_geometry(rng, grouped, kernels, inputs)
    g["features"] = g["c2"] * h * h
    return g


def random_config(rng, dora):
    targets = rng.choice([["conv1"], ["conv2"], ["conv1", "conv2"], ["conv1", "head"], ["conv1", "conv2", "head"]])
    r = rng.choice([1, 2, 3, 4, 6])
    kw = dict(r=r, lora_alpha=rng.choice([1, 2, 4, 8, 16]), use_rslora=rng.random() < 0.4, use_dora=dora,
              target_modules=targets, init_lora_weights=False)
    if rng.random() < 0.4:
        kw["rank_pattern"] = {targets[-1]: rng.choice([1, 2, 5])}
        kw["alpha_pattern"] = {targets[0]: rng.choice([3, 6])}
    return LoraConfig(**kw)


def random_ia3_config(rng):
    # conv2 (grouped) in most; feed-forward there in most, where the merge
    # scales each group's input channels.
    targets = rng.choice([["conv1"], ["conv2"], ["conv1", "conv2"], ["conv2", "head"], ["conv1", "conv2", "head"]])
    feedforward = [t for t in targets if rng.random() < (0.7 if t == "conv2" else 0.5)]
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False)


def random_loha_config(rng):
    # Conv layers in most; the CP form in about half (PEFT keeps 1x1 kernels flat).
    targets = rng.choice([["conv1"], ["conv2"], ["conv1", "conv2"], ["conv2", "head"], ["conv1", "conv2", "head"]])
    kw = dict(r=rng.choice([1, 2, 3, 4]), alpha=rng.choice([1, 2, 4, 8]), target_modules=targets,
              use_effective_conv2d=rng.random() < 0.5, init_weights=False)
    if rng.random() < 0.4:
        kw["rank_pattern"] = {targets[-1]: rng.choice([1, 2, 5])}
        kw["alpha_pattern"] = {targets[0]: rng.choice([3, 6])}
    return LoHaConfig(**kw)


def random_lokr_config(rng):
    # r 1-2 factors w2 on most conv layers (the CP form where use_effective_conv2d), r 4-8 keeps it whole.
    targets = rng.choice([["conv1"], ["conv2"], ["conv1", "conv2"], ["conv2", "head"], ["conv1", "conv2", "head"]])
    kw = dict(r=rng.choice([1, 1, 1, 2, 4]), alpha=rng.choice([1, 2, 4, 8]), target_modules=targets,
              use_effective_conv2d=rng.random() < 0.5, decompose_both=rng.random() < 0.4,
              decompose_factor=rng.choice([-1, -1, 2]), init_weights=False)
    if rng.random() < 0.4:
        kw["rank_pattern"] = {targets[-1]: rng.choice([1, 2, 5])}
        kw["alpha_pattern"] = {targets[0]: rng.choice([3, 6])}
    return LoKrConfig(**kw)


def random_oft_config(rng):
    targets = rng.choice([["conv1"], ["conv2"], ["conv1", "conv2"], ["conv2", "head"], ["conv1", "conv2", "head"]])
    kw = dict(target_modules=targets, block_share=rng.random() < 0.3, use_cayley_neumann=rng.random() < 0.6,
              num_cayley_neumann_terms=rng.choice([4, 5, 7]), init_weights=False)
    # PEFT adjusts sizes that do not divide, to the lower divisor on a tie: 2 on
    # 27 features becomes 1, a block with nothing to rotate; 3, 4 and 6 stay
    # above 1 on every layer these nets have.
    if rng.random() < 0.5:
        kw.update(r=0, oft_block_size=rng.choice([3, 4, 6]))
    else:
        kw.update(r=rng.choice([1, 2]), oft_block_size=0)
    if rng.random() < 0.3:
        kw.update(coft=True, eps=rng.choice([0.5, 1.0]))
    return OFTConfig(**kw)


def merged_keys(model, targets):
    keys = {}
    for t in targets:
        for name, tensor in getattr(model, t).state_dict().items():
            keys[f"merged.{t}.{name}"] = tensor.detach().clone()
    return keys


def write_case(case, g, base, config):
    """PEFT's adapter of `config` on `base`, saved with its logits and merged weights.

    The adapter's weights are drawn again (up to 20 times) until they move the
    logits by more than 1e-2: a product of random factors can be near zero
    (LoHa with r 1 on a 1-channel conv), and an adapter that changes nothing
    would compare nothing."""
    case.mkdir(parents=True, exist_ok=True)
    (case / "net.json").write_text(json.dumps(g, indent=2))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(case / "model.safetensors"))
    x = torch.randn(2, g["c0"], g["size"], g["size"])
    with torch.no_grad():
        base_logits = base(x)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for _ in range(20):
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.empty_like(p).uniform_(0.7, 1.3))
                elif "ia3_l" in name:
                    p.copy_(1 + 0.3 * torch.randn_like(p))
                elif "hada_" in name or "lokr_" in name:  # kaiming draws of chained factors can leave the logits unchanged
                    p.normal_(0.0, 0.5)
                elif "oft_R" in name:
                    # Rotations that move the logits; the Neumann series (a truncated
                    # Cayley transform) stays near-orthogonal only for small ones.
                    p.normal_(0.0, 0.1 if config.use_cayley_neumann else 0.3)
            logits = model(x)
            if (logits - base_logits).abs().max().item() > 1e-2:
                break
        else:
            raise SystemExit(f"generate_conv: {case.name}: 20 draws of the adapter all left the logits within 1e-2 "
                             f"of the base model's")
    model.save_pretrained(str(case / "adapter"))
    with torch.no_grad():
        merged = model.merge_and_unload().eval()
        expected = dict(x=x, logits=logits, merged_logits=merged(x))
    expected.update(merged_keys(merged, config.target_modules))
    save_file({k: v.contiguous() for k, v in expected.items()}, str(case / "expected.safetensors"))


def generate(out, cases, ia3_cases, loha_cases, lokr_cases, oft_cases, seed):
    out.mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        rng = random.Random(seed * 1000 + i)
        torch.manual_seed(seed * 1000 + i)
        g = random_geometry(rng)
        config = random_config(rng, dora=i % 2 == 1)
        write_case(out / f"conv_{i}", g, ConvNet(g).eval(), config)
        print(f"conv_{i}: {json.dumps(g)} r={config.r} alpha={config.lora_alpha} rslora={config.use_rslora} "
              f"dora={config.use_dora} targets={sorted(config.target_modules)} rank_pattern={config.rank_pattern}")
    for j in range(ia3_cases):
        rng = random.Random(seed * 1000 + 500 + j)
        torch.manual_seed(seed * 1000 + 500 + j)
        g = random_geometry(rng, grouped=True)
        config = random_ia3_config(rng)
        write_case(out / f"conv_ia3_{j}", g, ConvNet(g).eval(), config)
        print(f"conv_ia3_{j}: {json.dumps(g)} targets={sorted(config.target_modules)} "
              f"feedforward={sorted(config.feedforward_modules)}")
    for k in range(loha_cases):
        rng = random.Random(seed * 1000 + 700 + k)
        torch.manual_seed(seed * 1000 + 700 + k)
        g = random_geometry(rng, grouped=True)
        config = random_loha_config(rng)
        write_case(out / f"conv_loha_{k}", g, ConvNet(g).eval(), config)
        print(f"conv_loha_{k}: {json.dumps(g)} r={config.r} alpha={config.alpha} "
              f"effective_conv2d={config.use_effective_conv2d} targets={sorted(config.target_modules)} "
              f"rank_pattern={config.rank_pattern}")
    for k in range(lokr_cases):
        rng = random.Random(seed * 1000 + 800 + k)
        torch.manual_seed(seed * 1000 + 800 + k)
        g = random_geometry(rng, grouped=True)
        config = random_lokr_config(rng)
        write_case(out / f"conv_lokr_{k}", g, ConvNet(g).eval(), config)
        print(f"conv_lokr_{k}: {json.dumps(g)} r={config.r} alpha={config.alpha} "
              f"effective_conv2d={config.use_effective_conv2d} decompose_both={config.decompose_both} "
              f"decompose_factor={config.decompose_factor} targets={sorted(config.target_modules)} "
              f"rank_pattern={config.rank_pattern}")
    for o in range(oft_cases):
        rng = random.Random(seed * 1000 + 900 + o)
        torch.manual_seed(seed * 1000 + 900 + o)
        # 1x1 in half (PEFT's unmerged forward is comparable there); 3 or 4
        # inputs, so that conv1's filters have something to rotate.
        g = random_geometry(rng, kernels=(1, 1, 2, 3), inputs=(3, 4))
        config = random_oft_config(rng)
        g["unmerged_logits"] = all(g[f"k{t[-1]}"] == 1 for t in config.target_modules if t.startswith("conv"))
        write_case(out / f"conv_oft_{o}", g, ConvNet(g).eval(), config)
        print(f"conv_oft_{o}: {json.dumps(g)} r={config.r} oft_block_size={config.oft_block_size} "
              f"coft={config.coft} block_share={config.block_share} neumann={config.use_cayley_neumann} "
              f"targets={sorted(config.target_modules)}")
    print(f"generate_conv: {cases + ia3_cases + loha_cases + lokr_cases + oft_cases} cases in {out}")


def close(failures, what, got, want):
    diff = (got - want).abs().max().item()
    if not diff <= TOL * max(1.0, want.abs().max().item()):
        failures.append(f"{what}: max abs diff {diff:.3g}")
    return diff


def check_exports(root):
    dirs = sorted(d for d in root.iterdir() if (d / "adapter").is_dir())
    if not dirs:
        raise SystemExit(f"generate_conv: no exported cases under {root} (run peft_conv_tool export first)")
    failed, worst = 0, 0.0
    for case in dirs:
        failures = []
        g = json.loads((case / "net.json").read_text())
        model = ConvNet(g).eval()
        model.load_state_dict(load_file(str(case / "model.safetensors")))
        cpp = load_file(str(case / "cpp.safetensors"))
        with torch.no_grad():
            base_logits = model(cpp["x"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(case / "adapter")).eval()
        written = load_file(str(case / "adapter" / "adapter_model.safetensors"))
        state = {"base_model.model." + k if not k.startswith("base_model.model.") else k: v
                 for k, v in get_peft_model_state_dict(peft_model).items()}
        if sorted(state) != sorted(written):
            failures.append(f"PEFT's state dict keys {sorted(state)} differ from the file's {sorted(written)}")
        else:
            for k in written:
                if not torch.equal(state[k], written[k]):
                    failures.append(f"{k} differs after PEFT loaded it")
        with torch.no_grad():
            logits = peft_model(cpp["x"])
            if g.get("unmerged_logits", True):  # PEFT's OFT on kernels > 1x1: only its merged model is comparable
                worst = max(worst, close(failures, "logits", logits, cpp["logits"]))
            if not (cpp["logits"] - base_logits).abs().max().item() > 1e-3:
                failures.append("the adapter does not change the logits: nothing was compared")
            merged = peft_model.merge_and_unload().eval()
            for k, v in cpp.items():
                if k.startswith("merged."):
                    name = k[len("merged."):]
                    worst = max(worst, close(failures, k, merged.state_dict()[name], v))
        status = "ok" if not failures else "FAILED: " + "; ".join(failures)
        print(f"{case.name}: {status}")
        failed += bool(failures)
    print(f"peft-reference: conv: {len(dirs)} Conv2d adapters (LoRA, DoRA, IA3, LoHa, LoKr, OFT) written by d9d-peft loaded by real PEFT, "
          f"max abs diff {worst:.3g}: {'all passed' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--out", type=pathlib.Path, required=True)
    gen.add_argument("--cases", type=int, default=12)
    gen.add_argument("--ia3-cases", type=int, default=10)
    gen.add_argument("--loha-cases", type=int, default=10)
    gen.add_argument("--lokr-cases", type=int, default=10)
    gen.add_argument("--oft-cases", type=int, default=10)
    gen.add_argument("--seed", type=int, default=None,
                     help="default: $D9D_PEFT_SEED, else a fresh seed (printed)")
    chk = sub.add_parser("check-exports")
    chk.add_argument("dir", type=pathlib.Path)
    a = p.parse_args()
    if a.command == "generate":
        seed = a.seed if a.seed is not None else int(os.environ.get("D9D_PEFT_SEED", random.randrange(1 << 30)))
        print(f"generate_conv: cases from seed {seed} (rerun: generate_conv.py generate --seed {seed})")
        generate(a.out, a.cases, a.ia3_cases, a.loha_cases, a.lokr_cases, a.oft_cases, seed)
        return 0
    return check_exports(a.dir)


if __name__ == "__main__":
    sys.exit(main())
