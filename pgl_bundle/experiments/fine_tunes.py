"""The fine-tunes of a comparison (:mod:`.compare`): which runs, with which recipe, in which order.

A :class:`Run` names one fine-tuning (encoder, strategy, encoder factor, budget, seed, schedule length, learning
rate); the functions here turn the preset and the selection's result into the lists of runs that
:func:`pgl_bundle.experiments.compare.compare` trains and tests. Nothing here runs anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pgl_bundle.experiments.presets import PRETRAINED_ONLY, STRATEGIES

__all__ = [
    "Run",
    "best_against_best",
    "curve_runs",
    "method_of",
    "probe_runs",
    "select",
    "selection_runs",
    "stretched",
    "stretched_runs",
    "test_order",
]


@dataclass(frozen=True)
class Run:
    """One fine-tuning: an encoder (``random``, ``pgl375``, ...), a strategy and encoder factor, a budget, a seed,
    the schedule's length (0: the preset's; else the preset's schedule stretched to that many iterations) and the
    learning rate (0: the preset's; else this one, named in the folder)."""

    encoder: str
    strategy: str
    scale: float
    budget: int
    seed: int
    iterations: int = 0
    learning_rate: float = 0.0

    @property
    def method(self) -> str:
        """``random``, ``pgl`` or ``byol``."""
        return method_of(self.encoder)

    @property
    def slug(self) -> str:
        length = f"_it{self.iterations}" if self.iterations else ""
        rate = f"_lr{self.learning_rate:g}" if self.learning_rate else ""
        return f"{self.encoder}_{self.strategy}_x{self.scale:g}_n{self.budget}_seed{self.seed}{length}{rate}"


def stretched(finetune: dict, iterations: int) -> dict:
    """The fine-tuning schedule of ``finetune`` stretched to ``iterations``: validation interval and warm-up in the
    same proportion (so a strategy's phases, resolved from the validation interval, keep their share)."""
    factor = iterations / finetune["num_iterations"]
    return {
        "num_iterations": iterations,
        "val_interval": max(1, round(finetune["val_interval"] * factor)),
        "warmup_iterations": round(finetune.get("warmup_iterations", 0) * factor),
    }


def select(scores: dict[Run, float]) -> tuple[dict[tuple[str, str], float], dict[str, str]]:
    """Per method and strategy, the encoder factor with the best validation Dice; per method, the best strategy.

    Args:
        scores: best validation Dice of each selection run.

    Returns:
        ``{(method, strategy): factor}`` and ``{method: strategy}``; ties go to the earlier strategy (the order of
        :data:`STRATEGIES`) and the smaller factor.
    """
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for run in sorted(scores, key=lambda r: (list(STRATEGIES).index(r.strategy), r.scale)):
        key = (run.method, run.strategy)
        if key not in best or scores[run] > best[key][1]:
            best[key] = (run.scale, scores[run])
    factors = {key: scale for key, (scale, _) in best.items()}
    strategies: dict[str, str] = {}
    for (method, strategy), (_, dice) in best.items():
        if method not in strategies or dice > best[method, strategies[method]][1]:
            strategies[method] = strategy
    return factors, strategies


def curve_runs(
    encoders: Sequence[str],
    chosen: dict[str, str],
    factors: dict[tuple[str, str], float],
    also: Sequence[str],
    budgets: Sequence[int],
    encoder_budgets: dict[str, Sequence[int]],
    seeds: Sequence[int],
    recipe_of: str = "",
) -> list[Run]:
    """The label-budget curve: every encoder with its method's selected strategy (a BYOL encoder: PGL's; with
    ``recipe_of``, that method's for every encoder, random included: recipe for recipe) and the ``also`` strategies,
    each at its selected factor, at its budgets (``encoder_budgets``, else ``budgets``)."""
    runs = []
    for encoder in encoders:
        method = recipe_of or _selecting_method(encoder)
        names = [chosen[method], *also] if method in chosen else []
        for strategy in dict.fromkeys(s for s in names if (method, s) in factors):
            for budget in encoder_budgets.get(encoder, budgets):
                runs += [Run(encoder, strategy, factors[method, strategy], budget, seed) for seed in seeds]
    return list(dict.fromkeys(runs))


def probe_runs(curve: Sequence[Run], factors: dict[tuple[str, str], float], seed: int) -> list[Run]:
    """The floor's runs: for every encoder and budget of ``curve`` without a run that has a linear-probe phase, one
    ``lp-ft`` run (``seed``, its method's selected LP-FT factor), whose linear probe the report sets beside the
    encoder's fine-tuned runs. None where LP-FT was not among the selection's strategies."""
    probed = {(r.encoder, r.budget) for r in curve if STRATEGIES[r.strategy].get("linear_probe_iterations")}
    runs = []
    for encoder, budget in dict.fromkeys((r.encoder, r.budget) for r in curve):
        factor = factors.get((_selecting_method(encoder), "lp-ft"))
        if (encoder, budget) not in probed and factor is not None:
            runs.append(Run(encoder, "lp-ft", factor, budget, seed))
    return runs


def best_against_best(
    encoders: Sequence[str],
    chosen: dict[str, str],
    factors: dict[tuple[str, str], float],
    budget: int,
    seeds: Sequence[int],
) -> list[Run]:
    """Each encoder with its own method's selected strategy and factor at the selection budget, every seed."""
    return [
        Run(encoder, chosen[method_of(encoder)], factors[method_of(encoder), chosen[method_of(encoder)]], budget, seed)
        for encoder in encoders
        if method_of(encoder) in chosen
        for seed in seeds
    ]


def _recipe(run: Run, chosen: dict[str, str], factors: dict[tuple[str, str], float], recipe_of: str) -> tuple:
    """The (strategy, factor) the curve gives ``run``'s encoder."""
    method = recipe_of or _selecting_method(run.encoder)
    return (chosen[method], factors[method, chosen[method]]) if method in chosen else ()


def method_of(encoder: str) -> str:
    """``pgl`` of ``pgl375`` and of ``pgl-openkbp`` (an encoder file from elsewhere), ``random`` of ``random``."""
    return re.match("[a-z]*", encoder).group()


def _selecting_method(encoder: str) -> str:
    """The method whose selection an encoder's curve runs take: its own, PGL's for a BYOL encoder."""
    return "pgl" if encoder.startswith("byol") else method_of(encoder)


def selection_runs(
    encoders: Sequence[str],
    strategies: Sequence[str],
    scales: Sequence[float],
    budget: int,
    seed: int,
    learning_rate: float = 0.0,
    strategy_scales: dict[str, Sequence[float]] | None = None,
    only: dict[str, Sequence[str]] | None = None,
) -> list[Run]:
    """The selection: every encoder with every strategy (``only``: an encoder's subset; a random encoder not with
    :data:`PRETRAINED_ONLY`'s) at every factor (``strategy_scales``: a strategy's own), one budget and seed.

    Paired runs first: the strategies every encoder tries, each factor's encoders side by side, so a selection
    stopped early compares encoders on equal terms."""
    strategy_scales, only = strategy_scales or {}, only or {}
    runs = [
        Run(encoder, strategy, scale, budget, seed, learning_rate=learning_rate)
        for encoder in encoders
        for strategy in strategies
        if not (encoder == "random" and strategy in PRETRAINED_ONLY) and strategy in only.get(encoder, strategies)
        for scale in strategy_scales.get(strategy, scales)
    ]
    tried_by = {s: sum(r.strategy == s for r in runs) for s in strategies}
    return sorted(
        runs,
        key=lambda r: (-tried_by[r.strategy], strategies.index(r.strategy), -r.scale, encoders.index(r.encoder)),
    )


def stretched_runs(
    curve: Sequence[Run],
    budget: int,
    lengths: Sequence[int],
    chosen: dict[str, str],
    factors: dict[tuple[str, str], float],
    recipe_of: str = "",
) -> list[Run]:
    """Accuracy or speed: the curve's runs at ``budget`` with the curve's recipe (not best against best's), again
    at each of ``lengths`` iterations (:func:`stretched`); the preset's own length is the curve."""
    return [
        replace(r, iterations=n)
        for r in curve
        if r.budget == budget and (r.strategy, r.scale) == _recipe(r, chosen, factors, recipe_of)
        for n in lengths
    ]


def test_order(
    runs: Sequence[Run],
    last: Sequence[Sequence[Run]],
    first_encoders: Sequence[str],
    budgets: Sequence[int],
    first_budgets: Sequence[int],
) -> list[Run]:
    """``runs`` in the order they are trained and tested: ``first_encoders`` (the selection's) before the others,
    ``first_budgets`` before the other budgets, seed by seed, then budget by budget (``budgets``' order), and the
    groups of ``last`` (e.g. probes, then stretched schedules) after everything else, the last group last. A
    comparison stopped early has whole seeds of its main arms."""
    order = {budget: i for i, budget in enumerate(budgets)}
    return sorted(
        dict.fromkeys(runs),
        key=lambda r: (
            [r in group for group in reversed(last)],
            r.encoder not in first_encoders,
            r.budget not in first_budgets,
            r.seed,
            order.get(r.budget, -1),
        ),
    )
