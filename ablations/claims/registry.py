"""A spec's claims as a whole: the TOML ``check`` name of each check's class, and parsing,
checking against the grid's runs and evaluating every claim through it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ablations.claims.base import (
    FRONTIER_METRICS,
    Claim,
    ClaimError,
    UntestableClaim,
    Verdict,
    claim_where,
)
from ablations.claims.checks import Compare, Interaction, Share, Spread, Trend
from ablations.claims.selection import EXTREMES, cells_as_runs, select
from sigprop.fields import check_value, one_of

# the TOML ``check`` name of each check's class, in the manual's order
CHECK_CLASSES: dict[str, type[Claim]] = {
    cls.check: cls for cls in (Compare, Share, Trend, Spread, Interaction)}
CHECKS = tuple(CHECK_CLASSES)


def parse_claims(raw: Any) -> list[Claim]:
    """``[[claims]]`` tables -> claims; raises :class:`ClaimError` naming the bad field."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(c, Mapping) for c in raw):
        raise ClaimError("claims must be an array of tables: [[claims]]")
    claims = [parse_claim(table, i) for i, table in enumerate(raw)]
    ids = [c.id for c in claims]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ClaimError(f"claims: duplicate id(s) {', '.join(dupes)}")
    return claims


def parse_claim(table: Mapping, index: int) -> Claim:
    """One ``[[claims]]`` table, parsed by the class its ``check`` names."""
    check = check_value(f"{claim_where(table, index)}.check", table.get("check"),
                        one_of(CHECKS), error=ClaimError)
    return CHECK_CLASSES[check].parse(table, index)


def check_claims(claims: Sequence[Claim], frame: pd.DataFrame, known_keys: set[str]) -> None:
    """Every key a claim names is a run key and every selection picks at least one run of
    ``frame`` (one row per run, flattened config columns); raises :class:`ClaimError`."""
    for claim in claims:
        unknown = sorted(k for k in claim.keys() if k not in known_keys and k not in frame)
        if unknown:
            raise ClaimError(f"claim {claim.id}: unknown run key(s) {', '.join(unknown)}; "
                             "use the dotted keys of [base] and [grid] (e.g. clip.mode)")
        for name, selection in claim.selections.items():
            for key, values in selection.items():
                extremes = [v for v in values if v in EXTREMES]
                if extremes and key in frame and frame[key].nunique(dropna=True) < 2:
                    raise UntestableClaim(f"claim {claim.id}: selection {name} asks for "
                                          f"{key}={extremes[0]}, which needs two or more {key} "
                                          "values in the grid")
            if select(frame, selection).empty:
                shown = ", ".join(f"{k}={v if len(v) > 1 else v[0]}"
                                  for k, v in selection.items())
                raise UntestableClaim(f"claim {claim.id}: selection {name} ({shown}) matches "
                                      "no run of the grid")
        claim.check_runs(frame)


def evaluate_claims(claims: Sequence[Claim], runs: pd.DataFrame,
                    frontier: pd.DataFrame | None = None) -> list[Verdict]:
    """A verdict for every claim over ``runs`` (the ``runs`` frame of ``load_results``); claims
    about frontier metrics over ``frontier`` (``Results.frontier``; None: inconclusive)."""
    return [evaluate(claim, runs, frontier) for claim in claims]


def evaluate(claim: Claim, runs: pd.DataFrame, frontier: pd.DataFrame | None = None) -> Verdict:
    if claim.metric in FRONTIER_METRICS:
        if frontier is None or frontier.empty:
            return Verdict(claim, "inconclusive", "no frontier",
                           "the grid has no frontier.parquet: run `run_ablations.py frontier` "
                           "on its spec")
        runs = cells_as_runs(frontier)
    return claim.evaluate(runs)
