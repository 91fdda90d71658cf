"""How the evidence reads: metric values and differences, selections with ``@min`` / ``@max``
resolved, run counts, and the tally of verdicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ablations.claims.base import ACCURACY_METRICS, VERDICTS, Claim, Verdict, on_log_scale
from ablations.claims.selection import is_number, resolve_extreme


def fmt(claim: Claim, value: float, difference: bool = False) -> str:
    """A metric value ('97.6%'), or a difference of two ('4.0 points' for fractions; 'x2.0'
    for the frontier metrics, whose differences are log2 ratios)."""
    if on_log_scale(claim):
        return f"x{2 ** value:.3g}" if difference else f"{value:.3g}"
    if claim.metric in ("final_acc", "best_acc", "clip_fraction"):
        return f"{100 * value:.1f} points" if difference else f"{100 * value:.1f}%"
    return f"{value:.3g}"


def fmt_signed(claim: Claim, value: float) -> str:
    return f"{'+' if value >= 0 else '−'}{fmt(claim, abs(value), difference=True)}"


def fmt_spread(claim: Claim, value: float) -> str:
    if on_log_scale(claim):
        return f"{value:.2f} doublings"
    return fmt(claim, value, difference=True)


def fv(value: Any) -> str:
    """A run key's value as written in a selection ('0.01', 'agc')."""
    return f"{value:g}" if is_number(value, finite=False) else str(value)


def selection_text(runs: pd.DataFrame, selection: Mapping[str, list]) -> str:
    """'batch_size=512, clip.mode=agc' with @min/@max resolved."""
    parts = []
    for key, values in selection.items():
        shown = [fv(resolve_extreme(runs, key, v)) for v in values]
        parts.append(f"{key}={shown[0] if len(shown) == 1 else '/'.join(shown)}")
    return ", ".join(parts)


def describe(claim: Claim, values: np.ndarray, done: pd.DataFrame, total: int) -> str:
    """'97.6% (97.0–98.3%), 3 runs, 1 diverged (at chance)'."""
    if not len(values):
        text = "no value"
    else:
        spread = (f" ({fmt(claim, values.min())}–{fmt(claim, values.max())})"
                  if len(values) > 1 else "")
        mean = 2 ** np.log2(values).mean() if on_log_scale(claim) else values.mean()
        text = f"{fmt(claim, mean)}{spread}"
    n_div = int(done["status"].eq("diverged").sum()) if "status" in done else 0
    noun = "cell" if "frontier_status" in done else "run"
    parts = [f"{len(done)} {noun}{'s' if len(done) != 1 else ''}"]
    if "frontier_status" in done:
        for status, words in (("stable_to_lr_max", "stable up to lr_max (counted at lr_max)"),
                              ("unstable_at_lr_min", "unstable at lr_min (left out)")):
            n = int(done["frontier_status"].eq(status).sum())
            if n:
                parts.append(f"{n} {words}")
    if total > len(done):
        parts.append(f"{total - len(done)} not finished")
    if n_div:
        note = " (at chance)" if claim.metric in ACCURACY_METRICS else ""
        parts.append(f"{n_div} diverged{note}")
    return f"{text}; {', '.join(parts)}"


def too_few(claim: Claim, counts: Mapping[str, int]) -> str:
    short = [f"{name} has {n}" for name, n in counts.items() if n < claim.min_runs]
    if not short:
        return ""
    return f"too few finished runs (needs {claim.min_runs} per selection; {', '.join(short)})"


def verdict_counts(verdicts: Sequence[Verdict]) -> str:
    """'2 hold, 1 inconclusive'."""
    counts = {v: sum(x.verdict == v for x in verdicts) for v in VERDICTS}
    return ", ".join(f"{n} {'hold' if v == 'holds' and n != 1 else v}"
                     for v, n in counts.items() if n)
