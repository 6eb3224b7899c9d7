"""`delf eval`: retrieval quality of the running system against two baselines.

    delf eval MANIFEST [--gateway ADDR] [--json PATH] [--plot PATH] [--report PATH]
                       [--methods delf,global-gem,sift] [--limit N] [--conditions TSV]

MANIFEST is a tab-separated file with a header row and `path` (relative to the
manifest's folder) and `group` columns (`delf_tools.evaluation`). Every photo is
in the database; every photo whose group has another is a query, left out of its
own ranking; its positives are the other photos of its group. Ids are the path
without its extension (`a/b.jpg` -> `a/b`).

Methods (the same queries, top 100 ranked, searched by the indexed item, so the
latency is the search alone, without extracting the query again):

* ``delf``: the RUNNING system, through its gateway (``--gateway`` or DELF_GATEWAY).
  All photos are ingested as one job under their ids - into the running index, which
  keeps them afterwards (and whose other photos take part in the rankings): run it
  against a fresh collection (e.g. ``delf up --data-dir /tmp/evaldata``). Then one
  ``Search(image_id=..., top_k=100)`` per query. Ingest rate: the whole job, upload to
  indexed.
* ``global-gem``: one global vector per photo, as in the Milvus reverse-image-search
  demo: the same EfficientNet-Lite0 backbone (its 1280-channel head output, the deepest
  layer: best for a pooled descriptor in DELF-NOTES.md), GeM pooling (p = 3) at three
  scales (0.707, 1, 1.414 of the photo with its long side capped at 1024 px), the
  L2-normalised scale vectors averaged and L2-normalised; stored and searched (FLAT, inner
  product) in a temporary Milvus Lite file.
* ``sift``: RootSIFT (OpenCV SIFT, at most 1000 keypoints per photo, L1-normalised then
  square-rooted) with the system's voting (exact kNN: DELF_NEIGHBOURS nearest neighbours,
  DELF_RATIO against the next one, one vote per query descriptor and image), the gateway's
  shortlist (max(DELF_SHORTLIST, top_k)) and the verifier's verdict (``judge``) ranked by the
  shared score (`delf_common.ranking`), as in the system.

Metrics per method: mAP (`average_precision` over the top 100), precision@1,
recall@10, median and p95 search latency, ingest photos/s, and mAP, precision@1 and
recall@10 per condition of the queries (``by_condition``: from the manifest's `condition`
column or `note` `cond=NAME`, or ``--conditions`` {group: condition}); ``--plot`` draws the
interpolated precision-recall curves (averaged over queries) as a PNG with OpenCV;
``--report`` writes one self-contained HTML page to look at (`eval_report`): the summary
and the curves, then per method and query its thumbnail, AP, first results marked right
or wrong and the positives it missed with their rank, sortable by AP.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from delf_common import config
from delf_tools.eval_methods import connect, run_delf, run_global_gem, run_sift
from delf_tools.eval_metrics import JSON_KEYS, format_conditions, format_table, summarise
from delf_tools.eval_plot import plot_pr
from delf_tools.eval_report import write_report
from delf_tools.eval_set import TOP_K, EvalError, Photo, load_photos
from delf_tools.evaluation import queries_and_positives
# Also reachable as `eval_command.<name>` (tests and benchmark scripts use them).

METHODS = ("delf", "global-gem", "sift")


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="delf eval",
        description="Retrieval quality (mAP, precision@1, recall@10, latency, ingest rate) of the running "
                    "system ('delf') against two baselines ('global-gem': GeM vectors of the same backbone "
                    "in Milvus Lite; 'sift': RootSIFT with the same voting and RANSAC), on a manifest with "
                    "ground-truth groups. NOTE: method 'delf' ingests every photo of the manifest into the "
                    "RUNNING index (ids = path without extension), where they stay, and other photos of "
                    "that index take part in the rankings: run it against a system with a fresh, empty "
                    "collection (e.g. `delf up --data-dir /tmp/evaldata`).")
    p.add_argument("manifest", help="MANIFEST.tsv: header row, tab-separated, 'path' (relative to its folder) "
                                    "and 'group' columns")
    p.add_argument("--gateway", default=None, help="gateway address (default: $DELF_GATEWAY or 127.0.0.1:50051)")
    p.add_argument("--token", default=None, help="bearer token (default: $DELF_TOKEN)")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="CA to trust for a TLS gateway (default: $DELF_TLS_CA)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for one gateway answer (default 600)")
    p.add_argument("--methods", type=_methods, default=list(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON, {method: {...}}")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a precision-recall plot (PNG)")
    p.add_argument("--report", default=None, metavar="PATH",
                   help="write a self-contained HTML report (no network needed to view it): the summary "
                        "and precision-recall curves, then per method and query its thumbnail, AP, first "
                        "results marked right or wrong and the positives it missed with their rank; "
                        "sortable by AP")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the manifest's first N photos")
    p.add_argument("--conditions", default=None, metavar="TSV",
                   help="'group' and 'condition' columns: each group's condition, for per-condition figures "
                        "when the manifest names none (a 'condition' column, or a 'note' starting with "
                        "'cond=NAME'); docs/eval/landmarks-dev-conditions.tsv is landmarks-dev's")
    p.add_argument("--top-k", type=int, default=TOP_K, help=f"results ranked per query (default {TOP_K})")
    return p


def evaluate(photos: list[Photo], methods: list[str], client=None, top_k: int = TOP_K,
             log: Callable[[str], None] = print) -> dict[str, dict]:
    """{method: figures (JSON_KEYS plus pr_curve, and rankings: {query: ranked ids})} on the given photos."""
    groups = {p.image_id: p.group for p in photos}
    conditions = {p.image_id: p.condition for p in photos if p.condition}
    queries = queries_and_positives(groups)
    if not queries:
        raise EvalError("no group has two photos: there is nothing to query")
    log(f"{len(photos)} photos, {len(queries)} queries, methods {', '.join(methods)}")
    results = {}
    for m in methods:
        if m == "delf":
            run = run_delf(photos, queries, client, top_k, log)
        elif m == "global-gem":
            run = run_global_gem(photos, queries, top_k, log)
        else:
            run = run_sift(photos, queries, top_k, log)
        results[m] = summarise(run, queries, len(photos), conditions)
        results[m]["rankings"] = run.rankings
        log(f"{m}: mAP {results[m]['map']:.3f}")
    return results


def main(argv: list[str] | None = None, *, gateway: str | None = None, token: str | None = None,
         tls_ca: str | None = None, timeout: float | None = None) -> int:
    """`delf eval`; the keyword arguments are the `delf` command's global options."""
    import grpc

    args = parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    client = None
    try:
        photos = load_photos(args.manifest, args.limit, warn=lambda m: log(f"delf eval: {m}"),
                             conditions=args.conditions)
        if "delf" in args.methods:  # fail fast, before minutes of baseline work
            client = connect(args.gateway or gateway or config.get("DELF_GATEWAY"),
                             args.token if args.token is not None else token,
                             args.tls_ca if args.tls_ca is not None else tls_ca,
                             args.timeout or timeout)
        results = evaluate(photos, args.methods, client, args.top_k, log)
    except EvalError as exc:
        print(f"delf eval: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"delf eval: the gateway answered {exc.code().name}: {exc.details()}", file=sys.stderr)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print("  is the system still running? (`make up` or `delf up` starts it)", file=sys.stderr)
        elif exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            print("  the gateway requires a token: --token or DELF_TOKEN", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()

    print(format_table(results))
    if table := format_conditions(results):
        print("\n" + table)
    return _write_outputs(args, photos, results)


def _write_outputs(args: argparse.Namespace, photos: list[Photo], results: dict[str, dict]) -> int:
    """--json, --plot and --report; 2 when one cannot be written."""
    if args.json:
        out = {m: {k: r[k] for k in JSON_KEYS if k in r} for m, r in results.items()}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    try:
        if args.plot:
            plot_pr(results, args.plot)
        if args.report:
            write_report(args.report, photos, results, args.top_k, title=f"delf eval {Path(args.manifest).name}")
            print(f"report: {args.report}", file=sys.stderr)
    except EvalError as exc:
        print(f"delf eval: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
