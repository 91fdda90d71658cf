"""The registry as a table: name, family, parameters, depth pattern, default resolution."""

from __future__ import annotations

import pandas as pd

from sigprop.models.registry import count_parameters, list_models, model_spec, resolve_config


def model_table(family: str | None = None) -> pd.DataFrame:
    rows = []
    for name in list_models(family):
        spec = model_spec(name)
        cfg = resolve_config(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "params_M": round(count_parameters(name) / 1e6, 2),
                "depth": "-".join(str(d) for d in cfg.depths),
                "blocks": sum(cfg.depths),
                "resolution": spec.resolution,
            }
        )
    return pd.DataFrame(rows)
