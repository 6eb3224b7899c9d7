"""Issue 21: the accuracy among real distractors asks the same question as the accuracy
without them.

landmarks-hard holds night photos of a place landmarks-dev also shows (the Gendarmenmarkt
dome). Counted as positives, they made a landmarks-dev query's task harder when the sets
were pooled (more, harder positives) and, in `bench_scale.py`'s baseline, absent positives
lowered the figure "without distractors" (0.934 against 0.946 on the same index). Both
measurements now treat them as junk (Oxford's rule): left out of the query's ranking and of
its positives, so the difference of the two figures is the distractors' doing.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Client:
    def __init__(self, rankings):
        self.rankings = rankings

    def search(self, image_id, top_k):
        return SimpleNamespace(matches=[SimpleNamespace(image_id=i) for i in self.rankings[image_id]][:top_k])


def test_bench_scale_other_set_photos_of_the_place_are_neither_positives_nor_errors():
    bench = load_script("bench_scale")
    inputs = SimpleNamespace(
        real={"dome/a": None, "dome/b": None, "tower/c": None, "tower/d": None},
        real_distractors={"hard:dome_night/n1": None, "hard:street/s1": None},
        groups={"dome/a": "dome", "dome/b": "dome", "tower/c": "tower", "tower/d": "tower",
                "hard:dome_night/n1": "dome", "hard:street/s1": "hard:street"},
        map_queries=["dome/a", "tower/c"])
    # The dome's night photo first is not an error; an unrelated street photo first is.
    client = Client({"dome/a": ["hard:dome_night/n1", "dome/b"],
                     "tower/c": ["hard:street/s1", "tower/d"]})
    out = bench.accuracy(client, inputs)
    assert out["map"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["precision_at_1"] == pytest.approx(0.5)
    # Without the distractors in the index the night photo is no missing positive.
    alone = Client({"dome/a": ["dome/b"], "tower/c": ["tower/d"]})
    assert bench.accuracy(alone, inputs)["map"] == pytest.approx(1.0)


def test_the_labs_pooled_sets_leave_the_other_sets_photos_of_the_place_out():
    lab = load_script("bench_accuracy")
    groups = {"dev/dome/a": "dev/dome", "dev/dome/b": "dev/dome", "hard/dome_night/n": "dev/dome",
              "hard/street/s": "hard/street", "hard/street/t": "hard/street"}
    rankings = {"dev/dome/a": ["hard/dome_night/n", "hard/street/s", "dev/dome/b"],
                "hard/street/s": ["dev/dome/a", "hard/street/t"]}
    pooled = lab.metrics(rankings, groups, {}, pooled_sets=True)["all"]
    # dev/dome/a: its one positive second once the junk is gone; hard/street/s: second.
    assert pooled["map"] == pytest.approx(0.5)
    assert pooled["p1"] == 0.0
    merged = lab.metrics(rankings, groups, {})["all"]  # the night photo a positive, as before
    assert merged["map"] == pytest.approx(((1.0 + 2 / 3) / 2 + 0.5) / 2)
