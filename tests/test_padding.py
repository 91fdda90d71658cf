"""TF 'SAME' padding (the authors' code) against explicit F.pad references, and the models'
``padding`` option (facts file section 8: sigprop differed from the authors at even sizes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sigprop.layers import (
    MaxPool2dPadded,
    PaddedConv2d,
    ScaledStdConv2d,
    apply_padding,
    he_conv2d,
    same_padding,
)
from sigprop.models import count_parameters, create_model

# (size, kernel, stride) -> the authors' (before, after): 0/1 for a strided 3x3 and 2/3 for the
# strided 7x7 stem at even sizes, symmetric at odd sizes and at stride 1.
TF_SAME = {
    (8, 3, 2): (0, 1), (9, 3, 2): (1, 1), (128, 7, 2): (2, 3), (129, 7, 2): (3, 3),
    (8, 3, 1): (1, 1), (8, 1, 2): (0, 0), (9, 1, 2): (0, 0), (7, 7, 2): (3, 3), (64, 3, 2): (0, 1),
}


@pytest.mark.parametrize("case, want", TF_SAME.items())
def test_same_padding_amounts(case, want):
    assert same_padding(*case) == want


def reference_conv(x, conv, weight, size_pads):
    """The conv on an explicitly padded input: pads (before, after) for height and width."""
    (top, bottom), (left, right) = size_pads
    padded = F.pad(x, (left, right, top, bottom))
    return F.conv2d(padded, weight, conv.bias, conv.stride, 0, 1, conv.groups)


@pytest.mark.parametrize("size", [8, 9, 16, 17])
@pytest.mark.parametrize("kernel, stride", [(3, 2), (7, 2), (3, 1), (1, 2)])
def test_same_conv_equals_explicit_pad_reference(size, kernel, stride):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size + 1)  # non-square: height and width pad independently
    conv = ScaledStdConv2d(3, 4, kernel, stride, padding="same")
    with torch.no_grad():
        conv.bias.normal_()
    pads = [TF_SAME.get((n, kernel, stride), same_padding(n, kernel, stride))
            for n in x.shape[-2:]]
    want = reference_conv(x, conv, conv.standardized_weight(), pads)
    got = conv(x)
    assert got.shape[-2:] == tuple(math.ceil(n / stride) for n in x.shape[-2:])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    plain = apply_padding(he_conv2d(3, 4, kernel, stride), "same")  # as the families do
    torch.testing.assert_close(plain(x), reference_conv(x, plain, plain.weight, pads),
                               rtol=0, atol=1e-6)


def test_symmetric_and_same_differ_only_where_the_padding_is_asymmetric():
    torch.manual_seed(0)
    same = PaddedConv2d(3, 4, 3, 2, padding="same")
    symmetric = PaddedConv2d(3, 4, 3, 2, padding="symmetric")
    symmetric.load_state_dict(same.state_dict())
    odd, even = torch.randn(2, 3, 9, 9), torch.randn(2, 3, 8, 8)
    assert torch.equal(same(odd), symmetric(odd))
    assert same(even).shape == symmetric(even).shape
    assert not torch.allclose(same(even), symmetric(even))
    # symmetric is the 1/1 reference, same the 0/1 one
    torch.testing.assert_close(symmetric(even), reference_conv(even, same, same.weight,
                                                               [(1, 1), (1, 1)]))
    # stride 1: "same" is the static kernel_size // 2 padding, no per-call work
    assert not PaddedConv2d(3, 4, 3, 1, padding="same").same_dynamic
    assert PaddedConv2d(3, 4, 3, 2, padding="same").same_dynamic
    # a conv built with its own explicit padding keeps it whatever the model's mode
    assert not apply_padding(PaddedConv2d(3, 4, 3, 2, padding=0), "same").same_dynamic
    assert not apply_padding(PaddedConv2d(3, 4, 3, 2, padding="same"), "symmetric").same_dynamic


@pytest.mark.parametrize("size", [8, 9, 32, 33])
def test_same_max_pool_equals_minus_inf_pad_reference(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size) - 5.0  # all negative: a zero pad would win the max
    before, after = TF_SAME.get((size, 3, 2), same_padding(size, 3, 2))
    want = F.max_pool2d(F.pad(x, (before, after, before, after), value=-math.inf), 3, 2)
    got = MaxPool2dPadded(3, 2, "same")(x)
    assert torch.equal(got, want)
    symmetric = MaxPool2dPadded(3, 2, "symmetric")(x)
    assert torch.equal(symmetric, F.max_pool2d(x, 3, 2, 1))
    if size % 2:
        assert torch.equal(got, symmetric)
    else:
        assert not torch.equal(got, symmetric)


def test_bad_padding_value_is_rejected():
    with pytest.raises(ValueError, match="padding must be one of same, symmetric"):
        PaddedConv2d(3, 4, 3, 2, padding="valid")
    with pytest.raises(ValueError, match="padding must be one of"):
        MaxPool2dPadded(3, 2, "SAME")


FAMILIES = [
    ("nf_resnet26", {"skipinit_gain": 1.0}),
    ("nfnet_f0", {"skipinit_gain": 1.0, "depths": (1, 1, 1, 1)}),
    ("bn_resnet26_v2", {}),
    ("bn_resnet26_v1", {}),
]


@pytest.mark.parametrize("name, extra", FAMILIES)
def test_padding_modes_agree_exactly_at_odd_sizes_and_not_at_even(name, extra):
    torch.manual_seed(0)
    kwargs = {"width_mult": 0.125, "num_classes": 10, **extra}
    same = create_model(name, **kwargs).eval()
    symmetric = create_model(name, padding="symmetric", **kwargs).eval()
    symmetric.load_state_dict(same.state_dict())  # the same parameter layout in both modes
    with torch.no_grad():
        odd = torch.randn(2, 3, 65, 65)
        assert torch.equal(same(odd), symmetric(odd))
        even = torch.randn(2, 3, 64, 64)
        assert not torch.allclose(same.forward_features(even), symmetric.forward_features(even))


def test_nf_resnet_stem_bias_is_the_only_parameter_change():
    # 25,556,984 before the stem bias; the authors' WSConv2D and timm's ScaledStdConv2d have a
    # bias on every conv, so the layout (and the count, 25.56M as published) gains 64.
    assert count_parameters("nf_resnet50") == 25_556_984 + 64
    assert count_parameters("nf_resnet50", padding="symmetric") == 25_556_984 + 64
    model = create_model("nf_resnet50", width_mult=0.25)
    assert model.stem.conv.bias is not None and torch.count_nonzero(model.stem.conv.bias) == 0
    assert count_parameters("nfnet_f0") == 71_489_284  # unchanged: its stem always had biases


def test_bad_padding_option_names_the_choices():
    from sigprop.models.registry import ModelError

    for name in ("nf_resnet26", "nfnet_f0", "bn_resnet26_v2"):
        with pytest.raises(ModelError, match="padding must be one of same, symmetric"):
            create_model(name, padding="valid")
