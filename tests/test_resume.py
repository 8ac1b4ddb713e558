"""Resume: a pretraining run killed with SIGKILL mid-epoch ends exactly like an uninterrupted one; saves are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.transforms import Compose, RandFlip, RandGaussianNoise, Randomizable
from pgl_bundle import EpochSeededDataset, ResumableSampler, latest_checkpoint
from pgl_bundle.data import make_synthetic_dataset
from pgl_bundle.distributed import reseed
from tiny import TINY_PRETRAIN

# 8 volumes, batch 1: 8 iterations per epoch, 24 in all; checkpoints at iterations 5, 10, 15, 20 and epochs 1, 2, 3;
# the dense probe (on the phantoms' labels) at iterations 6, 12, 18, 24
RUN = {
    **TINY_PRETRAIN,
    "num_workers": 0,
    "batch_size": 1,
    "max_epochs": 3,
    "checkpoint_every_n_iterations": 5,
    "probe_every_n_iterations": 6,
    "probe_num_train_cases": 2,
    "probe_num_val_cases": 2,
    "probe_crops_per_case": 2,
    "probe_iterations": 10,
}
PAUSE_AT = 13  # mid-epoch 2, three iterations after the checkpoint of iteration 10
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread per process (no oversubscription on shared cores); pgl_bundle importable even when not installed
PYTHONPATH = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}


def bundle_cmd(run_id: str, configs: list[str], bundle_root, **overrides) -> list[str]:
    args = [arg for k, v in {**RUN, **overrides}.items() for arg in (f"--{k}", json.dumps(v))]
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        json.dumps(configs),
        "--logging_file",
        "configs/logging.conf",
        "--bundle_root",
        str(bundle_root),
        *args,
    ]


def run(repo_root, cmd: list[str]) -> str:
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def test_killed_run_resumes_to_the_same_state(repo_root, tmp_path):
    data = make_synthetic_dataset(str(tmp_path / "data"), 8, shape=(64, 64, 24))
    marker = tmp_path / "paused"
    # test-only run id: after iteration PAUSE_AT, touch the marker and block (the test then kills the process)
    pause = tmp_path / "pause.json"
    pause.write_text(
        json.dumps(
            {
                "pause_then_train": [
                    f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once={PAUSE_AT}), "
                    f"lambda engine: (open('{marker}', 'w').close(), os.read(os.pipe()[0], 1)))",
                    "@run",
                ]
            }
        )
    )
    killed_root, full_root = tmp_path / "killed", tmp_path / "uninterrupted"
    full_log = open(tmp_path / "uninterrupted.log", "w")
    uninterrupted = subprocess.Popen(
        bundle_cmd("training", ["configs/pretrain.json"], full_root, dataset_dir=data, probe_dataset=data),
        cwd=repo_root,
        stdout=full_log,
        stderr=subprocess.STDOUT,
        env=ENV,
    )
    victim = subprocess.Popen(
        bundle_cmd(
            "pause_then_train", ["configs/pretrain.json", str(pause)], killed_root, dataset_dir=data, probe_dataset=data
        ),
        cwd=repo_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    deadline = time.time() + 240
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the run to kill did not reach its pause"
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    checkpoints = killed_root / "models" / "checkpoints"
    assert not (checkpoints / "checkpoint_final.pt").exists()
    assert latest_checkpoint(str(checkpoints)) == str(checkpoints / "checkpoint_iteration=10.pt")

    log = run(
        repo_root,
        bundle_cmd(
            "training",
            ["configs/pretrain.json"],
            killed_root,
            dataset_dir=data,
            probe_dataset=data,
            resume_from="latest",
        ),
    )
    assert f"Restored all variables from {checkpoints / 'checkpoint_iteration=10.pt'}" in log
    assert "epoch 2: resuming after its first 2 batches" in log
    assert log.count("train_loss:") == 24 - 10
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "uninterrupted.log").read_text()[-5000:]
    full_log.close()

    # the killed process's checkpoints (iterations 5 and 10, epoch 1) were rotated out as the resumed run saved
    assert sorted(os.listdir(checkpoints)) == sorted(os.listdir(full_root / "models" / "checkpoints"))
    resumed, reference = (
        torch.load(root / "models" / "checkpoints" / "checkpoint_final.pt", map_location="cpu", weights_only=True)
        for root in (killed_root, full_root)
    )
    assert resumed["trainer"] == reference["trainer"] and reference["trainer"]["iteration"] == 24
    assert resumed["lr_scheduler"] == reference["lr_scheduler"]
    assert resumed["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    for index, state in reference["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][index][key], value), (index, key)
    # online, predictor and the EMA target, parameters and BN statistics: bit for bit
    different = [k for k, v in reference["network"].items() if not torch.equal(resumed["network"][k], v)]
    assert not different, different[:5]
    assert any(k.startswith("target.") for k in reference["network"])

    # the probe's record and best encoder: those of the uninterrupted run, though the killed run probed at 12 after
    # its last checkpoint (10) and the resumed one probed again from there
    models = {root: root / "models" for root in (killed_root, full_root)}
    record = (models[full_root] / "probe.csv").read_text()
    assert (models[killed_root] / "probe.csv").read_text() == record
    assert [line.split(",")[0] for line in record.splitlines()] == ["iteration", "6", "12", "18", "24"]
    plans = {root: json.loads((m / "pretrained_encoder_best.json").read_text()) for root, m in models.items()}
    best = {k: plans[full_root]["pretraining"][k] for k in ("iteration", "val_dice")}
    assert {k: plans[killed_root]["pretraining"][k] for k in best} == best
    assert best["val_dice"] == max(float(line.split(",")[1]) for line in record.splitlines()[1:])
    encoders = [torch.load(m / "pretrained_encoder_best.pt", weights_only=True) for m in models.values()]
    assert all(torch.equal(encoders[0][k], v) for k, v in encoders[1].items())
    # the final encoder's provenance: the same data manifest in both runs, the final iteration
    final = [json.loads((m / "pretrained_encoder.json").read_text())["pretraining"] for m in models.values()]
    assert final[0]["data"] == final[1]["data"] and final[0]["data"]["num_volumes"] == 8
    assert final[0]["iteration"] == final[1]["iteration"] == 24


SAVER = """
import sys
import torch
from ignite.engine import Engine
from pgl_bundle import AtomicCheckpointSaver

weights = torch.nn.Linear(1, 1 << 24, bias=False)  # a 64 MB checkpoint, long enough to be killed while writing

def step(engine, batch):
    weights.weight.data.fill_(engine.state.iteration)

trainer = Engine(step)
AtomicCheckpointSaver(sys.argv[1], {"net": weights, "trainer": trainer}, epoch_level=False, save_interval=1,
                      n_saved=2).attach(trainer)
trainer.run(range(50), max_epochs=1)
"""


def test_kill_during_a_save_leaves_the_previous_checkpoint_whole(repo_root, tmp_path):
    saver = tmp_path / "saver.py"
    saver.write_text(textwrap.dedent(SAVER))
    folder = tmp_path / "checkpoints"
    child = subprocess.Popen(
        [sys.executable, str(saver), str(folder)],
        cwd=repo_root,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    try:
        while time.time() < deadline and child.poll() is None:
            names = os.listdir(folder) if folder.exists() else []
            if any(n.endswith(".pt") for n in names) and any(n.startswith("tmp") for n in names):
                child.send_signal(signal.SIGKILL)  # a previous checkpoint exists and the next one is being written
                break
            time.sleep(0.002)
    finally:
        child.kill()
        child.wait()
    names = os.listdir(folder)
    assert any(n.startswith("tmp") for n in names), f"not killed during a save: {names}"
    for name in (n for n in names if n.endswith(".pt")):
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        assert torch.all(state["net"]["weight"] == state["trainer"]["iteration"]), name
    latest = latest_checkpoint(str(folder))
    assert latest == str(max(folder.glob("*.pt"), key=lambda p: int(p.stem.split("=")[1])))


def test_latest_checkpoint_skips_unloadable_files(tmp_path):
    torch.save({"trainer": {"iteration": 4}}, tmp_path / "checkpoint_iteration=4.pt")
    (tmp_path / "checkpoint_iteration=6.pt").write_bytes(b"truncated")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_iteration=4.pt")
    assert latest_checkpoint(str(tmp_path / "none")) == ""


def test_sampler_order_depends_on_the_epoch_and_skips_once():
    sampler = ResumableSampler(list(range(10)), seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(10)) and order == list(sampler)
    sampler.skip(4)
    assert list(sampler) == order[4:] and list(sampler) == order
    sampler.set_epoch(3)
    assert list(sampler) != order
    ranks = [ResumableSampler(list(range(10)), num_replicas=2, rank=r, seed=3) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(10))


def test_reseed_gives_monai_set_random_state():
    def chain():
        return Compose([RandGaussianNoise(prob=1.0), Compose([RandGaussianNoise(), RandFlip()]), RandFlip()])

    ours, theirs = chain(), chain()
    ours.transforms[2].__dict__.pop("R")  # one member still on the class's shared generator
    reseed(ours, 12345)
    theirs.set_random_state(seed=12345)
    pairs = [(ours, theirs), *zip(ours.transforms, theirs.transforms)]
    pairs += zip(ours.transforms[1].transforms, theirs.transforms[1].transforms)  # the nested Compose's members
    for mine, monai in ((a.R, b.R) for a, b in pairs):
        assert mine is not Randomizable.R
        np.testing.assert_array_equal(mine.get_state()[1], monai.get_state()[1])


def test_augmentation_depends_on_seed_epoch_and_index_only():
    def dataset():
        return EpochSeededDataset(Dataset([torch.zeros(3)] * 4, Compose([RandGaussianNoise(prob=1.0)])), seed=1)

    first, second = dataset(), dataset()
    first.set_epoch(1)
    second.set_epoch(1)
    forward = [first[i] for i in range(4)]
    backward = [second[i] for i in reversed(range(4))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert not torch.equal(forward[0], forward[1])
    second.set_epoch(2)
    assert not torch.equal(second[0], forward[0])
    with pytest.raises(TypeError, match="set_random_state"):
        EpochSeededDataset(list(range(3)))
