"""Fetching ingest photos from http(s) URLs, safely (no SSRF).

Used by the extractor workers for ingest items whose ``location`` is a URL, and by
the gateway (``check_url``, no network) to refuse obviously bad URLs at once.

Rules, all on by default and relaxed only by settings:

* URL ingest is off unless ``DELF_URL_INGEST=1``;
* only ``http`` and ``https`` (``file:``, ``ftp:``, ``data:`` ... are refused), no
  credentials in the URL;
* the host must match ``DELF_URL_ALLOWED_HOSTS`` when that is set (an entry allows
  the host and its subdomains);
* every address the host resolves to must be public: loopback, private (RFC 1918,
  100.64/10, fc00::/7) are refused unless ``DELF_URL_ALLOW_PRIVATE=1``; link-local
  (169.254/16 with the cloud metadata endpoints, fe80::/10), multicast, unspecified
  and reserved addresses always. IPv4 addresses embedded in IPv6 ones (``::ffff:a.b.c.d``,
  6to4, NAT64, Teredo) are checked as the IPv4 address they carry;
* the connection goes to the address that was checked (no second DNS lookup, so no
  DNS-rebinding window), with the URL's host name kept in the Host header and, for
  https, in SNI and certificate verification;
* redirects are not followed automatically: at most ``MAX_REDIRECTS``, each target
  checked as above;
* at most ``DELF_MAX_IMAGE_BYTES`` are read (streamed, a larger Content-Length is
  refused before reading), within ``DELF_URL_TIMEOUT_S`` for the whole fetch.

Failures raise ``FetchError`` with a gRPC status name, a message for the job's
per-item errors, and ``transient`` (connection errors, timeouts, 5xx, 429: worth a
retry with backoff; refusals and other 4xx are final).
"""
from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse

from delf_common import config
from delf_common.contract import (
    DEADLINE_EXCEEDED, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAVAILABLE,
)

SCHEMES = ("http", "https")
MAX_REDIRECTS = 3
REDIRECT_CODES = {301, 302, 303, 307, 308}
USER_AGENT = "delf-ingest/1"
CHUNK = 64 * 1024
# Schemes that mark a location as a URL even without "//" (e.g. data:image/png;base64,...).
_BARE_SCHEMES = {"data", "file", "ftp", "ftps", "gopher", "http", "https", "javascript", "mailto",
                 "ldap", "dict", "sftp", "smb", "ws", "wss", "jar", "netdoc"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")



@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """The settings of URL ingest, read once by a service (its settings object) and passed
    to every check and fetch: ``url_ingest`` (DELF_URL_INGEST), ``allowed_hosts``
    (DELF_URL_ALLOWED_HOSTS, empty: any), ``allow_private`` (DELF_URL_ALLOW_PRIVATE),
    ``max_bytes`` (DELF_MAX_IMAGE_BYTES) and ``timeout_s`` (DELF_URL_TIMEOUT_S)."""

    url_ingest: bool
    allowed_hosts: tuple[str, ...]
    allow_private: bool
    max_bytes: int
    timeout_s: float

    @classmethod
    def from_env(cls) -> "FetchPolicy":
        return cls(url_ingest=bool(config.get("DELF_URL_INGEST")),
                   allowed_hosts=tuple(config.get("DELF_URL_ALLOWED_HOSTS")),
                   allow_private=bool(config.get("DELF_URL_ALLOW_PRIVATE")),
                   max_bytes=int(config.get("DELF_MAX_IMAGE_BYTES")),
                   timeout_s=float(config.get("DELF_URL_TIMEOUT_S")))


class FetchError(Exception):
    def __init__(self, code: str, message: str, transient: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient
        self.retry_after = retry_after

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def url_scheme(location: str) -> str | None:
    """The scheme when `location` is a URL (``http://..``, ``file:..``, ``data:..``), else None."""
    m = _SCHEME.match(location or "")
    if not m or len(m.group(1)) < 2:  # "C:" is a drive letter, not a scheme
        return None
    scheme = m.group(1).lower()
    rest = location[m.end():]
    if rest.startswith("//") or scheme in _BARE_SCHEMES:
        return scheme
    return None


def is_url(location: str) -> bool:
    return url_scheme(location) is not None


# --------------------------------------------------------------------------- addresses


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's (obfuscated-back) address
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in ipaddress.IPv6Network("::/96") and int(ip) > 1:  # deprecated IPv4-compatible
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


_PRIVATE_V4 = [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                   "100.64.0.0/10", "127.0.0.0/8")]
_PRIVATE_V6 = [ipaddress.IPv6Network(n) for n in ("fc00::/7", "::1/128")]


def address_refusal(address: str | ipaddress._BaseAddress, allow_private: bool) -> str | None:
    """Why `address` may not be fetched from (None when it may).

    Public (globally routable) addresses are allowed. Loopback and private ones only
    with `allow_private` (DELF_URL_ALLOW_PRIVATE); link-local, multicast, unspecified
    and reserved ones never.
    """
    try:
        ip = ipaddress.ip_address(address) if not isinstance(address, ipaddress._BaseAddress) else address
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return f"{ip} is a scoped (link-local) address"
        inner = _embedded_ipv4(ip)
        if inner is not None:
            why = address_refusal(inner, allow_private)
            return None if why is None else f"{ip} carries {inner}: {why}"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if ip.is_link_local:
        return f"{ip} is a link-local address (169.254.0.0/16, fe80::/10; cloud metadata endpoints live here)"
    if ip.is_loopback:
        return None if allow_private else f"{ip} is a loopback address (DELF_URL_ALLOW_PRIVATE is off)"
    private = _PRIVATE_V4 if ip.version == 4 else _PRIVATE_V6
    if any(ip in net for net in private):
        return None if allow_private else f"{ip} is a private address (DELF_URL_ALLOW_PRIVATE is off)"
    if not ip.is_global or ip.is_reserved:
        return f"{ip} is a reserved or non-routable address"
    return None


# --------------------------------------------------------------------------- URL checks


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """True when `host` is one of `allowed` (DELF_URL_ALLOWED_HOSTS) or a subdomain of one;
    an empty list allows every host."""
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().strip().rstrip(".").lstrip("*").lstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def check_url(url: str, policy: FetchPolicy) -> tuple[urllib.parse.SplitResult, str, int]:
    """Checks that need no network: URL ingest on, scheme, credentials, host allowed, and a
    literal IP host's range. Returns (parts, host, port); raises FetchError (never transient)."""
    if not policy.url_ingest:
        raise FetchError(PERMISSION_DENIED, f"URL {_short(url)}: URL ingest is off on this server "
                                            f"(DELF_URL_INGEST=0); send the photo's bytes instead")
    if not isinstance(url, str) or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise FetchError(INVALID_ARGUMENT, f"URL {_short(url)}: contains spaces or control characters")
    scheme = url_scheme(url)
    if scheme not in SCHEMES:
        raise FetchError(INVALID_ARGUMENT, f"URL {_short(url)}: scheme {scheme or '(none)'!r} is not "
                                           f"allowed; only http and https")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise FetchError(INVALID_ARGUMENT, f"URL {_short(url)}: malformed ({exc})") from None
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchError(INVALID_ARGUMENT, f"URL {_short(url)}: no host")
    if parts.username is not None or parts.password is not None:
        raise FetchError(INVALID_ARGUMENT, f"URL {_short(url)}: credentials in URLs are not accepted")
    if not host_allowed(host, policy.allowed_hosts):
        raise FetchError(PERMISSION_DENIED, f"URL {_short(url)}: host {host!r} is not in "
                                            f"DELF_URL_ALLOWED_HOSTS")
    literal = _literal_ip(host)
    if literal is not None:
        why = address_refusal(literal, policy.allow_private)
        if why:
            raise FetchError(PERMISSION_DENIED, f"URL {_short(url)}: {why}")
    return parts, host, port


def _literal_ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # Forms like "2130706433" or "0x7f.1" that inet_aton (and so some resolvers) accept.
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def resolve(host: str, port: int, url: str, allow_private: bool) -> list[str]:
    """Every address `host` resolves to, all of them checked; FetchError when any is refused."""
    literal = _literal_ip(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            transient = exc.errno not in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -999))
            raise FetchError(UNAVAILABLE if transient else NOT_FOUND,
                             f"URL {_short(url)}: cannot resolve {host!r}: {exc.strerror}",
                             transient=transient) from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise FetchError(NOT_FOUND, f"URL {_short(url)}: {host!r} has no address")
    for address in addresses:
        why = address_refusal(address, allow_private)
        if why:
            raise FetchError(PERMISSION_DENIED, f"URL {_short(url)}: {host!r} resolves to {why}")
    return addresses


# --------------------------------------------------------------------------- fetching


def _connection(scheme: str, host: str, port: int, address: str, timeout: float):
    """An HTTP(S) connection to `address` that presents itself as `host` (Host, SNI, cert)."""
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def create_connection(_addr, timeout=timeout, source_address=None):
        return socket.create_connection((address, port), timeout, source_address)

    conn._create_connection = create_connection  # connect to the checked address only
    return conn


def _short(url) -> str:
    text = repr(url)
    return text if len(text) <= 200 else text[:197] + "...'"


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """The body of `url` (a photo), under every rule of this module's docstring, with the
    settings of `policy`."""
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        parts, host, port = check_url(current, policy)
        addresses = resolve(host, port, current, policy.allow_private)
        status, headers, body = _get(parts, host, port, addresses, current, policy.max_bytes, deadline)
        if status in REDIRECT_CODES:
            target = headers.get("location")
            if not target:
                raise FetchError(INVALID_ARGUMENT, f"URL {_short(current)}: redirect {status} without a Location")
            current = urllib.parse.urljoin(current, target.strip())
            continue
        return body
    raise FetchError(INVALID_ARGUMENT, f"URL {_short(url)}: more than {MAX_REDIRECTS} redirects")


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(DEADLINE_EXCEEDED, f"URL {_short(url)}: no answer within DELF_URL_TIMEOUT_S",
                         transient=True)
    return left


def _get(parts, host, port, addresses, url, max_bytes, deadline):
    """(status, headers (lower-case names), body or b"" for redirects) from the first address
    that accepts a connection."""
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    last_error: OSError | None = None
    for address in addresses:
        conn = _connection(parts.scheme.lower(), host, port, address, _remaining(deadline, url))
        try:
            try:
                conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*",
                                                     "Accept-Encoding": "identity", "Connection": "close"})
                response = conn.getresponse()
            except ssl.SSLCertVerificationError as exc:
                raise FetchError(PERMISSION_DENIED, f"URL {_short(url)}: TLS certificate not trusted: "
                                                    f"{exc.verify_message or exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                last_error = exc if isinstance(exc, OSError) else OSError(str(exc))
                continue  # the next address, if any
            headers = {k.lower(): v for k, v in response.getheaders()}
            status = response.status
            if status in REDIRECT_CODES:
                return status, headers, b""
            if status == 429 or status >= 500:
                raise FetchError(UNAVAILABLE, f"URL {_short(url)}: HTTP {status} {response.reason}",
                                 transient=True, retry_after=_retry_after(headers.get("retry-after")))
            if status == 404 or status == 410:
                raise FetchError(NOT_FOUND, f"URL {_short(url)}: HTTP {status} {response.reason}")
            if status != 200:
                raise FetchError(INVALID_ARGUMENT, f"URL {_short(url)}: HTTP {status} {response.reason}")
            length = headers.get("content-length")
            if length and length.strip().isdigit() and int(length) > max_bytes:
                raise FetchError(RESOURCE_EXHAUSTED, f"URL {_short(url)}: {int(length):,} bytes; the limit is "
                                                     f"{max_bytes:,} bytes (DELF_MAX_IMAGE_BYTES)")
            return status, headers, _read_body(conn, response, url, max_bytes, deadline)
        finally:
            conn.close()
    if isinstance(last_error, (TimeoutError, socket.timeout)):
        raise FetchError(DEADLINE_EXCEEDED, f"URL {_short(url)}: timed out", transient=True)
    raise FetchError(UNAVAILABLE, f"URL {_short(url)}: cannot connect: {last_error}", transient=True)


def _read_body(conn, response, url, max_bytes, deadline) -> bytes:
    chunks, size = [], 0
    try:
        while True:
            _remaining(deadline, url)  # the whole fetch, not each read, is bounded
            chunk = response.read1(CHUNK) if hasattr(response, "read1") else response.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(RESOURCE_EXHAUSTED, f"URL {_short(url)}: more than {max_bytes:,} bytes "
                                                     f"(DELF_MAX_IMAGE_BYTES)")
            chunks.append(chunk)
    except (TimeoutError, socket.timeout):
        raise FetchError(DEADLINE_EXCEEDED, f"URL {_short(url)}: timed out while reading", transient=True) from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(UNAVAILABLE, f"URL {_short(url)}: connection lost while reading: {exc}",
                         transient=True) from None
    return b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None
