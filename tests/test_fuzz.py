"""Hostile input, generated with hypothesis.

* In process, many examples: `delf_common.images.probe_image` (the gateway's header
  check) and `decode_image` (the extractor's) on random bytes, real JPEG/PNG/GIF/BMP/
  WebP/TIFF photos truncated anywhere or with bytes overwritten, headers claiming huge or
  zero dimensions and wrong magic numbers: each returns a sane answer or raises
  ImageRejected with INVALID_ARGUMENT or RESOURCE_EXHAUSTED and a message, nothing else.
* Against the running system (conftest's `system`): the same kinds of photos sent to
  Search and AddImage, and malformed requests (odd ids, NaN/inf/negative/inverted boxes,
  huge top_k, huge metadata, filter maps, unknown jobs). Every call ends with OK or an
  expected status and a message, never UNKNOWN or INTERNAL; the server still answers;
  refused calls change no count; the gateway's memory stays bounded.

Examples are derandomized (the same every run) so that CI is reproducible.
"""
from __future__ import annotations

import collections
import io
import json
import math
import struct
import zlib

import grpc
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from delf_common import config
from delf_common.images import ACCEPTED_FORMATS, ImageLimits, ImageRejected, decode_image, probe_image
from delf_common.proto.delf.v1 import delf_pb2
from photos import sample_photo

REFUSALS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
# PIL warns about the corrupt metadata (EXIF, TIFF tags) of damaged photos: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")


# --------------------------------------------------------------------------- photo bytes


def _encode(rgb: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **options)
    return buf.getvalue()


def _small_photo() -> np.ndarray:
    """A real photo, small enough that the extractor answers quickly (96 x 128)."""
    rgb = sample_photo("coffee")
    return np.ascontiguousarray(rgb[::4, ::4][:96, :128])


_PHOTO = _small_photo()
REAL = {
    "jpeg": _encode(_PHOTO, "JPEG", quality=85),
    "png": _encode(_PHOTO, "PNG"),
    "gif": _encode(_PHOTO, "GIF"),
    "bmp": _encode(_PHOTO, "BMP"),
    "webp": _encode(_PHOTO, "WEBP", quality=80),
    "tiff": _encode(_PHOTO, "TIFF", compression="tiff_lzw"),
}
MAGICS = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBP", b"II*\0", b"MM\0*",
          b"%!PS-Adobe-3.0 EPSF-3.0\n", b"8BPS", b"\0\0\1\0", b"P6\n", b"\x0a\x05\x01\x08"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 512))
            + _chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """The real JPEG with its frame header (SOF0/SOF2) saying width x height."""
    data = bytearray(REAL["jpeg"])
    i = 2
    while i + 9 < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no frame header in the sample JPEG")


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(REAL["gif"])
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    at = data.find(b"\x2c", 13 + 3 * 256)  # the first image descriptor, after the colour table
    if at > 0:
        data[at + 5:at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(REAL["bmp"])
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _animated_webp() -> bytes:
    frames = [Image.fromarray(_PHOTO), Image.fromarray(np.ascontiguousarray(_PHOTO[::-1]))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], quality=50)
    return buf.getvalue()


_WEBP_ANIMATED = _animated_webp()


def webp_claiming(width: int, height: int) -> bytes:
    """An animated WebP (VP8X, ANIM, ANMF) whose canvas is width x height (frames: the photo)."""
    data = bytearray(_WEBP_ANIMATED)
    at = data.find(b"VP8X")
    data[at + 12:at + 15] = struct.pack("<I", max(width, 1) - 1)[:3]
    data[at + 15:at + 18] = struct.pack("<I", max(height, 1) - 1)[:3]
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    """The real TIFF with its ImageWidth/ImageLength tags rewritten."""
    data = bytearray(REAL["tiff"])
    ifd = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[ifd:ifd + 2])[0]
    for n in range(count):
        at = ifd + 2 + 12 * n
        tag, kind = struct.unpack("<HH", data[at:at + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            if kind == 3:  # SHORT
                data[at + 8:at + 12] = struct.pack("<HH", value & 0xFFFF, 0)
            else:
                data[at + 2:at + 4] = struct.pack("<H", 4)  # LONG
                data[at + 8:at + 12] = struct.pack("<I", value)
    return bytes(data)


CLAIMING = {"png": png_claiming, "jpeg": jpeg_claiming, "gif": gif_claiming, "bmp": bmp_claiming,
            "webp": webp_claiming, "tiff": tiff_claiming}
_LIMITS = {"png": 2**31 - 1, "jpeg": 65535, "gif": 65535, "bmp": 2**31 - 1, "webp": 2**24, "tiff": 2**32 - 1}


@st.composite
def truncated(draw) -> bytes:
    data = REAL[draw(st.sampled_from(sorted(REAL)))]
    return data[:draw(st.integers(0, len(data) - 1))]


@st.composite
def flipped(draw) -> bytes:
    data = bytearray(REAL[draw(st.sampled_from(sorted(REAL)))])
    for _ in range(draw(st.integers(1, 12))):
        # Mostly the header, where a flipped byte changes the most.
        at = draw(st.one_of(st.integers(0, min(300, len(data) - 1)), st.integers(0, len(data) - 1)))
        data[at] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def claiming(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(CLAIMING)))
    size = st.one_of(st.sampled_from([0, 1, 31, 32, 33, 65535, 100_000, _LIMITS[fmt]]),
                     st.integers(0, _LIMITS[fmt]))
    w, h = draw(size), draw(size)
    if fmt == "bmp" and draw(st.booleans()):
        h = -min(h, 2**31 - 1)  # top-down bitmap
    return CLAIMING[fmt](min(w, _LIMITS[fmt]), min(h, _LIMITS[fmt]) if h >= 0 else h)


@st.composite
def wrong_magic(draw) -> bytes:
    data = REAL[draw(st.sampled_from(sorted(REAL)))]
    magic = draw(st.sampled_from(MAGICS))
    return magic + data[len(magic):] if draw(st.booleans()) else magic + draw(st.binary(max_size=200))


photo_bytes = st.one_of(st.binary(max_size=2048), truncated(), flipped(), claiming(), wrong_magic())


def check_probe(data: bytes) -> None:
    try:
        width, height, fmt = probe_image(data, ImageLimits.from_env())
    except ImageRejected as exc:
        assert exc.code in REFUSALS and exc.message, (exc.code, exc.message)
        return
    assert fmt in (*ACCEPTED_FORMATS, "MPO")
    assert width * height <= config.get("DELF_MAX_IMAGE_PIXELS")
    assert min(width, height) >= config.get("DELF_MIN_IMAGE_SIDE")


def check_decode(data: bytes) -> None:
    try:
        rgb = decode_image(data, ImageLimits.from_env())
    except ImageRejected as exc:
        assert exc.code in REFUSALS and exc.message, (exc.code, exc.message)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[0] * rgb.shape[1] <= config.get("DELF_MAX_IMAGE_PIXELS")
    assert min(rgb.shape[:2]) >= config.get("DELF_MIN_IMAGE_SIDE")


def test_the_real_photos_are_accepted():
    for fmt, data in REAL.items():
        assert decode_image(data, ImageLimits.from_env()).shape == (*_PHOTO.shape[:2], 3), fmt


@pytest.mark.parametrize("fmt", sorted(CLAIMING))
def test_headers_claiming_too_many_pixels_are_refused_from_the_header(fmt):
    with pytest.raises(ImageRejected) as err:
        probe_image(CLAIMING[fmt](60_000, 60_000), ImageLimits.from_env())
    assert err.value.code in REFUSALS
    if fmt in ("png", "jpeg", "bmp", "tiff", "webp"):
        assert err.value.code == "RESOURCE_EXHAUSTED" and "DELF_MAX_IMAGE_PIXELS" in err.value.message


@pytest.mark.parametrize("data", [
    b"P6\n64 64\n255\n" + b"\x80" * (64 * 64 * 3),            # PPM: a format we do not take
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n",  # EPS: would run Ghostscript
], ids=["ppm", "eps"])
def test_formats_outside_the_list_are_refused(data):
    with pytest.raises(ImageRejected) as err:
        probe_image(data, ImageLimits.from_env())
    assert err.value.code == "INVALID_ARGUMENT" and "supported format" in err.value.message


@settings(max_examples=3000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(photo_bytes)
@example(b"")
@example(png_claiming(0, 0))
@example(png_claiming(2**31 - 1, 2**31 - 1))
def test_probe_answers_every_input(data):
    check_probe(data)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(photo_bytes)
def test_decode_answers_every_input(data):
    check_decode(data)


# --------------------------------------------------------------------------- the running system

EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.NOT_FOUND}
ANCHOR = "fuzz-anchor"


def outcome(call) -> tuple[grpc.StatusCode, object]:
    """(status, reply or details) of a call; fails on a status no caller should ever see."""
    try:
        reply = call()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        assert code in EXPECTED, f"{code.name}: {details}"
        assert details, f"{code.name} without a message"
        return code, details
    return grpc.StatusCode.OK, reply


def counts(stub) -> tuple[int, int]:
    s = stub.GetStats(delf_pb2.GetStatsRequest(), timeout=60)
    return s.images, s.descriptors


class Fuzzed:
    """The system, what the fuzz added (to check the counts and clean up), and the gateway."""

    def __init__(self, system):
        self.system = system
        self.client = system.client(timeout=120)
        self.stub = self.client.stub
        self.added: dict[str, int] = {}
        self.serial = 0
        self.seen: collections.Counter = collections.Counter()  # (call kind, status) -> calls
        info = json.loads(system.ready_file.read_text())
        self.gateway = psutil.Process(info["children"]["gateway"])

    def next_id(self) -> str:
        self.serial += 1
        return f"fuzz-{self.serial}"


@pytest.fixture(scope="module")
def fuzzed(system):
    f = Fuzzed(system)
    f.stub.AddImage(delf_pb2.AddImageRequest(image_id=ANCHOR, image=REAL["jpeg"], metadata={"kind": "anchor"}),
                    timeout=120)
    f.rss_before = f.gateway.memory_info().rss
    yield f
    for image_id in [ANCHOR, *f.added]:
        try:
            f.stub.DeleteImage(delf_pb2.DeleteImageRequest(image_id=image_id), timeout=60)
        except grpc.RpcError:
            pass
    f.client.close()


SYSTEM_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.mark.slow
@SYSTEM_SETTINGS
@given(data=photo_bytes)
def test_search_with_any_photo_bytes(fuzzed, data):
    before = counts(fuzzed.stub)
    code, _ = outcome(lambda: fuzzed.stub.Search(delf_pb2.SearchRequest(image=data, top_k=3), timeout=120))
    fuzzed.seen["search photo", code.name] += 1
    assert counts(fuzzed.stub) == before


@pytest.mark.slow
@SYSTEM_SETTINGS
@given(data=photo_bytes)
def test_add_image_with_any_photo_bytes(fuzzed, data):
    before = counts(fuzzed.stub)
    image_id = fuzzed.next_id()
    code, reply = outcome(lambda: fuzzed.stub.AddImage(
        delf_pb2.AddImageRequest(image_id=image_id, image=data), timeout=120))
    after = counts(fuzzed.stub)
    fuzzed.seen["add photo", code.name] += 1
    if code == grpc.StatusCode.OK:  # a damaged photo that still decodes is a photo
        fuzzed.added[image_id] = reply.num_features
        assert after == (before[0] + 1, before[1] + reply.num_features)
    else:
        assert after == before


ids = st.one_of(st.text(max_size=300), st.text(st.characters(max_codepoint=0x7f), max_size=600),
                st.sampled_from(["", " ", "\x00", "a\nb", "../../etc/passwd", '" or 1=1', "x" * 257, "é" * 200,
                                 "🙂" * 70, "id\x7f"]))
floats = st.one_of(st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e30]),
                   st.floats(-50, 200, width=32))  # the anchor is 128 x 96: some boxes overlap it
metadata = st.dictionaries(st.text(max_size=40), st.text(max_size=200), max_size=8) | st.builds(
    lambda n, v: {f"k{i}": v for i in range(n)}, st.integers(0, 300), st.text(min_size=50, max_size=400))


@st.composite
def malformed_call(draw):
    """(name, function of the stub) for one malformed request."""
    kind = draw(st.sampled_from(["get", "search_id", "box", "top_k", "filter", "add_meta", "add_id",
                                 "delete", "job"]))
    if kind == "get":
        image_id = draw(ids)
        return kind, lambda s: s.GetImage(delf_pb2.GetImageRequest(image_id=image_id), timeout=60)
    if kind == "search_id":
        image_id = draw(ids)
        return kind, lambda s: s.Search(delf_pb2.SearchRequest(image_id=image_id), timeout=120)
    if kind == "box":
        box = delf_pb2.Box(x0=draw(floats), y0=draw(floats), x1=draw(floats), y1=draw(floats))
        return kind, lambda s: s.Search(delf_pb2.SearchRequest(image_id=ANCHOR, box=box, top_k=3), timeout=120)
    if kind == "top_k":
        top_k = draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 100, 101, 2**31, 2**32 - 1])))
        return kind, lambda s: s.Search(delf_pb2.SearchRequest(image_id=ANCHOR, top_k=top_k), timeout=120)
    if kind == "filter":
        pairs = draw(metadata)
        return kind, lambda s: s.Search(delf_pb2.SearchRequest(image_id=ANCHOR, filter=pairs), timeout=120)
    if kind == "add_meta":  # a real photo under an existing id: only the metadata can be wrong
        meta = draw(metadata)
        return kind, lambda s: s.AddImage(delf_pb2.AddImageRequest(image_id="fuzz-meta", image=REAL["png"],
                                                                   metadata=meta), timeout=120)
    if kind == "add_id":  # an id the gateway must refuse before anything is indexed
        image_id = draw(st.one_of(st.just(""), st.text(min_size=257, max_size=400),
                                  st.builds(lambda a, b: a + "\x01" + b, st.text(max_size=20), st.text(max_size=20))))
        return kind, lambda s: s.AddImage(delf_pb2.AddImageRequest(image_id=image_id, image=REAL["png"]),
                                          timeout=120)
    if kind == "delete":
        image_id = "fuzz-never-" + draw(ids)
        return kind, lambda s: s.DeleteImage(delf_pb2.DeleteImageRequest(image_id=image_id), timeout=60)
    job_id = draw(ids)
    method = draw(st.sampled_from(["GetJob", "CancelJob"]))
    return kind, lambda s: getattr(s, method)(delf_pb2.GetJobRequest(job_id=job_id), timeout=60)


@pytest.mark.slow
@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(call=malformed_call())
def test_malformed_requests_get_an_expected_status(fuzzed, call):
    kind, fn = call
    before = counts(fuzzed.stub)
    code, reply = outcome(lambda: fn(fuzzed.stub))
    after = counts(fuzzed.stub)
    fuzzed.seen[kind, code.name] += 1
    if kind == "add_meta" and code == grpc.StatusCode.OK:
        # Replaces the same id: at most one image more than before the first such call.
        fuzzed.added["fuzz-meta"] = reply.num_features
        assert after[0] - before[0] in (0, 1)
    else:
        assert after == before, kind
    if kind == "add_id":
        assert code == grpc.StatusCode.INVALID_ARGUMENT


locations = st.one_of(
    st.sampled_from(["", "/etc/passwd", "../../etc/passwd", "missing.jpg", "a/../../b.jpg", "\x00", "dir/"]),
    st.text(max_size=100).filter(lambda t: "://" not in t))  # no URLs: this machine has no internet


@st.composite
def ingest_item(draw) -> delf_pb2.IngestItem:
    image_id = draw(st.one_of(st.text(max_size=40), st.sampled_from(["", "a\tb", "x" * 300, "dup"])))
    meta = draw(st.one_of(st.just({}), metadata))
    if draw(st.integers(0, 3)) == 0:
        return delf_pb2.IngestItem(image_id=image_id, metadata=meta, location=draw(locations))
    image = draw(st.one_of(photo_bytes, st.sampled_from([REAL["jpeg"], REAL["png"]])))  # some good ones too
    return delf_pb2.IngestItem(image_id=image_id, metadata=meta, image=image)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(items=st.lists(ingest_item(), max_size=5))
def test_an_ingest_stream_of_hostile_items(fuzzed, items):
    """The job is accepted; every item ends up done or failed with a reason; only the
    done ones are indexed."""
    prefix = f"fuzz-job{fuzzed.next_id()}-"  # ids of this example only (the fuzzed part follows)
    for item in items:
        item.image_id = prefix + item.image_id
    before = counts(fuzzed.stub)
    code, job = outcome(lambda: fuzzed.stub.StartIngestJob(iter(items), timeout=120))
    fuzzed.seen["ingest", code.name] += 1
    if code != grpc.StatusCode.OK:
        assert counts(fuzzed.stub) == before
        return
    final = fuzzed.client.wait_job(job.job_id)
    fuzzed.seen["ingest items", "done"] += final.done
    fuzzed.seen["ingest items", "failed"] += final.failed
    assert final.done + final.failed == final.total and final.total <= len(items), final
    assert all(e.reason for e in final.errors)
    indexed = set()
    for image_id in {i.image_id for i in items}:
        code, _ = outcome(lambda: fuzzed.stub.GetImage(delf_pb2.GetImageRequest(image_id=image_id), timeout=60))  # noqa: B023 - called at once, inside the loop
        if code == grpc.StatusCode.OK:
            indexed.add(image_id)
    fuzzed.added.update({image_id: 0 for image_id in indexed})
    assert len(indexed) <= final.done
    assert counts(fuzzed.stub)[0] == before[0] + len(indexed)


@pytest.mark.slow
def test_the_gateway_still_serves_and_its_memory_stayed_bounded(fuzzed):
    """Runs after the fuzz tests above (file order)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not fuzzed.seen:
        pytest.skip("checks what the fuzz tests above did: run the whole file")

    with grpc.insecure_channel(fuzzed.system.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert fuzzed.stub.GetImage(delf_pb2.GetImageRequest(image_id=ANCHOR), timeout=60).num_features > 0
    reply = fuzzed.stub.Search(delf_pb2.SearchRequest(image=REAL["jpeg"], top_k=3), timeout=120)
    assert ANCHOR in {m.image_id for m in reply.matches if m.verified}  # (fuzz-added copies may tie)
    grown = fuzzed.gateway.memory_info().rss - fuzzed.rss_before
    print(f"\nfuzz calls by kind and status: {dict(sorted(fuzzed.seen.items()))}")
    print(f"gateway RSS {fuzzed.rss_before / 2**20:.0f} MiB before, {grown / 2**20:+.0f} MiB after")
    assert grown < 200 * 2**20, f"the gateway grew by {grown / 2**20:.0f} MiB during the fuzz"
