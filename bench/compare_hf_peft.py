#!/usr/bin/env python3
"""Hugging Face PEFT against d9d-peft, side by side in one run: on one CUDA GPU, or on the CPU.

CPU (``--device cpu``; our binaries built against the LibTorch inside the same
torch wheel that PEFT runs on, so that both call the same kernels and BLAS)::

    D9D_LIBTORCH=wheel bash scripts/quickstart.sh   # or configure build-torch2 as scripts/test.sh does
    cmake --build build-torch2 -j --target bench_lora bench_train_step
    python bench/compare_hf_peft.py --device cpu --bench-lora build-torch2/bench/bench_lora \
        --train-step build-torch2/bench/bench_train_step

(with the venv's python: ``$(bash scripts/python-env.sh | tail -n1)``). It
times PEFT's LoRA linear against nn.Linear and ours (bench_lora) against the
plain layer, fp32, in = out in {1024, 4096}, 16 and 512 tokens, r 16: forward
and forward+backward; then one AdamW step of the example trainer's GPT at the
default size and at a mid size (d_model 1024, 4 layers, 512 tokens a step),
LoRA r 16 on every projection and full fine-tuning: tokens/s and peak memory
(peak RSS above the process's RSS before the model was built), each size and
mode in its own processes, sides alternating, medians of 3. It prints one
markdown table per part and whether the targets of docs/performance.md are met.

GPU (the default, ``--device cuda``):

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

With ``--train-step BIN`` it also compares one training step of the example
trainer's model (examples/trainer/gpt.h, rebuilt below in PyTorch layer for
layer: same attention with an explicit causal mask, GELU MLP, pre-norm, no
SDPA) with LoRA r=16, lora_alpha=32 on every projection and AdamW, at the
trainer's default size and at a large one (d_model 2048, 16 layers, 2048
tokens a step): tokens/s of PEFT and of ``bench_train_step``, and each side's
peak CUDA memory for LoRA against full fine-tuning of the same model.

Usage (on the GPU machine, from the repository root)::

    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \\
        -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')"
    cmake --build build -j --target gpu_bench
    python3 bench/compare_hf_peft.py --gpu-bench build/bench/gpu_bench
    cmake --build build -j --target bench_train_step
    python3 bench/compare_hf_peft.py --gpu-bench build/bench/gpu_bench \\
        --train-step build/bench/bench_train_step

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


def backward_steps(plain, layer, x, lora_a, lora_b):
    """Forward+backward of the plain layer and of PEFT's LoRA layer (base frozen, input requiring grad),
    resetting the gradients each call as zero_grad(set_to_none) does."""

    def plain_step():
        plain(x).sum().backward()
        x.grad = None

    def lora_step():
        layer(x).sum().backward()
        x.grad = None
        lora_a.grad = None
        lora_b.grad = None

    return plain_step, lora_step


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
        p, q = time_pair_us(*backward_steps(plain, layer, x, lora_a, lora_b))
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


# ----------------------------------------------------------- training step
# Sizes as bench_train_step's: (vocab, context, d_model, layers, heads, d_ff, batch, tokens a sequence).
TRAIN_SIZES = {
    "default": (26, 17, 128, 2, 4, 256, 64, 16),
    "mid": (1024, 512, 1024, 4, 16, 4096, 1, 512),
    "large": (32000, 2048, 2048, 16, 16, 8192, 1, 2048),
}
TRAIN_STEPS = {"default": 50, "mid": 5, "large": 10}
CPU_TRAIN_WARMUP = {"default": 5, "mid": 2}
TRAIN_WARMUP = 5
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def build_gpt(vocab, context, d_model, n_layers, n_heads, d_ff):
    """examples/trainer/gpt.h in PyTorch, with the same module names (tests/peft_reference/twins.py)."""
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "peft_reference"))
    from twins import Gpt

    return Gpt(vocab, context, d_model, n_layers, n_heads, d_ff)


def peft_training_step(size: str, mode: str, device: str, dtype, autocast_adapter_dtype: bool = True):
    """The trainer's GPT with PEFT's LoRA r 16 on every projection (or nothing: full fine-tuning)
    and AdamW: returns one training step as a function, and the tokens it processes."""
    import torch
    from peft import LoraConfig, get_peft_model

    vocab, context, d_model, n_layers, n_heads, d_ff, batch, tokens = TRAIN_SIZES[size]
    torch.manual_seed(0)
    model = build_gpt(vocab, context, d_model, n_layers, n_heads, d_ff).to(device=device, dtype=dtype)
    if mode == "lora":
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS)
        model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, vocab, (batch, tokens + 1), device=device)
    inputs, targets = ids[:, :tokens], ids[:, 1:].reshape(-1)

    def step():
        optimizer.zero_grad()
        logits = model(inputs)
        torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets).backward()
        optimizer.step()

    return step, batch * tokens


def measure_peft_step(size: str, mode: str, dtype_name: str, autocast_adapter_dtype: bool) -> dict:
    import time

    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    step, tokens_per_step = peft_training_step(size, mode, "cuda", dtype, autocast_adapter_dtype)
    for _ in range(TRAIN_WARMUP):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    steps = TRAIN_STEPS[size]
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    del step
    torch.cuda.empty_cache()
    return {"tokens_per_s": tokens_per_step * steps / seconds, "peak_bytes": peak}


def run_our_step(binary: str, size: str, mode: str, dtype_name: str, device: str = "cuda",
                 warmup: int = TRAIN_WARMUP) -> dict:
    """One bench_train_step process: its tokens/s and peak bytes."""
    cmd = [binary, "--size", size, "--mode", mode, "--device", device, "--dtype", dtype_name,
           "--steps", str(TRAIN_STEPS[size]), "--warmup", str(warmup), "--csv"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    lines = proc.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("mode,")), None)
    if header is None:
        raise SystemExit(f"{' '.join(cmd)} printed no CSV header:\n{proc.stdout}")
    row = next(csv.DictReader(io.StringIO("\n".join(lines[header:]))))
    return {"tokens_per_s": float(row["tokens_per_s"]), "peak_bytes": int(row["peak_bytes"])}


def print_train_steps(binary: str, autocast_adapter_dtype: bool) -> None:
    import torch

    print("\nOne training step of the example trainer's model (LoRA r=16 on every projection, AdamW; "
          "full = full fine-tuning of the same model). Peak memory: CUDA allocator peak over the timed steps, "
          "weights included.\n")
    print("| size | dtype | PEFT tokens/s | ours tokens/s | ours / PEFT | PEFT peak MiB LoRA / full "
          "| ours peak MiB LoRA / full |")
    print("|---|---|---:|---:|---:|---:|---:|")
    mib = 1024.0 * 1024.0
    for size in TRAIN_SIZES:
        for dtype_name in ("bfloat16", "float32"):
            theirs = {m: measure_peft_step(size, m, dtype_name, autocast_adapter_dtype) for m in ("lora", "full")}
            ours = {m: run_our_step(binary, size, m, dtype_name) for m in ("lora", "full")}
            torch.cuda.empty_cache()
            print(f"| {size} | {dtype_name} | {theirs['lora']['tokens_per_s']:.0f} | {ours['lora']['tokens_per_s']:.0f} "
                  f"| {ours['lora']['tokens_per_s'] / theirs['lora']['tokens_per_s']:.2f}x "
                  f"| {theirs['lora']['peak_bytes'] / mib:.0f} / {theirs['full']['peak_bytes'] / mib:.0f} "
                  f"| {ours['lora']['peak_bytes'] / mib:.0f} / {ours['full']['peak_bytes'] / mib:.0f} |")


# ------------------------------------------------------------------- CPU
# Both sides on the CPU of this machine, our binaries built against the LibTorch
# inside the same torch wheel that PEFT runs on, so that the same kernels (and
# the same BLAS) do the arithmetic and the table compares the libraries.
CPU_DIMS = (1024, 4096)
CPU_TOKENS = (16, 512)
CPU_TRIALS = 5
CPU_TRIAL_S = 0.3
CPU_STEP_ROUNDS = 3


def cpu_time_pair_us(plain, lora) -> tuple[float, float]:
    """Median over alternating trials of ~0.3 s each, microseconds per call."""
    import time

    def per_call(fn, iters):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e6 / iters

    def calibrate(fn):
        fn()
        us = per_call(fn, 2)
        return max(2, int(CPU_TRIAL_S * 1e6 / max(us, 1.0)))

    pi, li = calibrate(plain), calibrate(lora)
    p, q = [], []
    for _ in range(CPU_TRIALS):
        p.append(per_call(plain, pi))
        q.append(per_call(lora, li))
    return statistics.median(p), statistics.median(q)


def measure_peft_cpu() -> dict:
    """PEFT's LoRA linear (fp32, r 16, alpha 32, dropout 0) against nn.Linear, as bench_lora times ours."""
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model

    class OneLayer(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.proj = nn.Linear(d, d, bias=False)

        def forward(self, x):
            return self.proj(x)

    rows = {}
    for d in CPU_DIMS:
        torch.manual_seed(0)
        plain = nn.Linear(d, d, bias=False)
        plain.weight.requires_grad_(False)
        model = get_peft_model(OneLayer(d), LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=["proj"]))
        layer = model.base_model.model.proj
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            lora_b.normal_(0.0, 1e-3)
        for t in CPU_TOKENS:
            with torch.no_grad():
                layer.eval()
                x = torch.randn(t, d)
                rows[("forward", d, t)] = cpu_time_pair_us(lambda: plain(x), lambda: layer(x))
            layer.train()
            xg = torch.randn(t, d, requires_grad=True)
            rows[("forward_backward", d, t)] = cpu_time_pair_us(*backward_steps(plain, layer, xg, lora_a, lora_b))
    return rows


def run_ours_cpu(bench_lora: str) -> dict:
    """bench_lora's medians for the same shapes (its JSON output)."""
    import json
    import os
    import tempfile

    names = "|".join(f"d={d}/t={t}" for d in CPU_DIMS for t in CPU_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [bench_lora, f"--benchmark_filter=^(Plain|LoRA)/(Forward|ForwardBackward)/({names})(/r={RANK})?/min_time",
               f"--benchmark_out={out}", "--benchmark_out_format=json", "--benchmark_repetitions=3",
               "--benchmark_enable_random_interleaving=true"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        data = json.load(open(out))
    medians = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        parts = b["run_name"].split("/")
        side, kind = parts[0], {"Forward": "forward", "ForwardBackward": "forward_backward"}[parts[1]]
        d, t = int(parts[2][2:]), int(parts[3][2:])
        scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b["time_unit"]]
        medians[(kind, d, t, side)] = b["real_time"] * scale
    return {(k, d, t): (medians[(k, d, t, "Plain")], medians[(k, d, t, "LoRA")])
            for (k, d, t, side) in medians if side == "LoRA"}


def peft_step_cpu(size: str, mode: str) -> dict:
    """One size and mode in this process (run as a child, so peak RSS is its own)."""
    import time

    import peft  # noqa: F401 - imported before the baseline, so that its own memory is not counted
    import torch

    baseline = current_rss_bytes()
    step, tokens_per_step = peft_training_step(size, mode, "cpu", torch.float32)
    for _ in range(CPU_TRAIN_WARMUP[size]):
        step()
    steps = TRAIN_STEPS[size]
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens_per_step * steps / seconds, "peak_bytes": peak_rss_bytes() - baseline}


def peak_rss_bytes() -> int:
    """VmHWM: this process image's peak RSS. (getrusage's ru_maxrss is not: Linux carries the
    parent's peak across fork and exec, so a child of a large process would report the parent's.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_peft_step_cpu(size: str, mode: str) -> dict:
    import json

    cmd = [sys.executable, __file__, "--peft-step-child", size, mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_our_step_cpu(binary: str, size: str, mode: str) -> dict:
    return run_our_step(binary, size, mode, "float32", device="cpu", warmup=CPU_TRAIN_WARMUP[size])


def main_cpu(args) -> int:
    import datetime
    import platform

    import peft
    import torch

    warnings.filterwarnings("ignore")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU comparison, {datetime.date.today()}: {cpu}, {os_cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), peft {peft.__version__}; ours built against that torch's LibTorch.\n")
    ok = True
    if args.bench_lora:
        # Alternate the sides CPU_STEP_ROUNDS times and take the median of each time:
        # single runs on a shared 2-core machine move by 10-50 %.
        ours_runs, theirs_runs = [], []
        for _ in range(CPU_STEP_ROUNDS):
            ours_runs.append(run_ours_cpu(args.bench_lora))
            theirs_runs.append(measure_peft_cpu())

        def median_pairs(runs):
            return {k: (statistics.median(r[k][0] for r in runs), statistics.median(r[k][1] for r in runs))
                    for k in runs[0]}

        ours, theirs = median_pairs(ours_runs), median_pairs(theirs_runs)
        print(f"LoRA linear, fp32, r = {RANK}, lora_alpha = {ALPHA}, dropout 0; medians over {CPU_STEP_ROUNDS} "
              "alternating rounds (a round: PEFT's median of 5 trials of ~0.3 s; ours, bench_lora's median of 3 "
              "repetitions). 'ratio' is LoRA / the plain layer in the same framework.\n")
        print("'PEFT / ours' compares the LoRA times; 'same plain' compares them after scaling each by its "
              "own plain layer's time (PEFT ratio / ours ratio): both plain layers are the same LibTorch GEMM, "
              "so this removes the drift of a shared machine between the two processes.\n")
        print("| what | in = out | tokens | PEFT µs | PEFT ratio | ours µs | ours ratio | PEFT / ours "
              "| same plain |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind in ("forward", "forward_backward"):
            for d in CPU_DIMS:
                for t in CPU_TOKENS:
                    pp, pl = theirs[(kind, d, t)]
                    op, ol = ours[(kind, d, t)]
                    if kind == "forward":
                        ok &= ol <= pl
                    print(f"| {kind} | {d} | {t} | {pl:.1f} | {pl / pp:.3f}x | {ol:.1f} | {ol / op:.3f}x "
                          f"| {pl / ol:.2f}x | {(pl / pp) / (ol / op):.2f}x |")
        print()
    if args.train_step:
        print("One training step of the example trainer's GPT on the CPU, fp32, AdamW; LoRA r 16 (alpha 32) on every "
              "projection, or full fine-tuning of the same model; medians of 3 processes per side, alternating. "
              "Peak memory: the process's peak RSS (VmHWM) above its RSS before the model was built (weights, "
              "gradients, optimizer state, activations, and the library code first paged in during the run).\n")
        print("| size | mode | PEFT tokens/s | ours tokens/s | ours / PEFT | PEFT peak MiB | ours peak MiB |")
        print("|---|---|---:|---:|---:|---:|---:|")
        mib = 1024.0 * 1024.0
        results = {}

        def median_run(runs):
            return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

        for size in ("default", "mid"):
            for mode in ("lora", "full"):
                # Alternate the two sides, CPU_STEP_ROUNDS processes each, and take medians:
                # a shared 2-core machine moves single runs by 10-20 %.
                theirs_runs, ours_runs = [], []
                for _ in range(CPU_STEP_ROUNDS):
                    theirs_runs.append(run_peft_step_cpu(size, mode))
                    ours_runs.append(run_our_step_cpu(args.train_step, size, mode))
                theirs, ours = median_run(theirs_runs), median_run(ours_runs)
                results[(size, mode)] = (theirs, ours)
                print(f"| {size} | {mode} | {theirs['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} "
                      f"| {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | {theirs['peak_bytes'] / mib:.0f} "
                      f"| {ours['peak_bytes'] / mib:.0f} |", flush=True)
        lora_full_speed = results[("mid", "lora")][1]["tokens_per_s"] / results[("mid", "full")][1]["tokens_per_s"]
        lora_full_mem = results[("mid", "lora")][1]["peak_bytes"] / results[("mid", "full")][1]["peak_bytes"]
        print(f"\nOurs at the mid size: LoRA step {lora_full_speed:.2f}x full fine-tuning's tokens/s, "
              f"{lora_full_mem:.2f}x its peak memory.")
        for size, bar in (("default", 2.0), ("mid", 1.1)):
            r = results[(size, "lora")][1]["tokens_per_s"] / results[(size, "lora")][0]["tokens_per_s"]
            ok &= r >= bar
            print(f"Target: ours >= {bar}x PEFT's LoRA tokens/s at the {size} size: {r:.2f}x "
                  f"{'met' if r >= bar else 'MISSED'}")
        ok &= lora_full_speed >= 1.4 and lora_full_mem <= 0.55
        print(f"Target: LoRA >= 1.4x full fine-tuning tokens/s and <= 0.55x its peak memory (mid): "
              f"{'met' if lora_full_speed >= 1.4 and lora_full_mem <= 0.55 else 'MISSED'}")
    if args.bench_lora:
        print(f"Target: our LoRA linear forward <= PEFT's time at every shape: {'met' if ok else 'see the table'}")
    return 0


def os_cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default): the GPU comparison; cpu: the CPU comparison (--bench-lora and/or "
                             "--train-step)")
    parser.add_argument("--gpu-bench", help="path to d9d-peft's gpu_bench binary (--device cuda)")
    parser.add_argument("--bench-lora", metavar="BIN", help="path to d9d-peft's bench_lora binary (--device cpu)")
    parser.add_argument("--peft-step-child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--no-autocast-adapter-dtype", action="store_true",
                        help="keep PEFT's adapters in the model's dtype (get_peft_model(..., "
                             "autocast_adapter_dtype=False)); by default PEFT keeps bf16 models' adapters in fp32")
    parser.add_argument("--train-step", metavar="BIN",
                        help="path to d9d-peft's bench_train_step binary: also compare one training step of "
                             "the example trainer's model")
    args = parser.parse_args()
    if args.peft_step_child:
        import json

        print(json.dumps(peft_step_cpu(*args.peft_step_child)))
        return 0
    if args.device == "cpu":
        if not (args.bench_lora or args.train_step):
            parser.error("--device cpu needs --bench-lora BIN and/or --train-step BIN")
        return main_cpu(args)
    if not args.gpu_bench:
        parser.error("--device cuda needs --gpu-bench BIN")

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
    if args.train_step:
        print_train_steps(args.train_step, autocast_adapter_dtype=not args.no_autocast_adapter_dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
