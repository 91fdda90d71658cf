"""Reading the grid's frames for the figures: derived columns, varied axes, seed summaries.

The grid figures take the documented frames of ``ablations.store.load_results`` (``runs``,
``metrics``, ``blocks``). Defaults come from what the grid varied (the ``axes`` column): the
clipping mode and threshold are shown together as one "clipping" setting, model names by
family, and any varied axis a figure does not map to x, hue or style becomes a panel column,
so seeds are the only thing ever averaged over. Means are over the finished seeds of a
setting by one rule (:data:`DIVERGED_RULE`, as the claims count them): in the final accuracy a
diverged run counts at chance (``acc_chance``); in every other metric it is counted, never
averaged in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ablations.claims import chance_levels
from reports.figures.style import (
    MODE_NAMES,
    clipping_label,
    fmt_value,
    is_number,
    label,
    pretty_model,
)
from sigprop.errors import UserError

PENDING = ("queued", "running", "interrupted")
# The metrics in which a diverged run counts at chance (as ablations.claims counts it): a
# network that diverged predicts no better than guessing. Elsewhere it drops out of means.
AT_CHANCE = ("final_acc", "acc_chance")
DIVERGED_RULE = ("A diverged run counts at chance accuracy (1/classes) in every table, heatmap "
                 "and claim, and is marked ✗ (or hatched) wherever it is counted.")


# Axes listed first are the ones a reader looks for first; the rest follow alphabetically.
AXIS_PRIORITY = (
    "batch_size", "clip.mode", "clip.threshold", "model.name", "model.alpha",
    "clip.clip_classifier", "lr", "base_lr", "data", "epochs", "seed",
)
DERIVED_FROM = {"clipping": ("clip.mode", "clip.threshold"), "model": ("model.name",)}


MODE_RANK = {"none": 0, "norm": 1, "agc": 2}


def with_derived(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus ``clipping`` and ``model`` columns and numeric summary metrics."""
    frame = runs.copy()
    if "clip.mode" in frame:
        thresholds = frame["clip.threshold"] if "clip.threshold" in frame else [None] * len(frame)
        frame["clipping"] = [clipping_label(m, t) for m, t in zip(frame["clip.mode"], thresholds)]
    if "model.name" in frame:
        names = frame["model.name"].map(pretty_model)
        if "model_label" in frame:  # the model as built (a shape when overridden)
            names = frame["model_label"].where(frame["model_label"].notna(), names)
        frame["model"] = names
    for column in ("final_acc", "best_acc", "diverged_step", "max_grad_norm", "clip_fraction",
                   "steps_done", "duration_s", "acc_chance"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if "status" not in frame:
        frame["status"] = "completed"
    if "final_acc" in frame and "acc_chance" not in frame:  # stores before the column
        frame["acc_chance"] = acc_at_chance(frame)
    return frame


def acc_at_chance(runs: pd.DataFrame) -> pd.Series:
    """``final_acc`` with diverged runs at chance (:data:`DIVERGED_RULE`); NaN for runs not
    finished. The same as the store's ``acc_chance`` column, for stores without it."""
    status = runs["status"] if "status" in runs else pd.Series("completed", index=runs.index)
    final = pd.to_numeric(runs["final_acc"], errors="coerce").astype(float)
    chance = pd.Series(chance_levels(runs), index=runs.index)
    return final.where(status.eq("completed")).where(~status.eq("diverged"), chance)


def varied_axes(runs: pd.DataFrame) -> list[str]:
    """The dotted keys the grid varied (union of the ``axes`` column), most telling first."""
    found: set[str] = set()
    if "axes" in runs:
        for axes in runs["axes"]:
            if isinstance(axes, list | tuple | np.ndarray):
                found.update(str(a) for a in axes)
    rank = {key: i for i, key in enumerate(AXIS_PRIORITY)}
    return sorted(found, key=lambda k: (rank.get(k, len(rank)), k))


def setting_axes(runs: pd.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """Varied axes other than the seed, as shown: clip mode/threshold -> ``clipping``,
    ``model.name`` -> ``model``, unless a raw key is excluded (then the other stays raw)."""
    excluded = set(exclude)
    for derived, raw in DERIVED_FROM.items():
        if derived in excluded:
            excluded.update(raw)
    out: list[str] = []
    for key in varied_axes(runs):
        if key == "seed" or key in excluded:
            continue
        shown = key
        for derived, raw in DERIVED_FROM.items():
            if key in raw and not excluded & set(raw):
                shown = derived
        if shown not in out and shown not in excluded and shown in runs:
            out.append(shown)
    return out


def sort_key(column: str) -> Callable[[Any], Any]:
    if column == "clipping":
        def clipping_rank(text: Any) -> tuple:
            text = str(text)
            mode = next((m for m, name in MODE_NAMES.items() if text.startswith(name)), text)
            threshold = re.search(r"λ=([0-9.eE+-]+)", text)
            return MODE_RANK.get(mode, 9), float(threshold.group(1)) if threshold else 0.0
        return clipping_rank
    if column == "clip.mode":
        return lambda v: (MODE_RANK.get(v, 9), 0.0, str(v))
    return lambda v: (0, float(v), "") if is_number(v) else (1, 0.0, str(v))


def ordered_values(frame: pd.DataFrame, column: str) -> list:
    values = [v for v in frame[column].dropna().unique()] if column in frame else []
    return sorted(values, key=sort_key(column))


def dependent_on(frame: pd.DataFrame, chosen: Sequence[str], candidates: Sequence[str]) -> list:
    """Candidates that still vary once the chosen columns are fixed (tied axes drop out)."""
    chosen = [c for c in chosen if c in frame]
    out = []
    for column in candidates:
        if column in chosen or column not in frame:
            continue
        if chosen:
            spread = frame.groupby(chosen, dropna=False)[column].nunique(dropna=False).max()
        else:
            spread = frame[column].nunique(dropna=False)
        if spread > 1:
            out.append(column)
    return out


def add_panel_column(frame: pd.DataFrame, col: str | Sequence[str] | None) -> list:
    """Adds ``_panel`` (the label of each row's panel); returns the panel labels in order."""
    columns = [col] if isinstance(col, str) else list(col or [])
    if not columns:
        frame["_panel"] = ""
        return [""]
    for column in columns:
        if column not in frame:
            raise UserError(f"no column {column!r} to split panels by; have {sorted(frame)}")

    def panel_label(row: pd.Series) -> str:
        return ", ".join(
            f"{label(c)} = {fmt_value(row[c])}" if c not in ("clipping", "model")
            else fmt_value(row[c]) for c in columns
        )

    if frame.empty:
        frame["_panel"] = ""
        return [""]
    frame["_panel"] = frame.apply(panel_label, axis=1)
    return list(dict.fromkeys(sort_frame(frame, columns)["_panel"]))


def sort_frame(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Rows ordered by ``columns`` with :func:`sort_key` (numbers numerically, clipping by
    mode then threshold), stable, with a fresh index."""
    if not columns or frame.empty:
        return frame.reset_index(drop=True)
    keys = [tuple(sort_key(c)(v) for c, v in zip(columns, row))
            for row in frame[list(columns)].itertuples(index=False)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return frame.iloc[order].reset_index(drop=True)


def require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame]
    if missing:
        raise UserError(f"{what} needs the column(s) {', '.join(missing)}; have {sorted(frame)}")


def seed_summary(runs: pd.DataFrame, keys: Sequence[str], value: str = "final_acc") -> pd.DataFrame:
    """Per setting (``keys``): mean/low/high of ``value`` over completed runs, and counts; in
    the final accuracy (:data:`AT_CHANCE`) diverged runs count at chance (``acc_chance``).

    Columns: keys, mean, low, high, n_runs, n_completed, n_diverged, n_failed, n_pending,
    n_at_chance (the diverged runs averaged in at chance).
    """
    frame = with_derived(runs)
    keys = list(keys)
    require(frame, [*keys, value], "a seed summary")
    at_chance = value in AT_CHANCE and "acc_chance" in frame
    counted = ("completed", "diverged") if at_chance else ("completed",)
    source = "acc_chance" if at_chance else value
    rows = []
    groups = frame.groupby(keys, dropna=False, sort=False) if keys else [((), frame)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        ok = group.loc[group["status"].isin(counted), source].astype(float)
        ok = ok[np.isfinite(ok)]
        rows.append({
            **dict(zip(keys, key)),
            "mean": ok.mean() if len(ok) else np.nan,
            "low": ok.min() if len(ok) else np.nan,
            "high": ok.max() if len(ok) else np.nan,
            "n_runs": len(group),
            "n_completed": int(group["status"].eq("completed").sum()),
            "n_diverged": int(group["status"].eq("diverged").sum()),
            "n_failed": int(group["status"].eq("failed").sum()),
            "n_pending": int(group["status"].isin(PENDING).sum()),
            "n_at_chance": int(np.isfinite(group.loc[group["status"].eq("diverged"), source]
                                           .astype(float)).sum()) if at_chance else 0,
        })
    return sort_frame(pd.DataFrame(rows), keys)


def block_rows(blocks: pd.DataFrame, stat: str, level: str = "block") -> pd.DataFrame:
    """Rows of one statistic: block-level rows, or per-parameter rows for ``level="param"``."""
    require(blocks, ["run_id", "step", "block", "index", "stat", "value"], "block statistics")
    rows = blocks[blocks["stat"] == stat]
    if "param" in rows:
        rows = rows[rows["param"].notna()] if level == "param" else rows[rows["param"].isna()]
    elif level == "param":
        raise UserError("the blocks frame has no per-parameter rows (no 'param' column)")
    return rows


@dataclass
class PanelGrid:
    """Which run each panel of a per-run figure shows: ``cells[r][c]`` is a run id, or None
    where the grid has no run of that row and column setting."""

    row: str | None
    col: str | None
    row_values: list
    col_values: list
    cells: list[list[str | None]]

    @property
    def run_ids(self) -> list[str]:
        return [run for line in self.cells for run in line if run is not None]

    def panels(self, axes: Any) -> Iterator[tuple[int, Any, str]]:
        """``(row, axes, run id)`` of each panel that shows a run, row by row; the cells
        without a run are drawn as :func:`empty_panel` on the way."""
        for r, line in enumerate(self.cells):
            for c, run_id in enumerate(line):
                if run_id is None:
                    empty_panel(axes[r][c], self, self.row_values[r], self.col_values[c])
                else:
                    yield r, axes[r][c], run_id

    def label_rows(self, axes: Any, text: str) -> None:
        """The y label ``text`` on the first panel of each row, headed by the row's setting
        (the model)."""
        for r, value in enumerate(self.row_values):
            value = value if self.row else None
            axes[r][0].set_ylabel(f"{fmt_value(value)}\n{text}" if value is not None else text)

    def shared_settings(self, runs: pd.DataFrame, exclude: Sequence[str] = ()) -> str:
        """The settings every panel shares, which :func:`run_title` leaves out of the panel
        titles: "SkipInit gain at init 0, steps 100" (for the figure's title); ``exclude``:
        settings not to name."""
        frame = with_derived(runs)
        shown = frame[frame["run_id"].isin(self.run_ids)]
        if shown.empty:
            return ""
        keys = [c for c in setting_axes(shown, exclude=["batch_size", "seed", *exclude])
                if c in shown and c not in (self.row, self.col)
                and shown[c].nunique(dropna=False) == 1]
        row = shown.iloc[0]
        return ", ".join(fmt_value(row[c]) if c in ("clipping", "model")
                         else f"{label(c).split(' (')[0]} {fmt_value(row[c])}" for c in keys)


def pick_panels(runs: pd.DataFrame, candidates: Sequence[str], col: str | None = None,
                row: str | None = None, max_panels: int = 4) -> PanelGrid:
    """One run per (``row``, ``col``) setting, so that panels differ in those only.

    Defaults: ``col`` the first setting that is neither the batch size nor the model
    (clipping), ``row`` the model when the candidates have several (normalizer-free models
    first). The other settings are those of the preferred run, which has the largest batch
    size (where clipping matters most), a normalizer-free model (what AGC is for) and the
    lowest seed; a cell without such a run takes any run of its setting.
    """
    frame = with_derived(runs)
    frame = frame[frame["run_id"].isin(candidates)].copy()
    if frame.empty:
        return PanelGrid(row, col, [], [], [])
    settings = setting_axes(frame, exclude=["batch_size"])
    if col is None:
        col = next((s for s in settings if s != "model"), None)
    if row is None and col != "model" and "model" in settings:
        row = "model"
    frame["_batch"] = -frame["batch_size"] if "batch_size" in frame else 0
    frame["_bn"] = (frame["model.name"].astype(str).str.startswith("bn_")
                    if "model.name" in frame else False)
    frame = frame.sort_values([c for c in ("_batch", "_bn", "seed") if c in frame],
                              kind="stable")
    for key in (col, row):
        if key is not None and key not in frame:
            raise UserError(f"no column {key!r} to choose panels by; have {sorted(frame)}")
    col_values = ordered_values(frame, col)[:max_panels] if col else [None]
    row_values = list(dict.fromkeys(frame[row])) if row else [None]  # NF models first
    others = [c for c in setting_axes(frame, exclude=[c for c in (col, row) if c])
              if c in frame]
    preferred = frame.iloc[0]
    cells = []
    for row_value in row_values:
        line = []
        for col_value in col_values:
            matching = frame
            if row:
                matching = matching[matching[row] == row_value]
            if col:
                matching = matching[matching[col] == col_value]
            alike = matching
            for other in others:
                alike = alike[alike[other] == preferred[other]]
            pool = alike if len(alike) else matching
            line.append(pool["run_id"].iloc[0] if len(pool) else None)
        cells.append(line)
    return PanelGrid(row, col, row_values, col_values, cells)


def run_title(runs: pd.DataFrame, run_id: str, grid: PanelGrid | None = None) -> str:
    """A panel's title: the run's settings, then where it sits in the grid (batch size,
    seed), then its divergence. In a ``grid`` the row setting is left to the row label, and
    settings every panel shares are left out, so that titles stay short enough to read."""
    frame = with_derived(runs)
    row = frame.loc[frame["run_id"] == run_id].iloc[0]
    def part(column: str) -> str:
        if column in ("clipping", "model"):
            return fmt_value(row[column])
        return f"{label(column).split(' (')[0]} {fmt_value(row[column])}"

    where = [c for c in ("batch_size", "seed") if c in row]
    settings = [c for c in setting_axes(frame, exclude=where) if c in row]
    if grid is not None:
        shown = frame[frame["run_id"].isin(grid.run_ids)]
        settings = [c for c in settings if c != grid.row and (
            c == grid.col or shown[c].nunique(dropna=False) > 1)]
    lines = [", ".join(part(c) for c in settings), ", ".join(part(c) for c in where)]
    if row["status"] == "diverged" and is_number(row.get("diverged_step")):
        lines.append(f"diverged at step {int(row['diverged_step'])}")
    return "\n".join(line for line in lines if line) or run_id


def selected_panels(blocks: pd.DataFrame, runs: pd.DataFrame, run_ids: Sequence[str] | None,
                    col: str | None, row: str | None, max_panels: int) -> PanelGrid:
    """``run_ids`` in one row, or :func:`pick_panels` among the runs with block statistics."""
    have = list(dict.fromkeys(blocks["run_id"]))
    if run_ids is not None:
        missing = [r for r in run_ids if r not in have]
        if missing:
            raise UserError(f"no block statistics for run(s) {', '.join(missing)}")
        return PanelGrid(None, None, [None], list(run_ids), [list(run_ids)])
    grid = pick_panels(runs, have, col, row, max_panels)
    if not grid.run_ids:
        raise UserError("no run in the runs frame has block statistics")
    return grid


def empty_panel(ax: Any, grid: PanelGrid, row_value: Any, col_value: Any) -> None:
    """A cell of the panel grid the runs do not fill: said in words, no empty frame."""
    ax.set_axis_off()
    what = " with ".join(fmt_value(v) for v in (row_value, col_value) if v is not None)
    ax.text(0.5, 0.5, f"no run of\n{what}" if what else "no run", ha="center", va="center",
            transform=ax.transAxes, color="#525252", fontsize=10, gid="no-run")


def chance_level(runs: pd.DataFrame) -> float | None:
    """Accuracy of guessing, 1 / num_classes, when every run has the same class count."""
    if "model.num_classes" not in runs:
        return None
    counts = pd.to_numeric(runs["model.num_classes"], errors="coerce").dropna().unique()
    return 1.0 / float(counts[0]) if len(counts) == 1 and counts[0] >= 2 else None


def seeds_text(runs: pd.DataFrame) -> str:
    """How many seeds each setting has among finished runs: "3 seeds", "1-3 seeds"."""
    frame = runs[runs["status"].isin(("completed", "diverged"))] if "status" in runs else runs
    if frame.empty or "seed" not in frame:
        return ""
    settings = [c for c in setting_axes(frame) if c in frame]
    groups = frame.groupby(settings, dropna=False) if settings else [((), frame)]
    counts = sorted({int(group["seed"].nunique()) for _, group in groups})
    if not counts:
        return ""
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{span} seed{'' if counts == [1] else 's'}"
