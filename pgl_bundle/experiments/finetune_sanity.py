"""Sanity bar of the fine-tuning recipe: the bundle's randomly initialised network against a plain MONAI UNet.

    python -m pgl_bundle finetune_sanity --labelled ../shared/data/sts --output_dir runs/sanity \
        --networks "['unet','bundle']" --windows "[[-200,300],[-1024,325]]" --iterations "[400]"

Both networks run through the same ``configs/train.json`` recipe (5 labelled cases, patch 96 x 96 x 32, batch 2
images x 2 label-balanced crops, AdamW 1e-3 with warm-up and cosine decay, Dice + CE, validation on
``num_val_cases`` cases every ``val_interval`` iterations keeping the best) and ``configs/evaluate.json`` (sliding
window on the original grid of the last 10 cases); only the network differs: the UNet is MONAI's 3D tutorial
network (benchmark_finetune.py). Prints one line per run and writes ``sanity.csv`` (network, window, iterations,
seed, case, Dice). Every run is resumable.
"""

from __future__ import annotations

import csv
import os
import re
import statistics
from collections.abc import Sequence

from pgl_bundle.experiments.runner import CONFIGS, dice_per_case, run_bundle

__all__ = ["finetune_sanity"]

UNET = {
    "network_def": {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
    # one parameter group and MONAI's warm-up + cosine schedule: the UNet has no encoder to transfer
    "optimizer#params": "$@network.parameters()",
    "lr_scheduler": {
        "_target_": "monai.optimizers.WarmupCosineSchedule",
        "optimizer": "@optimizer",
        "warmup_steps": "@warmup_iterations",
        "t_total": "@num_iterations",
    },
    "train#handlers#1": {"_target_": "pgl_bundle.finetuning.TransferHandler", "_disabled_": True},
}
SMALL_ENCODER = {"encoder_layers": [1, 1, 1, 1], "encoder_block": "bottleneck", "encoder_width": [32, 64, 128, 256]}


def validation_curve(root: str) -> list[float]:
    """Mean validation Dice after each validation, from the run's log (MONAI's StatsHandler lines)."""
    with open(os.path.join(root, "log.txt")) as f:
        return [float(v) for v in re.findall(r"Metrics -- .*?val_mean_dice: ([0-9.]+)", f.read())]


def finetune_sanity(
    labelled: str,
    output_dir: str = "runs/sanity",
    networks: Sequence[str] = ("unet", "bundle"),
    windows: Sequence[Sequence[float]] = ((-200, 300),),
    iterations: Sequence[int] = (400,),
    seeds: Sequence[int] = (0,),
    num_train_cases: int = 5,
    num_val_cases: int = 5,
    val_interval: int = 100,
    num_workers: int = 1,
    num_threads: int = 1,
    test: bool = True,
) -> None:
    """Run every network x window x iterations x seed; ``test=False`` skips the test set (validation Dice only)."""
    labelled, output_dir = os.path.abspath(labelled), os.path.abspath(output_dir)
    rows = []
    for n_iter in iterations:
        for window in windows:
            for network in networks:
                for seed in seeds:
                    root = os.path.join(output_dir, f"{network}_w{window[0]}_{window[1]}_it{n_iter}_seed{seed}")
                    overrides = {
                        **(UNET if network == "unet" else SMALL_ENCODER),
                        "dataset_dir": labelled,
                        "label_names": ["background", "tumour"],
                        "num_train_cases": num_train_cases,
                        "num_val_cases": num_val_cases,
                        "num_test_cases": 10,
                        "hu_window": list(window),
                        "seed": seed,
                        "num_iterations": n_iter,
                        "val_interval": val_interval,
                        "num_workers": num_workers,
                        "num_threads": num_threads,
                    }
                    if not os.path.isfile(os.path.join(root, "models", "model.pt")):
                        run_bundle(CONFIGS["train"], root, overrides)
                    print(
                        f"{network} window {list(window)} seed {seed}: validation Dice every {val_interval} it "
                        f"{validation_curve(root)}",
                        flush=True,
                    )
                    if not test:
                        continue
                    if not os.path.isfile(os.path.join(root, "eval", "val_mean_dice_raw.csv")):
                        run_bundle(CONFIGS["evaluate"], root, overrides)
                    cases = dice_per_case(os.path.join(root, "eval"))
                    rows += [(network, f"{window[0]},{window[1]}", n_iter, seed, c, d) for c, d in cases]
                    dice = [d for _, d in cases]
                    print(
                        f"{network} window {list(window)} {n_iter} it seed {seed}: mean test Dice "
                        f"{statistics.mean(dice):.3f} (sd {statistics.stdev(dice):.3f}, {len(dice)} cases)",
                        flush=True,
                    )
    with open(os.path.join(output_dir, "sanity.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("network", "window", "iterations", "seed", "case", "dice"), *rows])
