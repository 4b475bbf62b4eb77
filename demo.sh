#!/usr/bin/env bash
# The built-in demo, run by `make demo`: real handwritten digits (scikit-learn's 8x8 set), a tiny
# DiT trained in pixel space by two CPU processes through torchrun, a guided sample grid with one
# row per class, and the quality figure (accuracy of a digit classifier on the samples, Frechet
# distance to the real digits). Running it again resumes the finished run instead of retraining.
# DEMO_STEPS / DEMO_OUT / DEMO_DATA / DEMO_CFG / DEMO_PER_CLASS override the defaults (the tests
# run a short version).
set -euo pipefail
cd "$(dirname "$0")"
steps=${DEMO_STEPS:-2000}
out=${DEMO_OUT:-demo_out}
cfg=${DEMO_CFG:-4.0}
data=${DEMO_DATA:-data/digits}
per_class=${DEMO_PER_CLASS:-50}

echo "== 1/4 preparing the digits"
python digits.py prepare --out "$data"

echo "== 2/4 training DiT-T/2 for $steps steps on 2 CPU processes"
# One thread per training process (--cpu-threads); OMP_NUM_THREADS says the same to torchrun, which
# would otherwise set it to 1 itself and print a banner about it: the same run, without the banner.
threads=1
OMP_NUM_THREADS=$threads torchrun --standalone --nproc_per_node=2 train.py --model DiT-T/2 --vae none \
    --in-channels 1 --image-size 8 --num-classes 10 --no-hflip --data-path "$data" --results-dir "$out" \
    --global-batch-size 128 --max-steps "$steps" --lr 2e-3 --ema-decay 0.995 --log-every 250 --ckpt-every 1000 \
    --keep-last 1 --cpu-threads "$threads" --resume auto
ckpt=$(ls "$out"/*/checkpoints/[0-9]*.pt | sort | tail -n 1)

echo "== 3/4 sampling a grid (one row per class) from $ckpt"
labels=$(python -c "print(' '.join(str(c) for c in range(10) for _ in range(10)))")
python sample.py --ckpt "$ckpt" --class-labels "$labels" --cfg-scale "$cfg" --sampler dpm-solver \
    --num-sampling-steps 25 --nrow 10 --output "$out/digits.png"

echo "== 4/4 quality: $per_class samples per class"
python digits.py score --ckpt "$ckpt" --cfg-scale "$cfg" --sampler dpm-solver --num-sampling-steps 25 \
    --per-class "$per_class"
echo "grid: $out/digits.png"
