"""Batch preparation for MONAI's ``SupervisedTrainer`` running PGL or BYOL.

The trainer is MONAI's stock one: its iteration calls ``network(view1, view2, geometry1, geometry2)`` through
the ``SimpleInferer`` and ``loss_function(prediction, None)``, fires the iteration events and handles AMP. Only
the mapping from a batch of views to those arguments is PGL-specific.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

__all__ = ["PrepareViews"]


class PrepareViews(PrepareBatch):
    """Turn a collated batch of :class:`~pgl_bundle.views.RandPGLViewsd` output into trainer inputs.

    Returns ``(view1, None, (view2, view1_geometry, view2_geometry), {})``: MONAI's 4-tuple form, where the
    first item is the inferer's input, the second the (absent) label, the third extra network arguments.

    Args:
        view_keys: the two view keys; geometries are read from ``<key>_geometry``.
    """

    def __init__(self, view_keys: Sequence[str] = ("view1", "view2")) -> None:
        self.view_keys = tuple(view_keys)

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: Any = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, None, tuple[torch.Tensor, ...], dict]:
        def move(key: str) -> torch.Tensor:
            return torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking, **kwargs)

        first, second = self.view_keys
        return move(first), None, (move(second), move(f"{first}_geometry"), move(f"{second}_geometry")), {}
