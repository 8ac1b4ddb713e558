"""PGL's local consistency loss (method spec, section 4); on pooled vectors it is BYOL's loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConsistencyLoss", "consistency"]


def consistency(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|| p / ||p|| - z / ||z|| ||^2 = 2 - 2 cos(p, z)`` over the channel axis, averaged over everything else.

    Args:
        prediction: ``(B, C, ...)`` online predictions.
        target: ``(B, C, ...)`` target projections (detached here).

    Returns:
        a scalar in [0, 4].
    """
    p = F.normalize(prediction, dim=1)
    z = F.normalize(target.detach(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


class ConsistencyLoss(nn.Module):
    """Symmetrised consistency: ``L(p1, z2) + L(p2, z1)``.

    Takes the :class:`~pgl_bundle.networks.DualPathNetwork` output ``(predictions, targets)`` as MONAI's
    ``SupervisedTrainer`` passes it (``loss_function(pred, label)``; the label is None in self-supervision).
    Voxel maps give PGL's local loss, pooled vectors BYOL's global one.
    """

    def forward(self, pred: tuple[torch.Tensor, torch.Tensor], label: torch.Tensor | None = None) -> torch.Tensor:
        predictions, targets = pred
        p1, p2 = predictions.chunk(2)
        z2, z1 = targets.chunk(2)
        return consistency(p1, z2) + consistency(p2, z1)
