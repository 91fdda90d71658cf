"""Where a :class:`~sigprop.probes.Probe` measures: the stem and the residual blocks of a model.

Finding the blocks: a sigprop model (one with ``blocks()``) lists them itself. For any other
module, give glob patterns on qualified module names, matched dot segment by dot segment (``*``
never crosses a dot), e.g. a torchvision ResNet: ``blocks="layer*.*", branches="layer*.*.bn3",
stem="maxpool"``. Block ``index`` is the order of appearance in ``model.named_modules()``;
block ``stage`` is the rank of the block name's prefix before its last dot among the distinct
prefixes, in order of first appearance ("layer1.0" and "layer1.2" are stage 0, "layer2.0" is
stage 1). A branch belongs to the block whose name prefixes it.
The stem point is labelled ``"stem"`` (index -1, stage -1); ``expected_var`` is the NF
bookkeeping value from :class:`~sigprop.models.BlockInfo` (1.0 at the stem of an NF model),
NaN where unknown.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from sigprop.errors import UserError


@dataclass(frozen=True)
class ProbePoint:
    """One place the probe measures: the stem or a residual block."""

    block: str  # label in the frame: "stem" or the block's qualified module name
    module: str  # qualified name of the module whose output is the block output
    stage: int
    index: int
    branch: str | None  # qualified name of the branch output module, if any
    expected_var: float  # NaN when unknown


def _as_patterns(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def match_name(name: str, pattern: str) -> bool:
    """Glob match of a qualified module name, dot segment by dot segment."""
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts)
    )


def _matching(names: list[str], patterns: list[str], what: str) -> list[str]:
    found = [n for n in names if any(match_name(n, p) for p in patterns)]
    if not found:
        sample = ", ".join(n for n in names[:12] if n)
        raise UserError(
            f"no module matches {what} pattern(s) {', '.join(map(repr, patterns))}; "
            f"module names look like: {sample}"
        )
    return found


def find_points(
    model: nn.Module,
    blocks: str | Sequence[str] | None = None,
    branches: str | Sequence[str] | None = None,
    stem: str | None = None,
) -> list[ProbePoint]:
    """The stem (if any) and the blocks of ``model``, in order; see the module docstring."""
    block_patterns, branch_patterns = _as_patterns(blocks), _as_patterns(branches)
    names = [n for n, _ in model.named_modules()]
    points: list[ProbePoint] = []
    if not block_patterns and hasattr(model, "blocks"):
        infos = model.blocks()
        nf = any(b.expected_var is not None for b in infos)
        stem_name = stem if stem is not None else ("stem" if hasattr(model, "stem") else None)
        if stem_name is not None:
            _matching(names, [stem_name], "stem")
            points.append(ProbePoint("stem", stem_name, -1, -1, None, 1.0 if nf else math.nan))
        for b in infos:
            expected = math.nan if b.expected_var is None else float(b.expected_var)
            points.append(ProbePoint(b.name, b.name, b.stage, b.index, b.branch, expected))
        return points
    if not block_patterns:
        raise UserError(
            f"{type(model).__name__} has no blocks(); give block name patterns, e.g. "
            "blocks='layer*.*', branches='layer*.*.bn3'"
        )
    if stem is not None:
        stem_names = _matching(names, [stem], "stem")
        points.append(ProbePoint("stem", stem_names[-1], -1, -1, None, math.nan))
    block_names = _matching(names, block_patterns, "block")
    branch_of: dict[str, str] = {}
    if branch_patterns:
        for branch in _matching(names, branch_patterns, "branch"):
            owners = [b for b in block_names if branch.startswith(b + ".")]
            if not owners:
                raise UserError(f"branch module {branch!r} is inside none of the blocks")
            owner = max(owners, key=len)
            if owner in branch_of:
                raise UserError(
                    f"block {owner!r} has two branch modules: {branch_of[owner]!r}, {branch!r}"
                )
            branch_of[owner] = branch
    prefixes: dict[str, int] = {}
    for index, name in enumerate(block_names):
        prefix = name.rpartition(".")[0]
        stage = prefixes.setdefault(prefix, len(prefixes))
        points.append(ProbePoint(name, name, stage, index, branch_of.get(name), math.nan))
    return points
