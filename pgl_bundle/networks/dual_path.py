"""PGL's prior-guided dual-path module (method spec, section 2), which also runs the BYOL baseline."""

from __future__ import annotations

import torch
from pgl_bundle.networks.aligner import PriorGuidedAligner
from torch import nn

__all__ = ["Branch", "DualPathNetwork"]


class Branch(nn.Module):
    """One path's encoder and projector: ``projector(encoder(x)[-1])``.

    The online and the target path are two copies of this module; the target copy is the exponential moving
    average of the online one (kept by ignite's ``EMAHandler``, see :mod:`pgl_bundle.ema`).

    Shapes: ``(B, C_in, x, y, z) -> (B, 256, x / 16, y / 16, z / 8)`` for PGL's heads, ``(B, 256)`` for BYOL's.
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x)[-1])


class DualPathNetwork(nn.Module):
    """Online path ``encoder -> projector -> aligner -> predictor``, target path ``encoder -> projector -> aligner``.

    Both views go through both paths in one batch of ``2B``; the target path runs without gradient.
    With ``aligner=None`` (and pooled heads) this is BYOL: global vectors, nothing to align.

    Args:
        online: the online :class:`Branch` (trained).
        target: the target :class:`Branch` (an EMA copy of ``online``; receives no gradient).
        predictor: the online-only predictor head.
        aligner: a :class:`PriorGuidedAligner`, or None for BYOL.

    Forward: ``view1, view2`` ``(B, C, x, y, z)``; ``geometry1, geometry2`` ``(B, 4, 3)`` (ignored without aligner).
    Returns ``(predictions, targets)``, each ``(2B, 256, ...)``: ``predictions = [p1; p2]`` and
    ``targets = [z2; z1]``, so row ``i`` of one is to be matched to row ``i`` of the other.
    """

    def __init__(
        self, online: Branch, target: Branch, predictor: nn.Module, aligner: PriorGuidedAligner | None = None
    ) -> None:
        super().__init__()
        self.online = online
        self.target = target.requires_grad_(False)
        self.predictor = predictor
        self.aligner = aligner

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        geometry1: torch.Tensor | None = None,
        geometry2: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        views = torch.cat([view1, view2])
        online1, online2 = self.online(views).chunk(2)
        with torch.no_grad():
            target1, target2 = self.target(views).chunk(2)
        if self.aligner is not None:
            online1, online2 = self.aligner(online1, online2, geometry1, geometry2)
            with torch.no_grad():
                target1, target2 = self.aligner(target1, target2, geometry1, geometry2)
        predictions = self.predictor(torch.cat([online1, online2]))
        return predictions, torch.cat([target2, target1])
