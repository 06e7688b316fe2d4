"""The console a command prints its tables to (stdout), for a terminal or a pipe alike.

rich's own console ends the process with exit code 1 when the reader of stdout goes
away (``autopart partition p.json | head -1``); this one raises BrokenPipeError
instead, which :func:`autopart.cli.main` turns into a quiet exit 0.
"""
from __future__ import annotations

from rich.console import Console

__all__ = ["stdout_console"]


class _PipeConsole(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away: print nothing more, and let the command's ``main`` end quietly."""
        self.quiet = True
        raise BrokenPipeError


def stdout_console(width: int) -> Console:
    """A console on stdout: the terminal's width on a terminal, ``width`` characters into a pipe or file."""
    console = _PipeConsole(emoji=False)
    return console if console.is_terminal else _PipeConsole(emoji=False, width=width)
