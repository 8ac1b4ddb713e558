"""Benchmarks of the pretraining hot path: view generation, and one step split by component.

    python scripts/benchmark_pretrain.py views --image ../shared/data/unlabeled/CRLM-CT-1004_ct.nii.gz
    python scripts/benchmark_pretrain.py step --method pgl --layers "[3,4,6,3]" --patch "[96,96,16]" --batch 2
    python scripts/benchmark_pretrain.py step --method byol --layers "[3,4,6,3]" --patch "[96,96,16]" --batch 2
    python scripts/benchmark_pretrain.py step --method pgl --batch 32 --amp --peak_tflops 989  # on a GPU
    python scripts/benchmark_pretrain.py step --batch 128 --amp --channels_last --cudnn_benchmark --fused --compile \
        --noparts  # the GPU defaults of configs/pretrain.json; scripts/gpu_check.py runs every setting

Prints figures and ratios (numbers go to docs/benchmarks.md); asserts nothing.
"""

from __future__ import annotations

import json
import resource
import time

import fire
import torch
from monai.bundle import ConfigParser
from monai.transforms import (
    Compose,
    CopyItemsd,
    LoadImaged,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandSpatialCropd,
    Resized,
    ScaleIntensityRanged,
)
from pgl_bundle import RandPGLIntensityd, RandPGLViewsd
from pgl_bundle.data import deterministic_transforms
from torch.utils.flop_counter import FlopCounterMode


def _preprocessed(image: str):
    """The volume as pretraining sees it: the prepared (deterministic) chain, then the HU window."""
    parser = ConfigParser()
    parser.read_config("configs/pretrain.json")
    window = parser.get_parsed_content("hu_window")
    chain = [
        LoadImaged("image", image_only=True, ensure_channel_first=True),
        *deterministic_transforms(
            window, parser.get_parsed_content("pixdim"), parser.get_parsed_content("min_volume_size")
        ),
        ScaleIntensityRanged("image", window[0], window[1], 0.0, 1.0, clip=True),
    ]
    return Compose(chain)({"image": image})["image"]


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


def _timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # cuDNN autotuning, torch.compile, CUDA graph recording
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM; H200 = H100's chip, more memory


def _peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of the GPU named like one in :data:`PEAK_BF16_TFLOPS`, else None."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def _network(method: str, device: torch.device, **overrides):
    """The dual-path network, loss and optimizer exactly as configs/pretrain.json (+ pretrain_byol.json) build them."""
    parser = ConfigParser()
    parser.read_config(["configs/pretrain.json"] + (["configs/pretrain_byol.json"] if method == "byol" else []))
    parser.update({**overrides, "device": f"$torch.device('{device.type}')"})
    return (
        parser.get_parsed_content("network"),
        parser.get_parsed_content("loss"),
        parser.get_parsed_content("optimizer"),
    )


def step(
    method: str = "pgl",
    layers=(3, 4, 6, 3),
    width=(64, 128, 256, 512),
    block: str = "bottleneck",
    patch=(96, 96, 16),
    batch: int = 2,
    hidden: int = 4096,
    repeats: int = 3,
    threads=None,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
    activation_checkpointing: bool = False,
    channels_last: bool = False,
    peak_tflops: float | None = None,
    cudnn_benchmark: bool = False,
    fused: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    parts: bool = True,
    warmup: int = 1,
):
    """One pretraining step (``method`` "pgl" or "byol") split into encoder passes and everything else; peak memory.

    With ``amp``, every part runs under ``torch.autocast(amp_dtype)`` as the trainer runs it. The speed options are
    those of configs/pretrain.json: ``cudnn_benchmark``, ``fused`` (Adam's fused kernel, and the EMA update in one
    multi-tensor kernel as :class:`pgl_bundle.ForeachEMAHandler` does it), ``compile`` (the whole dual-path network,
    as MONAI's trainer compiles it, in ``compile_mode``; the parts are then not timed: they are eager modules). On
    CUDA it also prints samples (view pairs) per second and the arithmetic rate (FLOPs of one step counted by
    PyTorch's ``FlopCounterMode`` on the eager step), as a fraction of ``peak_tflops`` (by default the dense bf16
    peak of a GPU named in :data:`PEAK_BF16_TFLOPS`). The last line, ``RESULT {...}``, is the same as JSON.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = cudnn_benchmark
    peak_tflops = peak_tflops or _peak_tflops(device)
    net, loss_fn, optimizer = _network(
        method,
        device,
        encoder_layers=list(layers),
        encoder_width=list(width),
        encoder_block=block,
        hidden_channels=hidden,
        activation_checkpointing=activation_checkpointing,
        channels_last=channels_last,
        fused_optimizer=fused,
    )
    autocast = torch.autocast(device.type, dtype=getattr(torch, amp_dtype), enabled=amp)
    views = [torch.rand(batch, 1, *patch, device=device) for _ in range(2)]
    geometry = torch.zeros(batch, 4, 3, device=device)
    geometry[:, 1] = torch.tensor([1.25 * p for p in patch])
    geometry[:, 2] = 0.8
    geometry[:, 3, 0] = 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ema_update():  # what ignite's EMAHandler (fused: pgl_bundle.ForeachEMAHandler) does after each iteration
        with torch.no_grad():
            if fused:
                torch._foreach_lerp_(list(net.target.parameters()), list(net.online.parameters()), 0.004)
                return
            for t, o in zip(net.target.parameters(), net.online.parameters()):
                t.mul_(0.996).add_(o, alpha=0.004)

    def make_step(forward):
        def full_step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(forward(*views, geometry, geometry))
            loss.backward()
            optimizer.step()
            ema_update()
            sync()

        return full_step

    full_step = make_step(net)
    flops = 0
    if device.type == "cuda":  # counted on the eager step
        with FlopCounterMode(display=False) as counter:
            full_step()
        flops = counter.get_total_flops()
    if compile:
        full_step = make_step(torch.compile(net, mode=compile_mode))

    both = torch.cat(views)
    with autocast:
        features = net.online.encoder(both)[-1].detach()
        projections = net.online.projector(features).detach()
        aligned = projections.chunk(2)
        if net.aligner is not None:
            aligned = [p.detach() for p in net.aligner(*aligned, geometry, geometry)]

    def encoder_passes():
        with autocast:
            out = net.online.encoder(both)[-1]
            with torch.no_grad():
                net.target.encoder(both)
        out.backward(torch.randn_like(out))
        sync()

    def head_passes():
        with autocast:
            online = net.online.projector(features.requires_grad_())
            predicted = net.predictor(online)
            with torch.no_grad():
                net.target.projector(features)
        (online.float().sum() + predicted.float().sum()).backward()
        sync()

    def aligner_passes():
        maps = [p.clone().requires_grad_() for p in projections.chunk(2)]
        with autocast:
            a1, a2 = net.aligner(*maps, geometry, geometry)
            with torch.no_grad():
                net.aligner(*projections.chunk(2), geometry, geometry)
        (a1.float().sum() + a2.float().sum()).backward()
        sync()

    def loss_pass():
        p = torch.cat(aligned).requires_grad_()
        with autocast:
            loss = loss_fn((p, torch.cat(aligned)))
        loss.backward()
        sync()

    def optimizer_and_ema():
        optimizer.step()
        ema_update()
        sync()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    total = _timed(full_step, repeats, warmup=max(warmup, 3 if compile else 1))
    wall = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    options = [
        o
        for o, on in (
            ("amp " + amp_dtype, amp),
            ("activation checkpointing", activation_checkpointing),
            ("channels-last", channels_last),
            ("cudnn.benchmark", cudnn_benchmark),
            ("fused optimizer + foreach EMA", fused),
            (f"compile {compile_mode}", compile),
        )
        if on
    ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"{method}: {name}, layers {list(layers)}, width {list(width)}, patch {list(patch)}, batch {batch}, "
        f"hidden {hidden}, {', '.join(options) or 'fp32'}"
    )
    print(f"measured step:   {total * 1000:9.1f} ms (warm-up and timed steps took {wall:.1f} s)")
    if parts:
        timed = {"encoder passes": _timed(encoder_passes, repeats), "heads": _timed(head_passes, repeats)}
        if net.aligner is not None:
            timed["aligner"] = _timed(aligner_passes, repeats)
        timed["loss"] = _timed(loss_pass, repeats)
        timed["optimizer + EMA"] = _timed(optimizer_and_ema, repeats)
        parts_total = sum(timed.values())
        rest = parts_total - timed["encoder passes"]
        print(f"sum of the parts below (eager): {parts_total * 1000:.1f} ms")
        for part, seconds in timed.items():
            print(f"  {part:16s}{seconds * 1000:9.1f} ms  ({100 * seconds / parts_total:5.1f} % of the parts)")
        aligner_share = 100 * timed.get("aligner", 0.0) / parts_total
        print(f"everything but the encoder: {100 * rest / parts_total:5.1f} %; aligner alone: {aligner_share:5.2f} %")
    result = {"device": name, "batch": batch, "options": options, "step_ms": 1000 * total, "pairs_per_s": batch / total}
    if device.type == "cuda":
        tflops = flops / total / 1e12
        share = f" = {100 * tflops / peak_tflops:.1f} % of {peak_tflops:g} TFLOP/s" if peak_tflops else ""
        print(
            f"samples/s: {batch / total:.1f} view pairs; {flops / 1e12:.2f} TFLOP per step, {tflops:.1f} TFLOP/s{share}"
        )
        print(f"peak GPU memory of the step: {peak_gpu / 2**20:.0f} MiB")
        result.update(
            tflop_per_step=flops / 1e12,
            tflops=tflops,
            peak_tflops=peak_tflops,
            percent_of_peak=100 * tflops / peak_tflops if peak_tflops else None,
            peak_gpu_mib=peak_gpu / 2**20,
        )
    else:
        print(f"samples/s: {batch / total:.2f} view pairs")
    print(
        f"peak RSS: {rss_after / 1024:.0f} MiB "
        f"(the training step raised it by {(rss_after - rss_before) / 1024:.0f} MiB)"
    )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    fire.Fire({"views": views, "step": step})
