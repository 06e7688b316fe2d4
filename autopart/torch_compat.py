"""Every private torch API autopart uses, in one place, and the torch versions it was tested on.

    from autopart.torch_compat import pytree, FakeTensorMode, BatchNormBase, non_persistent_buffers

A torch upgrade that renames or changes one of these breaks this module, not
the ones that use it. Importing it checks torch's version once: outside
:data:`TESTED_TORCH` (``setup.cfg`` asks for ``torch>=2.13,<3``) rank 0 says so
in one line on stderr and goes on (a newer torch may well work).

What stays elsewhere, and why: the schedule-to-stage calls of
``torch.distributed.pipelining`` (``forward_one_chunk``, ``backward_one_chunk``,
the ``get_*_ops``) are overridden by the one ``PipelineStage`` subclass in
:mod:`autopart.run.stages`, the only module that may import pipelining
(``tests/test_layout.py``); this module imports no ``torch.distributed`` at all,
so the measuring side may use it too.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase
from torch.utils import _pytree as pytree

__all__ = ["TESTED_TORCH", "BatchNormBase", "FakeTensorMode", "pytree", "own_parameters", "own_buffers",
           "own_children", "non_persistent_buffers",
           "untested_torch", "warn_if_untested", "is_timeout", "FAILURE_TYPE", "write_error_file", "failure_line"]

TESTED_TORCH = ((2, 13),)
"""The (major, minor) torch releases the test suite has run on (CI: 2.13.0, the CPU build)."""

# pytree: torch.utils._pytree (tree_flatten, tree_unflatten, tree_leaves, TreeSpec); torch 2.13 has no public
#   pytree module.
# FakeTensorMode: torch._subclasses.fake_tensor, what torch.export itself runs a model under to learn its shapes.
# BatchNormBase: torch.nn.modules.batchnorm._BatchNorm, the base of BatchNorm1d/2d/3d, SyncBatchNorm and the lazy
#   ones (an isinstance test for all of them, and the base DeferredBatchNorm extends: it overrides the base's
#   ``_check_input_dim`` as every BatchNorm class does).


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """``module``'s own parameters by attribute name, ``None`` entries included (a BatchNorm without affine has
    ``weight = None``); the live dict (``nn.Module._parameters``), not a copy."""
    return module._parameters


def own_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """``module``'s own buffers by attribute name, ``None`` entries included; the live dict (``_buffers``)."""
    return module._buffers


def own_children(module: nn.Module) -> dict[str, nn.Module | None]:
    """``module``'s direct children by attribute name, each name once even where two hold the same module (which
    ``named_children`` would show once); the live dict (``nn.Module._modules``)."""
    return module._modules


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """The names of ``module``'s own buffers registered with ``persistent=False`` (not in its state_dict)."""
    return set(module._non_persistent_buffers_set)


def _release(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a torch version string (``"2.13.0+cpu"``, ``"2.14.0.dev20260101"``); None if unreadable."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def untested_torch(version: str) -> str | None:
    """The warning for a torch ``version`` outside :data:`TESTED_TORCH`, or None for a tested one."""
    if _release(version) in TESTED_TORCH:
        return None
    tested = ", ".join(f"{major}.{minor}" for major, minor in TESTED_TORCH)
    return (f"autopart: warning: torch {version} is not a version autopart was tested on (tested: torch {tested}); "
            f"it may work, but its pipelining internals may differ")


_warned = False


def warn_if_untested(version: str = torch.__version__) -> bool:
    """Say :func:`untested_torch`'s line on stderr once per job: once per process, on rank 0 only (every rank
    imports this), and not in the ranks autopart's launcher started (``AUTOPART_LAUNCHED``: it said it). True
    when it said it."""
    global _warned
    line = untested_torch(version)
    if line is None or _warned or os.environ.get("RANK", "0") != "0" or os.environ.get("AUTOPART_LAUNCHED"):
        return False
    _warned = True
    print(line, file=sys.stderr, flush=True)
    return True


def is_timeout(exc: BaseException) -> bool:
    """A collective's or a send's or receive's own timeout.

    Note: torch 2.13 gives no exception type for a timeout. gloo raises a plain ``RuntimeError``
    ("[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete",
    and on the next operation "Application timeout caused pair closure"); ``torch.distributed.DistError``'s
    subclasses (``DistBackendError``, ``DistNetworkError``, ``DistStoreError``) name the layer that failed,
    not the cause. So the text decides, as it is the only place torch says it.
    """
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


FAILURE_TYPE = "RankFailure"
"""The type the error file names before the line (``autopart.run.worker.RankFailure``)."""


def write_error_file(line: str) -> None:
    """Leave ``line`` in the error file torchrun's agent reads (``TORCHELASTIC_ERROR_FILE``), where torch puts
    a traceback; nothing without one.

    The format is ``ErrorHandler.record_exception``'s in
    ``torch/distributed/elastic/multiprocessing/errors/error_handler.py``: that method writes
    ``traceback.format_exc()`` as the call stack and cannot be given a line instead, so it is written here.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{FAILURE_TYPE}: {line}",
                        "extraInfo": {"py_callstack": f"{line}\n", "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError:
        pass



def failure_line(failure: object) -> str:
    """The line a failed rank left in its error file (:func:`write_error_file`), from the
    ``torch.distributed.elastic.multiprocessing.errors.ProcessFailure`` the agent made of it; "" where the rank
    left none and torchelastic's ``message`` is its own placeholder ("Process failed with exitcode 1", "To
    enable traceback see: ...")."""
    message = getattr(failure, "message", "")
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message).strip().removeprefix(f"{FAILURE_TYPE}: ")
    if text.startswith("Process failed with exitcode") or text.startswith("To enable traceback"):
        return ""
    return text.splitlines()[0] if text else ""


warn_if_untested()
