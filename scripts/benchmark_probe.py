"""What the dense probe during pretraining costs: pretraining without and with it, at the default interval.

    OMP_NUM_THREADS=2 python scripts/benchmark_probe.py --out /tmp/probe_cost

Two runs of the ``cpu`` preset's pretraining (``pgl_bundle.experiments.presets``: its encoder and settings) on the
shared STS CT, one epoch each, from the same prepared volumes (prepared once, before either is timed); the second
probes once, at its last iteration, on ``probe_num_train_cases`` / ``probe_num_val_cases`` of the labelled cases
(configs/pretrain.json's defaults). From the trainers' own times (ignite's "Engine run finished. Time taken") and the
probe's log lines it prints, for ``probe_every_n_iterations`` (the default interval) iterations: the time without the
probe (that many steps at the first run's time per step) and with it (plus one probe; the labelled cases are read once
per run, shown apart), and the difference between the two measured runs. Asserts nothing; the numbers go to
docs/benchmarks.md.
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


def _engine_seconds(log: str) -> float:
    """The trainer's run time from ignite's last line, ``Engine run finished. Time taken: HH:MM:SS.fff``."""
    hours, minutes, seconds = re.findall(r"Engine run finished\. Time taken: (\d+):(\d+):([\d.]+)", log)[-1]
    return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def main(out: str, labelled: str = os.path.join(DATA, "sts", "dataset.json"), threads: int = 2):
    """Time one epoch of pretraining without and with a probe; print both, and both at the default interval.

    Args:
        out: a new folder for the runs.
        labelled: labelled CT (dataset.json): its images are the pretraining data, its first and last cases the
            probe's training and validation cases.
        threads: torch threads of each run (``OMP_NUM_THREADS``).
    """
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO_ROOT, "configs", "pretrain.json"))
    interval = parser["probe_every_n_iterations"]
    preset = PRESETS["cpu"]
    settings = {**preset["model"], **preset["pretrain"], "num_workers": 1, "max_epochs": 1}
    iterations = -(-len(load_datalist(labelled)) * settings["volume_repeats"] // settings["batch_size"])
    prepared = os.path.join(os.path.abspath(out), "prepared")
    prepare = {"dataset_dir": labelled, "prepared_dir": prepared, "patch_size": settings["patch_size"]}
    _bundle("prepare", ["configs/prepare.json"], REPO_ROOT, {**prepare, "num_workers": 1}, threads)
    common = {**settings, "prepared_dir": prepared}
    probe = {
        "probe_dataset": labelled,
        "probe_label_names": ["background", "tumour"],
        "probe_every_n_iterations": iterations,
    }
    _, log = _bundle("training", ["configs/pretrain.json"], os.path.join(out, "without"), common, threads)
    without = _engine_seconds(log)
    _, log = _bundle("training", ["configs/pretrain.json"], os.path.join(out, "with"), {**common, **probe}, threads)
    with_probe = _engine_seconds(log)
    probe_seconds = float(re.findall(r"probe: validation Dice .*; ([0-9.]+) s", log)[-1])
    reading = float(re.search(r"probe: read .* in ([0-9.]+) s", log).group(1))
    step = without / iterations
    print(f"cpu preset's pretraining on {labelled}, {threads} threads, one epoch of {iterations} iterations:")
    print(f"  without the probe {without:.1f} s ({step:.2f} s per iteration); with one probe {with_probe:.1f} s")
    print(f"  one probe {probe_seconds:.1f} s, of which reading the labelled cases (once per run) {reading:.1f} s")
    old, added = interval * step, probe_seconds - reading
    print(f"at the default interval, {interval} iterations:")
    print("| | without the probe | with the probe | added |")
    print("| --- | --- | --- | --- |")
    print(f"| seconds | {old:.0f} | {old + added:.0f} | {added:.1f} ({added / old:.1%}) |")


if __name__ == "__main__":
    fire.Fire(main)
