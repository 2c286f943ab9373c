#!/usr/bin/env bash
# Builds the libFuzzer targets with clang and runs each for a bounded time;
# exits non-zero on any finding. The fuzzers and the library they link are
# compiled with AddressSanitizer and UndefinedBehaviorSanitizer (a UBSan report
# aborts), the library also with libFuzzer's coverage instrumentation:
#   fuzz_safetensors_header  a whole .safetensors file (header parser)
#   fuzz_safetensors_index   a model.safetensors.index.json text
#   fuzz_adapter_config      an adapter_config.json text, read as load_adapter
#                            reads it and by every registered peft_type's parser
#   fuzz_peft_config         a d9d JSON PEFT config (lora, full_tune, ia3, stack)
# Bad input may only throw the parser's d9d::Error subclass; any other
# exception, a crash, a sanitizer report or an accepted input that does not
# survive the library's own dump -> parse is a finding. Seeds are fuzz/corpus/,
# dictionaries fuzz/*.dict.
#
# The build directory is the one scripts/test.sh's sanitizer stage uses (same
# configuration), so under test.sh nothing is compiled twice. Installs nothing
# (scripts/install-deps.sh brings clang and libclang-rt-14-dev).
#
#   FUZZ_BUILD_DIR  build directory (default: build-sanitize)
#   FUZZ_SECONDS    seconds per fuzzer (default: 60)
#   FUZZ_JOBS       build parallelism (default: nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

build="${FUZZ_BUILD_DIR:-build-sanitize}"
seconds="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-$(nproc)}"
fuzzers=(fuzz_safetensors_header fuzz_safetensors_index fuzz_adapter_config fuzz_peft_config)
declare -A corpus=([fuzz_safetensors_header]=header [fuzz_safetensors_index]=index
                   [fuzz_adapter_config]=adapter_config [fuzz_peft_config]=peft_config)
declare -A dict=([fuzz_safetensors_header]=safetensors [fuzz_safetensors_index]=safetensors
                 [fuzz_adapter_config]=config [fuzz_peft_config]=config)

for tool in clang clang++; do
  command -v "$tool" >/dev/null 2>&1 || { echo "fuzz: $tool not found; run scripts/install-deps.sh" >&2; exit 1; }
done
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}" CCACHE_NOHASHDIR=true
fi

# The configuration of scripts/test.sh's sanitizer stage (which also sets the
# test suite's options; they stay in the cache and do not change the objects).
CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O1 -DNDEBUG" \
  -DD9D_PEFT_SANITIZE=address,undefined -DD9D_PEFT_BUILD_FUZZERS=ON -DD9D_PEFT_BUILD_BENCHMARKS=OFF \
  "${launcher[@]}" >/dev/null
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
  UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
  "$build/fuzz/$fuzzer" "$dir/corpus" \
    -dict="$root/fuzz/${dict[$fuzzer]}.dict" \
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
