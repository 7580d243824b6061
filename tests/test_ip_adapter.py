"""IP-Adapter image embeddings reach every branch (the SEG authors prepared them for 2 of 3 branches)."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from conftest import EXACT, generator
from seg_core import StableDiffusionXLSEGPipeline
from seg_core.tiny import tiny_ip_adapter_state_dict


def load_tiny_ip_adapter(unet, seed=0):
    """A random IP-Adapter in the layout of the published checkpoints, loaded with diffusers' loader."""
    unet._load_ip_adapter_weights([tiny_ip_adapter_state_dict(unet, seed=seed)])


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_ip_adapter_embeddings_in_every_branch(components64, guidance_scale):
    load_tiny_ip_adapter(components64["unet"])
    components64["unet"].to(torch.float64)
    do_cfg = guidance_scale > 1
    image = torch.randn(1, 1, 32, generator=generator(3), dtype=torch.float64)
    negative = torch.randn(1, 1, 32, generator=generator(4), dtype=torch.float64)
    embeds = [torch.cat([negative, image]) if do_cfg else image]
    ours = StableDiffusionXLSEGPipeline(**components64, add_watermarker=False)
    base = StableDiffusionXLPipeline(**components64, add_watermarker=False)
    for pipe in (ours, base):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, guidance_scale=guidance_scale, output_type="latent")
    run = lambda pipe, e, **kw: pipe("a cat", generator=generator(), ip_adapter_image_embeds=e, **kwargs, **kw).images  # noqa: E731

    plain = run(ours, embeds, seg_scale=0)
    torch.testing.assert_close(plain, run(base, embeds), rtol=0, atol=0)
    assert not torch.allclose(plain, run(ours, [e * -1 for e in embeds], seg_scale=0), atol=1e-4)  # it matters

    # The image embeddings each UNet call receives, row by row: [uncond, cond, seg, pag], then SAG's call
    # on the reference role (uncond with CFG). The SEG authors' code gave 2 of 3 branches embeddings.
    received = []
    hook = ours.unet.encoder_hid_proj.register_forward_pre_hook(lambda module, args: received.append(args[0][0]))
    try:
        guided = run(ours, embeds, seg_scale=3.0, pag_scale=2.0, sag_scale=1.0)
    finally:
        hook.remove()
    reference = negative if do_cfg else image
    main_call = torch.cat([negative, image, image, image] if do_cfg else [image, image, image])
    assert len(received) == 2 * 3
    for main, sag in zip(received[0::2], received[1::2]):
        assert torch.equal(main, main_call) and torch.equal(sag, reference)
    ours.share_down_blocks = False  # the shared down path gets the image embeddings right too
    torch.testing.assert_close(run(ours, embeds, seg_scale=3.0, pag_scale=2.0, sag_scale=1.0), guided, **EXACT)
