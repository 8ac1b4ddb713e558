#!/usr/bin/env bash
# The `gpu-10min` preset on one lent GPU: `python -m pgl_bundle compare` (PGL and BYOL pretraining, learning-rate
# sweep, seeds, tests) and, as soon as both encoders exist, `python -m pgl_bundle probe_curve` on them (random, PGL,
# BYOL, 3 seeds), side by side on the one GPU. Results: docs/results.md ("gpu-10min").
#
# On the session's `device` machine the repository travels and ../shared does not, nor do MONAI, Ignite, nibabel and
# fire (the machine has PyTorch). Once, in the checkout the session started in:
#
#   printf '/.whl/\n/.gpu_data/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 fire==0.7.1 termcolor
#   # .gpu_data/data.tar.xz: sts/ (STS_001-005, 019-030 with CT_image.nii decompressed and a dataset.json of those 17
#   # cases in that order, so compare's split is the 30-case one's) and unlabelled/ (lung_pet_ct_dx.nii,
#   # example_ct.nii): 48 MB, under the 64 MB that travels
#
# then run(command="BUDGET=580 bash scripts/gpu_10min.sh", carry=[".whl", ".gpu_data"], timeout_s=600) (one call may
# last 600 s; the measured run needed about 545 s from a cold machine).
# Elsewhere (a workstation with the bundle installed): DATA=<folder holding sts/ and unlabelled/> OUT=<folder> bash
# scripts/gpu_10min.sh. PRESET=tiny runs the same steps with the tiny preset (a CPU smoke test).
#
# Everything returned is in $OUT: driver.log (this script's output), compare_results.md/.csv, compare_sweep.csv,
# probe_curve.md/.csv, runs.tar.gz (every stage's log.txt and timings, no weights).
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the results}
PRESET=${PRESET:-gpu-10min}
BUDGET=${BUDGET:-600}  # seconds for everything (the preset's 10 minutes); the stages get what is left after set-up
WORK=${WORK:-/tmp/gpu_10min}
source scripts/gpu_env.sh
if [ -z "${DATA:-}" ]; then
    DATA=$WORK/data
    mkdir -p "$DATA" && tar -xJf .gpu_data/data.tar.xz -C "$DATA" || exit 1
fi
stamp "set-up done"

COMPARE=$WORK/compare
PROBES=$WORK/probes
EPOCHS=$(python3 -c "from pgl_bundle.compare import PRESETS; print(PRESETS['$PRESET']['pretrain_epochs'][-1])")
python3 -m pgl_bundle compare --labelled "$DATA/sts" --output_dir "$COMPARE" --preset "$PRESET" \
    --unlabelled "['$DATA/sts','$DATA/unlabelled']" &
COMPARE_PID=$!

# the probes start once both encoders are written, at the pretraining runs' last iteration
PGL=$COMPARE/pretrain/pgl_${EPOCHS}ep
BYOL=$COMPARE/pretrain/byol_${EPOCHS}ep
until [ -f "$PGL/models/pretrained_encoder.pt" ] && [ -f "$BYOL/models/pretrained_encoder.pt" ]; do
    kill -0 $COMPARE_PID 2>/dev/null || break
    [ "$(left)" -gt 60 ] || break
    sleep 2
done
stamp "pretraining done"
LAST=$(python3 -c "from pgl_bundle.probe_curve import checkpoints_by_iteration as c; print(max(c('$PGL')))" 2>/dev/null)
if [ -n "$LAST" ]; then
    timeout "$(($(left) - 25))" python3 -m pgl_bundle probe_curve --labelled "$DATA/sts" --output_dir "$PROBES" \
        --preset "$PRESET" --pgl_run "$PGL" --byol_run "$BYOL" --iterations "[0,$LAST]" --parallel 3 &
    PROBE_PID=$!
fi
# the comparison gets the budget's end; the probes theirs, a little earlier
( sleep "$(($(left) - 20))"; kill $COMPARE_PID 2>/dev/null; pkill -f "monai.bundle run" ) &
WATCHDOG=$!
wait $COMPARE_PID; stamp "compare exit $?"
[ -n "${PROBE_PID:-}" ] && { wait "$PROBE_PID"; stamp "probe_curve exit $?"; }
kill $WATCHDOG 2>/dev/null
[ -f "$PROBES/probe_curve.md" ] || python3 -m pgl_bundle probe_curve --labelled "$DATA/sts" --output_dir "$PROBES" \
    --preset "$PRESET" --iterations "[0,${LAST:-1}]" --report_only True >/dev/null 2>&1

for f in results.md results.csv sweep.csv; do cp "$COMPARE/$f" "$OUT/compare_$f" 2>/dev/null; done
for f in probe_curve.md probe_curve.csv; do cp "$PROBES/$f" "$OUT/$f" 2>/dev/null; done
(cd "$WORK" && find compare probes \( -name log.txt -o -name '*.json' -o -name '*.csv' -o -name '*.md' \) |
    tar -czf "$OUT/runs.tar.gz" -T -)
cat "$OUT"/compare_results.md "$OUT"/probe_curve.md 2>/dev/null
stamp "end"
