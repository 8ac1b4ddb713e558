"""One run's outputs per folder: a second run never overwrites another run's results unless asked to.

A run records itself in a small JSON file (``models/checkpoints/run.json`` for pretraining): a run id, when it
started, the command line (config files and overrides) and the checkpoints it resumed from. The id is also saved
in every training checkpoint (:class:`RunFolder` is an entry of the checkpoints' ``save_dict``), so that
``--resume_from latest`` only ever picks a checkpoint of the same run
(:func:`~pgl_bundle.handlers.latest_checkpoint`).

A new run into a folder that holds another run's outputs stops before reading any data, listing the files and the
two ways on: continue that run (``--resume_from latest``) or start afresh (``--overwrite True``, which moves the old
outputs into ``replaced_<run id>/`` beside them when the new run starts; nothing is deleted).
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Sequence

import ignite.distributed as idist
from ignite.engine import Engine, Events
from pgl_bundle.errors import OutputExistsError

__all__ = ["RunFolder", "read_run_id"]

logger = logging.getLogger(__name__)

_SHOWN = 6  # file names quoted in a message


def read_run_id(record: str) -> str | None:
    """The run id in the run record ``record``, or None when there is no (readable) record."""
    try:
        with open(record) as f:
            return str(json.load(f)["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunFolder:
    """Guard and record of one run's output files.

    Created before any data is read: it raises when the folder holds outputs of another run and this run neither
    resumes nor may overwrite. Attached to the trainer, it moves those outputs aside (``overwrite``) and writes the
    record when training starts (rank 0 only), i.e. after every input check passed.

    Args:
        record: the run record to write, e.g. ``models/checkpoints/run.json``.
        outputs: glob patterns of the files a run writes (its results), e.g. ``models/pretrained_encoder.pt``.
        resume_path: the checkpoint this run continues from ("" for a new run); a resumed run keeps the recorded id.
        overwrite: a new run may replace existing outputs; they are moved to ``replaced_<old run id>/`` in the
            folder that holds them all.
        resume_hint: how the user continues a run of this workflow (for the message); "" when it cannot be.
    """

    def __init__(
        self,
        record: str,
        outputs: Sequence[str],
        resume_path: str = "",
        overwrite: bool = False,
        resume_hint: str = "--resume_from latest",
    ) -> None:
        self.record = os.path.abspath(record)
        self.resume_path = resume_path
        previous = read_run_id(self.record)
        self.existing = sorted({os.path.abspath(p) for pattern in outputs for p in glob.glob(pattern)})
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
        engine.add_event_handler(Events.STARTED, lambda _: self.start())

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
        logger.info(f"run {self.run_id}: recorded in {self.record}.")

    def state_dict(self) -> dict[str, str]:
        """Saved in each checkpoint: the run id that :func:`~pgl_bundle.handlers.latest_checkpoint` matches."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, str]) -> None:
        """Nothing to restore: the id comes from the record."""
