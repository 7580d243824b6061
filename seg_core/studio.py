"""The generation service behind the demo: one request = one seed, run as generate, compare or sweep.

Everything here is independent of the UI: loading (with a fallback to the offline ``tiny`` model),
one generation at a time per model, progress over all denoising steps of a request, counting UNet
evaluations, timing, labelled sweep grids, and PNG files that carry their full settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import os
import random
import re
import struct
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .blur import INFINITE_SIGMA_THRESHOLD
from .attention import resolve_layers
from .compare import side_by_side
from .methods import check_interval, check_scale
from .pipeline import MAX_SIDE, StableDiffusionXLSEGPipeline, build_guidance_methods
from .limits import Geometry, ModelLimits
from .zerogpu import GPU, Work, evaluations_per_step, gpu_duration  # noqa: F401 (GPU re-exported)
from . import control as controls
from .control import RANDOM_WEIGHTS, Detection, load_detector
from . import models
from .models import DEFAULT_FALLBACK, PROFILES, SDXL, ModelProfile  # noqa: F401 (re-exported)
from .presets import (DEPTH_ESTIMATOR, UNION, control_arguments, controlnet_choice,
                      load_depth_estimator, load_pipeline, with_controlnet)

logger = logging.getLogger(__name__)

#: ``progress(done_steps, total_steps, description)``, called after every denoising step of a request.
Progress = Callable[[int, int, str], None]

MAX_SEED = 2**32 - 1
MAX_SWEEP_RUNS = 64
CONTROL_TYPES = ("none", *controls.CONTROL_TYPES)
PNG_SETTINGS_KEY = "seg_settings"  # JSON of Settings, in a PNG text chunk
PNG_PARAMETERS_KEY = "parameters"  # the same, readable (the key other SD tools use)

SDXL_PROFILE = SDXL


# --------------------------------------------------------------------------------------------------
# Limits: what a public server accepts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the operator sets these (app.py flags). Defaults suit a shared GPU."""

    max_pixels: int = 2048 * 2048  # width x height of one image
    max_steps: int = 150  # denoising steps of one image
    max_prompt_chars: int = 1000  # per prompt (CLIP reads the first 77 tokens anyway)
    max_upload_mb: float = 10.0  # control image file size
    max_image_side: int = 4096  # control image sides after decoding (and at most max_image_side^2 pixels)
    max_sweep_images: int = 64  # images in one sweep
    max_layer_names: int = 32  # entries in seg_applied_layers
    max_body_mb: float | None = None  # one HTTP request body; None: room for a base64 upload at the limit
    memory_budget_gb: float = 8.0  # one request's activations (weights not counted); see seg_core.limits
    max_images: int = 4  # images of one Generate request (seeds seed, seed + 1, ...), where the device allows

    def __post_init__(self):
        for name in ("max_pixels", "max_steps", "max_prompt_chars", "max_image_side", "max_sweep_images",
                     "max_layer_names", "max_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.max_upload_mb, (int, float)) and math.isfinite(self.max_upload_mb)
                and self.max_upload_mb > 0):
            raise ValueError(f"max_upload_mb must be a positive number, got {self.max_upload_mb!r}")
        if not (isinstance(self.memory_budget_gb, (int, float)) and 0 < self.memory_budget_gb < math.inf):
            raise ValueError(f"memory_budget_gb must be a positive number, got {self.memory_budget_gb!r}")
        if self.max_body_mb is not None and not (isinstance(self.max_body_mb, (int, float))
                                                 and self.max_upload_mb < self.max_body_mb < math.inf):
            raise ValueError(f"max_body_mb must be a number above max_upload_mb ({self.max_upload_mb:g}), "
                             f"got {self.max_body_mb!r}")
        if self.max_pixels < 64:
            raise ValueError(f"max_pixels must be at least 64 (8x8), got {self.max_pixels}")
        if self.max_steps > 1000:
            raise ValueError(f"max_steps must be at most 1000 (the pipeline's limit), got {self.max_steps}")
        if self.max_image_side < 8:
            raise ValueError(f"max_image_side must be at least 8, got {self.max_image_side}")


    @property
    def max_body_bytes(self) -> int:
        """The request body limit: ``max_body_mb``, or an upload at the limit as a base64 data URL + 2 MB."""
        mb = self.max_body_mb if self.max_body_mb is not None else self.max_upload_mb * 4 / 3 + 2
        return int(mb * 2**20)


MIN_IMAGE_SIDE = 8  # pixels: a smaller control image carries nothing to fit to the output size


class GenerationCancelled(Exception):
    """The request was cancelled (its client went away); its work stopped at the next denoising step."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory during a request; the model was left clean."""


def load_control_image(source, limits: Limits = Limits()) -> Image.Image:
    """An RGB control image from a PIL image, a file path or bytes, decoded defensively.

    Refuses what is not an image, a file over ``limits.max_upload_mb``, sides under 8 or over
    ``limits.max_image_side`` pixels (checked from the header, before decoding: no decompression bombs).
    Converts grayscale, 16-bit, float, palette, CMYK and transparent images to 8-bit RGB (transparent
    pixels on white) and applies the EXIF orientation.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(_checked_size(source, limits))
    if isinstance(source, (bytes, bytearray)):
        size, opener = len(source), lambda: io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ValueError("control_image could not be read (no such uploaded file)") from None
        opener = lambda: path  # noqa: E731
    else:
        raise ValueError(f"control_image must be an image file, got {type(source).__name__}")
    if size > limits.max_upload_mb * 2**20:
        raise ValueError(f"control_image must be at most {limits.max_upload_mb:g} MB, got {size / 2**20:.1f} MB")
    if size == 0:
        raise ValueError("control_image is an empty file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opener()) as image:
                _checked_size(image, limits)  # from the header, before any pixel is decoded
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ValueError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"control_image is not a readable image (PNG, JPEG, WebP, ...): "
                         f"{type(error).__name__}") from None
    except (OSError, SyntaxError, EOFError, struct.error, MemoryError) as error:
        raise ValueError(f"control_image is corrupt or truncated ({type(error).__name__})") from None


def _checked_size(image: Image.Image, limits: Limits) -> Image.Image:
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE or max(width, height) > limits.max_image_side:
        raise ValueError(f"control_image sides must be in [{MIN_IMAGE_SIDE}, {limits.max_image_side}] pixels, "
                         f"got {width}x{height}")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float data rescaled (not clipped), transparency flattened onto white."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            array = array / 257.0
        elif mode == "I" and 0 <= array.min() and array.max() <= 65535:
            array = array / (257.0 if array.max() > 255 else 1.0)
        else:  # floats or 32-bit integers: stretch what is there
            low, high = float(np.nanmin(array)), float(np.nanmax(array))
            array = (np.nan_to_num(array, nan=low) - low) / max(high - low, 1e-12) * 255.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Settings: everything needed to reproduce one image
# --------------------------------------------------------------------------------------------------


def parse_sigma(value) -> float:
    """A blur sigma from a number or a string; "inf", "infinite", "∞" and anything > 9999 mean infinite."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "+inf", "infinite", "infinity", "∞"):
            return math.inf
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"seg_blur_sigma must be a number >= 0 or 'inf', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"seg_blur_sigma must be a number >= 0 or 'inf', got {value!r}")
    return math.inf if value > INFINITE_SIGMA_THRESHOLD else float(value)


def format_sigma(sigma: float) -> str:
    return "inf" if math.isinf(sigma) else f"{sigma:g}"


def parse_values(text, name: str, parse=float) -> list:
    """A list from "1, 4, 16, inf" (brackets and quotes ignored); ValueError naming the bad item."""
    if isinstance(text, (list, tuple)):
        items = [str(item) for item in text]
    else:
        items = re.sub(r"[\[\]'\"]", " ", str(text or "")).replace(";", ",").split(",")
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ValueError(f"{name} must list at least one value, got {text!r}")
    values = []
    for item in items:
        try:
            values.append(parse(item))
        except ValueError as error:
            raise ValueError(f"{name}: bad value {item!r} ({error})") from None
    return values


def parse_layers(value) -> list[str]:
    """Applied layers from a list or a comma-separated string ("mid", "down, up", "m0, u1")."""
    layers = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    layers = [str(layer).strip() for layer in layers if str(layer).strip()]
    if not layers:
        raise ValueError("seg_applied_layers must name at least one layer, e.g. ['mid'], got an empty list")
    return layers


def resolve_seed(seed) -> int:
    """The seed to use: a random one for None or -1."""
    if isinstance(seed, float) and not math.isfinite(seed):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}] (or -1 for a random one), got {seed!r}")
    if seed is None or (isinstance(seed, (int, float)) and not isinstance(seed, bool) and seed == -1):
        return random.randint(0, MAX_SEED)
    if (isinstance(seed, bool) or not isinstance(seed, (int, float)) or seed != int(seed) or seed < 0
            or seed > MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}] (or -1 for a random one), got {seed!r}")
    return int(seed)


@dataclass
class Settings:
    """One generation's settings, named as the pipeline's arguments."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    width: int = 1024
    height: int = 1024
    guidance_scale: float = 1.0
    seg_scale: float = 3.0
    seg_blur_sigma: float = math.inf
    seg_applied_layers: list[str] = field(default_factory=lambda: ["mid"])
    pag_scale: float = 0.0
    sag_scale: float = 0.0
    perturbation_guidance_start: float = 0.0
    perturbation_guidance_end: float = 1.0
    control_type: str = "none"
    controlnet_conditioning_scale: float = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    control_preprocess: bool = True  # False: the control image is already a control map
    # The detectors' knobs (seg_core.control.Detection), for both controls.
    detect_resolution: int = 512
    canny_low_threshold: int = 100
    canny_high_threshold: int = 200
    openpose_hands: bool = False
    openpose_face: bool = False
    # A second control (read with the first by the union model, one mode each).
    control_type_2: str = "none"
    controlnet_conditioning_scale_2: float = 1.0
    control_guidance_start_2: float = 0.0
    control_guidance_end_2: float = 1.0
    control_preprocess_2: bool = True
    model: str = ""
    control_image_sha256: str | None = None

    @property
    def control_types(self) -> tuple[str, ...]:
        """The request's control types: (), one, or two."""
        return tuple(t for t in (self.control_type, self.control_type_2) if t != "none")

    def detection(self, second: bool = False) -> Detection:
        """How to make the first (or second) control's map."""
        return Detection(preprocess=self.control_preprocess_2 if second else self.control_preprocess,
                         detect_resolution=self.detect_resolution, low_threshold=self.canny_low_threshold,
                         high_threshold=self.canny_high_threshold, hands=self.openpose_hands, face=self.openpose_face)

    @property
    def method(self) -> str:
        """"vanilla", or the active guidance terms ("SEG", "PAG", "SAG", "SEG+PAG", ...)."""
        active = [name for name, scale in (("SEG", self.seg_scale), ("PAG", self.pag_scale), ("SAG", self.sag_scale))
                  if scale > 0]
        return "+".join(active) or "vanilla"

    def pipeline_kwargs(self) -> dict:
        """The keyword arguments of StableDiffusionXLSEGPipeline.__call__ (without image / generator)."""
        kwargs = dict(
            prompt=self.prompt, negative_prompt=self.negative_prompt or None, height=self.height,
            width=self.width, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
            seg_scale=self.seg_scale, seg_blur_sigma=self.seg_blur_sigma,
            seg_applied_layers=list(self.seg_applied_layers), pag_scale=self.pag_scale,
            pag_applied_layers=list(self.seg_applied_layers), sag_scale=self.sag_scale,
            perturbation_guidance_start=self.perturbation_guidance_start,
            perturbation_guidance_end=self.perturbation_guidance_end,
        )
        if self.control_types:
            n = len(self.control_types)
            kwargs.update(control_arguments(
                self.control_types, [self.controlnet_conditioning_scale, self.controlnet_conditioning_scale_2][:n],
                [self.control_guidance_start, self.control_guidance_start_2][:n],
                [self.control_guidance_end, self.control_guidance_end_2][:n]))
        return kwargs

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["seg_blur_sigma"] = format_sigma(self.seg_blur_sigma)  # JSON has no infinity
        data["method"] = self.method
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "seg_blur_sigma" in values:
            values["seg_blur_sigma"] = parse_sigma(values["seg_blur_sigma"])
        return cls(**values)

    def describe(self) -> str:
        """The settings as readable lines (the PNG "parameters" text)."""
        lines = [self.prompt or "(no prompt: unconditional)"]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        parts = [f"Method: {self.method}", f"Seed: {self.seed}", f"Steps: {self.steps}",
                 f"Size: {self.width}x{self.height}", f"CFG scale: {self.guidance_scale:g}",
                 f"SEG scale: {self.seg_scale:g}", f"SEG blur sigma: {format_sigma(self.seg_blur_sigma)}",
                 f"Layers: {', '.join(self.seg_applied_layers)}", f"PAG scale: {self.pag_scale:g}",
                 f"SAG scale: {self.sag_scale:g}",
                 f"Guidance interval: {self.perturbation_guidance_start:g}-{self.perturbation_guidance_end:g}"]
        if self.control_type != "none":
            parts.append(f"ControlNet: {self.control_type} x{self.controlnet_conditioning_scale:g}")
        if self.control_type_2 != "none":
            parts.append(f"ControlNet 2: {self.control_type_2} x{self.controlnet_conditioning_scale_2:g}")
        parts.append(f"Model: {self.model}")
        lines.append(", ".join(parts))
        return "\n".join(lines)


def png_info(settings: Settings, extra: dict | None = None) -> PngInfo:
    info = PngInfo()
    data = settings.to_dict() | (extra or {})
    text = settings.describe()
    if extra and "sweep" in extra:  # a grid: its axes replace the single values they vary
        axes = [extra["sweep"]["columns"], extra["sweep"]["rows"]]
        text += "\n" + ", ".join(f"Sweep {where}: {axis['axis']} = {', '.join(str(v) for v in axis['values'])}"
                                for where, axis in zip(("columns", "rows"), axes) if axis["axis"])
    info.add_text(PNG_PARAMETERS_KEY, text)
    info.add_text(PNG_SETTINGS_KEY, json.dumps(data))
    info.add_text("Software", "seg_core studio (Smoothed Energy Guidance for SDXL)")
    return info


def read_png_settings(image: Image.Image | str) -> dict:
    """The settings stored in a PNG written by this module (empty dict if none)."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            return read_png_settings(opened)
    text = image.info.get(PNG_SETTINGS_KEY)
    return json.loads(text) if text else {}


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Sweep grid
# --------------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(images: Sequence[Sequence[Image.Image]], column_labels: Sequence[str],
                  row_labels: Sequence[str] | None = None, title: str = "",
                  min_cell: int = 160, max_cell: int = 512, gap: int = 4) -> Image.Image:
    """A grid of images with column labels on top and row labels on the left (the paper's figures).

    Cells are scaled so their longer side lies in [min_cell, max_cell]: tiny images are enlarged
    (nearest neighbour, so pixels stay visible), SDXL's 1024 px ones shrunk.
    """
    width, height = images[0][0].size
    scale = min(max(min_cell / max(width, height), 1.0), max_cell / max(width, height))
    image_w, image_h = round(width * scale), round(height * scale)
    cell_w, cell_h = image_w + gap, image_h + gap
    font_size = max(14, min(28, cell_w // 9))
    font, pad = _font(font_size), font_size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text):
        left, _, right, _ = measure.textbbox((0, 0), text, font=font)
        return right - left

    label_h = font_size + 2 * pad
    title_h = label_h if title else 0
    left_w = max((text_width(t) for t in row_labels), default=0) + 2 * pad if row_labels else 0
    grid = Image.new("RGB", (left_w + cell_w * len(column_labels), title_h + label_h + cell_h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for c, text in enumerate(column_labels):
        x = left_w + c * cell_w + (cell_w - text_width(text)) // 2
        draw.text((x, title_h + pad), text, fill="black", font=font)
    for r, row in enumerate(images):
        y = title_h + label_h + r * cell_h
        if row_labels:
            draw.text((pad, y + (cell_h - font_size) // 2), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            resample = Image.NEAREST if scale > 1 else Image.LANCZOS
            grid.paste(image.convert("RGB").resize((image_w, image_h), resample), (left_w + c * cell_w, y))
    return grid


# --------------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------------

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


def depth_available() -> bool:
    """Whether the depth estimator can be loaded: online, or its weights cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return True
    return isinstance(try_to_load_from_cache(DEPTH_ESTIMATOR, "config.json"), str)


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
    """

    def __init__(self, model: str = "sdxl", device: str | None = None, fallback: str | None = DEFAULT_FALLBACK,
                 output_dir: str | None = None, limits: Limits | None = None, notice: str | None = None,
                 compile: bool = False):
        self.compile = compile
        self.requested_model = model
        self.notice = notice
        self.limits = limits or Limits()
        self.device = device
        self.load_error: str | None = None
        self._pipes: dict[str | None, StableDiffusionXLSEGPipeline] = {}
        self.unavailable: dict[str, str] = {}  # control type -> why it cannot be loaded here
        self._load_lock = threading.Lock()
        self.output_dir = output_dir or tempfile.mkdtemp(prefix="seg-studio-")
        os.makedirs(self.output_dir, exist_ok=True)
        self._model_limits: ModelLimits | None = None
        try:
            self.model = model
            self.pipeline("none")
        except Exception as error:  # no network, no cached weights, a bad id ...
            if fallback is None or model == fallback:
                raise
            self.load_error = _short_error(error)
            logger.warning("could not load %s (%s); starting on %r", model, self.load_error, fallback)
            self.model = fallback
            self.pipeline("none")

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

    def request_rows(self, settings: Settings, images: int = 1) -> int:
        """Batch rows of one UNet call for ``settings``: (uncond +) cond, plus a row per SEG / PAG branch."""
        cfg = _positive(settings.guidance_scale - 1) and self.pipeline("none").unet.config.time_cond_proj_dim is None
        return images * (2 if cfg else 1) + _positive(settings.seg_scale) + _positive(settings.pag_scale)

    def check_budget(self, settings: Settings, rows: int | None = None, sag_images: int | None = None) -> None:
        """ValueError naming the limit when ``settings`` ask more of this model than the server allows."""
        rows = self.request_rows(settings) if rows is None else rows
        sag_images = _positive(settings.sag_scale) if sag_images is None else sag_images
        self.model_limits.check(settings.width, settings.height, rows, sag_images, settings.control_type != "none")

    @property
    def vanilla_label(self) -> str:
        """"Vanilla SDXL" on SDXL models; the small offline models are SDXL's architecture, not SDXL."""
        return models.profile(self.model).vanilla_label

    @property
    def default_steps(self) -> int:
        return min(self.profile.steps, self.limits.max_steps)

    def pipeline(self, control_type: str | Sequence[str] = "none") -> StableDiffusionXLSEGPipeline:
        """The pipeline for a control type ("none", or one of ``CONTROL_TYPES``) or two of them, loaded once
        and cached. Every type the union model serves, and every pair, share one pipeline ("union")."""
        types = () if control_type == "none" else (control_type,) if isinstance(control_type, str) else tuple(control_type)
        for name in types:
            if name not in CONTROL_TYPES[1:]:
                raise ValueError(f"control_type must be one of {list(CONTROL_TYPES)}, got {name!r}")
            if name in self.unavailable:
                raise RuntimeError(self.unavailable[name])
        key = "none" if not types else "union" if controlnet_choice(types).is_union else types[0]
        if key in self.unavailable:
            raise RuntimeError(self.unavailable[key])
        pipe = self._pipes.get(key)
        if pipe is not None:  # loaded: no lock (a ZeroGPU worker's copy of the lock may be held forever)
            return pipe
        with self._load_lock:
            if key not in self._pipes:
                self._pipes[key] = self._load(key)
            return self._pipes[key]

    @property
    def detector_weights(self) -> str | None:
        """Where the learned detectors' weights come from: the Hub (or its cache), or, on the small offline
        models (which get random ControlNets too), seeded random weights."""
        return RANDOM_WEIGHTS if models.is_offline(self.model) else None

    def preload(self) -> "Studio":
        """Load (and move to the device) every model a request can use, ControlNets and the depth estimator
        included, so that none loads inside a request: on ZeroGPU a GPU worker would load it again in every
        new worker, inside the visitor's GPU time. What cannot be loaded is recorded in ``unavailable``
        (and left out of ``control_types``); a request for it gets that reason."""
        for control_type in CONTROL_TYPES[1:]:
            try:
                if control_type == "depth":
                    if not depth_available():
                        raise RuntimeError(f"depth needs its estimator's weights ({DEPTH_ESTIMATOR}), "
                                           "not available here (offline and not cached)")
                    load_depth_estimator()
                elif control_type in controls.DETECTOR_FILES:
                    load_detector(control_type, self.detector_weights)
                self.pipeline(control_type)
            except RuntimeError as error:
                logger.warning("ControlNet %r unavailable: %s", control_type, error)
                self.unavailable[control_type] = str(error)
        try:  # two controls: the union model (any two types that load)
            self.pipeline([t for t in CONTROL_TYPES[1:] if t not in self.unavailable][:2])
        except (RuntimeError, ValueError) as error:
            logger.warning("two controls unavailable: %s", error)
            self.unavailable["union"] = str(error)
        return self

    @property
    def control_types(self) -> list[str]:
        """The control types a request may use here ("none" first)."""
        return [c for c in CONTROL_TYPES if c not in self.unavailable]

    def _load(self, key: str) -> StableDiffusionXLSEGPipeline:
        if key == "none":
            pipe = load_pipeline(self.model, device=self.device)
            if self.compile:  # the ControlNet pipelines share this UNet
                pipe.compile()
        else:
            # Share the base pipeline's components: a second SDXL copy would double the memory.
            pipe = with_controlnet(self._pipes["none"], UNION if key == "union" else key,
                                   random_controlnet=models.is_offline(self.model))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ---- inputs -----------------------------------------------------------------------------------

    def settings(self, **values) -> Settings:
        """Settings from keyword arguments (missing ones: this model's defaults), checked and normalised."""
        width, height = self.size_presets[0]
        defaults = dict(steps=self.default_steps, width=width, height=height, guidance_scale=self.profile.guidance_scale,
                        seg_scale=self.profile.seg_scale, seg_blur_sigma=self.profile.seg_blur_sigma)
        for name, default in defaults.items():
            if values.get(name) is None:  # left out, or null in a raw API request
                values[name] = default
        settings = Settings(**{k: v for k, v in values.items() if v is not None})
        settings.prompt = settings.prompt or ""
        settings.negative_prompt = settings.negative_prompt or ""
        settings.seed = resolve_seed(values.get("seed"))
        settings.seg_blur_sigma = parse_sigma(settings.seg_blur_sigma)
        settings.seg_applied_layers = parse_layers(settings.seg_applied_layers)
        settings.control_type = settings.control_type or "none"
        settings.control_type_2 = settings.control_type_2 or "none"
        for name in ("control_type", "control_type_2"):
            if getattr(settings, name) not in CONTROL_TYPES:
                raise ValueError(f"{name} must be one of {list(CONTROL_TYPES)}, got {getattr(settings, name)!r}")
        if settings.control_type == "none" and settings.control_type_2 != "none":
            raise ValueError(f"control_type_2 ({settings.control_type_2!r}) needs a first control_type, got 'none'")
        for suffix in ("", "_2"):
            name = f"controlnet_conditioning_scale{suffix}"
            setattr(settings, name, check_scale(name, getattr(settings, name), 10.0))
            check_interval(getattr(settings, f"control_guidance_start{suffix}"),
                           getattr(settings, f"control_guidance_end{suffix}"), f"control_guidance{suffix}")
            if not isinstance(getattr(settings, f"control_preprocess{suffix}"), bool):
                raise ValueError(f"control_preprocess{suffix} must be true or false, got "
                                 f"{getattr(settings, f'control_preprocess{suffix}')!r}")
        for name in ("openpose_hands", "openpose_face"):
            if not isinstance(getattr(settings, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(settings, name)!r}")
        for name in ("detect_resolution", "canny_low_threshold", "canny_high_threshold"):
            value = getattr(settings, name)
            if isinstance(value, float) and value.is_integer():
                setattr(settings, name, int(value))
        settings.detection()  # the knobs' ranges: ValueError naming the value
        # Checked here, not only by the pipeline: the limits read them first, and the PNG's JSON has no NaN
        # (the conditioning scales are written even without a ControlNet; checked above).
        for name in ("guidance_scale", "seg_scale", "pag_scale", "sag_scale"):
            setattr(settings, name, check_scale(name, getattr(settings, name)))
        check_interval(settings.perturbation_guidance_start, settings.perturbation_guidance_end, "perturbation_guidance")
        for name in ("steps", "width", "height"):
            value = getattr(settings, name)
            if isinstance(value, float) and value.is_integer():
                setattr(settings, name, int(value))
        limits = self.limits
        if isinstance(settings.steps, bool) or not isinstance(settings.steps, int) or not 1 <= settings.steps <= limits.max_steps:
            raise ValueError(f"steps must be an integer in [1, {limits.max_steps}], got {settings.steps!r}")
        for name in ("width", "height"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= MAX_SIDE or value % 8:
                raise ValueError(f"{name} must be a multiple of 8 in [8, {MAX_SIDE}], got {value!r}")
        for name in ("prompt", "negative_prompt"):
            value = getattr(settings, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
            if len(value) > limits.max_prompt_chars:
                raise ValueError(f"{name} must be at most {limits.max_prompt_chars} characters, got {len(value)}")
        if len(settings.seg_applied_layers) > limits.max_layer_names:
            raise ValueError(f"seg_applied_layers may name at most {limits.max_layer_names} layers, got "
                             f"{len(settings.seg_applied_layers)}")
        for layer in settings.seg_applied_layers:
            if len(layer) > 16:
                raise ValueError(f"unknown attention layer {layer[:16]!r}... (layer names are short: mid, d4, u0)")
        resolve_layers(self.pipeline("none").unet, settings.seg_applied_layers)  # unknown names: ValueError
        settings.model = self.model_id
        self.check_budget(settings)
        return settings

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
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= self.max_images:
            raise ValueError(f"images must be an integer in [1, {self.max_images}] here, got {count!r}")
        control, preview = self.control_maps(settings, control_image, control_image_2)
        _stamp_control(settings, control)
        steps = _StepCounter(settings.steps * count, progress, should_stop)
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
        sag_scale = check_scale("sag_scale", self.profile.sag_scale if sag_scale is None else sag_scale)
        pag_scale = check_scale("pag_scale", self.profile.pag_scale if pag_scale is None else pag_scale)
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
        _stamp_control(settings, control)
        steps = _StepCounter(settings.steps * len(variants), progress, should_stop)
        with self.lock:
            if one_loop:
                runs = self._run_one_loop(variants, settings, control, steps)
            else:
                runs = [self._run(label, dataclasses.replace(settings, **change), control, steps)
                        for label, change in variants]
        return runs, preview

    def _run_one_loop(self, variants, settings: Settings, control, steps: "_StepCounter") -> list[Run]:
        """The variants' images in one loop (seg_core.compare.side_by_side), saved as separate runs."""
        pipe = self.pipeline(settings.control_types or "none")
        each = [dataclasses.replace(settings, **change) for _, change in variants]
        guidance_keys = inspect.signature(build_guidance_methods).parameters
        method_sets = [build_guidance_methods(**{k: v for k, v in s.pipeline_kwargs().items() if k in guidance_keys})
                       for s in each]
        kwargs = {k: v for k, v in settings.pipeline_kwargs().items() if k not in guidance_keys}
        if control is not None:
            kwargs["image"] = control

        def on_step_end(pipe, i, t, tensors):
            for _ in variants:
                steps.advance("all four in one loop")
            return tensors

        steps.check()
        with UNetCounter(pipe.unet) as counter, self._out_of_memory_as_error(pipe, settings):
            start = time.perf_counter()
            images = side_by_side(pipe, method_sets, seed=settings.seed, output_type="pil",
                                  callback_on_step_end=on_step_end, **kwargs)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        # Each image's UNet evaluations: what it would cost alone (its rows of the batched calls).
        do_cfg = settings.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        runs = []
        for (label, _), run_settings, methods, image in zip(variants, each, method_sets, images):
            evaluations = sum((2 if do_cfg else 1) + sum(m.is_active(i, settings.steps) for m in methods)
                              for i in range(settings.steps))
            run = Run(label, run_settings, image, seconds, evaluations, one_loop=True)
            run.path = self._save(image, run_settings, run_settings.method.lower().replace("+", "-"),
                                  {"seconds_all_four": round(seconds, 3), "unet_evaluations": evaluations})
            runs.append(run)
        if sum(r.unet_evaluations for r in runs) != counter.evaluations:
            logger.warning("one loop: %d UNet rows counted, %d attributed", counter.evaluations,
                           sum(r.unet_evaluations for r in runs))
        return runs

    @contextmanager
    def _out_of_memory_as_error(self, pipe, settings: Settings):
        try:
            yield
        except torch.OutOfMemoryError as error:
            _release_memory()
            raise OutOfMemory(
                f"the {pipe.device.type} device ran out of memory at {settings.width}x{settings.height} "
                f"({settings.method}, {settings.steps} steps); try a smaller size, or again later"
            ) from error

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
        _stamp_control(settings, control)
        steps = _StepCounter(settings.steps * runs_total, progress, should_stop)
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
            work = Work(s.steps, s.width, s.height, images,
                        images * evaluations_per_step(s.guidance_scale, s.seg_scale, s.pag_scale, s.sag_scale))
        elif kind == "compare":  # vanilla, then SAG, PAG and SEG with one extra evaluation each
            work = Work(s.steps, s.width, s.height, 4, 4 * evaluations_per_step(s.guidance_scale) + 3)
        elif kind == "sweep":
            images = len(sigmas) * max(1, len(row_values) if row_axis not in (None, "", "none") else 1)
            guidance = max([s.guidance_scale] + [float(v) for v in row_values if row_axis == "guidance_scale"])
            work = Work(s.steps, s.width, s.height, images, images * evaluations_per_step(guidance, 1.0))
        else:
            raise ValueError(f"kind must be 'generate', 'compare' or 'sweep', got {kind!r}")
        return gpu_duration(self.profile.gpu_cost, work)

    # ---- internals --------------------------------------------------------------------------------

    def _run(self, label: str, settings: Settings, control: Image.Image | None, steps: "_StepCounter",
             save: bool = True) -> Run:
        pipe = self.pipeline(settings.control_types or "none")
        extra = {"image": control} if control is not None else {}
        generator = torch.Generator().manual_seed(settings.seed)  # CPU: the same noise on any device

        def on_step_end(pipe, i, t, tensors):
            steps.advance(label)  # raises GenerationCancelled when the request was cancelled
            return tensors

        steps.check()  # a request cancelled while it waited for the model does not start
        with UNetCounter(pipe.unet) as counter:
            start = time.perf_counter()
            # An exception anywhere in here leaves the model clean: the pipeline restores its
            # attention processors and down-block hooks in `finally`.
            with self._out_of_memory_as_error(pipe, settings):
                image = pipe(**settings.pipeline_kwargs(), **extra, generator=generator, output_type="pil",
                             callback_on_step_end=on_step_end).images[0]
                if pipe.device.type == "cuda":
                    torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        run = Run(label, settings, image, seconds, counter.evaluations)
        if save:
            run.path = self._save(image, settings, settings.method.lower().replace("+", "-"),
                                  {"seconds": round(seconds, 3), "unet_evaluations": counter.evaluations})
        return run

    def _save(self, image: Image.Image, settings: Settings, stem: str, extra: dict | None = None) -> str:
        # A unique name from the file system, not from a counter: ZeroGPU workers forked from the same
        # server would count from the same number and overwrite each other's files.
        handle, path = tempfile.mkstemp(prefix=f"{stem}-seed{settings.seed}-", suffix=".png", dir=self.output_dir)
        with os.fdopen(handle, "wb") as file:
            image.save(file, format="PNG", pnginfo=png_info(settings, extra))
        return path


def _positive(value) -> int:
    """1 for a number > 0, else 0 (a bad value is named later, by the pipeline's own checks)."""
    return int(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)


def _short_error(error: Exception) -> str:
    """The first sentence of an error, for a banner (loading errors from the Hub run to paragraphs)."""
    text = str(error).splitlines()[0] if str(error) else ""
    text = text.split(" (", 1)[0][:300]
    return f"{type(error).__name__}: {text}"


def _stamp_control(settings: Settings, control: Image.Image | list | None) -> None:
    """Record which control map(s) were used (a hash), so the metadata identifies them."""
    maps = control if isinstance(control, list) else [control] if control else []
    digest = hashlib.sha256(b"".join(m.tobytes() for m in maps)).hexdigest()[:16]
    settings.control_image_sha256 = digest if maps else None


def _release_memory() -> None:
    """Give cached device memory back after an out-of-memory error, so the next request can start."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _StepCounter:
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


__all__ = [
    "GPU", "GenerationCancelled", "Limits", "OutOfMemory", "Run", "Settings", "Studio", "Sweep", "UNetCounter",
    "depth_available", "format_sigma", "labelled_grid", "load_control_image", "parse_layers", "parse_sigma",
    "parse_values", "read_png_settings", "resolve_seed",
]
