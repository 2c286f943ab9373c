#!/usr/bin/env python3
"""One Conv2d layer: our LoRA, DoRA, IA3, LoHa, LoKr and OFT against Hugging Face PEFT's, side by side in one run.

On the CPU, fp32, the same thread count on both sides::

    cmake --build build-torch2 -j2 --target bench_conv   # LibTorch of the torch wheel PEFT runs on
    python bench/compare_conv_peft.py --bench build-torch2/bench/bench_conv --threads 2

(with the venv's python: ``$(bash scripts/python-env.sh | tail -n1)``). The layer: ``Conv2d(C, C, k,
padding=k // 2)`` with bias, C 64, kernels 1x1 and 3x3, inputs 8 x C x 32 x 32. Each method on it, with
the same config on both sides (``bench/bench_conv.cpp``'s d9d JSON, PEFT's config here):

- LoRA and DoRA: r 8, alpha 16, B drawn N(0, 0.01) so the low-rank path is not zero;
- IA3 (not feed-forward: the output scaled), the vector drawn U(0.5, 1.5);
- LoHa and LoKr: r 8, alpha 16, ``init_weights=False`` (flat LoHa, ``use_effective_conv2d`` off);
- OFT: ``oft_block_size=32``, ``init_weights=False``, Cayley-Neumann (PEFT's defaults otherwise).

On 3x3 kernels PEFT's OFT forward is not the computation ours does (docs/conv.md: it rotates unfolded
input patches and folds them back; ours convolves with the rotated filters, PEFT's merged model), so
that row compares the cost of two different forwards for the same adapter.

Forward: no grad. Forward + backward: input requiring grad, loss ``mean(y**2)``, gradients set to None
before each step. Time: in each process, median of --trials alternating trials (each method with its
own plain layer) of about --trial-s seconds; the two sides run --repeats times alternately, in fresh
processes, and the table takes the medians. Prints one markdown table: each side's ratio to its plain
layer, and our time over PEFT's.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step_timing import run, time_alternating  # noqa: E402

METHODS = ["lora", "dora", "ia3", "loha", "lokr", "oft"]


def peft_config(method: str, rank: int):
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    target = ["conv"]
    return {
        "lora": lambda: LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=target),
        "dora": lambda: LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=target,
                                   use_dora=True),
        "ia3": lambda: IA3Config(target_modules=target, feedforward_modules=[]),
        "loha": lambda: LoHaConfig(r=rank, alpha=2 * rank, target_modules=target, init_weights=False),
        "lokr": lambda: LoKrConfig(r=rank, alpha=2 * rank, target_modules=target, init_weights=False),
        "oft": lambda: OFTConfig(r=0, oft_block_size=32, target_modules=target, init_weights=False),
    }[method]()


def peft_side(args) -> int:
    """Child process: each method's PEFT layer against the plain Conv2d, CSV lines as bench_conv --csv prints them."""
    import warnings

    import torch
    from torch import nn
    from peft import get_peft_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    class Net(nn.Module):
        def __init__(self, kernel):
            super().__init__()
            self.conv = nn.Conv2d(args.channels, args.channels, kernel, padding=kernel // 2)

        def forward(self, x):
            return self.conv(x)

    rows = []
    for kernel in args.kernels:
        for method in args.methods:
            torch.manual_seed(0)
            plain = Net(kernel)
            adapted = Net(kernel)
            adapted.load_state_dict(plain.state_dict())
            plain.requires_grad_(False)
            model = get_peft_model(adapted, peft_config(method, args.rank))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.01)
                    if "ia3_l" in name:
                        p.uniform_(0.5, 1.5)
            if not any(p.requires_grad for p in model.parameters()):
                raise RuntimeError(f"compare_conv_peft: PEFT's {method} trains nothing")
            model.eval()
            x = torch.randn(args.batch, args.channels, args.size, args.size)
            x_grad = x.clone().requires_grad_(True)

            def forward(net):
                def step():
                    with torch.no_grad():
                        net(x)
                return step

            def forward_backward(net):
                params = [p for p in net.parameters() if p.requires_grad]

                def step():
                    for p in params:
                        p.grad = None
                    x_grad.grad = None
                    net(x_grad).square().mean().backward()
                return step

            for mode, make in (("fwd", forward), ("fwdbwd", forward_backward)):
                ms = time_alternating([make(plain), make(model)], args.trials, args.trial_s)
                rows.append((method, kernel, mode, "plain", ms[0]))
                rows.append((method, kernel, mode, "adapted", ms[1]))
    for method, kernel, mode, variant, ms in rows:
        print(f"time,{method},{kernel},{mode},{variant},{ms:.4f}")
    return 0


def parse_csv(text: str) -> dict:
    times = {}
    for line in text.splitlines():
        fields = line.strip().split(",")
        if fields[0] == "time":
            times[(fields[1], int(fields[2]), fields[3], fields[4])] = float(fields[5])
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", help="our bench_conv binary")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, both sides (default 2)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"default {','.join(METHODS)}")
    parser.add_argument("--kernels", default="1,3", help="kernel sizes, 1 and/or 3 (default 1,3)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--trials", type=int, default=5, help="alternating trials per process (default 5)")
    parser.add_argument("--trial-s", type=float, default=0.3, help="seconds per trial (default 0.3)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per side, alternating (default 3)")
    parser.add_argument("--peft-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {METHODS}")
    args.kernels = [int(k) for k in args.kernels.split(",")]
    if any(k not in (1, 3) for k in args.kernels):
        parser.error("--kernels: 1 and 3 are measured")
    if args.peft_side:
        return peft_side(args)
    if not args.bench:
        parser.error("--bench (our bench_conv binary) is required")

    import peft
    import torch

    shape = ["--methods", ",".join(args.methods), "--kernels", ",".join(map(str, args.kernels)),
             "--channels", str(args.channels), "--size", str(args.size), "--batch", str(args.batch),
             "--rank", str(args.rank), "--threads", str(args.threads), "--trials", str(args.trials),
             "--trial-s", str(args.trial_s)]
    ours_cmd = [args.bench, "--csv"] + shape
    peft_cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--peft-side"] + shape
    print(f"compare_conv_peft: torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads, fp32, "
          f"CPU; Conv2d {args.channels} -> {args.channels}, inputs {args.batch} x {args.channels} x {args.size} x "
          f"{args.size}, r {args.rank}; {args.repeats} processes per side, each the median of {args.trials} "
          f"alternating trials of ~{args.trial_s} s", flush=True)
    ours_runs, peft_runs = [], []
    for repeat in range(args.repeats):
        for cmd, runs, label in ((ours_cmd, ours_runs, "ours"), (peft_cmd, peft_runs, "PEFT")):
            start = time.perf_counter()
            runs.append(parse_csv(run(cmd, "compare_conv_peft")))
            print(f"  run {repeat + 1}/{args.repeats}, {label}: {time.perf_counter() - start:.0f} s", flush=True)

    def med(runs, key):
        values = [r[key] for r in runs if key in r]
        if len(values) != len(runs):
            raise SystemExit(f"compare_conv_peft: a run printed no time for {key}")
        return statistics.median(values)

    print()
    print("| method | kernel | step | plain ms | ours ms | ours / plain | PEFT's plain ms | PEFT ms | PEFT / plain | "
          "ours / PEFT |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for kernel in args.kernels:
        for method in args.methods:
            for mode, label in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
                o_plain = med(ours_runs, (method, kernel, mode, "plain"))
                o = med(ours_runs, (method, kernel, mode, "adapted"))
                p_plain = med(peft_runs, (method, kernel, mode, "plain"))
                p = med(peft_runs, (method, kernel, mode, "adapted"))
                print(f"| {method} | {kernel}x{kernel} | {label} | {o_plain:.3f} | {o:.3f} | {o / o_plain:.3f}× | "
                      f"{p_plain:.3f} | {p:.3f} | {p / p_plain:.3f}× | {o / p:.3f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
