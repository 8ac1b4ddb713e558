"""Checkpointing that survives a kill and a full disk: atomic saves, the newest checkpoint of the same run, free-space
checks, and the data position to resume at.

Gaps in the stock parts, each closed here:

- MONAI's ``CheckpointSaver`` writes with ignite's ``DiskSaver(atomic=False)``, so a process killed while saving
  leaves a truncated checkpoint under the real name; ignite's atomic mode leaves its temporary file behind when the
  disk fills up (the error comes from closing the file, after which its clean-up is skipped); and ignite's
  ``Checkpoint`` deletes the oldest file *before* writing the new one, so a failed save can leave none.
  :class:`AtomicCheckpointSaver` writes to a temporary file that is removed on any failure, renames it, and only
  then removes the file it replaces. Its final checkpoint is a hard link to the last interval checkpoint when both
  hold the same state (no file written twice).
- Nothing checks the disk before training: :func:`check_free_space` estimates every saver's needs from the network
  and optimizer sizes and stops before the first step when they do not fit.
- Nothing picks the checkpoint to resume from: :func:`latest_checkpoint` takes the loadable one of the same run
  (:class:`~pgl_bundle.run_folder.RunFolder`) with the most iterations.
- A plain ignite ``Engine`` resumed mid-epoch starts that epoch's data from its first batch:
  :class:`SkipTrainedBatches` makes :class:`~pgl_bundle.distributed.ResumableSampler` skip the batches already done.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver
from pgl_bundle.distributed import ResumableSampler
from pgl_bundle.errors import DiskSpaceError, free_space, full_disk_error, size_text
from pgl_bundle.run_folder import read_run_id
from torch import nn

__all__ = [
    "AtomicCheckpointSaver",
    "SkipTrainedBatches",
    "check_free_space",
    "checkpoint_bytes",
    "checkpoint_run",
    "latest_checkpoint",
    "resolve_resume",
]

logger = logging.getLogger(__name__)


def _disk(folder: str) -> int:
    """The device id of the disk that holds (or would hold) ``folder``."""
    return os.stat(free_space(folder)[1]).st_dev


class _SafeDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` (with MONAI's fixed file name) that leaves no temporary file and never less than the
    previous checkpoint: files it is asked to remove are removed only after the next save succeeded. Its folder is
    created by the first save, not when the saver is built."""

    @staticmethod
    def _check_and_setup(dirname, create_dir: bool, require_empty: bool) -> None:
        """Nothing to set up before the first save (ignite's creates ``dirname``)."""

    def __init__(self, dirname: str, filename: str | None = None, then: str = "") -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename, self.then = filename, then
        self._to_remove: list[str] = []
        self.last_saved: str | None = None

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        path = os.path.join(self.dirname, self.filename or filename)
        os.makedirs(self.dirname, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.dirname, prefix="tmp", suffix=".pt.partial")
        try:
            with os.fdopen(fd, "wb") as f:  # closing flushes: a full disk may only show here, inside the try
                torch.save(checkpoint, f)
            os.replace(temporary, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            full = full_disk_error(e, self.dirname)
            if full is not None:
                free, _ = free_space(self.dirname)
                raise DiskSpaceError(
                    full.errno,
                    f"disk full: {path}: saving the checkpoint failed ({full.strerror or full}); {size_text(free)} "
                    f"free on that disk. Nothing was left half-written. Last good checkpoint here: "
                    f"{self.last_saved or 'none yet'}. Free some space (or set --ckpt_dir to another disk), then "
                    f"{self.then}.",
                ) from e
            raise
        os.chmod(path, os.stat(path).st_mode | stat.S_IRGRP | stat.S_IROTH)  # as ignite's atomic save does
        self.last_saved = path
        for name in self._to_remove:
            name = os.path.join(self.dirname, self.filename or name)
            if name != path:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(name)
        self._to_remove = []

    def remove(self, filename: str) -> None:
        self._to_remove.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files are written whole or not at all, and never twice.

    - Each file is serialised to a temporary ``tmp*.pt.partial`` file in ``save_dir`` and renamed over its name
      (``os.replace``, atomic on POSIX); on any error (a full disk) the temporary file is removed and a
      :class:`~pgl_bundle.errors.DiskSpaceError` names the file, the free space and the last good checkpoint. Only a
      kill during a save leaves a temporary file, and the previous files intact.
    - With ``n_saved`` files kept, the oldest is removed after the next one is written, not before. A resumed run
      (its ``save_dict`` holding the :class:`~pgl_bundle.run_folder.RunFolder` as ``run``) takes over the files the
      same run wrote before it was stopped: ``n_saved`` holds across restarts.
    - The final checkpoint is a hard link to the last interval checkpoint when that holds the same trainer iteration
      (the usual end of a run: the last epoch's checkpoint), so the state is on disk once.

    Same arguments as ``CheckpointSaver``, and ``then``: what the full-disk message tells the user to do once space
    is freed (a stage without resume says how to start again).
    """

    def __init__(self, *args, then: str = "continue with --resume_from latest", **kwargs) -> None:
        save_dir = os.path.abspath(kwargs["save_dir"] if "save_dir" in kwargs else args[0])
        missing = []  # the folders of save_dir's path that do not exist yet, deepest first
        while not os.path.exists(save_dir):
            missing.append(save_dir)
            save_dir = os.path.dirname(save_dir)
        super().__init__(*args, **kwargs)
        for folder in missing:  # MONAI's saver makes them when built: a run refused before its first save keeps none
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self._last_interval: tuple[int, str] | None = None
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _SafeDiskSaver(self.save_dir, checkpoint.save_handler.filename, then)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self._interval_checkpoint is not None and self._interval_checkpoint.n_saved is not None:
            engine.add_event_handler(Events.STARTED, self._adopt_own_checkpoints)

    def _own_checkpoints(self) -> list[tuple[int, str]]:
        """``(epoch or iteration, file name)`` of the interval checkpoints in ``save_dir`` written by this run (the
        ``run`` entry of ``save_dict``), oldest first; none for a saver without one."""
        interval, run = self._interval_checkpoint, self.save_dict.get("run")
        if interval is None or run is None:
            return []
        run_id = run.state_dict()["run_id"]
        found = []
        for path in glob.glob(os.path.join(glob.escape(self.save_dir), f"*_{interval.score_name}=*.pt")):
            number = os.path.basename(path)[: -len(".pt")].rpartition("=")[2]
            stored = checkpoint_run(path) if number.isdigit() else None
            if stored is not None and stored[1] == run_id:
                found.append((int(number), os.path.basename(path)))
        return sorted(found)

    def _adopt_own_checkpoints(self, engine: Engine) -> None:
        """At the start of a resumed run, after ``CheckpointLoader`` restored the trainer: rotate the interval
        checkpoints this run wrote before it was stopped (up to the restored epoch or iteration) as if this process
        had written them; ignite's ``Checkpoint`` knows only the files of its own process. Files beyond ``n_saved``
        are removed after the next save succeeded."""
        done = engine.state.epoch if self.epoch_level else engine.state.iteration
        own = [item for item in self._own_checkpoints() if item[0] <= done]
        if not own:
            return
        kept = own[-self._interval_checkpoint.n_saved :]
        self._interval_checkpoint.load_state_dict({"_saved": kept})
        self._interval_checkpoint.save_handler._to_remove.extend(name for _, name in own[: len(own) - len(kept)])
        logger.info(f"{self.save_dir}: this run's {[name for _, name in own]} are rotated as its new checkpoints are.")

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        self._last_interval = (engine.state.iteration, self._interval_checkpoint.save_handler.last_saved)

    def completed(self, engine: Engine) -> None:
        if self._last_interval is None or self._last_interval[0] != engine.state.iteration:
            return super().completed(engine)
        source = self._last_interval[1]
        final = os.path.join(self.save_dir, self._final_filename)
        linked = os.path.join(self.save_dir, f"tmp.{os.getpid()}.link")
        try:
            os.link(source, linked)
            os.replace(linked, final)
        except OSError as e:  # no hard links on this file system: write the file
            logger.info(f"cannot link {final} to {source} ({e}); saving it.")
            with contextlib.suppress(OSError):
                os.remove(linked)
            return super().completed(engine)
        logger.info(f"Train completed, final checkpoint {final}: the same state as {source} (hard link, no copy).")

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if isinstance(e, DiskSpaceError):  # saving a final checkpoint would fail the same way
            raise e
        super().exception_raised(engine, e)

    def bytes_needed(self) -> int:
        """Disk space this saver may still take at once: :func:`checkpoint_bytes` of its ``save_dict`` per file it
        keeps (``n_saved`` interval files, ``key_metric_n_saved`` best ones), plus one for the temporary file of the
        save in progress (the final checkpoint is written when no interval save is under way, or is a link).

        The interval files this run wrote before a restart already hold their share (:meth:`_own_checkpoints`): a
        resumed run needs room for one more file only. A saver that keeps every file (``n_saved`` None) grows with
        the run: only its first file and the one being written are counted.
        """
        kept = 0
        if self._interval_checkpoint is not None:
            kept += max(0, (self._interval_checkpoint.n_saved or 1) - len(self._own_checkpoints()))
        if self._key_metric_checkpoint is not None:
            kept += self._key_metric_checkpoint.n_saved or 1
        return checkpoint_bytes(self.save_dict) * (kept + 1)


def checkpoint_bytes(save_dict: Mapping[str, object]) -> int:
    """Upper estimate of the size of a checkpoint of ``save_dict``, before any training step.

    Modules: every tensor of their ``state_dict``. Optimizers: their current state, but at least two tensors the
    size of each parameter they update (Adam's two moments; SGD's momentum and LARS keep one, so this over-counts
    them), since optimizers create their state at the first step. Entries with a ``checkpoint_bytes()`` method: what
    it says. Other entries (trainer, scheduler, run identity) are a few kilobytes; pickling adds well under 1 %. Both
    are covered by a 1 MB margin.
    """
    total = 1 << 20
    for obj in save_dict.values():
        if isinstance(obj, nn.Module):
            total += sum(t.numel() * t.element_size() for t in obj.state_dict().values() if torch.is_tensor(t))
        elif isinstance(obj, torch.optim.Optimizer):
            state = sum(
                t.numel() * t.element_size() for s in obj.state.values() for t in s.values() if torch.is_tensor(t)
            )
            params = sum(p.numel() * p.element_size() for g in obj.param_groups for p in g["params"])
            total += max(state, 2 * params)
        elif hasattr(obj, "checkpoint_bytes"):  # e.g. the probe's best encoder (pgl_bundle.validation_probe)
            total += obj.checkpoint_bytes()
    return total


def check_free_space(savers: Sequence[object]) -> int:
    """Stop before training when the checkpoints of ``savers`` cannot fit on their disks; return the bytes needed.

    Sums :meth:`AtomicCheckpointSaver.bytes_needed` per disk (other handlers in ``savers`` are ignored) and compares
    it with the free space (``shutil.disk_usage``). Of the files already present, only the interval checkpoints of
    the same run, which a resumed run rotates, count as reusable.

    Raises:
        DiskSpaceError: a disk has less free space than its savers need; the message gives both and the files.
    """
    needs: dict[int, list] = {}
    for saver in savers:
        if isinstance(saver, AtomicCheckpointSaver):
            free, existing = free_space(saver.save_dir)
            need = needs.setdefault(_disk(saver.save_dir), [free, 0, [], existing, False])
            need[1] += saver.bytes_needed()
            need[2].append(saver.save_dir)
            need[4] |= saver._interval_checkpoint is not None and not saver.epoch_level
    for free, need, folders, disk, iteration_savers in needs.values():
        logger.info(f"checkpoints in {sorted(set(folders))}: up to {size_text(need)} at once, {size_text(free)} free.")
        if need > free:
            fewer = ", or save fewer checkpoints (--checkpoint_every_n_iterations 0)" if iteration_savers else ""
            raise DiskSpaceError(
                28,
                f"not enough free disk space for the checkpoints in {sorted(set(folders))}: they need up to "
                f"{size_text(need)} at once (network and optimizer state, times the files kept plus one being "
                f"written), and {disk} has {size_text(free)} free. Free some space, or set --ckpt_dir to another "
                f"disk{fewer}.",
            )
    return sum(need[1] for need in needs.values())


def checkpoint_run(path: str) -> tuple[int, str | None] | None:
    """The trainer iteration and the run id stored in the checkpoint at ``path``; None when it cannot be read."""
    try:  # mmap: the tensors are not read, only the small trainer and run entries
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["trainer"]["iteration"]), checkpoint.get("run", {}).get("run_id")
    except Exception as e:  # truncated, foreign or partial files are skipped, whatever torch raises for them
        logger.warning(f"{path}: skipped, not a loadable training checkpoint ({type(e).__name__}: {e}).")
        return None


def latest_checkpoint(directory: str, run_id: str | None = None) -> str:
    """The loadable ``*.pt`` training checkpoint in ``directory`` with the most trained iterations ("" if none).

    Args:
        directory: the checkpoints folder.
        run_id: only checkpoints written by this run count (others are skipped with a warning); None: any.

    Files that do not load (e.g. truncated by a kill during a non-atomic save) are skipped with a warning; ties go
    to the most recently written file.
    """
    found = []
    for path in glob.glob(os.path.join(directory, "*.pt")):
        stored = checkpoint_run(path)
        if stored is None:
            continue
        if run_id is not None and stored[1] != run_id:
            logger.warning(f"{path}: skipped, written by run {stored[1]}, not by this folder's run {run_id}.")
            continue
        found.append((stored[0], os.path.getmtime(path), path))
    return max(found)[2] if found else ""


def resolve_resume(resume_from: str, directory: str) -> str:
    """The checkpoint to resume from: ``resume_from`` itself, or for ``"latest"`` :func:`latest_checkpoint` of
    ``directory`` among those of the run recorded in its ``run.json`` ("" when there is none yet, so that a first
    run starts from scratch)."""
    if resume_from != "latest":
        return resume_from
    run_id = read_run_id(os.path.join(directory, "run.json"))
    path = latest_checkpoint(directory, run_id)
    logger.info(
        f"resume_from latest: {path or 'no checkpoint of this run in ' + directory + ', starting from scratch'}."
    )
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
