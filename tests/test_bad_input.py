"""Bad input at the gateway: every case gets the right status and a readable
message, the server keeps serving, and nothing already indexed changes."""
from __future__ import annotations

import struct
import zlib

import grpc
import numpy as np
import pytest

from delf_common.client import DelfClient
from photos import jpeg, png, sample_photo

pytestmark = pytest.mark.slow


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def baseline(client):
    """One photo indexed, so that 'nothing changed' has something to lose; removed after
    the module, since the system is shared (an exact duplicate ties with `coffee` there)."""
    client.add_image("bad-input-anchor", jpeg(sample_photo("coffee")))
    yield client
    client.delete_image("bad-input-anchor")


def counts(client) -> tuple[int, int]:
    s = client.stats()
    return s.images, s.descriptors


def big_jpeg_bytes(n: int) -> bytes:
    head = jpeg(sample_photo("chelsea"))
    return head + b"\0" * (n - len(head))


PHOTO_CASES = {
    "empty": (b"", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "undecodable": (b"\x00\x01garbage" * 100, grpc.StatusCode.INVALID_ARGUMENT, "not an image"),
    "wrong magic": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, grpc.StatusCode.INVALID_ARGUMENT, ""),
    "truncated jpeg": (None, grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "too many bytes": (None, grpc.StatusCode.RESOURCE_EXHAUSTED, "DELF_MAX_IMAGE_BYTES"),
    "over the message limit": (None, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    "too many pixels": (png_claiming(100_000, 100_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "DELF_MAX_IMAGE_PIXELS"),
    "too small": (None, grpc.StatusCode.INVALID_ARGUMENT, "at least"),
}


def photo_for(case: str) -> bytes:
    data = PHOTO_CASES[case][0]
    if data is not None:
        return data
    if case == "truncated jpeg":
        return jpeg(sample_photo("rocket"))[:6000]
    if case == "too many bytes":
        return big_jpeg_bytes(9 * 1024 * 1024)  # the test system allows 8 MiB
    if case == "over the message limit":
        return big_jpeg_bytes(65 * 1024 * 1024)  # gRPC's own message limit is 64 MiB
    if case == "too small":
        return png(np.full((8, 8, 3), 128, np.uint8))
    raise KeyError(case)


@pytest.mark.parametrize("rpc", ["search", "add"])
@pytest.mark.parametrize("case", list(PHOTO_CASES))
def test_bad_photo_is_refused_and_nothing_changes(baseline, system, case, rpc):
    # A client that sends anything, so that the server's own limits are what is tested.
    channel = grpc.insecure_channel(system.address, options=[("grpc.max_send_message_length", 256 << 20)])
    client = DelfClient(channel=channel, timeout=60)
    before = counts(client)
    data = photo_for(case)
    with pytest.raises(grpc.RpcError) as err:
        if rpc == "search":
            client.search(data)
        else:
            client.add_image(f"bad-{case}", data)
    code, words = PHOTO_CASES[case][1], PHOTO_CASES[case][2]
    assert err.value.code() == code, err.value.details()
    assert words.lower() in (err.value.details() or "").lower()
    assert counts(client) == before  # still serving, nothing lost or added
    assert client.get_image("bad-input-anchor").num_features > 0


@pytest.mark.parametrize("call,code", [
    (lambda c: c.get_image("never-indexed"), grpc.StatusCode.NOT_FOUND),
    (lambda c: c.delete_image("never-indexed"), grpc.StatusCode.NOT_FOUND),
    (lambda c: c.search(image_id="never-indexed"), grpc.StatusCode.NOT_FOUND),
    (lambda c: c.get_job("0123456789abcdef0123456789abcdef"), grpc.StatusCode.NOT_FOUND),
    (lambda c: c.add_image("", jpeg(sample_photo("chelsea"))), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.add_image("x" * 513, jpeg(sample_photo("chelsea"))), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.add_image("tab\tid", jpeg(sample_photo("chelsea"))), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.search(jpeg(sample_photo("chelsea")), top_k=101), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.search(jpeg(sample_photo("chelsea")), box=(500, 500, 900, 900)), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.search(jpeg(sample_photo("chelsea")), box=(50, 50, 10, 10)), grpc.StatusCode.INVALID_ARGUMENT),
], ids=["get-unknown", "delete-unknown", "search-unknown-id", "job-unknown", "empty-id", "long-id",
        "control-char-id", "top-k-too-large", "box-outside", "box-inverted"])
def test_bad_request_gets_the_right_status(baseline, system, call, code):
    client = system.client(timeout=60)
    before = counts(client)
    with pytest.raises(grpc.RpcError) as err:
        call(client)
    assert err.value.code() == code, err.value.details()
    assert err.value.details()
    assert counts(client) == before
