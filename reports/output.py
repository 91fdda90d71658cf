"""Where a report goes and what it may overwrite: the two pages, the figure folder beside them,
and the manifest that lets a later report delete its own stale figures and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ablations.store import write_bytes
from reports.document import Plot, Section
from reports.render_html import render_html
from reports.render_md import render_markdown
from sigprop.errors import UserError


def output_paths(grid_dir: Path, out: str | Path | None) -> tuple[Path, Path]:
    if out is None:
        return grid_dir / "report.html", grid_dir / "report.md"
    out = Path(out)
    if out.is_dir() or not out.suffix:  # a folder, existing or to be made
        return out / "report.html", out / "report.md"
    if out.suffix == ".md":
        return out.with_suffix(".html"), out
    return out, out.with_suffix(".md")


def write_files(html_path: Path, md_path: Path, files_dir: Path, title: str,
                sections: list[Section], plots: list[Plot], owned: set[str]) -> None:
    """Write the pages and figures; delete only the figures of an earlier report that the
    manifest lists (``owned``) and this one no longer draws."""
    names = {f"{plot.name}.png" for plot in plots}
    pages = [html_path.name, md_path.name]
    # listed before they exist: a report interrupted midway leaves no unlisted file behind
    write_manifest(files_dir, owned | names, pages)
    for plot in plots:
        write_bytes(files_dir / f"{plot.name}.png", plot.png)
    for stale in sorted(owned - names):  # figures of an earlier report that no longer apply
        path = files_dir / stale
        if path.is_file() or path.is_symlink():
            path.unlink()
    write_bytes(html_path, render_html(title, sections, files_dir.name).encode())
    write_bytes(md_path, render_markdown(title, sections, files_dir.name).encode())
    write_manifest(files_dir, names, pages)
    for path in (html_path, md_path, *(files_dir / name for name in names)):
        path.chmod(0o644)  # the atomic writer's temporary files are private; a report is not


# The report's files folder holds this manifest of what the report wrote, so that a later
# report deletes its own stale figures and nothing else: the folder may be one that nbconvert or
# pandoc made for the user's own page of the same name.
MANIFEST = ".sigprop-report.json"
MANIFEST_KIND = "sigprop report files"
FIGURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.png")
PAGE_NAME = re.compile(r"[^/\\\x00]+\.(html|md)")
# figures of reports written before the manifest: adopted only in a grid's own report_files/
LEGACY_FIGURES = frozenset(f"{name}.png" for name in (
    "accuracy-vs-batch", "accuracy-by-setting", "stability-heatmap", "alpha-sweep",
    "training-curves", "gradient-heatmap", "gains", "agc-clip-fraction", "spp", "frontier",
    "frontier-accuracy"))


class ForeignFilesError(UserError):
    """The report would overwrite or share a folder with files it did not write."""


def write_manifest(files_dir: Path, figures: set[str], pages: list[str]) -> None:
    data = {"kind": MANIFEST_KIND, "figures": sorted(figures), "pages": pages}
    write_bytes(files_dir / MANIFEST, (json.dumps(data, indent=1) + "\n").encode())
    (files_dir / MANIFEST).chmod(0o644)


def read_manifest(files_dir: Path) -> tuple[set[str], set[str]] | None:
    """(figures, pages) an earlier report listed in ``files_dir``; None without a manifest.
    Raises :class:`ForeignFilesError` for a manifest that is not ours or not readable: what
    it lists is then no evidence of what we wrote."""
    path = files_dir / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    figures = data.get("figures") if isinstance(data, dict) else None
    pages = data.get("pages") if isinstance(data, dict) else None
    if not (isinstance(data, dict) and data.get("kind") == MANIFEST_KIND
            and isinstance(figures, list) and isinstance(pages, list)
            and all(isinstance(n, str) and FIGURE_NAME.fullmatch(n) for n in figures)
            and all(isinstance(n, str) and PAGE_NAME.fullmatch(n) for n in pages)):
        raise ForeignFilesError(f"{path} is not a manifest this report can read; remove "
                                f"{files_dir} or give --out another place")
    return set(figures), set(pages)


def owned_files(files_dir: Path, unnamed_pages: list[Path], legacy: bool) -> set[str]:
    """The figures in ``files_dir`` an earlier report wrote (the ones it may delete).
    Raises :class:`ForeignFilesError` (one line) when the folder holds anything else, or when
    a page the user did not name (the Markdown twin beside ``--out x.html``) exists and no
    report of ours wrote it."""
    manifest = read_manifest(files_dir)
    try:
        present = {p.name for p in files_dir.iterdir()} - {MANIFEST}
    except OSError as err:  # writable but not listable: what it holds is unknown
        raise ForeignFilesError(f"cannot list {files_dir}: {err.strerror or err}") from None
    if manifest is not None:
        figures, pages = manifest
    elif legacy:
        figures = present & LEGACY_FIGURES
        pages = {"report.html", "report.md"}
    else:
        figures, pages = set(), set()
    # temporary files of an interrupted atomic write of a listed figure, and write probes
    leftovers = {name for name in present if name.startswith(".sigprop-write-test-")
                 or (name.endswith(".tmp")
                     and any(name.startswith(f".{n}.") for n in figures | {MANIFEST}))}
    foreign = sorted(present - figures - leftovers)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise ForeignFilesError(f"{files_dir} holds files this report did not write ({shown}); "
                                "give --out another place or move them")
    for page in unnamed_pages:
        if (page.exists() or page.is_symlink()) and page.name not in pages:
            raise ForeignFilesError(f"{page} exists and this report did not write it; give "
                                    "--out another place or move it")
    return figures
