"""Bearer-token authentication and TLS of the gateway, on real gateways started in-process.

No workers are needed: `GetJob` on an unknown id answers NOT_FOUND from the handler, so
an authorised call that reaches the handler is told apart from one refused by auth.
The test certificate is self-signed (CN localhost, SAN localhost and 127.0.0.1) and made
with the `openssl` command line at test time.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import free_port, redis_available, redis_db_url
from delf_common import config
from delf_common.client import DelfClient
from delf_common.proto.delf.v1 import delf_pb2, delf_pb2_grpc

REDIS_URL = redis_db_url(10)
TOKENS = ("s3cret-one", "s3cret-two")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not redis_available(REDIS_URL), reason=f"no Redis at {REDIS_URL}")


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key_path), "-out", str(cert_path), "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert_path, key_path


class Gateway:
    """A gateway built by build_server() under the given settings, started, and its address."""

    def __init__(self, **env: str):
        from delf_gateway.server import build_server

        with pytest.MonkeyPatch.context() as mp:
            for name in config.SETTINGS:
                mp.delenv(name, raising=False)
            mp.setenv("DELF_REDIS_URL", REDIS_URL)
            mp.setenv("DELF_QUEUE_PREFIX", f"delftest-sec-{uuid.uuid4().hex[:8]}")
            mp.setenv("DELF_HEALTH_REQUIRE", "redis")  # no workers here: health needs Redis only
            for name, value in env.items():
                mp.setenv(name, value)
            self.address = f"127.0.0.1:{free_port()}"
            self.server, self.port, self.stop_event, self.watcher = build_server(self.address, max_workers=4)
        self.server.start()
        self.watcher.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.server.stop(grace=None).wait(5)
        self.watcher.join(5)


@pytest.fixture(scope="module")
def auth_gateway():
    gw = Gateway(DELF_AUTH_TOKENS=",".join(TOKENS))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def tls_gateway(cert):
    cert_path, key_path = cert
    gw = Gateway(DELF_AUTH_TOKENS=TOKENS[0], DELF_TLS_CERT=str(cert_path), DELF_TLS_KEY=str(key_path))
    yield gw
    gw.stop()


@pytest.fixture
def no_delf_env(monkeypatch):
    for name in config.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


NO_SUCH_JOB = "0123456789abcdef0123456789abcdef"  # a well-formed job id that names no job


def get_job(channel: grpc.Channel, metadata=None, timeout: float = 10.0):
    stub = delf_pb2_grpc.ImageSearchStub(channel)
    return stub.GetJob(delf_pb2.GetJobRequest(job_id=NO_SUCH_JOB), metadata=metadata, timeout=timeout)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def wait_serving(channel: grpc.Channel, timeout: float = 15.0) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def tls_channel(address: str, cert_path: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=cert_path.read_bytes())
    return grpc.secure_channel(address, credentials)


# -- authentication -----------------------------------------------------------------


def test_a_call_without_a_token_is_unauthenticated(auth_gateway):
    with grpc.insecure_channel(auth_gateway.address) as channel:
        code, details = code_of(lambda: get_job(channel))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing credentials" in details and "Bearer" in details


def test_a_wrong_token_is_unauthenticated(auth_gateway):
    with grpc.insecure_channel(auth_gateway.address) as channel:
        for token in ("wrong", TOKENS[0] + "x", TOKENS[0][:-1]):
            code, details = code_of(lambda: get_job(channel, [("authorization", f"Bearer {token}")]))  # noqa: B023 - called at once, inside the loop
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "not accepted" in details


@pytest.mark.parametrize("header", [TOKENS[0], f"Basic {TOKENS[0]}", "Bearer", "Bearer   ", f"Token {TOKENS[0]}"])
def test_a_malformed_header_is_unauthenticated(auth_gateway, header):
    with grpc.insecure_channel(auth_gateway.address) as channel:
        code, details = code_of(lambda: get_job(channel, [("authorization", header)]))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "malformed" in details


def test_every_accepted_token_reaches_the_handler(auth_gateway):
    with grpc.insecure_channel(auth_gateway.address) as channel:
        for token in TOKENS:
            code, details = code_of(lambda: get_job(channel, [("authorization", f"Bearer {token}")]))  # noqa: B023 - called at once, inside the loop
            assert code == grpc.StatusCode.NOT_FOUND, details
            assert NO_SUCH_JOB in details
        # The scheme is case-insensitive (RFC 6750).
        code, _ = code_of(lambda: get_job(channel, [("authorization", f"bearer {TOKENS[1]}")]))
        assert code == grpc.StatusCode.NOT_FOUND


def test_streaming_methods_need_a_token_too(auth_gateway):
    with grpc.insecure_channel(auth_gateway.address) as channel:
        stub = delf_pb2_grpc.ImageSearchStub(channel)
        code, _ = code_of(lambda: list(stub.WatchJob(delf_pb2.GetJobRequest(job_id=NO_SUCH_JOB), timeout=10)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = code_of(lambda: stub.StartIngestJob(iter([delf_pb2.IngestItem(image_id="a")]), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # With the token the stream reaches the handler (unknown job: NOT_FOUND).
        code, _ = code_of(lambda: list(stub.WatchJob(
            delf_pb2.GetJobRequest(job_id=NO_SUCH_JOB), metadata=[("authorization", f"Bearer {TOKENS[0]}")], timeout=10)))
        assert code == grpc.StatusCode.NOT_FOUND


def test_the_listings_need_a_token_too(auth_gateway):
    """ListImages and ListJobs (issue 22 item 3) are behind the same interceptor."""
    with grpc.insecure_channel(auth_gateway.address) as channel:
        stub = delf_pb2_grpc.ImageSearchStub(channel)
        for call, request in ((stub.ListImages, delf_pb2.ListImagesRequest()),
                              (stub.ListJobs, delf_pb2.ListJobsRequest())):
            code, _ = code_of(lambda: call(request, timeout=10))  # noqa: B023 - called at once, inside the loop
            assert code == grpc.StatusCode.UNAUTHENTICATED
        # With the token the call reaches the handler: its own checks answer.
        code, details = code_of(lambda: stub.ListJobs(delf_pb2.ListJobsRequest(page_size=500), timeout=10,
                                                      metadata=[("authorization", f"Bearer {TOKENS[0]}")]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 200" in details, details


def test_health_and_reflection_need_no_token(auth_gateway):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(auth_gateway.address) as channel:
        assert wait_serving(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "delf.v1.ImageSearch" in names


def test_without_tokens_auth_is_off(no_delf_env):
    gw = Gateway()
    try:
        with grpc.insecure_channel(gw.address) as channel:
            code, _ = code_of(lambda: get_job(channel))
            assert code == grpc.StatusCode.NOT_FOUND
    finally:
        gw.stop()


def test_the_client_library_and_cli_send_the_token(auth_gateway, no_delf_env, capsys):
    from delf_tools import cli

    with DelfClient(auth_gateway.address, token=TOKENS[1], timeout=10) as client:
        code, _ = code_of(lambda: client.get_job(NO_SUCH_JOB))
        assert code == grpc.StatusCode.NOT_FOUND
    no_delf_env.setenv("DELF_TOKEN", TOKENS[0])
    with DelfClient(auth_gateway.address, timeout=10) as client:
        code, _ = code_of(lambda: client.get_job(NO_SUCH_JOB))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = code_of(lambda: list(client.watch_job(NO_SUCH_JOB)))
        assert code == grpc.StatusCode.NOT_FOUND
    with DelfClient(auth_gateway.address, token="", timeout=10) as client:  # explicitly none
        code, _ = code_of(lambda: client.get_job(NO_SUCH_JOB))
        assert code == grpc.StatusCode.UNAUTHENTICATED

    no_delf_env.delenv("DELF_TOKEN")
    assert cli.main(["--gateway", auth_gateway.address, "--timeout", "10", "job", NO_SUCH_JOB]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "--token" in err
    assert cli.main(["--gateway", auth_gateway.address, "--timeout", "10", "--token", TOKENS[0], "job", NO_SUCH_JOB]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


# -- URL ingest -----------------------------------------------------------------------
# Refused at StartIngestJob, before anything is dispatched: no workers are needed, each
# item is a per-item error with its reason and the job completes.

REFUSED_URLS = {
    "file": ("file:///etc/passwd", "only http and https"),
    "ftp": ("ftp://example.com/a.jpg", "only http and https"),
    "loopback": ("http://127.0.0.1:8080/a.jpg", "loopback"),
    "loopback6": ("http://[::1]/a.jpg", "loopback"),
    "mapped": ("http://[::ffff:127.0.0.1]/a.jpg", "loopback"),
    "decimal": ("http://2130706433/a.jpg", "loopback"),
    "ten": ("http://10.0.0.1/a.jpg", "private"),
    "172": ("http://172.16.5.4/a.jpg", "private"),
    "192": ("http://192.168.0.1/a.jpg", "private"),
    "metadata": ("http://169.254.169.254/latest/meta-data/", "link-local"),
    "linklocal6": ("http://[fe80::1]/a.jpg", "link-local"),
    "zero": ("http://0.0.0.0/a.jpg", "unspecified"),
}


def _ingest_urls(gw, urls: dict[str, str]):
    with DelfClient(gw.address, timeout=10) as client:
        items = [delf_pb2.IngestItem(image_id=k, location=u) for k, u in urls.items()]
        job = client.start_ingest_job(items)
        return job, {e.image_id: e.reason for e in client.get_job(job.job_id).errors}


def test_url_ingest_is_off_by_default(no_delf_env):
    gw = Gateway()
    try:
        job, reasons = _ingest_urls(gw, {"web": "https://example.com/a.jpg", "file": "file:///etc/passwd"})
    finally:
        gw.stop()
    assert job.state == delf_pb2.JOB_STATE_COMPLETED and (job.total, job.done, job.failed) == (2, 0, 2)
    assert all("URL ingest is off" in r for r in reasons.values()), reasons


def test_url_ingest_refuses_other_schemes_and_private_ranges(no_delf_env):
    gw = Gateway(DELF_URL_INGEST="1")  # the gateway reads its settings once, when it is built
    try:
        job, reasons = _ingest_urls(gw, {k: u for k, (u, _) in REFUSED_URLS.items()})
    finally:
        gw.stop()
    gw = Gateway(DELF_URL_INGEST="1", DELF_URL_ALLOWED_HOSTS="photos.example.com")
    try:
        _, host_reasons = _ingest_urls(gw, {"other": "https://example.com/a.jpg",
                                            "suffix": "https://evilphotos.example.com.attacker.net/a.jpg"})
    finally:
        gw.stop()
    assert job.state == delf_pb2.JOB_STATE_COMPLETED and job.failed == len(REFUSED_URLS) and job.done == 0
    for key, (_, words) in REFUSED_URLS.items():
        assert words in reasons[key], (key, reasons[key])
    assert all("DELF_URL_ALLOWED_HOSTS" in r for r in host_reasons.values()), host_reasons


# -- TLS ----------------------------------------------------------------------------


def test_a_tls_client_with_the_ca_completes_the_handshake(tls_gateway, cert):
    cert_path, _ = cert
    with tls_channel(tls_gateway.address, cert_path) as channel:
        assert wait_serving(channel) == health_pb2.HealthCheckResponse.SERVING  # no token needed
        code, _ = code_of(lambda: get_job(channel, [("authorization", f"Bearer {TOKENS[0]}")]))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = code_of(lambda: get_job(channel))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    # localhost is in the certificate too.
    with tls_channel(f"localhost:{tls_gateway.port}", cert_path) as channel:
        code, _ = code_of(lambda: get_job(channel, [("authorization", f"Bearer {TOKENS[0]}")]))
        assert code == grpc.StatusCode.NOT_FOUND


def test_a_plaintext_client_cannot_talk_to_the_tls_port(tls_gateway):
    with grpc.insecure_channel(tls_gateway.address) as channel:
        code, _ = code_of(lambda: get_job(channel, [("authorization", f"Bearer {TOKENS[0]}")], timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        stub = health_pb2_grpc.HealthStub(channel)
        code, _ = code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_fails_the_handshake(tls_gateway, tmp_path):
    other = tmp_path / "other.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    with tls_channel(tls_gateway.address, other) as channel:
        code, _ = code_of(lambda: get_job(channel, [("authorization", f"Bearer {TOKENS[0]}")], timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_the_client_library_uses_delf_tls_ca_and_delf_token(tls_gateway, cert, no_delf_env):
    cert_path, _ = cert
    no_delf_env.setenv("DELF_TLS_CA", str(cert_path))
    no_delf_env.setenv("DELF_TOKEN", TOKENS[0])
    with DelfClient(tls_gateway.address, timeout=10) as client:
        client.wait_ready(10)
        code, details = code_of(lambda: client.get_job(NO_SUCH_JOB))
        assert code == grpc.StatusCode.NOT_FOUND, details
    with DelfClient(tls_gateway.address, token="wrong", timeout=10) as client:
        code, _ = code_of(lambda: client.get_job(NO_SUCH_JOB))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    no_delf_env.setenv("DELF_TLS_CA", str(cert_path.parent / "missing.pem"))
    with pytest.raises(config.ConfigError, match="DELF_TLS_CA"):
        DelfClient(tls_gateway.address)


def test_the_healthcheck_uses_tls_when_the_gateway_does(tls_gateway, cert, no_delf_env, capsys):
    from delf_gateway import healthcheck

    cert_path, _ = cert
    assert healthcheck.check(tls_gateway.address, tls=False, timeout=5) == 1  # plaintext cannot talk TLS
    assert healthcheck.check(tls_gateway.address, tls_ca=str(cert_path), timeout=5) == 0
    # In the gateway's container DELF_TLS_CERT is set: the check trusts that certificate.
    no_delf_env.setenv("DELF_TLS_CERT", str(cert_path))
    no_delf_env.setenv("DELF_GRPC_ADDR", f"0.0.0.0:{tls_gateway.port}")
    assert healthcheck.main([]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_tls_settings_fail_fast_with_a_clear_message(cert, tmp_path, no_delf_env):
    from delf_gateway.server import build_server

    cert_path, key_path = cert
    no_delf_env.setenv("DELF_REDIS_URL", REDIS_URL)
    no_delf_env.setenv("DELF_TLS_CERT", str(cert_path))
    with pytest.raises(config.ConfigError, match="DELF_TLS_CERT is set but DELF_TLS_KEY is not"):
        build_server(f"127.0.0.1:{free_port()}")
    no_delf_env.delenv("DELF_TLS_CERT")
    no_delf_env.setenv("DELF_TLS_KEY", str(key_path))
    with pytest.raises(config.ConfigError, match="DELF_TLS_KEY is set but DELF_TLS_CERT is not"):
        build_server(f"127.0.0.1:{free_port()}")
    no_delf_env.setenv("DELF_TLS_CERT", str(tmp_path / "nope.pem"))
    with pytest.raises(config.ConfigError, match="DELF_TLS_CERT=.*nope.pem.*cannot read"):
        build_server(f"127.0.0.1:{free_port()}")
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    no_delf_env.setenv("DELF_TLS_CERT", str(tmp_path / "empty.pem"))
    with pytest.raises(config.ConfigError, match="not a PEM file"):
        build_server(f"127.0.0.1:{free_port()}")


def test_the_gateway_process_exits_with_a_clear_startup_error(cert, no_delf_env):
    import os

    cert_path, _ = cert
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_")}
    env.update(DELF_REDIS_URL=REDIS_URL, DELF_GRPC_ADDR=f"127.0.0.1:{free_port()}",
               DELF_TLS_CERT=str(cert_path), DELF_QUEUE_PREFIX=f"delftest-sec-{uuid.uuid4().hex[:8]}")
    proc = subprocess.run([sys.executable, "-m", "delf_gateway"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "DELF_TLS_CERT is set but DELF_TLS_KEY is not" in proc.stderr
    assert "Traceback" not in proc.stderr
