"""Shape-based model labels, scalar-gain diagnostics, and the report's claims and settings."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from ablations.executors import LocalExecutor
from ablations.runner import dry_run_table, run_grid
from ablations.spec import expand, load_spec
from ablations.store import load_results
from reports.build import build_report
from sigprop.clipping import ClipConfig
from sigprop.gains import ZeroGainCheck
from sigprop.models import create_model
from sigprop.models.labels import model_departures, model_label
from sigprop.probes import Probe
from sigprop.train import train
from tests.helpers import tiny_spec

TINY = {"name": "nf_resnet26", "stem": "cifar", "width_mult": 0.125, "depths": [1, 1, 1, 1]}
SHAPE = {k: v for k, v in TINY.items() if k != "name"}


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("name, overrides, label", [
    ("nf_resnet26", {}, "NF-ResNet-26"),
    ("nf_resnet50", {"num_classes": 10, "alpha": 0.4}, "NF-ResNet-50"),
    ("nf_resnet26", {"depths": [1, 1, 1, 1], "width_mult": 0.125}, "NF-ResNet [1,1,1,1] x0.125"),
    ("nf_resnet26", {"depths": [2, 2, 2, 2], "width_mult": 0.5}, "NF-ResNet-26 x0.5"),
    ("bn_resnet26_v2", {"depths": [1, 1, 1, 1]}, "BN-ResNet [1,1,1,1] v2"),
    ("bn_resnet50_v1", {}, "BN-ResNet-50 v1"),
    ("nfnet_f0", {}, "NFNet-F0"),
    ("nfnet_f1", {"depths": [1, 2, 6, 3]}, "NFNet [1,2,6,3]"),
    ("nf_resnet50", {"ws": False}, "NF-ResNet-50 (no WS)"),
    ("bn_resnet50_v2", {"order": "act_bn_conv"}, "BN-ResNet-50 v2 (ReLU-BN-Conv)"),
])
def test_models_are_named_by_what_was_built(name, overrides, label):
    assert model_label(name, overrides) == label


def test_departures_list_the_authors_defaults_a_run_changes():
    changed = model_departures("nf_resnet26", {**TINY, "num_classes": 10, "skipinit_gain": 1.0,
                                               "alpha": 0.2})
    assert changed == {"depths": [2, 2, 2, 2], "skipinit_gain": 0.0, "stem": "imagenet",
                       "width_mult": 1.0}  # alpha 0.2 is the default: no departure


def grid_spec(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "g.toml"
    path.write_text(tiny_spec("g", description="Does AGC change a tiny NF-ResNet?",
                              train_size=64, test_size=32, image_size=8, steps=4, seed=None,
                              probe_every=1, clip='mode = "agc"\nthreshold = 0.01',
                              grid='"model.skipinit_gain" = [0.0, 1.0]\nseed = [0, 1]')
                    + textwrap.dedent(extra))
    return path


def test_dry_run_lists_the_shape_label(tmp_path):
    runs = expand(load_spec(grid_spec(tmp_path)))
    assert set(dry_run_table(runs)["model"]) == {"NF-ResNet [1,1,1,1] x0.125"}


# ----------------------------------------------------------------------------- gains


@pytest.mark.slow
def test_probe_records_each_blocks_scalar_gain_by_value():
    torch.manual_seed(0)
    model = create_model("nf_resnet26", **{**SHAPE, "num_classes": 10, "skipinit_gain": 0.5})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, every=1) as probe:
        for step in range(2):
            probe.start_step(step)
            model(torch.randn(4, 3, 8, 8)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 0:
                updated = {n: float(p.detach()) for n, p in model.named_parameters() if p.ndim == 0}
        records = probe.records()
    gains = records[records["stat"] == "gain:skip_gain"]
    assert len(gains) == 8  # 4 blocks x 2 steps
    first = gains[gains["step"] == 0].set_index("block")["value"]
    assert (first == 0.5).all()
    # step 1's forward uses (and records) the gains after step 0's update
    second = gains[gains["step"] == 1].set_index("block")["value"]
    assert {f"{block}.skip_gain": v for block, v in second.items()} == pytest.approx(updated)
    assert not (second == 0.5).all()


def test_zero_gain_check_measures_the_ratio_agc_bounds():
    torch.manual_seed(0)
    model = create_model("nf_resnet26", **{**SHAPE, "num_classes": 10, "skipinit_gain": 0.0})
    clipper = ClipConfig(mode="agc", threshold=0.01).clipper(model)
    check = ZeroGainCheck(clipper, steps=3)
    assert len(check.params) == 4
    model(torch.randn(8, 3, 8, 8)).logsumexp(1).mean().backward()
    check.observe(0)
    grads = torch.stack([p.grad.abs() for p in check.params])
    expected = grads / (0.01 * 1e-3)  # |G| / (lambda * max(|g|, eps)) with g = 0
    torch.testing.assert_close(check.ratios[0], expected)
    stats = check.summary()
    assert stats["gains"] == 4 and stats["steps"] == 1
    assert stats["median_ratio"] == pytest.approx(float(expected.median()))
    # other modes and gains that start at 1 are not watched
    assert not ZeroGainCheck(ClipConfig(mode="norm", threshold=1.0).clipper(model)).params
    one = create_model("nf_resnet26", **{**SHAPE, "num_classes": 10, "skipinit_gain": 1.0})
    assert not ZeroGainCheck(ClipConfig(mode="agc", threshold=0.01).clipper(one)).params


@pytest.mark.slow
def test_a_run_warns_when_agc_holds_zero_gains_at_zero():
    base = {"data": "synthetic", "train_size": 64, "test_size": 32, "image_size": 8, "steps": 12,
            "batch_size": 16, "eval_every": 0, "base_lr": 0.8, "device": "cpu",
            "clip": {"mode": "agc", "threshold": 0.01}}
    held = train({**base, "model": {**TINY, "skipinit_gain": 0.0}})
    assert len(held.warnings) == 1 and "bounds 4 scalar gain(s) that start at 0" in \
        held.warnings[0]
    assert held.gain_check["steps"] == 10 and held.gain_check["clipped_fraction"] >= 0.5
    assert held.gain_check["median_ratio"] > 1
    free = train({**base, "model": {**TINY, "skipinit_gain": 1.0}})
    assert free.warnings == [] and free.gain_check is None
    unclipped = train({**base, "model": {**TINY, "skipinit_gain": 0.0},
                       "clip": {"mode": "none"}})
    assert unclipped.warnings == []


@pytest.mark.slow
def test_gain_check_survives_a_resume(tmp_path):
    config = {"data": "synthetic", "train_size": 64, "test_size": 32, "image_size": 8,
              "steps": 12, "batch_size": 16, "eval_every": 0, "device": "cpu",
              "model": {**TINY, "skipinit_gain": 0.0}, "clip": {"mode": "agc", "threshold": 0.01}}
    whole = train(config)
    path = tmp_path / "c.pt"
    train(config, checkpoint_path=path, stop_after=5)
    resumed = train(config, checkpoint_path=path)
    assert resumed.gain_check == whole.gain_check and resumed.warnings == whole.warnings


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_grid_report_shows_claims_settings_gains_and_the_warning(tmp_path):
    spec = grid_spec(tmp_path, """
        [[claims]]
        id = "G1"
        text = "Gains that start at 1 train better than gains held at 0."
        source = "facts file, section 8"
        check = "compare"
        a = { "model.skipinit_gain" = 1.0 }
        b = { "model.skipinit_gain" = 0.0 }
        relation = "exceeds"
    """)
    outcome = run_grid(load_spec(spec), tmp_path / "out", LocalExecutor(workers=1))
    runs = load_results(outcome.grid_dir).runs
    assert set(runs["model_label"]) == {"NF-ResNet [1,1,1,1] x0.125"}
    held = runs[runs["model.skipinit_gain"] == 0.0]
    assert all(len(w) == 1 for w in held["warnings"])
    assert runs.loc[runs["model.skipinit_gain"] == 1.0, "warnings"].map(len).eq(0).all()
    assert held["gain_clip_ratio"].gt(1).all()
    paths = build_report(outcome.grid_dir)
    text = paths["md"].read_text()
    assert "## Claims" in text and "| G1 |" in text
    verdict = next(line for line in text.splitlines() if line.startswith("| G1 |"))
    assert verdict.split(" | ")[2] in ("holds", "does not hold", "inconclusive")
    assert "What the runs show: of 1 claim(s) this grid tests" in text
    assert "2 of 4 runs: AGC (lambda=0.01) bounds 4 scalar gain(s) that start at 0" in text
    assert "## Scalar gains" in text and (outcome.grid_dir / "report_files/gains.png").is_file()
    settings = text.split("## Settings")[1].split("##")[0]
    assert "| model.stem | cifar | imagenet |" in settings
    assert "| augment | crop |  |" in settings


def test_settings_section_skips_varied_keys():
    from reports.build import settings_section

    frame = pd.DataFrame({"run_id": ["a", "b"], "axes": [("seed",), ("seed",)],
                          "seed": [0, 1], "data": ["digits", "digits"], "status": "completed",
                          "model.alpha": [0.2, 0.2], "model_departures": [{}, {}]})
    table = settings_section(frame).parts[1].frame
    assert list(table["setting"]) == ["data", "model.alpha"]
