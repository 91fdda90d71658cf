"""Paper B's recipe: how a run departs from it, and that every shipped grid declares (and
justifies) its departures and quotes the sentences its claims test."""

from __future__ import annotations

import re

import pytest

from ablations.claims import parse_claims
from ablations.keys import flatten
from ablations.recipe import recipe_departures
from ablations.shipped import GRIDS_DIR, shipped_grids
from ablations.spec import SpecError, expand, load_spec, spec_from_dict

ARXIV = re.compile(r"arXiv (2101\.08692|2102\.06171)")
CPU_BATCHES = {"agc_batch": ["batch_size=32,1024"], "lambda_batch": ["batch_size=32,256,1024"]}
WHERE = re.compile(r"\b(section|appendix|Figure|Table) [0-9A-Z]")


def test_the_papers_lr_is_no_departure_and_8x_is_one():
    assert recipe_departures({"base_lr": 0.1, "batch_size": 1024, "momentum": 0.9}) == {}
    out = recipe_departures({"base_lr": 0.8, "batch_size": 32})
    assert out["base_lr"][:2] == (0.8, 0.1) and "§4.1" in out["base_lr"][2]
    # an lr given directly departs unless it is 0.1 * B/256
    assert recipe_departures({"lr": 0.4, "base_lr": None, "batch_size": 1024}) == {}
    assert "lr" in recipe_departures({"lr": 1.6, "base_lr": None, "batch_size": 1024})
    # the runs frame fills lr for every run: base_lr decides then
    assert recipe_departures({"lr": 0.4, "base_lr": 0.1, "batch_size": 1024}) == {}


def test_agc_thresholds_outside_the_papers_sweep_depart():
    assert recipe_departures({"clip.mode": "agc", "clip.threshold": 0.04}) == {}
    assert "clip.threshold" in recipe_departures({"clip.mode": "agc", "clip.threshold": 0.5})
    # global-norm thresholds have no paper value to depart from
    assert recipe_departures({"clip.mode": "norm", "clip.threshold": 0.5}) == {}
    assert recipe_departures({"nesterov": False, "label_smoothing": 0.0}).keys() == {
        "nesterov", "label_smoothing"}


def base_spec(**departures) -> dict:
    return {"name": "g", "base": {"data": "synthetic", "steps": 1}, "grid": {"seed": [0]},
            "departures": departures}


def test_departures_need_the_papers_value_and_a_measurement():
    spec = spec_from_dict(base_spec(base_lr={"paper": 0.1, "why": "measured: ..."}))
    assert spec.departures == {"base_lr": {"paper": 0.1, "why": "measured: ..."}}
    with pytest.raises(SpecError, match="departures.base_lr must be a table with paper"):
        spec_from_dict(base_spec(base_lr={"why": "x"}))
    with pytest.raises(SpecError, match="departures.base_lr.why must say"):
        spec_from_dict(base_spec(base_lr={"paper": 0.1, "why": " "}))
    with pytest.raises(SpecError, match="unknown field"):
        spec_from_dict(base_spec(base_lr={"paper": 0.1, "why": "m", "because": "x"}))


@pytest.mark.parametrize("name", shipped_grids())
def test_every_shipped_claim_quotes_its_paper_with_arxiv_id_and_place(name):
    spec = load_spec(GRIDS_DIR / f"{name}.toml")
    claims = parse_claims(spec.claims)
    assert claims
    for claim in claims:
        assert len(claim.quote) > 20, claim.id
        assert ARXIV.search(claim.source), (claim.id, claim.source)
        assert WHERE.search(claim.source), (claim.id, claim.source)
        # margins are derived or absent, never a lab's own number
        assert claim.margin_rule or not claim.margin, claim.id


@pytest.mark.parametrize("name", shipped_grids())
@pytest.mark.parametrize("data", [None, "digits", "synthetic"])
def test_shipped_grids_train_on_the_papers_recipe_or_declare_why(name, data):
    overrides = [f"data={data}"] if data else []
    if data == "digits":  # digits has 1,500 training images: the CPU-scale batch axes
        overrides += CPU_BATCHES.get(name, [])
    spec = load_spec(GRIDS_DIR / f"{name}.toml", overrides)
    undeclared = set()
    for run in expand(spec):
        flat = flatten(run.config)
        undeclared |= set(recipe_departures(flat)) - set(spec.departures)
    assert not undeclared, f"{name} ({data or 'default data'}): {sorted(undeclared)}"
    for key, entry in spec.departures.items():
        assert len(entry["why"]) > 40, key
