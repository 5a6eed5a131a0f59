#!/usr/bin/env bash
# Create (or update) the virtual environment at .venv in the repository root and install the
# package with its test extra. torch is pinned first so a CPU machine never pulls a multi-GB CUDA
# build; set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.13.0" from a CUDA index).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtual environment .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.megatron-elastic-installed
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ] || [ launch/setup_env.sh -nt "$STAMP" ]; then
  echo "[setup] installing $TORCH_SPEC and megatron-elastic[test] into .venv (first run: a few minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23" "setuptools>=64" wheel
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test]"
  touch "$STAMP"
else
  echo "[setup] .venv is up to date"
fi
