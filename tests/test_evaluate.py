"""`delf eval`: the metrics, the two baselines on a tiny manifest, and the system through it.

The tiny manifest is written at test time: three scikit-image sample photos
(mirrored, so they cannot collide with the unmirrored copies other tests index into
the shared session system) and a warped, cropped, brighter copy of each, one group
per pair.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from delf_tools import cli
from delf_tools import eval_command as ev
from delf_tools.eval_local import ExactVoter, LocalFeatures
from delf_tools.eval_metrics import RECALL_LEVELS, interpolated_pr, precision_at, recall_at
from delf_tools.eval_set import MethodRun
from photos import jpeg, sample_photo, warped_query
from report_html import parse_report

# Mirrored photos that no other test indexes as they are: the system tests share one index, and
# a mirror-symmetric scene (scikit-image's rocket) is rightly found as the unmirrored copy
# another test indexed (with 7 voting neighbours it outranked the warped partner).
PAIRS = ("astronaut", "retina", "immunohistochemistry")


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-landmarks")
    lines = ["path\tgroup\tnote"]
    for n, name in enumerate(PAIRS):
        rgb = np.ascontiguousarray(np.fliplr(sample_photo(name)))
        warped, _ = warped_query(rgb, seed=n)
        (root / name).mkdir()
        (root / name / "original.jpg").write_bytes(jpeg(rgb))
        (root / name / "warped.jpg").write_bytes(jpeg(warped))
        lines += [f"{name}/original.jpg\t{name}\t", f"{name}/warped.jpg\t{name}\tperspective, crop"]
    (root / "MANIFEST.tsv").write_text("\n".join(lines) + "\n")
    return root / "MANIFEST.tsv"


# --------------------------------------------------------------------------- metrics


def test_metrics_on_a_hand_made_ranking():
    positives = {"a", "b"}
    ranked = ["x", "a", "y", "z", "b"]  # hits at ranks 2 and 5
    assert precision_at(ranked, positives, 1) == 0.0
    assert precision_at(["a"] + ranked, positives, 1) == 1.0
    assert precision_at([], positives, 1) == 0.0
    assert recall_at(ranked, positives, 10) == 1.0
    assert recall_at(ranked, positives, 2) == 0.5
    assert recall_at(["x"] * 3 + ["a"] + ["y"] * 10 + ["b"], positives, 10) == 0.5

    levels = np.linspace(0, 1, 11)
    pr = interpolated_pr(ranked, positives, levels)
    # recall 0.5 reached at rank 2 (precision 1/2), recall 1 at rank 5 (precision 2/5)
    assert pr[0] == pytest.approx(0.5) and pr[5] == pytest.approx(0.5)
    assert pr[6] == pytest.approx(0.4) and pr[-1] == pytest.approx(0.4)
    assert np.all(np.diff(pr) <= 1e-12)  # interpolated precision never rises with recall
    assert np.allclose(interpolated_pr(["a", "b"], positives, levels), 1.0)
    half = interpolated_pr(["a", "x"], positives, levels)  # b never found
    assert np.allclose(half[:6], 1.0) and np.allclose(half[6:], 0.0)

    run = MethodRun({"q1": ranked, "q2": ["b", "a"]}, [0.1, 0.3], ingest_s=2.0, ingested=4)
    s = ev.summarise(run, {"q1": positives, "q2": positives}, 4)
    assert s["precision_at_1"] == 0.5 and s["recall_at_10"] == 1.0 and s["queries"] == 2
    assert s["map"] == pytest.approx(((1 / 2 + 2 / 5) / 2 + 1.0) / 2)
    assert s["ingest_photos_per_s"] == 2.0 and s["latency_median_s"] == pytest.approx(0.2)
    assert len(s["pr_curve"]) == len(RECALL_LEVELS)


def test_conditions_from_the_manifest_or_a_file(tmp_path):
    from delf_tools.eval_set import EvalError, load_photos

    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "c.jpg").write_bytes(b"x")
    (tmp_path / "d.jpg").write_bytes(b"x")
    (tmp_path / "MANIFEST.tsv").write_text(
        "path\tgroup\tnote\n"
        "a.jpg\tg1\tcond=day-night; night query\n"           # landmarks-hard's way
        "b.jpg\tg1\tcond=illumination (+backlight)\n"
        "c.jpg\tg2\tsome note\n"                             # none: the conditions file decides
        "d.jpg\tg2\t\n")
    (tmp_path / "conditions.tsv").write_text("# comment\ngroup\tcondition\ng2\tobject\n")
    by_id = {p.image_id: p.condition for p in load_photos(tmp_path / "MANIFEST.tsv")}
    assert by_id == {"a": "day-night", "b": "illumination", "c": "", "d": ""}
    by_id = {p.image_id: p.condition for p in
             load_photos(tmp_path / "MANIFEST.tsv", conditions=tmp_path / "conditions.tsv")}
    assert by_id == {"a": "day-night", "b": "illumination", "c": "object", "d": "object"}
    (tmp_path / "bad.tsv").write_text("group\twhat\ng2\tobject\n")
    with pytest.raises(EvalError, match="'group' and 'condition'"):
        load_photos(tmp_path / "MANIFEST.tsv", conditions=tmp_path / "bad.tsv")

    run = MethodRun({"a": ["b"], "b": ["c", "a"], "c": ["d"], "d": ["a", "b"]}, [0.1], 1.0, 4)
    queries = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}
    s = ev.summarise(run, queries, 4, {"a": "day-night", "b": "day-night", "c": "object", "d": "object"})
    assert s["by_condition"]["day-night"] == {"map": 0.75, "precision_at_1": 0.5, "recall_at_10": 1.0,
                                              "queries": 2}
    assert s["by_condition"]["object"]["map"] == 0.5 and s["by_condition"]["object"]["queries"] == 2
    table = ev.format_conditions({"delf": s})
    assert "day-night" in table and "0.750/0.500" in table


def test_manifest_errors(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "missing.tsv"), "--methods", "sift"]) == 2
    assert "no manifest" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("file\tlabel\na.jpg\tx\n")
    assert cli.main(["eval", str(bad), "--methods", "sift"]) == 2
    assert "'path' and 'group'" in capsys.readouterr().err


def test_unreachable_gateway_says_how_to_start_it(tiny_manifest, capsys):
    from conftest import free_port

    code = cli.main(["--gateway", f"127.0.0.1:{free_port()}", "eval", str(tiny_manifest), "--methods", "delf"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot reach the gateway" in err and "delf up" in err


# --------------------------------------------------------------------------- baselines


def test_baselines_rank_the_partner_first(tiny_manifest, tmp_path, capsys):
    # One missing photo in the manifest: reported and skipped.
    manifest = tiny_manifest.parent / "MANIFEST-with-missing.tsv"
    manifest.write_text(tiny_manifest.read_text() + "gone/missing.jpg\tgone\t\n")
    out_json, out_png = tmp_path / "eval.json", tmp_path / "plots" / "pr.png"
    code = cli.main(["eval", str(manifest), "--methods", "global-gem,sift",
                     "--json", str(out_json), "--plot", str(out_png)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "gone/missing.jpg" in captured.err and "not found" in captured.err
    assert "global-gem" in captured.out and "sift" in captured.out and "mAP" in captured.out

    figures = json.loads(out_json.read_text())
    assert set(figures) == {"global-gem", "sift"}
    for name, f in figures.items():
        assert set(f) == {"map", "precision_at_1", "recall_at_10", "latency_median_s", "latency_p95_s",
                          "ingest_photos_per_s", "queries"}
        assert f["queries"] == 6
        assert f["precision_at_1"] == 1.0, (name, f)
        assert f["map"] == 1.0 and f["recall_at_10"] == 1.0
        assert f["ingest_photos_per_s"] > 0 and f["latency_p95_s"] >= f["latency_median_s"] > 0
    img = cv2.imread(str(out_png))
    assert img is not None and img.shape[2] == 3 and img.shape[0] > 100
    assert (img < 128).any()  # something is drawn


def test_sift_voting_matches_the_indexer_rule():
    """Ratio test against the 11th neighbour, one vote per query descriptor and image."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=(40, 8)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    feats = {
        "q": LocalFeatures(np.zeros((4, 2), np.float32), d[:4], (10, 10)),
        # 'twin' holds each query descriptor (slightly perturbed) twice: still one vote each
        "twin": LocalFeatures(np.arange(16, dtype=np.float32).reshape(8, 2),
                                 np.repeat(d[:4], 2, 0) + 1e-3, (10, 10)),
        "other": LocalFeatures(np.zeros((30, 2), np.float32), d[10:40], (10, 10)),
    }
    voter = ExactVoter(feats)
    cands = voter.search(d[:4], shortlist=5, neighbours=10, ratio=0.9, exclude="q")
    assert cands[0]["image_id"] == "twin" and cands[0]["votes"] == 4
    assert list(cands[0]["query_idx"]) == [0, 1, 2, 3]
    assert all(c["image_id"] != "q" for c in cands)


# --------------------------------------------------------------------------- through the system


@pytest.mark.slow
def test_delf_method_through_the_running_system(system, tiny_manifest, tmp_path, capsys):
    out_json, out_html = tmp_path / "eval.json", tmp_path / "report.html"
    code = cli.main(["--gateway", system.address, "eval", str(tiny_manifest), "--methods", "delf",
                     "--json", str(out_json), "--report", str(out_html)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    f = json.loads(out_json.read_text())["delf"]
    assert f["queries"] == 6
    assert f["precision_at_1"] == 1.0, captured
    assert f["ingest_photos_per_s"] > 0 and f["latency_median_s"] > 0
    # The report (tests/test_eval_report.py checks it in depth): the same APs; results that
    # are other photos of the shared index (not the manifest's) are shown by id, no picture.
    page = parse_report(out_html.read_text(encoding="utf-8"))
    rows = page.methods["delf"]
    assert len(rows) == 6 and np.mean([r.ap for r in rows]) == pytest.approx(f["map"], abs=1e-12)
    ours = {f"{name}/{kind}" for name in PAIRS for kind in ("original", "warped")}
    for row in rows:
        assert row.figures["first"][0].kind == "right"
        for fig in row.figures["first"]:
            assert (fig.thumb is not None) == (fig.image_id in ours), fig
