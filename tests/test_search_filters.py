"""Metadata filters on Search (SearchRequest.filter), through the real gateway, Celery
workers on Redis and Milvus Lite: only photos whose metadata holds every pair are
candidates; a filter nothing matches finds nothing; malformed filters are refused."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import grpc
import pytest

from photos import jpeg, sample_photo, warped_query


@pytest.fixture(scope="module")
def copies(client):
    """Two copies of one photo under different metadata (a tag unique to this run) and an
    unrelated photo carrying copy A's metadata."""
    tag = uuid.uuid4().hex[:10]
    photo = jpeg(sample_photo("astronaut"))
    ids = {name: f"filters-{tag}-{name}" for name in ("a", "b", "other")}
    client.add_image(ids["a"], photo, {"run": tag, "copy": "a", "city": "Zürich \"old\" town"})
    client.add_image(ids["b"], photo, {"run": tag, "copy": "b"})
    client.add_image(ids["other"], jpeg(sample_photo("coffee")), {"run": tag, "copy": "a"})
    query, _ = warped_query(sample_photo("astronaut"), seed=1)
    yield tag, ids, jpeg(query)
    for image_id in ids.values():  # the system is shared: leave no copies for other tests' rankings
        client.delete_image(image_id)


def found(response) -> list[str]:
    return [m.image_id for m in response.matches]


def test_without_filter_both_copies_match(client, copies):
    _, ids, query = copies
    ranked = found(client.search(query, top_k=20))
    assert ids["a"] in ranked and ids["b"] in ranked


def test_filter_keeps_only_the_matching_copy(client, copies):
    tag, ids, query = copies
    r = client.search(query, top_k=20, filter={"run": tag, "copy": "b"})
    assert found(r) == [ids["b"]]
    assert r.matches[0].verified and dict(r.matches[0].metadata) == {"run": tag, "copy": "b"}
    # every pair must hold: the unrelated photo has copy=a but no city
    r = client.search(query, top_k=20, filter={"run": tag, "copy": "a", "city": "Zürich \"old\" town"})
    assert found(r) == [ids["a"]]
    # by indexed id: the query photo itself stays out, the filter still applies
    r = client.search(image_id=ids["a"], top_k=20, filter={"run": tag})
    assert ids["b"] in found(r) and ids["a"] not in found(r)
    assert set(found(r)) <= {ids["b"], ids["other"]}


def test_filter_matching_nothing_finds_nothing(client, copies):
    tag, ids, query = copies
    for flt in ({"run": tag, "copy": "c"}, {"no-such-key": "x"}, {"run": tag.upper()}, {"copy": "a", "run": ""}):
        r = client.search(query, top_k=10, filter=flt)
        assert list(r.matches) == [] and r.query_features > 0, flt


@pytest.mark.parametrize("flt, message", [
    ({"": "x"}, "filter key"),
    ({"has space": "x"}, "filter key"),
    ({'quo"te': "x"}, "filter key"),
    ({"k" * 129: "x"}, "filter key"),
    ({"k": "line\nbreak"}, "control characters"),
    ({"k": "v" * 1025}, "1025 bytes"),
    ({f"k{i}": "v" for i in range(17)}, "17 pairs"),
])
def test_bad_filters_are_refused(client, copies, flt, message):
    _, ids, query = copies
    with pytest.raises(grpc.RpcError) as err:
        client.search(query, top_k=5, filter=flt)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # by id too, before any work
        client.search(image_id=ids["a"], top_k=5, filter=flt)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_filter(system, copies):
    tag, ids, _ = copies
    env = {**os.environ, "DELF_GATEWAY": system.address}
    run = subprocess.run([sys.executable, "-m", "delf_tools.cli", "search", "--id", ids["a"],
                          "--filter", f"run={tag}", "--filter", "copy=b"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert ids["b"] in run.stdout and ids["other"] not in run.stdout
    bad = subprocess.run([sys.executable, "-m", "delf_tools.cli", "search", "--id", ids["a"],
                          "--filter", "novalue"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "KEY=VALUE" in bad.stderr
