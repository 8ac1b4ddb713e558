"""Where an encoder came from: the record pretraining writes into its adaptation plan, and ``show_encoder``.

An encoder's plan (``models/pretrained_encoder.json``, :mod:`pgl_bundle.transfer`) holds, besides the settings that
fine-tuning needs, a ``pretraining`` entry:

- ``data``: the manifest of the volumes it was trained on, ``num_volumes`` and ``sha256``, a hash of the sorted list of
  their source paths and sizes in bytes (:func:`data_manifest`): two runs on the same files give the same hash,
  a volume added, removed, moved or changed in size changes it;
- ``iteration`` (the trainer's, when the file was written), ``seed``, ``config_files`` and ``overrides`` (the ``python
  -m monai.bundle run`` command line's ``--key value`` pairs; null when the run was not started from it), ``packages``
  (installed versions) and ``git_commit`` (the project's commit, with ``git_modified`` when its tracked files differ
  from it; both null outside a git checkout).

``publish`` copies the plan into the released bundle's metadata (:func:`pgl_bundle.release.write_large_files`).
Hand-written: MONAI's bundle metadata records the package versions of a bundle, not those of one weights file, nor
its data.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from ignite.engine import Engine, Events
from pgl_bundle.data.prepared import MANIFEST
from pgl_bundle.errors import InputNotFoundError
from pgl_bundle.transfer import plan_file, read_plan, write_plan

__all__ = [
    "EncoderPlanSaver",
    "data_manifest",
    "encoder_plan",
    "pretraining_record",
    "show_encoder",
    "training_sources",
]

logger = logging.getLogger(__name__)

PACKAGES = ("pgl-bundle", "monai", "torch", "pytorch-ignite", "numpy")
_COMMAND_KEYS = ("config_file", "logging_file", "meta_file", "args_file")  # monai.bundle run's own arguments


def data_manifest(sources: Sequence[tuple[str, int]]) -> dict:
    """``{"num_volumes": N, "sha256": hex}`` of ``(path, size in bytes)`` pairs, hashed in sorted order as JSON."""
    listing = json.dumps(sorted([os.path.abspath(path), int(size)] for path, size in sources))
    return {"num_volumes": len(sources), "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def training_sources(datalist: Sequence[Mapping]) -> list[tuple[str, int]]:
    """The source path and size of each volume of pretraining's datalist (prepared arrays, ``{"image": path}``).

    A prepared array's source is read from its folder's manifest (:mod:`pgl_bundle.data.prepared`), so the record
    names the user's files, not the cache; an item without a manifest entry counts as itself.
    """
    sources, manifests = [], {}
    for item in datalist:
        image = os.path.abspath(str(item["image"]))
        folder = os.path.dirname(image)
        if folder not in manifests:
            try:
                with open(os.path.join(folder, MANIFEST)) as f:
                    volumes = json.load(f)["volumes"]
                manifests[folder] = {v["array"]: (v["source"], v["stamp"][0]) for v in volumes if "array" in v}
            except (OSError, ValueError, KeyError):
                manifests[folder] = {}
        sources.append(manifests[folder].get(os.path.basename(image)) or (image, os.path.getsize(image)))
    return sources


def _command_line(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The config files and the other ``--key value`` (or ``--key=value``) arguments of a ``monai.bundle`` command."""
    pairs, key = {}, None
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            if value:
                pairs[key], key = value, None
            else:
                pairs[key] = ""
        elif key is not None:
            pairs[key], key = arg, None
    files = pairs.pop("config_file", "")
    try:  # a list is given as JSON or as a Python literal, as monai.bundle (fire) accepts both
        files = list(ast.literal_eval(files)) if files.startswith("[") else [files]
    except (ValueError, SyntaxError):
        files = [files]
    return [f for f in files if f], {k: v for k, v in pairs.items() if k not in _COMMAND_KEYS}


def _git_commit() -> tuple[str | None, bool | None]:
    """The commit of the checkout holding this package and whether its tracked files differ; (None, None) if none."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit.returncode != 0:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip())


def pretraining_record(datalist: Sequence[Mapping], seed: int, argv: Sequence[str] | None = None) -> dict:
    """The ``pretraining`` entry of an encoder's plan, all but its ``iteration`` (see the module docstring).

    Args:
        datalist: pretraining's datalist (``train#datalist`` of ``configs/pretrain.json``).
        seed: the run's seed.
        argv: the ``monai.bundle`` command line; default ``sys.argv`` when this process is ``python -m monai.bundle``
            (or its ``torchrun``); else ``config_files`` and ``overrides`` are null (not known: e.g. a
            ``ConfigWorkflow`` built in Python).
    """
    if argv is None and sys.argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
        argv = sys.argv[1:]
    files, overrides = _command_line(argv) if argv is not None else (None, None)
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    commit, modified = _git_commit()
    return {
        "data": data_manifest(training_sources(datalist)),
        "seed": seed,
        "config_files": files,
        "overrides": overrides,
        "packages": packages,
        "git_commit": commit,
        "git_modified": modified,
    }


def encoder_plan(plan: Mapping, record: Mapping, iteration: int, **extra) -> dict:
    """``plan`` with its ``pretraining`` entry: ``record`` at ``iteration``, plus ``extra`` (e.g. the probe's Dice)."""
    return {**plan, "pretraining": {**record, "iteration": iteration, **extra}}


class EncoderPlanSaver:
    """Ignite handler: when training completes, write the encoder's plan with its :func:`pretraining_record` at the
    final iteration beside ``weights`` (attach it after the saver of ``weights``).

    Args:
        weights: the encoder file, e.g. ``models/pretrained_encoder.pt``; the plan goes to ``.json`` beside it.
        plan: the adaptation plan (:data:`pgl_bundle.transfer.PLAN_DEFAULTS` keys and ``patch_size``).
        record: :func:`pretraining_record` of the run.
    """

    def __init__(self, weights: str, plan: Mapping, record: Mapping) -> None:
        self.weights, self.plan, self.record = weights, plan, record

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        path = write_plan(self.weights, encoder_plan(self.plan, self.record, engine.state.iteration))
        logger.info(f"{path}: the encoder's plan and provenance, iteration {engine.state.iteration}.")


def show_encoder(path: str) -> None:
    """Print the plan and provenance of an encoder file (``.pt``, or its ``.json`` plan) as JSON.

    Raises:
        InputNotFoundError: the file has no plan beside it.
    """
    plan = read_plan(path)
    if plan is None:
        raise InputNotFoundError(f"{plan_file(path)}: no adaptation plan beside {path}.")
    print(json.dumps(plan, indent=1))
