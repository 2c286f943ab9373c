#!/usr/bin/env python3
"""Mixed batches: Hugging Face PEFT's ``adapter_names=`` against d9d-peft's ``MixedBatchScope``, side by side in one run.

On the CPU (the same machine, the same thread count on both sides), fp32, inference (no grad, eval mode)::

    cmake --build build-torch2 -j --target bench_mixed_batch   # LibTorch of the torch wheel PEFT runs on
    python bench/compare_mixed_batch.py --bench build-torch2/bench/bench_mixed_batch --threads 2

(with the venv's python: ``$(bash scripts/python-env.sh | tail -n1)``). The two cases of
``bench/bench_mixed_batch.cpp``, built the same way in PyTorch with PEFT 0.21:

- ``linear``: one ``nn.Linear(4096, 4096, bias=False)`` with LoRA r 16, alpha 32, 512 rows;
- ``gpt``: the example trainer's GPT at its default size (``tests/peft_reference/twins.py``, the same
  module names), LoRA r 16, alpha 32 on every ``*_proj``, 64 sequences of 16 tokens.

With 1, 4 and 16 adapters (``init_lora_weights=False``: B is not zero), row i on adapter ``a{i mod N}``.
Each side times its base alone (adapters disabled), one adapter for every row, and the mixed batch:
medians of 7 alternating trials of about 0.3 s of back-to-back calls. It prints one markdown table and
whether the targets hold: mixed 16 adapters <= 1.3x one adapter (ours), and >= 4x faster than PEFT's
mixed batch.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import time

TRIALS = 7
TRIAL_S = 0.3
ADAPTER_COUNTS = (1, 4, 16)


def per_call_us(fn, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) * 1e6 / iterations


def time_alternating(fns) -> list[float]:
    iterations = []
    for fn in fns:
        fn()
        us = per_call_us(fn, 2)
        iterations.append(max(2, int(TRIAL_S * 1e6 / max(us, 1.0))))
    samples = [[] for _ in fns]
    for _ in range(TRIALS):
        for i, fn in enumerate(fns):
            samples[i].append(per_call_us(fn, iterations[i]))
    return [statistics.median(s) for s in samples]


def measure_peft(case: str, adapters: int) -> tuple[float, float, float]:
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if case == "linear":

        class OneLayer(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(4096, 4096, bias=False)

            def forward(self, x):
                return self.proj(x)

        model, targets, x = OneLayer(), ["proj"], torch.randn(512, 4096)
    else:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "peft_reference"))
        from twins import Gpt

        model, targets, x = Gpt(26, 17, 128, 2, 4, 256), r".*_proj", torch.randint(0, 26, (64, 16))
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, adapters):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.set_adapter("a0")
    peft_model.eval()
    names = [f"a{i % adapters}" for i in range(x.shape[0])]

    def plain():
        with peft_model.disable_adapter():
            peft_model(x)

    def single():
        peft_model(x)

    def mixed():
        peft_model(x, adapter_names=names)

    with torch.no_grad():
        return tuple(time_alternating([plain, single, mixed]))


def run_ours(binary: str, threads: int) -> dict[tuple[str, int], tuple[float, float, float]]:
    out = subprocess.run([binary, "--csv", "--threads", str(threads), "--trials", str(TRIALS)], check=True,
                         capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines()[1:]:  # case,adapters,plain_us,single_us,mixed_us
        case, adapters, plain, single, mixed = line.rsplit(",", 4)
        rows[("linear" if case.startswith("linear") else "gpt", int(adapters))] = (float(plain), float(single),
                                                                                 float(mixed))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", required=True, help="our bench_mixed_batch binary")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, both sides (default 2)")
    args = parser.parse_args()

    import torch
    import peft

    torch.set_num_threads(args.threads)
    print(f"compare_mixed_batch: torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads, fp32, "
          f"CPU; medians of {TRIALS} alternating trials of ~{TRIAL_S} s", flush=True)
    ours = run_ours(args.bench, args.threads)
    labels = {"linear": "linear 4096², 512 rows", "gpt": "trainer GPT (default), 64×16 tokens"}
    print()
    print("| case | adapters | ours: one adapter (ms) | ours: mixed (ms) | ours mixed / one | "
          "PEFT: one adapter (ms) | PEFT: mixed (ms) | PEFT mixed / one | PEFT mixed / ours mixed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for case in ("linear", "gpt"):
        for n in ADAPTER_COUNTS:
            _, o_single, o_mixed = ours[(case, n)]
            _, p_single, p_mixed = measure_peft(case, n)
            results[(case, n)] = (o_single, o_mixed, p_single, p_mixed)
            print(f"| {labels[case]} | {n} | {o_single / 1e3:.2f} | {o_mixed / 1e3:.2f} | {o_mixed / o_single:.2f} | "
                  f"{p_single / 1e3:.2f} | {p_mixed / 1e3:.2f} | {p_mixed / p_single:.2f} | {p_mixed / o_mixed:.2f} |",
                  flush=True)
    print()
    for case in ("linear", "gpt"):
        o_single, o_mixed, _, p_mixed = results[(case, 16)]
        print(f"target, {labels[case]}, 16 adapters: ours mixed / one adapter = {o_mixed / o_single:.2f} "
              f"({'met' if o_mixed / o_single <= 1.3 else 'NOT met'}, <= 1.3); PEFT mixed / ours mixed = "
              f"{p_mixed / o_mixed:.2f} ({'met' if p_mixed / o_mixed >= 4 else 'NOT met'}, >= 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
