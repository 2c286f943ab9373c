#!/usr/bin/env python3
"""Hugging Face PEFT's LoRA linear against d9d-peft's, on one CUDA GPU.

Times PEFT 0.21's ``peft.tuners.lora.Linear`` (made by ``get_peft_model`` on a
one-layer module: ``nn.Linear(4096, 4096, bias=False)``, r=16, lora_alpha=32,
lora_dropout=0) against a plain ``nn.Linear`` of the same size, with CUDA
events, for the shapes and dtypes of ``bench/gpu_bench`` (bf16 and fp32;
16, 512, 4096 and 16384 tokens): forward without grad, forward+backward (base
frozen, input requiring grad, loss = out.sum()) and merging the adapter into
the 4096x4096 weight. Then runs our binary with ``--csv`` and prints one
markdown table of times and ratios side by side.

Method, the same on both sides: each forward / forward+backward time is the
median of 7 trials, plain and LoRA alternating, each trial ~50 ms of
back-to-back calls between two CUDA events (launch overhead counts, as it does
for a caller). A merge is one call between two events after a synchronize,
median of 50 (PEFT's ``unmerge()`` runs untimed between merges). The merge
baseline is one in-place ``W.addmm_(B, A, alpha=scale)``. TF32 is off, which is
both PyTorch's and LibTorch's default for matmuls. PEFT runs with its defaults,
so a bf16 model gets fp32 adapters (``autocast_adapter_dtype=True``); the table
says which, and ``--no-autocast-adapter-dtype`` keeps them in bf16 as ours are.

The comparison of one LoRA training step of the example trainer's model (the
issue's tokens/s and peak-memory targets) is not here: it comes with the
example trainer.

Usage (on the GPU machine, from the repository root)::

    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \\
        -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')"
    cmake --build build -j --target gpu_bench
    python3 bench/compare_hf_peft.py --gpu-bench build/bench/gpu_bench

Needs PyTorch with CUDA and peft (tested against torch 2.11, peft 0.21).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import subprocess
import sys
import warnings

DIM = 4096
RANK = 16
ALPHA = 32
TOKENS = (16, 512, 4096, 16384)
TRIALS = 7
TRIAL_MS = 50.0
MERGE_CALLS = 50


def time_run_us(fn, iters: int) -> float:
    """Microseconds per call over `iters` back-to-back calls between two events."""
    import torch

    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1000.0 / iters


def calibrate(fn) -> int:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    us = time_run_us(fn, 5)
    return int(min(max(TRIAL_MS * 1000.0 / max(us, 1.0), 5), 20000))


def time_pair_us(plain, lora) -> tuple[float, float]:
    """Medians of alternating trials, so drift hits both sides alike."""
    plain_iters = calibrate(plain)
    lora_iters = calibrate(lora)
    p, q = [], []
    for _ in range(TRIALS):
        p.append(time_run_us(plain, plain_iters))
        q.append(time_run_us(lora, lora_iters))
    return statistics.median(p), statistics.median(q)


def time_single_calls_us(fn, between=None) -> float:
    """Median of single calls, each alone between two events after a sync."""
    import torch

    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(MERGE_CALLS + 3):
        if between is not None:
            between()
        torch.cuda.synchronize()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        if i >= 3:  # warm-up
            times.append(start.elapsed_time(stop) * 1000.0)
    return statistics.median(times)


def measure_peft(dtype_name: str, autocast_adapter_dtype: bool) -> list[dict]:
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as PeftLoraLinear

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    device = torch.device("cuda")

    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(DIM, DIM, bias=False)

        def forward(self, x):
            return self.proj(x)

    plain = nn.Linear(DIM, DIM, bias=False).to(device=device, dtype=dtype)
    plain.weight.requires_grad_(False)

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
    # PEFT's default autocast_adapter_dtype=True keeps bf16 models' adapters in fp32.
    model = get_peft_model(OneLayer().to(device=device, dtype=dtype), config,
                           autocast_adapter_dtype=autocast_adapter_dtype)
    layer = model.base_model.model.proj
    if not isinstance(layer, PeftLoraLinear):
        raise SystemExit(f"expected peft.tuners.lora.Linear, got {type(layer).__name__}")
    lora_a = layer.lora_A["default"].weight
    lora_b = layer.lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_(0.0, 1e-3)  # a non-zero low-rank path, as in our benchmark

    rows = []
    adapter_dtype = str(lora_a.dtype).replace("torch.", "")
    for tokens in TOKENS:
        with torch.no_grad():
            layer.eval()
            x = torch.randn(tokens, DIM, device=device, dtype=dtype)
            p, q = time_pair_us(lambda: plain(x), lambda: layer(x))
        rows.append(dict(kind="forward", dtype=dtype_name, tokens=tokens, plain_us=p, lora_us=q,
                         adapter_dtype=adapter_dtype))

        layer.train()
        x = torch.randn(tokens, DIM, device=device, dtype=dtype, requires_grad=True)

        def plain_step():
            plain(x).sum().backward()
            x.grad = None

        def lora_step():
            layer(x).sum().backward()
            x.grad = None
            lora_a.grad = None
            lora_b.grad = None

        p, q = time_pair_us(plain_step, lora_step)
        rows.append(dict(kind="forward_backward", dtype=dtype_name, tokens=tokens, plain_us=p, lora_us=q,
                         adapter_dtype=adapter_dtype))
        del x

    with torch.no_grad():
        w = torch.randn(DIM, DIM, device=device, dtype=dtype)
        b = torch.randn(DIM, RANK, device=device, dtype=dtype) * 1e-3
        a = torch.randn(RANK, DIM, device=device, dtype=dtype)
        scale = ALPHA / RANK
        addmm_us = time_single_calls_us(lambda: w.addmm_(b, a, beta=1.0, alpha=scale))

        def unmerge_if_merged():
            if layer.merged:
                layer.unmerge()

        merge_us = time_single_calls_us(layer.merge, between=unmerge_if_merged)
        unmerge_if_merged()
    rows.append(dict(kind="merge", dtype=dtype_name, tokens=0, plain_us=addmm_us, lora_us=merge_us,
                     adapter_dtype=adapter_dtype))
    return rows


def run_ours(gpu_bench: str) -> dict[tuple[str, str, int], dict]:
    proc = subprocess.run([gpu_bench, "--csv"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{gpu_bench} --csv failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    lines = proc.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("kind,")), None)
    if header is None:
        raise SystemExit(f"{gpu_bench} --csv printed no CSV header:\n{proc.stdout}")
    rows = {}
    for r in csv.DictReader(io.StringIO("\n".join(lines[header:]))):
        rows[(r["kind"], r["dtype"], int(r["tokens"]))] = {
            "plain_us": float(r["plain_us"]),
            "lora_us": float(r["lora_us"]),
        }
    return rows


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-bench", required=True, help="path to d9d-peft's gpu_bench binary")
    parser.add_argument("--no-autocast-adapter-dtype", action="store_true",
                        help="keep PEFT's adapters in the model's dtype (get_peft_model(..., "
                             "autocast_adapter_dtype=False)); by default PEFT keeps bf16 models' adapters in fp32")
    args = parser.parse_args()

    import torch
    import peft

    if not torch.cuda.is_available():
        print("compare_hf_peft: no CUDA device visible to PyTorch; nothing to measure.")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")

    ours = run_ours(args.gpu_bench)
    theirs = []
    for dtype_name in ("bf16", "fp32"):
        theirs += measure_peft(dtype_name, autocast_adapter_dtype=not args.no_autocast_adapter_dtype)
        torch.cuda.empty_cache()

    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, peft {peft.__version__}; "
          f"in = out = {DIM}, r = {RANK}, lora_alpha = {ALPHA}, dropout 0")
    print("Ratios are LoRA / plain layer in the same framework (merge: LoRA merge / one addmm_). "
          "'PEFT / ours' is PEFT's LoRA time over ours.\n")
    print("| what | tokens | dtype (PEFT adapters) | PEFT µs | PEFT ratio | ours µs | ours ratio | PEFT / ours "
          "| PEFT merge µs | ours merge µs |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in theirs:
        key = (row["kind"], row["dtype"], row["tokens"])
        o = ours.get(key)
        peft_ratio = row["lora_us"] / row["plain_us"]
        ours_us = o["lora_us"] if o else None
        ours_ratio = o["lora_us"] / o["plain_us"] if o else None
        speedup = row["lora_us"] / ours_us if ours_us else None
        is_merge = row["kind"] == "merge"
        print(f"| {row['kind']} | {row['tokens'] if not is_merge else f'{DIM}x{DIM}'} | {row['dtype']} ({row['adapter_dtype']}) "
              f"| {fmt(row['lora_us'])} | {peft_ratio:.3f}x | {fmt(ours_us)} "
              f"| {fmt(ours_ratio, 3) + 'x' if ours_ratio else 'n/a'} | {fmt(speedup, 2) + 'x' if speedup else 'n/a'} "
              f"| {fmt(row['lora_us']) if is_merge else ''} | {fmt(ours_us) if is_merge else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
