"""The report is safe to build from a store someone else wrote, and safe to build anywhere.

Quote, never inject: everything report.md / report.html quote from a spec or a store is
escaped, checked by rendering report.md with a real Markdown renderer (Python-Markdown, with
the fenced-code and table extensions a reader would turn on). Touch only what is yours: the
report's files folder carries a manifest, and nothing outside it is deleted.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from reports.build import MANIFEST, ForeignFilesError, build_report
from run_ablations import main
from tests.report_helpers import PNG_MAGIC, fake_blocks, fake_metrics, write_fake_grid

markdown = pytest.importorskip("markdown")


HOSTILE_SPEC = '''name = "hostile"
description = """A grid <script>alert("description")</script> with
<img src=x onerror=alert("img")> and [a link](javascript:alert("link")) {: onclick="x" }"""
intended_for = "tests\\n# Injected from intended_for\\n<script>alert('intended')</script>"
untested_claims = ["C9: <script>alert('untested')</script>\\n## Injected from untested"]

[[claims]]
id = "C1"
text = "<script>alert('claim')</script> | pipe | and # hash"
source = "<img src=x onerror=alert('source')>"
check = "compare"
a = { batch_size = 64 }
value = 0.5
relation = "exceeds"
'''
TRACEBACK = ("Traceback (most recent call last):\n```\n<script>alert('traceback')</script>\n"
             "````\n# Injected from the traceback\n```\n  File \"x.py\", line 1\n"
             "ValueError: last line of the traceback")
ERROR = "ValueError: <img src=x onerror=alert('error')>\n## Injected from the error | a | b"
WARNING = "gain: <script>alert('warning')</script>\n# Injected from a warning"


def variance_blocks(run_id: str) -> pd.DataFrame:
    blocks = fake_blocks(run_id, ids=False)
    return blocks[blocks["stat"] == "var"]


def hostile_grid(root: Path) -> Path:
    """A small grid whose spec and store hold script tags, event handlers, heading-making
    newlines, pipes and code fences in every text field the report quotes."""
    runs = []
    for batch, state in ((64, "completed"), (256, "completed"), (1024, "failed")):
        run_id = f"b{batch}"
        config = {"model": {"name": "nf_resnet26"}, "batch_size": batch,
                  "clip": {"mode": "agc", "threshold": 0.01}, "seed": 0,
                  "data": "synthetic", "augment": "fl|ip<script>alert('setting')</script>",
                  "base_lr": 0.1, "epochs": 2}
        finished = state == "completed"
        runs.append({
            "run_id": run_id, "state": state, "axes": {"batch_size": batch}, "config": config,
            "error": None if finished else ERROR, "traceback": None if finished else TRACEBACK,
            "summary": {"final_acc": 0.7, "best_acc": 0.7, "max_grad_norm": 2.0,
                        "clip_fraction": 0.2, "steps_done": 40, "duration_s": 3.0}
            if finished else {},
            "metrics": fake_metrics(run_id, ids=False) if finished else None,
            # variances only: no gradient figures to draw, which keeps these tests fast
            "blocks": variance_blocks(run_id) if finished else None,
        })
    grid_dir = write_fake_grid(root, "hostile", runs)
    (grid_dir / "spec.toml").write_text(HOSTILE_SPEC)
    status_path = grid_dir / "runs" / "b64" / "status.json"
    status = json.loads(status_path.read_text())
    status["warnings"] = [WARNING]
    status["environment"] = {**status["environment"],
                             "host": "<script>alert('host')</script>",
                             "platform": "Linux|x\n# Injected from the environment"}
    status_path.write_text(json.dumps(status))
    return grid_dir


class Elements(HTMLParser):
    """Every start tag of a page, with its attributes, and the text inside each element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.open: list[tuple[str, list[str]]] = []
        self.texts: list[tuple[str, str]] = []  # (tag, its whole text) once closed

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "br", "hr", "meta", "input"):
            self.open.append((tag, []))

    def handle_endtag(self, tag):
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i][0] == tag:
                name, parts = self.open.pop(i)
                text = "".join(parts)
                self.texts.append((name, text))
                if self.open:
                    self.open[-1][1].append(text)
                return

    def handle_data(self, data):
        if self.open:
            self.open[-1][1].append(data)

    def named(self, tag: str) -> list[str]:
        return [text for name, text in self.texts if name == tag]


def parse(page: str) -> Elements:
    parser = Elements()
    parser.feed(page)
    parser.close()
    return parser


def assert_nothing_injected(page: Elements, scripts_allowed: int) -> None:
    scripts = [a for tag, a in page.tags if tag == "script"]
    assert len(scripts) == scripts_allowed
    handlers = [(tag, name) for tag, attrs in page.tags for name in attrs
                if name.lower().startswith("on")]
    assert handlers == []
    links = [a.get("href", "") for tag, a in page.tags if tag == "a"]
    # only the report's own contents links, and each figure's link to its own file
    assert all(href.startswith("#") or re.fullmatch(r"report_files/[A-Za-z0-9_-]+\.png", href)
               for href in links), links
    images = [attrs.get("src", "") for tag, attrs in page.tags if tag == "img"]
    assert all(src.startswith(("data:image/png;base64,", "report_files/")) for src in images)
    assert [t for t in page.named("h1")] == ["Ablation report: hostile"]
    assert not [h for tag in ("h2", "h3", "h4", "h5", "h6") for h in page.named(tag)
                if "Injected" in h]


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> dict[str, Path]:
    """The report of :func:`hostile_grid`, built once for the tests that only read it."""
    return build_report(hostile_grid(tmp_path_factory.mktemp("hostile")))


def test_markdown_report_quotes_hostile_text_rendered_by_python_markdown(hostile_report):
    md = hostile_report["md"].read_text()
    page = parse(markdown.markdown(md, extensions=["fenced_code", "tables"]))
    assert_nothing_injected(page, scripts_allowed=0)
    # the hostile text is shown, as text
    text = "".join(t for _, t in page.texts)
    assert "<script>alert(\"description\")</script>" in text
    assert "# Injected from intended_for" in text
    # the traceback is one code block, whole, fences and all
    blocks = [b for b in page.named("pre") if "Traceback" in b]
    assert len(blocks) == 1
    assert blocks[0].rstrip("\n") == TRACEBACK
    assert not [p for p in page.named("p") if "last line of the traceback" in p]
    # a pipe in a value stays in its cell: every row of every table has its header's width
    for table in md.split("\n\n"):
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        if rows:
            assert len({len(split_row(r)) for r in rows}) == 1, table
    assert any("fl|ip<script>" in cell for cell in page.named("td"))


def split_row(line: str) -> list[str]:
    cells, current, escaped = [], "", False
    for char in line.strip().strip("|"):
        if char == "|" and not escaped:
            cells.append(current)
            current = ""
        else:
            current += char
        escaped = char == "\\" and not escaped
    return [*cells, current]


def test_markdown_without_the_fenced_code_extension_still_injects_nothing(hostile_report):
    md = hostile_report["md"].read_text()
    assert_nothing_injected(parse(markdown.markdown(md)), scripts_allowed=0)


def test_html_report_stays_fully_escaped(hostile_report):
    page_text = hostile_report["html"].read_text()
    page = parse(page_text)
    assert_nothing_injected(page, scripts_allowed=1)  # the report's own table script
    assert page_text.count("<script>") == 1
    assert [b for b in page.named("pre") if "Traceback" in b] == [TRACEBACK]


@pytest.mark.slow
def test_report_figure_folder_reads_as_a_link_whatever_its_name(tmp_path):
    grid_dir = hostile_grid(tmp_path)
    out = tmp_path / "my (draft) report.html"
    md = build_report(grid_dir, out)["md"].read_text()
    page = parse(markdown.markdown(md, extensions=["tables"]))
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert images and all(src.startswith("my%20%28draft%29%20report_files/") for src in images)
    for src in images:
        name = src.rsplit("/", 1)[1]
        assert (tmp_path / "my (draft) report_files" / name).read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- own files only


@pytest.mark.slow
def test_report_refuses_a_files_folder_holding_the_users_figures(tmp_path):
    grid_dir = hostile_grid(tmp_path / "results")
    doc = tmp_path / "doc"
    theirs = doc / "analysis_files"  # what nbconvert makes beside doc/analysis.html
    theirs.mkdir(parents=True)
    for i in range(5):
        (theirs / f"output_{i}_0.png").write_bytes(PNG_MAGIC + bytes([i]))
    (doc / "analysis.md").write_text("my notes")
    with pytest.raises(ForeignFilesError, match="did not write") as refused:
        build_report(grid_dir, doc / "analysis.html")
    assert "\n" not in str(refused.value) and "analysis_files" in str(refused.value)
    assert sorted(p.name for p in theirs.iterdir()) == [f"output_{i}_0.png" for i in range(5)]
    assert all((theirs / f"output_{i}_0.png").read_bytes() == PNG_MAGIC + bytes([i])
               for i in range(5))
    assert not (doc / "analysis.html").exists()
    # an empty files folder is fine, but the Markdown page beside --out is theirs
    for png in theirs.iterdir():
        png.unlink()
    with pytest.raises(ForeignFilesError, match="analysis.md exists"):
        build_report(grid_dir, doc / "analysis.html")
    assert (doc / "analysis.md").read_text() == "my notes"
    # naming the page is asking for it to be written
    assert build_report(grid_dir, doc / "analysis.md")["md"].read_text().startswith("# Ablation")


@pytest.mark.slow
def test_a_second_report_removes_only_its_own_stale_figures(tmp_path):
    grid_dir = hostile_grid(tmp_path / "results")
    out = tmp_path / "doc" / "grid.html"
    build_report(grid_dir, out)
    files = out.parent / "grid_files"
    manifest = json.loads((files / MANIFEST).read_text())
    drawn = sorted(p.name for p in files.glob("*.png"))
    assert manifest["figures"] == drawn and "training-curves.png" in drawn
    assert manifest["pages"] == ["grid.html", "grid.md"]
    # the metrics disappear: the next report draws no training curves and drops that figure
    for run in ("b64", "b256"):
        (grid_dir / "runs" / run / "metrics.parquet").unlink()
        (grid_dir / "runs" / run / "status.json").write_text(json.dumps(
            {"state": "queued", "attempts": 0}))
    build_report(grid_dir, out)
    assert not (files / "training-curves.png").exists()
    assert sorted(p.name for p in files.iterdir()) == [MANIFEST]
    assert json.loads((files / MANIFEST).read_text())["figures"] == []
    # a file someone put there since: refused, and kept
    (files / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match=r"notes\.txt"):
        build_report(grid_dir, out)
    assert (files / "notes.txt").read_text() == "mine"


def test_a_forged_manifest_deletes_nothing_outside_the_folder(tmp_path):
    grid_dir = hostile_grid(tmp_path / "results")
    files = tmp_path / "doc" / "grid_files"
    files.mkdir(parents=True)
    precious = tmp_path / "doc" / "precious.png"
    precious.write_bytes(PNG_MAGIC)
    (files / MANIFEST).write_text(json.dumps(
        {"kind": "sigprop report files", "figures": ["../precious.png"], "pages": []}))
    with pytest.raises(ForeignFilesError, match="not a manifest"):
        build_report(grid_dir, tmp_path / "doc" / "grid.html")
    assert precious.read_bytes() == PNG_MAGIC


@pytest.mark.slow
def test_a_grids_own_report_folder_from_before_the_manifest_is_adopted(tmp_path):
    grid_dir = hostile_grid(tmp_path)
    build_report(grid_dir)
    files = grid_dir / "report_files"
    (files / MANIFEST).unlink()  # as a report written before manifests left it
    (files / "stability-heatmap.png").write_bytes(PNG_MAGIC)  # a figure it drew then, not now
    build_report(grid_dir)
    assert not (files / "stability-heatmap.png").exists()
    assert (files / "training-curves.png").is_file() and (files / MANIFEST).is_file()


def test_foreign_files_are_a_one_line_cli_error(tmp_path, capsys):
    grid_dir = hostile_grid(tmp_path / "results")
    theirs = tmp_path / "doc" / "analysis_files"
    theirs.mkdir(parents=True)
    (theirs / "figure.png").write_bytes(PNG_MAGIC)
    code = main(["report", str(grid_dir), "--out", str(tmp_path / "doc" / "analysis.html")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sigprop: error: ") and err.count("\n") == 1
    assert "figure.png" in err and (theirs / "figure.png").is_file()


# ----------------------------------------------------------------------------- reproducibility


def seeded_grid(root: Path, outcomes: dict[int, list], test_size: int | None = None,
                environments: list[dict] | None = None) -> Path:
    """batch size x seed; ``outcomes[batch]``: per seed a final accuracy, or "diverged".
    ``environments``: per run (in order) keys to set in its recorded environment."""
    runs = []
    for batch, seeds in outcomes.items():
        for seed, outcome in enumerate(seeds):
            run_id = f"b{batch}-s{seed}"
            diverged = outcome == "diverged"
            acc = None if diverged else outcome
            config = {"model": {"name": "nf_resnet26"}, "batch_size": batch, "seed": seed,
                      "clip": {"mode": "none"}, "data": "synthetic", "base_lr": 0.1,
                      "epochs": 2, "test_size": test_size}
            runs.append({
                "run_id": run_id, "state": "diverged" if diverged else "completed",
                "axes": {"batch_size": batch, "seed": seed}, "config": config,
                "summary": {"final_acc": acc, "best_acc": acc,
                            "diverged_step": 5 if diverged else None, "steps_done": 40},
                "metrics": fake_metrics(run_id, diverged_step=5 if diverged else None,
                                        ids=False),
                "blocks": variance_blocks(run_id)})
    grid_dir = write_fake_grid(root, "seeded", runs)
    for run, changes in zip(runs, environments or []):
        path = grid_dir / "runs" / run["run_id"] / "status.json"
        status = json.loads(path.read_text())
        status["environment"] = {**status["environment"], **changes}
        path.write_text(json.dumps(status))
    return grid_dir


def section(md: str, title: str) -> str:
    return md.split(f"## {title}\n")[1].split("\n## ")[0]


@pytest.mark.slow
def test_settings_whose_seeds_disagree_beyond_the_test_set_are_flagged(tmp_path):
    # batch 64: seeds split; 256: 10%-80% on 1000 test examples (width 6.2%); 1024: 80.0% and
    # 80.5%, within the 5.0% a test set of 1000 resolves at 80%
    grid_dir = seeded_grid(tmp_path, {64: [0.8, "diverged"], 256: [0.1, 0.8],
                                      1024: [0.8, 0.805]}, test_size=1000)
    md = build_report(grid_dir)["md"].read_text()
    key = section(md, "Key results")
    row = next(line for line in key.splitlines() if line.startswith("| all runs |"))
    cells = split_row(row)[1:]
    assert ["†" in c for c in cells] == [True, True, False], row
    assert "2 × 1.96·√(p(1−p)/n)" in key and "sensitive to float rounding" in key
    summary = section(md, "Summary")
    items = [line for line in summary.splitlines() if line.startswith("- batch")]
    assert len(items) == 2
    assert items[0] == "- batch 64: seeds split: 1 of 2 diverged"
    assert items[1] == ("- batch 256: seed range 10.0%–80.0% is wider than 6.2% (95% interval "
                        "at 45% on 1000 test examples)")


@pytest.mark.slow
def test_a_full_test_set_narrows_the_width_and_one_seed_is_never_flagged(tmp_path):
    # 80.0% vs 80.5% is within the 3.5% of synthetic's 2000 test examples at 80%, and 74% vs
    # 80.5% is not (3.7% at 77%); a single seed cannot disagree with itself
    grid_dir = seeded_grid(tmp_path, {64: [0.8, 0.805], 256: [0.74, 0.805], 1024: [0.3]})
    md = build_report(grid_dir)["md"].read_text()
    row = next(line for line in section(md, "Key results").splitlines()
               if line.startswith("| all runs |"))
    assert ["†" in c for c in split_row(row)[1:]] == [False, True, False], row
    assert ("batch 256: seed range 74.0%–80.5% is wider than 3.7% (95% interval at 77% on 2000 "
            "test examples)") in section(md, "Summary")


@pytest.mark.slow
def test_environment_lists_each_distinct_environment_and_says_when_they_differ(tmp_path):
    envs = [{"threads": 1, "deterministic": False, "device": "cpu"},
            {"threads": 1, "deterministic": False, "device": "cpu"},
            {"threads": 2, "deterministic": False, "device": "cpu"},
            {"device": "cpu"}]  # a run stored before threads were recorded
    grid_dir = seeded_grid(tmp_path, {64: [0.8, 0.81], 256: [0.7, 0.71]}, environments=envs)
    env = section(build_report(grid_dir)["md"].read_text(), "Environment")
    assert "made under 3 different environments (threads, deterministic differ)" in env
    assert "Not every run recorded threads, deterministic" in env
    first = next(block for block in env.split("\n\n") if block.startswith("| "))
    table = [split_row(line) for line in first.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0]]
    assert header == ["torch", "device", "threads", "deterministic", "runs"]
    rows = sorted(tuple(c.strip() for c in r) for r in table[1:])
    assert rows == [("2.13.0+cpu", "cpu", "1", "False", "2"),
                    ("2.13.0+cpu", "cpu", "2", "False", "1"),
                    ("2.13.0+cpu", "cpu", "not recorded", "not recorded", "1")]


@pytest.mark.slow
def test_one_environment_is_said_to_be_one(tmp_path):
    envs = [{"threads": 1, "device": "cuda:0"}, {"threads": 1, "device": "cuda:1"}]
    grid_dir = seeded_grid(tmp_path, {64: [0.8, 0.81]}, environments=envs)
    env = section(build_report(grid_dir)["md"].read_text(), "Environment")
    assert "All 2 runs that recorded an environment ran under one environment" in env
    assert "different environments" not in env


# ----------------------------------------------------------------------------- wrong types

# valid JSON, wrong types: what a hand-edited or foreign status.json can hold
WRONG_STATUS = {
    "state is an array": {"state": ["completed"]},
    "state is a number": {"state": 5},
    "accuracy is text": {"summary": {"final_acc": "high", "steps_done": 40}},
    "steps are an array": {"summary": {"final_acc": 0.8, "steps_done": [40]}},
    "accuracy is a boolean": {"summary": {"final_acc": True}},
    "error is an object": {"state": "diverged", "error": {"why": "nan"}},
    "warnings are numbers": {"warnings": [1, 2]},
}


@pytest.mark.parametrize("case", sorted(WRONG_STATUS))
@pytest.mark.slow
def test_a_wrong_typed_status_is_a_damaged_run_not_a_traceback(tmp_path, case):
    grid_dir = seeded_grid(tmp_path, {64: [0.8, 0.81], 256: [0.7, 0.71]})
    path = grid_dir / "runs" / "b64-s0" / "status.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **WRONG_STATUS[case]}))
    md = build_report(grid_dir)["md"].read_text()
    damaged = section(md, "Damaged runs")
    assert "`b64-s0`: status.json: " in damaged
    assert "Runs: 4 (3 completed, 1 damaged)." in section(md, "Summary")
    runs = section(md, "Runs")
    assert not [line for line in runs.splitlines() if line.startswith("| b64-s0 | completed")]


@pytest.mark.parametrize("file, change", [
    ("status.json", {"summary": ["final_acc", 0.8]}),
    ("status.json", {"environment": "cpu"}),
    ("config.json", {"effective": [1]}),
    ("config.json", {"axes": "batch_size"}),
])
@pytest.mark.slow
def test_wrong_types_the_store_catches_reach_the_report_as_damaged(tmp_path, file, change):
    grid_dir = seeded_grid(tmp_path, {64: [0.8, 0.81], 256: [0.7, 0.71]})
    path = grid_dir / "runs" / "b64-s0" / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    md = build_report(grid_dir)["md"].read_text()
    assert f"`b64-s0`: {file}: " in section(md, "Damaged runs")
