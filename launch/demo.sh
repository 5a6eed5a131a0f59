#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the pipeline demo on the built-in tiny model (CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec .venv/bin/megatron-elastic demo "$@"
