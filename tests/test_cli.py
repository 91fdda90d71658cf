"""The command line itself: start-up cost, help texts, version, output root, did-you-mean."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

from run_ablations import build_parser, main
from tests.helpers import tiny_spec

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["models", "spp", "coord-check", "run", "frontier", "status", "report", "quickstart",
            "export"]


@pytest.mark.slow
def test_help_and_version_import_neither_torch_nor_pandas():
    # one fresh interpreter for every light path: the modules must not load at all
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        import run_ablations
        for argv in ([], ["--version"], ["--help"], *[[c, "--help"] for c in {COMMANDS!r}]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    run_ablations.main(argv)
                except SystemExit:
                    pass
        print(sorted(m for m in ("torch", "pandas", "matplotlib") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"sigprop {version}"


def test_no_arguments_prints_help_and_a_hint_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sigprop")
    assert "try: sigprop quickstart" in out
    assert all(command in out for command in COMMANDS)
    assert list(tmp_path.iterdir()) == []  # no grid started


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_defaults_choices_and_examples(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  sigprop " + command in out
    text = " ".join(out.split())  # the help wraps to the terminal's width
    assert "``" not in text
    assert "-q, --quiet" in text
    # -v only where it adds something, and it says what
    assert ("-v, --verbose" in text) == (command in ("run", "quickstart", "frontier", "export",
                                                     "coord-check"))
    if command in ("run", "quickstart"):
        assert "--executor {local,ray}" in text
        workers = "2" if command == "quickstart" else "1"
        assert f"local worker processes (CPU) (default: {workers})" in text
        assert "(default: auto)" in text and "(default: runs)" in text
    if command == "spp":
        assert "(default: runs/spp)" in text


def test_top_level_help_has_no_rest_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_one_output_root_for_every_command():
    parser = build_parser()
    outs = {
        "run": parser.parse_args(["run", "quickstart"]).out,
        "quickstart": parser.parse_args(["quickstart"]).out,
        "spp": parser.parse_args(["spp", "--model", "nf_resnet26"]).out,
        "coord-check": parser.parse_args(["coord-check"]).out,
    }
    assert {Path(out).parts[0] for out in outs.values()} == {"runs"}


def test_quiet_and_verbose_together_are_one_line_exit_2(capsys):
    assert main(["run", "quickstart", "--dry-run", "-q", "-v"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not both" in err


def test_quiet_and_verbose_are_read_before_and_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["-q", "status", "x"]).quiet is True
    assert parser.parse_args(["status", "x", "-q"]).quiet is True
    assert parser.parse_args(["-v", "status", "x"]).verbose == 1
    assert parser.parse_args(["run", "x", "-vv"]).verbose == 2
    assert parser.parse_args(["-v", "run", "x"]).verbose == 1
    assert parser.parse_args(["run", "x"]).verbose == 0


@pytest.mark.parametrize("argv, suggestion", [
    (["run", "agc_bach", "--dry-run"], "did you mean 'agc_batch'?"),
    (["run", "quickstart", "--dry-run", "--set", "batchsize=8"], "did you mean 'batch_size'?"),
    (["run", "quickstart", "--dry-run", "--set", "model.alhpa=0.2"], "did you mean 'alpha'?"),
    (["run", "quickstart", "--dry-run", "--set", "clip.treshold=0.1"],
     "did you mean 'threshold'?"),
    (["run", "quickstart", "--dry-run", "--set", "model.name=nf_resnet2"],
     "did you mean 'nf_resnet26'?"),
    (["spp", "--model", "nf_resnet5"], "did you mean 'nf_resnet50'?"),
    (["spp", "--preset", "paper-a-fig"], "did you mean 'paper-a-fig1'?"),
])
def test_unknown_names_suggest_the_closest_one(argv, suggestion, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the error is the only line
    assert captured.err.count("\n") == 1 and suggestion in captured.err


def test_unknown_spec_section_suggests_the_closest_one(tmp_path, capsys):
    spec = tmp_path / "g.toml"
    spec.write_text('name = "g"\n[grdi]\nseed = [0, 1]\n')
    assert main(["run", str(spec), "--dry-run"]) == 2
    assert "did you mean 'grid'?" in capsys.readouterr().err


def test_a_far_off_name_gets_no_suggestion(capsys):
    assert main(["run", "zzzzzz", "--dry-run"]) == 2
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.slow
def test_quiet_run_prints_nothing_when_all_goes_well(tmp_path, capsys):
    spec = tmp_path / "q.toml"
    spec.write_text(tiny_spec("q", eval_every=None, seed=None, grid="seed = [0]"))
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--no-report", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (tmp_path / "out" / "q" / "runs").is_dir()


def test_verbose_on_a_command_without_it_says_where_it_is_taken(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["status", "runs", "-v"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-v/--verbose is taken by run, quickstart" in err
