"""Duplicates in the CLI: what a job says about identical photos (``job_outcomes``)."""
from __future__ import annotations

from typing import Callable


def job_outcomes(job) -> str:
    """The end of a job's summary line: its unchanged items and duplicates, when any."""
    parts = []
    if job.unchanged:
        parts.append(f"unchanged {job.unchanged}")
    if job.duplicates:
        skipped = f" ({job.duplicates_skipped} skipped)" if job.duplicates_skipped else ""
        parts.append(f"duplicates {job.duplicates}{skipped}")
    return "".join("  " + p for p in parts)


# --------------------------------------------------------------------------- delf duplicates

def add_command(sub) -> None:
    """`delf duplicates`: its arguments (the gateway options are added by the CLI's parser)."""
    s = sub.add_parser("duplicates", help="groups of near-identical indexed photos: the same scene with "
                                          "near-full overlap (copies re-encoded, resized, lightly cropped)")
    s.add_argument("path", nargs="?", default=None,
                   help="search with the photos of this folder or manifest, by the ids `delf ingest PATH` "
                        "gave them (default: every indexed photo, listed by the server)")
    s.add_argument("--overlap", type=_share, default=DEFAULT_OVERLAP,
                   help="share of each of two photos the other must cover, through the verified "
                        "homography (default: %(default)s)")
    s.add_argument("--inliers", type=_share, default=DEFAULT_INLIERS,
                   help="share of the searching photo's features that must be RANSAC inliers "
                        "(default: %(default)s)")
    s.add_argument("--top-k", type=int, default=10, help="matches looked at per photo (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="print the groups as JSON")
    s.set_defaults(func=cmd_duplicates)


# Measured on landmarks-dev with resized, re-encoded copies (BENCHMARKS.md, "Unchanged photos"):
# copies overlap >= 0.985 with >= 0.46 of the features inliers; other photos of a place overlap
# up to 0.98 (consecutive shots), but those over 0.9 have at most 0.21 of them inliers.
DEFAULT_OVERLAP = 0.9
DEFAULT_INLIERS = 0.3
LIST_PAGE = 500


def _share(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def mutual_overlap(corners, query_size: tuple[int, int], match_size: tuple[int, int]) -> float:
    """The smaller of: the share of the match covered by the query's frame mapped into it
    (``corners``, 4 points in match pixels), and the share of that mapped frame inside the
    match. 1.0: the same view; a crop, a wider view or another viewpoint score less."""
    import cv2
    import numpy as np

    quad = np.asarray(corners, np.float32).reshape(4, 2)
    w, h = match_size
    if w <= 0 or h <= 0 or not np.all(np.isfinite(quad)):
        return 0.0
    frame = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    quad_area = abs(float(cv2.contourArea(quad)))
    if quad_area <= 0 or not cv2.isContourConvex(quad.reshape(-1, 1, 2)):
        return 0.0
    inter, _ = cv2.intersectConvexConvex(quad, frame)
    return max(0.0, min(float(inter) / (w * h), float(inter) / quad_area))


def _listed_ids(client) -> list[str]:
    """Every indexed id, page by page (ListImages); UsageError when the server cannot list."""
    import grpc

    from delf_common.proto.delf.v1 import delf_pb2
    from delf_tools.cli_contract import UsageError

    ids, token = [], ""
    while True:
        try:
            page = client.stub.ListImages(delf_pb2.ListImagesRequest(page_size=LIST_PAGE, page_token=token),
                                          timeout=client.timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            raise UsageError("this gateway cannot list its photos (no ListImages): give the folder or "
                             "manifest they were ingested from, `delf duplicates PATH`") from None
        ids += [image.image_id for image in page.images]
        token = page.next_page_token
        if not token:
            return ids


def _path_ids(path: str) -> list[str]:
    from pathlib import Path

    from delf_common.client import photos_in
    from delf_common.manifest import ManifestError, is_manifest, read_manifest
    from delf_tools.cli_contract import UsageError

    folder = Path(path)
    if folder.is_dir():
        return [image_id for image_id, _ in photos_in(folder)]
    if folder.is_file() and is_manifest(folder):
        try:
            return [e.image_id for e in read_manifest(folder, check_files=False)]
        except ManifestError as exc:
            raise UsageError(f"bad manifest:\n{exc}") from None
    raise UsageError(f"{path}: neither a folder nor a .csv/.jsonl manifest")


def image_sizes(client) -> Callable[[str], tuple[int, int]]:
    """image_id -> (width, height) as indexed, asked of the gateway once per id."""
    sizes: dict[str, tuple[int, int]] = {}

    def size(image_id: str) -> tuple[int, int]:
        if image_id not in sizes:
            info = client.get_image(image_id)
            sizes[image_id] = (info.width, info.height)
        return sizes[image_id]
    return size


def near_identical_pairs(client, ids: list[str], overlap: float, inliers: float,
                         top_k: int) -> dict[tuple[str, str], float]:
    """(id, id) sorted -> overlap, for every verified match of a search by each id whose
    homography covers at least ``overlap`` of both photos, with at least ``inliers`` of the
    searching photo's features RANSAC inliers."""
    size = image_sizes(client)
    pairs: dict[tuple[str, str], float] = {}
    for image_id in ids:
        found = client.search(image_id=image_id, top_k=top_k)
        for m in found.matches:
            if not m.verified or len(m.corners) != 4 or m.inliers < inliers * max(1, found.query_features):
                continue
            share = mutual_overlap([(p.x, p.y) for p in m.corners], size(image_id), size(m.image_id))
            key = tuple(sorted((image_id, m.image_id)))
            if share >= overlap:
                pairs[key] = max(share, pairs.get(key, 0.0))
    return pairs


def groups_of(pairs: dict[tuple[str, str], float]) -> list[list[str]]:
    """Connected ids (a union-find over the pairs), each group sorted, groups by first id."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    return sorted(sorted(g) for g in groups.values())


def cmd_duplicates(args) -> int:
    import json

    from delf_common.client import DelfClient

    client = DelfClient(args.gateway, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca)
    ids = _path_ids(args.path) if args.path else _listed_ids(client)
    pairs = near_identical_pairs(client, ids, args.overlap, args.inliers, args.top_k)
    groups = groups_of(pairs)
    if args.json:
        print(json.dumps({"searched": len(ids), "overlap": args.overlap, "inliers": args.inliers, "groups": [
            {"ids": g, "pairs": [{"a": a, "b": b, "overlap": round(s, 3)} for (a, b), s in sorted(pairs.items())
                                 if a in g]} for g in groups]}, indent=2))
        return 0
    print(f"{len(groups)} group{'s' if len(groups) != 1 else ''} of near-identical photos "
          f"({len(ids)} searched; overlap >= {args.overlap}, inliers >= {args.inliers} of the features)")
    for g in groups:
        shares = [s for (a, _), s in pairs.items() if a in g]
        print(f"  {'  '.join(g)}   (overlap {min(shares):.2f}-{max(shares):.2f})")
    return 0
