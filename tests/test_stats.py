"""The paired bootstrap interval on inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from pgl_bundle.experiments.stats import paired_bootstrap


def test_constant_difference_gives_a_zero_width_interval_at_that_value():
    a = np.linspace(0.2, 0.8, 10)
    result = paired_bootstrap(a + 0.05, a)
    assert result.mean == pytest.approx(0.05)
    assert result.low == pytest.approx(0.05) and result.high == pytest.approx(0.05)


def test_pairing_removes_the_spread_between_cases():
    """Large case-to-case spread, small consistent difference: paired, the interval excludes 0."""
    a = np.array([0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4, 0.6, 0.35])
    diffs = np.array([0.02, 0.03, 0.01, 0.04, 0.02, 0.03, 0.02, 0.01, 0.03, 0.02])
    result = paired_bootstrap(a + diffs, a)
    assert 0 < result.low < result.mean < result.high < 0.05


def test_symmetric_differences_centre_the_interval_on_zero():
    b = np.full(20, 0.5)
    a = b + np.array([0.1, -0.1] * 10)
    result = paired_bootstrap(a, b, n_resamples=20000)
    assert result.mean == pytest.approx(0.0, abs=1e-12)
    assert result.low < 0 < result.high
    assert result.low == pytest.approx(-result.high, abs=0.01)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([0.1, 0.2, 0.3], [0.1, 0.2])
