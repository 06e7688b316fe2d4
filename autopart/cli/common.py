"""What the subcommands share: the type of argparse's sub-command registry, and the one-line usage error."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["Parser", "Subcommands"]

Subcommands = argparse._SubParsersAction  # what ``add_subparsers`` returns; each command adds its parser to it


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)
