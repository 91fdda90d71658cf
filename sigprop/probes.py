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

Finding the blocks: a sigprop model (one with ``blocks()``) lists them itself. For any other
module, give glob patterns on qualified module names, matched dot segment by dot segment (``*``
never crosses a dot), e.g. a torchvision ResNet: ``blocks="layer*.*", branches="layer*.*.bn3",
stem="maxpool"``. Block ``index`` is the order of appearance in ``model.named_modules()``;
block ``stage`` is the rank of the block name's prefix before its last dot among the distinct
prefixes, in order of first appearance ("layer1.0" and "layer1.2" are stage 0, "layer2.0" is
stage 1). A branch belongs to the block whose name prefixes it.

Cost: nothing waits for the device. Statistics are written into a preallocated float32 buffer
on the model's device (one row per recorded step) and move to the host in one transfer when the
buffer fills or :meth:`Probe.records` is called; the index tensors the writes need are built
once, on the first recorded step, and cached. On steps that do not record, the only hooks left
on the model are two cheap ones on the root module; the per-block and per-parameter hooks are
registered only while a recording step is in flight. Modules re-run outside the model's forward
(activation checkpointing) do not record twice. Hooks and ``torch.compile`` do not mix: probe
the eager model.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sigprop.clipping import AGC_EPS  # the floor on ||W_i|| (facts section 5)
from sigprop.errors import UserError

ACT_STATS = ("sq_mean", "var", "res_sq_mean", "res_var", "grad_out_norm")
GRAD_STATS = ("grad_norm", "agc_ratio_max", "agc_ratio_mean", "agc_frac_above")
STATS = ACT_STATS + GRAD_STATS
RECORD_COLUMNS = ["step", "block", "stage", "index", "stat", "value", "expected_var"]
PARAM_RECORD_COLUMNS = ["step", "block", "stage", "index", "param", "stat", "value"]
GAIN_PREFIX = "gain:"  # stat of a block's 0-d parameter: "gain:skip_gain"
# Never a value of any statistic (all are >= 0 or NaN), so it marks "not recorded".
_UNSET = float("-inf")
# Parameters are concatenated into chunks of at most this many elements, bounding the temporary
# memory of the batched unit-norm computation on big models.
_CHUNK_ELEMENTS = 1 << 26
_PARAM_FIELDS = 4  # grad_sq, ratio_max, ratio_sum, n_above per parameter


@dataclass(frozen=True)
class ProbePoint:
    """One place the probe measures: the stem or a residual block."""

    block: str  # label in the frame: "stem" or the block's qualified module name
    module: str  # qualified name of the module whose output is the block output
    stage: int
    index: int
    branch: str | None  # qualified name of the branch output module, if any
    expected_var: float  # NaN when unknown


def _as_patterns(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def match_name(name: str, pattern: str) -> bool:
    """Glob match of a qualified module name, dot segment by dot segment."""
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts)
    )


def _matching(names: list[str], patterns: list[str], what: str) -> list[str]:
    found = [n for n in names if any(match_name(n, p) for p in patterns)]
    if not found:
        sample = ", ".join(n for n in names[:12] if n)
        raise UserError(
            f"no module matches {what} pattern(s) {', '.join(map(repr, patterns))}; "
            f"module names look like: {sample}"
        )
    return found


def find_points(
    model: nn.Module,
    blocks: str | Sequence[str] | None = None,
    branches: str | Sequence[str] | None = None,
    stem: str | None = None,
) -> list[ProbePoint]:
    """The stem (if any) and the blocks of ``model``, in order; see the module docstring."""
    block_patterns, branch_patterns = _as_patterns(blocks), _as_patterns(branches)
    names = [n for n, _ in model.named_modules()]
    points: list[ProbePoint] = []
    if not block_patterns and hasattr(model, "blocks"):
        infos = model.blocks()
        nf = any(b.expected_var is not None for b in infos)
        stem_name = stem if stem is not None else ("stem" if hasattr(model, "stem") else None)
        if stem_name is not None:
            _matching(names, [stem_name], "stem")
            points.append(ProbePoint("stem", stem_name, -1, -1, None, 1.0 if nf else math.nan))
        for b in infos:
            expected = math.nan if b.expected_var is None else float(b.expected_var)
            points.append(ProbePoint(b.name, b.name, b.stage, b.index, b.branch, expected))
        return points
    if not block_patterns:
        raise UserError(
            f"{type(model).__name__} has no blocks(); give block name patterns, e.g. "
            "blocks='layer*.*', branches='layer*.*.bn3'"
        )
    if stem is not None:
        stem_names = _matching(names, [stem], "stem")
        points.append(ProbePoint("stem", stem_names[-1], -1, -1, None, math.nan))
    block_names = _matching(names, block_patterns, "block")
    branch_of: dict[str, str] = {}
    if branch_patterns:
        for branch in _matching(names, branch_patterns, "branch"):
            owners = [b for b in block_names if branch.startswith(b + ".")]
            if not owners:
                raise UserError(f"branch module {branch!r} is inside none of the blocks")
            owner = max(owners, key=len)
            if owner in branch_of:
                raise UserError(
                    f"block {owner!r} has two branch modules: {branch_of[owner]!r}, {branch!r}"
                )
            branch_of[owner] = branch
    prefixes: dict[str, int] = {}
    for index, name in enumerate(block_names):
        prefix = name.rpartition(".")[0]
        stage = prefixes.setdefault(prefix, len(prefixes))
        points.append(ProbePoint(name, name, stage, index, branch_of.get(name), math.nan))
    return points


def channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-(sample, channel) sum and L2 norm of ``x`` over its spatial dims, in float32.

    Returns ``(sums, norms, count)`` with ``sums`` and ``norms`` of shape (N, C) and ``count``
    the elements per channel (N * spatial size). Two reads of ``x`` and no temporaries: reducing
    the contiguous inner dims is an order of magnitude faster on CPU than ``torch.var_mean``
    over (0, 2, 3), or than a centred two-pass variance.
    """
    x = x.detach()
    if x.dim() == 1:
        rows = x.reshape(-1, 1, 1)
    elif x.dim() == 2:
        rows = x.unsqueeze(-1)
    else:
        rows = x.flatten(2)
    sums = rows.sum(dim=2, dtype=torch.float32)
    norms = torch.linalg.vector_norm(rows, dim=2, dtype=torch.float32)
    return sums, norms, rows.shape[0] * rows.shape[2]


def combine_channel_sums(
    sums: torch.Tensor, norms: torch.Tensor, count: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (biased variance, mean) from :func:`channel_sums`, combined in float64.

    var = E[x^2] - E[x]^2: its relative error is about 1e-7 * (squared mean / variance), far
    below anything a plot or a test of these statistics resolves (0.1% at a mean shift whose
    square is 10^4 times the variance).
    """
    mean = sums.double().sum(dim=0) / count
    second_moment = norms.double().square().sum(dim=0) / count
    return (second_moment - mean.square()).clamp_min(0.0).float(), mean.float()


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel biased variance and mean of ``x`` over every dim but 1; both 1-d float32."""
    sums, norms, count = channel_sums(x)
    return combine_channel_sums(sums, norms, count)


def unit_shape(param: torch.Tensor) -> tuple[int, int]:
    """(number of AGC units, elements per unit) of a parameter."""
    if param.dim() <= 1:
        return 1, max(1, param.numel())
    return param.shape[0], param[0].numel()


@dataclass
class _Chunk:
    # Parameters whose AGC units have the same length, concatenated, are one (units, length)
    # matrix: one norm kernel per group instead of one per parameter.
    groups: list[tuple[int, list[int]]]  # (unit length, parameter ids)
    units_per_param: torch.Tensor  # in the order of the groups' parameters
    slots: torch.Tensor  # buffer slots of (grad_sq, ratio_max, ratio_sum, n_above) x params


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

        # Each trainable parameter belongs to the innermost point module containing it, or to
        # the "other" group (index len(points)).
        self.param_names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._param_group: list[int] = []
        owners = sorted(
            ((p.module, i) for i, p in enumerate(self.points)), key=lambda t: -len(t[0])
        )
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            group = next(
                (i for prefix, i in owners if name.startswith(prefix + ".")), self._num_points
            )
            self.param_names.append(name)
            self._params.append(param)
            self._param_group.append(group)
        self._units = [unit_shape(p) for p in self._params]
        self._num_slots = len(ACT_STATS) * self._num_points + _PARAM_FIELDS * len(self._params)
        # A block's scalar parameters (SkipInit gains) are recorded by value, one slot each.
        self._gains = [
            (q, f"{GAIN_PREFIX}{self.param_names[q][len(self.points[g].module) + 1:]}")
            for q, (param, g) in enumerate(zip(self._params, self._param_group))
            if param.ndim == 0 and g < self._num_points
        ]
        self._gain_base = self._num_slots
        self._num_slots += len(self._gains)

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
                (self.buffer_steps, self._num_slots), _UNSET, dtype=torch.float32, device=device
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
        # Reduce every block's per-channel sums with a handful of kernels, not several per
        # block: concatenate along channels, combine, then segment-reduce by channel counts.
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
            if len({e[1].shape[0] for e in pending}) == 1:
                sums = torch.cat([e[1] for e in pending], dim=1)
                norms = torch.cat([e[2] for e in pending], dim=1)
            else:  # batch sizes differ between points: sum over samples point by point
                sums = torch.cat([e[1].double().sum(0, keepdim=True) for e in pending], dim=1)
                norms = torch.cat(
                    [e[2].double().square().sum(0, keepdim=True).sqrt() for e in pending], dim=1
                )
            var, mean = combine_channel_sums(sums, norms, counts)
            sq_means = torch.segment_reduce(mean.square(), "mean", lengths=lengths, unsafe=True)
            avg_vars = torch.segment_reduce(var, "mean", lengths=lengths, unsafe=True)
            row.index_copy_(0, slots, torch.cat((sq_means, avg_vars)))

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
        return ACT_STATS.index(stat) * self._num_points + point

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

    def _param_chunks(self, param_ids: tuple[int, ...], device: torch.device) -> list[_Chunk]:
        key = ("params", device, param_ids)
        chunks = self._plans.get(key)
        if chunks is not None:
            return chunks
        by_kind: dict[tuple, list[int]] = {}
        for q in param_ids:
            param = self._params[q]
            by_kind.setdefault((self._units[q][1], param.dtype), []).append(q)
        chunk_groups: list[list[tuple[int, list[int]]]] = [[]]
        size = 0
        for (length, _), ids in by_kind.items():
            group: list[int] = []
            chunk_groups[-1].append((length, group))
            for q in ids:
                numel = self._params[q].numel()
                if size and size + numel > _CHUNK_ELEMENTS:
                    group, size = [], 0
                    chunk_groups.append([(length, group)])
                group.append(q)
                size += numel
        base, num_params = len(ACT_STATS) * self._num_points, len(self._params)
        chunks = []
        for candidate in chunk_groups:
            groups = [(length, ids) for length, ids in candidate if ids]
            order = [q for _, ids in groups for q in ids]
            if not order:
                continue
            slots = [base + f * num_params + q for f in range(_PARAM_FIELDS) for q in order]
            chunks.append(
                _Chunk(
                    groups=groups,
                    units_per_param=torch.tensor([self._units[q][0] for q in order], device=device),
                    slots=torch.tensor(slots, device=device),
                )
            )
        self._plans[key] = chunks
        return chunks

    def _write_param_stats(self, row: torch.Tensor, chunk: _Chunk) -> None:
        grad_norms, weight_norms = [], []
        for length, ids in chunk.groups:
            params = [self._params[q] for q in ids]
            grads = torch.cat([p.grad.detach().reshape(-1) for p in params])
            weights = torch.cat([p.detach().reshape(-1) for p in params])
            grad_norms.append(
                torch.linalg.vector_norm(grads.view(-1, length), dim=1, dtype=torch.float32)
            )
            weight_norms.append(
                torch.linalg.vector_norm(weights.view(-1, length), dim=1, dtype=torch.float32)
            )
        grad_norm = torch.cat(grad_norms)
        ratio = grad_norm / torch.cat(weight_norms).clamp_min(AGC_EPS)
        per_unit = torch.stack((grad_norm.square(), ratio, (ratio > self.agc_lambda).float()), 1)
        lengths = chunk.units_per_param
        sums = torch.segment_reduce(per_unit, "sum", lengths=lengths, unsafe=True)
        ratio_max = torch.segment_reduce(ratio, "max", lengths=lengths, unsafe=True)
        values = torch.cat((sums[:, 0], ratio_max, sums[:, 1], sums[:, 2]))
        row.index_copy_(0, chunk.slots, values.to(row.dtype))

    # ----------------------------------------------------------------- host side
    def _flush(self) -> None:
        if self._buffer is None or not self._rows_used:
            return
        used = self._buffer[: self._rows_used]
        self._host_values.append(used.cpu().numpy().astype(np.float64))  # the one transfer
        self._host_steps.append(np.asarray(self._row_steps, dtype=np.int64))
        used.fill_(_UNSET)
        self._rows_used, self._row_steps = 0, []
        self._generation += 1

    def _host_table(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        if not self._host_values:
            return np.zeros(0, np.int64), np.zeros((0, self._num_slots))
        return np.concatenate(self._host_steps), np.concatenate(self._host_values)

    def _param_fields(self, values: np.ndarray) -> tuple[np.ndarray, ...]:
        base, num_params = len(ACT_STATS) * self._num_points, len(self._params)
        return tuple(
            values[:, base + f * num_params : base + (f + 1) * num_params]
            for f in range(_PARAM_FIELDS)
        )

    def _group_meta(self, group: int) -> tuple[str, int, int, float]:
        if group == self._num_points:
            num_blocks = sum(p.block != "stem" for p in self.points)
            return "other", -1, num_blocks, math.nan
        p = self.points[group]
        return p.block, p.stage, p.index, p.expected_var

    def _block_frame(self, steps: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        n_steps = len(steps)
        columns: dict[str, list[np.ndarray]] = {c: [] for c in RECORD_COLUMNS}

        def add(group: int, stat: str, column: np.ndarray) -> None:
            block, stage, index, expected = self._group_meta(group)
            keep = column != _UNSET
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
            for point in range(self._num_points):
                add(point, stat, values[:, k * self._num_points + point])

        grad_sq, ratio_max, ratio_sum, n_above = self._param_fields(values)
        group_of = np.asarray(self._param_group, dtype=np.int64)
        units = np.asarray([u for u, _ in self._units], dtype=np.float64)
        for group in range(self._num_points + 1):
            cols = np.flatnonzero(group_of == group)
            if not len(cols) or not n_steps:
                continue
            seen = grad_sq[:, cols] != _UNSET
            any_seen = seen.any(axis=1)
            unit_count = (seen * units[cols]).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                grad_norm = np.sqrt(np.where(seen, grad_sq[:, cols], 0.0).sum(axis=1))
                r_max = np.where(seen, ratio_max[:, cols], -np.inf).max(axis=1)
                r_mean = np.where(seen, ratio_sum[:, cols], 0.0).sum(axis=1) / unit_count
                frac = np.where(seen, n_above[:, cols], 0.0).sum(axis=1) / unit_count
            for stat, column in zip(GRAD_STATS, (grad_norm, r_max, r_mean, frac)):
                add(group, stat, np.where(any_seen, column, _UNSET))

        for k, (q, stat) in enumerate(self._gains):
            add(self._param_group[q], stat, values[:, self._gain_base + k])

        return self._finish_frame(columns, RECORD_COLUMNS, {"expected_var": "float64"})

    def _param_frame(self, steps: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        columns: dict[str, list[np.ndarray]] = {c: [] for c in PARAM_RECORD_COLUMNS}
        grad_sq, ratio_max, ratio_sum, n_above = self._param_fields(values)
        for q, name in enumerate(self.param_names):
            keep = grad_sq[:, q] != _UNSET
            count = int(keep.sum())
            if not count:
                continue
            block, stage, index, _ = self._group_meta(self._param_group[q])
            units = self._units[q][0]
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
        return self._finish_frame(columns, PARAM_RECORD_COLUMNS, {})

    @staticmethod
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
