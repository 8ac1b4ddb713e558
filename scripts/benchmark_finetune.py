"""Benchmark of one fine-tuning step: the bundle's PGLSegmentationNet against a plain MONAI UNet, side by side.

    python scripts/benchmark_finetune.py --threads 2
    python scripts/benchmark_finetune.py --threads 2 --resnet50 True   # adds ResNet-50 (tens of seconds per step)

A step is forward, DiceCE loss, backward and AdamW on a batch of ``batch`` patches (2 images x 2 crops = 4 in the
recipe of docs/results.md). FLOPs are PyTorch's ``FlopCounterMode`` count of convolutions (forward and backward),
split into encoder, decoder and head. Prints figures and ratios to the UNet (numbers go to docs/benchmarks.md);
asserts nothing.
"""

from __future__ import annotations

import statistics
import time

import fire
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.networks.blocks import UnetBasicBlock, UpSample
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pgl_bundle.networks import PGLResNetEncoder, PGLSegmentationNet

SMALL = {"layers": (1, 1, 1, 1), "block": "bottleneck", "block_inplanes": (32, 64, 128, 256)}
RESNET50 = {"layers": (3, 4, 6, 3), "block": "bottleneck", "block_inplanes": (64, 128, 256, 512)}


def reference_unet(out_channels: int = 2) -> UNet:
    """The plain MONAI UNet of the sanity bar (MONAI's 3D tutorial network)."""
    return UNet(3, 1, out_channels, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
                norm="batch")


class OldDecoderStage(nn.Module):
    """The decoder stage before the light decoder (commit 55ec322), kept here as the baseline: upsample, concatenate
    the full-width skip, two 3x3x3 convolutions over the concatenation, at every stage including full resolution."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scale) -> None:
        super().__init__()
        self.upsample = UpSample(3, in_channels, out_channels, scale_factor=tuple(scale), mode="deconv")
        self.block = UnetBasicBlock(3, out_channels + skip_channels, out_channels, kernel_size=3, stride=1,
                                    norm_name="instance")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.upsample(x), skip], dim=1))


def old_network(encoder: PGLResNetEncoder, widths=(256, 128, 64, 32, 16)) -> PGLSegmentationNet:
    """PGLSegmentationNet with the old decoder (same encoder, same head)."""
    net = PGLSegmentationNet(encoder, 2, decoder_channels=widths)
    skips = (encoder.conv1.in_channels, *encoder.out_channels[:-1])[::-1]
    net.decoder = nn.ModuleList(
        OldDecoderStage(c_in, c_skip, c_out, scale)
        for c_in, c_skip, c_out, scale in zip(
            (encoder.out_channels[-1], *widths[:-1]), skips, widths, encoder.stage_strides[::-1])
    )
    return net


def _networks(resnet50: bool, decoders) -> dict[str, torch.nn.Module]:
    nets = {"MONAI UNet (reference)": reference_unet()}
    encoders = {"small [1,1,1,1] x [32..256]": SMALL} | ({"ResNet-50": RESNET50} if resnet50 else {})
    for name, encoder in encoders.items():
        nets[f"PGL {name}, old decoder [256,128,64,32,16]"] = old_network(PGLResNetEncoder(**encoder))
        for widths in decoders:
            nets[f"PGL {name}, light decoder {list(widths)}"] = PGLSegmentationNet(
                PGLResNetEncoder(**encoder), 2, decoder_channels=widths)
    return nets


def _flops(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss) -> dict[str, float]:
    """GFLOP of one forward + backward, total and per top-level module."""
    with FlopCounterMode(display=False) as counter:
        loss(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    per_module = counter.get_flop_counts()
    top = {name.split(".")[-1]: sum(v.values()) / 1e9 for name, v in per_module.items() if name.count(".") == 1}
    # the decoder is a ModuleList (never called itself): sum its stages
    top["decoder"] = sum(sum(v.values()) for k, v in per_module.items() if k.count(".") == 2 and ".decoder." in k) / 1e9
    return {"total": counter.get_total_flops() / 1e9, **top}


def _step_time(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss, repeats: int) -> float:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 1):  # the first step is a warm-up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss(net(x), y).backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(patch=(96, 96, 32), batch: int = 4, threads: int = 2, repeats: int = 5, resnet50: bool = False,
         decoders=((128, 64, 32, 16, 16), (64, 32, 16, 16, 16))) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.rand(batch, 1, *patch)
    y = (torch.rand(batch, 1, *patch) > 0.9).float()
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    rows = []
    for name, net in _networks(resnet50, decoders).items():
        net.train()
        flops = _flops(net, x, y, loss)
        seconds = _step_time(net, x, y, loss, repeats if "ResNet-50" not in name else max(1, repeats // 2))
        params = sum(p.numel() for p in net.parameters()) / 1e6
        rows.append((name, seconds, flops, params))
        print(f"{name}: {seconds:.3f} s/step, {flops['total']:.1f} GFLOP/step "
              f"({', '.join(f'{k} {v:.1f}' for k, v in flops.items() if k != 'total')}), {params:.2f} M params",
              flush=True)
    ref_time, ref_flops = rows[0][1], rows[0][2]["total"]
    print(f"\npatch {list(patch)}, batch {batch}, {threads} threads, fp32, median of {repeats} steps\n")
    print("| network | step (s) | x UNet | GFLOP / step | x UNet | encoder | decoder | head | params (M) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds, flops, params in rows:
        parts = [f"{flops.get(k, 0.0):.1f}" for k in ("encoder", "decoder", "head")]
        if name == rows[0][0]:
            parts = ["-", "-", "-"]
        print(f"| {name} | {seconds:.2f} | {seconds / ref_time:.1f} | {flops['total']:.1f} | "
              f"{flops['total'] / ref_flops:.1f} | {' | '.join(parts)} | {params:.2f} |")


if __name__ == "__main__":
    fire.Fire(main)
