"""Diverged, failed and damaged runs: each diverged run's diagnosis (seeds that broke the same
way grouped), the divergence timeline, each failure's error and traceback, and the runs whose
files cannot be read."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ablations.store import DAMAGED
from reports.document import Bullets, Details, Plot, Section
from reports.figures.frames import setting_axes, sort_frame, varied_axes
from reports.figures.style import fmt_value, is_number
from reports.sections.figures import TIMELINE, failure_line, figure_bytes
from sigprop.diagnosis import RULE

TRACEBACK_LINES = 25


# The diagnosis of a diverged run (``ablations`` stores it in the run's summary), stated here
# in words: the report cannot import the rule's constant from every store's version.
DIAGNOSIS_RULE = ("Diagnosis of a diverged run, from its flight record (every step kept before "
                  f"the divergence; `sigprop.diagnosis`). {RULE}")
TIMELINE_PANELS = 6


def diverged_text(row: pd.Series) -> str:
    step = row.get("diverged_step")
    return f"diverged at step {int(step)}" if is_number(step) and np.isfinite(step) \
        else "diverged"


def diagnosis_text(row: pd.Series) -> str:
    return row["diagnosis"] if isinstance(row.get("diagnosis"), str) else \
        "no diagnosis recorded"


def diverged_groups(frame: pd.DataFrame, diverged: pd.DataFrame) -> list[pd.DataFrame]:
    """The diverged runs, one group per setting whose seeds (two or more) agree on the block
    and kind of what moved first, one group per run otherwise; in the runs' order."""
    settings = [c for c in setting_axes(frame) if c in diverged]
    groups: list[pd.DataFrame] = []
    parts = diverged.groupby(settings, dropna=False, sort=False) if settings else \
        [((), diverged)]
    for _, part in parts:
        blocks, kinds = part["diverged_block"], part["diverged_first_kind"]
        agree = (len(part) >= 2 and blocks.notna().all() and kinds.notna().all()
                 and blocks.nunique() == 1 and kinds.nunique() == 1)
        groups += [part] if agree else [part.loc[[i]] for i in part.index]
    return groups


def problems_section(frame: pd.DataFrame, statuses: dict[str, dict],
                     flight: pd.DataFrame | None = None) -> Section | None:
    bad = sort_frame(frame[frame["status"].isin(["diverged", "failed"])], ["status"])
    if bad.empty:
        return None
    section = Section("Diverged and failed runs")
    diverged = bad[bad["status"] == "diverged"]
    if len(diverged):
        section.parts.append(DIAGNOSIS_RULE)
    shown: list[str] = []  # one run per entry: the timeline's panels
    for group in diverged_groups(frame, diverged) if len(diverged) else []:
        first = group.iloc[0]
        shown.append(first["run_id"])
        if len(group) == 1:
            error = first.get("error")
            detail = diverged_text(first) + (f": {error}" if isinstance(error, str) and error
                                             else "")
            section.parts.append(f"`{first['run_id']}` ({describe(frame, first)}) {detail}. "
                                 f"Diagnosis: {diagnosis_text(first)}.")
            continue
        steps = ", ".join(str(int(s)) for s in group["diverged_step"] if is_number(s)
                          and np.isfinite(s))
        where = ", ".join(p for p in describe(frame, first).split(", ")
                          if not p.startswith("seed=")) or "base config"
        ids = ", ".join(f"`{r}`" for r in group["run_id"])
        section.parts.append(
            f"{where}: the {len(group)} diverged seeds ({ids}) broke the same way: "
            f"{first['diverged_first_kind']} moved first, in block `{first['diverged_block']}`;"
            f" diverged at steps {steps or 'not recorded'}.")
        section.parts.append(Bullets([f"`{r['run_id']}`: {diagnosis_text(r)}"
                                      for _, r in group.iterrows()]))
    if len(diverged):
        section.parts += timeline_parts(frame, flight, shown)
    for _, row in bad[bad["status"] == "failed"].iterrows():
        error = row.get("error")
        error = error if isinstance(error, str) and error else None
        section.parts.append(f"`{row['run_id']}` ({describe(frame, row)}) failed: "
                             f"{error or 'no error recorded'}")
        trace = statuses.get(row["run_id"], {}).get("traceback")
        if isinstance(trace, str) and trace.strip():
            tail = "\n".join(trace.rstrip().splitlines()[-TRACEBACK_LINES:])
            section.parts.append(Details(f"traceback of {row['run_id']}", tail))
    return section


def timeline_parts(frame: pd.DataFrame, flight: pd.DataFrame | None, shown: list[str]) -> list:
    """The divergence timeline of the runs ``shown`` (one per entry above) that have a flight
    record, or one line saying why there is none."""
    have = set(flight["run_id"]) if flight is not None and "run_id" in flight else set()
    with_record = [r for r in shown if r in have]
    if not with_record:
        return ["No per-step record (flight.parquet) was kept for the diverged runs (a store "
                "written before the flight recorder), so no timeline is drawn."]
    panels = with_record[:TIMELINE_PANELS]
    more = (f" Drawn: {len(panels)} of the {len(with_record)} with a record."
            if len(with_record) > len(panels) else "")
    try:
        fig = TIMELINE.draw(flight, frame, run_ids=panels)
    except Exception as err:  # one figure failing must not cost the whole report
        return [f"Figure {TIMELINE.name} could not be drawn: {failure_line(err)}"]
    stat = fig.axes[-1].get_ylabel().split("\n")[0]
    caption = TIMELINE.caption.format(stat=stat.capitalize(), more=more)
    return [Plot(TIMELINE.name, caption, figure_bytes(fig))]


def describe(frame: pd.DataFrame, row: pd.Series) -> str:
    own = row.get("axes")  # only the keys this run's grid point sets (no stale thresholds)
    axes = [a for a in varied_axes(frame) if a in row
            and (not isinstance(own, tuple | list) or a in own)]
    return ", ".join(f"{a}={fmt_value(row[a])}" for a in axes
                     if not (isinstance(row[a], float) and np.isnan(row[a]))) or "base config"


def damaged_section(frame: pd.DataFrame) -> Section | None:
    bad = frame[frame["status"] == DAMAGED]
    if bad.empty:
        return None
    items = [f"`{row['run_id']}`: {row['error']}" for _, row in bad.iterrows()]
    return Section("Damaged runs", [
        f"{len(bad)} run(s) have a file that cannot be read; the report leaves them out. The "
        "next `run` of the grid keeps the file as `<name>.damaged-<time>` and runs them again.",
        Bullets(items)])
