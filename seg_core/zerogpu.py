"""Running on a Hugging Face ZeroGPU Space: the `spaces.GPU` decorator, and what its process model asks.

`spaces.GPU` (spaces 0.51) runs a handler in a worker process forked from the server on first use and
reused for later calls; per call it passes the pickled arguments plus the Gradio event id and progress
tracker, and sends the pickled result back. Everything else the worker sees (the Gradio queue, locks,
counters) is a copy taken when it was forked, stale for every later call. So code inside a GPU handler
must not consult the server's state: :func:`in_gpu_worker` tells it where it runs.
"""

from __future__ import annotations

import os
from typing import Callable

#: The process that imported this module first: the server. A ZeroGPU worker is forked from it.
SERVER_PID = os.getpid()


def in_gpu_worker() -> bool:
    """True inside a process forked from the server (a ZeroGPU worker), where the server's state is a stale copy."""
    return os.getpid() != SERVER_PID


def GPU(fn: Callable | None = None, *, duration=None):  # noqa: N802 (the name `spaces` uses)
    """``spaces.GPU`` on a Hugging Face ZeroGPU Space, a no-op elsewhere. Works bare (``@GPU``), with
    arguments (``@GPU(duration=120)``) and called (``GPU(fn, duration=seconds_of_request)``); ``duration``
    may be a number of seconds or a callable of the handler's arguments."""
    try:
        import spaces
    except ImportError:
        spaces = None
    if fn is None:  # @GPU(duration=...)
        if spaces is None:
            return lambda f: f
        return spaces.GPU(duration=duration) if duration is not None else spaces.GPU
    if spaces is None:
        return fn
    return spaces.GPU(duration=duration)(fn) if duration is not None else spaces.GPU(fn)
