"""Run report: one self-contained HTML page (plus PNG charts) showing what each filter did.

``write_report`` reads ``gold_selection`` (and, when present, bronze image bytes, the eval
images, ``run_stats`` and the labels) and writes ``index.html`` with every image embedded as a
``data:`` URI, so the page opens from ``file://`` with no network, plus ``funnel.png`` and
``scores.png`` next to it. Only aggregates and a few dozen example rows reach the driver.
No credential reaches the page: the config and every text pass through :mod:`etl.redact`.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone

import yaml
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.config import Config, to_dict
from etl.fs import join
from etl.funnel import Funnel
from etl.metrics import drop_reason_quality, reason_labels
from etl.provenance import applied_threshold
from etl.redact import redact, redact_text
from etl.select import selection_parts, selection_reasons
from etl.tables import (
    BRONZE,
    DEDUP,
    EVAL_IMAGES,
    GOLD,
    QUARANTINE,
    SELECTION,
    SILVER,
    TABLES,
    Lakehouse,
)
from etl.takedown.ledger import summary
from etl.takedown.match import without_removed
from etl.work import latest_run_stats, stats_lines, work_rows
from udfs.imaging import DEFAULT_MAX_PIXELS, decode_rgb

THUMB = 128
OPTIONAL_COLUMNS = {"score": "double", "width": "int", "height": "int", "label_kind": "string",
                    "dup_of": "string", "dup_similarity": "double", "eval_match": "string",
                    "eval_similarity": "double"}
PAIR_REASONS = {"duplicate": "dup_of", "near-duplicate": "dup_of", "eval-leak": "eval_match"}


@dataclass
class Tile:
    """One thumbnail with the caption shown under it."""

    uid: str
    caption: str
    note: str = ""
    image: bytes | None = None


@dataclass
class Histogram:
    edges: list[float]
    series: dict[str, list[int]]  # kept / below-threshold / dropped earlier -> counts per bin
    threshold: float | None = None


@dataclass
class ReportData:
    """Everything the page shows, gathered from the lakehouse."""

    funnel: Funnel
    histogram: Histogram | None
    above: list[Tile] = field(default_factory=list)
    below: list[Tile] = field(default_factory=list)
    examples: dict[str, list[Tile]] = field(default_factory=dict)
    pairs: dict[str, list[tuple[Tile, Tile]]] = field(default_factory=dict)
    quality: list[dict] | None = None
    run_stats: list[tuple[str, str, str]] = field(default_factory=list)
    work: list[list] = field(default_factory=list)  # etl.work.work_rows
    versions: list[tuple[str, int | None, str]] = field(default_factory=list)
    config: str = ""
    takedowns: dict | None = None  # etl.takedown.ledger.summary
    max_pixels: int = DEFAULT_MAX_PIXELS  # thumbnails: the decode cap (score.max_image_pixels)


# ---- gathering (Spark) ----------------------------------------------------------------------


def score_histogram(selection: DataFrame, threshold: float | None,
                    bins: int = 40) -> Histogram | None:
    """Counts of scores per bin, split into kept / below-threshold / dropped earlier."""
    scored = selection.where(F.col("score").isNotNull() & ~F.isnan("score"))
    lo, hi = scored.agg(F.min("score"), F.max("score")).first()
    if lo is None:
        return None
    width = (hi - lo) / bins or 1.0
    bucket = F.least(F.floor((F.col("score") - lo) / width).cast("int"), F.lit(bins - 1))
    group = (F.when(F.col("kept"), "kept").when(F.col("drop_reason") == "below-threshold",
                                                "below-threshold").otherwise("dropped earlier"))
    series = {name: [0] * bins for name in ("kept", "below-threshold", "dropped earlier")}
    for r in scored.groupBy(bucket.alias("b"), group.alias("g")).count().collect():
        series[r["g"]][r["b"]] = r["count"]
    return Histogram([lo + i * width for i in range(bins + 1)], series, threshold)


def near_threshold(selection: DataFrame, thr: float | None, k: int) -> tuple[list, list]:
    """Rows just above (kept) and just below (dropped) the threshold ``thr``, closest first."""
    if thr is None:
        return [], []
    cand = selection.where(F.col("kept") | (F.col("drop_reason") == "below-threshold"))
    above = cand.where(F.col("score") >= thr).orderBy("score", "uid").limit(k).collect()
    below = cand.where(F.col("score") < thr).orderBy(F.desc("score"), "uid").limit(k).collect()
    return above, below


def reason_sample(selection: DataFrame, reasons: list[str], k: int) -> DataFrame:
    """Up to ``k`` rows per drop reason, lowest uids first (reproducible). ``row_number() <= k``
    lets Spark keep only the first ``k`` rows of each reason in every task before the shuffle
    (its WindowGroupLimit), so at most tasks x reasons x k rows move, whatever the pool size."""
    w = Window.partitionBy("drop_reason").orderBy("uid")
    return (selection.where(F.col("drop_reason").isin(reasons))
            .withColumn("_n", F.row_number().over(w)).where(F.col("_n") <= k).drop("_n"))


def reason_examples(selection: DataFrame, reasons: list[str], k: int) -> dict[str, list]:
    """:func:`reason_sample` on the driver, grouped by reason."""
    rows = reason_sample(selection, reasons, k).orderBy("drop_reason", "uid").collect()
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r["drop_reason"], []).append(r)
    return out


def images(lake: Lakehouse, table: str, key: str, values: list[str]) -> dict[str, tuple]:
    """key value -> (image bytes, text) for a few rows of ``table``."""
    if not values or not lake.exists(table):
        return {}
    df = lake.read(table)
    if key not in df.columns:
        return {}
    rows = df.where(F.col(key).isin(sorted(set(values)))).select(key, "image", "text").collect()
    return {r[key]: (r["image"], r["text"]) for r in rows}


def table_versions(lake: Lakehouse) -> list[tuple[str, int | None, str]]:
    """(table, latest Delta version or None, SQL name) for each project table."""
    return [(t.name, lake.version(t.name), lake.name(t.name)) for t in TABLES]


def selection_funnel(lake: Lakehouse, cfg: Config) -> Funnel:
    """The funnel of the current ``gold_selection``, drop reasons in the configured order."""
    return Funnel.of(lake.read(SELECTION), selection_reasons(cfg.select))


def example_reasons(funnel: Funnel) -> list[str]:
    """The drop reasons shown with examples: every one that dropped rows except the score cut
    (its rows are shown just below the threshold)."""
    return [s.name for s in funnel.steps if s.name != "below-threshold"]


def label_quality(selection: DataFrame, parts: list[tuple[str, str]]) -> list[dict] | None:
    """Precision/recall per drop reason (of the selection's ``(reason, kind)`` parts, as
    select prints them) when the pool carries labels, else None."""
    if not selection.where("label_kind IS NOT NULL").limit(1).count():
        return None
    quality = drop_reason_quality(selection, reason_labels(parts))
    return None if quality is None else [q.asDict() for q in quality.collect()]


def example_images(lake: Lakehouse, near: list, examples: dict[str, list]) -> tuple[dict, dict]:
    """(pool uid -> (image, text), eval key -> (image, text)) for the example rows, the pool
    rows their duplicates copy and the eval images their leaks match."""
    rows = near + [r for rs in examples.values() for r in rs]
    uids = [r["uid"] for r in rows]
    uids += [r["dup_of"] for rs in examples.values() for r in rs if r["dup_of"]]
    keys = [r["eval_match"] for r in examples.get("eval-leak", [])]
    evals = images(lake, EVAL_IMAGES, "key", keys) or images(lake, EVAL_IMAGES, "uid", keys)
    return images(lake, BRONZE, "uid", uids), evals


def gather(lake: Lakehouse, cfg: Config, k: int = 8) -> ReportData:
    """Collect the report's aggregates and example rows from the lakehouse."""
    selection = without_removed(lake, lake.read(SELECTION))
    for name, kind in OPTIONAL_COLUMNS.items():
        if name not in selection.columns:
            selection = selection.withColumn(name, F.lit(None).cast(kind))
    selection = selection.persist()
    try:
        return _gather(lake, cfg, selection, k)
    finally:
        selection.unpersist()


def _gather(lake: Lakehouse, cfg: Config, sel: DataFrame, k: int) -> ReportData:
    funnel = Funnel.of(sel, selection_reasons(cfg.select))
    thr = applied_threshold(lake)
    above, below = near_threshold(sel, thr, k)
    examples = reason_examples(sel, example_reasons(funnel), k)
    pool, evals = example_images(lake, above + below, examples)
    stats = latest_run_stats(lake)
    return ReportData(
        funnel=funnel, histogram=score_histogram(sel, thr),
        above=[tile(r, pool) for r in above], below=[tile(r, pool) for r in below],
        examples={r: [tile(x, pool) for x in rs] for r, rs in examples.items()
                  if r not in PAIR_REASONS},
        pairs={r: [(tile(x, pool), original(x, PAIR_REASONS[r], pool, evals)) for x in rs]
               for r, rs in examples.items() if r in PAIR_REASONS},
        quality=label_quality(sel, selection_parts(cfg.select)), run_stats=stats_lines(stats),
        work=work_rows(stats),
        versions=table_versions(lake), config=shown_config(cfg), takedowns=summary(lake),
        max_pixels=cfg.score.max_image_pixels)


def shown_config(cfg: Config) -> str:
    """The config as the page shows it: YAML, every credential redacted (:mod:`etl.redact`:
    secret ``spark.conf`` keys, a ``spark.remote`` token, passwords in URLs)."""
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)


# ---- table summaries (what the notebooks show after each step) -------------------------------


def source_counts(lake: Lakehouse) -> DataFrame:
    """Bronze pairs per source."""
    return lake.read(BRONZE).groupBy("source").agg(F.count("*").alias("pairs"))


def eval_image_count(lake: Lakehouse) -> int | None:
    """Rows of the evaluation image table (None when there is none)."""
    return lake.read(EVAL_IMAGES).count() if lake.exists(EVAL_IMAGES) else None


def quarantine_counts(lake: Lakehouse) -> DataFrame | None:
    """Quarantined rows per kind and reason, most first (None before the first ingest)."""
    if not lake.exists(QUARANTINE):
        return None
    return lake.read(QUARANTINE).groupBy("kind", "reason").count().orderBy(F.desc("count"))


def score_summary(lake: Lakehouse) -> DataFrame:
    """Per model: pairs, scored, errors, min / median / max score."""
    return lake.read(SILVER).groupBy("model_id").agg(
        F.count("*").alias("pairs"), F.count("score").alias("scored"),
        F.count("score_error").alias("errors"), F.min("score").alias("min"),
        F.expr("percentile_approx(score, 0.5)").alias("median"), F.max("score").alias("max"))


def score_errors(lake: Lakehouse) -> DataFrame:
    """Pairs per scoring error."""
    scores = lake.read(SILVER)
    return scores.where(F.col("score_error").isNotNull()).groupBy("score_error").count()


def dedup_summary(lake: Lakehouse) -> DataFrame:
    """Pairs and eval leaks per duplicate reason."""
    return lake.read(DEDUP).groupBy("dup_reason").agg(
        F.count("*").alias("pairs"), F.count("eval_match").alias("eval_leaks"))


def gold_preview(lake: Lakehouse) -> DataFrame:
    """The exported pairs, best score first."""
    return lake.read(GOLD).select("uid", "url", "text", "score").orderBy(F.desc("score"))


def tile(row, pool: dict[str, tuple]) -> Tile:
    """A pool row as a tile: score, size and (when labelled) the true label in the note."""
    parts = [] if row["score"] is None else [f"score {float(row['score']):.4f}"]
    if row["width"] is not None:
        parts.append(f"{row['width']}x{row['height']}")
    if row["label_kind"]:
        parts.append(f"label {row['label_kind']}")
    return Tile(row["uid"], row["text"] or "", " · ".join(parts), pool.get(row["uid"], (None,))[0])


def original(row, column: str, pool: dict, evals: dict) -> Tile:
    """The row a duplicate or leak was matched to (pool original or eval image)."""
    ref = row[column]
    sim = row["eval_similarity" if column == "eval_match" else "dup_similarity"]
    note = f"similarity {float(sim):.3f}" if sim is not None else ""
    image, text = (evals if column == "eval_match" else pool).get(ref, (None, ""))
    kind = "eval image" if column == "eval_match" else "kept original"
    return Tile(str(ref), text or "", f"{kind} {ref} {note}".strip(), image)


# ---- rendering (driver only) ----------------------------------------------------------------


def thumbnail(data: bytes | None, side: int = THUMB,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A PNG thumbnail of ``data``; a grey placeholder naming the problem when undecodable or
    over ``max_pixels`` (checked from the header, before any pixel is decoded)."""
    from PIL import Image, ImageDraw

    img, error = decode_rgb(data, max_pixels, min_side=side) if data is not None \
        else (None, "no image bytes")
    if img is not None:
        try:
            img.thumbnail((side, side))
        except Exception as exc:  # noqa: BLE001 - any failure becomes a visible placeholder
            img, error = None, f"{type(exc).__name__}: {exc}"
    if img is None:
        img = Image.new("RGB", (side, side), (200, 200, 200))
        ImageDraw.Draw(img).text((6, side // 2 - 6), (error or "unreadable")[:20],
                                 fill=(60, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def funnel_png(funnel: Funnel) -> bytes:
    """Horizontal bars: rows left after each step, with the rows each step dropped."""
    from matplotlib.figure import Figure

    rows = funnel.rows()[::-1]
    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.2), dpi=100)
    ax = fig.subplots()
    names = [name for name, _, _ in rows]
    left = [n for _, _, n in rows]
    dropped = [d for _, d, _ in rows]
    ax.barh(names, left, color="#4c78a8", label="rows left")
    ax.barh(names, dropped, left=left, color="#e45756", label="dropped by this step")
    for y, (n, d) in enumerate(zip(left, dropped, strict=True)):
        ax.text(n + d, y, f" {n}" + (f" (-{d})" if d else ""), va="center", fontsize=8)
    ax.set_xlabel("rows")
    ax.set_title("Selection funnel")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def histogram_png(hist: Histogram) -> bytes:
    """Stacked score histogram with the threshold marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax = fig.subplots()
    width = hist.edges[1] - hist.edges[0]
    bottom = [0] * len(hist.edges[:-1])
    colors = {"kept": "#54a24b", "below-threshold": "#e45756", "dropped earlier": "#bab0ac"}
    for name, counts in hist.series.items():
        ax.bar(hist.edges[:-1], counts, width=width, bottom=bottom, align="edge",
               color=colors[name], label=name)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    if hist.threshold is not None:
        ax.axvline(hist.threshold, color="black", linestyle="--",
                   label=f"threshold {hist.threshold:.4f}")
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    ax.set_title("Score distribution")
    ax.legend(fontsize=8)
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


CSS = """body{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px}
td.n{text-align:right}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:140px;font-size:11px}figure img{border:1px solid #ccc;display:block}
.pair{display:flex;gap:4px;border:1px solid #eee;padding:4px}
.caption{font-style:italic}.note{color:#666;overflow-wrap:anywhere}pre{background:#f6f6f6;padding:8px;font-size:12px}"""

# Self-check, read by tests and handy for humans: how many images decoded in the browser.
CHECK = """<script>window.addEventListener('load',function(){var i=Array.from(document.images);
var ok=i.filter(function(x){return x.complete&&x.naturalWidth>0}).length;
document.body.setAttribute('data-images-total',i.length);
document.body.setAttribute('data-images-ok',ok);});</script>"""


def _e(value) -> str:
    """``value`` as HTML text, credentials redacted (every text on the page passes here)."""
    return html.escape(redact_text(str(value)))


def figure_html(t: Tile, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    png = thumbnail(t.image, max_pixels=max_pixels)
    return (f'<figure><img src="{data_uri(png)}" alt="{_e(t.uid)}">'
            f'<figcaption><span class="caption">{_e(t.caption[:120])}</span><br>'
            f'<span class="note">{_e(t.note)}</span></figcaption></figure>')


def grid_html(tiles: list[Tile], max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    if not tiles:
        return "<p>(none)</p>"
    return '<div class="grid">' + "".join(figure_html(t, max_pixels) for t in tiles) + "</div>"


def pairs_html(pairs: list[tuple[Tile, Tile]], max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    return '<div class="grid">' + "".join(
        f'<div class="pair">{figure_html(a, max_pixels)}{figure_html(b, max_pixels)}</div>'
        for a, b in pairs) + "</div>"


def table_html(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{_e(c)}</td>' if isinstance(c, (int, float)) else f"<td>{_e(c)}</td>"
        for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def render(data: ReportData, charts: dict[str, bytes], title: str) -> str:
    """The whole page as one HTML string (images inline)."""
    pool, cap = data.funnel.pool or 1, data.max_pixels
    funnel = [[n, d or "", left, f"{100 * left / pool:.1f}%"]
              for n, d, left in data.funnel.rows()]
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p>generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; kept "
             f"{data.funnel.kept} of {data.funnel.pool} pairs</p>",
             "<h2>Funnel</h2>", _chart(charts, "funnel"),
             table_html(["step", "dropped", "left", "of pool"], funnel),
             "<h2>Scores</h2>", _chart(charts, "scores"),
             "<h2>Just above the threshold (kept)</h2>", grid_html(data.above, cap),
             "<h2>Just below the threshold (dropped)</h2>", grid_html(data.below, cap)]
    for reason, pairs in data.pairs.items():
        what = "eval leaks" if reason == "eval-leak" else f"{reason}s"
        parts += [f"<h2>Detected {_e(what)} (dropped | matched)</h2>", pairs_html(pairs, cap)]
    for reason, tiles in data.examples.items():
        parts += [f"<h2>Dropped: {_e(reason)}</h2>", grid_html(tiles, cap)]
    if data.quality is not None:
        rows = [[q["reason"], q["label_kinds"], q["predicted"], q["expected"], q["true_pos"],
                 _pct(q["precision"]), _pct(q["recall"]), _pct(q["recall_any"])]
                for q in data.quality]
        parts += ["<h2>Precision / recall per drop reason (sample labels)</h2>", table_html(
            ["reason", "labels", "dropped", "labelled", "correct", "precision", "recall",
             "caught by any"], rows)]
    if data.takedowns is not None:
        td = data.takedowns
        parts += [f"<h2>Takedowns ({td['total']} requests)</h2>", table_html(
            ["request", "category", "selectors", "state", "uids removed"], td["requests"]),
            table_html(["table", "rows removed"], td["removed"]),
            table_html(["last proof", "result", "failures"], [td["proof"]] if td["proof"] else [])]
    parts += ["<h2>Work per step (latest run): new rows, rows touched, pool</h2>",
              table_html(["step", "run_id", "new", "touched", "pool"], data.work),
              "<h2>Run stats (latest run of each step)</h2>",
              table_html(["step", "run_id", "metrics"], [list(r) for r in data.run_stats]),
              "<h2>Delta tables</h2>", table_html(
                  ["table", "version", "name"],
                  [[t, "absent" if v is None else v, n] for t, v, n in data.versions]),
              "<h2>Config</h2>", f"<pre>{_e(data.config)}</pre>"]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style>{CHECK}</head><body>{''.join(parts)}</body></html>")


def _chart(charts: dict[str, bytes], name: str) -> str:
    if name not in charts:
        return "<p>(no scores)</p>"
    return f'<img class="chart" src="{data_uri(charts[name])}" alt="{name} chart">'


def write_report(lake: Lakehouse, cfg: Config, out: str, k: int = 8,
                 title: str = "dfn-curate run report") -> str:
    """Gather, draw and write ``out/index.html`` (+ ``funnel.png``, ``scores.png``) to any URL;
    returns the page's location (``index.html`` last, so a page never names missing charts)."""
    data = gather(lake, cfg, k)
    charts = {"funnel": funnel_png(data.funnel)}
    if data.histogram is not None:
        charts["scores"] = histogram_png(data.histogram)
    out = str(out)
    for name, png in charts.items():
        lake.store.write_bytes(join(out, f"{name}.png"), png)
    page = join(out, "index.html")
    lake.store.write_text(page, render(data, charts, title))
    return page
