#!/usr/bin/env bash
# The GPU checks on whatever GPU is lent (at most 8 minutes; what they measure: docs/gpu.md, which gets the figures;
# $OUT gets gpu_checks.md, gpu_checks.json and one log per check). Arguments go to python -m benchmarks.gpu_checks:
#   bash benchmarks/gpu_checks.sh                  # OUT=runs/gpu_checks, BUDGET_S=430 (seconds for the checks)
#   bash benchmarks/gpu_checks.sh --checks clip
# Wheels in .whl/ (packages the machine lacks, e.g. vllm) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
# 480 s in all: the checks get BUDGET_S, the rest is start-up (imports, the tokenizer) and writing the report
timeout --signal=TERM --kill-after=5 475 "$PY" -m benchmarks.gpu_checks --out "$OUT" --budget-s "${BUDGET_S:-430}" "$@"
