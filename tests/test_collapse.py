"""The collapse signal: about 1/sqrt(C) for spread embeddings, 0 and a warning for a collapsed network; and the
pretraining run trains the same with its monitoring (collapse signal, pictures) on or off."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.utils import CommonKeys
from pgl_bundle import CollapseSignalHandler, collapse_signal
from pgl_bundle.data import make_synthetic_dataset
from pgl_bundle.networks import Branch, ConvProjectionHead, PGLResNetEncoder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import TINY_PRETRAIN


class RecordingWriter:
    def __init__(self) -> None:
        self.scalars = {}

    def add_scalar(self, tag, value, step) -> None:
        self.scalars[tag] = value

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("channels", [64, 256])
def test_spread_embeddings_give_one_over_sqrt_channels(channels):
    embeddings = torch.randn((4, channels, 6, 6, 2), generator=torch.Generator().manual_seed(0)) * 5 + 0.1
    std, cosine = collapse_signal(embeddings, generator=torch.Generator().manual_seed(1))
    assert std.item() == pytest.approx(1 / math.sqrt(channels), rel=0.03)
    assert abs(cosine.item()) < 0.02


def test_pairs_come_from_their_own_generator():
    state = torch.get_rng_state()
    first = collapse_signal(torch.randn(4, 8, 3, 3, 2), generator=torch.Generator().manual_seed(3))
    torch.set_rng_state(state)
    second = collapse_signal(torch.randn(4, 8, 3, 3, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.stack(first), torch.stack(second))


@pytest.mark.parametrize("collapsed", [True, False])
def test_a_collapsed_network_gives_zero_and_a_warning(collapsed, caplog):
    torch.manual_seed(0)
    encoder = PGLResNetEncoder(layers=(1, 1, 1, 1), block="basic", block_inplanes=(8, 8, 8, 8))
    branch = Branch(encoder, ConvProjectionHead(8, 32, 64))
    if collapsed:  # every voxel's projection is the last layer's bias: one vector for all
        last = branch.projector[1].conv
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.ones_(last.bias)
    engine = Engine(lambda engine, batch: branch(batch))
    writer = RecordingWriter()
    CollapseSignalHandler(branch, interval=2, summary_writer=writer).attach(engine)
    with caplog.at_level(logging.INFO, logger="pgl_bundle.collapse"):
        engine.run([torch.rand(2, 1, 32, 32, 16)] * 2, max_epochs=1)
    std, cosine = writer.scalars["collapse/channel_std"], writer.scalars["collapse/pair_cosine"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "collapsing" in r.getMessage()]
    if collapsed:
        assert std < 1e-4 and cosine > 0.999 and len(warned) == 1
    else:
        assert std > 0.5 / math.sqrt(64) and cosine < 0.9 and not warned
    assert "iteration 2: collapse signal: channel std" in caplog.text


# the dense probe during pretraining, every 2 iterations, on one case of the phantoms' labels and scored on the other
PROBE = {
    "probe_every_n_iterations": 2,
    "probe_num_train_cases": 1,
    "probe_num_val_cases": 1,
    "probe_crops_per_case": 1,
    "probe_iterations": 3,
}


def _train(root, dataset, folder, monitoring: bool):
    """A tiny pretraining run; its losses, final network weights and the global random states after it."""
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "pretrain.json"))
    parser.update(
        {
            **TINY_PRETRAIN,
            "encoder_block": "basic",
            "num_workers": 0,
            "batch_size": 1,
            "max_epochs": 2,
            "bundle_root": str(folder / ("on" if monitoring else "off")),
            "dataset_dir": dataset,
            "device": "$torch.device('cpu')",
            "view_images_every_n_iterations": 2 if monitoring else 0,
            **({"probe_dataset": dataset, **PROBE} if monitoring else {}),
        }
    )
    if not monitoring:
        handlers = parser.get("train#handlers")
        parser["train#handlers"] = [h for h in handlers if not h["_target_"].endswith("CollapseSignalHandler")]
    parser.get_parsed_content("initialize")  # seeds everything, as monai.bundle run does first
    trainer = parser.get_parsed_content("train#trainer")
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[CommonKeys.LOSS]))
    parser.get_parsed_content("training")
    weights = {k: v.clone() for k, v in parser.get_parsed_content("network").state_dict().items()}
    return torch.stack(losses), weights, (torch.get_rng_state(), np.random.get_state()[1].copy())


def test_monitoring_leaves_training_unchanged(repo_root, tmp_path):
    """Collapse signal, TensorBoard pictures and the probe on, against all off: the same losses, weights and random
    state."""
    dataset = make_synthetic_dataset(str(tmp_path / "data"), 2, shape=(48, 48, 24))
    losses_on, weights_on, random_on = _train(repo_root, dataset, tmp_path, monitoring=True)
    losses_off, weights_off, random_off = _train(repo_root, dataset, tmp_path, monitoring=False)
    assert len(losses_on) == 4
    assert torch.equal(losses_on, losses_off)
    assert weights_on.keys() == weights_off.keys()
    assert all(torch.equal(weights_on[k], weights_off[k]) for k in weights_on)
    assert torch.equal(random_on[0], random_off[0]) and np.array_equal(random_on[1], random_off[1])
    (events,) = (tmp_path / "on" / "eval" / "pretrain").rglob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload().Tags()
    assert "views" in logged["images"] and "collapse/channel_std" in logged["scalars"]
    assert "probe/val_dice" in logged["scalars"]
