"""`delf eval --report`: the HTML page's content read back with html.parser (rows, APs equal
to `--json`'s, missed positives with their rank, thumbnails that are the photos), and the
page in a real headless Chromium (no console errors, clicking a header sorts); the
Chromium tests skip when no Chromium is installed (Debian: `apt-get install chromium`).

The manifest is written at test time from scikit-image's sample photos: three groups of
a photo and a warped copy, and one group of two unrelated photos (a hard case).
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from delf_tools import cli
from delf_tools.eval_report import SHOWN, query_rows, render
from delf_tools.eval_set import load_photos
from delf_tools.evaluation import queries_and_positives
from photos import jpeg, sample_photo, warped_query
from report_html import parse_report

PAIRS = ("astronaut", "coffee", "rocket")
UNRELATED = ("chelsea", "hubble")   # one group, nothing in common


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report-landmarks")
    lines = ["path\tgroup"]
    for n, name in enumerate(PAIRS):
        rgb = sample_photo(name)
        (root / name).mkdir()
        (root / name / "original.jpg").write_bytes(jpeg(rgb))
        (root / name / "warped.jpg").write_bytes(jpeg(warped_query(rgb, seed=n)[0]))
        lines += [f"{name}/original.jpg\t{name}", f"{name}/warped.jpg\t{name}"]
    (root / "mixed").mkdir()
    for name in UNRELATED:
        (root / "mixed" / f"{name}.jpg").write_bytes(jpeg(sample_photo(name)))
        lines.append(f"mixed/{name}.jpg\tmixed")
    (root / "MANIFEST.tsv").write_text("\n".join(lines) + "\n")
    return root / "MANIFEST.tsv"


@pytest.fixture(scope="module")
def evaluated(manifest, tmp_path_factory) -> tuple[Path, dict]:
    """`delf eval --methods sift --json --report` once: (the report, the JSON). (Only the
    RootSIFT baseline: global-gem's network takes half a minute more to load here.)"""
    out = tmp_path_factory.mktemp("report-out")
    code = cli.main(["eval", str(manifest), "--methods", "sift", "--json", str(out / "eval.json"),
                     "--report", str(out / "site" / "report.html")])
    assert code == 0
    return out / "site" / "report.html", json.loads((out / "eval.json").read_text())


def group_of(image_id: str) -> str:
    return image_id.split("/")[0]


def ap_from_ranks(ranks: list[int], n_positives: int) -> float:
    """AP from the 1-based ranks of the positives found (the rest count as misses)."""
    return sum(hit / rank for hit, rank in enumerate(sorted(ranks), 1)) / n_positives


# --------------------------------------------------------------------------- rows


def test_rows_of_a_hand_made_ranking():
    ranked = ["x", "a", "y", "z", "w", "v", "b"]   # a at 2, b at 7, c never
    queries = {"q": {"a", "b", "c"}}
    [row] = query_rows({"q": ranked}, queries, {"q": "g"})
    assert row.first == [("x", False), ("a", True), ("y", False), ("z", False), ("w", False)]
    assert row.missed == [("b", 7), ("c", None)]
    assert row.ap == pytest.approx((1 / 2 + 2 / 7) / 3)
    [empty] = query_rows({}, queries, {"q": "g"})   # a query the method never answered
    assert empty.first == [] and empty.ap == 0.0 and {m for m, _ in empty.missed} == {"a", "b", "c"}


def test_conditions_table_in_the_page(manifest):
    photos = load_photos(manifest)
    figures = {"map": 0.5, "precision_at_1": 0.5, "recall_at_10": 1.0, "latency_median_s": 0.1,
               "latency_p95_s": 0.2, "ingest_photos_per_s": 3.0, "queries": 6, "pr_curve": [0.5] * 21,
               "rankings": {}}
    by = {"day-night": {"map": 0.25, "precision_at_1": 0.0, "recall_at_10": 0.5, "queries": 2},
          "object": {"map": 1.0, "precision_at_1": 1.0, "recall_at_10": 1.0, "queries": 4}}
    page = render(photos, {"delf": {**figures, "by_condition": by}, "sift": figures}, top_k=100)
    table = re.search(r'<table id="conditions">.*?</table>', page, re.S).group(0)
    rows = re.findall(r'<tr data-condition="([^"]+)"><td>[^<]+</td><td class="num">(\d+)</td>(.*?)</tr>', table)
    assert [(c, n) for c, n, _ in rows] == [("day-night", "2"), ("object", "4")]
    assert re.findall(r">([0-9.]+)<", rows[0][2]) == ["0.250", "0.000", "0.500"]  # delf's; sift has none
    assert rows[0][2].count("<td>-</td>") == 3
    assert 'id="conditions"' not in render(photos, {"sift": figures}, top_k=100)  # no conditions: no table


@pytest.fixture(scope="module")
def hand_report(manifest, tmp_path_factory) -> Path:
    """A page from rankings made by hand over the manifest's photos, plus an id that is not
    one of them (as a running index may return), for two methods: 'hand' and 'reversed'."""
    photos = load_photos(manifest)
    ids = [p.image_id for p in photos]
    queries = queries_and_positives({p.image_id: p.group for p in photos})
    rankings = {q: ["elsewhere/other"] + [i for i in ids if i != q and group_of(i) != group_of(q)]
                + [i for i in ids if i != q and group_of(i) == group_of(q)] for q in queries}
    rankings["astronaut/original"] = ["astronaut/warped"]     # perfect
    rankings["coffee/original"] = ["rocket/original"]         # its positive is not ranked at all
    figures = {"map": 0.5, "precision_at_1": 0.5, "recall_at_10": 1.0, "latency_median_s": 0.1,
               "latency_p95_s": 0.2, "ingest_photos_per_s": 3.0, "queries": len(queries), "pr_curve": [0.5] * 21}
    results = {"hand": {**figures, "rankings": rankings},
               "reversed": {**figures, "rankings": {q: r[::-1] for q, r in rankings.items()}}}
    path = tmp_path_factory.mktemp("hand-report") / "hand.html"
    path.write_text(render(photos, results, top_k=100), encoding="utf-8")
    return path


def test_missed_positives_and_foreign_ids_in_the_page(hand_report):
    page = parse_report(hand_report.read_text(encoding="utf-8"))
    rows = {r.query: r for r in page.methods["hand"]}
    assert len(rows) == 8 and "astronaut/original" in rows
    assert rows["astronaut/original"].ap == 1.0
    perfect = rows["astronaut/original"].figures["first"]
    assert [(f.image_id, f.kind) for f in perfect] == [("astronaut/warped", "right")]
    coffee = rows["coffee/original"]
    assert coffee.ap == 0.0 and [f.caption for f in coffee.figures["first"]] == ["1 ✗"]
    assert [(f.image_id, f.caption) for f in coffee.figures["missed"]] == [("coffee/warped", "not in top 100")]
    # Others: the foreign id first (shown without a picture), the partner last, at rank 8.
    rocket = rows["rocket/warped"]
    first = rocket.figures["first"]
    assert first[0].image_id == "elsewhere/other" and first[0].thumb is None and first[0].kind == "wrong"
    assert all(f.thumb for f in first[1:]) and len(first) == SHOWN
    assert [(f.image_id, f.caption) for f in rocket.figures["missed"]] == [("rocket/original", "rank 8")]
    assert rocket.ap == pytest.approx(1 / 8)
    # Worst first: the page's initial order is by AP, ascending.
    assert [r.ap for r in page.methods["hand"]] == sorted(r.ap for r in page.methods["hand"])
    # Each method's rows carry the other's AP for the same query.
    reversed_aps = {r.query: r.ap for r in page.methods["reversed"]}
    assert reversed_aps["rocket/warped"] == 1.0   # the partner is first there
    assert all(r.other_aps == [reversed_aps[r.query]] for r in page.methods["hand"])
    assert page.headers["hand"] == ["query", "group", "ap", "ap-reversed", "missed"]


# --------------------------------------------------------------------------- through `delf eval`


def test_report_agrees_with_the_json(evaluated, manifest):
    report, figures = evaluated
    page = parse_report(report.read_text(encoding="utf-8"))
    assert list(page.summary) == list(figures) == ["sift"]
    for method, f in figures.items():
        for key, value in f.items():
            assert page.summary[method][key] == pytest.approx(value, abs=1e-12), (method, key)
        rows = page.methods[method]
        assert len(rows) == f["queries"] == 8
        assert np.mean([r.ap for r in rows]) == pytest.approx(f["map"], abs=1e-12)
        for row in rows:
            check_row(row)
    # The warped copies: the baseline ranks the partner first (as test_evaluate asserts).
    for rows in page.methods.values():
        for row in rows:
            if group_of(row.query) in PAIRS:
                assert row.ap == 1.0 and row.figures["first"][0].kind == "right", row


def check_row(row) -> None:
    """What a row shows adds up: marks by group, its AP from the ranks it shows."""
    first, missed = row.figures.get("first", []), row.figures.get("missed", [])
    for rank, f in enumerate(first, 1):
        right = group_of(f.image_id) == group_of(row.query)
        assert f.kind == ("right" if right else "wrong")
        assert f.caption == f"{rank} {'✓' if right else '✗'}"
    ranks = [rank for rank, f in enumerate(first, 1) if f.kind == "right"]
    for f in missed:
        assert group_of(f.image_id) == group_of(row.query)
        if f.caption != "not in top 100":
            rank = int(re.fullmatch(r"rank (\d+)", f.caption).group(1))
            assert rank > SHOWN
            ranks.append(rank)
    assert int(row.cells["missed"]) == len(missed)
    assert len(ranks) + sum(f.caption == "not in top 100" for f in missed) == 1  # one positive each
    assert row.ap == pytest.approx(ap_from_ranks(ranks, 1), abs=1e-12)


def test_report_is_self_contained_with_the_photos_as_thumbnails(evaluated, manifest):
    report, _ = evaluated
    page = parse_report(report.read_text(encoding="utf-8"))
    assert page.addresses and all(a.startswith("data:") for a in page.addresses), page.addresses
    assert page.css_urls() and all(u.startswith("data:") for u in page.css_urls())
    assert len(page.scripts) == 1 and "<link" not in report.read_text()
    plot = cv2.imdecode(np.frombuffer(base64.b64decode(page.images["pr-curves"].split(",", 1)[1]), np.uint8),
                        cv2.IMREAD_COLOR)
    assert plot is not None and plot.shape[:2] == (680, 900)

    thumbs = page.thumbnails()
    assert len(thumbs) == 8   # one per photo, shared by every row that shows it
    for rows in page.methods.values():
        for row in rows:
            [query] = row.figures["query"]
            assert query.image_id == row.query and query.thumb in thumbs
            thumb = cv2.imdecode(np.frombuffer(thumbs[query.thumb], np.uint8), cv2.IMREAD_COLOR)
            assert thumb is not None and max(thumb.shape[:2]) == 160
            photo = cv2.imread(str(manifest.parent / f"{row.query}.jpg"))
            small = cv2.resize(photo, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_AREA)
            assert np.abs(small.astype(int) - thumb.astype(int)).mean() < 8, row.query   # that photo
            assert all(f.thumb in thumbs for fs in row.figures.values() for f in fs)


# --------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser() -> str:
    """Chromium's path; skips (before the module's evaluation runs) where there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium installed (Debian: apt-get install chromium)")


def run_chromium(browser: str, page: Path, *args: str) -> tuple[str, list[str]]:
    """(stdout, the console lines) of headless Chromium loading `page`."""
    proc = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--enable-logging=stderr",
         "--v=0", "--hide-scrollbars", f"--user-data-dir={page.parent / 'chromium-profile'}", *args,
         page.as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


def test_report_renders_in_chromium_without_console_errors(browser, evaluated, tmp_path):
    report, _ = evaluated
    shot = tmp_path / "report.png"
    _, console = run_chromium(browser, report, f"--screenshot={shot}", "--window-size=1280,2000")
    assert console == []
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (2000, 1280)
    # The right results' green outlines and the thumbnails' photos are drawn.
    green = np.all(np.abs(img.astype(int) - (42, 154, 26)) < 30, axis=2)
    assert green.sum() > 500
    assert len(np.unique(img.reshape(-1, 3) // 32, axis=0)) > 50   # pictures, not only text

    broken = report.with_name("broken.html")   # the check does see a script error
    broken.write_text(report.read_text(encoding="utf-8").replace("</body>", "<script>noSuchFunction()</script></body>"),
                      encoding="utf-8")
    _, console = run_chromium(browser, broken, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console)


CLICKS = """<script>
var tables = document.querySelectorAll("table.queries");
tables[0].querySelector("th[data-key=ap] button").click();          // AP: now descending
tables[1].querySelector("th[data-key=query] button").click();       // query ids, ascending
tables[1].querySelector("th[data-key=query] button").click();       // and back: descending
</script></body>"""


def test_clicking_a_header_sorts_the_rows(browser, hand_report):
    report = hand_report
    clicked = report.with_name("clicked.html")
    clicked.write_text(report.read_text(encoding="utf-8").replace("</body>", CLICKS), encoding="utf-8")
    dom, console = run_chromium(browser, clicked, "--dump-dom")
    assert console == []
    before, after = parse_report(report.read_text(encoding="utf-8")), parse_report(dom)
    for method in before.methods:   # the same rows, reordered
        assert sorted(r.query for r in after.methods[method]) == sorted(r.query for r in before.methods[method])
    first, second = list(after.methods)
    aps = [r.ap for r in after.methods[first]]
    assert aps == sorted(aps, reverse=True) and aps != [r.ap for r in before.methods[first]]
    ids = [r.query for r in after.methods[second]]
    assert ids == sorted(ids, reverse=True)
    assert re.search(r'data-key="ap" aria-sort="descending"', dom)
