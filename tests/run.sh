#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole CPU suite (GPU tests skip without CUDA).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest "$@"
