"""A request's results and its bookkeeping: runs, sweeps, UNet evaluations, progress and cancellation."""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from .settings import Settings, format_sigma

#: ``progress(done_steps, total_steps, description)``, called after every denoising step of a request.
Progress = Callable[[int, int, str], None]


class GenerationCancelled(Exception):
    """The request was cancelled (its client went away); its work stopped at the next denoising step."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory during a request; the model was left clean."""



@dataclass
class Run:
    """One image: its settings, how long it took and how many UNet evaluations it used."""

    label: str
    settings: Settings
    image: Image.Image
    seconds: float
    unet_evaluations: int
    path: str = ""
    one_loop: bool = False  # rendered with other methods in one loop: ``seconds`` is the whole loop's

    def info(self) -> dict:
        return {
            "label": self.label, "method": self.settings.method, "seed": self.settings.seed,
            "seconds": round(self.seconds, 3), "one_loop": self.one_loop, "unet_evaluations": self.unet_evaluations,
            "unet_evaluations_per_step": round(self.unet_evaluations / self.settings.steps, 2),
            "file": self.path, "settings": self.settings.to_dict(),
        }


@dataclass
class Sweep:
    runs: list[list[Run]]  # [row][column]
    column_axis: str
    column_values: list
    row_axis: str | None
    row_values: list
    grid: Image.Image
    path: str = ""

    def info(self) -> dict:
        return {
            "columns": {"axis": self.column_axis, "values": [_axis_value(v) for v in self.column_values]},
            "rows": {"axis": self.row_axis, "values": [_axis_value(v) for v in self.row_values]},
            "file": self.path,
            "runs": [run.info() for row in self.runs for run in row],
            "seconds": round(sum(run.seconds for row in self.runs for run in row), 3),
            "unet_evaluations": sum(run.unet_evaluations for row in self.runs for run in row),
        }


def _axis_value(value):
    return format_sigma(value) if isinstance(value, float) and math.isinf(value) else value


class UNetCounter:
    """Counts UNet evaluations per image: batch rows seen by ``unet.forward`` / images per call."""

    def __init__(self, unet: torch.nn.Module, images_per_call: int = 1):
        self.unet, self.images_per_call, self.rows = unet, images_per_call, 0

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += sample.shape[0]

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def evaluations(self) -> int:
        return self.rows // self.images_per_call



def image_digest(images: Image.Image | list | None) -> str | None:
    """A short hash of the pixels of an image (or of several), so the metadata identifies it; None for none."""
    images = images if isinstance(images, list) else [images] if images else []
    return hashlib.sha256(b"".join(m.tobytes() for m in images)).hexdigest()[:16] if images else None


def stamp_control(settings: Settings, control: Image.Image | list | None) -> None:
    """Record which control map(s) were used (a hash), so the metadata identifies them."""
    settings.control_image_sha256 = image_digest(control)


@contextmanager
def out_of_memory_as_error(pipe, settings: Settings):
    """A device out of memory during a request raised as :class:`OutOfMemory`, naming what was asked, after
    giving the cached memory back."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        release_memory()
        raise OutOfMemory(
            f"the {pipe.device.type} device ran out of memory at {settings.width}x{settings.height} "
            f"({settings.method}, {settings.steps} steps); try a smaller size, or again later"
        ) from error


def release_memory() -> None:
    """Give cached device memory back after an out-of-memory error, so the next request can start."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StepCounter:
    """Progress over all denoising steps of one request, and its cancellation."""

    def __init__(self, total: int, progress: Progress | None, should_stop: Callable[[], bool] | None = None):
        self.total, self.done, self.progress, self.should_stop = total, 0, progress, should_stop

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise GenerationCancelled(f"request cancelled after {self.done} of {self.total} steps")

    def advance(self, label: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, label)
        self.check()

