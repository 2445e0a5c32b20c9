#!/usr/bin/env bash
# The GPU check in one command, sized for at most 8 minutes on one H100/H200 (untimed on one);
# nothing is downloaded:
#
#   bash scripts/gpu_check.sh [OUT]          # OUT defaults to runs/gpu_check
#
# Needs the SmolLM2-135M-Instruct teacher in models/ (`make teacher` on a machine that reaches
# PyPI, then copy the directory over) and a .venv with a CUDA torch (`make setup` reuses the
# system's). Four stages, each with its output in OUT:
#   1. precision.txt   the teacher in bf16 against fp32 on the GPU (scripts/check_precision.py):
#                      per-token KL and argmax agreement, fails past its limits
#   2. train/          20 steps of KD through torchrun, NCCL, a world of 1: the teacher's greedy
#                      answers to 64 prompts (generate.py) as data, configs/smollm2_kd.toml
#   3. bench.txt       scripts/bench_train.py's cases, compile on and off, with MFU against
#                      the bf16 dense peak (989 TFLOP/s on H100/H200 SXM; PEAK_FLOPS= to change)
#                      and the per-op profiles in profile/
#   4. nvidia-smi.txt  the device and driver
# Stops at the first stage that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${1:-runs/gpu_check}
TEACHER=models/smollm2-135m-instruct
PEAK_FLOPS=${PEAK_FLOPS:-989e12}
if [ ! -f "$TEACHER/config.json" ]; then
  echo "error: no teacher at $TEACHER; run \`make teacher\` (or copy it there)" >&2
  exit 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: $PY sees no CUDA device; this check is for a GPU machine" >&2
  exit 1
fi
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt"

echo "== 1. bf16 against fp32"
"$PY" scripts/check_precision.py --model "$TEACHER" --device cuda | tee "$OUT/precision.txt"

echo "== 2. 20 KD steps, torchrun, NCCL, one rank"
head -n 64 data/prompts/train.jsonl > "$OUT/prompts.jsonl"
"$PY" generate.py --model "$TEACHER" --chat --temperature 0 --max-new-tokens 128 \
  --prompts-file "$OUT/prompts.jsonl" --output "$OUT/answers.jsonl"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train.py \
  --config configs/smollm2_kd.toml --data="$OUT/answers.jsonl" --eval_data= \
  --max_steps=20 --warmup_steps=2 --log_every=5 --save_every=0 --out="$OUT/train"

echo "== 3. bench_train, compile off and on"
"$PY" scripts/bench_train.py --batch-size 16 --seq-len 1024 --steps 5 --compile \
  --peak-flops "$PEAK_FLOPS" --profile "$OUT/profile" | tee "$OUT/bench.txt"
echo "gpu_check: all stages passed; outputs in $OUT"
