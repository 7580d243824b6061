"""Model presets shared by the app and scripts: what to load, on which device, in which dtype."""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .control import CONTROL_TYPES, DEPTH_ESTIMATOR, Detection, control_map, load_depth_estimator  # noqa: F401
from .models import MODELS, OFFLINE_MODELS, SDXL_BASE, is_offline  # noqa: F401 (MODELS, OFFLINE_MODELS re-exported)
from .pipeline import StableDiffusionXLSEGPipeline
from .tiny import tiny_controlnet, tiny_sdxl_components, tiny_union_controlnet

logger = logging.getLogger(__name__)

SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"

#: xinsir's ControlNet-Union ProMax for SDXL (one net, a control mode per map), loaded by
#: :func:`load_union_controlnet` from its ProMax files.
UNION = "xinsir/controlnet-union-sdxl-1.0"
UNION_FILES = ("config_promax.json", "diffusion_pytorch_model_promax.safetensors")
#: The union model's control modes (its model card; diffusers' ControlNetUnion pipeline docs).
UNION_MODES = {"openpose": 0, "depth": 1, "softedge": 2, "canny": 3, "lineart": 3}


@dataclass(frozen=True)
class ControlNetChoice:
    """The SDXL ControlNet that reads one control type: a single-type ControlNet, or the union model
    with a control ``mode``."""

    repo: str
    license: str
    mode: int | None = None
    fp16_files: bool = False  # the repo has diffusers' fp16 variant files (else the full files, cast)

    @property
    def is_union(self) -> bool:
        return self.repo == UNION


#: The SDXL ControlNet for each control type (seg_core.control.CONTROL_TYPES): single-type models where
#: they are the usual choice, the union model for soft edges. The union model serves any of them with
#: ``union=True`` (see :func:`with_controlnet`).
CONTROLNETS = {
    "canny": ControlNetChoice("diffusers/controlnet-canny-sdxl-1.0", "openrail++", fp16_files=True),
    "depth": ControlNetChoice("diffusers/controlnet-depth-sdxl-1.0", "openrail++", fp16_files=True),
    "lineart": ControlNetChoice("TheMistoAI/MistoLine", "openrail++"),
    "openpose": ControlNetChoice("xinsir/controlnet-openpose-sdxl-1.0", "apache-2.0"),
    "softedge": ControlNetChoice(UNION, "apache-2.0", UNION_MODES["softedge"]),
}
assert set(CONTROLNETS) == set(CONTROL_TYPES) and set(UNION_MODES) == set(CONTROL_TYPES)


def model_for_hardware() -> tuple[str, str | None]:
    """The model to start on when none is named: SDXL where there is a GPU (CUDA, Apple MPS, a ZeroGPU
    Space), else the embedded model, with a note saying why and how to force SDXL (on a CPU SDXL takes
    minutes per step, and a Compare hours)."""
    mps = getattr(torch.backends, "mps", None)
    if os.environ.get("SPACES_ZERO_GPU") or torch.cuda.is_available() or (mps is not None and mps.is_available()):
        return "sdxl", None
    return "embedded", ("**No GPU here**, so the demo started on the small embedded model: SDXL on a CPU takes "
                        "minutes per denoising step, and a Compare hours. To run SDXL anyway: "
                        "`python app.py --model sdxl` (or `make demo MODEL=sdxl`).")


_TOKENIZER = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
#: Every Hub file the demo loads on a GPU (fp16 variants, safetensors; SDXL's own VAE is replaced by the
#: fp16-safe one, so it is not fetched): the Space's `preload_from_hub` in README.md lists exactly these
#: (tests/test_space.py checks that the two agree).
HUB_FILES = {
    SDXL_BASE: ["model_index.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
                "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors",
                *(f"tokenizer/{name}" for name in _TOKENIZER), *(f"tokenizer_2/{name}" for name in _TOKENIZER),
                "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"],
    SDXL_FP16_VAE: ["config.json", "diffusion_pytorch_model.safetensors"],
    CONTROLNETS["canny"].repo: ["config.json", "diffusion_pytorch_model.fp16.safetensors"],
    CONTROLNETS["depth"].repo: ["config.json", "diffusion_pytorch_model.fp16.safetensors"],
    DEPTH_ESTIMATOR: ["config.json", "preprocessor_config.json", "model.safetensors"],
}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype


def pick_runtime(device: str | None = None, dtype: torch.dtype | None = None) -> Runtime:
    """CUDA in fp16, else Apple MPS in fp16, else the CPU in fp32 (unless told otherwise)."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return Runtime(device, dtype)


def load_pipeline(
    model: str = "sdxl",
    controlnet: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> StableDiffusionXLSEGPipeline:
    """Load a StableDiffusionXLSEGPipeline.

    Args:
        model: "sdxl", "embedded", "tiny", or any SDXL Hub id or local folder (safetensors weights only).
        controlnet: None, "canny", "depth", or a ControlNet Hub id or local folder. With an offline model
            ("embedded", "tiny") "canny" and "depth" give a small random ControlNet.
        device, dtype: by default picked by :func:`pick_runtime`.
    """
    runtime = pick_runtime(device, dtype)
    if model == "tiny":
        pipe = StableDiffusionXLSEGPipeline(**tiny_sdxl_components(), add_watermarker=False)
        if runtime.dtype != torch.float32:
            pipe = pipe.to(dtype=runtime.dtype)
        pipe = pipe.to(runtime.device)
    else:
        repo = MODELS.get(model, model)
        extra = {"controlnet": None}  # a saved folder's own ControlNet is used only when asked for
        if runtime.dtype == torch.float16 and repo == SDXL_BASE:
            from diffusers import AutoencoderKL

            # SDXL's own VAE overflows in fp16; this fine-tune does not.
            extra["vae"] = AutoencoderKL.from_pretrained(SDXL_FP16_VAE, torch_dtype=runtime.dtype, use_safetensors=True)
        pipe = StableDiffusionXLSEGPipeline.from_pretrained(
            repo, torch_dtype=runtime.dtype, use_safetensors=True, **_variant(repo, runtime), **extra
        ).to(runtime.device)
    if controlnet is None:
        return pipe
    return with_controlnet(pipe, controlnet, random_controlnet=is_offline(model))


def controlnet_choice(control_types: str | Sequence[str]) -> ControlNetChoice:
    """The ControlNet for one control type (``CONTROLNETS``), or for several at once: the union model,
    one net reading every map with its mode (xinsir's multi-condition use), rather than one SDXL-sized
    ControlNet per control."""
    types = [control_types] if isinstance(control_types, str) else list(control_types)
    unknown = [t for t in types if t not in CONTROLNETS]
    if unknown or not types:
        raise ValueError(f"control types must be among {list(CONTROLNETS)}, got {types!r}")
    if len(types) == 1:
        return CONTROLNETS[types[0]]
    return ControlNetChoice(UNION, CONTROLNETS["softedge"].license)


def control_modes(control_types: str | Sequence[str]) -> int | list[int] | None:
    """The ``control_mode`` argument a call needs with :func:`controlnet_choice`'s ControlNet (None for a
    single-type ControlNet)."""
    types = [control_types] if isinstance(control_types, str) else list(control_types)
    if not controlnet_choice(types).is_union:
        return None
    modes = [UNION_MODES[t] for t in types]
    return modes[0] if isinstance(control_types, str) else modes


def control_arguments(control_types: Sequence[str], scales: Sequence[float], starts: Sequence[float],
                      ends: Sequence[float]) -> dict:
    """The ControlNet keyword arguments of a pipeline call (all but ``image``) for one or several control
    types on :func:`controlnet_choice`'s ControlNet: single values for one control, lists for several."""
    if not len(control_types) == len(scales) == len(starts) == len(ends):
        raise ValueError(f"one scale and window per control: {len(control_types)} controls, {len(scales)} scales, "
                         f"{len(starts)} starts, {len(ends)} ends")
    one = len(control_types) == 1
    kwargs = {"controlnet_conditioning_scale": scales[0] if one else list(scales),
              "control_guidance_start": starts[0] if one else list(starts),
              "control_guidance_end": ends[0] if one else list(ends)}
    modes = control_modes(control_types[0] if one else list(control_types))
    if modes is not None:
        kwargs["control_mode"] = modes
    return kwargs


def with_controlnet(pipe: StableDiffusionXLSEGPipeline, controlnet: str | Sequence[str], random_controlnet: bool = False):
    """A pipeline sharing ``pipe``'s components (no second copy in memory) plus a ControlNet.

    ``controlnet``: a control type or a list of them (:func:`controlnet_choice`; the call then needs
    :func:`control_modes`' ``control_mode``), ``UNION`` (the union model, for any types), or a ControlNet
    Hub id or local folder; with
    ``random_controlnet`` (for the small offline models, which have no trained ControlNet) control types
    give a small random ControlNet of the same kind built from ``pipe.unet``.
    """
    unet = pipe.unet
    known = not isinstance(controlnet, str) or controlnet in CONTROLNETS or controlnet == UNION
    if controlnet == UNION:  # the union model by itself: any control type, by its mode
        choice = controlnet_choice(["softedge", "canny"])
    else:
        choice = controlnet_choice(controlnet) if known else ControlNetChoice(controlnet, "?")
    if random_controlnet and known:
        net = (tiny_union_controlnet if choice.is_union else tiny_controlnet)(_without_adapters(unet)).to(unet.device)
        if net.dtype != unet.dtype:
            net = net.to(dtype=unet.dtype)
    else:
        from diffusers import ControlNetModel

        runtime = Runtime(unet.device, unet.dtype)
        try:
            if choice.is_union:
                net = load_union_controlnet(choice.repo, unet.dtype)
            else:
                variant = _variant(choice.repo, runtime) if choice.fp16_files or not known else {}
                net = ControlNetModel.from_pretrained(choice.repo, torch_dtype=unet.dtype, use_safetensors=True,
                                                      **variant)
            net = net.to(unet.device)
        except Exception as error:  # no network, no cache, a bad id
            raise RuntimeError(f"the ControlNet {choice.repo} could not be loaded: {str(error).splitlines()[0]}") from error
    derived = StableDiffusionXLSEGPipeline(
        **{**pipe.components, "controlnet": net},
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
        add_watermarker=pipe.watermark is not None,
    )
    derived.share_down_blocks = pipe.share_down_blocks
    return derived


def _without_adapters(unet):
    """``unet`` without the LoRA layers and IP-Adapter that seg_core.adapters loads (a copy; ``unet`` itself
    when it has none): a random ControlNet copies the UNet's plain config and weights."""
    ip_adapter = unet.config.encoder_hid_dim_type == "ip_image_proj"
    if not getattr(unet, "peft_config", None) and not ip_adapter:
        return unet
    plain = copy.deepcopy(unet)
    if getattr(plain, "peft_config", None):
        plain.unload_lora()
    if ip_adapter:
        plain.encoder_hid_proj = None
        plain.register_to_config(encoder_hid_dim_type=None)
        plain.set_default_attn_processor()
    return plain


def load_union_controlnet(repo: str = UNION, dtype: torch.dtype = torch.float32):
    """xinsir's ControlNet-Union ProMax as a diffusers ``ControlNetUnionModel``, from its ProMax config and
    safetensors files (``UNION_FILES``; ``repo`` a Hub id or a folder holding them). diffusers'
    ``from_pretrained`` reads only the repo's first (non-ProMax) files under their standard names."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetUnionModel
    from safetensors.torch import load_file

    if os.path.isdir(repo):
        config_file, weights_file = (os.path.join(repo, name) for name in UNION_FILES)
    else:
        from huggingface_hub import hf_hub_download

        config_file, weights_file = (hf_hub_download(repo, name) for name in UNION_FILES)
    with open(config_file) as f:
        config = json.load(f)
    with init_empty_weights():
        net = ControlNetUnionModel.from_config(config)
    net.load_state_dict(load_file(weights_file), assign=True)
    return net.to(dtype=dtype).eval()


def _variant(repo: str, runtime: Runtime) -> dict:
    """Ask for the fp16 files of Hub repos that have them; local folders load as saved."""
    if runtime.dtype == torch.float16 and not os.path.isdir(repo):
        return {"variant": "fp16"}
    return {}


# --------------------------------------------------------------------------------------------------
# Control-image preprocessors (seg_core.control)
# --------------------------------------------------------------------------------------------------


def preprocess_control(kind: str, image: Image.Image, **detection) -> Image.Image:
    """The control map for ControlNet ``kind`` (one of ``CONTROL_TYPES``) from an input image; keyword
    arguments are the detector's knobs (:class:`seg_core.control.Detection`: ``preprocess``,
    ``detect_resolution``, ``low_threshold``, ``high_threshold``, ``hands``, ``face``)."""
    return control_map(kind, image, Detection(**detection))
