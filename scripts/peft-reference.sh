#!/usr/bin/env bash
# Reruns the PEFT -> d9d-peft differential check for chosen seeds, e.g. the
# case a failing run names:
#   bash scripts/peft-reference.sh --seed 123456789 --count 1
# Builds what it needs in BUILD_DIR (default: build), generates the cases with
# real PEFT (the venv of scripts/python-env.sh) into BUILD_DIR/peft-reference-repro
# and checks them (tests/peft_reference/reference_tool.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -gt 0 ]] || { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
python="$(bash scripts/python-env.sh | tail -n1)"
build="${BUILD_DIR:-build}"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DD9D_PEFT_REFERENCE_PYTHON="$python" >/dev/null
cmake --build "$build" -j"$(nproc)" --target peft_reference_tool d9d-peft
out="$build/peft-reference-repro"
"$python" tests/peft_reference/generate_cases.py --out "$out" "$@"
"$build/tests/peft_reference_tool" check "$out" --cli "$build/tools/d9d-peft"
