"""Sanity bar of the fine-tuning recipe: the bundle's randomly initialised network against a plain MONAI UNet.

    python scripts/finetune_sanity.py --labelled ../shared/data/sts --output_dir runs/sanity \
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

import fire
from pgl_bundle.compare import CONFIGS, _mean_dice_per_case, _run_bundle

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
    "optimizer#params": "$@network.parameters()",  # one group: the UNet has no encoder
    "train#handlers#1#_disabled_": True,  # FreezeEncoder (no encoder)
}
SMALL_ENCODER = {"encoder_layers": [1, 1, 1, 1], "encoder_block": "bottleneck", "encoder_width": [32, 64, 128, 256]}


def validation_curve(root: str) -> list[float]:
    """Mean validation Dice after each validation, from the run's log (MONAI's StatsHandler lines)."""
    with open(os.path.join(root, "log.txt")) as f:
        return [float(v) for v in re.findall(r"Metrics -- .*?val_mean_dice: ([0-9.]+)", f.read())]


def main(
    labelled: str,
    output_dir: str = "runs/sanity",
    networks=("unet", "bundle"),
    windows=((-200, 300),),
    iterations=(400,),
    seeds=(0,),
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
                        _run_bundle(CONFIGS["train"], root, overrides)
                    print(
                        f"{network} window {list(window)} seed {seed}: validation Dice every {val_interval} it "
                        f"{validation_curve(root)}",
                        flush=True,
                    )
                    if not test:
                        continue
                    if not os.path.isfile(os.path.join(root, "eval", "val_mean_dice_raw.csv")):
                        _run_bundle(CONFIGS["evaluate"], root, overrides)
                    cases = _mean_dice_per_case(os.path.join(root, "eval"))
                    rows += [(network, f"{window[0]},{window[1]}", n_iter, seed, c, d) for c, d in cases]
                    dice = [d for _, d in cases]
                    print(
                        f"{network} window {list(window)} {n_iter} it seed {seed}: mean test Dice "
                        f"{statistics.mean(dice):.3f} (sd {statistics.stdev(dice):.3f}, {len(dice)} cases)",
                        flush=True,
                    )
    with open(os.path.join(output_dir, "sanity.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("network", "window", "iterations", "seed", "case", "dice"), *rows])


if __name__ == "__main__":
    fire.Fire(main)
