"""`python -m delf_web`: the HTTP API and web console on DELF_HTTP_ADDR (uvicorn),
with TLS when DELF_TLS_CERT and DELF_TLS_KEY are set, as the gateway."""
from __future__ import annotations

import sys

from delf_common import config, logs


def main() -> int:
    import uvicorn

    from delf_web.app import create_app
    from delf_web.settings import WebSettings

    try:
        logs.setup("web")
        settings = WebSettings.from_env()  # read once, here
        host, sep, port = settings.http_addr.rpartition(":")
        if not sep or not port.isdigit():
            raise config.ConfigError(f"DELF_HTTP_ADDR={settings.http_addr!r}: expected HOST:PORT")
        cert, key = settings.tls_cert, settings.tls_key
        if bool(cert) != bool(key):
            raise config.ConfigError("DELF_TLS_CERT and DELF_TLS_KEY: TLS needs both (or neither)")
        app = create_app(settings=settings)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=host.strip("[]") or "0.0.0.0", port=int(port), ssl_certfile=cert or None,
                ssl_keyfile=key or None, log_level=settings.log_level.lower(), access_log=False,
                log_config=None,  # uvicorn's lines through delf_common.logs (text or JSON, as every service)
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
