"""The checks, one class each: ``Compare``, ``Spread``, ``Interaction``, ``Share`` and
``Trend``. Each parses its own fields (``parse``) and evaluates itself (``evaluate``); the
rules are in the manual of :mod:`ablations.claims`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ablations.claims import stats
from ablations.claims.base import (
    DIRECTIONS,
    OUTCOMES,
    RELATIONS,
    Claim,
    ClaimError,
    UntestableClaim,
    Verdict,
    number,
    on_log_scale,
    run_key,
    run_values,
)
from ablations.claims.format import (
    describe,
    fmt,
    fmt_signed,
    fmt_spread,
    fv,
    selection_text,
    too_few,
)
from ablations.claims.rules import Relational, Versus, compare_verdict, t_verdict
from ablations.claims.selection import finished, same, select
from sigprop.fields import Rule, check_value, one_of


def at_best(claim: Compare | Interaction, runs: pd.DataFrame, selection: Mapping[str, list],
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



@dataclass
class Compare(Versus):
    """``compare``: the per-run ``metric`` of selection a against b, or against ``value``."""

    check = "compare"
    FIELDS = frozenset({"a", "b", "value", "relation", "margin", "rule", "best_of"})
    SELECTIONS = ("a", "b")
    KEY_FIELDS = ("best_of",)
    best_of: str = ""  # each selection at its best value of this key

    def parse_fields(self, table: Mapping, where: str) -> None:
        self.parse_versus(table, where)
        if "best_of" in table:
            self.best_of = run_key(table, "best_of", where, "clip.threshold")

    def evaluate(self, runs: pd.DataFrame) -> Verdict:
        done_a, total_a = finished(runs, self.selections["a"])
        done_a, total_a, best_a = at_best(self, runs, self.selections["a"], done_a, total_a)
        a = run_values(self, done_a)
        where_a = selection_text(runs, self.selections["a"])
        evidence = [f"a ({where_a}){best_a}: {describe(self, a, done_a, total_a)}"]
        counts = {"a": len(a)}
        done_b = None
        if self.value is None:
            done_b, total_b = finished(runs, self.selections["b"])
            done_b, total_b, best_b = at_best(self, runs, self.selections["b"], done_b, total_b)
            b = run_values(self, done_b)
            where_b = selection_text(runs, self.selections["b"])
            evidence.append(f"b ({where_b}){best_b}: {describe(self, b, done_b, total_b)}")
            counts["b"] = len(b)
        else:
            b = np.array([self.value])
            evidence.append(f"against {fmt(self, self.value)}")
        if on_log_scale(self) and self.value is not None:
            b = np.array([self.value]) if self.value > 0 else np.array([np.nan])
        short = too_few(self, counts)
        if short:
            return Verdict(self, "inconclusive", "; ".join(evidence), short)
        margin_note = self.resolve_margin(b, done_b if done_b is not None else done_a)
        if margin_note:
            evidence.append(margin_note)
        if on_log_scale(self):  # ratios of learning rates: compared as differences of log2
            a, b = np.log2(a), np.log2(b)
        if self.rule == "t95":
            return t_verdict(self, [(a, 1.0)] + ([(b, -1.0)] if self.value is None else []),
                             0.0 if self.value is None else float(b[0]), evidence)
        if len(a) and len(b) and self.value is None:
            evidence.append(f"difference of means {fmt_signed(self, a.mean() - b.mean())}")
        return compare_verdict(self, a, b, evidence)

    def resolve_margin(self, reference: np.ndarray, reference_runs: pd.DataFrame) -> str:
        """Fix a derived margin from the reference's values and test-set size; return the
        evidence line that states the margin and where it comes from."""
        if self.margin_rule == "lattice":
            steps = pd.to_numeric(reference_runs.get("resolution", pd.Series(dtype=float)),
                                  errors="coerce").dropna()
            self.margin = float(np.log2(steps.max())) if len(steps) else 0.0
            return (f"margin {fmt(self, self.margin, difference=True)} (derived: one step of "
                    "the frontier's lr lattice, its resolution)")
        if self.margin_rule == "test_set":
            n = stats.n_test_images(reference_runs)
            n = float(np.nanmin(n)) if len(n) and np.isfinite(n).any() else math.nan
            p = float(np.mean(reference)) if len(reference) else math.nan
            self.margin = stats.binomial_half_width(p, n)
            if not np.isfinite(self.margin):
                self.margin = 0.0
                return "margin: no test-set size known, so 0"
            return (f"margin {fmt(self, self.margin, difference=True)} (derived: 95% binomial "
                    f"half-width of the reference's {fmt(self, p)} on {n:.0f} test images)")
        if self.margin:
            return f"margin {fmt(self, self.margin, difference=True)}"
        return ""


@dataclass
class Spread(Versus):
    """``spread``: how far ``metric`` moves over the values of ``over``, per group of runs
    that differ only in ``over``; a's spreads against b's (or ``value``)."""

    check = "spread"
    FIELDS = frozenset({"a", "b", "value", "relation", "margin", "over", "rule"})
    SELECTIONS = ("a", "b")
    KEY_FIELDS = ("over",)
    over: str = ""

    def parse_fields(self, table: Mapping, where: str) -> None:
        self.parse_versus(table, where)
        if self.margin_rule:
            raise ClaimError(f"{where}.margin: a spread takes a number, not the derived "
                             f"{self.margin_rule!r}")
        self.over = run_key(table, "over", where, "clip.threshold")

    def check_runs(self, frame: pd.DataFrame) -> None:
        chosen = select(frame, self.selections["a"])
        if chosen[self.over].nunique(dropna=True) < 2:
            raise UntestableClaim(f"claim {self.id}: a spread needs two or more values of "
                                  f"{self.over} among the runs of selection a")

    def evaluate(self, runs: pd.DataFrame) -> Verdict:
        evidence, counts, values = [], {}, {}
        for name in ("a", "b") if self.value is None else ("a",):
            done, total = finished(runs, self.selections[name])
            spreads, groups = self.group_spreads(done)
            values[name], counts[name] = spreads, len(spreads)
            text = (f"{fmt_spread(self, spreads.mean())} ({fmt_spread(self, spreads.min())}–"
                    f"{fmt_spread(self, spreads.max())})" if len(spreads) else "no spread")
            evidence.append(f"{name} ({selection_text(runs, self.selections[name])}): spread "
                            f"over {self.over} {text}; {len(spreads)} group(s) of "
                            f"{describe(self, run_values(self, done), done, total)}"
                            + (f" ({groups} with fewer than two values)" if groups else ""))
        if self.value is not None:
            values["b"] = np.array([self.value])
            evidence.append(f"against {fmt_spread(self, self.value)}")
        if self.margin:
            evidence.append(f"margin {fmt_spread(self, self.margin)}")
        short = too_few(self, counts)
        if short:
            return Verdict(self, "inconclusive", "; ".join(evidence),
                           short.replace("finished runs", "groups with a spread"))
        return compare_verdict(self, values["a"], values["b"], evidence)

    def group_spreads(self, done: pd.DataFrame) -> tuple[np.ndarray, int]:
        """One spread per group of runs equal in every axis but ``over``, and the number of
        groups with fewer than two values (no spread)."""
        axes = sorted({a for axes in done.get("axes", []) for a in axes} - {self.over})
        axes = [a for a in axes if a in done]
        spreads, short = [], 0
        groups = (done.groupby([done[a].map(repr) for a in axes], dropna=False) if axes
                  else [((), done)])
        for _, group in groups:
            values = []
            for _, row in group.iterrows():
                values += list(run_values(self, row.to_frame().T))
            if len(values) < 2:
                short += 1
                continue
            values = np.array(values, dtype=float)
            spreads.append(np.log2(values.max() / values.min()) if on_log_scale(self)
                           else values.max() - values.min())
        return np.array(spreads, dtype=float), short


@dataclass
class Interaction(Relational):
    """``interaction``: (mean a - mean b) - (mean c - mean d) by its Welch t interval, e.g.
    whether the BN-NF gap is larger at the large batch than at the small one."""

    check = "interaction"
    FIELDS = frozenset({"a", "b", "c", "d", "relation", "margin", "best_of"})
    SELECTIONS = ("a", "b", "c", "d")
    KEY_FIELDS = ("best_of",)
    rule: str = "t95"  # always: four groups have no pair of seed ranges to compare
    best_of: str = ""

    def parse_fields(self, table: Mapping, where: str) -> None:
        if "best_of" in table:
            self.best_of = run_key(table, "best_of", where, "clip.threshold")
        self.parse_relation(table, where, RELATIONS[:2])
        if self.margin_rule:
            raise ClaimError(f"{where}.margin: an interaction takes a number (a difference of "
                             f"differences), not the derived {self.margin_rule!r}")

    def evaluate(self, runs: pd.DataFrame) -> Verdict:
        evidence, counts, groups = [], {}, []
        for name, weight in (("a", 1.0), ("b", -1.0), ("c", -1.0), ("d", 1.0)):
            done, total = finished(runs, self.selections[name])
            done, total, best = at_best(self, runs, self.selections[name], done, total)
            values = run_values(self, done)
            where = selection_text(runs, self.selections[name])
            evidence.append(f"{name} ({where}){best}: {describe(self, values, done, total)}")
            counts[name] = len(values)
            groups.append((values, weight))
        short = too_few(self, counts)
        if short:
            return Verdict(self, "inconclusive", "; ".join(evidence), short)
        if self.margin:
            evidence.append(f"margin {fmt(self, self.margin, difference=True)}")
        gaps = [groups[0][0].mean() - groups[1][0].mean(),
                groups[2][0].mean() - groups[3][0].mean()]
        evidence.append(f"a − b {fmt_signed(self, gaps[0])}, c − d {fmt_signed(self, gaps[1])}")
        return t_verdict(self, groups, 0.0, evidence, what="(a − b) − (c − d)")


OUTCOME = Rule(lambda v: isinstance(v, list) and bool(v) and all(o in OUTCOMES for o in v),
               "one or more of " + ", ".join(OUTCOMES))


@dataclass
class Share(Claim):
    """``share``: the fraction of the runs of ``select`` with one of ``outcome``, against
    ``at_least``."""

    check = "share"
    FIELDS = frozenset({"select", "outcome", "at_least", "chance_margin"})
    SELECTIONS = ("select",)
    outcome: tuple[str, ...] = ("diverged",)
    at_least: float = 1.0
    chance_margin: float | None = None  # None: the binomial rule (the manual)

    def parse_fields(self, table: Mapping, where: str) -> None:
        outcome = table.get("outcome", ["diverged"])
        outcome = [outcome] if isinstance(outcome, str) else outcome
        self.outcome = tuple(check_value(f"{where}.outcome", outcome, OUTCOME, error=ClaimError))
        self.at_least = number(table.get("at_least", 1.0), f"{where}.at_least", 0.0, 1.0)
        if "chance_margin" in table:
            self.chance_margin = number(table["chance_margin"], f"{where}.chance_margin",
                                        0.0, 1.0)

    def evaluate(self, runs: pd.DataFrame) -> Verdict:
        done, total = finished(runs, self.selections["select"])
        status = done["status"] if "status" in done else pd.Series("completed", index=done.index)
        acc = pd.to_numeric(done.get("final_acc", pd.Series(np.nan, index=done.index)),
                            errors="coerce")
        chance = pd.Series(stats.chance_levels(done, strict=True), index=done.index)
        if self.chance_margin is None:  # not above chance by a one-sided 95% binomial test
            n = pd.Series(stats.n_test_images(done), index=done.index)
            bar = chance + stats.Z95_ONE_SIDED * np.sqrt(chance * (1 - chance) / n)
        else:
            bar = chance + self.chance_margin
        near = status.eq("completed") & ~(acc >= bar)
        outcomes = {
            "diverged": status.eq("diverged"),
            "completed": status.eq("completed"),
            "near_chance": near,
            "learned": status.eq("completed") & ~near,
        }
        hit = pd.Series(False, index=done.index)
        for name in self.outcome:
            hit |= outcomes[name]
        counts = ", ".join(f"{int(outcomes[n].sum())} {n.replace('_', ' ')}"
                           for n in self.outcome)
        steps = pd.to_numeric(done.loc[status.eq("diverged"), "diverged_step"],
                              errors="coerce") if "diverged_step" in done else \
            pd.Series(dtype=float)
        where = (f" (at step{'s' if len(steps) > 1 else ''} "
                 f"{', '.join(str(int(s)) for s in steps.dropna())})") \
            if steps.notna().any() else ""
        evidence = (f"{selection_text(runs, self.selections['select'])}: {int(hit.sum())} of "
                    f"{len(done)} finished runs: {counts}{where}")
        if total > len(done):
            evidence += f"; {total - len(done)} not finished"
        if len(done) < self.min_runs:
            return Verdict(self, "inconclusive", evidence, too_few(self, {"select": len(done)}))
        share = hit.mean()
        need = "every run" if self.at_least >= 1 else f"at least {self.at_least:.0%} of runs"
        if share >= self.at_least:
            return Verdict(self, "holds", evidence, f"{need} as claimed")
        return Verdict(self, "does not hold", evidence, f"needs {need}; {share:.0%} did")


@dataclass
class Trend(Claim):
    """``trend``: within ``select``, the value of ``choose`` with the best mean for each value
    of ``over``, monotone in ``direction`` whichever tied value is taken."""

    check = "trend"
    FIELDS = frozenset({"select", "over", "choose", "direction"})
    SELECTIONS = ("select",)
    KEY_FIELDS = ("over", "choose")
    over: str = ""
    choose: str = ""
    direction: str = "non-increasing"

    def parse_fields(self, table: Mapping, where: str) -> None:
        self.over = run_key(table, "over", where, "batch_size")
        self.choose = run_key(table, "choose", where, "batch_size")
        if self.over == self.choose:
            raise ClaimError(f"{where}: over and choose must be different keys")
        self.direction = check_value(f"{where}.direction",
                                     table.get("direction", "non-increasing"),
                                     one_of(DIRECTIONS), error=ClaimError)

    def check_runs(self, frame: pd.DataFrame) -> None:
        chosen = select(frame, self.selections["select"])
        for key in (self.over, self.choose):
            if chosen[key].nunique(dropna=True) < 2:
                raise UntestableClaim(f"claim {self.id}: a trend needs two or more values of "
                                      f"{key} among the selected runs")

    def evaluate(self, runs: pd.DataFrame) -> Verdict:
        done, total = finished(runs, self.selections["select"])
        rows, ties, short = [], [], []
        over_values = sorted(v for v in done[self.over].dropna().unique()) if len(done) else []
        for over_value in over_values:
            part = done[done[self.over].map(lambda v, o=over_value: same(v, o))]
            by_choice = []
            for choice in sorted(part[self.choose].dropna().unique()):
                cell = part[part[self.choose].map(lambda v, c=choice: same(v, c))]
                values = run_values(self, cell)
                if len(values) < self.min_runs:
                    short.append(f"{self.over}={fv(over_value)}, {self.choose}={fv(choice)}")
                    continue
                by_choice.append((choice, values.mean(), values.min(), values.max()))
            if not by_choice:
                continue
            best = max(by_choice, key=lambda s: s[1])
            tied = sorted(s[0] for s in by_choice if s[3] >= best[2])  # ranges overlap the best's
            rows.append(f"{self.over} {fv(over_value)}: best {self.choose} {fv(best[0])} "
                        f"({fmt(self, best[1])}" + (f"; tied: {', '.join(fv(t) for t in tied)}"
                                                     if len(tied) > 1 else "") + ")")
            ties.append((best[0], tied))
        evidence = "; ".join(rows) or "no finished runs"
        if total > len(done):
            evidence += f"; {total - len(done)} runs not finished"
        if short or len(ties) < 2:
            reason = (f"too few finished runs (needs {self.min_runs} per cell; short: "
                      f"{', '.join(short[:4])}{' ...' if len(short) > 4 else ''})" if short
                      else f"needs two or more values of {self.over} with results")
            return Verdict(self, "inconclusive", evidence, reason)
        sign = -1 if self.direction == "non-increasing" else 1
        tie_sets = [t for _, t in ties]
        # ties count both ways: they can lift a failing trend to inconclusive and demote a
        # passing one, so the verdict never rests on which of two tied values was best by chance
        if stats.every_choice_monotone(tie_sets, sign):
            return Verdict(self, "holds", evidence, f"the best {self.choose} is "
                           f"{self.direction} whichever of the tied values is taken")
        if stats.monotone_choice_exists(tie_sets, sign):
            strict = [b for b, _ in ties]
            looks = all(sign * (y - x) >= 0 for x, y in zip(strict, strict[1:]))
            return Verdict(self, "inconclusive", evidence,
                           ("the best values are " + ("" if looks else "not ") + "monotone, but "
                            + ("another choice among tied values is not" if looks else
                               "a choice among values whose seed ranges overlap the best "
                               "would be")))
        return Verdict(self, "does not hold", evidence, f"no choice among tied values makes "
                       f"the best {self.choose} {self.direction}")

