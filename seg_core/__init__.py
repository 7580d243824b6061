"""Smoothed Energy Guidance (Hong, NeurIPS 2024) for Stable Diffusion XL, with PAG and SAG to compare."""

from .blur import INFINITE_SIGMA_THRESHOLD, blur_tokens, is_infinite_sigma, paper_kernel_size
from .guidance import GuidanceTerm, classifier_free_guidance, guided_prediction, weakened_model_guidance
from .methods import PAG, SAG, SEG, GuidanceMethod
from .pipeline import StableDiffusionXLSEGPipeline, build_guidance_methods
from .presets import CONTROLNETS, MODELS, load_pipeline, pick_runtime, preprocess_control, with_controlnet

__all__ = [
    "INFINITE_SIGMA_THRESHOLD",
    "CONTROLNETS",
    "MODELS",
    "GuidanceMethod",
    "GuidanceTerm",
    "PAG",
    "SAG",
    "SEG",
    "StableDiffusionXLSEGPipeline",
    "blur_tokens",
    "build_guidance_methods",
    "classifier_free_guidance",
    "is_infinite_sigma",
    "load_pipeline",
    "paper_kernel_size",
    "pick_runtime",
    "preprocess_control",
    "with_controlnet",
    "guided_prediction",
    "weakened_model_guidance",
]
