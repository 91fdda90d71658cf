"""The error of a spec that cannot be expanded; in a module of its own so the leaf modules
(keys, overrides, the frontier schema) raise it without importing ``ablations.spec``."""

from __future__ import annotations

from sigprop.errors import UserError


class SpecError(UserError):
    """A spec that cannot be expanded: names the field and what is allowed."""
