"""Training throughput, logged while a run trains: view pairs per second and the share of time spent waiting for data.

Ignite's ``Timer`` does the timing (one timer for the wall clock, one resumed on ``GET_BATCH_STARTED`` and paused on
``GET_BATCH_COMPLETED`` for the data wait); MONAI's ``TensorBoardHandler`` owns the TensorBoard writer. What neither
has is the rate over a window of iterations, counted across processes, which this handler adds.
"""

from __future__ import annotations

import logging

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Timer
from monai.handlers.tensorboard_handlers import TensorBoardHandler

__all__ = ["ThroughputHandler"]


class ThroughputHandler(TensorBoardHandler):
    """Every ``interval`` iterations, log the view pairs per second and the fraction of wall time spent waiting
    for the next batch, over the iterations since the last log, to the logger and to TensorBoard.

    Pairs are counted globally: ``iterations * batch_size * world size`` per window, where ``batch_size`` is the
    DataLoader's (per-process) batch size and the world size is ignite's (1 without ``torch.distributed``). The
    times are host wall-clock times, with no device synchronisation: over a window of many iterations the host
    runs at most a few steps ahead of a GPU (its launch queue is bounded), so the rate is the GPU's within that
    margin. The first window includes the warm-up (cuDNN autotuning, ``torch.compile``) and is low.

    Args:
        batch_size: view pairs per iteration and process.
        interval: iterations per window.
        summary_writer: a TensorBoard writer to share; by default one is created in ``log_dir``.
        log_dir: where a new writer writes.
        tag: TensorBoard tag prefix (``<tag>/pairs_per_second``, ``<tag>/data_wait_fraction``).
        name: the logger's name.
    """

    def __init__(
        self,
        batch_size: int,
        interval: int = 10,
        summary_writer=None,
        log_dir: str = "./runs",
        tag: str = "throughput",
        name: str = "pgl_bundle.throughput",
    ) -> None:
        if interval < 1:
            raise ValueError(f"ThroughputHandler: interval must be a positive number of iterations, got {interval}.")
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.batch_size = batch_size
        self.interval = interval
        self.tag = tag
        self.logger = logging.getLogger(name)
        self.wall, self.data = Timer(), Timer()
        self._last = (0, 0.0, 0.0)  # iteration, wall and data seconds at the previous log

    def attach(self, engine: Engine) -> None:
        self.wall.attach(engine, start=Events.STARTED)
        self.data.attach(
            engine, start=Events.STARTED, resume=Events.GET_BATCH_STARTED, pause=Events.GET_BATCH_COMPLETED
        )
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.close())

    def _reset(self, engine: Engine) -> None:
        self.data.pause()  # counts only from the first GET_BATCH_STARTED
        self._last = (engine.state.iteration, 0.0, 0.0)  # a resumed run's first window may be shorter

    def __call__(self, engine: Engine) -> None:
        iteration, wall, data = engine.state.iteration, self.wall.value(), self.data.value()
        window, waited = wall - self._last[1], data - self._last[2]
        pairs = (iteration - self._last[0]) * self.batch_size * idist.get_world_size()
        self._last = (iteration, wall, data)
        rate, wait = pairs / max(window, 1e-9), waited / max(window, 1e-9)
        self.logger.info(
            f"iteration {engine.state.iteration}: {rate:.3g} view pairs/s (all processes), "
            f"{100 * wait:.1f} % of the time waiting for data"
        )
        self._writer.add_scalar(f"{self.tag}/pairs_per_second", rate, engine.state.iteration)
        self._writer.add_scalar(f"{self.tag}/data_wait_fraction", wait, engine.state.iteration)
        self._writer.flush()
