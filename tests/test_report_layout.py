"""The report's layout at 1400, 800 and 400 px, checked in headless Chromium, its key=value
table filter, and the accuracy figure's margins.

The browser checks load the page into an iframe of exactly the width under test (a headless
window is at least 500 px wide) and read back, as JSON, what a probe script measured there.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reports.build import RUN_HEADERS, Plot, Section, Table, render_html
from reports.figures.accuracy import plot_accuracy_vs_batch
from reports.figures.style import figure_png, panel_width
from tests.report_helpers import agc_batch_runs

CHROMIUM = Path("/usr/bin/chromium")
WIDTHS = (1400, 800, 400)
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install "
    "chromium) so the report's layout cannot be checked in a browser")


def runs_frame() -> pd.DataFrame:
    """36 runs with the demo's 15 columns and its widest values: the table that overflowed."""
    rows = []
    for i in range(36):
        model = "BN-ResNet [1,1,1,1] x0.125 v2" if i % 4 == 0 else "NF-ResNet [1,1,1,1] x0.125"
        mode = "" if i % 4 == 0 else ("none", "norm", "agc")[i % 3]
        diverged = mode == "none" and i % 2 == 1
        rows.append({
            "run_id": f"{i:02d}a878a7236a", "status": "diverged" if diverged else "completed",
            "batch_size": (32, 1024)[i % 2], "clip.mode": mode,
            "clip.threshold": {"norm": "0.5", "agc": "0.01"}.get(mode, ""), "model": model,
            "seed": i % 3, "steps": 300, "final_acc":
            "10.0% ✗ diverged at step 12 (at chance)" if diverged else f"{60 + i:.1f}%",
            "best_acc": "" if diverged else f"{61 + i:.1f}%",
            "diverged_step": "12" if diverged else "", "max_grad_norm": f"{1.5 + i:.3g}",
            "clip_fraction": f"{i / 40:.1%}", "steps_done": "300", "duration_s": f"{40 + i}"})
    return pd.DataFrame(rows).rename(columns=RUN_HEADERS)


def claims_frame() -> pd.DataFrame:
    prose = ("a (model.name=bn_resnet26_v2, batch_size=1024): 97.9% (97.6%-98.3%); 3 runs; b "
             "(model.name=nf_resnet26, clip.mode=none, batch_size=1024): 9.1% (7.4%-10.0%); "
             "difference of means +88.7 points, 95% t interval [+85.3 points, +92.2 points]")
    return pd.DataFrame([{
        "id": f"C{i}", "claim": "At the large batch, the unclipped NF-ResNet falls behind the "
        "unclipped BN-ResNet.", "verdict": "holds", "evidence": prose,
        "why": "the whole interval lies above the margin",
        "source": "“They also significantly outperform their batch normalized counterparts "
        "when the batch size is very small” (paper B (arXiv 2102.06171), section 3)"}
        for i in range(1, 7)])


def wide_png() -> bytes:
    """A 1430 px wide figure with its legend at the right edge, where a cut shows first."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot([1, 2, 3], [3, 1, 2], label="a long legend entry at the right edge")
    fig.legend(loc="outside right upper")
    return figure_png(fig)


def layout_page() -> str:
    return render_html("Ablation report: layout", [
        Section("Claims", [Table(claims_frame(), wrap=True)]),
        Section("Accuracy vs batch size", [Plot("accuracy-vs-batch", "a caption", wide_png())]),
        Section("Runs", [Table(runs_frame())]),
    ])


# Measures, at the frame's width: for every table column, whether scrolling its own frame
# brings the header (or, in a card, the first row's cell) fully into the window with nothing
# on top of it; whether the page itself overflows sideways; each figure's size; then what each
# filter query keeps. Posts it all to the host page as JSON.
PROBE = r"""<script>
addEventListener("load", () => {
  const view = document.documentElement.clientWidth;
  const visible = (el) => {
    el.scrollIntoView({block: "center", inline: "nearest"});
    const frame = el.closest(".scroll");
    const box = frame.getBoundingClientRect();
    if (box.width > el.getBoundingClientRect().width) {  // may need a scroll of its own
      frame.scrollLeft += el.getBoundingClientRect().right - box.right + 2;
      frame.scrollLeft += Math.min(0, el.getBoundingClientRect().left - box.left - 2);
    }
    const r = el.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + Math.min(r.width / 2, 20), r.top + r.height / 2);
    return {left: r.left, right: r.right, width: r.width, on_top: el.contains(hit)};
  };
  const out = {view, page: document.documentElement.scrollWidth, tables: [], images: []};
  document.querySelectorAll("table").forEach((table) => {
    const heads = [...table.tHead.rows[0].cells];
    const first = table.tBodies[0].rows[0];
    const cards = getComputedStyle(first.cells[0]).display === "block";
    const cells = heads.map((th, i) => {
      const cell = cards ? first.cells[i] : th;
      return Object.assign(visible(cell), {name: th.textContent.replace(/\W+$/, ""),
        label: getComputedStyle(first.cells[i], "::before").content});
    });
    const frame = table.closest(".scroll");
    out.tables.push({cards, cells, row_height: first.getBoundingClientRect().height,
      frame_right: frame.getBoundingClientRect().right,
      overflows: frame.classList.contains("overflows"),
      hint: frame.previousElementSibling && frame.previousElementSibling.querySelector(".hint")
        ? getComputedStyle(frame.previousElementSibling.querySelector(".hint")).display : null});
  });
  document.querySelectorAll("figure img").forEach((img) => {
    const r = img.getBoundingClientRect();
    out.images.push({left: r.left, right: r.right, width: r.width, natural: img.naturalWidth});
  });
  const box = document.querySelectorAll(".table-tools input");
  const runs = box[box.length - 1];
  const table = runs.closest(".table-tools").nextElementSibling.querySelector("table");
  out.filters = {};
  for (const query of QUERIES) {
    runs.value = query;
    runs.dispatchEvent(new Event("input"));
    out.filters[query] = {
      shown: [...table.tBodies[0].rows].filter((r) => !r.hidden).map((r) => r.cells[0].textContent),
      count: runs.closest(".table-tools").querySelector("span").textContent};
  }
  parent.postMessage(JSON.stringify(out), "*");
});
</script></body>"""
HOST = """<!DOCTYPE html><html><body style="margin:0">
<iframe src="{page}" style="border:0; width:{width}px; height:900px"></iframe><pre id="out"></pre>
<script>addEventListener("message", (e) => {{
  document.getElementById("out").textContent = e.data; }});</script></body></html>"""


def measure(tmp_path: Path, page: str, width: int, queries: list[str]) -> dict:
    probe = PROBE.replace("QUERIES", json.dumps(queries))
    (tmp_path / "page.html").write_text(page.replace("</body>", probe))
    host = tmp_path / f"host-{width}.html"
    host.write_text(HOST.format(page="page.html", width=width))
    profile = tmp_path / f"profile-{width}"
    profile.mkdir()
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               "--hide-scrollbars", "--window-size=1500,1000", "--virtual-time-budget=5000",
               "--dump-dom", host.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), dom[-500:]
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
    return json.loads(text.replace("&amp;", "&"))


@needs_chromium
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.slow
def test_every_column_and_figure_is_reachable_at_each_width(tmp_path, width):
    found = measure(tmp_path, layout_page(), width, [])
    assert found["view"] == width
    assert found["page"] <= width  # the page never scrolls sideways: only a table's frame does
    claims, runs = found["tables"]
    for table in (claims, runs):
        assert table["frame_right"] <= width + 1
        for cell in table["cells"]:  # scrolled into its frame, each column shows, uncovered
            assert cell["left"] >= -1 and cell["right"] <= width + 1, cell
            assert cell["on_top"], cell
    assert len(runs["cells"]) == 15 and not runs["cards"]
    # the runs table is wider than any of these windows: its frame says it scrolls
    assert runs["overflows"] and runs["hint"] == "inline"
    # on a phone the claims become cards, each cell labelled with its column and as wide as
    # the card, so a claim reads in a few lines; wider windows keep the table
    assert claims["cards"] == (width < 640)
    if claims["cards"]:
        names = [c["name"] for c in claims["cells"]]
        assert [c["label"] for c in claims["cells"]] == [f'"{n}: "' for n in names]
        claim = claims["cells"][names.index("claim")]
        assert claim["width"] >= 0.85 * width
    # a figure fits the page, never grows past its pixel size, and shrinks no more than that
    (image,) = found["images"]
    assert image["natural"] > 1400
    assert image["left"] >= 0 and image["right"] <= width
    assert image["width"] >= 0.9 * min(width, 1240) - 40


def expected(frame: pd.DataFrame, keep) -> list[str]:
    return [r["run_id"] for _, r in frame.iterrows() if keep(r)]


def percent(text: str) -> float:
    return float(text.split("%")[0]) / 100 if text else np.nan


@needs_chromium
@pytest.mark.slow
def test_filter_understands_key_value_terms(tmp_path):
    frame = runs_frame()
    acc = frame["final acc"].map(percent)
    queries = {
        "clip.mode=agc": lambda r: r["clip.mode"] == "agc",
        "clip.mode=AGC batch_size=1024": lambda r: r["clip.mode"] == "agc"
        and r["batch_size"] == 1024,
        "batch_size>=1e3": lambda r: r["batch_size"] >= 1000,
        "clip.threshold=0.010": lambda r: r["clip.threshold"] == "0.01",
        "clip.mode=": lambda r: r["clip.mode"] == "",
        "clip.mode!=none seed=2": lambda r: r["clip.mode"] != "none" and r["seed"] == 2,
        # a renamed column by its key or header; percentages as fractions or percent
        "final_acc>0.9": lambda r: acc[r.name] > 0.9,
        "final_acc<=12%": lambda r: acc[r.name] <= 0.12,
        "diverged_step=12": lambda r: r["diverged at"] == "12",
        "status=diverged": lambda r: r["status"] == "diverged",
        "status=diverge": lambda r: False,  # a value is the whole cell
        # terms split at spaces: "max" is a word no cell holds (and there is no column "norm")
        "max grad norm>10": lambda r: False,
        "bn-resnet": lambda r: r["model"].startswith("BN"),
        "nf-resnet 1024 agc": lambda r: r["model"].startswith("NF") and r["batch_size"] == 1024
        and r["clip.mode"] == "agc",
        "run_id=00a878a7236a": lambda r: r["run_id"] == "00a878a7236a",
        "lr=0.1": lambda r: False,
    }
    found = measure(tmp_path, layout_page(), 1400, list(queries))["filters"]
    for query, keep in queries.items():
        want = expected(frame, keep)
        assert found[query]["shown"] == want, query
        assert found[query]["count"].startswith(f"{len(want)} of 36 rows"), query
    assert len(found["clip.mode=agc"]["shown"]) == 9
    assert found["lr=0.1"]["count"] == "0 of 36 rows (no column lr)"


@pytest.mark.slow
def test_accuracy_strip_names_leave_no_left_margin():
    fig = plot_accuracy_vs_batch(agc_batch_runs())
    FigureCanvasAgg(fig).draw()  # runs the constrained layout
    ax, strip = [a for a in fig.axes if a.get_label() != "<colorbar>"][:2]
    width = fig.get_figwidth()
    # the figure is no wider for its strip's names, and the panels start right of the y label
    assert width == panel_width(1, 5.2, 3.0)
    assert ax.get_position().x0 * width < 1.0
    assert strip.get_position().x0 == pytest.approx(ax.get_position().x0, abs=0.02)
    names = [t for t in strip.texts if t.get_gid() == "diverged-row-name"]
    assert [t.get_text() for t in names] == ["no clipping, NF-ResNet-26",
                                             "global norm λ=1, NF-ResNet-26"]
    renderer = fig.canvas.get_renderer()
    inside = strip.get_window_extent(renderer)
    marks = [m.get_window_extent(renderer) for m in strip.get_lines()
             if m.get_gid() == "diverged"]
    for name in names:  # inside the strip, clear of every cross
        box = name.get_window_extent(renderer)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1
        assert inside.y0 <= box.y0 and box.y1 <= inside.y1
        assert not any(box.overlaps(m) for m in marks)
