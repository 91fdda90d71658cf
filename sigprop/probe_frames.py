"""The layout of a :class:`~sigprop.probes.Probe`'s buffer rows, and the tidy frames built from
the rows once they are on the host.

One row per recorded step, float32 slots in this order: each of :data:`ACT_STATS` for every
point (``k * num_points + point``), each of :data:`PARAM_FIELDS` for every parameter
(``param_base + f * num_params + q``), then the value of every block gain. A slot never
written holds :data:`UNSET`. :func:`block_frame` reduces the per-parameter fields to the
blocks' gradient statistics (:data:`RECORD_COLUMNS`); :func:`param_frame` keeps them per
parameter (:data:`PARAM_RECORD_COLUMNS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn

from sigprop.constants import GAIN_PREFIX
from sigprop.points import ProbePoint
from sigprop.stats import (
    ACT_STATS,
    GRAD_STATS,
    PARAM_FIELDS,
    STATS,
    UNSET,
    unit_shape,
)

RECORD_COLUMNS = ["step", "block", "stage", "index", "stat", "value", "expected_var"]
PARAM_RECORD_COLUMNS = ["step", "block", "stage", "index", "param", "stat", "value"]


@dataclass
class SlotLayout:
    """Where a recorded step's statistics sit in a buffer row; see the module docstring."""

    points: list[ProbePoint]
    param_names: list[str]  # the trainable parameters, in ``named_parameters()`` order
    param_group: list[int]  # each parameter's point, or ``num_points`` ("other")
    units: list[tuple[int, int]]  # each parameter's (units, elements per unit)
    gains: list[tuple[int, str]]  # (parameter, stat) of the blocks' 0-d parameters

    @property
    def num_points(self) -> int:
        return len(self.points)

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    @property
    def param_base(self) -> int:
        return len(ACT_STATS) * self.num_points

    @property
    def gain_base(self) -> int:
        return self.param_base + PARAM_FIELDS * self.num_params

    @property
    def num_slots(self) -> int:
        return self.gain_base + len(self.gains)

    def act_slot(self, stat: str, point: int) -> int:
        return ACT_STATS.index(stat) * self.num_points + point

    def param_fields(self, values: np.ndarray) -> tuple[np.ndarray, ...]:
        base, num_params = self.param_base, self.num_params
        return tuple(
            values[:, base + f * num_params : base + (f + 1) * num_params]
            for f in range(PARAM_FIELDS)
        )

    def group_meta(self, group: int) -> tuple[str, int, int, float]:
        """(block, stage, index, expected_var) of a point, or of the "other" group."""
        if group == self.num_points:
            num_blocks = sum(p.block != "stem" for p in self.points)
            return "other", -1, num_blocks, math.nan
        p = self.points[group]
        return p.block, p.stage, p.index, p.expected_var


def build_layout(
    model: nn.Module, points: list[ProbePoint]
) -> tuple[SlotLayout, list[nn.Parameter]]:
    """The layout of ``model``'s ``points`` and the parameters it counts, in slot order. Each
    trainable parameter belongs to the innermost point module containing it, or to the "other"
    group (index ``len(points)``)."""
    num_points = len(points)
    names: list[str] = []
    params: list[nn.Parameter] = []
    param_group: list[int] = []
    owners = sorted(((p.module, i) for i, p in enumerate(points)), key=lambda t: -len(t[0]))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((i for prefix, i in owners if name.startswith(prefix + ".")), num_points)
        names.append(name)
        params.append(param)
        param_group.append(group)
    # A block's scalar parameters (SkipInit gains) are recorded by value, one slot each.
    gains = [
        (q, f"{GAIN_PREFIX}{names[q][len(points[g].module) + 1:]}")
        for q, (param, g) in enumerate(zip(params, param_group))
        if param.ndim == 0 and g < num_points
    ]
    units = [unit_shape(p) for p in params]
    return SlotLayout(list(points), names, param_group, units, gains), params


def block_frame(layout: SlotLayout, steps: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    """One row per (step, block, stat) recorded in ``values`` (rows of ``steps``)."""
    n_steps = len(steps)
    columns: dict[str, list[np.ndarray]] = {c: [] for c in RECORD_COLUMNS}

    def add(group: int, stat: str, column: np.ndarray) -> None:
        block, stage, index, expected = layout.group_meta(group)
        keep = column != UNSET
        count = int(keep.sum())
        if not count:
            return
        columns["step"].append(steps[keep])
        columns["value"].append(column[keep])
        for name, value in (
            ("block", block), ("stage", stage), ("index", index), ("stat", stat),
            ("expected_var", expected),
        ):
            columns[name].append(np.full(count, value, dtype=object))

    for k, stat in enumerate(ACT_STATS):
        for point in range(layout.num_points):
            add(point, stat, values[:, k * layout.num_points + point])

    grad_sq, ratio_max, ratio_sum, n_above = layout.param_fields(values)
    group_of = np.asarray(layout.param_group, dtype=np.int64)
    units = np.asarray([u for u, _ in layout.units], dtype=np.float64)
    for group in range(layout.num_points + 1):
        cols = np.flatnonzero(group_of == group)
        if not len(cols) or not n_steps:
            continue
        seen = grad_sq[:, cols] != UNSET
        any_seen = seen.any(axis=1)
        unit_count = (seen * units[cols]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            grad_norm = np.sqrt(np.where(seen, grad_sq[:, cols], 0.0).sum(axis=1))
            r_max = np.where(seen, ratio_max[:, cols], -np.inf).max(axis=1)
            r_mean = np.where(seen, ratio_sum[:, cols], 0.0).sum(axis=1) / unit_count
            frac = np.where(seen, n_above[:, cols], 0.0).sum(axis=1) / unit_count
        for stat, column in zip(GRAD_STATS, (grad_norm, r_max, r_mean, frac)):
            add(group, stat, np.where(any_seen, column, UNSET))

    for k, (q, stat) in enumerate(layout.gains):
        add(layout.param_group[q], stat, values[:, layout.gain_base + k])

    return _finish_frame(columns, RECORD_COLUMNS, {"expected_var": "float64"})


def param_frame(layout: SlotLayout, steps: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    """One row per (step, parameter, stat) of the gradient statistics in ``values``."""
    columns: dict[str, list[np.ndarray]] = {c: [] for c in PARAM_RECORD_COLUMNS}
    grad_sq, ratio_max, ratio_sum, n_above = layout.param_fields(values)
    for q, name in enumerate(layout.param_names):
        keep = grad_sq[:, q] != UNSET
        count = int(keep.sum())
        if not count:
            continue
        block, stage, index, _ = layout.group_meta(layout.param_group[q])
        units = layout.units[q][0]
        per_stat = (
            np.sqrt(grad_sq[keep, q]), ratio_max[keep, q], ratio_sum[keep, q] / units,
            n_above[keep, q] / units,
        )
        for stat, column in zip(GRAD_STATS, per_stat):
            columns["step"].append(steps[keep])
            columns["value"].append(column)
            for col, value in (
                ("block", block), ("stage", stage), ("index", index), ("param", name),
                ("stat", stat),
            ):
                columns[col].append(np.full(count, value, dtype=object))
    return _finish_frame(columns, PARAM_RECORD_COLUMNS, {})


def _finish_frame(
    columns: dict[str, list[np.ndarray]], order: list[str], extra_types: dict[str, str]
) -> pd.DataFrame:
    types = {"step": "int64", "stage": "int64", "index": "int64", "value": "float64"}
    types.update(extra_types)
    data = {
        c: (np.concatenate(columns[c]) if columns[c] else np.zeros(0, dtype=object))
        for c in order
    }
    frame = pd.DataFrame(data, columns=order)
    for c in order:
        frame[c] = frame[c].astype(types.get(c, "object"))
    stat_rank = frame["stat"].map({s: i for i, s in enumerate(STATS)})
    frame = frame.assign(_rank=stat_rank).sort_values(
        ["step", "index", "_rank"] + (["param"] if "param" in order else []), kind="stable"
    )
    return frame.drop(columns="_rank").reset_index(drop=True)
