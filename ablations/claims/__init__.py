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

The package: :mod:`~ablations.claims.checks` holds one class per check, each parsing and
evaluating itself; :mod:`~ablations.claims.registry` maps the TOML ``check`` name to its class
and parses, checks and evaluates a spec's claims; :mod:`~ablations.claims.rules` decides a
relation (``range``, ``t95``); :mod:`~ablations.claims.base` has the common fields and the
verdict, :mod:`~ablations.claims.selection` the picking of runs, :mod:`~ablations.claims.stats`
the numbers (Welch t, binomial margins, chance levels) and :mod:`~ablations.claims.format` how
the evidence reads.
"""

from ablations.claims.base import (
    ACCURACY_METRICS,
    COMMON_FIELDS,
    DERIVED_MARGINS,
    DIRECTIONS,
    FRONTIER_METRICS,
    METRICS,
    OUTCOMES,
    RELATIONS,
    RULES,
    VERDICTS,
    Claim,
    ClaimError,
    UntestableClaim,
    Verdict,
    metric_column,
    on_log_scale,
    run_values,
)
from ablations.claims.checks import Compare, Interaction, Share, Spread, Trend
from ablations.claims.format import describe, fmt, selection_text, verdict_counts
from ablations.claims.registry import (
    CHECK_CLASSES,
    CHECKS,
    check_claims,
    evaluate,
    evaluate_claims,
    parse_claim,
    parse_claims,
)
from ablations.claims.rules import Relational, Versus, compare_verdict, t_verdict
from ablations.claims.selection import (
    EXTREMES,
    FINISHED,
    SEARCHED,
    cells_as_runs,
    finished,
    is_number,
    resolve_extreme,
    same,
    select,
)
from ablations.claims.stats import (
    Z95,
    Z95_ONE_SIDED,
    binomial_half_width,
    chance_levels,
    every_choice_monotone,
    monotone_choice_exists,
    n_test_images,
    welch_interval,
)

__all__ = [
    "ACCURACY_METRICS", "CHECKS", "CHECK_CLASSES", "COMMON_FIELDS",
    "DERIVED_MARGINS", "DIRECTIONS", "EXTREMES", "FINISHED", "FRONTIER_METRICS", "METRICS",
    "OUTCOMES", "RELATIONS", "RULES", "SEARCHED", "VERDICTS", "Z95", "Z95_ONE_SIDED",
    "Claim", "ClaimError", "Compare", "Interaction", "Relational", "Share", "Spread", "Trend",
    "UntestableClaim", "Verdict", "Versus",
    "binomial_half_width", "cells_as_runs", "chance_levels", "check_claims", "compare_verdict",
    "describe", "evaluate", "evaluate_claims", "every_choice_monotone", "finished", "fmt",
    "is_number", "metric_column", "monotone_choice_exists", "n_test_images", "on_log_scale",
    "parse_claim", "parse_claims", "resolve_extreme", "run_values", "same", "select",
    "selection_text", "t_verdict", "verdict_counts", "welch_interval",
]
