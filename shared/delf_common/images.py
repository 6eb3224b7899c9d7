"""Decoding and validating submitted photos.

Every photo passes `decode_image` before any work is done on it, at the gateway
(so a bad photo is refused before it is queued) and in the extractor (for photos
that arrive by location). The header is read first, so a decompression bomb is
refused before its pixels are allocated; a truncated file fails the full decode.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from delf_common import config
from delf_common.contract import INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED  # noqa: F401 - importable from here

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


def check_size(data: bytes, max_bytes: int | None = None) -> None:
    max_bytes = config.get("DELF_MAX_IMAGE_BYTES") if max_bytes is None else max_bytes
    if not data:
        raise ImageRejected(INVALID_ARGUMENT, "the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageRejected(
            RESOURCE_EXHAUSTED,
            f"the image is {len(data):,} bytes; the limit is {max_bytes:,} bytes (DELF_MAX_IMAGE_BYTES)",
        )


def probe_image(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header alone, after the byte and pixel limits."""
    check_size(data)
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            width, height, fmt = im.size[0], im.size[1], im.format or "?"
    except UnidentifiedImageError:
        raise ImageRejected(
            INVALID_ARGUMENT,
            "the bytes are not an image in a supported format (JPEG, PNG, WebP, BMP, TIFF, GIF)",
        ) from None
    except Exception as exc:  # PIL raises many types on corrupt headers
        raise ImageRejected(INVALID_ARGUMENT, f"the image header is corrupt: {exc}") from None
    _check_dimensions(width, height)
    return width, height, fmt


def _check_dimensions(width: int, height: int) -> None:
    max_pixels = config.get("DELF_MAX_IMAGE_PIXELS")
    min_side = config.get("DELF_MIN_IMAGE_SIDE")
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


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of the photo, EXIF orientation applied."""
    probe_image(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                im.load()  # raises on truncated data
                im = ImageOps.exif_transpose(im)
                rgb = im.convert("RGB")
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected(INVALID_ARGUMENT, f"the image could not be decoded (truncated or corrupt): {exc}") from None
    _check_dimensions(rgb.size[0], rgb.size[1])
    return np.asarray(rgb, dtype=np.uint8)
