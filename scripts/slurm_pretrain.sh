#!/bin/bash
# Pretraining on several nodes under SLURM: srun starts one torchrun per node, torchrun one process per GPU, and the
# torchruns meet at a c10d rendezvous on the job's first node. Submit from the bundle root, on shared storage:
#
#   sbatch --nodes 2 scripts/slurm_pretrain.sh --dataset_dir /shared/ct --batch_size 8
#   sbatch --nodes 2 scripts/slurm_pretrain.sh --dataset_dir /shared/ct --batch_size 8 \
#       --prepared_storage local --prepared_dir /local_scratch/pgl_prepared    # a copy on each node's own disk
#
# Arguments are overrides of the configs. batch_size is per process (2 nodes x 8 GPUs x 8 = the paper's 128). The
# same command starts the job and continues it (--resume_from latest), after a requeue too; torchrun restarts a
# node's processes up to 3 times (--max_restarts) from the last checkpoint. Settings: NPROC_PER_NODE (default: one
# process per GPU), RDZV_PORT (29500), CONFIGS. See docs/production.md, "Multi-node".
#SBATCH --job-name=pgl-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIGS=${CONFIGS:-"['configs/pretrain.json','configs/pretrain_paper.json','configs/multi_gpu_pretrain.json']"}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# each restart of the processes on a rendezvous store of its own: on torchrun's shared store a restarted process
# can read the previous attempt's addresses and fail to connect (https://github.com/pytorch/pytorch/issues/135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

srun torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "${NPROC_PER_NODE:-gpu}" \
    --rdzv_backend c10d --rdzv_endpoint "$head_node:${RDZV_PORT:-29500}" --rdzv_id "$SLURM_JOB_ID" \
    --max_restarts 3 \
    -m monai.bundle run training --config_file "$CONFIGS" --logging_file configs/logging.conf \
    --checkpoint_every_n_iterations 500 --resume_from latest "$@"
