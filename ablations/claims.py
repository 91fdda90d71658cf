"""Claims a grid tests, checked against the grid's own stored runs.

A spec lists what it sets out to test as ``[[claims]]`` tables; the report evaluates each one
on the finished runs and gives its evidence and a verdict: ``holds``, ``does not hold`` or
``inconclusive``. The sentence is what would be true; the verdict says whether the numbers
show it. Nothing in a report is written to fit a claim.

    [[claims]]
    id = "C3"                                  # optional; default C1, C2, ... in order
    text = "At the large batch, AGC brings the NF-ResNet level with the BN-ResNet or above."
    quote = "We find that AGC helps scale NF-ResNets to large batch sizes while maintaining ..."
    source = "paper B (arXiv 2102.06171), section 4.1, Figure 2"
    check = "compare"                # compare | share | trend | spread | interaction
    rule = "t95"                     # range (default) | t95
    a = { "model.name" = "nf_resnet26", "clip.mode" = "agc", batch_size = "@max" }
    b = { "model.name" = "bn_resnet26_v2", batch_size = "@max" }   # or value = 0.8
    relation = "at_least"            # exceeds | below | within | at_least | consistent
    margin = "test_set"              # a number (from the paper) or derived: test_set | lattice
    metric = "final_acc"             # default final_acc; see METRICS
    best_of = "clip.threshold"       # optional: each selection at its best value of this key
    min_runs = 2                     # finished runs each selection needs; default 2

``quote`` is the paper's sentence the claim tests, verbatim; ``source`` names the paper, its
arXiv id and the section or figure. A margin is never a number picked to make a claim hold:
either the paper's own, or derived: ``test_set`` is 1.96 * sqrt(p (1 - p) / n), the 95%
binomial half-width of the reference's accuracy p on its n test images (the run summary's
``test_images``); ``lattice`` is one step of a frontier's lr lattice (its resolution).
``within`` and ``at_least`` need one.

Selections (``a``, ``b``, ``select``) map run keys (dotted, as in ``[grid]``: ``model.name``,
``clip.mode``, ``batch_size``...) to a value or a list of values; ``"@min"`` / ``"@max"`` stand
for the smallest / largest value of that key in the grid, so a claim about "the large batch"
holds at every scale the grid is run at.

Checks, over the finished (completed or diverged) runs of each selection; every selection
needs ``min_runs`` of them, else the claim is inconclusive:

- ``compare``: the per-run ``metric`` of selection ``a`` against selection ``b`` (or the
  constant ``value``). Rule ``range`` compares seed ranges, not just means, so seed noise
  cannot pass for an effect. ``exceeds``: holds when even a's worst run beats b's best by more
  than ``margin`` (min a - max b > margin: strict, so a tie beats nothing, and with 297 test
  images ties happen); does not hold when even a's best run does not (max a - min b <=
  margin); inconclusive in between (the seed ranges overlap). ``below`` mirrors it.
  ``within``: holds when every pair of runs is closer than ``margin``; does not hold when the
  ranges are ``margin`` or more apart; inconclusive in between. ``at_least`` ("comparable or
  better"): holds when min a - max b > -margin, does not hold when max a - min b <= -margin.
  Rule ``t95`` decides on the 95% Welch t interval [lo, hi] of mean(a) - mean(b) (or of
  mean(a) - value): ``exceeds`` holds when lo > margin and does not hold when hi <= margin;
  ``below`` mirrors it; ``within`` holds when -margin < lo and hi < margin and does not hold
  when lo >= margin or hi <= -margin; ``at_least`` holds when lo > -margin and does not hold
  when hi <= -margin; ``consistent`` (t95 only) holds when the interval holds 0 and is
  narrower than the expected value itself, does not hold when it excludes 0. Anything else is
  inconclusive. ``best_of``: each selection is first cut to its value of that key with the
  best mean (paper B Fig. 2a's "best clipping threshold for each batch size"); the evidence
  says that the choice was made after the fact.
- ``interaction``: the difference of differences (mean a - mean b) - (mean c - mean d), e.g.
  whether a gap is larger at the large batch than at the small one, decided on its 95% Welch
  t interval (Welch-Satterthwaite degrees of freedom over the four groups) by ``exceeds`` or
  ``below`` as in ``compare``; takes ``best_of`` too.
- ``share``: the fraction of runs of ``select`` whose outcome is one of ``outcome``
  (``diverged``; ``near_chance``, completed with ``final_acc`` not above chance by a one-sided
  95% binomial test on the run's test images, chance + 1.645 * sqrt(c (1 - c) / n), or below
  chance + ``chance_margin`` when the claim gives one; ``learned``, completed and not near
  chance; ``completed``) is at least ``at_least`` (default 1: every run).
- ``trend``: within ``select``, for each value of ``over`` (e.g. ``batch_size``) the value of
  ``choose`` (e.g. ``clip.threshold``) with the best mean ``metric``; holds when that best
  value is ``non-increasing`` / ``non-decreasing`` (``direction``) in ``over``. Values whose
  seed ranges overlap the best one's count as tied, and ties count both ways: the claim holds
  only when every choice among tied values is monotone, does not hold when no choice is, and
  is inconclusive otherwise (a tie may demote a passing trend exactly as it may lift a
  failing one).

- ``spread``: how far ``metric`` moves over the values of the key ``over`` (e.g.
  ``clip.threshold``), per group of runs that differ only in ``over``: the spread of a group is
  max - min (log2(max / min), in doublings, for the frontier metrics). The spreads of selection
  ``a`` (one per group: per seed, batch size, ...) are compared with those of ``b`` or with
  ``value`` by the rules of ``compare``.

Metrics are the run summary's (``ablations.store.SUMMARY_COLUMNS``); ``var_growth`` is the mean
increase of block output variance from block to block within a stage at the first probed step
(paper A: alpha^2), so it needs ``probe_every`` > 0.

Frontier metrics (``max_stable_lr``, ``min_unstable_lr``) are read from the grid's frontier
(``frontier.parquet``, one row per cell: ``run_ablations.py frontier``), not from the runs; a
claim about them is inconclusive until the frontier exists. Each cell counts like a run. They
compare on a log2 scale: ``margin = 1`` means a factor of 2, and ``within`` a margin of 1 says
"within a factor of 2". A cell stable up to ``lr_max`` counts at ``lr_max`` (a lower bound);
a cell unstable already at ``lr_min`` has no stable rate and drops out (the evidence counts
both kinds).

    [[claims]]
    check = "compare"                           # AGC's frontier above unclipped at batch @max
    metric = "max_stable_lr"
    a = { "clip.mode" = "agc", batch_size = "@max" }
    b = { "clip.mode" = "none", batch_size = "@max" }
    [[claims]]
    check = "spread"                            # norm's frontier moves more with lambda
    metric = "max_stable_lr"
    over = "clip.threshold"
    a = { "clip.mode" = "norm" }
    b = { "clip.mode" = "agc" }

A diverged run has no final accuracy; in accuracy metrics (``final_acc``) it counts at chance
level (1 / number of classes): a network that diverged predicts no better than that. Metrics
other than accuracies take only the completed runs.

Bad claims (unknown fields, keys no run has, an empty selection, an unknown metric or relation)
are :class:`~ablations.spec.SpecError`\\ s: found when the spec is expanded, before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ablations.constants import FINISHED, SEARCHED
from sigprop.errors import UserError

CHECKS = ("compare", "share", "trend", "spread", "interaction")
RELATIONS = ("exceeds", "below", "within", "at_least", "consistent")
RULES = ("range", "t95")
OUTCOMES = ("diverged", "near_chance", "learned", "completed")
# margin = "test_set": the 95% binomial half-width of the reference's accuracy on its test set
# margin = "lattice": one step of the frontier's learning-rate lattice, its resolution
DERIVED_MARGINS = ("test_set", "lattice")
# test-set sizes of the built-in data sets at their defaults (a run's own test_size wins)
DEFAULT_TEST_IMAGES = {"digits": 297, "synthetic": 2000, "cifar10": 10000, "cifar100": 10000}
Z95 = 1.959963984540054  # two-sided 95% normal quantile
Z95_ONE_SIDED = 1.6448536269514722
DIRECTIONS = ("non-increasing", "non-decreasing")
FRONTIER_METRICS = ("max_stable_lr", "min_unstable_lr")  # frontier.parquet columns, log2 scale
# var_growth_rel: var_growth over the stem output's variance; alpha2_ratio: that over
# model.alpha^2 (paper A's law predicts 1)
METRICS = ("final_acc", "best_acc", "max_grad_norm", "clip_fraction", "steps_done",
           "var_growth", "var_growth_rel", "alpha2_ratio", *FRONTIER_METRICS)
ACCURACY_METRICS = ("final_acc",)
VERDICTS = ("holds", "does not hold", "inconclusive")
EXTREMES = ("@min", "@max")

COMMON_FIELDS = {"id", "text", "source", "quote", "check", "metric", "min_runs"}
CHECK_FIELDS = {
    "compare": {"a", "b", "value", "relation", "margin", "rule", "best_of"},
    "share": {"select", "outcome", "at_least", "chance_margin"},
    "trend": {"select", "over", "choose", "direction"},
    "spread": {"a", "b", "value", "relation", "margin", "over", "rule"},
    "interaction": {"a", "b", "c", "d", "relation", "margin", "best_of"},
}
SELECTION_FIELDS = {"compare": ("a", "b"), "share": ("select",), "trend": ("select",),
                    "spread": ("a", "b"), "interaction": ("a", "b", "c", "d")}


class ClaimError(UserError):
    """A malformed claim: names the claim and the field."""


class UntestableClaim(ClaimError):
    """A well-formed claim the grid's runs cannot test (an empty selection, a single value
    where the claim needs two): an error in a spec as written, a note under ``--set``."""


@dataclass
class Claim:
    id: str
    text: str
    source: str
    check: str
    quote: str = ""  # the paper's sentence the claim tests, verbatim
    metric: str = "final_acc"
    min_runs: int = 2
    selections: dict[str, dict[str, list]] = field(default_factory=dict)  # a, b or select
    value: float | None = None
    relation: str = "exceeds"
    margin: float = 0.0
    margin_rule: str = ""  # "" (the number in margin) or one of DERIVED_MARGINS
    rule: str = "range"  # how a, b are compared: seed ranges, or a Welch t interval (t95)
    best_of: str = ""  # compare: each selection at its best value of this key
    outcome: tuple[str, ...] = ("diverged",)
    at_least: float = 1.0
    chance_margin: float | None = None  # None: the binomial rule (module docstring)
    over: str = ""
    choose: str = ""
    direction: str = "non-increasing"

    def keys(self) -> set[str]:
        """Every run key the claim refers to."""
        out = {k for sel in self.selections.values() for k in sel}
        return out | {k for k in (self.over, self.choose, self.best_of) if k}


@dataclass
class Verdict:
    claim: Claim
    verdict: str  # one of VERDICTS
    evidence: str  # numbers: means, seed ranges, run counts
    reason: str = ""  # why inconclusive / not holding, in words


# ----------------------------------------------------------------------------- parsing


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
    where = f"claims[{index}]" + (f" ({table['id']})" if isinstance(table.get("id"), str) else "")
    check = table.get("check")
    if check not in CHECKS:
        raise ClaimError(f"{where}.check must be one of {', '.join(CHECKS)}; got {check!r}")
    allowed = COMMON_FIELDS | CHECK_FIELDS[check]
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ClaimError(f"{where}: unknown field(s) {', '.join(unknown)} for check {check!r}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    for name in ("text", "source"):
        if not isinstance(table.get(name), str) or not table[name].strip():
            raise ClaimError(f"{where}.{name} must be a non-empty string")
    claim = Claim(id=str(table.get("id", f"C{index + 1}")), text=" ".join(table["text"].split()),
                  source=" ".join(table["source"].split()), check=check)
    if "quote" in table:
        if not isinstance(table["quote"], str) or not table["quote"].strip():
            raise ClaimError(f"{where}.quote must be the paper's sentence, a non-empty string")
        claim.quote = " ".join(table["quote"].split())
    claim.metric = table.get("metric", "final_acc")
    if claim.metric not in METRICS:
        raise ClaimError(f"{where}.metric must be one of {', '.join(METRICS)}; "
                         f"got {claim.metric!r}")
    claim.min_runs = table.get("min_runs", 2)
    if isinstance(claim.min_runs, bool) or not isinstance(claim.min_runs, int) \
            or claim.min_runs < 1:
        raise ClaimError(f"{where}.min_runs must be a positive integer; got {claim.min_runs!r}")
    for name in SELECTION_FIELDS[check]:
        if name == "b" and "b" not in table and check != "interaction":
            continue
        claim.selections[name] = parse_selection(table.get(name), f"{where}.{name}")
    if check in ("compare", "spread"):
        parse_compare(claim, table, where)
    if check in ("compare", "interaction") and "best_of" in table:
        if not isinstance(table["best_of"], str) or not table["best_of"]:
            raise ClaimError(f"{where}.best_of must name a run key (e.g. clip.threshold)")
        claim.best_of = table["best_of"]
    if check == "interaction":
        claim.rule = "t95"
        parse_relation(claim, table, where, RELATIONS[:2])
        if claim.margin_rule:
            raise ClaimError(f"{where}.margin: an interaction takes a number (a difference of "
                             f"differences), not the derived {claim.margin_rule!r}")
    if check == "spread":
        if claim.margin_rule:
            raise ClaimError(f"{where}.margin: a spread takes a number, not the derived "
                             f"{claim.margin_rule!r}")
        if not isinstance(table.get("over"), str) or not table["over"]:
            raise ClaimError(f"{where}.over must name a run key (e.g. clip.threshold)")
        claim.over = table["over"]
    elif check == "share":
        outcome = table.get("outcome", ["diverged"])
        outcome = [outcome] if isinstance(outcome, str) else outcome
        if not isinstance(outcome, list) or not outcome or any(o not in OUTCOMES
                                                                for o in outcome):
            raise ClaimError(f"{where}.outcome must name one or more of {', '.join(OUTCOMES)};"
                             f" got {table.get('outcome')!r}")
        claim.outcome = tuple(outcome)
        claim.at_least = number(table.get("at_least", 1.0), f"{where}.at_least", 0.0, 1.0)
        if "chance_margin" in table:
            claim.chance_margin = number(table["chance_margin"], f"{where}.chance_margin",
                                         0.0, 1.0)
    elif check == "trend":
        for name in ("over", "choose"):
            if not isinstance(table.get(name), str) or not table[name]:
                raise ClaimError(f"{where}.{name} must name a run key (e.g. batch_size)")
            setattr(claim, name, table[name])
        if claim.over == claim.choose:
            raise ClaimError(f"{where}: over and choose must be different keys")
        claim.direction = table.get("direction", "non-increasing")
        if claim.direction not in DIRECTIONS:
            raise ClaimError(f"{where}.direction must be one of {', '.join(DIRECTIONS)}; "
                             f"got {claim.direction!r}")
    return claim


def parse_compare(claim: Claim, table: Mapping, where: str) -> None:
    has_b, has_value = "b" in table, "value" in table
    if has_b == has_value:
        raise ClaimError(f"{where}: a compare claim needs exactly one of b (a selection) or "
                         "value (a number) to compare a with")
    if has_value:
        claim.value = number(table["value"], f"{where}.value")
    claim.rule = table.get("rule", "range")
    if claim.rule not in RULES:
        raise ClaimError(f"{where}.rule must be one of {', '.join(RULES)}; got {claim.rule!r}")
    parse_relation(claim, table, where, RELATIONS)
    if claim.relation == "consistent" and claim.rule != "t95":
        raise ClaimError(f"{where}: relation 'consistent' needs rule = \"t95\" (it asks "
                         "whether the interval of the difference holds 0)")


def parse_relation(claim: Claim, table: Mapping, where: str, allowed: Sequence[str]) -> None:
    claim.relation = table.get("relation", "exceeds")
    if claim.relation not in allowed:
        raise ClaimError(f"{where}.relation must be one of {', '.join(allowed)}; "
                         f"got {claim.relation!r}")
    margin = table.get("margin", 0.0)
    if isinstance(margin, str):
        if margin not in DERIVED_MARGINS:
            raise ClaimError(f"{where}.margin must be a number or one of "
                             f"{', '.join(DERIVED_MARGINS)}; got {margin!r}")
        if margin == "lattice" and claim.metric not in FRONTIER_METRICS:
            raise ClaimError(f"{where}.margin 'lattice' is one step of a frontier's lr "
                             f"lattice, so it needs a frontier metric; got {claim.metric!r}")
        if margin == "test_set" and claim.metric not in ACCURACY_METRICS + ("best_acc",):
            raise ClaimError(f"{where}.margin {margin!r} is derived from a test set's size, "
                             f"so it needs an accuracy metric; got {claim.metric!r}")
        claim.margin_rule, claim.margin = margin, math.nan
    else:
        claim.margin = number(margin, f"{where}.margin", 0.0)
    if claim.relation in ("within", "at_least") and not claim.margin_rule and not claim.margin:
        raise ClaimError(f"{where}: relation {claim.relation!r} needs a margin: a number taken "
                         "from the paper (say where in source) or a derived one, e.g. "
                         'margin = "test_set"')


def number(value: Any, where: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise ClaimError(f"{where} must be a finite number; got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ClaimError(f"{where} must be in {bounds}; got {value!r}")
    return float(value)


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


# ----------------------------------------------------------------------------- checking


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
        if claim.check == "spread":
            chosen = select(frame, claim.selections["a"])
            if chosen[claim.over].nunique(dropna=True) < 2:
                raise UntestableClaim(f"claim {claim.id}: a spread needs two or more values of "
                                      f"{claim.over} among the runs of selection a")
        if claim.check == "trend":
            chosen = select(frame, claim.selections["select"])
            for key in (claim.over, claim.choose):
                if chosen[key].nunique(dropna=True) < 2:
                    raise UntestableClaim(f"claim {claim.id}: a trend needs two or more values of "
                                          f"{key} among the selected runs")


def select(frame: pd.DataFrame, selection: Mapping[str, list]) -> pd.DataFrame:
    """Rows of ``frame`` matching ``selection``; ``@min``/``@max`` resolve over all of
    ``frame`` (the grid's runs, whatever their state)."""
    mask = pd.Series(True, index=frame.index)
    for key, values in selection.items():
        if key not in frame:
            return frame.iloc[0:0]
        wanted = [resolve_extreme(frame, key, v) for v in values]
        mask &= frame[key].map(lambda v, w=wanted: any(same(v, x) for x in w))
    return frame[mask]


def resolve_extreme(grid: pd.DataFrame, key: str, value: Any) -> Any:
    if value not in EXTREMES:
        return value
    present = [v for v in grid[key].dropna().unique() if is_number(v)] if key in grid else []
    if not present:
        return None
    return min(present) if value == "@min" else max(present)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, list | np.ndarray):
        a = tuple(a)
    if is_number(a) and is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_)


# ----------------------------------------------------------------------------- evaluation


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
    if claim.check == "compare":
        return evaluate_compare(claim, runs)
    if claim.check == "spread":
        return evaluate_spread(claim, runs)
    if claim.check == "interaction":
        return evaluate_interaction(claim, runs)
    if claim.check == "share":
        return evaluate_share(claim, runs)
    return evaluate_trend(claim, runs)


def cells_as_runs(frontier: pd.DataFrame) -> pd.DataFrame:
    """Frontier cells in the shape of runs: a searched cell is a finished "run"; its search
    status stays in ``frontier_status``."""
    cells = frontier.copy()
    cells["frontier_status"] = cells["status"]
    cells["status"] = np.where(cells["status"].isin(SEARCHED), "completed", "queued")
    return cells


def on_log_scale(claim: Claim) -> bool:
    return claim.metric in FRONTIER_METRICS


def selection_text(runs: pd.DataFrame, selection: Mapping[str, list]) -> str:
    """'batch_size=512, clip.mode=agc' with @min/@max resolved."""
    parts = []
    for key, values in selection.items():
        shown = [fv(resolve_extreme(runs, key, v)) for v in values]
        parts.append(f"{key}={shown[0] if len(shown) == 1 else '/'.join(shown)}")
    return ", ".join(parts)


def finished(runs: pd.DataFrame, selection: Mapping[str, list]) -> tuple[pd.DataFrame, int]:
    chosen = select(runs, selection)
    done = chosen[chosen["status"].isin(FINISHED)] if "status" in chosen else chosen
    return done, len(chosen)


def run_values(claim: Claim, runs: pd.DataFrame) -> np.ndarray:
    """Per-run metric values; diverged runs count at chance in accuracies, else drop out."""
    values = metric_column(runs, claim.metric).to_numpy(dtype=float)
    diverged = runs["status"].eq("diverged").to_numpy() if "status" in runs else \
        np.zeros(len(runs), bool)
    if claim.metric in ACCURACY_METRICS:
        values = np.where(diverged, chance_levels(runs), values)
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


def n_test_images(runs: pd.DataFrame) -> np.ndarray:
    """How many test images each run's accuracy was measured on: the run's ``test_images``
    (its summary), else its ``test_size``, else the data set's default split."""
    n = pd.Series(np.nan, index=runs.index, dtype=float)
    for column in ("test_images", "test_size"):
        if column in runs:
            n = n.fillna(pd.to_numeric(runs[column], errors="coerce").astype(float))
    if "data" in runs:
        n = n.fillna(runs["data"].map(DEFAULT_TEST_IMAGES).astype(float))
    return n.to_numpy(dtype=float)


def binomial_half_width(p: float, n: float, z: float = Z95) -> float:
    """z * sqrt(p (1 - p) / n): how far an accuracy p measured on n test images moves by
    the luck of which images are in the test set."""
    if not (np.isfinite(p) and np.isfinite(n) and n > 0):
        return math.nan
    return z * math.sqrt(max(p * (1 - p), 0.0) / n)


def chance_levels(runs: pd.DataFrame) -> np.ndarray:
    if "model.num_classes" in runs:
        classes = pd.to_numeric(runs["model.num_classes"], errors="coerce")
        if classes.notna().all():
            return 1.0 / classes.to_numpy(dtype=float)
    if "data" in runs:
        from sigprop.data import dataset_info  # lazy: torch

        return np.array([1.0 / dataset_info(d).num_classes for d in runs["data"]])
    return np.full(len(runs), np.nan)


def fmt(claim: Claim, value: float, difference: bool = False) -> str:
    """A metric value ('97.6%'), or a difference of two ('4.0 points' for fractions; 'x2.0'
    for the frontier metrics, whose differences are log2 ratios)."""
    if on_log_scale(claim):
        return f"x{2 ** value:.3g}" if difference else f"{value:.3g}"
    if claim.metric in ("final_acc", "best_acc", "clip_fraction"):
        return f"{100 * value:.1f} points" if difference else f"{100 * value:.1f}%"
    return f"{value:.3g}"


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


def at_best(claim: Claim, runs: pd.DataFrame, selection: Mapping[str, list],
            done: pd.DataFrame, total: int) -> tuple[pd.DataFrame, int, str]:
    """``done`` (the finished runs of ``selection``) cut to the value of ``best_of`` with the
    best mean metric ("at the best lambda for each batch size"), the selection's run count at
    that value, and the choice in words."""
    if not claim.best_of or claim.best_of not in done or done.empty \
            or done[claim.best_of].nunique(dropna=True) < 2:
        return done, total, ""  # nothing to choose (e.g. no threshold for unclipped runs)
    means = {}
    for choice in done[claim.best_of].dropna().unique():
        cell = done[done[claim.best_of].map(lambda v, c=choice: same(v, c))]
        values = run_values(claim, cell)
        if len(values) >= claim.min_runs:
            means[choice] = values.mean()
    if not means:
        return done.iloc[0:0], total, ""
    best = max(means, key=means.get)
    chosen = done[done[claim.best_of].map(lambda v: same(v, best))]
    everything = select(runs, selection)
    at_choice = int(everything[claim.best_of].map(lambda v: same(v, best)).sum())
    return chosen, at_choice, (f" at its best {claim.best_of} {fv(best)} (of "
                    f"{', '.join(fv(c) for c in sorted(means))}; picked after the fact, so "
                    "slightly optimistic)")


def evaluate_compare(claim: Claim, runs: pd.DataFrame) -> Verdict:
    done_a, total_a = finished(runs, claim.selections["a"])
    done_a, total_a, best_a = at_best(claim, runs, claim.selections["a"], done_a, total_a)
    a = run_values(claim, done_a)
    where_a = selection_text(runs, claim.selections["a"])
    evidence = [f"a ({where_a}){best_a}: {describe(claim, a, done_a, total_a)}"]
    counts = {"a": len(a)}
    done_b = None
    if claim.value is None:
        done_b, total_b = finished(runs, claim.selections["b"])
        done_b, total_b, best_b = at_best(claim, runs, claim.selections["b"], done_b, total_b)
        b = run_values(claim, done_b)
        where_b = selection_text(runs, claim.selections["b"])
        evidence.append(f"b ({where_b}){best_b}: {describe(claim, b, done_b, total_b)}")
        counts["b"] = len(b)
    else:
        b = np.array([claim.value])
        evidence.append(f"against {fmt(claim, claim.value)}")
    if on_log_scale(claim) and claim.value is not None:
        b = np.array([claim.value]) if claim.value > 0 else np.array([np.nan])
    short = too_few(claim, counts)
    if short:
        return Verdict(claim, "inconclusive", "; ".join(evidence), short)
    margin_note = resolve_margin(claim, b, done_b if done_b is not None else done_a)
    if margin_note:
        evidence.append(margin_note)
    if on_log_scale(claim):  # ratios of learning rates: compared as differences of log2
        a, b = np.log2(a), np.log2(b)
    if claim.rule == "t95":
        return t_verdict(claim, [(a, 1.0)] + ([(b, -1.0)] if claim.value is None else []),
                         0.0 if claim.value is None else float(b[0]), evidence)
    if len(a) and len(b) and claim.value is None:
        evidence.append(f"difference of means {fmt_signed(claim, a.mean() - b.mean())}")
    return compare_verdict(claim, a, b, evidence)


def resolve_margin(claim: Claim, reference: np.ndarray, reference_runs: pd.DataFrame,
                   margin: float | None = None) -> str:
    """Fix a derived margin on the claim from the reference's values and test-set size;
    return the evidence line that states the margin and where it comes from."""
    if claim.margin_rule == "lattice":
        steps = pd.to_numeric(reference_runs.get("resolution", pd.Series(dtype=float)),
                              errors="coerce").dropna()
        claim.margin = float(np.log2(steps.max())) if len(steps) else 0.0
        return (f"margin {fmt(claim, claim.margin, difference=True)} (derived: one step of the "
                "frontier's lr lattice, its resolution)")
    if claim.margin_rule == "test_set":
        n = n_test_images(reference_runs)
        n = float(np.nanmin(n)) if len(n) and np.isfinite(n).any() else math.nan
        p = float(np.mean(reference)) if len(reference) else math.nan
        claim.margin = binomial_half_width(p, n)
        if not np.isfinite(claim.margin):
            claim.margin = 0.0
            return "margin: no test-set size known, so 0"
        return (f"margin {fmt(claim, claim.margin, difference=True)} (derived: 95% binomial "
                f"half-width of the reference's {fmt(claim, p)} on {n:.0f} test images)")
    if claim.margin:
        return f"margin {fmt(claim, claim.margin, difference=True)}"
    return ""


def compare_verdict(claim: Claim, a: np.ndarray, b: np.ndarray, evidence: list[str]) -> Verdict:
    """``relation`` between the values of a and b by their ranges (module docstring)."""
    m = claim.margin
    if claim.relation == "within":
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
    if claim.relation == "at_least":  # a no worse than b by more than the margin
        worst, best = a.min() - b.max(), a.max() - b.min()
        if worst > -m:
            verdict, reason = "holds", "even a's worst run is within the margin of b's best"
        elif best <= -m:
            verdict, reason = "does not hold", "even a's best run falls short of b's worst by " \
                "the margin or more"
        else:
            verdict, reason = "inconclusive", "the seed ranges overlap the margin"
        return Verdict(claim, verdict, "; ".join(evidence), reason)
    high, low = (a, b) if claim.relation == "exceeds" else (b, a)
    worst, best = high.min() - low.max(), high.max() - low.min()
    word = "above" if claim.relation == "exceeds" else "below"
    # strict: a tie (297 test images make them common) does not beat anything
    if worst > m:
        verdict, reason = "holds", f"every run of a is {word} every run it is compared with"
    elif best <= m:
        verdict, reason = "does not hold", f"no run of a is {word} by more than the margin"
    else:
        verdict, reason = "inconclusive", "the seed ranges overlap"
    return Verdict(claim, verdict, "; ".join(evidence), reason)


def welch_interval(groups: Sequence[tuple[np.ndarray, float]], offset: float = 0.0,
                   level: float = 0.95) -> tuple[float, float, float, float]:
    """The ``level`` t interval of sum(weight * mean(values)) - offset over independent groups,
    with Welch-Satterthwaite degrees of freedom: (estimate, low, high, df). A group of
    identical values adds no variance; when no group has any, the interval is the point."""
    from scipy import stats  # lazy: scipy

    estimate = sum(w * float(np.mean(v)) for v, w in groups) - offset
    terms = [(w * w * float(np.var(v, ddof=1)) / len(v), len(v) - 1) for v, w in groups]
    var = sum(t for t, _ in terms)
    if var <= 0:
        return estimate, estimate, estimate, math.inf
    df = var ** 2 / sum(t * t / dof for t, dof in terms if t > 0)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(var)
    return estimate, estimate - half, estimate + half, df


def t_verdict(claim: Claim, groups: Sequence[tuple[np.ndarray, float]], offset: float,
              evidence: list[str], what: str = "difference of means") -> Verdict:
    """``relation`` decided on the 95% Welch t interval [lo, hi] of the contrast (module
    docstring, "Rules")."""
    estimate, lo, hi, df = welch_interval(groups, offset)
    m = claim.margin
    evidence.append(f"{what} {fmt_signed(claim, estimate)}, 95% t interval "
                    f"[{fmt_signed(claim, lo)}, {fmt_signed(claim, hi)}]"
                    + (f" (df {df:.1f})" if math.isfinite(df) else " (no seed variance)"))
    if claim.relation == "exceeds":
        verdict = "holds" if lo > m else "does not hold" if hi <= m else "inconclusive"
        reason = {"holds": "the whole interval lies above the margin",
                  "does not hold": "the whole interval lies at or below the margin",
                  "inconclusive": "the interval straddles the margin"}[verdict]
    elif claim.relation == "below":
        verdict = "holds" if hi < -m else "does not hold" if lo >= -m else "inconclusive"
        reason = {"holds": "the whole interval lies below minus the margin",
                  "does not hold": "the whole interval lies at or above minus the margin",
                  "inconclusive": "the interval straddles minus the margin"}[verdict]
    elif claim.relation == "within":
        verdict = ("holds" if -m < lo and hi < m else
                   "does not hold" if lo >= m or hi <= -m else "inconclusive")
        reason = {"holds": "the whole interval lies within the margin",
                  "does not hold": "the whole interval lies outside the margin",
                  "inconclusive": "the interval is not inside the margin, nor wholly "
                                  "outside it"}[verdict]
    elif claim.relation == "at_least":
        verdict = "holds" if lo > -m else "does not hold" if hi <= -m else "inconclusive"
        reason = {"holds": "the interval's low end is above minus the margin",
                  "does not hold": "the whole interval lies at or below minus the margin",
                  "inconclusive": "the interval straddles minus the margin"}[verdict]
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


def evaluate_interaction(claim: Claim, runs: pd.DataFrame) -> Verdict:
    """(a - b) - (c - d) against 0 by a Welch t interval: a difference of differences, e.g.
    whether the BN-NF gap is larger at the large batch than at the small one."""
    evidence, counts, groups = [], {}, []
    for name, weight in (("a", 1.0), ("b", -1.0), ("c", -1.0), ("d", 1.0)):
        done, total = finished(runs, claim.selections[name])
        done, total, best = at_best(claim, runs, claim.selections[name], done, total)
        values = run_values(claim, done)
        where = selection_text(runs, claim.selections[name])
        evidence.append(f"{name} ({where}){best}: {describe(claim, values, done, total)}")
        counts[name] = len(values)
        groups.append((values, weight))
    short = too_few(claim, counts)
    if short:
        return Verdict(claim, "inconclusive", "; ".join(evidence), short)
    if claim.margin:
        evidence.append(f"margin {fmt(claim, claim.margin, difference=True)}")
    gaps = [groups[0][0].mean() - groups[1][0].mean(), groups[2][0].mean() - groups[3][0].mean()]
    evidence.append(f"a − b {fmt_signed(claim, gaps[0])}, c − d {fmt_signed(claim, gaps[1])}")
    return t_verdict(claim, groups, 0.0, evidence, what="(a − b) − (c − d)")


def evaluate_spread(claim: Claim, runs: pd.DataFrame) -> Verdict:
    """The spreads of ``metric`` over ``over`` in a's groups against b's (or ``value``)."""
    evidence, counts, values = [], {}, {}
    for name in ("a", "b") if claim.value is None else ("a",):
        done, total = finished(runs, claim.selections[name])
        spreads, groups = group_spreads(claim, done)
        values[name], counts[name] = spreads, len(spreads)
        text = (f"{fmt_spread(claim, spreads.mean())} ({fmt_spread(claim, spreads.min())}–"
                f"{fmt_spread(claim, spreads.max())})" if len(spreads) else "no spread")
        evidence.append(f"{name} ({selection_text(runs, claim.selections[name])}): spread over "
                        f"{claim.over} {text}; {len(spreads)} group(s) of "
                        f"{describe(claim, run_values(claim, done), done, total)}"
                        + (f" ({groups} with fewer than two values)" if groups else ""))
    if claim.value is not None:
        values["b"] = np.array([claim.value])
        evidence.append(f"against {fmt_spread(claim, claim.value)}")
    if claim.margin:
        evidence.append(f"margin {fmt_spread(claim, claim.margin)}")
    short = too_few(claim, counts)
    if short:
        return Verdict(claim, "inconclusive", "; ".join(evidence),
                       short.replace("finished runs", "groups with a spread"))
    return compare_verdict(claim, values["a"], values["b"], evidence)


def group_spreads(claim: Claim, done: pd.DataFrame) -> tuple[np.ndarray, int]:
    """One spread per group of runs equal in every axis but ``over``, and the number of
    groups with fewer than two values (no spread)."""
    axes = sorted({a for axes in done.get("axes", []) for a in axes} - {claim.over})
    axes = [a for a in axes if a in done]
    spreads, short = [], 0
    groups = (done.groupby([done[a].map(repr) for a in axes], dropna=False) if axes
              else [((), done)])
    for _, group in groups:
        values = []
        for _, row in group.iterrows():
            one = run_values(claim, row.to_frame().T)
            values += list(one)
        if len(values) < 2:
            short += 1
            continue
        values = np.array(values, dtype=float)
        spreads.append(np.log2(values.max() / values.min()) if on_log_scale(claim)
                       else values.max() - values.min())
    return np.array(spreads, dtype=float), short


def fmt_spread(claim: Claim, value: float) -> str:
    if on_log_scale(claim):
        return f"{value:.2f} doublings"
    return fmt(claim, value, difference=True)


def fv(value: Any) -> str:
    return f"{value:g}" if is_number(value) else str(value)


def fmt_signed(claim: Claim, value: float) -> str:
    return f"{'+' if value >= 0 else '−'}{fmt(claim, abs(value), difference=True)}"


def evaluate_share(claim: Claim, runs: pd.DataFrame) -> Verdict:
    done, total = finished(runs, claim.selections["select"])
    status = done["status"] if "status" in done else pd.Series("completed", index=done.index)
    acc = pd.to_numeric(done.get("final_acc", pd.Series(np.nan, index=done.index)),
                        errors="coerce")
    chance = pd.Series(chance_levels(done), index=done.index)
    if claim.chance_margin is None:  # not above chance by a one-sided 95% binomial test
        n = pd.Series(n_test_images(done), index=done.index)
        bar = chance + Z95_ONE_SIDED * np.sqrt(chance * (1 - chance) / n)
    else:
        bar = chance + claim.chance_margin
    near = status.eq("completed") & ~(acc >= bar)
    outcomes = {
        "diverged": status.eq("diverged"),
        "completed": status.eq("completed"),
        "near_chance": near,
        "learned": status.eq("completed") & ~near,
    }
    hit = pd.Series(False, index=done.index)
    for name in claim.outcome:
        hit |= outcomes[name]
    counts = ", ".join(f"{int(outcomes[n].sum())} {n.replace('_', ' ')}" for n in claim.outcome)
    steps = pd.to_numeric(done.loc[status.eq("diverged"), "diverged_step"], errors="coerce") \
        if "diverged_step" in done else pd.Series(dtype=float)
    where = (f" (at step{'s' if len(steps) > 1 else ''} "
             f"{', '.join(str(int(s)) for s in steps.dropna())})") if steps.notna().any() else ""
    evidence = (f"{selection_text(runs, claim.selections['select'])}: {int(hit.sum())} of "
                f"{len(done)} finished runs: {counts}{where}")
    if total > len(done):
        evidence += f"; {total - len(done)} not finished"
    if len(done) < claim.min_runs:
        return Verdict(claim, "inconclusive", evidence,
                       too_few(claim, {"select": len(done)}))
    share = hit.mean()
    need = "every run" if claim.at_least >= 1 else f"at least {claim.at_least:.0%} of runs"
    if share >= claim.at_least:
        return Verdict(claim, "holds", evidence, f"{need} as claimed")
    return Verdict(claim, "does not hold", evidence, f"needs {need}; {share:.0%} did")


def evaluate_trend(claim: Claim, runs: pd.DataFrame) -> Verdict:
    done, total = finished(runs, claim.selections["select"])
    rows, ties, short = [], [], []
    over_values = sorted(v for v in done[claim.over].dropna().unique()) if len(done) else []
    for over_value in over_values:
        part = done[done[claim.over].map(lambda v, o=over_value: same(v, o))]
        stats = []
        for choice in sorted(part[claim.choose].dropna().unique()):
            cell = part[part[claim.choose].map(lambda v, c=choice: same(v, c))]
            values = run_values(claim, cell)
            if len(values) < claim.min_runs:
                short.append(f"{claim.over}={fv(over_value)}, {claim.choose}={fv(choice)}")
                continue
            stats.append((choice, values.mean(), values.min(), values.max()))
        if not stats:
            continue
        best = max(stats, key=lambda s: s[1])
        tied = sorted(s[0] for s in stats if s[3] >= best[2])  # ranges overlap the best's
        rows.append(f"{claim.over} {fv(over_value)}: best {claim.choose} {fv(best[0])} "
                    f"({fmt(claim, best[1])}" + (f"; tied: {', '.join(fv(t) for t in tied)}"
                                                  if len(tied) > 1 else "") + ")")
        ties.append((best[0], tied))
    evidence = "; ".join(rows) or "no finished runs"
    if total > len(done):
        evidence += f"; {total - len(done)} runs not finished"
    if short or len(ties) < 2:
        reason = (f"too few finished runs (needs {claim.min_runs} per cell; short: "
                  f"{', '.join(short[:4])}{' ...' if len(short) > 4 else ''})" if short
                  else f"needs two or more values of {claim.over} with results")
        return Verdict(claim, "inconclusive", evidence, reason)
    sign = -1 if claim.direction == "non-increasing" else 1
    tie_sets = [t for _, t in ties]
    # ties count both ways: they can lift a failing trend to inconclusive and demote a
    # passing one, so the verdict never rests on which of two tied values was best by chance
    if every_choice_monotone(tie_sets, sign):
        return Verdict(claim, "holds", evidence, f"the best {claim.choose} is {claim.direction} "
                       "whichever of the tied values is taken")
    if monotone_choice_exists(tie_sets, sign):
        strict = [b for b, _ in ties]
        looks = all(sign * (y - x) >= 0 for x, y in zip(strict, strict[1:]))
        return Verdict(claim, "inconclusive", evidence,
                       ("the best values are " + ("" if looks else "not ") + "monotone, but "
                        + ("another choice among tied values is not" if looks else
                           "a choice among values whose seed ranges overlap the best would be")))
    return Verdict(claim, "does not hold", evidence,
                   f"no choice among tied values makes the best {claim.choose} {claim.direction}")


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


def verdict_counts(verdicts: Sequence[Verdict]) -> str:
    """'2 hold, 1 inconclusive'."""
    counts = {v: sum(x.verdict == v for x in verdicts) for v in VERDICTS}
    return ", ".join(f"{n} {'hold' if v == 'holds' and n != 1 else v}"
                     for v, n in counts.items() if n)
