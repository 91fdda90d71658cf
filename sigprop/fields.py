"""The one validation mechanism of every config and spec section: ``TrainConfig``,
``ClipConfig``, the model configs, the ``[frontier]`` settings and the spec's and claims'
tables.

A config is a dataclass whose fields declare their rules (:func:`checked`); :func:`validate`
checks an instance: every field's type against its annotation (:func:`check_field`), then each
field's rules (:class:`Rule`: ``> 0``, ``>= 0``, ``in [0, 1)``, one of some choices with a
did-you-mean, ...; an unset optional field passes them), then the class's cross-field checks,
its ``check_together`` method, which returns the message of the first failure (or None) so it
fails through the same path. A table read from a file is checked for unknown keys first
(:func:`check_keys`). Every failure is one line naming the field (``clip.eps``,
``frontier.steps``), raised as the caller's error class (``UserError`` or a subclass:
``SpecError``, ``ClaimError``). Torch-free and light, so the command line and the spec loader
import it cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sigprop.errors import UserError, did_you_mean

TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
              dict: "a table", type(None): "unset (null)"}
REQUIRED = dataclasses.MISSING  # checked(REQUIRED, ...): a field without a default
RULES = "sigprop.fields.rules"  # dataclass field metadata: the field's rules
SAYS = "sigprop.fields.says"  # metadata: what the field must be, instead of its type's name


@dataclass(frozen=True)
class Rule:
    """A constraint on a field's value, checked after its type. ``ok(value)`` false fails with
    ``"{name} must be {says}, got {value!r}"`` (``" (or unset)"`` after ``says`` for an
    optional field, and a did-you-mean when ``choices`` are given), or with ``template``
    (``str.format`` of ``name``, ``value`` and ``choices``) where a field words it its own
    way."""

    ok: Callable[[Any], bool]
    says: str
    choices: Callable[[], Sequence[str]] | None = None
    template: str = ""

    def message(self, name: str, value: Any, optional: bool = False) -> str:
        choices = list(self.choices()) if self.choices else []
        if self.template:
            return self.template.format(name=name, value=value, choices=", ".join(choices))
        unset = " (or unset)" if optional else ""
        hint = did_you_mean(value, choices) if choices and isinstance(value, str) else ""
        return f"{name} must be {self.says}{unset}, got {value!r}{hint}"


def positive(says: str = "> 0") -> Rule:
    return Rule(lambda v: v > 0, says)


def at_least(low: float, says: str | None = None) -> Rule:
    return Rule(lambda v: v >= low, says or f">= {low:g}")


def at_most(high: float, says: str | None = None, template: str = "") -> Rule:
    return Rule(lambda v: v <= high, says or f"<= {high:g}", template=template)


def in_range(low: float, high: float, high_open: bool = False) -> Rule:
    """``low <= value <= high`` (``< high`` when ``high_open``), as ``in [low, high]``."""
    if high_open:
        return Rule(lambda v: low <= v < high, f"in [{low:g}, {high:g})")
    return Rule(lambda v: low <= v <= high, f"in [{low:g}, {high:g}]")


def one_of(choices: Collection[str] | Callable[[], Sequence[str]], template: str = "") -> Rule:
    """The value is one of ``choices`` (a collection, or a function returning one, read when
    checked); the message lists them and suggests the closest."""
    listed = choices if callable(choices) else (lambda: list(choices))
    return Rule(lambda v: v in listed(), "one of " + ", ".join(listed()), listed, template)


POSITIVE = positive()
NON_NEGATIVE = at_least(0)
NON_EMPTY = Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
FRACTION = in_range(0, 1, high_open=True)  # [0, 1)


def is_list(says: str) -> Rule:
    """The value is a list (a TOML array); ``says`` what of."""
    return Rule(lambda v: isinstance(v, list), says)


def checked(default: Any = dataclasses.MISSING, *rules: Rule, says: str | None = None,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with ``rules`` (and ``says``: what a value of the wrong type is told
    it must be, instead of the annotation's type name). The default, and so the field's place
    and every ``to_dict``, are as a plain field's."""
    metadata = {RULES: rules, **({SAYS: says} if says else {})}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata=metadata)


def type_name(hint: Any) -> str:
    """'a number or unset (null)' for ``float | None``."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return "a list of " + ("integers" if item is int else "strings" if item is str else
                               getattr(item, "__name__", str(item)))
    args = typing.get_args(hint)
    if args and isinstance(hint, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if hint in TYPE_NAMES:
        return TYPE_NAMES[hint]
    description = getattr(hint, "type_description", None)  # a config class may name itself
    return description or getattr(hint, "__name__", str(hint))


def check_field(name: str, value: Any, hint: Any, says: str | None = None,
                error: type[UserError] = UserError) -> Any:
    """``value`` if it fits the field's annotation ``hint``: ints become floats for float
    fields and lists tuples for tuple fields; bools are never numbers; a float must be finite
    (inf and nan pass every ``x > 0`` style check after this). Raises ``error`` naming the
    field otherwise (``must be {says}`` where given, else the type's name)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if option is int and isinstance(value, int):
            return value
        if option is float and isinstance(value, int | float):
            if not math.isfinite(value):
                raise error(f"{name} must be a finite number, got {value!r}")
            return float(value)
        if typing.get_origin(option) is tuple:
            item = typing.get_args(option)[0]
            if isinstance(value, list | tuple) and all(_is(v, item) for v in value):
                return tuple(value)
            continue
        if isinstance(option, type) and option is not float and isinstance(value, option):
            return value
    raise error(f"{name} must be {says or type_name(hint)}, got {value!r}")


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


@functools.cache
def _schema(cls: type) -> tuple[tuple[dataclasses.Field, Any, bool], ...]:
    """Each field of ``cls`` with its resolved annotation and whether it may be unset."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name], type(None) in typing.get_args(hints[f.name]))
                 for f in dataclasses.fields(cls))


def required_fields(cls: type) -> list[str]:
    """The fields of ``cls`` without a default, in order."""
    return [f.name for f, _, _ in _schema(cls) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def field_rules(cls: type) -> dict[str, tuple[Rule, ...]]:
    """``{field: its rules}`` of a config class (the fields without rules left out)."""
    return {f.name: f.metadata[RULES] for f, _, _ in _schema(cls) if f.metadata.get(RULES)}


def validate(config: Any, prefix: str = "", error: type[UserError] = UserError,
             names: Collection[str] | None = None) -> None:
    """Check a config dataclass in place: every field's type (the value normalized: ints to
    floats, lists to tuples; frozen classes too), then every field's rules, then
    ``config.check_together()`` if the class has one. The first failure raises ``error``
    with one line naming ``prefix`` + the field. ``names``: only those fields, and not the
    cross-field checks (for a config that derives fields from others before the whole check:
    NFNet's variant and depth_mult)."""
    schema = [row for row in _schema(type(config)) if names is None or row[0].name in names]
    for f, hint, _ in schema:
        value = check_field(prefix + f.name, getattr(config, f.name), hint,
                            f.metadata.get(SAYS), error)
        object.__setattr__(config, f.name, value)
    for f, _, optional in schema:
        value = getattr(config, f.name)
        if value is not None:
            check_value(prefix + f.name, value, *f.metadata.get(RULES, ()), error=error,
                        optional=optional)
    together = getattr(config, "check_together", None) if names is None else None
    message = together() if together else None
    if message:
        raise error(message)


def check_value(name: str, value: Any, *rules: Rule, error: type[UserError] = UserError,
                optional: bool = False) -> Any:
    """``value`` if every rule holds, else ``error`` naming ``name`` (``optional``: the
    message says the value may also be unset): a config field's rules (:func:`validate`), or
    those of a value read outside a config class (a claim's field, a spec's name)."""
    for rule in rules:
        if not rule.ok(value):
            raise error(rule.message(name, value, optional))
    return value


def check_types(cls: type, values: Mapping[str, Any]) -> dict:
    """``values`` for fields of ``cls``, each type-checked (:func:`check_field`) before the
    config is built, so a config's own arithmetic on them (NFNet's depth_mult) never meets a
    string or an infinity; keys that are not fields pass unchanged."""
    hints = {f.name: (hint, f.metadata.get(SAYS)) for f, hint, _ in _schema(cls)}
    return {k: check_field(k, v, *hints[k]) if k in hints else v for k, v in values.items()}


def check_keys(given: Iterable[Any], valid: Iterable[str], where: str = "",
               error: type[UserError] = UserError, lead: str | None = None,
               valid_label: str = "valid", suggest: bool = True, first: bool = False,
               after: str = "", prefix: str = "") -> None:
    """Raise ``error`` when ``given`` holds keys outside ``valid``: ``"{where}{lead} a,
    b{after} (did you mean 'x'?); {valid_label}: ..."``, the valid keys in their order and
    every key named with ``prefix`` (``clip.``); ``lead`` is "unknown key(s)" unless given.
    ``first``: name only the first unknown key, quoted (``unknown key 'lrr'``; ``lead`` then
    defaults to "unknown key")."""
    valid = list(valid)
    unknown = [k for k in given if k not in valid]
    if not unknown:
        return
    if not first:
        unknown = sorted(unknown, key=str)
    lead = lead or ("unknown key" if first else "unknown key(s)")
    named = repr(unknown[0]) if first else ", ".join(f"{prefix}{k}" for k in unknown)
    hint = did_you_mean(unknown[0], valid) if suggest else ""
    raise error(f"{where}{lead} {named}{after}{hint}; {valid_label}: "
                f"{', '.join(prefix + k for k in valid)}")


def check_table(raw: Any, where: str, error: type[UserError] = UserError,
                says: str = "a table") -> Mapping:
    """``raw`` if it is a table (a mapping), else ``error``: ``"{where} must be {says}"``."""
    if not isinstance(raw, Mapping):
        raise error(f"{where} must be {says}, got {raw!r}")
    return raw


def check_seeds(seeds: int | typing.Iterable[int]) -> list[int]:
    """``seeds`` as a list: a count ``n`` is seeds 0..n-1, else the seeds named, each once.
    Raises :class:`UserError` for a count below 1, an empty list or a seed named twice."""
    if isinstance(seeds, bool):  # never a count: True is not "one seed"
        raise UserError(f"seeds must be a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise UserError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise UserError("seeds must name at least one seed")
    if len(set(out)) != len(out):
        raise UserError(f"seeds listed twice: {out}")
    return out
