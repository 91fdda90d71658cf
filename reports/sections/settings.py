"""Settings every run shares, and the departures from the papers' recipe and the authors'
model defaults, each with the measurement the spec gives for it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablations.recipe import recipe_departures
from reports.document import Section, Table
from reports.figures.frames import varied_axes
from reports.figures.style import fmt_value

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
