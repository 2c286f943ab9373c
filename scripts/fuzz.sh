#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (address + undefined sanitizers) and
# runs each for a bounded time; exits non-zero on any finding. Installs
# nothing (scripts/install-deps.sh brings clang and libclang-rt-14-dev).
#
#   FUZZ_BUILD_DIR  build directory (default: build-fuzz)
#   FUZZ_SECONDS    seconds per fuzzer (default: 30)
#   FUZZ_JOBS       build parallelism (default: nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

build="${FUZZ_BUILD_DIR:-build-fuzz}"
seconds="${FUZZ_SECONDS:-30}"
jobs="${FUZZ_JOBS:-$(nproc)}"
fuzzers=(fuzz_safetensors_header fuzz_safetensors_index)
declare -A corpus=([fuzz_safetensors_header]=header [fuzz_safetensors_index]=index)

for tool in clang clang++; do
  command -v "$tool" >/dev/null 2>&1 || { echo "fuzz: $tool not found; run scripts/install-deps.sh" >&2; exit 1; }
done

CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DD9D_PEFT_BUILD_FUZZERS=ON -DD9D_PEFT_BUILD_TESTS=OFF \
  -DD9D_PEFT_BUILD_EXAMPLES=OFF -DD9D_PEFT_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$build" -j"$jobs" --target "${fuzzers[@]}"

# Corpora, crash files and logs go to a scratch directory, never the repository.
work="$(mktemp -d "${TMPDIR:-/tmp}/d9d-fuzz.XXXXXX")"
keep=0
trap '[[ $keep == 1 ]] || rm -rf "$work"' EXIT

status=0
summary=()
for fuzzer in "${fuzzers[@]}"; do
  dir="$work/$fuzzer"
  mkdir -p "$dir/corpus" "$dir/artifacts"
  cp "$root/fuzz/corpus/${corpus[$fuzzer]}/"* "$dir/corpus/"
  log="$dir/log.txt"
  echo "fuzz: running $fuzzer for ${seconds}s"
  rc=0
  "$build/fuzz/$fuzzer" "$dir/corpus" \
    -dict="$root/fuzz/safetensors.dict" \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10 \
    -artifact_prefix="$dir/artifacts/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)"
  findings=("$dir/artifacts/"*)
  [[ -e "${findings[0]}" ]] || findings=()
  if [[ $rc -ne 0 || ${#findings[@]} -gt 0 ]]; then
    status=1
    keep=1
    summary+=("$fuzzer: FINDING (exit $rc) after ${runs:-?} runs; reproducer(s): ${findings[*]:-none}; log: $log")
    tail -n 60 "$log" >&2
  else
    summary+=("$fuzzer: ok, ${runs:-?} runs in ${seconds}s, coverage ${cov:-?}, no findings")
  fi
done

printf '%s\n' "${summary[@]}"
exit "$status"
