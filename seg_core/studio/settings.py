"""Settings: everything needed to reproduce one image, and the PNG metadata that carries them."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..adapters import AdapterChoice
from ..control import Detection
from ..options import (GUIDANCE, MAX_SEED, OPTIONS, check_integer, check_interval, format_sigma, is_number,  # noqa: F401
                       parse_layers, parse_sigma, parse_values)
from ..presets import control_arguments

PNG_SETTINGS_KEY = "seg_settings"  # JSON of Settings, in a PNG text chunk
PNG_PARAMETERS_KEY = "parameters"  # the same, readable (the key other SD tools use)
#: The guidance windows of a request: each a (start, end) pair checked together (start < end).
WINDOWS = {"perturbation_guidance": ("perturbation_guidance_start", "perturbation_guidance_end"),
           "control_guidance": ("control_guidance_start", "control_guidance_end"),
           "control_guidance_2": ("control_guidance_start_2", "control_guidance_end_2")}


def resolve_seed(seed) -> int:
    """The seed to use: a random one for None or -1."""
    if seed is None or (is_number(seed) and seed == -1):
        return random.randint(0, MAX_SEED)
    return check_integer("seed", seed, 0, MAX_SEED, " (or -1 for a random one)")


def _option(name: str):
    """A field whose default is its option's (seg_core.options)."""
    default = OPTIONS[name].default
    if isinstance(default, tuple):  # layers: a list of its own for each Settings
        return field(default_factory=lambda: list(default))
    return field(default=default)


@dataclass
class Settings:
    """One generation's settings, named as the pipeline's arguments; defaults, ranges and help are the
    options' (seg_core.options), a model's preferences its profile's (seg_core.models)."""

    prompt: str = _option("prompt")
    negative_prompt: str = _option("negative_prompt")
    seed: int = _option("seed")
    steps: int = _option("steps")
    width: int = _option("width")
    height: int = _option("height")
    guidance_scale: float = _option("guidance_scale")
    seg_scale: float = _option("seg_scale")
    seg_blur_sigma: float = _option("seg_blur_sigma")
    seg_applied_layers: list[str] = _option("seg_applied_layers")  # PAG's too, in this demo
    pag_scale: float = _option("pag_scale")
    sag_scale: float = _option("sag_scale")
    perturbation_guidance_start: float = _option("perturbation_guidance_start")
    perturbation_guidance_end: float = _option("perturbation_guidance_end")
    control_type: str = _option("control_type")
    controlnet_conditioning_scale: float = _option("controlnet_conditioning_scale")
    control_guidance_start: float = _option("control_guidance_start")
    control_guidance_end: float = _option("control_guidance_end")
    control_preprocess: bool = _option("control_preprocess")
    # The detectors' knobs (seg_core.control.Detection), for both controls.
    detect_resolution: int = _option("detect_resolution")
    canny_low_threshold: int = _option("canny_low_threshold")
    canny_high_threshold: int = _option("canny_high_threshold")
    openpose_hands: bool = _option("openpose_hands")
    openpose_face: bool = _option("openpose_face")
    # A second control (read with the first by the union model, one mode each).
    control_type_2: str = _option("control_type_2")
    controlnet_conditioning_scale_2: float = _option("controlnet_conditioning_scale_2")
    control_guidance_start_2: float = _option("control_guidance_start_2")
    control_guidance_end_2: float = _option("control_guidance_end_2")
    control_preprocess_2: bool = _option("control_preprocess_2")
    # The operator's adapters (seg_core.adapters; checked by Studio.settings with its AdapterConfig).
    loras: dict[str, float] = field(default_factory=dict)  # configured LoRA name -> weight
    ip_adapter_scale: float = 0.0
    ip_adapter_image: Image.Image | None = field(default=None, repr=False, compare=False)  # not in the metadata
    model: str = ""
    control_image_sha256: str | None = None
    ip_adapter_image_sha256: str | None = None

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

    def adapter_choice(self) -> AdapterChoice:
        """What this request asks of the configured adapters."""
        return AdapterChoice(dict(self.loras), self.ip_adapter_image, self.ip_adapter_scale)

    def pipeline_kwargs(self) -> dict:
        """The keyword arguments of StableDiffusionXLSEGPipeline.__call__ (without image / generator)."""
        kwargs = dict(prompt=self.prompt, negative_prompt=self.negative_prompt or None, height=self.height,
                      width=self.width, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                      pag_applied_layers=list(self.seg_applied_layers))  # PAG where SEG is (the demo's choice)
        kwargs.update({name: getattr(self, name) for name in GUIDANCE if name in SETTINGS_OPTIONS})
        kwargs["seg_applied_layers"] = list(self.seg_applied_layers)
        if self.control_types:
            n = len(self.control_types)
            kwargs.update(control_arguments(
                self.control_types, [self.controlnet_conditioning_scale, self.controlnet_conditioning_scale_2][:n],
                [self.control_guidance_start, self.control_guidance_start_2][:n],
                [self.control_guidance_end, self.control_guidance_end_2][:n]))
        return kwargs

    def to_dict(self) -> dict:
        data = dataclasses.asdict(dataclasses.replace(self, ip_adapter_image=None))
        del data["ip_adapter_image"]  # a hash stands for it (ip_adapter_image_sha256)
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
        if self.loras:
            parts.append("LoRAs: " + ", ".join(f"{name} x{weight:g}" for name, weight in self.loras.items()))
        if self.ip_adapter_scale:
            parts.append(f"IP-Adapter scale: {self.ip_adapter_scale:g}")
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



#: The Settings fields checked by their option's rule (not ``model`` and the hashes, which the service sets, nor
#: the adapters, whose rule is the operator's AdapterConfig).
SETTINGS_OPTIONS = tuple(f.name for f in dataclasses.fields(Settings) if f.name in OPTIONS)


def check_settings(values: dict, defaults: dict, highs: dict) -> Settings:
    """Settings from a request's ``values``, each checked once with its option's rule (:meth:`Option.check`,
    with ``highs``' tighter bound where an operator narrows it). A value left out or None takes ``defaults``'
    (the model's), else its option's default; an empty control type is "none"; a seed left out is random."""
    unknown = set(values) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    checked = {name: values[name] for name in ("model", "control_image_sha256") if values.get(name) is not None}
    windowed = {name for pair in WINDOWS.values() for name in pair}
    filled = {name: _value(name, values, defaults) for name in SETTINGS_OPTIONS}
    for name in SETTINGS_OPTIONS:
        if name not in windowed and name != "seed":
            checked[name] = OPTIONS[name].check(filled[name], highs.get(name))
    for prefix, (start, end) in WINDOWS.items():
        checked[start], checked[end] = check_interval(filled[start], filled[end], prefix)
    checked["seed"] = resolve_seed(values.get("seed"))
    if checked["control_type"] == "none" and checked["control_type_2"] != "none":
        raise ValueError(f"control_type_2 ({checked['control_type_2']!r}) needs a first control_type, got 'none'")
    settings = Settings(**checked)
    settings.detection()  # the detector's own rule (low_threshold <= high_threshold): ValueError naming them
    return settings


def _value(name: str, values: dict, defaults: dict):
    value = values.get(name)
    if value is None or (OPTIONS[name].kind == "choice" and isinstance(value, str) and value == ""):
        return defaults.get(name, OPTIONS[name].default)
    return value
