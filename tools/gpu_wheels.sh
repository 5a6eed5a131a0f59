#!/usr/bin/env bash
# Wheels a bare GPU machine (Python 3.12, torch, no registry) needs beyond torch, prepared ahead on a
# machine that reaches PyPI:
#
#   bash tools/gpu_wheels.sh [DIR]           (default: runs/gpu_wheels)
#
# then on the GPU machine:  pip install --no-index --no-deps --find-links DIR megatron-core mamba-ssm einops torchao
#
# - megatron-core: the version installed here (cp312 manylinux x86_64 wheel);
# - mamba-ssm: built here from its source release with the CUDA build skipped, a pure-Python wheel
#   whose SSD kernels are Triton (compiled on the GPU machine at first use), and einops, which they use.
#   mamba-ssm's package __init__ (2.3.x) imports its selective-scan CUDA extension unconditionally, so
#   `import mamba_ssm` fails in such an install; its Triton modules (mamba_ssm/ops/triton/) import
#   only torch, triton and einops and have to be loaded without running the package __init__;
# - torchao: float8 training (abi3 manylinux x86_64 wheel).
# causal-conv1d is not among them: it is only a CUDA extension, and without it the model runs its
# PyTorch convolution. Transformer Engine (~276 MB) is too large to carry; it stays a cluster install.
# Fails if the folder exceeds 60 MiB (what one transfer to such a machine may carry with the code).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(realpath -m "${1:-$ROOT/runs/gpu_wheels}")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TORCHAO="${TORCHAO_VERSION:-0.18.0}"
MAMBA="${MAMBA_SSM_VERSION:-2.3.2.post1}"
LIMIT_MIB=60
[[ -x "$PY" ]] || { echo "gpu_wheels: no Python at $PY (run launch/setup_env.sh or set PYTHON)" >&2; exit 2; }
MCORE="$("$PY" -c 'import importlib.metadata as m; print(m.version("megatron-core"))' 2>/dev/null)" || {
  echo "gpu_wheels: megatron-core is not installed in $PY (run launch/setup_env.sh)" >&2; exit 2; }
mkdir -p "$DIR"
echo "[gpu_wheels] megatron-core==$MCORE, torchao==$TORCHAO and einops for Python 3.12 manylinux x86_64 -> $DIR"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
  "megatron-core==$MCORE" "torchao==$TORCHAO" einops
echo "[gpu_wheels] mamba-ssm==$MAMBA built from source with its CUDA build skipped"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=FALSE "$PY" -m pip wheel --quiet --disable-pip-version-check \
  --no-deps --no-build-isolation --no-binary=:all: -w "$DIR" "mamba-ssm==$MAMBA"
ls -l "$DIR"/*.whl
BYTES=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "[gpu_wheels] $(ls "$DIR"/*.whl | wc -l) wheels, $((BYTES / 1024)) KiB in $DIR"
if (( BYTES > LIMIT_MIB * 1024 * 1024 )); then
  echo "gpu_wheels: $DIR holds $((BYTES / 1048576)) MiB, more than $LIMIT_MIB MiB; remove older wheels from it" >&2
  exit 1
fi
