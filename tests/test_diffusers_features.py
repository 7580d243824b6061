"""Every documented StableDiffusionXLPipeline feature keeps working in ours, with SEG and PAG off and on.

Off, ours equals StableDiffusionXLPipeline bit for bit; with PAG it equals diffusers'
StableDiffusionXLPAGPipeline and with SEG the authors' algorithm run inside it (test_exactness), given the
same feature. All in float64, so that the guided comparisons agree to 1e-10 (see test_exactness).
"""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import SDXLCFGCutoffCallback
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from conftest import EXACT, generator, make_pipe
from seg_core import StableDiffusionXLSEGPipeline
from test_exactness import relative_error, reference_pipeline

PROMPT = "a jellyfish playing the drums"
MODES = {
    "off": dict(seg_scale=0),
    "pag": dict(seg_scale=0, pag_scale=3.0),
    "seg": dict(seg_scale=3.0, seg_blur_sigma=2.0),
}


def images(pipe, **kwargs):
    # 32x32 pixels: a 16x16 latent, an 8x8 mid-block grid; float64 at 64x64 would take 4x as long.
    kwargs = {"num_inference_steps": 3, "output_type": "latent", "height": 32, "width": 32, **kwargs}
    return pipe(PROMPT, generator=generator(), **kwargs).images


def reference(components, mode):
    """(pipeline, its guidance arguments) that ours must equal in ``mode``."""
    if mode == "off":
        return make_pipe(components, StableDiffusionXLPipeline), {}
    return reference_pipeline(components, 2.0 if mode == "seg" else None), dict(pag_scale=3.0)


def set_guidance_scale_at_step_1(pipeline, step, t, tensors):
    if step == 1:
        pipeline._guidance_scale = 8.0
    return tensors


def change_tensors_at_step_1(pipeline, step, t, tensors):
    # Row-wise the same change in any batch layout, so diffusers' PAG pipeline ([u, c, c]) sees it too.
    if step == 1:
        tensors = {"latents": tensors["latents"] * 0.9, "prompt_embeds": tensors["prompt_embeds"] * 1.1,
                   "add_text_embeds": tensors["add_text_embeds"] * 0.8}
    return tensors


def enable_vae_slicing_and_tiling(pipe):
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 16, 8  # tiles at the tiny size


#: name: (setup of a pipeline, call arguments, whether the feature changes the image)
FEATURES = {
    "attention-slicing": (lambda pipe: pipe.enable_attention_slicing(1), {}, False),
    "fused-qkv": (lambda pipe: pipe.fuse_qkv_projections(), {}, False),
    "freeu": (lambda pipe: pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4), {}, True),
    "vae-slicing-tiling": (enable_vae_slicing_and_tiling, dict(output_type="np", num_images_per_prompt=2), True),
    "denoising-end": (None, dict(denoising_end=0.6), True),
    "timesteps": (None, dict(num_inference_steps=None, timesteps=[999, 500, 100]), True),
    "sigmas": (None, dict(num_inference_steps=None, sigmas=[14.0, 3.0, 0.5]), True),
    "callback-guidance-scale": (None, dict(callback_on_step_end=set_guidance_scale_at_step_1), True),
    "callback-tensors": (None, dict(callback_on_step_end=change_tensors_at_step_1,
                                    callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds"]),
                         True),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("feature", FEATURES)
def test_feature_equals_the_reference(components64, pipe64, feature, mode):
    setup, kwargs, changes_image = FEATURES[feature]
    layout = {k: kwargs[k] for k in ("output_type", "num_images_per_prompt") if k in kwargs}
    without = torch.as_tensor(images(pipe64, **layout, **MODES[mode]))
    ref, ref_scales = reference(components64, mode)
    for pipe in (pipe64, ref):
        if setup is not None:
            setup(pipe)
    expected = images(ref, **kwargs, **ref_scales)
    actual = images(pipe64, **kwargs, **MODES[mode])
    if mode == "off":
        assert (actual == expected).all()
    else:
        torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), **EXACT)
    # The feature was applied: it moved the image, or (a rewrite of the same computation) it did not.
    if changes_image:
        assert relative_error(torch.as_tensor(actual), without) > 1e-4
    else:
        torch.testing.assert_close(torch.as_tensor(actual), without, **EXACT)


def unet_rows(pipe, **kwargs):
    """Rows of each UNet call of one run, and its result."""
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        out = images(pipe, **kwargs)
    finally:
        hook.remove()
    return rows, out


@pytest.mark.parametrize("mode, rows_with_cfg", [("off", 2), ("pag", 3), ("seg", 3)])
def test_cfg_cutoff_callback_shrinks_the_batch(components64, pipe64, mode, rows_with_cfg):
    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    rows, out = unet_rows(pipe64, num_inference_steps=4, callback_on_step_end=cutoff, **MODES[mode])
    # CFG off after step 1: only the conditional row and each method's branch remain.
    assert rows == [rows_with_cfg] * 2 + [rows_with_cfg - 1] * 2
    assert relative_error(out, images(pipe64, num_inference_steps=4, **MODES[mode])) > 1e-3
    if mode == "off":
        base, _ = reference(components64, "off")
        cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
        assert (out == images(base, num_inference_steps=4, callback_on_step_end=cutoff)).all()


def test_a_callback_can_turn_cfg_on_with_the_embeddings_it_needs(pipe64):
    def cfg_on(pipeline, step, t, tensors):
        if step != 1:
            return tensors
        pipeline._guidance_scale = 5.0
        return {k: torch.cat([torch.zeros_like(v), v]) for k, v in tensors.items()}

    inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]
    rows, out = unet_rows(pipe64, guidance_scale=1.0, callback_on_step_end=cfg_on,
                          callback_on_step_end_tensor_inputs=inputs, **MODES["seg"])
    assert rows == [2, 2, 3] and torch.isfinite(out).all()

    def cfg_on_without_embeddings(pipeline, step, t, tensors):
        pipeline._guidance_scale = 5.0
        return tensors

    with pytest.raises(ValueError, match="guidance_scale became 5.0 at step 1, but there are no unconditional prompt_embeds, text_embeds"):
        images(pipe64, guidance_scale=1.0, callback_on_step_end=cfg_on_without_embeddings)

    def wrong_rows(pipeline, step, t, tensors):
        return {"prompt_embeds": torch.cat([tensors["prompt_embeds"]] * 3)}

    with pytest.raises(ValueError, match=r"callback returned prompt_embeds with 12 rows; .* on it needs 2 x 2"):
        images(pipe64, num_images_per_prompt=2, callback_on_step_end=wrong_rows,
               callback_on_step_end_tensor_inputs=["prompt_embeds"])


class KeywordOnlyProcessor:
    """A user's processor with its own signature: no ``temb``, nothing positional after the states."""

    def __call__(self, attn, hidden_states, *, encoder_hidden_states=None, attention_mask=None):
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)


@pytest.mark.parametrize("processor", [AttnProcessor, KeywordOnlyProcessor], ids=["classic", "keyword-only"])
@pytest.mark.parametrize("method", [dict(seg_scale=3.0), dict(seg_scale=0, pag_scale=3.0),
                                    dict(seg_scale=0, sag_scale=1.0)], ids=["seg", "pag", "sag"])
def test_any_processor_signature_serves_the_unchanged_branches(pipe64, processor, method):
    expected = images(pipe64, **method)
    pipe64.unet.set_attn_processor(processor())
    torch.testing.assert_close(images(pipe64, **method), expected, **EXACT)


def test_attention_slicing_with_sag(pipe64):
    """SAG reads the attention map through its own probe; slicing the other layers changes nothing."""
    expected = images(pipe64, seg_scale=0, sag_scale=1.0)
    pipe64.enable_attention_slicing(1)
    torch.testing.assert_close(images(pipe64, seg_scale=0, sag_scale=1.0), expected, **EXACT)


@pytest.mark.parametrize("mode", MODES)
def test_from_pipe_both_ways(components64, mode):
    sdxl = make_pipe(components64, StableDiffusionXLPipeline)
    ours = StableDiffusionXLSEGPipeline.from_pipe(sdxl)
    back = StableDiffusionXLPipeline.from_pipe(ours)
    direct = make_pipe(components64)
    for pipe in (ours, back):
        pipe.set_progress_bar_config(disable=True)
    assert ours.unet is sdxl.unet and back.unet is sdxl.unet
    assert (images(ours, **MODES[mode]) == images(direct, **MODES[mode])).all()
    if mode == "off":
        assert (images(ours, **MODES[mode]) == images(sdxl)).all() and (images(back) == images(sdxl)).all()


def test_custom_schedules_need_no_step_count_but_not_both(pipe64):
    with pytest.raises(ValueError, match="either custom `timesteps` or custom `sigmas`, not both"):
        images(pipe64, num_inference_steps=None, timesteps=[999, 500], sigmas=[5.0, 1.0])
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\], got None"):
        images(pipe64, num_inference_steps=None)
    with pytest.raises(ValueError, match=r"timesteps must hold 1 to 1000 values, got 0"):
        images(pipe64, num_inference_steps=None, timesteps=[])
