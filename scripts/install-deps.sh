#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test d9d-peft.
# A no-op (no apt at all) when everything is already installed.
set -euo pipefail

packages=(
  cmake g++ make
  libtorch-dev libopenblas0-pthread  # LibTorch; OpenBLAS or matmuls fall back to reference BLAS (~40x slower)
  nlohmann-json3-dev libfmt-dev libcli11-dev  # CLI11: the d9d-peft tool
  libre2-dev pkgconf  # RE2: module-name patterns in linear time
  libgloo-dev  # Gloo headers: c10d's CPU process group (d9d/distributed)
  googletest libgtest-dev libbenchmark-dev
  clang libclang-rt-14-dev  # libFuzzer and the sanitizers for scripts/fuzz.sh
  ccache  # rebuilds of the two LibTorch builds
  python3 python3-venv  # the Python reference environment (scripts/python-env.sh)
  git ca-certificates
)

missing=()
for pkg in "${packages[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

sudo=()
if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "install-deps: not root and no sudo; install these packages: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
