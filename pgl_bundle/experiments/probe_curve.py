"""Dense-probe Dice against pretraining iterations, for PGL and BYOL: is pretraining learning useful dense features?

    python -m pgl_bundle probe_curve --labelled ../shared/data/sts --output_dir runs/probe_curve \
        --pgl_run runs/curve/pgl --byol_run runs/curve/byol --iterations "[0,125,250,500,1000]" \
        --hu_window "[-200,300]"

For each method, one pretraining run (``--pgl_run`` / ``--byol_run``: the ``bundle_root`` of a ``configs/pretrain.json``
run whose ``models/checkpoints/`` holds a full checkpoint at every requested iteration; when not given, the
command pretrains it itself into ``output_dir/pretrain/<method>``, keeping every checkpoint it needs). At every
requested iteration, the online encoder of that checkpoint is probed with ``configs/probe.json`` (frozen encoder,
linear per-voxel head trained on the first ``num_train_cases`` labelled cases, tested on the last
``num_test_cases``) once per seed; iteration 0 is a random encoder (seeded by the probe's seed), shared by both
methods. Each probe runs in ``output_dir/probes/<method>_it<iteration>_seed<seed>`` and is skipped when its
per-case Dice file exists, so an interrupted curve resumes. Probes run seed by seed (every point at the first seed,
then at the next), so a curve stopped early still covers every point. Writes ``probe_curve.csv`` (method,
iteration, seed, case, dice), ``probe_curve.md`` (mean ± sd) and ``probe_curve.png``.
"""

from __future__ import annotations

import csv
import os
import statistics
from collections.abc import Sequence

from pgl_bundle.data import load_datalist
from pgl_bundle.experiments.compare import PRESETS
from pgl_bundle.experiments.runner import (
    CONFIGS,
    checkpoints_by_iteration,
    pretrain,
    run_all,
    run_bundle,
    write_datalist,
)

__all__ = ["probe_curve"]

METHODS = ("pgl", "byol")
RANDOM = "random"
RESULT = "val_mean_dice_raw.csv"  # per test case, in <probe>/eval/probe/


def _dice_per_case(probe_dir: str, labelled_dir: str) -> list[tuple[str, float]]:
    """Per test case (its image path relative to the labelled data), the mean foreground Dice of a finished probe."""
    with open(os.path.join(probe_dir, "eval", "probe", RESULT)) as f:
        rows = list(csv.reader(f))[1:]
    return [(os.path.relpath(row[0], labelled_dir), float(row[-1])) for row in rows]


def probe_curve(
    labelled: str,
    output_dir: str = "runs/probe_curve",
    pgl_run: str = "",
    byol_run: str = "",
    unlabelled: Sequence[str] = (),
    iterations: Sequence[int] = (0, 250, 500, 1000),
    seeds: Sequence[int] = (0, 1, 2),
    num_train_cases: int = 5,
    num_test_cases: int = 10,
    probe_iterations: int = 100,
    patch_size: Sequence[int] = (96, 96, 16),
    hu_window: Sequence[float] = (-200, 300),
    preset: str = "cpu",
    label_names: Sequence[str] = ("background", "tumour"),
    num_workers: int = 0,
    parallel: int = 0,
    report_only: bool = False,
) -> str:
    """Run the probe curve; return the path of ``probe_curve.md``.

    Args:
        labelled: labelled data (MSD-style dataset.json or its folder); the first ``num_train_cases`` cases train
            the probe, the last ``num_test_cases`` test it.
        output_dir: where every probe (and pretraining run, if any) writes; rerunning skips finished probes.
        pgl_run, byol_run: ``bundle_root`` of an existing pretraining run of that method; empty: pretrain here.
        unlabelled: pretraining volumes when a method is pretrained here; empty: the labelled data's images.
        iterations: pretraining iterations to probe; 0 is the random initialisation.
        seeds: probe seeds (crops, head initialisation and, at iteration 0, the random encoder).
        num_train_cases, num_test_cases: the labelled split.
        probe_iterations: training iterations of each probe (batches of 2 volumes x 2 label-balanced crops).
        patch_size: the probe's training crops and test windows.
        hu_window: intensity window of the probes and of any pretraining here; use the pretraining runs' window.
        preset: the :data:`pgl_bundle.experiments.presets.PRESETS` entry whose encoder (and pretraining settings) to
            use; the encoder must be the pretraining runs' one.
        label_names: class names of the labelled data, background first.
        num_workers: data loader workers of every stage.
        parallel: probes run at once (several small runs fill one GPU); 0: the preset's (1 unless it says otherwise).
        report_only: run nothing; write the report from the probes finished so far (it lists the others).
    """
    settings = PRESETS[preset]
    threads = settings.get("threads_per_stage", 0)
    output_dir, labelled = os.path.abspath(output_dir), os.path.abspath(labelled)
    labelled_dir = labelled if os.path.isdir(labelled) else os.path.dirname(labelled)
    points = [(RANDOM, 0)] if 0 in iterations else []
    points += [(method, i) for method in METHODS for i in sorted(iterations) if i > 0]
    probes = {(m, i, s): os.path.join(output_dir, "probes", f"{m}_it{i}_seed{s}") for s in seeds for m, i in points}
    if not report_only:
        os.makedirs(output_dir, exist_ok=True)
        items = load_datalist(labelled, keys=["image", "label"])
        if num_train_cases + num_test_cases > len(items):
            raise ValueError(
                f"{labelled}: {len(items)} cases, fewer than {num_train_cases} training + {num_test_cases} test."
            )
        # the probes' datalist: the same training and test cases, without the others (each probe checks every file)
        split = os.path.join(output_dir, "labelled.json")
        write_datalist(split, items[:num_train_cases] + items[-num_test_cases:])
        common = {**settings["model"], "hu_window": list(hu_window), "num_workers": num_workers}
        runs = {"pgl": pgl_run, "byol": byol_run}
        checkpoints = {}
        for method in METHODS if any(i > 0 for i in iterations) else ():
            if not runs[method]:
                sources = [os.path.abspath(s) for s in unlabelled] or [labelled]
                images = [item for source in sources for item in load_datalist(source)]
                unlabelled_json = write_datalist(os.path.join(output_dir, "unlabelled.json"), images)
                runs[method] = os.path.join(output_dir, "pretrain", method)
                pretrain(
                    method,
                    runs[method],
                    unlabelled_json,
                    [i for i in iterations if i > 0],
                    {**common, **settings["pretrain"]},
                    threads,
                )
            checkpoints[method] = checkpoints_by_iteration(os.path.abspath(runs[method]))
            missing = [i for i in iterations if i > 0 and i not in checkpoints[method]]
            if missing:
                raise FileNotFoundError(
                    f"{runs[method]}/models/checkpoints: no checkpoint at iteration(s) {missing} "
                    f"(found: {sorted(checkpoints[method])})."
                )
        probe = {
            **common,
            "dataset_dir": split,
            "label_names": list(label_names),
            "num_val_cases": 0,
            "num_train_cases": num_train_cases,
            "num_test_cases": num_test_cases,
            "batch_size": 2,
            "num_samples": 2,
            "probe_iterations": probe_iterations,
            "patch_size": list(patch_size),
        }

        def run_probe(key: tuple[str, int, int]) -> None:
            (method, iteration, seed), root = key, probes[key]
            if not os.path.isfile(os.path.join(root, "eval", "probe", RESULT)):
                source = {"pretraining_checkpoint": checkpoints[method][iteration]} if iteration else {}
                run_bundle(CONFIGS["probe"], root, {**probe, **source, "seed": seed}, threads=threads)

        run_all(run_probe, [(key,) for key in probes], parallel or settings.get("parallel", 1), "probe curve")
    done = {k: root for k, root in probes.items() if os.path.isfile(os.path.join(root, "eval", "probe", RESULT))}
    rows = [(*key, case, dice) for key, root in done.items() for case, dice in _dice_per_case(root, labelled_dir)]
    return _report(output_dir, rows, sorted(iterations), [os.path.basename(probes[k]) for k in probes if k not in done])


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _report(output_dir: str, rows: list[tuple], iterations: list[int], unfinished: list[str]) -> str:
    """Write probe_curve.csv, probe_curve.md and probe_curve.png from the finished probes; return the table's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(output_dir, "probe_curve.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "iteration", "seed", "case", "dice"])
        writer.writerows(rows)

    def cell(method: str, iteration: int) -> tuple[float, float, int, float] | None:
        """Mean and sd over seeds and cases, the number of seeds, the sd of the per-seed means (the probe's noise)."""
        key = (RANDOM if iteration == 0 else method, iteration)
        by_seed = {}
        for r in rows:
            if r[:2] == key:
                by_seed.setdefault(r[2], []).append(r[4])
        if not by_seed:
            return None
        values = [v for seed_values in by_seed.values() for v in seed_values]
        seed_means = [statistics.fmean(v) for v in by_seed.values()]
        return (*_mean_sd(values), len(by_seed), _mean_sd(seed_means)[1])

    header = "| method | " + " | ".join("0 (random init)" if i == 0 else f"{i}" for i in iterations) + " |"
    table = [header, "| --- |" + " --- |" * len(iterations)]
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        cells = [cell(method, i) for i in iterations]
        text = [f"{c[0]:.3f} ± {c[1]:.3f} ({c[2]} seeds, ± {c[3]:.3f})" if c else "-" for c in cells]
        table.append(f"| {method} | " + " | ".join(text) + " |")
        shown = [(i, c) for i, c in zip(iterations, cells) if c]
        axis.errorbar(
            [i for i, _ in shown],
            [c[0] for _, c in shown],
            yerr=[c[3] for _, c in shown],
            marker="o",
            capsize=3,
            label=method.upper(),
        )
    baseline = cell(METHODS[0], 0)
    if baseline:
        axis.axhline(baseline[0], color="grey", linestyle="--", label="random init")
    axis.set_xlabel("pretraining iterations")
    axis.set_ylabel("dense-probe mean Dice on test cases")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "probe_curve.png"), dpi=120)
    plt.close(figure)
    note = (
        "Mean ± sd over test cases and seeds of the per-case mean foreground Dice; in brackets, the number of "
        "probe seeds and the sd of the per-seed means (error bars of the plot). Iteration 0 is a randomly "
        "initialised encoder (one per seed), shared by both rows."
    )
    if unfinished:
        note += f" Not finished, left out: {', '.join(unfinished)}."
    with open(os.path.join(output_dir, "probe_curve.md"), "w") as f:
        f.write("\n".join(table) + "\n\n" + note + "\n")
    return os.path.join(output_dir, "probe_curve.md")
