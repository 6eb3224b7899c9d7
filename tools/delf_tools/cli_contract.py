"""How every `delf` command ends: its result, or one short message on stderr (at most with
the command's usage, which argparse prints) and a non-zero exit status, never a traceback.

    2    a wrong invocation: an option, a path, an address (UsageError, found before
         anything is sent), a setting, a file that cannot be read or written
    1    an error the gateway reports (its status code and message, with a hint), or an
         unexpected error (DELF_TRACEBACK=1 shows where it came from)
    130  Ctrl-C (128 + SIGINT, as a shell reports it); a command that leaves work running
         (`delf ingest` waiting for its job) says how to follow it
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc

from delf_common import config
from delf_common.addresses import AddressError

INTERRUPTED_EXIT = 130


class UsageError(Exception):
    """A wrong invocation found before anything is sent; the message says what to do."""


def interrupted(message: str) -> None:
    print(f"\n{message}", file=sys.stderr, flush=True)


def run_tool(command: str, argv: list[str], global_options: dict | None = None) -> int:
    """A command implemented by another module, with its own arguments (`global_options`:
    `delf eval`'s gateway, token, tls_ca, timeout given before it)."""
    try:
        if command == "up":
            from delf_tools import launcher

            return launcher.main(argv) or 0
        if command == "fit-pca":
            from delf_extractor import fit_pca

            return fit_pca.main(argv) or 0
        if command in ("train-attention", "finetune"):
            from delf_tools import train

            return (train.main_attention if command == "train-attention" else train.main_finetune)(argv) or 0
        from delf_tools import eval_command as evaluate

        return evaluate.main(argv, **(global_options or {})) or 0
    except KeyboardInterrupt:
        interrupted(f"delf {command}: interrupted")
        return INTERRUPTED_EXIT
    except (OSError, ValueError) as exc:  # a folder or file that cannot be used
        print(f"delf {command}: {exc}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    """The command, its everyday failures as one short message and an exit status."""
    command = f"delf {args.command}"
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"{command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(f"  is the gateway running at {args.gateway}? (`make up` or `delf up` starts it; "
                  "a gateway with TLS needs --tls-ca or DELF_TLS_CA)", file=sys.stderr)
        elif exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            print("  the gateway requires a token: --token or DELF_TOKEN", file=sys.stderr)
        return 1
    except (UsageError, config.ConfigError, AddressError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written
        if isinstance(exc, BrokenPipeError):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        interrupted(f"{command}: interrupted")
        return INTERRUPTED_EXIT
    except Exception as exc:  # the contract: a message, never a traceback
        if os.environ.get("DELF_TRACEBACK"):
            raise
        print(f"{command}: unexpected error: {type(exc).__name__}: {exc} "
              "(DELF_TRACEBACK=1 shows where; please report it)", file=sys.stderr)
        return 1
