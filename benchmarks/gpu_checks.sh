#!/usr/bin/env bash
# The GPU checks, ready for whatever GPU is lent (at most 8 minutes): recaption images/s per GPU on the real
# LLaVA-LLaMA3-8B shapes (random weights, bf16, 336 px, 128 new tokens; hf, and vllm where it imports), a Recap-CLIP
# B/16 bf16 train step and a DiT-B/4 bf16 train step. The figures, with the card's name from nvidia-smi, are appended
# to docs/gpu.md and written to $OUT (gpu_checks.md, gpu_checks.json, one log per check). See benchmarks/gpu_checks.py.
#   bash benchmarks/gpu_checks.sh                  # OUT=runs/gpu_checks, BUDGET_S=430 (seconds for the checks)
#   bash benchmarks/gpu_checks.sh --checks clip    # any arguments of python -m benchmarks.gpu_checks
# CI runs the same entry point on tiny shapes on CPU (tests/test_benchmarks.py: python -m benchmarks.gpu_checks --tiny).
# Optional: wheels in .whl/ (packages the machine lacks, e.g. vllm) are installed to /tmp/site first.
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
