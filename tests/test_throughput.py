"""Throughput logging, and a training step that reads no tensor value on the host between logging iterations."""

from __future__ import annotations

import logging
import sys

import ignite.handlers.timing
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from pgl_bundle import NoLossScalingForBF16, ThroughputHandler
from pgl_bundle.data import make_synthetic_dataset


class FakeClock:
    """Stands in for ``perf_counter`` in ignite's timers: time moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingWriter:
    def __init__(self) -> None:
        self.scalars = []

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass


def test_logs_pairs_per_second_and_data_wait(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(ignite.handlers.timing, "perf_counter", clock)

    def batches():  # each batch takes 3 s to arrive
        while True:
            clock.now += 3.0
            yield None

    engine = Engine(lambda engine, batch: setattr(clock, "now", clock.now + 1.0))  # each step takes 1 s
    writer = RecordingWriter()
    ThroughputHandler(batch_size=4, interval=5, summary_writer=writer).attach(engine)
    with caplog.at_level(logging.INFO, logger="pgl_bundle.throughput"):
        engine.run(batches(), max_epochs=1, epoch_length=10)
    # each window: 5 iterations x 4 pairs in 5 x (3 + 1) s, 15 s of them waiting for data
    expected = [
        (tag, value, step)
        for step in (5, 10)
        for tag, value in (("throughput/pairs_per_second", 1.0), ("throughput/data_wait_fraction", 0.75))
    ]
    assert [tag for tag, _, _ in writer.scalars] == [tag for tag, _, _ in expected]
    assert [step for _, _, step in writer.scalars] == [step for _, _, step in expected]
    assert [value for _, value, _ in writer.scalars] == pytest.approx([value for _, value, _ in expected])
    assert "iteration 10: 1 view pairs/s (all processes), 75.0 % of the time waiting for data" in caplog.text


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def test_training_reads_tensors_on_the_host_only_when_logging(repo_root, tmp_path, monkeypatch):
    """On a GPU, reading a tensor's value on the host waits for the device to finish. The run's own code (not
    PyTorch's optimizers, which keep their step counts on the host when not fused) may do it only every
    ``log_interval`` iterations, to log the loss. Fails with MONAI's default ``decollate=True`` (which turns the
    loss into a Python float every iteration) or a loss logged every iteration."""
    data = make_synthetic_dataset(str(tmp_path / "data"), 2, shape=(48, 48, 24))
    parser = ConfigParser()
    parser.read_config(str(repo_root / "configs" / "pretrain.json"))
    parser.update(
        {
            "encoder_layers": [1, 1, 1, 1],
            "encoder_width": [8, 8, 8, 8],
            "encoder_block": "basic",
            "patch_size": [32, 32, 16],
            "hidden_channels": 16,
            "embedding_channels": 8,
            "num_workers": 0,
            "batch_size": 1,
            "max_epochs": 3,
            "log_interval": 3,
            "bundle_root": str(tmp_path / "run"),
            "dataset_dir": data,
            "device": "$torch.device('cpu')",
        }
    )
    trainer = parser.get_parsed_content("train#trainer")
    reads, current = [], {"iteration": 0}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: current.update(iteration=e.state.iteration))
    # data loading (in this process with num_workers 0) is host work on host tensors: not counted
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda e: current.update(iteration=0))

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not caller.startswith("torch."):
                reads.append((current["iteration"], caller))
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    parser.get_parsed_content("training")
    assert trainer.state.iteration == 6
    assert {iteration for iteration, _ in reads if iteration} == {3, 6}, reads


@pytest.mark.parametrize("dtype, scaling", [(torch.bfloat16, False), (torch.float16, True)])
def test_bf16_runs_without_a_loss_scaler(dtype, scaling):
    """MONAI's trainer makes an enabled GradScaler for any AMP dtype; its step reads an overflow flag on the host."""

    class Trainer(Engine):
        amp_kwargs = {"dtype": dtype}
        scaler = torch.amp.GradScaler("cpu")  # what MONAI's run() sets before STARTED (a CUDA one on GPUs)

    trainer = Trainer(lambda engine, batch: None)
    NoLossScalingForBF16().attach(trainer)
    trainer.run([0], max_epochs=1)
    assert trainer.scaler.is_enabled() is scaling
