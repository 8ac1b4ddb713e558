"""The dense probe during pretraining: is the online encoder learning features that say which voxel is which?

Every ``interval`` iterations, :class:`ValidationProbe` runs the online encoder, frozen (eval mode, under
``torch.no_grad()``: its weights and BatchNorm statistics are untouched), on fixed label-balanced crops of a few
labelled cases, trains a fresh :class:`~pgl_bundle.networks.DenseProbeHead` (the head of ``configs/probe.json``'s dense
probe) on the features of the training cases' crops, and scores it on the validation cases' crops: Dice per case over
its crops' voxels, mean over the foreground classes (``monai.metrics.compute_dice``), then over cases. The encoder's
features of the training crops are computed once per probe and the head trains on them, so a probe costs one encoder
forward per crop, not one per head iteration. The crops are drawn once, with their own seed: every probe of a run sees
the same voxels.

The record, one row per probe (iteration, validation Dice, the collapse signal of that iteration's online projections:
:func:`~pgl_bundle.collapse.collapse_signal`), goes to TensorBoard (``probe/val_dice``, ``probe/seconds``) and to a CSV;
the encoder of the best validation Dice is kept as its own file with its plan. The record and the best encoder's weights
are part of the training checkpoint (:meth:`ValidationProbe.state_dict`), so a run killed and resumed writes the same
CSV and best encoder as an uninterrupted one.

Hand-written: MONAI's ``ValidationHandler`` runs an evaluator on the trained network; here a second, small model is
trained on the frozen one's features, with the training random state left untouched (``torch.random.fork_rng``). Only
rank 0 probes (``configs/pretrain.json``: ``probe#enabled``); the others wait for it at the next gradient all-reduce
(docs/README.md, "Probe during pretraining").
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import time
from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.handlers.tensorboard_handlers import TensorBoardHandler
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from pgl_bundle.collapse import collapse_signal
from pgl_bundle.networks.probe import DenseProbeHead
from pgl_bundle.provenance import encoder_plan
from pgl_bundle.transfer import write_plan

__all__ = ["CSV_COLUMNS", "ValidationProbe", "plot_probe"]

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("iteration", "val_dice", "channel_std", "pair_cosine")


class ValidationProbe(TensorBoardHandler):
    """Every ``interval`` iterations, the dense probe of the online encoder on labelled crops (module docstring).

    Args:
        encoder: the online :class:`~pgl_bundle.networks.PGLResNetEncoder`.
        online: the online branch (encoder and projector), whose output's collapse signal is recorded.
        train_data, val_data: datasets whose items are lists of crops ``{"image": (1, x, y, z), "label": (1, x, y,
            z)}`` (``RandCropByLabelClassesd`` output), one item per case.
        num_classes: classes of the labels, background included.
        interval: iterations between probes.
        iterations: Adam steps of each probe's head (full batch of the training crops), the learning rate decayed
            to 0 on a cosine, as ``configs/probe.json``'s.
        learning_rate: the head's initial learning rate.
        seed: seed of the head's initialisation (the same head at every probe) and of the collapse signal's pairs.
        csv_path: the record's CSV (columns :data:`CSV_COLUMNS`), rewritten at every probe.
        best_weights: where the best encoder's ``state_dict`` goes (its plan beside it, :func:`~pgl_bundle.
            provenance.encoder_plan` with ``val_dice``).
        plan, record: the encoder's adaptation plan and :func:`~pgl_bundle.provenance.pretraining_record`.
        summary_writer: the run's TensorBoard writer.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        online: torch.nn.Module,
        train_data: Sequence[list[Mapping]],
        val_data: Sequence[list[Mapping]],
        num_classes: int,
        interval: int,
        csv_path: str,
        best_weights: str,
        plan: Mapping,
        record: Mapping,
        iterations: int = 50,
        learning_rate: float = 0.01,
        seed: int = 0,
        summary_writer=None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"ValidationProbe: interval must be a positive number of iterations, got {interval}.")
        super().__init__(summary_writer=summary_writer)
        self.encoder, self.online = encoder, online
        self.train_data, self.val_data, self.num_classes = train_data, val_data, num_classes
        self.interval, self.iterations, self.learning_rate, self.seed = interval, iterations, learning_rate, seed
        self.csv_path, self.best_weights, self.plan, self.record = csv_path, best_weights, plan, record
        self.rows: list[dict] = []
        self.best: dict = {}  # {"iteration", "val_dice", "encoder": state_dict on the CPU} once a probe ran
        self.crops: dict[str, list[list[tuple[torch.Tensor, torch.Tensor]]]] | None = None
        self.projections: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        self.online.register_forward_hook(self._keep)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def _keep(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.projections = output.detach()

    def _load_crops(self) -> None:
        """Read every case once and keep its crops (the volumes are dropped): per case, ``(image, label)`` pairs."""
        started = time.perf_counter()
        self.crops = {
            name: [[(crop["image"], crop["label"]) for crop in data[i]] for i in range(len(data))]
            for name, data in (("train", self.train_data), ("val", self.val_data))
        }
        counts = {name: sum(map(len, cases)) for name, cases in self.crops.items()}
        logger.info(
            f"probe: read {counts['train']} training crops of {len(self.train_data)} cases and {counts['val']} "
            f"validation crops of {len(self.val_data)} cases in {time.perf_counter() - started:.1f} s; a probe "
            f"every {self.interval} iterations."
        )

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's feature maps of ``images`` ``(N, 1, x, y, z)``, one crop at a time (memory)."""
        device = next(self.encoder.parameters()).device
        maps = [self.encoder(image[None].to(device)) for image in images]
        return [torch.cat(level) for level in zip(*maps)]

    def probe(self) -> float:
        """Train a fresh head on the training crops' features; return the validation Dice (mean over cases)."""
        if self.crops is None:
            self._load_crops()
        training = self.encoder.training
        self.encoder.eval()
        devices = [self.projections.device] if self.projections is not None and self.projections.is_cuda else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(self.seed)
                head = DenseProbeHead(self.encoder, self.num_classes)
                images, labels = (torch.stack(t) for t in zip(*sum(self.crops["train"], [])))
                features = self._features(images)
                head = head.to(features[0].device)
                labels = labels.to(features[0].device)
                size = list(images.shape[2:])
                del images
                optimizer = torch.optim.Adam(head.parameters(), lr=self.learning_rate)
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.iterations)
                loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
                head.train()
                for _ in range(self.iterations):
                    with torch.enable_grad():
                        loss = loss_function(head(features, size), labels)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    optimizer.step()
                    schedule.step()
                del features
                head.eval()
                return self._score(head, size)
        finally:
            self.encoder.train(training)

    def _score(self, head: DenseProbeHead, size: list[int]) -> float:
        """Mean over validation cases of the Dice over each case's crops (foreground classes averaged).

        ``compute_dice``, not ``DiceMetric``: the metric's ``aggregate`` all-gathers across processes, which would wait
        forever for the ranks that do not probe.
        """
        dice = []
        for crops in self.crops["val"]:
            images, labels = (torch.stack(t) for t in zip(*crops))
            logits = head(self._features(images), size)
            prediction = one_hot(logits.argmax(1, keepdim=True), self.num_classes)
            truth = one_hot(labels.to(logits.device).long(), self.num_classes)
            # the crops side by side along x: one Dice over all the case's voxels
            case = compute_dice(torch.cat(list(prediction), 1)[None], torch.cat(list(truth), 1)[None], False)
            dice.append(case.nanmean())
        return torch.stack(dice).nanmean().item()

    def __call__(self, engine: Engine) -> None:
        iteration, started = engine.state.iteration, time.perf_counter()
        dice = self.probe()
        generator = torch.Generator().manual_seed(self.seed + iteration)
        std, cosine = (v.item() for v in collapse_signal(self.projections, generator=generator))
        seconds = time.perf_counter() - started
        self.rows.append({"iteration": iteration, "val_dice": dice, "channel_std": std, "pair_cosine": cosine})
        best = not self.best or dice > self.best["val_dice"]
        if best:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.encoder.state_dict().items()}
            self.best = {"iteration": iteration, "val_dice": dice, "encoder": state}
        self._write(best)
        logger.info(
            f"iteration {iteration}: probe: validation Dice {dice:.4f} (best {self.best['val_dice']:.4f} at iteration "
            f"{self.best['iteration']}), collapse signal: channel std {std:.4g}, random-pair cosine {cosine:.3f}; "
            f"{seconds:.1f} s"
        )
        self._writer.add_scalar("probe/val_dice", dice, iteration)
        self._writer.add_scalar("probe/seconds", seconds, iteration)
        self._writer.flush()

    def _write(self, best: bool) -> None:
        """The CSV of every row; with ``best``, the best encoder and its plan (each written atomically)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.csv_path)), exist_ok=True)
        with open(self.csv_path + ".partial", "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.csv_path + ".partial", self.csv_path)
        if best:
            torch.save(self.best["encoder"], self.best_weights + ".partial")
            os.replace(self.best_weights + ".partial", self.best_weights)
            dice = self.best["val_dice"]
            write_plan(self.best_weights, encoder_plan(self.plan, self.record, self.best["iteration"], val_dice=dice))

    def checkpoint_bytes(self) -> int:
        """What the best encoder adds to a training checkpoint (:func:`~pgl_bundle.handlers.checkpoint_bytes`)."""
        return sum(t.numel() * t.element_size() for t in self.encoder.state_dict().values())

    def state_dict(self) -> dict:
        """Saved in each training checkpoint: the rows so far and the best encoder (iteration, Dice, weights)."""
        return {"rows": copy.deepcopy(self.rows), "best": dict(self.best)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the record of a resumed run and write its files as they were at the checkpoint."""
        self.rows, self.best = copy.deepcopy(list(state["rows"])), dict(state["best"])
        if self.rows:
            self._write(best=bool(self.best))


def plot_probe(run: str, output: str = "") -> str:
    """Draw probe Dice and collapse signal against iteration from a run's probe record; return the PNG's path.

    Args:
        run: the run's ``bundle_root`` (its ``models/probe.csv``) or the CSV itself.
        output: the PNG; default ``probe.png`` beside the CSV.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run if run.endswith(".csv") else os.path.join(run, "models", "probe.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    iterations = [int(r["iteration"]) for r in rows]
    figure, (dice_axis, std_axis) = plt.subplots(2, 1, sharex=True, figsize=(6, 5))
    dice_axis.plot(iterations, [float(r["val_dice"]) for r in rows], marker="o")
    best = max(rows, key=lambda r: float(r["val_dice"]))
    dice_axis.axvline(
        int(best["iteration"]), color="grey", linestyle="--", label=f"best, iteration {best['iteration']}"
    )
    dice_axis.set_ylabel("probe Dice (validation)")
    dice_axis.legend()
    std_axis.plot(iterations, [float(r["channel_std"]) for r in rows], marker="o", color="tab:orange")
    std_axis.set_ylabel("collapse signal: channel std")
    std_axis.set_xlabel("pretraining iteration")
    for axis in (dice_axis, std_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    output = output or os.path.join(os.path.dirname(path), "probe.png")
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output
