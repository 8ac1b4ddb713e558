"""Random vs BYOL vs PGL initialisation on labelled CT: the paper's claim as one rerunnable command.

    python -m pgl_bundle compare --labelled ../shared/data/sts --output_dir runs/compare --preset cpu \
        --unlabelled "['../shared/data/unlabeled','../shared/data/sts']"

Stages, each a ``python -m monai.bundle run`` of this bundle's own configs in a folder of its own, skipped
when its output already exists (so an interrupted comparison resumes where it stopped):

1. pretrain PGL and BYOL on the unlabelled volumes, once per pretraining length;
2. fine-tune every arm (random init, and each pretrained encoder at each fine-tuning learning rate) on the
   first ``n`` labelled training cases, for each budget ``n`` and seed, with the same number of iterations;
3. evaluate each fine-tuned model on the held-out test cases (the last ``num_test_cases`` of the datalist);
4. write ``results.csv`` (one row per arm, budget, seed and test case), ``results.md`` (mean and standard
   deviation of Dice per arm and budget) and ``results.png`` (Dice against budget).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from pgl_bundle.data import load_datalist

__all__ = ["PRESETS", "Arm", "compare"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "pgl": ["configs/pretrain.json"],
    "byol": ["configs/pretrain.json", "configs/pretrain_byol.json"],
    "train": ["configs/train.json"],
    "evaluate": ["configs/train.json", "configs/evaluate.json"],
}


@dataclass(frozen=True)
class Arm:
    """One way to initialise the segmentation encoder.

    Args:
        init: ``"random"``, ``"pgl"`` or ``"byol"``.
        pretrain_epochs: pretraining length (pretrained arms only).
        lr_scale: fine-tuning learning rate as a multiple of the preset's.
    """

    init: str
    pretrain_epochs: int = 0
    lr_scale: float = 1.0

    @property
    def name(self) -> str:
        if self.init == "random":
            return "random" if self.lr_scale == 1 else f"random lr x{self.lr_scale:g}"
        lr = "" if self.lr_scale == 1 else f" lr x{self.lr_scale:g}"
        return f"{self.init} {self.pretrain_epochs}ep{lr}"

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_").replace("x", "")


def _arms(pretrain_epochs: Sequence[int], lr_scales: Sequence[float]) -> list[Arm]:
    """Random init, plus PGL and BYOL at every pretraining length; the longest also at every other lr."""
    arms = [Arm("random")]
    for method in ("pgl", "byol"):
        arms += [Arm(method, e) for e in pretrain_epochs]
        arms += [Arm(method, max(pretrain_epochs), s) for s in lr_scales if s != 1]
    return arms


PRESETS: dict[str, dict] = {
    # end-to-end check of the machinery, seconds per stage (CI)
    "tiny": {
        "model": {"encoder_layers": [1, 1, 1, 1], "encoder_block": "basic", "encoder_width": [16, 16, 32, 32]},
        "pretrain": {"patch_size": [64, 64, 16], "hidden_channels": 64, "batch_size": 2, "num_volumes": 4},
        "finetune": {"patch_size": [64, 64, 16], "batch_size": 2, "num_samples": 1, "learning_rate": 0.01,
                     "decoder_channels": [32, 16, 16, 8, 8]},
        "pretrain_epochs": [1], "lr_scales": [1.0], "budgets": [2], "seeds": [0],
        "finetune_iterations": 2, "num_val_cases": 1, "num_test_cases": 2,
    },
    # the cpu preset: 2 h 53 min on 2 shared cores for the shared data (docs/results.md); budget 5 adds 7 stages
    "cpu": {
        "model": {"encoder_layers": [1, 1, 1, 1], "encoder_block": "bottleneck", "encoder_width": [32, 64, 128, 256]},
        "pretrain": {"patch_size": [64, 64, 16], "hidden_channels": 1024, "batch_size": 4, "learning_rate": 0.001},
        "finetune": {"patch_size": [64, 64, 32], "batch_size": 2, "num_samples": 2, "learning_rate": 0.01,
                     "decoder_channels": [128, 64, 32, 16, 16]},
        "pretrain_epochs": [2, 20], "lr_scales": [1.0, 0.1], "budgets": [2, 18], "seeds": [0],
        "finetune_iterations": 120, "num_val_cases": 2, "num_test_cases": 10,
    },
    # the paper's settings (method spec, section 6): for GPUs
    "paper": {
        "model": {"encoder_layers": [3, 4, 6, 3], "encoder_block": "bottleneck", "encoder_width": [64, 128, 256, 512]},
        "pretrain": {"patch_size": [96, 96, 16], "batch_size": 128, "learning_rate": 0.2, "warmup_epochs": 2,
                     "amp": True, "optimizer#_target_": "pgl_bundle.LARS"},
        "finetune": {"patch_size": [160, 160, 48], "batch_size": 8, "num_samples": 1, "learning_rate": 0.01,
                     "amp": True},
        "pretrain_epochs": [100, 500], "lr_scales": [1.0, 0.1], "budgets": [2, 5, 18], "seeds": [0, 1, 2],
        "finetune_iterations": 10000, "num_val_cases": 2, "num_test_cases": 10,
    },
}


def _run_bundle(configs: list[str], bundle_root: str, overrides: dict, run_id: str = "run") -> None:
    """``python -m monai.bundle run`` in a subprocess; its log is appended to ``bundle_root/log.txt``."""
    files = "[" + ",".join(repr(os.path.join(_ROOT, c)) for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, "--bundle_root", bundle_root,
           "--logging_file", os.path.join(_ROOT, "configs", "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    os.makedirs(bundle_root, exist_ok=True)
    with open(os.path.join(bundle_root, "log.txt"), "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        result = subprocess.run(cmd, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(os.path.join(bundle_root, "log.txt")) as log:
            tail = log.read()[-3000:]  # the failed run's output is the end of the log
        raise RuntimeError(f"stage in {bundle_root} failed ({' '.join(cmd)}):\n{tail}")


def _write_datalist(path: str, items: list[dict]) -> str:
    with open(path, "w") as f:
        json.dump({"training": items}, f, indent=1)
    return path


def _mean_dice_per_case(eval_dir: str) -> list[tuple[str, float]]:
    """Per test case, the mean foreground Dice from MONAI's ``MetricsSaver`` raw CSV."""
    with open(os.path.join(eval_dir, "val_mean_dice_raw.csv")) as f:
        rows = list(csv.reader(f))
    return [(row[0], float(row[-1])) for row in rows[1:]]


def compare(
    labelled: str,
    unlabelled: Sequence[str] = (),
    output_dir: str = "runs/compare",
    preset: str = "cpu",
    label_names: Sequence[str] = ("background", "tumour"),
    budgets: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    pretrain_epochs: Sequence[int] | None = None,
    lr_scales: Sequence[float] | None = None,
    num_workers: int = 0,
) -> str:
    """Run the comparison; return the path of ``results.md``. Preset values can be overridden by the arguments.

    Args:
        labelled: the labelled data (MSD-style dataset.json or its folder); its last ``num_test_cases`` cases
            are the test set, the ``num_val_cases`` before them pick the checkpoint, the rest is the training pool.
        unlabelled: sources of pretraining volumes (folders, dataset.json files, globs or single files);
            empty: the labelled data's images.
        output_dir: where every stage writes; rerunning skips finished stages.
        preset: ``tiny``, ``cpu`` or ``paper`` (see :data:`PRESETS`).
        label_names: class names of the labelled data, background first.
        budgets, seeds, pretrain_epochs, lr_scales: override the preset's.
        num_workers: data loader workers of every stage.
    """
    settings = PRESETS[preset]
    budgets, seeds = budgets or settings["budgets"], seeds or settings["seeds"]
    pretrain_epochs, lr_scales = pretrain_epochs or settings["pretrain_epochs"], lr_scales or settings["lr_scales"]
    output_dir, labelled = os.path.abspath(output_dir), os.path.abspath(labelled)
    os.makedirs(output_dir, exist_ok=True)
    labelled_items = load_datalist(labelled, keys=["image", "label"])
    pool = len(labelled_items) - settings["num_val_cases"] - settings["num_test_cases"]
    if max(budgets) > pool:
        raise ValueError(f"{labelled}: budget {max(budgets)} exceeds the {pool} training cases left after validation and test.")
    sources = [os.path.abspath(s) for s in unlabelled] or [labelled]
    images = []
    for source in sources:
        images += [{"image": source}] if os.path.isfile(source) and not source.endswith(".json") else load_datalist(source)
    unlabelled_json = _write_datalist(os.path.join(output_dir, "unlabelled.json"), images)
    common = {**settings["model"], "num_workers": num_workers}
    arms = _arms(pretrain_epochs, lr_scales)
    stages = [("pretrain", method, e) for method in ("pgl", "byol") for e in pretrain_epochs]
    stages += [("finetune", arm, (n, seed)) for n in budgets for seed in seeds for arm in arms]
    timings = {}
    for kind, what, param in tqdm(stages, desc="compare", unit="stage"):
        start = time.time()
        if kind == "pretrain":
            root = os.path.join(output_dir, "pretrain", f"{what}_{param}ep")
            if not os.path.isfile(os.path.join(root, "models", "pretrained_encoder.pt")):
                overrides = {**common, **settings["pretrain"], "dataset_dir": unlabelled_json, "max_epochs": param,
                             "resume_from": "latest"}  # an interrupted stage continues its run
                _run_bundle(CONFIGS[what], root, overrides, run_id="training")
        else:
            n, seed = param
            root = os.path.join(output_dir, "finetune", f"{what.slug}_n{n}_seed{seed}")
            if not os.path.isfile(os.path.join(root, "eval", "val_mean_dice_raw.csv")):
                overrides = {**common, **settings["finetune"], "dataset_dir": labelled, "num_train_cases": n,
                             "num_val_cases": settings["num_val_cases"], "num_test_cases": settings["num_test_cases"],
                             "label_names": list(label_names), "seed": seed,
                             "overwrite": True}  # an interrupted stage starts afresh (its old model moved aside)
                overrides["learning_rate"] = overrides["learning_rate"] * what.lr_scale
                overrides["max_epochs"] = max(1, round(settings["finetune_iterations"] / math.ceil(n / overrides["batch_size"])))
                overrides["val_interval"] = max(1, overrides["max_epochs"] // 5)
                if what.init != "random":
                    encoder = os.path.join(output_dir, "pretrain", f"{what.init}_{what.pretrain_epochs}ep", "models")
                    overrides["pretrained_encoder"] = os.path.join(encoder, "pretrained_encoder.pt")
                _run_bundle(CONFIGS["train"], root, overrides)
                _run_bundle(CONFIGS["evaluate"], root, overrides)
        timings[root] = time.time() - start
    with open(os.path.join(output_dir, "timings.json"), "a") as f:
        json.dump(timings, f)
        f.write("\n")
    return _report(output_dir, arms, budgets, seeds)


def _report(output_dir: str, arms: list[Arm], budgets: Sequence[int], seeds: Sequence[int]) -> str:
    """Write results.csv, results.md and results.png from the finished evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for arm in arms:
        for n in budgets:
            for seed in seeds:
                eval_dir = os.path.join(output_dir, "finetune", f"{arm.slug}_n{n}_seed{seed}", "eval")
                rows += [(arm.name, n, seed, case, dice) for case, dice in _mean_dice_per_case(eval_dir)]
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "budget", "seed", "case", "dice"])
        writer.writerows(rows)
    table = ["| arm | " + " | ".join(f"{n} cases" for n in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm in arms:
        means, cells = [], []
        for n in budgets:
            values = [r[4] for r in rows if r[0] == arm.name and r[1] == n]
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
            means.append(mean)
            cells.append(f"{mean:.3f} ± {sd:.3f}")
        table.append(f"| {arm.name} | " + " | ".join(cells) + " |")
        axis.plot(budgets, means, marker="o", label=arm.name, linestyle="-" if arm.lr_scale == 1 else "--")
    axis.set_xlabel("labelled training cases")
    axis.set_ylabel("mean Dice on held-out cases")
    axis.set_xticks(list(budgets))
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "results.png"), dpi=120)
    note = "Mean ± standard deviation over test cases (and seeds) of the per-case mean foreground Dice."
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(table) + "\n\n" + note + "\n")
    return os.path.join(output_dir, "results.md")
