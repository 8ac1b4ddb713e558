"""LARS, the optimizer of the ``paper`` preset. Written here because neither PyTorch nor MONAI ships one."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor is scaled by the layer-wise trust ratio.

    ``update = grad + weight_decay * w``; for tensors with more than one dimension (convolution and linear
    weights) the update is scaled by ``trust_coefficient * ||w|| / ||update||``; biases and normalisation
    parameters get neither weight decay nor the trust ratio (as in BYOL and SimCLR).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 penalty on weight tensors.
        trust_coefficient: the LARS eta.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.2,
        momentum: float = 0.9,
        weight_decay: float = 1.5e-6,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.norm(p), torch.linalg.norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, 1.0
                    )
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
