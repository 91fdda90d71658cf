"""The GPU verification kit (``python -m benchmarks.gpu``) without a GPU: one line, exit 2; and
the benchmarks' timing statistics."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu


def test_without_cuda_prints_one_line_and_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report"
    assert gpu.main(["--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0]
    assert captured.out == ""
    assert not out.exists()  # nothing measured, nothing written


def test_sections_run_in_the_documented_order():
    assert tuple(gpu.SECTIONS) == gpu.SECTION_ORDER


def test_unknown_section_is_a_one_line_error(tmp_path, capsys):
    assert gpu.main(["--out", str(tmp_path), "--sections", "agc,nope", "--allow-cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_batch_4096_configs_come_from_the_shipped_grids():
    configs = gpu.batch_4096_configs()
    assert configs
    assert all(config["batch_size"] == 4096 for _, config in configs)
    keys = {(str(config["model"]), config["image_size"]) for _, config in configs}
    assert len(keys) == len(configs)  # one per distinct model and image size


def test_markdown_has_a_table_per_section():
    report = {"device": "X", "torch": "2", "started": "now", "wall_s": 1.0, "sections": {
        "agc": {"ms": {"a": 1.0}, "loop_over_eager": 2.5},
        "grid": {"runs": 12, "rows": [{"runs_per_gpu": 1, "runs_per_hour": 100.0},
                                      {"runs_per_gpu": 2, "skipped": "time budget"}]},
    }}
    text = gpu.markdown(report)
    assert "## agc" in text and "## grid" in text
    assert "| runs_per_gpu | runs_per_hour | skipped |" in text
    assert "| 2 |  | time budget |" in text


@pytest.mark.slow
def test_median_interval_holds_the_median_and_narrows_with_more_rounds():
    import random
    import statistics

    from benchmarks.timing import median_ci

    assert median_ci([1.0] * 9) == (1.0, 1.0)
    rng = random.Random(1)
    few = [rng.gauss(1.0, 0.1) for _ in range(11)]
    many = [rng.gauss(1.0, 0.1) for _ in range(301)]
    for values in (few, many):
        lo, hi = median_ci(values)
        assert min(values) <= lo <= statistics.median(values) <= hi <= max(values)
    assert median_ci(many)[1] - median_ci(many)[0] < median_ci(few)[1] - median_ci(few)[0]
