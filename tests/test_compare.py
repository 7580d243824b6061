"""Side by side in one loop: each image equals its own separate run from the same seed (in float64, to
1e-10: the two sides differ only in batching)."""

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from conftest import EXACT, SMALL, generator, make_pipe
from seg_core import PAG, SAG, SEG
from seg_core.compare import side_by_side
from test_exactness import control_image

SETS = [[], [SAG(1.0)], [PAG(3.0)], [SEG(3.0, 2.0)]]


def separate(pipe, methods, **kwargs):
    return pipe("a red bicycle", generator=generator(0), guidance_methods=methods, **kwargs).images


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_side_by_side_equals_separate_runs(pipe64, guidance_scale):
    pipe = pipe64
    kwargs = dict(num_inference_steps=3, output_type="latent", guidance_scale=guidance_scale, **SMALL)
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        together = side_by_side(pipe, SETS, "a red bicycle", seed=0, **kwargs)
    finally:
        hook.remove()
    cfg = 2 if guidance_scale > 1 else 1
    assert rows == [4 * cfg + 2, 1] * 3  # one main call (every method's rows) and SAG's call per step
    for k, methods in enumerate(SETS):
        torch.testing.assert_close(together[k : k + 1], separate(pipe, methods, **kwargs), **EXACT)
    assert not torch.allclose(together[0], together[3], atol=1e-3)


def test_side_by_side_with_ancestral_noise_and_controlnet(components64, controlnet64):
    pipe = make_pipe(components64, controlnet=controlnet64)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    kwargs = dict(num_inference_steps=3, output_type="latent", image=control_image(), **SMALL)
    together = side_by_side(pipe, SETS, "a red bicycle", seed=0, **kwargs)
    for k, methods in enumerate(SETS):
        torch.testing.assert_close(together[k : k + 1], separate(pipe, methods, **kwargs), **EXACT)


def test_side_by_side_refuses_what_it_sets(pipe):
    with pytest.raises(ValueError, match="sets generator itself"):
        side_by_side(pipe, SETS, generator=generator())
    with pytest.raises(ValueError, match="at least one set"):
        side_by_side(pipe, [])
