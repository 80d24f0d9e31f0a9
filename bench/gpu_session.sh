#!/usr/bin/env bash
# Every GPU check and benchmark in one bounded run, for a machine with a CUDA GPU and PyTorch installed.
#
#   [STEPS="gpu-tests serve-demo ..."] bench/gpu_session.sh [FILMS_DIR]
#
# The whole log goes to $OUT/gpu.log (default /tmp/gpu-out); STEPS runs only the steps named.
#
# Order = value: the CUDA tests (tests/gpu: device results against the CPU's), the serving benchmark
# (demo model, then the product's EfficientNet-B0), training throughput with AMP, what fp16/bf16 do to the
# answers, the archive scorer, the MC cost. Each step has its own time limit, so one stuck step cannot
# eat the others' time; the GPU's server settings (bigger batches, more decode threads) are set here.
# FILMS_DIR: radiographs for bench/precision.py (default: ../shared's NIH sample, else synthetic films).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
FILMS=${1:-}
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY=${PY:-python3}

step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        return 0
    fi
    local start
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $(($(date +%s) - start)) s" | tee -a "$LOG"
    tail -n "${TAIL:-25}" "$LOG" | grep -v '^===' | tail -n "${TAIL:-25}"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nproc
    $PY -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee -a "$LOG"

# GPU serving settings (the k8s GPU overlay's kind of values): batches of up to 32 images, 8 decode threads.
export CXR_DECODE_WORKERS=8
# Real films for the serving benchmarks where ../shared is absent (bench/serve.py: radiographs).
[ -n "$FILMS" ] && export CXR_BENCH_FILMS="$FILMS"
SPY=$(command -v py-spy || echo "${PYTHONPATH%%:*}/bin/py-spy")

step gpu-tests 100 $PY -m pytest tests/gpu -q -p no:cacheprovider -W default
# Issue #16 first (the targets: >= 1,500 images/s cams=none, >= 1,000 cams=auto at 64-256 clients, p99 <= 250
# ms): raw-body uploads, then several Gunicorn workers sharing the GPU, without and with CUDA MPS; the design in
# docs/benchmarks.md is chosen from these rows. Each worker has its own model and batcher (CUDA context ~0.5 GB).
FEED="--max-batch-images 32 --limit-seconds 0.3 --requests-per-client 16 --single-client-requests 12 --upload raw"
step feed-1worker 100 $PY bench/serve.py $FEED --clients 64
step feed-4workers 130 env CXR_DECODE_WORKERS=3 $PY bench/serve.py $FEED --clients 128 --workers 4
step feed-8workers 160 env CXR_DECODE_WORKERS=2 $PY bench/serve.py $FEED --clients 256 --workers 8
if command -v nvidia-cuda-mps-control >/dev/null; then
    # MPS lets the workers' kernels share the GPU at once instead of time-slicing contexts.
    export CUDA_MPS_PIPE_DIRECTORY="$OUT/mps-pipe" CUDA_MPS_LOG_DIRECTORY="$OUT/mps-log"
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d && echo "MPS daemon started" | tee -a "$LOG"
    step feed-8workers-mps 160 env CXR_DECODE_WORKERS=2 $PY bench/serve.py $FEED --clients 256 --workers 8
    echo quit | nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
else
    echo "no nvidia-cuda-mps-control: the MPS row is not measured" | tee -a "$LOG"
fi
# Per-image host CPU by stage on the GPU box (py-spy + kernel CPU times; bench/stages.py).
step feed-stages 90 $PY bench/stages.py --device cuda --upload raw --clients 64 --requests-per-client 16
# Where a lone request's time goes on the GPU box (the H200's one-client p50 was 18.6 ms for a 0.8 ms forward).
step feed-timeline 60 $PY bench/timeline.py --device cuda --requests 40
SERVE="--max-batch-images 32 --clients 64 --limit-seconds 0.3 --requests-per-client 8 --single-client-requests 12"
step serve-demo 100 $PY bench/serve.py $SERVE
# Two Gunicorn workers sharing the GPU: the host (one Python process), not the GPU, limited one worker.
step serve-demo-2workers 120 $PY bench/serve.py $SERVE --workers 2
# The same with the trunk run eagerly (no CUDA graphs): what the graphs buy end to end.
step serve-demo-eager 100 env CXR_CUDA_GRAPHS=false $PY bench/serve.py $SERVE
step serve-b0 100 $PY bench/serve.py --untrained-arch efficientnet_b0 $SERVE
# Where the host's time goes while the GPU serves (py-spy samples without stopping the processes; raw
# collapsed stacks of the server and the load generator, per thread, to $OUT/serve-profile.txt).
step serve-profile 70 "$SPY" record --nonblocking --subprocesses --threads --rate 250 --format raw \
    -o "$OUT/serve-profile.txt" -- $PY bench/serve.py --max-batch-images 32 --clients 64 --limit-seconds 0.2 \
    --requests-per-client 16 --single-client-requests 4
# A server that could not capture its graphs says so in its log (it then runs the trunk eagerly).
grep -h "CUDA graph" "${TMPDIR:-/tmp}"/bench-serve-*.log 2>/dev/null | tail -n 3 | tee -a "$LOG"
step train-throughput 60 $PY bench/train_throughput.py --arch efficientnet_b0 --batch 64 --steps 8
step train-throughput-256 60 $PY bench/train_throughput.py --arch efficientnet_b0 --batch 256 --steps 6
step precision 45 $PY bench/precision.py ${FILMS:+--images "$FILMS"} --n 64
step archive-scorer 75 env CXR_MAX_BATCH_IMAGES=32 $PY bench/archive_scorer.py --images 64 --repeats 1 --sweep 32,64
step mc-cost 30 $PY bench/mc_cost.py --batch 32
date -u | tee -a "$LOG"
