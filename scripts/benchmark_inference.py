"""Sliding-window choices of configs/inference.json: time per CT and Dice, old and new side by side.

    python scripts/benchmark_inference.py time --image ../shared/data/sts/STS_001/CT_image.nii.gz
    python scripts/benchmark_inference.py dice --bundle_root runs/small --cases "['STS_021','STS_022','STS_023']" \\
        --overrides "{'pixdim': [4.0, 4.0, 3.27], 'patch_size': [48, 48, 16], ...}"

``time``: the inference network (ResNet-50 by default; the time depends on the architecture, not on the weights)
on one preprocessed CT. For each choice it counts the windows and times the sliding window's own work (window
extraction, Gaussian weighting, aggregation) with a stand-in network, times ``repeats`` batches of the real
network, and adds them up: seconds per CT = overhead + windows / sw_batch_size * seconds per batch.

``dice``: a trained ``models/model.pt`` run end to end (inference.json's preprocessing, the inferer, argmax) on
labelled cases, per choice: mean foreground Dice on the network's grid and measured seconds per case.

Choices are window sizes as multiples of ``patch_size`` and overlaps; the first is the old default (the training
patch, overlap 0.5). Each prints figures and the ratio to the first.
"""

from __future__ import annotations

import time

import fire
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from monai.metrics import DiceMetric
from monai.transforms import Compose, LoadImaged, Orientationd, Spacingd

# (window as a multiple of patch_size per axis, overlap, sw_batch_size); the first is the old default
CHOICES = (
    ((1, 1, 1), 0.5, 4),
    ((1, 1, 1), 0.5, 1),
    ((1, 1, 1), 0.25, 1),
    ((1, 1, 1), 0.0, 1),
    ((1, 1, 2), 0.25, 1),
    ((1, 1, 2), 0.0, 1),
    ((1, 1, 2), 0.0, 4),
    ((1, 1, 3), 0.0, 1),
    ((1, 1, 4), 0.0, 1),
    ((7 / 6, 7 / 6, 2), 0.0, 1),
    ((4 / 3, 4 / 3, 2), 0.0, 1),
    ((13 / 6, 13 / 6, 2), 0.0, 1),
)


def _parser(overrides: dict | None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config("configs/inference.json")
    parser.update({"num_workers": 0, **(overrides or {})})
    return parser


def _inferer(patch: list[int], scale, overlap: float, sw_batch_size: int) -> SlidingWindowInferer:
    roi = [round(p * s) for p, s in zip(patch, scale)]
    return SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")


def time_choices(image: str, overrides: dict | None = None, repeats: int = 1, threads: int = 1) -> None:
    """Seconds per CT of each choice for the config's network (default ResNet-50), on ``threads`` threads."""
    torch.set_num_threads(threads)
    parser = _parser({"label_names": ["background", "tumour"], **(overrides or {})})
    network = parser.get_parsed_content("network_def").eval()
    patch = parser.get_parsed_content("patch_size")
    x = parser.get_parsed_content("preprocessing")({"image": image})["image"][None].as_tensor()
    classes = parser.get_parsed_content("num_classes")
    print(f"image {image}: preprocessed {tuple(x.shape[2:])}; patch {patch}; {threads} thread(s)")
    print("window | overlap | sw_batch | windows | s/batch | overhead s | s per CT | speed-up")
    base, seconds_per_batch = None, {}
    for scale, overlap, sw_batch in CHOICES:
        inferer = _inferer(patch, scale, overlap, sw_batch)
        calls = []

        def stand_in(batch: torch.Tensor, calls=calls) -> torch.Tensor:
            calls.append(batch.shape[0])
            return torch.zeros(batch.shape[0], classes, *batch.shape[2:])

        start = time.perf_counter()
        inferer(x, stand_in)
        overhead = time.perf_counter() - start
        windows, roi = sum(calls), tuple(inferer.roi_size)
        if (roi, sw_batch) not in seconds_per_batch:  # one timing per window size and batch: minutes on a CPU
            batch = torch.rand(sw_batch, 1, *roi)
            with torch.no_grad():
                start = time.perf_counter()
                for _ in range(repeats):
                    network(batch)
            seconds_per_batch[roi, sw_batch] = (time.perf_counter() - start) / repeats
        per_batch = seconds_per_batch[roi, sw_batch]
        total = overhead + -(-windows // sw_batch) * per_batch
        base = base or total
        print(
            f"{'x'.join(map(str, roi))} | {overlap} | {sw_batch} | {windows} | {per_batch:.2f} | {overhead:.2f} | "
            f"{total:.1f} | {base / total:.2f}x"
        )


def dice_choices(
    bundle_root: str,
    cases: list[str],
    overrides: dict | None = None,
    data: str = "../shared/data/sts",
    choices=None,
    windows=None,
) -> None:
    """Mean foreground Dice and seconds per case of each choice for the trained ``bundle_root/models/model.pt``
    (its network and preprocessing from the plan beside it, ``models/model.json``).

    ``choices``: indices into :data:`CHOICES` to run (default all); the first given is the reference.
    ``windows``: instead, explicit ``[[roi_size, overlap], ...]`` (``sw_batch_size`` 4); the first is the reference.
    """
    torch.set_num_threads(1)
    parser = _parser({"bundle_root": bundle_root, "label_names": ["background", "tumour"], **(overrides or {})})
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(f"{bundle_root}/models/model.pt", map_location="cpu", weights_only=True))
    patch = parser.get_parsed_content("patch_size")
    load = parser.get_parsed_content("preprocessing")
    pixdim = parser.get_parsed_content("plan")["pixdim"]
    items = []
    for case in cases:
        image = load({"image": f"{data}/{case}/CT_image.nii.gz"})["image"][None]
        label = _label(f"{data}/{case}/CT_mask.nii.gz", pixdim)
        items.append((image.as_tensor(), label))
    print(f"cases {cases}; shapes {[tuple(i.shape[2:]) for i, _ in items]}; patch {patch}; 1 thread")
    print("window | overlap | sw_batch | mean Dice | per case | s per case | speed-up | Dice - old")
    base = None
    if windows:
        inferers = [(SlidingWindowInferer(roi, 4, overlap, mode="gaussian"), overlap, 4) for roi, overlap in windows]
    else:
        selected = [CHOICES[i] for i in choices] if choices else CHOICES
        inferers = [
            (_inferer(patch, scale, overlap, sw_batch), overlap, sw_batch) for scale, overlap, sw_batch in selected
        ]
    for inferer, overlap, sw_batch in inferers:
        if any(r % s for r, s in zip(inferer.roi_size, network.encoder.output_stride)):
            print(f"{'x'.join(map(str, inferer.roi_size))} | {overlap} | {sw_batch} | not a multiple of the stride")
            continue
        metric, scores = DiceMetric(include_background=False), []
        start = time.perf_counter()
        for image, label in items:
            with torch.no_grad():
                pred = inferer(image, network).argmax(1, keepdim=True)
            scores.append(float(metric(_onehot(pred), _onehot(label)).mean()))
        seconds = (time.perf_counter() - start) / len(items)
        mean = sum(scores) / len(scores)
        base = base or (seconds, mean)
        per_case = " ".join(f"{s:.3f}" for s in scores)
        print(
            f"{'x'.join(map(str, inferer.roi_size))} | {overlap} | {sw_batch} | {mean:.4f} | {per_case} | "
            f"{seconds:.1f} | {base[0] / seconds:.2f}x | {mean - base[1]:+.4f}"
        )


def _label(path: str, pixdim: list[float] | None) -> torch.Tensor:
    """The label on the image's grid: the image preprocessing's load, orientation and spacing (nearest)."""
    steps = [LoadImaged("label", image_only=True, ensure_channel_first=True), Orientationd("label", "RAS")]
    if pixdim is not None:
        steps.append(Spacingd("label", pixdim, mode="nearest"))
    return Compose(steps)({"label": path})["label"][None].as_tensor()


def _onehot(label: torch.Tensor) -> torch.Tensor:
    return torch.cat([label == 0, label == 1], dim=1).float()


if __name__ == "__main__":
    fire.Fire({"time": time_choices, "dice": dice_choices})
