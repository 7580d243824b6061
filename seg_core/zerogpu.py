"""Running on a Hugging Face ZeroGPU Space: the `spaces.GPU` decorator, and what its process model asks.

`spaces.GPU` (spaces 0.51) runs a handler in a worker process forked from the server on first use and
reused for later calls; per call it passes the pickled arguments plus the Gradio event id and progress
tracker, and sends the pickled result back. Everything else the worker sees (the Gradio queue, locks,
counters) is a copy taken when it was forked, stale for every later call. So code inside a GPU handler
must not consult the server's state: :func:`in_gpu_worker` tells it where it runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
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


# --------------------------------------------------------------------------------------------------
# Durations: what a request asks for, computed from its work before it is scheduled
# --------------------------------------------------------------------------------------------------

#: Daily ZeroGPU quota of a visitor, in seconds (hub docs, spaces-zerogpu.md, Aug 2026).
QUOTA_SECONDS = {"logged out": 120, "free account": 300}
#: spaces multiplies a requested duration by this on its slower GPUs (configs.json of spaces 0.51: 1.5 on
#: the RTX Pro 6000, 1.0 on the H200) before comparing it with the visitor's remaining quota.
DURATION_FACTOR = 1.5
#: Measured cost x this = the duration asked for: timings on a shared GPU vary (about 10% here) and the
#: perturbation interval or a one-loop compare only make a request cheaper.
HEADROOM = 1.5
#: Per call, for a worker to start and the weights to reach the GPU (ZeroGPU's first call of a worker).
WORKER_START_SECONDS = 10.0


@dataclass(frozen=True)
class GPUCost:
    """What one model costs on the GPU, measured: the basis of every request's duration."""

    unet_seconds: float  # one UNet evaluation (one image row of one step) at `reference_pixels` or fewer
    reference_pixels: int  # above this, the cost grows with the pixel count
    image_seconds: float  # per image: VAE decode and PNG
    measured: str  # where the figures come from


@dataclass(frozen=True)
class Work:
    """What a request asks the GPU for: steps x images x size x methods."""

    steps: int
    width: int
    height: int
    images: int
    evaluations_per_step: int  # UNet evaluations of one step, summed over the request's images

    def describe(self) -> str:
        return (f"{self.steps} steps x {self.images} image{'s' * (self.images > 1)} at {self.width}x{self.height}, "
                f"{self.steps * self.evaluations_per_step} UNet evaluations")


def evaluations_per_step(guidance_scale: float, *perturbation_scales: float, images: int = 1) -> int:
    """UNet evaluations (image rows) of one step of ``images`` images: 1 per image, or 2 with CFG, plus one
    per active SEG, PAG or SAG term (Eq. 10's perturbed branch; SAG's re-noised pass)."""
    return images * (2 if guidance_scale > 1 else 1) + sum(scale > 0 for scale in perturbation_scales)


def max_request_seconds() -> float:
    """The longest duration a request may ask for: a free account's whole daily quota after spaces' factor
    (``$SEG_MAX_GPU_SECONDS`` raises it, e.g. on a Space whose visitors hold PRO quotas)."""
    override = os.environ.get("SEG_MAX_GPU_SECONDS", "").strip()
    return float(override) if override else QUOTA_SECONDS["free account"] / DURATION_FACTOR


def gpu_duration(cost: GPUCost, work: Work) -> int:
    """Seconds to ask ZeroGPU for: the measured cost of ``work`` with headroom, plus a worker's start.

    A request that could never fit a visitor's quota is refused here, before it is scheduled, with a
    ValueError that says what it asked for and what to change, instead of being cut off half way.
    """
    scale = max(1.0, work.width * work.height / cost.reference_pixels)
    seconds = (HEADROOM * (work.steps * work.evaluations_per_step * cost.unet_seconds * scale
                           + work.images * cost.image_seconds) + WORKER_START_SECONDS)
    limit = max_request_seconds()
    if seconds > limit:
        raise ValueError(
            f"this request needs about {seconds:.0f} s of GPU time ({work.describe()}); on this ZeroGPU Space "
            f"a request may ask for at most {limit:.0f} s (a day's quota is {QUOTA_SECONDS['logged out']} s "
            f"logged out, {QUOTA_SECONDS['free account']} s with a free account). Use fewer steps, fewer "
            "images or a smaller size, or duplicate the Space to run it on your own GPU"
        )
    return math.ceil(seconds)
