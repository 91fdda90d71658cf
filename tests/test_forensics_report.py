"""Divergence forensics in the report (issue 21, items 3 and 4): the diverged-runs section and
its timeline, the gradient heatmap's diverged panels, and one rule for diverged runs (at
chance) in the tables and heatmaps.

Stores are written here in the store layout, with ``flight.parquet`` and the diagnosis fields
of the run summary as the recorder writes them, so nothing here depends on the trainer.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.store import GridStore, load_results
from reports.build import DIAGNOSIS_FIELDS, build_report, forensic_flight, with_diagnosis
from reports.figures.forensics import plot_divergence_timeline
from reports.figures.gradients import plot_gradient_heatmap
from reports.figures.stability import plot_stability_heatmap
from tests.report_helpers import BLOCKS, fake_blocks, fake_metrics, gids, run_row, write_fake_grid

FLIGHT_BLOCKS = [b for b in BLOCKS if b[0] in ("stem", "stages.0.0", "stages.0.1", "other")]
FLIGHT_STATS = ("var", "sq_mean", "grad_norm", "agc_ratio_max", "update_ratio", "clipped")


def fake_flight(diverged_step: int, blow_up: str = "stages.0.1", steps=None,
                stats=FLIGHT_STATS) -> pd.DataFrame:
    """A flight record as stored (no grid/run_id): every step to the divergence, ``blow_up``'s
    statistics 100x one step before it and not finite at it; loss and lr per step."""
    steps = range(diverged_step + 1) if steps is None else steps
    rows = []
    for step in steps:
        for block, stage, index in FLIGHT_BLOCKS:
            for stat in stats:
                value = 0.1 * (index + 3) * (1 + step / 100)
                if block == blow_up and step == diverged_step - 1:
                    value *= 100
                if step == diverged_step:
                    value = np.inf
                rows.append({"step": step, "block": block, "stage": stage, "index": index,
                             "stat": stat, "value": float(value)})
        for stat, value in (("loss", np.inf if step == diverged_step else 2.3), ("lr", 1.6)):
            rows.append({"step": step, "block": "run", "stage": -1, "index": -1, "stat": stat,
                         "value": value})
    return pd.DataFrame(rows)


def diagnosis(step: int, block: str = "stages.0.1", kind: str = "gradients") -> dict:
    return {"diverged_block": block, "diverged_first_step": step,
            "diverged_first_stat": "grad_norm", "diverged_first_kind": kind,
            "diverged_clipping_active": False,
            "diagnosis": f"step {step}: grad_norm of {block} left its early range first "
                         f"({kind}); clipping inactive"}


def forensic_grid(root: Path) -> Path:
    """AGC lambda {0.04, 0.08} x batch {256, 512} x seeds {0, 1}, synthetic data (10
    classes, chance 10%). lambda 0.08 / batch 512: seed 0 completes at 26.6%, seed 1 diverges
    at step 4 (flight record, diagnosis). lambda 0.04 / batch 512: both seeds diverge (steps
    3 and 5) in the same block and kind. lambda 0.08 / batch 256 seed 1 diverges at step 6 in
    a store from before the recorder (no flight, no diagnosis). lambda 0.04 / batch 256 seed
    1 completes below chance (5%)."""
    runs = []
    for threshold in (0.04, 0.08):
        for batch in (256, 512):
            for seed in (0, 1):
                run_id = f"l{threshold}-b{batch}-s{seed}"
                acc = round(0.9 - threshold - batch / 2560 + 0.01 * seed, 4)
                state, step, extra, flight = "completed", None, {}, None
                if (threshold, batch, seed) == (0.08, 512, 0):
                    acc = 0.266
                if (threshold, batch, seed) == (0.04, 256, 1):
                    acc = 0.05
                if (threshold, batch) == (0.04, 512):
                    step = 3 if seed == 0 else 5
                    extra, flight = diagnosis(step - 1), fake_flight(step)
                if (threshold, batch, seed) == (0.08, 512, 1):
                    step = 4
                    extra = diagnosis(3, block="stages.0.0", kind="activations")
                    flight = fake_flight(4, blow_up="stages.0.0")
                if (threshold, batch, seed) == (0.08, 256, 1):
                    step = 6  # written before the flight recorder: no record, no diagnosis
                if step is not None:
                    state, acc = "diverged", None
                config = {"model": {"name": "nf_resnet26", "alpha": 0.2}, "batch_size": batch,
                          "clip": {"mode": "agc", "threshold": threshold,
                                   "clip_classifier": False},
                          "seed": seed, "data": "synthetic", "base_lr": 0.1, "epochs": 2}
                runs.append({
                    "run_id": run_id, "state": state, "config": config,
                    "axes": {"clip.threshold": threshold, "batch_size": batch, "seed": seed},
                    "summary": {"final_acc": acc, "best_acc": acc, "diverged_step": step,
                                "max_grad_norm": 2.0, "clip_fraction": 0.2, "steps": 40,
                                "duration_s": 3.0, **extra},
                    "metrics": fake_metrics(run_id, diverged_step=step, ids=False),
                    "blocks": fake_blocks(run_id, ids=False,
                                          steps=(0,) if step is not None else (0, 10, 20, 30)),
                    "flight": flight,
                })
    grid_dir = write_fake_grid(root, "forensic", runs)
    for run in runs:
        if run["flight"] is not None:
            run["flight"].to_parquet(grid_dir / "runs" / run["run_id"] / "flight.parquet",
                                     index=False)
    return grid_dir


def md_section(md: str, title: str) -> str:
    return md.split(f"## {title}\n")[1].split("\n## ")[0]


def md_rows(section: str) -> list[list[str]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


@pytest.fixture(scope="module")
def forensic_report(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """:func:`forensic_grid` and its report, built once for the tests that only read them."""
    grid_dir = forensic_grid(tmp_path_factory.mktemp("forensic"))
    return grid_dir, build_report(grid_dir)


@pytest.mark.slow
def test_section_gives_each_diverged_runs_diagnosis_and_the_timeline(forensic_report):
    grid_dir, paths = forensic_report
    md = paths["md"].read_text()
    section = md_section(md, "Diverged and failed runs")
    assert "more than 10x that median or not finite" in section  # sigprop.diagnosis.RULE
    # one run of its setting diverged: its own entry, its own diagnosis
    assert ("`l0.08-b512-s1` (batch_size=512, clip.threshold=0.08, seed=1) diverged at "
            "step 4. Diagnosis: step 3: grad_norm of stages.0.0 left its early range first "
            "(activations); clipping inactive.") in section
    # both seeds of lambda 0.04 / batch 512 broke in the same block and kind: one entry
    assert ("batch_size=512, clip.threshold=0.04: the 2 diverged seeds (`l0.04-b512-s0`, "
            "`l0.04-b512-s1`) broke the same way: gradients moved first, in block "
            "`stages.0.1`; diverged at steps 3, 5.") in section
    assert "- `l0.04-b512-s0`: step 2: grad_norm of stages.0.1" in section
    assert "- `l0.04-b512-s1`: step 4: grad_norm of stages.0.1" in section
    # a store from before the recorder
    assert "`l0.08-b256-s1` (batch_size=256, clip.threshold=0.08, seed=1) diverged at step " \
           "6. Diagnosis: no diagnosis recorded." in section
    images = re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", section)
    assert [name for name, _ in images] == ["divergence-timeline"]
    assert (grid_dir / images[0][1]).is_file()
    assert "No per-step record" not in section
    # the one rule is stated once, in the summary
    assert md.count("A diverged run counts at chance accuracy (1/classes) in every table") == 1
    assert "A diverged run counts at chance accuracy (1/classes)" in md_section(md, "Summary")


@pytest.mark.slow
def test_section_without_flight_records_says_so_and_draws_nothing(tmp_path):
    grid_dir = forensic_grid(tmp_path)
    for file in (grid_dir / "runs").glob("*/flight.parquet"):
        file.unlink()
    md = build_report(grid_dir)["md"].read_text()
    section = md_section(md, "Diverged and failed runs")
    assert "No per-step record (flight.parquet) was kept for the diverged runs" in section
    assert "![" not in section


def test_flight_and_diagnosis_come_from_load_results_or_the_run_folders(tmp_path):
    grid_dir = forensic_grid(tmp_path)
    store = GridStore(grid_dir.parent, grid_dir.name)
    runs = load_results(grid_dir).runs
    # a store reader without the flight frame: the report reads the run folders
    from_disk = forensic_flight(store, types.SimpleNamespace(), runs)
    assert sorted(from_disk["run_id"].unique()) == ["l0.04-b512-s0", "l0.04-b512-s1",
                                                    "l0.08-b512-s1"]
    assert from_disk.loc[from_disk["run_id"] == "l0.08-b512-s1", "step"].max() == 4
    # one with it: the frame is taken as given (this grid's diverged runs only)
    given = from_disk[from_disk["run_id"] == "l0.08-b512-s1"].assign(grid="forensic")
    other = given.assign(grid="another")
    picked = forensic_flight(store, types.SimpleNamespace(flight=pd.concat([given, other])),
                             runs)
    assert set(picked["grid"]) == {"forensic"} and len(picked) == len(given)
    assert forensic_flight(store, types.SimpleNamespace(flight=None), runs) is not None
    # a stored field of the wrong type is not shown (nor does it crash the report)
    statuses = {"l0.08-b512-s1": {"summary": {"diagnosis": ["not", "text"],
                                              "diverged_first_step": True}}}
    # (as a store without the diagnosis columns reads: they come from the statuses then)
    bare = runs.drop(columns=list(DIAGNOSIS_FIELDS), errors="ignore")
    shown = with_diagnosis(bare, statuses).set_index("run_id")
    assert shown.at["l0.08-b512-s1", "diagnosis"] is None
    assert shown.at["l0.08-b512-s1", "diverged_first_step"] is None


def timeline_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = pd.DataFrame([
        run_row("early", {"batch_size": 512, "seed": 0}, status="diverged", diverged_step=4,
                **{"clip.mode": "none"}) | diagnosis(3),
        run_row("late", {"batch_size": 512, "seed": 1}, status="diverged", diverged_step=500,
                **{"clip.mode": "none"}) | diagnosis(498, block="stages.0.0"),
    ])
    flight = pd.concat([
        fake_flight(4).assign(run_id="early"),
        # a late divergence keeps the first 50 steps and the last 32 before it
        fake_flight(500, blow_up="stages.0.0",
                    steps=[*range(50), *range(468, 501)]).assign(run_id="late"),
    ], ignore_index=True)
    return flight, runs


@pytest.mark.slow
def test_timeline_marks_the_divergence_and_the_first_out_of_range_step():
    flight, runs = timeline_frames()
    fig = plot_divergence_timeline(flight, runs)
    early, late = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert fig.axes[-1].get_ylabel().startswith("parameter gradient norm")  # the default
    # early: every step 0..4 is a column, labelled; the marks sit on their steps' columns
    ticks = [t.get_text() for t in early.get_xticklabels()]
    assert ticks == ["0", "1", "2", "3", "4"]
    assert early.collections[0].get_array().shape == (len(FLIGHT_BLOCKS), 5)
    (line,) = [a for a in early.get_lines() if a.get_gid() == "diverged"]
    assert ticks[int(line.get_xdata()[0])] == "4"
    (first,) = [a for a in early.get_lines() if a.get_gid() == "first-out-of-range"]
    assert ticks[int(first.get_xdata()[0])] == "3"
    (ring,) = [a for a in early.get_lines() if a.get_gid() == "first-block"]
    names = [t.get_text() for t in early.get_yticklabels()]
    assert names[int(ring.get_ydata()[0])] == "stages.0.1"
    # late: 83 kept steps in order, a gap line after step 49, the marks at steps 498 and 500
    assert late.collections[0].get_array().shape[1] == 83
    assert [a.get_xdata()[0] for a in late.get_lines() if a.get_gid() == "gap"] == [49.5]
    (line,) = [a for a in late.get_lines() if a.get_gid() == "diverged"]
    (first,) = [a for a in late.get_lines() if a.get_gid() == "first-out-of-range"]
    assert (line.get_xdata()[0], first.get_xdata()[0]) == (82, 80)
    labels = {t.get_position()[0]: t.get_text() for t in late.get_xticklabels()}
    assert labels[80] == "498" and labels[50] == "468" and labels[0] == "0"
    (ring,) = [a for a in late.get_lines() if a.get_gid() == "first-block"]
    assert [t.get_text() for t in late.get_yticklabels()][int(ring.get_ydata()[0])] \
        == "stages.0.0"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == ["divergence step", "first statistic out of range (diagnosis)",
                          "block where it left its range"]
    assert "steps not kept (gap)" in legend and "not finite or not recorded" in legend
    # without gradient norms the variance is drawn
    only_var = flight[flight["stat"] != "grad_norm"]
    fig = plot_divergence_timeline(only_var, runs, run_ids=["early"])
    assert fig.axes[-1].get_ylabel() == "var\n(log scale)"


def heatmap_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """AGC completes (probes at 0..30); unclipped diverges at step 4 with only step 0 probed
    and a flight record of steps 0..4; a third run (fewer steps) is not shown."""
    runs = pd.DataFrame([
        run_row("agc", {"clip.mode": "agc", "batch_size": 1024, "steps": 100},
                batch_size=1024, steps=100),
        run_row("none", {"clip.mode": "none", "batch_size": 1024, "steps": 100},
                status="diverged", diverged_step=4, batch_size=1024, steps=100,
                **{"clip.mode": "none"}),
        run_row("short", {"clip.mode": "agc", "batch_size": 256, "steps": 50},
                batch_size=256, steps=50),
    ])
    blocks = pd.concat([fake_blocks("agc"), fake_blocks("none", steps=(0,)),
                        fake_blocks("short")], ignore_index=True)
    flight = fake_flight(4).assign(run_id="none", grid="fake")
    return runs, blocks, flight


def test_gradient_heatmap_diverged_panel_uses_the_flight_steps():
    runs, blocks, flight = heatmap_frames()
    fig = plot_gradient_heatmap(blocks, runs, flight=flight)
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}
    diverged = panels["no clipping"]
    assert [t.get_text() for t in diverged.get_xticklabels()] == ["0", "1", "2", "3", "4"]
    (line,) = [a for a in diverged.get_lines() if a.get_gid() == "diverged"]
    assert line.get_xdata()[0] == 4
    (after,) = [p for p in diverged.patches if p.get_gid() == "after-divergence"]
    # the line is not at the panel's edge: what follows it is hatched to the edge
    assert diverged.get_xlim()[1] > 4 and after.get_x() == pytest.approx(4)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "divergence step" in legend and "after divergence" in legend
    # the panels' steps differ: each says its own, the figure title names no run length
    assert "steps 0–4 recorded" in diverged.get_title()
    assert "diverged at step 4" in diverged.get_title()
    assert "steps 0–30 recorded" in panels["AGC λ=0.04"].get_title()
    assert "steps 100" not in fig.get_suptitle()
    # without the flight record the panel is the lone probe at step 0
    bare = plot_gradient_heatmap(blocks, runs)
    bare_panel = next(ax for ax in bare.axes if ax.get_title().startswith("no clipping"))
    assert [t.get_text() for t in bare_panel.get_xticklabels()] == ["0"]
    # panels that agree on their steps keep the shared length in the figure title
    calm = runs.iloc[[0, 2]].assign(steps=100)
    calm_fig = plot_gradient_heatmap(blocks[blocks["run_id"].isin(["agc", "short"])],
                                     calm.assign(**{"clip.threshold": [0.04, 0.16]}),
                                     flight=flight)
    assert "steps 100" in calm_fig.get_suptitle()
    assert all("recorded" not in ax.get_title() for ax in calm_fig.axes)


@pytest.mark.slow
def test_key_results_and_stability_heatmap_count_a_diverged_seed_at_chance(forensic_report):
    grid_dir, paths = forensic_report
    md = paths["md"].read_text()
    rows = md_rows(md_section(md, "Key results"))
    header, cells = rows[0], {r[0]: r for r in rows[1:]}
    column = header.index("batch 512")
    # (26.6% + 10% at chance) / 2, the survivor alone would be 26.6%
    # bold: the best of its column (fewest divergences); †: its seeds split
    assert cells["AGC λ=0.08"][column] == "**18.3% (10.0%–26.6%), ✗ 1 of 2 diverged (at " \
        "chance) †**"
    assert cells["AGC λ=0.04"][column] == "10.0%, ✗ 2 of 2 diverged (at chance)"

    fig = plot_stability_heatmap(load_results(grid_dir).runs)
    (ax,) = [a for a in fig.axes if a.get_images()]
    image = ax.get_images()[0].get_array()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.04", "0.08"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["256", "512"]
    assert image[1, 1] == pytest.approx((0.266 + 0.1) / 2)
    assert image[0, 1] == pytest.approx(0.1)  # every seed diverged: at chance, hatched
    (hatched,) = gids(fig, "diverged-cell")
    assert hatched.get_xy() == (0.5, -0.5)
    counts = sorted(t.get_text() for t in gids(fig, "diverged-count"))
    assert counts == ["10.0%\n×2/2 diverged", "18.3%\n×1/2",
                      f"{(0.9 - 0.08 - 0.1 + 0.1) / 2:.1%}\n×1/2"]
    assert "counted at chance" in fig.get_suptitle()


def leading_number(text: str) -> float:
    """The sort key of the report's table script (SCRIPT in reports.build): the number a
    cell starts with; NaN when none."""
    match = re.match(r"^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", text.replace(",", ""), re.I)
    return float(match.group(0)) if match else np.nan


@pytest.mark.slow
def test_runs_table_sorts_diverged_runs_at_chance(forensic_report):
    md = forensic_report[1]["md"].read_text()
    rows = md_rows(md_section(md, "Runs"))
    header, body = rows[0], rows[1:]
    acc = header.index("final acc")
    cells = {r[0].replace("\\_", "_"): r[acc] for r in body}
    assert cells["l0.08-b512-s1"] == "10.0% ✗ diverged at step 4 (at chance)"
    assert all(not np.isnan(leading_number(c)) for c in cells.values())  # none blank
    ascending = sorted(cells, key=lambda r: (leading_number(cells[r]), r))
    assert ascending == [
        "l0.04-b256-s1",  # completed below chance, 5%
        "l0.04-b512-s0", "l0.04-b512-s1", "l0.08-b256-s1", "l0.08-b512-s1",  # at chance
        "l0.08-b512-s0",  # 26.6%
        "l0.08-b256-s0", "l0.04-b256-s0"]
