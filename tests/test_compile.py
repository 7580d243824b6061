"""torch.compile of the guided UNet: no graph breaks, no recompiles when sigma, the scales or the prompt
change, and the same images as the eager pipeline.

Dynamo's counting runs with backend "aot_eager" (the graphs dynamo and AOTAutograd capture, run without
code generation: seconds, where inductor takes a minute per size on a loaded 2-core CPU); one inductor
run checks the generated code. Both sides run in float64: the compiled step differs from the eager one
only in summation order (fused kernels, SEG's blur and its infinite-sigma mean as matrices), so the
outputs agree to float64 rounding, EXACT (1e-10).
"""

import math

import pytest
import torch

from conftest import EXACT, SMALL, generator, in_float64, make_pipe, sharpen_self_attention
from seg_core.compiled import counts_since, dynamo_counts
from seg_core.sharing import DownBlockSharing
from seg_core.tiny import tiny_sdxl_components

#: SEG, PAG and SAG at once: branches [uncond, cond, seg, pag], SAG's probe and its second UNet call.
ALL_METHODS = dict(seg_scale=3.0, pag_scale=2.0, pag_applied_layers=["u0"], sag_scale=0.5)


def tiny_pipe64():
    parts = tiny_sdxl_components(seed=0)
    sharpen_self_attention(parts["unet"])
    return make_pipe(in_float64(parts))


def run(pipe, prompt="a red cube", size=SMALL, **kwargs):
    return pipe(prompt=prompt, num_inference_steps=2, output_type="latent", generator=generator(),
                **size, **kwargs).images


@pytest.fixture(scope="module")
def eager():
    return tiny_pipe64()


@pytest.mark.parametrize("regional", [True, False], ids=["regional", "whole-unet"])
def test_compiled_step_has_no_graph_break_and_no_recompile(eager, regional):
    compiled = tiny_pipe64().compile(regional=regional, backend="aot_eager")
    start = dynamo_counts()
    run(compiled, seg_blur_sigma=1.0, **ALL_METHODS)  # the first call compiles
    warm = dynamo_counts()
    assert counts_since(start)["graph_breaks"] == 0
    assert counts_since(start)["recompiles"] > 0
    for prompt in ("a red cube", "a blue sphere on grass"):
        for sigma in (1.0, 4.0, math.inf):
            for seg_scale, guidance_scale in ((2.0, 5.0), (5.0, 7.5)):
                settings = dict(ALL_METHODS, prompt=prompt, seg_blur_sigma=sigma, seg_scale=seg_scale,
                                guidance_scale=guidance_scale)
                torch.testing.assert_close(run(compiled, **settings), run(eager, **settings), **EXACT)
    assert counts_since(warm) == {"recompiles": 0, "graph_breaks": 0}
    # The count does see a recompile: a new size needs new graphs.
    run(compiled, size=dict(height=48, width=32), **ALL_METHODS)
    assert counts_since(warm)["recompiles"] > 0


def test_inductor_step_equals_eager(eager):
    compiled = tiny_pipe64().compile()
    for sigma in (4.0, math.inf):  # the second sigma reuses the first one's code
        torch.testing.assert_close(run(compiled, seg_blur_sigma=sigma), run(eager, seg_blur_sigma=sigma), **EXACT)


def test_sharing_builds_its_index_tensors_once_per_layout():
    sharing = DownBlockSharing()
    keys = [("uncond", 0), ("cond", 0), ("cond", 0)]
    sharing.set(keys)
    keep, sources = sharing.keep, sharing.sources
    sharing.set(None)
    sharing.set(list(keys))
    assert sharing.keep is keep and sharing.sources is sources
    assert keep.tolist() == [0, 1] and sources.tolist() == [0, 1, 1]
