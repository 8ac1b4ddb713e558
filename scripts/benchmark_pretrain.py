"""Benchmarks of the pretraining hot path: view generation, and one step split by component.

    python scripts/benchmark_pretrain.py views --image ../shared/data/unlabeled/CRLM-CT-1004_ct.nii.gz
    python scripts/benchmark_pretrain.py step --method pgl --layers "[3,4,6,3]" --patch "[96,96,16]" --batch 2
    python scripts/benchmark_pretrain.py step --method byol --layers "[3,4,6,3]" --patch "[96,96,16]" --batch 2

Prints figures and ratios (numbers go to docs/benchmarks.md); asserts nothing.
"""

from __future__ import annotations

import resource
import time

import fire
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import (
    Compose,
    CopyItemsd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandSpatialCropd,
    Resized,
)

from pgl_bundle import RandPGLIntensityd, RandPGLViewsd


def _preprocessed(image: str):
    parser = ConfigParser()
    parser.read_config("configs/pretrain.json")
    return Compose(parser.get_parsed_content("train#deterministic_transforms"))({"image": image})["image"]


def _stock_chain(roi: list[int]) -> Compose:
    """Stock MONAI dictionary transforms doing the same work per view (no overlap constraint: they cannot)."""
    low, high = [round(1.1 * r) for r in roi], [round(1.4 * r) for r in roi]
    per_view = []
    for key in ("view1", "view2"):  # separate instances: a MONAI dict transform draws once for all its keys
        per_view += [
            RandSpatialCropd(key, roi_size=low, max_roi_size=high, random_size=True),
            Resized(key, spatial_size=roi, mode="trilinear"),
            *(RandFlipd(key, prob=0.5, spatial_axis=axis) for axis in range(3)),
            RandGaussianNoised(key, prob=0.1, std=0.1**0.5),
            RandGaussianSmoothd(key, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
            RandScaleIntensityd(key, factors=0.25, prob=0.5),
            RandAdjustContrastd(key, gamma=(0.7, 1.5), prob=0.5),
        ]
    return Compose([CopyItemsd("image", times=2, names=["view1", "view2"]), *per_view])


def _rate(transform, image, seconds: float) -> float:
    transform.set_random_state(0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        transform({"image": image})
        count += 1
    return count / (time.perf_counter() - start)


def views(image: str = "../shared/data/unlabeled/CRLM-CT-1004_ct.nii.gz", patch=(96, 96, 16), seconds: float = 10):
    """View pairs per second on one core: PGL's transforms against the stock MONAI chain, same input."""
    torch.set_num_threads(1)
    volume = _preprocessed(image)
    roi = list(patch)
    pgl = Compose([RandPGLViewsd("image", roi_size=roi), RandPGLIntensityd(["view1", "view2"])])
    stock = _stock_chain(roi)
    pgl_rate, stock_rate = _rate(pgl, volume, seconds), _rate(stock, volume, seconds)
    print(f"input {image}: preprocessed shape {tuple(volume.shape)}, patch {roi}, 1 thread")
    print(f"pgl views:   {pgl_rate:8.1f} pairs/s")
    print(f"stock chain: {stock_rate:8.1f} pairs/s")
    print(f"ratio:       {pgl_rate / stock_rate:8.1f}x")


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _network(method: str, layers, width, block: str, hidden: int, device: torch.device):
    """The dual-path network, loss and optimizer exactly as configs/pretrain.json (+ pretrain_byol.json) build them."""
    parser = ConfigParser()
    parser.read_config(["configs/pretrain.json"] + (["configs/pretrain_byol.json"] if method == "byol" else []))
    parser.update({"encoder_layers": list(layers), "encoder_width": list(width), "encoder_block": block,
                   "hidden_channels": hidden, "device": f"$torch.device('{device.type}')"})
    return parser.get_parsed_content("network"), parser.get_parsed_content("loss"), parser.get_parsed_content("optimizer")


def step(method: str = "pgl", layers=(3, 4, 6, 3), width=(64, 128, 256, 512), block: str = "bottleneck",
         patch=(96, 96, 16), batch: int = 2, hidden: int = 4096, repeats: int = 3, threads=None):
    """One pretraining step (``method`` "pgl" or "byol") split into encoder passes and everything else; peak memory."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, loss_fn, optimizer = _network(method, layers, width, block, hidden, device)
    views = [torch.rand(batch, 1, *patch, device=device) for _ in range(2)]
    geometry = torch.zeros(batch, 4, 3, device=device)
    geometry[:, 1] = torch.tensor([1.25 * p for p in patch])
    geometry[:, 2] = 0.8
    geometry[:, 3, 0] = 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ema_update():  # what ignite's EMAHandler does after each iteration
        with torch.no_grad():
            for t, o in zip(net.target.parameters(), net.online.parameters()):
                t.mul_(0.996).add_(o, alpha=0.004)

    def full_step():
        optimizer.zero_grad()
        loss_fn(net(*views, geometry, geometry)).backward()
        optimizer.step()
        ema_update()
        sync()

    both = torch.cat(views)
    features = net.online.encoder(both)[-1].detach()

    def encoder_passes():
        out = net.online.encoder(both)[-1]
        out.backward(torch.randn_like(out))
        with torch.no_grad():
            net.target.encoder(both)
        sync()

    projections = net.online.projector(features).detach()
    aligned = projections.chunk(2)
    if net.aligner is not None:
        aligned = [p.detach() for p in net.aligner(*aligned, geometry, geometry)]

    def head_passes():
        online = net.online.projector(features.requires_grad_())
        predicted = net.predictor(online)
        (online.sum() + predicted.sum()).backward()
        with torch.no_grad():
            net.target.projector(features)
        sync()

    def aligner_passes():
        maps = [p.clone().requires_grad_() for p in projections.chunk(2)]
        a1, a2 = net.aligner(*maps, geometry, geometry)
        (a1.sum() + a2.sum()).backward()
        with torch.no_grad():
            net.aligner(*projections.chunk(2), geometry, geometry)
        sync()

    def loss_pass():
        p = torch.cat(aligned).requires_grad_()
        loss_fn((p, torch.cat(aligned))).backward()
        sync()

    def optimizer_and_ema():
        optimizer.step()
        ema_update()
        sync()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = _timed(full_step, repeats)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parts = {"encoder passes": _timed(encoder_passes, repeats), "heads": _timed(head_passes, repeats)}
    if net.aligner is not None:
        parts["aligner"] = _timed(aligner_passes, repeats)
    parts["loss"] = _timed(loss_pass, repeats)
    parts["optimizer + EMA"] = _timed(optimizer_and_ema, repeats)
    parts_total = sum(parts.values())
    rest = parts_total - parts["encoder passes"]
    print(f"{method}: device {device}, threads {torch.get_num_threads()}, layers {list(layers)}, width {list(width)}, "
          f"patch {list(patch)}, batch {batch}, hidden {hidden}")
    print(f"measured step:   {total * 1000:9.1f} ms (sum of the parts below: {parts_total * 1000:.1f} ms)")
    for name, seconds in parts.items():
        print(f"  {name:16s}{seconds * 1000:9.1f} ms  ({100 * seconds / parts_total:5.1f} % of the parts)")
    aligner_share = 100 * parts.get("aligner", 0.0) / parts_total
    print(f"everything but the encoder: {100 * rest / parts_total:5.1f} %; aligner alone: {aligner_share:5.2f} %")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak RSS: {rss_after / 1024:.0f} MiB (the training step raised it by {(rss_after - rss_before) / 1024:.0f} MiB)")


if __name__ == "__main__":
    fire.Fire({"views": views, "step": step})
