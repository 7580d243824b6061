"""End to end against references: diffusers' own pipelines, and SEG as the authors define it."""

import math

import pytest
import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline
from PIL import Image

from conftest import generator
from reference import ReferenceSEGProcessor
from seg_core import StableDiffusionXLSEGPipeline

PROMPT = "a jellyfish playing the drums"
STEPS = 4


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def latents(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(PROMPT, generator=generator(), output_type="latent", **kwargs).images


def reference_seg(components, sigma, guidance_scale, seg_scale, **kwargs):
    """The authors' algorithm, literally: the PAG pipeline's [uncond, cond, perturbed] batch and
    Eq. 10, with the perturbed attention replaced by the test's own query-blur processor."""
    ref = StableDiffusionXLPAGPipeline(**components, pag_applied_layers=["mid"], add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.set_pag_applied_layers(["mid"], pag_attn_processors=(ReferenceSEGProcessor(sigma, 3), ReferenceSEGProcessor(sigma, 2)))
    return latents(ref, guidance_scale=guidance_scale, pag_scale=seg_scale, **kwargs)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("sigma", [1.0, 3.0, 10.0, math.inf])
def test_seg_matches_independent_reference(components, pipe, guidance_scale, sigma):
    expected = reference_seg(components, sigma, guidance_scale, seg_scale=10.0)
    actual = latents(pipe, guidance_scale=guidance_scale, seg_scale=10.0, seg_blur_sigma=sigma)
    assert relative_error(actual, expected) < 2e-5
    # ...and the comparison can tell sigmas apart, so agreement means something.
    other = reference_seg(components, 2.0, guidance_scale, seg_scale=10.0)
    assert relative_error(actual, other) > 1e-4


def test_seg_sigma_above_threshold_is_infinite(pipe):
    inf = latents(pipe, seg_blur_sigma=math.inf)
    torch.testing.assert_close(latents(pipe, seg_blur_sigma=10000.0), inf, rtol=0, atol=0)
    assert relative_error(latents(pipe, seg_blur_sigma=9999.0), inf) > 1e-5


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("layers", [["mid"], ["down", "u1"]], ids=["mid", "down+u1"])
def test_pag_matches_diffusers(components, pipe, guidance_scale, layers):
    diffusers_layers = {"mid": ["mid"], "down": ["down"], "u1": [r"up_blocks\.0\.attentions\.0\.transformer_blocks\.1\.attn1"]}
    ref = StableDiffusionXLPAGPipeline(
        **components, pag_applied_layers=[p for spec in layers for p in diffusers_layers[spec]], add_watermarker=False
    )
    ref.set_progress_bar_config(disable=True)
    expected = latents(ref, guidance_scale=guidance_scale, pag_scale=3.0)
    actual = latents(pipe, guidance_scale=guidance_scale, seg_scale=0, pag_scale=3.0, pag_applied_layers=layers)
    assert relative_error(actual, expected) < 2e-5
    assert relative_error(actual, latents(pipe, guidance_scale=guidance_scale, seg_scale=0)) > 1e-3


def test_pag_adaptive_scale_matches_diffusers(components, pipe):
    ref = StableDiffusionXLPAGPipeline(**components, pag_applied_layers=["mid"], add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    expected = latents(ref, pag_scale=3.0, pag_adaptive_scale=0.004)
    actual = latents(pipe, seg_scale=0, pag_scale=3.0, pag_adaptive_scale=0.004)
    assert relative_error(actual, expected) < 2e-5
    assert relative_error(actual, latents(pipe, seg_scale=0, pag_scale=3.0)) > 1e-4


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
    # The ControlNet matters, and every guidance method runs with it and changes the result.
    assert relative_error(latents(ours, seg_scale=0, image=control_image(), controlnet_conditioning_scale=0.0), expected) > 1e-3
    for method in (dict(seg_scale=3.0), dict(seg_scale=0, pag_scale=3.0), dict(seg_scale=0, sag_scale=1.0)):
        assert relative_error(latents(ours, **kwargs, **method), expected) > 1e-4, method
