#!/usr/bin/env python3
"""Hotswap, real PEFT against d9d-peft, both ways.

For each case (fixed seeds; tests/peft_reference/twins.py's Toy), PEFT writes
two LoRA adapters a and b with init_lora_weights=False, and computes under
OUT/<case>/:

  logits_b         b loaded the ordinary way (PeftModel.from_pretrained)
  logits_swapped   a loaded, prepare_model_for_compiled_hotswap(target_rank)
                   where the case asks, then hotswap_adapter(b): PEFT's own
                   hotswap (not for DoRA and embedding targets, where PEFT
                   0.21's hotswap fails; see the cases)

Then `hotswap_tool OUT` does the same in C++ (load a, prepare_for_hotswap,
hotswap_adapter b), checks its logits against both, checks that no adapter
tensor was replaced, and saves the swapped adapter to OUT/<case>/saved; last,
PEFT loads that saved adapter and must compute logits_b. Agreement: 1e-5 of
max(1, max |reference|), as the other reference checks.
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
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from twins import Toy  # noqa: E402

TOLERANCE = 1e-5

CASES = {
    # b has a higher rank than a (padding needed), another scale, and leaves
    # v_proj and lm_head out (PEFT zeroes them).
    "linear_padded": dict(
        a=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "lm_head"]),
        b=dict(r=8, lora_alpha=3, target_modules=["q_proj", "up_proj"]),
        target_rank=8, peft_hotswap=True),
    # A lower rank into the first rows, rsLoRA on both, another alpha.
    "rank_down_rslora": dict(
        a=dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        b=dict(r=2, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        target_rank=None, peft_hotswap=True),
    # Where PEFT 0.21's own hotswap fails, C++ swaps and PEFT checks the
    # saved result. DoRA: the file's `lora_magnitude_vector` becomes the key
    # `lora_magnitude_vector.default`, but the model's is `....default.weight`
    # (a KeyError).
    "dora": dict(
        a=dict(r=4, lora_alpha=8, use_dora=True, target_modules=["up_proj", "down_proj"]),
        b=dict(r=6, lora_alpha=9, use_dora=True, target_modules=["up_proj", "down_proj"]),
        target_rank=6, peft_hotswap=False),
    # Embeddings: PEFT takes a layer's name from a key by dropping three dotted
    # parts (`lora_A.<name>.weight`); `lora_embedding_A.<name>` has two, so it
    # reaches the parent module, which has no `scaling` (an AttributeError).
    "embedding": dict(
        a=dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "lm_head"]),
        b=dict(r=3, lora_alpha=9, target_modules=["embed_tokens", "lm_head"]),
        target_rank=None, peft_hotswap=False),
}


def relative_diff(ours, reference):
    return (ours.double() - reference.double()).abs().max().item() / max(1.0, reference.abs().max().item())


def fresh_base(state):
    base = Toy()
    base.load_state_dict(state)
    return base.eval()


def make_adapter(state, kwargs, path, seed):
    torch.manual_seed(seed)
    model = get_peft_model(fresh_base(state), LoraConfig(init_lora_weights=False, **kwargs))
    if kwargs.get("use_dora"):
        with torch.no_grad():  # move DoRA's magnitude off the weight norm, so it matters
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.2 * torch.rand_like(p))
    model.save_pretrained(str(path))


def generate(out, seed):
    for index, (name, case) in enumerate(CASES.items()):
        d = out / name
        d.mkdir(parents=True)
        torch.manual_seed(seed + index)
        base = Toy()
        with torch.no_grad():
            for n, p in base.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        state = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
        ids = torch.randint(0, 37, (2, 7))
        make_adapter(state, case["a"], d / "a", seed + 100 + index)
        make_adapter(state, case["b"], d / "b", seed + 200 + index)
        with torch.no_grad():
            expected = {"logits_b": PeftModel.from_pretrained(fresh_base(state), str(d / "b")).eval()(ids)}
            if case["peft_hotswap"]:
                model = PeftModel.from_pretrained(fresh_base(state), str(d / "a")).eval()
                if case["target_rank"]:
                    prepare_model_for_compiled_hotswap(model, target_rank=case["target_rank"], check_compiled="ignore")
                hotswap_adapter(model, str(d / "b"), adapter_name="default", torch_device="cpu")
                expected["logits_swapped"] = model(ids)
                # PEFT's own hotswap must agree with loading b, or the reference is wrong.
                agree = relative_diff(expected["logits_swapped"], expected["logits_b"])
                if agree > TOLERANCE:
                    raise SystemExit(f"peft-reference: hotswap {name}: PEFT's hotswap differs from loading b by {agree:.2e}")
        save_file(state, str(d / "model.safetensors"))
        save_file({"input_ids": ids}, str(d / "inputs.safetensors"))
        save_file({k: v.contiguous() for k, v in expected.items()}, str(d / "expected.safetensors"))
        (d / "case.json").write_text(json.dumps({"target_rank": case["target_rank"],
                                                 "peft_hotswap": case["peft_hotswap"]}))


def check_saved(out):
    failures = 0
    from safetensors.torch import load_file
    for name in CASES:
        d = out / name
        state = load_file(str(d / "model.safetensors"))
        ids = load_file(str(d / "inputs.safetensors"))["input_ids"]
        expected = load_file(str(d / "expected.safetensors"))["logits_b"]
        with torch.no_grad():
            logits = PeftModel.from_pretrained(fresh_base(state), str(d / "saved")).eval()(ids)
        diff = relative_diff(logits, expected)
        ok = diff <= TOLERANCE
        failures += not ok
        print(f"peft-reference: hotswap {name}: PEFT loads the adapter saved after the C++ hotswap: "
              f"{diff:.2e} from b's logits: {'ok' if ok else 'FAILED'}", flush=True)
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory for the cases (emptied first)")
    parser.add_argument("--tool", required=True, help="the built hotswap_tool")
    parser.add_argument("--seed", type=int, default=20240611)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # PEFT's notes on models that are not transformers models
    generate(args.out, args.seed)
    tool = subprocess.run([args.tool, str(args.out)])
    failures = check_saved(args.out) + (tool.returncode != 0)
    if failures:
        print(f"peft-reference: hotswap: {failures} failed", flush=True)
        return 1
    print(f"peft-reference: hotswap: {len(CASES)} cases against real PEFT, both ways: all passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
