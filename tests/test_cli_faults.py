"""Faults at the command line (issue 24): streams that break, fill up, are closed or cannot
hold a grid's name; values that used to pass the dry run and fail as runs; names and paths the
file system refuses; mistyped commands and flags. Each ends in one line and a non-zero exit
(or, for a terminal that cannot show a name, in escapes), before anything is stored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablations.spec import expand, load_spec
from ablations.store import GridStore
from run_ablations import main
from sigprop import spp
from sigprop.errors import UserError
from sigprop.models import create_model
from sigprop.train import SEED_MAX, TRAIN_SAMPLES, TrainConfig
from tests.helpers import ROOT, tiny_spec


def write_spec(folder: Path, name: str = "tiny", steps: int = 2, seeds: str = "[0, 1]",
               extra: str = "") -> Path:
    path = folder / "grid.toml"
    path.write_text(tiny_spec(name, steps=steps, grid=f"seed = {seeds}") + extra,
                    encoding="utf-8")
    return path


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_ablations.py"), *args], cwd=ROOT,
                          capture_output=kwargs.pop("capture_output", True), text=True,
                          env={**os.environ, **(env or {})}, timeout=300, **kwargs)


def one_error_line(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and err.startswith("sigprop: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def store_states(out: Path, grid: str = "tiny") -> list[str]:
    store = GridStore(out, grid)
    return sorted(store.state(rid) for rid in store.run_ids())


# ----------------------------------------------------------------------------- streams

@pytest.mark.slow  # a runner and its worker start (torch twice): 10-20 s on two busy cores
def test_a_closed_pipe_stops_the_grid_with_one_line_and_queues_what_did_not_finish(tmp_path):
    """`run ... | head -n 3`: exit 141 and one line on stderr; the run in flight when the pipe
    closed is stored as queued (a rerun resumes it), never left running, failed or unsaid."""
    spec, out = write_spec(tmp_path, steps=3), tmp_path / "out"
    args = ["run", str(spec), "--out", str(out), "--device", "cpu", "--no-report"]
    runner = subprocess.Popen([sys.executable, str(ROOT / "run_ablations.py"), *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [runner.stdout.readline() for _ in range(3)]  # what head -n 3 reads
    runner.stdout.close()
    err = runner.stderr.read()
    assert runner.wait(timeout=300) == 141
    assert lines[0].startswith("grid tiny: 2 runs") and "completed" in lines[2]
    one_error_line(err, "cannot write to standard output (Broken pipe)", "1 completed",
                   "queued", "run the same command to resume")
    assert store_states(out) == ["completed", "queued"]  # the second run: stopped, resumable


@pytest.fixture(scope="module")
def queued_grid(tmp_path_factory) -> Path:
    """An output root holding the tiny grid stored as queued (nothing run)."""
    folder = tmp_path_factory.mktemp("queued")
    spec = load_spec(write_spec(folder))
    GridStore(folder / "out", spec.name).prepare(spec.to_toml_dict(), expand(spec))
    return folder


@pytest.mark.parametrize("command", [["status", "{out}/tiny"], ["run", "{spec}", "--dry-run"]])
@pytest.mark.slow
def test_a_full_stdout_is_one_line_and_exit_1(queued_grid, command):
    argv = [a.format(out=queued_grid / "out", spec=queued_grid / "grid.toml") for a in command]
    with open("/dev/full", "w") as full:
        result = cli(*argv, stdout=full, stderr=subprocess.PIPE, capture_output=False)
    assert result.returncode == 1
    one_error_line(result.stderr, "cannot write to standard output (No space left on device)")


@pytest.mark.slow
def test_a_closed_stdout_is_refused_before_anything_is_stored(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    result = cli("run", str(spec), "--out", str(out), "--device", "cpu",
                 preexec_fn=lambda: os.close(1), stdout=None, stderr=subprocess.PIPE,
                 capture_output=False)
    assert result.returncode == 2
    one_error_line(result.stderr, "standard output is closed")
    assert not out.exists()


@pytest.mark.slow
def test_a_closed_stderr_still_gives_the_exit_code_and_nothing_on_stdout(tmp_path):
    result = cli("run", str(tmp_path / "missing.toml"), "--dry-run",
                 preexec_fn=lambda: os.close(2),
                 stdout=subprocess.PIPE, stderr=None, capture_output=False)
    assert result.returncode == 2
    assert result.stdout == ""  # the error did not go to stdout instead


ASCII_TERMINAL = {"PYTHONIOENCODING": "ascii", "LANG": "C", "LC_ALL": "C"}


@pytest.mark.slow  # three interpreters start: about 10 s on two busy cores
def test_a_unicode_grid_name_on_an_ascii_terminal_is_escaped_not_a_traceback(tmp_path):
    spec = load_spec(write_spec(tmp_path, name="grille-é"))
    out = tmp_path / "out"
    GridStore(out, spec.name).prepare(spec.to_toml_dict(), expand(spec))
    dry = cli("run", str(tmp_path / "grid.toml"), "--dry-run", env=ASCII_TERMINAL)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == "2 runs in grid grille-\\xe9"
    status = cli("status", str(out), env=ASCII_TERMINAL)
    assert status.returncode == 0 and not status.stderr
    assert "grille-\\xe9" in status.stdout and "2 queued" in status.stdout
    missing = cli("status", str(out / "grille-éé"), env=ASCII_TERMINAL)
    assert missing.returncode == 2
    one_error_line(missing.stderr, "grille-\\xe9\\xe9")


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("override, field", [
    (f"seed={2**64 + 1}", "seed"),
    (f"seed={SEED_MAX + 1}", "seed"),
    ("seed=-1", "seed"),
    ("data_seed=-5", "data_seed"),
    ("batch_size=33", "batch_size 33 is larger than the training set (32"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_seeds_and_batch_sizes_are_checked_before_anything_is_stored(
        tmp_path, capsys, override, field, dry):
    out = tmp_path / "out"
    argv = ["run", str(write_spec(tmp_path)), "--out", str(out), "--set", override]
    assert main([*argv, "--dry-run"] if dry else [*argv, "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, field)
    assert not out.exists()


def test_batch_and_train_size_are_checked_against_a_fixed_data_set():
    digits = {"data": "digits", "image_size": 8}
    TrainConfig.from_dict({**digits, "batch_size": 1500})  # the whole training split
    with pytest.raises(UserError, match=r"batch_size 1501 .* \(1500 samples: all of 'digits'"):
        TrainConfig.from_dict({**digits, "batch_size": 1501})
    with pytest.raises(UserError, match="train_size 2000 is more than data set 'digits' has"):
        TrainConfig.from_dict({**digits, "train_size": 2000, "batch_size": 16})
    with pytest.raises(UserError, match="cifar10"):
        TrainConfig.from_dict({"data": "cifar10", "batch_size": 50_001})
    TrainConfig.from_dict({"seed": SEED_MAX, "data_seed": SEED_MAX, "batch_size": 16})
    # synthetic renders as many images as train_size asks; 10000 without it
    TrainConfig.from_dict({"train_size": 20_000, "batch_size": 12_000})
    with pytest.raises(UserError, match=r"\(10000 samples: all of 'synthetic'\)"):
        TrainConfig.from_dict({"batch_size": 10_001})


def test_the_training_set_sizes_are_the_data_sets_own():
    from sigprop.data import SOURCES, load_dataset

    pytest.importorskip("sklearn")
    assert len(load_dataset("digits", test_size=1).train_y) == TRAIN_SAMPLES["digits"]
    assert len(SOURCES["cifar10"].train_files) * 10_000 == TRAIN_SAMPLES["cifar10"]


@pytest.mark.parametrize("flag, value, message", [
    ("--heartbeat", "nan", "--heartbeat must be a finite number of seconds >= 0"),
    ("--heartbeat", "inf", "--heartbeat must be a finite number"),
    ("--heartbeat", "-1", "--heartbeat must be"),
    ("--max-retries", "-1", "--max-retries must be >= 0, got -1"),
    ("--cpus-per-run", "nan", "--cpus-per-run must be a finite number > 0"),
    ("--gpus-per-run", "inf", "--gpus-per-run must be a finite number >= 0"),
    ("--workers", "0", "--workers must be >= 1"),
])
@pytest.mark.parametrize("command", ["run", "frontier"])
def test_run_options_must_be_finite_and_in_range_even_for_a_dry_run(
        tmp_path, capsys, flag, value, message, command):
    argv = [command, str(write_spec(tmp_path)), "--out", str(tmp_path / "out"), "--dry-run",
            f"{flag}={value}"]
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, message", [
    ("a\\u0000b", "holds the control character '\\x00'"),
    ("two\\nlines", "holds the control character '\\n'"),
    ("bell\\u0007", "control character"),
    ("x" * 300, "name is 300 bytes long"),
    ("é" * 128, "name is 256 bytes long"),  # bytes, not characters
])
def test_grid_names_the_file_system_cannot_hold_are_one_line(tmp_path, capsys, name, message):
    out = tmp_path / "out"
    out.mkdir()  # an existing --out used to give ENAMETOOLONG's traceback
    spec = write_spec(tmp_path, name=name)
    for extra in (["--dry-run"], ["--device", "cpu"]):
        assert main(["run", str(spec), "--out", str(out), *extra]) == 2
        one_error_line(capsys.readouterr().err, message)
    assert list(out.iterdir()) == []


def test_a_name_of_255_bytes_is_fine(tmp_path, capsys):
    assert main(["run", str(write_spec(tmp_path, name="é" * 127 + "x")), "--dry-run"]) == 0


def test_an_output_path_past_the_file_system_limits_is_one_line(tmp_path, capsys):
    spec = write_spec(tmp_path)
    deep = tmp_path.joinpath(*["d" * 200] * 20)  # every part fits, the whole does not
    assert main(["run", str(spec), "--out", str(deep), "--dry-run"]) == 2
    one_error_line(capsys.readouterr().err, "limit of", "use a shorter --out")
    long_part = tmp_path / ("e" * 300)
    assert main(["run", str(spec), "--out", str(long_part), "--device", "cpu"]) == 2
    one_error_line(capsys.readouterr().err, "300 bytes, over the limit of 255")
    assert main(["run", str(spec), "--out", str(tmp_path / "a\0b"), "--dry-run"]) == 2
    one_error_line(capsys.readouterr().err, "NUL")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml"]


# ----------------------------------------------------------------------------- spp memory

@pytest.mark.slow
def test_spp_refuses_an_input_shape_past_the_memory_bound_before_its_folder(tmp_path):
    out = tmp_path / "spp"
    result = cli("spp", "--model", "nf_resnet26", "--input-shape", "2,3,99999,99999",
                 "--out", str(out))
    assert result.returncode == 2
    one_error_line(result.stderr, "input shape 2,3,99999,99999 needs about", "GiB",
                   "over the bound of", "of this machine's")
    assert not out.exists()


@pytest.mark.slow
def test_the_memory_estimate_counts_the_first_activation(monkeypatch, tmp_path):
    shape, seeds = (8, 3, 64, 64), [0, 1]
    models = [("nf_resnet26", spp.spp_overrides("nf_resnet26", {"width_mult": 0.25}))]
    inputs = 4 * 3 * 64 * 64 * 8 * len(seeds)
    activation = spp.first_activation_bytes(*models[0], shape)
    model = create_model(models[0][0], **models[0][1])  # the real first activation
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda _m, _a, output: seen.append(output.numel() * 4))
    with torch.no_grad():
        model(torch.randn(shape))
    assert activation == seen[0] > 0
    monkeypatch.setattr(spp, "memory_bound", lambda: (inputs + activation, "a test's"))
    spp.check_memory("noise", shape, seeds, models)  # exactly at the bound: fine
    monkeypatch.setattr(spp, "memory_bound", lambda: (inputs + activation - 1, "a test's"))
    with pytest.raises(UserError, match=r"\+ first activation"):
        spp.check_memory("noise", shape, seeds, models)
    spp.check_memory("noise", shape, seeds)  # the input alone fits
    with pytest.raises(UserError, match="needs about"):  # the library path refuses too
        spp.write_spp(["nf_resnet26"], {"width_mult": 0.25}, shape, seeds=2,
                      out_dir=tmp_path / "spp")
    assert not (tmp_path / "spp").exists()
    # a data set's image pool (512 images, resized to H x W) is part of the input
    monkeypatch.setattr(spp, "memory_bound", lambda: (inputs + 1, "a test's"))
    spp.check_memory("noise", shape, seeds)
    with pytest.raises(UserError, match="input batches"):
        spp.check_memory("synthetic", shape, seeds)


# ----------------------------------------------------------------------------- dry run, names

def test_a_dry_run_past_50_rows_gives_the_real_count_of_runs(tmp_path, capsys):
    extra = '"clip.mode" = ["none", "agc"]\n"clip.threshold" = [0.01, 0.02]\n'
    seeds = "[" + ", ".join(map(str, range(15))) + "]"
    assert main(["run", str(write_spec(tmp_path, seeds=seeds, extra=extra)), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # 60 combinations; clip mode none uses no threshold, so its two collapse into one
    assert lines[0].startswith("grid tiny: 60 combinations")
    assert len(lines) == 1 + 1 + 45 + 1  # header, table header, every run, the count
    assert lines[-1] == "45 runs in grid tiny"
    seeds = "[" + ", ".join(map(str, range(20))) + "]"
    assert main(["run", str(write_spec(tmp_path, seeds=seeds, extra=extra)), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "60 runs in grid tiny (the first 50 above)"


@pytest.mark.parametrize("argv, suggestion", [
    (["modles"], "invalid choice: 'modles' (did you mean 'models'?)"),
    (["run", "quickstart", "--dryrun"], "unrecognized arguments: --dryrun (did you mean "
                                        "'--dry-run'?)"),
    (["spp", "--modle", "nf_resnet26"], "did you mean '--model'?"),
    (["models", "--family", "nfnett"], "did you mean 'nfnet'?"),
])
def test_mistyped_commands_and_flags_get_a_suggestion(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and suggestion in captured.err


@pytest.mark.slow
def test_spp_on_missing_data_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "spp"
    empty = tmp_path / "data"
    empty.mkdir()
    assert main(["spp", "--model", "nf_resnet26", "--input", "cifar10", "--data-dir",
                 str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "files not found" in err
    assert not out.exists()
