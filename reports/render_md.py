"""The Markdown twin of a report document: the same content, figures as files beside it.

Markdown quoting. report.md quotes text from specs and stores (descriptions, claims, errors,
tracebacks, config and environment values): it must read as that text in any Markdown
renderer, never as markup. So HTML's specials become entities, the punctuation that opens
Markdown structure gets a backslash (both CommonMark and Python-Markdown honour these
escapes), and line breaks, which would start headings or list items, fold into spaces. As in
the HTML page, `code` spans are the only markup that passes through.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import pandas as pd

from reports.document import CODE, Bullets, Details, Plot, Section, Table, cell_text

MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
MD_ESCAPED = frozenset("\\`*{}[]")  # {} too: attr_list turns "{: onclick=...}" into attributes
LINE_BREAKS = re.compile(r"\s*[\r\n\v\f\u2028\u2029\x85]\s*")
# what opens a block at the start of a line: a heading, a list item or rule, an ordered item
BLOCK_START = re.compile(r"^(#|[-+](?=[\s+-]|$)|\d+[.)](?=\s|$))")


def block_safe(line: str) -> str:
    return BLOCK_START.sub(lambda m: f"{m.group(1)[:-1]}\\{m.group(1)[-1]}", line)


def one_line(text: Any) -> str:
    return LINE_BREAKS.sub(" ", str(text)).strip()


def md_escape(text: str, cell: bool = False) -> str:
    """``text`` (one line) escaped to render as itself; ``cell``: inside a table row."""
    out = []
    for i, char in enumerate(text):
        if char in MD_ENTITIES:
            out.append(MD_ENTITIES[char])
        elif char in MD_ESCAPED or (cell and char == "|"):  # "\|" is literal outside tables
            out.append("\\" + char)
        elif char == "_" and not (0 < i < len(text) - 1 and text[i - 1].isalnum()
                                  and text[i + 1].isalnum()):
            out.append("\\_")  # an underscore inside a word (run_id) never emphasises
        else:
            out.append(char)
    return "".join(out)


def md_inline(text: Any) -> str:
    """A paragraph, list item or caption: escaped prose with its `code` spans kept."""
    text = one_line(text)
    out, at = [], 0
    for match in CODE.finditer(text):
        out += [md_escape(text[at:match.start()]), f"`{match.group(1)}`"]
        at = match.end()
    out.append(md_escape(text[at:]))
    line = "".join(out)
    return block_safe(line)


def md_cell(value: Any) -> str:
    text, bold = cell_text(value)
    # a cell holds inline text only: no heading or list can start in it
    shown = md_escape(one_line(text), cell=True)
    return f"**{shown}**" if bold else shown


def md_code_block(text: str) -> list[str]:
    """Indented, not fenced: an indented block is core Markdown in every renderer (a fence
    needs an extension in Python-Markdown, without which its content is parsed as Markdown),
    and no line of the quoted text can end it."""
    return ["    " + line if line.strip() else "" for line in text.strip("\n").splitlines()]


def table_markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(md_cell(c) for c in frame.columns) + " |",
             "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def part_markdown(part: object, files_dir: str) -> list[str]:
    if isinstance(part, str):
        return [md_inline(part), ""]
    if isinstance(part, Bullets):
        return [f"- {md_inline(item)}" for item in part.items] + [""]
    if isinstance(part, Table):
        return [table_markdown(part.frame), ""]
    if isinstance(part, Plot):
        return [f"![{md_escape(part.name)}]({quote(files_dir)}/{quote(part.name)}.png)",
                "", f"*{md_inline(part.caption)}*", ""]
    if isinstance(part, Details):
        return [f"{md_inline(part.summary)}:", "", *md_code_block(part.text), ""]
    return []


def render_markdown(title: str, sections: list[Section], files_dir: str) -> str:
    out = [f"# {md_inline(title)}", ""]
    for section in sections:
        out += [f"## {md_inline(section.title)}", ""]
        for part in section.parts:
            out += part_markdown(part, files_dir)
    return "\n".join(out)
