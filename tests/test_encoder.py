"""Encoder: output stride, MONAI compatibility, and the feature-centre offset the aligner relies on."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ResNet
from pgl_bundle.networks import PGLResNetEncoder, feature_center_offset


def test_resnet50_shapes_and_stride():
    encoder = PGLResNetEncoder()  # ResNet-50: bottleneck blocks (3, 4, 6, 3)
    assert [len(stage) for stage in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)] == [3, 4, 6, 3]
    assert encoder.output_stride == (16, 16, 8)
    with torch.no_grad():
        features = encoder.eval()(torch.zeros(1, 1, 96, 96, 16))
    assert [f.shape[1] for f in features] == list(encoder.out_channels) == [64, 256, 512, 1024, 2048]
    assert features[-1].shape[2:] == (6, 6, 2)


def test_weights_load_into_monai_resnet():
    encoder = PGLResNetEncoder(layers=(1, 1, 1, 1))
    monai_resnet = ResNet(
        "bottleneck",
        [1, 1, 1, 1],
        [64, 128, 256, 512],
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=(7, 7, 3),
        conv1_t_stride=(2, 2, 1),
        no_max_pool=True,
        feed_forward=False,
    )
    monai_resnet.load_state_dict(encoder.state_dict(), strict=True)


def test_offset_formula():
    assert feature_center_offset([(2, 2, 1), (1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]) == (-7.5, -7.5, -3.5)
    assert feature_center_offset([(1,), (1,)]) == (0.0,)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_offset_matches_receptive_field_centre(block):
    """Output voxel k's receptive field is centred at ``(k + 0.5) * stride + offset`` in input coordinates.

    With positive weights and a positive input every ReLU passes, so the input gradient of one output voxel
    is nonzero exactly on its receptive field, whose centre we compare with the formula.
    """
    encoder = PGLResNetEncoder(layers=(1, 1, 1, 1), block=block, block_inplanes=(4, 4, 4, 4)).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.abs_()
    x = torch.ones(1, 1, 320, 320, 120, requires_grad=True)
    out = encoder(x)[-1]
    k = [n // 2 for n in out.shape[2:]]
    out[0, :, k[0], k[1], k[2]].sum().backward()
    support = x.grad[0, 0] != 0
    for axis, (stride, offset) in enumerate(zip(encoder.output_stride, encoder.feature_offset)):
        hit = support.any(dim=tuple(a for a in range(3) if a != axis)).nonzero().flatten()
        assert 0 < hit[0] and hit[-1] < x.shape[2 + axis] - 1, "receptive field clipped by the input: enlarge it"
        centre = (int(hit[0]) + int(hit[-1]) + 1) / 2  # continuous coordinate of the support's middle
        assert centre == pytest.approx((k[axis] + 0.5) * stride + offset)
