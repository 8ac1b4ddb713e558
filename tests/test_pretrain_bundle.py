"""The pretraining bundle end to end on real CT, through `python -m monai.bundle run`."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigWorkflow
from pgl_bundle.networks import PGLResNetEncoder

SMALL = ["--encoder_layers", "[1,1,1,1]", "--patch_size", "[64,64,16]", "--hidden_channels", "512"]


def run_bundle(repo_root, bundle_root, *args: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        *args,
        "--config_file",
        "configs/pretrain.json",
        "--logging_file",
        "configs/logging.conf",
        "--bundle_root",
        str(bundle_root),
        "--num_workers",
        "0",
        *SMALL,
    ]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def pretrained(repo_root, shared_data, tmp_path_factory):
    bundle_root = tmp_path_factory.mktemp("pretrain")
    log = run_bundle(
        repo_root,
        bundle_root,
        "training",
        "--dataset_dir",
        str(shared_data / "unlabeled"),
        "--batch_size",
        "1",
        "--max_epochs",
        "2",
    )
    return bundle_root, log


def losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"train_loss: ([-\d.naninf]+)", log)]


def test_run_finishes_with_finite_moving_loss(pretrained):
    _, log = pretrained
    values = losses(log)
    assert len(values) == 6, log[-2000:]  # 3 unlabelled CTs, batch 1, 2 epochs
    assert all(math.isfinite(v) for v in values)
    assert max(values) - min(values) > 1e-3, f"loss did not move: {values}"


def test_checkpoints_and_encoder_load_back(pretrained):
    bundle_root, _ = pretrained
    models = bundle_root / "models"
    state = torch.load(models / "pretrained_encoder.pt", map_location="cpu", weights_only=True)
    encoder = PGLResNetEncoder(layers=(1, 1, 1, 1))
    encoder.load_state_dict(state, strict=True)
    checkpoint = torch.load(models / "checkpoints" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert set(checkpoint) == {"network", "optimizer", "lr_scheduler", "trainer", "run"}  # run: the run's id
    for name, tensor in state.items():
        torch.testing.assert_close(checkpoint["network"][f"online.encoder.{name}"], tensor)
    assert checkpoint["trainer"]["iteration"] == 6
    # the target is a different network from the online one after training
    assert any(
        not torch.equal(checkpoint["network"][f"target.encoder.{n}"], t)
        for n, t in state.items()
        if t.is_floating_point()
    )


def test_plain_run_resumes_from_checkpoint(pretrained, repo_root, shared_data, tmp_path):
    bundle_root, _ = pretrained
    checkpoint = bundle_root / "models" / "checkpoints" / "checkpoint_final.pt"
    log = run_bundle(
        repo_root,
        tmp_path,
        "--dataset_dir",
        str(shared_data / "unlabeled"),
        "--batch_size",
        "1",
        "--max_epochs",
        "3",
        "--resume_from",
        str(checkpoint),
    )
    assert f"Restored all variables from {checkpoint}" in log
    assert len(losses(log)) == 3
    final = torch.load(tmp_path / "models" / "checkpoints" / "checkpoint_final.pt", weights_only=False)
    assert final["trainer"]["iteration"] == 9


@pytest.mark.parametrize("config", ["configs/pretrain.json"])
def test_check_properties(repo_root, config, tmp_path):
    """In a folder of its own: the repository's models/ may hold the quick start's run, which a new run refuses."""
    workflow = ConfigWorkflow(
        config_file=str(repo_root / config),
        workflow_type="train",
        meta_file=str(repo_root / "configs" / "metadata.json"),
        logging_file=str(repo_root / "configs" / "logging.conf"),
        bundle_root=str(tmp_path),
    )
    workflow.initialize()
    assert not workflow.check_properties()
