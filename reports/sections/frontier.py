"""Stability frontier: the largest stable learning rate per cell (``run_ablations.py
frontier``), its two figures (captions in the figure table) and its table."""

from __future__ import annotations

import pandas as pd

from reports.document import Plot, Section, Table
from reports.figures import frontier as ff
from reports.sections.figures import FRONTIER_FIGURES, failure_line, figure_bytes


def frontier_sections(frontier: pd.DataFrame | None) -> list[Section]:
    """"Stability frontier": its two figures and table, when the grid has a frontier."""
    if frontier is None or frontier.empty:
        return []
    lo, hi, res = (frontier[k].iloc[0] for k in ("lr_min", "lr_max", "resolution"))
    ramp = "method" in frontier and frontier["method"].iloc[0] == "range-test"
    section = Section("Stability frontier", [
        "For each cell (the grid's axes without the learning rate) `run_ablations.py frontier`"
        " searched the largest stable peak learning rate by bisection on log-lr between "
        f"{lo:g} and {hi:g} to a ratio of {res:.3g}; every probe is a run of this grid (its "
        "`lr` is an axis). Stable: not diverged, and the training loss fell below the spec's "
        "fraction of its initial value (`ablations.frontier`)." if not ramp else
        "Method: range test (`frontier --method range-test`, fastai's `lr_find`): one run per "
        f"cell with the lr rising geometrically from {lo:g} to {hi:g}; the edge is the rate of "
        "the step before its smoothed loss first exceeded 4x its running minimum or diverged, "
        f"snapped down to the x{res:.3g} lattice. A range test measures instability during a "
        "ramp, not at a fixed rate: a rate below its edge is not shown to train stably for a "
        "whole run (`ablations.frontier`)."])
    for entry in FRONTIER_FIGURES:
        if ramp and entry.name == "frontier-accuracy":  # no run trained at a range test's edge
            continue
        try:
            png = figure_bytes(entry.draw(frontier))
        except Exception as err:  # one figure failing must not cost the whole report
            section.parts.append(f"Figure {entry.name} could not be drawn: {failure_line(err)}")
            continue
        section.parts.append(Plot(entry.name, entry.caption, png))
    if "non_monotone" in frontier.columns and not ramp:  # a ramp checks no monotonicity
        count = ff.non_monotone_count(frontier)
        section.parts.append(
            f"Monotonicity check (one probe two lattice steps above each edge): {count} of "
            f"{len(frontier)} cells non-monotone (stable again above their edge)"
            + (": for those the search's assumption fails and the edge is a lower bound." if
               count else "."))
    section.parts.append(Table(ff.frontier_table(frontier)))
    return [section]
