"""Benchmarks of the pretraining hot path: view generation, one step split by component, and the GPU speed table.

    python scripts/benchmark_pretrain.py views --image ../shared/data/unlabeled/CRLM-CT-1004_ct.nii.gz
    python scripts/benchmark_pretrain.py step --method pgl --layers "[3,4,6,3]" --patch "[96,96,16]" --batch 2
    python scripts/benchmark_pretrain.py step --method byol --layers "[3,4,6,3]" --patch "[96,96,16]" --batch 2
    python scripts/benchmark_pretrain.py step --method pgl --batch 32 --amp --peak_tflops 989  # on a GPU
    python scripts/benchmark_pretrain.py step --batch 128 --amp --channels_last --cudnn_benchmark --fused --compile \\
        --noparts  # the GPU defaults of configs/pretrain.json
    python scripts/benchmark_pretrain.py table --out runs/speed --data ../shared/data/unlabeled  # every setting
    python scripts/benchmark_pretrain.py table --out /tmp/speed --tiny --budget 1200  # CPU smoke test of the table

Prints figures and ratios (numbers go to docs/benchmarks.md); asserts nothing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
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


# The speed table: every setting of configs/pretrain.json's GPU defaults, each row adding its option to the row before
# (`step`'s flags), then the largest batch, a real bundle run, and the other compile modes.
SPEED_SETTINGS = [
    ("fp32", []),
    ("+ bf16 autocast", ["--amp"]),
    ("+ channels-last", ["--amp", "--channels_last"]),
    ("+ cudnn.benchmark", ["--amp", "--channels_last", "--cudnn_benchmark"]),
    ("+ fused Adam, foreach EMA", ["--amp", "--channels_last", "--cudnn_benchmark", "--fused"]),
]
BEST_EAGER = SPEED_SETTINGS[-1][1]
COMPILED = [*BEST_EAGER, "--compile", "--noparts"]
TINY_STEP = {"layers": [1, 1, 1, 1], "width": [8, 8, 8, 8], "patch": [32, 32, 16], "hidden": 32}
TINY_RUN = {"encoder_layers": [1, 1, 1, 1], "encoder_width": [8, 8, 8, 8], "patch_size": [32, 32, 16]}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the rows run there (configs/ relative)
REAL_EPOCH_PAIRS = 1800  # view pairs per epoch of the real run: the paper's epoch (about 1,800 volumes)
THROUGHPUT_LOG = re.compile(
    r"iteration (\d+): ([\d.e+]+) view pairs/s \(all processes\), ([\d.]+) % of the time waiting"
)


class _SpeedTable:
    """Runs the rows of :func:`table` within a time budget; keeps every figure in ``results`` and ``out``'s log."""

    def __init__(self, out: str, budget: float, slowdown: float) -> None:
        self.out, self.deadline, self.slowdown = out, time.time() + budget, slowdown
        self.results: dict = {"steps": [], "skipped": []}
        self.log = open(os.path.join(out, "speed.log"), "a")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def skip(self, what: str, why: str) -> None:
        self.results["skipped"].append(f"{what}: {why}")
        self.say(f"SKIPPED {what}: {why}")

    def bench(self, name: str, batch: int, flags: list[str], network: dict, limit: float = 150) -> dict | None:
        """:func:`step` in its own process (a fresh CUDA context, an out-of-memory kills only it); its RESULT, or
        None when it failed or ran out of time."""
        if self.left() < 30:
            return self.skip(f"{name}, batch {batch}", "no time left")
        args = [f"--{k}={json.dumps(v)}" for k, v in network.items()]
        cmd = [sys.executable, __file__, "step", f"--batch={batch}", "--repeats=5", "--warmup=2", *args, *flags]
        self.say(f"\n=== {name}, batch {batch}: {' '.join(cmd[1:])}")
        try:
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=min(limit * self.slowdown, self.left())
            )
        except subprocess.TimeoutExpired:
            return self.skip(f"{name}, batch {batch}", "timed out")
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Warning" not in line]
        self.say("\n".join(lines[-14:]))
        found = [line[len("RESULT ") :] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            self.say(f"FAILED (exit {proc.returncode})")
            self.results["steps"].append({"setting": name, "batch": batch, "failed": lines[-1] if lines else ""})
            return None
        result = {"setting": name, **json.loads(found[0])}
        self.results["steps"].append(result)
        return result

    def real_run(self, batch: int, data: str, seconds: float, overrides: dict) -> dict | None:
        """``python -m monai.bundle run training`` (configs/pretrain.json as it is, on ``data``) for ``seconds``;
        view pairs/s and data wait from :class:`pgl_bundle.ThroughputHandler`'s log, its first two windows
        (compilation, cuDNN autotuning, the first epoch's start) left out."""
        from pgl_bundle.data import load_datalist

        seconds = min(seconds, self.left() - 20)
        if seconds < 30:
            return self.skip("real run", "no time left")
        repeats = -(-REAL_EPOCH_PAIRS // len(load_datalist(data)))
        values = {"batch_size": batch, "dataset_dir": data, "volume_repeats": repeats, "max_epochs": 100000}
        values |= {"checkpoint_interval": 10, **overrides}  # a checkpoint every 10 epochs, as the paper preset
        args = [a for k, v in values.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
        work = tempfile.mkdtemp(prefix="speed_table_")
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/pretrain.json"]
        cmd += ["--logging_file", "configs/logging.conf", "--bundle_root", work, *args]
        self.say(f"\n=== real run, batch {batch}, {seconds:.0f} s: {' '.join(cmd[1:])}")
        log_path = os.path.join(self.out, "real_run.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)  # its checkpoints: a ResNet-50's are 1.1 GB each
        text = open(log_path).read()
        windows = [(int(i), float(r), float(w)) for i, r, w in THROUGHPUT_LOG.findall(text)]
        self.say("\n".join(line for line in text.splitlines() if "pairs/s" in line or "Error" in line)[-3000:])
        steady = windows[2:]
        if not steady:
            self.say(f"FAILED: {len(windows)} throughput windows in {seconds:.0f} s ({log_path})")
            self.results["real_run"] = {"batch": batch, "failed": text.splitlines()[-1] if text else ""}
            return None
        rates, waits = [r for _, r, _ in steady], [w for _, _, w in steady]
        result = {
            "batch": batch,
            "seconds": seconds,
            "iterations": windows[-1][0],
            "windows": len(steady),
            "pairs_per_s_median": statistics.median(rates),
            "pairs_per_s_min": min(rates),
            "pairs_per_s_max": max(rates),
            "data_wait_percent_median": statistics.median(waits),
        }
        self.results["real_run"] = result
        self.say(f"real run: {result}")
        return result


def _table_rows(results: dict) -> list[dict]:
    """One flat row per isolated step (the CSV's and the markdown table's)."""
    rows = []
    for r in results["steps"]:
        row = {"setting": r["setting"], "batch": r["batch"], "failed": r.get("failed", "")}
        for key in ("pairs_per_s", "step_ms", "tflops", "percent_of_peak", "peak_gpu_mib"):
            row[key] = "" if r.get(key) is None else round(r[key], 2)
        rows.append(row)
    return rows


def _markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}, torch {results['torch']}, {results['date']}.\n",
        "| setting | batch | view pairs / s | step (ms) | TFLOP/s | % of bf16 peak | peak GPU memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in _table_rows(results):
        if row["failed"]:
            lines.append(f"| {row['setting']} | {row['batch']} | failed: {row['failed'][:60]} | | | | |")
            continue
        cells = [row[k] if row[k] != "" else "-" for k in ("pairs_per_s", "step_ms", "tflops", "percent_of_peak")]
        lines.append(
            f"| {row['setting']} | {row['batch']} | "
            + " | ".join(map(str, cells))
            + f" | {row['peak_gpu_mib'] or '-'} |"
        )
    real = results.get("real_run")
    if real and "pairs_per_s_median" in real:
        lines.append(
            f"\nReal run (`monai.bundle run training`, configs/pretrain.json's defaults), batch {real['batch']}: "
            f"{real['pairs_per_s_median']:.1f} view pairs/s (median of {real['windows']} windows, "
            f"{real['pairs_per_s_min']:.1f}-{real['pairs_per_s_max']:.1f}), {real['data_wait_percent_median']:.1f} % "
            f"waiting for data; real / isolated: {results.get('real_over_isolated', float('nan')):.2f}"
        )
    if results.get("largest_batch"):
        lines.append(
            f"\nLargest batch that ran (before a failure, the last tried or the budget's end): "
            f"{results['largest_batch']}"
        )
    if results["skipped"]:
        lines.append("\nSkipped: " + "; ".join(results["skipped"]))
    return "\n".join(lines) + "\n"


def table(
    out: str,
    data: str = "",
    budget: float = 900,
    real_seconds: float = 150,
    batches=(32, 64, 96, 128),
    tiny: bool = False,
    slowdown: float = 1.0,
):
    """The pretraining step's speed table, lower-priority rows skipped (and listed) when ``budget`` seconds run out:

    1. the isolated step (:func:`step`, own process each) at the first of ``batches``: fp32, + bf16, + channels-last,
       + cudnn.benchmark, + fused Adam and foreach EMA, + torch.compile (default mode);
    2. the last setting without compile at each further batch, until one fails (out of memory): the largest that
       runs is the batch of rows 3-4;
    3. a real ``python -m monai.bundle run training`` on the CT of ``data`` (default ``$PGL_DATA_DIR/unlabeled``)
       for ``real_seconds`` with configs/pretrain.json's defaults at that batch;
    4. the isolated step with those defaults (+ compile) at that batch, and the ratio real / isolated;
    5. torch.compile's "reduce-overhead" (CUDA graphs) and "max-autotune" modes at the first batch.

    ``tiny``: a CPU smoke test (tiny network and patch, no compile rows, batches 2 and 4, 2 threads); ``slowdown``
    multiplies each row's time limit (a loaded machine). Writes ``out``/speed.log (all output), results.json (every
    figure), speed.csv and speed.md (the table).
    """
    import torch

    os.makedirs(out, exist_ok=True)
    data = os.path.abspath(data or os.path.join(os.environ.get("PGL_DATA_DIR", "../shared/data"), "unlabeled"))
    if not os.path.isdir(data):
        raise SystemExit(f"{data}: no such folder of CT volumes for the real run (set PGL_DATA_DIR or --data)")
    check = _SpeedTable(out, budget, slowdown)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    check.results |= {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    check.say(f"device: {device}, torch {torch.__version__}")
    network = TINY_STEP if tiny else {}
    batches = (2, 4) if tiny else tuple(batches)
    threads = ["--threads=2"] if tiny else []
    for name, flags in SPEED_SETTINGS:  # 1.
        check.bench(name, batches[0], flags + threads, network)
    if not tiny:
        check.bench("+ torch.compile (default mode)", batches[0], COMPILED, network, limit=240)
    largest = batches[0]  # 2.
    for batch in batches[1:]:
        if not check.bench("bf16, channels-last, cudnn.benchmark, fused", batch, BEST_EAGER + threads, network):
            break
        largest = batch
    check.results["largest_batch"] = largest
    run_overrides = {**TINY_RUN, "num_workers": 0} if tiny else {"num_workers": min(12, os.cpu_count() or 1)}
    real = check.real_run(largest, data, real_seconds, run_overrides)  # 3.
    name = "CPU defaults (fp32, eager)" if tiny else "GPU defaults (+ compile)"
    isolated = check.bench(name, largest, ["--noparts", *threads] if tiny else COMPILED, network, limit=240)  # 4.
    if real and isolated:
        check.results["real_over_isolated"] = real["pairs_per_s_median"] / isolated["pairs_per_s"]
        check.say(f"real / isolated: {check.results['real_over_isolated']:.2f}")
    for mode in () if tiny else ("reduce-overhead", "max-autotune"):  # 5.
        check.bench(f"+ torch.compile ({mode})", batches[0], [*COMPILED, f"--compile_mode={mode}"], network, limit=300)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(check.results, f, indent=1)
    rows = _table_rows(check.results)
    with open(os.path.join(out, "speed.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["setting"])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "speed.md"), "w") as f:
        f.write(_markdown(check.results))
    check.say("\n" + _markdown(check.results))


if __name__ == "__main__":
    fire.Fire({"views": views, "step": step, "table": table})
