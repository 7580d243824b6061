"""A stand-in for the `spaces` package (0.51) that reproduces ZeroGPU's process model on a CPU.

What it keeps of `spaces.zero.wrappers.regular_function_wrapper` (read in spaces 0.51.3):
- ``GPU(fn)``, ``GPU(duration=...)``, ``GPU(fn, duration=...)``; ``duration`` a number or a callable of the
  handler's arguments, evaluated in the server before anything runs (an exception there reaches the visitor);
- the handler runs in a worker process *forked* from the server on first use and reused for the following
  calls while it lives (after a failed call the next one forks a new worker, as spaces does);
- per call only the pickled arguments, the Gradio event id and the progress tracker go to the worker
  (``GradioPartialContext``); the handler runs in a new thread there; the pickled result comes back;
- in the worker the Gradio queue's ``set_progress`` and ``log_message`` are forwarded to the server's queue,
  so progress and toasts reach the page; everything else the worker sees is the copy taken at the fork.

Not emulated: the GPU itself (scheduling, quota, CUDA emulation outside handlers, tensor transfer).
Each call is recorded as a JSON line in $FAKE_SPACES_LOG (if set), for the tests to read.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context

import gradio as gr
from gradio.context import LocalContext
from gradio.helpers import TrackedIterable
from gradio.queueing import Queue

FORWARDED_QUEUE_METHODS = ("set_progress", "log_message")
_fork = multiprocessing.get_context("fork")
forked = False  # True inside a worker


def _log(**record) -> None:
    path = os.environ.get("FAKE_SPACES_LOG")
    if path:
        with open(path, "a") as file:  # one short line per write: lines from both processes do not mix
            file.write(json.dumps(record) + "\n")


def GPU(task=None, *, duration=None, size=None):  # noqa: N802 (spaces' name)
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)
    return _gradio_handler(task, duration)


def _tracked_iterable_reduce(self):
    """TrackedIterable pickled without its iterator and tqdm bar (as spaces patches it)."""
    return TrackedIterable, (None, self.index, self.length, self.desc, self.unit, None, self.progress)


def _partial_context() -> tuple:
    TrackedIterable.__reduce__ = _tracked_iterable_reduce
    return (LocalContext.event_id.get(None), LocalContext.in_event_listener.get(False),
            LocalContext.progress.get(None))


def _gradio_handler(task, duration):
    idle_workers: list[_Worker] = []  # spaces keeps one per GPU; taken while a call runs

    @functools.wraps(task)
    def gradio_handler(*args, **kwargs):
        if forked:  # a GPU function called from inside a worker runs in place
            return task(*args, **kwargs)
        seconds = duration(*args, **kwargs) if callable(duration) else duration
        worker = idle_workers.pop() if idle_workers else None
        if worker is None or not worker.process.is_alive():
            worker = _Worker(task)
        _log(event="schedule", task=task.__name__, duration=seconds, server_pid=os.getpid(),
             worker_pid=worker.process.pid)
        worker.calls.put(((args, kwargs), _partial_context()))
        while True:
            kind, *payload = worker.results.get()
            if kind == "queue":  # progress or a toast, forwarded by the worker
                method, method_args, method_kwargs = payload
                _log(event="queue", task=task.__name__, method=method)
                getattr(LocalContext.blocks.get()._queue, method)(*method_args, **method_kwargs)
                continue
            if kind == "ok":
                idle_workers.append(worker)
                return payload[0]
            worker.stop()  # spaces does not reuse a worker whose call failed
            error, text = payload
            if error is not None:
                raise error
            raise gr.Error(f"ZeroGPU worker error: {text}", print_exception=False)

    return gradio_handler


class _Worker:
    def __init__(self, task):
        self.calls, self.results = _fork.SimpleQueue(), _fork.SimpleQueue()
        self.process = _fork.Process(target=_serve, args=(task, self.calls, self.results), daemon=True)
        self.process.start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)


def _forward(results, method: str):
    def forwarded(queue, *args, **kwargs):
        results.put(("queue", method, args, kwargs))

    return forwarded


def _exit_with_server(server_pid: int) -> None:
    """End this worker when its server process ends (spaces' workers are daemons of the server too)."""
    while os.getppid() == server_pid:
        time.sleep(0.5)
    os._exit(0)


def _serve(task, calls, results) -> None:
    """The worker's loop: one call at a time, each in a new thread with the event id and progress applied."""
    global forked
    forked = True
    threading.Thread(target=_exit_with_server, args=(os.getppid(),), daemon=True).start()
    for method in FORWARDED_QUEUE_METHODS:
        setattr(Queue, method, _forward(results, method))
    TrackedIterable.__reduce__ = _tracked_iterable_reduce
    while True:
        (args, kwargs), (event_id, in_event_listener, progress) = calls.get()
        LocalContext.event_id.set(event_id)
        LocalContext.in_event_listener.set(in_event_listener)
        LocalContext.progress.set(progress)
        _log(event="run", task=task.__name__, pid=os.getpid(), event_id=event_id)

        def run():
            try:
                return ("ok", task(*args, **kwargs))
            except Exception as error:  # noqa: BLE001 (sent back, as spaces does)
                return ("error", error if isinstance(error, gr.Error) else None,
                        "".join(traceback.format_exception(error)))

        with ThreadPoolExecutor(1) as executor:
            result = executor.submit(copy_context().run, run).result()
        try:
            results.put(result)
        except Exception as error:  # noqa: BLE001 (an unpicklable result)
            results.put(("error", None, f"result could not be pickled: {error!r}"))
