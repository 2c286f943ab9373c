#!/usr/bin/env bash
# Creates (or reuses) the Python reference environment: a venv outside the source
# tree with the pinned torch (CUDA-enabled wheel, whose LibTorch is the project's
# second build), peft, safetensors and transformers from
# scripts/reference-requirements.txt. Prints the versions, and on the last line the
# venv's python, for callers: python="$(bash scripts/python-env.sh | tail -n1)".
#
#   D9D_VENV  where the venv lives (default: ~/.cache/d9d-peft/venv)
#
# Reused as long as it was built from the same requirements file (a stamp holds
# the file's hash); otherwise rebuilt from scratch. Several GB; the first run takes
# minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${D9D_VENV:-$HOME/.cache/d9d-peft/venv}"
requirements="scripts/reference-requirements.txt"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
stamp="$venv/.d9d-requirements.sha256"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "python-env: reusing $venv" >&2
else
  command -v python3 >/dev/null || { echo "python-env: python3 not found (Debian: apt-get install python3 python3-venv)" >&2; exit 1; }
  echo "python-env: creating $venv from $requirements (several GB, a few minutes the first time)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  echo "$want" >"$stamp"
fi

"$venv/bin/python" - >&2 <<'PY'
import sys, torch, peft, safetensors, transformers
print(f"python-env: python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"peft {peft.__version__}, safetensors {safetensors.__version__}, transformers {transformers.__version__}")
PY
echo "$venv/bin/python"
