"""Per-model request limits: what one request may ask of a model so that it stays inside the memory (and,
through the size, the time) a deployment has.

They follow from the model's geometry, not from a table per model:

- the token grid of a UNet level is the image size over (VAE factor x 2^level): the tiny and embedded
  models have a VAE factor of 2, so at the same size their grids are 16x larger than SDXL's (factor 8);
- SAG (Hong et al., ICCV 2023, Sec. 3) reads the softmax attention map of the first mid-block
  self-attention, (mid tokens)^2 per head and image row: it grows with side^4 while everything else grows
  with side^2, so it is the term that breaks a server (10 GB on the embedded model at 512x512);
- every other activation grows with the pixels: UNet feature maps (channels x tokens per level, per row of
  the batch) and the VAE decoder's, at full resolution;
- a model is only meaningful near the sizes it was trained at: at most ``TRAINED_AREA_FACTOR`` times the
  area of its largest training size (SDXL 1024^2 -> 2048^2; the embedded model 32^2 -> 64^2);
- the operator sets a memory budget for one request (``--memory-budget-gb``); sizes and methods whose
  estimate exceeds it are refused, with the limit named.

Model weights are not part of the budget: they are loaded once, before any request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .options import MAX_STEPS, is_number

#: How far past its training sizes (in area) a model may be asked to go.
TRAINED_AREA_FACTOR = 4
#: Live feature maps per UNet / VAE level at the peak of a forward pass (input, normalised, convolved,
#: residual, attention q/k/v/out): a bound over measured peaks (bench/request_memory.py, tests/test_limits.py).
LIVE_MAPS = 16
#: What a request holds at any size: text encodings, the scheduler, the allocator's slack.
OVERHEAD_BYTES = 32 * 2**20
#: Bytes per entry of SAG's attention map: the scores, their float32 upcast for the softmax (diffusers'
#: ``get_attention_scores``) and the probabilities are alive at once (4 + 4 + 4 in float32).
SAG_BYTES_PER_ENTRY = 12


def format_bytes(size: float) -> str:
    return f"{size / 2**30:.2f} GB" if size >= 2**30 else f"{size / 2**20:.0f} MB"


@dataclass(frozen=True)
class Geometry:
    """What a request's memory depends on, read from a loaded pipeline."""

    vae_factor: int  # image pixels per latent cell, per side
    unet_channels: tuple[int, ...]  # feature channels per UNet level (level l is 2^l coarser)
    vae_channels: tuple[int, ...]  # VAE decoder channels per level (level 0 at full resolution)
    mid_heads: int  # heads of the first mid-block self-attention (SAG's map)
    bytes_per_value: int

    @classmethod
    def of(cls, pipe) -> "Geometry":
        from .attention import resolve_layers

        unet = pipe.unet
        (mid,) = resolve_layers(unet, ["m0"])
        return cls(
            vae_factor=int(pipe.vae_scale_factor),
            unet_channels=tuple(unet.config.block_out_channels),
            vae_channels=tuple(pipe.vae.config.block_out_channels),
            mid_heads=int(unet.get_submodule(mid).heads),
            bytes_per_value=torch.finfo(unet.dtype).bits // 8,
        )

    def token_grid(self, width: int, height: int, level: int) -> tuple[int, int]:
        """(rows, columns) of the token grid at a UNet level."""
        step = self.vae_factor * 2**level
        return math.ceil(height / step), math.ceil(width / step)

    def mid_tokens(self, width: int, height: int) -> int:
        rows, columns = self.token_grid(width, height, len(self.unet_channels) - 1)
        return rows * columns

    def sag_map_bytes(self, width: int, height: int, rows: int) -> int:
        """SAG's attention map: rows x heads x tokens^2 entries, scores and probabilities."""
        return SAG_BYTES_PER_ENTRY * rows * self.mid_heads * self.mid_tokens(width, height) ** 2

    def activation_bytes(self, width: int, height: int, rows: int, controlnet: bool = False) -> int:
        """UNet feature maps of ``rows`` batch rows (a ControlNet runs its own encoder on the same batch),
        or the VAE decoder's at full resolution, whichever is larger."""
        latent = math.ceil(width / self.vae_factor) * math.ceil(height / self.vae_factor)
        unet = sum(channels * latent / 4**level for level, channels in enumerate(self.unet_channels))
        unet *= rows * (1.5 if controlnet else 1.0)
        decoder = max(channels * width * height / 4**level for level, channels in enumerate(self.vae_channels))
        return OVERHEAD_BYTES + int(LIVE_MAPS * self.bytes_per_value * max(unet, decoder))


@dataclass(frozen=True)
class ModelLimits:
    """The limits of one model on one server: from its geometry, its training sizes and the budget."""

    geometry: Geometry
    trained_pixels: int  # area of the largest size the model was trained at
    memory_budget_bytes: int
    operator_max_pixels: int

    @property
    def max_pixels(self) -> int:
        """The largest width x height a request may ask for (any method but SAG)."""
        return min(self.operator_max_pixels, TRAINED_AREA_FACTOR * self.trained_pixels,
                   self._largest_fitting(lambda w, h: self.estimate(w, h, rows=3, controlnet=True)))
    # (rows=3: CFG and one guidance branch, with a ControlNet; more rows are checked per request.)

    @property
    def sag_max_pixels(self) -> int:
        """The largest width x height SAG may run at (0: not at all within the budget)."""
        return min(self.max_pixels, self._largest_fitting(
            lambda w, h: self.estimate(w, h, rows=3, sag_images=1, controlnet=True)))

    def estimate(self, width: int, height: int, rows: int, sag_images: int = 0, controlnet: bool = False) -> int:
        """Peak memory of one denoising step with ``rows`` batch rows, beyond the weights (bytes); SAG takes
        its map on one row per image (``sag_images``), the unconditional one under CFG."""
        total = self.geometry.activation_bytes(width, height, rows, controlnet)
        return total + self.geometry.sag_map_bytes(width, height, sag_images)

    def _largest_fitting(self, estimate) -> int:
        """The largest square area (sides multiples of 8) whose estimate fits the budget."""
        low, high = 0, 4096 // 8
        while low < high:
            side = (low + high + 1) // 2
            if estimate(8 * side, 8 * side) <= self.memory_budget_bytes:
                low = side
            else:
                high = side - 1
        return (8 * low) ** 2

    def check(self, width: int, height: int, rows: int, sag_images: int = 0, controlnet: bool = False) -> None:
        """ValueError naming the limit if a request at width x height with ``rows`` batch rows (and SAG on
        ``sag_images`` images) is not allowed."""
        pixels = width * height
        if pixels > self.max_pixels:
            raise ValueError(f"width x height must be at most {self.max_pixels} pixels "
                             f"({_side(self.max_pixels)}) for this model on this server ({self._why_max()}), "
                             f"got {width}x{height} = {pixels}")
        if sag_images and pixels > self.sag_max_pixels:
            need = self.geometry.sag_map_bytes(width, height, 1)
            allowed = (f"at most {self.sag_max_pixels} pixels ({_side(self.sag_max_pixels)})"
                       if self.sag_max_pixels else "at no size")
            raise ValueError(f"SAG at {width}x{height} needs about {format_bytes(need)} for its attention map "
                             f"(({self.geometry.mid_tokens(width, height)} mid-block tokens)^2 x "
                             f"{self.geometry.mid_heads} heads), over this server's memory budget of "
                             f"{format_bytes(self.memory_budget_bytes)} per request; SAG runs {allowed} on "
                             f"this model")
        need = self.estimate(width, height, rows, sag_images, controlnet)
        if need > self.memory_budget_bytes:
            raise ValueError(f"this request ({width}x{height}, {rows} batch rows{', SAG' if sag_images else ''}) "
                             f"needs about {format_bytes(need)}, over this server's memory budget of "
                             f"{format_bytes(self.memory_budget_bytes)} per request; use a smaller size or fewer "
                             f"methods at once")

    def _why_max(self) -> str:
        if self.max_pixels == self.operator_max_pixels:
            return "the operator's --max-pixels"
        if self.max_pixels == TRAINED_AREA_FACTOR * self.trained_pixels:
            return f"{TRAINED_AREA_FACTOR}x the area of its largest training size"
        return f"the memory budget of {format_bytes(self.memory_budget_bytes)} per request"

    def describe(self) -> dict:
        """The limits as numbers, for the docs and the UI."""
        return {"max_pixels": self.max_pixels, "sag_max_pixels": self.sag_max_pixels,
                "memory_budget_bytes": self.memory_budget_bytes, "trained_pixels": self.trained_pixels,
                "vae_factor": self.geometry.vae_factor, "mid_heads": self.geometry.mid_heads}


def _side(pixels: int) -> str:
    side = math.isqrt(pixels)
    return f"{side}x{side}" if side * side == pixels else f"{pixels} px"


# --------------------------------------------------------------------------------------------------
# What the operator allows one request
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
            if not (is_number(value) and isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (is_number(self.max_upload_mb) and math.isfinite(self.max_upload_mb)
                and self.max_upload_mb > 0):
            raise ValueError(f"max_upload_mb must be a positive number, got {self.max_upload_mb!r}")
        if not (is_number(self.memory_budget_gb) and 0 < self.memory_budget_gb < math.inf):
            raise ValueError(f"memory_budget_gb must be a positive number, got {self.memory_budget_gb!r}")
        if self.max_body_mb is not None and not (is_number(self.max_body_mb)
                                                 and self.max_upload_mb < self.max_body_mb < math.inf):
            raise ValueError(f"max_body_mb must be a number above max_upload_mb ({self.max_upload_mb:g}), "
                             f"got {self.max_body_mb!r}")
        if self.max_pixels < 64:
            raise ValueError(f"max_pixels must be at least 64 (8x8), got {self.max_pixels}")
        if self.max_steps > MAX_STEPS:
            raise ValueError(f"max_steps must be at most {MAX_STEPS} (the pipeline's limit), got {self.max_steps}")
        if self.max_image_side < 8:
            raise ValueError(f"max_image_side must be at least 8, got {self.max_image_side}")

    @property
    def highs(self) -> dict[str, int]:
        """The options (seg_core.options) this server narrows: their tighter upper bounds."""
        return {"steps": self.max_steps, "prompt": self.max_prompt_chars, "negative_prompt": self.max_prompt_chars}

    @property
    def max_body_bytes(self) -> int:
        """The request body limit: ``max_body_mb``, or an upload at the limit as a base64 data URL + 2 MB."""
        mb = self.max_body_mb if self.max_body_mb is not None else self.max_upload_mb * 4 / 3 + 2
        return int(mb * 2**20)

