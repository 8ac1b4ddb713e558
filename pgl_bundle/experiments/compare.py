"""Random vs BYOL vs PGL initialisation on labelled CT: the paper's claim as one rerunnable command.

    python -m pgl_bundle compare --labelled ../shared/data/sts --output_dir runs/compare --preset cpu \
        --unlabelled "['../shared/data/unlabeled','../shared/data/sts']"

Stages, each a ``python -m monai.bundle run`` of this bundle's own configs in a folder of its own, skipped
when its output already exists (so an interrupted comparison resumes where it stopped):

1. pretrain PGL and BYOL on the unlabelled volumes, once per pretraining length;
2. fine-tune every arm (random init, and each pretrained encoder) at every learning rate of the sweep, on the
   first ``n`` labelled training cases, for each budget ``n`` and seed, with the same iterations and warm-up; a
   pretrained encoder trains at ``encoder_lr_scale`` times the decoder's rate (``configs/train.json``);
3. per arm and budget, keep the learning rate with the best mean validation Dice over seeds (``sweep.csv``);
4. evaluate those runs, every seed, on the held-out test cases (the last ``num_test_cases`` of the datalist);
5. write ``results.csv`` (one row per arm, budget, seed and test case), ``results.md`` (mean test Dice, spread over
   seeds and over cases, and paired bootstrap intervals of PGL - random and PGL - BYOL) and ``results.png``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pgl_bundle.data import load_datalist
from pgl_bundle.stats import paired_bootstrap
from tqdm import tqdm

__all__ = ["PRESETS", "Arm", "compare", "select_learning_rates"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "pgl": ["configs/pretrain.json"],
    "byol": ["configs/pretrain.json", "configs/pretrain_byol.json"],
    "train": ["configs/train.json"],
    "evaluate": ["configs/train.json", "configs/evaluate.json"],
}


@dataclass(frozen=True)
class Arm:
    """One way to initialise the segmentation encoder.

    Args:
        init: ``"random"``, ``"pgl"`` or ``"byol"``.
        pretrain_epochs: pretraining length (pretrained arms only).
    """

    init: str
    pretrain_epochs: int = 0

    @property
    def name(self) -> str:
        return "random" if self.init == "random" else f"{self.init} {self.pretrain_epochs}ep"

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_")


def _arms(pretrain_epochs: Sequence[int]) -> list[Arm]:
    """Random init, plus PGL and BYOL at every pretraining length."""
    return [Arm("random")] + [Arm(method, e) for method in ("pgl", "byol") for e in pretrain_epochs]


# Fine-tuning: configs/train.json's recipe (AdamW, warm-up + cosine, iterations, validation every val_interval
# iterations keeping the best); every arm gets every learning rate of the sweep, pretrained encoders at
# encoder_lr_scale times it. Timings of cpu and gpu-10min: docs/results.md ("Presets").
PRESETS: dict[str, dict] = {
    # end-to-end check of the machinery, seconds per stage (CI)
    "tiny": {
        "model": {"encoder_layers": [1, 1, 1, 1], "encoder_block": "basic", "encoder_width": [16, 16, 32, 32]},
        "pretrain": {"patch_size": [64, 64, 16], "hidden_channels": 64, "batch_size": 2, "num_volumes": 4},
        "finetune": {
            "patch_size": [64, 64, 16],
            "batch_size": 2,
            "num_samples": 1,
            "num_iterations": 2,
            "val_interval": 1,
            "warmup_iterations": 1,
            "decoder_channels": [32, 16, 16, 8, 8],
        },
        "pretrain_epochs": [1],
        "learning_rates": [1e-3],
        "encoder_lr_scale": 0.1,
        "budgets": [2],
        "seeds": [0],
        "num_val_cases": 1,
        "num_test_cases": 2,
        "parallel": 2,  # two stages at a time: start-up (imports) is most of a tiny stage, one core each
        "threads_per_stage": 1,  # two stages of 2 threads on 2 cores spin-wait: 2.3x slower than one at a time
    },
    # 2 CPU cores, at most 3 hours (estimate: docs/results.md)
    "cpu": {
        "model": {"encoder_layers": [1, 1, 1, 1], "encoder_block": "bottleneck", "encoder_width": [32, 64, 128, 256]},
        "pretrain": {"patch_size": [64, 64, 16], "hidden_channels": 1024, "batch_size": 4, "learning_rate": 0.001},
        "finetune": {
            "patch_size": [64, 64, 32],
            "batch_size": 2,
            "num_samples": 2,
            "num_iterations": 240,
            "val_interval": 80,
            "warmup_iterations": 20,
        },
        "pretrain_epochs": [20],
        "learning_rates": [3e-4, 1e-3],
        "encoder_lr_scale": 0.1,
        "budgets": [5],
        "seeds": [0, 1, 2],
        "num_val_cases": 2,
        "num_test_cases": 10,
        "parallel": 2,  # two stages at a time, one thread each: one per core
        "threads_per_stage": 1,
    },
    # one H100/H200, at most 10 minutes, ResNet-50 at the paper's pretraining patch (measured: docs/results.md)
    "gpu-10min": {
        "model": {"encoder_layers": [3, 4, 6, 3], "encoder_block": "bottleneck", "encoder_width": [64, 128, 256, 512]},
        "pretrain": {
            "patch_size": [96, 96, 16],
            "batch_size": 32,
            "volume_repeats": 16,  # ~20 volumes x 16 / 32: about 10 batches per epoch, every worker busy
            "learning_rate": 0.001,
            "warmup_epochs": 1,
            "amp": True,
            "compile": False,  # compiling the dual-path ResNet-50 costs about as long as the whole pretraining here
            "num_workers": 6,
            "checkpoint_interval": 1000,  # the final checkpoint only (1.1 GB each)
        },
        "finetune": {
            "patch_size": [96, 96, 32],
            "batch_size": 2,
            "num_samples": 2,
            "num_iterations": 300,
            "val_interval": 100,
            "warmup_iterations": 30,
            "amp": True,
            "num_workers": 2,
        },
        "pretrain_epochs": [15],
        "learning_rates": [3e-4, 1e-3],
        "encoder_lr_scale": 0.1,
        "budgets": [5],
        "seeds": [0, 1, 2],
        "num_val_cases": 2,
        "num_test_cases": 10,
        "parallel": 6,  # small runs side by side fill one GPU; 16 host cores
        "threads_per_stage": 2,
    },
    # the paper's settings (method spec, section 6): for GPUs, hours
    "paper": {
        "model": {"encoder_layers": [3, 4, 6, 3], "encoder_block": "bottleneck", "encoder_width": [64, 128, 256, 512]},
        "pretrain": {
            "patch_size": [96, 96, 16],
            "batch_size": 128,
            "learning_rate": 0.2,
            "warmup_epochs": 2,
            "amp": True,
            "optimizer#_target_": "pgl_bundle.LARS",
        },
        "finetune": {
            "patch_size": [160, 160, 48],
            "batch_size": 8,
            "num_samples": 1,
            "num_iterations": 10000,
            "val_interval": 500,
            "warmup_iterations": 500,
            "amp": True,
        },
        "pretrain_epochs": [100, 500],
        "learning_rates": [1e-4, 3e-4, 1e-3],
        "encoder_lr_scale": 0.1,
        "budgets": [2, 5, 18],
        "seeds": [0, 1, 2],
        "num_val_cases": 2,
        "num_test_cases": 10,
    },
}


def _run_bundle(configs: list[str], bundle_root: str, overrides: dict, run_id: str = "run", threads: int = 0) -> None:
    """``python -m monai.bundle run`` in a subprocess; its log is appended to ``bundle_root/log.txt``.

    ``threads``: the subprocess's ``OMP_NUM_THREADS`` (torch's intra-op threads, and its data workers'); 0: inherited.
    """
    files = "[" + ",".join(repr(os.path.join(_ROOT, c)) for c in configs) + "]"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        files,
        "--bundle_root",
        bundle_root,
        "--logging_file",
        os.path.join(_ROOT, "configs", "logging.conf"),
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    os.makedirs(bundle_root, exist_ok=True)
    with open(os.path.join(bundle_root, "log.txt"), "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        result = subprocess.run(cmd, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        with open(os.path.join(bundle_root, "log.txt")) as log:
            tail = log.read()[-3000:]  # the failed run's output is the end of the log
        raise RuntimeError(f"stage in {bundle_root} failed ({' '.join(cmd)}):\n{tail}")


def _write_datalist(path: str, items: list[dict]) -> str:
    with open(path, "w") as f:
        json.dump({"training": items}, f, indent=1)
    return path


def _mean_dice_per_case(eval_dir: str) -> list[tuple[str, float]]:
    """Per test case, the mean foreground Dice from MONAI's ``MetricsSaver`` raw CSV."""
    with open(os.path.join(eval_dir, "val_mean_dice_raw.csv")) as f:
        rows = list(csv.reader(f))
    return [(row[0], float(row[-1])) for row in rows[1:]]


def _best_validation_dice(bundle_root: str) -> float:
    """The best validation Dice of the last training run logged in ``bundle_root/log.txt`` (MONAI's evaluator line)."""
    with open(os.path.join(bundle_root, "log.txt")) as f:
        found = re.findall(r"Key metric: val_mean_dice best value: ([0-9.eE+-]+)", f.read())
    if not found:
        raise RuntimeError(f"{bundle_root}/log.txt: the training logged no validation; cannot rank its learning rate.")
    return float(found[-1])


def select_learning_rates(sweep: Sequence[tuple[Arm, float, int, int, float]]) -> dict[tuple[Arm, int], float]:
    """Per arm and budget, the learning rate with the best validation Dice averaged over seeds (no test case seen).

    Args:
        sweep: ``(arm, learning_rate, budget, seed, best validation Dice)`` of every fine-tuning run.

    Returns:
        ``{(arm, budget): learning rate}``; ties go to the smaller rate.
    """
    scores: dict[tuple[Arm, int], dict[float, list[float]]] = {}
    for arm, lr, n, _, dice in sweep:
        scores.setdefault((arm, n), {}).setdefault(lr, []).append(dice)
    return {key: max(sorted(by_lr), key=lambda lr: statistics.mean(by_lr[lr])) for key, by_lr in scores.items()}


def compare(
    labelled: str,
    unlabelled: Sequence[str] = (),
    output_dir: str = "runs/compare",
    preset: str = "cpu",
    label_names: Sequence[str] = ("background", "tumour"),
    budgets: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    pretrain_epochs: Sequence[int] | None = None,
    learning_rates: Sequence[float] | None = None,
    num_workers: int = 0,
    parallel: int = 0,
) -> str:
    """Run the comparison; return the path of ``results.md``. Preset values can be overridden by the arguments.

    Args:
        labelled: the labelled data (MSD-style dataset.json or its folder); its last ``num_test_cases`` cases
            are the test set, the ``num_val_cases`` before them select the checkpoint and the learning rate, the
            rest is the training pool.
        unlabelled: sources of pretraining volumes (folders, dataset.json files, globs or single files);
            empty: the labelled data's images.
        output_dir: where every stage writes; rerunning skips finished stages.
        preset: ``tiny``, ``cpu``, ``gpu-10min`` or ``paper`` (see :data:`PRESETS`).
        label_names: class names of the labelled data, background first.
        budgets, seeds, pretrain_epochs, learning_rates: override the preset's.
        num_workers: data loader workers of every stage (unless the preset sets them).
        parallel: stages run at once; 0: the preset's (1 unless it says otherwise).
    """
    settings = PRESETS[preset]
    threads = settings.get("threads_per_stage", 0)
    budgets, seeds = budgets or settings["budgets"], seeds or settings["seeds"]
    pretrain_epochs = pretrain_epochs or settings["pretrain_epochs"]
    learning_rates = learning_rates or settings["learning_rates"]
    output_dir, labelled = os.path.abspath(output_dir), os.path.abspath(labelled)
    os.makedirs(output_dir, exist_ok=True)
    labelled_items = load_datalist(labelled, keys=["image", "label"])
    pool = len(labelled_items) - settings["num_val_cases"] - settings["num_test_cases"]
    if max(budgets) > pool:
        raise ValueError(
            f"{labelled}: budget {max(budgets)} exceeds the {pool} training cases left after validation and test."
        )
    sources = [os.path.abspath(s) for s in unlabelled] or [labelled]
    images = []
    for source in sources:
        images += (
            [{"image": source}] if os.path.isfile(source) and not source.endswith(".json") else load_datalist(source)
        )
    unlabelled_json = _write_datalist(os.path.join(output_dir, "unlabelled.json"), images)
    common = {"num_workers": num_workers, **settings["model"]}
    arms = _arms(pretrain_epochs)
    finetune = {
        **common,
        **settings["finetune"],
        "dataset_dir": labelled,
        "num_val_cases": settings["num_val_cases"],
        "num_test_cases": settings["num_test_cases"],
        "label_names": list(label_names),
    }
    # the learning rate is chosen on the first seed's validation Dice; the other seeds rerun the chosen rate only
    sweep_runs = [(arm, lr, n, seeds[0]) for n in budgets for arm in arms for lr in learning_rates]
    timings = {}

    def run_dir(arm: Arm, lr: float, n: int, seed: int) -> str:
        return os.path.join(output_dir, "finetune", f"{arm.slug}_lr{lr:g}_n{n}_seed{seed}")

    def overrides(arm: Arm, lr: float, n: int, seed: int) -> dict:
        # overwrite: an interrupted fine-tuning stage starts afresh (its old model is moved aside, not lost)
        values = {**finetune, "num_train_cases": n, "seed": seed, "learning_rate": lr, "overwrite": True}
        if arm.init != "random":
            values["encoder_lr_scale"] = settings["encoder_lr_scale"]
            values["pretrained_encoder"] = os.path.join(
                output_dir, "pretrain", f"{arm.init}_{arm.pretrain_epochs}ep", "models", "pretrained_encoder.pt"
            )
        return values

    def pretrain(method: str, epochs: int) -> None:
        root = os.path.join(output_dir, "pretrain", f"{method}_{epochs}ep")
        if not os.path.isfile(os.path.join(root, "models", "pretrained_encoder.pt")):
            start = time.time()
            _run_bundle(
                CONFIGS[method],
                root,
                {
                    **common,
                    **settings["pretrain"],
                    "dataset_dir": unlabelled_json,
                    "max_epochs": epochs,
                    "resume_from": "latest",
                },
                run_id="training",
                threads=threads,
            )
            timings[root] = time.time() - start

    def fine_tune(arm: Arm, lr: float, n: int, seed: int) -> float:
        root = run_dir(arm, lr, n, seed)
        done = os.path.join(root, "validation.json")
        if not os.path.isfile(done):
            start = time.time()
            _run_bundle(CONFIGS["train"], root, overrides(arm, lr, n, seed), threads=threads)
            with open(done, "w") as f:
                json.dump({"best_val_mean_dice": _best_validation_dice(root)}, f)
            timings[root] = time.time() - start
        with open(done) as f:
            return json.load(f)["best_val_mean_dice"]

    def test(arm: Arm, lr: float, n: int, seed: int) -> None:
        root = run_dir(arm, lr, n, seed)
        if not os.path.isfile(os.path.join(root, "eval", "val_mean_dice_raw.csv")):
            start = time.time()
            _run_bundle(CONFIGS["evaluate"], root, overrides(arm, lr, n, seed), threads=threads)
            timings[root + "/eval"] = time.time() - start

    # stages are subprocesses: `parallel` of them share the machine (several small runs fill one GPU)
    with ThreadPoolExecutor(max_workers=parallel or settings.get("parallel", 1)) as pool:

        def each(function, jobs: list[tuple], desc: str) -> list:
            return list(tqdm(pool.map(lambda job: function(*job), jobs), total=len(jobs), desc=desc, unit="run"))

        each(pretrain, [(m, e) for m in ("pgl", "byol") for e in pretrain_epochs], "pretrain")
        sweep = [(*run, dice) for run, dice in zip(sweep_runs, each(fine_tune, sweep_runs, "learning-rate sweep"))]
        selected = select_learning_rates(sweep)
        each(fine_tune, [(arm, selected[arm, n], n, seed) for arm, n in selected for seed in seeds[1:]], "seeds")
        each(test, [(arm, selected[arm, n], n, seed) for arm, n in selected for seed in seeds], "test")
    with open(os.path.join(output_dir, "timings.json"), "a") as f:
        json.dump(timings, f)
        f.write("\n")
    return _report(output_dir, arms, budgets, seeds, sweep, selected, run_dir)


def _report(
    output_dir: str, arms: list[Arm], budgets: Sequence[int], seeds: Sequence[int], sweep: list, selected: dict, run_dir
) -> str:
    """Write sweep.csv, results.csv, results.md and results.png from the finished runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(output_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "learning_rate", "budget", "seed", "best_val_mean_dice"])
        writer.writerows((a.name, lr, n, seed, v) for a, lr, n, seed, v in sweep)
    rows = []
    for (arm, n), lr in selected.items():
        for seed in seeds:
            eval_dir = os.path.join(run_dir(arm, lr, n, seed), "eval")
            rows += [(arm.name, n, lr, seed, case, dice) for case, dice in _mean_dice_per_case(eval_dir)]
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "budget", "learning_rate", "seed", "case", "dice"])
        writer.writerows(rows)

    def per_case(name: str, n: int) -> dict[str, float]:
        """Per test case, the Dice averaged over seeds."""
        cases = sorted({r[4] for r in rows if r[:2] == (name, n)})
        return {c: statistics.mean(r[5] for r in rows if r[:2] == (name, n) and r[4] == c) for c in cases}

    def per_seed(name: str, n: int) -> list[float]:
        """Per seed, the Dice averaged over test cases."""
        return [statistics.mean(r[5] for r in rows if r[:2] == (name, n) and r[3] == s) for s in seeds]

    sd = lambda values: statistics.stdev(values) if len(values) > 1 else 0.0  # noqa: E731
    table = [
        "| arm | budget | learning rate (by validation) | test Dice | sd over seeds | sd over cases |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm in arms:
        means, spreads = [], []
        for n in budgets:
            seed_means, case_means = per_seed(arm.name, n), list(per_case(arm.name, n).values())
            means.append(statistics.mean(seed_means))
            spreads.append(sd(seed_means))
            table.append(
                f"| {arm.name} | {n} | {selected[arm, n]:g} | {means[-1]:.3f} | {spreads[-1]:.3f} | "
                f"{sd(case_means):.3f} |"
            )
        axis.errorbar(budgets, means, yerr=spreads, marker="o", capsize=3, label=arm.name)
    pairs = [
        (a, b)
        for a in arms
        if a.init == "pgl"
        for b in arms
        if b.init == "random" or (b.init == "byol" and b.pretrain_epochs == a.pretrain_epochs)
    ]
    differences = [
        "| difference | budget | mean | 95 % interval (paired bootstrap over test cases) |",
        "| --- | --- | --- | --- |",
    ]
    for a, b in pairs:
        for n in budgets:
            da, db = per_case(a.name, n), per_case(b.name, n)
            result = paired_bootstrap([da[c] for c in da], [db[c] for c in da])
            differences.append(
                f"| {a.name} - {b.name} | {n} | {result.mean:+.3f} | [{result.low:+.3f}, {result.high:+.3f}] |"
            )
    axis.set_xlabel("labelled training cases")
    axis.set_ylabel("mean Dice on held-out cases")
    axis.set_xticks(list(budgets))
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "results.png"), dpi=120)
    note = (
        f"Test Dice: per-case mean foreground Dice on the held-out cases, averaged over cases and {len(seeds)} "
        "seed(s) at the learning rate each arm reached its best mean validation Dice with (sweep.csv); sd over "
        "seeds: of the per-seed means; sd over cases: of the per-case means over seeds. Differences: per test "
        "case, seeds averaged, then a 95 % percentile bootstrap over cases (pgl_bundle.stats.paired_bootstrap)."
    )
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(table) + "\n\n" + "\n".join(differences) + "\n\n" + note + "\n")
    return os.path.join(output_dir, "results.md")
