"""Shared fixtures: tiny SDXL-architecture components built in code (offline, deterministic)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

from seg_core.pipeline import StableDiffusionXLSEGPipeline
from seg_core.tiny import tiny_controlnet, tiny_sdxl_components

torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def sharpen_self_attention(unet, factor=6.0):
    """Scale the self-attention query projections so that random-weight attention is peaked rather than
    nearly uniform; then changing the query changes the output clearly, and the tests can tell."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(factor)
    return unet


@pytest.fixture
def components():
    parts = tiny_sdxl_components(seed=0)
    sharpen_self_attention(parts["unet"])
    return parts


@pytest.fixture
def pipe(components):
    pipeline = StableDiffusionXLSEGPipeline(**components, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def controlnet(components):
    return tiny_controlnet(components["unet"])


def generator(seed=0):
    return torch.Generator().manual_seed(seed)
