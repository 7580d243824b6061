"""torch.compile of the guided UNet: no graph breaks, no recompiles when sigma, the scales or the prompt
change, and the same images as the eager pipeline.

Dynamo's counting runs with backend "aot_eager" (the graphs dynamo and AOTAutograd capture, run without
code generation: seconds, where inductor takes 1-2 minutes for the UNet's graphs on a loaded 2-core
CPU); one inductor run checks the generated code of the patched blocks, the only graphs this project
changes (the others are diffusers' own transformer blocks). Both sides run in float64: the compiled step differs from the eager one
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


# Regional with every method; the whole UNet (a longer trace) with CFG + SEG, the step the issue times.
@pytest.mark.parametrize("regional, methods", [(True, ALL_METHODS), (False, dict(seg_scale=3.0))],
                         ids=["regional-seg-pag-sag", "whole-unet-seg"])
def test_compiled_step_has_no_graph_break_and_no_recompile(eager, regional, methods):
    compiled = tiny_pipe64().compile(regional=regional, backend="aot_eager")
    start = dynamo_counts()
    run(compiled, seg_blur_sigma=1.0, **methods)  # the first call compiles
    warm = dynamo_counts()
    assert counts_since(start)["graph_breaks"] == 0
    assert counts_since(start)["recompiles"] > 0
    for prompt in ("a red cube", "a blue sphere on grass"):
        for sigma in (1.0, 4.0, math.inf):
            for seg_scale, guidance_scale in ((2.0, 5.0), (5.0, 7.5)):
                settings = dict(methods, prompt=prompt, seg_blur_sigma=sigma, seg_scale=seg_scale,
                                guidance_scale=guidance_scale)
                torch.testing.assert_close(run(compiled, **settings), run(eager, **settings), **EXACT)
    assert counts_since(warm) == {"recompiles": 0, "graph_breaks": 0}
    # The count does see a recompile: a new size needs new graphs.
    run(compiled, size=dict(height=48, width=32), **methods)
    assert counts_since(warm)["recompiles"] > 0


def test_inductor_step_equals_eager(eager):
    compiled = tiny_pipe64()
    for block in compiled.unet.mid_block.attentions[0].transformer_blocks:  # SEG's layers ("mid")
        block.compile(fullgraph=True, dynamic=False)  # as pipe.compile() does to every block
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


def test_demo_flag_compiles_the_unet_shared_by_every_pipeline(monkeypatch):
    import gradio as gr

    import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda demo, **options: launched.update(studio=demo.studio))

    def compiled_blocks(pipe):
        return [m for m in pipe.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]

    app.main(["--model", "tiny"])
    assert not compiled_blocks(launched["studio"].pipeline("none"))
    app.main(["--model", "tiny", "--compile"])
    pipes = list(launched["studio"]._pipes.values())
    blocks = [m for m in pipes[0].unet.modules() if type(m).__name__ in pipes[0].unet._repeated_blocks]
    assert len(pipes) > 2 and all(compiled_blocks(p) == blocks for p in pipes)  # "none" and each ControlNet's


class ReplayedOutputs:
    """A forward hook making the UNet return its outputs as CUDA graph replays do (mode="reduce-overhead"):
    views into one static buffer, which the next call overwrites whatever its shape."""

    def __init__(self, unet):
        self.pool = None
        self.handle = unet.register_forward_hook(self)

    def __call__(self, module, args, output):
        sample = output[0]
        if self.pool is None or self.pool.numel() < sample.numel():
            self.pool = torch.empty(sample.numel() * 4, dtype=sample.dtype)
        static = self.pool[:sample.numel()].view_as(sample)
        static.copy_(sample)
        return (static,)


def test_outputs_overwritten_by_the_next_unet_call_change_nothing(eager):
    """CFG's predictions outlive SAG's second UNet call; under CUDA graphs that call overwrites them unless
    the step keeps its own copy."""
    replayed = tiny_pipe64()
    hook = ReplayedOutputs(replayed.unet)
    try:
        torch.testing.assert_close(run(replayed, **ALL_METHODS), run(eager, **ALL_METHODS), **EXACT)
    finally:
        hook.handle.remove()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_need_the_whole_unet(mode):
    """With regional compilation each transformer block is its own compiled call, so a block's output (the
    next block's input) would be overwritten by the next replay: refused, with the way out named."""
    with pytest.raises(ValueError, match=f"mode {mode!r} .*CUDA graphs.*regional=False"):
        tiny_pipe64().compile(mode=mode)
