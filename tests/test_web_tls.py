"""The web service in front of a gateway with bearer tokens and TLS (issue 24): it serves
HTTPS with the gateway's certificate, dials the gateway over TLS (DELF_TLS_CA), checks the
same tokens and passes the caller's on. Real gateways started in-process as in
tests/test_security.py (no workers: GetJob on an unknown id answers NOT_FOUND from the
gateway's handler, so a call that crossed TLS with an accepted token is told apart)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from conftest import free_port
from test_security import TOKENS, Gateway, cert  # noqa: F401 - cert: the fixture

UNKNOWN_JOB = "/api/v1/jobs/" + "0" * 32


class Web:
    """`python -m delf_web` with the given settings, until stopped."""

    def __init__(self, scheme: str, verify, **env: str):
        self.addr = f"127.0.0.1:{free_port()}"
        self.base = f"{scheme}://{self.addr}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DELF_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "delf_web"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**clean, "DELF_HTTP_ADDR": self.addr, **env})
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(self.base + "/openapi.json", timeout=2, verify=verify)
                return
            except requests.ConnectionError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "the web service did not start"
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tls_web(cert):  # noqa: F811 - the imported `cert` fixture is this one's argument
    cert_path, key_path = cert
    gw = Gateway(DELF_AUTH_TOKENS=TOKENS[0], DELF_TLS_CERT=str(cert_path), DELF_TLS_KEY=str(key_path))
    web = Web("https", str(cert_path), DELF_GATEWAY=gw.address, DELF_AUTH_TOKENS=TOKENS[0],
              DELF_TLS_CERT=str(cert_path), DELF_TLS_KEY=str(key_path), DELF_TLS_CA=str(cert_path))
    yield web, str(cert_path)
    web.stop()
    gw.stop()


@pytest.fixture(scope="module")
def passthrough_web():
    """A web service without tokens of its own in front of a gateway with tokens."""
    gw = Gateway(DELF_AUTH_TOKENS=",".join(TOKENS))
    web = Web("http", True, DELF_GATEWAY=gw.address)
    yield web
    web.stop()
    gw.stop()


def test_https_with_the_gateways_certificate_and_tls_to_the_gateway(tls_web):
    web, ca = tls_web
    ok = requests.get(web.base + UNKNOWN_JOB, headers={"Authorization": f"Bearer {TOKENS[0]}"}, verify=ca, timeout=30)
    assert ok.status_code == 404 and ok.json()["error"]["code"] == "NOT_FOUND", ok.text  # the gateway's handler
    health = requests.get(web.base + "/api/v1/health", verify=ca, timeout=30)
    assert health.status_code == 200 and health.json()["gateway"] == "SERVING"
    refused = requests.get(web.base + UNKNOWN_JOB, verify=ca, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHENTICATED"
    with pytest.raises(requests.ConnectionError):
        requests.get(web.base.replace("https://", "http://") + "/openapi.json", timeout=10)


def test_the_callers_token_reaches_the_gateway(passthrough_web):
    base = passthrough_web.base
    for token in TOKENS:
        r = requests.get(base + UNKNOWN_JOB, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 404, r.text
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.get(base + UNKNOWN_JOB, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHENTICATED", r.text
        assert "Traceback" not in r.text
