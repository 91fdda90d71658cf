"""Summary: what the grid is for, what its claims' verdicts are, what varied, how many runs
finished, and what the report could not show."""

from __future__ import annotations

import pandas as pd

from ablations.claims import Verdict, verdict_counts
from ablations.store import FINISHED
from reports.document import Bullets, Section
from reports.figures.frames import DIVERGED_RULE, PENDING, ordered_values, varied_axes
from reports.figures.style import fmt_value
from reports.sections.key_results import ROUNDING_MARK, rounding_items

STATE_ORDER = ["completed", "diverged", "failed", "running", "interrupted", "queued"]


def counts_line(frame: pd.DataFrame) -> str:
    counts = frame["status"].value_counts().to_dict()
    order = STATE_ORDER + sorted(set(counts) - set(STATE_ORDER))
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))


def axis_values(frame: pd.DataFrame, axis: str) -> str:
    if axis not in frame:
        return "?"
    uses = frame[[axis in tuple(a) for a in frame["axes"]]] if "axes" in frame else frame
    values = ordered_values(uses if len(uses) else frame, axis)
    return ", ".join(fmt_value(v) for v in values)


def pending_line(pending: pd.DataFrame, frontier: pd.DataFrame | None) -> str:
    """What the unfinished runs mean: a grid's are still to run; a frontier's are probes, which
    its search runs again only if a cell still needs them."""
    head = f"{len(pending)} run(s) not finished yet ({counts_line(pending)})"
    if frontier is None or "status" not in frontier:
        return f"{head}: run the grid again to complete them"
    if frontier["status"].eq("incomplete").any():
        return f"{head}: run the same frontier command again to continue the search"
    return (f"{head}: probes no cell's search needs any more (every cell's search has ended; "
            f"a search stopped midway, resumed on another path); no edge rests on them")


def summary_section(frame: pd.DataFrame, spec: dict, skipped: list[str],
                    verdicts: list[Verdict] | None = None,
                    frontier: pd.DataFrame | None = None) -> Section:
    section = Section("Summary")
    if spec.get("description"):
        section.parts.append(" ".join(str(spec["description"]).split()))
    if spec.get("intended_for"):
        section.parts.append(f"Intended for: {spec['intended_for']}.")
    if verdicts:
        section.parts.append(f"What the runs show: of {len(verdicts)} claim(s) this grid tests, "
                             f"{verdict_counts(verdicts)} (see Claims).")
        section.parts.append(Bullets([f"{v.claim.id}: {v.verdict} — {v.claim.text}"
                                      for v in verdicts]))
    elif spec and spec.get("claims") and verdicts is None:
        section.parts.append("The stored spec's claims could not be read or checked (see the "
                             "warnings), so no verdict is given.")
    elif spec and not spec.get("untested_claims"):
        section.parts.append("This grid states no claims: the figures and tables below are the "
                             "whole finding.")
    if spec.get("untested_claims"):
        section.parts.append("Claims of the spec this run of it could not test:")
        section.parts.append(Bullets([str(line) for line in spec["untested_claims"]]))
    sensitive = rounding_items(frame)
    if sensitive:
        section.parts.append(f"Sensitive to float rounding ({ROUNDING_MARK} in Key results, "
                             "which states the rule): these settings' numbers need not "
                             "reproduce bit for bit on another machine, thread count or device.")
        section.parts.append(Bullets(sensitive))
    flagged = run_warnings(frame)
    if flagged:
        section.parts.append("Warnings raised by the runs:")
        section.parts.append(Bullets(flagged))
    axes = varied_axes(frame)
    items = [f"`{axis}`: {axis_values(frame, axis)}" for axis in axes]
    section.parts.append("What varied:" if items else "No axis varied: a single configuration.")
    if items:
        section.parts.append(Bullets(items))
    section.parts.append(f"Runs: {len(frame)} ({counts_line(frame)}).")
    if frame["status"].eq("diverged").any():
        section.parts.append(DIVERGED_RULE)
    finished = frame["status"].isin(FINISHED)
    missing = []
    pending = frame[frame["status"].isin(PENDING)]
    if len(pending):
        missing.append(pending_line(pending, frontier))
    n_failed = int(frame["status"].eq("failed").sum())
    if n_failed:
        missing.append(f"{n_failed} run(s) failed (see Diverged and failed runs; "
                       "--retry-failed reruns them)")
    if missing:
        section.parts.append(f"Partial grid: the figures and tables use the {int(finished.sum())}"
                             f" finished runs of {len(frame)}.")
        section.parts.append(Bullets(missing))
    else:
        section.parts.append("Every run finished (completed or diverged).")
    if skipped:
        section.parts.append("Figures not drawn:")
        section.parts.append(Bullets(skipped))
    return section


def run_warnings(frame: pd.DataFrame) -> list[str]:
    """One line per distinct kind of run warning, with how many runs raised it."""
    if "warnings" not in frame:
        return []
    kinds: dict[str, tuple[str, int]] = {}  # kind -> (its first line, runs raising it)
    for lines in frame["warnings"]:
        for line in lines if isinstance(lines, tuple | list) else ():
            head = line.split(":", 1)[0]
            example, count = kinds.get(head, (line, 0))
            kinds[head] = (example, count + 1)
    return [f"{count} of {len(frame)} runs: {example}" + (
        " (numbers of one run; the Runs table has each run's gain clip ratio)"
        if count > 1 else "") for example, count in kinds.values()]
