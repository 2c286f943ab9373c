#!/usr/bin/env python3
"""d9d-peft -> PEFT: files this library wrote, opened by real Hugging Face PEFT and safetensors.

Reads what `peft_reference_tool export OUT` wrote (see reference_tool.cpp):

- adapters/<name>/: each adapter (fixtures re-saved, several named adapters
  saved one by one, IA3 and random LoHa, LoKr, OFT and VeRA configs made in
  C++, LoRA, LoHa, LoKr and OFT trained by the C++ test) is loaded with
  PeftModel.from_pretrained onto the toy model's PyTorch twin (twins.py) with
  the fixture's base weights; its logits must equal the C++ logits to 1e-5
  (relative above logits of 1, see TOLERANCE).
- trainer/<run>/: the adapter each d9d-peft-train run wrote (one run per
  method kind: LoRA, IA3, LoHa, ...), loaded onto the trainer GPT's twin built
  from the sharded checkpoint the C++ side saved; logits to 1e-5.
  PEFT's merge_and_unload of it is the reference for the merged checkpoints
  this library wrote: `d9d-peft merge` output and the trainer's own merged/,
  each loaded into a fresh twin (logits to 1e-5; tensors the adapter does not
  touch bit-identical to the base).
- Every *.safetensors file with a sibling *.reference.pt (the tensors as they
  were in memory, written by LibTorch's torch::pickle_save), and the sharded
  checkpoint through its index: safetensors' reader must give the same keys,
  dtypes, shapes and bits.

Prints one line per check and exits non-zero if any failed.
"""
import argparse
import json
import pathlib
import sys

import torch
import torch.jit._pickle  # noqa: F401 - the helper torch::pickle_save files name
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from twins import Gpt, Toy  # noqa: E402

# 1e-5 * max(1, max |reference logits|): 1e-5 absolute for logits up to 1, and
# relative above (random LoKr or LoHa factors with a large alpha / r give logits
# of tens, where float32 rounding of the two evaluation orders alone exceeds
# 1e-5), as the PEFT -> d9d direction (reference_tool.cpp) compares.
TOLERANCE = 1e-5


def within(diff: float, reference: torch.Tensor) -> bool:
    return diff <= TOLERANCE * max(1.0, reference.abs().max().item())


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = ""):
        self.passed += ok
        self.failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def bit_equal(a: dict, b: dict) -> tuple[bool, str]:
    if set(a) != set(b):
        return False, f"keys differ: only in file {sorted(set(a) - set(b))[:5]}, only in memory {sorted(set(b) - set(a))[:5]}"
    for k in sorted(a):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False, f"{k}: file {x.dtype} {tuple(x.shape)}, memory {y.dtype} {tuple(y.shape)}"
        if not torch.equal(bits(x), bits(y)):
            return False, f"{k}: bits differ"
    return True, f"{len(a)} tensors bit-identical"


def load_sharded(directory: pathlib.Path) -> dict:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(directory / shard), framework="pt") as f:
            for key in f.keys():
                if index["weight_map"].get(key) != shard:
                    raise ValueError(f"{shard} holds {key}, which the index maps to {index['weight_map'].get(key)}")
                state[key] = f.get_tensor(key)
    return state


def logits_diff(model, ids, expected) -> float:
    with torch.no_grad():
        return (model(ids) - expected).abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", type=pathlib.Path)
    parser.add_argument("--fixtures", type=pathlib.Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = Report()
    toy = args.fixtures / "hf_peft" / "toy"
    toy_base = load_file(str(toy / "model.safetensors"))

    # Bit-exactness of every file that has an in-memory reference.
    references = sorted(args.exports.rglob("*.reference.pt"))
    for ref in references:
        # torch::pickle_save tags a typed Dict with this one helper; nothing else is allowed.
        with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
            memory = dict(torch.load(str(ref), weights_only=True))
        stem = ref.name.removesuffix(".reference.pt")
        single = ref.parent / f"{stem}.safetensors"
        try:
            on_disk = load_file(str(single)) if single.exists() else load_sharded(ref.parent)
            ok, detail = bit_equal(on_disk, memory)
        except Exception as e:  # noqa: BLE001 - any reader error is a failure to report
            ok, detail = False, f"{type(e).__name__}: {e}"
        report.check(ok, f"safetensors reads {ref.parent.relative_to(args.exports)}/{single.name if single.exists() else 'model.safetensors.index.json'}", detail)
    report.check(len(references) >= 10, "reference files found", f"{len(references)}")

    # Adapters on the toy model.
    adapters = sorted(p for p in (args.exports / "adapters").iterdir() if (p / "adapter_config.json").exists())
    for adapter in adapters:
        expected = load_file(str(adapter / "cpp_logits.safetensors"))
        base = Toy()
        base.load_state_dict(toy_base)
        try:
            model = PeftModel.from_pretrained(base, str(adapter)).eval()
            diff = logits_diff(model, expected["input_ids"], expected["logits"])
            report.check(within(diff, expected["logits"]), f"PEFT loads adapters/{adapter.name}",
                         f"max |peft - d9d| logits {diff:.2e} (max |logits| {expected['logits'].abs().max().item():.3g})")
        except Exception as e:  # noqa: BLE001
            report.check(False, f"PEFT loads adapters/{adapter.name}", f"{type(e).__name__}: {e}")
    report.check(len(adapters) >= 10, "toy adapters found", f"{len(adapters)}")
    loha = [a for a in adapters if json.loads((a / "adapter_config.json").read_text())["peft_type"] == "LOHA"]
    report.check(len(loha) >= 10, "LoHa adapters among them (random configs made in C++)", f"{len(loha)}")
    oft = [a for a in adapters if json.loads((a / "adapter_config.json").read_text())["peft_type"] == "OFT"]
    report.check(len(oft) >= 10, "OFT adapters among them (random configs made in C++)", f"{len(oft)}")
    lokr = [a for a in adapters if json.loads((a / "adapter_config.json").read_text())["peft_type"] == "LOKR"]
    report.check(len(lokr) >= 10, "LoKr adapters among them (random configs made in C++)", f"{len(lokr)}")
    vera = [json.loads((a / "adapter_config.json").read_text()) for a in adapters]
    vera = [c for c in vera if c["peft_type"] == "VERA"]
    report.check(len(vera) >= 10 and any(not c["save_projection"] for c in vera),
                 "VeRA adapters among them (random configs made in C++, some without projections)",
                 f"{len(vera)}, {sum(not c['save_projection'] for c in vera)} without")

    # Each d9d-peft-train run's adapter (one per method kind), and the merged
    # checkpoints, on the GPT twin.
    base_state = load_sharded(args.exports / "checkpoint_sharded")
    runs = sorted(p for p in (args.exports / "trainer").iterdir() if (p / "gpt.json").exists())
    kinds = set()
    for run in runs:
        sizes = json.loads((run / "gpt.json").read_text())

        def gpt_from(state):
            model = Gpt(**sizes)
            model.load_state_dict(state)
            return model.eval()

        peft_type = json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"]
        kinds.add(peft_type)
        label = f"d9d-peft-train run {run.name} ({peft_type})"
        expected = load_file(str(run / "adapter" / "cpp_logits.safetensors"))
        ids = expected["input_ids"]
        peft_model = PeftModel.from_pretrained(gpt_from(base_state), str(run / "adapter")).eval()
        diff = logits_diff(peft_model, ids, expected["logits"])
        report.check(within(diff, expected["logits"]), f"PEFT loads the adapter of {label}",
                     f"max |peft - d9d| logits {diff:.2e}")
        adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                   if isinstance(m, BaseTunerLayer)}
        merged_by_peft = peft_model.merge_and_unload().eval()
        with torch.no_grad():
            peft_merged_logits = merged_by_peft(ids)
        for name, directory in (("d9d-peft merge output", run / "cli_merged"),
                                ("d9d-peft-train's merged checkpoint", run / "trainer_merged")):
            try:
                files = sorted(directory.glob("*.safetensors"))
                state = load_sharded(directory) if (directory / "model.safetensors.index.json").exists() \
                    else load_file(str(files[0]))
                diff = logits_diff(gpt_from(state), ids, peft_merged_logits)
                untouched = [k for k in base_state if k.rsplit(".", 1)[0] not in adapted]
                same = all(torch.equal(state[k], base_state[k]) for k in untouched)
                merged_weights = [k for k in base_state if k.endswith(".weight") and k.rsplit(".", 1)[0] in adapted]
                changed = sum(not torch.equal(state[k], base_state[k]) for k in merged_weights)
                report.check(within(diff, peft_merged_logits) and same and changed == len(merged_weights) > 0,
                             f"safetensors + PEFT check {name} of {label}",
                             f"max |PEFT merge_and_unload - d9d| logits {diff:.2e}; {changed} of {len(merged_weights)} "
                             f"adapted weights changed; {len(untouched)} untouched tensors "
                             f"{'bit-identical' if same else 'CHANGED'}")
            except Exception as e:  # noqa: BLE001
                report.check(False, f"safetensors + PEFT check {name} of {label}", f"{type(e).__name__}: {e}")
    report.check({"LORA", "IA3", "LOHA", "LOKR", "OFT", "VERA"} <= kinds,
                 "d9d-peft-train runs cover LoRA, IA3, LoHa, LoKr, OFT and VeRA",
                 ", ".join(sorted(kinds)) or "none")

    total = report.passed + report.failed
    if report.failed:
        print(f"peft-reference: {report.failed} of {total} checks of d9d-peft's files failed")
        return 1
    print(f"peft-reference: {total} checks of d9d-peft's files under real PEFT and safetensors: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
