"""The small helpers several packages share: lazy package exports and the benchmarks' parser."""

import types

import pytest

from benchmarks.timing import THREADS_HELP, timing_parser
from sigprop.lazy import lazy_getattr


def test_lazy_getattr_imports_absolute_and_relative_modules_on_first_use():
    getattr_ = lazy_getattr("sigprop", {"UserError": "sigprop.errors", "ModelError": ".models"})
    from sigprop.errors import UserError
    from sigprop.models import ModelError

    assert getattr_("UserError") is UserError
    assert getattr_("ModelError") is ModelError
    with pytest.raises(AttributeError, match=r"^module 'sigprop' has no attribute 'nothing'$"):
        getattr_("nothing")


def test_lazy_getattr_serves_as_a_module_getattr():
    module = types.ModuleType("lazy_example")
    module.__getattr__ = lazy_getattr("lazy_example", {"UserError": "sigprop.errors"})
    from sigprop.errors import UserError

    assert module.UserError is UserError
    with pytest.raises(AttributeError, match="'lazy_example' has no attribute 'other'"):
        module.other  # noqa: B018


def test_timing_parser_has_the_interleaved_rounds_options():
    parser = timing_parser("Title line.\n\nMore text.", rounds=5, warmup=2, threads=0)
    assert parser.description == "Title line."
    args = parser.parse_args([])
    assert vars(args) == {"rounds": 5, "warmup": 2, "threads": 0, "seed": 0}
    assert THREADS_HELP in parser.format_help()

    blocks = timing_parser("T", rounds=9, warmup=1, threads=2, block=4, block_help="steps")
    assert vars(blocks.parse_args(["--block", "3", "--seed", "7"])) == {
        "rounds": 9, "block": 3, "warmup": 1, "threads": 2, "seed": 7}
