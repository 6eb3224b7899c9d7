"""Photos as people have them (issue 14, items 1, 2, 3 and 9).

1. A phone photo whose EXIF Orientation turns it is handled in the frame a viewer shows:
   its size, the whole-image corners of its matches and the `box` check.
2. Every accepted format and mode decodes to the right 8-bit picture (16-bit grey PNG
   was all white), or is refused with INVALID_ARGUMENT.
3. Photos that yield no features (too small) and photos of one flat colour are refused
   with a readable reason, in AddImage, Search and per item in ingest jobs.
9. `delf search ... | head -3` ends quietly; long image ids keep the table's columns.
"""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import unicodedata
import uuid
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from delf_common import images
from delf_common.images import ImageLimits, ImageRejected, decode_image, probe_image
from delf_common.proto.delf.v1 import delf_pb2
from photos import jpeg, png, sample_photo


def _upright() -> np.ndarray:
    """A portrait photo (400 wide, 600 high) with plenty of detail."""
    return np.ascontiguousarray(np.rot90(sample_photo("coffee"), -1))


def _encode(rgb_or_image, fmt: str = "JPEG", **params) -> bytes:
    im = rgb_or_image if isinstance(rgb_or_image, Image.Image) else Image.fromarray(rgb_or_image)
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _with_orientation(upright: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """A JPEG that a viewer shows as `upright`: the pixels stored as a camera would,
    with the EXIF Orientation tag that turns them back."""
    stored_as = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
    im = Image.fromarray(upright)
    if stored_as[orientation] is not None:
        im = im.transpose(stored_as[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(im, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def _raw_png(width: int, height: int, bit_depth: int, colour_type: int, pixels: np.ndarray) -> bytes:
    """A PNG written chunk by chunk, so any bit depth and colour type can be made."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = pixels.reshape(height, -1)
    raw = b"".join(b"\0" + rows[i].tobytes() for i in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _grey16_png(grey8: np.ndarray) -> bytes:
    """The 16-bit grey PNG of an 8-bit grey picture (each level v stored as v * 257)."""
    h, w = grey8.shape
    return _raw_png(w, h, 16, 0, (grey8.astype(np.uint16) * 257).astype(">u2"))


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value


def _job_errors(client, items: dict[str, bytes]) -> dict[str, str]:
    job = client.start_ingest_job(delf_pb2.IngestItem(image_id=k, image=v) for k, v in items.items())
    job = client.wait_job(job.job_id)
    assert job.failed == len(items) and job.done == 0, job
    return {e.image_id: e.reason for e in job.errors}


# --------------------------------------------------------------- item 1: orientation

@pytest.mark.parametrize("orientation", range(1, 9))
def test_item1_exif_orientation_the_header_gives_the_displayed_size(orientation):
    upright = _upright()
    data = _with_orientation(upright, orientation)
    assert probe_image(data, ImageLimits.from_env())[:2] == (400, 600)
    decoded = decode_image(data, ImageLimits.from_env())
    assert decoded.shape == upright.shape
    assert np.abs(decoded.astype(int) - upright).mean() < 4  # the same picture, JPEG aside


@pytest.mark.parametrize("orientation", [3, 6, 7])
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_item1_exif_orientation_other_formats(fmt, orientation):
    upright = _upright()
    data = _with_orientation(upright, orientation, fmt)
    assert probe_image(data, ImageLimits.from_env())[:2] == (400, 600)
    assert np.abs(decode_image(data, ImageLimits.from_env()).astype(int) - upright).mean() < 4


@pytest.mark.slow
def test_item1_exif_orientation_search_uses_the_displayed_frame(client):
    upright = _upright()
    image_id = f"photo-input/upright-{uuid.uuid4().hex[:8]}"
    client.add_image(image_id, jpeg(upright))
    try:
        turned = _with_orientation(upright, 6)  # stored 600x400, shown 400x600
        info = client.add_image(image_id + "-exif", turned)
        assert (info.width, info.height) == (400, 600)
        client.delete_image(image_id + "-exif")

        found = {m.image_id: m for m in client.search(turned, top_k=20).matches}
        match = found[image_id]
        assert match.verified
        corners = np.array([[p.x, p.y] for p in match.corners])
        expected = np.array([[0, 0], [400, 0], [400, 600], [0, 600]])
        assert np.abs(corners - expected).max() < 30, corners  # the displayed frame, not 600x400

        # A box in the lower part of the portrait photo: inside the displayed frame only.
        lower = client.search(turned, top_k=20, box=(20, 420, 380, 590))
        assert lower.query_features > 0
        # A box right of x=400: inside the stored 600x400 frame only.
        err = _refused(lambda: client.search(turned, top_k=20, box=(420, 20, 590, 380)))
        assert "does not overlap the 400x600 image" in err.details()
    finally:
        client.delete_image(image_id)


# --------------------------------------------------------------- item 2: bit depths and modes

def test_item2_16bit_grey_png_decodes_to_the_right_values():
    grey8 = _grey(sample_photo("chelsea"))
    rgb = decode_image(_grey16_png(grey8), ImageLimits.from_env())
    assert rgb.dtype == np.uint8 and rgb.shape == (*grey8.shape, 3)
    assert np.array_equal(rgb[..., 0], grey8) and np.array_equal(rgb[..., 2], grey8)


def _mode_cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (encoded photo, the 8-bit RGB picture it must decode to)."""
    rgb = sample_photo("chelsea")
    grey8 = _grey(rgb)
    h, w = grey8.shape
    grey_rgb = np.repeat(grey8[..., None], 3, axis=2)
    rgb16 = rgb.astype(">u2") * 257
    opaque16 = np.full((h, w, 1), 65535, ">u2")
    half = np.broadcast_to(np.where(np.arange(w)[None, :, None] < w // 2, 255, 0), (h, w, 1)).astype(np.uint8)
    over_white = np.where(half == 255, rgb, 255).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(64)
    return {
        "16-bit grey PNG": (_grey16_png(grey8), grey_rgb),
        "16-bit RGB PNG": (_raw_png(w, h, 16, 2, rgb16), rgb),
        "16-bit RGBA PNG": (_raw_png(w, h, 16, 6, np.concatenate([rgb16, opaque16], -1)), rgb),
        "16-bit grey+alpha PNG": (_raw_png(w, h, 16, 4, np.concatenate(
            [grey8[..., None].astype(">u2") * 257, opaque16], -1)), grey_rgb),
        "8-bit grey+alpha PNG": (_raw_png(w, h, 8, 4, np.stack([grey8, np.full_like(grey8, 255)], -1)), grey_rgb),
        "RGBA PNG, half transparent": (_encode(np.concatenate([rgb, half], -1), "PNG"), over_white),
        "palette PNG": (_encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "1-bit PNG": (_encode(Image.fromarray(grey8 > 128), "PNG"), np.repeat(((grey8 > 128) * 255).astype(
            np.uint8)[..., None], 3, axis=2)),
        "16-bit grey TIFF": (_encode(Image.fromarray(grey8.astype(np.uint16) * 257), "TIFF"), grey_rgb),
        "CMYK JPEG": (_encode(Image.fromarray(grey_rgb).convert("CMYK"), "JPEG", quality=98), grey_rgb),
        "grey JPEG": (_encode(grey8, "JPEG", quality=98), grey_rgb),
    }


@pytest.mark.parametrize("case", list(_mode_cases()))
def test_item2_every_accepted_mode_decodes_to_the_right_8bit_picture(case):
    data, expected = _mode_cases()[case]
    rgb = decode_image(data, ImageLimits.from_env())
    assert rgb.dtype == np.uint8 and rgb.shape == expected.shape, case
    assert np.abs(rgb.astype(int) - expected).mean() < 2.5, case


def test_item2_float_tiff_is_refused():
    grey = _grey(sample_photo("chelsea")).astype(np.float32)
    with pytest.raises(ImageRejected) as err:
        decode_image(_encode(Image.fromarray(grey), "TIFF"), ImageLimits.from_env())
    assert err.value.code == "INVALID_ARGUMENT" and "floating-point" in err.value.message


@pytest.mark.slow
def test_item2_16bit_grey_png_is_found_by_its_8bit_version(client):
    grey8 = _grey(sample_photo("rocket"))
    image_id = f"photo-input/grey16-{uuid.uuid4().hex[:8]}"
    info = client.add_image(image_id, _grey16_png(grey8))
    try:
        assert info.num_features > 0
        matches = client.search(png(np.repeat(grey8[..., None], 3, axis=2)), top_k=5).matches
        assert matches and matches[0].image_id == image_id and matches[0].verified
    finally:
        client.delete_image(image_id)


# --------------------------------------------------------------- item 3: tiny and flat photos

def _texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


TINY = {"32x32": (32, 32), "1024x32": (1024, 32), "32x200": (32, 200), "4000x40": (4000, 40)}
FLAT = {"black": (0, 0, 0), "white": (255, 255, 255), "blue": (30, 90, 200)}


def test_item3_flat_photos_measure_flat_and_real_ones_do_not():
    for colour in FLAT.values():
        assert images.grey_range(decode_image(jpeg(np.full((480, 640, 3), colour, np.uint8)), ImageLimits.from_env())) < 1
    noisy = np.clip(128 + np.random.default_rng(0).normal(0, 2, (480, 640, 3)), 0, 255).astype(np.uint8)
    assert images.grey_range(noisy) < 4  # sensor noise on a blank wall is still flat
    for name in ("chelsea", "coffee", "rocket", "hubble"):
        assert images.grey_range(sample_photo(name)) > 20, name


@pytest.mark.slow
def test_item3_photos_without_features_are_refused(client):
    before = client.stats().images
    for name, (w, h) in TINY.items():
        photo = png(_texture(w, h))
        err = _refused(lambda: client.add_image(f"photo-input/tiny-{name}", photo))  # noqa: B023 - called at once, inside the loop
        assert "gives no features" in err.details() and "at least 45 px" in err.details(), err.details()
        _refused(lambda: client.search(photo))  # noqa: B023 - called at once, inside the loop
    for name, colour in FLAT.items():
        photo = jpeg(np.full((600, 800, 3), colour, np.uint8))
        err = _refused(lambda: client.add_image(f"photo-input/flat-{name}", photo))  # noqa: B023 - called at once, inside the loop
        assert "one flat colour" in err.details(), err.details()
        _refused(lambda: client.search(photo))  # noqa: B023 - called at once, inside the loop
    assert client.stats().images == before
    # The smallest useful photo is accepted.
    info = client.add_image("photo-input/small", png(_texture(48, 48)))
    assert info.num_features > 0
    client.delete_image("photo-input/small")


@pytest.mark.slow
def test_item3_ingest_jobs_refuse_them_per_item(client):
    items = {f"photo-input/job-tiny-{n}": png(_texture(w, h)) for n, (w, h) in TINY.items()}
    items.update({f"photo-input/job-flat-{n}": jpeg(np.full((600, 800, 3), c, np.uint8)) for n, c in FLAT.items()})
    errors = _job_errors(client, items)
    assert set(errors) == set(items)
    for image_id, reason in errors.items():
        assert ("no features" if "tiny" in image_id else "one flat colour") in reason, (image_id, reason)


# --------------------------------------------------------------- item 9: CLI manners

def _delf(system, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "delf_tools.cli", "--gateway", system.address, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.slow
def test_item9_search_into_a_closed_pipe_exits_quietly(system, client, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(sample_photo("chelsea")))
    proc = _delf(system, "search", str(photo))
    proc.stdout.close()  # the reader is gone before the command writes (`| head -0`)
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141, (proc.returncode, err)

    shell = subprocess.run(f"{sys.executable} -m delf_tools.cli --gateway {system.address} search "
                           f"{photo} --top-k 50 | head -1", shell=True, capture_output=True, text=True,
                           timeout=300)
    assert shell.returncode == 0 and "Traceback" not in shell.stderr, shell.stderr
    assert shell.stdout.count("\n") == 1


@pytest.mark.slow
def test_item9_long_image_ids_keep_the_columns(system, client, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(sample_photo("astronaut")))
    ids = ["photo-input/" + "long-" * 40 + uuid.uuid4().hex[:6], "photo-input/写真-" + uuid.uuid4().hex[:6]]
    for image_id in ids:
        client.add_image(image_id, photo.read_bytes())
    try:
        out, err = _delf(system, "search", str(photo)).communicate(timeout=300)
        lines = out.decode().splitlines()
        header, rows = lines[1], [line for line in lines[2:] if "photo-input/" in line]
        assert len(rows) == 2, lines
        column = header.index("verified")
        for row in rows:  # the verified column starts where its header does (CJK takes two columns)
            shift = sum(1 for c in row if unicodedata.east_asian_width(c) == "W")
            assert row[column - shift:column - shift + 3] == "yes", row
        assert "\u2026" in "".join(rows) and "--wide" in err.decode()

        wide = _delf(system, "search", str(photo), "--wide").communicate(timeout=300)[0].decode()
        assert ids[0] in wide
    finally:
        for image_id in ids:
            client.delete_image(image_id)
