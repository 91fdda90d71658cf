"""What a training run hands back and sends out: :class:`TrainResult` at the end, a
:class:`LiveUpdate` to a live tracker (a :class:`LiveSink`) while it runs, and the progress it
reports (:data:`ProgressArg`: a tqdm bar on stderr, a callable or a tqdm-like object).

``metrics`` frames have :data:`METRIC_COLUMNS` (one row per update), ``evals`` frames
:data:`EVAL_COLUMNS` (one row per evaluation); see :mod:`sigprop.train` for the numbering.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from sigprop.errors import UserError

METRIC_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "clip_fraction", "step_time"]
EVAL_COLUMNS = ["step", "epoch", "test_acc", "test_loss", "train_loss"]


@dataclass
class TrainResult:
    """Outcome of :func:`sigprop.train.train`.

    ``status``: "completed", "diverged" (``diverged_step`` is the first metrics step whose loss
    was not finite or above ``diverge_loss``; metrics end there) or "stopped" (``stop_after``).
    ``metrics``: one row per step, columns ``METRIC_COLUMNS``; ``evals``: ``EVAL_COLUMNS``
    (test accuracy and loss, and the mean training loss since the previous evaluation).
    ``final_acc``: the last evaluation's accuracy (NaN when diverged or none ran);
    ``best_acc``: the best evaluation (NaN if none). ``blocks``: the probe's records.
    ``flight``: the flight recorder's rows up to the diverged step (:mod:`sigprop.recorder`);
    empty unless the run diverged with the recorder on.
    ``warnings``: findings about the run a reader must see (AGC holding zero-initialised gains
    at 0, :mod:`sigprop.gains`); ``gain_check``: that check's numbers (None when no AGC-clipped
    gain started at 0).
    """

    status: str
    diverged_step: int | None
    metrics: pd.DataFrame
    evals: pd.DataFrame
    final_acc: float
    best_acc: float
    blocks: pd.DataFrame
    steps_done: int
    total_steps: int
    config: dict
    warnings: list[str] = field(default_factory=list)
    gain_check: dict | None = None
    test_images: int | None = None  # how many test images the accuracies were measured on
    flight: pd.DataFrame = field(default_factory=pd.DataFrame)


# True: a tqdm bar on stderr; a callable: progress(steps_done, total_steps, loss); or an object
# with tqdm's update(n) and set_postfix; False or None: silent.
ProgressArg = bool | Callable[[int, int, float | None], object] | None


@dataclass
class LiveUpdate:
    """What a run produced since the previous update, for a live tracker (:func:`train`'s
    ``live``): new rows of ``TrainResult.metrics`` (``METRIC_COLUMNS``) and ``evals``
    (``EVAL_COLUMNS``), and the probe records of the steps not sent before. The first update
    of a resumed run also carries the rows of the earlier attempt (from the checkpoint)."""

    step: int
    total_steps: int
    metrics: pd.DataFrame
    evals: pd.DataFrame
    blocks: pd.DataFrame
    final: bool = False  # the run's last update: its loop has ended


class LiveSink(typing.Protocol):
    """A live tracker: ``due()`` is asked after every step whose statistics are on the host
    (so it must be cheap, a clock read); when it says yes, ``write(update)`` gets the rows."""

    def due(self) -> bool: ...

    def write(self, update: LiveUpdate) -> object: ...


def check_progress(progress: object) -> None:
    """Refuse a ``progress`` argument that is none of the kinds :data:`ProgressArg` names."""
    if not (progress is None or isinstance(progress, bool) or callable(progress)
            or hasattr(progress, "update")):
        raise UserError("progress must be True (a bar on stderr), False, a callable "
                        f"progress(steps_done, total_steps, loss) or a tqdm-like object; "
                        f"got {type(progress).__name__}")


def report_progress(progress: object, step: int, total_steps: int, loss: float | None) -> None:
    """One step done: advance a tqdm-like bar (its postfix the last loss) or call the
    callable with ``(steps_done, total_steps, loss)``."""
    if hasattr(progress, "update"):  # tqdm-like
        # the postfix first, so the redraw that update() may do already shows this loss
        if loss is not None and hasattr(progress, "set_postfix"):
            progress.set_postfix(loss=f"{loss:.4g}", refresh=False)
        progress.update(1)
    else:
        progress(step, total_steps, loss)


def progress_bar(total: int, initial: int, desc: str):
    """A tqdm bar over a run's steps, on stderr, starting where a resumed run starts."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                dynamic_ncols=True)


def close_bar(bar, status: str, at: int | None) -> None:
    """Close the bar; one that ended early ("stopped", "diverged") says why and at which step.
    A broken terminal never fails the run."""
    try:
        if status in ("stopped", "diverged"):
            bar.set_postfix_str(f"{bar.postfix or ''} {status} at step {at}".strip(),
                                refresh=False)
        bar.close()
    except Exception:  # noqa: BLE001 - a broken terminal never fails the run
        pass
