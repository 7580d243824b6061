"""Model presets shared by the app and scripts: what to load, on which device, in which dtype."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .embedded import EMBEDDED_DIR
from .pipeline import StableDiffusionXLSEGPipeline
from .tiny import tiny_controlnet, tiny_sdxl_components

logger = logging.getLogger(__name__)

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
DEPTH_ESTIMATOR = "Intel/dpt-hybrid-midas"

#: Named models: ``sdxl`` (SDXL base 1.0, the default), ``embedded`` (the small trained model in
#: assets/embedded, offline) and ``tiny`` (random weights built in code).
MODELS = {"sdxl": SDXL_BASE, "embedded": str(EMBEDDED_DIR), "tiny": None}
#: Small offline models: "canny" / "depth" give them a small random (untrained) ControlNet.
OFFLINE_MODELS = ("embedded", "tiny")

#: ControlNets for SDXL, with the preprocessor each expects.
CONTROLNETS = {
    "canny": "diffusers/controlnet-canny-sdxl-1.0",
    "depth": "diffusers/controlnet-depth-sdxl-1.0",
}


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
    CONTROLNETS["canny"]: ["config.json", "diffusion_pytorch_model.fp16.safetensors"],
    CONTROLNETS["depth"]: ["config.json", "diffusion_pytorch_model.fp16.safetensors"],
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
    return with_controlnet(pipe, controlnet, random_controlnet=model in OFFLINE_MODELS)


def with_controlnet(pipe: StableDiffusionXLSEGPipeline, controlnet: str, random_controlnet: bool = False):
    """A pipeline sharing ``pipe``'s components (no second copy in memory) plus a ControlNet.

    ``controlnet``: "canny", "depth", or a ControlNet Hub id or local folder; with ``random_controlnet``
    (for the small offline models, which have no trained ControlNet) "canny" and "depth" give a small
    random one built from ``pipe.unet``.
    """
    unet = pipe.unet
    if random_controlnet and controlnet in CONTROLNETS:
        net = tiny_controlnet(unet).to(unet.device)
        if net.dtype != unet.dtype:
            net = net.to(dtype=unet.dtype)
    else:
        from diffusers import ControlNetModel

        repo = CONTROLNETS.get(controlnet, controlnet)
        runtime = Runtime(unet.device, unet.dtype)
        try:
            net = ControlNetModel.from_pretrained(
                repo, torch_dtype=unet.dtype, use_safetensors=True, **_variant(repo, runtime)
            ).to(unet.device)
        except Exception as error:  # no network, no cache, a bad id
            raise RuntimeError(f"the ControlNet {repo} could not be loaded: {str(error).splitlines()[0]}") from error
    derived = StableDiffusionXLSEGPipeline(
        **{**pipe.components, "controlnet": net},
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
        add_watermarker=pipe.watermark is not None,
    )
    derived.share_down_blocks = pipe.share_down_blocks
    return derived


def _variant(repo: str, runtime: Runtime) -> dict:
    """Ask for the fp16 files of Hub repos that have them; local folders load as saved."""
    if runtime.dtype == torch.float16 and not os.path.isdir(repo):
        return {"variant": "fp16"}
    return {}


# --------------------------------------------------------------------------------------------------
# Control-image preprocessors
# --------------------------------------------------------------------------------------------------


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (OpenCV) as a 3-channel image, the input diffusers' canny SDXL ControlNet expects."""
    import cv2

    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


_depth_models: dict = {}


def load_depth_estimator():
    """DPT-Hybrid MiDaS (safetensors weights) and its image processor, loaded once; on the CPU, where the
    control-map preview runs. RuntimeError naming the model when the weights cannot be loaded."""
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    if DEPTH_ESTIMATOR not in _depth_models:
        try:
            _depth_models[DEPTH_ESTIMATOR] = (
                DPTImageProcessor.from_pretrained(DEPTH_ESTIMATOR),
                DPTForDepthEstimation.from_pretrained(DEPTH_ESTIMATOR, use_safetensors=True).eval(),
            )
        except Exception as error:  # no network, no cache: the loader's paragraphs go to the log only
            logger.warning("depth estimator %s: %s", DEPTH_ESTIMATOR, error)
            raise RuntimeError(f"control_type 'depth' is not available on this server: its depth estimator "
                               f"{DEPTH_ESTIMATOR} could not be loaded ({type(error).__name__}); use 'canny' "
                               f"or 'none'") from None
    return _depth_models[DEPTH_ESTIMATOR]


def depth_map(image: Image.Image) -> Image.Image:
    """Relative depth (DPT-Hybrid MiDaS) normalised to [0, 255], 3 channels. Needs the estimator's
    weights (Hub or cache); raises RuntimeError naming the model when they cannot be loaded."""
    processor, estimator = load_depth_estimator()
    rgb = image.convert("RGB")
    with torch.no_grad():
        depth = estimator(**processor(images=rgb, return_tensors="pt")).predicted_depth
    depth = torch.nn.functional.interpolate(depth[:, None], size=rgb.size[::-1], mode="bicubic")[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min()).clamp(min=1e-8)
    array = (depth.clamp(0, 1).numpy() * 255).astype(np.uint8)
    return Image.fromarray(np.stack([array] * 3, axis=-1))


PREPROCESSORS = {"canny": canny_edges, "depth": depth_map}


def preprocess_control(kind: str, image: Image.Image) -> Image.Image:
    """The control map for ControlNet ``kind`` ("canny" or "depth") from an input image."""
    if kind not in PREPROCESSORS:
        raise ValueError(f"unknown control type {kind!r}: expected one of {sorted(PREPROCESSORS)}")
    return PREPROCESSORS[kind](image)
