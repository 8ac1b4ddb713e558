# Sourced by the scripts run on a lent GPU machine (gpu_10min.sh, gpu_data.sh), after they set OUT, WORK and BUDGET:
# their output to $OUT/driver.log, `left` (seconds of BUDGET left) and `stamp`, the wheels of .whl installed (the
# machine has PyTorch, not MONAI, Ignite, nibabel or fire), this tree first on PYTHONPATH; BASE: PYTHONPATH without it.
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/driver.log") 2>&1
left() { echo $((BUDGET - ($(date +%s) - START))); }
stamp() { echo "[$(($(date +%s) - START)) s] $*"; }

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
BASE=${PYTHONPATH:-}
export PYTHONPATH="$PWD${BASE:+:$BASE}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import os, torch, monai, ignite, pgl_bundle; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'monai', monai.__version__, 'ignite', ignite.__version__, 'cpus', os.cpu_count())" || exit 1
