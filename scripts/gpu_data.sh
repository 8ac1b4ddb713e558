#!/usr/bin/env bash
# Pretraining's data path on a lent GPU machine (issue 9; figures in docs/benchmarks.md section 5, "Fifth pass", "On
# the GPU host"): the old code (the tree in $OLD, by default .gpu_old) and this tree side by side in one run.
#
#   1. a corpus of N CT-sized phantoms (benchmark_data.py corpus), prepared by both trees (each its own layout);
#   2. view pairs per wall-second through train#dataloader with 1, 4 and 12 workers at batch 32 (benchmark_data.py
#      workers), old then new;
#   3. pretraining of the ResNet-50 (batch 32, bf16, no compile) on the GPU from the prepared data with 2 workers,
#      old then new: the throughput log's pairs/s and the share of time spent waiting for data;
#   4. if the budget leaves room (about 4 min: training 3 min, then the test set's evaluation): the fine-tuning
#      sanity bar's 2000-iteration run of the bundle's network (scripts/finetune_sanity.py, docs/results.md), on
#      .gpu_sanity's 20 STS cases.
#
# On the session's `device` machine the repository travels and ../shared does not, nor do MONAI, Ignite, nibabel and
# fire (see scripts/gpu_10min.sh for .whl and .gpu_sanity). Once, in the checkout:
#
#   printf '/.gpu_old/\n' >> .git/info/exclude
#   mkdir .gpu_old && git archive d37cb71 pgl_bundle configs | tar -x -C .gpu_old   # the code before the change
#
# then run(command="BUDGET=560 bash scripts/gpu_data.sh", carry=[".whl", ".gpu_old", ".gpu_sanity"], timeout_s=600).
# Everything returned is in $OUT: driver.log (this script's output) and the stages' logs.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the results}
BUDGET=${BUDGET:-560}
WORK=${WORK:-/tmp/gpu_data}
OLD=${OLD:-$PWD/.gpu_old}
N=${N:-48}
COUNTS=${COUNTS:-[1,4,12]}  # DataLoader workers to measure
PRETRAIN=${PRETRAIN:-1}  # 0: skip step 3 (a CPU smoke test of the other steps)
source scripts/gpu_env.sh
CPUS=$(nproc)
export OMP_NUM_THREADS=1
stamp "set-up done"

# each tree's code runs from its own folder: `python -m` puts the working directory first on sys.path
prepare() {  # $1: tree, $2: folder
    local begin=$(date +%s)
    (cd "$1" && PYTHONPATH="$1${BASE:+:$BASE}" python3 -m pgl_bundle prepare "$WORK/ct" "$2" --hu_window "[-1024,325]" \
        --num_workers "$CPUS" > /dev/null) || return 1
    echo "prepared $N volumes in $(($(date +%s) - begin)) s with $CPUS processes ($1)"
}
python3 scripts/benchmark_data.py corpus "$WORK/ct" "$N" --num_workers "$CPUS" || exit 1
prepare "$PWD" "$WORK/prepared" || exit 1
[ -d "$OLD" ] && { prepare "$OLD" "$WORK/prepared_old" || exit 1; }
stamp "corpus and preparation done"

workers() {  # $1: tree, $2: prepared folder
    PYTHONPATH="$1${BASE:+:$BASE}:$PWD/scripts" timeout 120 python3 scripts/benchmark_data.py workers "$2" \
        --counts "$COUNTS" --num_volumes "$N" --batch_size 32 --seconds 8 --config "$1/configs/pretrain.json"
}
[ -d "$OLD" ] && { echo "## old ($OLD)"; workers "$OLD" "$WORK/prepared_old"; }
echo "## new"
workers "$PWD" "$WORK/prepared"
stamp "DataLoader workers done"

pretrain() {  # $1: tree, $2: prepared folder, $3: name
    (cd "$1" && PYTHONPATH="$1${BASE:+:$BASE}" timeout 150 python3 -m monai.bundle run training \
        --config_file "$1/configs/pretrain.json" --bundle_root "$WORK/$3" --prepared_dir "$2" \
        --hu_window "[-1024,325]" --batch_size 32 --volume_repeats 16 --num_workers 2 --max_epochs 3 \
        --compile False --checkpoint_interval 1000 --log_interval 8 > "$OUT/pretrain_$3.log" 2>&1)
    echo "## pretraining, $3 (exit $?)"
    grep -E "pairs/s|pairs per second|data wait|Engine run finished" "$OUT/pretrain_$3.log" | tail -12
}
if [ "$PRETRAIN" = 1 ]; then
    [ -d "$OLD" ] && pretrain "$OLD" "$WORK/prepared_old" old
    pretrain "$PWD" "$WORK/prepared" new
fi
stamp "pretraining done"

if [ "$(left)" -gt 270 ] && [ -f .gpu_sanity/data.tar.xz ]; then
    mkdir -p "$WORK/sanity_data" && tar -xJf .gpu_sanity/data.tar.xz -C "$WORK/sanity_data"
    timeout $(($(left) - 15)) python3 scripts/finetune_sanity.py --labelled "$WORK/sanity_data/sts" \
        --output_dir "$WORK/sanity" --networks "['bundle']" --iterations "[2000]" --val_interval 500 \
        --num_workers 4 --num_threads 4
    echo "finetune_sanity exit $?"
    cp "$WORK/sanity/sanity.csv" "$OUT/" 2>/dev/null
    for log in "$WORK"/sanity/*/log.txt; do
        grep -E "Metrics|Iter: 1/|Iter: 500/|finished" "$log" > "$OUT/sanity_$(basename "$(dirname "$log")").txt"
    done
else
    echo "no time left for the 2000-iteration sanity run ($(left) s)"
fi
stamp "done"
