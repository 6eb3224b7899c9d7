"""What the web tests need to know about the system: whether the gateway implements the
listing RPCs yet (ListImages, ListJobs: declared in the proto, implemented on another
branch), and a small HTTP client for the web service."""
from __future__ import annotations

import pytest
import requests

from delf_common.proto.delf.v1 import delf_pb2_grpc


def gateway_lists_images() -> bool:
    """False while the gateway answers UNIMPLEMENTED for ListImages: its servicer still
    inherits the generated stub's method, which does exactly that."""
    from delf_gateway.server import Gateway

    return Gateway.ListImages is not delf_pb2_grpc.ImageSearchServicer.ListImages


needs_listing = pytest.mark.skipif(
    not gateway_lists_images(),
    reason="the gateway answers UNIMPLEMENTED for ListImages/ListJobs (implemented on another branch)")


class Http:
    """requests against one web service, with an optional bearer token."""

    def __init__(self, base: str, token: str | None = None):
        self.base = base.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return self.session.request(method, self.base + path, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self("POST", path, **kwargs)
