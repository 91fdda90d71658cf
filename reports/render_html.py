"""The HTML page of a report document: one self-contained file, figures embedded as base64
PNG, the style sheet and the table script (``reports/assets``) inlined, so it opens offline."""

from __future__ import annotations

import base64
import html
from importlib import resources
from urllib.parse import quote

import pandas as pd

from reports.document import (
    CODE,
    COLUMN_KEYS,
    Bullets,
    Details,
    Plot,
    Section,
    Table,
    anchor,
    cell_text,
)


def asset(name: str) -> str:
    """A file of ``reports/assets`` (package data: present in an installed wheel too)."""
    return resources.files("reports").joinpath("assets", name).read_text(encoding="utf-8")


# Read once at import: a reader that drops its privileges after importing (a report written
# as another user) needs no further file access to the package.
CSS = asset("report.css")
# Sorting (click a header; numbers by value, blanks last) and filtering of every table with a
# header, in plain DOM code: the report needs no network. A filter term is a word that some
# cell of the row contains, or column=value in the runner's own syntax (clip.mode=agc; also
# !=, <, <=, >, >=): the column by its header or key, numbers compared as numbers (97.6% is
# 0.976), text equal ignoring case, an empty value meaning a blank cell. Terms are ANDed.
SCRIPT = asset("report.js")
FILTER_ROWS = 6  # tables with more rows than this get a filter box

VERDICT_CLASSES = {"holds": "holds", "does not hold": "does-not-hold",
                   "inconclusive": "inconclusive"}


def inline_html(text: str) -> str:
    return CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text))


def png_width(png: bytes) -> int:
    """Pixel width from the PNG header (IHDR comes first; width at bytes 16-19)."""
    return int.from_bytes(png[16:20], "big") if png[12:16] == b"IHDR" else 0


def table_html(frame: pd.DataFrame, wrap: bool = False) -> str:
    names = [str(c) for c in frame.columns]
    head = "".join(f'<th data-key="{html.escape(COLUMN_KEYS[n])}">{html.escape(n)}</th>'
                   if n in COLUMN_KEYS else f"<th>{html.escape(n)}</th>" for n in names)
    # each cell names its column: a narrow page shows a table of prose as cards
    labels = [f' data-label="{html.escape(n)}"' if wrap else "" for n in names]
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for column, attr, value in zip(frame.columns, labels, row):
            text, bold = cell_text(value)
            css = f' class="{text}"' if column == "status" and text in ("diverged", "failed") \
                else ""
            if column == "verdict" and text in VERDICT_CLASSES:
                css = f' class="{VERDICT_CLASSES[text]}"'
            shown = html.escape(text)
            cells.append(f"<td{css}{attr}>{f'<b>{shown}</b>' if bold else shown}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    css = ' class="sortable wrap"' if wrap else ' class="sortable"'
    tools = ""
    if len(frame) > FILTER_ROWS:
        example = next((f"{n}={v}" for n in ("clip.mode", "status") if n in frame
                        for v in frame[n].astype(str) if v and " " not in v), "diverged 512")
        tools = ('<div class="table-tools"><label>Filter rows: <input type="search" '
                 f'placeholder="e.g. {html.escape(example)}" aria-label="filter rows"></label> '
                 '<span aria-live="polite"></span>'
                 f'<span class="hint"> · scroll the table sideways for all {len(names)} '
                 "columns</span></div>")
    return (f'{tools}<div class="scroll"><table{css}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def plot_html(plot: Plot, files_dir: str | None) -> str:
    data = base64.b64encode(plot.png).decode()
    width = png_width(plot.png)  # reserves the figure's room before it decodes
    image = (f'<img alt="{html.escape(plot.name)}"'
             + (f' width="{width}"' if width else "")
             + f' src="data:image/png;base64,{data}">')
    if files_dir:
        link = html.escape(f"{quote(files_dir)}/{quote(plot.name)}.png")
        image = f'<a href="{link}" title="the figure at full size">{image}</a>'
    return f"<figure>{image}<figcaption>{inline_html(plot.caption)}</figcaption></figure>"


def part_html(part: object, files_dir: str | None) -> str | None:
    if isinstance(part, str):
        return f"<p>{inline_html(part)}</p>"
    if isinstance(part, Bullets):
        return "<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in part.items) + "</ul>"
    if isinstance(part, Table):
        return table_html(part.frame, part.wrap)
    if isinstance(part, Plot):
        return plot_html(part, files_dir)
    if isinstance(part, Details):
        return (f"<details><summary>{html.escape(part.summary)}</summary>"
                f"<pre>{html.escape(part.text)}</pre></details>")
    return None


def render_html(title: str, sections: list[Section], files_dir: str | None = None) -> str:
    """The HTML page; ``files_dir``: the folder (beside the page) holding each figure's PNG,
    which a figure then links to at its full size."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title>", f"<style>\n{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           "<nav>" + "".join(f'<a href="#{anchor(s.title)}">{html.escape(s.title)}</a>'
                             for s in sections) + "</nav>"]
    for section in sections:
        out.append(f'<h2 id="{anchor(section.title)}">{html.escape(section.title)}</h2>')
        out += [shown for part in section.parts
                if (shown := part_html(part, files_dir)) is not None]
    out.append(f"<script>\n{SCRIPT}</script>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
