#!/usr/bin/env bash
# Builds and runs examples/quickstart.cpp: the PEFT lifecycle in one page.
#   D9D_LIBTORCH  debian (default) or wheel: which LibTorch (see scripts/libtorch.sh)
#   BUILD_DIR     build directory (default: build, or build-torch2 with the wheel)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
source scripts/libtorch.sh

build="${BUILD_DIR:-$default_build}"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "${libtorch_args[@]}"
cmake --build "$build" -j"$(nproc)" --target quickstart
"$build/quickstart"
