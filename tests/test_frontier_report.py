"""Claims over frontier values, and the frontier's figures, table and report section
(issue 15)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ablations.claims import evaluate_claims, parse_claims
from ablations.frontier import FrontierSettings
from ablations.spec import load_spec
from ablations.store import GridStore, load_results
from run_ablations import main
from tests.frontier_helpers import StopAfter, oracle_edge, search, write_spec

# ----------------------------------------------------------------------------- claims


def frontier_frame(cells: dict[tuple, list]) -> pd.DataFrame:
    """{(clip mode, threshold, batch): [max stable lr per seed; None: unstable at lr_min]}."""
    rows = []
    for (mode, threshold, batch), values in cells.items():
        for seed, lr in enumerate(values):
            status = "unstable_at_lr_min" if lr is None else (
                "stable_to_lr_max" if lr == 10.0 else "found")
            rows.append({
                "grid": "g", "cell_id": f"{mode}{threshold}{batch}{seed}", "status": status,
                "model.name": "nf", "clip.mode": mode, "clip.threshold": threshold,
                "batch_size": batch, "seed": seed, "model.num_classes": 10,
                "axes": ("batch_size", "clip.mode", "clip.threshold", "seed"),
                "max_stable_lr": math.nan if lr is None else lr,
                "min_unstable_lr": 0.01 if lr is None else lr * 2 ** 0.25,
                "final_acc": 0.9, "lr_min": 0.01, "lr_max": 10.0, "resolution": 2 ** 0.25,
                "n_probes": 5, "probe_steps": 40,
            })
    return pd.DataFrame(rows)


def claim(check: str, **fields) -> dict:
    return {"text": "t", "source": "s", "check": check, "metric": "max_stable_lr", **fields}


AGC_BIG = {"clip.mode": "agc", "batch_size": "@max"}
NONE_BIG = {"clip.mode": "none", "batch_size": "@max"}


def test_compare_claim_over_frontier_values_uses_seed_ranges_on_a_log_scale():
    frame = frontier_frame({("agc", 0.02, 1024): [1.6, 2.0], ("none", None, 1024): [0.4, 0.5],
                            ("none", None, 32): [0.3, 0.3]})
    runs = pd.DataFrame({"status": []})  # frontier claims never read the runs
    verdict = evaluate_claims(parse_claims([claim("compare", a=AGC_BIG, b=NONE_BIG)]), runs,
                              frame)[0]
    assert verdict.verdict == "holds"
    assert "1.79 (1.6–2)" in verdict.evidence and "2 cells" in verdict.evidence
    assert "x4" in verdict.evidence  # the ratio of the geometric means
    # within one lattice step (the cells' resolution 2**0.25): 0.3 vs 0.4-0.5 is 0.42 to 0.74
    # doublings apart, more than the step's 0.25
    lattice = claim("compare", a={"clip.mode": "none", "batch_size": "@min"},
                    b={"clip.mode": "none", "batch_size": "@max"}, relation="within",
                    margin="lattice")
    lattice_verdict = evaluate_claims(parse_claims([lattice]), runs, frame)[0]
    assert "one step of the frontier's lr lattice" in lattice_verdict.evidence
    assert lattice_verdict.verdict == "does not hold"
    # a factor of 4 is not "by a margin of 3 doublings"
    strict = claim("compare", a=AGC_BIG, b=NONE_BIG, margin=3.0)
    assert evaluate_claims(parse_claims([strict]), runs, frame)[0].verdict == "does not hold"
    # within a factor of 2 at small batch: 0.3 vs 0.4-0.5 on log2 scale (0.74 doublings)
    near = claim("compare", a={"clip.mode": "none", "batch_size": "@min"},
                 b={"clip.mode": "none", "batch_size": "@max"}, relation="within", margin=1.0)
    assert evaluate_claims(parse_claims([near]), runs, frame)[0].verdict == "holds"
    # without a frontier the claim cannot be judged
    missing = evaluate_claims(parse_claims([claim("compare", a=AGC_BIG, b=NONE_BIG)]), runs)[0]
    assert missing.verdict == "inconclusive" and "frontier" in missing.reason


def test_censored_cells_count_at_lr_max_or_drop_out_and_the_evidence_says_so():
    frame = frontier_frame({("agc", 0.02, 1024): [10.0, 10.0], ("none", None, 1024): [None, 0.2]})
    verdict = evaluate_claims(parse_claims([claim("compare", a=AGC_BIG, b=NONE_BIG,
                                                  min_runs=1)]), pd.DataFrame(), frame)[0]
    assert verdict.verdict == "holds"
    assert "2 stable up to lr_max (counted at lr_max)" in verdict.evidence
    assert "1 unstable at lr_min (left out)" in verdict.evidence
    two = claim("compare", a=AGC_BIG, b=NONE_BIG)  # min_runs 2: one value of b is too few
    assert evaluate_claims(parse_claims([two]), pd.DataFrame(), frame)[0].verdict == \
        "inconclusive"


def test_spread_claim_compares_how_far_the_frontier_moves_with_the_threshold():
    # norm: 0.1 -> 3.2 (5 doublings) per seed and batch; agc: 1.6 -> 2.26 (0.5 doublings)
    cells = {}
    for batch in (32, 1024):
        cells[("norm", 0.1, batch)] = [0.1, 0.1]
        cells[("norm", 0.8, batch)] = [3.2, 3.2]
        cells[("agc", 0.02, batch)] = [1.6, 1.6]
        cells[("agc", 0.16, batch)] = [1.6 * 2 ** 0.5, 1.6 * 2 ** 0.5]
    frame = frontier_frame(cells)
    table = claim("spread", over="clip.threshold", a={"clip.mode": "norm"},
                  b={"clip.mode": "agc"})
    verdict = evaluate_claims(parse_claims([table]), pd.DataFrame(), frame)[0]
    assert verdict.verdict == "holds"
    assert "5.00 doublings" in verdict.evidence and "0.50 doublings" in verdict.evidence
    assert "4 group(s)" in verdict.evidence
    flipped = {**table, "a": {"clip.mode": "agc"}, "b": {"clip.mode": "norm"}}
    assert evaluate_claims(parse_claims([flipped]), pd.DataFrame(), frame)[0].verdict == \
        "does not hold"
    by_value = {**table, "b": None, "value": 6.0}
    by_value.pop("b")
    assert evaluate_claims(parse_claims([by_value]), pd.DataFrame(), frame)[0].verdict == \
        "does not hold"


def test_spread_claim_needs_over_and_two_values_of_it(tmp_path, capsys):
    from ablations.claims import ClaimError

    with pytest.raises(ClaimError, match="over must name a run key"):
        parse_claims([claim("spread", a={"clip.mode": "norm"}, b={"clip.mode": "agc"})])
    path = write_spec(tmp_path, extra="""
        [[claims]]
        text = "t"
        source = "s"
        check = "spread"
        metric = "max_stable_lr"
        over = "seed"
        a = { seed = 0 }
        value = 1.0
        """)
    assert main(["frontier", str(path), "--dry-run"]) == 2
    assert "a spread needs two or more values of seed" in capsys.readouterr().err


def test_the_shipped_frontier_spec_states_its_claims_and_expands():
    from ablations.frontier import cells_of
    from ablations.shipped import GRIDS_DIR

    spec = load_spec(GRIDS_DIR / "frontier_batch.toml")
    claims = parse_claims(spec.claims)
    assert [c.check for c in claims] == ["compare", "spread", "compare", "compare"]
    assert all(c.metric == "max_stable_lr" for c in claims)
    # F3 is one claim per AGC threshold, each within one lattice step (derived, not picked)
    assert [c.margin_rule for c in claims[2:]] == ["lattice", "lattice"]
    settings, cells = cells_of(spec)
    assert len(cells) == 36 and settings.steps == 40
    assert not any("lr" in cell.axes for cell in cells)


# ----------------------------------------------------------------------------- figures


@pytest.mark.slow
def test_frontier_figures_and_report_section_are_written(tmp_path):
    from reports.build import build_report
    from reports.figures.frontier import frontier_table, plot_frontier, plot_frontier_accuracy
    from reports.figures.style import figure_png

    search(tmp_path)
    grid_dir = tmp_path / "out" / "edge"
    frame = load_results(grid_dir).frontier
    for name, draw in (("frontier", plot_frontier), ("accuracy", plot_frontier_accuracy)):
        png = figure_png(draw(frame))
        (tmp_path / f"{name}.png").write_bytes(png)
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # the line of the frontier plot is the geometric mean over seeds at each batch size
    fig = plot_frontier(frame)
    line = fig.axes[0].get_lines()[0]
    by_batch = frame.groupby("batch_size")["max_stable_lr"].apply(
        lambda v: float(np.exp(np.log(v).mean())))
    assert list(line.get_xdata()) == list(by_batch.index)
    assert np.allclose(line.get_ydata(), by_batch.to_numpy())
    table = frontier_table(frame)
    assert list(table["batch size"]) == [16, 64] and set(table["cells"]) == {2}

    paths = build_report(grid_dir)
    text = paths["md"].read_text()
    assert "## Stability frontier" in text
    assert (grid_dir / "report_files" / "frontier.png").is_file()
    assert (grid_dir / "report_files" / "frontier-accuracy.png").is_file()


@pytest.mark.slow
def test_the_report_says_what_a_frontier_s_unfinished_probes_mean(tmp_path):
    """Probes left queued by a stopped search are continued by the same command; once every
    cell's search has ended, one left queued (a resumed search took another path) is needed by
    no cell, and running the grid again would not run it."""
    from ablations.frontier import cells_of, probe_run
    from reports.build import build_report

    outcome, _, _ = search(tmp_path, executor=StopAfter(3, oracle_edge))
    assert "incomplete" in set(outcome.frame["status"])
    grid_dir = tmp_path / "out" / "edge"
    text = build_report(grid_dir)["md"].read_text()
    assert "queued): run the same frontier command again to continue the search" in text

    outcome, _, _ = search(tmp_path)
    assert set(outcome.frame["status"]) == {"found"}
    store = GridStore(tmp_path / "out", "edge")
    settings, cells = cells_of(load_spec(write_spec(tmp_path)))
    orphan = probe_run(cells[0], 9.0, settings)  # 9 is no lattice rate: no search's probe
    store.add_runs([orphan])
    assert store.state(orphan.run_id) == "queued"
    text = build_report(grid_dir)["md"].read_text()
    assert "1 run(s) not finished yet (1 queued): probes no cell's search needs any more" in text
    assert "run the grid again" not in text and "frontier command again" not in text


def test_a_warmup_spike_does_not_pass_a_run_ending_at_chance_as_stable(tmp_path):
    """Measured on digits (AGC 0.02, batch 1024, lr 4.5): the loss spiked to 12 at step 2 and
    ended at 2.3, the initial loss; a mean over the first steps would call that stable."""
    from ablations.frontier import probe_stability

    store = GridStore(tmp_path, "g")
    settings = FrontierSettings(0.1, 10.0, steps=40)
    spike = np.r_[[2.31, 2.85, 12.38, 4.86], np.full(36, 2.3)]
    learnt = np.r_[[2.31, 2.85, 12.38, 4.86], np.linspace(2.2, 0.9, 36)]
    for rid, loss in (("spike", spike), ("learnt", learnt)):
        (store.run_dir(rid)).mkdir(parents=True)
        store.write_results(rid, pd.DataFrame({"step": np.arange(40), "loss": loss}),
                            pd.DataFrame(), state="completed")
    assert probe_stability(store, "spike", settings) is False
    assert probe_stability(store, "learnt", settings) is True
    assert probe_stability(store, "learnt", FrontierSettings(0.1, 10.0, max_ratio=0.3)) is False


def test_cells_that_differ_in_another_axis_are_never_pooled_into_one_line():
    """frontier_length: the probe length is an axis; one line per length, not a mean over
    the lengths (which put 20-, 40- and 160-step edges into one geometric mean)."""
    from reports.figures.frontier import frontier_table, plot_frontier

    rows = [{"cell_id": f"c{steps}{batch}{seed}", "model.name": "nf_resnet26",
             "clip.mode": "none", "clip.threshold": 0.01, "batch_size": batch, "seed": seed,
             "steps": steps, "axes": ["batch_size", "seed", "steps"], "status": "found",
             "max_stable_lr": 0.1 * steps * (1 + seed), "min_unstable_lr": 0.2 * steps,
             "final_acc": 0.5, "n_probes": 3, "lr_min": 0.1, "lr_max": 100.0,
             "resolution": 2 ** 0.25, "probe_steps": steps, "non_monotone": False}
            for steps in (20, 160) for batch in (32, 1024) for seed in (0, 1)]
    table = frontier_table(pd.DataFrame(rows))
    assert len(table) == 4
    assert {s.rsplit(", ", 1)[1] for s in table["setting"]} == {"20-step probes",
                                                                "160-step probes"}
    by_length = dict(zip(table["setting"].str.contains("160"), table["max stable lr"]))
    assert by_length[False].startswith("2.83 (2–4)") and by_length[True].startswith("22.6")
    labels = [t.get_text() for t in plot_frontier(pd.DataFrame(rows)).axes[0].get_legend()
              .get_texts()]
    assert sum("step probes" in label and "lr ∝ B" not in label for label in labels) == 2
