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
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every parameter with a gradient, in multi-tensor (``torch._foreach_*``) kernels: a few
        launches per parameter group instead of about ten per tensor, which dominate a GPU step's optimizer time."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            weights = [i for i, p in enumerate(params) if p.ndim > 1]
            if weights:
                w = [params[i] for i in weights]
                scaled = torch._foreach_add([updates[i] for i in weights], w, alpha=group["weight_decay"])
                w_norm, u_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(scaled))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, 1.0)
                torch._foreach_mul_(scaled, list(trust.to(scaled[0].dtype).unbind()))
                for i, update in zip(weights, scaled):
                    updates[i] = update
            buffers = []
            for p, update in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" in state:
                    buffers.append((state["momentum_buffer"], update))
                else:
                    state["momentum_buffer"] = update.clone()
            if buffers:
                momentum, new = [b for b, _ in buffers], [u for _, u in buffers]
                torch._foreach_mul_(momentum, group["momentum"])
                torch._foreach_add_(momentum, new)
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
        return loss
