"""The URL fetcher itself (delf_common.fetch), in process, against a local HTTP server:
which addresses need DELF_URL_ALLOW_PRIVATE and which are always refused, the resolved
address checked with the host name kept, the settings and limits, and errors that
say whether a retry may help. URL items on a running system are in tests/test_ingest.py.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from photo_server import PhotoServer

from delf_common import fetch


@pytest.fixture(scope="module")
def web():
    server = PhotoServer()
    yield server
    server.close()


# --------------------------------------------------------------------------- the fetcher itself


@pytest.mark.parametrize("address", [
    "10.0.0.1", "10.255.255.254", "172.16.0.1", "172.31.255.1", "192.168.1.1", "127.0.0.1", "127.8.9.10",
    "100.64.0.1", "::1", "fc00::1", "fd12:3456::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::",
    "64:ff9b::a00:1",
])
def test_private_and_loopback_addresses_need_the_setting(address):
    assert fetch.address_refusal(address, allow_private=False) is not None
    assert fetch.address_refusal(address, allow_private=True) is None


@pytest.mark.parametrize("address", [
    "169.254.169.254", "169.254.0.1", "fe80::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "240.0.0.1",
    "255.255.255.255", "::ffff:169.254.169.254", "192.0.2.1", "2001:db8::1",
])
def test_link_local_unspecified_multicast_and_reserved_addresses_are_always_refused(address):
    assert fetch.address_refusal(address, allow_private=False) is not None
    assert fetch.address_refusal(address, allow_private=True) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert fetch.address_refusal(address, allow_private=False) is None


@pytest.fixture
def url_env(monkeypatch):
    for name in ("DELF_URL_INGEST", "DELF_URL_ALLOWED_HOSTS", "DELF_URL_ALLOW_PRIVATE", "DELF_URL_TIMEOUT_S",
                 "DELF_MAX_IMAGE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DELF_URL_INGEST", "1")
    return monkeypatch


def test_fetch_checks_the_resolved_address_and_keeps_the_host_name(url_env, web):
    web.bodies["/f.jpg"] = b"photo bytes"
    url = web.url("/f.jpg", host="localhost")
    with pytest.raises(fetch.FetchError) as err:  # localhost resolves to loopback: refused by default
        fetch.fetch_url(url, fetch.FetchPolicy.from_env())
    assert err.value.code == "PERMISSION_DENIED" and "loopback" in err.value.message and not err.value.transient
    url_env.setenv("DELF_URL_ALLOW_PRIVATE", "1")
    before = len(web.requests)
    assert fetch.fetch_url(url, fetch.FetchPolicy.from_env()) == b"photo bytes"
    assert web.requests[before:] == [("/f.jpg", f"localhost:{web.port}")]  # Host header kept


def test_fetch_off_by_default_schemes_hosts_and_limits(url_env, web):
    url_env.setenv("DELF_URL_ALLOW_PRIVATE", "1")
    web.bodies["/big.jpg"] = b"x" * 5000
    url_env.setenv("DELF_URL_INGEST", "0")
    with pytest.raises(fetch.FetchError, match="URL ingest is off"):
        fetch.fetch_url(web.url("/big.jpg"), fetch.FetchPolicy.from_env())
    url_env.setenv("DELF_URL_INGEST", "1")
    for bad in ("file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/x", "data:,hello"):
        with pytest.raises(fetch.FetchError, match="only http and https"):
            fetch.fetch_url(bad, fetch.FetchPolicy.from_env())
    with pytest.raises(fetch.FetchError) as err:
        fetch.fetch_url(web.url("/big.jpg"), dataclasses.replace(fetch.FetchPolicy.from_env(), max_bytes=4000))
    assert err.value.code == "RESOURCE_EXHAUSTED" and "DELF_MAX_IMAGE_BYTES" in err.value.message
    url_env.setenv("DELF_URL_ALLOWED_HOSTS", "example.com, photos.example.org")
    with pytest.raises(fetch.FetchError, match="not in DELF_URL_ALLOWED_HOSTS"):
        fetch.fetch_url(web.url("/big.jpg"), fetch.FetchPolicy.from_env())
    allowed = fetch.FetchPolicy.from_env().allowed_hosts
    assert fetch.host_allowed("img.example.com", allowed) and fetch.host_allowed("EXAMPLE.com.", allowed)
    assert not fetch.host_allowed("badexample.com", allowed) and not fetch.host_allowed("example.com.evil.net", allowed)


def test_fetch_errors_say_whether_to_retry(url_env, web):
    url_env.setenv("DELF_URL_ALLOW_PRIVATE", "1")
    web.bodies["/once.jpg"] = b"ok"
    web.fail_first["/once.jpg"] = 1
    with pytest.raises(fetch.FetchError) as err:
        fetch.fetch_url(web.url("/once.jpg"), fetch.FetchPolicy.from_env())
    assert err.value.transient and "503" in err.value.message and err.value.retry_after == 0
    assert fetch.fetch_url(web.url("/once.jpg"), fetch.FetchPolicy.from_env()) == b"ok"
    with pytest.raises(fetch.FetchError) as err:
        fetch.fetch_url(web.url("/absent.jpg"), fetch.FetchPolicy.from_env())
    assert not err.value.transient and err.value.code == "NOT_FOUND"
    web.redirects["/loop"] = "/loop"
    with pytest.raises(fetch.FetchError, match="redirects"):
        fetch.fetch_url(web.url("/loop"), fetch.FetchPolicy.from_env())
    from conftest import free_port

    with pytest.raises(fetch.FetchError) as err:  # nobody listens: a connection error, retried
        fetch.fetch_url(f"http://127.0.0.1:{free_port()}/x.jpg", fetch.FetchPolicy.from_env())
    assert err.value.transient and err.value.code == "UNAVAILABLE"
