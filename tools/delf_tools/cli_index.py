"""The `delf` commands on the index: search, add, get, delete, stats and images, their
arguments, and the tables they print (`--json`: one JSON document instead, delf_tools.cli_json)."""
from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from pathlib import Path

from delf_common import contract
from delf_tools.cli_contract import UsageError
from delf_tools.cli_json import print_json

# The image id column of `delf search` is as wide as the longest id, up to this many
# columns; longer ids are shortened in the middle with an ellipsis (--wide: never).
ID_COLUMN_MAX = 48
IMAGES_DEFAULT = 100  # what `delf images` prints without --limit


def gateway_client(args):
    from delf_common.client import DelfClient

    return DelfClient(args.gateway, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca)


def _top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or more, got {value}")
    return value


def _photo_file(text: str, command: str) -> Path:
    """`text` as the path of one photo to read, or UsageError saying what is wrong with it."""
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; {command} takes one photo "
                         f"(`delf ingest {path}` indexes every photo below a folder)")
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path} is not a regular file")
    return path


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected four numbers x0,y0,x1,y1") from None
    return x0, y0, x1, y1


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def cmd_search(args) -> int:
    if (args.photo is None) == (args.id is None):
        print("delf search: give a PHOTO or --id ID (one of them)", file=sys.stderr)
        return 2
    if args.show is not None and Path(args.show).suffix.lower() not in (".png", ".html", ".htm"):
        print(f"delf search: --show writes a .png or an .html file, not {args.show}", file=sys.stderr)
        return 2
    if args.show is not None:  # before the search, not after it
        folder = Path(args.show).expanduser().parent
        if not folder.is_dir():
            raise UsageError(f"--show {args.show}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--show {args.show}: cannot write in the folder {folder}")
    photo = None if args.photo is None else _photo_file(args.photo, "search")
    client = gateway_client(args)
    response = client.search(photo, image_id=args.id, top_k=args.top_k, box=args.box,
                             filter=dict(args.filter), correspondences=args.show is not None)
    if args.json:
        shown = response
        if args.show is not None:  # the correspondences were asked for the drawing only
            shown = type(response)()
            shown.CopyFrom(response)
            for m in shown.matches:
                del m.correspondences[:]
        print_json(shown)
    else:
        _print_matches(response, args.wide)
    if args.show is not None:
        from delf_tools.show import write_show

        print(f"evidence drawn in {write_show(args.show, client, response, photo, args.id, args.box)}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_matches(response, wide: bool) -> None:
    print(f"{len(response.matches)} matches ({response.query_features} query features, "
          f"{response.elapsed_s:.2f} s)")
    limit = None if wide else ID_COLUMN_MAX
    ids = [_fit(m.image_id, limit) for m in response.matches]
    width = max([len("image id"), *(_width(i) for i in ids)])
    print(f"{'rank':>4}  {_pad('image id', width)} {'score':>6} {'votes':>6} {'inliers':>7}  {'verified':<8} "
          "region corners (TL TR BR BL)")
    for rank, (m, image_id) in enumerate(zip(response.matches, ids), 1):
        corners = " ".join(f"({p.x:.0f},{p.y:.0f})" for p in m.corners) or "-"
        print(f"{rank:>4}  {_pad(image_id, width)} {m.score:>6.2f} {m.votes:>6} {m.inliers:>7}  "
              f"{'yes' if m.verified else 'no':<8} {corners}")
    if response.matches:
        print(f"score: 0-1 from votes and RANSAC inliers, one scale for every row; verified from "
              f"{response.verified_score:.2f} (docs/METHOD.md)")
    if any(i != m.image_id for i, m in zip(ids, response.matches)):
        print("(long ids are shortened in the middle with …; --wide prints them whole)", file=sys.stderr)


def _width(text: str) -> int:
    """Terminal columns of `text`: wide (CJK) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _fit(text: str, limit: int | None) -> str:
    """`text` printable in one table cell: control characters escaped, and when `limit` is
    given, at most `limit` columns, shortened in the middle ("start...end")."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if limit is None or _width(text) <= limit:
        return text
    head, tail = "", ""
    for c in text:  # the start gets half the room, the end what is left
        if _width(head + c) > (limit - 1) // 2:
            break
        head += c
    for c in reversed(text):
        if _width(head) + _width(c + tail) > limit - 1:
            break
        tail = c + tail
    return head + "\u2026" + tail


def cmd_add(args) -> int:
    meta = dict(args.meta)
    info = gateway_client(args).add_image(args.image_id, _photo_file(args.photo, "add"), meta)
    if args.json:
        print_json(info)
        return 0
    print(f"added {info.image_id}: {info.width}x{info.height}, {info.num_features} features")
    return 0


def cmd_get(args) -> int:
    info = gateway_client(args).get_image(args.image_id)
    if args.json:
        print_json(info)
        return 0
    print(f"{info.image_id}: {info.width}x{info.height}, {info.num_features} features, pca {info.pca_id}"
          + (f", sha256 {info.sha256}" if info.sha256 else ""))
    for k, v in sorted(info.metadata.items()):
        print(f"  {k} = {v}")
    return 0


def cmd_delete(args) -> int:
    reply = gateway_client(args).delete_image(args.image_id)
    if args.json:
        print_json(reply)
        return 0
    print(f"deleted {reply.image_id} ({reply.descriptors_removed} descriptors)")
    return 0


def cmd_stats(args) -> int:
    s = gateway_client(args).stats()
    if args.json:
        print_json(s)
        return 0
    print(f"images {s.images}  descriptors {s.descriptors}  model {s.model}  pca {s.pca_id}")
    for queue, depth in sorted(s.queue_depths.items()):
        print(f"  queue {queue}: {depth} waiting")
    return 0


def cmd_images(args) -> int:
    """Up to --limit images (0: all) after --after, in id order, a page at a time."""
    client = gateway_client(args)
    images, token = [], args.after or ""
    while True:
        want = contract.IMAGES_PAGE_MAX if not args.limit else min(args.limit - len(images), contract.IMAGES_PAGE_MAX)
        page = client.list_images(want, token, dict(args.filter))
        images.extend(page.images)
        token = page.next_page_token
        if not token or (args.limit and len(images) >= args.limit):
            break
    if args.json:
        print_json({"images": list(images), "next_page_token": token})
        return 0
    width = max([len("image id"), *(_width(_fit(i.image_id, ID_COLUMN_MAX)) for i in images)])
    print(f"{_pad('image id', width)} {'size':>11} {'features':>8}  metadata")
    for i in images:
        meta = " ".join(f"{k}={v}" for k, v in sorted(i.metadata.items()))
        print(f"{_pad(_fit(i.image_id, ID_COLUMN_MAX), width)} {f'{i.width}x{i.height}':>11} "
              f"{i.num_features:>8}  {_fit(meta, 80)}")
    more = f"; more after this one: `delf images --after {token}`" if token else ""
    print(f"{len(images)} image{'s' if len(images) != 1 else ''}{more}", file=sys.stderr)
    return 0


def index_commands(sub) -> None:
    s = sub.add_parser("search", help="photos showing the same place or object as PHOTO")
    s.add_argument("photo", nargs="?", default=None)
    s.add_argument("--id", default=None, metavar="ID", help="search with an indexed photo instead of PHOTO")
    s.add_argument("--top-k", type=_top_k, default=10, help="how many matches, at least 1 (default: %(default)s)")
    s.add_argument("--box", type=_box, default=None, help="x0,y0,x1,y1: search only this region of PHOTO")
    s.add_argument("--filter", type=_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="only photos whose metadata has KEY=VALUE (repeat: all must hold)")
    s.add_argument("--show", default=None, metavar="FILE.png|FILE.html",
                   help="also draw each match beside the query: the matched region outlined, RANSAC "
                        "inliers joined by lines, score, inliers and verified written on it (a PNG, or one "
                        "self-contained HTML page)")
    s.add_argument("--wide", action="store_true",
                   help=f"print image ids whole (default: ids over {ID_COLUMN_MAX} columns are shortened)")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("add", help="index one photo under an id (replaces an existing one)")
    s.add_argument("image_id")
    s.add_argument("photo")
    s.add_argument("--meta", type=_pair, action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_add)

    s = sub.add_parser("get", help="what the index holds for an id")
    s.add_argument("image_id")
    s.set_defaults(func=cmd_get)

    s = sub.add_parser("delete", help="remove an id from the index")
    s.add_argument("image_id")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("stats", help="index size and queue depths")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("images", help="the indexed images in id order (id, size, features, metadata)")
    s.add_argument("--filter", type=_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="only photos whose metadata has KEY=VALUE (repeat: all must hold)")
    s.add_argument("--limit", type=count_argument, default=IMAGES_DEFAULT, metavar="N",
                   help="at most N images (default: %(default)s; 0: all)")
    s.add_argument("--after", default=None, metavar="ID", help="start after this id (where the last listing stopped)")
    s.set_defaults(func=cmd_images)
