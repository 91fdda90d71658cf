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
    section = Section("Stability frontier", [
        "For each cell (the grid's axes without the learning rate) `run_ablations.py frontier`"
        " searched the largest stable peak learning rate by bisection on log-lr between "
        f"{frontier['lr_min'].iloc[0]:g} and {frontier['lr_max'].iloc[0]:g} to a ratio of "
        f"{frontier['resolution'].iloc[0]:.3g}; every probe is a run of this grid (its `lr` "
        "is an axis). Stable: not diverged, and the training loss fell below the spec's "
        "fraction of its initial value (`ablations.frontier`)."])
    for entry in FRONTIER_FIGURES:
        try:
            png = figure_bytes(entry.draw(frontier))
        except Exception as err:  # one figure failing must not cost the whole report
            section.parts.append(f"Figure {entry.name} could not be drawn: {failure_line(err)}")
            continue
        section.parts.append(Plot(entry.name, entry.caption, png))
    if "non_monotone" in frontier.columns:
        count = ff.non_monotone_count(frontier)
        section.parts.append(
            f"Monotonicity check (one probe two lattice steps above each edge): {count} of "
            f"{len(frontier)} cells non-monotone (stable again above their edge)"
            + (": for those the search's assumption fails and the edge is a lower bound." if
               count else "."))
    section.parts.append(Table(ff.frontier_table(frontier)))
    return [section]
