"""Mixed precision and memory options: AMP follows the device, and the encoder's options change no result."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from pgl_bundle.networks import PGLResNetEncoder

SMALL = {"layers": (1, 1, 1, 1), "block_inplanes": (8, 8, 8, 8)}


def train_step(encoder: PGLResNetEncoder, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    features = encoder.train()(x)
    (features[-1].square().mean() + features[2].mean()).backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    return features[-1].detach(), grads, {n: t.clone() for n, t in encoder.state_dict().items()}


@pytest.fixture()
def reference():
    torch.manual_seed(0)
    encoder = PGLResNetEncoder(**SMALL)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    return state, train_step(encoder, x := torch.rand(2, 1, 32, 32, 16)), x


def test_activation_checkpointing_gives_the_same_step(reference):
    state, (out, grads, after), x = reference
    encoder = PGLResNetEncoder(**SMALL, activation_checkpointing=True)
    encoder.load_state_dict(state)
    out2, grads2, after2 = train_step(encoder, x)
    assert torch.equal(out, out2)
    assert all(torch.equal(grads[k], grads2[k]) for k in grads)
    # BN statistics are updated once per step, not again by the recomputation
    assert all(torch.equal(after[k], after2[k]) for k in after)
    assert int(after2["bn1.num_batches_tracked"]) == 1


def test_channels_last_keeps_names_and_results(reference):
    state, _, x = reference
    encoder = PGLResNetEncoder(**SMALL, channels_last=True)
    encoder.load_state_dict(state)
    assert encoder.state_dict().keys() == state.keys()
    assert encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert encoder.double().conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    # other kernels sum in another order; in float64 that rounding is far below any real difference
    plain = PGLResNetEncoder(**SMALL).double()
    plain.load_state_dict(state)
    out, grads, _ = train_step(plain, x.double())
    out2, grads2, _ = train_step(encoder, x.double())
    torch.testing.assert_close(out2, out, rtol=1e-9, atol=1e-9)
    for name, grad in grads.items():
        torch.testing.assert_close(grads2[name], grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("device, amp, expected", [("cpu", True, False), ("cuda", True, True), ("cuda", False, False)])
def test_amp_is_on_only_on_cuda(repo_root, device, amp, expected):
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "pretrain.json"))
    parser.update({"device": f"$torch.device('{device}')", "amp": amp, "amp_dtype": "float16"})
    assert parser.get_parsed_content("train#trainer#amp") is expected
    assert parser.get_parsed_content("train#trainer#amp_kwargs") == {"dtype": torch.float16}
