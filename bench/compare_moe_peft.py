#!/usr/bin/env python3
"""One MoE layer: our expert LoRA against Hugging Face PEFT's ``target_parameters`` LoRA, side by side in one run.

On the CPU, fp32, the same thread count on both sides::

    cmake --build build-torch2 -j2 --target bench_moe   # LibTorch of the torch wheel PEFT runs on
    python bench/compare_moe_peft.py --bench build-torch2/bench/bench_moe --threads 2

(with the venv's python: ``$(bash scripts/python-env.sh | tail -n1)``). The layer, per E in {8, 64}:
SwiGLU experts (gate, up: d 1024 -> ff 512; down: ff -> d), top-2 routing of 2048 tokens (4096 routed
rows), LoRA r 16, alpha 32 on every expert projection, base frozen.

- Ours (``bench/bench_moe.cpp``): three ``d9d::nn::GroupedLinear`` with ``LoRAGroupedLinear`` on each.
- PEFT: the Python twin's experts (``tests/peft_reference/moe_twin.py``, transformers 5's layout:
  ``gate_up_proj`` [E, 2ff, d], ``down_proj`` [E, d, ff], a loop over the experts as in
  ``Qwen3MoeExperts``) with ``LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"])``.
  PEFT has one rank-16 pair on the fused gate_up matrix where ours has one on gate and one on up (ours
  does slightly more LoRA work). The twin without PEFT is the Python plain layer.

Routing is fixed: token t goes to experts e1 = h mod E and e2 = (e1 + 1 + (h >> 32) mod (E - 1)) mod E
with weights 1/2 + ((h >> 11) & 0xFFFF) / 2^17 and 1 minus that, h = splitmix64(t); both sides compute
it and print their token count per expert, which this script checks are equal. The dispatch (sort or
``torch.where`` per expert, gather, weighted ``index_add``) runs inside every timed step on both sides.
Forward: no grad. Forward + backward: input requiring grad, loss ``mean(y**2)``, gradients set to None
before each step.

Time: median of --trials alternating trials (plain, LoRA) of about --trial-s seconds per step kind in
each process; the two sides run --repeats times alternately, in fresh processes, and the table takes
the medians. Peak memory: the peak, during one step, of the bytes held through LibTorch's CPU
allocator above what was held when the step began (weights and inputs excluded), read on both sides
from the allocator's own accounting (``c10::ProfiledCPUMemoryReporter``: here through
``torch.profiler.profile(profile_memory=True)``, in C++ through the same hook). Prints one markdown
table and whether the targets hold.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

MASK = (1 << 64) - 1
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from step_timing import run, time_alternating  # noqa: E402


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def routing(tokens: int, experts: int):
    """The fixed top-2 routing of bench_moe.cpp: ([tokens, 2] int64 experts, [tokens, 2] float32 weights)."""
    import torch

    index, weight = [], []
    for t in range(tokens):
        h = splitmix64(t)
        first = h % experts
        second = (first + 1 + (h >> 32) % (experts - 1)) % experts
        w = 0.5 + ((h >> 11) & 0xFFFF) / 131072.0
        index.append((first, second))
        weight.append((w, 1.0 - w))
    return torch.tensor(index, dtype=torch.long), torch.tensor(weight, dtype=torch.float32)


def peak_bytes(step) -> int:
    """Peak bytes held through the CPU allocator during `step`, above the level when it began."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if not events:
        raise RuntimeError("compare_moe_peft: the profiler reported no CPU allocation during the step")
    events.sort()
    base = events[0][2] - events[0][1]
    return max(total - base for _, _, total in events)


def peft_side(args) -> int:
    """Child process: the twin plain and with PEFT's LoRA, CSV lines as bench_moe --csv prints them."""
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(ROOT / "tests" / "peft_reference"))
    from moe_twin import MoeTwinConfig, MoeTwinExperts

    torch.set_num_threads(args.threads)

    class OneMoeLayer(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.experts = MoeTwinExperts(cfg)

        def forward(self, x, top_k_index, top_k_weights):
            return self.experts(x, top_k_index, top_k_weights)

    rows = []
    for experts in args.experts:
        torch.manual_seed(0)
        cfg = MoeTwinConfig(d=args.d, ff=args.ff, experts=experts, top_k=2, layout="fused")
        plain = OneMoeLayer(cfg)
        adapted = OneMoeLayer(cfg)
        adapted.load_state_dict(plain.state_dict())
        plain.requires_grad_(False)
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, init_lora_weights=False,
                            target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        peft_model = get_peft_model(adapted, config)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        if not trainable or any(p.requires_grad for p in plain.parameters()):
            raise RuntimeError("compare_moe_peft: PEFT trains nothing, or the plain twin is not frozen")
        index, weight = routing(args.tokens, experts)
        counts = torch.bincount(index.reshape(-1), minlength=experts)
        print(f"counts,{experts},{';'.join(str(int(c)) for c in counts)}", flush=True)
        x = torch.randn(args.tokens, args.d)
        x_grad = x.clone().requires_grad_(True)

        def forward(model):
            def step():
                with torch.no_grad():
                    model(x, index, weight)
            return step

        def forward_backward(model):
            params = [p for p in model.parameters() if p.requires_grad]

            def step():
                for p in params:
                    p.grad = None
                x_grad.grad = None
                model(x_grad, index, weight).square().mean().backward()
            return step

        for mode, make in (("fwd", forward), ("fwdbwd", forward_backward)):
            steps = [make(plain), make(peft_model)]
            ms = time_alternating(steps, args.trials, args.trial_s)
            rows.append((experts, mode, "plain", ms[0], peak_bytes(steps[0])))
            rows.append((experts, mode, "lora", ms[1], peak_bytes(steps[1])))
    for experts, mode, variant, ms, peak in rows:
        print(f"time,{experts},{mode},{variant},{ms:.3f},{peak}")
    return 0


def parse_csv(text: str):
    counts, times = {}, {}
    for line in text.splitlines():
        fields = line.strip().split(",")
        if fields[0] == "counts":
            counts[int(fields[1])] = fields[2]
        elif fields[0] == "time":
            times[(int(fields[1]), fields[2], fields[3])] = (float(fields[4]), int(fields[5]))
    return counts, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", help="our bench_moe binary")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, both sides (default 2)")
    parser.add_argument("--experts", default="8,64", help="expert counts (default 8,64)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--ff", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--trials", type=int, default=5, help="alternating trials per process (default 5)")
    parser.add_argument("--trial-s", type=float, default=0.5, help="seconds per trial (default 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per side, alternating (default 3)")
    parser.add_argument("--peft-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.experts = [int(e) for e in args.experts.split(",")]
    if any(e < 2 for e in args.experts):
        parser.error("--experts: top-2 routing needs at least 2 experts")
    if args.peft_side:
        return peft_side(args)
    if not args.bench:
        parser.error("--bench (our bench_moe binary) is required")

    import peft
    import torch

    shape = ["--experts", ",".join(map(str, args.experts)), "--tokens", str(args.tokens), "--d", str(args.d),
             "--ff", str(args.ff), "--rank", str(args.rank), "--threads", str(args.threads),
             "--trials", str(args.trials), "--trial-s", str(args.trial_s)]
    ours_cmd = [args.bench, "--csv"] + shape
    peft_cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--peft-side"] + shape
    print(f"compare_moe_peft: torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads, fp32, CPU; "
          f"d {args.d}, ff {args.ff}, {args.tokens} tokens, top-2, r {args.rank}; {args.repeats} processes per side, "
          f"each the median of {args.trials} alternating trials of ~{args.trial_s} s", flush=True)
    ours_runs, peft_runs = [], []
    for repeat in range(args.repeats):
        for cmd, runs, label in ((ours_cmd, ours_runs, "ours"), (peft_cmd, peft_runs, "PEFT")):
            start = time.perf_counter()
            counts, times = parse_csv(run(cmd, "compare_moe_peft"))
            runs.append((counts, times))
            print(f"  run {repeat + 1}/{args.repeats}, {label}: {time.perf_counter() - start:.0f} s", flush=True)
    for experts in args.experts:
        ours_counts = {c[experts] for c, _ in ours_runs}
        peft_counts = {c[experts] for c, _ in peft_runs}
        if len(ours_counts | peft_counts) != 1:
            raise SystemExit(f"compare_moe_peft: E={experts}: the two sides routed differently "
                             f"(tokens per expert: ours {ours_counts}, PEFT {peft_counts})")

    def med(runs, key):
        return (statistics.median(t[key][0] for _, t in runs), statistics.median(t[key][1] for _, t in runs))

    mib = 1 << 20
    print()
    print("| E | step | plain grouped ms | our LoRA ms | our LoRA / plain | twin plain ms | PEFT LoRA ms | "
          "PEFT / twin plain | our LoRA / PEFT | peak MiB: plain grouped | our LoRA | twin plain | PEFT LoRA |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for experts in args.experts:
        for mode, label in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
            o_plain, o_plain_mem = med(ours_runs, (experts, mode, "plain"))
            o_lora, o_lora_mem = med(ours_runs, (experts, mode, "lora"))
            p_plain, p_plain_mem = med(peft_runs, (experts, mode, "plain"))
            p_lora, p_lora_mem = med(peft_runs, (experts, mode, "lora"))
            print(f"| {experts} | {label} | {o_plain:.1f} | {o_lora:.1f} | {o_lora / o_plain:.3f}× | {p_plain:.1f} | "
                  f"{p_lora:.1f} | {p_lora / p_plain:.3f}× | {o_lora / p_lora:.3f}× | {o_plain_mem / mib:.1f} | "
                  f"{o_lora_mem / mib:.1f} | {p_plain_mem / mib:.1f} | {p_lora_mem / mib:.1f} |")
            if mode == "fwdbwd":
                ratio = o_lora / o_plain
                verdicts.append(f"E={experts}: our LoRA forward+backward / plain grouped = {ratio:.3f}× "
                                f"({'met' if ratio <= 1.25 else 'NOT met'}, <= 1.25×)")
                if experts == 64:
                    speedup = p_lora / o_lora
                    verdicts.append(f"E=64: PEFT LoRA / our LoRA, forward+backward = {speedup:.2f}× "
                                    f"({'met' if speedup >= 2 else 'NOT met'}, >= 2×); peak {o_lora_mem / mib:.1f} "
                                    f"against {p_lora_mem / mib:.1f} MiB "
                                    f"({'lower: met' if o_lora_mem < p_lora_mem else 'NOT lower'})")
    print()
    for line in verdicts:
        print("target, " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
