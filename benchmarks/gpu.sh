#!/usr/bin/env bash
# The GPU benchmark pass, one command, under 5 minutes on one H200 (a global deadline caps every step):
#   1. QC metric step on the GPU (bench_qc_metrics.py, fedqc.qc.metrics_torch, values vs the CPU path)
#   2. the whole QC scoring pass (bench_scoring.py: networks vs metrics vs copies)
#   3. training loops vs a bare PyTorch loop, fp32 eager, bf16, bf16 + channels_last (bench_training.py)
#   4. per-site refinement on a simulated site of 100 subjects (bench_refine.py; data simulated in the
#      background from the start)
#   5. deployment: a site worker on the GPU keeps its CUDA context and data across messages
#      (bench_worker_gpu.py: one worker PID for every message, CUDA initialised, first vs later round trip)
#   6. torch.compile variant (bench_training.py, unet), with whatever time is left
# Writes into ${OUT:-benchmarks/results}: qc_metrics.json, scoring.json, training_eager.json, refine.json,
# worker_gpu/bench_worker_gpu.json, training_compile.json, summary.md (all tables), gpu.log (everything
# printed) and prints the tables.
#
#   bash benchmarks/gpu.sh                                    # on the GPU machine, from the repo root
#   GPU_SH_DEVICE=cpu GPU_SH_TINY=1 bash benchmarks/gpu.sh    # a cheap end-to-end dry run on a CPU
#
# Environment: GPU_SH_BUDGET (seconds, default 285), GPU_SH_SUBJECTS (default 100), GPU_SH_COMPILE_PRESETS
# (default "unet"). monai / nibabel come from .gpucarry/wheels when they are not installed.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/results}
DEVICE=${GPU_SH_DEVICE:-cuda}
TINY=${GPU_SH_TINY:-0}
SUBJECTS=${GPU_SH_SUBJECTS:-100}
START=$(date +%s)
DEADLINE=$(( START + ${GPU_SH_BUDGET:-285} ))
mkdir -p "$OUT"
LOG=$OUT/gpu.log MD=$OUT/summary.md STEP_LOG=$(mktemp /tmp/gpu_sh_step.XXXXXX) SIM_LOG=$(mktemp /tmp/gpu_sh_sim.XXXXXX)
: > "$LOG"
trap 'rm -f "$STEP_LOG" "$SIM_LOG"' EXIT

if ! python3 -c "import monai, nibabel" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-index .gpucarry/wheels/*.whl 2>&1 | tail -2
fi
python3 - <<'EOF' | tee -a "$LOG" > "$MD.head"
import os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"# fedqc GPU benchmarks\n\n{gpu}, torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPUs, "
      f"{platform.platform()}\n")
EOF
mv "$MD.head" "$MD"

# Per-size arguments: the defaults on a GPU, tiny ones for a CPU dry run.
if [[ $TINY == 1 ]]; then
    QC_ARGS=(--n-sa 2 --n-la 4 --repeats 1 --torch-batch-slices 40)
    SCORING_ARGS=(--threads 1 --n-sa 3 --n-la 4 --size 64 --train-cases 4 --train-epochs 1 --ae-epochs 1 --repeats 1
                  --repeats-per-case 1 --metric torch)
    TRAIN_ARGS=(--threads 1 --presets tiny --size 64 --batch-size 4 --steps 2 --repeats 1)
    SUBJECTS=3
    REFINE_ARGS=(--threads 1 --preset tiny --labelled-subjects 4 --size 64 --spacing 2.5 --epochs 1 --ae-epochs 1
                 --k-semi 1 --tukey-factor 0 --fences unlabelled --loop-slices 16)
else
    QC_ARGS=(--repeats 3)
    SCORING_ARGS=(--repeats 3 --repeats-per-case 1)
    TRAIN_ARGS=(--presets unet dynunet --steps 30 --repeats 2)
    REFINE_ARGS=(--k-semi 2)
fi
SIM_ARGS=(--subjects "$SUBJECTS" "${REFINE_ARGS[@]}")

# The site's data: simulated on the CPU while the GPU benchmarks run.
python3 benchmarks/bench_refine.py "${SIM_ARGS[@]}" --simulate-only > "$SIM_LOG" 2>&1 &
SIM_PID=$!

step() {  # step TITLE LIMIT_S COMMAND...: run under timeout (capped by the deadline), log, print its tables
    local title=$1 limit=$2 left rc t0
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        printf '\n## %s\n\nskipped: %s s left of the time budget\n' "$title" "$left" | tee -a "$MD"
        return
    fi
    printf '\n===== %s (timeout %s s): %s\n' "$title" "$limit" "$*" >> "$LOG"
    t0=$(date +%s)
    timeout "$limit" "$@" > "$STEP_LOG" 2>&1
    rc=$?
    cat "$STEP_LOG" >> "$LOG"
    {
        printf '\n## %s\n\n' "$title"
        awk '/^(\||- |QC scoring|Per-site|data:)/ { k = /^\|/ ? 1 : 2; if (p && k != p) print ""; print; p = k }' \
            "$STEP_LOG"
        (( rc == 0 )) || { printf '\nexit %s%s; last lines:\n\n' "$rc" "$( ((rc == 124)) && echo ' (timed out)')"; \
                           tail -n 5 "$STEP_LOG" | sed 's/^/    /'; }
        printf '\n(%s s)\n' "$(( $(date +%s) - t0 ))"
    } | tee -a "$MD"
}

step "1. QC metric step, torch path on $DEVICE (fedqc.qc.metrics_torch, method window)" 60 \
    python3 benchmarks/bench_qc_metrics.py --torch-device "$DEVICE" --torch-only --torch-methods window \
    "${QC_ARGS[@]}" --out "$OUT/qc_metrics.json"
step "2. QC scoring pass (segment -> reconstruct -> pDC/pHD, m_best = 3)" 75 \
    python3 benchmarks/bench_scoring.py --device "$DEVICE" "${SCORING_ARGS[@]}" --json "$OUT/scoring.json"
step "3. Training loop vs bare PyTorch (fp32 eager, bf16, bf16 + channels_last)" 80 \
    python3 benchmarks/bench_training.py --device "$DEVICE" --no-compile "${TRAIN_ARGS[@]}" \
    --json "$OUT/training_eager.json"
wait "$SIM_PID"
cat "$SIM_LOG" >> "$LOG"
step "4. Per-site refinement, simulated site of $SUBJECTS subjects" 130 \
    python3 benchmarks/bench_refine.py --device "$DEVICE" --subjects "$SUBJECTS" "${REFINE_ARGS[@]}" \
    --json "$OUT/refine.json"
WORKER_ARGS=()
[[ $TINY == 1 ]] && WORKER_ARGS=(--subjects 4 --messages 2)
step "5. Deployment: a site worker on $DEVICE keeps its CUDA context and data across messages" 70 \
    python3 benchmarks/bench_worker_gpu.py --device "$DEVICE" "${WORKER_ARGS[@]}" --out "$OUT/worker_gpu"
if [[ $DEVICE == cuda* ]]; then
    step "6. Training loop with torch.compile (bf16), ${GPU_SH_COMPILE_PRESETS:-unet}" 120 \
        python3 benchmarks/bench_training.py --device "$DEVICE" --presets ${GPU_SH_COMPILE_PRESETS:-unet} \
        --steps 30 --repeats 2 --json "$OUT/training_compile.json"
fi
printf '\ntotal %s s; files in %s: %s\n' "$(( $(date +%s) - START ))" "$OUT" "$(ls "$OUT" | tr '\n' ' ')" | tee -a "$MD"
