#!/usr/bin/env bash
# Builds d9d-peft, runs the test suite, then installs the library into a
# temporary prefix and builds and runs tests/consumer against the installed tree,
# fuzzes the checkpoint parsers (scripts/fuzz.sh) and runs the test suite.
#
#   BUILD_DIR     build directory (default: build)
#   D9D_FIXTURES  reference data directory holding hf_peft/ (default: the copy
#                 in tests/fixtures)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

bash scripts/install-deps.sh

build="${BUILD_DIR:-build}"
fixtures="$(realpath -m "${D9D_FIXTURES:-tests/fixtures}")"

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DD9D_PEFT_FIXTURES_DIR="$fixtures"
cmake --build "$build" -j"$(nproc)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix"
cmake -S "$root/tests/consumer" -B "$tmp/consumer-build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$tmp/prefix"
cmake --build "$tmp/consumer-build" -j"$(nproc)"
"$tmp/consumer-build/consumer"

# The checkpoint parsers under libFuzzer for a bounded time (FUZZ_SECONDS each).
bash scripts/fuzz.sh

# The test suite last, so its summary closes the output.
ctest --test-dir "$build" --output-on-failure
