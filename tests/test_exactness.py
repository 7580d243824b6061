"""End to end against references: diffusers' own pipelines, and SEG as the authors define it.

The guided comparisons run the tiny models in float64 and agree to 1e-10: our pipeline and the reference
lay out the same [uncond, cond, perturbed] batch, so only float rounding (blur matrices against a 2-D
convolution, ~1e-15 here) separates them, and any real difference in the algorithm shows.
"""

import math
from contextlib import contextmanager

import pytest
import torch
from diffusers import (
    StableDiffusionXLControlNetPAGPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from conftest import EXACT, SMALL, generator, make_pipe
from reference import ReferenceSEGProcessor
from seg_core import StableDiffusionXLSEGPipeline

PROMPT = "a jellyfish playing the drums"
STEPS = 4


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def latents(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(PROMPT, generator=generator(), output_type="latent", **kwargs).images


def reference_pipeline(components, sigma=None, layers=("mid",), controlnet=None, grid=None):
    """diffusers' PAG pipeline (its ControlNet variant with a ``controlnet``). With ``sigma``, the authors'
    SEG: the same [uncond, cond, perturbed] batch and Eq. 10, the perturbed attention replaced by the
    test's own query-blur processor (on the square grid, or ``grid`` = (H, W))."""
    cls = StableDiffusionXLControlNetPAGPipeline if controlnet is not None else StableDiffusionXLPAGPipeline
    extra = {} if controlnet is None else {"controlnet": controlnet}
    ref = make_pipe(components, cls, **extra, pag_applied_layers=list(layers))
    if sigma is not None:
        processors = (ReferenceSEGProcessor(sigma, 3, grid), ReferenceSEGProcessor(sigma, 2, grid))
        ref.set_pag_applied_layers(list(layers), pag_attn_processors=processors)
    return ref


def reference_seg(components, sigma, guidance_scale, seg_scale, grid=None, **kwargs):
    ref = reference_pipeline(components, sigma, grid=grid)
    return latents(ref, guidance_scale=guidance_scale, pag_scale=seg_scale, **kwargs)


SIGMA_2 = {}  # the reference at sigma = 2 by guidance scale (the fixtures' weights are seeded, always the same)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("sigma", [1.0, 3.0, 10.0, math.inf])
def test_seg_matches_independent_reference(components64, pipe64, guidance_scale, sigma):
    expected = reference_seg(components64, sigma, guidance_scale, seg_scale=10.0)
    actual = latents(pipe64, guidance_scale=guidance_scale, seg_scale=10.0, seg_blur_sigma=sigma)
    torch.testing.assert_close(actual, expected, **EXACT)
    # ...and the comparison can tell sigmas apart, so agreement means something.
    if guidance_scale not in SIGMA_2:
        SIGMA_2[guidance_scale] = reference_seg(components64, 2.0, guidance_scale, seg_scale=10.0)
    assert relative_error(actual, SIGMA_2[guidance_scale]) > 1e-4


@pytest.mark.parametrize("size", [(64, 96), (96, 64)], ids=["64x96", "96x64"])
def test_seg_at_non_square_sizes_matches_reference_on_the_true_grid(components64, pipe64, size):
    height, width = size
    sigma = 3.0  # 19 taps: clamped to 17 on the 16-token side only
    mid_grid = (height // 4, width // 4)  # the tiny VAE halves the latent, the UNet's first level again
    expected = reference_seg(components64, sigma, 5.0, 10.0, grid=mid_grid, height=height, width=width)
    actual = latents(pipe64, seg_scale=10.0, seg_blur_sigma=sigma, height=height, width=width)
    torch.testing.assert_close(actual, expected, **EXACT)
    # The transposed grid (height and width swapped) is a different blur, and the test sees it.
    swapped = reference_seg(components64, sigma, 5.0, 10.0, grid=mid_grid[::-1], height=height, width=width)
    assert relative_error(actual, swapped) > 1e-4


def test_seg_sigma_above_threshold_is_infinite(pipe):
    inf = latents(pipe, seg_blur_sigma=math.inf)
    torch.testing.assert_close(latents(pipe, seg_blur_sigma=10000.0), inf, rtol=0, atol=0)
    assert relative_error(latents(pipe, seg_blur_sigma=9999.0), inf) > 1e-5


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("layers", [["mid"], ["down", "u1"]], ids=["mid", "down+u1"])
def test_pag_matches_diffusers(components64, pipe64, guidance_scale, layers):
    diffusers_layers = {"mid": ["mid"], "down": ["down"], "u1": [r"up_blocks\.0\.attentions\.0\.transformer_blocks\.1\.attn1"]}
    ref = reference_pipeline(components64, layers=[p for spec in layers for p in diffusers_layers[spec]])
    expected = latents(ref, guidance_scale=guidance_scale, pag_scale=3.0, **SMALL)
    actual = latents(pipe64, guidance_scale=guidance_scale, seg_scale=0, pag_scale=3.0, pag_applied_layers=layers, **SMALL)
    torch.testing.assert_close(actual, expected, **EXACT)
    assert relative_error(actual, latents(pipe64, guidance_scale=guidance_scale, seg_scale=0, **SMALL)) > 1e-3


def test_pag_adaptive_scale_matches_diffusers(components64, pipe64):
    expected = latents(reference_pipeline(components64), pag_scale=3.0, pag_adaptive_scale=0.004, **SMALL)
    actual = latents(pipe64, seg_scale=0, pag_scale=3.0, pag_adaptive_scale=0.004, **SMALL)
    # diffusers computes the adaptive scale from a float32 timestep tensor, we in Python floats: the scale
    # differs by float32 rounding (measured 2.5e-6 relative on single elements).
    assert relative_error(actual, expected) < 1e-6
    assert relative_error(actual, latents(pipe64, seg_scale=0, pag_scale=3.0, **SMALL)) > 1e-4


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_all_scales_zero_equals_stable_diffusion_xl(components, pipe, guidance_scale):
    base = StableDiffusionXLPipeline(**components, add_watermarker=False)
    base.set_progress_bar_config(disable=True)
    kwargs = dict(guidance_scale=guidance_scale, num_inference_steps=3, output_type="np", height=64, width=48)
    expected = base(PROMPT, negative_prompt="blurry", generator=generator(), **kwargs).images
    actual = pipe(PROMPT, negative_prompt="blurry", generator=generator(), seg_scale=0, **kwargs).images
    assert (actual == expected).all()


def control_image():
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    square = ((yy > 16) & (yy < 48) & (xx > 12) & (xx < 40)).to(torch.uint8) * 255
    return Image.fromarray(square.unsqueeze(-1).expand(64, 64, 3).numpy())


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_at_zero_scales_equals_diffusers_controlnet_pipeline(components, controlnet, guess_mode):
    base = StableDiffusionXLControlNetPipeline(**components, controlnet=controlnet, add_watermarker=False)
    base.set_progress_bar_config(disable=True)
    ours = StableDiffusionXLSEGPipeline(**components, controlnet=controlnet, add_watermarker=False)
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(image=control_image(), controlnet_conditioning_scale=0.8, guess_mode=guess_mode,
                  control_guidance_end=0.75)
    expected = latents(base, **kwargs)
    actual = latents(ours, seg_scale=0, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # The ControlNet matters, and SAG (compared with a reference without ControlNet in test_sag) runs with it.
    assert relative_error(latents(ours, seg_scale=0, image=control_image(), controlnet_conditioning_scale=0.0), expected) > 1e-3
    assert relative_error(latents(ours, **kwargs, seg_scale=0, sag_scale=1.0), expected) > 1e-4


@contextmanager
def guess_mode_for(controlnet, guess_mode, chunks):
    """diffusers' ControlNet-PAG pipeline has no guess mode. Give it diffusers' ControlNet pipeline's: the
    ControlNet's guess-mode residuals for the conditional branches, zeros for the unconditional one (the
    first of ``chunks`` with CFG)."""
    if not guess_mode:
        yield
        return
    forward = controlnet.forward

    def guessed(*args, **kwargs):
        down, mid = forward(*args, **{**kwargs, "guess_mode": True})
        zero_first = lambda r: torch.cat([torch.zeros_like(c) if k == 0 else c for k, c in enumerate(r.chunk(chunks))])  # noqa: E731
        return ([zero_first(d) for d in down], zero_first(mid)) if chunks == 3 else (down, mid)

    controlnet.forward = guessed
    try:
        yield
    finally:
        del controlnet.forward


CONTROL = dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.75, **SMALL)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("guess_mode", [False, True], ids=["", "guess-mode"])
@pytest.mark.parametrize("method", ["pag", "seg"])
def test_controlnet_with_pag_and_seg_matches_diffusers_controlnet_pag_pipeline(
        components64, controlnet64, guidance_scale, guess_mode, method):
    """PAG: diffusers' StableDiffusionXLControlNetPAGPipeline; SEG: the reference carried by it. Either
    way the perturbed branch gets the ControlNet residuals of the conditional branch."""
    sigma = 3.0 if method == "seg" else None
    ref = reference_pipeline(components64, sigma, controlnet=controlnet64)
    ours = make_pipe(components64, controlnet=controlnet64)
    kwargs = dict(image=control_image(), guidance_scale=guidance_scale, **CONTROL)
    with guess_mode_for(controlnet64, guess_mode, 3 if guidance_scale > 1 else 2):
        expected = latents(ref, pag_scale=3.0, **kwargs)
    scales = dict(seg_scale=3.0, seg_blur_sigma=sigma) if method == "seg" else dict(seg_scale=0, pag_scale=3.0)
    actual = latents(ours, guess_mode=guess_mode, **kwargs, **scales)
    torch.testing.assert_close(actual, expected, **EXACT)
