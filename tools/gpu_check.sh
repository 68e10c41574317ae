#!/usr/bin/env bash
# The first thing to run on a GPU (issue 27, item 9): the CUDA paths that never ran on the CPU machines.
#
#   bash tools/gpu_check.sh [OUT_DIR]        # OUT_DIR default: $OUT, else ./gpu_check_out
#
# Under 8 minutes on one H100 (GPU_CHECK_BUDGET_S, default 480): each step runs under its own timeout, cut to
# what is left of the budget, and the check goes on after a step fails. Steps, in order:
#   cuda            torch + CUDA + the device + nvidia-smi (none: "no CUDA device: ..." and exit 2)
#   wheels          only if .whl/*.whl is there: pip install --no-index --no-deps into a temporary folder
#                   (carried with the working tree; nothing is fetched: the GPU machine has no network)
#   modules         every package the checks import (missing: named, with the remedy, and exit 3)
#   tests           the CUDA-only tests of tests/ (a skip counts as a failure)
#   t2av            full-size random weights, a 4 s t2av in bf16: per-stage timings, loop ms/patch, render
#                   ms/frame, peak GPU memory; then the same request on the eager loop (captured vs eager)
#   train           2 optimizer steps of training/config_tiny.json on CUDA in bf16
#   bench_loop      bench.py --stages llm: the full-size loop, CUDA graphs vs eager vs static, ms/patch
#   train_torchrun  the same 2 steps under torchrun --nproc_per_node 1 (NCCL process group)
#   bench_liax      bench.py --stages liax: LIA-X 512x512 render, float32/bf16, batch 1/8
#   bench_train     bench.py --stages train: full-size forward + backward, batch 1
# Writes OUT_DIR/summary.md and OUT_DIR/summary.json (step, status, seconds, key figures), OUT_DIR/gpu_check.log
# (every step's log, one after another) and the timed t2av's OUT_DIR/t2av.mp4 + t2av.wav: 5 files (the device
# tool brings back at most 8). Exit status: 0 all passed, 1 a step failed/timed out/was skipped, 2 no CUDA
# device, 3 packages missing.
#
# Missing packages: the GPU image lacks soundfile, omegaconf and imageio-ffmpeg (KINDS.md) and has
# transformers 5.17 (requirements-eval.txt pins 5.24). On a machine WITH network, in the repository root:
#   python tools/gpu_check.py wheels          # -> .whl/ (ignored by git), ~45 MiB
# then run this script with .whl carried (device tool: carry=[".whl"]).
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_WORK (scratch, kept; default a mktemp
# folder, removed at the end unless GPU_CHECK_KEEP=1), GPU_CHECK_WHEELS (default .whl).
# With the device tool (one call, ~8 min of the session's 15):
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=560)
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT_DIR=${1:-${OUT:-./gpu_check_out}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || { echo "cannot create $OUT_DIR"; exit 1; }
BUDGET=${GPU_CHECK_BUDGET_S:-480}
RESERVE=15         # seconds kept for the summary
MIN_STEP=20        # a step with less than this left is skipped
PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
LOG=$OUT_DIR/gpu_check.log
START=$(date +%s)
: >"$WORK/steps.tsv"
: >"$LOG"
rm -f "$OUT_DIR/summary.md" "$OUT_DIR/summary.json"

# nothing may reach for the network (there is none): fail at once instead of waiting on DNS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled \
       TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1

say() { echo "[gpu_check] $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }
record() {  # name rc seconds limit note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$WORK/steps.tsv"
}

SKIP_REASON=""
# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of the budget); log to $WORK/NAME.log
step() {
    local name=$1 limit=$2; shift 2
    if [ -n "$SKIP_REASON" ]; then
        record "$name" - 0 "$limit" "$SKIP_REASON"; say "$name: skipped ($SKIP_REASON)"; return 0
    fi
    local left=$(( BUDGET - $(elapsed) - RESERVE ))
    if [ "$left" -lt "$MIN_STEP" ]; then
        record "$name" - 0 "$limit" "out of budget (${left} s left)"; say "$name: skipped (out of budget)"; return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    say "$name: start (limit ${limit} s, $(elapsed) s of ${BUDGET} s used)"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    record "$name" "$rc" "$secs" "$limit" ""
    { echo "===== $name: rc $rc, ${secs} s (limit ${limit} s): $*"; cat "$WORK/$name.log"; echo; } >>"$LOG"
    case $rc in
        0) say "$name: ok (${secs} s)" ;;
        124|137) say "$name: TIMEOUT at ${limit} s" ;;
        *) say "$name: FAILED rc $rc (${secs} s): $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-200)" ;;
    esac
    return "$rc"
}

say "repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')), out $OUT_DIR, work $WORK"
say "python $PY; budget ${BUDGET} s; $(date '+%Y-%m-%d %H:%M:%S %Z'); host $(hostname 2>/dev/null)"

if ! command -v timeout >/dev/null; then
    echo "timeout (coreutils) not found: the steps cannot be bounded" | tee -a "$LOG"
fi

step cuda 60 "$PY" tools/gpu_check.py cuda --json "$WORK/cuda.json"
CUDA_RC=$?
if [ "$CUDA_RC" -ne 0 ]; then
    grep -h '^no CUDA device' "$WORK/cuda.log" 2>/dev/null | head -n 1 || true
    grep -q '^no CUDA device' "$WORK/cuda.log" 2>/dev/null || echo "no CUDA device: the CUDA probe failed (rc $CUDA_RC)"
    SKIP_REASON="no CUDA device"
fi

if [ -z "$SKIP_REASON" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    printf '{"wheels": [%s]}\n' "$(cd "$WHEELS" && ls -- *.whl | sed 's/.*/"&"/' | paste -sd, -)" >"$WORK/wheels.json"
    step wheels 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl \
        && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

step modules 90 "$PY" tools/gpu_check.py modules --json "$WORK/modules.json"
MODULES_RC=$?
if [ -z "$SKIP_REASON" ] && [ "$MODULES_RC" -ne 0 ]; then
    SKIP_REASON="packages missing (see modules)"
    grep -h '^missing Python packages' "$WORK/modules.log" 2>/dev/null | head -n 1
fi

step tests 150 "$PY" tools/gpu_check.py tests --json "$WORK/tests.json"
step t2av 210 "$PY" tools/gpu_check.py t2av --json "$WORK/t2av.json" --video "$OUT_DIR/t2av.mp4" --seconds 4
step train 100 "$PY" tools/gpu_check.py train --json "$WORK/train.json" --work "$WORK" --steps 2
step bench_loop 150 "$PY" tools/gpu_check.py bench --json "$WORK/bench_loop.json" -- \
    --device cuda --stages llm --llm-seconds 4
step train_torchrun 100 "$PY" tools/gpu_check.py train --json "$WORK/train_torchrun.json" --work "$WORK" \
    --steps 2 --launcher torchrun
step bench_liax 100 "$PY" tools/gpu_check.py bench --json "$WORK/bench_liax.json" -- \
    --device cuda --stages liax --liax-frames 16 --liax-batch 8
step bench_train 150 "$PY" tools/gpu_check.py bench --json "$WORK/bench_train.json" -- --device cuda --stages train

TOTAL=$(elapsed)
"$PY" tools/gpu_check.py summarize --work "$WORK" --out "$OUT_DIR" --budget "$BUDGET" --total "$TOTAL" \
    >>"$LOG" 2>&1
CODE=$?
if [ ! -s "$OUT_DIR/summary.md" ]; then  # the Python summary failed: say at least what the steps did
    {
        echo "# GPU check (tools/gpu_check.sh)"; echo
        echo "summary writer failed (rc $CODE); steps (name, rc, seconds, limit, note):"; echo
        sed 's/^/    /' "$WORK/steps.tsv"
        [ -n "$SKIP_REASON" ] && { echo; echo "$SKIP_REASON"; grep -h '^no CUDA device' "$WORK/cuda.log" 2>/dev/null; }
    } >"$OUT_DIR/summary.md"
    [ "$CUDA_RC" -ne 0 ] && CODE=2 || CODE=1
fi
echo
cat "$OUT_DIR/summary.md"
say "done in ${TOTAL} s, exit $CODE; summary: $OUT_DIR/summary.md"
if [ -z "${GPU_CHECK_WORK:-}" ] && [ "${GPU_CHECK_KEEP:-0}" != 1 ]; then
    rm -rf "$WORK"  # every step's log is in gpu_check.log; GPU_CHECK_KEEP=1 keeps the scratch folder
fi
exit "$CODE"
