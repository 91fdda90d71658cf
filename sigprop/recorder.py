"""The flight recorder: per-block statistics of every step, kept on the device, read only when a
run diverges.

Probes record every ``probe_every`` steps; an unclipped NF-ResNet can diverge within the first
few steps, so the probe's record holds nothing between initialisation and the divergence. The
:class:`FlightRecorder` records on every step while the run is young (steps ``0 ..
early - 1``) and into a ring of the last ``ring`` steps after that, into a buffer preallocated
on the model's device and written in place. Nothing of it reaches the host unless the run
diverges: then :meth:`FlightRecorder.flight` copies the rows up to the diverged step in one
transfer. A run that does not diverge never reads it.

Statistics (one row per step, block and stat; the names of :mod:`sigprop.probes`):

=================  ==========================================================================
``sq_mean``        the block output's average channel squared mean (as the probe)
``var``            the block output's average channel variance (as the probe)
``grad_norm``      L2 norm of the raw gradient of the block's parameters (before clipping)
``agc_ratio_max``  max over the block's AGC units of ||G_i|| / max(||W_i||, 1e-3)
``update_ratio``   ||W_after - W_before|| / ||W_before|| over the block's parameters, around
                   the optimizer step (weight decay and momentum included)
=================  ==========================================================================

and, per step, rows of block ``"run"`` (stage -1, index -1): ``loss`` (that step's training
loss), ``lr`` and ``clipped`` (1 when clipping changed the gradient: some AGC unit was
clipped, or the global norm was above its threshold; else 0). Blocks are named as in the
probe's records: ``"stem"``, the block names, and ``"other"`` for the parameters outside the
stem and the blocks (the classifier); ``"other"`` has no activation statistics.

Cost on every step: the block-output hooks of a probe (two reads of each block output), the
unit norms of every gradient and weight, one copy of the weights before the update and two
norms after it. Hooks do not mix with ``torch.compile``: the trainer turns the recorder off
for compiled runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from sigprop.errors import UserError
from sigprop.probes import Probe
from sigprop.stats import STATS
from sigprop.stats import UNSET as _UNSET

FLIGHT_STATS = ("sq_mean", "var", "grad_norm", "agc_ratio_max", "update_ratio")
RUN_STATS = ("loss", "lr", "clipped")
RUN_BLOCK = "run"
FLIGHT_COLUMNS = ["step", "block", "stage", "index", "stat", "value"]
_STAT_RANK = {s: i for i, s in enumerate((*STATS, "update_ratio", *RUN_STATS))}


def empty_flight() -> pd.DataFrame:
    return pd.DataFrame({
        "step": pd.Series(dtype="int64"), "block": pd.Series(dtype="object"),
        "stage": pd.Series(dtype="int64"), "index": pd.Series(dtype="int64"),
        "stat": pd.Series(dtype="object"), "value": pd.Series(dtype="float64"),
    })


class FlightRecorder(Probe):
    """Every step's block statistics of ``model``, kept on its device; see the module doc.

    Args:
        early: steps ``0 .. early - 1`` are all kept.
        ring: the last ``ring`` steps are kept after that.
        slack: extra ring rows for steps run after the divergence before the trainer saw it
            (on CUDA the losses reach the host every few steps), so that ``ring`` steps up to
            the diverged one are still there.

    The trainer calls :meth:`start_step` before the forward, :meth:`before_update` and
    :meth:`after_update` around the optimizer step, and :meth:`end_step` with the loss, lr and
    clipping of the step. ``host_transfers`` counts the copies of the buffer to the host.
    """

    def __init__(self, model: nn.Module, early: int = 50, ring: int = 32, slack: int = 0,
                 agc_lambda: float = 0.01):
        for name, value in (("early", early), ("ring", ring), ("slack", slack)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"flight recorder '{name}' must be an integer >= 0, "
                                f"got {value!r}")
        if early + ring == 0:
            raise UserError("a flight recorder with early = ring = 0 records nothing")
        self.early, self.ring = early, ring
        self._ring_rows = ring + slack if ring else 0
        super().__init__(model, every=1, agc_lambda=agc_lambda,
                         buffer_steps=early + self._ring_rows)
        self._branches = self._grad_out = False
        self._update_base = self._num_slots  # ||delta||^2 per parameter, then ||W||^2
        self._run_base = self._update_base + 2 * len(self._params)
        self._num_slots = self._run_base + len(RUN_STATS)
        self._row_of_step: list[int] = []  # the step each buffer row holds (-1: none)
        self._step_row: tuple[int, int] | None = None  # (step, row) of the step in flight
        self._before: list[torch.Tensor] | None = None
        self._flight: pd.DataFrame | None = None
        self.host_transfers = 0

    # ----------------------------------------------------------------- rows
    def _records(self, step: int) -> bool:
        return step < self.early or self._ring_rows > 0

    def _row_index(self, step: int) -> int:
        if step < self.early:
            return step
        return self.early + (step - self.early) % self._ring_rows

    def _begin_row(self, step: int, device: torch.device) -> int:
        if self._buffer is None or self._buffer.device != device:
            self._buffer = torch.full((self.buffer_steps, self._num_slots), _UNSET,
                                      dtype=torch.float32, device=device)
            self._row_of_step = [-1] * self.buffer_steps
        index = self._row_index(step)
        if self._row_of_step[index] != step:  # a ring row reused: the older step's values go
            self._buffer[index].fill_(_UNSET)
            self._row_of_step[index] = step
        self._step_row = (step, index)
        return index

    def _flush(self) -> None:
        pass  # the buffer never goes to the host on its own; see flight()

    def _current_row(self) -> torch.Tensor | None:
        if self._step_row is None or self._buffer is None or self._removed:
            return None
        step, index = self._step_row
        return self._buffer[index] if self._row_of_step[index] == step else None

    # ----------------------------------------------------------------- trainer calls
    def start_step(self, step: int) -> None:
        super().start_step(step)
        self._step_row = None

    @torch.no_grad()
    def before_update(self) -> None:
        """Keep a copy of the weights for the step's update ratio."""
        if self._current_row() is None or not self._params:
            return
        live = [p.detach() for p in self._params]
        if self._before is None or any(b.shape != p.shape or b.device != p.device
                                       for b, p in zip(self._before, live)):
            self._before = [torch.empty_like(p) for p in live]
        torch._foreach_copy_(self._before, live)

    @torch.no_grad()
    def after_update(self) -> None:
        """Write ||W_after - W_before||^2 and ||W_before||^2 of every parameter."""
        row = self._current_row()
        if row is None or self._before is None or not self._params:
            return
        weight_norms = torch._foreach_norm(self._before)
        torch._foreach_sub_(self._before, [p.detach() for p in self._params])
        delta_norms = torch._foreach_norm(self._before)
        values = torch.stack([n.float().to(row.device) for n in (*delta_norms, *weight_norms)])
        row[self._update_base:self._run_base].copy_(values.square())

    @torch.no_grad()
    def end_step(self, loss: torch.Tensor, lr: float, clip_fraction: torch.Tensor) -> None:
        """The step's loss, lr and whether clipping acted (device tensors stay there)."""
        row = self._current_row()
        if row is None:
            return
        base = self._run_base
        row[base].copy_(loss.detach().float())
        row[base + 1].fill_(float(lr))
        row[base + 2].copy_((clip_fraction.detach() > 0).float())

    # ----------------------------------------------------------------- host side
    def recorded_steps(self) -> list[int]:
        """The steps whose rows the buffer holds now (host bookkeeping, no transfer)."""
        return sorted(s for s in self._row_of_step if s >= 0)

    def flight(self, diverged_step: int) -> pd.DataFrame:
        """The kept rows up to and including ``diverged_step`` (the first ``early`` steps and
        the last ``ring`` before it), as a tidy frame with :data:`FLIGHT_COLUMNS`. The one
        copy to the host; later calls return the same frame."""
        if self._flight is not None:
            return self._flight
        keep = [(s, i) for i, s in enumerate(self._row_of_step)
                if 0 <= s <= diverged_step and (s < self.early or s > diverged_step - self.ring)]
        if not keep or self._buffer is None:
            self._flight = empty_flight()
            return self._flight
        keep.sort()
        steps = np.asarray([s for s, _ in keep], dtype=np.int64)
        rows = torch.tensor([i for _, i in keep], device=self._buffer.device)
        values = self._buffer.index_select(0, rows).cpu().numpy().astype(np.float64)
        self.host_transfers += 1
        self._flight = self._frame(steps, values)
        return self._flight

    def _frame(self, steps: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        blocks = self._block_frame(steps, values[:, :self._update_base])
        blocks = blocks[blocks["stat"].isin(FLIGHT_STATS)].drop(columns="expected_var")
        parts = [blocks]
        num_params = len(self._params)
        delta_sq = values[:, self._update_base:self._update_base + num_params]
        weight_sq = values[:, self._update_base + num_params:self._run_base]
        group_of = np.asarray(self._param_group, dtype=np.int64)
        for group in range(self._num_points + 1):
            cols = np.flatnonzero(group_of == group)
            if not len(cols):
                continue
            seen = delta_sq[:, cols[0]] != _UNSET
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.sqrt(delta_sq[:, cols].sum(1)) / np.sqrt(weight_sq[:, cols].sum(1))
            block, stage, index, _ = self._group_meta(group)
            parts.append(_rows(steps[seen], block, stage, index, "update_ratio", ratio[seen]))
        for k, stat in enumerate(RUN_STATS):
            column = values[:, self._run_base + k]
            seen = column != _UNSET
            parts.append(_rows(steps[seen], RUN_BLOCK, -1, -1, stat, column[seen]))
        frame = pd.concat([p for p in parts if len(p)], ignore_index=True)
        frame = frame.astype({"step": "int64", "stage": "int64", "index": "int64",
                              "value": "float64", "block": "object", "stat": "object"})
        rank = frame["stat"].map(_STAT_RANK)
        frame = frame.assign(_rank=rank).sort_values(["step", "index", "_rank"], kind="stable")
        return frame.drop(columns="_rank").reset_index(drop=True)[FLIGHT_COLUMNS]


def _rows(steps: np.ndarray, block: str, stage: int, index: int, stat: str,
          values: np.ndarray) -> pd.DataFrame:
    n = len(steps)
    return pd.DataFrame({"step": steps, "block": [block] * n, "stage": np.full(n, stage),
                         "index": np.full(n, index), "stat": [stat] * n, "value": values},
                        columns=FLIGHT_COLUMNS)
