#!/usr/bin/env bash
# Builds and tests d9d-peft against both LibTorch builds it supports, with real
# Hugging Face PEFT as the reference:
#   1. Debian's libtorch-dev 1.13 (CPU), in build/;
#   2. the LibTorch 2.x inside PyPI's torch wheel (CUDA-enabled: the CUDA code
#      compiles and links; tests run on the CPU), in build-torch2/;
# each: the library, tests, CLI, trainer, benchmarks; the test suite, including
# the checks against real PEFT both ways (tests/peft_reference/); the library
# installed into a temporary prefix and tests/consumer built against it. Then
#   3. the whole project again with clang under AddressSanitizer and
#      UndefinedBehaviorSanitizer (-DD9D_PEFT_SANITIZE=address,undefined,
#      Debian's LibTorch 1.13), in build-sanitize/: the same full test suite,
#      where any ASan (leaks included) or UBSan report fails its test (no
#      consumer project: a sanitized archive is for this project's programs);
#      that build also holds
#   4. the libFuzzer targets, run for a bounded time each (scripts/fuzz.sh):
#      the checkpoint parsers (safetensors header, sharded index) and the
#      config parsers (adapter_config.json for every registered peft_type, the
#      d9d JSON PEFT config).
# The totals count the tests of stages 1-3.
#
# Installs what it needs: Debian packages (scripts/install-deps.sh) and the
# Python reference venv (scripts/python-env.sh, outside the tree, reused).
#
#   BUILD_DIR, BUILD_DIR_TORCH2, BUILD_DIR_SANITIZE
#                  build directories (default: build, build-torch2, build-sanitize)
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

  run_suite "$label" "$build"
}

# run_suite LABEL BUILD_DIR: the whole ctest suite, counted into the totals.
run_suite() {
  local label="$1" build="$2"
  echo "test: ===== $label: test suite ====="
  local log="$tmp/$label.ctest.log" rc=0 start=$SECONDS
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
  summary+=("$label: $line ($((SECONDS - start)) s)")
  [[ $rc -eq 0 ]] || { echo "test: $label: test suite failed" >&2; exit "$rc"; }
}

build_and_test libtorch-1.13-debian "${BUILD_DIR:-build}"
build_and_test libtorch-$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')-wheel \
  "${BUILD_DIR_TORCH2:-build-torch2}" "$torch_prefix"

# 3. Everything again under ASan and UBSan, with clang (which also builds the
# fuzzers, stage 4, from the same objects). Against Debian's LibTorch 1.13 only:
# the wheel's 2.x LibTorch brings several GB of CUDA libraries that every
# sanitized test process would load and map for nothing (the tests run on the
# CPU), and the code instrumented, this project's, is the same for both.
# LibTorch itself is not instrumented. No suppressions: LibTorch 1.13 triggers
# no report in this suite, leak checking included (its static allocations stay
# reachable, which LeakSanitizer does not report), and UBSan's vptr check has
# given no false positive across its shared libraries.
sanitize_build="${BUILD_DIR_SANITIZE:-build-sanitize}"
sanitize_label=libtorch-1.13-debian-asan-ubsan
# -O1, as the sanitizers' documentation advises: fast enough to run, and far
# less compile time than -O3 with the instrumentation.
echo "test: ===== $sanitize_label: configure and build in $sanitize_build ====="
sanitize_started=$SECONDS
CC=clang CXX=clang++ cmake -S . -B "$sanitize_build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O1 -DNDEBUG" \
  -DD9D_PEFT_SANITIZE=address,undefined -DD9D_PEFT_BUILD_FUZZERS=ON -DD9D_PEFT_BUILD_BENCHMARKS=OFF \
  -DD9D_PEFT_FIXTURES_DIR="$fixtures" -DD9D_PEFT_REFERENCE_PYTHON="$python" "${launcher[@]}"
cmake --build "$sanitize_build" -j"$(nproc)"
echo "test: $sanitize_label: built in $((SECONDS - sanitize_started)) s"
# A report fails its test: ASan always exits non-zero, UBSan does with
# halt_on_error (the code is also built -fno-sanitize-recover=undefined), and
# each test fails on a report's SUMMARY line in its output whatever the status.
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:check_initialization_order=1:strict_init_order=1}" \
UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
  run_suite "$sanitize_label" "$sanitize_build"

# 4. The checkpoint and config parsers under libFuzzer for a bounded time
# (FUZZ_SECONDS each), from the sanitizer build.
FUZZ_BUILD_DIR="$sanitize_build" bash scripts/fuzz.sh

printf 'test: %s\n' "${summary[@]}"
echo "test: PEFT differential seed $D9D_PEFT_SEED; $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s in all"
echo "tests: $passed passed, $failed failed"
