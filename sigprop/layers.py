"""Shared building blocks: gamma-scaled activations, scaled WS convs, SE, stochastic depth.

Scaled weight standardization and the gammas: paper A, Brock, De and Smith, "Characterizing
signal propagation to close the performance gap in unnormalized ResNets", ICLR 2021, arXiv
2101.08692. The NFNet blocks: paper B, Brock, De, Smith and Simonyan, "High-Performance
Large-Scale Image Recognition Without Normalization", ICML 2021, arXiv 2102.06171.

The maths follows the authors' JAX code (deepmind-research, nfnets/base.py); see
``shared/reference/nfnets-facts.md`` sections 1-3.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# gamma = 1/sqrt(Var(g(x))), x ~ N(0, 1): the authors' published sampling estimates.
GAMMA: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "celu": F.celu,
    "elu": F.elu,
    # the authors use JAX's default gelu, which is the tanh approximation
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "leaky_relu": F.leaky_relu,
    "log_sigmoid": F.logsigmoid,
    "relu": F.relu,
    "relu6": F.relu6,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "soft_sign": F.softsign,
    "softplus": F.softplus,
    "tanh": torch.tanh,
}


def estimate_gamma(
    fn: Callable[[torch.Tensor], torch.Tensor], samples: int = 1 << 22, seed: int = 0
) -> float:
    """1/sqrt(Var(fn(x))) for x ~ N(0, 1), estimated in float64 from ``samples`` draws."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, generator=gen, dtype=torch.float64)
    return float(1.0 / fn(x).var(unbiased=False).sqrt())


class ScaledActivation(nn.Module):
    """``fn(x) * gamma``: keeps the variance of a unit-Gaussian input at one."""

    def __init__(self, name: str, gamma: float | None = None):
        super().__init__()
        if name not in ACTIVATIONS:
            valid = ", ".join(sorted(ACTIVATIONS))
            raise ValueError(f"unknown activation {name!r}; valid: {valid}")
        self.name = name
        self.fn = ACTIVATIONS[name]
        self.gamma = GAMMA[name] if gamma is None else gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        return out if self.gamma == 1.0 else out * self.gamma

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma:.6g}"


def get_activation(name: str, scaled: bool = True) -> ScaledActivation:
    """The activation ``name``, multiplied by its gamma unless ``scaled`` is False."""
    return ScaledActivation(name, None if scaled else 1.0)


# ----------------------------------------------------------------------------- padding
# "same": TensorFlow / Haiku 'SAME' (the authors' code, timm's dm_nfnet_*): the output has
# ceil(size / stride) positions and the padding this needs is split with the smaller half
# before, so a stride-2 layer on an even size pads 0/1 (3x3) or 2/3 (7x7).
# "symmetric": PyTorch / timm style, kernel_size // 2 on both sides whatever the input size.
# The two coincide at stride 1 (odd kernels) and, for stride 2, at odd input sizes.
PADDING_MODES = ("same", "symmetric")


def check_padding(padding: str) -> str:
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {', '.join(PADDING_MODES)}; got {padding!r}")
    return padding


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TF 'SAME' along one axis of length ``size``."""
    span = (kernel_size - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _same_pads(x: torch.Tensor, kernel, stride, dilation) -> tuple[int, int, int, int] | None:
    """F.pad amounts (left, right, top, bottom) for 'SAME', or None when they are symmetric."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    if top == bottom and left == right:
        return None
    return left, right, top, bottom


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class PaddedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose padding is "same" (TF, dynamic for strided convs), "symmetric"
    (kernel_size // 2) or an explicit int. Only strided "same" convs pad per call, and only
    when the input size makes the padding asymmetric; otherwise the conv pads itself.
    :func:`apply_padding` switches a built model's convs between the two modes."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
        padding: int | str = "symmetric", groups: int = 1, bias: bool = True,
    ):
        mode = padding if isinstance(padding, str) else None
        static = kernel_size // 2 if mode is not None else padding
        if mode is not None:
            check_padding(mode)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, static, groups=groups, bias=bias
        )
        self.same_dynamic = False
        if mode is not None:
            self.set_padding(mode)

    def set_padding(self, mode: str) -> None:
        """TF SAME or symmetric; a conv built with another explicit padding keeps it."""
        check_padding(mode)
        symmetric = self.padding == tuple(k // 2 for k in self.kernel_size)
        needs_work = max(self.stride) > 1 or any(k % 2 == 0 for k in self.kernel_size)
        self.same_dynamic = mode == "same" and symmetric and needs_work

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias):
        if not self.same_dynamic:
            return super()._conv_forward(x, weight, bias)
        pads = _same_pads(x, self.kernel_size, self.stride, self.dilation)
        if pads is None:
            padding = tuple(
                same_padding(n, k, s, d)[0] for n, k, s, d in
                zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)
            )
        else:
            x, padding = F.pad(x, pads), (0, 0)
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)


class MaxPool2dPadded(nn.MaxPool2d):
    """Max pool with "same" (TF: asymmetric at even sizes, padded with -inf, so padding never
    wins) or "symmetric" (kernel_size // 2, PyTorch style) padding."""

    def __init__(self, kernel_size: int, stride: int, padding: str = "symmetric"):
        super().__init__(kernel_size, stride, kernel_size // 2)
        self.set_padding(padding)

    def set_padding(self, mode: str) -> None:
        self.same = check_padding(mode) == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same:
            return super().forward(x)
        kernel, stride = _pair(self.kernel_size), _pair(self.stride)
        pads = _same_pads(x, kernel, stride, (1, 1))
        if pads is None:
            padding = tuple(same_padding(n, k, s)[0]
                            for n, k, s in zip(x.shape[-2:], kernel, stride))
            return F.max_pool2d(x, kernel, stride, padding)
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), kernel, stride, 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", padding_mode=same" if self.same else "")


def apply_padding(model: nn.Module, mode: str) -> nn.Module:
    """Set every :class:`PaddedConv2d` (ScaledStdConv2d and the He-init convs included) and
    :class:`MaxPool2dPadded` of ``model`` to "same" or "symmetric"; returns ``model``. The
    families call this once at the end of construction, so the layers are built as usual."""
    check_padding(mode)
    for module in model.modules():
        if isinstance(module, (PaddedConv2d, MaxPool2dPadded)):
            module.set_padding(mode)
    return model


class _ScaledWeightStandardization(torch.autograd.Function):
    """W_hat = (W - mean) * rsqrt(max(var * fan_in, eps)) * gain, per output row.

    Forward: the row means, the centred rows d = W - mean (kept for the backward), their norms
    (var = ||d||^2 / fan_in: two passes, as stable as Welford, but on CPU ~5x faster than
    ``var_mean``, whose Welford kernel does not vectorize) and one multiply. Backward: ATen's
    fused batch-norm backward (one pass reducing sum(g) and sum(g * d), one writing the
    gradient), which is the exact gradient of this map where var * fan_in >= eps:

        dL/dgain = s * sum(g * d),   s = rsqrt(max(var * fan_in, eps)),  a = gain * s
        dL/dW    = a * (g - mean(g)) - gain * s^3 * sum(g * d) * d

    Where the floor is active the last term is absent (the max passes no gradient to var, as
    in the authors' JAX code) but batch norm's backward has it, so it is cancelled for those
    rows.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, gain: torch.Tensor, fan_in: int, eps: float):
        ctx.channels_last = _is_channels_last(weight)
        w = _rows(weight, ctx.channels_last)
        centred = w - w.mean(dim=1, keepdim=True)
        # corrected two-pass: the rounding error of the mean (it matters when |mean| >> std)
        # comes back as the centred rows' own mean and is taken out of the variance and, when
        # it exceeds 1e-6 std anywhere (checked on the host only where that is free), the rows
        residual = centred.mean(dim=1)
        var_n = torch.linalg.vector_norm(centred, dim=1).square() - fan_in * residual.square()
        var_n = var_n.clamp_min(0.0)  # var * fan_in
        if (centred.device.type != "cpu" or torch.compiler.is_compiling()
                or bool((residual.square() * fan_in > 1e-12 * var_n).any())):
            centred.sub_(residual.unsqueeze(1))
        scale = torch.rsqrt(torch.clamp(var_n, min=eps))
        out = centred * (scale * gain).unsqueeze(1)
        ctx.save_for_backward(centred, gain, scale, var_n < eps)
        return _unrows(out, weight.shape, ctx.channels_last)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        centred, gain, scale, floored = ctx.saved_tensors
        fan_in = centred.shape[1]
        root = math.sqrt(fan_in)
        bn_weight = gain / root
        invstd = scale * root
        grad = _rows(grad_out, ctx.channels_last).contiguous()
        # ATen's batch-norm backward on the centred rows (mean 0) with inverse std
        # rsqrt(max(var, eps / fan_in)) and affine weight gain / sqrt(fan_in): the same output
        # as the forward, so this is the exact gradient where the floor is inactive
        grad_w, grad_bn_weight, _ = torch.ops.aten.native_batch_norm_backward(
            grad.unsqueeze(0), centred.unsqueeze(0), bn_weight, None, None,
            torch.zeros_like(scale), invstd, True, 0.0, [ctx.needs_input_grad[0], True, False],
        )
        grad_gain = grad_bn_weight / root
        if grad_w is None:
            return None, grad_gain, None, None
        grad_w = grad_w.squeeze(0)
        # floored rows: batch norm's x_hat * mean(g * x_hat) term is not in the true gradient;
        # a host check is free on CPU, elsewhere the masked correction avoids a sync
        if (centred.device.type != "cpu" or torch.compiler.is_compiling()
                or bool(floored.any())):
            coef = torch.where(floored, invstd.square() * bn_weight * grad_bn_weight / fan_in, 0.0)
            grad_w.addcmul_(centred, coef.unsqueeze(1))
        return _unrows(grad_w, grad_out.shape, ctx.channels_last), grad_gain, None, None


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last
    )


def _rows(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` as (out, fan_in) rows, in (h, w, in) order for a channels-last weight so that no
    copy is needed (per-row statistics do not care about the order)."""
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


def _unrows(rows: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """Rows from :func:`_rows` back in the weight's shape and memory layout."""
    if channels_last:
        o, i, h, w = shape
        return rows.view(o, h, w, i).permute(0, 3, 1, 2)
    return rows.view(shape)


def scaled_weight_standardization(
    weight: torch.Tensor, gain: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """The authors' scaled WS in float32: ``(W - mean) * rsqrt(max(var * fan_in, eps)) * gain``
    per output channel (biased variance), with a fused forward and backward."""
    fan_in = weight[0].numel()
    return _ScaledWeightStandardization.apply(weight.float(), gain.float(), fan_in, eps)


class ScaledStdConv2d(PaddedConv2d):
    """Conv2d with scaled weight standardization and an affine gain, as the authors' WSConv2D.

    W_hat = gain * gamma * (W - mean) * rsqrt(max(var * fan_in, eps)), per output channel,
    biased variance, computed in float32 whatever the input dtype (one fused kernel each way,
    :func:`scaled_weight_standardization`). ``gamma`` (default 1) is a fixed scale folded into
    the weight: the preceding activation's gamma when the model moves it here (timm's layout,
    same maths). Outside training, with no gradient to record, the standardized weight is
    cached until the weight or gain changes (their version counters move on every in-place
    update: optimizer steps, ``load_state_dict``, ``copy_``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        bias: bool = True,
        eps: float = 1e-4,
        gamma: float = 1.0,
    ):
        padding = kernel_size // 2 if padding is None else padding
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        )
        self.gain = nn.Parameter(torch.ones(out_channels, device=self.weight.device))
        self.eps = eps
        self.gamma = gamma
        self.fan_in = self.weight[0].numel()
        self._cache: tuple[tuple, torch.Tensor] | None = None
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.fan_in))
        if bias:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        device = self.weight.device.type
        # float32 statistics even under autocast (meta tensors have no autocast)
        no_autocast = (
            torch.autocast(device, enabled=False) if device in ("cpu", "cuda")
            else contextlib.nullcontext()
        )
        with no_autocast:
            if device == "meta":
                w = self.weight.float()
                var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
                scale = torch.rsqrt(torch.clamp(var * self.fan_in, min=self.eps))
                return (w - mean) * (scale * self.gain.float().view(-1, 1, 1, 1))
            gain = self.gain if self.gamma == 1.0 else self.gain * self.gamma
            return scaled_weight_standardization(self.weight, gain, self.eps)

    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        records_grad = torch.is_grad_enabled() and (
            self.weight.requires_grad or self.gain.requires_grad
        )
        if self.training or records_grad or self.weight.is_meta:
            self._cache = None
            return self.standardized_weight().to(dtype)
        key = (
            dtype, self.weight.device, self.weight.data_ptr(), self.weight._version,
            self.gain.data_ptr(), self.gain._version, self.gamma, self.eps,
        )
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.standardized_weight().to(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight_for(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, weight, bias)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.gamma == 1.0 else f"{text}, gamma={self.gamma:.6g}"


def he_conv2d(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
    bias: bool = True, gain: float = math.sqrt(2.0),
) -> nn.Conv2d:
    """Plain conv with fan-in normal init, std gain/sqrt(fan_in): He (gain sqrt(2), the
    default) for the unstandardized control; gain 1 where no ReLU precedes the conv."""
    conv = PaddedConv2d(
        in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias
    )
    nn.init.normal_(conv.weight, 0.0, gain / math.sqrt(conv.weight[0].numel()))
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite: x * scale * sigmoid(fc1(relu(fc0(mean_hw(x))))).

    The NF papers use scale 2 so the gated branch keeps unit variance at init (the sigmoid
    sits near 0.5).
    """

    def __init__(
        self, in_channels: int, out_channels: int, se_ratio: float = 0.5, scale: float = 2.0
    ):
        super().__init__()
        hidden = max(1, int(in_channels * se_ratio))
        self.fc0 = nn.Linear(in_channels, hidden)
        self.fc1 = nn.Linear(hidden, out_channels)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.mean(dim=(2, 3))
        h = torch.sigmoid(self.fc1(F.relu(self.fc0(h))))
        return x * (self.scale * h[:, :, None, None])


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per example with probability ``rate`` in training.

    The authors do not rescale by 1/keep; timm does (``scale_by_keep=True``).
    """

    def __init__(self, rate: float = 0.0, scale_by_keep: bool = False):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        mask = mask.bernoulli_(keep)
        if self.scale_by_keep:
            mask = mask / keep
        return x * mask

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4g}, scale_by_keep={self.scale_by_keep}"
