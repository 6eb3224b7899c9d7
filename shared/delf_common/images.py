"""Decoding and validating submitted photos.

Every photo passes `probe_image` at the gateway (the header only, so a bad photo is
refused before it is queued) and `decode_image` in the extractor. The header is read
first, so a decompression bomb is refused before its pixels are allocated; a truncated
file fails the full decode.

One frame everywhere: the one a viewer shows. A photo whose EXIF Orientation says it is
stored rotated or mirrored (phone photos: Orientation 6 is stored landscape, shown
portrait) is sized (`displayed_size`) and decoded as shown (`orientation`), so its
size, query boxes, region corners and feature locations all use the displayed frame.

Decoding gives 8 bits per channel RGB from every mode the accepted formats produce:
16-bit grey (PNG, TIFF: mode I;16 or I) is scaled by 255/65535, not clipped; 16-bit
RGB/RGBA (PIL reduces them to 8 bits itself), palette, 1-bit, grey, CMYK, YCbCr and LAB
are converted; an alpha channel is composited over white (what a viewer on a white
page shows; the colour stored under transparent pixels is arbitrary). Floating-point
and out-of-range 32-bit integer images are refused.
"""
from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from delf_common import config
from delf_common.contract import INVALID_ARGUMENT, RESOURCE_EXHAUSTED

# We enforce our own pixel limit before decoding; PIL's would raise a warning
# (or its own error) with a less helpful message.
Image.MAX_IMAGE_PIXELS = None

# The only readers PIL may use (camera JPEGs may come back as "MPO", through the JPEG
# reader). PIL knows some 40 formats; the obscure ones are rarely exercised decoders (and
# EPS hands the file to Ghostscript), so photos in them are refused as unsupported.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


class ImageRejected(ValueError):
    """A photo that cannot be processed; `code` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What a submitted photo is held to: at most ``max_bytes`` (DELF_MAX_IMAGE_BYTES) and
    ``max_pixels`` (DELF_MAX_IMAGE_PIXELS), both sides at least ``min_side`` px
    (DELF_MIN_IMAGE_SIDE). A service reads them once, into its settings object, and
    passes them to every check; nothing here reads the environment per photo."""

    max_bytes: int
    max_pixels: int
    min_side: int

    @classmethod
    def from_env(cls) -> "ImageLimits":
        return cls(max_bytes=int(config.get("DELF_MAX_IMAGE_BYTES")),
                   max_pixels=int(config.get("DELF_MAX_IMAGE_PIXELS")),
                   min_side=int(config.get("DELF_MIN_IMAGE_SIDE")))


def check_size(data: bytes, max_bytes: int) -> None:
    if not data:
        raise ImageRejected(INVALID_ARGUMENT, "the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageRejected(
            RESOURCE_EXHAUSTED,
            f"the image is {len(data):,} bytes; the limit is {max_bytes:,} bytes (DELF_MAX_IMAGE_BYTES)",
        )


EXIF_ORIENTATION = 0x0112
# How each EXIF Orientation (2-8) is turned upright (ImageOps.exif_transpose's table).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_TURNED = (5, 6, 7, 8)  # the displayed width is the stored height


def orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1-8) of an opened, not yet loaded photo, from its header alone
    (EXIF, or XMP's tiff:Orientation). A PNG's eXIf chunk counts only before the pixel
    data (PIL would otherwise decode the whole image to look for one after it); a corrupt
    or out-of-range value counts as 1 (upright), as for a viewer."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION) or 1)
    except Exception:  # noqa: BLE001 - PIL raises many types on a bad file
        return 1
    return value if value in _UPRIGHT else 1


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened photo as a viewer shows it: the stored size, swapped
    when its EXIF Orientation turns it by 90 degrees."""
    width, height = _stored_size(im)
    return (height, width) if orientation(im) in _TURNED else (width, height)


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """The size of the stored pixels. PIL (11 and later) reports a TIFF's size already
    turned by its orientation, and turns its pixels on load: its tags give the stored size."""
    if im.format == "TIFF":
        width, height = im.tag_v2.get(256), im.tag_v2.get(257)
        if isinstance(width, int) and isinstance(height, int):
            return width, height
    return im.size


def _upright(im: Image.Image, header_orientation: int) -> Image.Image:
    """A loaded photo turned as its header's orientation says; a TIFF that PIL turned
    while loading (its orientation tag then removed) is not turned twice."""
    value = orientation(im) if im.format == "TIFF" else header_orientation
    turn = _UPRIGHT.get(value)
    return im.transpose(turn) if turn is not None else im


def probe_image(data: bytes, limits: ImageLimits) -> tuple[int, int, str]:
    """(width, height, format) from the header alone, after the byte and pixel limits;
    the size is the displayed one (`displayed_size`)."""
    check_size(data, limits.max_bytes)
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            _check_dimensions(*im.size, limits)  # before anything else is read (turning keeps both limits)
            (width, height), fmt = displayed_size(im), im.format or "?"
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(
            INVALID_ARGUMENT,
            "the bytes are not an image in a supported format (JPEG, PNG, WebP, BMP, TIFF, GIF)",
        ) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt headers
        raise ImageRejected(INVALID_ARGUMENT, f"the image header is corrupt: {exc}") from None
    return width, height, fmt


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    max_pixels, min_side = limits.max_pixels, limits.min_side
    if width * height > max_pixels:
        raise ImageRejected(
            RESOURCE_EXHAUSTED,
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
            f"{max_pixels:,} pixels (DELF_MAX_IMAGE_PIXELS)",
        )
    if min(width, height) < min_side:
        raise ImageRejected(
            INVALID_ARGUMENT,
            f"the image is {width}x{height}; both sides must be at least {min_side} pixels",
        )


def decode_image(data: bytes, limits: ImageLimits) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of the photo turned upright by its `orientation`: its size
    is the `displayed_size` the gateway's `probe_image` reported."""
    width, height, _ = probe_image(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                header_orientation = orientation(im)  # as probe_image read it
                im.load()  # raises on truncated data
                rgb = to_rgb8(_upright(im, header_orientation))
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on a bad file
        raise ImageRejected(INVALID_ARGUMENT, f"the image could not be decoded (truncated or corrupt): {exc}") from None
    if (rgb.shape[1], rgb.shape[0]) != (width, height):  # one frame on both sides, or none
        raise ImageRejected(INVALID_ARGUMENT, f"the image's EXIF orientation could not be applied "
                                              f"({rgb.shape[1]}x{rgb.shape[0]}, expected {width}x{height})")
    _check_dimensions(rgb.shape[1], rgb.shape[0], limits)
    return rgb


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb8(im: Image.Image) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of a loaded PIL image of any mode (see the module doc)."""
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        grey = np.asarray(im).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ImageRejected(INVALID_ARGUMENT, f"the image has 32-bit integer pixels ({im.mode}, values "
                                                  f"{grey.min()}..{grey.max()}); send 8 or 16 bits per channel")
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[..., None], 3, axis=2))
    if im.mode == "F":
        raise ImageRejected(INVALID_ARGUMENT, "the image has floating-point pixels (mode F); "
                                              "send 8 or 16 bits per channel")
    if im.mode in _ALPHA or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


# A photo is flat (one colour: a lens cap, a blank wall, an all-black frame) when, in
# blocks of FLAT_BLOCK x FLAT_BLOCK pixels (which average JPEG and sensor noise away), the
# grey level of 99% of the blocks lies within FLAT_MAX_RANGE levels (of 255). The
# extractor still returns its full quota of features for such a photo, all of them
# meaningless (BENCHMARKS.md, "Flat and tiny photos"), so the extractor refuses it.
FLAT_BLOCK = 8
FLAT_MAX_RANGE = 4.0


def grey_range(rgb: np.ndarray) -> float:
    """The spread (0.5th to 99.5th percentile) of the block-averaged grey levels of a photo."""
    grey = rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    h, w = grey.shape
    b = min(FLAT_BLOCK, h, w)
    blocks = grey[: h - h % b, : w - w % b].reshape(h // b, b, w // b, b).mean(axis=(1, 3))
    lo, hi = np.percentile(blocks, [0.5, 99.5])
    return float(hi - lo)


def check_not_flat(rgb: np.ndarray) -> None:
    """Refuses a photo of one flat colour (see FLAT_MAX_RANGE)."""
    spread = grey_range(rgb)
    if spread < FLAT_MAX_RANGE:
        raise ImageRejected(
            INVALID_ARGUMENT,
            f"the photo is one flat colour (its grey levels vary by {spread:.1f} of 255; at least "
            f"{FLAT_MAX_RANGE:g} is needed): it has no detail to match",
        )


# A stored thumbnail is at most this many bytes: base64 of it (what the indexer stores, a
# Milvus VARCHAR) then fits the 65,535 bytes of a VARCHAR field.
THUMBNAIL_MAX_BYTES = 48_000
_THUMBNAIL_QUALITIES = (85, 70, 55, 40)


def thumbnail_jpeg(rgb: np.ndarray, side: int) -> bytes:
    """A JPEG of the photo (RGB uint8, as `decode_image` gives it) whose longer side is at
    most ``side`` px (a service's DELF_THUMBNAIL_SIDE; never enlarged) and whose size is at
    most THUMBNAIL_MAX_BYTES (lower quality, then a smaller side, when needed). b"" when
    ``side`` is 0 (no thumbnails)."""
    side = int(side)
    if side <= 0:
        return b""
    im = Image.fromarray(np.ascontiguousarray(rgb[..., :3]), "RGB")
    while True:
        small = im.copy()
        small.thumbnail((side, side), Image.Resampling.LANCZOS)  # keeps the aspect ratio
        for quality in _THUMBNAIL_QUALITIES:
            out = io.BytesIO()
            small.save(out, "JPEG", quality=quality, optimize=True)
            if out.tell() <= THUMBNAIL_MAX_BYTES:
                return out.getvalue()
        side = max(16, int(side * 0.75))
