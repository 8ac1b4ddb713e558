"""What the dense probe during pretraining costs: the same pretraining run without and with it, side by side.

    OMP_NUM_THREADS=2 python scripts/benchmark_probe.py --out /tmp/probe_cost

Both runs pretrain the ``cpu`` preset's encoder and settings (``pgl_bundle.experiments.presets``) on the shared STS
CT for ``probe_every_n_iterations`` of configs/pretrain.json (the default interval) plus ``extra`` iterations, from
the same prepared volumes (prepared once before either is timed); the second probes at the default interval, i.e.
once, on ``probe_num_train_cases`` / ``probe_num_val_cases`` of the labelled cases. Each run's wall time includes
the start-up, which both share; the probe's own lines give its time (the first also reads the labelled cases).
Prints figures (numbers go to docs/benchmarks.md); asserts nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import fire
from monai.bundle import ConfigParser
from pgl_bundle.data import load_datalist
from pgl_bundle.experiments.presets import PRESETS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("PGL_DATA_DIR", os.path.join(REPO_ROOT, "..", "shared", "data"))


def _bundle(run_id: str, config: list[str], root: str, overrides: dict, threads: int) -> tuple[float, str]:
    """Run a bundle command; return its wall time and its log."""
    args = [a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v))]
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(config), *args]
    command += ["--bundle_root", root, "--logging_file", os.path.join(REPO_ROOT, "configs", "logging.conf")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    return seconds, result.stdout + result.stderr


def main(out: str, labelled: str = os.path.join(DATA, "sts", "dataset.json"), extra: int = 10, threads: int = 2):
    """Time pretraining without and with the probe at the default interval; print both and the difference.

    Args:
        out: a new folder for the runs.
        labelled: labelled CT (dataset.json): its images are the pretraining data, its first and last cases the
            probe's training and validation cases.
        extra: iterations after the probe, so that it is not the run's last work.
        threads: torch threads of each run (``OMP_NUM_THREADS``).
    """
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO_ROOT, "configs", "pretrain.json"))
    interval = parser["probe_every_n_iterations"]
    preset = PRESETS["cpu"]
    settings = {**preset["model"], **preset["pretrain"], "num_workers": 1}
    volumes = len(load_datalist(labelled)) * settings["volume_repeats"]
    per_epoch = -(-volumes // settings["batch_size"])
    settings["max_epochs"] = -(-(interval + extra) // per_epoch)
    iterations = settings["max_epochs"] * per_epoch
    prepared = os.path.join(os.path.abspath(out), "prepared")
    prepare = {"dataset_dir": labelled, "prepared_dir": prepared, "patch_size": settings["patch_size"]}
    _bundle("prepare", ["configs/prepare.json"], REPO_ROOT, {**prepare, "num_workers": 1}, threads)
    common = {**settings, "prepared_dir": prepared}
    probe = {"probe_dataset": labelled, "probe_label_names": ["background", "tumour"]}
    without, _ = _bundle("training", ["configs/pretrain.json"], os.path.join(out, "without"), common, threads)
    with_probe, log = _bundle(
        "training", ["configs/pretrain.json"], os.path.join(out, "with"), {**common, **probe}, threads
    )
    probes = [float(s) for s in re.findall(r"probe: validation Dice .*; ([0-9.]+) s", log)]
    reading = re.search(r"probe: read (.*) in ([0-9.]+) s", log)
    print(f"{iterations} iterations of the cpu preset's pretraining, {threads} threads, probe every {interval}:")
    print("| run | wall time (s) | probes | probe time (s) |")
    print("| --- | --- | --- | --- |")
    print(f"| without the probe | {without:.1f} | 0 | - |")
    print(f"| with the probe | {with_probe:.1f} | {len(probes)} | {', '.join(f'{p:.1f}' for p in probes)} |")
    print(f"added: {with_probe - without:+.1f} s ({(with_probe - without) / without:+.1%} of the run)")
    if reading:
        print(f"of which reading the labelled cases once: {reading.group(2)} s ({reading.group(1)})")


if __name__ == "__main__":
    fire.Fire(main)
