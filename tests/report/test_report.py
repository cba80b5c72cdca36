"""The run report: its pieces on literal rows, and the page rendered by headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from etl.config import LakehouseConf
from etl.funnel import Funnel
from etl.jobs import report
from etl.report import (
    example_reasons,
    near_threshold,
    reason_examples,
    reason_sample,
    score_histogram,
    table_versions,
    thumbnail,
)
from etl.tables import FILTER_QUALITY, SELECTION, TABLES, TARGETS, Lakehouse
from tests.helpers.images import SMALL_CAP, header_bomb, jpeg
from tests.helpers.pipeline import notebook_run

SEL_SCHEMA = "uid string, kept boolean, drop_reason string, score double, threshold double"
FILTERS = {"english": "lang = 'en'", "min_side": "least(width, height) >= 200"}


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is needed: apt-get install -y chromium")
    return exe


def selection_rows(spark):
    rows = [("a", False, "eval-leak", 0.9, 0.5), ("b", False, "duplicate", None, 0.5),
            ("c", False, "english", 0.1, 0.5), ("d", False, "english", 0.7, 0.5),
            ("e", False, "below-threshold", 0.45, 0.5), ("f", False, "below-threshold", 0.2, 0.5),
            ("g", True, None, 0.5, 0.5), ("h", True, None, 0.8, 0.5), ("i", True, None, 0.55, 0.5),
            ("j", False, "custom-rule", float("nan"), 0.5)]
    return spark.createDataFrame(rows, SEL_SCHEMA).repartition(3)


def test_funnel_follows_reason_order_and_adds_unknown_reasons(spark):
    order = ["eval-leak", "duplicate", "near-duplicate", *FILTERS, "below-threshold"]
    got = Funnel.of(selection_rows(spark), order)
    assert got.rows() == [("pool", 0, 10), ("eval-leak", 1, 9), ("duplicate", 1, 8),
                          ("english", 2, 6), ("below-threshold", 2, 4), ("custom-rule", 1, 3),
                          ("kept", 0, 3)]
    assert example_reasons(got) == ["eval-leak", "duplicate", "english", "custom-rule"]


def test_funnel_of_an_empty_selection(spark):
    empty = spark.createDataFrame([], SEL_SCHEMA)
    assert Funnel.of(empty, ["duplicate"]) == Funnel(0, (), 0)


def test_versions_list_every_registered_table(lake):
    versions = table_versions(lake)
    assert [t for t, _, _ in versions] == [t.name for t in TABLES]
    assert {TARGETS, FILTER_QUALITY} <= {t for t, _, _ in versions}
    assert all(v is None for _, v, _ in versions)  # an empty lakehouse


def test_histogram_splits_series_and_marks_threshold(spark):
    hist = score_histogram(selection_rows(spark), 0.5, bins=4)
    assert hist.threshold == 0.5
    assert hist.edges[0] == pytest.approx(0.1) and hist.edges[-1] == pytest.approx(0.9)
    totals = {k: sum(v) for k, v in hist.series.items()}
    assert totals == {"kept": 3, "below-threshold": 2, "dropped earlier": 3}  # null, NaN out
    assert hist.series["kept"] == [0, 0, 2, 1] and hist.series["dropped earlier"][0] == 1


def test_near_threshold_takes_the_closest_rows(spark):
    above, below = near_threshold(selection_rows(spark), 0.5, 2)
    assert [r["uid"] for r in above] == ["g", "i"]
    assert [r["uid"] for r in below] == ["e", "f"]  # "d" (0.7) was dropped earlier


def test_reason_examples_move_at_most_k_rows_per_reason_and_task(spark):
    """The examples are the k lowest uids of each reason, and the plan limits each task to k
    rows per reason before the shuffle (so a report costs the same at any pool size)."""
    rows = [(f"u{i:03d}", False, ("english", "duplicate", "aspect")[i % 3], 0.1, 0.5)
            for i in range(90)]
    sel = spark.createDataFrame(rows, SEL_SCHEMA).repartition(4)
    got = reason_examples(sel, ["english", "aspect"], 2)
    assert {r: [x["uid"] for x in v] for r, v in got.items()} == {
        "english": ["u000", "u003"], "aspect": ["u002", "u005"]}
    plan = reason_sample(sel, ["english"], 2)._jdf.queryExecution().executedPlan().toString()
    assert "WindowGroupLimit" in plan and "Partial" in plan, plan
    assert plan.index("Exchange") < plan.rindex("Partial"), plan  # the partial limit is below it


def test_thumbnail_keeps_aspect_and_replaces_unreadable_images():
    buf = io.BytesIO()
    Image.new("RGB", (400, 100), (255, 0, 0)).save(buf, "JPEG")
    assert Image.open(io.BytesIO(thumbnail(buf.getvalue()))).size == (128, 32)
    for bad in (None, b"not an image"):
        img = Image.open(io.BytesIO(thumbnail(bad)))
        assert img.size == (128, 128) and len(img.getcolors()) > 1  # grey tile with text


@pytest.mark.slow
def test_report_page_renders_with_its_images_in_headless_chromium(spark, tmp_path_factory,
                                                                  tmp_path):
    run = notebook_run(tmp_path_factory)
    argv = ["--conf", "conf/local.yaml", *[a for o in run.overrides for a in ("--set", o)],
            "--out", str(tmp_path), "--examples", "4"]
    page = Path(report.main(argv))
    assert {p.name for p in tmp_path.iterdir()} == {"index.html", "funnel.png", "scores.png"}
    html = page.read_text()
    for heading in ("Funnel", "Scores", "Just above the threshold", "Just below the threshold",
                    "Precision / recall per drop reason", "Delta tables", "Config"):
        assert f"<h2>{heading}" in html, heading
    lake = Lakehouse(spark, LakehouseConf(root=str(run.root)))
    assert f"<td>{SELECTION}</td><td class=\"n\">{lake.version(SELECTION)}</td>" in html
    assert "keep_fraction: 0.5" in html
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", html)  # works offline

    exe = chromium()
    opts = ["--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
    dom = subprocess.run([exe, *opts, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    ok = int(re.search(r'data-images-ok="(\d+)"', dom).group(1))
    assert total == html.count("<img ") and total >= 2 + 4 + 4  # charts + threshold grids
    assert ok == total

    shot = tmp_path / "shot.png"
    subprocess.run([exe, *opts, f"--screenshot={shot}", "--window-size=1200,2000",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2000)
    colors = img.getcolors(maxcolors=1 << 20)
    assert len(colors) > 200  # charts and thumbnails, not a blank page
    assert max(c for c, _ in colors) < 0.9 * 1200 * 2000


# the pixel cap on every decode


def test_report_thumbnail_names_an_image_over_the_cap():
    from etl.report import THUMB, thumbnail

    small = Image.open(io.BytesIO(thumbnail(jpeg(), max_pixels=10_000)))
    big = Image.open(io.BytesIO(thumbnail(jpeg(), max_pixels=SMALL_CAP)))
    assert small.size == (96, 64) and big.size == (THUMB, THUMB)  # grey placeholder
    assert Image.open(io.BytesIO(thumbnail(header_bomb()))).size == (THUMB, THUMB)
