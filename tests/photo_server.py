"""Photos for the ingest tests and a local HTTP server to fetch them from.

Used by tests/test_ingest.py (URL items on a running system) and tests/test_fetch.py
(the fetcher itself).
"""
from __future__ import annotations

import http.server
import threading

from photos import jpeg, sample_photo


def small_photo(name: str, k: int = 0) -> bytes:
    """A small distinct JPEG: a crop of a sample photo, halved."""
    rgb = sample_photo(name)
    if rgb.ndim == 2:
        rgb = rgb[..., None].repeat(3, -1)
    rgb = rgb[..., :3]
    return jpeg(rgb[k * 16::2, k * 12::2].copy(), quality=85)


class PhotoServer:
    """A local HTTP server: fixed bodies by path, redirects, failures on demand, and a
    record of every request (path and Host header)."""

    def __init__(self):
        self.bodies: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.fail_first: dict[str, int] = {}  # path -> how many 503s before the body
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Host", "")))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                    return
                if server.fail_first.get(self.path, 0) > 0:
                    server.fail_first[self.path] -= 1
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                body = server.bodies.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

