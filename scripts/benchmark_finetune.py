"""Benchmark of one fine-tuning step: the bundle's PGLSegmentationNet against a plain MONAI UNet, side by side.

    python scripts/benchmark_finetune.py --threads 2
    python scripts/benchmark_finetune.py --threads 2 --time_resnet50 True   # also times ResNet-50 (slow on CPU)
    python scripts/benchmark_finetune.py --threads 1 --compile True   # each network also under torch.compile

A step is forward, DiceCE loss, backward and AdamW on a batch of ``batch`` patches (2 images x 2 crops = 4 in the
recipe of docs/results.md). FLOPs are PyTorch's ``FlopCounterMode`` count of convolutions (forward and backward),
on the meta device, with the forward's split into encoder, decoder and head. With ``compile``, each timed network
is also timed under ``torch.compile`` (inductor; its first step, the compilation, reported apart). Prints figures and
ratios to the UNet (numbers go to docs/benchmarks.md); asserts nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import fire
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from pgl_bundle.networks import PGLResNetEncoder, PGLSegmentationNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

SMALL = {"layers": (1, 1, 1, 1), "block": "bottleneck", "block_inplanes": (32, 64, 128, 256)}
RESNET50 = {"layers": (3, 4, 6, 3), "block": "bottleneck", "block_inplanes": (64, 128, 256, 512)}


def reference_unet(out_channels: int = 2) -> UNet:
    """The plain MONAI UNet of the sanity bar (MONAI's 3D tutorial network)."""
    return UNet(
        3, 1, out_channels, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch"
    )


def _networks(resnet50: bool, decoders) -> dict[str, Callable[[], nn.Module]]:
    """Name -> constructor (called on the meta device to count FLOPs, on the CPU to time)."""
    nets = {"MONAI UNet (reference)": reference_unet}
    encoders = {"small [1,1,1,1] x [32..256]": SMALL} | ({"ResNet-50": RESNET50} if resnet50 else {})
    for name, encoder in encoders.items():
        for widths in decoders:
            nets[f"PGL {name}, decoder {list(widths)}"] = partial(
                lambda e, w: PGLSegmentationNet(PGLResNetEncoder(**e), 2, decoder_channels=w), encoder, widths
            )
    return nets


def _flops(build: Callable[[], nn.Module], batch: int, patch) -> dict[str, float]:
    """GFLOP of one forward + backward (``total``), and the forward's share of the encoder, decoder and head (%).

    Counted on the meta device: no memory, no time."""
    with torch.device("meta"):
        net, x = build(), torch.empty(batch, 1, *patch)
    with FlopCounterMode(display=False) as counter:
        net(x).logsumexp(1).mean().backward()
    total = counter.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as counter:
        net(x)
    counts = {k.split(".", 1)[-1]: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    forward = counter.get_total_flops()
    parts = {"encoder": counts.get("encoder", 0), "head": counts.get("head", 0)}
    parts["decoder"] = sum(v for k, v in counts.items() if k.count(".") == 1 and k.startswith("decoder."))
    return {"total": total, **{k: 100 * v / forward for k, v in parts.items()}}


def _step_time(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss, repeats: int) -> tuple[float, float]:
    """Median seconds of ``repeats`` steps, and the seconds of the first step (warm-up; compilation if compiled)."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss(net(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[0]


def main(
    patch=(96, 96, 32),
    batch: int = 4,
    threads: int = 2,
    repeats: int = 5,
    resnet50: bool = True,
    time_resnet50: bool = False,
    decoders=((128, 64, 32, 16, 16), (64, 32, 16, 16, 16)),
    compile: bool = False,
) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.rand(batch, 1, *patch)
    y = (torch.rand(batch, 1, *patch) > 0.9).float()
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    rows, compiled_rows = [], []
    for name, build in _networks(resnet50, decoders).items():
        flops = _flops(build, batch, patch)
        seconds = None
        if time_resnet50 or "ResNet-50" not in name:
            seconds, _ = _step_time(build().train(), x, y, loss, repeats)
            if compile:
                compiled, first = _step_time(torch.compile(build().train()), x, y, loss, repeats)
                compiled_rows.append((name, seconds, compiled, first))
        rows.append((name, seconds, flops))
        print(f"{name}: {seconds} s/step, {flops}", flush=True)
    ref_time, ref_flops = rows[0][1], rows[0][2]["total"]
    print(f"\npatch {list(patch)}, batch {batch}, {threads} threads, fp32, median of {repeats} steps\n")
    print("| network | step (s) | x UNet | GFLOP / step | x UNet | forward: encoder | decoder | head |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds, flops in rows:
        step = "- | -" if seconds is None else f"{seconds:.2f} | {seconds / ref_time:.1f}"
        parts = " | ".join(f"{flops[k]:.0f} %" for k in ("encoder", "decoder", "head"))
        parts = "- | - | -" if name == rows[0][0] else parts
        print(f"| {name} | {step} | {flops['total']:.1f} | {flops['total'] / ref_flops:.1f} | {parts} |")
    if compiled_rows:
        print("\n| network | eager step (s) | compiled step (s) | eager / compiled | first compiled step (s) |")
        print("| --- | --- | --- | --- | --- |")
        for name, eager, compiled, first in compiled_rows:
            print(f"| {name} | {eager:.2f} | {compiled:.2f} | {eager / compiled:.2f}x | {first:.0f} |")


if __name__ == "__main__":
    fire.Fire(main)
