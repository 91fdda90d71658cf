"""The numbers behind the verdicts: Welch t intervals, binomial half-widths, test-set sizes,
chance levels, and whether a best value can be monotone when ties count both ways."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ablations.chance import chance_of

# test-set sizes of the built-in data sets at their defaults (a run's own test_size wins)
Z95 = 1.959963984540054  # two-sided 95% normal quantile
Z95_ONE_SIDED = 1.6448536269514722


def welch_interval(groups: Sequence[tuple[np.ndarray, float]], offset: float = 0.0,
                   level: float = 0.95) -> tuple[float, float, float, float]:
    """The ``level`` t interval of sum(weight * mean(values)) - offset over independent groups,
    with Welch-Satterthwaite degrees of freedom: (estimate, low, high, df). A group of
    identical values adds no variance; when no group has any, the interval is the point."""
    from scipy import stats  # lazy: scipy (slow to import; only the t95 rule needs it)

    estimate = sum(w * float(np.mean(v)) for v, w in groups) - offset
    terms = [(w * w * float(np.var(v, ddof=1)) / len(v), len(v) - 1) for v, w in groups]
    var = sum(t for t, _ in terms)
    if var <= 0:
        return estimate, estimate, estimate, math.inf
    df = var ** 2 / sum(t * t / dof for t, dof in terms if t > 0)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(var)
    return estimate, estimate - half, estimate + half, df


def binomial_half_width(p: float, n: float, z: float = Z95) -> float:
    """z * sqrt(p (1 - p) / n): how far an accuracy p measured on n test images moves by
    the luck of which images are in the test set."""
    if not (np.isfinite(p) and np.isfinite(n) and n > 0):
        return math.nan
    return z * math.sqrt(max(p * (1 - p), 0.0) / n)


def n_test_images(runs: pd.DataFrame) -> np.ndarray:
    """How many test images each run's accuracy was measured on: the run's ``test_images``
    (its summary), else its ``test_size``, else its data set's full test split
    (``sigprop.data`` ``DatasetInfo.test_images``; NaN for a data set this version does not
    know)."""
    n = pd.Series(np.nan, index=runs.index, dtype=float)
    for column in ("test_images", "test_size"):
        if column in runs:
            n = n.fillna(pd.to_numeric(runs[column], errors="coerce").astype(float))
    if "data" in runs and n.isna().any():
        from sigprop.data import DATASETS  # lazy: torch (sigprop.data imports it)

        n = n.fillna(runs["data"].map(
            lambda name: DATASETS[name].test_images if name in DATASETS else np.nan)
            .astype(float))
    return n.to_numpy(dtype=float)


def chance_levels(runs: pd.DataFrame, *, strict: bool = False) -> np.ndarray:
    """Each run's chance accuracy (:func:`ablations.chance.chance_of`: 1 / the model's
    ``num_classes``, else its data set's class count); NaN where neither is known.
    ``strict``: a data set this version does not know raises its :class:`UserError` instead,
    for a verdict must not quietly drop a diverged run (its value is its chance) where a
    table may leave a cell blank."""
    classes = runs["model.num_classes"] if "model.num_classes" in runs else [None] * len(runs)
    data = runs["data"] if "data" in runs else [None] * len(runs)
    levels = [chance_of(None if pd.isna(c) else c, d, strict=strict)
              for c, d in zip(classes, data)]
    return np.array([np.nan if level is None else level for level in levels], dtype=float)


def every_choice_monotone(tie_sets: Sequence[Sequence[float]], sign: int) -> bool:
    """Whether every sequence of one value per set, in order, is monotone: each set lies
    wholly on the right side of the one before."""
    return all(sign * (min(nxt) - max(prev)) >= 0 if sign > 0 else
               sign * (max(nxt) - min(prev)) >= 0
               for prev, nxt in zip(tie_sets, tie_sets[1:]))


def monotone_choice_exists(tie_sets: Sequence[Sequence[float]], sign: int) -> bool:
    """Whether one value per set, in order, can form a monotone sequence (greedy: keep the
    most room for the sets still to come)."""
    bound = -math.inf if sign > 0 else math.inf
    for tied in tie_sets:
        fits = [t for t in tied if sign * (t - bound) >= 0]
        if not fits:
            return False
        bound = min(fits) if sign > 0 else max(fits)
    return True
