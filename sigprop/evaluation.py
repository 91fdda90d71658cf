"""The evaluation of a training run: test accuracy and loss of the model (its EMA copy when the
run keeps one) over the whole test set, in eval mode, under the run's autocast and memory
format. Run by :func:`sigprop.train.train` every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sigprop.data import eval_batches


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
    autocast: Callable[[], typing.ContextManager], channels_last: bool,
) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy (no label smoothing) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=x.device)
    loss_sum = torch.zeros((), device=x.device)
    try:
        for xb, yb in eval_batches(x, y, batch_size):
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(xb).float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    finally:
        model.train(was_training)
    n = max(1, len(y))
    return float(correct) / n, float(loss_sum) / n
