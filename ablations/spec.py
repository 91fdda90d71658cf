"""Grid specs: a TOML file with a base run configuration and axes to vary.

    name = "agc_batch"
    description = "..."
    intended_for = "cifar10 on a GPU"

    [base]                      # every TrainConfig field; model.* are model overrides
    data = "cifar10"
    [base.model]
    name = "nf_resnet50"

    [grid]                      # axes; a product by default
    "clip.mode" = ["none", "norm", "agc"]
    "clip.threshold" = [0.01, 0.16]
    batch_size = [64, 256, 1024]
    seed = [0, 1]

    [tie]                       # axes that move together (zip), by group name
    batch = ["batch_size", "lr"]

    [when]                      # an axis applies only where another key has these values
    "model.alpha" = { "model.name" = ["nf_resnet26"] }

    [data_profiles.synthetic]   # base overrides used when data = "synthetic" (CPU scale)
    epochs = 2

    [[claims]]                  # what the grid tests; the report checks it (ablations.claims)
    text = "..."

    [frontier]                  # settings of `run_ablations.py frontier` (ablations.frontier)
    lr_min = 0.01
    lr_max = 10.0

A tie is one axis: a ``[when]`` on any of its keys applies to all of them (the tied values
are dropped together, and the run takes every one of those keys from the base).

Built-in rules: ``clip.threshold`` only applies to the clipping modes that use it, and a
``model.*`` key only applies to models that have that option (BN-ResNets have no alpha), so
neither produces duplicate runs. A run's id is a hash of its canonical resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import tomllib

from ablations.claims import ClaimError, UntestableClaim, check_claims, parse_claims
from ablations.constants import LENGTH_KEYS, MAX_RUNS, NAME_MAX
from ablations.errors import SpecError
from ablations.frontier_schema import parse_frontier
from ablations.keys import effective_settings, flatten, get_dotted, set_dotted
from ablations.overrides import parse_override
from ablations.recipe import DEPARTURE_FIELDS
from sigprop import fields
from sigprop.constants import THRESHOLD_MODES
from sigprop.errors import UserError

SPEC_KEYS = {
    "name", "description", "intended_for", "base", "fixed", "grid", "tie", "when", "data_profiles",
    "claims", "untested_claims", "frontier", "departures",
}
FOLDER_NAME = fields.Rule(
    lambda v: isinstance(v, str) and bool(v) and "/" not in v and not v.startswith("."),
    "a plain non-empty string (used as a folder)")
SAYS_WHY = fields.Rule(fields.NON_EMPTY.ok, "", template="{name} must say, in words, what was "
                      "measured")
# Execution choices that do not change what a run computes, so not part of its id.
EXECUTION_KEYS = ("device",)


@dataclass
class Run:
    run_id: str
    config: dict  # canonical nested TrainConfig dict
    axes: dict  # the axis values that define this run (dotted keys)
    label: str = ""  # the model as built: "NF-ResNet [1,1,1,1] x0.125"
    departures: dict = field(default_factory=dict)  # {model option: registry default}
    effective: dict = field(default_factory=dict)  # see effective_settings


@dataclass
class GridSpec:
    name: str
    base: dict
    grid: dict[str, list]
    fixed: dict[str, Any] = field(default_factory=dict)  # --set key=value, over every profile
    tie: dict[str, list[str]] = field(default_factory=dict)
    when: dict[str, dict[str, list]] = field(default_factory=dict)
    data_profiles: dict[str, dict] = field(default_factory=dict)
    description: str = ""
    intended_for: str = ""
    claims: list[dict] = field(default_factory=list)  # [[claims]] tables, as written
    # claims that --set left without runs to test them on: "C1: why" (kept in the stored spec)
    untested_claims: list[str] = field(default_factory=list)
    overridden: bool = False  # --set changed the grid or fixed a key
    frontier: dict = field(default_factory=dict)  # [frontier]: ablations.frontier_schema
    # [departures]: {setting: {"paper": its value in the paper, "why": the measurement}}
    departures: dict = field(default_factory=dict)


    def to_toml_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v not in ("", {}, [], None) and k != "overridden"}


# ----------------------------------------------------------------------------- loading

def load_spec(path: str | Path, overrides: list[str] | None = None) -> GridSpec:
    """Read a spec file and apply ``--set key=v1,v2`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise SpecError(f"cannot read spec file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte {err.start}); save the spec as "
                        f"UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: invalid TOML: {err}") from None
    spec = spec_from_dict(raw, default_name=path.stem)
    return apply_overrides(spec, overrides or [])


def spec_from_dict(raw: dict, default_name: str = "grid") -> GridSpec:
    fields.check_keys(raw, sorted(SPEC_KEYS), error=SpecError,
                      lead="unknown spec section(s)", valid_label="allowed")
    for section in ("base", "fixed", "grid", "tie", "when", "data_profiles", "frontier"):
        fields.check_table(raw.get(section, {}), f"[{section}]", SpecError)
    name = raw.get("name", default_name)
    fields.check_value("name", name, FOLDER_NAME, error=SpecError)
    check_name(name)
    grid = {}
    for key, values in flatten(raw.get("grid", {})).items():
        fields.check_value(f"grid.{key}", values, fields.is_list("a list of values"),
                           error=SpecError)
        if not values:
            raise SpecError(f"grid.{key} is an empty axis; give at least one value")
        grid[key] = values
    spec = GridSpec(
        name=name,
        base=raw.get("base", {}),
        grid=grid,
        fixed=flatten(raw.get("fixed", {})),
        tie={k: list(v) for k, v in raw.get("tie", {}).items()},
        when=parse_when(raw.get("when", {}), grid),
        data_profiles=raw.get("data_profiles", {}),
        description=raw.get("description", ""),
        intended_for=raw.get("intended_for", ""),
        claims=raw.get("claims", []),
        untested_claims=list(raw.get("untested_claims", [])),
        frontier=raw.get("frontier", {}),
        departures=parse_departures(raw.get("departures", {})),
    )
    check_structure(spec)
    return spec


def parse_departures(table: Any) -> dict:
    """``[departures]``: each a table ``{paper = <the paper's value>, why = "<the measurement
    behind the change>"}``, keyed by the setting (``ablations.recipe``)."""
    fields.check_table(table, "[departures]", SpecError, says="a table of settings")
    out = {}
    for key, entry in table.items():
        if not isinstance(entry, dict) or "why" not in entry or "paper" not in entry:
            raise SpecError(f"departures.{key} must be a table with paper (the paper's value) "
                            "and why (the measurement behind the departure)")
        fields.check_keys(entry, DEPARTURE_FIELDS, where=f"departures.{key}: ",
                          error=SpecError, lead="unknown field(s)", valid_label="allowed")
        fields.check_value(f"departures.{key}.why", entry["why"], SAYS_WHY, error=SpecError)
        out[key] = {"paper": entry["paper"], "why": " ".join(entry["why"].split())}
    return out


def check_name(name: str) -> None:
    """A grid name is a folder name: no control characters (NUL, newline, escapes), at most
    ``NAME_MAX`` bytes."""
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise SpecError(f"name {name!r} holds the control character {bad!r}; a grid name is "
                        f"a folder name")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX:
        raise SpecError(f"name is {size} bytes long; a grid name is a folder name, at most "
                        f"{NAME_MAX} bytes: {name[:40]!r}...")


def parse_when(table: dict, grid: dict) -> dict[str, dict[str, list]]:
    """{axis: {key: allowed values}}, whether keys were written quoted or as dotted paths."""
    out: dict[str, dict[str, list]] = {}
    for flat_key, allowed in flatten(table).items():
        axis = next((a for a in sorted(grid, key=len, reverse=True)
                     if flat_key.startswith(f"{a}.")), None)
        if axis is None:
            raise SpecError(f"when.{flat_key}: the condition must start with a [grid] axis")
        fields.check_value(f"when.{flat_key}", allowed, fields.is_list("a list of allowed values"),
                           error=SpecError)
        out.setdefault(axis, {})[flat_key[len(axis) + 1:]] = allowed
    return out


def check_structure(spec: GridSpec) -> None:
    tied: set[str] = set()
    for group, keys in spec.tie.items():
        if not isinstance(keys, list) or len(keys) < 2:
            raise SpecError(f"tie.{group} must list at least two grid axes")
        missing = [k for k in keys if k not in spec.grid]
        if missing:
            raise SpecError(f"tie.{group} names {', '.join(missing)}, which are not grid axes")
        lengths = {k: len(spec.grid[k]) for k in keys}
        if len(set(lengths.values())) != 1:
            raise SpecError(f"tie.{group} axes must have equal lengths, got {lengths}")
        if tied & set(keys):
            raise SpecError(f"tie.{group} reuses an axis already tied elsewhere")
        tied |= set(keys)
    for key in spec.when:
        if key not in spec.grid:
            raise SpecError(f"when.{key} refers to an axis that is not in [grid]")
    if spec.frontier:
        parse_frontier(spec.frontier, spec.name)
    parsed_claims(spec)


def parsed_claims(spec: GridSpec) -> list:
    """The spec's claims, parsed; a malformed claim is a :class:`SpecError`."""
    try:
        return parse_claims(spec.claims or None)
    except ClaimError as err:
        raise SpecError(str(err)) from None


# ----------------------------------------------------------------------------- overrides

def apply_overrides(spec: GridSpec, overrides: list[str]) -> GridSpec:
    """``key=v`` fixes a key (replacing an axis); ``key=v1,v2`` makes or replaces an axis."""
    spec = copy.deepcopy(spec)
    spec.overridden = spec.overridden or bool(overrides)
    for item in overrides:
        key, values, text = parse_override(item)
        if key.startswith("frontier."):  # a search setting, not a run key
            if len(values) > 1:
                raise SpecError(f"--set {key} takes one value, got {text!r}")
            spec.frontier = {**spec.frontier, key.removeprefix("frontier."): values[0]}
            continue
        if len(values) > 1 or key in spec.grid:
            tied = [g for g, keys in spec.tie.items() if key in keys]
            if tied and len(values) != len(spec.grid[key]):
                # a fixed value for a tied axis unties the group
                for group in tied:
                    spec.tie.pop(group)
            spec.grid[key] = values
        else:
            spec.fixed[key] = values[0]
    check_structure(spec)
    return spec


# ----------------------------------------------------------------------------- expansion

def _units(spec: GridSpec) -> list[list[dict]]:
    """The factors of the product: one per tie group (zipped axes), one per other axis."""
    units: list[list[dict]] = []
    tied = {k for keys in spec.tie.values() for k in keys}
    for keys in spec.tie.values():
        units.append([dict(zip(keys, vals)) for vals in zip(*(spec.grid[k] for k in keys))])
    for key, values in spec.grid.items():
        if key not in tied:
            units.append([{key: v} for v in values])
    return units


def grid_size(spec: GridSpec) -> int:
    """The number of combinations, from the axis lengths alone (nothing is built). Runs that
    an axis does not apply to collapse into one, so the grid can hold fewer runs."""
    return math.prod(len(unit) for unit in _units(spec))


def check_size(spec: GridSpec, max_runs: int | None) -> int:
    size = grid_size(spec)
    if max_runs is not None and size > max_runs:
        raise SpecError(
            f"grid {spec.name} has {size:,} combinations, over the limit of {max_runs:,} runs; "
            f"shrink an axis, or pass --max-runs {size} to run it anyway"
        )
    return size


def expand(spec: GridSpec, max_runs: int | None = MAX_RUNS) -> list[Run]:
    """Every run of the grid, deduplicated, validated, in a stable order.

    Grids with more than ``max_runs`` combinations are refused before anything is built."""
    check_size(spec, max_runs)
    runs = list(iter_runs(spec))
    check_run_claims(spec, runs)
    return runs


def iter_runs(spec: GridSpec) -> Iterator[Run]:
    """The runs of :func:`expand` one by one, as they are built (first rows at once); the
    claims are checked by :func:`expand` once all runs exist."""
    from sigprop.models.labels import model_departures, model_label  # lazy: torch
    from sigprop.train import TrainConfig  # lazy: torch

    check_keys(spec)
    units = _units(spec)
    seen: set[str] = set()
    for combo in itertools.product(*units) if units else [()]:
        axes: dict = {}
        for part in combo:
            axes.update(part)
        while True:  # dropping one axis can make another inapplicable
            kept = applicable_axes(spec, build_config(spec, axes), axes)
            if kept == axes:
                break
            axes = kept
        config = build_config(spec, axes)
        drop_inapplicable_model_keys(config)
        try:
            resolved = TrainConfig.from_dict(config)
        except UserError as err:
            where = ", ".join(f"{k}={v!r}" for k, v in axes.items())
            raise SpecError(f"{err}" + (f" (in the run with {where})" if where else "")) from None
        canonical = resolved.to_dict()
        rid = run_id(canonical)
        if rid not in seen:
            seen.add(rid)
            model = canonical["model"]
            yield Run(rid, canonical, axes, model_label(model["name"], model),
                      model_departures(model["name"], model), effective_settings(resolved))


def check_run_claims(spec: GridSpec, runs: list[Run]) -> None:
    """Claims name keys the runs have and select at least one run each (before any run).

    A selection that only ``--set`` emptied (``--set batch_size=64`` on a grid whose claim is
    about batch 512) is no error in the spec: that claim moves to ``spec.untested_claims``
    with the reason, and the rest are checked as usual.
    """
    claims = parsed_claims(spec)
    if not claims:
        return
    frame = pd.DataFrame([flatten(run.config, hashable=True) for run in runs])
    kept = []
    for table, claim in zip(spec.claims, claims):
        try:
            check_claims([claim], frame, set(frame.columns))
        except ClaimError as err:
            if not (spec.overridden and isinstance(err, UntestableClaim)):
                raise SpecError(str(err)) from None
            spec.untested_claims.append(
                f"{claim.id}: not tested with these --set values ({str(err).split(': ', 1)[1]})")
            continue
        kept.append(table)
    spec.claims = kept


def build_config(spec: GridSpec, axes: dict) -> dict:
    """base, then the data set's profile, then ``--set`` values, then the axis values; a layer
    that sets ``steps`` (or ``epochs``) replaces the other one set below it."""
    config = copy.deepcopy(spec.base)
    data = axes.get("data", spec.fixed.get("data", get_dotted(spec.base, "data")))
    profile = flatten(spec.data_profiles.get(data or "", {}))
    for layer in (profile, spec.fixed, axes):
        for key, value in layer.items():
            if key in LENGTH_KEYS:
                for other in LENGTH_KEYS:
                    config.pop(other, None)
            set_dotted(config, key, value)
    return config


def applicable_axes(spec: GridSpec, config: dict, axes: dict) -> dict:
    """Drop axis values that do not apply to this combination (see module docstring)."""
    out = {}
    for key, value in axes.items():
        # a tie is one axis: the [when] of every tied key holds for each of them
        conditions = [item for member in tie_members(spec, key)
                      for item in spec.when.get(member, {}).items()]
        if key == "clip.threshold":  # built in, per key: a tied clip.mode stays
            conditions.append(("clip.mode", list(THRESHOLD_MODES)))
        if all(get_dotted(config, k) in allowed for k, allowed in conditions):
            out[key] = value
    return out


def tie_members(spec: GridSpec, key: str) -> list[str]:
    """The keys tied with ``key``, itself included (just ``[key]`` when it is not tied)."""
    return next((keys for keys in spec.tie.values() if key in keys), [key])


def drop_inapplicable_model_keys(config: dict) -> None:
    from sigprop.models import model_options  # lazy: torch

    model = config.get("model")
    if not isinstance(model, dict) or "name" not in model:
        return
    try:
        options = set(model_options(model["name"]))
    except UserError:
        return  # the unknown name is reported by validation
    for key in [k for k in model if k != "name" and k not in options]:
        model.pop(key)


def check_keys(spec: GridSpec) -> None:
    """Unknown keys fail before anything runs, naming the key and the valid ones."""
    from sigprop.clipping import ClipConfig  # lazy: torch
    from sigprop.models import list_models, model_options  # lazy: torch
    from sigprop.train import TrainConfig  # lazy: torch

    top = {f.name for f in dataclasses.fields(TrainConfig)}
    clip_keys = {f.name for f in dataclasses.fields(ClipConfig)}
    model_keys = {"name"} | {opt for name in list_models() for opt in model_options(name)}
    keys = [("base", k) for k in flatten(spec.base)] + [("--set", k) for k in spec.fixed]
    keys += [(f"data_profiles.{d}", k) for d, p in spec.data_profiles.items() for k in flatten(p)]
    keys += [("grid", k) for k in spec.grid]
    for section, key in keys:
        head, _, rest = key.partition(".")
        where = f"{section}.{key}: "
        fields.check_keys([head], sorted(top), where, SpecError, first=True,
                          valid_label="valid keys")
        if head == "model" and rest:
            fields.check_keys([rest], sorted(model_keys), where, SpecError, first=True,
                              lead="no model has the option",
                              valid_label="valid model options")
        if head == "clip" and rest:
            fields.check_keys([rest], sorted(clip_keys), where, SpecError, first=True,
                              lead="unknown clip option")


def run_id(config: dict) -> str:
    """Stable id: a hash of the canonical config, independent of key and axis order."""
    payload = {k: v for k, v in config.items() if k not in EXECUTION_KEYS}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
