"""The generation service behind the demo: one request = one seed, run as generate, compare or sweep.

Everything here is independent of the UI: loading (with a fallback to the offline ``tiny`` model),
one generation at a time per model, progress over all denoising steps of a request, counting UNet
evaluations, timing, labelled sweep grids, and PNG files that carry their full settings. One concern a
file: ``settings`` (Settings, their checks, PNG metadata), ``images`` (control-image decoding), ``runs``
(results, the UNet counter, progress and cancellation), ``grids`` (labelled grids), ``loading`` (a model's pipelines, loaded once), ``service`` (Studio).
"""

from ..limits import Limits
from ..models import DEFAULT_FALLBACK, PROFILES, ModelProfile
from ..models import SDXL as SDXL_PROFILE
from ..zerogpu import GPU
from .grids import labelled_grid
from .images import MIN_IMAGE_SIDE, load_control_image
from .runs import GenerationCancelled, OutOfMemory, Progress, Run, Sweep, UNetCounter
from .loading import CONTROL_TYPES, Pipelines, depth_available
from .service import MAX_SWEEP_RUNS, Studio, model_lock
from .settings import (MAX_SEED, PNG_PARAMETERS_KEY, PNG_SETTINGS_KEY, Settings, format_sigma, parse_layers,
                       parse_sigma, parse_values, png_info, read_png_settings, resolve_seed)

__all__ = [
    "CONTROL_TYPES", "DEFAULT_FALLBACK", "GPU", "GenerationCancelled", "Limits", "MAX_SEED", "MAX_SWEEP_RUNS",
    "MIN_IMAGE_SIDE", "ModelProfile", "OutOfMemory", "PNG_PARAMETERS_KEY", "PNG_SETTINGS_KEY", "PROFILES",
    "Pipelines", "Progress", "Run", "SDXL_PROFILE", "Settings", "Studio", "Sweep", "UNetCounter", "depth_available",
    "format_sigma", "labelled_grid", "load_control_image", "model_lock", "parse_layers", "parse_sigma",
    "parse_values", "png_info", "read_png_settings", "resolve_seed",
]
