#!/usr/bin/env bash
# Builds and runs the example trainer, examples/trainer (d9d-peft-train): pretrains a
# small GPT on a synthetic task (once), fine-tunes a LoRA adapter on a second task,
# saves it in Hugging Face PEFT format, merges it, and prints a summary.
# Arguments go to d9d-peft-train (try --help); everything is written under ./runs/.
#   BUILD_DIR  build directory (default: build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

(cd "$root" && bash scripts/install-deps.sh)

build="${BUILD_DIR:-build}"
[[ "$build" = /* ]] || build="$root/$build"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j"$(nproc)" --target d9d_peft_train
"$build/examples/trainer/d9d-peft-train" "$@"
