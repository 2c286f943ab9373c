"""Wall-clock timing of CPU steps for the compare_*_peft.py scripts, as bench/step_timing.h does for
the C++ benchmarks: a step's time is the median of trials of about `trial_s` seconds of back-to-back
calls, the steps compared alternating trial by trial so that drift hits every side alike."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time


def per_step_ms(fn, iterations: int) -> float:
    """Milliseconds per call over `iterations` back-to-back calls of `fn`."""
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) * 1e3 / iterations


def time_alternating(fns, trials: int, trial_s: float) -> list[float]:
    """Medians of alternating trials of each step, milliseconds per step."""
    iterations = []
    for fn in fns:
        fn()  # warm-up
        iterations.append(max(1, int(trial_s * 1e3 / max(per_step_ms(fn, 1), 1e-3))))
    samples = [[] for _ in fns]
    for _ in range(trials):
        for i, fn in enumerate(fns):
            samples[i].append(per_step_ms(fn, iterations[i]))
    return [statistics.median(s) for s in samples]


def run(cmd: list[str], who: str) -> str:
    """`cmd`'s standard output; on a failure its standard error, and exit naming `who`."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{who}: {' '.join(cmd)} failed with status {done.returncode}")
    return done.stdout
