"""What the subcommands share: the type of argparse's sub-command registry, the one-line usage error, the
check of every file or folder name a command is given, and the argument types several commands take."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Callable, NoReturn

from autopart.errors import AutopartError
from autopart.formats.schedule_kinds import canonical_schedule

if TYPE_CHECKING:
    from autopart.measure.spec import ModelBundle

__all__ = ["Parser", "Subcommands", "path_arg", "schedule_arg", "schedule_or_auto_arg", "shortened", "unused_loss_note",
           "NAME_MAX_BYTES", "PATH_MAX_BYTES"]

Subcommands = argparse._SubParsersAction  # what ``add_subparsers`` returns; each command adds its parser to it

NAME_MAX_BYTES = 255
"""The longest name of one file or folder that Linux file systems (ext4, xfs, btrfs, tmpfs) and macOS take."""
PATH_MAX_BYTES = 4096
"""The longest path Linux opens (PATH_MAX, counting the terminating zero byte)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def shortened(name: str, keep: int = 40) -> str:
    """``name`` cut to its first and last ``keep // 2`` characters around an ellipsis, when longer."""
    return name if len(name) <= keep else f"{name[:keep // 2]}…{name[-(keep // 2):]}"


def path_arg(text: str) -> str:
    """The argparse type of every file or folder a command reads or writes: a name, none of whose parts is
    longer than a file system takes (checked here, once, so the error names the flag: argparse prefixes it)."""
    if not text:
        raise argparse.ArgumentTypeError("needs a file name, got ''")
    size = len(os.fsencode(text))
    if size >= PATH_MAX_BYTES:
        raise argparse.ArgumentTypeError(f"path {shortened(text)!r} is {size} bytes, longer than the "
                                         f"{PATH_MAX_BYTES - 1} a path can have")
    for part in text.split(os.sep):
        size = len(os.fsencode(part))
        if size > NAME_MAX_BYTES:
            raise argparse.ArgumentTypeError(f"file name {shortened(part)!r} is {size} bytes, longer than the "
                                             f"{NAME_MAX_BYTES} a file system takes")
    return text


def at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lowest`` (argparse names the flag in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"needs a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value
    return parse


def schedule_arg(text: str) -> str:
    """The argparse type of ``--schedule``: a torch.distributed.pipelining schedule, any case, as its canonical
    name (``gpipe`` -> ``GPipe``)."""
    try:
        return canonical_schedule(text)
    except AutopartError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def schedule_or_auto_arg(text: str) -> str:
    """:func:`schedule_arg`, or ``auto`` (any case): let the command choose the schedule."""
    return "auto" if text.lower() == "auto" else schedule_arg(text)


def unused_loss_note(bundle: ModelBundle) -> str | None:
    """The line profile and train say when a factory gives ``loss_fn`` without ``data``: its targets are
    unknown, so training runs synthetic data with MSE to a fixed random target, and the loss goes unused."""
    if bundle.loss_fn is None or bundle.data is not None or bundle.data_kind is not None:
        return None
    return (f"note: model {bundle.name!r} gives loss_fn but no data, so its loss is not used: train runs synthetic "
            f"inputs with MSE to a fixed random target (speed only); give 'data' (input, target) pairs to train "
            f"with loss_fn\n")
