"""Paired comparison of two initialisations on the same test cases: mean difference and a bootstrap interval.

The unit of resampling is the test case: both arms are scored on the same held-out cases, so the difference is taken
per case (paired) and the cases are resampled with replacement (``scipy.stats.bootstrap(..., paired=True)``). Seeds
are averaged per case before; their spread is reported beside the interval, not inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

__all__ = ["PairedDifference", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired cases and its bootstrap confidence interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    confidence: float
    num_cases: int

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0
) -> PairedDifference:
    """Percentile bootstrap interval of ``mean(a - b)``, resampling the pairs ``(a[i], b[i])``.

    The percentile method (not BCa) so that a constant difference gives the zero-width interval at that value
    instead of BCa's undefined acceleration.

    Args:
        a, b: one score per test case for each arm, in the same case order.
        confidence: coverage of the interval.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling, so a report is reproducible.

    Raises:
        ValueError: ``a`` and ``b`` differ in length or hold fewer than 2 cases.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired_bootstrap needs two equally long lists of at least 2 cases: {a.shape}, {b.shape}.")
    result = bootstrap(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return PairedDifference(float(np.mean(a - b)), float(interval.low), float(interval.high), confidence, len(a))
