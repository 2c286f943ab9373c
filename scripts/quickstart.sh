#!/usr/bin/env bash
# Builds and runs examples/quickstart.cpp: the PEFT lifecycle in one page.
#   BUILD_DIR  build directory (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

build="${BUILD_DIR:-build}"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j"$(nproc)" --target quickstart
"$build/quickstart"
