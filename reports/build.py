"""The report of one ablation grid: a self-contained HTML page and a Markdown twin.

``build_report(grid_dir)`` reads the grid with ``ablations.store.load_results`` (plus the
environment and tracebacks the run statuses record) and writes

    <grid_dir>/report.html          figures embedded as base64 PNG: opens offline, one file
    <grid_dir>/report.md            the same content, figures as files beside it
    <grid_dir>/report_files/*.png

Only the figures whose data exist are drawn; everything missing (runs not finished, figures
that do not apply to this grid) is said in the summary, so a partial grid gives a partial but
honest report.

The parts: ``reports.inputs`` reads and checks the store; ``reports.sections`` builds the
content, one module per kind of section, with the figure table in ``reports.sections.figures``;
``reports.document`` holds the document model, which ``reports.render_html`` and
``reports.render_md`` render (style sheet and table script in ``reports/assets``);
``reports.output`` writes the files. This module puts them in page order and re-exports the
names other code imports from it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ablations.store import GridStore, load_results
from reports.document import RUN_HEADERS, Bullets, Cell, Details, Plot, Section, Table, plots
from reports.figures.frames import with_derived
from reports.inputs import (
    DIAGNOSIS_FIELDS,
    FLIGHT_COLUMNS,
    forensic_flight,
    grid_frontier,
    parse_spec,
    readable_status,
    with_diagnosis,
)
from reports.output import (
    MANIFEST,
    ForeignFilesError,
    output_paths,
    owned_files,
    write_files,
)
from reports.render_html import CSS, FILTER_ROWS, SCRIPT, render_html
from reports.render_md import render_markdown
from reports.sections.claims import claim_verdicts, claims_section
from reports.sections.environment import environment_section
from reports.sections.figures import FIGURES, figure_sections
from reports.sections.frontier import frontier_sections
from reports.sections.key_results import key_results
from reports.sections.problems import damaged_section, problems_section
from reports.sections.runs import runs_section
from reports.sections.settings import departures_section, settings_section
from reports.sections.summary import summary_section
from sigprop.errors import UserError
from sigprop.files import writable_dir_error

__all__ = [
    "CSS", "DIAGNOSIS_FIELDS", "FIGURES", "FILTER_ROWS", "FLIGHT_COLUMNS", "MANIFEST",
    "RUN_HEADERS", "SCRIPT", "Bullets", "Cell", "Details", "ForeignFilesError", "Plot",
    "Section", "Table", "assemble", "build_report", "forensic_flight", "frontier_sections",
    "render_html", "render_markdown", "settings_section", "with_diagnosis",
]


def build_report(grid_dir: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write the HTML and Markdown reports of the grid in ``grid_dir``.

    ``out``: the HTML file (``.md`` names the Markdown file instead; a folder, or a path
    without a suffix, gets ``report.html`` inside); the other file and the ``<stem>_files/``
    figure folder go beside it. Default: ``<grid_dir>/report.html``.
    Returns ``{"html": Path, "md": Path}``.
    Raises :class:`UserError` (one line) for a missing folder, a folder without runs, a folder
    holding several grids, or an output location that cannot be written.
    """
    grid_dir = Path(grid_dir)
    if not grid_dir.exists():
        raise UserError(f"no such grid folder: {grid_dir}")
    if not grid_dir.is_dir():
        raise UserError(f"not a folder: {grid_dir} (expected a grid folder holding runs/)")
    results = load_results(grid_dir)
    runs = results.runs  # the store turned wrongly typed runs into damaged ones
    if runs.empty:
        raise UserError(f"no runs in {grid_dir}: run the grid first (run_ablations.py run SPEC)")
    grids = sorted(runs["grid"].unique())
    if len(grids) > 1:
        raise UserError(f"{grid_dir} holds {len(grids)} grids ({', '.join(grids)}); "
                        f"give one grid folder, e.g. {grid_dir / grids[0]}")
    if not (grid_dir / "runs").is_dir():
        grid_dir = grid_dir / grids[0]
    html_path, md_path = output_paths(grid_dir, out)
    files_dir = html_path.parent / f"{html_path.stem}_files"
    why = writable_dir_error(files_dir)
    if why:
        raise UserError(f"cannot write the report to {html_path.parent}: {why}")
    named = None  # the page the user named; the other one is ours only if we wrote it
    if out is not None and Path(out).suffix and not Path(out).is_dir():
        named = md_path if Path(out).suffix == ".md" else html_path
    legacy = html_path == grid_dir / "report.html"  # the grid's own report, maybe pre-manifest
    owned = owned_files(files_dir, [p for p in (html_path, md_path) if p != named], legacy)

    store = GridStore(grid_dir.parent, grid_dir.name)
    statuses = {rid: readable_status(store, rid) for rid in runs["run_id"]}
    spec = parse_spec(results.specs.get(grid_dir.name, ""))
    runs = with_diagnosis(runs, statuses)
    flight = forensic_flight(store, results, runs)
    sections = assemble(grid_dir, runs, results.metrics, results.blocks, statuses, spec, flight)
    title = f"Ablation report: {grid_dir.name}"

    try:
        write_files(html_path, md_path, files_dir, title, sections, plots(sections), owned)
    except OSError as err:
        raise UserError(f"cannot write the report to {html_path.parent}: "
                        f"{err.strerror or err}") from None
    return {"html": html_path, "md": md_path}


def assemble(grid_dir: Path, runs: pd.DataFrame, metrics: pd.DataFrame, blocks: pd.DataFrame,
             statuses: dict[str, dict], spec: dict,
             flight: pd.DataFrame | None = None) -> list[Section]:
    frame = with_derived(runs)
    figures, skipped = figure_sections(grid_dir, frame, metrics, blocks, flight)
    frontier = grid_frontier(grid_dir)
    verdicts = claim_verdicts(spec, runs, frontier)
    sections = [summary_section(frame, spec, skipped, verdicts, frontier)]
    if verdicts is not None:
        sections.append(claims_section(verdicts))
    sections.append(settings_section(frame))
    departures = departures_section(frame, spec)
    if departures is not None:
        sections.append(departures)
    key = key_results(frame)
    if key is not None:
        sections.append(key)
    sections += figures
    sections += frontier_sections(frontier)
    sections.append(runs_section(frame))
    problems = problems_section(frame, statuses, flight)
    if problems is not None:
        sections.append(problems)
    damaged = damaged_section(frame)
    if damaged is not None:
        sections.append(damaged)
    sections.append(environment_section(statuses))
    return sections
