"""What every claim has: its common fields, their parsing and errors, the verdict, and the
per-run values of its metric. One subclass per check (:mod:`ablations.claims.checks`) adds
its own fields and rules.

Paper A: Brock, De and Smith, "Characterizing signal propagation to close the performance gap
in unnormalized ResNets", ICLR 2021, arXiv 2101.08692. Paper B: Brock, De, Smith and Simonyan,
"High-Performance Large-Scale Image Recognition Without Normalization", ICML 2021, arXiv
2102.06171.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ablations.claims.selection import EXTREMES
from ablations.claims.stats import chance_levels
from sigprop.errors import UserError
from sigprop.fields import (
    NON_EMPTY,
    Rule,
    at_least,
    check_field,
    check_keys,
    check_value,
    in_range,
    one_of,
    positive,
)

RELATIONS = ("exceeds", "below", "within", "at_least", "consistent")
RULES = ("range", "t95")
OUTCOMES = ("diverged", "near_chance", "learned", "completed")
# margin = "test_set": the 95% binomial half-width of the reference's accuracy on its test set
# margin = "lattice": one step of the frontier's learning-rate lattice, its resolution
DERIVED_MARGINS = ("test_set", "lattice")
DIRECTIONS = ("non-increasing", "non-decreasing")
FRONTIER_METRICS = ("max_stable_lr", "min_unstable_lr")  # frontier.parquet columns, log2 scale
# var_growth_rel: var_growth over the stem output's variance; alpha2_ratio: that over
# model.alpha^2 (paper A's law predicts 1)
METRICS = ("final_acc", "best_acc", "max_grad_norm", "clip_fraction", "steps_done",
           "var_growth", "var_growth_rel", "alpha2_ratio", *FRONTIER_METRICS)
ACCURACY_METRICS = ("final_acc",)
VERDICTS = ("holds", "does not hold", "inconclusive")
COMMON_FIELDS = frozenset({"id", "text", "source", "quote", "check", "metric", "min_runs"})
QUOTE = Rule(NON_EMPTY.ok, "the paper's sentence, a non-empty string")


class ClaimError(UserError):
    """A malformed claim: names the claim and the field."""


class UntestableClaim(ClaimError):
    """A well-formed claim the grid's runs cannot test (an empty selection, a single value
    where the claim needs two): an error in a spec as written, a note under ``--set``."""


def claim_where(table: Mapping, index: int) -> str:
    """'claims[2] (C3)': how an error names the claim."""
    return f"claims[{index}]" + (f" ({table['id']})" if isinstance(table.get("id"), str) else "")


@dataclass
class Claim(ABC):
    """The fields every check shares. A subclass is one check: it names itself (``check``,
    the TOML name), lists its own fields, parses them (``parse_fields``) and evaluates itself
    (``evaluate``)."""

    check: ClassVar[str]
    FIELDS: ClassVar[frozenset[str]] = frozenset()  # the check's fields beyond COMMON_FIELDS
    SELECTIONS: ClassVar[tuple[str, ...]] = ()  # its selection fields, in order
    OPTIONAL_SELECTIONS: ClassVar[tuple[str, ...]] = ()  # those another field may stand for
    KEY_FIELDS: ClassVar[tuple[str, ...]] = ()  # its fields that name a run key
    # a check without a relation allows no margin; read of every claim (the report's rules).
    # Unannotated, so a check with a relation can make them fields of its own.
    margin = 0.0
    margin_rule = ""

    id: str
    text: str
    source: str
    quote: str = ""  # the paper's sentence the claim tests, verbatim
    metric: str = "final_acc"
    min_runs: int = 2
    selections: dict[str, dict[str, list]] = field(default_factory=dict)  # a, b or select

    @classmethod
    def parse(cls, table: Mapping, index: int = 0) -> Claim:
        """One ``[[claims]]`` table of this check; raises :class:`ClaimError` naming the
        claim (``claims[index]``) and the field."""
        where = claim_where(table, index)
        check_keys(table, sorted(COMMON_FIELDS | cls.FIELDS), f"{where}: ", ClaimError,
                   lead="unknown field(s)", after=f" for check {cls.check!r}",
                   valid_label="allowed")
        for name in ("text", "source"):
            check_value(f"{where}.{name}", table.get(name), NON_EMPTY, error=ClaimError)
        claim = cls(id=str(table.get("id", f"C{index + 1}")),
                    text=" ".join(table["text"].split()),
                    source=" ".join(table["source"].split()))
        if "quote" in table:
            check_value(f"{where}.quote", table["quote"], QUOTE, error=ClaimError)
            claim.quote = " ".join(table["quote"].split())
        claim.metric = check_value(f"{where}.metric", table.get("metric", "final_acc"),
                                   one_of(METRICS), error=ClaimError)
        claim.min_runs = check_value(
            f"{where}.min_runs", check_field(f"{where}.min_runs", table.get("min_runs", 2), int,
                                             "a positive integer", ClaimError),
            positive("a positive integer"), error=ClaimError)
        for name in cls.SELECTIONS:
            if name in cls.OPTIONAL_SELECTIONS and name not in table:
                continue
            claim.selections[name] = parse_selection(table.get(name), f"{where}.{name}")
        claim.parse_fields(table, where)
        return claim

    @abstractmethod
    def parse_fields(self, table: Mapping, where: str) -> None:
        """The check's own fields from ``table``, after the common ones."""

    def keys(self) -> set[str]:
        """Every run key the claim refers to."""
        out = {k for sel in self.selections.values() for k in sel}
        return out | {getattr(self, name) for name in self.KEY_FIELDS if getattr(self, name)}

    def check_runs(self, frame: pd.DataFrame) -> None:
        """Raise :class:`UntestableClaim` where the grid's runs (``frame``) hold too few
        values for this check; the selections are checked already."""
        return None  # compare, share and interaction need nothing beyond their selections

    @abstractmethod
    def evaluate(self, runs: pd.DataFrame) -> Verdict:
        """The verdict over ``runs`` (runs, or frontier cells as runs for frontier metrics)."""


@dataclass
class Verdict:
    claim: Claim
    verdict: str  # one of VERDICTS
    evidence: str  # numbers: means, seed ranges, run counts
    reason: str = ""  # why inconclusive / not holding, in words


def number(value: Any, where: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float, finite and in ``[low, high]`` (either bound may be None)."""
    value = check_field(where, value, float, "a finite number", ClaimError)
    if low is not None:
        bounds = in_range(low, high) if high is not None else at_least(low, f"in >= {low:g}")
        check_value(where, value, bounds, error=ClaimError)
    return value


def run_key(table: Mapping, name: str, where: str, example: str) -> str:
    if not isinstance(table.get(name), str) or not table[name]:
        raise ClaimError(f"{where}.{name} must name a run key (e.g. {example})")
    return table[name]


def parse_selection(raw: Any, where: str) -> dict[str, list]:
    if not isinstance(raw, Mapping) or not raw:
        raise ClaimError(f"{where} must be a table of run keys and values, e.g. "
                         '{ "clip.mode" = "agc", batch_size = "@max" }')
    out = {}
    for key, value in flat_items(raw):
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ClaimError(f"{where}.{key}: an empty list selects nothing")
        if any(isinstance(v, str) and v.startswith("@") and v not in EXTREMES for v in values):
            raise ClaimError(f"{where}.{key}: only {' and '.join(EXTREMES)} may start with @")
        out[key] = [tuple(v) if isinstance(v, list) else v for v in values]
    return out


def flat_items(table: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in table.items():
        if isinstance(value, Mapping):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def on_log_scale(claim: Claim) -> bool:
    return claim.metric in FRONTIER_METRICS


def run_values(claim: Claim, runs: pd.DataFrame) -> np.ndarray:
    """Per-run metric values; diverged runs count at chance in accuracies, else drop out."""
    values = metric_column(runs, claim.metric).to_numpy(dtype=float)
    diverged = runs["status"].eq("diverged").to_numpy() if "status" in runs else \
        np.zeros(len(runs), bool)
    if claim.metric in ACCURACY_METRICS:
        values = np.where(diverged, chance_levels(runs, strict=True), values)
    else:
        values = values[~diverged]
    return values[np.isfinite(values) & ((values > 0) if on_log_scale(claim) else True)]


def metric_column(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The per-run values of ``metric``; ``alpha2_ratio`` is derived from ``var_growth_rel``
    and each run's ``model.alpha``."""
    def column(name: str) -> pd.Series:
        return pd.to_numeric(runs.get(name, pd.Series(np.nan, index=runs.index)),
                             errors="coerce").astype(float)

    if metric == "alpha2_ratio":
        return column("var_growth_rel") / column("model.alpha") ** 2
    return column(metric)
