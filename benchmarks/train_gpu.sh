#!/usr/bin/env bash
# The GPU figures of docs/training.md: an SD-1.5-shaped model (random weights) at 512 px, bf16,
# LoRA and full, through benchmarks/train.py. Two phases, so that a short GPU lease gets the
# eager figures first and the torch.compile ones after (they share the work folder).
#
#   benchmarks/train_gpu.sh OUTDIR eager      # limit, limit+, ours, diffusers-ex
#   benchmarks/train_gpu.sh OUTDIR compiled   # limit+compiled, ours+compiled, merged with eager
set -uo pipefail
out=${1:?usage: train_gpu.sh OUTDIR eager|compiled}
phase=${2:-eager}
work=${SD_BENCH_WORK:-benchmarks/results/gpu-work}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 SD_PIPELINE_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
common=(--model sd15 --batch "${BATCH:-16}" --steps "${STEPS:-20}" --warmup 5 --repeats 1 --images 64
        --workdir "$work")
quiet() { grep -v --line-buffered "Loading weights\|Writing model\|it/s\]$"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, diffusers, peft, accelerate as a; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, \
'accelerate', a.__version__)"
# LIMIT=seconds stops the run there; the figures of each finished method are in the JSON already.
run=(${LIMIT:+timeout -k 5 "$LIMIT"} python3 benchmarks/train.py "${common[@]}")
if [ "$phase" = eager ]; then
    "${run[@]}" --json "$out/gpu-eager.json" 2>&1 | quiet | tee "$out/gpu-eager.txt"
    cp "$out/gpu-eager.json" "$work/" 2>/dev/null
else
    "${run[@]}" --variants limit+compiled ours+compiled --merge "$work/gpu-eager.json" \
        --json "$out/gpu-compiled.json" 2>&1 | quiet | tee "$out/gpu-compiled.txt"
fi
