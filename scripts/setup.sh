#!/usr/bin/env bash
# Installs what memc needs on a fresh Debian 12 machine, idempotently (nothing is installed
# twice; apt-get update runs only when a package is missing).
#   scripts/setup.sh            build + test dependencies (LLVM 19, MLIR 19, Polly, clang 19; ptxas and
#                               libdevice from PyPI's nvidia-cuda-nvcc)
#   scripts/setup.sh --python   also the Python packages that regenerate examples/ (torch, ...)
set -euo pipefail

need_sudo() { if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then echo sudo; fi; }
SUDO=$(need_sudo)

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi

# openmpi-bin: mpirun and libmpi.so.40, which pipelined runs across processes load at run time.
APT_PACKAGES=(llvm-19-dev libmlir-19-dev mlir-19-tools libclang-19-dev libpolly-19-dev zlib1g-dev libzstd-dev pkg-config openmpi-bin)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ptxas and libdevice (PyPI's CUDA compiler packages) check and link the PTX kernels; no GPU needed.
if ! python3 -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('nvidia') and __import__('pathlib').Path(__import__('nvidia').__path__[0], 'cu13/bin/ptxas').exists() else 1)" 2>/dev/null; then
  echo "setup: pip install nvidia-cuda-nvcc (ptxas, libdevice)"
  python3 -m pip install -q "nvidia-cuda-nvcc>=13,<14"
fi

if [ "${1:-}" = "--python" ]; then
  PY_PACKAGES=(torch transformers onnx onnxruntime onnxscript numpy)
  for p in "${PY_PACKAGES[@]}"; do
    python3 -c "import $p" 2>/dev/null || { echo "setup: pip install ${PY_PACKAGES[*]}"; python3 -m pip install -q "${PY_PACKAGES[@]}"; break; }
  done
fi
