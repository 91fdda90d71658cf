"""Where and when a diverged run broke, read off its flight record (:mod:`sigprop.recorder`).

:func:`diagnose` is a pure function of one run's flight frame; :data:`RULE` says the rule in
words, for the report to print.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

KINDS = {"var": "activations", "sq_mean": "activations", "grad_norm": "gradients",
         "agc_ratio_max": "gradients", "update_ratio": "update"}
# Within one step: the forward pass (activations, stem to head), the backward pass (gradients,
# head to stem), then the update (all blocks at once).
_PHASE = {"activations": 0, "gradients": 1, "update": 2}
FACTOR = 10.0
EARLY_STEPS = 10
MIN_EARLY_STEPS = 3
FIELDS = ("diverged_block", "diverged_first_step", "diverged_first_stat",
          "diverged_first_kind", "diverged_clipping_active", "diagnosis")

RULE = (
    "Each block statistic (activation var and sq_mean, gradient grad_norm and agc_ratio_max, "
    "update_ratio) is one series. Its early range is its median over the first "
    f"k = min({EARLY_STEPS}, steps recorded before the divergence) recorded steps; with fewer "
    f"than {MIN_EARLY_STEPS} such steps there is no diagnosis. A series leaves its range at the "
    f"first recorded step where it is more than {FACTOR:g}x that median or not finite (a "
    "series whose median is 0 only at a non-finite value). The diagnosis is the first series to "
    "leave, in the order the step computes them: earlier steps first; within a step the "
    "forward pass (activations, stem to head), then the backward pass (gradients, head to "
    "stem), then the update (all blocks at once). Where two blocks are first together (their "
    "updates at the same step) it names both and no block; clipping is 'active' when the "
    "step's gradient was clipped."
)


def no_diagnosis() -> dict:
    """The summary fields of a run that did not diverge."""
    return dict.fromkeys(FIELDS)


def diagnose(flight: pd.DataFrame | None, diverged_step: int | None) -> dict:
    """The :data:`FIELDS` of a diverged run from its flight frame (columns step, block, stage,
    index, stat, value): ``diverged_block`` (None where the data singles out no block),
    ``diverged_first_step``, ``diverged_first_stat``, ``diverged_first_kind`` (activations,
    gradients or update; None for a tie across kinds), ``diverged_clipping_active`` (None when
    not recorded) and ``diagnosis``, one line saying it, or why there is none. All None for
    ``diverged_step`` None."""
    out = no_diagnosis()
    if diverged_step is None:
        return out
    out["diagnosis"] = f"diverged at step {diverged_step}: "
    if flight is None or flight.empty:
        out["diagnosis"] += "no flight record (the recorder was off)"
        return out
    flight = flight[flight["step"] <= diverged_step]
    series = flight[flight["stat"].isin(list(KINDS))]
    before = sorted(s for s in series["step"].unique() if s < diverged_step)
    if len(before) < MIN_EARLY_STEPS:
        out["diagnosis"] += (f"{len(before)} recorded step(s) before it, fewer than "
                             f"{MIN_EARLY_STEPS}: too few for an early range, no diagnosis")
        return out
    early = set(before[:min(EARLY_STEPS, len(before))])
    events = []  # (step, phase, position, block, stat)
    for (block, stat), rows in series.groupby(["block", "stat"], sort=False):
        rows = rows.sort_values("step")
        values = rows["value"].to_numpy(dtype=np.float64)
        steps = rows["step"].to_numpy()
        base = values[np.isin(steps, list(early))]
        base = base[np.isfinite(base)]
        if not len(base):
            continue
        median = float(np.median(base))
        with np.errstate(invalid="ignore"):
            left = ~np.isfinite(values) | ((values > FACTOR * median) if median > 0 else False)
        hits = np.flatnonzero(left)
        if not len(hits):
            continue
        kind = KINDS[stat]
        index = int(rows["index"].iloc[0])
        position = {"activations": index, "gradients": -index, "update": 0}[kind]
        events.append((int(steps[hits[0]]), _PHASE[kind], position, block, stat))
    if not events:
        out["diagnosis"] += (f"no block statistic left {FACTOR:g}x its early median before "
                             "it; the data singles out no block")
        return out
    first = min(e[:3] for e in events)
    tied = [e for e in events if e[:3] == first]
    step = first[0]
    blocks = list(dict.fromkeys(e[3] for e in tied))
    kinds = list(dict.fromkeys(KINDS[e[4]] for e in tied))
    stats = sorted({e[4] for e in tied}, key=list(KINDS).index)
    out.update(diverged_first_step=step, diverged_first_stat=stats[0],
               diverged_first_kind=kinds[0] if len(kinds) == 1 else None,
               diverged_clipping_active=_clipped(flight, step))
    what = " and ".join(stats)
    if len(blocks) == 1:
        out["diverged_block"] = blocks[0]
        text = (f"{blocks[0]} broke first, at step {step} ({what} above {FACTOR:g}x the early "
                "median)")
    else:
        text = (f"blocks {', '.join(blocks)} at step {step} ({what}): the data does not single "
                "out one block")
    clipping = out["diverged_clipping_active"]
    if clipping is not None:
        text += "; clipping was " + ("active" if clipping else "not active") + " at that step"
    out["diagnosis"] += text
    return out


def _clipped(flight: pd.DataFrame, step: int) -> bool | None:
    rows = flight[(flight["block"] == "run") & (flight["stat"] == "clipped")
                  & (flight["step"] == step)]
    if rows.empty or not math.isfinite(float(rows["value"].iloc[0])):
        return None
    return bool(float(rows["value"].iloc[0]) > 0)
