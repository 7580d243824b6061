"""Shared fixtures: tiny SDXL-architecture components built in code (offline, deterministic)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

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


def make_pipe(components, cls=StableDiffusionXLSEGPipeline, **extra):
    """A pipeline of ``cls`` on ``components`` (plus ``extra``, e.g. a controlnet), without progress bars."""
    pipeline = cls(**components, **extra, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def pipe(components):
    return make_pipe(components)


@pytest.fixture
def controlnet(components):
    return tiny_controlnet(components["unet"])


def in_float64(*modules_or_dicts):
    """Move tiny models to float64, in place. Tests whose two sides differ only in batching or scheduling
    (one loop vs separate runs, shared vs recomputed down blocks) run in float64 and compare to EXACT:
    float32 summation order depends on the batch and on the CPU's kernels (1e-5 on some x86 CPUs)."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # (the tiny models keep no module in float32)
    try:
        for item in modules_or_dicts:
            for module in (item.values() if isinstance(item, dict) else [item]):
                if isinstance(module, torch.nn.Module):
                    module.to(torch.float64)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return modules_or_dicts[0]


@pytest.fixture
def components64(components):
    return in_float64(components)


@pytest.fixture
def pipe64(components64):
    return make_pipe(components64)


@pytest.fixture
def controlnet64(components64):
    return in_float64(tiny_controlnet(components64["unet"]))


#: The size of float64 runs where the size does not matter: a 16x16 latent, an 8x8 mid-block grid.
SMALL = dict(height=32, width=32)

#: Agreement of float64 runs whose sides differ only in summation order (float64 rounding, ~1e-16 per
#: operation, stays far below this through a few steps).
EXACT = dict(rtol=0, atol=1e-10)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)
