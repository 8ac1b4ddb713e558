"""What every experiment command shares: running a stage of the bundle in its own folder, and reading its results.

A stage is one ``python -m monai.bundle run`` of the bundle's own configs with overrides, in a subprocess whose
output goes to ``<bundle_root>/log.txt``; experiments skip a stage whose result file exists, so they resume where
they stopped.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from pgl_bundle.data import load_datalist
from pgl_bundle.errors import BadInputError
from pgl_bundle.handlers import checkpoint_run
from pgl_bundle.transfer import write_plan
from tqdm import tqdm

__all__ = [
    "CONFIGS",
    "best_validation_dice",
    "check_same_settings",
    "checkpoints_by_iteration",
    "dice_per_case",
    "dice_per_class",
    "extract_encoder",
    "pretrain",
    "run_all",
    "run_bundle",
    "write_datalist",
]

logger = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {
    "pgl": ["configs/pretrain.json"],
    "byol": ["configs/pretrain.json", "configs/pretrain_byol.json"],
    "train": ["configs/train.json"],
    "evaluate": ["configs/train.json", "configs/evaluate.json"],
    "probe": ["configs/train.json", "configs/evaluate.json", "configs/probe.json"],
}


def run_bundle(configs: list[str], bundle_root: str, overrides: dict, run_id: str = "run", threads: int = 0) -> None:
    """``python -m monai.bundle run`` in a subprocess; its log is appended to ``bundle_root/log.txt``.

    ``threads``: the subprocess's ``OMP_NUM_THREADS`` (torch's intra-op threads, and its data workers'); 0: inherited.

    Raises:
        RuntimeError: the stage failed; the message holds the command and the end of its log.
    """
    files = "[" + ",".join(repr(os.path.join(ROOT, c)) for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, "--bundle_root", bundle_root]
    cmd += ["--logging_file", os.path.join(ROOT, "configs", "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", _argument(value)]
    os.makedirs(bundle_root, exist_ok=True)
    with open(os.path.join(bundle_root, "log.txt"), "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        with open(os.path.join(bundle_root, "log.txt")) as log:
            tail = log.read()[-3000:]  # the failed run's output is the end of the log
        raise RuntimeError(f"stage in {bundle_root} failed ({' '.join(cmd)}):\n{tail}")


def _argument(value) -> str:
    """An override as ``run_bundle`` writes it on the command line."""
    return value if isinstance(value, str) else repr(value)


def check_same_settings(
    bundle_root: str, overrides: dict, ignore: Sequence[str] = ("overwrite", "num_workers")
) -> None:
    """Before a finished training stage is reused: refuse it when the command it ran with (its run record,
    ``models/train_run.json``) gave any key of ``overrides`` but ``ignore`` (keys that do not change the result)
    another value, e.g. a run of an earlier preset.

    A stage without a run record cannot be checked: a warning says so and it is reused.

    Raises:
        BadInputError: names the folder, each differing key with both values, and the way on.
    """
    record = os.path.join(bundle_root, "models", "train_run.json")
    if not os.path.isfile(record):
        logger.warning(f"{bundle_root}: no run record ({record}); reused without checking its settings.")
        return
    with open(record) as f:
        command = json.load(f)["command"]
    recorded = {key[2:]: value for key, value in zip(command, command[1:]) if key.startswith("--")}
    differ = [
        f"{key}: {recorded.get(key, 'not given')} (now {_argument(value)})"
        for key, value in overrides.items()
        if key not in ignore and recorded.get(key) != _argument(value)
    ]
    if differ:
        raise BadInputError(
            f"{bundle_root}: finished with other settings ({'; '.join(differ)}). Move the folder aside or choose "
            "another output folder; it is not reused."
        )


def run_all(function: Callable, jobs: Sequence[tuple], parallel: int, desc: str) -> list:
    """``function(*job)`` for every job, ``parallel`` at a time (stages are subprocesses), with a progress bar."""
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(tqdm(pool.map(lambda job: function(*job), jobs), total=len(jobs), desc=desc, unit="run"))


def write_datalist(path: str, items: list[dict]) -> str:
    """Write an MSD-style datalist ``{"training": items}`` atomically; return ``path``."""
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w") as f:
        json.dump({"training": items}, f, indent=1)
    os.replace(partial, path)
    return path


def dice_per_case(eval_dir: str) -> list[tuple[str, float]]:
    """Per case, the mean foreground Dice of an evaluation (MONAI ``MetricsSaver``'s ``val_mean_dice_raw.csv``)."""
    with open(os.path.join(eval_dir, "val_mean_dice_raw.csv")) as f:
        rows = list(csv.reader(f))
    return [(row[0], float(row[-1])) for row in rows[1:]]


def dice_per_class(eval_dir: str) -> dict[str, dict[str, float]]:
    """Per case, the Dice of each class (``val_mean_dice_raw.csv``'s columns but the file name and the mean; named by
    the evaluation's ``label_names`` where it logged them as ``class0``, ...)."""
    with open(os.path.join(eval_dir, "val_mean_dice_raw.csv")) as f:
        rows = list(csv.DictReader(f))
    return {row["filename"]: {k: float(v) for k, v in row.items() if k not in ("filename", "mean")} for row in rows}


def best_validation_dice(bundle_root: str) -> float:
    """The best validation Dice of the last training run logged in ``bundle_root/log.txt`` (MONAI's evaluator line)."""
    with open(os.path.join(bundle_root, "log.txt")) as f:
        found = re.findall(r"Key metric: val_mean_dice best value: ([0-9.eE+-]+)", f.read())
    if not found:
        raise RuntimeError(f"{bundle_root}/log.txt: the training logged no validation; cannot rank its settings.")
    return float(found[-1])


def checkpoints_by_iteration(run_dir: str) -> dict[int, str]:
    """The full training checkpoints in ``run_dir/models/checkpoints``, by the trainer iteration they hold."""
    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "models", "checkpoints", "*.pt"))):
        stored = checkpoint_run(path)  # (iteration, run id), None for unreadable files
        if stored is not None:
            found.setdefault(stored[0], path)
    return found


def pretrain(
    method: str, root: str, unlabelled_json: str, iterations: Sequence[int], overrides: dict, threads: int = 0
) -> dict[int, str]:
    """Pretrain ``method`` (``"pgl"`` or ``"byol"``) for ``max(iterations)`` iterations (rounded up to whole epochs),
    keeping a full checkpoint at every multiple of the iterations' greatest common divisor.

    Skipped when the run already holds a checkpoint at each of ``iterations``; otherwise an interrupted run resumes.

    Returns:
        ``{iteration: checkpoint path}`` of the run's checkpoints.

    Raises:
        ValueError: fewer volumes than one batch.
        FileNotFoundError: the finished run lacks a checkpoint at one of ``iterations``.
    """
    found = checkpoints_by_iteration(root)
    if all(i in found for i in iterations):
        return found
    volumes = min(len(load_datalist(unlabelled_json)), overrides.get("num_volumes") or math.inf)
    # at least this many batches per epoch (fewer epochs would stop short of the last checkpoint)
    epoch_length = volumes * overrides.get("volume_repeats", 1) // overrides["batch_size"]
    if epoch_length < 1:
        raise ValueError(f"{unlabelled_json}: {volumes} volumes, fewer than one batch of {overrides['batch_size']}.")
    overrides = {
        **overrides,
        "dataset_dir": unlabelled_json,
        "max_epochs": math.ceil(max(iterations) / epoch_length),
        "checkpoint_every_n_iterations": math.gcd(*iterations),
        "iteration_checkpoints_kept": 0,  # all (an override to None would be dropped by monai.bundle run)
        "resume_from": "latest",
    }
    run_bundle(CONFIGS[method], root, overrides, run_id="training", threads=threads)
    found = checkpoints_by_iteration(root)
    missing = [i for i in iterations if i not in found]
    if missing:
        raise FileNotFoundError(
            f"{root}/models/checkpoints: no checkpoint at iteration(s) {missing} ({sorted(found)})."
        )
    return found


def extract_encoder(checkpoint: str, path: str, plan: dict) -> str:
    """Write the online encoder of a full pretraining checkpoint as an encoder file (the format of
    ``models/pretrained_encoder.pt``) with its adaptation plan beside it; skipped when ``path`` exists."""
    if not os.path.isfile(path):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["network"]
        prefix = "online.encoder."
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.partial"
        torch.save({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, partial)
        write_plan(path, plan)
        os.replace(partial, path)
    return path
