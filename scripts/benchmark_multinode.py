"""What two nodes cost against one: the same pretraining run of 2 processes (gloo on CPU), launched as one torchrun of 2
processes and as two torchruns of 1 process each (``--nnodes 2``) meeting at a c10d rendezvous on 127.0.0.1.
Run from the repository root:

    python scripts/benchmark_multinode.py --repeats 3 --iterations 16

Per launch, alternating: seconds from the start to the first logged loss (rendezvous, imports, reading the prepared
data's manifest, building the network, the first step), seconds per iteration after it (each process's step and the
gradients' all-reduce), seconds in all, and CPU seconds of all its processes (agents included; the figure least
moved by other work on the machine). The data is prepared once beforehand. On one machine both launches talk
over loopback: the figures show what torchrun's agents and rendezvous add, not a network's cost. Prints the
figures and ratios (docs/benchmarks.md); asserts nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import fire

# the bundle's network at the `cpu` preset's size: bottleneck blocks [1, 1, 1, 1] of 32-256 channels, heads of 1024
SMALL = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_block": "bottleneck",
    "encoder_width": [32, 64, 128, 256],
    "hidden_channels": 1024,
    "patch_size": [64, 64, 16],
    "num_workers": 1,
}
VOLUMES = 8
LOSS_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* -- train_loss:", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_cpu() -> float:
    """CPU seconds (user and system) of the ended child processes and their descendants so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _launch(nodes: int, folder: str, overrides: dict) -> dict[str, float]:
    """One run as ``nodes`` torchrun agents of ``2 // nodes`` processes; its start-up, s/iteration and total."""
    bundle = ["-m", "monai.bundle", "run", "training", "--logging_file", "configs/logging.conf"]
    bundle += ["--config_file", "['configs/pretrain.json','configs/multi_gpu_pretrain.json']", "--bundle_root", folder]
    bundle += [arg for k, v in overrides.items() for arg in (f"--{k}", json.dumps(v))]
    if nodes == 1:
        agents = [["--standalone", "--nproc_per_node", "2"]]
    else:
        endpoint = f"127.0.0.1:{_free_port()}"
        agents = [["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d"]] * 2
        agents = [args + ["--rdzv_endpoint", endpoint, "--rdzv_id", os.path.basename(folder)] for args in agents]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    start, cpu = time.time(), _children_cpu()
    logs = [open(os.path.join(folder + f".node{n}.log"), "w+") for n in range(nodes)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *args, *bundle], stdout=log, stderr=log, env=env
        )
        for args, log in zip(agents, logs)
    ]
    if any(p.wait() for p in procs):
        raise RuntimeError(f"a run failed: see {folder}.node*.log")
    total, cpu = time.time() - start, _children_cpu() - cpu
    text = "".join(log.seek(0) or log.read() for log in logs)
    stamps = [datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in LOSS_TIME.findall(text)]
    return {
        "start-up (s)": stamps[0] - start,
        "s / iteration": (stamps[-1] - stamps[0]) / (len(stamps) - 1),
        "total (s)": total,
        "CPU (s)": cpu,
    }


def main(repeats: int = 3, iterations: int = 16, batch_size: int = 2, workdir: str = "") -> None:
    """Alternate one-node and two-node launches ``repeats`` times; print each launch and the medians' ratios."""
    from pgl_bundle.data import make_synthetic_dataset, prepare

    workdir = workdir or tempfile.mkdtemp(prefix="multinode_")
    data = make_synthetic_dataset(os.path.join(workdir, "data"), VOLUMES, shape=(96, 96, 24))
    prepared = os.path.join(workdir, "prepared")
    patch = SMALL["patch_size"]  # pretrain.json's settings: the largest crop (1.4 x the patch), at least the patch
    prepare(data, prepared, min_size=[round(1.4 * s) for s in patch], min_image_size=patch)
    repeats_per_epoch = iterations * 2 * batch_size // VOLUMES  # one epoch of `iterations` steps of 2 processes
    overrides = {**SMALL, "prepared_dir": prepared, "batch_size": batch_size, "max_epochs": 1}
    overrides["volume_repeats"] = repeats_per_epoch
    figures: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for repeat in range(repeats):
        for nodes in (1, 2):
            result = _launch(nodes, tempfile.mkdtemp(prefix=f"run{repeat}_{nodes}node_", dir=workdir), overrides)
            figures[nodes].append(result)
            print(f"{nodes} node(s), 2 processes: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmedians of {repeats}: {iterations} iterations of batch {batch_size} x 2 processes; load average {load}")
    print("| launch | start-up (s) | s / iteration | total (s) | CPU (s) |\n| --- | --- | --- | --- | --- |")
    medians = {n: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for n, rows in figures.items()}
    for nodes, label in ((1, "one node, 2 processes"), (2, "two nodes, 1 process each")):
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in medians[nodes].values()) + " |")
    print("| two / one | " + " | ".join(f"{medians[2][k] / medians[1][k]:.2f}x" for k in medians[1]) + " |")


if __name__ == "__main__":
    fire.Fire(main)
