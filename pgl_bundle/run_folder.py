"""One run's outputs per folder: a second run never overwrites another run's results unless asked to.

A run records itself in a small JSON file (``models/checkpoints/run.json`` for pretraining): a run id, when it
started, the command line (config files and overrides) and the checkpoints it resumed from. The id is also saved
in every training checkpoint (:class:`RunFolder` is an entry of the checkpoints' ``save_dict``), so that
``--resume_from latest`` only ever picks a checkpoint of the same run
(:func:`~pgl_bundle.handlers.latest_checkpoint`).

A new run into a folder that holds another run's outputs stops before reading any data, listing the files and the
two ways on: continue that run (``--resume_from latest``) or start afresh (``--overwrite True``, which moves the old
outputs into ``replaced_<run id>/`` beside them when the new run starts; nothing is deleted).

Before any of that, :func:`check_writable` stops a run whose output folders cannot be written, and
:class:`LazySummaryWriter` creates a TensorBoard event file only when the first value is logged, so that a run refused
before training leaves the folders as they were.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence

import ignite.distributed as idist
from ignite.engine import Engine, Events
from pgl_bundle.errors import OutputExistsError, OutputFolderError
from torch.utils.tensorboard import SummaryWriter

__all__ = ["LazySummaryWriter", "RunFolder", "check_writable", "read_run_id"]

logger = logging.getLogger(__name__)

_SHOWN = 6  # file names quoted in a message


def _unwritable(folder: str) -> str:
    """Why no file can be written in ``folder`` once created ("" when one can): a file on its path, or the error of
    creating a file in it, or in its nearest existing parent (which is where the folder would be created)."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):  # the one test that sees read-only mounts, ACLs and permissions
            pass
    except OSError as e:
        return f"no file can be created in {existing} ({e.strerror or e})"
    return ""


def check_writable(folders: Mapping[str, str]) -> None:
    """Stop before any work when a folder this run writes cannot be created or written; nothing is created.

    Args:
        folders: ``{folder: the option that moves it}``, e.g. ``{"models/checkpoints": "--ckpt_dir"}``; empty
            folder names (outputs this run does not write) are skipped.

    Raises:
        OutputFolderError: one line per folder that cannot be written, naming it, the reason and the option.
    """
    problems = [
        f"{folder}: {reason}. Write elsewhere with {option}."
        for folder, option in folders.items()
        if folder and (reason := _unwritable(folder))
    ]
    if len(problems) == 1:
        raise OutputFolderError(f"output folder {problems[0]}")
    if problems:
        listing = "\n  ".join(problems)
        raise OutputFolderError(f"{len(problems)} output folders of this run cannot be written:\n  {listing}")


class LazySummaryWriter(SummaryWriter):
    """torch's ``SummaryWriter`` whose folder and event file are created when the first value is logged, not when it
    is built: a run refused before training (an input check, the free-space check) leaves no empty event file.
    Same arguments as ``SummaryWriter``."""

    def __init__(self, *args, **kwargs) -> None:
        self._building = True
        super().__init__(*args, **kwargs)
        self._building = False

    def _get_file_writer(self):
        # SummaryWriter.__init__ creates the file through this method, every add_* method through it on first use
        return None if self._building else super()._get_file_writer()


def read_run_id(record: str) -> str | None:
    """The run id in the run record ``record``, or None when there is no (readable) record."""
    try:
        with open(record) as f:
            return str(json.load(f)["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _outputs(pattern: str) -> list[str]:
    """The files ``pattern`` matches, ``**`` at any depth, leaving out those already moved into a ``replaced_*``
    folder below the pattern's fixed part (the same files would be moved again, into themselves)."""
    fixed = os.path.dirname(re.split(r"[*?[]", pattern, maxsplit=1)[0])
    return [
        p
        for p in glob.glob(pattern, recursive=True)
        if not any(part.startswith("replaced_") for part in os.path.relpath(p, fixed).split(os.sep)[:-1])
    ]


class _NotYetRestored(logging.Filter):
    """Drops ignite's "Engine run resuming from iteration 0, epoch 0 ...": MONAI's engines are built with a state, so
    ignite logs every run as resumed, before a ``CheckpointLoader`` restored anything (:meth:`RunFolder.attach`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Engine run resuming from iteration 0, epoch 0 ")


class RunFolder:
    """Guard and record of one run's output files.

    Created before any data is read: it raises when the folder holds outputs of another run and this run neither
    resumes nor may overwrite. Attached to the trainer, it moves those outputs aside (``overwrite``) and writes the
    record when training starts (rank 0 only), i.e. after every input check passed.

    Args:
        record: the run record to write, e.g. ``models/checkpoints/run.json``.
        outputs: glob patterns of the files a run writes (its results), e.g. ``models/pretrained_encoder.pt``;
            ``**`` matches any depth of folders (inference's predictions), except folders of replaced outputs.
        resume_path: the checkpoint this run continues from ("" for a new run); a resumed run keeps the recorded id.
        overwrite: a new run may replace existing outputs; they are moved to ``replaced_<old run id>/`` in the
            folder that holds them all.
        resume_hint: how the user continues a run of this workflow (for the message); "" when it cannot be.
        files: small JSON files the run writes when it starts, after the old outputs are moved aside, as
            ``(path, content)`` pairs (e.g. the adaptation plan beside the weights: :mod:`pgl_bundle.transfer`).
    """

    def __init__(
        self,
        record: str,
        outputs: Sequence[str],
        resume_path: str = "",
        overwrite: bool = False,
        resume_hint: str = "--resume_from latest",
        files: Sequence[tuple[str, dict]] = (),
    ) -> None:
        self.record = os.path.abspath(record)
        self.files = list(files)
        self.resume_path = resume_path
        previous = read_run_id(self.record)
        self.existing = sorted({os.path.abspath(p) for pattern in outputs for p in _outputs(pattern)})
        self.to_move: list[str] = []
        if resume_path:
            self.run_id = previous or self._new_id()
            return
        self.run_id = self._new_id()
        if not self.existing:
            return
        self.root = os.path.commonpath([os.path.dirname(p) for p in [*self.existing, self.record]])
        self.aside = os.path.join(self.root, f"replaced_{previous or 'unrecorded_run'}")
        if overwrite:
            self.to_move = self.existing + ([self.record] if os.path.isfile(self.record) else [])
            return
        shown = ", ".join(os.path.relpath(p, self.root) for p in self.existing[:_SHOWN])
        more = f" and {len(self.existing) - _SHOWN} more" if len(self.existing) > _SHOWN else ""
        continuing = f"continue that run with {resume_hint}, or " if resume_hint else ""
        raise OutputExistsError(
            f"{self.root} holds the outputs of another run ({f'run {previous}' if previous else 'no run record'}): "
            f"{shown}{more}. This run would overwrite them. To go on, {continuing}start afresh with --overwrite True "
            f"(the old outputs are moved to {self.aside}/), or write elsewhere (--bundle_root)."
        )

    @staticmethod
    def _new_id() -> str:
        return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"

    def attach(self, engine: Engine) -> None:
        """Call :meth:`start` when ``engine`` starts (attach after any ``CheckpointLoader``: the log then says where the
        run starts from); ignite's own start line, logged before that restore, is dropped."""
        engine.logger.addFilter(_NotYetRestored())
        engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        self.start()
        if idist.get_rank() != 0:
            return
        state = engine.state
        where = f"resumed from {self.resume_path}" if self.resume_path else "a new run"
        logger.info(
            f"run {self.run_id}: {where}, at iteration {state.iteration}, epoch {state.epoch} of {state.max_epochs}."
        )

    def start(self) -> None:
        """Move the outputs to replace aside and write the record (rank 0 only; idempotent)."""
        if idist.get_rank() != 0:
            return
        for path in self.to_move:
            target = os.path.join(self.aside, os.path.relpath(path, self.root))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(path, target)
        if self.to_move:
            logger.warning(f"overwrite: moved the previous run's {len(self.to_move)} file(s) to {self.aside}/.")
        self.to_move = []
        record = {}
        if self.resume_path and os.path.isfile(self.record):
            with open(self.record) as f:
                record = json.load(f)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        record.setdefault("run_id", self.run_id)
        record.setdefault("started", now)
        record.setdefault("command", [os.path.basename(sys.executable), *sys.argv])
        record.setdefault("cwd", os.getcwd())
        if self.resume_path:
            record.setdefault("resumed", []).append({"at": now, "from": os.path.abspath(self.resume_path)})
        os.makedirs(os.path.dirname(self.record), exist_ok=True)
        with open(self.record + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(self.record + ".tmp", self.record)
        for path, content in self.files:
            with open(path + ".tmp", "w") as f:
                json.dump(content, f, indent=1)
            os.replace(path + ".tmp", path)
        logger.info(f"run {self.run_id}: recorded in {self.record}.")

    def state_dict(self) -> dict[str, str]:
        """Saved in each checkpoint: the run id that :func:`~pgl_bundle.handlers.latest_checkpoint` matches."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, str]) -> None:
        """Nothing to restore: the id comes from the record."""
