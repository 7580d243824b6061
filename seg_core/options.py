"""The settings people choose, each written once: its name, default, allowed range, help and slider.

StableDiffusionXLSEGPipeline takes its guidance defaults from here and checks its arguments with these
options; the demo's ``Settings`` are made of them, and its widgets and API are built from them. A default, a
range or a help text for one of these settings written anywhere else is a second source: do not.

What an operator narrows (the steps or prompt length a server accepts) is passed to :meth:`Option.check`
as a tighter ``high``; what a model prefers (the embedded model's CFG 5) is its profile's default
(seg_core.models), which replaces ``default`` in the demo.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import textwrap
from dataclasses import dataclass
from typing import Any

from .blur import BLUR_KERNELS, INFINITE_SIGMA_THRESHOLD

#: The pipeline's hard limits (a server may narrow them, never widen them).
MAX_SIDE = 4096  # pixels, per side (SDXL is trained around 1024)
MAX_STEPS = 1000
MAX_ROWS = 64  # images per call: len(prompt) * num_images_per_prompt
MAX_PROMPT_CHARS = 10_000  # per prompt; the CLIP encoders read the first 77 tokens anyway
MAX_SEED = 2**32 - 1

#: The control types the demo offers (seg_core.control makes each one's map; "none": no ControlNet).
CONTROL_TYPES = ("canny", "lineart", "softedge", "depth", "openpose")


# --------------------------------------------------------------------------------------------------
# The rules: each kind of value is checked by one function, whose message names the value and the range
# --------------------------------------------------------------------------------------------------


def is_number(value) -> bool:
    """A real number that is not a bool (numpy scalars count; True is not 1 here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """An integer that is not a bool (numpy integers count; 2.0 is not one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _whole(value, strict: bool) -> bool:
    """``value`` is a whole number: an integer, or (unless ``strict``) a finite float such as 2.0."""
    return is_integer(value) if strict else is_number(value) and math.isfinite(value) and value == int(value)


def check_number(name: str, value, low: float = 0.0, high: float = 100.0, low_open: bool = False) -> float:
    """``value`` as a float; ValueError unless it is a finite number in [low, high] ((low, high] with
    ``low_open``)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    if not (low < value if low_open else low <= value) or value > high:
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def check_integer(name: str, value, low: int, high: int, extra: str = "", strict: bool = False) -> int:
    """``value`` as an int (2.0 is 2, unless ``strict``: a library argument diffusers counts with); ValueError
    unless it is an integer in [low, high]."""
    if not _whole(value, strict) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]{extra}, got {value!r}")
    return int(value)


def check_side(name: str, value, high: int = MAX_SIDE, strict: bool = False) -> int:
    """An image side: a multiple of 8 (the VAE's factor) in [8, high] (``strict``: an int, as for check_integer)."""
    if not _whole(value, strict) or not 8 <= value <= high or value % 8:
        raise ValueError(f"{name} must be a multiple of 8 in [8, {high}], got {value!r}")
    return int(value)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_text(name: str, value, high: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > high:
        raise ValueError(f"{name} must be at most {high} characters, got {len(value)}")
    return value


def check_choice(name: str, value, choices) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_interval(start, end, prefix: str) -> tuple[float, float]:
    """ValueError unless 0 <= start < end <= 1 (a guidance window: the fraction of steps it covers)."""
    for name, value in ((f"{prefix}_start", start), (f"{prefix}_end", end)):
        if not is_number(value) or not 0 <= value <= 1:  # (NaN fails the range test too)
            raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    if start >= end:
        raise ValueError(f"{prefix}_start ({start}) must be below {prefix}_end ({end})")
    return float(start), float(end)


def parse_sigma(value, name: str = "seg_blur_sigma") -> float:
    """A blur sigma from a number or a string; "inf", "infinite", "∞" and anything above the authors' threshold
    (seg_core.blur.INFINITE_SIGMA_THRESHOLD) mean infinite."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "+inf", "infinite", "infinity", "∞"):
            return math.inf
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number >= 0 or 'inf', got {value!r}") from None
    if not is_number(value) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 or 'inf', got {value!r}")
    return math.inf if value > INFINITE_SIGMA_THRESHOLD else float(value)


def format_sigma(sigma: float) -> str:
    return "inf" if math.isinf(sigma) else f"{sigma:g}"


def parse_layers(value, name: str = "seg_applied_layers") -> list[str]:
    """Applied layers from a list or a comma-separated string ("mid", "down, up", "m0, u1"); the names are
    resolved against the UNet later (seg_core.attention.resolve_layers)."""
    layers = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    layers = [str(layer).strip() for layer in layers if str(layer).strip()]
    if not layers:
        raise ValueError(f"{name} must name at least one layer, e.g. ['mid'], got an empty list")
    return layers


def parse_values(text, name: str, parse=float) -> list:
    """A list from "1, 4, 16, inf" (brackets and quotes ignored); ValueError naming the bad item."""
    items = [str(item) for item in text] if isinstance(text, (list, tuple)) else \
        re.sub(r"[\[\]'\"]", " ", str(text or "")).replace(";", ",").split(",")
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


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting: what it is called, its default, what it may be, what it means, and its slider.

    ``kind``: "number" (a float in [low, high]), "integer", "side" (a multiple of 8), "flag", "text" (at most
    ``high`` characters), "choice" (one of ``choices``), "sigma" (a number >= 0 or "inf"), "layers".
    ``slider``: the demo's (minimum, maximum, step) where it shows less than the whole range.
    """

    name: str
    default: Any
    help: str
    kind: str = "number"
    low: float = 0.0
    high: float = 100.0
    low_open: bool = False
    choices: tuple = ()
    label: str = ""
    slider: tuple[float, float, float] | None = None

    def check(self, value, high: float | None = None) -> Any:
        """``value`` normalised (2.0 -> 2 for integers, "inf" -> math.inf for sigmas); ValueError naming it and
        what is allowed. ``high``: a tighter upper bound (an operator's limit)."""
        high = self.high if high is None else high
        name, kind = self.name, self.kind
        if kind == "number":
            return check_number(name, value, self.low, high, self.low_open)
        if kind == "integer":
            return check_integer(name, value, int(self.low), int(high))
        if kind == "side":
            return check_side(name, value, int(high))
        if kind == "flag":
            return check_flag(name, value)
        if kind == "text":
            return check_text(name, value, int(high))
        if kind == "choice":
            return check_choice(name, value, self.choices)
        if kind == "sigma":
            return parse_sigma(value, name)
        if kind == "layers":
            return parse_layers(value, name)
        raise AssertionError(f"unknown option kind {kind!r}")

    def renamed(self, name: str, label: str) -> "Option":
        """The same setting for another thing (a second control's scale)."""
        return dataclasses.replace(self, name=name, label=label)


def _options(*options: Option) -> dict[str, Option]:
    return {option.name: option for option in options}


_DOC_TYPES = {"number": "float", "integer": "int", "side": "int", "flag": "bool", "text": "str", "choice": "str",
              "sigma": "float", "layers": "list[str]"}


def _doc_default(value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "`math.inf`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{item}"' for item in value) + "]`"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def arguments_doc(options: dict[str, Option], indent: int = 12, width: int = 116) -> str:
    """The ``Args:`` entries of ``options`` as diffusers writes them (``name (`type`, defaults to x): help``),
    for a docstring generated from the options instead of written a second time."""
    lines: list[str] = []
    for option in options.values():
        kind, default = _DOC_TYPES[option.kind], _doc_default(option.default)
        entry = f"{option.name} (`{kind}`, defaults to {default}): {option.help}"
        lines += textwrap.wrap(entry, width, initial_indent=" " * indent, subsequent_indent=" " * (indent + 4))
    return "\n".join(lines)


#: The guidance arguments of StableDiffusionXLSEGPipeline.__call__ (and of build_guidance_methods).
GUIDANCE = _options(
    Option("seg_scale", 3.0, "SEG scale s of Eq. 10, in [0, 100]; 0 turns SEG off. The authors keep 3 and vary σ.",
           label="SEG scale", slider=(0, 10, 0.1)),
    Option("seg_blur_sigma", math.inf, "standard deviation of the query blur, in tokens; any value > "
           f"{INFINITE_SIGMA_THRESHOLD:g} (or math.inf, 'inf') means infinite: every query is the mean query; 0: no "
           "blur.", kind="sigma", label="Blur σ"),
    Option("seg_applied_layers", ("mid",), "the self-attention layers SEG changes: 'down', 'mid', 'up', or single "
           "layers such as 'd4', 'm0', 'u0'.", kind="layers", label="Applied layers (SEG, and PAG in Compare)"),
    Option("seg_blur_target", "query", "'query' (the paper) or 'key' (its ablation).", kind="choice",
           choices=("query", "key")),
    Option("seg_blur_kernel", "paper", "'paper': the authors' truncated, clamped kernel; 'untruncated': the full "
           "Gaussian (the same blur at any resolution, tending to the infinite-σ result as σ grows).",
           kind="choice", choices=BLUR_KERNELS),
    Option("pag_scale", 0.0, "PAG scale, in [0, 100]; 0 turns PAG off.", label="PAG scale", slider=(0.1, 10, 0.1)),
    Option("pag_applied_layers", ("mid",), "the layers PAG changes (the same names as SEG's).", kind="layers"),
    Option("pag_adaptive_scale", 0.0, "diffusers' adaptive PAG scale, in [0, 1].", high=1.0),
    Option("sag_scale", 0.0, "SAG scale, in [0, 100]; 0 turns SAG off.", label="SAG scale", slider=(0.05, 5, 0.05)),
    Option("sag_blur_sigma", 1.0, "SAG's blur of the predicted x0, in (0, 10].", high=10.0, low_open=True),
    Option("perturbation_guidance_start", 0.0, "the fraction of steps after which the SEG, PAG and SAG terms "
           "apply.", high=1.0, label="Guidance from (fraction of steps)", slider=(0, 1, 0.05)),
    Option("perturbation_guidance_end", 1.0, "the fraction of steps until which the SEG, PAG and SAG terms "
           "apply.", high=1.0, label="Guidance until", slider=(0, 1, 0.05)),
)

#: One control's settings (the pipeline's ControlNet arguments, and the demo's detector knobs).
CONTROL = _options(
    Option("control_type", "none", "the control type: 'none', or the preprocessor whose map the ControlNet reads.",
           kind="choice", choices=("none", *CONTROL_TYPES), label="ControlNet"),
    Option("controlnet_conditioning_scale", 1.0, "how strongly the ControlNet's residuals steer, in [0, 10].",
           high=10.0, label="ControlNet conditioning scale", slider=(0, 2, 0.05)),
    Option("control_guidance_start", 0.0, "the fraction of steps after which the ControlNet applies.", high=1.0,
           label="Control from", slider=(0, 1, 0.05)),
    Option("control_guidance_end", 1.0, "the fraction of steps until which the ControlNet applies.", high=1.0,
           label="Control until", slider=(0, 1, 0.05)),
    Option("control_preprocess", True, "detect the map from the image; false: the image already is a control map.",
           kind="flag", label="Detect the map (off: the image already is a control map)"),
)

#: The detectors' knobs (seg_core.control.Detection), shared by both controls of a request.
DETECTION = _options(
    Option("detect_resolution", 512, "the detector's input, shorter side in pixels.", kind="integer", low=64,
           high=2048, label="Detect resolution", slider=(64, 2048, 64)),
    Option("canny_low_threshold", 100, "Canny's low hysteresis threshold.", kind="integer", high=255,
           label="Canny low threshold", slider=(0, 255, 1)),
    Option("canny_high_threshold", 200, "Canny's high hysteresis threshold.", kind="integer", high=255,
           label="Canny high threshold", slider=(0, 255, 1)),
    Option("openpose_hands", False, "OpenPose: detect hands too.", kind="flag", label="OpenPose: hands"),
    Option("openpose_face", False, "OpenPose: detect faces too.", kind="flag", label="OpenPose: face"),
)


def second_control_options() -> dict[str, Option]:
    """The second control's settings: the first's, named with a "_2" (read with the first by the union model)."""
    labels = {"control_type": "Second control", "controlnet_conditioning_scale": "Second control's scale",
              "control_guidance_start": "From", "control_guidance_end": "Until",
              "control_preprocess": "Detect the map (off: a ready map)"}
    return _options(*(option.renamed(f"{name}_2", labels[name]) for name, option in CONTROL.items()))


#: What one generation request sets besides guidance and control (diffusers' names where it has them).
REQUEST = _options(
    Option("prompt", "", "the prompt; empty for unconditional generation, as in the paper's tables.", kind="text",
           high=MAX_PROMPT_CHARS, label="Prompt"),
    Option("negative_prompt", "", "the negative prompt (used with CFG).", kind="text", high=MAX_PROMPT_CHARS,
           label="Negative prompt"),
    Option("seed", 0, "the seed of the initial noise; -1: a random one (the one used is returned).",
           kind="integer", high=MAX_SEED, label="Seed (the one used is shown)"),
    Option("steps", 25, "denoising steps.", kind="integer", low=1, high=MAX_STEPS, label="Steps",
           slider=(1, 100, 1)),
    Option("width", 1024, "image width in pixels, a multiple of 8.", kind="side", high=MAX_SIDE),
    Option("height", 1024, "image height in pixels, a multiple of 8.", kind="side", high=MAX_SIDE),
    Option("guidance_scale", 5.0, "classifier-free guidance scale w; 1 (or less): no CFG, as in the paper's "
           "tables.", label="CFG scale", slider=(1, 15, 0.5)),
)

#: Every option by name.
OPTIONS = {**REQUEST, **GUIDANCE, **CONTROL, **DETECTION, **second_control_options()}


def defaults(options: dict[str, Option]) -> dict[str, Any]:
    return {name: option.default for name, option in options.items()}


# --------------------------------------------------------------------------------------------------
# Added by engineer C (issue 12, the app): what a Compare or Sweep request sets besides its Settings
# (the /compare and /sweep API parameters and their widgets; Studio.compare and Studio.sweep read them)
# --------------------------------------------------------------------------------------------------

#: The settings a sweep's rows may vary (Studio.sweep), besides "none" (one row).
SWEEP_AXES = ("seg_scale", "guidance_scale")

COMPARE_AND_SWEEP = _options(
    Option("one_loop", False, "Compare: all four methods in one denoising loop with batched UNet calls (the same "
           "images up to float rounding; faster on a GPU; one time for all four).", kind="flag",
           label="All four in one loop (faster on a GPU, one time for all four; the same images up to float "
                 "rounding: a pixel may differ by 1/255)"),
    Option("seg_blur_sigmas", "1, 4, 16, 64, inf", "Sweep: the blur σ of each column, comma-separated; inf: "
           "infinite.", kind="text", label="Blur σ values (columns)"),
    Option("second_axis", "none", "Sweep: the setting each row varies, 'seg_scale' or 'guidance_scale'; 'none': "
           "one row.", kind="choice", choices=("none", *SWEEP_AXES), label="Second axis (rows)"),
    Option("second_axis_values", "", "Sweep: the second axis' values, comma-separated (e.g. 1, 3, 5).", kind="text",
           label="Second axis values"),
)

# --------------------------------------------------------------------------------------------------
# Added by issue 13 (adapters): the operator's LoRAs and IP-Adapter chosen per request (seg_core.adapters).
# Their ranges are the operator's (adapters.json), so AdapterConfig.check owns the rule, not Option.check.
# --------------------------------------------------------------------------------------------------

ADAPTERS = _options(
    Option("loras", {}, "the LoRAs to apply, a JSON object of configured names and weights (e.g. {\"ink\": "
           "0.8}); each weight within its LoRA's range; {}: none.", kind="loras", label="LoRA"),
    Option("ip_adapter_scale", None, "how strongly the image prompt (ip_adapter_image) steers, within the "
           "IP-Adapter's range; 0: off; left out: its default with an image prompt, else 0.",
           label="Image prompt strength"),
)
