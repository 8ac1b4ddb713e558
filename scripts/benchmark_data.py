"""Pretraining's data path at scale: the old path (check_datalist + CacheDataset of float32 volumes) and the prepared
path (int16 memory maps), side by side in one run. Figures in docs/benchmarks.md. Run from the repository root:

    python scripts/benchmark_data.py dtypes                      # stored dtype / layout table, real CT
    python scripts/benchmark_data.py corpus /work/bench_data/ct 100 --num_workers 2
    python scripts/benchmark_data.py scale /work/bench_data/ct --sizes "[25,100]" --old_sizes "[10]" --old 55ec322

``scale`` measures, per path, number of volumes N and number of torchrun processes: the time from launching
``python -m monai.bundle run`` to the end of the first training step (tiny encoder: data start-up, not compute), and
the memory of every process (ranks and their DataLoader workers) at that moment, from /proc/<pid>/smaps_rollup:
RSS summed (counts shared pages once per process) and PSS of anonymous memory summed (each private or copy-on-write
page once; page cache excluded). Then view pairs/s delivered by one DataLoader worker at 96 x 96 x 16.

Comparisons with older code take its git ref as ``--old`` (a commit, tag or branch of this repository): ``scale``
runs that ref's pretrain.json (one from before the prepared path) beside this tree's, or this tree only without it;
``startup``, ``loader`` and ``boxes`` need it: they run that ref's ``pgl_bundle`` and configs side by side with this
tree's, e.g. ``python scripts/benchmark_data.py loader /tmp/prepared --old main``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import fire
import numpy as np

TINY = {
    "encoder_layers": [1, 1, 1, 1],
    "encoder_width": [8, 8, 8, 8],
    "hidden_channels": 32,
    "embedding_channels": 16,
    "batch_size": 2,
    "num_workers": 2,
    "max_epochs": 1,
}
WINDOW = (-1024, 325)
BOX = (134, 134, 22)  # the largest view crop at 96 x 96 x 16
# what every `python -m monai.bundle run` of pretraining imports before any of its own work: MONAI (all of it, by its
# __init__), torch, ignite, torch._dynamo (imported by any torch.optim optimizer's constructor) and pgl_bundle
FLOOR = {
    "imports": ["$import torch", "$import ignite", "$import torch._dynamo", "$import pgl_bundle"],
    "probe": ["$import benchmark_data", "$benchmark_data.floor_probe()"],
}


def _smaps(pid: int) -> dict[str, float]:
    """GB of ``/proc/<pid>/smaps_rollup``'s Rss, Pss, Pss_Anon and Pss_File."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
    return {name: fields[name] / 2**20 for name in ("Rss", "Pss", "Pss_Anon", "Pss_File")}


def _memory(pid: int) -> dict[str, float]:
    """GB of RSS and PSS (all, anonymous, file-backed) of ``pid`` and of its descendants (DataLoader workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in os.listdir(f"/proc/{pids[i]}/task"):
            with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        i += 1
    total = {"processes": len(pids)}
    for role, members in (("rank", pids[:1]), ("workers", pids[1:])):
        for p in members:
            for name, gb in _smaps(p).items():
                for key in (f"{name.lower()}_gb", f"{role}_{name.lower()}_gb"):
                    total[key] = total.get(key, 0.0) + gb
    return total


def first_step(engine) -> None:
    """Probe attached to the trainer (see :func:`_probe_config`): start-up time at the end of the first iteration;
    memory after ``BENCH_MEMORY_AT`` iterations (DataLoader workers in steady state), then stop."""
    import ignite.distributed as idist

    if engine.state.iteration == 1:
        os.environ["BENCH_STARTUP_S"] = repr(time.time() - float(os.environ["BENCH_T0"]))
    if engine.state.iteration < int(os.environ.get("BENCH_MEMORY_AT", "1")):
        return
    record = {"startup_s": float(os.environ["BENCH_STARTUP_S"]), **_memory(os.getpid())}
    with open(f"{os.environ['BENCH_OUT']}.rank{idist.get_rank()}", "w") as f:
        json.dump(record, f)
    engine.terminate()


def floor_probe() -> None:
    """Probe of :data:`FLOOR`: time and memory once the imports that any bundle run pays are done."""
    record = {"startup_s": time.time() - float(os.environ["BENCH_T0"]), **_memory(os.getpid())}
    with open(f"{os.environ['BENCH_OUT']}.rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(record, f)


def _probe_config(folder: str) -> str:
    path = os.path.join(folder, "probe.json")
    with open(path, "w") as f:
        json.dump(
            {
                "probe": [
                    "$import benchmark_data",
                    "$@train#trainer.add_event_handler("
                    "ignite.engine.Events.ITERATION_COMPLETED, benchmark_data.first_step)",
                    "$@train#trainer.run()",
                ]
            },
            f,
        )
    return path


def _old_configs(folder: str, old: str) -> list[str]:
    """pretrain.json and multi_gpu_pretrain.json of git ref ``old``, written to ``folder``."""
    paths = []
    for name in ("pretrain.json", "multi_gpu_pretrain.json"):
        paths.append(os.path.join(folder, f"old_{name}"))
        with open(paths[-1], "w") as f:
            f.write(
                subprocess.run(
                    ["git", "show", f"{old}:configs/{name}"], check=True, capture_output=True, text=True
                ).stdout
            )
    return paths


def _startup(configs: list[str], processes: int, overrides: dict, folder: str, tree: str = "", probe: str = "") -> dict:
    """Launch a bundle run (torchrun when ``processes`` > 1) with the probe; return summed figures over ranks.

    ``tree``: the source tree whose ``pgl_bundle`` runs (default: this one); ``probe``: the probe config (default:
    :func:`_probe_config`)."""
    out = os.path.join(folder, f"probe_{time.time_ns()}")
    configs = [os.path.abspath(c) for c in configs[:1] + (configs[1:] if processes > 1 else [])]
    configs.append(probe or _probe_config(folder))
    args = [a for k, v in {**TINY, **overrides}.items() for a in (f"--{k}", json.dumps(v))]
    bundle = [
        "-m",
        "monai.bundle",
        "run",
        "probe",
        "--config_file",
        json.dumps(configs),
        "--bundle_root",
        os.path.join(folder, "bundle"),
        *args,
    ]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    scripts = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "BENCH_T0": repr(time.time()),
        "BENCH_OUT": out,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [tree or os.getcwd(), scripts, os.environ.get("PYTHONPATH")])),
    }
    # run from `folder`: `python -m` puts the working directory first on sys.path, which would import this tree's
    # pgl_bundle instead of `tree`'s
    result = subprocess.run([sys.executable, *launcher, *bundle], env=env, capture_output=True, text=True, cwd=folder)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    ranks = [json.load(open(f"{out}.rank{r}")) for r in range(processes)]
    return {k: (max if k == "startup_s" else sum)(r[k] for r in ranks) for k in ranks[0]}


def _pairs_per_second(configs: list[str], overrides: dict, seconds: float, num_workers: int = 1) -> float:
    """View pairs/s from ``train#dataloader`` after its first batch: wall-clock with ``num_workers`` workers, or
    with 0 (in this process) per second of this process's CPU time, which the machine's load does not inflate."""
    from monai.bundle import ConfigParser

    clock = time.perf_counter if num_workers else time.process_time
    parser = ConfigParser()
    parser.read_config(configs[0])
    parser.update({**TINY, **overrides, "num_workers": num_workers, "batch_size": 1, "patch_size": [96, 96, 16]})
    loader = parser.get_parsed_content("train#dataloader")
    loader.sampler.set_epoch(1)
    count, start = 0, None
    while start is None or clock() - start < seconds:
        for _ in loader:
            if start is None:
                start = clock()
                continue
            count += 1
            if clock() - start >= seconds:
                break
    return count / (clock() - start)


def corpus(folder: str, num_volumes: int, num_workers: int = 1) -> None:
    """Write (or complete) a corpus of CT-sized phantoms; prints the generation rate."""
    from pgl_bundle.data.synthetic import make_ct_corpus

    before = sum(os.path.isfile(os.path.join(folder, f"ct_{i:04d}.nii.gz")) for i in range(num_volumes))
    start = time.perf_counter()
    paths = make_ct_corpus(folder, num_volumes, num_workers=num_workers)
    elapsed = time.perf_counter() - start
    size = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
    print(
        f"{num_volumes - before} volumes written in {elapsed:.0f} s with {num_workers} processes "
        f"({(num_volumes - before) / max(elapsed, 1e-9) * 60:.1f} per minute); {size:.0f} MB per .nii.gz"
    )


def scale(
    folder: str,
    sizes=(25, 100),
    old_sizes=(),
    old_max_processes_gb: float = 5.0,
    prepared_dir: str = "",
    seconds: float = 20.0,
    old: str = "",
) -> None:
    """The prepared path for each N in ``sizes``; with ``old`` (a git ref whose pretrain.json caches float32 volumes,
    from before the prepared path), that path for each N in ``old_sizes`` where its RAM stays under the limit."""
    from pgl_bundle.data import load_datalist, prepare
    from pgl_bundle.data.prepared import PreparedVolume

    if old_sizes and not old:
        raise SystemExit("--old_sizes needs --old: the git ref of the old path's configs")
    work = tempfile.mkdtemp(prefix="benchmark_data_")
    prepared_dir = prepared_dir or os.path.join(os.path.dirname(os.path.abspath(folder)), "prepared")
    new = ["configs/pretrain.json", "configs/multi_gpu_pretrain.json"]
    old_configs = _old_configs(work, old) if old else []
    shapes = []
    for n in sorted(set(sizes) | set(old_sizes)):
        start = time.perf_counter()
        items = prepare(folder, prepared_dir, WINDOW, num_items=n, num_workers=2)
        print(f"prepare: N={n}: {time.perf_counter() - start:.0f} s (incremental over smaller N, 2 processes)")
        shapes = [PreparedVolume(i["image"]).shape for i in items]
    voxels = np.mean([np.prod(s) for s in shapes])
    print(
        f"mean preprocessed volume: {voxels / 1e6:.1f} Mvoxels = {voxels * 4 / 1e6:.0f} MB float32, "
        f"{voxels * 2 / 1e6:.0f} MB int16 (of {len(shapes)}; source {len(load_datalist(folder))} volumes)"
    )
    prepared = {"prepared_dir": prepared_dir, "hu_window": list(WINDOW)}  # the window the folder was prepared for
    print("path      N  procs  startup_s  rss_gb  pss_anon_gb  processes")
    for n in sorted(set(sizes) | set(old_sizes)):
        for processes in (1, 2):
            runs = []
            if n in old_sizes and n * voxels * 4 / 1e9 * processes <= old_max_processes_gb:
                runs.append(("old", old_configs, {"dataset_dir": folder, "num_volumes": n}))
            if n in sizes:
                runs.append(("prepared", new, {**prepared, "num_volumes": n}))
            for name, configs, overrides in runs:
                r = _startup(configs, processes, overrides, work)
                print(
                    f"{name:9s} {n:4d} {processes:5d} {r['startup_s']:10.1f} {r['rss_gb']:7.2f} "
                    f"{r['pss_anon_gb']:12.2f} {r['processes']:10d}",
                    flush=True,
                )
    new_rate = _pairs_per_second(new, {**prepared, "num_volumes": max(sizes)}, seconds)
    print(f"view pairs/s, one DataLoader worker, 96x96x16: prepared (N={max(sizes)}, memory maps) {new_rate:.1f}")
    cpu_rate = _pairs_per_second(new, {**prepared, "num_volumes": max(sizes)}, seconds, 0)
    print(f"view pairs per CPU-second (one thread, no worker), 96x96x16: prepared {cpu_rate:.1f}")
    if old_sizes:  # the old path caches its N volumes in this process first: its smallest N
        old_rate = _pairs_per_second(old_configs, {"dataset_dir": folder, "num_volumes": min(old_sizes)}, seconds)
        print(
            f"view pairs/s, one DataLoader worker, 96x96x16: old (N={min(old_sizes)}, cached) {old_rate:.1f}; "
            f"prepared / old {new_rate / old_rate:.2f}"
        )


def _drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def dtypes(sources: str = "../shared/data/unlabeled", crops: int = 20, seed: int = 0) -> None:
    """Stored dtype / layout table: int16 HU vs float16 and uint8 windowed, plain .npy read through memory maps."""
    from monai.transforms import Compose, LoadImaged
    from pgl_bundle.data import deterministic_transforms, load_datalist

    low, high = WINDOW
    encode = {  # stored array from the float32 HU volume, and back to windowed float32 intensities
        "float32 windowed": (lambda hu: np.clip((hu - low) / (high - low), 0, 1).astype(np.float32), lambda a: a),
        "int16 HU": (
            lambda hu: np.round(hu).astype(np.int16),
            lambda a: np.clip((a.astype(np.float32) - low) / (high - low), 0, 1),
        ),
        "float16 windowed": (
            lambda hu: np.clip((hu - low) / (high - low), 0, 1).astype(np.float16),
            lambda a: a.astype(np.float32),
        ),
        "uint8 windowed": (
            lambda hu: np.round(np.clip((hu - low) / (high - low), 0, 1) * 255).astype(np.uint8),
            lambda a: a.astype(np.float32) / 255,
        ),
    }
    chain = Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            *deterministic_transforms(WINDOW, None, (134, 134, 22)),
        ]
    )
    rng = np.random.default_rng(seed)
    work = tempfile.mkdtemp(prefix="benchmark_dtypes_")
    rows = {name: {"mb": [], "write_s": [], "cold_ms": [], "warm_ms": [], "error": 0.0} for name in encode}
    load_s = []
    cold_ok = True
    for item in load_datalist(sources):
        start = time.perf_counter()
        hu = chain({"image": item["image"]})["image"].numpy()
        load_s.append(time.perf_counter() - start)
        reference = encode["float32 windowed"][0](hu)
        boxes = [[int(rng.integers(0, s - c + 1)) for s, c in zip(hu.shape[1:], (134, 134, 22))] for _ in range(crops)]
        for name, (store, window) in encode.items():
            path = os.path.join(work, f"{name.split()[0]}.npy")
            start = time.perf_counter()
            np.save(path, store(hu))
            rows[name]["write_s"].append(time.perf_counter() - start)
            rows[name]["mb"].append(os.path.getsize(path) / 1e6)
            for cache in ("cold", "warm"):
                times = []
                for x, y, z in boxes:
                    if cache == "cold":
                        cold_ok &= _drop_page_cache()
                    start = time.perf_counter()
                    array = np.load(path, mmap_mode="r")
                    crop = window(np.ascontiguousarray(array[:, x : x + 134, y : y + 134, z : z + 22]))
                    times.append(time.perf_counter() - start)
                    if cache == "warm":
                        ref = reference[:, x : x + 134, y : y + 134, z : z + 22]
                        rows[name]["error"] = max(rows[name]["error"], float(np.abs(crop - ref).max()))
                rows[name][f"{cache}_ms"].append(np.median(times) * 1e3)
    print(
        f"{len(load_s)} volumes of {sources}; load + deterministic chain {np.mean(load_s):.2f} s per volume "
        f"(same for every dtype); page cache dropped for cold reads: {cold_ok}"
    )
    print("stored as          MB/volume  write_s  crop_cold_ms  crop_warm_ms  max_error")
    for name, r in rows.items():
        print(
            f"{name:18s} {np.mean(r['mb']):9.1f} {np.mean(r['write_s']):8.3f} {np.mean(r['cold_ms']):13.2f} "
            f"{np.mean(r['warm_ms']):13.3f} {r['error']:10.2e}"
        )


def views(image: str = "../shared/data/unlabeled/CRLM-CT-1004_ct.nii.gz", seconds: float = 10.0, rounds: int = 3):
    """View pairs per CPU-second (96 x 96 x 16, views + intensity augmentations, one thread): cut from the float32
    windowed volume in RAM (old path) vs from the int16 memory map, windowed per crop (prepared path); alternated."""
    import torch
    from monai.transforms import Compose, LoadImaged, ScaleIntensityRanged
    from pgl_bundle import RandPGLIntensityd, RandPGLViewsd
    from pgl_bundle.data import LoadPreparedd, deterministic_transforms, prepare

    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="benchmark_views_")
    os.symlink(os.path.abspath(image), os.path.join(folder, os.path.basename(image)))
    item = prepare(folder, os.path.join(folder, "prepared"), WINDOW)[0]
    in_ram = Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            *deterministic_transforms(WINDOW, None, (134, 134, 22)),
            ScaleIntensityRanged("image", *WINDOW, 0.0, 1.0, clip=True),
        ]
    )({"image": image})["image"]
    sides = {
        "old: float32 in RAM": (lambda: {"image": in_ram}, RandPGLViewsd("image", (96, 96, 16))),
        "prepared: int16 memory map": (
            lambda: LoadPreparedd("image")(item),
            RandPGLViewsd("image", (96, 96, 16), intensity_range=WINDOW),
        ),
    }
    intensity = RandPGLIntensityd(["view1", "view2"])
    rates = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (load, cut) in sides.items():
            count, start = 0, time.process_time()
            while time.process_time() - start < seconds:
                intensity(cut(load()))
                count += 1
            rates[name].append(count / (time.process_time() - start))
    for name, r in rates.items():
        print(f"{name:28s} {np.mean(r):7.1f} pairs per CPU-second (rounds: {', '.join(f'{v:.1f}' for v in r)})")
    old, new = (np.mean(r) for r in rates.values())
    print(f"prepared / old: {new / old:.2f}")


def _tree(ref: str) -> str:
    """``pgl_bundle`` and ``configs`` of git ref ``ref`` in a temporary folder, to run that code side by side."""
    folder = tempfile.mkdtemp(prefix="benchmark_data_old_")
    archive = subprocess.run(["git", "archive", ref, "pgl_bundle", "configs"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


def _side(tree: str, command: str, *args) -> dict:
    """Run this script's ``command`` (a ``*_side`` function) in a process whose ``pgl_bundle`` is ``tree``'s (one
    thread); return the JSON line it prints last."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])),
    }
    command_line = [sys.executable, os.path.abspath(__file__), command, *(str(a) for a in args)]
    result = subprocess.run(command_line, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def startup(
    prepared_dir: str,
    old: str,
    num_volumes: int = 100,
    rounds: int = 2,
    memory_at: int = 20,
    old_prepared_dir: str = "",
):
    """Start-up and memory of the prepared path, git ref ``old`` vs this tree, and the import floor, alternated.

    Start-up: launch to the end of the first step (tiny encoder); memory after ``memory_at`` steps (DataLoader
    workers in steady state), 1 and 2 (torchrun, gloo) processes. Floor: ``python -m monai.bundle run`` of a config
    that only imports (:data:`FLOOR`), i.e. what no change to this bundle can remove. ``old_prepared_dir``: the same
    sources prepared by ``old`` (its own stored layout; default ``prepared_dir``)."""
    work = tempfile.mkdtemp(prefix="benchmark_startup_")
    floor = os.path.join(work, "floor.json")
    with open(floor, "w") as f:
        json.dump(FLOOR, f)
    old_tree = _tree(old)
    trees = {"floor": ("", floor), f"old ({old})": (old_tree, ""), "new": (os.getcwd(), "")}
    overrides = {"num_volumes": num_volumes, "hu_window": list(WINDOW)}
    folders = {f"old ({old})": old_prepared_dir or prepared_dir}
    os.environ["BENCH_MEMORY_AT"] = str(memory_at)
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(rounds):
        for processes in (1, 2):
            for name, (tree, probe) in trees.items():
                configs = (
                    []
                    if probe
                    else [os.path.join(tree, "configs", c) for c in ("pretrain.json", "multi_gpu_pretrain.json")]
                )
                folder = {"prepared_dir": folders.get(name, prepared_dir)}
                runs.setdefault((name, processes), []).append(
                    _startup(configs, processes, {**overrides, **folder}, work, tree, probe)
                )
    keys = ["startup_s", "rss_gb", "pss_gb", "pss_anon_gb", "rank_pss_anon_gb", "workers_pss_anon_gb", "workers_rss_gb"]
    print(f"N={num_volumes}, {rounds} rounds alternated; memory after {memory_at} steps; GB summed over processes")
    print(f"{'code':14s} procs " + " ".join(f"{k:>20s}" for k in keys))
    mean = {run: {k: float(np.mean([r.get(k, 0.0) for r in rs])) for k in keys} for run, rs in runs.items()}
    for (name, processes), rs in runs.items():
        cells = [f"{mean[name, processes][k]:8.2f} ({'/'.join(f'{r.get(k, 0.0):.2f}' for r in rs)})" for k in keys]
        print(f"{name:14s} {processes:5d} " + " ".join(f"{c:>20s}" for c in cells))
    for name in trees:
        one, two = mean[name, 1], mean[name, 2]
        print(f"{name}: 2 processes / 1: " + ", ".join(f"{k} {two[k] / one[k]:.2f}x" for k in keys[1:4]))
    new, previous = mean["new", 1], mean[f"old ({old})", 1]
    ratios = {k: new[k] / previous[k] for k in ("startup_s", "pss_gb", "workers_pss_anon_gb")}
    print("new / old, 1 process: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"floor / new start-up, 1 process: {mean['floor', 1]['startup_s'] / new['startup_s']:.2f}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_side(config: str, prepared_dir: str, num_volumes: int, seconds: float, batch_size: int = 1) -> None:
    """One side of :func:`loader` (run in a process whose ``pgl_bundle`` is that side's): prints one JSON line."""
    import torch
    from monai.bundle import ConfigParser

    torch.set_num_threads(1)
    parser = ConfigParser()
    parser.read_config(config)
    overrides = {"prepared_dir": prepared_dir, "num_volumes": num_volumes, "hu_window": list(WINDOW)}
    parser.update({**TINY, **overrides, "num_workers": 1, "batch_size": batch_size, "patch_size": [96, 96, 16]})
    loader = parser.get_parsed_content("train#dataloader")
    loader.sampler.set_epoch(1)
    order = list(loader.sampler)
    count, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        loader.dataset[order[count % len(order)]]
        count += 1
    alone = count / (time.process_time() - start)
    iterator = iter(loader)
    next(iterator)
    worker = iterator._workers[0].pid
    count, wall, main, cpu = 0, time.perf_counter(), time.process_time(), _cpu_seconds(worker)
    while time.perf_counter() - wall < seconds:
        try:
            count += len(next(iterator)["view1"])  # view pairs (an epoch's last batch can be short)
        except StopIteration:
            iterator = iter(loader)
    worker_cpu, main_cpu, wall = _cpu_seconds(worker) - cpu, time.process_time() - main, time.perf_counter() - wall
    print(
        json.dumps(
            {"alone": alone, "worker": count / worker_cpu, "main_ms": main_cpu / count * 1e3, "wall": count / wall}
        )
    )


def loader(
    prepared_dir: str,
    old: str,
    num_volumes: int = 100,
    seconds: float = 10.0,
    rounds: int = 3,
    batch_size: int = 1,
    old_prepared_dir: str = "",
):
    """View pairs (96 x 96 x 16, views + intensity augmentations) per CPU-second, git ref ``old`` vs this tree,
    alternated: the transforms alone (``train#dataset[i]`` in order of the sampler, in the process) and through
    ``train#dataloader`` with one worker, batches of ``batch_size`` (per CPU-second of the worker, main process CPU
    per pair, wall). ``old_prepared_dir``: the same sources prepared by ``old`` (its own stored layout; default
    ``prepared_dir``)."""
    trees = {f"old ({old})": (_tree(old), old_prepared_dir or prepared_dir), "new": (os.getcwd(), prepared_dir)}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, (tree, folder) in trees.items():
            config = os.path.join(tree, "configs", "pretrain.json")
            runs[name].append(_side(tree, "loader_side", config, folder, num_volumes, seconds, batch_size))
    labels = {
        "alone": "transforms alone, pairs/CPU-s",
        "worker": "DataLoader, pairs/worker-CPU-s",
        "main_ms": "main process CPU ms/pair",
        "wall": "DataLoader pairs/wall-s",
    }
    print(
        f"N={num_volumes} prepared volumes, batch {batch_size}, {rounds} rounds of {seconds:.0f} s per measure, "
        "alternated"
    )
    for key, label in labels.items():
        cells = [
            f"{name}: {np.mean([r[key] for r in rs]):7.1f} ({', '.join(f'{r[key]:.1f}' for r in rs)})"
            for name, rs in runs.items()
        ]
        means = [np.mean([r[key] for r in rs]) for rs in runs.values()]
        print(f"{label:32s} " + "   ".join(cells) + f"   new / old {means[1] / means[0]:.2f}")


def parts(repeats: int = 200, rounds: int = 2) -> None:
    """CPU per call (one thread) of the pieces of a view pair this tree writes by hand, against what MONAI and
    PyTorch provide, side by side: the resize of a 134 x 134 x 22 box (int16 HU, windowed) to 96 x 96 x 16, the
    Gaussian blur of a view, seeding the pretraining chain's three random transforms."""
    import torch
    import torch.nn.functional as F
    from monai.networks.layers import GaussianFilter
    from monai.transforms import Compose
    from pgl_bundle import RandPGLIntensityd, RandPGLViewsd
    from pgl_bundle.distributed import reseed
    from pgl_bundle.intensity import gaussian_blur
    from pgl_bundle.views import resize_trilinear

    torch.set_num_threads(1)
    low, high = WINDOW
    box = torch.randint(-1100, 400, (1, BOX[2], BOX[0], BOX[1]), dtype=torch.int16).permute(0, 2, 3, 1)  # as read
    box_xyz = box.contiguous()  # as the layout before slices outermost gave it
    view = torch.rand(1, 96, 96, 16)
    chain = Compose([RandPGLViewsd("image", (96, 96, 16)), RandPGLIntensityd(["view1", "view2"])])
    pieces = {
        "window + resize of a box": (
            lambda: F.interpolate(
                ((box_xyz.float() - low) / (high - low)).clamp(0, 1)[None], (96, 96, 16), mode="trilinear"
            ),
            lambda: resize_trilinear(box.float().clamp_(low, high), (96, 96, 16)).sub_(low).div_(high - low),
        ),
        "Gaussian blur of a view, sigma 1": (
            lambda: GaussianFilter(3, sigma=1.0)(view[None]),
            lambda: gaussian_blur(view, 1.0),
        ),
        "seeding the chain (per sample)": (
            lambda: chain.set_random_state(seed=12345),
            lambda: reseed(chain, 12345),
        ),
    }
    print(f"ms per call, one thread, {repeats} calls x {rounds} rounds (MONAI / PyTorch | this tree)")
    for name, (stock, ours) in pieces.items():
        times = []
        for fn in (stock, ours) * rounds:
            fn()
            start = time.process_time()
            for _ in range(repeats):
                fn()
            times.append((time.process_time() - start) / repeats * 1e3)
        stock_ms, ours_ms = np.mean(times[0::2]), np.mean(times[1::2])
        print(f"{name:36s} {stock_ms:6.3f} | {ours_ms:6.3f}   {stock_ms / ours_ms:.2f}x")


def boxes_side(prepared_dir: str, num_volumes: int, per_volume: int) -> None:
    """One side of :func:`boxes` (run in a process whose ``pgl_bundle`` is that side's): prints one JSON line."""
    from pgl_bundle.data.prepared import PreparedVolume, load_prepared

    rng, times = np.random.default_rng(0), {"cold": [], "warm": []}
    for item in load_prepared(prepared_dir, WINDOW, num_items=num_volumes):
        volume = PreparedVolume(item["image"])
        for _ in range(per_volume):
            start = [int(rng.integers(0, n - s + 1)) for n, s in zip(volume.shape[1:], BOX)]
            box = (slice(None), *(slice(a, a + s) for a, s in zip(start, BOX)))
            for state in ("cold", "warm"):  # the same box twice: from disk, then from the page cache
                if state == "cold" and not _drop_page_cache():
                    raise SystemExit("cold reads need root (echo 1 > /proc/sys/vm/drop_caches)")
                begin = time.perf_counter()
                volume[box]
                times[state].append((time.perf_counter() - begin) * 1e3)
    print(json.dumps({f"{state}_ms": float(np.median(t)) for state, t in times.items()}))


def boxes(prepared_dir: str, old_prepared_dir: str, old: str, num_volumes: int = 10, per_volume: int = 5):
    """Time to read one 134 x 134 x 22 box from a prepared volume, cold (page cache dropped) and warm, median over
    ``num_volumes`` x ``per_volume`` boxes: git ref ``old``'s stored layout and reader (``old_prepared_dir``) vs this
    tree's (``prepared_dir``, the same sources). Needs root for the cold reads."""
    sides = {f"old ({old})": (_tree(old), old_prepared_dir), "new": (os.getcwd(), prepared_dir)}
    print(f"{num_volumes} volumes x {per_volume} boxes of {BOX}, median ms per box read")
    for name, (tree, folder) in sides.items():
        print(f"{name:16s} {json.dumps(_side(tree, 'boxes_side', folder, num_volumes, per_volume))}")


def workers(
    prepared_dir: str,
    counts=(1, 2, 4, 8),
    num_volumes: int = 100,
    batch_size: int = 32,
    seconds: float = 20.0,
    config: str = "configs/pretrain.json",
):
    """View pairs per wall-second through ``train#dataloader`` with each number of workers in ``counts`` (batches of
    ``batch_size``, 96 x 96 x 16), and per worker: how many workers a GPU needs, on the machine it runs on.
    ``config``: the pretraining config (another tree's, with that tree first on PYTHONPATH, for its old figures)."""
    import torch
    from monai.bundle import ConfigParser

    torch.set_num_threads(1)
    print(f"N={num_volumes}, batch {batch_size}, {os.cpu_count()} CPUs; {seconds:.0f} s per count after a first batch")
    for count in counts:
        parser = ConfigParser()
        parser.read_config(config)
        overrides = {"prepared_dir": prepared_dir, "num_volumes": num_volumes, "hu_window": list(WINDOW)}
        repeats = -(-50 * batch_size // num_volumes)  # epochs of 50 batches: their boundaries (a refill) stay rare
        overrides.update(num_workers=count, batch_size=batch_size, volume_repeats=repeats, patch_size=[96, 96, 16])
        parser.update({**TINY, **overrides})
        loader = parser.get_parsed_content("train#dataloader")
        epoch, pairs, start = 1, 0, None
        while start is None or time.perf_counter() - start < seconds:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                if start is None:
                    start = time.perf_counter()
                    continue
                pairs += len(batch["view1"])
                if time.perf_counter() - start >= seconds:
                    break
            epoch += 1
        rate = pairs / (time.perf_counter() - start)
        print(f"{count:3d} workers: {rate:8.1f} pairs/s, {rate / count:6.1f} per worker", flush=True)
        del loader


if __name__ == "__main__":
    fire.Fire(
        {
            "dtypes": dtypes,
            "corpus": corpus,
            "scale": scale,
            "views": views,
            "startup": startup,
            "loader": loader,
            "loader_side": loader_side,
            "workers": workers,
            "boxes": boxes,
            "parts": parts,
            "boxes_side": boxes_side,
        }
    )
