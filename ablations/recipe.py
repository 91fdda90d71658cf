"""The papers' training recipe, and how a run's config departs from it.

Paper B (Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", arXiv 2102.06171) section 4.1 trains its AGC ablations with "SGD with
Nesterov's Momentum ... a base learning rate of 0.1 for batch size 256, which is scaled
linearly with the batch size", over "a range of lambda values [0.01, 0.02, 0.04, 0.08, 0.16]";
section 5.1: "For batch size 1024 to 4096, set lambda=0.01". Every shipped grid trains with
this recipe unless its spec's ``[departures]`` table declares a departure: the key, the paper's
value and the measurement that justifies it. The report shows each departure beside the
paper's value, and says when one is not declared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

PAPER_B = "arXiv 2102.06171"
# key -> (the paper's value, where the paper gives it)
PAPER_RECIPE: dict[str, tuple[Any, str]] = {
    "base_lr": (0.1, f"{PAPER_B} §4.1: base lr 0.1 at batch 256, scaled linearly"),
    "momentum": (0.9, f"{PAPER_B} §4.1 (SGD with Nesterov's momentum) and appendix"),
    "nesterov": (True, f"{PAPER_B} §4.1: SGD with Nesterov's momentum"),
    "label_smoothing": (0.1, f"{PAPER_B} appendix A (training recipe)"),
}
# AGC thresholds the paper uses (§4.1's sweep); 0.01 is its recipe for batch 1024 to 4096
PAPER_AGC_THRESHOLDS = (0.01, 0.02, 0.04, 0.08, 0.16)
AGC_THRESHOLD_SOURCE = f"{PAPER_B} §4.1: lambda in [0.01, 0.02, 0.04, 0.08, 0.16]"
# the fields of one [departures] entry
DEPARTURE_FIELDS = ("paper", "why")


def recipe_departures(flat: Mapping[str, Any]) -> dict[str, tuple[Any, Any, str]]:
    """{key: (the run's value, the paper's value, source)} for every recipe setting that a
    run's flattened config (dotted keys) sets differently from paper B."""
    out: dict[str, tuple[Any, Any, str]] = {}
    # a config sets lr itself only where base_lr is blank (the runs frame fills lr always)
    lr_given = flat.get("lr") is not None and flat.get("base_lr") is None
    for key, (paper, source) in PAPER_RECIPE.items():
        if key == "base_lr" and lr_given:
            batch = flat.get("batch_size")
            expected = paper * batch / 256 if isinstance(batch, int | float) else None
            if expected is None or not math.isclose(float(flat["lr"]), expected, rel_tol=1e-9):
                out["lr"] = (flat["lr"], "0.1 × batch size / 256", source)
            continue
        value = flat.get(key)
        if value is None:
            continue
        if isinstance(paper, bool) or isinstance(value, bool):
            differs = bool(value) != bool(paper)
        else:
            differs = not math.isclose(float(value), float(paper), rel_tol=1e-9)
        if differs:
            out[key] = (value, paper, source)
    threshold = flat.get("clip.threshold")
    if flat.get("clip.mode") == "agc" and threshold is not None and not any(
            math.isclose(float(threshold), t, rel_tol=1e-9) for t in PAPER_AGC_THRESHOLDS):
        out["clip.threshold"] = (threshold, "one of 0.01 … 0.16", AGC_THRESHOLD_SOURCE)
    return out
