"""The grid report (reports.build), built from a tiny grid written on disk in the exact store
layout (tests/report_helpers.py), so nothing here depends on the trainer; the figures it holds
are tested in test_report_figures.py.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from ablations.store import load_results
from reports.build import FILTER_ROWS, build_report
from sigprop.errors import UserError
from tests.report_helpers import PNG_MAGIC, small_disk_grid, write_fake_grid

CHROMIUM = Path("/usr/bin/chromium")


# ----------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def built_report(tmp_path_factory) -> tuple[Path, dict]:
    """``small_disk_grid`` and what ``build_report`` returned for it, built once for the tests
    that only read the report."""
    grid_dir = small_disk_grid(tmp_path_factory.mktemp("report"))
    return grid_dir, build_report(grid_dir)


@pytest.mark.slow
def test_report_of_a_partial_grid(built_report):
    grid_dir, paths = built_report
    results = load_results(grid_dir)
    assert sorted(results.runs["status"]) == ["completed", "completed", "diverged", "failed",
                                              "queued"]
    assert paths == {"html": grid_dir / "report.html", "md": grid_dir / "report.md"}
    page = paths["html"].read_text()
    text = re.sub(r"<[^>]+>", "", page)
    assert "Runs: 5 (2 completed, 1 diverged, 1 failed, 1 queued)." in text
    assert "1 run(s) not finished yet" in text and "the 3 finished runs of 5" in text
    assert "RuntimeError: CUDA out of memory while probing" in text
    assert "diverged at step 12" in text
    assert 'alt="stability-heatmap"' in page and 'alt="accuracy-vs-batch"' in page
    assert 'alt="training-curves"' in page and 'alt="gradient-heatmap"' in page
    assert 'alt="agc-clip-fraction"' in page
    assert "drawing failed" not in text
    assert "alpha sweep: model.alpha was not varied" in text
    assert "0123456789abcdef0123456789abcdef01234567" in text and "2.13.0+cpu" in text
    assert "A fake grid for the report tests." in text
    # every image is embedded, none is fetched
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r'(src|href)="(https?:)?//', page)

    md = paths["md"].read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 5
    for image in images:
        assert (grid_dir / image).is_file() and (grid_dir / image).read_bytes()[:8] == PNG_MAGIC
    assert "| run_id | status |" in md and "RuntimeError: CUDA out of memory" in md
    key = md.split("## Key results")[1].split("##")[0]
    assert "| clipping | batch 64 | batch 256 |" in key
    assert "10.0%, ✗ 1 of 1 diverged (at chance)" in key and "**" in key


def test_report_of_a_grid_with_nothing_finished(tmp_path):
    grid_dir = write_fake_grid(tmp_path, "waiting", [
        {"run_id": f"q{b}", "state": "queued", "axes": {"batch_size": b},
         "config": {"batch_size": b, "seed": 0}} for b in (64, 256)])
    paths = build_report(grid_dir)
    text = re.sub(r"<[^>]+>", "", paths["html"].read_text())
    assert "Runs: 2 (2 queued)." in text and "2 run(s) not finished yet" in text
    assert "every figure: no run has finished yet" in text
    assert "No run recorded its environment yet" in text
    assert "<img" not in paths["html"].read_text()
    assert "| batch 64 | batch 256 |" in paths["md"].read_text()


@pytest.mark.slow
def test_report_out_location_and_stale_figures(tmp_path):
    grid_dir = small_disk_grid(tmp_path)
    out = tmp_path / "elsewhere" / "grid.html"
    out.parent.mkdir()
    paths = build_report(grid_dir, out)
    assert paths == {"html": out, "md": out.with_suffix(".md")}
    assert "](grid_files/stability-heatmap.png)" in paths["md"].read_text()
    assert not (grid_dir / "report.html").exists()
    # a results root holding just this grid is accepted too
    assert build_report(tmp_path)["html"] == grid_dir / "report.html"
    folder = build_report(grid_dir, tmp_path / "new-folder")
    assert folder["md"] == tmp_path / "new-folder" / "report.md" and folder["md"].is_file()


def test_report_bad_input_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="no such grid folder") as missing:
        build_report(tmp_path / "nope")
    assert "\n" not in str(missing.value)
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(UserError, match="no runs in"):
        build_report(tmp_path / "empty")
    grid_dir = small_disk_grid(tmp_path / "root")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the report") as unwritable:
        build_report(grid_dir, blocker / "report.html")
    assert "\n" not in str(unwritable.value)
    write_fake_grid(tmp_path / "root", "second", [{
        "run_id": "x", "state": "queued", "axes": {}, "config": {"seed": 0}}])
    with pytest.raises(UserError, match="holds 2 grids"):
        build_report(tmp_path / "root")


@pytest.mark.slow
def test_report_includes_the_spp_section_when_plot_spp_exists(tmp_path, monkeypatch):
    grid_dir = small_disk_grid(tmp_path)
    (grid_dir / "spp").mkdir()
    pd.DataFrame({"model": ["nf_resnet26"] * 2, "seed": [0, 0], "block": ["stem", "b0"],
                  "stage": [-1, 0], "index": [-1, 0], "stat": ["var", "var"],
                  "value": [1.0, 1.04], "expected_var": [1.0, 1.04]}).to_parquet(
        grid_dir / "spp" / "spp.parquet")
    seen = []

    def plot_spp(frame: pd.DataFrame) -> Figure:
        seen.append(frame)
        fig = Figure(figsize=(4, 3))
        fig.subplots().plot(frame["index"], frame["value"])
        return fig

    fake = types.SimpleNamespace(plot_spp=plot_spp)
    monkeypatch.setitem(sys.modules, "reports.figures.spp", fake)
    page = build_report(grid_dir)["html"].read_text()
    assert len(seen) == 1 and list(seen[0]["value"]) == [1.0, 1.04]
    assert 'alt="spp"' in page and "Signal propagation at initialization" in page
    assert (grid_dir / "report_files" / "spp.png").is_file()

    monkeypatch.setitem(sys.modules, "reports.figures.spp", None)  # import fails: section skipped
    page = build_report(grid_dir)["html"].read_text()
    assert 'alt="spp"' not in page and "plot_spp unavailable" in page
    assert not (grid_dir / "report_files" / "spp.png").exists()


@pytest.mark.slow
def test_report_spp_figure_keeps_its_title(tmp_path, monkeypatch):
    from reports.figures import spp

    grid_dir = small_disk_grid(tmp_path)
    (grid_dir / "spp").mkdir()
    pd.DataFrame({"model": ["nf_resnet26"] * 4, "input": "noise", "input_shape": "2x3x16x16",
                  "seed": [0, 0, 1, 1], "block": ["stem", "b0"] * 2, "stage": [-1, 0] * 2,
                  "index": [-1, 0] * 2, "stat": "var", "value": [1.0, 1.04, 1.0, 1.05],
                  "expected_var": [1.0, 1.04] * 2}).to_parquet(grid_dir / "spp" / "spp.parquet")
    drawn = []

    def plot_spp(frame: pd.DataFrame, **options) -> Figure:
        drawn.append(spp.plot_spp(frame, **options))
        return drawn[-1]

    monkeypatch.setitem(sys.modules, "reports.figures.spp",
                        types.SimpleNamespace(plot_spp=plot_spp))
    build_report(grid_dir)
    assert drawn[0].get_suptitle() == ("Signal propagation at init on i.i.d. N(0,1) noise, "
                                       "input 2x3x16x16, 2 seeds (band: min-max)")


@pytest.mark.slow
def test_report_html_tables_sort_filter_and_scroll_offline(built_report):
    grid_dir, paths = built_report
    page = paths["html"].read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    # every table sits in a horizontally scrolling wrapper and is marked sortable
    assert page.count("<table") == len(re.findall(
        r'<div class="scroll"><table class="sortable[ "]', page)) == 4
    assert ".scroll { overflow-x: auto;" in page and "figure img { max-width: 100%;" in page
    # tables longer than FILTER_ROWS rows get a filter box right before their wrapper
    parts = page.split('<div class="scroll">')
    for before, table in zip(parts[:-1], parts[1:]):
        rows = table.split("</table>")[0].count("<tr>") - 1
        has_box = before.endswith("</span></div>") and 'type="search"' in before[-300:]
        assert has_box == (rows > FILTER_ROWS), (rows, before[-120:])
    # the script is inline: nothing is fetched, so the page works offline
    assert 'document.querySelectorAll("table.sortable")' in page
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r'(src|href|url)\(?="?(https?:)?//', page)
    # a figure gives its pixel width (the page reserves its room) and links to its file
    figures = re.findall(r'<a href="report_files/([\w-]+\.png)" title="[^"]*"><img alt="[^"]*" '
                         r'width="(\d+)" src="data:image/png;base64,([^"]+)"', page)
    for name, width, data in figures:
        png = base64.b64decode(data)
        assert int(width) == int.from_bytes(png[16:20], "big") > 500
        assert (grid_dir / "report_files" / name).read_bytes() == png
    assert len(figures) == page.count("<img ") == 5


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed "
                    "(apt-get install chromium) so the headless sort cannot be checked")
@pytest.mark.slow
def test_report_tables_sort_and_filter_in_headless_chromium(tmp_path, built_report):
    page = built_report[1]["html"].read_text()
    # click the runs table's "final acc" header twice and type into the settings filter,
    # recording what the page shows after each step
    probe = page.replace("</body>", """<script>
addEventListener("load", () => {
  const runs = [...document.querySelectorAll("table")].find(
    (t) => t.tHead.textContent.includes("final acc"));
  const col = [...runs.tHead.rows[0].cells].findIndex((c) => c.textContent.includes("final"));
  const read = () => [...runs.tBodies[0].rows].map((r) => r.cells[col].textContent).join("|");
  const button = runs.tHead.rows[0].cells[col].querySelector("button");
  button.click();
  document.body.dataset.up = read();
  button.click();
  document.body.dataset.down = read();
  document.body.dataset.sort = runs.tHead.rows[0].cells[col].getAttribute("aria-sort");
  const box = document.querySelector(".table-tools input");
  box.value = "lr";
  box.dispatchEvent(new Event("input"));
  const table = box.closest(".table-tools").nextElementSibling.querySelector("table");
  document.body.dataset.shown = [...table.tBodies[0].rows].filter((r) => !r.hidden)
    .map((r) => r.cells[0].textContent).join("|");
  document.body.dataset.count = box.closest(".table-tools").querySelector("span").textContent;
});
</script></body>""")
    probe_file = tmp_path / "probe.html"
    probe_file.write_text(probe)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", "--dump-dom", probe_file.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    found = dict(re.findall(r'data-(up|down|sort|shown|count)="([^"]*)"', dom))
    assert set(found) == {"up", "down", "sort", "shown", "count"}, dom[-500:]
    # numbers by value (a diverged run at chance), blanks (failed, queued runs) last
    up = [v for v in found["up"].split("|") if v]
    down = [v for v in found["down"].split("|") if v]
    assert up == sorted(up, key=lambda v: float(v.split("%")[0])) and down == up[::-1]
    assert up[0] == "10.0% ✗ diverged at step 12 (at chance)"
    assert found["up"].endswith("||") and found["down"].endswith("||")
    assert found["sort"] == "descending"
    shown = found["shown"].split("|")
    assert shown and all("lr" in name for name in shown) and "data" not in shown
    assert found["count"] == f"{len(shown)} of 7 rows"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed "
                    "(apt-get install chromium) so the headless render cannot be checked")
@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, built_report):
    grid_dir, paths = built_report
    page = paths["html"].read_text()
    # count the images the browser decoded, once everything has loaded
    probe = page.replace("</body>", "<script>addEventListener('load', () => "
                         "document.body.dataset.decoded = [...document.images].filter("
                         "i => i.complete && i.naturalWidth > 0).length)</script></body>")
    probe_file = tmp_path / "probe.html"
    probe_file.write_text(probe)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", "--dump-dom", probe_file.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    decoded = re.search(r'data-decoded="(\d+)"', dom)
    assert decoded, dom[-500:]
    assert int(decoded.group(1)) == page.count("<img ") == 5
    shot = tmp_path / "shot.png"
    command[-2:] = [f"--screenshot={shot}", "--window-size=1280,2000",
                    (grid_dir / "report.html").as_uri()]
    subprocess.run(command, capture_output=True, timeout=60)
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 20000
