#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go, for a machine with one CUDA device (about 10 minutes).
# Writes JSON to ${OUT:-benchmarks/results}; paste the printed tables into BENCHMARKS.md with the card's name.
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The paper's model: ResNet-101 DeepLab-v3 at OS 16, 512x512, 12 images per GPU (batch 24 on 2 GPUs):
# fine-tuning vs ILT, plain (fp32, no folding, textbook losses) vs fast (bf16 + channels_last, folded teacher).
python benchmarks/bench_train_step.py --device cuda --backbone resnet101 --size 512 --batch 12 \
    --iters 5 --rounds 5 --warmup 3 --out "$out"
# Evaluation and the data pipeline on the bundled synthetic set (no VOC on the GPU machine).
python benchmarks/bench_eval.py --device cuda --batch 1,8,32 --out "$out"
python benchmarks/bench_data.py --device cuda --workers 0,2,4,8 --out "$out"
