"""The trainer: learning, divergence, determinism, checkpoint/resume, recipe order, config
validation."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sigprop import create_model, probes
from sigprop.clipping import ClipConfig
from sigprop.data import BatchStream, load_dataset
from sigprop.errors import UserError
from sigprop.train import (
    DEFAULT_OMITTED_FIELDS,
    METRIC_COLUMNS,
    UNSET_OMITTED_FIELDS,
    TrainConfig,
    lr_at,
    train,
)

TINY_MODEL = {
    "name": "nf_resnet26", "stem": "cifar", "width_mult": 0.125, "depths": [1, 1, 1, 1],
}


def tiny(**changes) -> dict:
    config = {
        "model": dict(TINY_MODEL), "train_size": 256, "test_size": 64, "batch_size": 32,
        "steps": 12, "lr": 0.1, "image_size": 16, "eval_every": 4,
    }
    config.update(changes)
    return config


def same_run(a, b) -> None:
    """Identical metrics (wall time aside) and evaluations."""
    pd.testing.assert_frame_equal(a.metrics.drop(columns="step_time"),
                                  b.metrics.drop(columns="step_time"), check_exact=True)
    pd.testing.assert_frame_equal(a.evals, b.evals, check_exact=True)
    assert (a.status, a.diverged_step, a.steps_done) == (b.status, b.diverged_step, b.steps_done)


@pytest.mark.slow
def test_tiny_nf_resnet_learns_synthetic_well_above_chance():
    result = train(tiny(
        model={**TINY_MODEL, "skipinit_gain": 1.0}, train_size=2000, test_size=500,
        batch_size=48, steps=80, eval_every=40,
    ))
    assert result.status == "completed"
    assert result.final_acc >= 0.3  # chance is 0.1
    assert result.final_acc < 0.99  # the synthetic set is not trivially separable
    assert list(result.metrics.columns) == METRIC_COLUMNS
    assert result.metrics["step"].tolist() == list(range(80))
    assert result.evals["step"].tolist() == [40, 80]
    losses = result.metrics["loss"]
    assert losses.tail(10).mean() < losses.head(10).mean() - 0.2
    assert result.best_acc >= result.final_acc


@pytest.mark.slow
def test_lr_schedule_warms_up_then_decays():
    result = train(tiny(steps=10, warmup_fraction=0.2, lr=None, base_lr=0.4, batch_size=32,
                        eval_every=0))
    peak = 0.4 * 32 / 256
    lrs = result.metrics["lr"].tolist()
    assert lrs == [lr_at(s, 10, peak, 2) for s in range(10)]
    assert lrs[0] == pytest.approx(peak / 2) and lrs[1] == pytest.approx(peak)
    assert lrs[2] == pytest.approx(peak)  # the cosine starts at the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05 * peak
    assert result.evals["step"].tolist() == [10]  # eval_every 0: only at the end
    assert result.metrics["epoch"].iloc[-1] == pytest.approx(10 / 8)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
def test_absurd_lr_diverges_without_clipping_but_not_with_agc(seed):
    # lr 1e3 with AGC lambda 1e-4: each unit moves at most lr * lambda = 10% of its norm per
    # step (before momentum); the classifier is clipped too, else its raw update explodes.
    absurd = tiny(lr=1e3, warmup_fraction=0.0, steps=15, seed=seed, eval_every=0,
                  train_size=256)
    plain = train(absurd)
    assert plain.status == "diverged"
    assert plain.diverged_step is not None and plain.diverged_step < 5
    assert plain.metrics["step"].iloc[-1] == plain.diverged_step
    last = plain.metrics["loss"].iloc[-1]
    assert not math.isfinite(last) or last > 100.0
    assert math.isnan(plain.final_acc)

    clipped = train({**absurd, "clip": {"mode": "agc", "threshold": 1e-4,
                                        "clip_classifier": True}})
    assert clipped.status == "completed"
    assert len(clipped.metrics) == 15
    assert clipped.metrics["loss"].map(math.isfinite).all()
    assert clipped.metrics["loss"].max() < 20
    assert clipped.metrics["clip_fraction"].min() > 0.3  # AGC clipped at every step


@pytest.mark.slow
def test_two_runs_of_one_config_are_identical():
    config = tiny(steps=6, model={**TINY_MODEL, "drop_rate": 0.3}, clip={"mode": "agc",
                                                                         "threshold": 0.05})
    first = train(config)
    same_run(first, train(config))
    other = train({**config, "seed": 1})
    assert not other.metrics["loss"].equals(first.metrics["loss"])


def resumable(**changes) -> dict:
    # EMA, dropout, stochastic depth and augmentation all carry state or randomness
    return tiny(
        model={**TINY_MODEL, "drop_rate": 0.2, "stochdepth_rate": 0.2, "skipinit_gain": 1.0},
        ema_decay=0.9, clip={"mode": "agc", "threshold": 0.02}, **changes,
    )


@pytest.mark.slow
def test_stopped_run_resumes_to_the_same_metrics(tmp_path):
    config = resumable()
    full = train(config)
    path = tmp_path / "run.pt"
    first = train(config, checkpoint_path=path, stop_after=5)
    assert first.status == "stopped" and first.steps_done == 5 and len(first.metrics) == 5
    resumed = train(config, checkpoint_path=path)
    same_run(full, resumed)

    calls = []
    again = train(config, checkpoint_path=path, progress=lambda *a: calls.append(a))
    same_run(full, again)  # a finished run returns its stored result
    assert calls == []


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    config = resumable(checkpoint_every=3)
    full = train(config)
    path = tmp_path / "run.pt"

    def kill_at_seven(step, total, loss):
        assert total == 12 and loss is not None
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, checkpoint_path=path, progress=kill_at_seven)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 6
    assert not list(tmp_path.glob(".run.pt.*"))  # no temporary files left behind
    steps = []
    resumed = train(config, checkpoint_path=path, progress=lambda s, t, loss: steps.append(s))
    assert steps == list(range(7, 13))
    same_run(full, resumed)

    fresh = train(config, checkpoint_path=path, resume=False, stop_after=2)
    assert fresh.steps_done == 2  # resume=False starts over


def test_resume_with_a_different_config_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    train(tiny(steps=2), checkpoint_path=path)
    with pytest.raises(UserError, match="differs in lr"):
        train(tiny(steps=2, lr=0.2), checkpoint_path=path)
    # fields that do not change the trajectory may differ
    assert train(tiny(steps=2, checkpoint_every=1), checkpoint_path=path).status == "completed"


def test_one_step_follows_the_recipe_order(tmp_path):
    """clip the raw gradient, then add wd * w to weights only, then the SGD step."""
    clip = {"mode": "agc", "threshold": 0.01}
    config = TrainConfig.from_dict(tiny(
        steps=1, warmup_fraction=0.0, lr=0.5, weight_decay=0.3, momentum=0.0, nesterov=False,
        label_smoothing=0.1, clip=clip, eval_every=0,
        model={**TINY_MODEL, "skipinit_gain": 1.0, "stochdepth_rate": 0.0},
    ))
    path = tmp_path / "one.pt"
    train(config, checkpoint_path=path)
    trained = torch.load(path, weights_only=True)["model"]

    ds = load_dataset("synthetic", train_size=256, test_size=64, seed=0, image_size=16)
    stream = BatchStream(ds.train_x, ds.train_y, 32, seed=config.seed, augment=config.augment)
    torch.manual_seed(config.seed)
    model = create_model("nf_resnet26", **config.model_overrides())
    xb, yb = stream.next()
    F.cross_entropy(model(xb), yb, label_smoothing=0.1).backward()
    stats = ClipConfig(**clip).apply(model)
    assert float(stats.clip_fraction) > 0.1  # clipping matters, so the order is visible
    expected = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            grad = p.grad + (0.3 * p if p.ndim > 1 else 0.0)
            expected[name] = p - 0.5 * grad
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_float16_amp_clips_unscaled_gradients():
    base = tiny(steps=3, eval_every=0, model={**TINY_MODEL, "skipinit_gain": 1.0})
    fp32 = train(base)
    fp16 = train({**base, "amp": True, "amp_dtype": "float16"})
    ratio = fp16.metrics["grad_norm"] / fp32.metrics["grad_norm"]
    assert ratio.between(0.9, 1.1).all()  # a scaled gradient would be ~65536x


@pytest.mark.slow
def test_probe_records_without_changing_training():
    config = tiny(steps=6, eval_every=0)
    plain = train(config)
    probed = train({**config, "probe_every": 3})
    same_run(plain, probed)
    assert not probed.blocks.empty
    assert sorted(probed.blocks["step"].unique().tolist()) == [0, 3]
    assert plain.blocks.empty


@pytest.mark.slow
def test_probe_records_survive_a_resume(tmp_path):
    config = tiny(steps=6, eval_every=0, probe_every=2)
    full = train(config)
    path = tmp_path / "probed.pt"
    assert train(config, checkpoint_path=path, stop_after=3).status == "stopped"
    resumed = train(config, checkpoint_path=path)
    same_run(full, resumed)
    assert sorted(resumed.blocks["step"].unique().tolist()) == [0, 2, 4]
    pd.testing.assert_frame_equal(full.blocks, resumed.blocks, check_exact=True)


def test_probe_factory_is_called_with_the_model():
    built = []

    def factory(model):
        built.append(model)
        return probes.Probe(model, every=4)

    result = train(tiny(steps=5, eval_every=0), probe=factory)
    assert len(built) == 1 and hasattr(built[0], "blocks")
    assert sorted(result.blocks["step"].unique().tolist()) == [0, 4]


# ----------------------------------------------------------------------------- config
def test_from_dict_accepts_nested_and_dotted_keys():
    nested = TrainConfig.from_dict({"model": {"alpha": 0.5}, "clip": {"mode": "agc",
                                                                      "threshold": 0.01}})
    dotted = TrainConfig.from_dict({"model.alpha": 0.5, "clip.mode": "agc",
                                    "clip.threshold": 0.01})
    assert nested == dotted
    assert nested.model == {"name": "nf_resnet26", "stem": "cifar", "width_mult": 0.25,
                            "alpha": 0.5}
    named = TrainConfig.from_dict({"model": {"name": "bn_resnet26_v2", "stem": "cifar"}})
    assert named.model == {"name": "bn_resnet26_v2", "stem": "cifar"}  # replaces the default
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0 and isinstance(
        TrainConfig.from_dict({"lr": 1}).lr, float)


def test_to_dict_is_canonical_json_and_round_trips():
    config = TrainConfig.from_dict({"model": {"depths": (1, 1, 1, 1), "name": "nf_resnet26"},
                                    "clip.mode": "norm", "clip.threshold": 1, "epochs": 2})
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert list(d["model"]) == sorted(d["model"]) and d["model"]["depths"] == [1, 1, 1, 1]
    assert d["clip"] == {"mode": "norm", "threshold": 1.0, "eps": 1e-3, "exclude": None,
                         "clip_classifier": False}
    # fields added later (micro_batch; the recorder's) are left out while unset or at their
    # default, so old run ids stay valid
    assert list(d) == [f for f in TrainConfig.field_names()
                       if f not in UNSET_OMITTED_FIELDS and f not in DEFAULT_OMITTED_FIELDS]
    assert TrainConfig.from_dict(d).to_dict() == d


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ({"lrr": 0.1}, r"unknown key 'lrr'; valid keys: model, data"),
        ({"batch_size": 0}, r"batch_size must be > 0"),
        ({"batch_size": "64"}, r"batch_size must be an integer"),
        ({"batch_size": 64.0}, r"batch_size must be an integer"),
        ({"lr": -0.1}, r"lr must be > 0"),
        ({"epochs": True}, r"epochs must be a number"),
        ({"epochs": 2, "steps": 10}, r"either epochs or steps"),
        ({"model": {"name": "resnet9000"}}, r"model\.name: unknown model 'resnet9000'"),
        ({"model.alpah": 0.2}, r"model: unknown option\(s\) alpah"),
        ({"model.width_mult": -1}, r"model: .*width_mult"),
        ({"model.num_classes": 100}, r"model\.num_classes is 100"),
        ({"data": "imagenet"}, r"data: unknown data set 'imagenet'; valid: synthetic"),
        ({"clip.mode": "clipz"}, r"clip\.mode must be one of agc, norm, none"),
        ({"clip.mode": "agc"}, r"clip\.threshold is required"),
        ({"clip.lambda": 0.1}, r"unknown key\(s\) clip\.lambda"),
        ({"device": "tpu"}, r"device must be"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        ({"warmup_fraction": -0.1}, r"warmup_fraction must be in"),
        ({"model": "nf_resnet26"}, r"model must be a table"),
    ],
)
def test_bad_configs_raise_user_error_naming_the_field(bad, pattern):
    with pytest.raises(UserError, match=pattern) as info:
        TrainConfig.from_dict(bad)
    assert "\n" not in str(info.value)


def test_train_rejects_a_batch_larger_than_the_data():
    with pytest.raises(UserError, match="batch_size 512 is larger"):
        train(tiny(batch_size=512))


# ----------------------------------------------------------------------------- progress
def bar_frames(err: str) -> list[str]:
    """What a tqdm bar drew, one entry per redraw (it rewrites its line after a carriage
    return)."""
    return [frame.strip() for frame in err.replace("\n", "\r").split("\r") if frame.strip()]


def test_progress_true_draws_a_bar_on_stderr_up_to_the_last_step(capsys):
    result = train(tiny(steps=6, eval_every=0), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    last = bar_frames(captured.err)[-1]
    assert last.startswith("nf_resnet26: 100%") and " 6/6 " in last, captured.err
    # its postfix is the loss of the last step, as the metrics hold it
    assert last.endswith(f"loss={result.metrics['loss'].iloc[-1]:.4g}]"), last


@pytest.mark.parametrize("quiet", [False, None])
def test_progress_false_or_none_is_silent(capsys, quiet):
    train(tiny(steps=2, eval_every=0), progress=quiet)
    assert capsys.readouterr() == ("", "")


def test_progress_callable_gets_every_step_with_its_loss():
    calls = []
    result = train(tiny(steps=6, eval_every=2), progress=lambda *a: calls.append(a))
    # on CPU every step's loss reaches the host at once, so none is None
    assert calls == [(step, 6, loss) for step, loss in
                     zip(range(1, 7), result.metrics["loss"].tolist())]


def test_progress_tqdm_like_object_gets_one_update_per_step_and_the_loss():
    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, []

        def update(self, n):
            self.n += n

        def set_postfix(self, refresh=True, **values):
            self.postfix.append((self.n, values["loss"]))

    bar = Bar()
    result = train(tiny(steps=5, eval_every=0), progress=bar)
    assert bar.n == 5
    # each step's loss is set before that step's update, so a redraw shows it
    assert bar.postfix == [(n, f"{loss:.4g}") for n, loss in
                           enumerate(result.metrics["loss"].tolist())]


def test_progress_bar_of_a_resumed_stopped_or_diverged_run_says_so(tmp_path, capsys):
    path = tmp_path / "run.pt"
    config = tiny(steps=6, eval_every=0)
    train(config, checkpoint_path=path, stop_after=2, progress=True)
    frames = bar_frames(capsys.readouterr().err)
    assert " 2/6 " in frames[-1] and frames[-1].endswith("stopped at step 2]"), frames
    train(config, checkpoint_path=path, progress=True)
    frames = bar_frames(capsys.readouterr().err)
    assert " 2/6 " in frames[0] and " 6/6 " in frames[-1], frames  # from where it resumed

    diverged = train(tiny(lr=1e3, warmup_fraction=0.0, steps=15, eval_every=0), progress=True)
    assert diverged.status == "diverged"
    last = bar_frames(capsys.readouterr().err)[-1]
    assert last.endswith(f"diverged at step {diverged.diverged_step}]"), last


def test_progress_of_another_kind_is_one_line_naming_it():
    with pytest.raises(UserError, match="progress must be True .* got str"):
        train(tiny(steps=1), progress="yes")
