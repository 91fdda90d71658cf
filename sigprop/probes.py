"""Signal-propagation and gradient probes attached to a model from outside, through hooks.

A :class:`Probe` records, per residual block and per recorded step (facts file section 7):

=================  ==========================================================================
stat               meaning
=================  ==========================================================================
``sq_mean``        average channel squared mean of the block output: mean_c (mean_{N,H,W} x)^2
``var``            average channel variance of the block output (biased): mean_c var_{N,H,W} x
``res_sq_mean``    ``sq_mean`` of the residual branch output (before stochastic depth, the
                   skip gain and alpha)
``res_var``        ``var`` of the residual branch output
``grad_out_norm``  L2 norm of the gradient of the loss w.r.t. the block output
``grad_norm``      L2 norm of the gradients of all the block's parameters together
``agc_ratio_max``  max over the block's parameter units of ||G_i|| / max(||W_i||, 1e-3)
``agc_ratio_mean`` mean of that ratio over the units
``agc_frac_above`` fraction of the units whose ratio exceeds ``agc_lambda`` (the units AGC
                   would clip)
``gain:<name>``    the value of a block's scalar (0-d) parameter ``<name>`` (its local name, e.g.
                   ``gain:skip_gain``) in the step's forward, before that step's update: the
                   SkipInit gains, whose growth decides whether the residual branches are on
=================  ==========================================================================

Units are those of adaptive gradient clipping (facts section 5): a weight of two or more
dimensions is split into rows along dim 0 (conv: over (in, kh, kw); linear: over dim 1), any
0-d or 1-d parameter is one unit. Post-accumulate-grad hooks note which parameters received a
gradient, and a callback at the end of the same backward pass reduces them all together, so the
statistics see the raw accumulated gradients, before any clipping or weight decay (under an
fp16 ``GradScaler`` they still carry the loss scale; bf16 needs no scaler).

Channels are dim 1 (PyTorch's NCHW logical layout; channels-last memory is fine); statistics
reduce over every other dim, always in float32 (so bf16 autocast is fine). The variance is
E[x^2] - E[x]^2 from per-(sample, channel) sums combined in float64: two reads of each
activation, relative error about 1e-7 * (squared mean / variance).

Rows of :meth:`Probe.records`: one per (step, block, stat) with columns ``step, block, stage,
index, stat, value, expected_var``. Besides the blocks there are two pseudo-blocks:
``"stem"`` (the stem output; index -1, stage -1; no residual stats; ``expected_var`` 1.0 for NF
models, the bookkeeping's starting value) and ``"other"`` (only gradient stats of the parameters
outside the stem and the blocks, e.g. the classifier; index = number of blocks, stage -1).
``expected_var`` is the NF bookkeeping value 1 + k*alpha^2 (with resets) from
:class:`~sigprop.models.BlockInfo`; NaN for BN-ResNets and non-sigprop models.

Finding the blocks (:mod:`sigprop.points`): a sigprop model (one with ``blocks()``) lists them
itself; for any other module, give glob patterns on qualified module names, matched dot segment
by dot segment, e.g. a torchvision ResNet: ``blocks="layer*.*", branches="layer*.*.bn3",
stem="maxpool"``.

Cost: nothing waits for the device. Statistics are written into a preallocated float32 buffer
on the model's device (one row per recorded step) and move to the host in one transfer when the
buffer fills or :meth:`Probe.records` is called; the index tensors the writes need are built
once, on the first recorded step, and cached. On steps that do not record, the only hooks left
on the model are two cheap ones on the root module; the per-block and per-parameter hooks are
registered only while a recording step is in flight. Modules re-run outside the model's forward
(activation checkpointing) do not record twice. Hooks and ``torch.compile`` do not mix: probe
the eager model.

This module holds :class:`Probe`: its hooks, when they are on the model, and its device
buffer. The statistics' maths is in :mod:`sigprop.stats`, the buffer's layout and the frames
built from it in :mod:`sigprop.probe_frames`; their public names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sigprop.constants import GAIN_PREFIX
from sigprop.errors import UserError
from sigprop.points import ProbePoint, find_points, match_name
from sigprop.probe_frames import (
    PARAM_RECORD_COLUMNS,
    RECORD_COLUMNS,
    block_frame,
    build_layout,
    param_frame,
)
from sigprop.stats import (
    ACT_STATS,
    GRAD_STATS,
    STATS,
    UNSET,
    ParamChunk,
    channel_sums,
    channel_var_mean,
    combine_channel_sums,
    param_unit_stats,
    plan_param_chunks,
    point_act_stats,
    unit_shape,
)

# The names this module has always offered, wherever they are defined now.
__all__ = [
    "ACT_STATS", "GAIN_PREFIX", "GRAD_STATS", "PARAM_RECORD_COLUMNS", "RECORD_COLUMNS", "STATS",
    "Probe", "ProbePoint", "channel_sums", "channel_var_mean", "combine_channel_sums",
    "find_points", "match_name", "unit_shape",
]
_UNSET = UNSET  # its earlier name here


class Probe:
    """Records block statistics of ``model`` through hooks; see the module docstring.

    Args:
        model: the network; hooks go on its modules and parameters, nothing else changes.
        every: record on steps where ``step % every == 0``.
        blocks, branches, stem: glob patterns on module names for models without ``blocks()``
            (also override a sigprop model's own listing).
        record_eval: also record forwards in eval mode or without grad (signal-propagation
            runs at init use this); otherwise only training forwards with grad enabled record.
        gradients: also record the gradient statistics (needs a backward pass).
        agc_lambda: the threshold of ``agc_frac_above``.
        buffer_steps: rows kept on the device before one transfer to the host.

    Steps: the trainer calls :meth:`start_step` before each training forward; every eligible
    forward of that step records into the same row (the last one wins: with gradient
    accumulation, the gradient statistics are those of the fully accumulated gradient). If
    :meth:`start_step` is never called, eligible forwards are counted from step 0.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        *,
        blocks: str | Sequence[str] | None = None,
        branches: str | Sequence[str] | None = None,
        stem: str | None = None,
        record_eval: bool = False,
        gradients: bool = True,
        agc_lambda: float = 0.01,
        buffer_steps: int = 256,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(f"probe 'every' must be an integer >= 1, got {every!r}")
        if buffer_steps < 1:
            raise UserError(f"probe 'buffer_steps' must be >= 1, got {buffer_steps!r}")
        if not agc_lambda > 0:
            raise UserError(f"probe 'agc_lambda' must be > 0, got {agc_lambda!r}")
        self.model = model
        self.every = every
        self.record_eval = record_eval
        self.gradients = gradients
        self.agc_lambda = float(agc_lambda)
        self.buffer_steps = buffer_steps
        self.points = find_points(model, blocks, branches, stem)
        modules = dict(model.named_modules())
        self._point_modules = [modules[p.module] for p in self.points]
        self._branch_modules = [
            None if p.branch is None else modules[p.branch] for p in self.points
        ]
        self._num_points = len(self.points)
        # what a subclass may leave out (the flight recorder keeps only the cheap statistics)
        self._branches = True  # res_sq_mean, res_var
        self._grad_out = True  # grad_out_norm

        self._layout, self._params = build_layout(model, self.points)
        # views of the layout the hooks read (and the flight recorder extends)
        self.param_names: list[str] = self._layout.param_names
        self._param_group: list[int] = self._layout.param_group
        self._units = self._layout.units
        self._gains = self._layout.gains
        self._gain_base = self._layout.gain_base
        self._num_slots = self._layout.num_slots

        self._explicit_step: int | None = None
        self._forward_count = 0
        self._buffer: torch.Tensor | None = None
        self._rows_used = 0
        self._row_steps: list[int] = []
        self._generation = 0  # bumped by every flush; stale row references are dropped
        self._row: torch.Tensor | None = None  # row of the forward in flight, if recording
        self._grad_row: tuple[int, int] | None = None  # (generation, row) for the backward
        # (point code, per-(sample, channel) sums, norms, elements per channel)
        self._pending_acts: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []
        self._pending_grads: list[tuple[int, torch.Tensor]] = []
        self._touched: dict[int, None] = {}
        self._backward_callback_queued = False
        self._plans: dict[tuple, object] = {}
        self._host_steps: list[np.ndarray] = []
        self._host_values: list[np.ndarray] = []
        self._armed: list[RemovableHandle] = []
        self._removed = False
        self._root_handles = [
            model.register_forward_pre_hook(self._on_forward_start),
            model.register_forward_hook(self._on_forward_end),
        ]

    # ----------------------------------------------------------------- public API
    def start_step(self, step: int) -> None:
        """Declare the training step of the next forward(s)."""
        self._explicit_step = int(step)

    def records(self) -> pd.DataFrame:
        """Everything recorded so far, one row per (step, block, stat); see the module doc."""
        steps, values = self._host_table()
        return self._block_frame(steps, values)

    def param_records(self) -> pd.DataFrame:
        """Per-parameter gradient statistics: one row per (step, parameter, stat)."""
        steps, values = self._host_table()
        return self._param_frame(steps, values)

    def remove(self) -> None:
        """Take every hook off the model; what was recorded stays readable."""
        self._disarm()
        for handle in self._root_handles:
            handle.remove()
        self._root_handles = []
        self._pending_acts.clear()
        self._pending_grads.clear()
        self._touched.clear()
        self._row = None
        self._removed = True

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ----------------------------------------------------------------- arming
    def _arm(self) -> None:
        if self._armed:
            return
        for i, (module, branch) in enumerate(zip(self._point_modules, self._branch_modules)):
            self._armed.append(module.register_forward_hook(self._make_output_hook(i)))
            if branch is not None and self._branches:
                self._armed.append(branch.register_forward_hook(self._make_branch_hook(i)))
        if self.gradients:
            for q, param in enumerate(self._params):
                self._armed.append(
                    param.register_post_accumulate_grad_hook(self._make_param_hook(q))
                )

    def _disarm(self) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed = []

    # ----------------------------------------------------------------- forward side
    def _on_forward_start(self, module: nn.Module, args) -> None:
        self._row = None
        self._pending_acts.clear()
        eligible = self.record_eval or (module.training and torch.is_grad_enabled())
        if not eligible:
            return
        if self._explicit_step is None:
            step, self._forward_count = self._forward_count, self._forward_count + 1
        else:
            step = self._explicit_step
        if not self._records(step):
            self._grad_row = None
            self._disarm()
            return
        self._arm()
        index = self._begin_row(step, self._device(args))
        self._row = self._buffer[index]
        self._grad_row = (self._generation, index)
        if self._gains:
            row = self._row
            slots = list(range(self._gain_base, self._gain_base + len(self._gains)))
            with torch.no_grad():
                values = torch.stack([self._params[q].detach() for q, _ in self._gains])
                row.index_copy_(0, self._cached_index(("gains", row.device), slots, row.device),
                                values.to(row.device, torch.float32))

    def _device(self, args) -> torch.device:
        if self._params:
            return self._params[0].device
        first = next(iter(self.model.parameters()), None)
        if first is not None:
            return first.device
        return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))

    def _records(self, step: int) -> bool:
        return step % self.every == 0

    def _begin_row(self, step: int, device: torch.device) -> int:
        """The buffer row of ``step`` (allocating the buffer on first use)."""
        if self._buffer is not None and self._buffer.device != device:
            self._flush()
            self._buffer = None
        if self._buffer is None:
            self._buffer = torch.full(
                (self.buffer_steps, self._num_slots), UNSET, dtype=torch.float32, device=device
            )
        if not (self._rows_used and self._row_steps[-1] == step):
            if self._rows_used == self.buffer_steps:
                self._flush()
            self._row_steps.append(step)
            self._rows_used += 1
        return self._rows_used - 1

    def _make_output_hook(self, point: int):
        def hook(module: nn.Module, args, output) -> None:
            if self._row is None:
                return
            tensor = self._tensor_output(output, self.points[point].module)
            self._pending_acts.append((point, *channel_sums(tensor)))
            if (self.gradients and self._grad_out and tensor.requires_grad
                    and torch.is_grad_enabled()):
                tensor.register_hook(self._make_grad_out_hook(point))

        return hook

    def _make_branch_hook(self, point: int):
        branch_code = self._num_points + point  # tells _on_forward_end it is a branch

        def hook(module: nn.Module, args, output) -> None:
            if self._row is None:
                return
            tensor = self._tensor_output(output, self.points[point].branch)
            self._pending_acts.append((branch_code, *channel_sums(tensor)))

        return hook

    @staticmethod
    def _tensor_output(output, name: str | None) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise UserError(
                f"probed module {name!r} returned {type(output).__name__}, not a tensor"
            )
        return output

    def _on_forward_end(self, module: nn.Module, args, output) -> None:
        pending, row = self._pending_acts, self._row
        # Modules run again outside a model forward (activation checkpointing recomputes them
        # during backward) must not record a second time.
        self._pending_acts, self._row = [], None
        if row is None or not pending:
            return
        key = ("acts", row.device, tuple((e[0], e[1].shape, e[3]) for e in pending))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._act_plan(pending, row.device)
            self._plans[key] = plan
        lengths, counts, slots = plan
        with torch.no_grad(), torch.autocast(row.device.type, enabled=False):
            row.index_copy_(0, slots, point_act_stats(pending, lengths, counts))

    def _act_plan(self, pending: list, device: torch.device) -> tuple[torch.Tensor, ...]:
        lengths, counts, sq_slots, var_slots = [], [], [], []
        for code, sums, _, count in pending:
            point, branch = code % self._num_points, code >= self._num_points
            lengths.append(sums.shape[1])
            counts.extend([count] * sums.shape[1])
            sq_slots.append(self._act_slot("res_sq_mean" if branch else "sq_mean", point))
            var_slots.append(self._act_slot("res_var" if branch else "var", point))
        return (
            torch.tensor(lengths, device=device),
            torch.tensor(counts, dtype=torch.float64, device=device),
            torch.tensor(sq_slots + var_slots, device=device),
        )

    def _act_slot(self, stat: str, point: int) -> int:
        return self._layout.act_slot(stat, point)

    # ----------------------------------------------------------------- backward side
    def _make_grad_out_hook(self, point: int):
        def hook(grad: torch.Tensor) -> None:
            self._pending_grads.append(
                (point, torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))
            )
            self._queue_backward_callback()

        return hook

    def _make_param_hook(self, q: int):
        def hook(param: torch.Tensor) -> None:
            self._touched[q] = None
            self._queue_backward_callback()

        return hook

    def _queue_backward_callback(self) -> None:
        # Parameter statistics wait for the end of the backward pass so that all parameters
        # are reduced together (a few kernels per chunk instead of several per parameter).
        if not self._backward_callback_queued:
            self._backward_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._backward_callback_queued = False
        grads, touched = self._pending_grads, list(self._touched)
        self._pending_grads, self._touched = [], {}
        if self._grad_row is None or self._buffer is None or self._removed:
            return
        generation, row_index = self._grad_row
        if generation != self._generation:
            return  # the row went to the host before this backward finished
        row = self._buffer[row_index]
        with torch.no_grad(), torch.autocast(row.device.type, enabled=False):
            if grads:
                slots = [self._act_slot("grad_out_norm", point) for point, _ in grads]
                row.index_copy_(
                    0,
                    self._cached_index(("grad_out", row.device, tuple(slots)), slots, row.device),
                    torch.stack([norm for _, norm in grads]).to(row.device),
                )
            if touched:
                for chunk in self._param_chunks(tuple(sorted(touched)), row.device):
                    self._write_param_stats(row, chunk)

    def _cached_index(self, key: tuple, values: list[int], device: torch.device) -> torch.Tensor:
        index = self._plans.get(key)
        if index is None:
            index = torch.tensor(values, device=device)
            self._plans[key] = index
        return index

    def _param_chunks(self, param_ids: tuple[int, ...], device: torch.device) -> list[ParamChunk]:
        key = ("params", device, param_ids)
        chunks = self._plans.get(key)
        if chunks is None:
            chunks = plan_param_chunks(param_ids, self._params, self._units,
                                       self._layout.param_base, device)
            self._plans[key] = chunks
        return chunks

    def _write_param_stats(self, row: torch.Tensor, chunk: ParamChunk) -> None:
        values = param_unit_stats(chunk, self._params, self.agc_lambda)
        row.index_copy_(0, chunk.slots, values.to(row.dtype))

    # ----------------------------------------------------------------- host side
    def _flush(self) -> None:
        if self._buffer is None or not self._rows_used:
            return
        used = self._buffer[: self._rows_used]
        self._host_values.append(used.cpu().numpy().astype(np.float64))  # the one transfer
        self._host_steps.append(np.asarray(self._row_steps, dtype=np.int64))
        used.fill_(UNSET)
        self._rows_used, self._row_steps = 0, []
        self._generation += 1

    def _host_table(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        if not self._host_values:
            return np.zeros(0, np.int64), np.zeros((0, self._num_slots))
        return np.concatenate(self._host_steps), np.concatenate(self._host_values)

    def _group_meta(self, group: int) -> tuple[str, int, int, float]:
        return self._layout.group_meta(group)

    def _block_frame(self, steps: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        return block_frame(self._layout, steps, values)

    def _param_frame(self, steps: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        return param_frame(self._layout, steps, values)
