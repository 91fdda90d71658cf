"""Claims: each claim of the spec checked on the runs (``ablations.claims``), with the rules
its verdict used stated once above the table."""

from __future__ import annotations

import warnings

import pandas as pd

from ablations.claims import ClaimError, Verdict, evaluate_claims, parse_claims
from reports.document import Section, Table
from sigprop.errors import UserError


def claim_verdicts(spec: dict, runs: pd.DataFrame,
                   frontier: pd.DataFrame | None = None) -> list[Verdict] | None:
    """The spec's claims checked on the runs; None when the spec has none (or an unreadable
    set: the runner validated them before running, so that is a spec edited since)."""
    try:
        claims = parse_claims(spec.get("claims"))
    except ClaimError as err:
        warnings.warn(f"the stored spec's claims cannot be read: {err}", stacklevel=2)
        return None
    if not claims:
        return None
    try:
        return evaluate_claims(claims, runs, frontier)
    except UserError as err:  # a stored value the checks refuse (a data set no longer known)
        warnings.warn(f"the stored spec's claims cannot be checked: {err}", stacklevel=2)
        return None


def claims_section(verdicts: list[Verdict]) -> Section:
    rows = [{"id": v.claim.id, "claim": v.claim.text, "verdict": v.verdict,
             "evidence": v.evidence, "why": v.reason,
             "source": (f"“{v.claim.quote}” ({v.claim.source})" if v.claim.quote
                        else v.claim.source)}
            for v in verdicts]
    rules = sorted({v.claim.rule for v in verdicts if v.claim.check in ("compare", "spread")}
                   | {"t95" for v in verdicts if v.claim.check == "interaction"})
    parts = [
        "Each claim is checked on this grid's finished runs by the rule its spec states "
        "(`ablations.claims`), and quotes the sentence of the paper it tests. Too few finished "
        "runs make a claim inconclusive. A diverged run counts at chance accuracy."]
    if "range" in rules:
        parts.append("Rule `range`: a difference counts only when the seed ranges separate "
                     "(strictly: a tie beats nothing).")
    if "t95" in rules:
        parts.append("Rule `t95`: the 95% Welch t interval of the difference of means (of a "
                     "difference of differences for an interaction) decides: wholly beyond the "
                     "margin holds, wholly on the other side does not hold, straddling it is "
                     "inconclusive.")
    if any(v.claim.margin_rule == "test_set" for v in verdicts):
        parts.append("Margin `test_set` (\"comparable\", \"match\"): 1.96 × √(p(1 − p)/n) "
                     "for the reference's accuracy p on its n test images, the amount an "
                     "accuracy moves with the luck of which images are in the test set.")
    if any(v.claim.check == "share" and v.claim.chance_margin is None
           and {"near_chance", "learned"} & set(v.claim.outcome) for v in verdicts):
        parts.append("Near chance: a completed run whose accuracy is not above chance by a "
                     "one-sided 95% binomial test on its test set (chance + 1.645 × "
                     "√(c(1 − c)/n)); `learned` is a completed run above that bar.")
    parts.append(Table(pd.DataFrame(rows), wrap=True))
    return Section("Claims", parts)
