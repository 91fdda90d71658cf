"""The flight recorder (sigprop.recorder), the diagnosis (sigprop.diagnosis) and what the store
keeps of them (flight.parquet, the summary's diagnosis, load_results().flight, acc_chance)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from ablations.runner import status_table
from ablations.store import FLIGHT_COLUMNS, GridStore, load_results
from run_ablations import main
from sigprop.diagnosis import RULE, diagnose
from sigprop.errors import UserError
from sigprop.probes import Probe
from sigprop.recorder import FlightRecorder
from sigprop.train import TrainConfig, train
from tests.helpers import tiny_spec

TINY_MODEL = {"name": "nf_resnet26", "stem": "cifar", "width_mult": 0.125,
              "depths": [1, 1, 1, 1], "skipinit_gain": 1.0}


def tiny(**changes) -> dict:
    config = {"model": dict(TINY_MODEL), "train_size": 256, "test_size": 64, "batch_size": 32,
              "steps": 14, "lr": 0.01, "image_size": 16, "eval_every": 0,
              "warmup_fraction": 0.0, "clip": {"mode": "none"}}
    config.update(changes)
    return config


def blow_up(block: str, at: int):
    """A probe factory that sets ``block``'s skip gain to 1e6 just before its forward of
    training step ``at``: its output (and the loss) explodes at that step, nothing before."""
    def factory(model):
        module, seen = model.get_submodule(block), [0]

        def pre_hook(mod, args):
            if mod.training and torch.is_grad_enabled():
                if seen[0] == at:
                    with torch.no_grad():
                        mod.skip_gain.fill_(1e6)
                seen[0] += 1

        module.register_forward_pre_hook(pre_hook)
        return Probe(model, every=10**6)  # records step 0 only
    return factory


@pytest.fixture
def recorders(monkeypatch):
    """Every FlightRecorder built while the test runs."""
    made = []
    init = FlightRecorder.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(FlightRecorder, "__init__", spy)
    return made


# ----------------------------------------------------------------------------- recording

def test_a_run_at_a_huge_lr_keeps_every_step_up_to_its_divergence():
    result = train(tiny(lr=1e4, steps=20))
    assert result.status == "diverged"
    d = result.diverged_step
    flight = result.flight
    assert list(flight.columns) == ["step", "block", "stage", "index", "stat", "value"]
    assert set(flight["step"]) == set(range(d + 1))
    blocks = set(flight["block"])
    assert {"stem", "stages.0.0", "stages.3.0", "other", "run"} <= blocks
    per_step = flight.groupby("step").size()
    assert per_step.nunique() == 1  # every step has every statistic
    run = flight[flight["block"] == "run"].pivot(index="step", columns="stat", values="value")
    np.testing.assert_allclose(run["loss"].to_numpy(), result.metrics["loss"].to_numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(run["lr"].to_numpy(), result.metrics["lr"].to_numpy())
    assert set(run["clipped"]) == {0.0}  # clip mode none


@pytest.mark.slow
def test_the_ring_keeps_the_first_steps_and_the_last_ones_before_a_late_divergence():
    result = train(tiny(record_early=2, record_ring=3), probe=blow_up("stages.1.0", 9))
    assert (result.status, result.diverged_step) == ("diverged", 9)
    assert sorted(set(result.flight["step"])) == [0, 1, 7, 8, 9]


@pytest.mark.slow
def test_the_diagnosis_names_the_block_whose_gain_was_made_to_blow_up():
    result = train(tiny(), probe=blow_up("stages.2.0", 8))
    assert (result.status, result.diverged_step) == ("diverged", 8)
    assert set(result.flight["step"]) == set(range(9))
    found = diagnose(result.flight, 8)
    assert found["diverged_block"] == "stages.2.0"
    assert found["diverged_first_step"] == 8
    assert found["diverged_first_kind"] == "activations"
    assert found["diverged_clipping_active"] is False
    assert "stages.2.0" in found["diagnosis"]


@pytest.mark.slow
def test_a_run_that_does_not_diverge_never_reads_its_recorder(recorders, monkeypatch):
    read = []
    monkeypatch.setattr(FlightRecorder, "flight",
                        lambda self, step: read.append(step) or pd.DataFrame())
    config = tiny(steps=8, record_early=3, record_ring=2)
    result = train(config)
    assert result.status == "completed" and result.flight.empty
    (recorder,) = recorders
    assert read == [] and recorder.host_transfers == 0
    # it did record (on the device): the first 3 steps and the last 2
    assert recorder.recorded_steps() == [0, 1, 2, 6, 7]
    assert torch.isfinite(recorder._buffer).any()
    # and it changes no number of the run
    off = train({**config, "record_early": 0, "record_ring": 0})
    pd.testing.assert_frame_equal(result.metrics.drop(columns="step_time"),
                                  off.metrics.drop(columns="step_time"), check_exact=True)


def test_recorder_settings_are_validated_and_left_out_of_the_config_at_their_defaults():
    for bad in (-1, 1.5, "x", True):
        with pytest.raises(UserError, match="record_early"):
            TrainConfig.from_dict(tiny(record_early=bad))
    with pytest.raises(UserError, match="record_ring"):
        TrainConfig.from_dict(tiny(record_ring=-3))
    default = TrainConfig.from_dict(tiny()).to_dict()
    assert "record_early" not in default and "record_ring" not in default  # run ids unchanged
    changed = TrainConfig.from_dict(tiny(record_ring=5)).to_dict()
    assert changed["record_ring"] == 5 and TrainConfig.from_dict(changed).record_ring == 5
    with pytest.raises(UserError):
        FlightRecorder(torch.nn.Linear(2, 2), early=0, ring=0)


# ----------------------------------------------------------------------------- the rule

def frame(series: dict[tuple[str, int, str], list[float]], clipped: list[float] | None = None
          ) -> pd.DataFrame:
    """A flight frame from {(block, index, stat): values per step}."""
    rows = []
    for (block, index, stat), values in series.items():
        rows += [(s, block, 0, index, stat, v) for s, v in enumerate(values)]
    for s, v in enumerate(clipped or []):
        rows.append((s, "run", -1, -1, "clipped", v))
    return pd.DataFrame(rows, columns=["step", "block", "stage", "index", "stat", "value"])


FLAT = [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 0.95, 1.0]


def test_the_rule_names_the_block_that_left_its_range_first():
    flight = frame({
        ("a", 0, "var"): FLAT,
        ("b", 1, "grad_norm"): FLAT[:5] + [30.0, 300.0, np.inf],  # leaves at step 5
        ("c", 2, "var"): FLAT[:6] + [50.0, np.nan],  # leaves at step 6
        ("c", 2, "update_ratio"): FLAT,
    }, clipped=[0, 0, 0, 0, 0, 1, 1, 1])
    found = diagnose(flight, 7)
    assert found == {
        "diverged_block": "b", "diverged_first_step": 5, "diverged_first_stat": "grad_norm",
        "diverged_first_kind": "gradients", "diverged_clipping_active": True,
        "diagnosis": found["diagnosis"],
    }
    assert found["diagnosis"].startswith("diverged at step 7: b broke first, at step 5")
    assert "clipping was active" in found["diagnosis"]


def test_within_a_step_the_forward_pass_orders_the_blocks():
    # a blow-up in block b shows in the outputs of b and of every block after it at once
    flight = frame({(name, i, "var"): FLAT[:4] + [1e4, 1e6] for i, name in
                    enumerate(["a", "b", "c"])})
    flight.loc[(flight["block"] == "a") & (flight["step"] >= 4), "value"] = 1.0
    found = diagnose(flight, 5)
    assert (found["diverged_block"], found["diverged_first_step"]) == ("b", 4)
    assert found["diverged_first_kind"] == "activations"
    assert found["diverged_clipping_active"] is None  # not recorded here


def test_two_blocks_leaving_together_are_both_named_and_no_block_is_guessed():
    flight = frame({
        ("a", 0, "update_ratio"): FLAT[:4] + [40.0, 50.0],
        ("b", 1, "update_ratio"): FLAT[:4] + [20.0, 90.0],
        ("b", 1, "var"): FLAT[:6],
    })
    found = diagnose(flight, 5)
    assert found["diverged_block"] is None
    assert found["diverged_first_step"] == 4 and found["diverged_first_kind"] == "update"
    assert "blocks a, b at step 4" in found["diagnosis"]
    assert "does not single out one block" in found["diagnosis"]


def test_too_few_steps_or_no_record_give_no_diagnosis_and_say_why():
    short = diagnose(frame({("a", 0, "var"): [1.0, 1.0, 1e9]}), 2)
    assert short["diverged_block"] is None and short["diverged_first_step"] is None
    assert "fewer than 3" in short["diagnosis"]
    assert "recorder was off" in diagnose(pd.DataFrame(), 4)["diagnosis"]
    assert "singles out no block" in diagnose(frame({("a", 0, "var"): FLAT}), 7)["diagnosis"]
    assert set(diagnose(None, None).values()) == {None}
    assert "10x" in RULE and "median" in RULE


# ----------------------------------------------------------------------------- the store

SPEC = tiny_spec(train_size=64, test_size=32, steps=6, eval_every=3,
                 clip='mode = "none"', grid="lr = [0.05, 1e6]")


@pytest.fixture(scope="module")
def store_with_a_diverged_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flight")
    spec = root / "tiny.toml"
    spec.write_text(textwrap.dedent(SPEC))
    out = root / "out"
    assert main(["run", str(spec), "--out", str(out), "--device", "cpu", "--no-report",
                 "-q"]) == 0
    return out


@pytest.mark.slow
def test_load_results_gives_the_flight_of_diverged_runs_and_acc_chance(
        store_with_a_diverged_run):
    out = store_with_a_diverged_run
    results = load_results(out)
    runs = results.runs.set_index("lr")
    diverged, completed = runs.loc[1e6], runs.loc[0.05]
    assert (diverged["status"], completed["status"]) == ("diverged", "completed")
    assert list(results.flight.columns) == FLIGHT_COLUMNS
    assert set(results.flight["run_id"]) == {diverged["run_id"]}
    steps = set(results.flight["step"])
    assert steps == set(range(int(diverged["diverged_step"]) + 1))
    store = GridStore(out, "tiny")
    assert not (store.run_dir(completed["run_id"]) / "flight.parquet").exists()
    # the one rule for diverged runs: at chance (10 classes), as the claims count them
    assert diverged["acc_chance"] == pytest.approx(0.1)
    assert completed["acc_chance"] == completed["final_acc"]
    assert isinstance(diverged["diagnosis"], str) and diverged["diagnosis"].startswith(
        f"diverged at step {int(diverged['diverged_step'])}")
    assert pd.isna(completed["diagnosis"]) and pd.isna(completed["diverged_block"])
    # status shows it, one line per diverged run
    table = status_table(out).set_index("run_id")
    assert table.loc[diverged["run_id"], "diagnosis"] == diverged["diagnosis"]
    assert table.loc[completed["run_id"], "diagnosis"] == ""


@pytest.mark.slow
def test_status_prints_the_diagnosis_line(store_with_a_diverged_run, capsys):
    out = store_with_a_diverged_run
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    diverged = load_results(out).runs.query("status == 'diverged'").iloc[0]
    assert f"tiny/{diverged['run_id']}: {diverged['diagnosis']}" in printed


@pytest.mark.slow
def test_an_unreadable_flight_file_makes_its_run_damaged(store_with_a_diverged_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(store_with_a_diverged_run, out)
    runs = load_results(out).runs
    rid = runs.loc[runs["status"] == "diverged", "run_id"].iloc[0]
    (GridStore(out, "tiny").run_dir(rid) / "flight.parquet").write_bytes(b"PAR1 cut short")
    for with_frames in (True, False):
        again = load_results(out, with_frames=with_frames)
        row = again.runs.set_index("run_id").loc[rid]
        assert row["status"] == "damaged" and row["error"].startswith("flight.parquet:")
        assert again.flight.empty and list(again.flight.columns) == FLIGHT_COLUMNS
    assert GridStore(out, "tiny").damage(rid).path.name == "flight.parquet"


@pytest.mark.slow
def test_summary_fields_of_the_wrong_type_make_the_status_damaged(store_with_a_diverged_run,
                                                                   tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(store_with_a_diverged_run, out)
    store = GridStore(out, "tiny")
    rid = load_results(out).runs.query("status == 'diverged'")["run_id"].iloc[0]
    path = store.run_dir(rid) / "status.json"
    status = json.loads(path.read_text())
    status["summary"]["diverged_clipping_active"] = "yes"
    path.write_text(json.dumps(status))
    row = load_results(out).runs.set_index("run_id").loc[rid]
    assert row["status"] == "damaged" and "diverged_clipping_active" in row["error"]


FRONTIER_SPEC = tiny_spec("edge", train_size=64, test_size=32, steps=4,
                          clip='mode = "none"', grid="") + """[frontier]
lr_min = 0.01
lr_max = 1e6
resolution = 100.0
"""


@pytest.mark.slow
def test_a_diverged_frontier_probe_gets_its_flight_file(tmp_path):
    import io

    from ablations.executors import LocalExecutor
    from ablations.frontier import run_frontier
    from ablations.spec import load_spec

    spec = tmp_path / "edge.toml"
    spec.write_text(textwrap.dedent(FRONTIER_SPEC))
    run_frontier(load_spec(spec), tmp_path / "out", LocalExecutor(1, "cpu"),
                 stream=io.StringIO())
    results = load_results(tmp_path / "out")
    diverged = results.runs[results.runs["status"] == "diverged"]
    assert len(diverged) >= 1
    store = GridStore(tmp_path / "out", "edge")
    for rid, step in zip(diverged["run_id"], diverged["diverged_step"]):
        assert (store.run_dir(rid) / "flight.parquet").is_file()
        kept = results.flight[results.flight["run_id"] == rid]
        assert set(kept["step"]) == set(range(int(step) + 1))
    assert diverged["diagnosis"].map(lambda t: isinstance(t, str) and bool(t)).all()
