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
#   compare  PGL pretraining of the ResNet-50 for at least PRETRAIN_ITERATIONS iterations (the PRESET's batch, 32
#            for gpu-10min), then random vs pretrained fine-tuning, `python -m pgl_bundle compare`, then dense probes
#            of the encoders at iterations 0 and the last, `python -m pgl_bundle probe_curve`. OUT_DIR/:
#            compare_results.md/.csv, compare_sweep.csv, probe_curve.md/.csv, runs_logs.tar.gz (every stage's log,
#            no weights); the runs themselves (checkpoints of 1.1 GB) in WORK, where a rerun resumes them.
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
#   PRETRAIN_ITERATIONS  at least this many pretraining iterations (default 1000)
#   PRETRAIN_EPOCHS  compare's pretraining epochs; default: enough for PRETRAIN_ITERATIONS at the gpu-10min preset's
#                    epoch (volumes x 16 repeats / batch 32, the volumes less the 2 validation and 10 test cases that
#                    compare keeps out of pretraining); the iterations reached are checked after the run
#   COMPARE_OPTIONS  >>> extra options of `python -m pgl_bundle compare`, word-split (e.g. `--seeds "[0,1,2]"`;
#                    fine-tuning length and transfer strategy, where compare offers them) <<<
#   PROBE_OPTIONS    extra options of `python -m pgl_bundle probe_curve`, word-split
#   WORK             the runs (default ${TMPDIR:-/tmp}/pgl_gpu)
#   SMOKE=1          a CPU smoke test of every step: the tiny table, the tiny preset, one pretraining epoch, short
#                    probes; no CUDA needed, nothing measured
set -euo pipefail
OUT=${1:?usage: bash scripts/gpu.sh OUT_DIR}
DATA=${PGL_DATA_DIR:-../shared/data}
STEPS=${STEPS:-speed compare}
SMOKE=${SMOKE:-0}
PRESET=${PRESET:-$([ "$SMOKE" = 1 ] && echo tiny || echo gpu-10min)}
PRETRAIN_ITERATIONS=${PRETRAIN_ITERATIONS:-1000}
COMPARE_OPTIONS=${COMPARE_OPTIONS:-}
SMOKE_PROBES="--seeds [0] --num_train_cases 2 --num_test_cases 1 --probe_iterations 2 --patch_size [64,64,16]"
PROBE_OPTIONS=${PROBE_OPTIONS:-$([ "$SMOKE" != 1 ] || echo "$SMOKE_PROBES")}
WORK=${WORK:-${TMPDIR:-/tmp}/pgl_gpu}
for step in $STEPS; do
    [[ "$step" == speed || "$step" == compare ]] || { echo "STEPS: unknown step '$step' (speed, compare)" >&2; exit 1; }
done
[ -d "$DATA" ] || { echo "$DATA: no such folder (set PGL_DATA_DIR to the CT folder)" >&2; exit 1; }
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd) WORK=$(cd "$WORK" && pwd) DATA=$(cd "$DATA" && pwd)
exec > >(tee -a "$OUT/gpu.log") 2>&1
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
    [ "$SMOKE" = 1 ] && SPEED=(--budget 900 --real_seconds 60 --tiny --slowdown 4)
    python scripts/benchmark_pretrain.py table --out "$OUT/speed" --data "$DATA/unlabeled" "${SPEED[@]}"
    stamp "speed table done: $OUT/speed/speed.md"
fi

if [[ " $STEPS " == *" compare "* ]]; then
    SOURCES=("$DATA/sts" "$DATA/unlabeled" "$DATA/abdomen/example_ct.nii.gz")
    UNLABELLED="[$(printf "'%s'," "${SOURCES[@]}")]"
    if [ -z "${PRETRAIN_EPOCHS:-}" ]; then
        PRETRAIN_EPOCHS=$([ "$SMOKE" = 1 ] && echo 1 || python -c "import math, os, sys
from pgl_bundle.data import load_datalist
volumes = sum(1 if os.path.isfile(s) else len(load_datalist(s)) for s in sys.argv[2:]) - 12
print(math.ceil(int(sys.argv[1]) / math.ceil(volumes * 16 / 32)))" "$PRETRAIN_ITERATIONS" "${SOURCES[@]}")
    fi
    stamp "compare: preset $PRESET, $PRETRAIN_EPOCHS pretraining epochs, options: ${COMPARE_OPTIONS:-none}"
    # shellcheck disable=SC2086  # COMPARE_OPTIONS and PROBE_OPTIONS are word-split on purpose
    python -m pgl_bundle compare --labelled "$DATA/sts" --unlabelled "$UNLABELLED" --output_dir "$WORK/compare" \
        --preset "$PRESET" --pretrain_epochs "[$PRETRAIN_EPOCHS]" $COMPARE_OPTIONS
    stamp "compare done"
    for f in results.md results.csv sweep.csv; do cp "$WORK/compare/$f" "$OUT/compare_$f"; done

    # the pretraining runs compare wrote (one per method), the iteration their last checkpoint holds
    run_of() {
        local encoder
        encoder=$(find "$WORK/compare" -regex ".*/$1[^/]*/models/pretrained_encoder.pt" | sort | tail -1)
        [ -z "$encoder" ] || dirname "$(dirname "$encoder")"
    }
    PGL_RUN=$(run_of pgl)
    BYOL_RUN=$(run_of byol)
    [ -n "$PGL_RUN" ] || { echo "$WORK/compare: no PGL pretraining run (models/pretrained_encoder.pt)" >&2; exit 1; }
    LAST=$(python -c "import glob, sys, torch
paths = glob.glob(sys.argv[1] + '/models/checkpoints/*.pt')
print(max(torch.load(p, map_location='cpu', mmap=True, weights_only=False)['trainer']['iteration'] for p in paths))
" "$PGL_RUN")
    stamp "PGL pretraining: $LAST iterations ($PGL_RUN)"
    if [ "$SMOKE" != 1 ] && [ "$LAST" -lt "$PRETRAIN_ITERATIONS" ]; then
        echo "$PGL_RUN: $LAST pretraining iterations, fewer than PRETRAIN_ITERATIONS=$PRETRAIN_ITERATIONS" \
            "(set PRETRAIN_EPOCHS)" >&2
        exit 1
    fi
    # shellcheck disable=SC2086
    python -m pgl_bundle probe_curve --labelled "$DATA/sts" --output_dir "$WORK/probes" --preset "$PRESET" \
        --pgl_run "$PGL_RUN" ${BYOL_RUN:+--byol_run "$BYOL_RUN"} --iterations "[0,$LAST]" $PROBE_OPTIONS
    for f in probe_curve.md probe_curve.csv; do cp "$WORK/probes/$f" "$OUT/$f"; done
    (cd "$WORK" && find compare probes \( -name log.txt -o -name '*.json' -o -name '*.csv' -o -name '*.md' \) |
        tar -czf "$OUT/runs_logs.tar.gz" -T -)
    cat "$OUT/compare_results.md" "$OUT/probe_curve.md"
    stamp "compare and probes done"
fi
stamp "end"
