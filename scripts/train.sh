#!/usr/bin/env bash
# Builds and runs the example trainer, examples/trainer (d9d-peft-train): pretrains a
# small GPT on a synthetic task (once), fine-tunes a LoRA adapter on a second task,
# saves it in Hugging Face PEFT format, merges it, and prints a summary.
# Arguments go to d9d-peft-train (try --help); everything is written under ./runs/.
#   D9D_LIBTORCH  debian (default: Debian's libtorch-dev 1.13, CPU) or wheel (the
#                 LibTorch 2.x with CUDA inside PyPI's torch wheel, for --device cuda)
#   BUILD_DIR     build directory (default: build, or build-torch2 with the wheel)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

(cd "$root" && bash scripts/install-deps.sh)
source "$root/scripts/libtorch.sh"

build="${BUILD_DIR:-$default_build}"
[[ "$build" = /* ]] || build="$root/$build"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release "${libtorch_args[@]}"
cmake --build "$build" -j"$(nproc)" --target d9d_peft_train
"$build/examples/trainer/d9d-peft-train" "$@"
