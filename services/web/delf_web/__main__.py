"""`python -m delf_web`: the HTTP API and web console on DELF_HTTP_ADDR (uvicorn),
with TLS when DELF_TLS_CERT and DELF_TLS_KEY are set, as the gateway."""
from __future__ import annotations

import sys

from delf_common import config, logs


def main() -> int:
    import uvicorn

    from delf_web.app import create_app

    try:
        logs.setup("web")
        host, sep, port = config.get("DELF_HTTP_ADDR").rpartition(":")
        if not sep or not port.isdigit():
            raise config.ConfigError(f"DELF_HTTP_ADDR={config.get('DELF_HTTP_ADDR')!r}: expected HOST:PORT")
        cert, key = config.get("DELF_TLS_CERT"), config.get("DELF_TLS_KEY")
        if bool(cert) != bool(key):
            raise config.ConfigError("DELF_TLS_CERT and DELF_TLS_KEY: TLS needs both (or neither)")
        app = create_app()
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=host.strip("[]") or "0.0.0.0", port=int(port), ssl_certfile=cert or None,
                ssl_keyfile=key or None, log_level=config.get("DELF_LOG_LEVEL").lower(), access_log=False,
                log_config=None,  # uvicorn's lines through delf_common.logs (text or JSON, as every service)
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
