"""PGLSegmentationNet: shapes under the anisotropic strides, the encoder's names, gradients, TorchScript tracing."""

from __future__ import annotations

import pytest
import torch
from pgl_bundle.networks import PGLResNetEncoder, PGLSegmentationNet

SMALL_ENCODER = {"layers": (1, 1, 1, 1), "block": "basic", "block_inplanes": (8, 16, 32, 64)}
SMALL_DECODER = (32, 16, 8, 8, 8)


def small_net(out_channels: int = 3) -> PGLSegmentationNet:
    return PGLSegmentationNet(PGLResNetEncoder(**SMALL_ENCODER), out_channels, decoder_channels=SMALL_DECODER)


@pytest.mark.parametrize("size", [(32, 32, 8), (64, 48, 16), (16, 32, 24)])
def test_output_has_the_input_grid_and_one_channel_per_class(size):
    torch.manual_seed(0)
    net = small_net(out_channels=4).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *size))
    assert out.shape == (2, 4, *size)
    assert torch.isfinite(out).all()


def test_decoder_undoes_each_encoder_stride_deepest_first():
    net = small_net()
    scales = [tuple(stage.upsample.deconv.stride) for stage in net.decoder]
    assert scales == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1), (2, 2, 1)]
    assert net.encoder.output_stride == (16, 16, 8)


def test_encoder_names_are_the_pretraining_encoders():
    """The downstream encoder is the pretraining module itself: same class, same state_dict names and shapes."""
    pretraining = PGLResNetEncoder(layers=(1, 1, 1, 1))
    net = PGLSegmentationNet(PGLResNetEncoder(layers=(1, 1, 1, 1)), 2)
    assert type(net.encoder) is PGLResNetEncoder
    ours, theirs = net.encoder.state_dict(), pretraining.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    # and under the network, the encoder's tensors sit behind exactly one prefix
    assert {k for k in net.state_dict() if k.startswith("encoder.")} == {f"encoder.{k}" for k in theirs}


def test_default_decoder_is_light_for_resnet50():
    """Skips are projected (1x1x1) to the decoder's width and added; the full-resolution stage has no 3x3x3 block."""
    net = PGLSegmentationNet(PGLResNetEncoder(layers=(1, 1, 1, 1)), 2)
    stages = [(s.upsample.deconv.in_channels, s.skip.conv.in_channels, s.skip.conv.out_channels) for s in net.decoder]
    # in: 2048 from the last stage; skips: the 1024, 512, 256 stages, the 64-channel stem, the 1-channel image
    assert stages == [(2048, 1024, 64), (64, 512, 32), (32, 256, 16), (16, 64, 16), (16, 1, 16)]
    convs = [sum(isinstance(m, torch.nn.Conv3d) for m in s.block.modules()) for s in net.decoder]
    assert convs == [2, 2, 2, 2, 0]
    full = PGLSegmentationNet(PGLResNetEncoder(layers=(1, 1, 1, 1)), 2, full_resolution_block=True)
    assert sum(isinstance(m, torch.nn.Conv3d) for m in full.decoder[-1].block.modules()) == 2


def test_wrong_number_of_decoder_channels_is_refused():
    with pytest.raises(ValueError, match="decoder_channels needs 5 entries"):
        PGLSegmentationNet(PGLResNetEncoder(**SMALL_ENCODER), 2, decoder_channels=(32, 16, 8))


@pytest.mark.parametrize("linear_head", [True, False])
def test_gradients_reach_every_part(linear_head):
    """With the linear head the decoder's output starts at zero: at the first step only the output convolution of the
    decoder gets a gradient; after one step, all of it does."""
    torch.manual_seed(0)
    net = PGLSegmentationNet(PGLResNetEncoder(**SMALL_ENCODER), 3, SMALL_DECODER, linear_head=linear_head)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        net(torch.rand(2, 1, 32, 32, 8)).square().mean().backward()
        optimizer.step()
    parts = {"encoder": net.encoder, "decoder": net.decoder, "head": net.head, "linear head": net.linear_head}
    for name, module in parts.items():
        if module is None:
            assert not linear_head and name == "linear head"
            continue
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def test_traced_network_runs_other_sizes():
    """TorchScript by tracing (what ckpt_export --use_trace does) stays valid for other window sizes."""
    torch.manual_seed(0)
    net = small_net().eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.rand(1, 1, 32, 32, 8))
        other = torch.rand(2, 1, 48, 32, 16)
        torch.testing.assert_close(traced(other), net(other))
