"""The report of one ablation grid: a self-contained HTML page and a Markdown twin.

``build_report(grid_dir)`` reads the grid with ``ablations.store.load_results`` (plus the
environment and tracebacks the run statuses record) and writes

    <grid_dir>/report.html          figures embedded as base64 PNG: opens offline, one file
    <grid_dir>/report.md            the same content, figures as files beside it
    <grid_dir>/report_files/*.png

Only the figures whose data exist are drawn; everything missing (runs not finished, figures
that do not apply to this grid) is said in the summary, so a partial grid gives a partial but
honest report.
"""

from __future__ import annotations

import base64
import html
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import tomllib
from matplotlib.figure import Figure

from ablations.claims import (
    ClaimError,
    Verdict,
    binomial_half_width,
    evaluate_claims,
    n_test_images,
    parse_claims,
    verdict_counts,
)
from ablations.recipe import recipe_departures
from ablations.spec import THRESHOLD_MODES
from ablations.store import (
    DAMAGED,
    FINISHED,
    NON_NUMERIC_SUMMARY_COLUMNS,
    SUMMARY_COLUMNS,
    SUMMARY_FIELDS,
    DamagedFile,
    GridStore,
    load_results,
    read_parquet,
    write_bytes,
)
from ablations.store import FLIGHT_COLUMNS as STORE_FLIGHT_COLUMNS
from reports.figures.accuracy import plot_accuracy_vs_batch
from reports.figures.alpha import plot_alpha_sweep
from reports.figures.clipping import plot_agc_clip_fraction
from reports.figures.curves import plot_training_curves
from reports.figures.forensics import plot_divergence_timeline
from reports.figures.frames import (
    DIVERGED_RULE,
    PENDING,
    dependent_on,
    ordered_values,
    seed_summary,
    setting_axes,
    sort_frame,
    varied_axes,
    with_derived,
)
from reports.figures.gains import GAIN_PREFIX, plot_gains
from reports.figures.gradients import plot_gradient_heatmap
from reports.figures.stability import plot_stability_heatmap
from reports.figures.style import figure_png, fmt_value, is_number, label
from sigprop.diagnosis import FIELDS as DIAGNOSIS
from sigprop.diagnosis import RULE
from sigprop.errors import UserError
from sigprop.files import writable_dir_error

SUMMARY_METRICS = ["final_acc", "best_acc", "diverged_step", "max_grad_norm", "clip_fraction",
                   "steps_done", "duration_s"]
RUN_HEADERS = {"final_acc": "final acc", "best_acc": "best acc", "diverged_step": "diverged at",
               "max_grad_norm": "max grad norm", "clip_fraction": "clipped",
               "steps_done": "steps done",
               "duration_s": "time (s)"}
ENVIRONMENT_KEYS = ["python", "torch", "numpy", "pandas", "sigprop", "device", "device_name",
                    "platform", "host", "git_commit"]
STATE_ORDER = ["completed", "diverged", "failed", "running", "interrupted", "queued"]
TRACEBACK_LINES = 25


# ----------------------------------------------------------------------------- document


@dataclass
class Table:
    frame: pd.DataFrame
    wrap: bool = False  # long prose cells wrap instead of scrolling


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Plot:
    name: str  # file stem, e.g. "stability-heatmap"
    caption: str
    png: bytes


@dataclass
class Details:
    summary: str
    text: str


@dataclass
class Section:
    title: str
    parts: list = field(default_factory=list)


VERDICT_CLASSES = {"holds": "holds", "does not hold": "does-not-hold",
                   "inconclusive": "inconclusive"}
# Inline `code` in paragraphs and bullets is the only markup; everything else is escaped.
CODE = re.compile(r"`([^`]+)`")


def inline_html(text: str) -> str:
    return CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text))


# ----------------------------------------------------------------------------- entry point


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
    runs = typed_runs(results.runs)
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

    plots = [part for section in sections for part in section.parts if isinstance(part, Plot)]
    try:
        write_files(html_path, md_path, files_dir, title, sections, plots, owned)
    except OSError as err:
        raise UserError(f"cannot write the report to {html_path.parent}: "
                        f"{err.strerror or err}") from None
    return {"html": html_path, "md": md_path}


def write_files(html_path: Path, md_path: Path, files_dir: Path, title: str,
                sections: list[Section], plots: list[Plot], owned: set[str]) -> None:
    """Write the pages and figures; delete only the figures of an earlier report that the
    manifest lists (``owned``) and this one no longer draws."""
    names = {f"{plot.name}.png" for plot in plots}
    pages = [html_path.name, md_path.name]
    # listed before they exist: a report interrupted midway leaves no unlisted file behind
    write_manifest(files_dir, owned | names, pages)
    for plot in plots:
        write_bytes(files_dir / f"{plot.name}.png", plot.png)
    for stale in sorted(owned - names):  # figures of an earlier report that no longer apply
        path = files_dir / stale
        if path.is_file() or path.is_symlink():
            path.unlink()
    write_bytes(html_path, render_html(title, sections, files_dir.name).encode())
    write_bytes(md_path, render_markdown(title, sections, files_dir.name).encode())
    write_manifest(files_dir, names, pages)
    for path in (html_path, md_path, *(files_dir / name for name in names)):
        path.chmod(0o644)  # the atomic writer's temporary files are private; a report is not


# The report's files folder holds this manifest of what the report wrote, so that a later
# report deletes its own stale figures and nothing else: the folder may be one that nbconvert or
# pandoc made for the user's own page of the same name.
MANIFEST = ".sigprop-report.json"
MANIFEST_KIND = "sigprop report files"
FIGURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.png")
PAGE_NAME = re.compile(r"[^/\\\x00]+\.(html|md)")
# figures of reports written before the manifest: adopted only in a grid's own report_files/
LEGACY_FIGURES = frozenset(f"{name}.png" for name in (
    "accuracy-vs-batch", "accuracy-by-setting", "stability-heatmap", "alpha-sweep",
    "training-curves", "gradient-heatmap", "gains", "agc-clip-fraction", "spp", "frontier",
    "frontier-accuracy"))


class ForeignFilesError(UserError):
    """The report would overwrite or share a folder with files it did not write."""


def write_manifest(files_dir: Path, figures: set[str], pages: list[str]) -> None:
    data = {"kind": MANIFEST_KIND, "figures": sorted(figures), "pages": pages}
    write_bytes(files_dir / MANIFEST, (json.dumps(data, indent=1) + "\n").encode())
    (files_dir / MANIFEST).chmod(0o644)


def read_manifest(files_dir: Path) -> tuple[set[str], set[str]] | None:
    """(figures, pages) an earlier report listed in ``files_dir``; None without a manifest.
    Raises :class:`ForeignFilesError` for a manifest that is not ours or not readable: what
    it lists is then no evidence of what we wrote."""
    path = files_dir / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    figures = data.get("figures") if isinstance(data, dict) else None
    pages = data.get("pages") if isinstance(data, dict) else None
    if not (isinstance(data, dict) and data.get("kind") == MANIFEST_KIND
            and isinstance(figures, list) and isinstance(pages, list)
            and all(isinstance(n, str) and FIGURE_NAME.fullmatch(n) for n in figures)
            and all(isinstance(n, str) and PAGE_NAME.fullmatch(n) for n in pages)):
        raise ForeignFilesError(f"{path} is not a manifest this report can read; remove "
                                f"{files_dir} or give --out another place")
    return set(figures), set(pages)


def owned_files(files_dir: Path, unnamed_pages: list[Path], legacy: bool) -> set[str]:
    """The figures in ``files_dir`` an earlier report wrote (the ones it may delete).
    Raises :class:`ForeignFilesError` (one line) when the folder holds anything else, or when
    a page the user did not name (the Markdown twin beside ``--out x.html``) exists and no
    report of ours wrote it."""
    manifest = read_manifest(files_dir)
    try:
        present = {p.name for p in files_dir.iterdir()} - {MANIFEST}
    except OSError as err:  # writable but not listable: what it holds is unknown
        raise ForeignFilesError(f"cannot list {files_dir}: {err.strerror or err}") from None
    if manifest is not None:
        figures, pages = manifest
    elif legacy:
        figures = present & LEGACY_FIGURES
        pages = {"report.html", "report.md"}
    else:
        figures, pages = set(), set()
    # temporary files of an interrupted atomic write of a listed figure, and write probes
    leftovers = {name for name in present if name.startswith(".sigprop-write-test-")
                 or (name.endswith(".tmp")
                     and any(name.startswith(f".{n}.") for n in figures | {MANIFEST}))}
    foreign = sorted(present - figures - leftovers)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise ForeignFilesError(f"{files_dir} holds files this report did not write ({shown}); "
                                "give --out another place or move them")
    for page in unnamed_pages:
        if (page.exists() or page.is_symlink()) and page.name not in pages:
            raise ForeignFilesError(f"{page} exists and this report did not write it; give "
                                    "--out another place or move it")
    return figures

def typed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with every run whose stored fields hold valid JSON of the wrong type (a list
    where a state or a number belongs) turned into a damaged row, as the store turns a file it
    cannot parse into one: the report neither guesses at such a run's numbers nor trips on
    them."""
    problems = {}
    for index, row in runs.iterrows():
        if row.get("status") != DAMAGED:
            why = wrong_type(row)
            if why:
                problems[index] = why
    if not problems:
        return runs
    damaged = pd.DataFrame([{"grid": runs.at[i, "grid"], "run_id": runs.at[i, "run_id"],
                             "status": DAMAGED, "axes": (), "error": f"status.json: {why}"}
                            for i, why in problems.items()])
    return pd.concat([runs.drop(index=list(problems)), damaged], ignore_index=True)


def wrong_type(row: pd.Series) -> str | None:
    """What in a run's row has the wrong type for the report to read it; None when nothing."""
    def kind(value: Any) -> str:
        return {"list": "an array", "dict": "an object", "str": "text", "bool": "a boolean",
                "tuple": "an array"}.get(type(value).__name__, type(value).__name__)

    if not isinstance(row.get("status"), str):
        return f"state is {kind(row.get('status'))}, not text"
    for column in SUMMARY_COLUMNS:
        value = row.get(column)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if column in NON_NUMERIC_SUMMARY_COLUMNS:  # the diagnosis: text, or a flag
            if not isinstance(value, str | bool | np.bool_):
                return f"summary.{column} is {kind(value)}, not text or a boolean"
            continue
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
            return f"summary.{column} is {kind(value)}, not a number"
    error = row.get("error")
    if error is not None and not isinstance(error, str) \
            and not (isinstance(error, float) and np.isnan(error)):
        return f"error is {kind(error)}, not text"
    lines = row.get("warnings")
    if isinstance(lines, tuple | list) and not all(isinstance(line, str) for line in lines):
        return "warnings holds something other than text"
    return None


def readable_status(store: GridStore, run_id: str) -> dict:
    try:
        return store.status(run_id)
    except DamagedFile:  # listed as damaged by damaged_section
        return {}


def output_paths(grid_dir: Path, out: str | Path | None) -> tuple[Path, Path]:
    if out is None:
        return grid_dir / "report.html", grid_dir / "report.md"
    out = Path(out)
    if out.is_dir() or not out.suffix:  # a folder, existing or to be made
        return out / "report.html", out / "report.md"
    if out.suffix == ".md":
        return out.with_suffix(".html"), out
    return out, out.with_suffix(".md")


def parse_spec(text: str) -> dict:
    try:
        return tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError:
        return {}


# ----------------------------------------------------------------------------- content


def assemble(grid_dir: Path, runs: pd.DataFrame, metrics: pd.DataFrame, blocks: pd.DataFrame,
             statuses: dict[str, dict], spec: dict,
             flight: pd.DataFrame | None = None) -> list[Section]:
    frame = with_derived(runs)
    figures, skipped = figure_sections(grid_dir, frame, metrics, blocks, flight)
    frontier = grid_frontier(grid_dir)
    verdicts = claim_verdicts(spec, runs, frontier)
    sections = [summary_section(frame, spec, skipped, verdicts)]
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


def damaged_section(frame: pd.DataFrame) -> Section | None:
    bad = frame[frame["status"] == DAMAGED]
    if bad.empty:
        return None
    items = [f"`{row['run_id']}`: {row['error']}" for _, row in bad.iterrows()]
    return Section("Damaged runs", [
        f"{len(bad)} run(s) have a file that cannot be read; the report leaves them out. The "
        "next `run` of the grid keeps the file as `<name>.damaged-<time>` and runs them again.",
        Bullets(items)])


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


def claim_verdicts(spec: dict, runs: pd.DataFrame,
                   frontier: pd.DataFrame | None = None) -> list[Verdict] | None:
    """The spec's claims checked on the runs; None when the spec has none (or an unreadable
    set: the runner validated them before running, so that is a spec edited since)."""
    try:
        claims = parse_claims(spec.get("claims"))
    except ClaimError as err:
        warnings.warn(f"the stored spec's claims cannot be read: {err}", stacklevel=2)
        return None
    if not claims:
        return None
    try:
        return evaluate_claims(claims, runs, frontier)
    except UserError as err:  # a stored value the checks refuse (a data set no longer known)
        warnings.warn(f"the stored spec's claims cannot be checked: {err}", stacklevel=2)
        return None


def grid_frontier(grid_dir: Path) -> pd.DataFrame | None:
    """The grid's frontier.parquet (``run_ablations.py frontier``), None without one."""
    from ablations.store import one_method, read_frontier

    try:  # a row per cell: the bisection's where both methods ran (one_method)
        return one_method(read_frontier(grid_dir))
    except DamagedFile as err:
        warnings.warn(f"{err}; the report leaves the frontier out", stacklevel=2)
        return None


def frontier_sections(frontier: pd.DataFrame | None) -> list[Section]:
    """"Stability frontier": its two figures and table, when the grid has a frontier."""
    from reports.figures import frontier as ff

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
    for name, caption, draw in (
        ("frontier", "Largest stable learning rate against batch size (log-log): a line per "
         "model and clipping setting (geometric mean over seeds, band: min to max); dashed: "
         "linear scaling lr ∝ B; triangles: the edge lies beyond the searched range.",
         ff.plot_frontier),
        ("frontier-accuracy", "Final test accuracy of the probe at the largest stable "
         "learning rate, against batch size (band: min to max over seeds); dotted: chance.",
         ff.plot_frontier_accuracy)):
        if ramp and name == "frontier-accuracy":  # no run trained at a range test's edge
            continue
        try:
            section.parts.append(Plot(name, caption, figure_bytes(draw(frontier))))
        except Exception as err:  # one figure failing must not cost the whole report
            line = (f"{type(err).__name__}: {err}".splitlines() or ["error"])[0]
            section.parts.append(f"Figure {name} could not be drawn: {line}")
    if "non_monotone" in frontier.columns and not ramp:  # a ramp checks no monotonicity
        count = ff.non_monotone_count(frontier)
        section.parts.append(
            f"Monotonicity check (one probe two lattice steps above each edge): {count} of "
            f"{len(frontier)} cells non-monotone (stable again above their edge)"
            + (": for those the search's assumption fails and the edge is a lower bound." if
               count else "."))
    section.parts.append(Table(ff.frontier_table(frontier)))
    return [section]


def summary_section(frame: pd.DataFrame, spec: dict, skipped: list[str],
                    verdicts: list[Verdict] | None = None) -> Section:
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
        missing.append(f"{len(pending)} run(s) not finished yet ("
                       f"{counts_line(pending)}): run the grid again to complete them")
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


def claims_section(verdicts: list[Verdict]) -> Section:
    rows = [{"id": v.claim.id, "claim": v.claim.text, "verdict": v.verdict,
             "evidence": v.evidence, "why": v.reason,
             "source": (f"“{v.claim.quote}” ({v.claim.source})" if v.claim.quote
                        else v.claim.source)}
            for v in verdicts]
    rules = sorted({v.claim.rule for v in verdicts if v.claim.check in ("compare", "spread")}
                   | {"t95" for v in verdicts if v.claim.check == "interaction"})
    parts = [
        "Each claim is checked on this grid's finished runs by the rule its spec states "
        "(`ablations.claims`), and quotes the sentence of the paper it tests. Too few finished "
        "runs make a claim inconclusive. A diverged run counts at chance accuracy."]
    if "range" in rules:
        parts.append("Rule `range`: a difference counts only when the seed ranges separate "
                     "(strictly: a tie beats nothing).")
    if "t95" in rules:
        parts.append("Rule `t95`: the 95% Welch t interval of the difference of means (of a "
                     "difference of differences for an interaction) decides: wholly beyond the "
                     "margin holds, wholly on the other side does not hold, straddling it is "
                     "inconclusive.")
    if any(v.claim.margin_rule == "test_set" for v in verdicts):
        parts.append("Margin `test_set` (\"comparable\", \"match\"): 1.96 × √(p(1 − p)/n) "
                     "for the reference's accuracy p on its n test images, the amount an "
                     "accuracy moves with the luck of which images are in the test set.")
    if any(v.claim.check == "share" and v.claim.chance_margin is None
           and {"near_chance", "learned"} & set(v.claim.outcome) for v in verdicts):
        parts.append("Near chance: a completed run whose accuracy is not above chance by a "
                     "one-sided 95% binomial test on its test set (chance + 1.645 × "
                     "√(c(1 − c)/n)); `learned` is a completed run above that bar.")
    parts.append(Table(pd.DataFrame(rows), wrap=True))
    return Section("Claims", parts)


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


# Settings a reader needs to judge a short run, in the order they are shown.
SETTING_KEYS = [
    "data", "image_size", "augment", "train_size", "steps", "epochs", "batch_size", "base_lr",
    "lr", "warmup_fraction", "label_smoothing", "weight_decay", "momentum", "eval_every",
    "probe_every", "clip.mode", "clip.threshold", "clip.clip_classifier",
]


def settings_section(frame: pd.DataFrame) -> Section:
    """Every setting the runs share (what varied is listed in the summary), with the model
    options that depart from the registry's (the authors') defaults."""
    varied = set(varied_axes(frame))
    rows = []
    model_keys = sorted(c for c in frame if c.startswith("model.") and c != "model.name")
    for key in [*SETTING_KEYS, *model_keys]:
        if key not in frame or key in varied:
            continue
        values = frame[key].dropna()
        if values.empty or values.map(repr).nunique() != 1:
            continue
        value = values.iloc[0]
        default = departure_default(frame, key)
        if isinstance(default, list):
            default = f"[{', '.join(fmt_value(v) for v in default)}]"
        shown = (f"[{', '.join(fmt_value(v) for v in value)}]"
                 if isinstance(value, tuple | list) else fmt_value(value))
        rows.append({"setting": key, "value": shown,
                     "authors' default": "" if default is None else fmt_value(default)})
    if "base_lr" in frame and "lr" not in varied and frame["base_lr"].notna().all():
        rows.append({"setting": "peak lr", "value": "base_lr × batch size / 256",
                     "authors' default": ""})
    parts = ["The settings every run shares (a model option applies to the models that have "
             "it). A value in the last column departs from the "
             "model's registry default, which follows the authors' ImageNet-length recipe; "
             "short CPU runs need some of those changed (README, 'Short runs')."]
    if rows:
        parts.append(Table(pd.DataFrame(rows)))
    return Section("Settings", parts)


def departures_section(frame: pd.DataFrame, spec: dict) -> Section | None:
    """Each departure from paper B's recipe (``ablations.recipe``) or from the authors' model
    defaults, the paper's value beside it, and the measurement the spec gives for it; a
    recipe departure the spec does not declare is said to be undeclared."""
    declared = spec.get("departures") if isinstance(spec.get("departures"), dict) else {}
    found: dict[str, dict] = {}
    for _, row in frame.iterrows():
        flat = {k: (None if is_missing(v) else v) for k, v in row.items()
                if isinstance(k, str)}
        for key, (value, paper, source) in recipe_departures(flat).items():
            entry = found.setdefault(key, {"values": set(), "paper": paper, "source": source})
            entry["values"].add(fmt_value(value))
    for key, entry in declared.items():
        if not isinstance(entry, dict):
            continue
        values = frame[key].dropna() if key in frame else pd.Series(dtype=object)
        shown = {(f"[{', '.join(fmt_value(x) for x in v)}]" if isinstance(v, tuple | list)
                  else fmt_value(v)) for v in values}
        found.setdefault(key, {"values": shown, "paper": entry.get("paper"), "source": ""})
    if not found:
        return None
    rows = []
    for key, entry in found.items():
        why = declared.get(key, {}).get("why") if isinstance(declared.get(key), dict) else None
        paper = entry["paper"]
        rows.append({"setting": key, "value": ", ".join(sorted(entry["values"])) or "—",
                     "paper": (f"[{', '.join(fmt_value(v) for v in paper)}]"
                               if isinstance(paper, list) else fmt_value(paper))
                     + (f" ({entry['source']})" if entry["source"] else ""),
                     "why (from the spec)": why or "not declared in the spec"})
    undeclared = [r["setting"] for r in rows if r["why (from the spec)"].startswith("not ")]
    parts = ["Where these runs depart from paper B's recipe (arXiv 2102.06171 §4.1: SGD with "
             "Nesterov momentum 0.9, lr = 0.1 × batch size / 256, AGC lambda in 0.01 … 0.16) "
             "or from the authors' model defaults, with the measurement the spec gives for "
             "each change."]
    if undeclared:
        parts.append(f"Not declared in the spec: {', '.join(undeclared)}. The spec gives no "
                     "measurement for these departures; read their results with that in mind.")
    parts.append(Table(pd.DataFrame(rows), wrap=True))
    return Section("Departures from the papers' recipe", parts)


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def departure_default(frame: pd.DataFrame, key: str) -> Any:
    """The registry default of a model option the runs override, from the stored
    ``model_departures``; None when the runs keep the default."""
    if "model_departures" not in frame or not key.startswith("model."):
        return None
    option = key.removeprefix("model.")
    for departures in frame["model_departures"]:
        if isinstance(departures, dict) and option in departures:
            return departures[option]
    return None


# A setting (runs equal in every axis but the seed) whose seeds disagree beyond what its test
# set can resolve sits near an edge, where float rounding (thread count, device, library
# version) moves a run as much as a seed does: its numbers need not reproduce elsewhere.
ROUNDING_MARK = "†"
ROUNDING_RULE = (
    f"{ROUNDING_MARK} sensitive to float rounding: the setting's seeds split between diverged "
    "and completed, or the range of their final accuracy is wider than the 95% interval of one "
    "accuracy measured on its test set, 2 × 1.96·√(p(1−p)/n) (p: the setting's mean accuracy, "
    "n: its test examples). Seeds that disagree beyond what the test set resolves mean the "
    "setting sits near an edge, where a different thread count, device or library version can "
    "move a run as much as a seed does: its numbers need not reproduce bit for bit elsewhere.")
def rounding_width(mean: float, n_test: float) -> float:
    """Width of the 95% (normal approximation) interval of an accuracy near ``mean`` measured
    on ``n_test`` examples; NaN when either is unknown."""
    if not (0 <= mean <= 1):
        return np.nan
    return 2 * binomial_half_width(mean, n_test)


def rounding_reason(row: pd.Series) -> str:
    """Why a setting's numbers are sensitive to float rounding (ROUNDING_RULE); "" if not."""
    done = int(row["n_completed"] + row["n_diverged"])
    if row["n_diverged"] and row["n_completed"]:
        return f"seeds split: {int(row['n_diverged'])} of {done} diverged"
    width = rounding_width(row["mean"], row["n_test"])
    if row["n_completed"] >= 2 and np.isfinite(width) and row["high"] - row["low"] > width:
        return (f"seed range {row['low']:.1%}–{row['high']:.1%} is wider than {width:.1%} "
                f"(95% interval at {row['mean']:.0%} on {int(row['n_test'])} test examples)")
    return ""


def key_summary(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]] | None:
    """The key-results cells: one row per setting (``rows`` x ``columns``, the batch size when
    it varied) with seed_summary's columns, ``n_test`` and ``rounding`` (rounding_reason)."""
    if "final_acc" not in frame:
        return None
    settings = setting_axes(frame)
    columns = ["batch_size"] if "batch_size" in settings else []
    rows = dependent_on(frame, columns, [s for s in settings if s not in columns])
    summary = seed_summary(frame, [*rows, *columns], "final_acc")
    if summary.empty:
        return None
    # same groups in the same order: the fewest test examples among each cell's completed runs
    sized = frame.assign(_n_test=n_test_images(frame))
    summary["n_test"] = seed_summary(sized, [*rows, *columns], "_n_test")["low"].to_numpy()
    summary["rounding"] = [rounding_reason(r) for _, r in summary.iterrows()]
    return summary, rows, columns


def setting_names(summary: pd.DataFrame, rows: list[str]) -> list[str]:
    return (list(summary[rows].apply(lambda r: ", ".join(fmt_value(r[c]) for c in rows), axis=1))
            if rows else ["all runs"] * len(summary))


def rounding_items(frame: pd.DataFrame) -> list[str]:
    """The summary's list of settings flagged sensitive to float rounding."""
    found = key_summary(frame)
    if found is None:
        return []
    summary, rows, columns = found
    names = setting_names(summary, rows) if rows else [""] * len(summary)
    batches = ([f"batch {fmt_value(b)}" for b in summary["batch_size"]] if columns
               else [""] * len(summary))
    return [(", ".join(n for n in (name, batch) if n) or "all runs") + f": {r['rounding']}"
            for name, batch, (_, r) in zip(names, batches, summary.iterrows()) if r["rounding"]]


def key_results(frame: pd.DataFrame) -> Section | None:
    """Setting x batch size table of mean final accuracy and divergences: the answer in text."""
    found = key_summary(frame)
    if found is None:
        return None
    summary, rows, columns = found
    summary["best"] = False
    for _, group in (summary.groupby(columns, sort=False) if columns else [(None, summary)]):
        ran = group[group["n_completed"] + group["n_diverged"] > 0]
        if len(ran) >= 2 and np.isfinite(ran["mean"]).any():  # a lone setting is not "best"
            ranked = ran.sort_values(["n_diverged", "mean"], ascending=[True, False],
                                     na_position="last")
            summary.loc[ranked.index[0], "best"] = True
    cells = [result_cell(r) + (f" {ROUNDING_MARK}" if r["rounding"] else "")
             for _, r in summary.iterrows()]
    summary["cell"] = [f"**{c}**" if r["best"] else c
                       for c, (_, r) in zip(cells, summary.iterrows())]
    summary["setting"] = setting_names(summary, rows)
    settings_order = list(dict.fromkeys(summary["setting"]))
    if columns:
        table = summary.pivot(index="setting", columns="batch_size", values="cell")
        table = table.reindex(index=settings_order,
                              columns=ordered_values(summary, "batch_size"))
        table.columns = [f"batch {fmt_value(c)}" for c in table.columns]
    else:
        table = summary.set_index("setting")[["cell"]].rename(columns={"cell": "final accuracy"})
    table.index.name = " / ".join(label(c) for c in rows) or "setting"
    return Section("Key results", [
        "Mean final test accuracy over the finished seeds of each setting, a diverged seed "
        "counted at chance (min to max in brackets); ✗ counts the diverged runs; the best "
        "setting of each column (fewest divergences, then highest accuracy) is in bold.",
        Table(table.fillna("").reset_index()),
        ROUNDING_RULE,
    ])


def result_cell(row: pd.Series) -> str:
    done = int(row["n_completed"] + row["n_diverged"])
    parts = []
    if np.isfinite(row["mean"]):
        counted = row["n_completed"] + row.get("n_at_chance", 0)
        spread = (f" ({row['low']:.1%}–{row['high']:.1%})"
                  if counted > 1 and row["high"] > row["low"] else "")
        parts.append(f"{row['mean']:.1%}{spread}")
    if row["n_diverged"]:
        # said at chance only when it was averaged in: an unknown class count leaves it out
        note = " (at chance)" if row.get("n_at_chance", 0) == row["n_diverged"] else ""
        parts.append(f"✗ {int(row['n_diverged'])} of {done} diverged{note}")
    if row["n_failed"]:
        parts.append(f"{int(row['n_failed'])} failed")
    if row["n_pending"]:
        parts.append(f"{int(row['n_pending'])} not run")
    return ", ".join(parts) or "no result"


def figure_sections(grid_dir: Path, frame: pd.DataFrame, metrics: pd.DataFrame,
                    blocks: pd.DataFrame, flight: pd.DataFrame | None = None
                    ) -> tuple[list[Section], list[str]]:
    """The figures that fit this grid, and one line per figure that does not, saying why."""
    axes = varied_axes(frame)
    finished = frame[frame["status"].isin(FINISHED)]
    sections: list[Section] = []
    skipped: list[str] = []
    if finished.empty:
        return sections, ["every figure: no run has finished yet"]

    def add(title: str, name: str, caption: str, draw: Any) -> None:
        try:
            fig = draw()
        except Exception as err:  # one figure failing must not cost the whole report
            line = (f"{type(err).__name__}: {err}".splitlines() or ["error"])[0]
            warnings.warn(f"report figure {name} failed: {line}", stacklevel=2)
            skipped.append(f"{title}: drawing failed ({line})")
            return
        sections.append(Section(title, [Plot(name, caption, figure_bytes(fig))]))

    batch_sizes = finished["batch_size"].nunique() if "batch_size" in finished else 0
    if "batch_size" in axes and batch_sizes >= 2:
        add("Accuracy vs batch size", "accuracy-vs-batch",
            "Mean final test accuracy over finished seeds, a diverged seed at chance (band: "
            "min to max; the title gives the seed count), on an axis from 0 with chance level "
            "dotted. Lines with diverged runs get a row in a strip under the plot: a cross "
            "where k of n finished runs diverged.",
            lambda: plot_accuracy_vs_batch(frame))
    else:
        others = [a for a in setting_axes(finished) if a != "model.alpha"]
        if others and len(finished):
            x = next((a for a in others if all(is_number(v) for v in
                                               finished[a].dropna().unique())), others[0])
            add(f"Accuracy by {label(x)}", "accuracy-by-setting",
                "Mean final test accuracy over finished seeds, a diverged seed at chance (band: "
                "min to max), on an axis from 0 with chance level dotted; the strip below marks "
                "where runs diverged (k of n).",
                lambda: plot_accuracy_vs_batch(frame, x=x))
        elif "model.alpha" not in axes:
            skipped.append("accuracy plot: no axis other than the seed varied")

    if {"clip.threshold", "batch_size"} <= set(axes) and heatmap_fits(finished):
        add("Stability: clipping threshold × batch size", "stability-heatmap",
            "Mean final accuracy per clipping threshold λ and batch size, a diverged seed at "
            "chance; hatched cells: every seed diverged; ×k/n: k of n runs diverged; boxed: the "
            "best λ for each batch size.",
            lambda: plot_stability_heatmap(frame))
    else:
        skipped.append("stability heatmap: needs at least two clipping thresholds of one "
                       "clipping mode, and two batch sizes, among finished runs")

    if "model.alpha" in axes:
        add("Alpha sweep", "alpha-sweep",
            "Left: variance of each block's output at the first recorded step (dotted: the "
            "expected 1 + k·α², drawn only for runs whose SkipInit gains start non-zero). "
            "Middle, when some stage has two or more blocks: variance gained per block within "
            "a stage against α. Right: final accuracy against α (chance dotted).",
            lambda: plot_alpha_sweep(frame, blocks))
    else:
        skipped.append("alpha sweep: model.alpha was not varied")

    if not metrics.empty and "loss" in metrics:
        add("Training curves", "training-curves",
            "Training loss (centred rolling mean; the note under the figure gives the window) "
            "and test accuracy at each evaluation (chance dotted): one line per setting, the "
            "mean over its completed seeds with a min–max band; each diverged run is drawn "
            "alone and ends in a cross. Curves identical to another are dashed and named.",
            lambda: plot_training_curves(metrics, frame))
    else:
        skipped.append("training curves: no run has stored metrics yet")

    stats = set(blocks["stat"].unique()) if not blocks.empty and "stat" in blocks else set()
    if "grad_norm" in stats:
        add("Gradient propagation", "gradient-heatmap",
            "Gradient norm of each block's parameters over training (log colour scale): a row "
            "per model (normalizer-free first, then BN where the grid has it), a column per "
            "clipping setting, each the lowest seed at the largest batch size. `head`: the "
            "classifier and any layer after the last block. A dashed line marks divergence, "
            "hatched grey what follows it; a diverged run's panel shows every step kept before "
            "its divergence where the store has them.",
            lambda: plot_gradient_heatmap(blocks, frame, flight=flight))
    else:
        skipped.append("gradient propagation: no block gradient statistics were recorded "
                       "(probe_every = 0)")
    if any(str(stat).startswith(GAIN_PREFIX) for stat in stats):
        add("Scalar gains", "gains",
            "Mean |gain| over each run's blocks (SkipInit gains and other 0-d block parameters), "
            "as recorded by the probe every probe_every steps. A gain that stays at its start "
            "value 0 leaves its residual branch switched off.",
            lambda: plot_gains(blocks, frame))
    if "agc_frac_above" in stats:
        add("AGC clip fraction", "agc-clip-fraction",
            "Fraction of each block's units whose gradient-to-weight norm ratio exceeds the "
            "probe's λ (the units AGC at that λ clips), over training, one colour per block; "
            "dashed: the mean over blocks. The probe's λ is the run's AGC threshold, or 0.01 "
            "for runs without AGC; the panel titles give the run's own clipping. Panels as in "
            "Gradient propagation.",
            lambda: plot_agc_clip_fraction(blocks, frame))

    spp_file = grid_dir / "spp" / "spp.parquet"
    if spp_file.is_file():
        spp_section(spp_file, sections, skipped)
    return sections, skipped


def heatmap_fits(finished: pd.DataFrame) -> bool:
    """Two or more thresholds of one clipping mode at two or more batch sizes; with one
    threshold per mode (a tied mode/threshold axis) the accuracy plot already says it all."""
    if not {"clip.threshold", "batch_size"} <= set(finished):
        return False
    clipped = finished
    if "clip.mode" in finished:
        clipped = finished[finished["clip.mode"].isin(THRESHOLD_MODES)]
    if clipped.empty:
        return False
    modes = clipped.groupby("clip.mode") if "clip.mode" in clipped else [(None, clipped)]
    return clipped["batch_size"].nunique() >= 2 and any(
        part["clip.threshold"].nunique() >= 2 for _, part in modes)


def spp_section(spp_file: Path, sections: list[Section], skipped: list[str]) -> None:
    try:
        from reports.figures.spp import plot_spp
    except ImportError as err:
        skipped.append(f"signal propagation plot: reports.figures.spp.plot_spp unavailable ({err})")
        return
    try:
        drawn = plot_spp(pd.read_parquet(spp_file))
        fig = getattr(drawn, "figure", drawn)  # a seaborn grid carries its figure
        png = figure_bytes(fig)
    except Exception as err:  # another module's figure must not cost the whole report
        line = (f"{type(err).__name__}: {err}".splitlines() or ["error"])[0]
        warnings.warn(f"report figure spp failed: {line}", stacklevel=2)
        skipped.append(f"signal propagation plot: drawing failed ({line})")
        return
    sections.append(Section("Signal propagation at initialization", [Plot(
        "spp", "Average channel squared mean, variance and residual variance per block; the "
        "title gives the input, its shape and the seeds (band: min to max over seeds) "
        f"(from {spp_file.parent.name}/{spp_file.name}).", png)]))


def figure_bytes(fig: Any) -> bytes:
    png = figure_png(fig)
    if not isinstance(fig, Figure) or fig.canvas.manager is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)  # a pyplot figure stays registered (and in memory) until closed
    return png


def runs_section(frame: pd.DataFrame) -> Section:
    axes = [a for a in varied_axes(frame) if a in frame]
    columns = ["run_id", "status", *axes, *[m for m in SUMMARY_METRICS if m in frame]]
    if "model.name" in axes and "model" in frame:  # the model as built, not its registry name
        columns[columns.index("model.name")] = "model"
    ordered = sort_frame(frame, axes)
    table = ordered[columns].copy()
    if "final_acc" in table:
        table["final_acc"] = [final_acc_cell(r) for _, r in ordered.iterrows()]
    for column in ("best_acc", "clip_fraction"):
        if column in table:
            table[column] = [f"{v:.1%}" if np.isfinite(v) else "" for v in table[column]]
    for column in ("diverged_step", "steps_done"):
        if column in table:
            table[column] = [f"{int(v)}" if np.isfinite(v) else "" for v in table[column]]
    if "max_grad_norm" in table:
        table["max_grad_norm"] = [f"{v:.3g}" if np.isfinite(v) else ""
                                  for v in table["max_grad_norm"]]
    if "duration_s" in table:
        table["duration_s"] = [f"{v:.0f}" if np.isfinite(v) else "" for v in table["duration_s"]]
    run_axes = sort_frame(frame, axes)["axes"] if "axes" in frame else None
    for axis in axes:
        if axis not in table:
            continue
        # a value the run's config holds but its grid point does not set (the threshold of an
        # unclipped run) is not applicable to it
        table[axis] = [
            fmt_value(v) if not (isinstance(v, float) and np.isnan(v))
            and (run_axes is None or axis in tuple(a)) else ""
            for v, a in zip(table[axis], run_axes if run_axes is not None else table[axis])
        ]
    table = table.rename(columns=RUN_HEADERS)
    return Section("Runs", [f"{len(table)} runs; blank cells: not applicable or not recorded; "
                            "final acc ✗: diverged, shown (and sorted) at chance.",
                            Table(table)])


def final_acc_cell(row: pd.Series) -> str:
    """A run's final accuracy as the runs table shows it: a diverged run at chance with its
    mark, so that sorting the column puts it where it counts (at chance), not last both
    ways."""
    if row["status"] == "diverged":
        step = row.get("diverged_step")
        when = f" at step {int(step)}" if is_number(step) and np.isfinite(step) else ""
        chance = row.get("acc_chance")
        return (f"{chance:.1%} ✗ diverged{when} (at chance)"
                if is_number(chance) and np.isfinite(chance) else f"✗ diverged{when}")
    value = row.get("final_acc")
    return f"{value:.1%}" if is_number(value) and np.isfinite(value) else ""


# The diagnosis of a diverged run (``ablations`` stores it in the run's summary), stated here
# in words: the report cannot import the rule's constant from every store's version.
DIAGNOSIS_RULE = ("Diagnosis of a diverged run, from its flight record (every step kept before "
                  f"the divergence; `sigprop.diagnosis`). {RULE}")
# summary fields of the diagnosis, each with the type a stored value must have to be shown
DIAGNOSIS_FIELDS = {name: {"string": str, "integer": int, "bool": bool}[SUMMARY_FIELDS[name][0]]
                    for name in DIAGNOSIS}
FLIGHT_COLUMNS = [c for c in STORE_FLIGHT_COLUMNS if c not in ("grid", "run_id")]
TIMELINE_PANELS = 6


def typed_field(value: Any, kind: type) -> Any:
    """``value`` when it has the field's type (an int that is not a bool; a finite float
    with an integer value counts as an int), else None: a store's fields are untrusted."""
    if isinstance(value, float | np.floating) and kind is int:
        return int(value) if np.isfinite(value) and float(value).is_integer() else None
    if kind is int:
        return int(value) if isinstance(value, int | np.integer) and not isinstance(
            value, bool | np.bool_) else None
    if kind is bool:
        return bool(value) if isinstance(value, bool | np.bool_) else None
    return value if isinstance(value, kind) and value else None


def with_diagnosis(runs: pd.DataFrame, statuses: dict[str, dict]) -> pd.DataFrame:
    """``runs`` with the diagnosis columns (:data:`DIAGNOSIS_FIELDS`): the runs frame's own
    where ``load_results`` gives them, else the run's stored summary; None where neither
    holds a value of the right type."""
    frame = runs.copy()
    for column, kind in DIAGNOSIS_FIELDS.items():
        own = frame[column] if column in frame else pd.Series(None, index=frame.index)
        values = []
        for run_id, value in zip(frame["run_id"], own):
            shown = typed_field(value, kind)
            if shown is None:
                summary = statuses.get(run_id, {}).get("summary")
                if isinstance(summary, dict):
                    shown = typed_field(summary.get(column), kind)
            values.append(shown)
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
    return frame


def forensic_flight(store: GridStore, results: Any, runs: pd.DataFrame) -> pd.DataFrame | None:
    """The diverged runs' flight records: ``load_results``'s ``flight`` frame where it has
    one, else each diverged run's ``flight.parquet`` (stores read by an ``ablations`` without
    the frame); None when no run has one. A file that cannot be read is left out, warned."""
    diverged = runs.loc[runs["status"].eq("diverged"), "run_id"].tolist()
    flight = getattr(results, "flight", None)
    if isinstance(flight, pd.DataFrame):
        if "run_id" not in flight:
            return None
        part = flight[flight["run_id"].isin(diverged)]
        if "grid" in part:
            part = part[part["grid"] == store.grid]
        return part if len(part) else None
    frames = []
    for run_id in diverged:
        file = store.run_dir(run_id) / "flight.parquet"
        if not file.is_file():
            continue
        try:
            frame = read_parquet(file)
        except DamagedFile as err:
            warnings.warn(f"{err}; the report leaves the flight record of {run_id} out",
                          stacklevel=2)
            continue
        if not set(FLIGHT_COLUMNS) <= set(frame):
            warnings.warn(f"{file} lacks the flight columns "
                          f"{sorted(set(FLIGHT_COLUMNS) - set(frame))}; left out", stacklevel=2)
            continue
        frame = frame[FLIGHT_COLUMNS].copy()
        frame.insert(0, "run_id", run_id)
        frame.insert(0, "grid", store.grid)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


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
        fig = plot_divergence_timeline(flight, frame, run_ids=panels)
    except Exception as err:  # one figure failing must not cost the whole report
        line = (f"{type(err).__name__}: {err}".splitlines() or ["error"])[0]
        return [f"Figure divergence-timeline could not be drawn: {line}"]
    stat = fig.axes[-1].get_ylabel().split("\n")[0]
    return [Plot("divergence-timeline",
                 f"{stat.capitalize()} of each block at every step kept before the divergence "
                 "(log colour scale), one panel per diverged run (one per setting whose seeds "
                 "agree); dashed: the divergence step; dotted and ringed: the first step and "
                 "block out of range (the diagnosis); a white line: steps the recorder did not "
                 f"keep.{more}", figure_bytes(fig))]


def describe(frame: pd.DataFrame, row: pd.Series) -> str:
    own = row.get("axes")  # only the keys this run's grid point sets (no stale thresholds)
    axes = [a for a in varied_axes(frame) if a in row
            and (not isinstance(own, tuple | list) or a in own)]
    return ", ".join(f"{a}={fmt_value(row[a])}" for a in axes
                     if not (isinstance(row[a], float) and np.isnan(row[a]))) or "base config"


# Recorded environment keys that change a run's numbers for the same config (the rest say
# where and with what it ran); the report groups runs by these, whichever of them a run has.
NUMERIC_ENVIRONMENT = ["torch", "device", "device_name", "threads", "interop_threads",
                       "deterministic", "cudnn_deterministic", "cudnn_benchmark",
                       "cublas_workspace_config"]


def env_text(key: str, value: Any) -> str:
    if value is None:
        return "not recorded"
    if key == "device" and isinstance(value, str):
        return value.split(":")[0]  # cuda:0 and cuda:1 are the same kind of device
    return str(value)


def environment_section(statuses: dict[str, dict]) -> Section:
    environments = [s["environment"] for s in statuses.values()
                    if isinstance(s, dict) and isinstance(s.get("environment"), dict)]
    section = Section("Environment")
    if not environments:
        section.parts.append("No run recorded its environment yet (they record it when they "
                             "start).")
        return section
    section.parts.append(f"Recorded by {len(environments)} of {len(statuses)} runs when they "
                         "started.")
    section.parts += numeric_environments(environments)
    keys = ENVIRONMENT_KEYS + sorted({k for e in environments for k in e} - set(ENVIRONMENT_KEYS))
    rows = []
    for key in keys:
        values = pd.Series([str(e.get(key)) for e in environments if e.get(key) is not None])
        if values.empty:
            continue
        counts = values.value_counts()
        text = (counts.index[0] if len(counts) == 1 else
                "; ".join(f"{v} ({n} runs)" for v, n in counts.items()))
        rows.append({"key": key, "value": text})
    section.parts.append(Table(pd.DataFrame(rows)))
    return section


def numeric_environments(environments: list[dict]) -> list:
    """The distinct environments, in the keys that change numbers, with a run count each,
    and whether the runs of this report all share one."""
    keys = [k for k in NUMERIC_ENVIRONMENT if any(e.get(k) is not None for e in environments)]
    if not keys:
        return []
    combos = pd.Series([tuple(env_text(k, e.get(k)) for k in keys) for e in environments])
    counts = combos.value_counts(sort=True)
    table = pd.DataFrame([dict(zip(keys, combo)) | {"runs": n} for combo, n in counts.items()])
    unrecorded = [k for k in keys if any(e.get(k) is None for e in environments)]
    note = (f" Not every run recorded {', '.join(unrecorded)}: a run that did not may have "
            "run under other values." if unrecorded else "")
    if len(counts) == 1:  # the table below gives its values
        return [f"All {len(environments)} runs that recorded an environment ran under one "
                f"environment in what changes a run's numbers ({', '.join(keys)})." + note]
    differ = [k for i, k in enumerate(keys) if len({combo[i] for combo in counts.index}) > 1]
    return [f"The runs of this report were made under {len(counts)} different environments "
            f"({', '.join(differ)} differ): runs of the same config need not give the same numbers "
            "under two of them, so compare settings within one environment." + note,
            Table(table)]


# ----------------------------------------------------------------------------- rendering

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1240px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 34px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; font-size: 13px;
       overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 13px; margin: 0; }
th, td { border: 1px solid #d9d9d9; padding: 4px 8px; text-align: left; vertical-align: top;
         white-space: nowrap; }
/* headers wrap at their spaces ("max grad norm"): a header never makes its column wider
   than its values */
th { background: #f0f0f0; white-space: normal; min-width: 4.5em; }
tr:nth-child(even) td { background: #fafafa; } td { background: #fff; }
th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0;
            cursor: pointer; color: inherit; text-align: left; }
th button::after { content: "\\00a0\\2195"; color: #999; }
th[aria-sort=ascending] button::after { content: "\\00a0\\25B2"; color: #222; }
th[aria-sort=descending] button::after { content: "\\00a0\\25BC"; color: #222; }
td.diverged { color: #8a3b00; font-weight: 600; } td.failed { color: #a00; font-weight: 600; }
figure { margin: 12px 0 20px; }
/* a figure is never wider than the page: it shrinks with it (tap it for the full size) */
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }
nav a { margin-right: 12px; display: inline-block; }
/* a table scrolls sideways in its own frame, which may reach past the text column to the
   window's right edge; the first column stays in view while it scrolls, and the filter line
   says that it scrolls (an overlay scroll bar shows nothing) */
.scroll { overflow-x: auto; width: max-content; margin: 8px 0;
          max-width: calc(100% + (100vw - 100%) / 2 - 12px); }
.scroll.overflows td:first-child, .scroll.overflows th:first-child {
  position: sticky; left: 0; z-index: 1; }
.scroll.overflows th:first-child { background: #f0f0f0; }
.table-tools { margin: 8px 0 4px; font-size: 13px; color: #555; }
.table-tools input { font: inherit; padding: 3px 6px; width: 22em; max-width: 70%; }
.table-tools .hint { display: none; } .table-tools.overflows .hint { display: inline; }
table.wrap td { white-space: normal; min-width: 6em; }
table.wrap td:nth-child(2) { min-width: 16em; }
td.holds { color: #006d2c; font-weight: 600; } td.does-not-hold { color: #a00; font-weight: 600; }
td.inconclusive { color: #8a5a00; font-weight: 600; }
@media (max-width: 900px) {
  body { margin: 12px auto; padding: 0 10px; }
  h1 { font-size: 22px; } h2 { font-size: 18px; }
  .scroll { max-width: 100%; }
}
/* on a phone a table of prose (claims, departures) becomes one card per row, each cell under
   its column's name; the header row stays as a row of sort buttons */
@media (max-width: 640px) {
  table.wrap, table.wrap tbody, table.wrap tr, table.wrap td { display: block; }
  table.wrap { width: 100%; }
  .scroll:has(> table.wrap) { width: auto; }
  table.wrap thead tr { display: flex; flex-wrap: wrap; gap: 4px 12px; margin-bottom: 6px; }
  table.wrap th { border: 0; background: none; padding: 0; min-width: 0; }
  table.wrap tbody tr { border: 1px solid #d9d9d9; border-radius: 4px; margin: 0 0 10px;
                        padding: 4px 8px; }
  table.wrap td, table.wrap td:nth-child(2) { border: 0; padding: 2px 0; min-width: 0;
                                              background: none; }
  table.wrap td::before { content: attr(data-label) ": "; font-weight: 600; color: #555; }
  table.wrap td:empty { display: none; }
  /* a phone has no room for a sticky first column beside a long cell ("10.0% ✗ diverged at
     step 12 (at chance)"): the column scrolls away with the rest */
  .scroll.overflows td:first-child, .scroll.overflows th:first-child { position: static; }
}
"""
# Sorting (click a header; numbers by value, blanks last) and filtering of every table with a
# header, in plain DOM code: the report needs no network. A filter term is a word that some
# cell of the row contains, or column=value in the runner's own syntax (clip.mode=agc; also
# !=, <, <=, >, >=): the column by its header or key, numbers compared as numbers (97.6% is
# 0.976), text equal ignoring case, an empty value meaning a blank cell. Terms are ANDed.
SCRIPT = """
const number = (text) => {
  // a leading number ending the cell or followed by a space: "10.0% ✗ diverged", not the
  // run id "0e74aa8032bf"
  const match = text.trim().replace(/,/g, "")
    .match(/^[-+]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?(%?)(?=\\s|$)/i);
  return match ? parseFloat(match[0]) / (match[3] ? 100 : 1) : NaN;
};
const NUMBER = /^[-+]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?%?$/i;
const named = (text) => text.trim().toLowerCase().replace(/[\\s_]+/g, " ");
const TERM = /^([^=<>!]+?)(!=|<=|>=|=|<|>)(.*)$/;
const test = (cell, op, want) => {
  const a = number(cell), b = NUMBER.test(want) ? number(want) : NaN;
  const numeric = !isNaN(a) && !isNaN(b);
  const same = numeric ? Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(b)) : cell === want;
  const order = same ? 0 : numeric ? a - b : cell.localeCompare(want);
  return {"=": same, "!=": !same, "<": order < 0, "<=": order <= 0, ">": order > 0,
          ">=": order >= 0}[op] && (numeric || op === "=" || op === "!=" || cell !== "");
};
document.querySelectorAll("table.sortable").forEach((table) => {
  const body = table.tBodies[0];
  const rows = () => Array.from(body.rows);
  const value = (row, i) => row.cells[i] ? row.cells[i].textContent.trim() : "";
  const heads = Array.from(table.querySelectorAll("thead th"));
  const names = heads.map((th) => [named(th.textContent), named(th.dataset.key || "")]);
  heads.forEach((th, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = th.textContent;
    button.title = "sort by " + th.textContent;
    th.textContent = "";
    th.appendChild(button);
    button.addEventListener("click", () => {
      const up = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach((o) => o.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      const sorted = rows().sort((a, b) => {
        const x = value(a, i), y = value(b, i);
        if (!x || !y) return (!x) - (!y);  // blanks last either way
        const nx = number(x), ny = number(y);
        const order = !isNaN(nx) && !isNaN(ny) && nx !== ny ? nx - ny
          : x.localeCompare(y, undefined, {numeric: true});
        return up ? order : -order;
      });
      sorted.forEach((row) => body.appendChild(row));
    });
  });
  const frame = table.closest(".scroll");
  const tools = frame.previousElementSibling;
  const hasTools = tools && tools.classList.contains("table-tools");
  const mark = () => {  // a frame wider than the window shows a shadow and a hint
    const over = frame.scrollWidth > frame.clientWidth + 1;
    frame.classList.toggle("overflows", over);
    if (hasTools) tools.classList.toggle("overflows", over);
  };
  mark();
  addEventListener("resize", mark);
  const input = hasTools && tools.querySelector("input");
  if (!input) return;
  const count = tools.querySelector("span");
  input.addEventListener("input", () => {
    const unknown = [];
    const checks = input.value.split(/\\s+/).filter(Boolean).map((term) => {
      const match = term.match(TERM);
      const key = match && named(match[1]);
      const column = match ? names.findIndex(([head, alias]) => head === key || alias === key)
        : -1;
      if (match && column >= 0) {
        const want = match[3].trim().toLowerCase();
        return (row) => test(value(row, column).toLowerCase(), match[2], want);
      }
      if (match) unknown.push(match[1]);
      const word = term.toLowerCase();
      return (row) => row.textContent.toLowerCase().includes(word);
    });
    let shown = 0;
    rows().forEach((row) => {
      const keep = checks.every((check) => check(row));
      row.hidden = !keep;
      shown += keep;
    });
    count.textContent = checks.length ? `${shown} of ${rows().length} rows` +
      (unknown.length ? ` (no column ${unknown.join(", ")})` : "") : "";
  });
});
"""
FILTER_ROWS = 6  # tables with more rows than this get a filter box


def png_width(png: bytes) -> int:
    """Pixel width from the PNG header (IHDR comes first; width at bytes 16-19)."""
    return int.from_bytes(png[16:20], "big") if png[12:16] == b"IHDR" else 0


def anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


# the key under which the runner names a column the runs table renames: a filter term may use
# either (final_acc>0.9, "final acc" being the header)
COLUMN_KEYS = {header: key for key, header in RUN_HEADERS.items()}


def table_html(frame: pd.DataFrame, wrap: bool = False) -> str:
    names = [str(c) for c in frame.columns]
    head = "".join(f'<th data-key="{html.escape(COLUMN_KEYS[n])}">{html.escape(n)}</th>'
                   if n in COLUMN_KEYS else f"<th>{html.escape(n)}</th>" for n in names)
    # each cell names its column: a narrow page shows a table of prose as cards
    labels = [f' data-label="{html.escape(n)}"' if wrap else "" for n in names]
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for column, attr, value in zip(frame.columns, labels, row):
            text = "" if value is None else str(value)
            css = f' class="{text}"' if column == "status" and text in ("diverged", "failed") \
                else ""
            if column == "verdict" and text in VERDICT_CLASSES:
                css = f' class="{VERDICT_CLASSES[text]}"'
            bold = text.startswith("**") and text.endswith("**") and len(text) > 4
            shown = html.escape(text[2:-2] if bold else text)
            cells.append(f"<td{css}{attr}>{f'<b>{shown}</b>' if bold else shown}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    css = ' class="sortable wrap"' if wrap else ' class="sortable"'
    tools = ""
    if len(frame) > FILTER_ROWS:
        example = next((f"{n}={v}" for n in ("clip.mode", "status") if n in frame
                        for v in frame[n].astype(str) if v and " " not in v), "diverged 512")
        tools = ('<div class="table-tools"><label>Filter rows: <input type="search" '
                 f'placeholder="e.g. {html.escape(example)}" aria-label="filter rows"></label> '
                 '<span aria-live="polite"></span>'
                 f'<span class="hint"> · scroll the table sideways for all {len(names)} '
                 "columns</span></div>")
    return (f'{tools}<div class="scroll"><table{css}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def render_html(title: str, sections: list[Section], files_dir: str | None = None) -> str:
    """The HTML page; ``files_dir``: the folder (beside the page) holding each figure's PNG,
    which a figure then links to at its full size."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           "<nav>" + "".join(f'<a href="#{anchor(s.title)}">{html.escape(s.title)}</a>'
                             for s in sections) + "</nav>"]
    for section in sections:
        out.append(f'<h2 id="{anchor(section.title)}">{html.escape(section.title)}</h2>')
        for part in section.parts:
            if isinstance(part, str):
                out.append(f"<p>{inline_html(part)}</p>")
            elif isinstance(part, Bullets):
                out.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in part.items)
                           + "</ul>")
            elif isinstance(part, Table):
                out.append(table_html(part.frame, part.wrap))
            elif isinstance(part, Plot):
                data = base64.b64encode(part.png).decode()
                width = png_width(part.png)  # reserves the figure's room before it decodes
                image = (f'<img alt="{html.escape(part.name)}"'
                         + (f' width="{width}"' if width else "")
                         + f' src="data:image/png;base64,{data}">')
                if files_dir:
                    link = html.escape(f"{quote(files_dir)}/{quote(part.name)}.png")
                    image = f'<a href="{link}" title="the figure at full size">{image}</a>'
                out.append(f"<figure>{image}"
                           f"<figcaption>{inline_html(part.caption)}</figcaption></figure>")
            elif isinstance(part, Details):
                out.append(f"<details><summary>{html.escape(part.summary)}</summary>"
                           f"<pre>{html.escape(part.text)}</pre></details>")
    out.append(f"<script>{SCRIPT}</script>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# Markdown quoting. report.md quotes text from specs and stores (descriptions, claims, errors,
# tracebacks, config and environment values): it must read as that text in any Markdown
# renderer, never as markup. So HTML's specials become entities, the punctuation that opens
# Markdown structure gets a backslash (both CommonMark and Python-Markdown honour these
# escapes), and line breaks, which would start headings or list items, fold into spaces. As in
# the HTML page, `code` spans are the only markup that passes through.
MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
MD_ESCAPED = frozenset("\\`*{}[]")  # {} too: attr_list turns "{: onclick=...}" into attributes
LINE_BREAKS = re.compile(r"\s*[\r\n\v\f\u2028\u2029\x85]\s*")
# what opens a block at the start of a line: a heading, a list item or rule, an ordered item
BLOCK_START = re.compile(r"^(#|[-+](?=[\s+-]|$)|\d+[.)](?=\s|$))")


def block_safe(line: str) -> str:
    return BLOCK_START.sub(lambda m: f"{m.group(1)[:-1]}\\{m.group(1)[-1]}", line)


def one_line(text: Any) -> str:
    return LINE_BREAKS.sub(" ", str(text)).strip()


def md_escape(text: str, cell: bool = False) -> str:
    """``text`` (one line) escaped to render as itself; ``cell``: inside a table row."""
    out = []
    for i, char in enumerate(text):
        if char in MD_ENTITIES:
            out.append(MD_ENTITIES[char])
        elif char in MD_ESCAPED or (cell and char == "|"):  # "\|" is literal outside tables
            out.append("\\" + char)
        elif char == "_" and not (0 < i < len(text) - 1 and text[i - 1].isalnum()
                                  and text[i + 1].isalnum()):
            out.append("\\_")  # an underscore inside a word (run_id) never emphasises
        else:
            out.append(char)
    return "".join(out)


def md_inline(text: Any) -> str:
    """A paragraph, list item or caption: escaped prose with its `code` spans kept."""
    text = one_line(text)
    out, at = [], 0
    for match in CODE.finditer(text):
        out += [md_escape(text[at:match.start()]), f"`{match.group(1)}`"]
        at = match.end()
    out.append(md_escape(text[at:]))
    line = "".join(out)
    return block_safe(line)


def md_cell(value: Any) -> str:
    text = one_line("" if value is None else value)
    bold = text.startswith("**") and text.endswith("**") and len(text) > 4  # as table_html
    # a cell holds inline text only: no heading or list can start in it
    shown = md_escape(text[2:-2] if bold else text, cell=True)
    return f"**{shown}**" if bold else shown


def md_code_block(text: str) -> list[str]:
    """Indented, not fenced: an indented block is core Markdown in every renderer (a fence
    needs an extension in Python-Markdown, without which its content is parsed as Markdown),
    and no line of the quoted text can end it."""
    return ["    " + line if line.strip() else "" for line in text.strip("\n").splitlines()]


def table_markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(md_cell(c) for c in frame.columns) + " |",
             "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section], files_dir: str) -> str:
    from urllib.parse import quote

    out = [f"# {md_inline(title)}", ""]
    for section in sections:
        out += [f"## {md_inline(section.title)}", ""]
        for part in section.parts:
            if isinstance(part, str):
                out += [md_inline(part), ""]
            elif isinstance(part, Bullets):
                out += [f"- {md_inline(item)}" for item in part.items] + [""]
            elif isinstance(part, Table):
                out += [table_markdown(part.frame), ""]
            elif isinstance(part, Plot):
                out += [f"![{md_escape(part.name)}]({quote(files_dir)}/{quote(part.name)}.png)",
                        "", f"*{md_inline(part.caption)}*", ""]
            elif isinstance(part, Details):
                out += [f"{md_inline(part.summary)}:", "", *md_code_block(part.text), ""]
    return "\n".join(out)
