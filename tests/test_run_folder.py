"""Nothing lost, nothing silent: reruns into an occupied folder, full disks, datasets smaller than a batch.

Pretraining runs in-process (``monai.bundle.run``) on three small synthetic volumes with a tiny encoder: about a
second of training each.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import namedtuple

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from pgl_bundle import AtomicCheckpointSaver, check_epoch_length, check_free_space, latest_checkpoint, resolve_resume
from pgl_bundle.data import make_synthetic_dataset
from pgl_bundle.errors import BadInputError, DiskSpaceError, OutputExistsError, OutputFolderError, user_error_in_chain
from pgl_bundle.handlers import checkpoint_bytes
from pgl_bundle.run_folder import RunFolder, check_writable
from tiny import TINY_PRETRAIN, TINY_SEGMENTATION_NETWORK
from torch.utils.data import DataLoader

TINY = {
    **TINY_PRETRAIN,
    "num_workers": 0,
    "batch_size": 2,
    "max_epochs": 2,
}
# fine-tuning's network at its smallest: nothing of it is trained in these tests
TINY_SEGMENTATION = {
    **TINY_SEGMENTATION_NETWORK,
    "label_names": ["background", "tumour"],
    "num_workers": 0,
}
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def three_volumes(tmp_path_factory) -> str:
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("three")), 3, shape=(64, 64, 24))


def pretrain(repo_root, bundle_root, data, **overrides) -> None:
    bundle_run(
        "training",
        config_file=str(repo_root / "configs" / "pretrain.json"),
        logging_file=False,
        bundle_root=str(bundle_root),
        dataset_dir=data,
        **{**TINY, **overrides},
    )


def files(folder) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its inode and modification time."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_ino, stat.st_mtime_ns)
    return found


def run_id(checkpoints) -> str:
    return json.loads((checkpoints / "run.json").read_text())["run_id"]


def test_a_second_run_stops_then_resumes_or_replaces(repo_root, tmp_path, three_volumes, caplog):
    models, checkpoints = tmp_path / "models", tmp_path / "models" / "checkpoints"
    with caplog.at_level(logging.INFO):
        pretrain(repo_root, tmp_path, three_volumes)
    # 3 volumes at batch 2: both batches of every epoch are trained on (no volume dropped), and the log says so
    assert "3 volumes to use: shape from (64, 64, 24) to (64, 64, 24) voxels" in caplog.text
    assert "3 view pairs per epoch (volumes x volume_repeats), batch size 2: 2 iterations per epoch." in caplog.text
    final = torch.load(checkpoints / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 4
    # the final state is on disk once: the final checkpoint is the last epoch's file, and one epoch file is kept
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_epoch=2.pt", "checkpoint_final.pt", "run.json"]
    assert os.path.samefile(checkpoints / "checkpoint_final.pt", checkpoints / "checkpoint_epoch=2.pt")
    first_id, before = run_id(checkpoints), files(models)
    assert final["run"] == {"run_id": first_id}
    assert os.listdir(tmp_path / "eval" / "pretrain") == [first_id]  # TensorBoard: one folder per run

    with pytest.raises(Exception) as error:  # the same command again: stopped, nothing touched
        pretrain(repo_root, tmp_path, three_volumes)
    cause = user_error_in_chain(error.value)
    assert isinstance(cause, OutputExistsError), repr(error.value)
    message = str(cause)
    assert f"{models} holds the outputs of another run (run {first_id})" in message
    for expected in (
        "checkpoints/checkpoint_final.pt",
        "pretrained_encoder.pt",
        "--resume_from latest",
        f"--overwrite True (the old outputs are moved to {models}/replaced_{first_id}/)",
    ):
        assert expected in message, message
    assert files(models) == before

    caplog.clear()
    with caplog.at_level(logging.INFO):
        pretrain(repo_root, tmp_path, three_volumes, max_epochs=3, resume_from="latest")  # continues the same run
    assert run_id(checkpoints) == first_id
    # the start is logged once the checkpoint is restored, not before (ignite's "resuming from iteration 0")
    assert "resuming from iteration 0" not in caplog.text
    assert re.search(rf"run {first_id}: resumed from {checkpoints}/\S+, at iteration 4, epoch 2 of 3\.", caplog.text)
    assert len(os.listdir(tmp_path / "eval" / "pretrain" / first_id)) == 2  # its curves continue in its folder
    resumed = torch.load(checkpoints / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    assert resumed["trainer"]["iteration"] == 6 and resumed["run"] == {"run_id": first_id}

    pretrain(repo_root, tmp_path, three_volumes, overwrite=True)  # starts afresh; the old run is kept aside
    aside = models / f"replaced_{first_id}"
    assert {"pretrained_encoder.pt", "checkpoints/checkpoint_final.pt", "checkpoints/run.json"} <= set(files(aside))
    second_id = run_id(checkpoints)
    assert second_id != first_id
    assert sorted(os.listdir(tmp_path / "eval" / "pretrain")) == sorted([first_id, second_id])  # curves kept apart
    # `latest` never picks another run's checkpoint, even one with more iterations
    shutil.copy(aside / "checkpoints" / "checkpoint_final.pt", checkpoints / "checkpoint_epoch=9.pt")
    with caplog.at_level(logging.WARNING):
        latest = resolve_resume("latest", str(checkpoints))
    assert latest == str(checkpoints / "checkpoint_final.pt")
    assert f"checkpoint_epoch=9.pt: skipped, written by run {first_id}, not by this folder's run {second_id}" in (
        caplog.text
    )
    assert latest_checkpoint(str(checkpoints)) == str(checkpoints / "checkpoint_epoch=9.pt")  # without the run check


def test_fine_tuning_does_not_replace_a_model_unless_continued_or_asked(repo_root, tmp_path, shared_data):
    """train.json: models/model.pt of an earlier run stops a new run before training; MONAI Label's way of training
    again (a CheckpointLoader of that model prepended to the train handlers) continues it."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"an earlier model")
    sts = shared_data / "sts"
    cases = [
        {"image": str(sts / c / "CT_image.nii.gz"), "label": str(sts / c / "CT_mask.nii.gz")}
        for c in ("STS_001", "STS_002")
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": cases}))

    def run_folder(**overrides):
        parser = ConfigParser()
        parser.read_config(str(repo_root / "configs" / "train.json"))
        parser.update(
            {
                "bundle_root": str(tmp_path),
                "dataset_dir": str(tmp_path / "dataset.json"),
                "num_val_cases": 1,
                "label_names": ["background", "tumour"],
                "num_workers": 0,
                "cache_rate": 0,
                "encoder_layers": [1, 1, 1, 1],
                "encoder_block": "basic",
                "encoder_width": [8, 8, 8, 8],
                "decoder_channels": [8, 8, 8, 8, 8],
                **overrides,
            }
        )
        return parser.get_parsed_content("run_folder")

    with pytest.raises(Exception) as error:
        run_folder()
    cause = user_error_in_chain(error.value)
    assert isinstance(cause, OutputExistsError) and "model.pt. This run would overwrite them" in str(cause)
    assert "--overwrite True" in str(cause) and "--resume_from" not in str(cause)
    loader = {
        "_target_": "CheckpointLoader",
        "load_path": str(tmp_path / "models" / "model.pt"),
        "load_dict": {"model": "$@network"},
    }
    handlers = ConfigParser.load_config_file(str(repo_root / "configs" / "train.json"))["train"]["handlers"]
    assert run_folder(**{"train#handlers": [loader, *handlers]}).resume_path == loader["load_path"]
    # the earlier run's TensorBoard curves go aside with its model: the new run's do not mix with them
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "events.out.tfevents.1.host").write_bytes(b"earlier curves")
    moved = sorted(run_folder(overwrite=True).to_move)
    assert moved == [str(tmp_path / "eval" / "events.out.tfevents.1.host"), str(tmp_path / "models" / "model.pt")]
    assert (tmp_path / "models" / "model.pt").read_bytes() == b"an earlier model"  # moved only when training starts


def tiny_trainer(folder, run: RunFolder | None = None, **saver_args) -> tuple[Engine, AtomicCheckpointSaver]:
    """A trainer of a small linear network and its saver (with ``run``: checkpoints of that run, as pretraining's)."""
    net = torch.nn.Linear(4, 256)
    optimizer = torch.optim.Adam(net.parameters())

    def step(engine, batch):
        optimizer.zero_grad()
        net(torch.randn(2, 4)).square().mean().backward()
        optimizer.step()

    trainer = Engine(step)
    save_dict = {"network": net, "optimizer": optimizer, "trainer": trainer, **({"run": run} if run else {})}
    saver = AtomicCheckpointSaver(str(folder), save_dict, **saver_args)
    saver.attach(trainer)
    return trainer, saver


class FillingFile(io.RawIOBase):
    """``f`` on a disk that is full after ``room`` more bytes."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)


@pytest.mark.parametrize("raised_by", ["the file", "torch.save"])
def test_a_failed_save_keeps_the_last_good_checkpoint_and_no_temporary_file(tmp_path, monkeypatch, raised_by):
    """A full disk, as the file's write reports it or as torch.save does: ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos``, with the OSError only as its context."""
    trainer, _ = tiny_trainer(
        tmp_path, save_interval=1, epoch_level=False, n_saved=1, save_final=True, final_filename="checkpoint_final.pt"
    )
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # the first save works; later ones fill the disk halfway through
        if trainer.state.iteration == 1:
            return real_save(obj, f, *args, **kwargs)
        if raised_by == "torch.save":
            return real_save(obj, FillingFile(f, 1000), *args, **kwargs)
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskSpaceError) as error:
        trainer.run(range(3), max_epochs=1)
    kept = tmp_path / "checkpoint_iteration=1.pt"
    assert os.listdir(tmp_path) == [kept.name]  # no temporary file, no final checkpoint of the failed state
    assert real_save is not torch.save and torch.load(kept, weights_only=True)["trainer"]["iteration"] == 1
    message = str(error.value)
    assert f"{tmp_path / 'checkpoint_iteration=2.pt'}: saving the checkpoint failed (No space left on device)" in (
        message
    )
    assert f"Last good checkpoint here: {kept}" in message and "--resume_from latest" in message


def test_free_space_is_checked_before_training(tmp_path, monkeypatch):
    trainer, saver = tiny_trainer(
        tmp_path, save_interval=1, epoch_level=True, n_saved=2, save_final=True, final_filename="checkpoint_final.pt"
    )
    estimate = checkpoint_bytes(saver.save_dict)
    trainer.run(range(2), max_epochs=1)  # after a step the optimizer holds its state: the estimate is an upper bound
    size = os.path.getsize(tmp_path / "checkpoint_final.pt")
    assert size <= estimate <= size + (1 << 20) + 0.01 * size
    estimate = checkpoint_bytes(saver.save_dict)  # now with the optimizer's state (and its step counters)
    assert check_free_space([saver, object()]) == 3 * estimate  # 2 files kept + 1 being written; others ignored

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 3 * estimate + 1, 3 * estimate - 1))
    with pytest.raises(
        DiskSpaceError,
        match=rf"not enough free disk space for the checkpoints in \['{tmp_path}'\]: "
        r"they need up to \d+ MB at once",
    ) as error:
        check_free_space([saver])
    assert "checkpoint_every_n_iterations" not in str(error.value)  # no iteration checkpoints to turn off
    _, every_iteration = tiny_trainer(tmp_path / "iterations", save_interval=1, epoch_level=False, n_saved=3)
    with pytest.raises(DiskSpaceError, match=r"save fewer checkpoints \(--checkpoint_every_n_iterations 0\)\.$"):
        check_free_space([every_iteration])


def test_no_batch_and_dropped_volumes_are_reported(caplog):
    with pytest.raises(
        BadInputError,
        match=r"no training batch can be formed: 1 volume\(s\) per process, batch size "
        r"2, drop_last True. Add volumes, or lower batch_size to at most 1",
    ):
        check_epoch_length(DataLoader([0], batch_size=2, drop_last=True))
    with caplog.at_level(logging.INFO):
        assert check_epoch_length(DataLoader([0, 1, 2], batch_size=2, drop_last=True)) == 1
        assert check_epoch_length(DataLoader([0, 1, 2], batch_size=2)) == 2
    assert "drop_last leaves 1 of 3 volumes out of every epoch." in caplog.text
    assert "3 view pairs per epoch (volumes x volume_repeats), batch size 2: 2 iterations per epoch." in caplog.text


def test_every_iteration_checkpoint_can_be_kept(repo_root, tmp_path, three_volumes):
    """iteration_checkpoints_kept 0 keeps them all (the probe curve needs every one; an override of the handler's
    n_saved to None is dropped by monai.bundle run, so the key exists); the default keeps the newest 2."""
    pretrain(repo_root, tmp_path / "all", three_volumes, checkpoint_every_n_iterations=1, iteration_checkpoints_kept=0)
    pretrain(repo_root, tmp_path / "two", three_volumes, checkpoint_every_n_iterations=1)
    kept = {
        name: sorted(f for f in os.listdir(tmp_path / name / "models" / "checkpoints") if "iteration" in f)
        for name in ("all", "two")
    }
    assert kept["all"] == [f"checkpoint_iteration={i}.pt" for i in (1, 2, 3, 4)]
    assert kept["two"] == ["checkpoint_iteration=3.pt", "checkpoint_iteration=4.pt"]


def test_a_resumed_run_takes_over_its_own_checkpoints(tmp_path, caplog):
    """Checkpoints written before a restart (a kill, a full disk) are rotated by the resumed run, and their space
    counts as the resumed run's: only one more file is needed. Another run's file is neither removed nor counted."""
    record = str(tmp_path / "run.json")
    first = RunFolder(record, [])
    first.start()
    trainer, saver = tiny_trainer(tmp_path, run=first, save_interval=1, epoch_level=False, n_saved=2)
    trainer.run(range(5), max_epochs=1)  # iterations 1..5: 4 and 5 kept
    other = torch.load(tmp_path / "checkpoint_iteration=4.pt", weights_only=True)
    torch.save({**other, "run": {"run_id": "another"}}, tmp_path / "checkpoint_iteration=3.pt")

    resumed = RunFolder(record, [], resume_path=str(tmp_path / "checkpoint_iteration=5.pt"))
    assert resumed.run_id == first.run_id
    trainer, saver = tiny_trainer(tmp_path, run=resumed, save_interval=1, epoch_level=False, n_saved=2)
    assert check_free_space([saver]) == checkpoint_bytes(saver.save_dict)  # 4 and 5 rotate: room for one more
    Checkpoint.load_objects(saver.save_dict, torch.load(tmp_path / "checkpoint_iteration=5.pt", weights_only=True))
    with caplog.at_level(logging.INFO):
        trainer.run(range(5), max_epochs=2)  # iterations 6..10
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint_iteration=10.pt",
        "checkpoint_iteration=3.pt",  # another run's: left alone
        "checkpoint_iteration=9.pt",
        "run.json",
    ]
    _, fresh = tiny_trainer(tmp_path, run=RunFolder(str(tmp_path / "new.json"), []), save_interval=1, n_saved=2)
    assert check_free_space([fresh]) == 3 * checkpoint_bytes(fresh.save_dict)  # a new run reuses nothing


def test_check_writable_names_each_folder_its_problem_and_option(tmp_path, monkeypatch):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    (tmp_path / "file").write_text("a file where a folder is expected")
    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):  # a read-only mount at read_only/
        if str(dir).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    check_writable({str(tmp_path / "new" / "deeper"): "--output_dir", "": "--unused"})
    assert sorted(os.listdir(tmp_path)) == ["file", "read_only"]  # nothing created
    with pytest.raises(OutputFolderError) as error:
        check_writable({str(read_only / "models"): "--ckpt_dir", str(tmp_path / "file" / "eval"): "--output_dir"})
    assert str(error.value) == (
        "2 output folders of this run cannot be written:\n"
        f"  {read_only}/models: no file can be created in {read_only} (Read-only file system). Write elsewhere with "
        "--ckpt_dir.\n"
        f"  {tmp_path}/file/eval: {tmp_path}/file is a file, not a folder. Write elsewhere with --output_dir."
    )


@pytest.mark.parametrize(
    "configs",
    [
        ["pretrain.json"],
        ["train.json"],
        ["train.json", "evaluate.json"],
        ["train.json", "evaluate.json", "probe.json"],
        ["inference.json"],
    ],
)
def test_an_unwritable_output_folder_stops_each_stage_before_any_data_is_read(repo_root, tmp_path, configs):
    """eval/ is a file: every stage stops naming it and the option, before making (or reading) any data."""
    (tmp_path / "eval").write_text("a file where the output folder should be")
    with pytest.raises(Exception) as error:
        bundle_run(
            "training" if configs == ["pretrain.json"] else "run",
            config_file=[str(repo_root / "configs" / name) for name in configs],
            logging_file=False,
            bundle_root=str(tmp_path),
            **(TINY if configs == ["pretrain.json"] else TINY_SEGMENTATION),
        )
    cause = user_error_in_chain(error.value)
    assert isinstance(cause, OutputFolderError), repr(error.value)
    assert f"{tmp_path}/eval is a file, not a folder. Write elsewhere with --output_dir or --bundle_root." in str(cause)
    assert os.listdir(tmp_path) == ["eval"]  # no synthetic data made, nothing else written


def models_disk_full(monkeypatch, models) -> None:
    """The disk of ``models`` (made here) has 1 MB free; the others as they are."""
    models.mkdir()
    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda path: Usage(10**12, 10**12 - 10**6, 10**6) if path.startswith(str(models)) else real(path),
    )


def fine_tuning_error(repo_root, bundle_root, **overrides) -> BaseException | None:
    """The user error that stops train.json's run (small network) in ``bundle_root``."""
    with pytest.raises(Exception) as error:
        bundle_run(
            "run",
            config_file=str(repo_root / "configs" / "train.json"),
            logging_file=False,
            bundle_root=str(bundle_root),
            **TINY_SEGMENTATION,
            **overrides,
        )
    return user_error_in_chain(error.value) or error.value


def test_fine_tuning_checks_free_space_before_reading_data(repo_root, tmp_path, monkeypatch):
    models_disk_full(monkeypatch, tmp_path / "models")
    cause = fine_tuning_error(repo_root, tmp_path)
    assert isinstance(cause, DiskSpaceError), repr(cause)
    assert f"not enough free disk space for the checkpoints in ['{tmp_path}/models']" in str(cause)
    assert os.listdir(tmp_path) == ["models"] and not os.listdir(tmp_path / "models")  # no data made, no log


def test_a_run_refused_after_its_handlers_are_built_leaves_no_event_file(
    repo_root, tmp_path, three_volumes, monkeypatch
):
    """The free-space check runs once the trainer and its TensorBoard writer exist; the writer creates its file
    only when the first value is logged."""
    models_disk_full(monkeypatch, tmp_path / "models")
    with pytest.raises(Exception) as error:
        pretrain(repo_root, tmp_path, three_volumes)
    cause = user_error_in_chain(error.value)
    assert isinstance(cause, DiskSpaceError) and "checkpoint_every_n_iterations" not in str(cause), repr(cause)
    assert not (tmp_path / "eval").exists()
    assert not os.listdir(tmp_path / "models")


def test_fine_tuning_refuses_an_occupied_folder_before_reading_data(repo_root, tmp_path):
    """The earlier model is found before the datalist is read or cached (the dataset here does not exist)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"an earlier model")
    cause = fine_tuning_error(repo_root, tmp_path, dataset_dir=str(tmp_path / "nope"))
    assert isinstance(cause, OutputExistsError), repr(cause)
    assert os.listdir(tmp_path / "models") == ["model.pt"]


# monai.bundle's command line with every torch.save failing on a full disk (the first save of a run)
FULL_DISK_RUN = """
import errno, runpy, sys, torch

def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

torch.save = full
sys.argv[0] = "monai.bundle"
runpy.run_module("monai.bundle", run_name="__main__")
"""


@pytest.mark.parametrize("debug", ["0", "1"])
def test_a_disk_that_fills_during_fine_tuning_ends_with_the_error_line(repo_root, tmp_path, three_volumes, debug):
    """The model's save at the first validation fails: MONAI's handlers log no traceback of it, no progress bar is
    drawn after the ERROR line, which is the last line; PGL_DEBUG=1 prints Python's traceback before it."""
    import subprocess

    overrides = {
        **TINY_SEGMENTATION,
        "label_names": ["background", "liver", "spleen", "right kidney", "left kidney", "aorta"],
        "patch_size": [32, 32, 16],
        "batch_size": 1,
        "num_samples": 1,
        "num_iterations": 1,
        "val_interval": 1,
        "num_val_cases": 1,
        "cache_rate": 0,
    }
    args = [arg for key, value in overrides.items() for arg in (f"--{key}", json.dumps(value))]
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_RUN, "run", "--config_file", "configs/train.json"]
        + ["--logging_file", "configs/logging.conf", "--bundle_root", str(tmp_path), "--dataset_dir", three_volumes]
        + args,
        cwd=repo_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PGL_DEBUG": debug},
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode != 0
    assert lines[-1].startswith(f"ERROR: DiskSpaceError: disk full: {tmp_path}/models/model.pt: saving"), lines[-5:]
    assert lines[-1].endswith("then run again with --overwrite True (this run's outputs are moved aside).")
    assert "validation" in result.stdout  # the progress bar was drawn, before the error
    assert ("Traceback" in result.stdout) == (debug == "1"), result.stdout[-3000:]
