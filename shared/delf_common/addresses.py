"""Gateway addresses, read one way everywhere.

`gateway_target` turns what a person writes for the gateway (``--gateway``, DELF_GATEWAY,
`DelfClient(target)`) into the ``host:port`` gRPC dials: ``host``, ``host:port``,
``[::1]:port`` or a URL with a scheme (``http://host:port``, ``https://host``, ``grpc://``),
port 50051 when none is given. gRPC's own target forms (``dns:///host:port``, ``unix:PATH``,
``ipv4:``, ``ipv6:``) pass through unchanged.

`address_in_use` says whether a listen address (DELF_GRPC_ADDR) is already served: the
gateway refuses an address another process listens on (gRPC would otherwise share it
through SO_REUSEPORT, and the kernel would split clients between two systems).
"""
from __future__ import annotations

import errno
import re
import socket
from urllib.parse import urlsplit

DEFAULT_GATEWAY_PORT = 50051
URL_SCHEMES = ("http", "https", "grpc", "grpcs")
GRPC_TARGET_PREFIXES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.%\w]+\]|[\w.-]+)$")


class AddressError(ValueError):
    """An address that cannot be read; the message says what was expected."""


def gateway_target(text: str, default_port: int = DEFAULT_GATEWAY_PORT) -> str:
    """The ``host:port`` to dial for a gateway written as `text` (module docstring)."""
    given = text
    text = (text or "").strip()
    if not text:
        raise AddressError("the gateway address is empty: expected HOST, HOST:PORT or http://HOST:PORT")
    if text.lower().startswith(GRPC_TARGET_PREFIXES):
        return text
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme.lower() not in URL_SCHEMES:
            raise AddressError(f"gateway address {given!r}: unknown scheme {parts.scheme!r} "
                               f"(expected HOST:PORT or {', '.join(s + '://' for s in URL_SCHEMES)})")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise AddressError(f"gateway address {given!r}: expected SCHEME://HOST[:PORT], "
                               "with no path, query or user")
        text = parts.netloc
    host, port = _split_host_port(text, given)
    if not _HOST.match(host):
        raise AddressError(f"gateway address {given!r}: {host!r} is not a host name or IP address")
    return f"{host}:{port if port is not None else default_port}"


def _split_host_port(text: str, given: str) -> tuple[str, int | None]:
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        end = text.find("]")
        host, rest = text[:end + 1], text[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            raise AddressError(f"gateway address {given!r}: expected [IPv6] or [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port_text = f"[{text}]", None
    else:
        host, sep, port_text = text.partition(":")
        port_text = port_text if sep else None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"gateway address {given!r}: the port must be a number from 1 to 65535, "
                           f"not {port_text!r}")
    return host, int(port_text)


def listen_host_port(listen_addr: str) -> tuple[str, int]:
    """(host, port) of a gRPC listen address: ``host:port``, ``[::]:port``, ``0.0.0.0:port``."""
    host, sep, port = listen_addr.rpartition(":")
    if not sep or not port.isdigit():
        raise AddressError(f"gRPC listen address {listen_addr!r}: expected HOST:PORT")
    host = host.strip("[]")
    return host if host not in ("", "*") else "0.0.0.0", int(port)


def address_in_use(listen_addr: str) -> bool:
    """Whether another socket already holds `listen_addr` (port 0, or a host this machine
    does not have: False, the server's own bind says what is wrong). Binds and closes a
    socket with SO_REUSEADDR, as gRPC does, without SO_REUSEPORT."""
    host, port = listen_host_port(listen_addr)
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def address_taken_message(listen_addr: str, who: str = "DELF_GRPC_ADDR") -> str:
    """What to say when `listen_addr` is already served by another process."""
    return (f"{listen_addr} is already served by another process (another `delf up` or gateway?); "
            f"DELF refuses to share it. Stop that process, or pick another address with {who} "
            f"(e.g. 127.0.0.1:50052), and point clients at it with --gateway or DELF_GATEWAY")
