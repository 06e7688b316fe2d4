"""The ``autopart`` command line: one subcommand per step of the data flow.

    autopart profile gpt2-small --input-shape 1,128 -o p.json

Bad input ends in one line on stderr and exit code 2; a bug in autopart in one
line and exit code 1 (``AUTOPART_TRACEBACK=1`` shows the traceback). A reader
that closes stdout early (``autopart partition p.json --format json | head -1``)
ends the command quietly with exit code 0, as ``cat`` or ripgrep do.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from typing import Sequence

from autopart.cli.common import Parser, shortened
from autopart.errors import AutopartError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from autopart.cli import check, graph, merge_checkpoint, partition, profile, simulate, train

    parser = Parser(prog="autopart", description="Automatic pipeline-parallel partitioning for PyTorch: "
                     "profile a model block by block, plan the stages, simulate, train.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in (graph, profile, partition, simulate, check, train, merge_checkpoint):
        command.add_parser(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return f"autopart {version('autopart')}"
    except Exception:
        return "autopart (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's shutdown
        return code
    except BrokenPipeError:  # the reader of stdout went away: nothing left to say to anyone
        _detach_stdout()
        return 0
    except AutopartError as exc:
        sys.stderr.write(f"autopart {args.command}: error: {exc}\n")
        return 2
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            return _internal_error(args.command, exc)
        name = os.fsdecode(exc.filename) if exc.filename is not None else "?"
        sys.stderr.write(f"autopart {args.command}: error: file name too long ({len(os.fsencode(name))} bytes): "
                         f"{shortened(name)!r}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"autopart {args.command}: interrupted\n")
        return 130
    except Exception as exc:
        return _internal_error(args.command, exc)


def _internal_error(command: str, exc: Exception) -> int:
    """A bug in autopart: one line (the traceback with AUTOPART_TRACEBACK=1), exit code 1."""
    if os.environ.get("AUTOPART_TRACEBACK"):
        traceback.print_exception(exc)
    text = str(exc).splitlines()[0] if str(exc) else ""
    sys.stderr.write(f"autopart {command}: internal error: {type(exc).__name__}: {text} "
                     f"(set AUTOPART_TRACEBACK=1 for the traceback)\n")
    return 1


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered at exit raises nothing (the
    recipe of Python's signal docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (captured in-process): nothing will flush it
        pass


if __name__ == "__main__":
    raise SystemExit(main())
