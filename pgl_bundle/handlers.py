"""Checkpointing that survives a kill: atomic saves, the newest loadable checkpoint, and the data position to resume at.

Three gaps in the stock parts, each closed here:

- MONAI's ``CheckpointSaver`` writes with ignite's ``DiskSaver(atomic=False)`` (for the file permissions, which
  ignite 0.5 now sets itself), so a process killed while saving leaves a truncated checkpoint under the real name;
  :class:`AtomicCheckpointSaver` writes to a temporary file in the same folder and renames it, as ignite does.
- Nothing picks the checkpoint to resume from: :func:`latest_checkpoint` takes the loadable one with the most
  iterations.
- A plain ignite ``Engine`` resumed mid-epoch starts that epoch's data from its first batch:
  :class:`SkipTrainedBatches` makes :class:`~pgl_bundle.distributed.ResumableSampler` skip the batches already done.
"""

from __future__ import annotations

import glob
import logging
import os

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from pgl_bundle.distributed import ResumableSampler

__all__ = ["AtomicCheckpointSaver", "SkipTrainedBatches", "latest_checkpoint", "resolve_resume"]

logger = logging.getLogger(__name__)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files are written atomically: whole, or not at all.

    Each file is serialised to a temporary file in ``save_dir`` and renamed over its name (``os.replace``, atomic
    on POSIX), so a checkpoint file is never partly written, whenever the process dies. A kill during a save leaves
    the previous files intact and a stray ``tmp*`` file. Same arguments as ``CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True  # MONAI builds its DiskSaver with atomic=False


def _trained_iterations(path: str) -> int | None:
    """The trainer iteration stored in the checkpoint at ``path``, or None when it cannot be read."""
    try:  # mmap: the tensors are not read, only the small trainer entry is
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["trainer"]["iteration"])
    except Exception as e:  # truncated, foreign or partial files are skipped, whatever torch raises for them
        logger.warning(f"{path}: skipped, not a loadable training checkpoint ({type(e).__name__}: {e}).")
        return None


def latest_checkpoint(directory: str) -> str:
    """The loadable ``*.pt`` training checkpoint in ``directory`` with the most trained iterations ("" if none).

    Files that do not load (e.g. truncated by a kill during a non-atomic save) are skipped with a warning; ties go
    to the most recently written file.
    """
    found = []
    for path in glob.glob(os.path.join(directory, "*.pt")):
        iterations = _trained_iterations(path)
        if iterations is not None:
            found.append((iterations, os.path.getmtime(path), path))
    return max(found)[2] if found else ""


def resolve_resume(resume_from: str, directory: str) -> str:
    """The checkpoint to resume from: ``resume_from`` itself, or for ``"latest"`` :func:`latest_checkpoint` of
    ``directory`` ("" when there is none yet, so that a first run starts from scratch)."""
    if resume_from != "latest":
        return resume_from
    path = latest_checkpoint(directory)
    logger.info(f"resume_from latest: {path or 'no checkpoint in ' + directory + ', starting from scratch'}.")
    return path


class SkipTrainedBatches:
    """Ignite handler: at each epoch start, make the sampler skip the batches of this epoch already trained on.

    Zero except in the first epoch of a run resumed from a mid-epoch checkpoint, where it is
    ``iteration % epoch_length`` batches: the run then continues with the batches the interrupted run would have
    taken next, because :class:`~pgl_bundle.distributed.ResumableSampler`'s order depends on the epoch only.

    Args:
        sampler: the train DataLoader's sampler.
        batch_size: the DataLoader's batch size (per process).
    """

    def __init__(self, sampler: ResumableSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        done = engine.state.iteration % engine.state.epoch_length
        if done:
            logger.info(f"epoch {engine.state.epoch}: resuming after its first {done} batches.")
        self.sampler.skip(done * self.batch_size)
