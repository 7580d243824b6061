"""The generation service: one model loaded once, one request at a time on it, run as generate, compare
or sweep."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import threading
import time
from typing import Callable, Sequence

import torch
from PIL import Image, ImageOps

from .. import control as controls
from .. import models
from ..adapters import AdapterChoice, AdapterConfig, applied_adapters
from ..attention import resolve_layers
from ..compare import side_by_side
from ..control import Detection
from ..limits import Geometry, Limits, ModelLimits
from ..models import DEFAULT_FALLBACK, ModelProfile
from ..options import COMPARE_AND_SWEEP, GUIDANCE, check_integer
from ..pipeline import StableDiffusionXLSEGPipeline, build_guidance_methods
from ..zerogpu import Work, evaluations_per_step, gpu_duration
from .grids import labelled_grid
from .images import load_control_image
from .loading import CONTROL_TYPES, Pipelines
from .runs import Progress, Run, StepCounter, Sweep, UNetCounter, image_digest, out_of_memory_as_error, stamp_control
from .settings import MAX_SEED, Settings, check_settings, format_sigma, parse_sigma, png_info

logger = logging.getLogger(__name__)

MAX_SWEEP_RUNS = 64

_model_locks: dict[str, threading.Lock] = {}
_model_locks_guard = threading.Lock()


def model_lock(model: str) -> threading.Lock:
    """One lock per model name: one generation at a time on each model, across Studio objects."""
    with _model_locks_guard:
        return _model_locks.setdefault(model, threading.Lock())


def _fresh_locks_in_child() -> None:
    """A forked process (a ZeroGPU worker) starts with new, free locks: a lock copied while a thread of the
    server held it would stay held there forever."""
    global _model_locks_guard
    _model_locks_guard = threading.Lock()
    _model_locks.clear()


os.register_at_fork(after_in_child=_fresh_locks_in_child)


class Studio:
    """Loads a model once (falling back to an offline model when it cannot be loaded) and runs requests.

    Args:
        model: "sdxl", "embedded", "tiny", or an SDXL Hub id or local folder.
        device: torch device (by default CUDA, else MPS, else CPU).
        fallback: the model to use when ``model`` cannot be loaded (by default the embedded model, or
            ``tiny`` where its weights are missing); None to raise instead.
        output_dir: where PNG files are written (default: a new temporary folder).
        limits: what one request may ask for (:class:`Limits`).
        notice: Markdown shown first in the banner (e.g. why this model was chosen).
        compile: compile the UNet (``StableDiffusionXLSEGPipeline.compile()``, regional); the first request
            at each size and set of methods then waits for its compilation.
        adapters: the operator's LoRAs and IP-Adapter (seg_core.adapters, :func:`read_adapter_config`), loaded
            once and chosen per request; None: none (a request naming one is refused).
    """

    def __init__(self, model: str = "sdxl", device: str | None = None, fallback: str | None = DEFAULT_FALLBACK,
                 output_dir: str | None = None, limits: Limits | None = None, notice: str | None = None,
                 compile: bool = False, adapters: AdapterConfig | None = None):
        self.requested_model = model
        self.adapters = adapters
        self.notice = notice
        self.limits = limits or Limits()
        self.load_error: str | None = None
        self.output_dir = output_dir or tempfile.mkdtemp(prefix="seg-studio-")
        os.makedirs(self.output_dir, exist_ok=True)
        self._model_limits: ModelLimits | None = None
        try:
            self._pipelines = Pipelines(model, device, compile, adapters)
            self._pipelines.get("none")
        except Exception as error:  # no network, no cached weights, a bad id ...
            if fallback is None or model == fallback:
                raise
            self.load_error = _short_error(error)
            logger.warning("could not load %s (%s); starting on %r", model, self.load_error, fallback)
            self._pipelines = Pipelines(fallback, device, compile, adapters)
            self._pipelines.get("none")
        self.model = self._pipelines.model

    @property
    def lock(self) -> threading.Lock:
        """One generation at a time on this model (in this process)."""
        return model_lock(self.model)

    # ---- model ------------------------------------------------------------------------------------

    @property
    def profile(self) -> ModelProfile:
        return models.profile(self.model)

    @property
    def model_id(self) -> str:
        """The model as written into PNG metadata (the Hub id for named models)."""
        return models.model_id(self.model)

    @property
    def banner(self) -> str | None:
        """Markdown explaining a fallback and/or an offline model; None for a real model loaded as asked."""
        lines = [self.notice] if self.notice else []
        if self.load_error:
            lines.append(f"**Could not load `{self.requested_model}`** ({self.load_error}). "
                         f"Started on the `{self.model}` model instead.")
        if self.profile.banner:
            lines.append(self.profile.banner)
        return "\n\n".join(lines) or None

    @property
    def model_limits(self) -> ModelLimits:
        """This model's limits on this server (seg_core.limits): from its geometry, the sizes it was trained
        at (its size menu) and the operator's memory budget and pixel limit."""
        if self._model_limits is None:
            self._model_limits = ModelLimits(
                Geometry.of(self.pipeline("none")), max(w * h for w, h in self.profile.sizes),
                int(self.limits.memory_budget_gb * 2**30), self.limits.max_pixels)
        return self._model_limits

    @property
    def size_presets(self) -> list[tuple[int, int]]:
        """The model's sizes within its pixel limit (at least the smallest one, shrunk to fit)."""
        max_pixels = self.model_limits.max_pixels
        fitting = [(w, h) for w, h in self.profile.sizes if w * h <= max_pixels]
        if fitting:
            return fitting
        side = max(8, int(math.isqrt(max_pixels)) // 8 * 8)
        return [(side, side)]

    def evaluations_per_step(self, guidance_scale: float, *perturbation_scales: float, images: int = 1) -> int:
        """UNet evaluations (batch rows) of one step on this model (seg_core.zerogpu.evaluations_per_step): no
        CFG rows on a model with guidance embedded in its time condition (diffusers' rule)."""
        takes_cfg = self.pipeline("none").unet.config.time_cond_proj_dim is None
        return evaluations_per_step(guidance_scale if takes_cfg else 1.0, *perturbation_scales, images=images)

    def request_rows(self, settings: Settings, images: int = 1) -> int:
        """Batch rows of one UNet call for ``settings``: (uncond +) cond per image, plus a row per SEG / PAG
        branch (SAG's pass is a call of its own)."""
        return self.evaluations_per_step(settings.guidance_scale, settings.seg_scale, settings.pag_scale, images=images)

    def check_budget(self, settings: Settings, rows: int | None = None, sag_images: int | None = None) -> None:
        """ValueError naming the limit when ``settings`` ask more of this model than the server allows."""
        rows = self.request_rows(settings) if rows is None else rows
        sag_images = int(settings.sag_scale > 0) if sag_images is None else sag_images
        self.model_limits.check(settings.width, settings.height, rows, sag_images, settings.control_type != "none")

    @property
    def vanilla_label(self) -> str:
        """"Vanilla SDXL" on SDXL models; the small offline models are SDXL's architecture, not SDXL."""
        return models.profile(self.model).vanilla_label

    @property
    def default_steps(self) -> int:
        return min(self.profile.steps, self.limits.max_steps)

    def pipeline(self, control_type: str | Sequence[str] = "none") -> StableDiffusionXLSEGPipeline:
        """The pipeline for a control type ("none", or one of ``CONTROL_TYPES``) or two of them (:class:`Pipelines`)."""
        return self._pipelines.get(control_type)

    def preload(self) -> "Studio":
        """Load every model a request can use (:meth:`Pipelines.preload`); what cannot be loaded is recorded in
        ``unavailable`` and left out of ``control_types``."""
        self._pipelines.preload()
        return self

    @property
    def unavailable(self) -> dict[str, str]:
        """Control types (and "union") that cannot be loaded here, with the reason."""
        return self._pipelines.unavailable

    @property
    def control_types(self) -> list[str]:
        """The control types a request may use here ("none" first)."""
        return self._pipelines.control_types

    @property
    def detector_weights(self) -> str | None:
        return self._pipelines.detector_weights

    @property
    def _pipes(self) -> dict[str, StableDiffusionXLSEGPipeline]:
        return self._pipelines.loaded

    # ---- inputs -----------------------------------------------------------------------------------

    @property
    def defaults(self) -> dict:
        """What a request left out takes here: this model's preferences, its first size within this server's
        pixel limit and its steps within the step limit (the options' defaults for the rest)."""
        width, height = self.size_presets[0]
        return {**self.profile.request_defaults(), "steps": self.default_steps, "width": width, "height": height}

    def settings(self, **values) -> Settings:
        """Settings from keyword arguments, THE check of a request: each value once, with its option's rule
        and this server's limits (a value left out or None: :attr:`defaults`); ValueError naming the value."""
        adapters = {name: values.pop(name, None) for name in ("loras", "ip_adapter_image", "ip_adapter_scale")}
        settings = check_settings(values, self.defaults, self.limits.highs)
        self.check_layers(settings.seg_applied_layers)
        settings.model = self.model_id
        self.choose_adapters(settings, **adapters)
        self.check_budget(settings)
        return settings

    def choose_adapters(self, settings: Settings, loras=None, ip_adapter_image=None, ip_adapter_scale=None) -> None:
        """Set ``settings``' adapters to a request's choice, checked once with the operator's AdapterConfig
        (seg_core.adapters): configured LoRA names with weights in their ranges, an image prompt (decoded
        as a control image is, :func:`load_control_image`) at a scale in the IP-Adapter's range (left out:
        its default with an image, else 0). Without a config any choice but none is refused."""
        config = self.adapters or AdapterConfig()
        image = None if ip_adapter_image is None else load_control_image(ip_adapter_image, self.limits)
        if ip_adapter_scale is None:
            ip_adapter_scale = config.ip_adapter.default_scale if image is not None and config.ip_adapter else 0.0
        choice = AdapterChoice({} if loras is None else loras, image, ip_adapter_scale)
        config.check(choice)
        settings.loras, settings.ip_adapter_image = dict(choice.loras), image
        settings.ip_adapter_scale = float(ip_adapter_scale)
        settings.ip_adapter_image_sha256 = image_digest(image)

    def check_layers(self, layers: list[str]) -> None:
        """ValueError unless ``layers`` are few, short and name attention layers of this model's UNet."""
        if len(layers) > self.limits.max_layer_names:
            raise ValueError(f"seg_applied_layers may name at most {self.limits.max_layer_names} layers, got "
                             f"{len(layers)}")
        for layer in layers:
            if len(layer) > 16:
                raise ValueError(f"unknown attention layer {layer[:16]!r}... (layer names are short: mid, d4, u0)")
        resolve_layers(self.pipeline("none").unet, layers)  # unknown names: ValueError

    def control_map(self, control_type: str, image, width: int, height: int,
                    detection: Detection = Detection()) -> Image.Image | None:
        """The preprocessed control map for ``image`` (a PIL image, an uploaded file's path or its bytes,
        decoded by :func:`load_control_image`) cropped and resized to the output size; ``detection``: the
        detector's knobs (``preprocess=False``: the image is the map)."""
        if control_type in (None, "none"):
            return None
        if control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type must be one of {list(CONTROL_TYPES)}, got {control_type!r}")
        if control_type in self.unavailable:  # never load it here: this may be a GPU worker
            raise RuntimeError(self.unavailable[control_type])
        if image is None:
            raise ValueError(f"control_type {control_type!r} needs a control_image")
        image = load_control_image(image, self.limits)
        fitted = ImageOps.fit(image, (int(width), int(height)), Image.LANCZOS)
        return controls.control_map(control_type, fitted, detection, weights_dir=self.detector_weights)

    def control_maps(self, settings: Settings, control_image, control_image_2=None):
        """The request's control maps: (what the pipeline gets: None, a map or a list of two; a preview, the
        maps side by side). ``control_image_2`` is the second control's image."""
        images = (control_image, control_image_2)
        maps = [self.control_map(t, image, settings.width, settings.height, settings.detection(second=k == 1))
                for k, (t, image) in enumerate(zip((settings.control_type, settings.control_type_2), images))
                if t != "none"]
        if not maps:
            return None, None
        if len(maps) == 1:
            return maps[0], maps[0]
        preview = Image.new("RGB", (settings.width * 2, settings.height))
        for k, image in enumerate(maps):
            preview.paste(image, (settings.width * k, 0))
        return maps, preview

    # ---- requests ---------------------------------------------------------------------------------

    def generate(self, settings: Settings, control_image: Image.Image | None = None,
                 progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None, control_image_2=None) -> tuple[Run, Image.Image | None]:
        """One image; returns the run and the control map used (None without ControlNet).

        ``should_stop``, polled before the run and after every denoising step, cancels the request
        (:class:`GenerationCancelled`) when it returns True; the model is left as it was.
        """
        runs, control = self.generate_images(settings, 1, control_image, progress, should_stop, control_image_2)
        return runs[0], control

    @property
    def max_images(self) -> int:
        """Images one Generate request may ask for: ``limits.max_images``, but one for SDXL-sized models on a
        CPU (minutes per step)."""
        if self.pipeline().device.type == "cpu" and not models.is_offline(self.model):
            return 1
        return self.limits.max_images

    def generate_images(self, settings: Settings, count: int, control_image: Image.Image | None = None,
                        progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                        control_image_2=None) -> tuple[list[Run], Image.Image | None]:
        """``count`` images from seeds ``settings.seed``, +1, +2, ...: each the image Generate gives for its
        seed. Returns the runs and the control map used."""
        count = check_integer("images", count, 1, self.max_images, " here")
        control, preview = self.control_maps(settings, control_image, control_image_2)
        stamp_control(settings, control)
        steps = StepCounter(settings.steps * count, progress, should_stop)
        with self.lock:
            runs = [self._run(settings.method, dataclasses.replace(settings, seed=(settings.seed + i) % (MAX_SEED + 1)),
                              control, steps) for i in range(count)]
        return runs, preview

    def compare(self, settings: Settings, control_image: Image.Image | None = None, sag_scale: float | None = None,
                pag_scale: float | None = None, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None,
                one_loop: bool = False, control_image_2=None) -> tuple[list[Run], Image.Image | None]:
        """Vanilla, SAG, PAG and SEG from the same seed and settings (SEG with ``settings``' scale; SAG and
        PAG scales left out are the model profile's).

        ``one_loop`` renders the four in one denoising loop with batched UNet calls (seg_core.compare):
        the same images, faster where UNet calls are launch-bound (a GPU), but one time for all four.
        """
        one_loop = COMPARE_AND_SWEEP["one_loop"].check(one_loop)
        sag_scale = GUIDANCE["sag_scale"].check(self.profile.sag_scale if sag_scale is None else sag_scale)
        pag_scale = GUIDANCE["pag_scale"].check(self.profile.pag_scale if pag_scale is None else pag_scale)
        if sag_scale <= 0 or pag_scale <= 0 or settings.seg_scale <= 0:
            raise ValueError(f"compare needs sag_scale, pag_scale and seg_scale > 0, got "
                             f"{sag_scale}, {pag_scale} and {settings.seg_scale}")
        variants = [
            (self.vanilla_label, dict(seg_scale=0.0, pag_scale=0.0, sag_scale=0.0)),
            (f"SAG (scale {sag_scale:g})", dict(seg_scale=0.0, pag_scale=0.0, sag_scale=sag_scale)),
            (f"PAG (scale {pag_scale:g})", dict(seg_scale=0.0, pag_scale=pag_scale, sag_scale=0.0)),
            (f"SEG (scale {settings.seg_scale:g}, σ {format_sigma(settings.seg_blur_sigma)})",
             dict(pag_scale=0.0, sag_scale=0.0)),
        ]
        vanilla = dataclasses.replace(settings, seg_scale=0.0, pag_scale=0.0)
        if one_loop:  # every image's rows in one call; SAG's map on each image's first row
            self.check_budget(settings, self.request_rows(vanilla, images=len(variants)) + 2, len(variants))
        else:
            self.check_budget(vanilla, self.request_rows(vanilla) + 1, 1)
        control, preview = self.control_maps(settings, control_image, control_image_2)
        stamp_control(settings, control)
        steps = StepCounter(settings.steps * len(variants), progress, should_stop)
        with self.lock:
            if one_loop:
                runs = self._run_one_loop(variants, settings, control, steps)
            else:
                runs = [self._run(label, dataclasses.replace(settings, **change), control, steps)
                        for label, change in variants]
        return runs, preview

    def _run_one_loop(self, variants, settings: Settings, control, steps: StepCounter) -> list[Run]:
        """The variants' images in one loop (seg_core.compare.side_by_side), saved as separate runs."""
        each = [dataclasses.replace(settings, **change) for _, change in variants]
        method_sets = [build_guidance_methods(**{k: v for k, v in s.pipeline_kwargs().items() if k in GUIDANCE})
                       for s in each]
        kwargs = {k: v for k, v in settings.pipeline_kwargs().items() if k not in GUIDANCE}
        if control is not None:
            kwargs["image"] = control
        images, seconds, counted = self._timed(
            settings, steps, "all four in one loop", len(variants),
            lambda pipe, on_step_end, adapter_kwargs: side_by_side(
                pipe, method_sets, seed=settings.seed, output_type="pil", callback_on_step_end=on_step_end,
                **kwargs, **adapter_kwargs))
        runs = []
        for (label, _), run_settings, methods, image in zip(variants, each, method_sets, images):
            # Each image's UNet evaluations: what it would cost alone (its rows of the batched calls).
            evaluations = sum(self.evaluations_per_step(settings.guidance_scale,
                                                        *(m.is_active(i, settings.steps) for m in methods))
                              for i in range(settings.steps))
            runs.append(self._saved(Run(label, run_settings, image, seconds, evaluations, one_loop=True),
                                    {"seconds_all_four": round(seconds, 3), "unet_evaluations": evaluations}))
        if sum(r.unet_evaluations for r in runs) != counted:
            logger.warning("one loop: %d UNet rows counted, %d attributed", counted,
                           sum(r.unet_evaluations for r in runs))
        return runs

    def sweep(self, settings: Settings, sigmas: Sequence, row_axis: str | None = None, row_values: Sequence = (),
              control_image: Image.Image | None = None, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None, control_image_2=None) -> tuple[Sweep, Image.Image | None]:
        """A grid over blur sigma (columns) and optionally ``seg_scale`` or ``guidance_scale`` (rows)."""
        sigmas = [parse_sigma(s) for s in sigmas]
        if row_axis in (None, "", "none"):
            row_axis, row_values = None, [None]
        elif row_axis not in ("seg_scale", "guidance_scale"):
            raise ValueError(f"the second sweep axis must be 'none', 'seg_scale' or 'guidance_scale', got {row_axis!r}")
        elif not row_values:
            raise ValueError(f"give at least one {row_axis} value for the second sweep axis")
        if settings.seg_scale <= 0 and row_axis != "seg_scale":
            raise ValueError("a sigma sweep needs seg_scale > 0 (at seg_scale 0 the blur has no effect), got "
                             f"{settings.seg_scale}")
        runs_total = len(sigmas) * len(row_values)
        max_runs = min(MAX_SWEEP_RUNS, self.limits.max_sweep_images)
        if runs_total > max_runs:
            raise ValueError(f"a sweep may have at most {max_runs} images, got "
                             f"{len(sigmas)} sigmas x {len(row_values)} rows = {runs_total}")
        for value in row_values:
            self.check_budget(dataclasses.replace(settings, **({row_axis: float(value)} if row_axis else {})))
        control, preview = self.control_maps(settings, control_image, control_image_2)
        stamp_control(settings, control)
        steps = StepCounter(settings.steps * runs_total, progress, should_stop)
        runs: list[list[Run]] = []
        with self.lock:
            for value in row_values:
                row_change = {row_axis: float(value)} if row_axis else {}
                row = []
                for sigma in sigmas:
                    cell = dataclasses.replace(settings, seg_blur_sigma=sigma, **row_change)
                    row.append(self._run(f"σ {format_sigma(sigma)}", cell, control, steps, save=False))
                runs.append(row)
        axis_names = {"seg_scale": "SEG scale", "guidance_scale": "CFG scale"}
        title = f"seed {settings.seed}" + (f" · {settings.prompt[:60]}" if settings.prompt else " · unconditional")
        grid = labelled_grid(
            [[run.image for run in row] for row in runs],
            [f"sigma = {format_sigma(s)}" for s in sigmas],  # the default font has no Greek
            [f"{axis_names[row_axis]} {float(v):g}" for v in row_values] if row_axis else None,
            title=title,
        )
        sweep = Sweep(runs, "seg_blur_sigma", sigmas, row_axis, list(row_values) if row_axis else [], grid)
        extra = {"sweep": {"columns": {"axis": "seg_blur_sigma", "values": [format_sigma(s) for s in sigmas]},
                           "rows": {"axis": row_axis, "values": list(row_values) if row_axis else []}}}
        sweep.path = self._save(grid, settings, "sweep", extra)
        return sweep, preview

    # ---- what a request asks of the GPU (ZeroGPU durations) -----------------------------------------

    def gpu_seconds(self, kind: str, settings: Settings, sigmas: Sequence = (), row_axis: str | None = None,
                    row_values: Sequence = (), images: int = 1) -> int:
        """The ZeroGPU duration of request ``kind`` ("generate" with its number of images, "compare", or
        "sweep" with its axes) from its work and this model's measured cost; ValueError if it could never
        fit a quota."""
        s = settings
        if kind == "generate":
            per_image = self.evaluations_per_step(s.guidance_scale, s.seg_scale, s.pag_scale, s.sag_scale)
            work = Work(s.steps, s.width, s.height, images, images * per_image)
        elif kind == "compare":  # vanilla, then SAG, PAG and SEG with one extra evaluation each
            work = Work(s.steps, s.width, s.height, 4, self.evaluations_per_step(s.guidance_scale, 1, 1, 1, images=4))
        elif kind == "sweep":
            images = len(sigmas) * max(1, len(row_values) if row_axis not in (None, "", "none") else 1)
            guidance = max([s.guidance_scale] + [float(v) for v in row_values if row_axis == "guidance_scale"])
            work = Work(s.steps, s.width, s.height, images, images * self.evaluations_per_step(guidance, 1.0))
        else:
            raise ValueError(f"kind must be 'generate', 'compare' or 'sweep', got {kind!r}")
        return gpu_duration(self.profile.gpu_cost, work)

    # ---- internals --------------------------------------------------------------------------------

    def _run(self, label: str, settings: Settings, control: Image.Image | None, steps: StepCounter,
             save: bool = True) -> Run:
        extra = {"image": control} if control is not None else {}
        generator = torch.Generator().manual_seed(settings.seed)  # CPU: the same noise on any device
        image, seconds, evaluations = self._timed(
            settings, steps, label, 1,
            lambda pipe, on_step_end, adapter_kwargs: pipe(
                **settings.pipeline_kwargs(), **extra, **adapter_kwargs, generator=generator, output_type="pil",
                callback_on_step_end=on_step_end).images[0])
        run = Run(label, settings, image, seconds, evaluations)
        if save:
            self._saved(run, {"seconds": round(seconds, 3), "unet_evaluations": evaluations})
        return run

    def _timed(self, settings: Settings, steps: StepCounter, label: str, images: int, render: Callable):
        """``render(pipe, on_step_end, adapter_kwargs)`` on the request's pipeline with its adapters on, timed and
        its UNet evaluations counted: (its result, seconds, evaluations). Each denoising step advances ``steps``
        once per image rendered."""
        pipe = self.pipeline(settings.control_types or "none")

        def on_step_end(pipe, i, t, tensors):
            for _ in range(images):
                steps.advance(label)  # raises GenerationCancelled when the request was cancelled
            return tensors

        steps.check()  # a request cancelled while it waited for the model does not start
        # An exception anywhere in here leaves the model clean: the pipeline restores its attention
        # processors and down-block hooks in `finally`.
        with UNetCounter(pipe.unet) as counter, out_of_memory_as_error(pipe, settings), \
                self._adapters(pipe, settings) as adapter_kwargs:
            start = time.perf_counter()
            result = render(pipe, on_step_end, adapter_kwargs)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return result, seconds, counter.evaluations

    def _adapters(self, pipe, settings: Settings):
        """The request's adapters on for the calls inside (in the model lock: their state is the shared
        UNet's), yielding what each call adds (seg_core.adapters.applied_adapters); nothing without a config."""
        if self.adapters is None:
            return contextlib.nullcontext({})
        return applied_adapters(pipe, self.adapters, settings.adapter_choice())

    def _saved(self, run: Run, extra: dict) -> Run:
        """``run`` with its image written to a PNG carrying its settings and ``extra``."""
        run.path = self._save(run.image, run.settings, run.settings.method.lower().replace("+", "-"), extra)
        return run

    def _save(self, image: Image.Image, settings: Settings, stem: str, extra: dict | None = None) -> str:
        # A unique name from the file system, not from a counter: ZeroGPU workers forked from the same
        # server would count from the same number and overwrite each other's files.
        handle, path = tempfile.mkstemp(prefix=f"{stem}-seed{settings.seed}-", suffix=".png", dir=self.output_dir)
        with os.fdopen(handle, "wb") as file:
            image.save(file, format="PNG", pnginfo=png_info(settings, extra))
        return path


def _short_error(error: Exception) -> str:
    """The first sentence of an error, for a banner (loading errors from the Hub run to paragraphs)."""
    text = str(error).splitlines()[0] if str(error) else ""
    text = text.split(" (", 1)[0][:300]
    return f"{type(error).__name__}: {text}"

