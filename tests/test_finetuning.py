"""The transfer's phases (linear probe, decoder first, everything): what each phase trains and leaves bit-unchanged,
the learning-rate factors per parameter group, and the linear-probe phase being exactly the dense probe."""

from __future__ import annotations

import math

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.optimizers import WarmupCosineSchedule
from pgl_bundle.finetuning import TransferHandler, TransferSchedule, encoder_stage, param_groups
from pgl_bundle.networks import DenseProbe, PGLResNetEncoder, PGLSegmentationNet

ENCODER = {"layers": (1, 1, 1, 1), "block": "basic", "block_inplanes": (8, 8, 16, 16)}
DECODER = (16, 8, 8, 8, 8)


def small_net(seed: int = 0, **kwargs) -> PGLSegmentationNet:
    torch.manual_seed(seed)
    return PGLSegmentationNet(PGLResNetEncoder(**ENCODER), 2, decoder_channels=DECODER, **kwargs)


def fine_tune(net: PGLSegmentationNet, iterations: int, tmp_path=None, total: int = 10, **schedule) -> None:
    """The first ``iterations`` of a ``total``-iteration fine-tuning: MONAI's SupervisedTrainer with train.json's
    optimizer, scheduler and transfer handler."""
    torch.manual_seed(1)
    batches = [
        {"image": torch.rand(2, 1, 32, 32, 8), "label": (torch.rand(2, 1, 32, 32, 8) > 0.7).float()}
        for _ in range(iterations)
    ]
    optimizer = torch.optim.AdamW(param_groups(net, encoder_lr_scale=0.5), lr=1e-2, weight_decay=1e-2)
    batchnorm = schedule.pop("encoder_batchnorm", "train")
    transfer = TransferSchedule(total, warmup_iterations=1, **schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, transfer.lr_lambdas(optimizer))
    handler = TransferHandler(net, transfer, batchnorm, str(tmp_path / "lp.pt") if tmp_path else "")
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=net,
        optimizer=optimizer,
        loss_function=lambda y, t: torch.nn.functional.binary_cross_entropy_with_logits(y[:, 1:], t),
        train_handlers=[LrScheduleHandler(scheduler, epoch_level=False, print_lr=False), handler],
    )
    trainer.run()


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (batch-norm running statistics and counters)."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_frozen_encoder_is_bit_unchanged_weights_and_batchnorm_statistics():
    """Decoder first: 3 iterations with the encoder frozen leave every encoder tensor as it was."""
    net = small_net()
    encoder, decoder = states(net.encoder), states(net.decoder)
    fine_tune(net, 3, freeze_encoder_iterations=3, encoder_warmup_iterations=2)
    assert changed(encoder, net.encoder) == set()
    assert any(k.endswith("weight") for k in changed(decoder, net.decoder))


def test_encoder_trains_after_its_frozen_phase():
    net = small_net()
    encoder = states(net.encoder)
    fine_tune(net, 5, freeze_encoder_iterations=3)
    moved = changed(encoder, net.encoder)
    assert {k for k in moved if k.endswith("running_mean")} and {k for k in moved if k.endswith("conv1.weight")}


def test_frozen_batchnorm_keeps_the_statistics_while_the_weights_train():
    net = small_net()
    encoder = states(net.encoder)
    fine_tune(net, 3, encoder_batchnorm="frozen")
    moved = changed(encoder, net.encoder)
    assert not {k for k in moved if "running" in k or "num_batches" in k}
    assert "conv1.weight" in moved and "bn1.weight" in moved  # the affine parameters still learn


def test_linear_probe_phase_trains_the_linear_head_only_and_saves_it(tmp_path):
    net = small_net()
    before = states(net)
    fine_tune(net, 4, tmp_path, linear_probe_iterations=2, freeze_encoder_iterations=1)
    saved = torch.load(tmp_path / "lp.pt", weights_only=True)
    moved = {k for k, v in saved.items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("linear_head.") for k in moved)  # encoder and decoder frozen in phase 1
    assert not torch.equal(
        net.state_dict()["decoder.0.upsample.deconv.weight"], saved["decoder.0.upsample.deconv.weight"]
    )


def test_network_at_the_start_is_the_dense_probe_with_the_same_weights():
    """The decoder's output convolution starts at zero: the network computes exactly the probe's logits."""
    net = small_net().eval()
    assert not net.head.conv.conv.weight.any() and not net.head.conv.conv.bias.any()
    probe = DenseProbe(PGLResNetEncoder(**ENCODER), 2).eval()
    probe.encoder.load_state_dict(net.encoder.state_dict())
    probe.head.load_state_dict(net.linear_head.state_dict())
    x = torch.rand(2, 1, 32, 48, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), probe(x), rtol=0, atol=0)


def test_without_the_linear_head_the_decoder_output_is_not_zeroed():
    net = small_net(linear_head=False)
    assert net.linear_head is None and net.head.conv.conv.weight.abs().sum() > 0


def test_factors_per_phase_and_group():
    net = small_net()
    transfer = TransferSchedule(
        20, warmup_iterations=2, linear_probe_iterations=4, linear_probe_lr_ratio=10.0,
        freeze_encoder_iterations=3, encoder_warmup_iterations=4,
    )  # fmt: skip
    groups = param_groups(net, encoder_lr_scale=0.5)
    lambdas = transfer.lr_lambdas(torch.optim.SGD(groups, lr=1.0))
    factors = {g["name"]: [f(s) for s in range(20)] for g, f in zip(groups, lambdas)}
    assert factors["linear_head"][:4] == [10.0 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert factors["decoder"][:4] == [0.0] * 4 and factors["decoder"][4:7] == [0.0, 0.5, 1.0]
    assert factors["linear_head"][4:] == factors["decoder"][4:]
    assert factors["encoder4"][:7] == [0.0] * 7
    assert factors["encoder4"][7:12] == pytest.approx(
        [0.5 * factors["decoder"][s] * (s - 7) / 4 for s in range(7, 11)] + [0.5 * factors["decoder"][11]]
    )
    assert factors["encoder4"] == factors["encoder0"]  # no layer decay


def test_without_phases_every_group_follows_monais_warmup_cosine():
    net = small_net()
    groups = param_groups(net, encoder_lr_scale=0.1, layer_lr_decay=0.5)
    optimizer = torch.optim.SGD(groups, lr=1.0)
    lambdas = TransferSchedule(30, warmup_iterations=5).lr_lambdas(optimizer)
    monai = WarmupCosineSchedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=5, t_total=30)
    for g, f in zip(groups, lambdas):
        assert [f(s) for s in range(30)] == pytest.approx([g["lr_scale"] * monai.lr_lambda(s) for s in range(30)])


def test_parameter_groups_cover_the_network_once_with_layer_decay():
    net = small_net()
    groups = param_groups(net, encoder_lr_scale=0.3, layer_lr_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    scales = {g["name"]: g["lr_scale"] for g in groups}
    assert scales == {
        "linear_head": 1.0,
        "decoder": 1.0,
        **{f"encoder{k}": pytest.approx(0.3 * 0.5 ** (4 - k)) for k in range(5)},
    }
    assert encoder_stage("layer3.0.conv1.weight") == 3 and encoder_stage("bn1.bias") == 0


def test_impossible_schedules_are_refused():
    with pytest.raises(ValueError, match="leave none of the 10 iterations"):
        TransferSchedule(10, linear_probe_iterations=6, freeze_encoder_iterations=4)
    with pytest.raises(ValueError, match="encoder_batchnorm must be 'train' or 'frozen'"):
        TransferHandler(small_net(), TransferSchedule(10), encoder_batchnorm="eval")
    with pytest.raises(ValueError, match="needs the network's linear head"):
        TransferHandler(small_net(linear_head=False), TransferSchedule(10, linear_probe_iterations=2))
