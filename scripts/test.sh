#!/usr/bin/env bash
# Builds and tests d9d-peft against both LibTorch builds it supports, with real
# Hugging Face PEFT as the reference:
#   1. Debian's libtorch-dev 1.13 (CPU), in build/;
#   2. the LibTorch 2.x inside PyPI's torch wheel (CUDA-enabled: the CUDA code
#      compiles and links; tests run on the CPU), in build-torch2/;
# each: the library, tests, CLI, trainer, benchmarks; the test suite, including
# the checks against real PEFT both ways (tests/peft_reference/); the library
# installed into a temporary prefix and tests/consumer built against it. Then
# the checkpoint parsers under libFuzzer (scripts/fuzz.sh, with build 1).
#
# Installs what it needs: Debian packages (scripts/install-deps.sh) and the
# Python reference venv (scripts/python-env.sh, outside the tree, reused).
#
#   BUILD_DIR, BUILD_DIR_TORCH2   build directories (default: build, build-torch2)
#   D9D_FIXTURES   reference data directory holding hf_peft/ (default: tests/fixtures)
#   D9D_PEFT_SEED  seed of the PEFT differential cases (default: drawn, printed)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
started=$SECONDS

bash scripts/install-deps.sh
python="$(bash scripts/python-env.sh | tail -n1)"
torch_prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
fixtures="$(realpath -m "${D9D_FIXTURES:-tests/fixtures}")"
export D9D_PEFT_SEED="${D9D_PEFT_SEED:-$(( (RANDOM * 32768 + RANDOM) % 1000000000 ))}"
echo "test: PEFT differential cases from seed $D9D_PEFT_SEED (the same run: D9D_PEFT_SEED=$D9D_PEFT_SEED bash scripts/test.sh)"

launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  # Paths under the checkout hash relative to it, so a fresh clone elsewhere
  # (as CI makes) reuses what an earlier build compiled.
  export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=true
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
summary=()
passed=0
failed=0

# build_and_test LABEL BUILD_DIR [LIBTORCH_PREFIX]   (none: the system's, Debian's)
build_and_test() {
  local label="$1" build="$2" prefix="${3:-}"
  echo "test: ===== $label: configure and build in $build ====="
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DD9D_PEFT_FIXTURES_DIR="$fixtures" \
    -DD9D_PEFT_REFERENCE_PYTHON="$python" -DCMAKE_PREFIX_PATH="$prefix" "${launcher[@]}"
  cmake --build "$build" -j"$(nproc)"

  echo "test: ===== $label: consumer project against the installed package ====="
  cmake --install "$build" --prefix "$tmp/$label/prefix" >/dev/null
  cmake -S "$root/tests/consumer" -B "$tmp/$label/consumer" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$tmp/$label/prefix${prefix:+;$prefix}" >/dev/null
  cmake --build "$tmp/$label/consumer" -j"$(nproc)"
  "$tmp/$label/consumer/consumer"

  echo "test: ===== $label: test suite ====="
  local log="$tmp/$label.ctest.log" rc=0
  ctest --test-dir "$build" --output-on-failure -j"$(nproc)" 2>&1 | tee "$log" || rc=$?
  local line
  line="$(grep -E '^[0-9]+% tests passed, [0-9]+ tests failed out of [0-9]+' "$log" | tail -n1 || true)"
  if [[ -z "$line" ]]; then
    echo "test: $label: ctest printed no summary" >&2
    exit 1
  fi
  local total fails
  total="$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$line")"
  fails="$(sed -E 's/.*passed, ([0-9]+) tests failed.*/\1/' <<<"$line")"
  passed=$((passed + total - fails))
  failed=$((failed + fails))
  summary+=("$label: $line")
  [[ $rc -eq 0 ]] || { echo "test: $label: test suite failed" >&2; exit "$rc"; }
}

build_and_test libtorch-1.13-debian "${BUILD_DIR:-build}"
build_and_test libtorch-$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')-wheel \
  "${BUILD_DIR_TORCH2:-build-torch2}" "$torch_prefix"

# The checkpoint parsers under libFuzzer for a bounded time (FUZZ_SECONDS each).
bash scripts/fuzz.sh

printf 'test: %s\n' "${summary[@]}"
echo "test: PEFT differential seed $D9D_PEFT_SEED; $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s in all"
echo "tests: $passed passed, $failed failed"
