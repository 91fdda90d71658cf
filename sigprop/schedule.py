"""The learning-rate schedules of :func:`sigprop.train.train` (facts file, section 6).

"cosine" is the NFNet recipe's: linear warmup, then cosine decay towards 0 (:func:`lr_at`).
"exponential" is the learning-rate range test's ramp (Smith, "Cyclical Learning Rates for
Training Neural Networks", arXiv:1506.01186): it rises geometrically from ``lr_start`` to the
peak lr (:func:`exponential_lr`). Plain floats, no torch: the config's validation uses the
names without loading the trainer.
"""

from __future__ import annotations

import math

# "cosine": linear warmup, then cosine decay (lr_at); "exponential": the range test's ramp
# from lr_start up to the peak lr (exponential_lr)
SCHEDULES = ("cosine", "exponential")


def lr_at(step: int, total: int, peak: float, warmup_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` then cosine decay towards 0 at ``total``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def exponential_lr(step: int, total: int, start: float, end: float) -> float:
    """The range test's ramp: ``start * (end / start) ** (step / (total - 1))``, so step 0
    trains at exactly ``start`` and the last step (``total - 1``) at exactly ``end``; a
    one-step run trains at ``end``. fastai's ``lr_find`` and Lightning's ``Tuner.lr_find``
    use the same geometric form (with ``step / num_it``, so they stop one step short of
    ``end``)."""
    if step >= total - 1:
        return end
    if step <= 0:
        return start
    return start * (end / start) ** (step / (total - 1))


def warmup_steps(fraction: float, total: int) -> int:
    """The steps the cosine schedule warms up over: ``fraction`` of ``total``, rounded."""
    return round(fraction * total)


def scheduled_lr(schedule: str, step: int, total: int, peak: float, warmup: int,
                 lr_start: float | None = None) -> float:
    """The rate of update ``step`` (0-based) of ``total`` under ``schedule`` (one of
    :data:`SCHEDULES`); ``warmup`` is used by "cosine", ``lr_start`` by "exponential"."""
    if schedule == "exponential":
        return exponential_lr(step, total, lr_start, peak)
    return lr_at(step, total, peak, warmup)
