"""Claims in specs: parsing errors, and verdicts on constructed result frames."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.claims import (
    ClaimError,
    evaluate_claims,
    monotone_choice_exists,
    parse_claims,
)
from ablations.spec import SpecError, expand, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]


def runs_frame(cells: dict[tuple, list]) -> pd.DataFrame:
    """{(model, clip mode, batch): [final acc or "div", ...]} -> a runs frame, one row a seed."""
    rows = []
    for (model, mode, batch), values in cells.items():
        for seed, value in enumerate(values):
            diverged = value == "div"
            rows.append({
                "run_id": f"{model}-{mode}-{batch}-{seed}", "model.name": model,
                "clip.mode": mode, "batch_size": batch, "seed": seed, "data": "digits",
                "model.num_classes": 10, "status": "diverged" if diverged else "completed",
                "final_acc": np.nan if diverged else value,
                "diverged_step": 4 if diverged else np.nan,
            })
    return pd.DataFrame(rows)


def one(table: dict, frame: pd.DataFrame):
    return evaluate_claims(parse_claims([table]), frame)[0]


NF_AGC_LARGE = {"model.name": "nf", "clip.mode": "agc", "batch_size": "@max"}


def compare(a: dict, **rest) -> dict:
    return {"text": "t", "source": "s", "check": "compare", "a": a, **rest}


# ----------------------------------------------------------------------------- compare


def test_exceeds_a_value_holds_only_when_every_seed_clears_it():
    frame = runs_frame({("nf", "agc", 32): [0.5, 0.5], ("nf", "agc", 512): [0.97, 0.98, 0.99]})
    verdict = one(compare(NF_AGC_LARGE, value=0.8), frame)
    assert verdict.verdict == "holds"
    assert "98.0% (97.0%–99.0%)" in verdict.evidence and "3 runs" in verdict.evidence
    mixed = runs_frame({("nf", "agc", 512): [0.97, 0.70]})
    assert one(compare(NF_AGC_LARGE, value=0.8), mixed).verdict == "inconclusive"
    low = runs_frame({("nf", "agc", 512): [0.60, 0.70]})
    assert one(compare(NF_AGC_LARGE, value=0.8), low).verdict == "does not hold"


def test_diverged_runs_count_at_chance_in_accuracy():
    frame = runs_frame({("nf", "agc", 512): [0.99, "div", 0.98]})
    verdict = one(compare(NF_AGC_LARGE, value=0.8), frame)
    # mean of 0.99, 0.10 (chance for 10 classes), 0.98
    assert "69.0% (10.0%–99.0%)" in verdict.evidence
    assert "1 diverged (at chance)" in verdict.evidence
    assert verdict.verdict == "inconclusive"


def test_exceeds_between_selections_needs_separated_seed_ranges():
    a = {"model.name": "nf", "clip.mode": "agc"}
    b = {"model.name": "nf", "clip.mode": "none"}
    separated = runs_frame({("nf", "agc", 256): [0.90, 0.92], ("nf", "none", 256): [0.80, 0.85]})
    assert one(compare(a, b=b), separated).verdict == "holds"
    # even the best pairing (92 vs 80) is 12 points apart; the claim asks for 20
    assert one(compare(a, b=b, margin=0.2), separated).verdict == "does not hold"
    # the worst pairing is 5 points apart, the best 12: a 10-point claim is undecided
    assert one(compare(a, b=b, margin=0.1), separated).verdict == "inconclusive"
    overlapping = runs_frame({("nf", "agc", 256): [0.90, 0.80],
                              ("nf", "none", 256): [0.85, 0.78]})
    verdict = one(compare(a, b=b), overlapping)
    assert verdict.verdict == "inconclusive" and "overlap" in verdict.reason
    reversed_ = runs_frame({("nf", "agc", 256): [0.70, 0.72], ("nf", "none", 256): [0.80, 0.85]})
    assert one(compare(a, b=b), reversed_).verdict == "does not hold"
    assert one(compare(a, b=b, relation="below"), reversed_).verdict == "holds"


def test_within_uses_every_pair_of_runs():
    a = {"model.name": "nf", "batch_size": "@min"}
    b = {"model.name": "bn", "batch_size": "@min"}
    close = runs_frame({("nf", "none", 32): [0.96, 0.99], ("bn", "none", 32): [0.96, 0.983]})
    verdict = one(compare(a, b=b, relation="within", margin=0.05), close)
    assert verdict.verdict == "holds"
    assert "margin 5.0 points" in verdict.evidence
    assert "difference of means +0.3 points" in verdict.evidence
    far = runs_frame({("nf", "none", 32): [0.70, 0.72], ("bn", "none", 32): [0.96, 0.98]})
    assert one(compare(a, b=b, relation="within", margin=0.05), far).verdict == "does not hold"
    # means 8 points apart, but the closest seeds come within 5
    between = runs_frame({("nf", "none", 32): [0.84, 0.96], ("bn", "none", 32): [0.98, 0.98]})
    assert one(compare(a, b=b, relation="within", margin=0.05), between).verdict == \
        "inconclusive"


def test_too_few_finished_runs_are_inconclusive():
    frame = runs_frame({("nf", "agc", 512): [0.99]})
    verdict = one(compare(NF_AGC_LARGE, value=0.8), frame)
    assert verdict.verdict == "inconclusive" and "too few finished runs" in verdict.reason
    frame.loc[0, "status"] = "queued"
    frame = pd.concat([frame, runs_frame({("nf", "agc", 512): [0.98, 0.97]})])
    verdict = one(compare(NF_AGC_LARGE, value=0.8), frame)
    assert verdict.verdict == "holds" and "1 not finished" in verdict.evidence
    assert one(compare(NF_AGC_LARGE, value=0.8, min_runs=3), frame).verdict == "inconclusive"


# ----------------------------------------------------------------------------- share


def share(**rest) -> dict:
    return {"text": "t", "source": "s", "check": "share",
            "select": {"model.name": "nf", "clip.mode": "none", "batch_size": "@max"}, **rest}


def test_share_of_diverged_or_near_chance_runs():
    frame = runs_frame({("nf", "none", 512): ["div", "div", 0.12], ("nf", "none", 32): [0.9, 0.9]})
    verdict = one(share(outcome=["diverged", "near_chance"]), frame)
    assert verdict.verdict == "holds"
    assert verdict.evidence.startswith("model.name=nf, clip.mode=none, batch_size=512: 3 of 3 "
                                       "finished runs: 2 diverged, 1 near chance")
    assert "at steps 4, 4" in verdict.evidence
    assert one(share(outcome="diverged"), frame).verdict == "does not hold"
    assert one(share(outcome="diverged", at_least=0.6), frame).verdict == "holds"
    learned = runs_frame({("nf", "none", 512): [0.95, 0.97]})
    assert one(share(outcome=["diverged", "near_chance"]), learned).verdict == "does not hold"


# ----------------------------------------------------------------------------- trend


def lambda_frame(best: dict[int, float], spread: float = 0.01) -> pd.DataFrame:
    rows = []
    for batch, top in best.items():
        for lam in (0.01, 0.04, 0.16):
            for seed in range(2):
                acc = 0.9 if lam == top else 0.5
                rows.append({"run_id": f"{batch}-{lam}-{seed}", "batch_size": batch,
                             "clip.threshold": lam, "clip.mode": "agc", "status": "completed",
                             "final_acc": acc + spread * seed, "model.num_classes": 10})
    return pd.DataFrame(rows)


def trend() -> dict:
    return {"text": "t", "source": "s", "check": "trend", "select": {"clip.mode": "agc"},
            "over": "batch_size", "choose": "clip.threshold"}


def test_trend_of_the_best_threshold():
    falling = lambda_frame({64: 0.16, 256: 0.04, 1024: 0.01})
    verdict = one(trend(), falling)
    assert verdict.verdict == "holds"
    assert "batch_size 64: best clip.threshold 0.16" in verdict.evidence
    rising = lambda_frame({64: 0.01, 256: 0.04, 1024: 0.16})
    assert one(trend(), rising).verdict == "does not hold"
    assert one({**trend(), "direction": "non-decreasing"}, rising).verdict == "holds"


def test_trend_with_ties_is_inconclusive():
    frame = lambda_frame({64: 0.16, 256: 0.01, 1024: 0.04})
    # make 0.04 tie with 0.01 at batch 256: the ranges overlap
    tied = (frame["batch_size"] == 256) & (frame["clip.threshold"] == 0.04)
    frame.loc[tied, "final_acc"] = [0.89, 0.91]
    verdict = one(trend(), frame)
    assert verdict.verdict == "inconclusive" and "tied" in verdict.evidence


def test_monotone_choice_among_tie_sets():
    assert monotone_choice_exists([[0.16], [0.01, 0.04], [0.04]], sign=-1)
    assert not monotone_choice_exists([[0.01], [0.16], [0.04]], sign=-1)
    assert monotone_choice_exists([[0.01], [0.04, 0.16], [0.16]], sign=1)


# ----------------------------------------------------------------------------- spec errors

BASE = {
    "base": {"data": "synthetic", "train_size": 64, "test_size": 32, "steps": 2,
             "image_size": 8, "model": {"name": "nf_resnet26", "width_mult": 0.125,
                                        "depths": [1, 1, 1, 1], "stem": "cifar"}},
    "grid": {"batch_size": [16, 32], "clip.mode": ["none", "agc"]},
    "base_clip": None,
}


def spec_with(claim: dict):
    raw = {k: v for k, v in BASE.items() if k != "base_clip"}
    raw["base"] = {**raw["base"], "clip": {"mode": "none", "threshold": 0.01}}
    return spec_from_dict({**raw, "claims": [claim]})


GOOD = compare({"clip.mode": "agc", "batch_size": "@max"}, value=0.5)


@pytest.mark.parametrize("claim, message", [
    ({**GOOD, "check": "vibes"}, r"check must be one of compare, share, trend"),
    ({**GOOD, "colour": "red"}, r"unknown field\(s\) colour"),
    ({**GOOD, "text": ""}, r"text must be a non-empty string"),
    ({k: v for k, v in GOOD.items() if k != "value"}, r"exactly one of b .* or value"),
    ({**GOOD, "b": {"clip.mode": "none"}}, r"exactly one of b .* or value"),
    ({**GOOD, "relation": "bigger"}, r"relation must be one of exceeds, below, within"),
    ({**GOOD, "metric": "vibes"}, r"metric must be one of"),
    ({**GOOD, "value": float("inf")}, r"value must be a finite number"),
    ({**GOOD, "margin": -0.1}, r"margin must be in >= 0"),
    ({**GOOD, "a": {}}, r"a must be a table of run keys"),
    ({**GOOD, "a": {"batch_size": "@median"}}, r"only @min and @max"),
])
def test_malformed_claims_are_spec_errors(claim, message):
    with pytest.raises(SpecError, match=message):
        spec_with(claim)


def test_claims_naming_unknown_keys_or_selecting_nothing_fail_at_expansion():
    with pytest.raises(SpecError, match=r"unknown run key\(s\) clip.moed"):
        expand(spec_with(compare({"clip.moed": "agc"}, value=0.5)))
    with pytest.raises(SpecError, match=r"selection a \(clip.mode=norm\) matches no run"):
        expand(spec_with(compare({"clip.mode": "norm"}, value=0.5)))
    with pytest.raises(SpecError, match=r"selection b .* matches no run"):
        expand(spec_with(compare({"clip.mode": "agc"}, b={"batch_size": 64})))
    with pytest.raises(SpecError, match="a trend needs two or more values of clip.threshold"):
        expand(spec_with({"text": "t", "source": "s", "check": "trend",
                          "select": {"clip.mode": "agc"}, "over": "batch_size",
                          "choose": "clip.threshold"}))
    runs = expand(spec_with(GOOD))
    assert len(runs) == 4


@pytest.mark.slow
def test_a_bad_claim_in_a_spec_file_is_one_line_and_exit_2(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(
        '[base]\ndata = "synthetic"\n[grid]\nbatch_size = [16, 32]\n'
        '[[claims]]\ntext = "t"\nsource = "s"\ncheck = "compare"\n'
        'a = { batch_size = 64 }\nvalue = 0.5\n'
    )
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "run_ablations.py"), "run", str(spec),
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "matches no run" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# The CPU-scale commands recorded in BENCHMARKS.md ("Shipped grids at CPU scale").
CPU_SCALE = {"agc_batch": ["batch_size=32,1024"], "lambda_batch": ["batch_size=32,256,1024"]}


@pytest.mark.parametrize("name", ["agc_batch", "alpha_sweep", "classifier_clip", "lambda_batch",
                                  "quickstart", "small_batch"])
def test_every_shipped_grid_states_claims_that_select_runs_at_both_scales(name):
    from ablations.shipped import GRIDS_DIR
    from ablations.spec import load_spec

    spec = load_spec(GRIDS_DIR / f"{name}.toml")
    claims = parse_claims(spec.claims)
    assert claims, f"{name} states no claims"
    assert all(c.source.strip() and c.text.strip() for c in claims)
    assert expand(spec)  # selections are checked against the runs, as written
    if name != "quickstart":
        cpu = load_spec(GRIDS_DIR / f"{name}.toml", ["data=digits", *CPU_SCALE.get(name, [])])
        expand(cpu)
        assert not cpu.untested_claims, cpu.untested_claims


def test_claim_errors_name_the_claim():
    with pytest.raises(ClaimError, match=r"claims\[0\] \(X9\)\.relation"):
        parse_claims([{**GOOD, "id": "X9", "relation": "nope"}])
    with pytest.raises(ClaimError, match="duplicate id"):
        parse_claims([{**GOOD, "id": "A"}, {**GOOD, "id": "A"}])


# ----------------------------------------------------------------------------- rules (issue 25)


def test_a_tie_demotes_a_passing_trend_exactly_as_it_lifts_a_failing_one():
    # the strict best thresholds fall (0.16, 0.04, 0.01): holds when nothing is tied
    frame = lambda_frame({64: 0.16, 256: 0.04, 1024: 0.01})
    assert one(trend(), frame).verdict == "holds"
    # at batch 1024, 0.16 now ties with the best 0.01 (ranges overlap): taking 0.16 there
    # would make the sequence rise, so the trend is no longer shown
    tied = (frame["batch_size"] == 1024) & (frame["clip.threshold"] == 0.16)
    frame.loc[tied, "final_acc"] = [0.895, 0.905]
    verdict = one(trend(), frame)
    assert verdict.verdict == "inconclusive", verdict
    assert "another choice among tied values is not" in verdict.reason
    # a tie that keeps every choice monotone (0.04 tied with 0.16 at batch 64) still holds
    frame = lambda_frame({64: 0.16, 256: 0.04, 1024: 0.01})
    tied = (frame["batch_size"] == 64) & (frame["clip.threshold"] == 0.04)
    frame.loc[tied, "final_acc"] = [0.895, 0.905]
    assert one(trend(), frame).verdict == "holds"


def test_every_choice_monotone():
    from ablations.claims import every_choice_monotone

    assert every_choice_monotone([[0.16, 0.04], [0.04], [0.01]], -1)
    assert not every_choice_monotone([[0.16], [0.04], [0.01, 0.16]], -1)
    assert every_choice_monotone([[1, 2], [2, 3], [3]], 1)
    assert not every_choice_monotone([[1, 3], [2]], 1)


def test_exceeds_is_strict_a_tie_beats_nothing():
    a = {"model.name": "nf", "clip.mode": "agc"}
    b = {"model.name": "nf", "clip.mode": "none"}
    # 297 test images: equal accuracies happen; worst a - best b == 0 is not "above"
    tie = runs_frame({("nf", "agc", 256): [0.98, 0.98], ("nf", "none", 256): [0.98, 0.98]})
    assert one(compare(a, b=b), tie).verdict == "does not hold"
    touching = runs_frame({("nf", "agc", 256): [0.98, 0.99], ("nf", "none", 256): [0.97, 0.98]})
    assert one(compare(a, b=b), touching).verdict == "inconclusive"
    assert one(compare(a, b=b, rule="t95"), tie).verdict == "does not hold"
    # against a constant: exactly the value is not above it
    exact = runs_frame({("nf", "agc", 512): [0.8, 0.8]})
    assert one(compare(NF_AGC_LARGE, value=0.8), exact).verdict == "does not hold"


def test_t95_interval_decides_exceeds():
    a = {"model.name": "bn", "clip.mode": "none"}
    b = {"model.name": "nf", "clip.mode": "none"}
    # two diverged NF seeds at chance and one at 0.9: the ranges overlap, and the t interval
    # of the difference of means (3 + 3 seeds) is wide
    frame = runs_frame({("bn", "none", 1024): [0.97, 0.975, 0.98],
                        ("nf", "none", 1024): ["div", "div", 0.9]})
    verdict = one(compare(a, b=b, rule="t95"), frame)
    assert verdict.verdict == "inconclusive"
    assert "95% t interval" in verdict.evidence
    # the interval by hand: Welch with all the variance on b's side -> df = n_b - 1 = 2
    from scipy import stats
    nf = np.array([0.1, 0.1, 0.9])
    half = stats.t.ppf(0.975, 2) * nf.std(ddof=1) / np.sqrt(3)
    diff = 0.975 - nf.mean()
    assert f"[+{100 * (diff - half):.1f} points" in verdict.evidence or diff - half < 0
    assert f"+{100 * (diff + half):.1f} points]" in verdict.evidence
    clear = runs_frame({("bn", "none", 1024): [0.97, 0.975, 0.98],
                        ("nf", "none", 1024): ["div", "div", 0.12]})
    assert one(compare(a, b=b, rule="t95"), clear).verdict == "holds"
    reverse = one(compare(b, b=a, rule="t95"), clear)
    assert reverse.verdict == "does not hold"


def test_welch_interval_matches_scipy():
    from scipy import stats

    from ablations.claims import welch_interval

    a, b = np.array([0.91, 0.93, 0.96]), np.array([0.80, 0.85, 0.83, 0.81])
    est, lo, hi, df = welch_interval([(a, 1.0), (b, -1.0)])
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert est == pytest.approx(a.mean() - b.mean())
    assert (lo, hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    # no variance anywhere: the interval is the point
    assert welch_interval([(np.array([0.5, 0.5]), 1.0)], 0.25)[1:3] == (0.25, 0.25)


def test_derived_test_set_margin_for_within_and_at_least():
    a = {"model.name": "nf", "clip.mode": "agc"}
    b = {"model.name": "bn", "clip.mode": "none"}
    # reference mean 0.95 on 297 digits test images: margin 1.96 * sqrt(.95 * .05 / 297)
    margin = 1.959963984540054 * np.sqrt(0.95 * 0.05 / 297)
    assert margin == pytest.approx(0.02479, abs=1e-5)
    close = runs_frame({("nf", "agc", 1024): [0.949, 0.951, 0.950],
                        ("bn", "none", 1024): [0.949, 0.951, 0.950]})
    verdict = one(compare(a, b=b, relation="within", margin="test_set", rule="t95"), close)
    assert verdict.verdict == "holds"
    assert "margin 2.5 points (derived: 95% binomial half-width of the reference's 95.0% on " \
           "297 test images)" in verdict.evidence
    far = runs_frame({("nf", "agc", 1024): [0.80, 0.81, 0.805],
                      ("bn", "none", 1024): [0.949, 0.951, 0.950]})
    assert one(compare(a, b=b, relation="within", margin="test_set", rule="t95"),
               far).verdict == "does not hold"
    # at_least ("comparable or better"): far above the reference also holds
    better = runs_frame({("nf", "agc", 1024): [0.99, 0.995, 0.99],
                         ("bn", "none", 1024): [0.949, 0.951, 0.950]})
    assert one(compare(a, b=b, relation="at_least", margin="test_set", rule="t95"),
               better).verdict == "holds"
    assert one(compare(a, b=b, relation="within", margin="test_set", rule="t95"),
               better).verdict == "does not hold"
    assert one(compare(a, b=b, relation="at_least", margin="test_set", rule="t95"),
               far).verdict == "does not hold"
    # a run's own test size wins over the data set's default
    small = close.assign(test_size=30)
    verdict = one(compare(a, b=b, relation="within", margin="test_set"), small)
    assert "on 30 test images" in verdict.evidence


def test_within_needs_a_stated_or_derived_margin():
    with pytest.raises(ClaimError, match="needs a margin"):
        parse_claims([compare(NF_AGC_LARGE, value=0.5, relation="within")])
    with pytest.raises(ClaimError, match="test set's size"):
        parse_claims([compare(NF_AGC_LARGE, value=0.5, relation="within", margin="test_set",
                              metric="var_growth")])
    with pytest.raises(ClaimError, match="margin must be a number or one of test_set"):
        parse_claims([compare(NF_AGC_LARGE, value=0.5, relation="within", margin="seeds")])
    with pytest.raises(ClaimError, match="needs rule"):
        parse_claims([compare(NF_AGC_LARGE, value=0.5, relation="consistent")])


def interaction(**rest) -> dict:
    return {"text": "t", "source": "s", "check": "interaction",
            "a": {"model.name": "bn", "batch_size": "@max"},
            "b": {"model.name": "nf", "batch_size": "@max"},
            "c": {"model.name": "bn", "batch_size": "@min"},
            "d": {"model.name": "nf", "batch_size": "@min"}, "relation": "exceeds", **rest}


def test_interaction_checks_a_difference_of_differences():
    # gap at the large batch 0.97 - 0.30 = 0.67, at the small batch 0.94 - 0.94 = 0
    frame = runs_frame({("bn", "none", 1024): [0.96, 0.97, 0.98],
                        ("nf", "none", 1024): [0.25, 0.30, 0.35],
                        ("bn", "none", 32): [0.93, 0.94, 0.95],
                        ("nf", "none", 32): [0.93, 0.94, 0.95]})
    verdict = one(interaction(), frame)
    assert verdict.verdict == "holds", verdict
    assert "(a − b) − (c − d) +67.0 points" in verdict.evidence
    # a constant gap at both batch sizes: no interaction, however large the gap
    flat = runs_frame({("bn", "none", 1024): [0.96, 0.97, 0.98],
                       ("nf", "none", 1024): [0.25, 0.30, 0.35],
                       ("bn", "none", 32): [0.96, 0.97, 0.98],
                       ("nf", "none", 32): [0.25, 0.30, 0.35]})
    assert one(interaction(), flat).verdict == "inconclusive"
    reverse = runs_frame({("bn", "none", 1024): [0.93, 0.94, 0.95],
                          ("nf", "none", 1024): [0.93, 0.94, 0.95],
                          ("bn", "none", 32): [0.96, 0.97, 0.98],
                          ("nf", "none", 32): [0.25, 0.30, 0.35]})
    assert one(interaction(), reverse).verdict == "does not hold"
    with pytest.raises(ClaimError, match="relation must be one of exceeds, below"):
        parse_claims([interaction(relation="within")])
    with pytest.raises(ClaimError, match="an interaction takes a number"):
        parse_claims([interaction(margin="test_set")])


def test_best_of_compares_each_selection_at_its_best_value():
    rows = []
    for lam, accs in ((0.01, [0.70, 0.72]), (0.16, [0.93, 0.94])):
        for seed, acc in enumerate(accs):
            rows.append({"run_id": f"agc-{lam}-{seed}", "model.name": "nf", "clip.mode": "agc",
                         "clip.threshold": lam, "batch_size": 32, "seed": seed,
                         "data": "digits", "status": "completed", "final_acc": acc})
    for seed, acc in enumerate([0.92, 0.95]):
        rows.append({"run_id": f"none-{seed}", "model.name": "nf", "clip.mode": "none",
                     "clip.threshold": np.nan, "batch_size": 32, "seed": seed, "data": "digits",
                     "status": "completed", "final_acc": acc})
    frame = pd.DataFrame(rows)
    claim = compare({"clip.mode": "agc"}, b={"clip.mode": "none"}, relation="within",
                    margin="test_set", best_of="clip.threshold")
    verdict = one(claim, frame)
    assert "at its best clip.threshold 0.16 (of 0.01, 0.16" in verdict.evidence
    assert "93.5% (93.0%–94.0%); 2 runs;" in verdict.evidence
    assert "not finished" not in verdict.evidence  # the other threshold's runs are not missing


def test_consistent_asks_whether_the_interval_holds_the_expected_value():
    rows = [{"run_id": f"r{i}", "model.alpha": 0.2, "status": "completed",
             "var_growth_rel": g} for i, g in enumerate([0.038, 0.040, 0.042])]
    frame = pd.DataFrame(rows)
    claim = compare({"model.alpha": 0.2}, value=1.0, relation="consistent", rule="t95",
                    metric="alpha2_ratio")
    assert one(claim, frame).verdict == "holds"  # ratios 0.95, 1.0, 1.05
    low = frame.assign(var_growth_rel=[0.027, 0.028, 0.0285])  # ratios about 0.69
    verdict = one(claim, low)
    assert verdict.verdict == "does not hold" and "excludes the expected value" in verdict.reason


def test_learned_outcome_uses_the_binomial_bar_over_chance():
    # chance 0.1 on 297 images: the one-sided 95% bar is 0.1 + 1.645 * sqrt(.09/297) = 12.9%
    frame = runs_frame({("bn", "none", 1024): [0.127, 0.131, 0.97]})
    sel = {"model.name": "bn", "batch_size": "@max"}
    verdict = one({"text": "t", "source": "s", "check": "share", "select": sel,
                   "outcome": "learned"}, frame)
    assert verdict.verdict == "does not hold"
    assert "2 learned" in verdict.evidence


def test_variance_growth_relative_to_the_stem():
    from ablations.worker import variance_growth

    # stem variance 0.25; a stage of three blocks at 0.25 * (1 + k * 0.04)
    rows = [{"step": 0, "block": "stem", "stage": -1, "index": -1, "stat": "var",
             "value": 0.25}]
    rows += [{"step": 0, "block": f"b{k}", "stage": 0, "index": k, "stat": "var",
              "value": 0.25 * (1.04 + 0.04 * k)} for k in range(3)]
    rows += [{"step": 10, "block": "stem", "stage": -1, "index": -1, "stat": "var",
              "value": 9.0}]
    frame = pd.DataFrame(rows)
    assert variance_growth(frame) == pytest.approx(0.01)
    assert variance_growth(frame, relative=True) == pytest.approx(0.04)
    assert variance_growth(frame[frame["block"] != "stem"], relative=True) is None


# ----------------------------------------------------------------------------- the package


def test_each_check_is_its_own_class_and_allows_only_its_own_fields():
    from ablations.claims import CHECK_CLASSES, CHECKS

    tables = {
        "compare": compare(NF_AGC_LARGE, value=0.5),
        "share": {"text": "t", "source": "s", "check": "share", "select": NF_AGC_LARGE},
        "trend": {**trend()},
        "spread": {"text": "t", "source": "s", "check": "spread", "a": NF_AGC_LARGE,
                   "value": 0.1, "over": "clip.threshold"},
        "interaction": interaction(),
    }
    assert set(tables) == set(CHECKS)
    for name, table in tables.items():
        claim = parse_claims([table])[0]
        assert type(claim) is CHECK_CLASSES[name] and claim.check == name
    with pytest.raises(ClaimError, match=r"unknown field\(s\) over for check 'share'; allowed: "
                       r"at_least, chance_margin, check, id, metric, min_runs, outcome, quote, "
                       r"select, source, text$"):
        parse_claims([{**tables["share"], "over": "batch_size"}])


def test_is_number_is_finite_by_default_and_any_number_for_run_keys():
    from ablations.claims import is_number
    from reports.figures import style

    assert style.is_number is is_number  # one function, not two that disagree
    for value in (1, 0.5, np.float32(2.0), np.int64(3)):
        assert is_number(value) and is_number(value, finite=False)
    for value in (np.inf, -np.inf, np.nan, np.float64("nan")):
        assert not is_number(value) and is_number(value, finite=False)
    for value in (True, np.bool_(False), "1", None, (1,)):
        assert not is_number(value) and not is_number(value, finite=False)


def test_at_max_of_a_key_holding_inf_selects_the_inf_runs():
    # clip.threshold = inf is a number of the grid (no clipping in effect), so @max is inf
    rows = [{"run_id": f"{t}-{s}", "clip.threshold": t, "status": "completed",
             "final_acc": acc, "model.num_classes": 10}
            for t, accs in ((0.1, (0.5, 0.52)), (np.inf, (0.9, 0.92)))
            for s, acc in enumerate(accs)]
    verdict = one(compare({"clip.threshold": "@max"}, value=0.8), pd.DataFrame(rows))
    assert verdict.evidence.startswith("a (clip.threshold=inf): 91.0% (90.0%–92.0%); 2 runs")
    assert verdict.verdict == "holds"


def test_chance_levels_per_run_and_strict_about_unknown_data_sets():
    from ablations.claims import chance_levels
    from sigprop.errors import UserError

    runs = pd.DataFrame({"model.num_classes": [100, np.nan, 1, np.nan],
                         "data": ["digits", "digits", "cifar100", None]})
    # each run by its own class count, else its data set's; a count below 2 is no count
    np.testing.assert_allclose(chance_levels(runs), [0.01, 0.1, 0.01, np.nan])
    unknown = pd.DataFrame({"model.num_classes": [10, np.nan], "data": ["nope", "nope"]})
    np.testing.assert_allclose(chance_levels(unknown), [0.1, np.nan])
    with pytest.raises(UserError, match="unknown data set 'nope'"):
        chance_levels(unknown, strict=True)
    np.testing.assert_allclose(chance_levels(unknown.iloc[:1], strict=True), [0.1])


def test_a_diverged_run_of_an_unknown_data_set_is_not_quietly_dropped():
    # its value is its chance level: with that unknown the claim cannot be checked (the report
    # says so) rather than judged on the runs that survived
    frame = runs_frame({("nf", "agc", 512): [0.99, "div", 0.98]}).drop(
        columns="model.num_classes").assign(data="nope")
    from sigprop.errors import UserError

    with pytest.raises(UserError, match="unknown data set 'nope'"):
        one(compare(NF_AGC_LARGE, value=0.8), frame)
