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
    frame = runs_frame({("nf", "none", 512): ["div", "div", 0.15], ("nf", "none", 32): [0.9, 0.9]})
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
CPU_SCALE = {"agc_batch": ["batch_size=32,128,512"], "lambda_batch": ["batch_size=32,128,512"]}


@pytest.mark.parametrize("name", ["agc_batch", "alpha_sweep", "classifier_clip", "lambda_batch",
                                  "quickstart", "small_batch"])
def test_every_shipped_grid_states_claims_that_select_runs_at_both_scales(name):
    from ablations.spec import GRIDS_DIR, load_spec

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
