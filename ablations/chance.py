"""Chance accuracy: the one rule the runs frame's ``acc_chance`` and the claims share.

A run's chance accuracy is 1 / its class count: the model's ``num_classes`` when it is an
integer of at least 2 (a 1-class head is no classifier to be at chance with), else the class
count of its data set. A data set this version does not know has no chance level.
"""

from __future__ import annotations

import numbers
from typing import Any

from sigprop.errors import UserError


def chance_of(num_classes: Any, data: Any, *, strict: bool = False) -> float | None:
    """1 / the run's class count by the module's rule; None when neither the model's
    ``num_classes`` nor the data set gives one. ``strict``: an unknown data set raises its
    :class:`UserError` instead of giving None."""
    # a frame's column holds numpy numbers, and a float one when some rows have none
    if isinstance(num_classes, numbers.Real) and not isinstance(num_classes, bool) \
            and float(num_classes).is_integer() and num_classes >= 2:
        return 1.0 / int(num_classes)
    if not isinstance(data, str):
        return None
    from sigprop.data import dataset_info  # lazy: torch (sigprop.data imports it)

    try:
        return 1.0 / dataset_info(data).num_classes
    except UserError:
        if strict:
            raise
        return None
