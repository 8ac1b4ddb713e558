"""The comparison's report: ``selection.csv``, ``results.csv``, ``results.md`` (one table: encoder x strategy x
budget) and ``results.png`` (the label-budget curve), from the finished runs of :mod:`pgl_bundle.experiments.compare`.
"""

from __future__ import annotations

import csv
import os
import statistics
from collections.abc import Callable

from pgl_bundle.experiments.runner import dice_per_case, dice_per_class
from pgl_bundle.experiments.stats import PairedDifference, paired_bootstrap

__all__ = ["LEVEL", "verdict", "write_report"]

TEST, PROBE = "eval", "eval_linear_probe"  # folders of a run's test of its model and of its linear probe


def _scores(run_root: str, folder: str) -> dict[str, float]:
    """Per test case, the Dice of one evaluation of a run; empty when it has not run."""
    path = os.path.join(run_root, folder)
    return dict(dice_per_case(path)) if os.path.isfile(os.path.join(path, "val_mean_dice_raw.csv")) else {}


def _seeds_averaged(runs: list, scores: dict) -> dict[str, float]:
    """Per test case scored by every run, the mean over the runs (seeds)."""
    cases = set.intersection(*(set(scores[r]) for r in runs)) if runs else set()
    return {c: statistics.fmean(scores[r][c] for r in runs) for c in sorted(cases)}


def _interval(a: dict[str, float], b: dict[str, float]) -> PairedDifference | None:
    """Paired bootstrap of ``a - b`` over their common cases; None with fewer than 2."""
    common = sorted(set(a) & set(b))
    return paired_bootstrap([a[c] for c in common], [b[c] for c in common]) if len(common) > 1 else None


def _text(difference: PairedDifference | None) -> str:
    return str(difference) if difference else ""


def _on_common_seeds(mine: list, theirs: list, test: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Per test case, the seeds-averaged scores of ``mine`` and of ``theirs`` on the seeds both have (empty without
    one). A seed fixes the crops drawn and the new layers' initialisation, so an arm stopped after fewer seeds is
    compared with the same seeds."""
    seeds = {r.seed for r in mine} & {r.seed for r in theirs}
    a, b = ([r for r in runs if r.seed in seeds] for runs in (mine, theirs))
    return _seeds_averaged(a, test), _seeds_averaged(b, test)


def _paired(mine: list, theirs: list, test: dict) -> PairedDifference | None:
    """Paired bootstrap of ``mine - theirs`` (e.g. PGL's runs against random's) on the seeds both have; None without
    one."""
    return _interval(*_on_common_seeds(mine, theirs, test))


def _ahead(mine: list, theirs: list, test: dict) -> str:
    """On how many of the common test cases ``mine`` scores above ``theirs`` (seeds averaged): ``"31 of 50"``."""
    a, b = _on_common_seeds(mine, theirs, test)
    common = set(a) & set(b)
    return f"{sum(a[c] > b[c] for c in common)} of {len(common)}"


def _per_seed(mine: list, theirs: list, test: dict) -> list[float]:
    """Per seed both arms have, in seed order: the mean over their common test cases of ``mine - theirs``."""
    by_seed = {r.seed: r for r in theirs}
    differences = []
    for r in sorted((r for r in mine if r.seed in by_seed), key=lambda r: r.seed):
        other = test[by_seed[r.seed]]
        differences.append(statistics.fmean(test[r][c] - other[c] for c in set(test[r]) & set(other)))
    return differences


# The decision rule, fixed before any OpenKBP test patient was scored (docs/results.md): an arm is better than
# another when the paired interval lies above 0 and it is ahead at every seed; level when the interval lies within
# +-LEVEL, a difference no user would pretrain for; undecided otherwise.
LEVEL = 0.02


def verdict(difference: PairedDifference, per_seed: list[float]) -> str:
    """``better``, ``worse``, ``level`` or ``undecided``, by the rule above."""
    if difference.low > 0 and all(d > 0 for d in per_seed):
        return "better"
    if difference.high < 0 and all(d < 0 for d in per_seed):
        return "worse"
    return "level" if -LEVEL <= difference.low and difference.high <= LEVEL else "undecided"


def _source(encoder: str) -> str:
    """The pretraining an encoder came from: "" for the comparison's own (``pgl375``), ``-<tag>`` for an external
    encoder file (``pgl-openkbp``), so PGL is set against the BYOL of the same pretraining."""
    return encoder.lstrip("abcdefghijklmnopqrstuvwxyz").lstrip("0123456789")


def _recipe(strategy: str, scale: float, iterations: int = 0) -> str:
    """A fine-tuning recipe as the tables name it: ``joint (x0.1)``, ``joint, 600 it (x0.1)`` for a stretched
    schedule."""
    length = f", {iterations} it" if iterations else ""
    return f"{strategy}{length} (x{scale:g})"


def _byol_of(cells: dict[tuple, list], encoder: str, recipe: str, budget: int) -> list:
    """The runs of the BYOL encoder of ``encoder``'s pretraining (:func:`_source`) with the same recipe and budget."""
    return [
        r
        for (e, other, b), runs in cells.items()
        if e.startswith("byol") and (_source(e), other, b) == (_source(encoder), recipe, budget)
        for r in runs
    ]


def write_report(
    output_dir: str,
    selection: dict,
    curve: list,
    probes: list,
    root: Callable,
    factors: dict,
    chosen: dict[str, str],
    class_names: list[str] = (),
    iterations: int = 0,
) -> str:
    """Write the report; return the path of ``results.md``.

    Args:
        output_dir: the comparison's folder.
        selection: ``{Run: best validation Dice}`` of the selection runs.
        curve: the label-budget curve's runs.
        probes: the runs that give the curve's encoders their probes (in the table, not on the plot).
        root: a run's folder.
        factors, chosen: :func:`pgl_bundle.experiments.fine_tunes.select`'s result.
        class_names: the foreground classes' names, for the per-class table (else ``class0``, ...).
        iterations: the preset's fine-tuning length: where runs with stretched schedules exist, test Dice against
            fine-tuning iterations goes to ``results_iterations.png``, the curve's runs at this length included.
    """
    with open(os.path.join(output_dir, "selection.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["encoder", "strategy", "encoder_lr_scale", "budget", "seed", "best_val_mean_dice"])
        writer.writerows((r.encoder, r.strategy, r.scale, r.budget, r.seed, v) for r, v in selection.items())
    runs = list(dict.fromkeys([*curve, *probes, *selection]))
    test = {r: _scores(root(r), TEST) for r in runs}
    probe = {r: _scores(root(r), PROBE) for r in runs}
    for r in runs:  # a run without a linear-probe phase: the probe of a run of the same encoder, budget and seed
        key = (r.encoder, r.budget, r.seed)
        probe[r] = probe[r] or next((probe[o] for o in runs if probe[o] and (o.encoder, o.budget, o.seed) == key), {})
    runs = [r for r in runs if test[r]]
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["encoder", "strategy", "encoder_lr_scale", "budget", "seed", "case", "dice", "probe_dice"])
        for r in runs:
            fields = (r.encoder, r.strategy, r.scale, r.budget, r.seed)
            writer.writerows((*fields, case, dice, probe[r].get(case, "")) for case, dice in test[r].items())

    # one cell per encoder, recipe and budget: the same strategy at two factors (e.g. random at PGL's recipe and at
    # its own) or at two schedule lengths are two rows
    cells: dict[tuple, list] = {}
    for r in runs:
        cells.setdefault((r.encoder, _recipe(r.strategy, r.scale, r.iterations), r.budget), []).append(r)
    lines = [
        "| encoder | strategy (encoder lr factor) | budget | seeds | test Dice | per seed | probe Dice "
        "| fine-tuned - probe | vs random, same recipe | vs random, its selected recipe | vs BYOL, same recipe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    decisions = [
        "| encoder | strategy (encoder lr factor) | budget | against | PGL - other | per seed | PGL ahead on "
        "| verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (encoder, recipe, budget), mine in sorted(cells.items(), key=lambda c: (c[0][2], c[0][0] != "random", c[0])):
        per_seed = [statistics.fmean(test[r].values()) for r in mine]
        probed = [r for r in mine if probe[r]]
        floor = ["", ""]
        if probed:
            floor = [
                f"{statistics.fmean(statistics.fmean(probe[r].values()) for r in probed):.3f}",
                _text(_interval(_seeds_averaged(probed, test), _seeds_averaged(probed, probe))),
            ]
        own = chosen.get("random")
        own = _recipe(own, factors["random", own], mine[0].iterations) if own else ""
        against = {  # the columns' arms, as the decision table names them
            "random, same recipe": cells.get(("random", recipe, budget), []) if encoder != "random" else [],
            "random, its selected recipe": cells.get(("random", own, budget), []) if encoder != "random" else [],
            "BYOL, same recipe": _byol_of(cells, encoder, recipe, budget) if encoder.startswith("pgl") else [],
        }
        differences = {name: _paired(mine, theirs, test) for name, theirs in against.items()}
        versus = [_text(d) for d in differences.values()]
        for name, difference in differences.items():
            if encoder.startswith("pgl") and difference and not (name.endswith("selected recipe") and own == recipe):
                apart = _per_seed(mine, against[name], test)
                each = ", ".join(f"{d:+.3f}" for d in apart)
                row = [encoder, recipe, budget, name, difference, each, _ahead(mine, against[name], test)]
                decisions.append("| " + " | ".join(map(str, [*row, verdict(difference, apart)])) + " |")
        mean = statistics.fmean(per_seed)
        seeds = ", ".join(f"{v:.3f}" for v in per_seed)
        row = [encoder, recipe, budget, len(mine), f"{mean:.3f}", seeds, *floor, *versus]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    _plot(os.path.join(output_dir, "results.png"), [r for r in curve if test.get(r)], test)
    stretched = [r for r in runs if r.iterations]
    if stretched:
        recipes = {(r.encoder, r.strategy, r.scale, r.budget) for r in stretched}
        same = [r for r in runs if not r.iterations and (r.encoder, r.strategy, r.scale, r.budget) in recipes]
        _plot_iterations(os.path.join(output_dir, "results_iterations.png"), stretched + same, test, iterations)
    per_class = _per_class_table(cells, root, class_names)
    chosen_text = "; ".join(f"{m}: {s} (x{factors[m, s]:g})" for m, s in chosen.items())
    rates = sorted({r.learning_rate for r in [*curve, *selection] if r.learning_rate})
    if rates:  # compare's choose_learning_rate
        chosen_text += f"; fine-tuning learning rate {', '.join(f'{v:g}' for v in rates)} (learning_rate.csv)"
    note = (
        f"Selected on validation (first seed, selection budget; selection.csv): {chosen_text}. Test Dice: per-case "
        "mean foreground Dice on the held-out cases through configs/evaluate.json (inference's sliding window), "
        "averaged over cases, then over seeds (per seed: each seed's mean over cases). Probe Dice: the same run's "
        "linear probe (frozen encoder, linear head: the end of its linear-probe phase), or that of a run of the same "
        "encoder, budget and seed. Intervals: per test case, seeds averaged, paired 95 % percentile bootstrap over "
        "cases (pgl_bundle.experiments.stats.paired_bootstrap) of fine-tuned - probe and of the difference to random "
        "(on the seeds both have)."
    )
    decided = ""
    if len(decisions) > 2:
        decided = (
            f"Decision, by a rule fixed before any result: better, the interval above 0 and PGL ahead at every seed; "
            f"worse, the interval below 0 and PGL behind at every seed; level, the interval within +-{LEVEL:g}; else "
            "undecided. Per seed: the mean over test cases of PGL - other; PGL ahead on: test cases (seeds "
            "averaged).\n\n" + "\n".join(decisions) + "\n\n"
        )
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        tables = "\n".join(lines) + "\n\n" + note + "\n\n" + decided + per_class
        f.write(tables + _selection_table(selection, chosen, factors) + "\n")
    return os.path.join(output_dir, "results.md")


def _per_class_table(cells: dict[tuple, list], root: Callable, class_names: list[str]) -> str:
    """Mean test Dice of each class (over test cases, then seeds) per encoder, recipe and budget, and for each PGL
    encoder the per-class paired intervals against random and BYOL with the same recipe; "" for one class.

    The evaluation's csv names the classes ``class0``, ...; ``class_names`` (foreground, in label order) renames them
    where it has one name per column."""
    runs = [r for group in cells.values() for r in group]
    found = {r: dice_per_class(os.path.join(root(r), TEST)) for r in runs}  # {run: {case: {column: dice}}}
    columns = next((list(next(iter(cases.values()))) for cases in found.values() if cases), [])
    if len(columns) < 2:
        return ""
    names = list(class_names) if len(class_names) == len(columns) else columns
    by_class = {
        name: {r: {case: dice[column] for case, dice in found[r].items()} for r in runs}
        for name, column in zip(names, columns)
    }  # {class: {run: {case: dice}}}, the shape _paired takes
    header = "| encoder | strategy (encoder lr factor) | budget | " + " | ".join(names) + " |"
    rule = "| --- | --- | --- |" + " --- |" * len(names)
    means, versus = [header, rule], [header.replace("| budget |", "| budget | against |"), rule + " --- |"]
    for (encoder, recipe, budget), mine in sorted(cells.items(), key=lambda c: (c[0][2], c[0][0] != "random", c[0])):
        values = [statistics.fmean(statistics.fmean(by_class[n][r].values()) for r in mine) for n in names]
        means.append(f"| {encoder} | {recipe} | {budget} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        if not encoder.startswith("pgl"):
            continue
        others = {"random": cells.get(("random", recipe, budget), []), "BYOL": _byol_of(cells, encoder, recipe, budget)}
        for against, theirs in others.items():
            if theirs:
                row = [_text(_paired(mine, theirs, by_class[n])) for n in names]
                versus.append(f"| {encoder} | {recipe} | {budget} | {against} | " + " | ".join(row) + " |")
    text = "Test Dice per class (mean over test cases, then seeds).\n\n" + "\n".join(means) + "\n\n"
    if len(versus) > 2:
        text += "PGL - random and PGL - BYOL per class, same recipe (intervals as above).\n\n"
        text += "\n".join(versus) + "\n\n"
    return text


def _selection_table(selection: dict, chosen: dict[str, str], factors: dict) -> str:
    """Best validation Dice of each selection run: strategy rows, encoder x factor columns; the chosen in bold."""
    columns = sorted({(r.encoder, r.scale) for r in selection}, key=lambda c: (c[0] != "random", c))
    strategies = list(dict.fromkeys(r.strategy for r in selection))
    by_key = {(r.strategy, r.encoder, r.scale): v for r, v in selection.items()}
    methods = {r.encoder: r.method for r in selection}
    lines = [
        "| strategy | " + " | ".join(f"{e} x{s:g}" for e, s in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for strategy in strategies:
        cells = []
        for encoder, scale in columns:
            value = by_key.get((strategy, encoder, scale))
            method = methods[encoder]
            best = chosen.get(method) == strategy and factors.get((method, strategy)) == scale
            cells.append("" if value is None else f"**{value:.3f}**" if best else f"{value:.3f}")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "Selection: best validation Dice (first seed, selection budget).\n\n" + "\n".join(lines)


def _plot_iterations(path: str, runs: list, test: dict, default: int) -> None:
    """Mean test Dice against fine-tuning iterations (a run without ``iterations`` ran ``default``), one line per
    encoder, strategy and budget; error bars: sd over seeds."""
    lines: dict[str, dict[int, list[float]]] = {}
    for r in sorted(runs, key=lambda r: (r.encoder, r.strategy, r.budget)):
        points = lines.setdefault(f"{r.encoder}, {_recipe(r.strategy, r.scale)}, {r.budget} cases", {})
        points.setdefault(r.iterations or default, []).append(statistics.fmean(test[r].values()))
    _draw(path, lines, "fine-tuning iterations", log_x=False)


def _plot(path: str, curve: list, test: dict) -> None:
    """Mean test Dice against the label budget, one line per encoder and strategy; error bars: sd over seeds."""
    lines: dict[str, dict[int, list[float]]] = {}
    for r in curve:
        points = lines.setdefault(f"{r.encoder}, {_recipe(r.strategy, r.scale)}", {})
        points.setdefault(r.budget, []).append(statistics.fmean(test[r].values()))
    _draw(path, lines, "labelled training cases", log_x=True)


def _draw(path: str, lines: dict[str, dict[int, list[float]]], xlabel: str, log_x: bool) -> None:
    """One line per label, its points' mean against x with the sd over their values as error bars, saved to
    ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        xs = sorted(points)
        means = [statistics.fmean(points[x]) for x in xs]
        spread = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        axis.errorbar(xs, means, yerr=spread, marker="o", capsize=3, label=label)
    if log_x:
        ticks = sorted({x for points in lines.values() for x in points})
        axis.set_xscale("log")
        axis.set_xticks(ticks, [str(x) for x in ticks])
        axis.minorticks_off()  # the log axis's minor labels (2 x 10^0, ...) would sit between the budgets
    axis.set_xlabel(xlabel)
    axis.set_ylabel("mean test Dice (seeds averaged)")
    if lines:  # no finished run yet: axes without a legend
        axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
