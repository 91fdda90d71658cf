"""Live tracking (ablations.tracking): TensorBoard event files written while a run trains, the
export's HParams experiment, and MLflow against a real tracking server."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, metadata  # noqa: E402

import ablations.tracking as tracking  # noqa: E402
import ablations.worker as worker  # noqa: E402
from ablations.runner import run_grid  # noqa: E402
from ablations.spec import load_spec  # noqa: E402
from ablations.store import GridStore, load_results  # noqa: E402
from ablations.tracking import ENV_LIVE, LIVE_DIR, LIVE_MARK, tracking_environment  # noqa: E402
from reports.tensorboard import export_tensorboard  # noqa: E402
from tests.helpers import InlineExecutor, tiny_spec  # noqa: E402


def write_spec(folder: Path, steps: int = 6, lrs: str = "[0.1]") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "live.toml"
    path.write_text(tiny_spec("live", description="Live curves of a tiny grid.", steps=steps,
                              eval_every=2, checkpoint_every=0, probe_every=1,
                              grid=f"base_lr = {lrs}"))
    return path


def accumulator(folder: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def steps_of(acc: ea.EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def live_folders(grid: Path) -> dict[str, Path]:
    out = {}
    for folder in (grid / LIVE_DIR).iterdir():
        out[json.loads((folder / LIVE_MARK).read_text())["run_id"]] = folder
    return out


class Watcher:
    """The worker's progress queue: at a step mid-run it reads the run's live event files (as
    TensorBoard would) until they show the steps done so far, or gives up."""

    def __init__(self, grid: Path, at_step: int):
        self.grid, self.at_step = grid, at_step
        self.seen: dict[int, list[int]] = {}

    def put(self, event: tuple) -> None:
        _, _, run_id, step, total, _ = event
        if step != self.at_step or step in self.seen:
            return
        assert step < total
        deadline = time.monotonic() + 15
        while True:
            folders = list((self.grid / LIVE_DIR).glob(f"*-{run_id}"))
            steps = steps_of(accumulator(folders[0]), "train/loss") if folders else []
            if steps or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.seen[step] = steps


class WatchedExecutor(InlineExecutor):
    def __init__(self, watcher: Watcher):
        self.watcher = watcher

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        for rid in run_ids:
            on_result(worker.execute_run(root, grid, rid, "cpu", 1, events=self.watcher))


@pytest.fixture
def fast_live(monkeypatch):
    """Rows to the trackers after every step (no cost cap) and a flush every second, so a
    short run shows them mid-way."""
    monkeypatch.setattr(tracking, "LIVE_INTERVAL_S", 0.0)
    monkeypatch.setattr(tracking, "MAX_SHARE_INV", 0)
    monkeypatch.setattr(tracking, "FLUSH_S", 1)
    monkeypatch.setattr(worker, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.delenv(ENV_LIVE, raising=False)


@pytest.mark.slow
def test_event_files_show_the_run_while_it_trains(tmp_path, fast_live):
    spec = write_spec(tmp_path, steps=8)
    grid = tmp_path / "out" / "live"
    watcher = Watcher(grid, at_step=4)
    outcome = run_grid(load_spec(spec), tmp_path / "out", WatchedExecutor(watcher),
                       stream=io.StringIO())
    assert outcome.counts == {"completed": 1}
    # mid-run (4 of 8 steps done) TensorBoard already read losses of steps done before
    assert watcher.seen[4] and max(watcher.seen[4]) <= 3, watcher.seen

    stored = load_results(grid)
    (run_id,) = stored.runs["run_id"]
    folder = live_folders(grid)[run_id]
    assert folder.name == f"base_lr=0.1-{run_id}"  # named as `export tensorboard` names it
    acc = accumulator(folder)
    metrics = stored.metrics[stored.metrics["run_id"] == run_id]
    for column in ("loss", "lr", "grad_norm", "clip_fraction", "test_acc", "test_loss"):
        tag = f"{'eval' if column.startswith('test') else 'train'}/{column}"
        kept = metrics[metrics[column].notna()]
        events = acc.Scalars(tag)
        assert [e.step for e in events] == kept["step"].tolist(), tag
        np.testing.assert_array_equal([e.value for e in events],
                                      kept[column].to_numpy(np.float32), err_msg=tag)
    blocks = stored.blocks[stored.blocks["run_id"] == run_id]
    for (block, stat), frame in blocks.groupby(["block", "stat"]):
        tag = f"blocks/{'head' if block == 'other' else block}/{stat}"
        np.testing.assert_array_equal([e.value for e in acc.Scalars(tag)],
                                      frame.sort_values("step")["value"].to_numpy(np.float32))
    assert not any("/other/" in tag for tag in acc.Tags()["scalars"])
    run = stored.runs.iloc[0]
    assert [e.value for e in acc.Scalars("summary/final_acc")] == [np.float32(run["final_acc"])]
    # wall times grow over the run: written as it went, not all at its end
    walls = [e.wall_time for e in acc.Scalars("train/loss")]
    assert walls == sorted(walls) and walls[-1] > walls[0]

    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    assert start.group_name == run_id
    assert start.hparams["base_lr"].number_value == 0.1
    assert start.hparams["lr"].number_value == pytest.approx(run["lr"])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS
    assert "tracking_warnings" not in GridStore(grid.parent, "live").status(run_id)


class ServerWatcher(Watcher):
    """Asks a running ``tensorboard`` server, as its dashboard does, for the run's loss."""

    def __init__(self, url: str, at_step: int):
        super().__init__(Path(), at_step)
        self.url = url

    def put(self, event: tuple) -> None:
        import urllib.parse
        import urllib.request

        _, _, run_id, step, total, _ = event
        if step != self.at_step or step in self.seen:
            return
        deadline, points = time.monotonic() + 30, []
        while not points and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/data/runs", timeout=5) as answer:
                    runs = [r for r in json.load(answer) if r.endswith(f"-{run_id}")]
                if runs:
                    query = urllib.parse.urlencode({"run": runs[0], "tag": "train/loss"})
                    with urllib.request.urlopen(f"{self.url}/data/plugin/scalars/scalars?"
                                                f"{query}", timeout=5) as answer:
                        points = json.load(answer)
            except OSError:
                pass
            if not points:
                time.sleep(0.5)
        self.seen[step] = [int(p[1]) for p in points]


@pytest.mark.slow
def test_a_tensorboard_server_shows_the_running_runs_curves(tmp_path, fast_live):
    exe = Path(sys.executable).with_name("tensorboard")
    if not exe.exists():
        pytest.skip("no tensorboard executable beside this python")
    grid = tmp_path / "out" / "live"
    (grid / LIVE_DIR).mkdir(parents=True)
    port = free_port()
    log = (tmp_path / "tb.log").open("w")
    server = subprocess.Popen([str(exe), "--logdir", str(grid / LIVE_DIR), "--host",
                               "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        watcher = ServerWatcher(f"http://127.0.0.1:{port}", at_step=5)
        outcome = run_grid(load_spec(write_spec(tmp_path, steps=8)), tmp_path / "out",
                           WatchedExecutor(watcher), stream=io.StringIO())
    finally:
        server.terminate()
        server.wait(10)
        log.close()
    assert outcome.counts == {"completed": 1}
    # at step 5 of 8 the dashboard's own request already got losses of earlier steps
    assert watcher.seen[5] and max(watcher.seen[5]) <= 4, (tmp_path / "tb.log").read_text()


@pytest.mark.slow
def test_opting_out_writes_nothing_and_keeps_run_ids(tmp_path, fast_live):
    spec = write_spec(tmp_path / "a", steps=2, lrs="[0.1, 0.2]")
    run_grid(load_spec(spec), tmp_path / "a" / "out", InlineExecutor(), stream=io.StringIO())
    with tracking_environment(live=False):
        run_grid(load_spec(spec), tmp_path / "b" / "out", InlineExecutor(),
                 stream=io.StringIO())
    with_live = GridStore(tmp_path / "a" / "out", "live")
    without = GridStore(tmp_path / "b" / "out", "live")
    assert sorted(with_live.run_ids()) == sorted(without.run_ids())
    assert len(list((tmp_path / "a" / "out" / "live" / LIVE_DIR).iterdir())) == 2
    assert not (tmp_path / "b" / "out" / "live" / LIVE_DIR).exists()
    assert os.environ.get(ENV_LIVE) is None  # restored after the grid


@pytest.mark.slow
def test_a_failing_writer_never_fails_the_run(tmp_path, fast_live, monkeypatch):
    calls = []

    def broken(self, update):
        calls.append(update.step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking.LiveTensorBoard, "write", broken)
    spec = write_spec(tmp_path, steps=4)
    outcome = run_grid(load_spec(spec), tmp_path / "out", InlineExecutor(), stream=io.StringIO())
    assert outcome.counts == {"completed": 1}
    store = GridStore(tmp_path / "out", "live")
    status = store.status(store.run_ids()[0])
    assert len(calls) == 1  # dropped at its first failure, not retried every step
    (line,) = status["tracking_warnings"]  # said once
    assert line.startswith("live tensorboard: OSError") and "No space left" in line
    assert status["summary"]["steps_done"] == 4


@pytest.mark.slow
def test_a_writer_that_cannot_start_never_fails_the_run(tmp_path, fast_live, monkeypatch):
    def no_writer(*args, **kwargs):
        raise ImportError("No module named 'tensorboard'")

    monkeypatch.setattr(tracking.LiveTensorBoard, "__init__", no_writer)
    outcome = run_grid(load_spec(write_spec(tmp_path, steps=2)), tmp_path / "out",
                       InlineExecutor(), stream=io.StringIO())
    assert outcome.counts == {"completed": 1}
    store = GridStore(tmp_path / "out", "live")
    (line,) = store.status(store.run_ids()[0])["tracking_warnings"]
    assert "No module named 'tensorboard'" in line


def test_a_new_attempt_replaces_only_its_own_event_files(tmp_path):
    folder = tmp_path / "live" / "x-abc"
    folder.mkdir(parents=True)
    (folder / LIVE_MARK).write_text(json.dumps({"run_id": "abc"}))
    (folder / "events.out.tfevents.1.host").write_bytes(b"old")
    (folder / "notes.txt").write_text("mine")
    tracking.clear_live_folder(folder, "abc")
    assert sorted(p.name for p in folder.iterdir()) == sorted([LIVE_MARK, "notes.txt"])
    stranger = tmp_path / "live" / "y-def"
    stranger.mkdir()
    (stranger / "events.out.tfevents.2.host").write_bytes(b"theirs")
    with pytest.raises(OSError, match="did not write"):
        tracking.clear_live_folder(stranger, "def")
    assert (stranger / "events.out.tfevents.2.host").read_bytes() == b"theirs"


@pytest.mark.slow
def test_export_experiment_has_lr_the_grid_name_and_description(tmp_path):
    spec = write_spec(tmp_path, steps=2, lrs="[0.1, 0.2]")
    with tracking_environment(live=False):
        run_grid(load_spec(spec), tmp_path / "out", InlineExecutor(), stream=io.StringIO())
    out = tmp_path / "tb"
    export_tensorboard(tmp_path / "out" / "live", out)
    root = accumulator(out)
    experiment = metadata.parse_experiment_plugin_data(
        root.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG])
    assert experiment.name == "live"
    assert experiment.description == "Live curves of a tiny grid."
    infos = {info.name: info for info in experiment.hparam_infos}
    assert set(infos) == {"base_lr", "lr"}
    runs = load_results(tmp_path / "out" / "live", with_frames=False).runs
    assert [v.number_value for v in infos["lr"].domain_discrete.values] == \
        pytest.approx(sorted(runs["lr"]))
    # the folder names leave the unvaried lr out, as the live folders do
    assert {p.name.rsplit("-", 1)[0] for p in out.iterdir() if p.is_dir()} == \
        {"base_lr=0.1", "base_lr=0.2"}


# ----------------------------------------------------------------------------- MLflow
# `make test` installs the mlflow extra, and .ci/run sets SIGPROP_REQUIRE_MLFLOW=1: there a
# missing mlflow fails these tests instead of skipping them, so CI cannot pass without them.
REQUIRE_MLFLOW = "SIGPROP_REQUIRE_MLFLOW"


def missing(why: str) -> None:
    if os.environ.get(REQUIRE_MLFLOW) == "1":
        pytest.fail(f"{why}, and {REQUIRE_MLFLOW}=1")
    pytest.skip(why)


def need_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        missing("the mlflow extra is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, artifacts served by it)."""
    need_mlflow()
    exe = Path(sys.executable).with_name("mlflow")
    if not exe.exists():
        exe = shutil.which("mlflow")
    if not exe:
        missing("no mlflow executable beside this python")
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start: "
                        + (tmp_path / "mlflow-server.log").read_text()[-2000:])
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_mlflow_server_holds_the_grids_runs(tmp_path, mlflow_server, fast_live, capsys):
    from mlflow.tracking import MlflowClient

    from run_ablations import main

    spec = write_spec(tmp_path, steps=4, lrs="[0.1, 1e6]")  # one completes, one diverges
    code = main(["run", str(spec), "--out", str(tmp_path / "out"), "--mlflow", mlflow_server,
                 "--workers", "1", "--quiet"])
    assert code == 0, capsys.readouterr()
    stored = load_results(tmp_path / "out" / "live")
    runs = stored.runs.set_index("run_id")

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("live")
    found = client.search_runs([experiment.experiment_id])
    by_id = {r.data.tags.get("sigprop.run_id"): r for r in found}
    assert set(by_id) == set(runs.index) | {None}  # and the report's run
    for run_id, run in runs.iterrows():
        logged = by_id[run_id]
        assert logged.data.tags["sigprop.state"] == run["status"]
        assert logged.info.status == "FINISHED"
        assert logged.data.params["base_lr"] == str(float(run["base_lr"]))
        assert float(logged.data.params["lr"]) == pytest.approx(run["lr"])
        assert logged.info.run_name == f"base_lr={run['base_lr']:g}-{run_id}".replace(
            "1e+06", "1000000")
        history = client.get_metric_history(logged.info.run_id, "train/loss")
        metrics = stored.metrics[stored.metrics["run_id"] == run_id]
        kept = metrics[metrics["loss"].notna()].sort_values("step")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == kept["step"].tolist()
        np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)],
                                   kept["loss"].to_numpy(), rtol=1e-12)
        if run["status"] == "completed":
            assert logged.data.metrics["summary/final_acc"] == pytest.approx(run["final_acc"])
        else:
            assert logged.data.metrics["summary/diverged_step"] == run["diverged_step"]
            assert "diagnosis" not in logged.data.params
    report = by_id[None]
    assert report.data.tags["sigprop.kind"] == "report"
    names = {a.path for a in client.list_artifacts(report.info.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= names


def test_mlflow_unreachable_never_fails_the_run(tmp_path, fast_live, monkeypatch):
    need_mlflow()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens
    with tracking_environment(live=True, mlflow_uri=uri):
        outcome = run_grid(load_spec(write_spec(tmp_path, steps=2)), tmp_path / "out",
                           InlineExecutor(), stream=io.StringIO())
    assert outcome.counts == {"completed": 1}
    store = GridStore(tmp_path / "out", "live")
    (line,) = store.status(store.run_ids()[0])["tracking_warnings"]
    assert line.startswith("mlflow: ") and uri in line
    assert len(live_folders(tmp_path / "out" / "live")) == 1  # TensorBoard still wrote


def test_mlflow_server_not_there_is_one_line_before_anything_runs(tmp_path, capsys):
    need_mlflow()
    from run_ablations import main

    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    assert main(["run", str(write_spec(tmp_path)), "--out", str(tmp_path / "out"),
                 "--mlflow", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sigprop: error: --mlflow {uri}: the tracking "
                                               "server does not answer")
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - start < 30  # no minutes of retries


@pytest.mark.slow
def test_mlflow_local_sqlite_store(tmp_path, fast_live):
    need_mlflow()
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_environment(live=False, mlflow_uri=uri):
        run_grid(load_spec(write_spec(tmp_path, steps=2)), tmp_path / "out", InlineExecutor(),
                 stream=io.StringIO())
    client = MlflowClient(tracking_uri=uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("live").experiment_id])
    assert logged.data.tags["sigprop.state"] == "completed"
    assert len(client.get_metric_history(logged.info.run_id, "train/loss")) == 2


def test_mlflow_flag_without_mlflow_is_one_line(tmp_path, capsys, monkeypatch):
    from run_ablations import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    spec = write_spec(tmp_path)
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--mlflow",
                 "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sigprop: error: --mlflow needs the mlflow")
    assert not (tmp_path / "out").exists()  # nothing ran
