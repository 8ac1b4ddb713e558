"""Target network EMA: closed-form update through ignite's EMAHandler and its multi-tensor version, and BYOL's
momentum schedule."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.handlers import EMAHandler
from monai.engines import SupervisedTrainer
from pgl_bundle import ConsistencyLoss, ForeachEMAHandler, PrepareViews, TargetMomentumSchedule, byol_momentum
from pgl_bundle.networks import DualPathNetwork
from test_dual_path import geometry, small_network


def test_byol_schedule_values():
    assert byol_momentum(0, 100) == pytest.approx(0.996)
    assert byol_momentum(100, 100) == pytest.approx(1.0)
    assert byol_momentum(50, 100) == pytest.approx(0.998)
    assert byol_momentum(25, 100) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert byol_momentum(10, 100, base=0.99, final=0.99) == pytest.approx(0.99)


@pytest.mark.parametrize("handler", [EMAHandler, ForeachEMAHandler])
def test_ema_update_equals_closed_form(handler):
    torch.manual_seed(0)
    template = small_network()
    ema = handler(template.online, momentum=0.5, handle_buffers="ema_train")
    net = DualPathNetwork(template.online, ema.ema_model, template.predictor, template.aligner)
    with torch.no_grad():  # make target and online differ before the step
        for p in net.target.parameters():
            p.add_(torch.randn_like(p))
    batch = [
        {
            "view1": torch.rand(2, 1, 64, 64, 16),
            "view2": torch.rand(2, 1, 64, 64, 16),
            "view1_geometry": geometry(2),
            "view2_geometry": geometry(2),
        }
    ]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batch,
        network=net,
        optimizer=torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5),
        loss_function=ConsistencyLoss(),
        prepare_batch=PrepareViews(),
        train_handlers=[TargetMomentumSchedule(ema, 0.9, 0.9)],
    )
    target_before = [p.detach().clone() for p in net.target.parameters()]
    trainer.run()
    assert trainer.state.ema_momentum == pytest.approx(0.1)  # ignite's weight = 1 - tau
    for before, online, target in zip(target_before, net.online.parameters(), net.target.parameters()):
        torch.testing.assert_close(target, 0.9 * before + 0.1 * online.detach())
    assert any(not torch.equal(b, t) for b, t in zip(target_before, net.target.parameters()))


def test_schedule_reads_the_iteration_so_resume_continues_it():
    class State:
        iteration, max_epochs, epoch_length = 51, 10, 10

    class Engine:
        state = State()

    TargetMomentumSchedule(EMAHandler(torch.nn.Linear(1, 1)))(Engine)
    assert Engine.state.ema_momentum == pytest.approx(1 - byol_momentum(50, 100))


@pytest.mark.parametrize("handle_buffers", ["copy", "update", "ema_train"])
def test_foreach_ema_treats_buffers_as_ignite_does(handle_buffers):
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    online(torch.randn(8, 3))  # running statistics and num_batches_tracked move away from the copy's
    handlers = [cls(online, momentum=0.5, handle_buffers=handle_buffers) for cls in (EMAHandler, ForeachEMAHandler)]
    online[1](torch.randn(8, 4))
    with torch.no_grad():
        online[0].weight.add_(1.0)

    class Engine:
        class state:  # noqa: N801 -- stands in for ignite's engine.state
            ema_momentum = 0.25

    for handler in handlers:
        handler._update_ema_model(Engine, "ema_momentum")
    reference, foreach = (dict(h.ema_model.state_dict(keep_vars=True)) for h in handlers)
    for name, value in reference.items():
        torch.testing.assert_close(foreach[name], value, msg=name)
