#!/usr/bin/env bash
# Every GPU check, on one CUDA machine (H100 / H200), in under 8 minutes; results go to one report file.
#
#   bash tools/gpu_check.sh [REPORT]        (default: runs/gpu_check/report.txt)
#
# 1. preflight: a CUDA GPU, and torch, mamba-ssm, causal-conv1d, Transformer Engine, megatron-core
#    importable (pip install --no-build-isolation -e ".[gpu]"); anything missing fails here;
# 2. the GPU tests (tests/gpu: mamba-ssm kernels vs our scan, the TP model on CUDA vs the CPU
#    reference, Transformer Engine layers vs reference, TP=1 FP8 vs bf16 loss trace, and with two GPUs
#    TP=2 over NCCL with and without sequence parallelism); a skip for a missing package is a
#    failure, only "needs two GPUs" may skip;
# 3. training tokens/s: our scan vs mamba-ssm kernels, Transformer Engine bf16 vs FP8
#    (tools/gpu_throughput.py; numbers also in REPORT.throughput.json).
# Exit code 0 only when everything passed; the last line of the report says PASS or FAIL.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REPORT="$(realpath -m "${1:-$ROOT/runs/gpu_check/report.txt}")"
JUNIT="${REPORT%.txt}.junit.xml"
THROUGHPUT="${REPORT%.txt}.throughput.json"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
BUDGET_S=480  # the whole check must fit in 8 minutes
START=$SECONDS
mkdir -p "$(dirname "$REPORT")"
: > "$REPORT"

log() { echo "$*" | tee -a "$REPORT"; }
fail() {
  log "gpu_check: FAIL: $*"
  log "gpu_check: FAIL (report: $REPORT)"
  exit 1
}
left() { echo $((BUDGET_S - (SECONDS - START))); }

log "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), repository $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
[[ -n "$PY" && -x "$PY" ]] || fail "no Python interpreter found (set PYTHON=/path/to/python)"
command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this is not a CUDA machine"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$REPORT" \
  || fail "nvidia-smi cannot talk to the driver"

# ---------------------------------------------------------------- 1. preflight
log "== preflight"
timeout 120 "$PY" - <<'EOF' 2>&1 | tee -a "$REPORT"
import importlib, sys
import torch
ok = True
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}, "
      f"devices: {torch.cuda.device_count()}")
if not torch.cuda.is_available():
    print("MISSING: CUDA is not available to torch (CPU wheel? driver?)")
    ok = False
else:
    cap = torch.cuda.get_device_capability(0)
    print(f"device 0: {torch.cuda.get_device_name(0)}, compute capability {cap[0]}.{cap[1]}")
for name in ("mamba_ssm", "causal_conv1d", "transformer_engine.pytorch", "megatron.core", "megatron_elastic"):
    try:
        mod = importlib.import_module(name)
        print(f"import {name}: ok {getattr(mod, '__version__', '')}")
    except Exception as exc:
        print(f"MISSING: import {name} failed: {type(exc).__name__}: {exc}")
        ok = False
sys.exit(0 if ok else 1)
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || fail "preflight: a GPU package is missing (pip install --no-build-isolation -e '.[gpu]')"

# ---------------------------------------------------------------- 2. GPU tests
log "== GPU tests (tests/gpu)"
export MEGATRON_ELASTIC_GPU_STRICT=1
PYTEST_LIMIT=$(( $(left) - 150 ))  # keep time for the throughput stage
(( PYTEST_LIMIT > 60 )) || fail "not enough time left for the tests"
timeout "$PYTEST_LIMIT" "$PY" -m pytest tests/gpu -m gpu -v -rA -s -p no:cacheprovider --junitxml="$JUNIT" 2>&1 \
  | tee -a "$REPORT"
rc=${PIPESTATUS[0]}
(( rc == 124 )) && fail "GPU tests did not finish within ${PYTEST_LIMIT}s"
(( rc == 0 )) || fail "GPU tests failed (pytest exit code $rc; details above and in $JUNIT)"
if grep -E '^SKIPPED' "$REPORT" | grep -v 'needs two GPUs' | grep -q .; then
  fail "some GPU tests were skipped for a reason other than 'needs two GPUs' (see SKIPPED lines above)"
fi
grep -qE '[0-9]+ passed' "$REPORT" || fail "no GPU test ran"

# ---------------------------------------------------------------- 3. throughput
log "== training throughput (tokens/s, one GPU)"
THR_LIMIT=$(( $(left) - 5 ))
(( THR_LIMIT > 30 )) || fail "not enough time left for the throughput stage"
timeout "$THR_LIMIT" "$PY" tools/gpu_throughput.py --out "$THROUGHPUT" 2>&1 | tee -a "$REPORT"
rc=${PIPESTATUS[0]}
(( rc == 124 )) && fail "throughput stage did not finish within ${THR_LIMIT}s"
(( rc == 0 )) || fail "throughput stage failed (exit code $rc)"

ELAPSED=$((SECONDS - START))
(( ELAPSED <= BUDGET_S )) || fail "the checks took ${ELAPSED}s, over the ${BUDGET_S}s budget"
log "gpu_check: PASS in ${ELAPSED}s (report: $REPORT, junit: $JUNIT, throughput: $THROUGHPUT)"
