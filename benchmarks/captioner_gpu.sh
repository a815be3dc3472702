#!/usr/bin/env bash
# The captioner's GPU check (run by hand on a GPU machine; never in CI): bf16 training throughput and peak memory of
# stage 1, stage 2 LoRA (+ gradient checkpointing) and stage 2 full fine-tuning under the real FSDP config
# (experiments/configs/trainer/fsdp.yaml), on a CLIP ViT-L/14-336 + LLaMA-3-8B-shaped model with LAYERS of the 32
# decoder layers (random init), ours (CaptionerModule + Trainer) next to a plain transformers loop.
#   LAYERS=8 bash benchmarks/captioner_gpu.sh            # results in $OUT (default runs/bench) as json
# Optional: wheels in .whl/ (packages the machine lacks) are installed to /tmp/site first.
set -uo pipefail
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
L=${LAYERS:-8}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() { $PY -m benchmarks.captioner_step --shape llama3-8b --layers "$L" --text-len 96 --steps 14 --skip 4 "$@"; }
bench --stage 1 --dtype bfloat16 --batch-size 16 --json "$OUT/stage1.json"
bench --stage 2-lora --dtype bfloat16 --grad-checkpointing --batch-size 16 --json "$OUT/stage2_lora.json"
bench --stage 2-full --strategy fsdp --batch-size 8 --layers "${FULL_LAYERS:-4}" --json "$OUT/stage2_full_fsdp.json"
