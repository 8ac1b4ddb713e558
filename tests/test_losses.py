"""Local consistency loss on known inputs."""

from __future__ import annotations

import pytest
import torch
from pgl_bundle.losses import ConsistencyLoss, consistency


def test_known_values():
    p = torch.zeros(1, 2, 3, 3, 1)
    p[:, 0] = 1.0
    assert consistency(p, 5 * p) == pytest.approx(0.0)  # same direction, any length
    assert consistency(p, -p) == pytest.approx(4.0)
    orthogonal = torch.zeros_like(p)
    orthogonal[:, 1] = 2.0
    assert consistency(p, orthogonal) == pytest.approx(2.0)


def test_mean_over_voxels_of_two_minus_two_cos():
    torch.manual_seed(0)
    p, z = torch.randn(2, 8, 4, 4, 2), torch.randn(2, 8, 4, 4, 2)
    cos = torch.nn.functional.cosine_similarity(p, z, dim=1)
    assert consistency(p, z) == pytest.approx(float((2 - 2 * cos).mean()), abs=1e-6)


def test_symmetrised_pairs_view1_with_view2():
    torch.manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(2, 4, 2, 2, 2) for _ in range(4))
    loss = ConsistencyLoss()((torch.cat([p1, p2]), torch.cat([z2, z1])))
    assert loss == pytest.approx(float(consistency(p1, z2) + consistency(p2, z1)), abs=1e-6)


def test_works_on_pooled_vectors_for_byol():
    v = torch.randn(4, 16)
    assert ConsistencyLoss()((v, v)) == pytest.approx(0.0, abs=1e-6)


def test_target_side_is_detached():
    p = torch.randn(2, 4, 2, 2, 2, requires_grad=True)
    z = torch.randn(2, 4, 2, 2, 2, requires_grad=True)
    consistency(p, z).backward()
    assert p.grad is not None and z.grad is None
