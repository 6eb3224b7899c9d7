"""`delf`: the command line of the DELF image-retrieval service.

    delf up                                   start the whole system locally
    delf ingest FOLDER|MANIFEST [--resume JOB_ID]  index every photo below FOLDER, or listed in a
                                              .csv/.jsonl manifest, as one job (or continue a job)
    delf resume JOB_ID                        re-send an interrupted job's unfinished photos
    delf job JOB_ID                           a job's state
    delf cancel JOB_ID                        stop a job
    delf search PHOTO|--id ID [--top-k N] [--box x0,y0,x1,y1] [--filter KEY=VALUE ...]
                [--show matches.png|matches.html]  ... and draw each match's evidence
    delf add ID PHOTO | delf get ID | delf delete ID | delf stats
    delf fit-pca ...                          learn the PCA of the descriptors
    delf eval MANIFEST ... [--report R.html]  mAP etc. of the running system against two baselines
    delf train-attention MANIFEST ...         train the attention head (backbone frozen)
    delf finetune MANIFEST ...                fine-tune the backbone on landmark labels (GPU)

The gateway address comes from --gateway or DELF_GATEWAY (default 127.0.0.1:50051): HOST,
HOST:PORT or a URL (http://HOST:PORT), port 50051 when none is given; a bearer token from
--token or DELF_TOKEN; --tls-ca or DELF_TLS_CA (a PEM file of the CA to trust) switches to
TLS. These global options go before or after the command.

A mistake gets one short message on stderr (at most with the command's usage) and a
non-zero exit: 2 for a wrong invocation, 1 for an error the gateway reports, 130 for
Ctrl-C; never a traceback (DELF_TRACEBACK=1 shows one for an unexpected error).
"""
from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from pathlib import Path


from delf_common import config
from delf_common.addresses import AddressError, gateway_target
from delf_tools.cli_contract import INTERRUPTED_EXIT, UsageError, interrupted, run_command, run_tool

GLOBAL_DEFAULTS = {"gateway": None, "timeout": 300.0, "token": None, "tls_ca": None}
# Commands implemented by other modules, which parse their own arguments.
TOOL_COMMANDS = ("up", "fit-pca", "train-attention", "finetune", "eval")
STATE_NAMES = {0: "UNSPECIFIED", 1: "RECEIVING", 2: "RUNNING", 3: "COMPLETED", 4: "CANCELLED"}
# The image id column of `delf search` is as wide as the longest id, up to this many
# columns; longer ids are shortened in the middle with an ellipsis (--wide: never).
ID_COLUMN_MAX = 48
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away


def _client(args):
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
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


def _print_job(job, out=sys.stdout) -> None:
    stalled = f" (STALLED: no progress for {job.idle_s:.0f} s)" if job.stalled else ""
    print(f"job {job.job_id}: {STATE_NAMES.get(job.state, job.state)}{stalled}", file=out)
    print(f"  total {job.total}  indexed {job.done}  failed {job.failed}", file=out)
    if job.rate:
        print(f"  rate {job.rate:.2f} photos/s" + (f"  eta {job.eta_s:.0f} s" if job.eta_s else ""), file=out)
    for err in job.errors:
        print(f"  failed {err.image_id}: {err.reason}", file=out)
    if job.stalled and job.hint:
        print(f"  stalled: {job.hint}", file=out)
    out.flush()


def cmd_ingest(args) -> int:
    from tqdm import tqdm

    from delf_common.client import photos_in
    from delf_common.manifest import ManifestError, is_manifest, read_manifest

    folder = Path(args.path)
    if not folder.exists():
        raise UsageError(f"{folder}: no such folder or file")
    manifest = folder.is_file() and is_manifest(folder)
    if not folder.is_dir() and not manifest:
        print(f"delf ingest: {folder} is neither a folder nor a .csv/.jsonl manifest", file=sys.stderr)
        return 2
    if args.server_paths and not manifest:
        print("delf ingest: --server-paths applies to manifests only", file=sys.stderr)
        return 2
    if manifest:
        try:  # every problem of the manifest, with line numbers, before anything is sent
            n = len(read_manifest(folder, check_files=not args.server_paths))
        except ManifestError as exc:
            print(f"delf ingest: bad manifest:\n{exc}", file=sys.stderr)
            return 2
    else:
        n = len(photos_in(folder))
        if n == 0:
            print(f"delf ingest: no photos (jpg, png, webp, bmp, tif, gif) below {folder}", file=sys.stderr)
            return 2
    client = _client(args)
    named: list[str] = []
    with tqdm(total=n, desc="upload", unit="photo", disable=args.quiet) as bar:
        sent = lambda i, total: bar.update(1)  # noqa: E731 - a one-line helper

        def on_job(job_id: str) -> None:
            named.append(job_id)
            bar.write(f"job {job_id} (if interrupted: delf ingest {folder} --resume {job_id})", file=sys.stderr)

        try:
            if manifest:
                job = client.ingest_manifest(folder, server_paths=args.server_paths, on_sent=sent,
                                             resume_job=args.resume, on_job=on_job)
            else:
                job = client.ingest_folder(folder, on_sent=sent, resume_job=args.resume, on_job=on_job)
        except KeyboardInterrupt:
            bar.close()
            if named:
                interrupted(f"stopped sending: job {named[0]} keeps (and indexes) the photos it received; "
                             f"send the rest with `delf ingest {folder} --resume {named[0]}`")
            else:
                interrupted("stopped before the gateway named a job: nothing to resume; run the command again")
            return INTERRUPTED_EXIT
    print(f"job {job.job_id}" + (f" (resumed: {job.resent} re-sent by the server)" if args.resume else ""))
    if args.resume and job.awaiting_upload:
        print(f"  {job.awaiting_upload} unfinished photos of this job were sent as bytes and are not in "
              f"{folder}: send them with `delf ingest PATH --resume {job.job_id}`", file=sys.stderr)
    return _watch(client, job, args, resume=f"delf ingest {folder} --resume {job.job_id}")


def _watch(client, job, args, resume: str) -> int:
    """Progress until the job ends; Ctrl-C stops waiting (the job goes on) and says how to
    follow it. `resume`: the command that continues the job should it stall."""
    from tqdm import tqdm

    if not args.wait:
        return 0
    told = False
    job_id = job.job_id
    try:
        with tqdm(total=job.total, desc="index", unit="photo", disable=args.quiet) as bar:
            for job in client.watch_job(job_id):
                bar.update(job.done + job.failed - bar.n)
                if job.stalled and not told:  # say so once, keep waiting: it may move again
                    bar.write(f"job {job_id} stalled: {job.hint}\n(still waiting; Ctrl-C stops "
                              f"waiting, the job goes on)", file=sys.stderr)
                told = job.stalled
    except KeyboardInterrupt:
        interrupted(f"stopped waiting; job {job_id} goes on without this command. "
                     f"`delf job {job_id}` shows its progress; if it stalls, `{resume}` continues it")
        return INTERRUPTED_EXIT
    _print_job(job)
    return 0 if job.failed == 0 else 1


def cmd_resume(args) -> int:
    client = _client(args)
    job = client.resume_job(args.job_id)
    print(f"job {job.job_id}: resumed, {job.resent} photos sent to the workers again", flush=True)
    if job.awaiting_upload:
        # Only the client has these photos: the job cannot complete until they are streamed
        # again, so waiting for it here would wait forever.
        print(f"  {job.awaiting_upload} unfinished photos were sent as bytes, which the server does not "
              f"keep: the job completes once they are sent again with "
              f"`delf ingest PATH --resume {job.job_id}` (PATH: the folder or manifest it was started "
              f"from; photos already done are skipped)", file=sys.stderr)
        return 1
    return _watch(client, job, args, resume=f"delf resume {job.job_id}")


def cmd_job(args) -> int:
    _print_job(_client(args).get_job(args.job_id))
    return 0


def cmd_cancel(args) -> int:
    _print_job(_client(args).cancel_job(args.job_id))
    return 0


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
    client = _client(args)
    response = client.search(photo, image_id=args.id, top_k=args.top_k, box=args.box,
                             filter=dict(args.filter), correspondences=args.show is not None)
    print(f"{len(response.matches)} matches ({response.query_features} query features, "
          f"{response.elapsed_s:.2f} s)")
    limit = None if args.wide else ID_COLUMN_MAX
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
    if args.show is not None:
        from delf_tools.show import write_show

        print(f"evidence drawn in {write_show(args.show, client, response, photo, args.id, args.box)}")
    return 0


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
    info = _client(args).add_image(args.image_id, _photo_file(args.photo, "add"), meta)
    print(f"added {info.image_id}: {info.width}x{info.height}, {info.num_features} features")
    return 0


def cmd_get(args) -> int:
    info = _client(args).get_image(args.image_id)
    print(f"{info.image_id}: {info.width}x{info.height}, {info.num_features} features, pca {info.pca_id}")
    for k, v in sorted(info.metadata.items()):
        print(f"  {k} = {v}")
    return 0


def cmd_delete(args) -> int:
    reply = _client(args).delete_image(args.image_id)
    print(f"deleted {reply.image_id} ({reply.descriptors_removed} descriptors)")
    return 0


def cmd_stats(args) -> int:
    s = _client(args).stats()
    print(f"images {s.images}  descriptors {s.descriptors}  model {s.model}  pca {s.pca_id}")
    for queue, depth in sorted(s.queue_depths.items()):
        print(f"  queue {queue}: {depth} waiting")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="delf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(p, GLOBAL_DEFAULTS)
    sub = p.add_subparsers(dest="command", required=True)
    _tool_commands(sub)
    _job_commands(sub)
    _index_commands(sub)
    # The global options after the command too (`delf search photo.jpg --gateway HOST`):
    # there they default to "not given", so they never undo one given before the command.
    for name, command in sub.choices.items():
        if name not in TOOL_COMMANDS:
            _global_options(command, dict.fromkeys(GLOBAL_DEFAULTS, argparse.SUPPRESS))
    return p


def _global_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--gateway", default=defaults["gateway"],
                   help="gateway address: HOST, HOST:PORT or http://HOST:PORT (port 50051 when none is given; "
                        "default: $DELF_GATEWAY or 127.0.0.1:50051)")
    p.add_argument("--timeout", type=_seconds, default=defaults["timeout"], help="seconds to wait for an answer")
    p.add_argument("--token", default=defaults["token"],
                   help="bearer token for a gateway with DELF_AUTH_TOKENS (default: $DELF_TOKEN; "
                        "prefer the variable: command lines are visible to other users)")
    p.add_argument("--tls-ca", default=defaults["tls_ca"], metavar="PEM",
                   help="connect with TLS, trusting this CA or self-signed certificate (default: $DELF_TLS_CA)")


def _tool_commands(sub) -> None:
    """Subcommands implemented by other modules, which parse their own arguments."""
    sub.add_parser("up", help="start the whole system on this machine (see `delf up --help`)", add_help=False)
    sub.add_parser("fit-pca", help="learn the descriptor PCA (see `delf fit-pca --help`)", add_help=False)
    sub.add_parser("train-attention", help="train the keypoint attention head on a manifest's group labels "
                                           "(see `delf train-attention --help`)", add_help=False)
    sub.add_parser("finetune", help="fine-tune the backbone with cross-entropy on a manifest's group labels "
                                    "(see `delf finetune --help`)", add_help=False)
    sub.add_parser("eval", help="retrieval quality against two baselines on a manifest (--report: an HTML "
                                "page of every query's results; ingests into the running index; "
                                "see `delf eval --help`)",
                   add_help=False)


def _job_commands(sub) -> None:
    s = sub.add_parser("ingest", help="index every photo below a folder, or listed in a .csv/.jsonl "
                                      "manifest, as one asynchronous job")
    s.add_argument("path", help="a folder, or a manifest: .csv (columns id, location, metadata ...) or "
                                ".jsonl ({\"id\", \"location\", \"metadata\"} per line)")
    s.add_argument("--server-paths", action="store_true",
                   help="manifest file paths are read by the server (under its DELF_INGEST_ROOTS), "
                        "sent as written; default: this client reads them and sends the bytes")
    s.add_argument("--resume", metavar="JOB_ID", default=None,
                   help="continue this interrupted job: photos it finished are skipped, the rest sent")
    s.add_argument("--no-wait", dest="wait", action="store_false", help="return once the photos are sent")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("resume", help="re-send an interrupted job's unfinished photos (finished ones "
                                      "are not redone)")
    s.add_argument("job_id")
    s.add_argument("--no-wait", dest="wait", action="store_false", help="return at once")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("job", help="a job's state and errors")
    s.add_argument("job_id")
    s.set_defaults(func=cmd_job)

    s = sub.add_parser("cancel", help="stop a job (photos not yet processed are skipped)")
    s.add_argument("job_id")
    s.set_defaults(func=cmd_cancel)


def _index_commands(sub) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """The `delf` command. A reader that goes away early (`delf search photo.jpg | head -3`)
    ends it quietly, as it ends other Unix tools, with status 141 (128 + SIGPIPE)."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python flushes stdout once more at exit: point it at /dev/null so that flush is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_EXIT


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOL_COMMANDS:
        return run_tool(argv[0], argv[1:])
    p = parser()
    args, rest = p.parse_known_args(argv)
    try:  # read once, before anything runs: HOST, HOST:PORT or a URL, port 50051 by default
        args.gateway = gateway_target(args.gateway or config.get("DELF_GATEWAY"))
    except (AddressError, config.ConfigError) as exc:
        print(f"delf {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command in TOOL_COMMANDS:  # global options first: `delf --gateway ADDR eval MANIFEST ...`
        return run_tool(args.command, rest, {name: getattr(args, name) for name in GLOBAL_DEFAULTS})
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
