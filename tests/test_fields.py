"""The one validation mechanism (sigprop.fields): each rule kind rejects a bad value with one
line naming the field, unknown keys get a did-you-mean, bools are never numbers, floats are
finite, and every config class declares its constraints through it."""

import inspect
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import ablations.claims.base
import ablations.claims.checks
import ablations.claims.registry
import ablations.claims.rules
import ablations.frontier_schema
import ablations.spec
import sigprop.clipping
import sigprop.models.base
import sigprop.models.bn_resnet
import sigprop.models.nf_resnet
import sigprop.models.nfnet
import sigprop.train_config
from ablations.errors import SpecError
from ablations.frontier_schema import FrontierSettings
from sigprop import fields
from sigprop.clipping import ClipConfig
from sigprop.errors import UserError
from sigprop.fields import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    REQUIRED,
    Rule,
    at_most,
    check_keys,
    check_value,
    checked,
    in_range,
    one_of,
    validate,
)
from sigprop.models import BNResNetConfig, NFNetConfig, NFResNetConfig
from sigprop.train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Example:
    """Every rule kind, once."""

    size: int = checked(8, POSITIVE)
    decay: float = checked(0.0, NON_NEGATIVE)
    fraction: float = checked(0.5, FRACTION)
    ratio: float = checked(0.5, in_range(0, 1))
    cap: float = checked(1.0, at_most(2))
    mode: str = checked("fast", one_of(("fast", "slow")))
    limit: int | None = checked(None, POSITIVE)
    flag: bool = False
    span: tuple[int, ...] = (1, 2)
    first: int = 0
    last: int = 1

    def __post_init__(self) -> None:
        validate(self, prefix="ex.")

    def check_together(self) -> str | None:
        return "ex: first must be below last" if self.first >= self.last else None


def one_line_naming(err: pytest.ExceptionInfo, name: str) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"ex.{name}"), message
    return message


@pytest.mark.parametrize("name, bad, says", [
    ("size", 0, "ex.size must be > 0, got 0"),
    ("decay", -1e-3, "ex.decay must be >= 0, got -0.001"),
    ("fraction", 1.0, "ex.fraction must be in [0, 1), got 1.0"),
    ("ratio", 1.5, "ex.ratio must be in [0, 1], got 1.5"),
    ("cap", 3, "ex.cap must be <= 2, got 3.0"),
    ("mode", "fats", "ex.mode must be one of fast, slow, got 'fats' (did you mean 'fast'?)"),
    ("limit", 0, "ex.limit must be > 0 (or unset), got 0"),
    ("flag", 1, "ex.flag must be true/false, got 1"),
    ("span", [1, "x"], "ex.span must be a list of integers, got [1, 'x']"),
])
def test_each_rule_kind_rejects_a_bad_value_in_one_line_naming_the_field(name, bad, says):
    with pytest.raises(UserError) as err:
        Example(**{name: bad})
    assert one_line_naming(err, name) == says


def test_good_values_are_normalized_and_unset_optional_fields_pass_their_rules():
    example = Example(decay=1, span=[3, 4], limit=None)
    assert example.decay == 1.0 and isinstance(example.decay, float)
    assert example.span == (3, 4)


def test_cross_field_checks_fail_through_the_same_path():
    with pytest.raises(UserError, match=r"^ex: first must be below last$"):
        Example(first=2, last=1)


def test_the_caller_chooses_the_error_class():
    with pytest.raises(SpecError, match=r"^frontier\.steps must be a positive integer"):
        FrontierSettings(0.1, 1.0, steps=0)
    with pytest.raises(SpecError, match=r"^q must be > 0, got -1$"):
        check_value("q", -1, POSITIVE, error=SpecError)


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_never_a_number(value):
    for name in ("size", "decay", "limit"):
        with pytest.raises(UserError, match=rf"^ex\.{name} must be "):
            Example(**{name: value})
    with pytest.raises(UserError, match="batch_size must be an integer"):
        TrainConfig(batch_size=value)
    with pytest.raises(UserError, match=r"clip\.eps must be a number"):
        ClipConfig(eps=value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_inf_and_nan_are_rejected_for_floats(value):
    with pytest.raises(UserError, match=r"^ex\.decay must be a finite number"):
        Example(decay=value)
    with pytest.raises(SpecError, match=r"^frontier\.lr_max must be a finite number"):
        FrontierSettings(0.1, value)


def test_unknown_keys_name_the_key_and_suggest_the_closest():
    with pytest.raises(UserError) as err:
        check_keys({"mdoe": 1, "size": 2}, ["size", "mode"], where="ex: ")
    assert str(err.value) == "ex: unknown key(s) mdoe (did you mean 'mode'?); valid: size, mode"
    with pytest.raises(UserError, match=r"^unknown key\(s\) clip\.lamda \(did you mean "
                                        r"'lambda'\?\); valid: clip\.lambda$"):
        check_keys({"lamda": 1}, ["lambda"], prefix="clip.")
    with pytest.raises(SpecError, match=r"did you mean 'threshold'\?"):
        ablations.spec.check_keys(
            ablations.spec.spec_from_dict({"base": {}, "grid": {"clip.treshold": [0.1]}}))
    check_keys({"size": 1}, ["size"])  # nothing unknown: no error


def test_a_required_field_without_default_is_required():
    @dataclass
    class Needs:
        low: float = checked(REQUIRED, POSITIVE)

    assert fields.required_fields(Needs) == ["low"]
    with pytest.raises(TypeError):
        Needs()  # type: ignore[call-arg]


CONFIGS = [TrainConfig, ClipConfig, NFResNetConfig, NFNetConfig, BNResNetConfig, FrontierSettings]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_declares_its_constraints_through_the_mechanism(cls):
    rules = fields.field_rules(cls)
    assert rules, f"{cls.__name__} declares no rules"
    assert all(isinstance(r, Rule) for rs in rules.values() for r in rs)
    source = inspect.getsource(cls.__post_init__)
    assert "validate(self" in source or "self.validate()" in source


def test_the_rules_are_where_the_configs_declare_them():
    assert set(fields.field_rules(TrainConfig)) >= {
        "batch_size", "lr", "momentum", "weight_decay", "ema_decay", "seed", "device",
        "schedule", "data", "augment"}
    assert set(fields.field_rules(ClipConfig)) == {"mode", "eps"}
    assert set(fields.field_rules(NFNetConfig)) >= {"variant", "depth_mult", "width_mult",
                                                   "padding", "activation", "stem"}


HAND_WRITTEN = re.compile(
    r"must be (> 0|>= 0|in \[0, 1\)|a positive (number|integer)|one of)[^\n]*\{")
VALIDATED_MODULES = [
    sigprop.train_config, sigprop.clipping, sigprop.models.base, sigprop.models.nf_resnet,
    sigprop.models.nfnet, sigprop.models.bn_resnet, ablations.frontier_schema, ablations.spec,
    ablations.claims.base, ablations.claims.rules, ablations.claims.checks,
    ablations.claims.registry,
]


@pytest.mark.parametrize("module", VALIDATED_MODULES, ids=lambda m: m.__name__)
def test_no_hand_written_field_checks_remain(module):
    """Range and choice messages come from the mechanism's rules, not from f-strings."""
    source = inspect.getsource(module)
    assert not HAND_WRITTEN.findall(source), module.__name__
    assert "_require_number" not in source and "check_config(" not in source


def test_the_mechanism_is_torch_free_and_light():
    code = "import sys, sigprop.fields; print(sorted(m for m in sys.modules if m in BANNED))"
    banned = "BANNED = {'torch', 'numpy', 'pandas', 'pydantic'}; "
    out = subprocess.run([sys.executable, "-c", banned + code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"
