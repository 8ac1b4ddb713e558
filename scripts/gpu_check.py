"""The GPU check of issue 10, in one run of about 8 minutes: the isolated pretraining step under each speed setting,
the largest batch that fits, and a 3-minute real ``python -m monai.bundle run training`` on the shared CT.

On the lent machine (the ``device`` tool; an H100 or H200) the working tree travels, ``../shared`` does not. So, once,
in the checkout the session was started in (not a helper's worktree: the tool sends that one), copy the unlabelled CT
(30 MB) into a git-ignored folder and name it in ``carry``:

    mkdir -p .gpu_data && cp -r ../shared/data/unlabeled .gpu_data/ && echo /.gpu_data/ >> .git/info/exclude
    run(command="PYTHONUNBUFFERED=1 python scripts/gpu_check.py --out $OUT", carry=[".gpu_data"], timeout_s=590)

Everything goes to ``--out``: ``gpu_check.log`` (all output), ``results.json`` (every figure), ``results.md`` (rows
for docs/benchmarks.md), ``real_run.log`` (the bundle run's log). Lower-priority steps are skipped, and said to be,
when the time budget (``--budget``, seconds) runs out.

Smoke test on a CPU (tiny network and patch, no torch.compile rows, a 90-second real run, 2 threads; minutes):

    python scripts/gpu_check.py --out /tmp/gpu_check --tiny --data ../shared/data/unlabeled --budget 1200 \
        --slowdown 4
    python scripts/gpu_check.py --out /tmp/gpu_check --tiny --data ../shared/data/unlabeled --real_only 4  # step 3

Steps, in order of priority:

1. isolated step at batch 32 (the batch of the earlier H100 figures): fp32, + bf16, + channels-last,
   + cudnn.benchmark, + fused Adam and foreach EMA, + torch.compile (each adds to the one before);
2. the same without compile at batch 64, 96, 128: the largest that runs is the batch of steps 3-5;
3. the real bundle run for ``--real_seconds`` with configs/pretrain.json's GPU defaults (which are step 1's last
   row) at that batch; pairs/s from :class:`pgl_bundle.ThroughputHandler`'s log, the first windows (compile,
   cuDNN autotuning, caching) left out;
4. the isolated step with compile at that batch, and the ratio real / isolated;
5. compile modes "reduce-overhead" (CUDA graphs) and "max-autotune" at batch 32.

The real run's epoch is 1,792 view pairs drawn from the 3 cached volumes (about the paper's 1,800 volumes per epoch)
with a checkpoint every 10 epochs, as the paper preset saves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NETWORK = {"layers": [1, 1, 1, 1], "width": [8, 8, 8, 8], "patch": [32, 32, 16], "hidden": 32}
TINY_RUN = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_width": [8, 8, 8, 8],
    "patch_size": [32, 32, 16],
    "hidden_channels": 32,
}
EAGER_SETTINGS = [  # name, benchmark flags; each row adds its option to the row before
    ("fp32", []),
    ("+ bf16 autocast", ["--amp"]),
    ("+ channels-last", ["--amp", "--channels_last"]),
    ("+ cudnn.benchmark", ["--amp", "--channels_last", "--cudnn_benchmark"]),
    ("+ fused Adam, foreach EMA", ["--amp", "--channels_last", "--cudnn_benchmark", "--fused"]),
]
BEST_EAGER = EAGER_SETTINGS[-1][1]
COMPILED = [*BEST_EAGER, "--compile", "--noparts"]
# the isolated step's counterpart of a real run's epoch: the paper's ~1,800 volumes, from the cached volumes
REPEAT_OVERLAY = {
    "gpu_check_epoch_items": 1792,
    "checkpoint_interval": 10,
    "train#epoch_dataset#dataset": (
        "$type('RepeatedDataset', (torch.utils.data.Subset,), {'transform': property(lambda s: s.dataset.transform)})"
        "(@train#dataset, [i % len(@train#dataset) for i in range(@gpu_check_epoch_items)])"
    ),
}
WINDOW = re.compile(r"iteration (\d+): ([\d.]+) view pairs/s \(all processes\), ([\d.]+) % of the time waiting")


class Check:
    def __init__(self, out: str, budget: float, slowdown: float = 1.0) -> None:
        self.out, self.deadline, self.results = out, time.time() + budget, {"steps": [], "skipped": []}
        self.slowdown = slowdown  # multiplies each step's time limit (a loaded CPU in smoke tests)
        self.log = open(os.path.join(out, "gpu_check.log"), "a")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def bench(self, name: str, batch: int, flags: list[str], network: dict, limit: float = 150) -> dict | None:
        """One isolated-step benchmark in its own process; its RESULT, or None when it failed (e.g. out of memory)."""
        if self.left() < 30:
            self.results["skipped"].append(f"{name}, batch {batch}: no time left")
            self.say(f"SKIPPED {name}, batch {batch}: no time left")
            return None
        args = [f"--{k}={json.dumps(v)}" for k, v in network.items()]
        cmd = [
            sys.executable,
            "scripts/benchmark_pretrain.py",
            "step",
            f"--batch={batch}",
            "--repeats=5",
            "--warmup=2",
            *args,
            *flags,
        ]
        self.say(f"\n=== {name}, batch {batch}: {' '.join(cmd[1:])}")
        try:
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=min(limit * self.slowdown, self.left())
            )
        except subprocess.TimeoutExpired:
            self.say("TIMED OUT")
            self.results["skipped"].append(f"{name}, batch {batch}: timed out")
            return None
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
        """``python -m monai.bundle run training`` for ``seconds``; pairs/s and data wait from the throughput log."""
        if self.left() < seconds + 20:
            seconds = self.left() - 20
        if seconds < 30:
            self.results["skipped"].append("real run: no time left")
            self.say("SKIPPED the real run: no time left")
            return None
        work = tempfile.mkdtemp(prefix="gpu_check_")
        overlay = os.path.join(work, "repeat.json")
        with open(overlay, "w") as f:
            json.dump(REPEAT_OVERLAY, f)
        args = [
            arg
            for k, v in {"batch_size": batch, "dataset_dir": data, "max_epochs": 100000, **overrides}.items()
            for arg in (f"--{k}", v if isinstance(v, str) else json.dumps(v))
        ]
        cmd = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            json.dumps(["configs/pretrain.json", overlay]),
            "--logging_file",
            "configs/logging.conf",
            "--bundle_root",
            work,
            *args,
        ]
        self.say(f"\n=== real run, batch {batch}, {seconds:.0f} s: {' '.join(cmd[1:])}")
        log_path = os.path.join(self.out, "real_run.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=30)
        text = open(log_path).read()
        windows = [(int(i), float(r), float(w)) for i, r, w in WINDOW.findall(text)]
        self.say("\n".join(line for line in text.splitlines() if "pairs/s" in line or "Error" in line)[-3000:])
        steady = windows[2:]  # the first windows hold compilation, cuDNN autotuning and the first epoch's start
        if not steady:
            self.say(f"FAILED: {len(windows)} throughput windows in {seconds:.0f} s (see real_run.log)")
            self.results["real_run"] = {"batch": batch, "failed": text.splitlines()[-1:] if text else ""}
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


def table(results: dict) -> str:
    rows = [
        "| setting | batch | view pairs / s | step (ms) | TFLOP/s | fraction of peak | peak GPU memory |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["steps"]:
        if "failed" in r:
            rows.append(f"| {r['setting']} | {r['batch']} | failed: {r['failed'][:60]} | | | | |")
            continue
        share = f"{r['percent_of_peak']:.1f} %" if r.get("percent_of_peak") is not None else "-"
        tflops = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        memory = f"{r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else "-"
        rows.append(
            f"| {r['setting']} | {r['batch']} | {r['pairs_per_s']:.1f} | {r['step_ms']:.1f} | {tflops} | "
            f"{share} | {memory} |"
        )
    real = results.get("real_run")
    if real and "pairs_per_s_median" in real:
        rows.append(
            f"\nReal run, batch {real['batch']}: {real['pairs_per_s_median']:.1f} view pairs/s (median of "
            f"{real['windows']} windows, {real['pairs_per_s_min']:.1f}-{real['pairs_per_s_max']:.1f}), "
            f"{real['data_wait_percent_median']:.1f} % waiting for data; real / isolated: "
            f"{results.get('real_over_isolated', float('nan')):.2f}"
        )
    if results["skipped"]:
        rows.append("\nskipped: " + "; ".join(results["skipped"]))
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--data", default=".gpu_data/unlabeled", help="folder of CT volumes for the real run")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    parser.add_argument("--real_seconds", type=float, default=None, help="default: 180, or 90 with --tiny")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny network, no compile rows")
    parser.add_argument("--slowdown", type=float, default=1.0, help="multiplies each step's time limit")
    parser.add_argument("--real_only", type=int, default=0, help="only step 3, the real run, at this batch")
    opts = parser.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    if not os.path.isdir(opts.data):
        sys.exit(f"{opts.data}: no such folder; copy ../shared/data/unlabeled there first (see this script's header)")
    check = Check(opts.out, opts.budget, opts.slowdown)
    import torch  # after the argument checks: importing torch takes seconds

    check.results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    check.say(f"device: {check.results['device']}, torch {torch.__version__}")
    network = TINY_NETWORK if opts.tiny else {}
    batches = (2, 4) if opts.tiny else (32, 64, 96, 128)
    first = batches[0]
    run_overrides = {**TINY_RUN, "num_workers": 0} if opts.tiny else {"num_workers": min(12, os.cpu_count() or 1)}
    if opts.real_only:
        check.real_run(opts.real_only, opts.data, opts.real_seconds or (90 if opts.tiny else 180), run_overrides)
        return finish(check, opts.out)
    threads = ["--threads=2"] if opts.tiny else []
    for name, flags in EAGER_SETTINGS:  # 1.
        check.bench(name, first, flags + threads, network)
    if not opts.tiny:
        check.bench("+ torch.compile (default mode)", first, COMPILED, network, limit=240)
    fitting = [first]  # 2.
    for batch in batches[1:]:
        if check.bench("bf16, channels-last, cudnn.benchmark, fused", batch, BEST_EAGER + threads, network):
            fitting.append(batch)
        else:
            break
    largest = fitting[-1]
    real = check.real_run(largest, opts.data, opts.real_seconds or (90 if opts.tiny else 180), run_overrides)  # 3.
    isolated = check.bench(
        "GPU defaults (+ compile)" if not opts.tiny else "CPU defaults (fp32, eager)",
        largest,
        ["--noparts", "--threads=2"] if opts.tiny else COMPILED,
        network,
        limit=240,
    )  # 4.
    if real and isolated:
        check.results["real_over_isolated"] = real["pairs_per_s_median"] / isolated["pairs_per_s"]
        check.say(f"real / isolated: {check.results['real_over_isolated']:.2f}")
    if not opts.tiny:  # 5.
        for mode in ("reduce-overhead", "max-autotune"):
            check.bench(f"+ torch.compile ({mode})", first, [*COMPILED, f"--compile_mode={mode}"], network, limit=300)
    finish(check, opts.out)


def finish(check: Check, out: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(check.results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(check.results))
    check.say("\n" + table(check.results))


if __name__ == "__main__":
    main()
