"""The shared scaffolding of the bottleneck ResNet configs (sigprop.models.base.ResNetStages):
both families' configs check every field when built directly, not only through the registry,
and BN's own cross-field check runs before the shared stage check."""

import pytest

from sigprop.errors import UserError
from sigprop.models import BNResNetConfig, NFResNetConfig


@pytest.mark.parametrize("config", [NFResNetConfig, BNResNetConfig])
@pytest.mark.parametrize("field, value, message", [
    ("drop_rate", 1.0, "drop_rate must be in [0, 1), got 1.0"),
    ("stem", "tiny", "stem must be one of imagenet, cifar, got 'tiny'"),
    ("depths", (2, 0), "depths must be positive block counts per stage, got (2, 0)"),
])
def test_a_resnet_config_checks_its_fields_when_built(config, field, value, message):
    with pytest.raises(UserError) as err:
        config(**{field: value})
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("config", [NFResNetConfig, BNResNetConfig])
def test_a_resnet_config_checks_its_stages_together(config):
    with pytest.raises(UserError, match=r"^widths \(2 stages\) and depths \(4 stages\) differ$"):
        config(widths=(64, 128))


def test_bn_checks_its_ordering_before_the_stages():
    with pytest.raises(UserError, match="^order='act_bn_conv' is a pre-activation"):
        BNResNetConfig(version="v1", order="act_bn_conv", widths=(64, 128))
    assert BNResNetConfig(version="v2", order="act_bn_conv").order == "act_bn_conv"
