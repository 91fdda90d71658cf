"""The grids shipped with the package (``ablations/grids/*.toml``) and how a spec argument
names one: a TOML file, or a shipped grid's name. Torch- and pandas-free: the command line
reads it for ``--help``."""

from __future__ import annotations

from pathlib import Path

from sigprop.errors import UserError, did_you_mean

GRIDS_DIR = Path(__file__).resolve().parent / "grids"


def shipped_grids() -> list[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.toml"))


def spec_path(name_or_path: str) -> Path:
    """A spec file, or the name of a shipped grid (``agc_batch``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = GRIDS_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if shipped.is_file():
        return shipped
    grids = shipped_grids()
    hint = did_you_mean(name_or_path.removesuffix(".toml"), grids) if "/" not in name_or_path \
        else ""
    raise UserError(
        f"spec not found: {name_or_path}{hint} (a TOML file, or a shipped grid: "
        f"{', '.join(grids)})"
    )
