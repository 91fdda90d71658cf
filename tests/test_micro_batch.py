"""Gradient accumulation (``TrainConfig.micro_batch``): same gradients as the full batch for NF
models, micro-batch statistics for BN models, validation, and the config record."""

from __future__ import annotations

import pytest
import torch

from sigprop.errors import UserError
from sigprop.train import TrainConfig, _Run, train

# no stochastic depth or dropout: their masks are drawn per forward, so slices would differ
NF_MODEL = {
    "name": "nf_resnet26", "stem": "cifar", "width_mult": 0.125, "depths": [1, 1, 1, 1],
    "skipinit_gain": 1.0, "stochdepth_rate": 0.0,
}
BN_MODEL = {"name": "bn_resnet26_v2", "stem": "cifar", "width_mult": 0.125, "depths": [1, 1, 1, 1]}


def config(model: dict, **changes) -> TrainConfig:
    base = {
        "model": dict(model), "train_size": 64, "test_size": 16, "batch_size": 14, "steps": 2,
        "image_size": 16, "device": "cpu", "label_smoothing": 0.1, "eval_every": 0,
    }
    base.update(changes)
    return TrainConfig.from_dict(base)


def gradients(model: dict, micro_batch: int | None, **changes) -> tuple[torch.Tensor, list]:
    run = _Run(config(model, micro_batch=micro_batch, **changes), probe=None, progress=None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(14, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (14,), generator=gen)
    loss = run.forward_backward(x, y)
    return loss, [p.grad.clone() for p in run.model.parameters()]


@pytest.mark.parametrize("micro_batch", [7, 5, 1])  # 5: slices of 5, 5 and a remainder of 4
def test_nf_accumulated_gradient_equals_full_batch(micro_batch):
    full_loss, full = gradients(NF_MODEL, None)
    loss, accumulated = gradients(NF_MODEL, micro_batch)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    assert len(accumulated) == len(full)
    assert all(float(f.abs().max()) > 0 for f in full[-4:])
    for a, f in zip(accumulated, full):
        scale = float(f.abs().max()) + 1e-12
        assert float((a - f).abs().max()) / scale < 1e-5


def test_bn_model_sees_micro_batch_statistics():
    _, full = gradients(BN_MODEL, None)
    _, accumulated = gradients(BN_MODEL, 7)
    worst = max(float((a - f).abs().max() / (f.abs().max() + 1e-12))
                for a, f in zip(accumulated, full))
    assert worst > 1e-3  # BatchNorm normalizes each slice with its own statistics


@pytest.mark.slow
def test_training_with_micro_batch_matches_full_batch_updates():
    changes = {"model": NF_MODEL, "clip": {"mode": "agc", "threshold": 0.01}}
    full = train(config(**changes, steps=3).to_dict())
    micro = train(config(**changes, steps=3, micro_batch=4).to_dict())
    assert micro.status == "completed"
    assert micro.config["micro_batch"] == 4
    for column in ("loss", "grad_norm", "clip_fraction"):
        torch.testing.assert_close(
            torch.tensor(micro.metrics[column].to_numpy()),
            torch.tensor(full.metrics[column].to_numpy()), rtol=1e-4, atol=1e-6,
        )


def test_micro_batch_with_probe_runs_and_records():
    result = train(config(NF_MODEL, micro_batch=5, probe_every=1).to_dict())
    assert result.status == "completed"
    assert set(result.blocks["step"]) == {0, 1}


def test_unset_micro_batch_is_left_out_of_the_config_dict():
    # configs (and run ids) written before the field existed stay the same
    assert "micro_batch" not in config(NF_MODEL).to_dict()
    assert config(NF_MODEL, micro_batch=7).to_dict()["micro_batch"] == 7
    assert TrainConfig.from_dict(config(NF_MODEL, micro_batch=7).to_dict()).micro_batch == 7


@pytest.mark.parametrize("bad", [0, -2, 15, 2.5, True, "4"])
def test_bad_micro_batch_is_one_line_user_error(bad):
    with pytest.raises(UserError) as err:
        config(NF_MODEL, micro_batch=bad)
    message = str(err.value)
    assert "micro_batch" in message and "\n" not in message
