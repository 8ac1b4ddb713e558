"""How a pretrained encoder is fine-tuned: parameter groups, and the phases of the transfer.

The fine-tuning of ``configs/train.json`` runs up to three phases, in iterations:

1. linear probe (``linear_probe_iterations`` P): only the network's linear head (the dense probe's read-out,
   :class:`~pgl_bundle.networks.PGLSegmentationNet` ``.linear_head``) trains, at ``linear_probe_learning_rate``
   decayed on a cosine to 0; the encoder and the decoder are frozen, and the decoder's output starts at zero, so this
   phase is the dense probe (linear probe, then fine-tune: Kumar et al., 2022);
2. decoder first (``freeze_encoder_iterations`` K): the decoder and the linear head train; the encoder stays frozen
   (no gradient, batch-norm statistics unchanged);
3. everything: the encoder's learning rate warms up linearly over ``encoder_warmup_iterations``.

The decoder and the linear head follow a warm-up (``warmup_iterations``) and cosine schedule from the end of phase 1
to the last iteration, the encoder the same cosine scaled by ``encoder_lr_scale`` and, per stage, by
``layer_lr_decay ** (4 - stage)`` (stem 0, the four ResNet stages 1-4: shallower stages change less).
``encoder_batchnorm="frozen"`` keeps the encoder's batch-norm statistics at the pretrained ones for the whole run.
With P = K = 0 and no encoder warm-up this is MONAI's ``WarmupCosineSchedule`` for every group.

MONAI's schedules give every parameter group the same factor and its handlers cannot freeze part of a network on a
schedule, so the per-group factors and the freezing are written here; ``torch.optim.lr_scheduler.LambdaLR`` applies
the factors.

Around the run: :func:`check_split` stops a split that leaves no case to train or to validate on before any work
(ignite would skip an empty epoch and PyTorch's sampler fail on an empty dataset, neither naming the split), and
:func:`require_model` fails a run that ended without writing its model.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from .errors import BadInputError, NoOutputError

__all__ = [
    "TransferHandler",
    "TransferSchedule",
    "check_split",
    "encoder_stage",
    "param_groups",
    "require_model",
    "warmup_cosine",
]

logger = logging.getLogger(__name__)

STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")  # PGLResNetEncoder's parameter prefixes
DEEPEST = 4


def encoder_stage(name: str) -> int:
    """The stage of an encoder parameter: 0 for the stem (``conv1``, ``bn1``), ``k`` for ``layer<k>``."""
    prefix = name.split(".")[0]
    if prefix not in STAGES:
        raise ValueError(f"encoder parameter '{name}' belongs to no stage of {STAGES}.")
    return int(prefix[-1]) if prefix.startswith("layer") else 0


def param_groups(network: nn.Module, encoder_lr_scale: float = 1.0, layer_lr_decay: float = 1.0) -> list[dict]:
    """Parameter groups of a :class:`~pgl_bundle.networks.PGLSegmentationNet` for ``torch.optim`` optimizers.

    Each group has ``name`` (``"linear_head"``, ``"decoder"``: the decoder and its output block, ``"encoder<k>"``
    for stage ``k``) and ``lr_scale``, its learning rate relative to the optimizer's ``lr``: :class:`TransferSchedule`'s
    factors include it.
    """
    encoder = dict(network.encoder.named_parameters())
    head = dict(network.linear_head.named_parameters()) if network.linear_head is not None else {}
    groups = [{"name": "linear_head", "lr_scale": 1.0, "params": list(head.values())}] if head else []
    skip = {id(p) for p in encoder.values()} | {id(p) for p in head.values()}
    groups.append(
        {"name": "decoder", "lr_scale": 1.0, "params": [p for p in network.parameters() if id(p) not in skip]}
    )
    for stage in range(DEEPEST + 1):
        params = [p for n, p in encoder.items() if encoder_stage(n) == stage]
        scale = encoder_lr_scale * layer_lr_decay ** (DEEPEST - stage)
        groups.append({"name": f"encoder{stage}", "lr_scale": scale, "params": params})
    return groups


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """MONAI ``WarmupCosineSchedule``'s factor: linear from 0 over ``warmup`` steps, then a cosine to 0 at ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _scaled(factor: Callable[[int], float], scale: float) -> Callable[[int], float]:
    return lambda step: scale * factor(step)


class TransferSchedule:
    """The phases of the transfer (see the module docstring) as learning-rate factors per parameter group.

    ``lr_lambdas(optimizer)`` gives ``LambdaLR`` one factor function per group, each times the group's ``lr_scale``;
    :class:`TransferHandler` freezes what the factors leave at 0. Both read the iteration from the scheduler or the
    engine, so a resumed run continues in the right phase.

    Args:
        num_iterations: iterations of the whole run.
        warmup_iterations: warm-up of the decoder and linear head after the linear-probe phase.
        linear_probe_iterations: P, phase 1.
        linear_probe_lr_ratio: phase 1's learning rate over the decoder's.
        freeze_encoder_iterations: K, phase 2.
        encoder_warmup_iterations: the encoder's linear warm-up when it starts training.
    """

    def __init__(
        self,
        num_iterations: int,
        warmup_iterations: int = 0,
        linear_probe_iterations: int = 0,
        linear_probe_lr_ratio: float = 1.0,
        freeze_encoder_iterations: int = 0,
        encoder_warmup_iterations: int = 0,
    ) -> None:
        if linear_probe_iterations + freeze_encoder_iterations >= num_iterations:
            raise ValueError(
                f"linear_probe_iterations ({linear_probe_iterations}) + freeze_encoder_iterations "
                f"({freeze_encoder_iterations}) leave none of the {num_iterations} iterations to fine-tune the encoder."
            )
        self.total, self.warmup = num_iterations, warmup_iterations
        self.probe, self.probe_ratio = linear_probe_iterations, linear_probe_lr_ratio
        self.encoder_start = linear_probe_iterations + freeze_encoder_iterations
        self.encoder_warmup = encoder_warmup_iterations

    def decoder_factor(self, step: int) -> float:
        """The decoder's factor at ``step`` (iterations done): 0 during the linear probe, then warm-up and cosine."""
        if step < self.probe:
            return 0.0
        return warmup_cosine(step - self.probe, self.warmup, self.total - self.probe)

    def linear_head_factor(self, step: int) -> float:
        if step < self.probe:
            return self.probe_ratio * 0.5 * (1 + math.cos(math.pi * step / self.probe))
        return self.decoder_factor(step)

    def encoder_factor(self, step: int) -> float:
        if step < self.encoder_start:
            return 0.0
        return self.decoder_factor(step) * min(1.0, (step - self.encoder_start) / max(1, self.encoder_warmup))

    def lr_lambdas(self, optimizer) -> list[Callable[[int], float]]:
        """One ``LambdaLR`` factor per parameter group of ``optimizer`` (built from :func:`param_groups`)."""
        by_name = {"linear_head": self.linear_head_factor, "decoder": self.decoder_factor}
        return [_scaled(by_name.get(g["name"], self.encoder_factor), g["lr_scale"]) for g in optimizer.param_groups]


class TransferHandler:
    """Ignite handler: at every iteration, train only what the :class:`TransferSchedule`'s phase trains.

    Frozen parts get ``requires_grad = False`` (no gradient; the optimizer skips them); while the encoder is frozen,
    and throughout with ``encoder_batchnorm="frozen"``, its batch-norm layers stay in eval mode (running statistics
    unchanged). At the end of phase 1 the network is saved to ``linear_probe_file``.

    Args:
        network: the :class:`~pgl_bundle.networks.PGLSegmentationNet` (not a DDP wrapper).
        schedule: the phases.
        encoder_batchnorm: ``"train"`` or ``"frozen"``.
        linear_probe_file: where to save the network's ``state_dict`` at the end of phase 1 (the linear probe, for
            evaluating it like the fine-tuned model); "" (and on ranks other than 0): not saved.
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: TransferSchedule,
        encoder_batchnorm: str = "train",
        linear_probe_file: str = "",
    ) -> None:
        if encoder_batchnorm not in ("train", "frozen"):
            raise ValueError(f"encoder_batchnorm must be 'train' or 'frozen', got {encoder_batchnorm!r}.")
        if schedule.probe and network.linear_head is None:
            raise ValueError("linear_probe_iterations > 0 needs the network's linear head (linear_head=True).")
        self.network, self.schedule = network, schedule
        self.encoder_batchnorm = encoder_batchnorm
        self.linear_probe_file = linear_probe_file

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        if self.schedule.probe and self.linear_probe_file:
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.schedule.probe), self.save_linear_probe)

    def save_linear_probe(self) -> None:
        """Write the network as it is at the end of phase 1 (the linear probe), atomically."""
        partial = f"{self.linear_probe_file}.partial"
        torch.save(self.network.state_dict(), partial)
        os.replace(partial, self.linear_probe_file)
        logger.info(f"linear probe phase done: saved {self.linear_probe_file}.")

    def __call__(self, engine: Engine) -> None:
        step = engine.state.iteration - 1  # iterations done before this one
        net = self.network
        decoder_on, encoder_on = step >= self.schedule.probe, step >= self.schedule.encoder_start
        if encoder_on != any(p.requires_grad for p in net.encoder.parameters()):
            logger.info(f"iteration {step + 1}: encoder {'trainable' if encoder_on else 'frozen'}.")
        net.requires_grad_(decoder_on)
        net.encoder.requires_grad_(encoder_on)
        if net.linear_head is not None:
            net.linear_head.requires_grad_(True)
        net.freeze_encoder_batchnorm = not encoder_on or self.encoder_batchnorm == "frozen"
        net.train(net.training)


def check_split(train: Sequence, val: Sequence, num_val_cases: int, num_test_cases: int) -> None:
    """Stop before training when the split leaves no training case, or no validation case (validation picks the
    model that is saved: without it none is).

    Args:
        train, val: the cases of each part (``train#dataset#data``, ``validate#dataset#data``).
        num_val_cases, num_test_cases: the options that made the split, for the message.

    Raises:
        BadInputError: one line: the counts and the option that changes them.
    """
    options = f"--num_val_cases {num_val_cases}, --num_test_cases {num_test_cases}"
    if not train:
        raise BadInputError(
            f"the split leaves no case for training ({len(val)} for validation; {options}): lower those, or add cases."
        )
    if not val:
        raise BadInputError(
            f"the split leaves no case for validation ({len(train)} for training; {options}), and validation picks "
            "the model that is saved (models/model.pt): set --num_val_cases 1 or more."
        )


def require_model(path: str) -> None:
    """After training: :class:`~pgl_bundle.errors.NoOutputError` when ``path`` (the best model, saved at validation)
    does not exist, so that such a run does not end with exit code 0."""
    if not os.path.isfile(path):
        raise NoOutputError(
            f"{path}: fine-tuning ended without writing its model (saved at validation, by validate#handlers' "
            "CheckpointSaver when the validation Dice improves): no validation ran, or its saver is disabled."
        )
