"""Dependencies point one way: ablations uses sigprop, reports reads what ablations stored,
and neither library package imports the command line or the report layer. Inside ablations the
modules form layers, and a module imports only from the layers below its own."""

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the command line: run_ablations and the top-level modules it is split into
CLI = {"run_ablations", "cli_console", "cli_parser", "cli_measure"}
FORBIDDEN = {
    "sigprop": {"ablations", "reports", *CLI},
    "ablations": {"reports", *CLI},
}
# The modules of ablations, bottom up. A module may import modules of lower layers only, not
# of its own (a layer's modules are independent of each other) and not of higher ones. Every
# module must be placed here: a new one is put where its imports say it belongs.
LAYERS = [
    # leaves: no import from ablations; the command line's --help reads constants and shipped
    {"constants", "errors", "recipe", "shipped"},
    # dotted keys and applied settings, --set parsing, the [frontier] section's schema; one
    # stored file read or written safely; what a run ran under; chance accuracy
    {"keys", "overrides", "frontier_schema", "storefiles", "environment", "chance"},
    {"gridstore"},  # a grid's folder: run directories, statuses, locks
    # a store read into frames. Claims sit below spec: a spec checks its [[claims]] when it is
    # loaded and expanded, and claims read only frames (the store's columns), never a spec
    {"results", "claims"},
    {"store"},  # the store's public names, re-exported from the modules below
    {"spec"},
    # the frontier's search over lattice indices (no store), beside the trackers and the
    # console (progress lines, the dry-run and status tables), which reads the store only
    {"tracking", "frontier_search", "progress"},
    # the frontier's cells, outcome and frontier.parquet, which both of its methods share
    {"worker", "frontier_cells"},
    {"ray_executor"},  # re-exported by executors, so below it
    {"executors"},
    {"runner"},  # runs a grid; re-exports progress
    {"range_test"},  # the frontier by range test
    {"frontier"},  # the frontier by search over a store; re-exports the three modules above
    {"__init__"},  # the package's lazy exports: above everything it exports
]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_packages_import_neither_the_cli_nor_the_report_layer(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in files
    }
    assert {path: names for path, names in offenders.items() if names} == {}


# ----------------------------------------------------------------------------- layers

def ablations_sources() -> dict[str, str]:
    """Module name (``store``, ``__init__``) -> source, for every module of ablations; a
    subpackage (``claims``) is one module, its files' sources joined (without their
    ``from __future__`` lines, which may only open a file)."""
    sources = {path.stem: path.read_text() for path in sorted((ROOT / "ablations").glob("*.py"))}
    for package in sorted(p.parent for p in (ROOT / "ablations").glob("*/__init__.py")):
        sources[package.name] = "\n".join(
            path.read_text().replace("from __future__ import annotations", "")
            for path in sorted(package.rglob("*.py")))
    return sources


def internal_imports(source: str, modules: set[str]) -> set[str]:
    """The modules of ablations that ``source`` imports anywhere: at the top, inside
    functions and classes, relative or absolute, ``from ablations import x`` included."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the package
                base = f"ablations.{node.module}" if node.module else "ablations"
            elif node.module and (node.module == "ablations"
                                  or node.module.startswith("ablations.")):
                base = node.module
            else:
                continue
            names = [base] if base != "ablations" else \
                [f"ablations.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "ablations" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def layer_violations(sources: dict[str, str], layers: list[set[str]] = LAYERS) -> list[str]:
    """One line per import that goes sideways or up, and per module no layer holds."""
    level = {module: i for i, layer in enumerate(layers) for module in layer}
    out = [f"{module}: in no layer of LAYERS" for module in sorted(set(sources) - set(level))]
    for module, source in sorted(sources.items()):
        if module not in level:
            continue
        for imported in sorted(internal_imports(source, set(sources))):
            if imported != module and level.get(imported, -1) >= level[module]:
                where = "its own layer" if level[imported] == level[module] else "a higher layer"
                out.append(f"{module} (layer {level[module]}) imports {imported} ({where}, "
                           f"layer {level[imported]})")
    return out


def test_ablations_modules_import_only_from_lower_layers():
    sources = ablations_sources()
    assert {"spec", "store", "runner", "frontier", "keys", "constants", "claims"} <= set(sources)
    assert layer_violations(sources) == []
    assert [m for m in sorted(set().union(*LAYERS)) if m not in sources] == []  # no stale name


@pytest.mark.parametrize("module, injected, imported", [
    ("store", "def f():\n    from ablations.frontier import run_frontier\n", "frontier"),
    ("keys", "from . import spec\n", "spec"),
    ("constants", "from ablations import store as _store\n", "store"),
    ("spec", "class C:\n    import ablations.runner\n", "runner"),
    ("keys", "from ablations.overrides import parse_value\n", "overrides"),  # same layer
])
def test_an_injected_back_import_fails_the_layer_check(module, injected, imported):
    sources = ablations_sources()
    sources[module] += "\n" + injected
    found = layer_violations(sources)
    assert len(found) == 1 and found[0].startswith(f"{module} (layer ")
    assert f" imports {imported} (" in found[0]


def test_a_module_outside_every_layer_fails_the_layer_check():
    sources = {**ablations_sources(), "newcomer": "from ablations.keys import flatten\n"}
    assert layer_violations(sources) == ["newcomer: in no layer of LAYERS"]


LAZY = re.compile(r"#\s*lazy:\s*\S")


def test_imports_inside_functions_say_why_they_are_lazy():
    # imports belong at the top; the ones kept inside functions (torch, the optional extras)
    # keep `import ablations.*` light and say so with a `# lazy: <why>` on their first line
    unmarked = []
    for module, source in ablations_sources().items():
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom) \
                        and not LAZY.search(lines[inner.lineno - 1]):
                    unmarked.append(f"ablations/{module}.py:{inner.lineno}")
    assert sorted(set(unmarked)) == []


def test_importing_every_ablations_module_loads_no_torch():
    # what the lazy imports are for: `status`, the report and the CLI's light paths read the
    # store without starting torch
    modules = sorted(m for m in ablations_sources() if m != "__init__")
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(f"ablations.{{name}}")
        import ablations.constants, ablations.shipped, ablations.overrides
        print(sorted(m for m in ("torch",) if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- constants

def module_level_definitions(name: str) -> list[str]:
    """The source files of the three packages that assign ``name`` at module level."""
    out = []
    for package in ("sigprop", "ablations", "reports"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, ast.AnnAssign) else []
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    out.append(str(path.relative_to(ROOT)))
    return out


@pytest.mark.parametrize("name, home", [
    ("FINISHED", "ablations/constants.py"),
    ("SEARCHED", "ablations/constants.py"),
    ("STATES", "ablations/constants.py"),
    ("MALLOC_ENV", "ablations/constants.py"),
    ("MAX_RUNS", "ablations/constants.py"),
    ("LENGTH_KEYS", "ablations/constants.py"),
    ("THRESHOLD_MODES", "sigprop/constants.py"),
    ("GAIN_PREFIX", "sigprop/constants.py"),
])
def test_each_shared_constant_is_defined_once(name, home):
    found = module_level_definitions(name)
    if name == "MAX_RUNS":  # reports/figures/spp.py's MAX_RUNS is another limit (plot runs)
        found = [path for path in found if not path.startswith("reports/")]
    assert found == [home]


def test_the_makefile_reads_the_allocator_settings_from_the_constants_module():
    from ablations.constants import MALLOC_ENV

    if shutil.which("make") is None or shutil.which("python3") is None:
        pytest.skip("needs make and python3")
    keys = sorted(MALLOC_ENV)
    show = "show-malloc: ; @echo " + " ".join(f'"$${key}"' for key in keys)
    env = {key: value for key, value in os.environ.items() if key not in keys}
    out = subprocess.run(["make", "--no-print-directory", "-s", f"--eval={show}",
                          "show-malloc"], cwd=ROOT, capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.split() == [MALLOC_ENV[key] for key in keys]


# ----------------------------------------------------------------------------- public API

def test_ablations_exports_its_entry_points_and_an_executor_protocol():
    import ablations
    from ablations.claims import evaluate_claims
    from ablations.executors import Executor, LocalExecutor, RayExecutor
    from ablations.frontier import run_frontier
    from ablations.runner import run_grid
    from ablations.store import load_results

    for name, obj in [("run_grid", run_grid), ("run_frontier", run_frontier),
                      ("load_results", load_results), ("LocalExecutor", LocalExecutor),
                      ("RayExecutor", RayExecutor), ("Executor", Executor),
                      ("evaluate_claims", evaluate_claims)]:
        assert name in ablations.__all__ and getattr(ablations, name) is obj
    assert issubclass(LocalExecutor, Executor) and issubclass(RayExecutor, Executor)

    class NoRun:  # what a test's own executor must not forget
        def slots(self) -> list[str]:
            return ["cpu"]

        def describe(self) -> str:
            return "nowhere"

    assert not issubclass(NoRun, Executor)
