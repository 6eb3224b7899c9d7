"""`delf eval --report PATH`: one self-contained HTML page to look at the evaluation.

At the top the summary table (the figures `delf eval` prints) and the precision-recall
curves (`eval_plot`'s PNG); below, one table per method with a row per query: its
thumbnail, group and AP (and the other methods' APs for the same query), its first
`SHOWN` results marked right (a positive: green, ✓) or wrong (red, ✗), and the positives
it missed (not among those first results, dashed orange) with their rank in the top-K
ranking, or "not in top K". Rows start worst AP first; clicking a column's header sorts
by it (again: the other way), through a small inline script.

Self-contained: every photo's thumbnail is one base64 JPEG in the page's stylesheet
(a CSS class per photo, so a photo shown in many rows is stored once), the plot a base64
PNG; no network, no external script or stylesheet. Result ids that are not photos of the
manifest (other photos of a running index) are shown by id, without a picture.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import html
from pathlib import Path

from delf_tools.eval_plot import pr_png
from delf_tools.eval_set import EvalError, Photo, load_rgb
from delf_tools.evaluation import average_precision, queries_and_positives

SHOWN = 5          # first results shown per query
THUMB_SIDE = 160   # thumbnail's long side (px); results are drawn at half that
THUMB_QUALITY = 80

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}
.meta,.legend{color:#555}
table{border-collapse:collapse}th,td{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4;text-align:left;position:sticky;top:0;z-index:1}
#summary td.num{text-align:right;font-variant-numeric:tabular-nums}
th button{font:inherit;font-weight:bold;border:0;background:none;cursor:pointer;padding:0}
th[aria-sort=ascending] button::after{content:" \\25B2"}th[aria-sort=descending] button::after{content:" \\25BC"}
td.ap{font-size:16px;font-weight:bold;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:0 6px 4px 0;text-align:center;font-size:12px;vertical-align:top}
figcaption{max-width:84px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.thumb{display:inline-block;width:80px;height:80px;background:#eee center/contain no-repeat}
.query .thumb{width:160px;height:160px}
.query figcaption{max-width:164px;white-space:normal;word-break:break-all;text-align:left}
td.group{max-width:140px;word-break:break-all}td.first{white-space:nowrap}td.missed{min-width:180px}
.nothumb{font-size:11px;overflow:hidden;word-break:break-all;color:#666}
.right .thumb{outline:3px solid #1a9a2a}.right figcaption{color:#1a7a22}
.wrong .thumb{outline:3px solid #d02020}.wrong figcaption{color:#b01818}
.missed .thumb{outline:3px dashed #e08a00}.missed figcaption{color:#a86400;white-space:normal}
#pr-curves{width:560px;max-width:100%;height:auto;border:1px solid #ddd}
.top{display:flex;flex-wrap:wrap;gap:8px 32px;align-items:flex-start}
"""

SCRIPT = """
(function () {
  "use strict";
  function value(row, col) { return row.cells[col].getAttribute("data-value"); }
  function sortBy(table, col, dir) {
    var head = table.tHead.rows[0].cells, body = table.tBodies[0];
    var numeric = head[col].getAttribute("data-type") === "num";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, col), y = value(b, col);
      var c = numeric ? parseFloat(x) - parseFloat(y) : (x < y ? -1 : x > y ? 1 : 0);
      if (dir === "descending") { c = -c; }
      return c || parseInt(a.getAttribute("data-order"), 10) - parseInt(b.getAttribute("data-order"), 10);
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < head.length; i++) {
      if (head[i].querySelector("button")) { head[i].setAttribute("aria-sort", i === col ? dir : "none"); }
    }
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.queries"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = th.querySelector("button");
      if (!button) { return; }
      button.addEventListener("click", function () {
        sortBy(table, col, th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending");
      });
    });
  });
})();
"""


@dataclasses.dataclass
class QueryRow:
    """What the report shows of one query for one method."""

    query: str
    group: str
    ap: float
    first: list[tuple[str, bool]]           # (id, is a positive) for the first SHOWN results
    missed: list[tuple[str, int | None]]    # positives not among them: (id, 1-based rank or None)


def query_rows(rankings: dict[str, list[str]], queries: dict[str, set[str]], groups: dict[str, str],
               shown: int = SHOWN) -> list[QueryRow]:
    """One row per query, AP as `delf eval` computes it (`evaluation.average_precision`)."""
    rows = []
    for q, positives in queries.items():
        ranked = rankings.get(q, [])
        rank_of = {}
        for rank, item in enumerate(ranked, 1):
            rank_of.setdefault(item, rank)
        first = [(i, i in positives) for i in ranked[:shown]]
        missed = sorted(((p, rank_of.get(p)) for p in positives if rank_of.get(p, shown + 1) > shown),
                        key=lambda m: (m[1] is None, m[1] or 0, m[0]))
        rows.append(QueryRow(q, groups[q], average_precision(ranked, positives), first, missed))
    return rows


def thumbnail(photo: Photo, side: int = THUMB_SIDE) -> bytes:
    """A JPEG of the photo as the system decodes it, its long side `side` pixels."""
    import cv2

    rgb = load_rgb(photo.path, max_side=side)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:  # pragma: no cover
        raise EvalError(f"could not make a thumbnail of {photo.rel}")
    return buf.tobytes()


def thumbnail_classes(photos: list[Photo], side: int = THUMB_SIDE) -> tuple[dict[str, str], str]:
    """({image id: CSS class}, the stylesheet rules that give each class its picture).
    A photo that cannot be read gets no class (it is shown by id)."""
    classes, rules = {}, []
    for n, p in enumerate(photos):
        try:
            data = base64.b64encode(thumbnail(p, side)).decode("ascii")
        except Exception:  # noqa: BLE001 - a photo the system would refuse too: shown by id
            continue
        classes[p.image_id] = f"p{n}"
        rules.append(f".p{n}{{background-image:url(data:image/jpeg;base64,{data})}}")
    return classes, "\n".join(rules)


def _figure(image_id: str, kind: str, caption: str, classes: dict[str, str], title: str = "") -> str:
    esc = html.escape(image_id)
    label = html.escape(title or image_id)
    if image_id in classes:
        pic = f'<span class="thumb {classes[image_id]}" role="img" aria-label="{label}"></span>'
    else:
        pic = f'<span class="thumb nothumb" role="img" aria-label="{label}">{esc}</span>'
    return (f'<figure class="{kind}" data-id="{esc}" title="{label}">{pic}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _row_html(n: int, row: QueryRow, other_aps: list[float], classes: dict[str, str], top_k: int) -> str:
    first = "".join(
        _figure(i, "right" if ok else "wrong", f"{rank} {'✓' if ok else '✗'}", classes,
                f"#{rank} {i}: {'right' if ok else 'wrong'}")
        for rank, (i, ok) in enumerate(row.first, 1))
    missed = "".join(
        _figure(i, "missed", f"rank {rank}" if rank else f"not in top {top_k}", classes,
                f"{i}: missed, " + (f"rank {rank}" if rank else f"not in the top {top_k}"))
        for i, rank in row.missed)
    others = "".join(f'<td class="ap-other" data-value="{ap!r}">{ap:.3f}</td>' for ap in other_aps)
    q = html.escape(row.query)
    return (f'<tr data-order="{n}" data-query="{q}">'
            f'<td class="query" data-value="{q}">{_figure(row.query, "query", row.query, classes)}</td>'
            f'<td class="group" data-value="{html.escape(row.group)}">{html.escape(row.group)}</td>'
            f'<td class="ap" data-value="{row.ap!r}">{row.ap:.3f}</td>{others}'
            f'<td class="first">{first or "(no results)"}</td>'
            f'<td class="missed" data-value="{len(row.missed)}">{missed}</td></tr>')


def _method_section(method: str, rows: list[QueryRow], aps: dict[str, dict[str, float]],
                    classes: dict[str, str], top_k: int) -> str:
    others = [m for m in aps if m != method]

    def th(label: str, kind: str, sort: str | None = None, key: str = "") -> str:
        aria = f' aria-sort="{sort}"' if sort else ' aria-sort="none"'
        return f'<th data-type="{kind}" data-key="{key}"{aria}><button type="button">{html.escape(label)}</button></th>'

    head = (th("query", "text", key="query") + th("group", "text", key="group")
            + th("AP", "num", "ascending", key="ap")
            + "".join(th(f"AP {m}", "num", key=f"ap-{m}") for m in others)
            + f"<th>first {SHOWN} results</th>" + th("missed positives (rank)", "num", key="missed"))
    ordered = sorted(rows, key=lambda r: (r.ap, r.query))
    body = "\n".join(_row_html(n, r, [aps[m][r.query] for m in others], classes, top_k)
                     for n, r in enumerate(ordered))
    mean = sum(r.ap for r in rows) / len(rows) if rows else 0.0
    return (f'<section class="method" id="method-{html.escape(method)}">'
            f'<h2>{html.escape(method)}: per query (mAP {mean:.3f}, {len(rows)} queries)</h2>'
            f'<table class="queries" data-method="{html.escape(method)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table></section>")


SUMMARY_COLUMNS = (("mAP", "map", "{:.3f}"), ("P@1", "precision_at_1", "{:.3f}"),
                   ("R@10", "recall_at_10", "{:.3f}"), ("latency median (s)", "latency_median_s", "{:.3f}"),
                   ("latency p95 (s)", "latency_p95_s", "{:.3f}"),
                   ("ingest (photos/s)", "ingest_photos_per_s", "{:.2f}"), ("queries", "queries", "{:d}"))


def _summary(results: dict[str, dict]) -> str:
    head = "<th>method</th>" + "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in SUMMARY_COLUMNS)
    rows = "".join(
        f'<tr data-method="{html.escape(m)}"><td>{html.escape(m)}</td>'
        + "".join(f'<td class="num" data-key="{key}" data-value="{r[key]!r}">{fmt.format(r[key])}</td>'
                  for _, key, fmt in SUMMARY_COLUMNS) + "</tr>"
        for m, r in results.items())
    return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _conditions(results: dict[str, dict]) -> str:
    """mAP / P@1 / R@10 per condition of the queries, one column group per method ("" when
    the manifest names no conditions)."""
    conds = sorted({c for r in results.values() for c in r.get("by_condition", {})})
    if not conds:
        return ""
    head = "<th>condition</th><th>queries</th>" + "".join(
        f"<th>{html.escape(m)} mAP</th><th>P@1</th><th>R@10</th>" for m in results)
    body = []
    for c in conds:
        cells, n = [], 0
        for r in results.values():
            f = r.get("by_condition", {}).get(c)
            n = max(n, f["queries"] if f else 0)
            cells += ([f'<td class="num">{f[k]:.3f}</td>' for k in ("map", "precision_at_1", "recall_at_10")]
                      if f else ["<td>-</td>"] * 3)
        body.append(f'<tr data-condition="{html.escape(c)}"><td>{html.escape(c)}</td>'
                    f'<td class="num">{n}</td>{"".join(cells)}</tr>')
    return (f'<h2>By condition</h2><table id="conditions"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def render(photos: list[Photo], results: dict[str, dict], top_k: int, title: str = "delf eval") -> str:
    """The whole page. `results` as `eval_command.evaluate` returns them (with `rankings`)."""
    groups = {p.image_id: p.group for p in photos}
    queries = queries_and_positives(groups)
    rows = {m: query_rows(r.get("rankings", {}), queries, groups) for m, r in results.items()}
    aps = {m: {row.query: row.ap for row in rs} for m, rs in rows.items()}
    classes, thumb_css = thumbnail_classes(photos)
    plot = base64.b64encode(pr_png(results)).decode("ascii")
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sections = "\n".join(_method_section(m, rs, aps, classes, top_k) for m, rs in rows.items())
    legend = (f"Per method, one row per query, worst AP first; click a column's header to sort by it "
              f"(again: the other way). First {SHOWN} results: green ✓ a positive (same group), red ✗ not. "
              f"Missed positives: those not among the first {SHOWN}, dashed orange, with their rank in "
              f"the top {top_k} (or not in it).")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)} report</title>\n<style>{STYLE}\n{thumb_css}\n</style></head>\n<body>"
            f"<h1>{html.escape(title)} report</h1>"
            f'<p class="meta">{len(photos)} photos, {len(queries)} queries, methods '
            f"{html.escape(', '.join(results))}, top {top_k}; written {html.escape(when)}</p>"
            f'<div class="top"><div><h2>Summary</h2>{_summary(results)}{_conditions(results)}</div>'
            f'<div><h2>Precision-recall</h2><img id="pr-curves" width="900" height="680" '
            f'alt="interpolated precision-recall curves, mean over queries" src="data:image/png;base64,{plot}">'
            f"</div></div>"
            f'<p class="legend">{html.escape(legend)}</p>\n{sections}\n'
            f"<script>{SCRIPT}</script></body></html>\n")


def write_report(path: str | Path, photos: list[Photo], results: dict[str, dict], top_k: int,
                 title: str = "delf eval") -> None:
    """Write the page to `path` (folders made as needed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(photos, results, top_k, title), encoding="utf-8")
    except OSError as exc:
        raise EvalError(f"could not write the report to {path}: {exc}") from None
