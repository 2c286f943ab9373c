# Sourced by the build scripts: picks the LibTorch to build against from
# D9D_LIBTORCH and sets `libtorch_args` (extra cmake arguments) and
# `default_build` (the build directory for that choice).
#   D9D_LIBTORCH=debian  Debian's libtorch-dev 1.13, CPU (the default; build/)
#   D9D_LIBTORCH=wheel   the LibTorch 2.x inside the pinned torch wheel, CUDA-enabled
#                        (scripts/python-env.sh installs it; build-torch2/)
case "${D9D_LIBTORCH:-debian}" in
  debian)
    libtorch_args=()
    default_build=build
    ;;
  wheel)
    _python="$(bash "$(dirname "${BASH_SOURCE[0]}")/python-env.sh" | tail -n1)"
    libtorch_args=(-DCMAKE_PREFIX_PATH="$("$_python" -c 'import torch; print(torch.utils.cmake_prefix_path)')")
    default_build=build-torch2
    ;;
  *)
    echo "D9D_LIBTORCH must be debian (Debian's libtorch-dev 1.13) or wheel (LibTorch 2.x from the torch wheel), got '$D9D_LIBTORCH'" >&2
    exit 2
    ;;
esac
if command -v ccache >/dev/null 2>&1; then libtorch_args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
