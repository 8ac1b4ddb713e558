"""Collapse signal: is self-supervised training learning, or mapping every voxel to the same embedding?

The known failure of BYOL-style methods is collapse: the online network's output becomes one constant vector, the
loss reaches its minimum and nothing is learned; the loss curve alone does not tell it from success. The standard
check (SimSiam, Chen and He 2021, section 4.1) is the standard deviation, per channel, of the L2-normalised outputs
over many samples, averaged over the channels: 0 when every output is the same unit vector, about ``1 / sqrt(C)``
when the ``C``-channel unit vectors are spread over the sphere. PGL's outputs are voxel maps, so the samples are the
batch's voxels. A second number, the mean cosine similarity of randomly chosen voxel pairs, goes to 1 in a collapse.

:class:`CollapseSignalHandler` logs both for the online projections, with the loss, and warns below a threshold.
Hand-written: MONAI and Ignite have no such statistic (ignite's metrics compare outputs with labels).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.handlers.tensorboard_handlers import TensorBoardHandler

__all__ = ["CollapseSignalHandler", "collapse_signal"]


def collapse_signal(
    embeddings: torch.Tensor, num_pairs: int = 1024, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel standard deviation of L2-normalised embeddings, and the mean cosine of random pairs of them.

    Args:
        embeddings: ``(N, C, ...)``: ``N`` maps (or vectors) of ``C`` channels; every voxel of every map is a sample.
        num_pairs: random pairs of distinct samples for the cosine.
        generator: a CPU generator for the pairs (keeps the caller's global random state untouched).

    Returns:
        ``(std, cosine)``, two float32 scalars on the embeddings' device: ``std`` is 0 for a collapse and about
        ``1 / sqrt(C)`` for embeddings spread evenly over the unit sphere; ``cosine`` is 1 for a collapse and about 0
        for such a spread.
    """
    channels = embeddings.shape[1]
    samples = F.normalize(embeddings.detach().float().movedim(1, -1).reshape(-1, channels), dim=1)  # (M, C)
    count = samples.shape[0]
    if count < 2:
        raise ValueError(
            f"collapse_signal needs at least 2 samples, got embeddings of shape {tuple(embeddings.shape)}."
        )
    std = samples.std(dim=0).mean()
    first = torch.randint(count, (num_pairs,), generator=generator)
    second = (first + torch.randint(1, count, (num_pairs,), generator=generator)) % count  # never the same sample
    first, second = first.to(samples.device), second.to(samples.device)
    cosine = (samples[first] * samples[second]).sum(dim=1).mean()
    return std, cosine


class CollapseSignalHandler(TensorBoardHandler):
    """Every ``interval`` iterations, log :func:`collapse_signal` of the online projections, and warn when its
    standard deviation is below ``threshold / sqrt(C)``.

    The online projections are the output of ``module``, the online path's encoder and projector
    (:class:`~pgl_bundle.networks.Branch`), for both views of the batch: ``(2B, C, x, y, z)`` maps for PGL, pooled
    ``(2B, C)`` vectors for BYOL. A forward hook keeps a reference to the last one (detached, unchanged). Not the
    predictor's output: early in healthy training the predictor learns to output nearly the mean target, so its
    outputs bunch together while the projections stay spread (docs/README.md, "What pretraining does to your
    data"). Logged as ``iteration N: collapse signal: channel std S (healthy ~1/sqrt(C) = H, collapsed 0),
    random-pair cosine P`` and to TensorBoard as ``<tag>/channel_std`` and ``<tag>/pair_cosine``. The pairs come from
    the handler's own seeded generator, so training draws the same random numbers with or without it; tensors are
    read on the host only at logging iterations.

    Args:
        module: the online :class:`~pgl_bundle.networks.Branch` (or any module whose ``(N, C, ...)`` output to watch).
        interval: iterations between logs (the loss's ``log_interval``).
        threshold: warn when the std is below ``threshold / sqrt(C)``, a fraction of the healthy value.
        num_pairs: random voxel pairs for the cosine.
        seed: seed of the pair generator.
        summary_writer: a TensorBoard writer to share; by default one is created in ``log_dir``.
        log_dir: where a new writer writes.
        tag: TensorBoard tag prefix.
        name: the logger's name.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        interval: int = 1,
        threshold: float = 0.5,
        num_pairs: int = 1024,
        seed: int = 0,
        summary_writer=None,
        log_dir: str = "./runs",
        tag: str = "collapse",
        name: str = "pgl_bundle.collapse",
    ) -> None:
        if interval < 1:
            raise ValueError(
                f"CollapseSignalHandler: interval must be a positive number of iterations, got {interval}."
            )
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.module, self.interval, self.threshold, self.tag = module, interval, threshold, tag
        self.num_pairs = num_pairs
        self.generator = torch.Generator().manual_seed(seed)
        self.logger = logging.getLogger(name)
        self.projections: torch.Tensor | None = None

    def _keep(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.projections = output.detach()

    def attach(self, engine: Engine) -> None:
        self.module.register_forward_hook(self._keep)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if self.projections is None:
            raise RuntimeError("CollapseSignalHandler: the watched module did not run in this iteration.")
        std, cosine = (value.item() for value in collapse_signal(self.projections, self.num_pairs, self.generator))
        healthy = 1 / math.sqrt(self.projections.shape[1])
        iteration = engine.state.iteration
        self.logger.info(
            f"iteration {iteration}: collapse signal: channel std {std:.4g} (healthy ~1/sqrt(C) = {healthy:.4g}, "
            f"collapsed 0), random-pair cosine {cosine:.3f}"
        )
        if std < self.threshold * healthy:
            self.logger.warning(
                f"iteration {iteration}: the online projections may be collapsing: channel std {std:.4g} is below "
                f"{self.threshold} / sqrt(C) = {self.threshold * healthy:.4g} (random-pair cosine {cosine:.3f}); "
                "see docs/README.md, 'What pretraining does to your data'"
            )
        self._writer.add_scalar(f"{self.tag}/channel_std", std, iteration)
        self._writer.add_scalar(f"{self.tag}/pair_cosine", cosine, iteration)
        self._writer.flush()
