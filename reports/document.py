"""The report as a document: sections of parts, which ``render_html`` and ``render_md`` turn
into a page each. The content modules (``reports.sections``) build these parts and say nothing
about markup; the renderers know nothing about grids.

A part is one of:

    str        a paragraph (inline `code` is its only markup)
    Bullets    a list of such lines
    Table      a frame whose cells are text, or a :class:`Cell` for a bold one
    Plot       a figure: its file stem, caption and PNG bytes
    Details    a folded block of preformatted text (a traceback)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

# Inline `code` in paragraphs, bullets and captions is the only markup; everything else is
# escaped by both renderers.
CODE = re.compile(r"`([^`]+)`")

# The header the runs table gives each summary metric, and from it the key under which the
# runner names the column: a filter term may use either (final_acc>0.9, "final acc" being the
# header), so the HTML renderer marks a column with such a header with its key.
RUN_HEADERS = {"final_acc": "final acc", "best_acc": "best acc", "diverged_step": "diverged at",
               "max_grad_norm": "max grad norm", "clip_fraction": "clipped",
               "steps_done": "steps done",
               "duration_s": "time (s)"}
COLUMN_KEYS = {header: key for key, header in RUN_HEADERS.items()}


@dataclass(frozen=True)
class Cell:
    """A table cell with emphasis: the text is always quoted as text, so a value from a store
    that happens to look like markup (``**x**``) never turns bold."""

    text: str
    bold: bool = False

    def __str__(self) -> str:
        return self.text


@dataclass
class Table:
    frame: pd.DataFrame
    wrap: bool = False  # long prose cells wrap instead of scrolling


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Plot:
    name: str  # file stem, e.g. "stability-heatmap"
    caption: str
    png: bytes


@dataclass
class Details:
    summary: str
    text: str


Part = str | Bullets | Table | Plot | Details


@dataclass
class Section:
    title: str
    parts: list[Part] = field(default_factory=list)


def cell_text(value: object) -> tuple[str, bool]:
    """A table value as (text, bold)."""
    if isinstance(value, Cell):
        return value.text, value.bold
    return ("" if value is None else str(value)), False


def anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def plots(sections: list[Section]) -> list[Plot]:
    """Every figure of the document, in page order."""
    return [part for section in sections for part in section.parts if isinstance(part, Plot)]
