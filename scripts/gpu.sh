#!/usr/bin/env bash
# What this bundle measures on a GPU, on any CUDA host, run from the repository root:
#
#   bash scripts/gpu.sh OUT_DIR
#
# Steps, in order (STEPS selects them; each step's tables are written before the next starts):
#   speed    the pretraining step's speed table, `python scripts/benchmark_pretrain.py table`: view pairs/s and % of
#            the dense bf16 peak for fp32, + bf16, + channels-last, + cudnn.benchmark, + fused Adam and foreach EMA,
#            + torch.compile in its three modes; the largest batch of 32-128 that runs, with its peak memory; a real
#            `monai.bundle run training` of SPEED_REAL_SECONDS with its ThroughputHandler pairs/s against the
#            isolated step. OUT_DIR/speed/: speed.md, speed.csv, results.json, speed.log, real_run.log.
#   compare  `python -m pgl_bundle compare --preset PRESET COMPARE_OPTIONS`: PGL (and BYOL) pretraining of the
#            preset's encoder (the ResNet-50 at batch 32 for gpu-10min), then random vs pretrained fine-tuning; then
#            dense probes of the pretrained encoders at iteration 0 and the last, `python -m pgl_bundle probe_curve`;
#            the script fails at the end if the PGL run has fewer than PRETRAIN_ITERATIONS iterations. OUT_DIR/:
#            compare/ (compare's tables, CSV and plot), probe_curve.md/.csv, runs_logs.tar.gz (every stage's log,
#            no weights); the runs themselves (checkpoints of 1.1 GB) in RUNS_DIR, where a rerun resumes them.
# Everything printed goes to OUT_DIR/gpu.log too.
#
# Environment (all optional):
#   PGL_DATA_DIR     the CT (default ../shared/data): sts/ (labelled, its dataset.json split), unlabeled/ and
#                    abdomen/example_ct.nii.gz (pretraining, with sts/'s images)
#   WHEELS           a folder of wheels: installed first, offline (`pip install --no-index --find-links`); unset:
#                    nothing is installed (the project's packages must be importable already)
#   STEPS            "speed compare" (default), or one of them
#   SPEED_BUDGET     seconds for the speed table (default 900; lower-priority rows are skipped, and listed, after)
#   SPEED_REAL_SECONDS  the real run's length (default 150)
#   PRESET           compare's and probe_curve's preset (default gpu-10min)
#   PRETRAIN_ITERATIONS  the PGL pretraining run must reach this many iterations (default 1000; 0: no check)
#   COMPARE_OPTIONS  extra options of `python -m pgl_bundle compare`, word-split, unquoted (e.g.
#                    `--seeds [0,1,2] --strategies [joint]`): pretraining and fine-tuning lengths, strategies
#   PROBE_OPTIONS    extra options of `python -m pgl_bundle probe_curve`, word-split
#   RUNS_DIR         the runs (default ${TMPDIR:-/tmp}/pgl_gpu)
#   SMOKE=1          a CPU smoke test of every step: the tiny table, the tiny preset, short probes, no iteration
#                    check; no CUDA needed, nothing measured
set -euo pipefail
OUT_DIR=${1:?usage: bash scripts/gpu.sh OUT_DIR}
DATA=${PGL_DATA_DIR:-../shared/data}
STEPS=${STEPS:-speed compare}
SMOKE=${SMOKE:-0}
PRESET=${PRESET:-$([ "$SMOKE" = 1 ] && echo tiny || echo gpu-10min)}
PRETRAIN_ITERATIONS=${PRETRAIN_ITERATIONS:-$([ "$SMOKE" = 1 ] && echo 0 || echo 1000)}
COMPARE_OPTIONS=${COMPARE_OPTIONS:-}
SMOKE_PROBES="--seeds [0] --num_train_cases 2 --num_test_cases 1 --probe_iterations 2 --patch_size [64,64,16]"
PROBE_OPTIONS=${PROBE_OPTIONS:-$([ "$SMOKE" != 1 ] || echo "$SMOKE_PROBES")}
RUNS_DIR=${RUNS_DIR:-${TMPDIR:-/tmp}/pgl_gpu}
for step in $STEPS; do
    [[ "$step" == speed || "$step" == compare ]] || { echo "STEPS: unknown step '$step' (speed, compare)" >&2; exit 1; }
done
[ -d "$DATA" ] || { echo "$DATA: no such folder (set PGL_DATA_DIR to the CT folder)" >&2; exit 1; }
mkdir -p "$OUT_DIR" "$RUNS_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd) RUNS_DIR=$(cd "$RUNS_DIR" && pwd) DATA=$(cd "$DATA" && pwd)
exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1
START=$(date +%s)
stamp() { echo "[$(date -u '+%F %T') UTC, $(($(date +%s) - START)) s] $*"; }

if [ -n "${WHEELS:-}" ]; then
    python -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
set -f  # no globbing: options such as --seeds [0] are passed as written
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # this checkout's pgl_bundle, in every stage
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not found"
python -c "import os, torch, monai, ignite, pgl_bundle; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'monai', monai.__version__, 'ignite', ignite.__version__, 'cpus', os.cpu_count())"
if [ "$SMOKE" != 1 ] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device visible to torch: this script measures a GPU (SMOKE=1 runs its CPU smoke test)" >&2
    exit 1
fi
for folder in sts unlabeled abdomen; do
    [ -d "$DATA/$folder" ] || { echo "$DATA/$folder: missing (set PGL_DATA_DIR to the CT folder)" >&2; exit 1; }
done
stamp "set-up done"

if [[ " $STEPS " == *" speed "* ]]; then
    SPEED=(--budget "${SPEED_BUDGET:-900}" --real_seconds "${SPEED_REAL_SECONDS:-150}")
    [ "$SMOKE" = 1 ] && SPEED=(--budget "${SPEED_BUDGET:-900}" --real_seconds 60 --tiny --slowdown 4)
    python scripts/benchmark_pretrain.py table --out "$OUT_DIR/speed" --data "$DATA/unlabeled" "${SPEED[@]}"
    stamp "speed table done: $OUT_DIR/speed/speed.md"
fi

if [[ " $STEPS " == *" compare "* ]]; then
    UNLABELLED="['$DATA/sts','$DATA/unlabeled','$DATA/abdomen/example_ct.nii.gz']"
    stamp "compare: preset $PRESET, options: ${COMPARE_OPTIONS:-none}"
    # shellcheck disable=SC2086  # COMPARE_OPTIONS and PROBE_OPTIONS are word-split on purpose
    python -m pgl_bundle compare --labelled "$DATA/sts" --unlabelled "$UNLABELLED" --output_dir "$RUNS_DIR/compare" \
        --preset "$PRESET" $COMPARE_OPTIONS
    stamp "compare done"
    mkdir -p "$OUT_DIR/compare"
    find "$RUNS_DIR/compare" -maxdepth 1 \( -name '*.md' -o -name '*.csv' -o -name '*.png' \) -exec cp {} "$OUT_DIR/compare/" \;

    # the pretraining runs compare wrote (one per method), the iteration their last checkpoint holds
    run_of() {
        local encoder
        encoder=$(find "$RUNS_DIR/compare" -regex ".*/$1[^/]*/models/pretrained_encoder.pt" | sort | tail -1)
        [ -z "$encoder" ] || dirname "$(dirname "$encoder")"
    }
    PGL_RUN=$(run_of pgl)
    BYOL_RUN=$(run_of byol)
    [ -n "$PGL_RUN" ] || { echo "$RUNS_DIR/compare: no PGL pretraining run (models/pretrained_encoder.pt)" >&2; exit 1; }
    LAST=$(python -c "import glob, sys, torch
paths = glob.glob(sys.argv[1] + '/models/checkpoints/*.pt')
print(max(torch.load(p, map_location='cpu', mmap=True, weights_only=False)['trainer']['iteration'] for p in paths))
" "$PGL_RUN")
    stamp "PGL pretraining: $LAST iterations ($PGL_RUN)"
    # shellcheck disable=SC2086
    python -m pgl_bundle probe_curve --labelled "$DATA/sts" --output_dir "$RUNS_DIR/probes" --preset "$PRESET" \
        --pgl_run "$PGL_RUN" ${BYOL_RUN:+--byol_run "$BYOL_RUN"} --iterations "[0,$LAST]" $PROBE_OPTIONS
    for f in probe_curve.md probe_curve.csv; do cp "$RUNS_DIR/probes/$f" "$OUT_DIR/$f"; done
    (cd "$RUNS_DIR" && find compare probes \( -name log.txt -o -name '*.json' -o -name '*.csv' -o -name '*.md' \) |
        tar -czf "$OUT_DIR/runs_logs.tar.gz" -T -)
    cat "$OUT_DIR/compare/results.md" "$OUT_DIR/probe_curve.md"
    stamp "compare and probes done"
    if [ "$LAST" -lt "$PRETRAIN_ITERATIONS" ]; then
        echo "$PGL_RUN: $LAST pretraining iterations, fewer than PRETRAIN_ITERATIONS=$PRETRAIN_ITERATIONS: the" \
            "preset's pretraining is too short for this run (PRESET, COMPARE_OPTIONS)" >&2
        exit 1
    fi
fi
stamp "end"
