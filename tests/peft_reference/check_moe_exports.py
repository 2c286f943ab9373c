#!/usr/bin/env python3
"""d9d-peft -> PEFT for LoRA on 3-D expert parameters (target_parameters).

For every adapter `peft_reference_tool moe-export` wrote (OUT/<name>/: model.safetensors,
the Python twin's base weights; twin.json, its sizes and layout; adapter/, written by
hf::save_adapter; cpp_logits.safetensors, input_ids and the logits d9d-peft computed with
the adapter), loads the base into the Python twin (moe_twin.py), the adapter with
`PeftModel.from_pretrained`, and checks that

  - PEFT's own `get_peft_model_state_dict` has exactly the file's keys and tensors (so every
    key reached a ParamWrapper or LoRA layer: from_pretrained only warns about the rest);
  - PEFT's logits equal d9d-peft's to 1e-5 relative to max(1, max |logits|);
  - the adapter changes the logits (by more than 1e-3), so the check has something to compare.

Fails (never skips) when torch, peft or safetensors are missing.
"""
import json
import pathlib
import sys
import warnings

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from moe_twin import MoeTwin, MoeTwinConfig  # noqa: E402

TOL = 1e-5


def check(case):
    failures = []
    cfg = MoeTwinConfig(**json.loads((case / "twin.json").read_text()))
    model = MoeTwin(cfg).eval()
    model.load_state_dict(load_file(str(case / "model.safetensors")))
    cpp = load_file(str(case / "cpp_logits.safetensors"))
    with torch.no_grad():
        base_logits = model(cpp["input_ids"])
    peft_model = PeftModel.from_pretrained(model, str(case / "adapter")).eval()
    written = load_file(str(case / "adapter" / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(peft_model)
    if set(loaded) != set(written):
        failures.append(f"keys: PEFT holds {sorted(loaded)}, the file {sorted(written)}")
    else:
        for key, value in written.items():
            if not torch.equal(loaded[key].detach().cpu(), value):
                failures.append(f"{key}: PEFT's tensor differs from the file's")
    with torch.no_grad():
        logits = peft_model(cpp["input_ids"])
    scale = max(1.0, cpp["logits"].abs().max().item())
    diff = (logits - cpp["logits"]).abs().max().item() / scale
    if not diff <= TOL:
        failures.append(f"logits: max |peft - d9d| / max(1, max |d9d|) = {diff:.3g} > {TOL}")
    moved = (base_logits - cpp["logits"]).abs().max().item()
    if not moved > 1e-3:
        failures.append(f"the adapter moves the logits by only {moved:.3g}; the check would prove nothing")
    return failures, diff


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: check_moe_exports.py EXPORTS")
    warnings.filterwarnings("ignore")
    cases = sorted(p for p in pathlib.Path(sys.argv[1]).iterdir() if p.is_dir())
    if not cases:
        raise SystemExit(f"check_moe_exports: no exports under {sys.argv[1]} (run peft_reference_tool moe-export)")
    failed = 0
    for case in cases:
        failures, diff = check(case)
        status = "ok" if not failures else "FAIL"
        print(f"{status} {case.name}: max relative logit difference {diff:.3g}")
        for f in failures:
            print(f"  {f}")
        failed += bool(failures)
    if failed:
        raise SystemExit(f"peft-reference: moe: {failed} of {len(cases)} d9d-peft adapters failed under real PEFT")
    print(f"peft-reference: moe: {len(cases)} target_parameters adapters written by d9d-peft loaded by real PEFT: "
          "all passed")


if __name__ == "__main__":
    main()
