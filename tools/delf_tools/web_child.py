"""The web service in `delf up`: the HTTP/JSON API and console (`python -m delf_web`).

Its address is ``--http-addr`` (DELF_HTTP_ADDR, 127.0.0.1:8080); when another process
holds that port (or it is 0), a free port on the same host is used instead and said so,
as for the embedded Redis: the address is printed with the rest when the system is
ready, and written in the ready file. It dials the gateway at the address `delf up`
gives it, with the gateway's TLS roots when TLS is on (DELF_TLS_CERT), and serves
TLS itself with the same certificate.
"""
from __future__ import annotations

import importlib.util
import socket
import sys

from delf_common import config
from delf_common.addresses import AddressError, address_in_use, listen_host_port
from delf_tools.broker import free_port
from delf_tools.children import ChildSpec
from delf_tools.logsink import say
from delf_tools.readiness import LaunchError, dial_addr

NAME = "web"


def choose_addr(http_addr: str) -> str:
    """`http_addr`, or the same host with a free port when that one is taken (or 0)."""
    try:
        host, port = listen_host_port(http_addr)
        taken = address_in_use(http_addr)
    except AddressError:
        raise LaunchError(f"--http-addr {http_addr!r}: expected HOST:PORT, e.g. 127.0.0.1:8080") from None
    if port and not taken:
        return http_addr
    shown_host = f"[{host}]" if ":" in host else host
    chosen = f"{shown_host}:{free_port()}"
    if port:
        say(f"{http_addr} is taken; the web console uses {chosen} instead")
    return chosen


def missing() -> str | None:
    """Why the web service cannot run from this install (say, a virtual environment made
    before it existed: `make install` again), or None."""
    for module in ("delf_web", "fastapi", "uvicorn", "multipart"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"the module {module} is not installed (`make install`, or pip install -e .)"
    return None


def spec() -> ChildSpec:
    return ChildSpec(NAME, [sys.executable, "-m", "delf_web"])


def env(http_addr: str, grpc_addr: str) -> dict[str, str]:
    """What the web service's environment adds: where it listens, where the gateway is,
    and which certificate to trust for it (the CA, else the gateway's own)."""
    out = {"DELF_HTTP_ADDR": http_addr, "DELF_GATEWAY": dial_addr(grpc_addr)}
    if config.get("DELF_TLS_CERT"):
        out["DELF_TLS_CA"] = config.get("DELF_TLS_CA") or config.get("DELF_TLS_CERT")
    return out


def url(http_addr: str) -> str:
    scheme = "https" if config.get("DELF_TLS_CERT") else "http"
    return f"{scheme}://{dial_addr(http_addr)}"


def serving(http_addr: str) -> bool:
    """Whether the web service accepts connections yet."""
    host, _, port = dial_addr(http_addr).rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False
