"""Claims with a relation (compare, spread, interaction): the relation and margin they parse,
and the two rules that decide it, seed ranges (``range``) and the 95% Welch t interval
(``t95``), which the manual in :mod:`ablations.claims` states in words."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ablations.claims.base import (
    ACCURACY_METRICS,
    DERIVED_MARGINS,
    FRONTIER_METRICS,
    RELATIONS,
    RULES,
    Claim,
    ClaimError,
    Verdict,
    number,
)
from ablations.claims.format import fmt_signed
from ablations.claims.stats import welch_interval
from sigprop.fields import Rule, check_value, one_of

DERIVED_MARGIN = Rule(lambda v: v in DERIVED_MARGINS,
                      "a number or one of " + ", ".join(DERIVED_MARGINS), lambda: DERIVED_MARGINS)


@dataclass
class Relational(Claim):
    """A claim that a relation holds between two sets of values, within a margin."""

    relation: str = "exceeds"
    margin: float = 0.0
    margin_rule: str = ""  # "" (the number in margin) or one of DERIVED_MARGINS
    rule: str = "range"  # how a, b are compared: seed ranges, or a Welch t interval (t95)

    def parse_relation(self, table: Mapping, where: str, allowed: Sequence[str]) -> None:
        self.relation = check_value(f"{where}.relation", table.get("relation", "exceeds"),
                                    one_of(allowed), error=ClaimError)
        margin = table.get("margin", 0.0)
        if isinstance(margin, str):
            check_value(f"{where}.margin", margin, DERIVED_MARGIN, error=ClaimError)
            if margin == "lattice" and self.metric not in FRONTIER_METRICS:
                raise ClaimError(f"{where}.margin 'lattice' is one step of a frontier's lr "
                                 f"lattice, so it needs a frontier metric; got {self.metric!r}")
            if margin == "test_set" and self.metric not in ACCURACY_METRICS + ("best_acc",):
                raise ClaimError(f"{where}.margin {margin!r} is derived from a test set's "
                                 f"size, so it needs an accuracy metric; got {self.metric!r}")
            self.margin_rule, self.margin = margin, math.nan
        else:
            self.margin = number(margin, f"{where}.margin", 0.0)
        if self.relation in ("within", "at_least") and not self.margin_rule \
                and not self.margin:
            raise ClaimError(f"{where}: relation {self.relation!r} needs a margin: a number "
                             "taken from the paper (say where in source) or a derived one, "
                             'e.g. margin = "test_set"')


@dataclass
class Versus(Relational):
    """A relation of selection a to selection b, or to a constant ``value``."""

    OPTIONAL_SELECTIONS = ("b",)  # value may stand for it
    value: float | None = None

    def parse_versus(self, table: Mapping, where: str) -> None:
        """b or value, the rule and the relation: what compare and spread share."""
        has_b, has_value = "b" in table, "value" in table
        if has_b == has_value:
            raise ClaimError(f"{where}: a compare claim needs exactly one of b (a selection) "
                             "or value (a number) to compare a with")
        if has_value:
            self.value = number(table["value"], f"{where}.value")
        self.rule = check_value(f"{where}.rule", table.get("rule", "range"), one_of(RULES),
                                error=ClaimError)
        self.parse_relation(table, where, RELATIONS)
        if self.relation == "consistent" and self.rule != "t95":
            raise ClaimError(f"{where}: relation 'consistent' needs rule = \"t95\" (it asks "
                             "whether the interval of the difference holds 0)")


def compare_verdict(claim: Relational, a: np.ndarray, b: np.ndarray,
                    evidence: list[str]) -> Verdict:
    """``relation`` between the values of a and b by their ranges (module docstring)."""
    m = claim.margin
    relation = claim.relation
    if relation == "within":
        widest = max(a.max() - b.min(), b.max() - a.min())
        gap = max(a.min() - b.max(), b.min() - a.max())
        if widest < m:
            verdict, reason = "holds", "every run of a is within the margin of every run of b"
        elif gap >= m:
            verdict, reason = "does not hold", "the seed ranges lie further apart than the margin"
        else:
            verdict, reason = "inconclusive", ("the means or some seeds differ by more than the "
                                               "margin, but the seed ranges come within it")
        return Verdict(claim, verdict, "; ".join(evidence), reason)
    if relation == "at_least":  # a no worse than b by more than the margin
        worst, best = a.min() - b.max(), a.max() - b.min()
        if worst > -m:
            verdict, reason = "holds", "even a's worst run is within the margin of b's best"
        elif best <= -m:
            verdict, reason = "does not hold", "even a's best run falls short of b's worst by " \
                "the margin or more"
        else:
            verdict, reason = "inconclusive", "the seed ranges overlap the margin"
        return Verdict(claim, verdict, "; ".join(evidence), reason)
    high, low = (a, b) if relation == "exceeds" else (b, a)
    worst, best = high.min() - low.max(), high.max() - low.min()
    word = "above" if relation == "exceeds" else "below"
    # strict: a tie (297 test images make them common) does not beat anything
    if worst > m:
        verdict, reason = "holds", f"every run of a is {word} every run it is compared with"
    elif best <= m:
        verdict, reason = "does not hold", f"no run of a is {word} by more than the margin"
    else:
        verdict, reason = "inconclusive", "the seed ranges overlap"
    return Verdict(claim, verdict, "; ".join(evidence), reason)


T95_REASONS = {
    "exceeds": {"holds": "the whole interval lies above the margin",
                "does not hold": "the whole interval lies at or below the margin",
                "inconclusive": "the interval straddles the margin"},
    "below": {"holds": "the whole interval lies below minus the margin",
              "does not hold": "the whole interval lies at or above minus the margin",
              "inconclusive": "the interval straddles minus the margin"},
    "within": {"holds": "the whole interval lies within the margin",
               "does not hold": "the whole interval lies outside the margin",
               "inconclusive": "the interval is not inside the margin, nor wholly outside it"},
    "at_least": {"holds": "the interval's low end is above minus the margin",
                 "does not hold": "the whole interval lies at or below minus the margin",
                 "inconclusive": "the interval straddles minus the margin"},
}


def t_verdict(claim: Relational, groups: Sequence[tuple[np.ndarray, float]], offset: float,
              evidence: list[str], what: str = "difference of means") -> Verdict:
    """``relation`` decided on the 95% Welch t interval [lo, hi] of the contrast (module
    docstring, "Rules")."""
    estimate, lo, hi, df = welch_interval(groups, offset)
    m = claim.margin
    relation = claim.relation
    evidence.append(f"{what} {fmt_signed(claim, estimate)}, 95% t interval "
                    f"[{fmt_signed(claim, lo)}, {fmt_signed(claim, hi)}]"
                    + (f" (df {df:.1f})" if math.isfinite(df) else " (no seed variance)"))
    if relation == "exceeds":
        verdict = "holds" if lo > m else "does not hold" if hi <= m else "inconclusive"
    elif relation == "below":
        verdict = "holds" if hi < -m else "does not hold" if lo >= -m else "inconclusive"
    elif relation == "within":
        verdict = ("holds" if -m < lo and hi < m else
                   "does not hold" if lo >= m or hi <= -m else "inconclusive")
    elif relation == "at_least":
        verdict = "holds" if lo > -m else "does not hold" if hi <= -m else "inconclusive"
    else:  # consistent: the interval holds the expected value (offset) and is informative
        scale = abs(offset) if offset else max(abs(float(np.mean(v))) for v, _ in groups)
        if lo <= 0 <= hi:
            informative = (hi - lo) / 2 < scale if scale else True
            verdict = "holds" if informative else "inconclusive"
            reason = ("the interval holds the expected value" if informative else
                      "the interval holds the expected value but is wider than the value "
                      "itself")
        else:
            verdict, reason = "does not hold", "the interval excludes the expected value"
        return Verdict(claim, verdict, "; ".join(evidence), reason)
    return Verdict(claim, verdict, "; ".join(evidence), T95_REASONS[relation][verdict])
