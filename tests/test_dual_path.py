"""Dual-path module: shapes, pairing, and that the target path gets no gradient."""

from __future__ import annotations

import copy

import torch

from pgl_bundle.losses import ConsistencyLoss
from pgl_bundle.networks import Branch, ConvProjectionHead, DualPathNetwork, MLPProjectionHead, PGLResNetEncoder
from pgl_bundle.networks import PriorGuidedAligner


def small_network(pgl: bool = True) -> DualPathNetwork:
    encoder = PGLResNetEncoder(layers=(1, 1, 1, 1), block="basic", block_inplanes=(8, 8, 16, 16))
    head = ConvProjectionHead if pgl else MLPProjectionHead
    online = Branch(encoder, head(16, 32, 8))
    aligner = PriorGuidedAligner(encoder.output_stride, encoder.feature_offset) if pgl else None
    return DualPathNetwork(online, copy.deepcopy(online), head(8, 32, 8), aligner)


def geometry(batch: int) -> torch.Tensor:
    g = torch.zeros(batch, 4, 3)
    g[:, 1] = torch.tensor([80.0, 80.0, 20.0])
    g[:, 2] = torch.tensor([64 / 80, 64 / 80, 16 / 20])
    return g


def test_pgl_output_shapes_and_no_target_gradient():
    net = small_network()
    views = torch.rand(2, 1, 64, 64, 16), torch.rand(2, 1, 64, 64, 16)
    predictions, targets = net(*views, geometry(2), geometry(2))
    assert predictions.shape == targets.shape == (4, 8, 4, 4, 2)
    assert not targets.requires_grad
    ConsistencyLoss()((predictions, targets)).backward()
    assert all(p.grad is None and not p.requires_grad for p in net.target.parameters())
    assert all(p.grad is not None for p in net.online.parameters())
    assert all(p.grad is not None for p in net.predictor.parameters())


def test_byol_variant_pools():
    net = small_network(pgl=False)
    predictions, targets = net(torch.rand(2, 1, 64, 64, 16), torch.rand(2, 1, 64, 64, 16))
    assert predictions.shape == targets.shape == (4, 8)


def test_targets_are_paired_across_views():
    """Row i of the targets is the OTHER view's target: swapping the views swaps the halves."""
    net = small_network().eval()
    v1, v2 = torch.rand(2, 1, 64, 64, 16), torch.rand(2, 1, 64, 64, 16)
    g = geometry(2)
    _, targets = net(v1, v2, g, g)
    _, swapped = net(v2, v1, g, g)
    z2, z1 = targets.chunk(2)
    torch.testing.assert_close(swapped, torch.cat([z1, z2]))
