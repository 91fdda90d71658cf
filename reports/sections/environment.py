"""Environment: where and with what the runs ran, and whether they share one environment in
what changes a run's numbers."""

from __future__ import annotations

from typing import Any

import pandas as pd

from reports.document import Section, Table

ENVIRONMENT_KEYS = ["python", "torch", "numpy", "pandas", "sigprop", "device", "device_name",
                    "platform", "host", "git_commit"]


# Recorded environment keys that change a run's numbers for the same config (the rest say
# where and with what it ran); the report groups runs by these, whichever of them a run has.
NUMERIC_ENVIRONMENT = ["torch", "device", "device_name", "threads", "interop_threads",
                       "deterministic", "cudnn_deterministic", "cudnn_benchmark",
                       "cublas_workspace_config"]


def env_text(key: str, value: Any) -> str:
    if value is None:
        return "not recorded"
    if key == "device" and isinstance(value, str):
        return value.split(":")[0]  # cuda:0 and cuda:1 are the same kind of device
    return str(value)


def environment_section(statuses: dict[str, dict]) -> Section:
    environments = [s["environment"] for s in statuses.values()
                    if isinstance(s, dict) and isinstance(s.get("environment"), dict)]
    section = Section("Environment")
    if not environments:
        section.parts.append("No run recorded its environment yet (they record it when they "
                             "start).")
        return section
    section.parts.append(f"Recorded by {len(environments)} of {len(statuses)} runs when they "
                         "started.")
    section.parts += numeric_environments(environments)
    keys = ENVIRONMENT_KEYS + sorted({k for e in environments for k in e} - set(ENVIRONMENT_KEYS))
    rows = []
    for key in keys:
        values = pd.Series([str(e.get(key)) for e in environments if e.get(key) is not None])
        if values.empty:
            continue
        counts = values.value_counts()
        text = (counts.index[0] if len(counts) == 1 else
                "; ".join(f"{v} ({n} runs)" for v, n in counts.items()))
        rows.append({"key": key, "value": text})
    section.parts.append(Table(pd.DataFrame(rows)))
    return section


def numeric_environments(environments: list[dict]) -> list:
    """The distinct environments, in the keys that change numbers, with a run count each,
    and whether the runs of this report all share one."""
    keys = [k for k in NUMERIC_ENVIRONMENT if any(e.get(k) is not None for e in environments)]
    if not keys:
        return []
    combos = pd.Series([tuple(env_text(k, e.get(k)) for k in keys) for e in environments])
    counts = combos.value_counts(sort=True)
    table = pd.DataFrame([dict(zip(keys, combo)) | {"runs": n} for combo, n in counts.items()])
    unrecorded = [k for k in keys if any(e.get(k) is None for e in environments)]
    note = (f" Not every run recorded {', '.join(unrecorded)}: a run that did not may have "
            "run under other values." if unrecorded else "")
    if len(counts) == 1:  # the table below gives its values
        return [f"All {len(environments)} runs that recorded an environment ran under one "
                f"environment in what changes a run's numbers ({', '.join(keys)})." + note]
    differ = [k for i, k in enumerate(keys) if len({combo[i] for combo in counts.index}) > 1]
    return [f"The runs of this report were made under {len(counts)} different environments "
            f"({', '.join(differ)} differ): runs of the same config need not give the same numbers "
            "under two of them, so compare settings within one environment." + note,
            Table(table)]
