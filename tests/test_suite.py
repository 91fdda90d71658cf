"""The test suite itself: one copy of each shared helper, no import of the project's own code
that could turn into a skip, and a fast lane that ``make test`` does not narrow."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests import conftest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PROJECT = ("sigprop", "ablations", "reports", "run_ablations", "cli_console", "cli_parser",
           "cli_measure", "benchmarks")
SHARED = {"InlineExecutor", "start_runner", "wait_for", "kill_9", "run_inline", "tiny_spec",
          "store_finished_grid", "run_dirs"}


def suite_files() -> list[Path]:
    return sorted(TESTS.glob("test_*.py"))


def test_the_shared_helpers_are_defined_once_in_helpers_py():
    top_level = re.compile(rf"^(?:def|class) ({'|'.join(SHARED)})\b", re.M)
    defined = {path.name: set(top_level.findall(path.read_text()))
               for path in [TESTS / "helpers.py", *suite_files()]}
    assert SHARED <= defined["helpers.py"]
    copies = {name: sorted(SHARED & names) for name, names in defined.items()
              if name != "helpers.py" and SHARED & names}
    assert copies == {}, f"define these in tests/helpers.py and import them: {copies}"


def test_no_test_skips_when_the_projects_own_code_fails_to_import():
    # pytest.importorskip("sigprop.probes") turns an import bug in the project into a skip
    found = []
    for path in suite_files():
        text = path.read_text()
        if "importorskip" not in text:
            continue
        for call in ast.walk(ast.parse(text)):
            if (isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "importorskip"
                    and call.args and isinstance(call.args[0], ast.Constant)
                    and str(call.args[0].value).split(".")[0] in PROJECT):
                found.append(f"{path.name}:{call.lineno} {call.args[0].value}")
    assert found == []


def make_target(name: str) -> list[str]:
    """The recipe lines of ``make NAME`` in the Makefile."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(rf"{name}:", line)]
    assert len(starts) == 1, f"the Makefile has no target {name}"
    recipe = []
    for line in lines[starts[0] + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_test_runs_every_test_and_make_test_fast_leaves_out_the_slow_ones():
    (full,) = [line.split("-m pytest")[1] for line in make_target("test") if "pytest" in line]
    assert " -m " not in full and " -k " not in full and full.endswith(" tests")
    (fast,) = [line.split("-m pytest")[1] for line in make_target("test-fast")
               if "pytest" in line]
    assert ' -m "not slow" ' in fast and fast.endswith(" tests")


class Item:
    """What pytest_collection_modifyitems reads and writes of a collected test."""

    def __init__(self, *markers: str):
        self.markers = list(markers)

    def get_closest_marker(self, name: str):
        return name if name in self.markers else None

    def add_marker(self, marker) -> None:
        self.markers.append(marker.name)


def test_ray_tests_run_one_at_a_time_and_only_in_the_full_lane():
    ray, plain = Item("ray"), Item()
    conftest.pytest_collection_modifyitems(None, [ray, plain])
    assert set(ray.markers) == {"ray", "xdist_group", "slow"} and plain.markers == []
