"""Several controls at once: a MultiControlNetModel and the ControlNet-Union model (xinsir's architecture).

At guidance scales 0 our pipeline must give diffusers' own multi-ControlNet and ControlNet-Union SDXL
pipelines' latents; with SEG or PAG on, the reference of test_exactness (diffusers' PAG ControlNet loop,
with the authors' query blur for SEG). All in float64, to 1e-10: the ControlNet is computed once per role
and added to every branch, the perturbed branch included, exactly as the references do.
"""

import pytest
import torch
from diffusers import (
    MultiControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionPipeline,
)
from PIL import Image

from conftest import EXACT, SMALL, in_float64, make_pipe
from seg_core.tiny import tiny_controlnet, tiny_union_controlnet
from test_exactness import control_image, latents, reference_pipeline, relative_error


def ring_image():
    """A second control image, different from test_exactness's square."""
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    ring = ((yy - 30) ** 2 + (xx - 34) ** 2 - 300).abs() < 120
    return Image.fromarray((ring.to(torch.uint8) * 255).unsqueeze(-1).expand(64, 64, 3).numpy())


@pytest.fixture
def multi64(components64):
    nets = [tiny_controlnet(components64["unet"], seed=0), tiny_controlnet(components64["unet"], seed=5)]
    return in_float64(MultiControlNetModel(nets))


@pytest.fixture
def union64(components64):
    return in_float64(tiny_union_controlnet(components64["unet"]))


TWO = dict(image=[control_image(), ring_image()], controlnet_conditioning_scale=[0.8, 0.5],
           control_guidance_start=[0.0, 0.25], control_guidance_end=[0.75, 1.0])


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("guess_mode", [False, True], ids=["", "guess-mode"])
def test_multi_controlnet_at_zero_scales_equals_diffusers(components64, multi64, guidance_scale, guess_mode):
    base = make_pipe(components64, StableDiffusionXLControlNetPipeline, controlnet=multi64)
    ours = make_pipe(components64, controlnet=multi64)
    expected = latents(base, guidance_scale=guidance_scale, guess_mode=guess_mode, **TWO, **SMALL)
    actual = latents(ours, guidance_scale=guidance_scale, seg_scale=0, guess_mode=guess_mode, **TWO, **SMALL)
    torch.testing.assert_close(actual, expected, **EXACT)
    if guess_mode:
        return
    # Each control's scale and window count: change the second one's and the result changes.
    other = {**TWO, "controlnet_conditioning_scale": [0.8, 0.0]}
    assert relative_error(latents(ours, guidance_scale=guidance_scale, seg_scale=0, **other, **SMALL), expected) > 1e-4
    other = {**TWO, "control_guidance_start": [0.0, 0.0]}
    assert relative_error(latents(ours, guidance_scale=guidance_scale, seg_scale=0, **other, **SMALL), expected) > 1e-4


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("modes", [[3], [3, 1]], ids=["one-mode", "two-modes"])
def test_union_at_zero_scales_equals_diffusers_union_pipeline(components64, union64, guidance_scale, modes):
    base = make_pipe(components64, StableDiffusionXLControlNetUnionPipeline, controlnet=union64)
    ours = make_pipe(components64, controlnet=union64)
    if len(modes) == 1:
        kwargs = dict(image=[control_image()], controlnet_conditioning_scale=0.8, control_guidance_end=0.75)
    else:
        kwargs = TWO
    # (diffusers' union pipeline calls the image `control_image`)
    expected = latents(base, guidance_scale=guidance_scale, control_image=kwargs["image"], control_mode=modes,
                       **{k: v for k, v in kwargs.items() if k != "image"}, **SMALL)
    actual = latents(ours, guidance_scale=guidance_scale, seg_scale=0, control_mode=modes, **kwargs, **SMALL)
    torch.testing.assert_close(actual, expected, **EXACT)
    # The mode is an input of the union model: another mode, another result.
    other = [m + 1 for m in modes]
    assert relative_error(latents(ours, guidance_scale=guidance_scale, seg_scale=0, control_mode=other, **kwargs, **SMALL),
                          expected) > 1e-4


class UnionAsControlNet(torch.nn.Module):
    """The union model behind the single-ControlNet call that diffusers' PAG ControlNet pipeline makes,
    called as diffusers' union pipeline calls it: the pipeline's (first) control image plus ``extra``
    images, one ``mode`` each, each scaled by ``scales`` times the pipeline's (windowed) scale."""

    def __init__(self, union, modes, scales, extra):
        super().__init__()
        self.union, self.modes, self.scales, self.extra = union, modes, scales, extra
        self.config = union.config

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, **kwargs):
        rows = sample.shape[0]
        conds = [controlnet_cond] + [image.to(controlnet_cond).expand(rows, -1, -1, -1) for image in self.extra]
        control_type = torch.zeros(self.union.config.num_control_type, dtype=sample.dtype)
        control_type[self.modes] = 1
        return self.union(sample, timestep, encoder_hidden_states, controlnet_cond=conds,
                          control_type=control_type.expand(rows, -1), control_type_idx=self.modes,
                          conditioning_scale=[conditioning_scale * s for s in self.scales], **kwargs)


CONTROL = dict(control_guidance_end=0.75, **SMALL)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("method", ["pag", "seg"])
@pytest.mark.parametrize("kind", ["multi", "union"])
def test_several_controls_with_pag_and_seg_match_reference(components64, multi64, union64, guidance_scale, method, kind):
    """Multi: diffusers' ControlNet PAG pipeline takes a MultiControlNetModel itself. Union: that pipeline
    drives the union model through UnionAsControlNet. SEG: the authors' query blur carried by that loop."""
    sigma = 3.0 if method == "seg" else None
    scales = [0.8, 0.5]
    if kind == "multi":
        ref = reference_pipeline(components64, sigma, controlnet=multi64)
        ref_kwargs = dict(image=[control_image(), ring_image()], controlnet_conditioning_scale=scales)
        ours = make_pipe(components64, controlnet=multi64)
        our_kwargs = dict(ref_kwargs)
    else:
        extra = make_pipe(components64, controlnet=union64).control_image_processor.preprocess(ring_image(), 32, 32)
        adapter = UnionAsControlNet(union64, [3, 1], scales, [extra])
        ref = reference_pipeline(components64, sigma, controlnet=MultiControlNetModel([adapter]))
        ref_kwargs = dict(image=[control_image()], controlnet_conditioning_scale=1.0)
        ours = make_pipe(components64, controlnet=union64)
        our_kwargs = dict(image=[control_image(), ring_image()], control_mode=[3, 1],
                          controlnet_conditioning_scale=scales)
    expected = latents(ref, guidance_scale=guidance_scale, pag_scale=3.0, **ref_kwargs, **CONTROL)
    method_scales = dict(seg_scale=3.0, seg_blur_sigma=sigma) if method == "seg" else dict(seg_scale=0, pag_scale=3.0)
    actual = latents(ours, guidance_scale=guidance_scale, **method_scales, **our_kwargs, **CONTROL)
    torch.testing.assert_close(actual, expected, **EXACT)
    # The controls matter in this comparison: without them the result moves.
    zero = {**our_kwargs, "controlnet_conditioning_scale": [0.0, 0.0]}
    assert relative_error(latents(ours, guidance_scale=guidance_scale, **method_scales, **zero, **CONTROL), expected) > 1e-4


def test_sag_runs_with_union(components64, union64):
    ours = make_pipe(components64, controlnet=union64)
    kwargs = dict(image=[control_image(), ring_image()], control_mode=[3, 1], seg_scale=0, **SMALL)
    plain = latents(ours, **kwargs)
    assert relative_error(latents(ours, sag_scale=1.0, **kwargs), plain) > 1e-4


@pytest.mark.parametrize("bad, message", [
    (dict(image=[control_image()]), "list of 2 control images"),
    (dict(image=control_image()), "list of 2 control images"),
    (dict(controlnet_conditioning_scale=[0.5, 0.5, 0.5]), r"one per control \(2\)"),
    (dict(controlnet_conditioning_scale=[0.5, 11.0]), "controlnet_conditioning_scale"),
    (dict(control_guidance_start=[0.0, 0.9], control_guidance_end=[1.0, 0.5]), "control_guidance"),
    (dict(control_mode=1), "control_mode is for a ControlNetUnionModel"),
])
def test_multi_controlnet_bad_input_names_the_value(components64, multi64, bad, message):
    ours = make_pipe(components64, controlnet=multi64)
    kwargs = {**dict(image=[control_image(), ring_image()]), **bad}
    with pytest.raises(ValueError, match=message):
        latents(ours, **kwargs, **SMALL)


@pytest.mark.parametrize("mode", [None, 6, -1, [3, 9], "canny", [True]])
def test_union_control_mode_is_required_and_in_range(components64, union64, mode):
    ours = make_pipe(components64, controlnet=union64)
    with pytest.raises(ValueError, match=r"control_mode must be an integer in \[0, 5\]"):
        latents(ours, image=[control_image(), ring_image()][: len(mode) if isinstance(mode, list) else 1],
                control_mode=mode, **SMALL)


def test_a_list_of_controlnets_becomes_a_multi_controlnet(components):
    nets = [tiny_controlnet(components["unet"]), tiny_controlnet(components["unet"], seed=5)]
    assert isinstance(make_pipe(components, controlnet=nets).controlnet, MultiControlNetModel)
    with pytest.raises(ValueError, match="MultiControlNetModel must hold one or more ControlNetModels"):
        make_pipe(components, controlnet=MultiControlNetModel([tiny_union_controlnet(components["unet"])]))
