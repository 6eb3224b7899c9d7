"""Issue 22, item 2: clear messages, never a traceback. Every mistake a person makes with
the `delf` command ends in one short message on stderr (at most with the command's
usage) and a non-zero exit; gateway addresses are read one way (HOST, HOST:PORT, a URL,
port 50051 by default); the global options go before or after the command; Ctrl-C while
`delf ingest` waits says that the job goes on and how to follow it.

No system runs here: the invocations fail before anything is sent, or against a port
where nothing listens."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import free_port
from delf_common.addresses import AddressError, gateway_target
from delf_common.client import DelfClient
from delf_common.proto.delf.v1 import delf_pb2
from delf_tools import cli
from photos import jpeg, sample_photo

MAX_STDERR_LINES = 12  # the message, at most with the command's usage (argparse prints 5-7 lines)
NOWHERE = f"127.0.0.1:{free_port()}"  # nothing listens there

# (invocation, a piece of the message it must print)
BAD_INVOCATIONS = [
    ("search {folder}", "is a folder; search takes one photo"),
    ("search {photo} --top-k -3", "--top-k: must be at least 1"),
    ("search {photo} --top-k 0", "--top-k: must be at least 1"),
    ("search {photo} --top-k many", "--top-k: expected a whole number"),
    ("search {photo} --show {tmp}/missing/m.png --gateway {nowhere}", "the folder"),
    ("search {photo} --show {tmp}/m.gif", "--show writes a .png or an .html file"),
    ("search {tmp}/missing.jpg --gateway {nowhere}", "no such file"),
    ("search", "give a PHOTO or --id ID"),
    ("search {photo} --id other", "give a PHOTO or --id ID"),
    ("search {photo} --box 1,2,3", "expected four numbers"),
    ("search {photo} --filter city", "expected KEY=VALUE"),
    ("search {photo} --gateway {nowhere}", "is the gateway running at"),
    ("ingest {tmp}/missing", "no such file or folder: "),
    ("ingest {text}", "is neither a folder nor a manifest (.csv, .tsv or .jsonl)"),
    ("ingest {bad_tsv}", "the header needs the columns location (or path)"),
    ("ingest {empty}", "no photos"),
    ("ingest {folder} --server-paths", "--server-paths applies to manifests only"),
    ("ingest {bad_manifest}", "bad manifest"),
    ("add one {folder}", "is a folder; add takes one photo"),
    ("add one {tmp}/missing.jpg", "no such file"),
    ("add one {photo} --meta city", "expected KEY=VALUE"),
    ("--gateway ftp://host stats", "unknown scheme 'ftp'"),
    ("stats --gateway host:99999", "the port must be a number from 1 to 65535"),
    ("stats --gateway http://host:5/path", "no path"),
    ("stats --gateway", "expected one argument"),
    ("--timeout 0 stats", "--timeout: must be more than 0"),
    ("stats --timeout soon", "--timeout: expected a number of seconds"),
    ("--gateway {nowhere} stats", "UNAVAILABLE"),
    ("job", "the following arguments are required: job_id"),
    ("job 0123 --gateway {nowhere}", "UNAVAILABLE"),
    ("explode", "invalid choice"),
    ("", "the following arguments are required: command"),
    ("stats extra", "unrecognized arguments: extra"),
    ("--tls-ca {tmp}/missing.pem stats --gateway {nowhere}", "missing.pem"),
    ("up --extractors 0", "must be at least 1"),
    ("images --limit -1", "--limit: must be 0 (all) or more"),
    ("images --limit some", "--limit: expected a whole number"),
    ("images --filter city", "expected KEY=VALUE"),
    ("jobs --limit -2", "--limit: must be 0 (all) or more"),
    ("images --gateway {nowhere} --json", "UNAVAILABLE"),
    ("stats --json extra", "unrecognized arguments: extra"),
    ("up --json", "unrecognized arguments"),
    ("up --redis-port 70000", "--redis-port must be between 0 and 65535"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "folder").mkdir()
    (tmp / "folder" / "a.jpg").write_bytes(jpeg(sample_photo("coffee")[:200, :200]))
    (tmp / "empty").mkdir()
    (tmp / "notes.txt").write_text("not a photo\n")
    (tmp / "bad.csv").write_text("this,is\nnot,a manifest\n")
    (tmp / "bad.tsv").write_text("photo\tgroup\na.jpg\tone\n")
    return {"tmp": tmp, "folder": tmp / "folder", "photo": tmp / "folder" / "a.jpg", "empty": tmp / "empty",
            "text": tmp / "notes.txt", "bad_manifest": tmp / "bad.csv", "bad_tsv": tmp / "bad.tsv",
            "nowhere": NOWHERE}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: the usage and the error, status 2
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table_has_enough_rows():
    assert len(BAD_INVOCATIONS) >= 25


@pytest.mark.parametrize("invocation, expected", BAD_INVOCATIONS, ids=[i for i, _ in BAD_INVOCATIONS])
def test_a_bad_invocation_gets_a_short_message_and_a_non_zero_exit(invocation, expected, places, capsys,
                                                                   monkeypatch):
    monkeypatch.delenv("DELF_GATEWAY", raising=False)
    monkeypatch.delenv("DELF_TLS_CA", raising=False)
    code, out, err = run_cli(invocation.format(**places).split(), capsys)
    assert code not in (0, None), (code, out, err)
    assert expected in err, err
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) <= MAX_STDERR_LINES, err


def test_the_process_prints_no_traceback_either(places):
    """The same contract through the installed entry point (a real process, real exit)."""
    for argv in (["search", str(places["folder"])], ["search", str(places["photo"]), "--top-k", "-3"],
                 ["--gateway", "http://" + NOWHERE, "stats"]):
        run = subprocess.run([sys.executable, "-m", "delf_tools.cli", *argv], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode != 0 and run.stderr.strip() and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("written, target", [
    ("127.0.0.1", "127.0.0.1:50051"),
    ("127.0.0.1:50052", "127.0.0.1:50052"),
    ("http://127.0.0.1:50051", "127.0.0.1:50051"),
    ("https://delf.example.org/", "delf.example.org:50051"),
    ("grpc://gateway:7000", "gateway:7000"),
    ("localhost", "localhost:50051"),
    ("[::1]:6000", "[::1]:6000"),
    ("::1", "[::1]:50051"),
    ("dns:///gateway:50051", "dns:///gateway:50051"),
])
def test_gateway_addresses_are_read_one_way_with_port_50051_by_default(written, target):
    assert gateway_target(written) == target
    with DelfClient(written) as client:  # the public client reads them the same way
        assert client.target == target


@pytest.mark.parametrize("written", ["", "ftp://host", "host:0", "host:x", "http://host/path", "a b"])
def test_unreadable_gateway_addresses_say_what_was_expected(written):
    with pytest.raises(AddressError):
        gateway_target(written)


def test_global_options_go_before_or_after_the_command():
    p = cli.parser()
    after = p.parse_args(["search", "q.jpg", "--gateway", "h:1", "--timeout", "5", "--token", "t"])
    before = p.parse_args(["--gateway", "h:1", "--timeout", "5", "--token", "t", "search", "q.jpg"])
    for args in (after, before):
        assert (args.gateway, args.timeout, args.token, args.photo) == ("h:1", 5.0, "t", "q.jpg")
    plain = p.parse_args(["stats"])
    assert (plain.gateway, plain.timeout, plain.tls_ca) == (None, 300.0, None)


class _FakeClient:
    """A gateway that takes the upload and names the job; Ctrl-C comes while sending or
    while waiting."""

    def __init__(self, interrupt_while: str):
        self.interrupt_while = interrupt_while

    def ingest_folder(self, folder, on_sent=None, resume_job=None, on_job=None):
        on_job("job1")
        if self.interrupt_while == "sending":
            raise KeyboardInterrupt
        return delf_pb2.Job(job_id="job1", total=1)

    def watch_job(self, job_id):
        yield delf_pb2.Job(job_id=job_id, total=1)
        raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt_while", ["sending", "waiting"])
def test_ctrl_c_during_ingest_says_the_job_goes_on_and_how_to_follow_it(interrupt_while, places, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(cli, "gateway_client", lambda args: _FakeClient(interrupt_while))
    code, out, err = run_cli(["ingest", str(places["folder"]), "--quiet"], capsys)
    assert code == 130 and "Traceback" not in out + err, (code, err)
    assert f"delf ingest {places['folder']} --resume job1" in err, err
    if interrupt_while == "waiting":
        assert "job job1 goes on" in err and "delf job job1" in err, err


@pytest.mark.parametrize("state, stalled, says", [
    (delf_pb2.JOB_STATE_COMPLETED, False, "is finished: 7 indexed, 1 failed; nothing to resume"),
    (delf_pb2.JOB_STATE_RUNNING, False, "is moving: 2 queued or in progress, 7 done, 1 failed; nothing to resume; "
                                        "watch it with `delf job J --watch`"),
    (delf_pb2.JOB_STATE_RECEIVING, False, "is still receiving photos from its client"),
    (delf_pb2.JOB_STATE_RUNNING, True, None),    # stalled: resumed
    (delf_pb2.JOB_STATE_RECEIVING, True, None),  # its stream stopped: resumed
    (delf_pb2.JOB_STATE_CANCELLED, False, None),  # interrupted: resumed; cancelled by a person: the server says no
])
def test_resume_resumes_only_a_job_that_needs_it(state, stalled, says):
    """Issue 22 item 4: `delf resume` of a finished or moving job says so and exits 0."""
    job = delf_pb2.Job(job_id="J", state=state, total=10, done=7, failed=1, stalled=stalled,
                       idle_s=300.0 if stalled else 1.0)
    verdict = cli.resume_verdict(job)
    assert verdict is None if says is None else says in verdict, verdict
    if state == delf_pb2.JOB_STATE_RECEIVING and not stalled:  # no item for 30 s: its stream died
        job.idle_s = 31.0
        assert cli.resume_verdict(job) is None
