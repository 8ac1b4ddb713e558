"""Batch preparation for MONAI's ``SupervisedTrainer`` running PGL or BYOL, and its bf16 loss scaling.

The trainer is MONAI's stock one: its iteration calls ``network(view1, view2, geometry1, geometry2)`` through
the ``SimpleInferer`` and ``loss_function(prediction, None)``, fires the iteration events, handles AMP and
``torch.compile``. Only the mapping from a batch of views to those arguments is PGL-specific, plus one fix for
bf16: :class:`NoLossScalingForBF16`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch

__all__ = ["NoLossScalingForBF16", "PrepareViews"]


class PrepareViews(PrepareBatch):
    """Turn a collated batch of :class:`~pgl_bundle.views.RandPGLViewsd` output into trainer inputs.

    Returns ``(view1, None, (view2, view1_geometry, view2_geometry), {})``: MONAI's 4-tuple form, where the
    first item is the inferer's input, the second the (absent) label, the third extra network arguments. The
    tensors are plain ``torch.Tensor`` (a ``MetaTensor``'s metadata is dropped: the step does not use it, and
    ``torch.compile`` traces plain tensors without graph breaks). With the trainer's ``non_blocking=True`` and a
    DataLoader with ``pin_memory=True`` the copies to the GPU overlap with its work.

    Args:
        view_keys: the two view keys; geometries are read from ``<key>_geometry``.
    """

    def __init__(self, view_keys: Sequence[str] = ("view1", "view2")) -> None:
        self.view_keys = tuple(view_keys)

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: Any = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, None, tuple[torch.Tensor, ...], dict]:
        def move(key: str) -> torch.Tensor:
            value = batchdata[key]
            value = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            return value.to(device=device, non_blocking=non_blocking, **kwargs)

        first, second = self.view_keys
        return move(first), None, (move(second), move(f"{first}_geometry"), move(f"{second}_geometry")), {}


class NoLossScalingForBF16:
    """Ignite handler: give MONAI's ``SupervisedTrainer`` a disabled ``GradScaler`` when its AMP dtype is bfloat16.

    The trainer builds an enabled ``GradScaler`` whenever ``amp`` is on. bf16 has float32's exponent range and
    needs no loss scaling, and the scaler's step reads its overflow flag on the host (a ``.item()``: one
    device synchronisation per step) unless the optimizer is a fused one. A disabled scaler passes the loss and
    the optimizer step through unchanged. float16 keeps MONAI's scaler.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "scaler", None) is not None and engine.amp_kwargs.get("dtype") == torch.bfloat16:
            engine.scaler = torch.amp.GradScaler("cuda", enabled=False)
