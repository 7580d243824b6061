"""Down-block sharing: the same results as recomputing every branch (in float64, to 1e-10), with fewer
down-block rows."""

import pytest
import torch

from conftest import EXACT, SMALL, generator, make_pipe
from test_exactness import control_image


def run_counting(pipe, share, **kwargs):
    pipe.share_down_blocks = share
    rows = {"down": 0, "mid": 0}

    def count(part):
        def hook(module, args):
            rows[part] += args[0].shape[0]
        return hook

    # The first resnet inside each block sees the rows the block really computes.
    handles = [pipe.unet.down_blocks[-1].resnets[0].register_forward_pre_hook(count("down")),
               pipe.unet.mid_block.resnets[0].register_forward_pre_hook(count("mid"))]
    try:
        out = pipe("a red bicycle", num_inference_steps=3, generator=generator(), output_type="latent", **SMALL,
                   **kwargs).images
    finally:
        for handle in handles:
            handle.remove()
    return out, rows


@pytest.mark.parametrize(
    "kwargs, down_rows_per_step, mid_rows_per_step",
    [
        (dict(seg_scale=3.0), 2, 3),
        (dict(seg_scale=3.0, guidance_scale=1.0), 1, 2),
        (dict(seg_scale=3.0, pag_scale=2.0, pag_applied_layers=["up"]), 2, 4),
        (dict(seg_scale=3.0, sag_scale=1.0), 3, 4),  # SAG's second call has its own input
        (dict(seg_scale=3.0, seg_applied_layers=["d1", "mid"]), 3, 3),  # a changed down layer: no sharing
    ],
)
def test_shared_down_blocks_match_recomputation(pipe64, kwargs, down_rows_per_step, mid_rows_per_step):
    pipe = pipe64
    unshared, unshared_rows = run_counting(pipe, False, **kwargs)
    shared, shared_rows = run_counting(pipe, True, **kwargs)
    torch.testing.assert_close(shared, unshared, **EXACT)
    assert shared_rows == {"down": 3 * down_rows_per_step, "mid": 3 * mid_rows_per_step}
    assert unshared_rows["mid"] == unshared_rows["down"] == shared_rows["mid"]


def test_shared_down_blocks_with_controlnet(components64, controlnet64):
    pipe = make_pipe(components64, controlnet=controlnet64)
    kwargs = dict(image=control_image(), seg_scale=3.0, pag_scale=1.0)
    unshared, _ = run_counting(pipe, False, **kwargs)
    shared, rows = run_counting(pipe, True, **kwargs)
    torch.testing.assert_close(shared, unshared, **EXACT)
    assert rows == {"down": 3 * 2, "mid": 3 * 4}
