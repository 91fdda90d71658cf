"""Gradient clipping: adaptive gradient clipping (AGC), global-norm clipping, or none.

Paper B: Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", ICML 2021, arXiv 2102.06171, section 4.

AGC follows the facts file, section 5 (paper B): for every unit i (one output row) of every
parameter W with gradient G,

    G_i <- G_i * min(1, lambda * max(||W_i||, eps) / max(||G_i||, 1e-6))

with Frobenius norms over the unit's fan-in: conv weights (out, in, kh, kw) over (in, kh, kw),
linear weights (out, in) over dim 1 (PyTorch layout), and whole-tensor norms for 0-d and 1-d
parameters (biases, gains, skip gains). Only units whose ratio ||G_i|| / max(||W_i||, eps)
exceeds lambda change; the others are multiplied by exactly 1.0, so they stay bit-identical.

Order in a training step: clip the raw gradient, then add weight decay, then the momentum step.
Under mixed precision with a ``GradScaler`` the gradients carry the loss scale, so call
``scaler.unscale_(optimizer)`` before clipping; the trainer in :mod:`sigprop.train` does.

Cost: AGC is memory-bound: it must read W and G and rewrite G. The rewrite is one multi-tensor
``torch._foreach_mul_`` over all gradients; whole-tensor norms (0-d/1-d parameters) are one
``torch._foreach_norm`` each for W and G; the per-unit arithmetic runs on one flat vector of all
units' norms. The only per-tensor kernels are the unit-norm reductions of the parameters with two
or more dims (one over W, one over G, written straight into the flat buffer): PyTorch has no
multi-tensor reduction along a dimension, and stacking same-shaped tensors to reduce each group
in one kernel copies every weight and gradient first, which measured 3-9x slower than this on
CPU (``benchmarks/bench_agc.py``). The buffer layout depends only on the parameters' shapes and
is cached (the cached buffers make concurrent calls from several threads unsafe). Statistics
come back as device tensors: nothing here synchronizes with the host.

On CUDA a fused path is available: the whole clip of one device's parameters compiled with
``torch.compile`` (Inductor's Triton kernels: each parameter's weight and gradient unit norms
and the rescale in as few kernels as the compiler can fuse), compiled once per parameter-shape
set. It is opt-in (``fused=True``, or ``SIGPROP_FUSED_AGC=1`` for the default ``fused=None``)
because the first call compiles for tens of seconds; it equals the eager path to float32
rounding (a ``cuda``-marked test), and it falls back to the eager path, with a warning, when
compiling fails. The eager path stays the reference and the CPU path.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from sigprop.constants import THRESHOLD_MODES
from sigprop.errors import UserError
from sigprop.fields import (
    POSITIVE,
    check_keys,
    check_table,
    check_value,
    checked,
    one_of,
    validate,
)

CLIP_MODES = ("agc", "norm", "none")
AGC_EPS = 1e-3
GRAD_NORM_FLOOR = 1e-6  # guards the division by ||G_i|| (facts section 5)

ParamsArg = Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class ClipStats:
    """What a clipping call saw, as device tensors (read them with :meth:`to_dict` when due).

    ``grad_norm``: global L2 norm of the gradients before clipping (0-d).
    ``clip_fraction``: fraction of all units that were clipped (0-d); for global-norm clipping
    the whole gradient is one unit, so it is 1.0 when the norm exceeded the threshold, else 0.
    ``param_fractions``: fraction of each parameter's units clipped (1-d, aligned with
    ``names``).
    """

    grad_norm: torch.Tensor
    clip_fraction: torch.Tensor
    param_fractions: torch.Tensor
    names: tuple[str, ...]

    def to_dict(self) -> dict[str, float]:
        """Host copy (synchronizes): grad_norm, clip_fraction and one entry per parameter."""
        out = {"grad_norm": float(self.grad_norm), "clip_fraction": float(self.clip_fraction)}
        fractions = self.param_fractions.tolist()
        out.update({f"clip_fraction/{n}": f for n, f in zip(self.names, fractions)})
        return out


def _split_named(parameters: ParamsArg) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the parameters that have a gradient."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for k, item in enumerate(parameters):
        name, tensor = item if isinstance(item, tuple) else (str(k), item)
        if tensor.grad is None:
            continue
        if tensor.grad.is_sparse:
            raise UserError(f"gradient clipping does not support sparse gradients ({name})")
        names.append(name)
        tensors.append(tensor)
    return names, tensors


@dataclass(frozen=True)
class _AgcPlan:
    """Where each parameter's unit norms live in one flat float32 vector, for one device.

    Slots ``[0, n_whole)`` hold the whole-tensor norms of the 0-d/1-d parameters (in the order
    of ``whole``), then come the rows of the unit-wise parameters (in the order of ``unitwise``).
    """

    whole: tuple[int, ...]  # indices (into the device's parameter list) of 0-d/1-d params
    unitwise: tuple[int, ...]  # indices of params with >= 2 dims
    reduce_dims: tuple[tuple[int, ...], ...]  # per unit-wise param: its fan-in dims
    w_norms: torch.Tensor  # flat buffers, rewritten by every call
    g_norms: torch.Tensor
    scale: torch.Tensor
    w_views: tuple[torch.Tensor, ...]  # per unit-wise param: its slice of w_norms
    g_views: tuple[torch.Tensor, ...]
    scale_views: tuple[torch.Tensor, ...]  # per param, shaped to broadcast against its grad
    owner: torch.Tensor  # slot -> parameter index (long)
    units: torch.Tensor  # units per parameter (float32)


@lru_cache(maxsize=16)
def _agc_plan(shapes: tuple[tuple[int, ...], ...], device: torch.device) -> _AgcPlan:
    whole = tuple(i for i, s in enumerate(shapes) if len(s) <= 1)
    unitwise = tuple(i for i, s in enumerate(shapes) if len(s) > 1)
    rows = [shapes[i][0] for i in unitwise]
    total = len(whole) + sum(rows)
    w_norms = torch.empty(total, device=device)
    g_norms = torch.empty(total, device=device)
    scale = torch.empty(total, device=device)
    owner = torch.empty(total, dtype=torch.long)
    units = torch.ones(len(shapes))
    scale_views: list[torch.Tensor | None] = [None] * len(shapes)
    for slot, i in enumerate(whole):
        owner[slot] = i
        scale_views[i] = scale[slot]
    w_views, g_views = [], []
    start = len(whole)
    for i, n in zip(unitwise, rows):
        stop = start + n
        owner[start:stop] = i
        units[i] = n
        w_views.append(w_norms[start:stop])
        g_views.append(g_norms[start:stop])
        scale_views[i] = scale[start:stop].view(n, *([1] * (len(shapes[i]) - 1)))
        start = stop
    return _AgcPlan(
        whole=whole,
        unitwise=unitwise,
        reduce_dims=tuple(tuple(range(1, len(shapes[i]))) for i in unitwise),
        w_norms=w_norms,
        g_norms=g_norms,
        scale=scale,
        w_views=tuple(w_views),
        g_views=tuple(g_views),
        scale_views=tuple(scale_views),  # type: ignore[arg-type]
        owner=owner.to(device),
        units=units.to(device),
    )


def _whole_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whole-tensor L2 norms as one float32 vector (one multi-tensor kernel)."""
    # _foreach_norm computes in a dtype no narrower than its input's
    wide = any(t.dtype == torch.float64 for t in tensors)
    norms = torch._foreach_norm(tensors, 2.0, None if wide else torch.float32)
    return torch.stack([n.float() for n in norms]) if wide else torch.stack(norms)


def _norm_into(x: torch.Tensor, dims: tuple[int, ...], out: torch.Tensor) -> None:
    """Unit norms of ``x`` over ``dims`` into the float32 buffer slice ``out``."""
    if x.is_contiguous():
        # one reduced dim runs measurably faster on CPU than several (same values)
        x, dims = x.view(x.shape[0], -1), (1,)
    if x.dtype == torch.float64:
        out.copy_(torch.linalg.vector_norm(x, dim=dims))
    else:
        dtype = None if x.dtype == torch.float32 else torch.float32
        torch.linalg.vector_norm(x, dim=dims, dtype=dtype, out=out)


def _agc_device(
    params: list[torch.Tensor], clip: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """AGC on parameters of one device: (sum of squared grad norms, clipped count, per-param
    clipped fraction, unit count)."""
    plan = _agc_plan(tuple(tuple(p.shape) for p in params), params[0].device)
    weights = [p.detach() for p in params]
    grads = [p.grad for p in params]
    n_whole = len(plan.whole)
    if n_whole:
        plan.w_norms[:n_whole] = _whole_norms([weights[i] for i in plan.whole])
        plan.g_norms[:n_whole] = _whole_norms([grads[i] for i in plan.whole])
    # The one per-tensor step: a reduction along dims has no multi-tensor kernel (see module
    # docstring); each is a single bandwidth-bound pass writing into the flat buffer.
    for i, dims, w_out, g_out in zip(plan.unitwise, plan.reduce_dims, plan.w_views, plan.g_views):
        _norm_into(weights[i], dims, w_out)
        _norm_into(grads[i], dims, g_out)
    max_norm = plan.w_norms.clamp_min(eps).mul_(clip)
    clipped = plan.g_norms > max_norm
    ratio = max_norm.div_(plan.g_norms.clamp_min(GRAD_NORM_FLOOR))
    plan.scale.copy_(ratio.masked_fill_(~clipped, 1.0))
    torch._foreach_mul_(grads, list(plan.scale_views))

    clipped_f = clipped.float()
    per_param = torch.zeros(len(params), device=clipped.device).index_add_(
        0, plan.owner, clipped_f
    )
    sq_norm = plan.g_norms.square().sum()
    return sq_norm, clipped_f.sum(), per_param / plan.units, plan.units.sum()


def _agc_fused_body(
    weights: list[torch.Tensor], grads: list[torch.Tensor], clip: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clip written tensor by tensor for the compiler to fuse (plain eager code too)."""
    sq_norms, clipped_counts, units = [], [], []
    for w, g in zip(weights, grads):
        dims = tuple(range(1, w.dim())) if w.dim() > 1 else None
        w_norm = torch.linalg.vector_norm(w.float(), dim=dims, keepdim=True)
        g_norm = torch.linalg.vector_norm(g.float(), dim=dims, keepdim=True)
        max_norm = w_norm.clamp_min(eps) * clip
        clipped = g_norm > max_norm
        scale = torch.where(clipped, max_norm / g_norm.clamp_min(GRAD_NORM_FLOOR), 1.0)
        g.mul_(scale.to(g.dtype))
        sq_norms.append(g_norm.square().sum())
        clipped_counts.append(clipped.sum().float())
        units.append(float(w.shape[0]) if w.dim() > 1 else 1.0)
    counts = torch.stack(clipped_counts)
    unit_counts = torch.tensor(units, device=counts.device)
    return torch.stack(sq_norms).sum(), counts.sum(), counts / unit_counts, unit_counts.sum()


_FUSED_STATE: dict = {"compiled": None, "failed": False}


def fused_agc_available(device: torch.device) -> bool:
    """Whether the compiled AGC can run on ``device``: CUDA with Triton importable, and no
    earlier compile failure in this process."""
    return (
        device.type == "cuda"
        and not _FUSED_STATE["failed"]
        and importlib.util.find_spec("triton") is not None
    )


def _agc_device_fused(
    params: list[torch.Tensor], clip: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_agc_device`'s contract, computed by the compiled :func:`_agc_fused_body`."""
    if _FUSED_STATE["compiled"] is None:
        _FUSED_STATE["compiled"] = torch.compile(_agc_fused_body, dynamic=False)
    weights = [p.detach() for p in params]
    grads = [p.grad for p in params]
    return _FUSED_STATE["compiled"](weights, grads, clip, eps)


def _use_fused(device: torch.device, fused: bool | None) -> bool:
    if fused is None:
        fused = os.environ.get("SIGPROP_FUSED_AGC", "") == "1"
    return bool(fused) and fused_agc_available(device)


def _agc_device_auto(
    params: list[torch.Tensor], clip: float, eps: float, fused: bool | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_fused(params[0].device, fused):
        try:
            return _agc_device_fused(params, clip, eps)
        except Exception as err:  # a compiler failure must not stop training: eager is exact
            _FUSED_STATE["failed"] = True
            warnings.warn(f"fused AGC failed to compile ({type(err).__name__}: {err}); "
                          "using the eager path", stacklevel=3)
    return _agc_device(params, clip, eps)


def adaptive_clip_grad_(
    parameters: ParamsArg, clip: float, eps: float = AGC_EPS, fused: bool | None = None
) -> ClipStats:
    """Adaptive gradient clipping in place (see the module docstring for the formula).

    Args:
        parameters: tensors, or ``(name, tensor)`` pairs (names label the statistics);
            tensors without a gradient are skipped.
        clip: lambda, the largest allowed ratio ||G_i|| / max(||W_i||, eps).
        eps: floor on the weight norm, so zero-initialised units can still move.
        fused: the compiled path on CUDA (see the module docstring); None: only when the
            environment sets ``SIGPROP_FUSED_AGC=1``. Ignored (eager) off CUDA.

    Returns:
        :class:`ClipStats` (device tensors, no host sync); ``grad_norm`` covers these
        parameters only.
    """
    check_value("AGC threshold (clip)", clip, POSITIVE)
    names, params = _split_named(parameters)
    by_device: dict[torch.device, list[int]] = {}
    for k, p in enumerate(params):
        by_device.setdefault(p.device, []).append(k)
    if not params:
        zero = torch.zeros(())
        return ClipStats(zero, zero.clone(), torch.zeros(0), ())
    home = params[0].device
    sq_norm = torch.zeros((), device=home)
    clipped = torch.zeros((), device=home)
    units = torch.zeros((), device=home)
    fractions = torch.zeros(len(params), device=home)
    for idx in by_device.values():
        s, c, frac, u = _agc_device_auto([params[k] for k in idx], clip, eps, fused)
        sq_norm = sq_norm + s.to(home)
        clipped = clipped + c.to(home)
        units = units + u.to(home)
        fractions[idx] = frac.to(home)
    return ClipStats(sq_norm.sqrt(), clipped / units, fractions, tuple(names))


def _global_sq_norm(grads: list[torch.Tensor], home: torch.device) -> torch.Tensor:
    total = torch.zeros((), device=home)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for group in by_device.values():
        total = total + _whole_norms(group).square().sum().to(home)
    return total


def clip_grad_norm_(parameters: ParamsArg, max_norm: float) -> ClipStats:
    """Global-norm clipping in place: G <- G * min(1, max_norm / (||G|| + 1e-6)).

    Same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (2-norm), returning
    :class:`ClipStats` instead of the bare norm.
    """
    check_value("norm clipping threshold", max_norm, POSITIVE)
    names, params = _split_named(parameters)
    if not params:
        zero = torch.zeros(())
        return ClipStats(zero, zero.clone(), torch.zeros(0), ())
    grads = [p.grad for p in params]
    home = params[0].device
    total = _global_sq_norm(grads, home).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, group in by_device.items():
        torch._foreach_mul_(group, coef.to(device))
    clipped = (total > max_norm).float()
    return ClipStats(total, clipped, clipped.expand(len(params)).clone(), tuple(names))


def find_classifier(model: nn.Module) -> nn.Linear | None:
    """The final classifier: ``model.get_classifier()`` when it is an ``nn.Linear``, else the
    last ``nn.Linear`` in ``named_modules()``; None when the model has no linear layer."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Linear):
            return head
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last


def agc_parameters(
    model: nn.Module,
    exclude: Sequence[str] | None = None,
    clip_classifier: bool = False,
) -> list[tuple[str, nn.Parameter]]:
    """The named trainable parameters AGC should clip.

    By default everything except the final classifier's weight (paper B: "always better not to
    clip the final linear layer"); its bias and all gains are clipped. ``exclude`` adds
    fnmatch-style glob patterns on parameter names (e.g. ``"stem.*"``, ``"*.skip_gain"``);
    ``clip_classifier=True`` keeps the classifier weight in.
    """
    patterns = list(exclude or ())
    skip_ids: set[int] = set()
    if not clip_classifier:
        head = find_classifier(model)
        if head is not None:
            skip_ids.add(id(head.weight))
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad
        and id(p) not in skip_ids
        and not any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
    ]


@dataclass(frozen=True)
class ClipConfig:
    """How to clip gradients: ``mode`` "agc" (threshold = lambda), "norm" (threshold = max
    global norm) or "none" (threshold unused).

    ``exclude`` holds extra glob patterns of parameter names AGC leaves alone;
    ``clip_classifier`` makes AGC clip the final classifier weight too (off, as paper B).
    Checked when built (:func:`sigprop.fields.validate`); a float must be finite: inf would
    never clip, nan would clip everything to nan.
    """

    type_description = "a table of clip settings (mode, threshold, ...)"  # not a field

    mode: str = checked("none", one_of(CLIP_MODES))
    threshold: float | None = None
    eps: float = checked(AGC_EPS, POSITIVE)
    exclude: tuple[str, ...] | None = checked(None, says="a list of glob patterns")
    clip_classifier: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        validate(self, prefix="clip.")

    def check_together(self) -> str | None:
        """The threshold is required, and > 0, only for the modes that use it."""
        if self.mode not in THRESHOLD_MODES:
            return None
        if self.threshold is None:
            return f"clip.threshold is required for clip.mode {self.mode!r}: a number > 0"
        return None if POSITIVE.ok(self.threshold) else POSITIVE.message("clip.threshold",
                                                                         self.threshold)

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        """From a plain dict; unknown keys raise :class:`UserError` listing the valid ones."""
        check_table(d, "clip", says=f"a table of {', '.join(_CLIP_FIELDS)}")
        check_keys(d, _CLIP_FIELDS, prefix="clip.")
        return cls(**d)

    def to_dict(self) -> dict:
        """JSON-able, canonical: every field, ``exclude`` as a list or None."""
        out = dataclasses.asdict(self)
        out["exclude"] = None if self.exclude is None else list(self.exclude)
        return out

    def clipper(self, model: nn.Module) -> GradClipper:
        """Bind this config to ``model``: the parameter selection is made once."""
        return GradClipper(self, model)

    def apply(self, model: nn.Module) -> ClipStats:
        """Clip ``model``'s gradients in place now; see :class:`GradClipper`."""
        return self.clipper(model)()


_CLIP_FIELDS = tuple(f.name for f in dataclasses.fields(ClipConfig))


@dataclass
class GradClipper:
    """A :class:`ClipConfig` bound to a model's parameters; call it after ``backward()``.

    ``grad_norm`` in the returned statistics is the pre-clip global norm over ALL the model's
    trainable parameters, also those AGC leaves out (the classifier weight by default);
    ``names`` / ``param_fractions`` list the clipped ones.
    """

    config: ClipConfig
    model: nn.Module
    clipped: list[tuple[str, nn.Parameter]] = field(init=False)
    others: list[nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.config.mode == "agc":
            self.clipped = agc_parameters(
                self.model, self.config.exclude, self.config.clip_classifier
            )
        else:
            self.clipped = trainable
        chosen = {id(p) for _, p in self.clipped}
        self.others = [p for _, p in trainable if id(p) not in chosen]

    def __call__(self) -> ClipStats:
        mode = self.config.mode
        if mode == "norm":
            return clip_grad_norm_(self.clipped, float(self.config.threshold))
        if mode == "none":
            names, params = _split_named(self.clipped)
            if not params:
                zero = torch.zeros(())
                return ClipStats(zero, zero.clone(), torch.zeros(0), ())
            home = params[0].device
            total = _global_sq_norm([p.grad for p in params], home).sqrt()
            zero = torch.zeros((), device=home)
            return ClipStats(total, zero, torch.zeros(len(params), device=home), tuple(names))
        stats = adaptive_clip_grad_(self.clipped, float(self.config.threshold), self.config.eps)
        rest = [p.grad for p in self.others if p.grad is not None]
        if not rest:
            return stats
        home = stats.grad_norm.device
        total = (stats.grad_norm.square() + _global_sq_norm(rest, home)).sqrt()
        return dataclasses.replace(stats, grad_norm=total)
