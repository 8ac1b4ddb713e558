"""Which pretraining iteration becomes a method's encoder: the one whose frozen features read out best on the
validation cases (the dense linear probe of ``configs/probe.json``), never on test cases.

For each method and each candidate iteration (a full pretraining checkpoint), one probe: a per-voxel linear head on
the frozen online encoder, trained on the first ``budget`` cases of the training pool and scored on the validation
cases. The best mean validation Dice wins; ties go to the earlier iteration. Each probe runs in
``<output_dir>/encoder_choice/<method>_it<iteration>`` and is skipped when its result exists;
``encoder_choice.csv`` lists every candidate's score and the choice.
"""

from __future__ import annotations

import csv
import os
import statistics

from pgl_bundle.experiments.runner import CONFIGS, dice_per_case, run_all, run_bundle, write_datalist

__all__ = ["choose_iterations", "best_iterations"]

RESULT = os.path.join("eval", "probe", "val_mean_dice_raw.csv")  # a finished probe's per-case Dice


def best_iterations(scores: dict[tuple[str, int], float]) -> dict[str, int]:
    """``{method: iteration}`` with the best validation probe Dice of ``{(method, iteration): Dice}``; ties: the
    earlier iteration."""
    best: dict[str, tuple[int, float]] = {}
    for (method, iteration), dice in sorted(scores.items()):
        if method not in best or dice > best[method][1]:
            best[method] = (iteration, dice)
    return {method: iteration for method, (iteration, _) in best.items()}


def choose_iterations(
    output_dir: str,
    checkpoints: dict[str, dict[int, str]],
    train_items: list[dict],
    validation_items: list[dict],
    probe: dict,
    seed: int,
    parallel: int,
    threads: int,
    report_only: bool = False,
) -> dict[str, int]:
    """Probe every candidate checkpoint on the validation cases; return ``{method: chosen iteration}``.

    Args:
        output_dir: the comparison's folder; the probes run in ``encoder_choice/``.
        checkpoints: per method, ``{iteration: full pretraining checkpoint}`` of the candidates.
        train_items, validation_items: the probe's training cases and the validation cases that score it.
        probe: ``configs/probe.json`` overrides (model, plan, patch, labels, probe schedule).
        seed: the probes' seed (crops and head initialisation).
        parallel, threads: probes at once, and each one's threads.
        report_only: run no probe; choose among the finished ones.

    Raises:
        FileNotFoundError: a method without any finished probe, with ``report_only``.
    """
    folder = os.path.join(output_dir, "encoder_choice")
    os.makedirs(folder, exist_ok=True)
    datalist = write_datalist(os.path.join(folder, "labelled.json"), train_items + validation_items)
    values = {
        **probe,
        "dataset_dir": datalist,
        "num_train_cases": len(train_items),
        "num_val_cases": 0,
        "num_test_cases": len(validation_items),
        "seed": seed,
    }
    candidates = [(method, iteration) for method in checkpoints for iteration in sorted(checkpoints[method])]

    def root(method: str, iteration: int) -> str:
        return os.path.join(folder, f"{method}_it{iteration}")

    def probe_one(method: str, iteration: int) -> float:
        if not os.path.isfile(os.path.join(root(method, iteration), RESULT)):
            source = {"pretraining_checkpoint": checkpoints[method][iteration]}
            run_bundle(CONFIGS["probe"], root(method, iteration), {**values, **source}, threads=threads)
        return statistics.fmean(
            dice for _, dice in dice_per_case(os.path.join(root(method, iteration), "eval", "probe"))
        )

    if report_only:
        candidates = [(m, i) for m, i in candidates if os.path.isfile(os.path.join(root(m, i), RESULT))]
        missing = sorted(set(checkpoints) - {m for m, _ in candidates})
        if missing:
            raise FileNotFoundError(f"{folder}: no finished validation probe of {missing}; run without --report_only.")
    scores = dict(zip(candidates, run_all(probe_one, candidates, parallel, "encoder choice")))
    chosen = best_iterations(scores)
    with open(os.path.join(output_dir, "encoder_choice.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "iteration", "validation_probe_dice", "chosen"])
        writer.writerows((m, i, f"{d:.4f}", chosen[m] == i) for (m, i), d in scores.items())
    return chosen
