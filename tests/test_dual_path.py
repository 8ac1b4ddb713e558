"""Dual-path module: shapes, pairing, and that the target path gets no gradient."""

from __future__ import annotations

import copy

import torch
from pgl_bundle.losses import ConsistencyLoss, consistency
from pgl_bundle.networks import (
    Branch,
    ConvProjectionHead,
    DualPathNetwork,
    MLPProjectionHead,
    PGLResNetEncoder,
    PriorGuidedAligner,
)


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


def test_loss_of_the_network_matches_each_view_to_the_other_views_target():
    """ConsistencyLoss of the network's own output is L(p1, z2) + L(p2, z1), with p and z computed here path by path,
    and not L(p1, z1) + L(p2, z2) (targets in the wrong order: each view pulled to its own target, no cross-view
    signal), which the pairing tests above cannot tell apart. With the target path a copy of the online one and an
    identity predictor, p_i = z_i: the wrong order gives exactly 0, the right one the views' disagreement."""
    torch.manual_seed(0)
    encoder = PGLResNetEncoder(layers=(1, 1, 1, 1), block="basic", block_inplanes=(8, 8, 16, 16))
    online = Branch(encoder, ConvProjectionHead(16, 32, 8))
    aligner = PriorGuidedAligner(encoder.output_stride, encoder.feature_offset)
    net = DualPathNetwork(online, copy.deepcopy(online), torch.nn.Identity(), aligner).eval()  # eval: per-sample BN
    v1, v2 = torch.rand(2, 1, 64, 64, 16), torch.rand(2, 1, 64, 64, 16)
    g1, g2 = geometry(2), geometry(2)
    g2[:, 3, 0] = 1.0  # view 2 flipped along x
    with torch.no_grad():
        loss = ConsistencyLoss()(net(v1, v2, g1, g2))
        p1, p2 = net.aligner(net.online(v1), net.online(v2), g1, g2)
        z1, z2 = net.aligner(net.target(v1), net.target(v2), g1, g2)
    cross = consistency(p1, z2) + consistency(p2, z1)
    own = consistency(p1, z1) + consistency(p2, z2)
    assert float(own) < 1e-6 and float(cross) > 0.01, (float(own), float(cross))
    torch.testing.assert_close(loss, cross, rtol=1e-4, atol=1e-7)
