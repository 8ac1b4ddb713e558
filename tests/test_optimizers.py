"""LARS: the layer-wise trust ratio and that it optimises."""

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
