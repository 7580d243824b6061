"""Each model the demo knows, in one place: where it loads from, the sizes it was trained at, its defaults,
example prompts and banner, and what one UNet evaluation costs on a GPU.

``profile(name)`` is what everything reads (seg_core.presets to load, seg_core.studio for defaults, limits
and labels, the app for its sliders); a Hub id or folder that is not named here gets SDXL's profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import GUIDANCE
from .shapes import CAPTIONS, IMAGE_SIZE
from .zerogpu import GPUCost

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
#: The embedded model's saved pipeline (model_index.json and safetensors weights; seg_core.embedded).
EMBEDDED_DIR = ASSETS_DIR / "embedded"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"

# What one UNet evaluation costs, measured (the basis of ZeroGPU durations, seg_core.zerogpu).
SDXL_COST = GPUCost(
    unet_seconds=0.087, reference_pixels=1024 * 1024, image_seconds=0.5,
    measured="fp16 SDXL UNet at 1024x1024, batch 1, NVIDIA H200: 62-87 ms per call of one row (the slowest of "
             "bench/results/h200_1024_*batch1*.log; launch-bound, so 768x768 costs the same); per image an "
             "allowance for the VAE decode and the PNG, not measured")
SMALL_COST = GPUCost(  # the embedded and tiny models: a CPU figure, an upper bound for any GPU
    unet_seconds=0.07, reference_pixels=64 * 64, image_seconds=0.05,
    measured="one CPU thread of a 2-core x86 box: tiny 54-69 ms, embedded 12-15 ms per evaluation")


@dataclass(frozen=True)
class ModelProfile:
    """One model: where it comes from (a Hub id, a folder, or None: built in code), whether it is one of the
    small offline models (SDXL's architecture, not SDXL: random ControlNets and detectors), its size menu
    (the sizes it was trained at), default steps and guidance (CFG; SEG scale and σ; the SAG and PAG scales
    of Compare; SDXL's: no CFG as in the paper's tables, the authors' SEG and PAG 3.0, σ ∞, SAG 1.0), example
    prompts (None: the demo's own), banner, and what it costs on a GPU."""

    name: str
    source: str | None
    sizes: tuple
    steps: int
    offline: bool = False
    guidance_scale: float = 1.0
    prompts: tuple | None = None
    banner: str | None = None
    seg_scale: float = GUIDANCE["seg_scale"].default  # the authors' defaults
    seg_blur_sigma: float = GUIDANCE["seg_blur_sigma"].default
    pag_scale: float = 3.0
    sag_scale: float = 1.0
    gpu_cost: GPUCost = SDXL_COST

    @property
    def vanilla_label(self) -> str:
        """"Vanilla SDXL" on SDXL models; the small offline models are SDXL's architecture, not SDXL."""
        return "Vanilla" if self.offline else "Vanilla SDXL"

    def request_defaults(self) -> dict:
        """The request settings this model chooses when a request leaves them out (the first size of its menu)."""
        width, height = self.sizes[0]
        return dict(steps=self.steps, width=width, height=height, guidance_scale=self.guidance_scale,
                    seg_scale=self.seg_scale, seg_blur_sigma=self.seg_blur_sigma)


#: SDXL's training buckets (width, height): the square one, then landscape / portrait pairs.
SDXL_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
              (1344, 768), (768, 1344), (1536, 640), (640, 1536))
#: The same aspect ratios, roughly, at the tiny model's scale (multiples of 8).
TINY_SIZES = ((64, 64), (72, 56), (56, 72), (80, 48), (48, 80), (96, 40), (40, 96))

SDXL = ModelProfile("sdxl", SDXL_BASE, SDXL_SIZES, 25)

TINY = ModelProfile(
    "tiny", None, TINY_SIZES, 8, offline=True, gpu_cost=SMALL_COST,
    banner="**`tiny` model:** random weights in SDXL's architecture, built in code. It runs offline on a CPU in "
           "a fraction of a second and draws noise, not pictures: use it to try every control of this demo, "
           "not to judge image quality.")

#: What the app's banner says of the embedded model (seg_core.embedded; trained on seg_core.shapes).
EMBEDDED_DESCRIPTION = (
    "a small SDXL-architecture model (UNet, VAE, two CLIP text encoders) trained on "
    f"the offline 'coloured shapes' set; {IMAGE_SIZE}x{IMAGE_SIZE} px only; it knows prompts like "
    "'a red triangle on a blue background' (3 shapes, 6 colours, 5 backgrounds), not general text."
)

# The embedded model follows prompts only with CFG (README: The embedded model) and was trained at one size.
# Its scales come from the scale sweep (README, "Scales as curves"; every point in assets/scale_sweep.json),
# not from SDXL: each method at the scale with the lowest unconditional plus conditional Frechet distance.
# CFG 5: the lowest FD of the CFG sweep over 1.5-7 (10.65; prompt accuracy 37%, 17% without CFG).
# SEG 1, with sigma infinite: FD 23.5 -> 15.7 unconditional, 18.0 -> 13.3 from captions (the authors' 3.0
# gives 23.5 and 25.5 here). PAG 0.5: its least harmful (it never beat vanilla sampling in the sweep).
# SAG 3: small gains that grow with the scale up to 3 (FD 23.5 -> 21.8 unconditional). 20 Euler steps suffice.
# The first example prompt: at seed 0 with these defaults, CFG alone draws a broken purple outline that the
# classifier reads as a triangle, CFG + SEG a filled purple square on blue (tests/test_evaluation.py). On
# average SEG does not improve on CFG on this model (README).
EMBEDDED = ModelProfile(
    "embedded", str(EMBEDDED_DIR), ((IMAGE_SIZE, IMAGE_SIZE),), 20, offline=True, gpu_cost=SMALL_COST,
    guidance_scale=5.0, seg_scale=1.0, pag_scale=0.5, sag_scale=3.0,
    prompts=("a purple square on a blue background",) + CAPTIONS[7::7],
    banner=f"**`embedded` model:** {EMBEDDED_DESCRIPTION} It runs offline on a CPU; its ControlNets are "
           "untrained (random), so they only show that the controls work.")

#: Named models: ``sdxl`` (SDXL base 1.0, the default), ``embedded`` (the small trained model in
#: assets/embedded, offline) and ``tiny`` (random weights built in code).
PROFILES = {p.name: p for p in (SDXL, EMBEDDED, TINY)}
#: Where each named model loads from (None: built in code).
MODELS = {name: p.source for name, p in PROFILES.items()}
#: Small offline models: control types give them a small random (untrained) ControlNet.
OFFLINE_MODELS = tuple(name for name, p in PROFILES.items() if p.offline)
#: Where a requested model cannot be loaded: the embedded trained model, else the tiny random one.
DEFAULT_FALLBACK = "embedded" if (EMBEDDED_DIR / "model_index.json").is_file() else "tiny"


def profile(model: str) -> ModelProfile:
    """The profile of a named model; any other Hub id or folder is taken for an SDXL model."""
    return PROFILES.get(model, SDXL)


def is_offline(model: str) -> bool:
    """Whether ``model`` is one of the small offline models (random ControlNets and detectors)."""
    return profile(model).offline


def model_id(model: str) -> str:
    """The model as written into PNG metadata: the Hub id for named Hub models, the name for the offline ones
    (shipped with this repository: the name says it all), else what was asked for."""
    p = PROFILES.get(model)
    return model if p is None or p.offline else p.source

