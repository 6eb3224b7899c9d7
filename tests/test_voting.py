"""The DELF voting (delf_indexer.voting.vote) on hand-made neighbour lists: who votes,
how candidates are ranked and cut, and which correspondences each candidate carries."""
import numpy as np
import pytest

from delf_indexer.voting import KEEP_CHUNK, Candidate, vote


def ranked(cands: list[Candidate]) -> list[tuple[str, int]]:
    return [(c.image_id, c.votes) for c in cands]


def test_a_query_descriptor_votes_once_per_photo_and_votes_add_up_over_descriptors():
    # neighbours=3 -> 4 fetched per row; the 4th (0.9) sets the bar: ratio 1.0 -> d < 0.9
    dists = [[0.1, 0.2, 0.3, 0.9],
             [0.1, 0.2, 0.3, 0.9],
             [0.5, 0.6, 0.7, 0.9]]
    images = [["a", "a", "b", "c"],
              ["a", "b", "b", "c"],
              ["b", "c", "a", "a"]]
    out = vote(dists, images, neighbours=3, ratio=1.0, shortlist=10)
    # a: rows 0, 1, 2; b: rows 0, 1, 2; c: row 2 only (its row-0/1 hits are the bar)
    assert ranked(out) == [("a", 3), ("b", 3), ("c", 1)]
    a, b = out[0], out[1]
    assert a.distance == pytest.approx(0.1 + 0.1 + 0.7)
    assert b.distance == pytest.approx(0.3 + 0.2 + 0.5)


def test_ratio_test_and_the_last_fetched_neighbour_never_vote():
    dists = [[0.5, 0.8, 0.95, 1.0]]
    images = [["a", "b", "c", "d"]]
    # bar = 0.9 * 1.0: a (0.5) and b (0.8) pass, c (0.95) fails, d is the reference
    assert ranked(vote(dists, images, 3, 0.9, None)) == [("a", 1), ("b", 1)]
    # a stricter ratio drops b too; d never votes, even at ratio > 1
    assert ranked(vote(dists, images, 3, 0.6, None)) == [("a", 1)]
    assert {c.image_id for c in vote(dists, images, 3, 2.0, None)} == {"a", "b", "c"}
    # the bar is strict: a distance equal to ratio x last does not vote
    assert ranked(vote([[0.9, 1.0]], [["a", "b"]], 1, 0.9, None)) == []


def test_rows_shorter_than_neighbours_plus_one_all_vote():
    # a tiny index: fewer than neighbours + 1 results -> no ratio test, every hit votes
    out = vote([[0.5, 3.0]], [["a", "b"]], neighbours=5, ratio=0.1, shortlist=None)
    assert ranked(out) == [("a", 1), ("b", 1)]


def test_empty_rows_and_empty_input():
    assert vote([], [], 3, 0.9, 5) == []
    out = vote([[], [0.1, 0.2]], [[], ["a", "b"]], 1, 0.9, 5)
    assert ranked(out) == [("a", 1)]
    assert out[0].query_idx.tolist() == [1]


def test_ties_break_by_summed_distance_then_image_id():
    dists = [[0.3, 0.1, 9.0], [0.1, 0.2, 9.0]]
    images = [["x", "y", "z"], ["x", "y", "z"]]
    # neighbours=2, ratio 1: x and y both get 2 votes; y's sum 0.3 < x's 0.4
    assert [c.image_id for c in vote(dists, images, 2, 1.0, None)] == ["y", "x"]
    # equal votes and sums: the smaller image id first, whatever the order of arrival
    dists = [[0.2, 0.2, 9.0]]
    assert [c.image_id for c in vote(dists, [["n", "m", "z"]], 2, 1.0, None)] == ["m", "n"]
    # more votes beat a smaller summed distance
    dists = [[0.1, 0.5, 9.0], [0.6, 0.9, 9.0]]
    images = [["p", "q", "z"], ["q", "r", "z"]]
    assert ranked(vote(dists, images, 2, 1.0, None))[0] == ("q", 2)


def test_shortlist_keeps_the_best_candidates():
    dists = [[0.1, 0.2, 0.3, 9.0]] * 3 + [[0.1, 0.2, 0.3, 9.0]] * 2
    images = [["a", "b", "c", "z"]] * 3 + [["a", "b", "d", "z"]] * 2
    everything = vote(dists, images, 3, 1.0, None)
    assert ranked(everything) == [("a", 5), ("b", 5), ("c", 3), ("d", 2)]
    assert ranked(vote(dists, images, 3, 1.0, 2)) == [("a", 5), ("b", 5)]
    assert ranked(vote(dists, images, 3, 1.0, 10)) == ranked(everything)
    assert vote(dists, images, 3, 1.0, 0) == []


def test_correspondences_are_the_nearest_fetched_neighbour_voting_or_not():
    dists = [[0.1, 0.2, 0.3, 0.4],
             [0.35, 0.36, 0.38, 0.4],
             [0.1, 0.2, 0.3, 0.4]]
    images = [["b", "a", "a", "c"],
              ["a", "b", "c", "a"],
              ["c", "c", "d", "b"]]
    # ratio 0.8 -> bar 0.32: row 1 votes for nobody, but its hits still correspond
    out = {c.image_id: c for c in vote(dists, images, 3, 0.8, None)}
    assert sorted(out) == ["a", "b", "c", "d"]
    assert out["a"].votes == 1 and out["a"].query_idx.tolist() == [0, 1]
    assert out["a"].neighbour.tolist() == [1, 0]  # row 0: the nearer of its two 'a' hits
    assert out["b"].query_idx.tolist() == [0, 1, 2] and out["b"].neighbour.tolist() == [0, 1, 3]
    assert out["c"].query_idx.tolist() == [0, 1, 2] and out["c"].neighbour.tolist() == [3, 2, 0]
    assert out["a"].query_idx.dtype == np.int64 and out["a"].neighbour.dtype == np.int64
    # voting_only: only neighbours that passed the ratio test correspond
    only = {c.image_id: c for c in vote(dists, images, 3, 0.8, None, voting_only=True)}
    assert only["a"].query_idx.tolist() == [0] and only["a"].neighbour.tolist() == [1]
    assert only["b"].query_idx.tolist() == [0] and only["b"].neighbour.tolist() == [0]
    assert only["c"].query_idx.tolist() == [2] and only["c"].neighbour.tolist() == [0]
    assert [only[i].votes for i in "abcd"] == [out[i].votes for i in "abcd"]


def test_numpy_rows_vote_as_lists_do():
    r = np.random.default_rng(3)
    dists = np.sort(r.uniform(0.2, 1.0, (50, 6)).astype(np.float32), axis=1)
    names = np.array([f"im{i}" for i in range(8)], dtype=object)
    images = names[r.integers(0, 8, (50, 6))]
    a = vote(dists, images, 5, 0.9, None)
    b = vote(dists.tolist(), images.tolist(), 5, 0.9, None)
    assert ranked(a) == ranked(b)
    assert all(np.array_equal(x.query_idx, y.query_idx) and np.array_equal(x.neighbour, y.neighbour)
               for x, y in zip(a, b))


def test_votes_match_a_direct_count_on_random_neighbour_lists():
    r = np.random.default_rng(7)
    nq, neighbours, ratio = 200, 10, 0.9
    dists = np.sort(r.uniform(0.1, 1.0, (nq, neighbours + 1)), axis=1)
    images = r.integers(0, 30, (nq, neighbours + 1))
    expected: dict[int, int] = {}
    for qi in range(nq):
        voters = {int(images[qi, j]) for j in range(neighbours) if dists[qi, j] < ratio * dists[qi, -1]}
        for img in voters:
            expected[img] = expected.get(img, 0) + 1
    out = vote(dists, images, neighbours, ratio, None)
    assert {c.image_id: c.votes for c in out} == expected
    assert [c.votes for c in out] == sorted(expected.values(), reverse=True)
    for c in out:  # every correspondence points at a hit in that image, the nearest one
        for qi, j in zip(c.query_idx, c.neighbour):
            assert images[qi, j] == c.image_id
            assert j == np.flatnonzero(images[qi] == c.image_id)[0]


def test_keep_filters_after_ranking_in_chunks_until_the_shortlist_is_full():
    n = KEEP_CHUNK * 2 + 10
    # image i gets n - i votes: a strict ranking i0, i1, ...
    names = [f"i{i:05d}" for i in range(n)]
    dists = [[0.1] * (i + 1) for i in range(n)]
    images = [names[:i + 1] for i in range(n)]
    dists, images = dists[::-1], images[::-1]
    seen: list[list[str]] = []

    def odd(chunk):
        seen.append(list(chunk))
        return [img for img in chunk if int(img[1:]) % 2]

    out = vote(dists, images, n, 1.0, 3, keep=odd)
    assert [c.image_id for c in out] == ["i00001", "i00003", "i00005"]
    assert seen == [names[:KEEP_CHUNK]]  # one chunk was enough
    seen.clear()
    out = vote(dists, images, n, 1.0, KEEP_CHUNK, keep=odd)
    assert [c.image_id for c in out] == names[1:2 * KEEP_CHUNK:2]
    assert seen == [names[:KEEP_CHUNK], names[KEEP_CHUNK:2 * KEEP_CHUNK]]
    seen.clear()
    out = vote(dists, images, n, 1.0, None, keep=odd)
    assert len(out) == n // 2 and len(seen) == 3
