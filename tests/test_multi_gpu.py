"""The multi-GPU overlays under torchrun, on CPU with gloo and 2 processes: the ranks end with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from pgl_bundle.data import make_synthetic_dataset
from tiny import TINY_PRETRAIN

TINY_TRAIN = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_block": "basic",
    "encoder_width": [8, 8, 8, 8],
    "decoder_channels": [8, 8, 8, 8, 8],
    "patch_size": [32, 32, 16],
    "num_samples": 1,
    "num_val_cases": 2,
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic")), 8, shape=(64, 64, 24))


# the dense probe during pretraining, on rank 0, every 4 iterations
PROBE = {
    "probe_every_n_iterations": 4,
    "probe_num_train_cases": 2,
    "probe_num_val_cases": 2,
    "probe_crops_per_case": 1,
    "probe_iterations": 5,
}


def torchrun(repo_root, tmp_path, configs: list[str], overrides: dict) -> tuple[str, dict, dict]:
    """Run ``configs`` plus a dump of every rank's ``network_def`` weights with 2 processes; return the log and both."""
    dump = tmp_path / "dump.json"
    dump.write_text(
        json.dumps(
            {
                "run_and_dump": [
                    "@run",
                    f"$torch.save(@network_def.state_dict(), "
                    f"'{tmp_path}/rank' + str(torch.distributed.get_rank()) + '.pt')",
                ]
            }
        )
    )
    overrides = {**overrides, "num_workers": 0, "batch_size": 1}
    args = [arg for k, v in overrides.items() for arg in (f"--{k}", json.dumps(v))]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "run_and_dump",
        "--config_file",
        json.dumps([*configs, str(dump)]),
        "--logging_file",
        "configs/logging.conf",
        "--bundle_root",
        str(tmp_path / "bundle"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(2)]
    return result.stdout + result.stderr, ranks[0], ranks[1]


def assert_same_parameters(rank0: dict, rank1: dict, parameter_names: set[str]) -> None:
    assert rank0.keys() == rank1.keys()
    different = [k for k in parameter_names if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"parameters differ between ranks: {different[:5]}"


def test_pretraining_ranks_share_online_and_target_weights(repo_root, tmp_path, synthetic):
    log, rank0, rank1 = torchrun(
        repo_root,
        tmp_path,
        ["configs/pretrain.json", "configs/multi_gpu_pretrain.json"],
        {**TINY_PRETRAIN, "dataset_dir": synthetic, "max_epochs": 2, "probe_dataset": synthetic, **PROBE},
    )
    parameters = {k for k in rank0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert any(k.startswith("online.") for k in parameters) and any(k.startswith("target.") for k in parameters)
    assert_same_parameters(rank0, rank1, parameters)
    # the EMA ran: target and online differ, identically on both ranks
    online = [k for k in parameters if k.startswith("online.")]
    assert any(not torch.equal(rank0[k], rank0["target." + k[len("online.") :]]) for k in online)
    # without SyncBatchNorm (CUDA-only) only the BN statistics of the last step are rank-local
    assert all(k.endswith(("running_mean", "running_var")) for k in rank0 if not torch.equal(rank0[k], rank1[k]))
    checkpoints = tmp_path / "bundle" / "models" / "checkpoints"
    final = torch.load(checkpoints / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 8  # 8 volumes over 2 ranks, batch 1, 2 epochs
    assert len(list((tmp_path / "bundle" / "eval" / "pretrain").iterdir())) == 1  # rank 0 alone writes TensorBoard
    assert log.count("train_loss:") == 8  # and logs
    # and probes, with no collective for the other rank to wait for in vain
    assert log.count("probe: validation Dice") == 2
    record = (tmp_path / "bundle" / "models" / "probe.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in record] == ["iteration", "4", "8"]


def test_finetuning_ranks_share_weights(repo_root, tmp_path, synthetic):
    _, rank0, rank1 = torchrun(
        repo_root,
        tmp_path,
        ["configs/train.json", "configs/multi_gpu_train.json"],
        {**TINY_TRAIN, "dataset_dir": synthetic, "num_iterations": 2, "val_interval": 1},
    )
    assert_same_parameters(rank0, rank1, set(rank0))  # the evaluator's forward re-broadcasts rank 0's BN buffers
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()
    assert len(list((tmp_path / "bundle" / "eval").iterdir())) == 1  # rank 0 alone writes TensorBoard (one writer)


def test_only_the_main_process_writes(repo_root):
    """Every handler that logs or writes files is disabled outside rank 0 (``main_process``), in both trainings."""
    writers = ("StatsHandler", "TensorBoardStatsHandler", "CheckpointSaver", "ProgressBar")
    for name, sections in (
        ("pretrain.json", ["train#handlers", "train#checkpoint_handlers"]),
        ("train.json", ["train#handlers", "validate#handlers"]),
    ):
        config = json.loads((repo_root / "configs" / name).read_text())
        for section in sections:
            outer, inner = section.split("#")
            for handler in config[outer][inner]:
                if handler["_target_"].endswith(writers):
                    assert "not @main_process" in handler.get("_disabled_", ""), (name, section, handler["_target_"])
