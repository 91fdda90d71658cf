"""The statistics a :class:`~sigprop.probes.Probe` records, and the device maths behind them.

Activations: per-(sample, channel) sums and L2 norms over the spatial dims
(:func:`channel_sums`, two reads of the tensor, in float32), combined per channel in float64
into the biased variance E[x^2] - E[x]^2 and the mean (:func:`combine_channel_sums`; relative
error about 1e-7 * (squared mean / variance)); a point's ``sq_mean`` and ``var`` average them
over its channels (:func:`point_act_stats`).

Gradients: per AGC unit (facts file, section 5; :func:`unit_shape`) the ratio
||G_i|| / max(||W_i||, 1e-3), reduced per parameter to the squared gradient norm, the largest
and the summed ratio and the count of units above lambda (:func:`param_unit_stats`), with
parameters of one unit length batched into one matrix (:func:`plan_param_chunks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sigprop.clipping import AGC_EPS  # the floor on ||W_i|| (facts section 5)

ACT_STATS = ("sq_mean", "var", "res_sq_mean", "res_var", "grad_out_norm")
GRAD_STATS = ("grad_norm", "agc_ratio_max", "agc_ratio_mean", "agc_frac_above")
STATS = ACT_STATS + GRAD_STATS
# Never a value of any statistic (all are >= 0 or NaN), so it marks "not recorded".
UNSET = float("-inf")
# Parameters are concatenated into chunks of at most this many elements, bounding the temporary
# memory of the batched unit-norm computation on big models.
CHUNK_ELEMENTS = 1 << 26
PARAM_FIELDS = 4  # grad_sq, ratio_max, ratio_sum, n_above per parameter


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



def point_act_stats(
    pending: Sequence[tuple[int, torch.Tensor, torch.Tensor, int]],
    lengths: torch.Tensor, counts: torch.Tensor,
) -> torch.Tensor:
    """``sq_mean`` of every pending point, then ``var`` of every one, from their
    :func:`channel_sums` (``(code, sums, norms, count)`` each; ``lengths``: channels per
    point, ``counts``: elements per channel, one per channel of all points). A handful of
    kernels, not several per point: concatenate along channels, combine, then segment-reduce
    by channel counts."""
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
    return torch.cat((sq_means, avg_vars))


@dataclass
class ParamChunk:
    # Parameters whose AGC units have the same length, concatenated, are one (units, length)
    # matrix: one norm kernel per group instead of one per parameter.
    groups: list[tuple[int, list[int]]]  # (unit length, parameter ids)
    units_per_param: torch.Tensor  # in the order of the groups' parameters
    slots: torch.Tensor  # buffer slots of (grad_sq, ratio_max, ratio_sum, n_above) x params


def plan_param_chunks(
    param_ids: Sequence[int], params: Sequence[torch.Tensor], units: Sequence[tuple[int, int]],
    base: int, device: torch.device,
) -> list[ParamChunk]:
    """The chunks that reduce the parameters ``param_ids`` (indices into ``params``, whose
    :func:`unit_shape` s are ``units``): grouped by unit length and dtype, at most
    :data:`CHUNK_ELEMENTS` elements a chunk. Field ``f`` of parameter ``q`` goes to buffer
    slot ``base + f * len(params) + q``."""
    by_kind: dict[tuple, list[int]] = {}
    for q in param_ids:
        param = params[q]
        by_kind.setdefault((units[q][1], param.dtype), []).append(q)
    chunk_groups: list[list[tuple[int, list[int]]]] = [[]]
    size = 0
    for (length, _), ids in by_kind.items():
        group: list[int] = []
        chunk_groups[-1].append((length, group))
        for q in ids:
            numel = params[q].numel()
            if size and size + numel > CHUNK_ELEMENTS:
                group, size = [], 0
                chunk_groups.append([(length, group)])
            group.append(q)
            size += numel
    num_params = len(params)
    chunks = []
    for candidate in chunk_groups:
        groups = [(length, ids) for length, ids in candidate if ids]
        order = [q for _, ids in groups for q in ids]
        if not order:
            continue
        slots = [base + f * num_params + q for f in range(PARAM_FIELDS) for q in order]
        chunks.append(
            ParamChunk(
                groups=groups,
                units_per_param=torch.tensor([units[q][0] for q in order], device=device),
                slots=torch.tensor(slots, device=device),
            )
        )
    return chunks


def param_unit_stats(
    chunk: ParamChunk, params: Sequence[torch.Tensor], agc_lambda: float
) -> torch.Tensor:
    """The chunk's :data:`PARAM_FIELDS` per parameter (in ``chunk.slots`` order): squared
    gradient norm, largest ratio, summed ratio, units whose ratio is above ``agc_lambda``."""
    grad_norms, weight_norms = [], []
    for length, ids in chunk.groups:
        group = [params[q] for q in ids]
        grads = torch.cat([p.grad.detach().reshape(-1) for p in group])
        weights = torch.cat([p.detach().reshape(-1) for p in group])
        grad_norms.append(
            torch.linalg.vector_norm(grads.view(-1, length), dim=1, dtype=torch.float32)
        )
        weight_norms.append(
            torch.linalg.vector_norm(weights.view(-1, length), dim=1, dtype=torch.float32)
        )
    grad_norm = torch.cat(grad_norms)
    ratio = grad_norm / torch.cat(weight_norms).clamp_min(AGC_EPS)
    per_unit = torch.stack((grad_norm.square(), ratio, (ratio > agc_lambda).float()), 1)
    lengths = chunk.units_per_param
    sums = torch.segment_reduce(per_unit, "sum", lengths=lengths, unsafe=True)
    ratio_max = torch.segment_reduce(ratio, "max", lengths=lengths, unsafe=True)
    return torch.cat((sums[:, 0], ratio_max, sums[:, 1], sums[:, 2]))
