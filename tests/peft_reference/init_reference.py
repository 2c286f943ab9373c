#!/usr/bin/env python3
"""PiSSA and OLoRA initialisation, real PEFT against d9d-peft, both ways.

For each case (fixed seeds; tests/peft_reference/twins.py's Toy), PEFT injects
LoRA with `init_lora_weights` = "pissa", "pissa_niter_<n>" or "olora" into the
base model, which moves each target's principal part into the adapter and
leaves the residual in the base weight. Under OUT/<case>/ it writes:

  model.safetensors     the original base model
  residual.safetensors  PEFT's residual base weights (`<module>.weight`)
  adapter/              the adapter after a simulated training step (factors
                        moved off their initial values), as save_pretrained
                        writes it: init_lora_weights names the method
  converted/            the same adapter converted to plain LoRA
                        (path_initial_model_for_weight_conversion): twice the
                        rank, init_lora_weights true
  expected.safetensors  `logits` of PEFT's trained model, `base_logits` of the
                        original model

Then `init_tool OUT` checks in C++: injecting the initialisation into the
original model gives PEFT's residuals and leaves the logits those of the base
model; loading adapter/ and converted/ onto the original model gives PEFT's
logits. It also initialises, trains a step in C++ and saves both forms to
OUT/<case>/ours/{adapter,converted} with its logits; last, PEFT loads those
onto the original model and must compute the same logits. Agreement: 1e-5 of
max(1, max |reference|), as the other reference checks.

The randomized "pissa_niter_<n>" draws from the default generator: the tool
seeds LibTorch's generator with the case's seed before each initialisation,
as this script seeds PyTorch's, and LibTorch's CPU normal draws are PyTorch's.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from twins import Toy  # noqa: E402

TOLERANCE = 1e-5

CASES = {
    "pissa_attn": dict(init="pissa", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                       rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 5}),
    "pissa_rslora_all": dict(init="pissa", r=6, lora_alpha=4, use_rslora=True,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                                             "lm_head"]),
    "pissa_niter_mlp": dict(init="pissa_niter_4", r=5, lora_alpha=10, target_modules=["up_proj", "down_proj"]),
    "olora_mlp": dict(init="olora", r=4, lora_alpha=16, target_modules=["up_proj", "down_proj", "k_proj"]),
    "olora_head": dict(init="olora", r=8, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
}


def relative_diff(ours, reference):
    return (ours.double() - reference.double()).abs().max().item() / max(1.0, reference.abs().max().item())


def fresh_base(state):
    base = Toy()
    base.load_state_dict(state)
    return base.eval()


def config_of(case):
    kwargs = {k: v for k, v in case.items() if k != "init"}
    return LoraConfig(init_lora_weights=case["init"], **kwargs)


def generate(out, seed):
    for index, (name, case) in enumerate(CASES.items()):
        d = out / name
        d.mkdir(parents=True)
        torch.manual_seed(seed + index)
        base = Toy()
        state = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
        ids = torch.randint(0, 37, (2, 7))
        with torch.no_grad():
            base_logits = fresh_base(state)(ids)
        model = fresh_base(state)
        torch.manual_seed(seed + 1000 + index)  # what the randomized SVD draws from (the tool seeds the same)
        model = get_peft_model(model, config_of(case)).eval()
        residual = {n[len("base_model.model."):].replace(".base_layer.weight", ".weight"): p.detach().clone()
                    for n, p in model.named_parameters() if n.endswith(".base_layer.weight")}
        with torch.no_grad():
            initial_logits = model(ids)
        agree = relative_diff(initial_logits, base_logits)
        if agree > TOLERANCE:
            raise SystemExit(f"peft-reference: init {name}: PEFT's initialised model differs from the base by {agree:.2e}")
        # The initial adapter, for PEFT's conversion (saved with init_lora_weights true, as PEFT's examples do).
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(d / "initial"))
        model.peft_config["default"].init_lora_weights = case["init"]
        torch.manual_seed(seed + 2000 + index)
        with torch.no_grad():  # a training step's worth of change
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.05 * torch.randn_like(p) * p.abs().mean())
            logits = model(ids)
        model.save_pretrained(str(d / "adapter"))
        model.save_pretrained(str(d / "converted"), path_initial_model_for_weight_conversion=str(d / "initial"))
        save_file(state, str(d / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in residual.items()}, str(d / "residual.safetensors"))
        save_file({"input_ids": ids}, str(d / "inputs.safetensors"))
        save_file({"logits": logits.contiguous(), "base_logits": base_logits.contiguous()},
                  str(d / "expected.safetensors"))
        (d / "case.json").write_text(json.dumps({"seed": seed + 1000 + index, "init": case["init"]}))


def check_ours(out):
    failures = 0
    for name in CASES:
        d = out / name
        state = load_file(str(d / "model.safetensors"))
        ids = load_file(str(d / "inputs.safetensors"))["input_ids"]
        expected = load_file(str(d / "ours" / "logits.safetensors"))["logits"]
        for form in ("adapter", "converted"):
            config = json.loads((d / "ours" / form / "adapter_config.json").read_text())
            model = fresh_base(state)
            torch.manual_seed(json.loads((d / "case.json").read_text())["seed"])
            with torch.no_grad():
                logits = PeftModel.from_pretrained(model, str(d / "ours" / form)).eval()(ids)
            diff = relative_diff(logits, expected)
            ok = diff <= TOLERANCE
            failures += not ok
            print(f"peft-reference: init {name}: PEFT loads the C++ {form} (init_lora_weights "
                  f"{json.dumps(config['init_lora_weights'])}, r {config['r']}) onto the original model: "
                  f"{diff:.2e}: {'ok' if ok else 'FAILED'}", flush=True)
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory for the cases (emptied first)")
    parser.add_argument("--tool", required=True, help="the built peft_init_tool")
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # PEFT's notes on models that are not transformers models
    generate(args.out, args.seed)
    tool = subprocess.run([args.tool, str(args.out)])
    failures = check_ours(args.out) + (tool.returncode != 0)
    if failures:
        print(f"peft-reference: init: {failures} failed", flush=True)
        return 1
    print(f"peft-reference: init: {len(CASES)} PiSSA/OLoRA cases against real PEFT, both ways: all passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
