"""``export tensorboard``: a real tiny grid exported and read back with tensorboard's own reader.

The grid varies a number (``base_lr``: 0.1 trains, 1e6 diverges at step 1) and a word
(``augment``), so the export meets completed and diverged runs, blank metrics, infinite-sized
numbers and both hparam types.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, metadata  # noqa: E402

from ablations.runner import run_grid  # noqa: E402
from ablations.spec import load_spec  # noqa: E402
from ablations.store import RunLock, load_results  # noqa: E402
from reports.tensorboard import (  # noqa: E402
    EVAL_METRIC_COLUMNS,
    LOCK,
    MANIFEST,
    METRICS,
    RUN_MARK,
    export_tensorboard,
    hparam_axes,
    run_folder_name,
    watch_tensorboard,
)
from run_ablations import main  # noqa: E402
from tests.helpers import InlineExecutor, tiny_spec  # noqa: E402

SPEC = tiny_spec("tb", steps=3, eval_every=2, checkpoint_every=0, probe_every=1,
                 grid='base_lr = [0.1, 1e6]\naugment = ["crop", "none"]')


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The tiny grid, run in this process: two runs completed, two diverged."""
    folder = tmp_path_factory.mktemp("tb_grid")
    (folder / "tb.toml").write_text(SPEC)
    outcome = run_grid(load_spec(folder / "tb.toml"), folder / "out", InlineExecutor(),
                       stream=io.StringIO())
    assert outcome.counts == {"completed": 2, "diverged": 2}
    return folder / "out" / "tb"


@pytest.fixture
def grid(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "out" / "tb"))


def accumulator(folder: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def run_folders(out: Path) -> dict[str, Path]:
    """{run_id: folder} read from the run marks."""
    folders = {}
    for folder in (p for p in out.iterdir() if p.is_dir()):
        run_id = json.loads((folder / RUN_MARK).read_text())["run_id"]
        assert run_id not in folders
        folders[run_id] = folder
    return folders


def scalars(acc: ea.EventAccumulator, tag: str) -> tuple[list[int], np.ndarray]:
    events = acc.Scalars(tag)
    return [e.step for e in events], np.array([e.value for e in events], dtype=np.float32)


def expected_series(frame: pd.DataFrame, column: str = "value") -> tuple[list[int], np.ndarray]:
    kept = frame[frame[column].notna()].sort_values("step", kind="stable")
    return kept["step"].tolist(), kept[column].to_numpy(dtype=np.float32)


def test_eval_columns_match_the_trainer():
    from sigprop.train import EVAL_COLUMNS

    assert set(EVAL_METRIC_COLUMNS) == set(EVAL_COLUMNS) - {"step", "epoch"}


def test_export_round_trips_scalars_and_hparams(grid, tmp_path):
    out = tmp_path / "tb"
    result = export_tensorboard(grid, out)
    stored = load_results(grid)
    runs = stored.runs.set_index("run_id")
    assert len(result.added) == 4 and result.kept == 0 and not result.waiting

    folders = run_folders(out)
    assert set(folders) == set(runs.index)
    for run_id, folder in folders.items():
        assert folder.name.endswith(f"-{run_id}")
        assert len(list(folder.glob("*tfevents*"))) == 1
        acc = accumulator(folder)
        run = runs.loc[run_id]

        metrics = stored.metrics[stored.metrics["run_id"] == run_id]
        blocks = stored.blocks[stored.blocks["run_id"] == run_id]
        expected_tags = set()
        for column in metrics.columns.drop(["grid", "run_id", "step"]):
            tag = f"{'eval' if column in EVAL_METRIC_COLUMNS else 'train'}/{column}"
            if metrics[column].notna().any():
                expected_tags.add(tag)
                steps, values = scalars(acc, tag)
                want_steps, want = expected_series(metrics, column)
                assert steps == want_steps, tag
                np.testing.assert_array_equal(values, want, err_msg=tag)
        for (block, stat), frame in blocks.groupby(["block", "stat"]):
            tag = f"blocks/{'head' if block == 'other' else block}/{stat}"  # the report's name
            expected_tags.add(tag)
            steps, values = scalars(acc, tag)
            want_steps, want = expected_series(frame)
            assert steps == want_steps, tag
            np.testing.assert_array_equal(values, want, err_msg=tag)

        last_step = int(metrics["step"].max())
        for name in METRICS:
            value = run[name]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue  # not applicable: not written, a blank cell in the HParams table
            expected_tags.add(f"summary/{name}")
            assert scalars(acc, f"summary/{name}") == ([last_step], np.float32([value]))
        assert set(acc.Tags()["scalars"]) == expected_tags
        if run["status"] == "diverged":
            assert "summary/final_acc" not in expected_tags
            assert scalars(acc, "summary/diverged_step")[1].tolist() == [run["diverged_step"]]
            assert np.isinf(scalars(acc, "summary/max_grad_norm")[1]).sum() == 0
        else:
            assert "summary/diverged_step" not in expected_tags

        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(
            content[metadata.SESSION_START_INFO_TAG])
        assert start.group_name == run_id
        assert set(start.hparams) == {"base_lr", "augment", "lr"}
        assert start.hparams["base_lr"].number_value == run["base_lr"]
        assert start.hparams["lr"].number_value == run["lr"]  # the effective peak lr
        assert start.hparams["augment"].string_value == run["augment"]
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        assert end.status == (api_pb2.STATUS_SUCCESS if run["status"] == "completed"
                              else api_pb2.STATUS_FAILURE)

    root = accumulator(out)  # the experiment config, once, at the root of the log dir
    assert root.Tags()["scalars"] == []
    experiment = metadata.parse_experiment_plugin_data(
        root.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG])
    infos = {info.name: info for info in experiment.hparam_infos}
    assert set(infos) == {"base_lr", "augment", "lr"}
    assert experiment.name == "tb"
    assert infos["base_lr"].type == api_pb2.DATA_TYPE_FLOAT64
    assert [v.number_value for v in infos["base_lr"].domain_discrete.values] == [0.1, 1e6]
    assert infos["augment"].type == api_pb2.DATA_TYPE_STRING
    assert [v.string_value for v in infos["augment"].domain_discrete.values] == ["crop", "none"]
    assert [m.name.tag for m in experiment.metric_infos] == [f"summary/{m}" for m in METRICS]


def test_export_again_and_live_add_only_new_runs(grid, tmp_path):
    out = tmp_path / "tb"
    pending = sorted(p for p in (grid / "runs").iterdir())[0]
    finished_status = (pending / "status.json").read_text()
    (pending / "status.json").write_text(json.dumps({"state": "queued", "attempts": 0}))

    lines, sleeps = [], []

    def sleep(seconds: float) -> None:  # the grid finishes its last run meanwhile
        sleeps.append(seconds)
        (pending / "status.json").write_text(finished_status)

    result = watch_tensorboard(grid, out, 5, say=lambda r: lines.append(r.line()),
                               sleep=sleep)
    assert sleeps == [5]
    assert "3 runs added" in lines[0] and "1 not finished yet" in lines[0]
    assert "1 run added, 3 already there" in lines[1] and len(lines) == 2
    assert len(result.added) == 1 and result.added[0].endswith(pending.name)

    again = export_tensorboard(grid, out)
    assert again.added == [] and again.kept == 4
    folders = run_folders(out)
    assert set(folders) == {p.name for p in (grid / "runs").iterdir()}
    metrics = load_results(grid).metrics
    for run_id, folder in folders.items():
        assert len(list(folder.glob("*tfevents*"))) == 1
        expected = metrics[(metrics["run_id"] == run_id) & metrics["loss"].notna()]
        assert scalars(accumulator(folder), "train/loss")[0] == expected["step"].tolist()
    assert len(list(out.glob("*tfevents*"))) == 1


def test_an_export_cut_short_is_redone(grid, tmp_path):
    out = tmp_path / "tb"
    export_tensorboard(grid, out)
    folder = next(iter(run_folders(out).values()))
    (folder / RUN_MARK).unlink()  # as if the export died before marking the run done
    result = export_tensorboard(grid, out)
    assert result.added == [folder.name] and result.kept == 3
    assert len(list(folder.glob("*tfevents*"))) == 1


def test_hparam_axes_types_domains_and_blanks():
    runs = pd.DataFrame({
        "axes": [("clip.threshold", "flag", "mix", "model.depths")] * 3,
        "clip.threshold": [0.01, np.nan, None],
        "flag": [True, False, True],
        "mix": [1, "auto", 2],
        "model.depths": [(1, 1), (2, 2), (1, 1)],
    })
    axes = {axis.name: axis for axis in hparam_axes(runs)}
    assert {n: (a.dtype, a.values) for n, a in axes.items()} == {
        "clip.threshold": (float, (0.01,)),
        "flag": (bool, (False, True)),
        "mix": (str, ("1", "2", "auto")),
        "model.depths": (str, ("[1, 1]", "[2, 2]")),
    }
    assert axes["clip.threshold"].value(np.nan) is None
    assert axes["clip.threshold"].value(None) is None
    assert axes["mix"].value(2) == "2"
    hparams = {"batch_size": 256.0, "clip.threshold": None, "data_dir": "/data/x y"}
    assert run_folder_name(hparams, "abc123") == "batch_size=256,data_dir=_data_x_y-abc123"


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    assert lines[0].startswith("sigprop: error: ")
    return lines[0]


def test_cli_exports_and_prints_the_tensorboard_command(grid, tmp_path, capsys):
    out = tmp_path / "logs"
    assert main(["export", "tensorboard", str(grid), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {out}" in printed and "4 runs added" in printed
    assert (out / MANIFEST).is_file() and len(run_folders(out)) == 4
    assert main(["export", "tensorboard", str(grid)]) == 0  # default: inside the grid
    assert f"tensorboard --logdir {grid / 'tensorboard'}" in capsys.readouterr().out
    assert len(run_folders(grid / "tensorboard")) == 4
    moved = Path(shutil.move(grid, tmp_path / "moved" / "tb"))  # the export moves with it
    assert main(["export", "tensorboard", str(moved)]) == 0
    assert "0 runs added, 4 already there" in capsys.readouterr().out


def test_cli_quiet_prints_nothing_and_verbose_names_every_folder(grid, tmp_path, capsys):
    assert main(["export", "tensorboard", str(grid), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert len(run_folders(tmp_path / "a")) == 4
    out = tmp_path / "b"
    assert main(["export", "tensorboard", str(grid), "--out", str(out), "-v"]) == 0
    printed = capsys.readouterr().out
    assert sorted(line.strip() for line in printed.splitlines() if line.startswith("  ")) == \
        sorted(str(folder) for folder in run_folders(out).values())


def test_cli_bad_input_is_one_line(grid, tmp_path, capsys, monkeypatch):
    export = ["export", "tensorboard"]
    assert "is not a grid folder" in one_line_error(capsys, [*export, str(tmp_path / "nope")])
    assert "holds several grids (tb)" in one_line_error(capsys, [*export, str(grid.parent)])

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in one_line_error(capsys, [*export, str(grid), "--out", str(a_file)])
    line = one_line_error(capsys, [*export, str(grid), "--out", str(a_file / "sub")])
    assert "cannot write the TensorBoard export" in line
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "holds no sigprop export" in one_line_error(
        capsys, [*export, str(grid), "--out", str(foreign)])
    assert (foreign / "notes.txt").read_text() == "mine"

    other = Path(shutil.copytree(grid, tmp_path / "other" / "tb"))
    assert main([*export, str(other), "--out", str(tmp_path / "tb")]) == 0
    capsys.readouterr()
    assert "holds the export of" in one_line_error(
        capsys, [*export, str(grid), "--out", str(tmp_path / "tb")])
    assert "--live wants" in one_line_error(capsys, [*export, str(grid), "--live", "0"])
    lock = RunLock(tmp_path / "tb" / LOCK)  # another export holds the folder
    assert lock.acquire()
    try:
        assert "another export is writing" in one_line_error(
            capsys, [*export, str(other), "--out", str(tmp_path / "tb")])
    finally:
        lock.release()

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # the extra is not installed
    assert "pip install sigprop[tensorboard]" in one_line_error(capsys, [*export, str(grid)])


def test_a_damaged_run_is_left_out_and_exported_once_repaired(grid, tmp_path):
    out = tmp_path / "tb"
    run_dir = sorted((grid / "runs").iterdir())[0]
    good = (run_dir / "metrics.parquet").read_bytes()
    (run_dir / "metrics.parquet").write_bytes(good[: len(good) // 2])
    result = export_tensorboard(grid, out)
    assert len(result.added) == 3 and result.left_out == {"damaged": 1}
    assert "1 damaged (no results)" in result.line()
    assert run_dir.name not in run_folders(out)
    (run_dir / "metrics.parquet").write_bytes(good)
    assert export_tensorboard(grid, out).added[0].endswith(run_dir.name)
    assert len(run_folders(out)) == 4
