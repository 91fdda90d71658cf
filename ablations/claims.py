"""Claims a grid tests, checked against the grid's own stored runs.

A spec lists what it sets out to test as ``[[claims]]`` tables; the report evaluates each one
on the finished runs and gives its evidence and a verdict: ``holds``, ``does not hold`` or
``inconclusive``. The sentence is what would be true; the verdict says whether the numbers
show it. Nothing in a report is written to fit a claim.

    [[claims]]
    id = "C2"                                  # optional; default C1, C2, ... in order
    text = "AGC trains the NF-ResNet to 80% or more at the large batch."
    source = "paper B, Fig. 2"
    check = "compare"                           # compare | share | trend | spread
    a = { "model.name" = "nf_resnet26", "clip.mode" = "agc", batch_size = "@max" }
    value = 0.8                                 # or b = { ... }: another selection
    relation = "exceeds"                        # exceeds | below | within
    margin = 0.0                                # default 0
    metric = "final_acc"                        # default final_acc; see METRICS
    min_runs = 2                                # finished runs each selection needs; default 2

Selections (``a``, ``b``, ``select``) map run keys (dotted, as in ``[grid]``: ``model.name``,
``clip.mode``, ``batch_size``...) to a value or a list of values; ``"@min"`` / ``"@max"`` stand
for the smallest / largest value of that key in the grid, so a claim about "the large batch"
holds at every scale the grid is run at.

Checks, over the finished (completed or diverged) runs of each selection; every selection
needs ``min_runs`` of them, else the claim is inconclusive:

- ``compare``: the per-run ``metric`` of selection ``a`` against selection ``b`` (or the
  constant ``value``), compared by seed ranges, not just means, so seed noise cannot pass for
  an effect. ``exceeds``: holds when even a's worst run beats b's best by ``margin``
  (min a - max b >= margin); does not hold when even a's best run does not (max a - min b <
  margin); inconclusive in between (the seed ranges overlap). ``below`` mirrors it.
  ``within``: holds when every pair of runs is within ``margin`` (max a - min b and max b -
  min a both <= margin); does not hold when the ranges are further apart than ``margin``;
  inconclusive in between.
- ``share``: the fraction of runs of ``select`` whose outcome is one of ``outcome``
  (``diverged``; ``near_chance``, completed with ``final_acc`` below chance + ``chance_margin``,
  default 0.1; ``completed``) is at least ``at_least`` (default 1: every run).
- ``trend``: within ``select``, for each value of ``over`` (e.g. ``batch_size``) the value of
  ``choose`` (e.g. ``clip.threshold``) with the best mean ``metric``; holds when that best
  value is ``non-increasing`` / ``non-decreasing`` (``direction``) in ``over``. Values whose
  seed ranges overlap the best one's count as tied: if only a choice among ties makes the
  sequence monotone the claim is inconclusive, if no choice does it does not hold.

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

from sigprop.errors import UserError

CHECKS = ("compare", "share", "trend", "spread")
RELATIONS = ("exceeds", "below", "within")
OUTCOMES = ("diverged", "near_chance", "completed")
DIRECTIONS = ("non-increasing", "non-decreasing")
FRONTIER_METRICS = ("max_stable_lr", "min_unstable_lr")  # frontier.parquet columns, log2 scale
METRICS = ("final_acc", "best_acc", "max_grad_norm", "clip_fraction", "steps_done",
           "var_growth", *FRONTIER_METRICS)
# frontier cell statuses with an answer (ablations.frontier.SEARCHED)
SEARCHED = ("found", "stable_to_lr_max", "unstable_at_lr_min")
ACCURACY_METRICS = ("final_acc",)
VERDICTS = ("holds", "does not hold", "inconclusive")
FINISHED = ("completed", "diverged")
EXTREMES = ("@min", "@max")

COMMON_FIELDS = {"id", "text", "source", "check", "metric", "min_runs"}
CHECK_FIELDS = {
    "compare": {"a", "b", "value", "relation", "margin"},
    "share": {"select", "outcome", "at_least", "chance_margin"},
    "trend": {"select", "over", "choose", "direction"},
    "spread": {"a", "b", "value", "relation", "margin", "over"},
}
SELECTION_FIELDS = {"compare": ("a", "b"), "share": ("select",), "trend": ("select",),
                    "spread": ("a", "b")}


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
    metric: str = "final_acc"
    min_runs: int = 2
    selections: dict[str, dict[str, list]] = field(default_factory=dict)  # a, b or select
    value: float | None = None
    relation: str = "exceeds"
    margin: float = 0.0
    outcome: tuple[str, ...] = ("diverged",)
    at_least: float = 1.0
    chance_margin: float = 0.1
    over: str = ""
    choose: str = ""
    direction: str = "non-increasing"

    def keys(self) -> set[str]:
        """Every run key the claim refers to."""
        out = {k for sel in self.selections.values() for k in sel}
        return out | {k for k in (self.over, self.choose) if k}


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
    claim.metric = table.get("metric", "final_acc")
    if claim.metric not in METRICS:
        raise ClaimError(f"{where}.metric must be one of {', '.join(METRICS)}; "
                         f"got {claim.metric!r}")
    claim.min_runs = table.get("min_runs", 2)
    if isinstance(claim.min_runs, bool) or not isinstance(claim.min_runs, int) \
            or claim.min_runs < 1:
        raise ClaimError(f"{where}.min_runs must be a positive integer; got {claim.min_runs!r}")
    for name in SELECTION_FIELDS[check]:
        if name == "b" and "b" not in table:
            continue
        claim.selections[name] = parse_selection(table.get(name), f"{where}.{name}")
    if check in ("compare", "spread"):
        parse_compare(claim, table, where)
    if check == "spread":
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
        claim.chance_margin = number(table.get("chance_margin", 0.1),
                                     f"{where}.chance_margin", 0.0, 1.0)
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
    claim.relation = table.get("relation", "exceeds")
    if claim.relation not in RELATIONS:
        raise ClaimError(f"{where}.relation must be one of {', '.join(RELATIONS)}; "
                         f"got {claim.relation!r}")
    claim.margin = number(table.get("margin", 0.0), f"{where}.margin", 0.0)


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
    values = pd.to_numeric(runs.get(claim.metric, pd.Series(np.nan, index=runs.index)),
                           errors="coerce").to_numpy(dtype=float)
    diverged = runs["status"].eq("diverged").to_numpy() if "status" in runs else \
        np.zeros(len(runs), bool)
    if claim.metric in ACCURACY_METRICS:
        values = np.where(diverged, chance_levels(runs), values)
    else:
        values = values[~diverged]
    return values[np.isfinite(values) & ((values > 0) if on_log_scale(claim) else True)]


def chance_levels(runs: pd.DataFrame) -> np.ndarray:
    if "model.num_classes" in runs:
        classes = pd.to_numeric(runs["model.num_classes"], errors="coerce")
        if classes.notna().all():
            return 1.0 / classes.to_numpy(dtype=float)
    if "data" in runs:
        from sigprop.data import dataset_info

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


def evaluate_compare(claim: Claim, runs: pd.DataFrame) -> Verdict:
    done_a, total_a = finished(runs, claim.selections["a"])
    a = run_values(claim, done_a)
    where_a = selection_text(runs, claim.selections["a"])
    evidence = [f"a ({where_a}): {describe(claim, a, done_a, total_a)}"]
    counts = {"a": len(a)}
    if claim.value is None:
        done_b, total_b = finished(runs, claim.selections["b"])
        b = run_values(claim, done_b)
        where_b = selection_text(runs, claim.selections["b"])
        evidence.append(f"b ({where_b}): {describe(claim, b, done_b, total_b)}")
        counts["b"] = len(b)
    else:
        b = np.array([claim.value])
        evidence.append(f"against {fmt(claim, claim.value)}")
    if claim.margin:
        evidence.append(f"margin {fmt(claim, claim.margin, difference=True)}")
    if on_log_scale(claim) and claim.value is not None:
        b = np.array([claim.value]) if claim.value > 0 else np.array([np.nan])
    short = too_few(claim, counts)
    if short:
        return Verdict(claim, "inconclusive", "; ".join(evidence), short)
    if on_log_scale(claim):  # ratios of learning rates: compared as differences of log2
        a, b = np.log2(a), np.log2(b)
    if len(a) and len(b) and claim.value is None:
        evidence.append(f"difference of means {fmt_signed(claim, a.mean() - b.mean())}")
    return compare_verdict(claim, a, b, evidence)


def compare_verdict(claim: Claim, a: np.ndarray, b: np.ndarray, evidence: list[str]) -> Verdict:
    """``relation`` between the values of a and b by their ranges (module docstring)."""
    if claim.relation == "within":
        widest = max(a.max() - b.min(), b.max() - a.min())
        gap = max(a.min() - b.max(), b.min() - a.max())
        if widest <= claim.margin:
            verdict, reason = "holds", "every run of a is within the margin of every run of b"
        elif gap > claim.margin:
            verdict, reason = "does not hold", "the seed ranges lie further apart than the margin"
        else:
            verdict, reason = "inconclusive", ("the means or some seeds differ by more than the "
                                               "margin, but the seed ranges come within it")
        return Verdict(claim, verdict, "; ".join(evidence), reason)
    high, low = (a, b) if claim.relation == "exceeds" else (b, a)
    worst, best = high.min() - low.max(), high.max() - low.min()
    word = "above" if claim.relation == "exceeds" else "below"
    if worst >= claim.margin:
        verdict, reason = "holds", f"every run of a is {word} every run it is compared with"
    elif best < claim.margin:
        verdict, reason = "does not hold", f"no run of a is {word} by the margin"
    else:
        verdict, reason = "inconclusive", "the seed ranges overlap"
    return Verdict(claim, verdict, "; ".join(evidence), reason)


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
    outcomes = {
        "diverged": status.eq("diverged"),
        "completed": status.eq("completed"),
        "near_chance": status.eq("completed") & (acc < chance + claim.chance_margin),
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
    strict = [b for b, _ in ties]
    if all(sign * (y - x) >= 0 for x, y in zip(strict, strict[1:])):
        return Verdict(claim, "holds", evidence, f"the best {claim.choose} is {claim.direction}")
    if monotone_choice_exists([t for _, t in ties], sign):
        return Verdict(claim, "inconclusive", evidence,
                       "the best values are not monotone, but a choice among values whose seed "
                       "ranges overlap the best would be")
    return Verdict(claim, "does not hold", evidence,
                   f"no choice among tied values makes the best {claim.choose} {claim.direction}")


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
