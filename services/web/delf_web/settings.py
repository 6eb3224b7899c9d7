"""The web service's settings, read from the environment once, when the app is built
(`python -m delf_web` builds one and hands it to `create_app`)."""
from __future__ import annotations

import dataclasses

from delf_common import config
from delf_common.fetch import FetchPolicy


@dataclasses.dataclass(frozen=True)
class WebSettings:
    http_addr: str
    gateway: str
    auth_tokens: tuple[str, ...]
    tls_cert: str
    tls_key: str
    log_level: str
    max_image_bytes: int  # an uploaded photo's limit (413 above it)
    fetch_policy: FetchPolicy  # search by URL: the web service fetches the photo itself

    @classmethod
    def from_env(cls) -> "WebSettings":
        return cls(http_addr=config.get("DELF_HTTP_ADDR"), gateway=config.get("DELF_GATEWAY"),
                   auth_tokens=tuple(config.get("DELF_AUTH_TOKENS")), tls_cert=config.get("DELF_TLS_CERT"),
                   tls_key=config.get("DELF_TLS_KEY"), log_level=config.get("DELF_LOG_LEVEL"),
                   max_image_bytes=int(config.get("DELF_MAX_IMAGE_BYTES")), fetch_policy=FetchPolicy.from_env())
