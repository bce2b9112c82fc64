#!/usr/bin/env bash
# GPU check (issue 11): encode / connect / completion figures on one CUDA device in <= 5 minutes,
# no network (random weights of ViT-B-32 and HTSAT-tiny). Prints a Markdown block for
# docs/benchmarks.md. Without CUDA: says so, runs a tiny CPU dry run and exits 0.
#
#   benchmarks/gpu_check.sh                      # defaults: batch 256, bf16 autocast
#   benchmarks/gpu_check.sh --precision fp16 --batch 512
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# 5 minutes on a CUDA machine; the CPU dry run gets more room (a shared, loaded CPU box is slow)
LIMIT=300
command -v nvidia-smi >/dev/null 2>&1 || LIMIT=900
exec timeout --signal=INT "$LIMIT" "$PY" benchmarks/gpu_check.py "$@"
