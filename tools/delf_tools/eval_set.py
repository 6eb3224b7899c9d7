"""The evaluation set of `delf eval`: the photos of a ground-truth manifest, how they are
read (as the system decodes them), and what one method's run over them yields."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from delf_tools.evaluation import read_conditions, read_conditions_file, read_manifest

TOP_K = 100
MAX_SIDE = 1024


class EvalError(Exception):
    """A problem the user must fix (bad manifest, no gateway); the message says what."""


@dataclasses.dataclass(frozen=True)
class Photo:
    image_id: str
    path: Path
    rel: str
    group: str
    condition: str = ""  # for per-condition figures; "" when the manifest names none


@dataclasses.dataclass
class MethodRun:
    """What one method produced: a ranking per query and timings."""

    rankings: dict[str, list[str]]
    latencies: list[float]
    ingest_s: float
    ingested: int


# --------------------------------------------------------------------------- manifest


def load_photos(manifest: str | Path, limit: int | None = None,
                warn: Callable[[str], None] = lambda m: None,
                conditions: str | Path | None = None) -> list[Photo]:
    """The manifest's photos that exist (missing ones reported through `warn` and skipped),
    with their condition (``delf_tools.evaluation``; ``conditions``: a {group: condition}
    file for a manifest that names none)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise EvalError(f"no manifest at {manifest} (a tab-separated file with 'path' and 'group' columns)")
    try:
        rows = read_manifest(manifest)
        by_path = read_conditions(manifest)
        by_group = read_conditions_file(conditions) if conditions else {}
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    except (IndexError, UnicodeDecodeError, OSError) as exc:
        raise EvalError(f"{manifest}: not a readable tab-separated manifest ({exc})") from None
    if limit:
        rows = rows[:limit]
    photos, missing, seen = [], [], set()
    for rel, group in rows:
        path = manifest.parent / rel
        image_id = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
        if image_id in seen:
            warn(f"duplicate id {image_id!r} ({rel}): skipped")
            continue
        if not path.is_file():
            missing.append(rel)
            continue
        seen.add(image_id)
        photos.append(Photo(image_id, path, rel, group, by_path.get(rel) or by_group.get(group, "")))
    if missing:
        warn(f"{len(missing)} photo(s) of the manifest not found, skipped: " + ", ".join(missing[:10])
             + (" ..." if len(missing) > 10 else ""))
    if not photos:
        raise EvalError(f"{manifest}: none of its photos exist below {manifest.parent}")
    return photos


def load_rgb(path: Path, max_side: int = MAX_SIDE) -> np.ndarray:
    """RGB uint8 of a photo as the system decodes it (EXIF orientation applied), long side capped."""
    import cv2

    from delf_common.images import ImageLimits, decode_image

    rgb = decode_image(path.read_bytes(), ImageLimits.from_env())
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)
