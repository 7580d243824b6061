"""Settings: everything needed to reproduce one image, and the PNG metadata that carries them."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass, field

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..blur import INFINITE_SIGMA_THRESHOLD
from ..control import Detection
from ..presets import control_arguments

MAX_SEED = 2**32 - 1
PNG_SETTINGS_KEY = "seg_settings"  # JSON of Settings, in a PNG text chunk
PNG_PARAMETERS_KEY = "parameters"  # the same, readable (the key other SD tools use)


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

