#!/usr/bin/env bash
# The GPU checks and measurements of BENCHMARKS.md in one go, for a machine with one CUDA device
# (about 6 minutes on an H100; every part has its own time limit and a failed part does not stop the rest).
# Runs from the source tree (no install needed where torch, torchvision, PyYAML, tqdm, Pillow, pytest are).
# Writes JSON and gpu.log to ${OUT:-benchmarks/results}; the numbers go into BENCHMARKS.md with the card's name.
#   bash benchmarks/gpu.sh                      # every part
#   bash benchmarks/gpu.sh tests train_step     # some of: tests train_step eval data ddp compile
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
parts=" ${*:-tests train_step eval data ddp compile} "
failed=()
part() {  # part SECONDS NAME COMMAND...: run COMMAND with a time limit, log it, remember a failure
    local limit=$1 name=$2
    shift 2
    [[ $parts == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit} s) $(date +%T)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/gpu.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "!!! $name failed (exit $rc)"; failed+=("$name:$rc"); }
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
$py -c "import torch, torchvision, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# 1. What only shows on CUDA (skipped on CPU-only CI): bf16 + channels_last against fp32, a whole run, metrics.
part 150 tests $py -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_metrics.py \
    tests/test_models_segmenter.py tests/test_plain_vs_fast.py tests/test_distributed.py

# 2. The paper's model: ResNet-101 DeepLab-v3 at OS 16, 512x512, 12 images per GPU (batch 24 on 2 GPUs):
#    fine-tuning vs ILT, plain (strict fp32, no TF32; nothing folded, textbook losses, per-parameter SGD)
#    vs fast (bf16 autocast + channels_last, folded teacher, fused SGD).
part 200 train_step $py benchmarks/bench_train_step.py --device cuda --backbone resnet101 --size 512 --batch 12 \
    --iters 5 --rounds 5 --warmup 3 --out "$out"

# 3. Evaluation and the data pipeline for the same model on 512 px synthetic images (no VOC on the machine).
#    400 images, so that step 0's epochs (about 100 images) keep several loader workers busy.
data=$(mktemp -d)/synth512
$py -c "from ilseg.data.synth import generate_synth; generate_synth('$data', seed=0, num_images=400, size=512)"
r101=(--set model.backbone=resnet101 --set model.width=64 --set model.head_channels=256 --set model.output_stride=16)
part 100 eval $py benchmarks/bench_eval.py --device cuda --data "$data" "${r101[@]}" --set data.workers=8 \
    --batch 1,8 --max-images 80 --repeat 3 --out "$out"
part 100 data $py benchmarks/bench_data.py --device cuda --data "$data" "${r101[@]}" --set data.crop_size=512 \
    --set optim.batch_size=12 --step 0 --workers 0,4,8,12 --pipeline-images 600 --iters 5 --decode-files 100 \
    --index-masks 0 --out "$out"

# 4. The real engine under torchrun with NCCL (one rank): DDP wrapping, SyncBatchNorm, a run to its end.
part 90 ddp $py -m torch.distributed.run --standalone --nproc_per_node=1 -m ilseg train --config synth-demo \
    --out "$(mktemp -d)/run" --quiet --set data.root="$data" runtime.device=cuda model.width=8 model.head_channels=8 \
    optim.batch_size=4 optim.epochs=1 optim.epochs_next=1 data.crop_size=128

# 5. torch.compile (runtime.compile) against the eager fast path, ILT at the paper's size.
part 200 compile $py benchmarks/bench_train_step.py --device cuda --backbone resnet101 --size 512 --batch 12 \
    --iters 5 --rounds 3 --warmup 2 --variants ilt:fast --compile --out "$out"

echo "=== done $(date +%T); failed parts: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
