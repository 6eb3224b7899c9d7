"""The options of `delf up` (delf_tools.launcher runs them)."""
from __future__ import annotations

import argparse

from delf_common import config
from delf_tools.readiness import positive_int

DEFAULT_REDIS_PORT = 6399


def build_parser(prog: str = "delf up") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start the whole DELF system on this machine: a broker (embedded Redis "
                    "unless DELF_REDIS_URL is set), the extractor, indexer and verifier "
                    "workers, the gRPC gateway and the HTTP API with its web console. Ctrl-C stops it.",
    )
    parser.add_argument("--grpc-addr", default=config.get("DELF_GRPC_ADDR"),
                        help="address the gateway listens on (default: DELF_GRPC_ADDR, "
                             "%(default)s)")
    parser.add_argument("--http-addr", default=config.get("DELF_HTTP_ADDR"),
                        help="address the HTTP API and web console listen on; a free port when "
                             "it is taken (default: DELF_HTTP_ADDR, %(default)s)")
    parser.add_argument("--no-web", action="store_true",
                        help="do not start the HTTP API and web console")
    parser.add_argument("--data-dir", default=config.get("DELF_DATA_DIR"),
                        help="folder for local state: Milvus Lite, the embedded Redis, logs "
                             "(default: DELF_DATA_DIR, %(default)s)")
    parser.add_argument("--redis-port", type=int, default=DEFAULT_REDIS_PORT,
                        help="port of the embedded Redis, used when DELF_REDIS_URL is not set; "
                             "0 or a taken port: a free one (default: %(default)s)")
    parser.add_argument("--extractors", type=positive_int, default=1,
                        help="number of extractor workers (default: %(default)s)")
    parser.add_argument("--verifiers", type=positive_int, default=1,
                        help="number of verifier workers, 2 threads each (default: %(default)s)")
    parser.add_argument("--log-dir", nargs="?", const="", default="", metavar="DIR",
                        help="each service's output goes to DIR/<service>.log, lines reporting a "
                             "problem to the terminal too (default: DATA_DIR/logs)")
    parser.add_argument("--console-logs", action="store_true",
                        help="every service's output on the terminal instead, prefixed with its name")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write this file (JSON: gateway address, broker, pids) once "
                             "everything is ready; it is removed on exit")
    parser.add_argument("--no-restart", action="store_true",
                        help="stop everything when a service dies (default: restart it, with "
                             "backoff, unless it dies 5 times within 2 minutes)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, metavar="S",
                        help="give up when not ready after this many seconds "
                             "(default: %(default)s)")
    return parser
