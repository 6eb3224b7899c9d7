"""`delf`: the command line of the DELF image-retrieval service.

    delf up                                   start the whole system locally
    delf ingest FOLDER|MANIFEST [--resume JOB_ID]  index every photo below FOLDER, or listed in a
                                              .csv/.tsv/.jsonl manifest, as one job (or continue a job)
    delf resume JOB_ID                        re-send a stalled or interrupted job's lost photos
    delf job JOB_ID [--watch]                 a job's state (--watch: until it ends)
    delf jobs [--limit N] [--after JOB_ID]    the newest jobs
    delf cancel JOB_ID                        stop a job
    delf search PHOTO|--id ID [--top-k N] [--box x0,y0,x1,y1] [--filter KEY=VALUE ...]
                [--show matches.png|matches.html]  ... and draw each match's evidence
    delf add ID PHOTO | delf get ID | delf delete ID | delf stats
    delf images [--filter KEY=VALUE ...] [--limit N] [--after ID]   the indexed images, in id order
    delf fit-pca ...                          learn the PCA of the descriptors
    delf eval MANIFEST ... [--report R.html]  mAP etc. of the running system against two baselines
    delf train-attention MANIFEST ...         train the attention head (backbone frozen)
    delf finetune MANIFEST ...                fine-tune the backbone on landmark labels (GPU)

The gateway address comes from --gateway or DELF_GATEWAY (default 127.0.0.1:50051): HOST,
HOST:PORT or a URL (http://HOST:PORT), port 50051 when none is given; a bearer token from
--token or DELF_TOKEN; --tls-ca or DELF_TLS_CA (a PEM file of the CA to trust) switches to
TLS. These global options go before or after the command. --json (ingest, resume, job, jobs,
cancel, search, add, get, delete, stats, images): the result as one JSON document on stdout.

A mistake gets one short message on stderr (at most with the command's usage) and a
non-zero exit: 2 for a wrong invocation, 1 for an error the gateway reports, 130 for
Ctrl-C; never a traceback (DELF_TRACEBACK=1 shows one for an unexpected error).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from delf_common import config, contract
from delf_common.addresses import AddressError, gateway_target
from delf_tools.duplicates import add_command as add_duplicates_command, job_outcomes
from delf_tools.cli_contract import INTERRUPTED_EXIT, UsageError, interrupted, run_command, run_tool
from delf_tools.cli_index import count_argument, gateway_client, index_commands
from delf_tools.cli_json import print_json

GLOBAL_DEFAULTS = {"gateway": None, "timeout": 300.0, "token": None, "tls_ca": None}
# Commands implemented by other modules, which parse their own arguments.
TOOL_COMMANDS = ("up", "fit-pca", "train-attention", "finetune", "eval")
STATE_NAMES = {0: "UNSPECIFIED", 1: "RECEIVING", 2: "RUNNING", 3: "COMPLETED", 4: "CANCELLED"}
# The commands whose result --json prints as one JSON document (delf_tools.cli_json).
JSON_COMMANDS = ("ingest", "resume", "job", "jobs", "cancel", "search", "add", "get", "delete", "stats", "images")
JOBS_DEFAULT = 20  # what `delf jobs` prints without --limit
JOB_RECEIVING, JOB_COMPLETED, JOB_CANCELLED = 1, 3, 4  # delf.v1.JobState
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away




def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _print_job(job, out=None) -> None:
    out = out or sys.stdout  # the stdout of the moment (a test's capture, a redirection)
    stalled = f" (STALLED: no progress for {job.idle_s:.0f} s)" if job.stalled else ""
    print(f"job {job.job_id}: {STATE_NAMES.get(job.state, job.state)}{stalled}", file=out)
    indexed = job.done - job.unchanged - job.duplicates_skipped  # done: indexed, unchanged or skipped
    print(f"  total {job.total}  indexed {indexed}  failed {job.failed}" + job_outcomes(job), file=out)
    if job.rate:
        print(f"  rate {job.rate:.2f} photos/s" + (f"  eta {job.eta_s:.0f} s" if job.eta_s else ""), file=out)
    for err in job.errors:
        print(f"  failed {err.image_id}: {err.reason}", file=out)
    for image_id, other in sorted(job.duplicate_of.items()):
        print(f"  duplicate {image_id}: same bytes as {other}", file=out)
    if job.stalled and job.hint:
        print(f"  stalled: {job.hint}", file=out)
    out.flush()


def _ingest_source(args) -> tuple[Path, bool, int]:
    """(the folder or manifest, whether it is a manifest, how many photos), or UsageError."""
    from delf_common.client import photos_in
    from delf_common.manifest import ManifestError, is_manifest, read_manifest

    folder = Path(args.path)
    if not folder.exists():
        raise UsageError(f"no such file or folder: {folder}")
    manifest = folder.is_file() and is_manifest(folder)
    if not folder.is_dir() and not manifest:
        raise UsageError(f"{folder} is neither a folder nor a manifest (.csv, .tsv or .jsonl)")
    if args.server_paths and not manifest:
        raise UsageError("--server-paths applies to manifests only")
    if manifest:
        try:  # every problem of the manifest, with line numbers, before anything is sent
            return folder, True, len(read_manifest(folder, check_files=not args.server_paths))
        except ManifestError as exc:
            raise UsageError(f"bad manifest:\n{exc}") from None
    n = len(photos_in(folder))
    if n == 0:
        raise UsageError(f"no photos (jpg, png, webp, bmp, tif, gif) below {folder}")
    return folder, False, n


def cmd_ingest(args) -> int:
    from tqdm import tqdm

    folder, manifest, n = _ingest_source(args)
    client = gateway_client(args)
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
    if not args.json:
        print(f"job {job.job_id}" + (f" (resumed: {job.resent} re-sent by the server)" if args.resume else ""))
    if args.resume and job.awaiting_upload:
        print(f"  {job.awaiting_upload} unfinished photos of this job were sent as bytes and are not in "
              f"{folder}: send them with `delf ingest PATH --resume {job.job_id}`", file=sys.stderr)
    return _watch(client, job, args, resume=f"delf ingest {folder} --resume {job.job_id}")


def _watch(client, job, args, resume: str) -> int:
    """Progress until the job ends, then its summary (--json: the last Job); Ctrl-C stops
    waiting (the job goes on) and says how to follow it. `resume`: the command that
    continues the job should it stall. Without --wait: the summary of `job` at once."""
    from tqdm import tqdm

    if args.wait:
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
    if args.json:
        print_json(job)
    elif args.wait:
        _print_job(job)
    return 0 if job.failed == 0 or not args.wait else 1


def cmd_resume(args) -> int:
    """Resumes only what needs it: a finished job is finished, a moving one is left alone
    (its photos are queued or in progress), a stalled or interrupted one is resumed."""
    client = gateway_client(args)
    job = client.get_job(args.job_id)
    verdict = resume_verdict(job)
    if verdict is not None:
        if args.json:
            print_json({"job": job, "resumed": False, "reason": verdict})
        else:
            print(verdict, flush=True)
        return 0
    job = client.resume_job(args.job_id)
    if not args.json:
        print(f"job {job.job_id}: resumed, {job.resent} photos sent to the workers again", flush=True)
    if job.awaiting_upload:
        # Only the client has these photos: the job cannot complete until they are streamed
        # again, so waiting for it here would wait forever.
        print(f"  {job.awaiting_upload} unfinished photos were sent as bytes, which the server does not "
              f"keep, and their tasks are lost (neither queued nor held by a worker): the job completes "
              f"once they are sent again with `delf ingest PATH --resume {job.job_id}` (PATH: the folder or "
              f"manifest it was started from; photos already done are skipped)", file=sys.stderr)
        if args.json:
            print_json({"job": job, "resumed": True, "reason": "photos sent as bytes must be sent again"})
        return 1
    return _watch(client, job, args, resume=f"delf resume {job.job_id}")


def resume_verdict(job) -> str | None:
    """Why `delf resume` leaves this job alone (finished, or moving: its unfinished photos
    are queued or in progress), or None when it needs resuming (stalled, interrupted)."""
    left = max(job.total - job.done - job.failed, 0)
    if job.state == JOB_COMPLETED:
        return (f"job {job.job_id} is finished: {job.done} indexed, {job.failed} failed; nothing to resume "
                f"(`delf job {job.job_id}` lists its errors)")
    if job.stalled or job.state == JOB_CANCELLED:
        return None  # stalled, or cancelled: ResumeJob resumes an interrupted one, refuses the rest
    if job.state == JOB_RECEIVING:
        if job.idle_s >= contract.RESUME_STREAM_IDLE_S:  # the gateway's rule for a live stream
            return None  # its stream stopped: resumed
        return (f"job {job.job_id} is still receiving photos from its client ({job.total} so far); "
                f"nothing to resume; watch it with `delf job {job.job_id} --watch`")
    return (f"job {job.job_id} is moving: {left} queued or in progress, {job.done} done, {job.failed} failed; "
            f"nothing to resume; watch it with `delf job {job.job_id} --watch` (should it stall, no photo "
            f"finished for DELF_JOB_STALLED_AFTER_S, `delf resume {job.job_id}` re-sends what was lost)")


def cmd_job(args) -> int:
    client = gateway_client(args)
    job = client.get_job(args.job_id)
    if args.watch:
        args.wait = True
        return _watch(client, job, args, resume=f"delf resume {job.job_id}")
    if args.json:
        print_json(job)
    else:
        _print_job(job)
    return 0


def cmd_cancel(args) -> int:
    job = gateway_client(args).cancel_job(args.job_id)
    if args.json:
        print_json(job)
    else:
        _print_job(job)
    return 0


def cmd_jobs(args) -> int:
    """The newest jobs (--limit, 0: all), a page at a time."""
    import datetime

    client, jobs, token = gateway_client(args), [], args.after or ""
    while True:
        want = contract.JOBS_PAGE_MAX if not args.limit else min(args.limit - len(jobs), contract.JOBS_PAGE_MAX)
        page = client.list_jobs(want, token)
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token or (args.limit and len(jobs) >= args.limit):
            break
    if args.json:
        print_json({"jobs": jobs, "next_page_token": token})
        return 0
    print(f"{'job id':<32}  {'state':<9} {'total':>6} {'indexed':>7} {'failed':>6}  created (UTC)")
    for j in jobs:
        created = datetime.datetime.fromtimestamp(j.created_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{j.job_id:<32}  {STATE_NAMES.get(j.state, j.state):<9} {j.total:>6} {j.done:>7} {j.failed:>6}  "
              f"{created}{'  STALLED' if j.stalled else ''}")
    more = f"; older ones: `delf jobs --after {token}`" if token else ""
    print(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}{more}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="delf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(p, GLOBAL_DEFAULTS)
    sub = p.add_subparsers(dest="command", required=True)
    _tool_commands(sub)
    _job_commands(sub)
    index_commands(sub)
    add_duplicates_command(sub)
    # The global options after the command too (`delf search photo.jpg --gateway HOST`):
    # there they default to "not given", so they never undo one given before the command.
    for name, command in sub.choices.items():
        if name not in TOOL_COMMANDS:
            _global_options(command, dict.fromkeys(GLOBAL_DEFAULTS, argparse.SUPPRESS))
        if name in JSON_COMMANDS:
            command.add_argument("--json", action="store_true",
                                 help="print the result as one JSON document on stdout (nothing else there)")
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
    s = sub.add_parser("ingest", help="index every photo below a folder, or listed in a .csv/.tsv/.jsonl "
                                      "manifest, as one asynchronous job")
    s.add_argument("path", help="a folder, or a manifest: .csv (columns id, location, metadata ...), .tsv "
                                "(location or path, optional id; as `delf eval` reads them) or .jsonl "
                                "({\"id\", \"location\", \"metadata\"} per line)")
    s.add_argument("--server-paths", action="store_true",
                   help="manifest file paths are read by the server (under its DELF_INGEST_ROOTS), "
                        "sent as written; default: this client reads them and sends the bytes")
    s.add_argument("--resume", metavar="JOB_ID", default=None,
                   help="continue this interrupted job: photos it finished are skipped, the rest sent")
    s.add_argument("--no-wait", dest="wait", action="store_false", help="return once the photos are sent")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("resume", help="re-send a stalled or interrupted job's lost photos (a job still "
                                      "moving is left alone; finished photos are not redone)")
    s.add_argument("job_id")
    s.add_argument("--no-wait", dest="wait", action="store_false", help="return at once")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("job", help="a job's state and errors")
    s.add_argument("job_id")
    s.add_argument("--watch", action="store_true", help="follow its progress until it ends")
    s.add_argument("--quiet", action="store_true", help="with --watch: no progress bar")
    s.set_defaults(func=cmd_job)

    s = sub.add_parser("jobs", help="the newest jobs (id, state, counts, when created)")
    s.add_argument("--limit", type=count_argument, default=JOBS_DEFAULT, metavar="N",
                   help="at most N jobs (default: %(default)s; 0: all the gateway keeps)")
    s.add_argument("--after", default=None, metavar="JOB_ID", help="start after this job (older ones)")
    s.set_defaults(func=cmd_jobs)

    s = sub.add_parser("cancel", help="stop a job (photos not yet processed are skipped)")
    s.add_argument("job_id")
    s.set_defaults(func=cmd_cancel)


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
