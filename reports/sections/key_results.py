"""Key results: mean final accuracy per setting (and batch size), the best of each column in
bold, and the float-rounding flag for settings whose seeds disagree beyond their test set."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ablations.claims import binomial_half_width, n_test_images
from reports.document import Cell, Section, Table
from reports.figures.frames import dependent_on, ordered_values, seed_summary, setting_axes
from reports.figures.style import fmt_value, label

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
    summary["cell"] = [Cell(c, bold=True) if r["best"] else c
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
