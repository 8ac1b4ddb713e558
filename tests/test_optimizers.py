"""LARS: the layer-wise trust ratio, its multi-tensor step against the per-tensor formula, and that it optimises."""

from __future__ import annotations

import torch
from pgl_bundle import LARS


def test_first_step_matches_the_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.01)
    w.grad = torch.tensor([[0.0, 10.0]])  # ||g|| = 10 -> trust 0.01 * 5 / 10
    b.grad = torch.tensor([2.0])  # 1-D: no trust ratio, no weight decay
    optimizer.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 0.1 * 0.005 * 10.0]]))
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))


def test_minimises_a_regression():
    torch.manual_seed(0)
    x, true_w = torch.randn(256, 8), torch.randn(8, 1)
    y = x @ true_w
    model = torch.nn.Linear(8, 1)
    optimizer = LARS(model.parameters(), lr=1.0, trust_coefficient=0.02, weight_decay=0.0)
    first = None
    for _ in range(200):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first or float(loss)
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.05 * first


def reference_lars_step(params, buffers, lr, momentum, weight_decay, eta):
    """The LARS step written per tensor, as in the class docstring (the optimizer's own code before it used
    multi-tensor kernels)."""
    with torch.no_grad():
        for i, p in enumerate(params):
            update = p.grad
            if p.ndim > 1:
                update = update + weight_decay * p
                w_norm, u_norm = torch.linalg.norm(p), torch.linalg.norm(update)
                update = update * (eta * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            buffers[i] = update.clone() if buffers[i] is None else momentum * buffers[i] + update
            p -= lr * buffers[i]


def test_multi_tensor_steps_match_the_per_tensor_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 27, 2)
    )
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    with torch.no_grad():
        model[3].weight.zero_()  # a zero weight: trust ratio 1
        reference[4].zero_()
    optimizer = LARS(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)
    buffers = [None] * len(reference)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in reference]
        for p, q, g in zip(model.parameters(), reference, grads):
            p.grad, q.grad = g, g.clone()
        optimizer.step()
        reference_lars_step(reference, buffers, 0.3, 0.9, 1e-2, 0.02)
    for p, q in zip(model.parameters(), reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
