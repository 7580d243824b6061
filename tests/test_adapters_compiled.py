"""Adapters on a compiled UNet (seg_core.adapters with ``pipe.compile()``): after a warm-up call, a request's
LoRA weights, its set of LoRAs, its IP-Adapter scale and its image prompt compile nothing new, and the images
equal the eager pipeline's with the same choice.

Dynamo counts with backend "aot_eager" (as tests/test_compile.py); float64, so that the compiled and the eager
step, which differ only in summation order, agree to EXACT (1e-10).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXACT, SMALL, generator, in_float64, make_pipe, sharpen_self_attention
from seg_core.adapters import AdapterChoice, applied_adapters, load_adapters, parse_adapter_config, read_adapter_config
from seg_core.compiled import counts_since, dynamo_counts
from seg_core.tiny import tiny_sdxl_components, write_tiny_adapters, write_tiny_lora
from test_exactness import relative_error

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")

#: Two image prompts: a red disc on blue, and noise.
_yy, _xx = np.mgrid[:48, :48]
DISC = Image.fromarray(np.where(((_yy - 24) ** 2 + (_xx - 24) ** 2 < 200)[..., None], [220, 30, 30], [20, 40, 200])
                       .astype(np.uint8))
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))

#: After the warm-up (no adapter): several weights, sets of LoRAs (none, one, two), IP-Adapter scales
#: (0, 0.3, 0.8) and image prompts, and back to none.
CHOICES = [
    AdapterChoice({"ink": 0.7}),
    AdapterChoice({"ink": -0.4}),
    AdapterChoice({"ink": 1.2, "glaze": 0.5}),  # glaze adapts the text encoders too
    AdapterChoice({"glaze": 0.9}),
    AdapterChoice({}, DISC, 0.3),
    AdapterChoice({"ink": 0.3}, DISC, 0.8),
    AdapterChoice({"ink": 0.0, "glaze": 0.2}, NOISE, 0.8),
    AdapterChoice({}, NOISE, 0.0),
    AdapterChoice(),
]
#: Plain CFG, and CFG + SEG (SEG's patched mid-block self-attentions next to the adapted layers).
METHODS = [dict(seg_scale=0.0), dict(seg_scale=3.0, seg_blur_sigma=2.0)]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return read_adapter_config(write_tiny_adapters(tmp_path_factory.mktemp("adapters"), tiny_sdxl_components(seed=0)))


def pipe_with_adapters(config):
    parts = tiny_sdxl_components(seed=0)
    sharpen_self_attention(parts["unet"])
    pipe = make_pipe(in_float64(parts))
    load_adapters(pipe, config)
    return pipe


def run_with(pipe, config, choice, **methods):
    with applied_adapters(pipe, config, choice) as call_kwargs:
        return pipe("a lighthouse in a storm", generator=generator(), num_inference_steps=2, output_type="latent",
                    **SMALL, **methods, **call_kwargs).images


def test_a_new_choice_compiles_nothing_and_equals_eager(config):
    eager = pipe_with_adapters(config)
    compiled = pipe_with_adapters(config).compile(backend="aot_eager")
    for methods in METHODS:  # the warm-up: one call per method set compiles
        run_with(compiled, config, AdapterChoice(), **methods)
    warm = dynamo_counts()
    for methods in METHODS:
        off = run_with(eager, config, AdapterChoice(), **methods)
        for choice in CHOICES:
            expected = run_with(eager, config, choice, **methods)
            torch.testing.assert_close(run_with(compiled, config, choice, **methods), expected, **EXACT)
            adapts = any(choice.loras.values()) or choice.ip_adapter_scale != 0
            assert (relative_error(expected, off) > 1e-3) == adapts  # a weight or scale of 0 is no adapter
    assert counts_since(warm) == {"recompiles": 0, "graph_breaks": 0}


def test_a_dora_runs_only_when_chosen(config, tmp_path):
    """A DoRA (Liu et al. 2024) rescales its layers even at weight 0, so a compiled UNet cannot keep it running:
    choosing it or not compiles once each way; its weights and the other LoRAs' still compile nothing."""
    write_tiny_lora(tmp_path / "dora", tiny_sdxl_components(seed=0), seed=4, use_dora=True)
    lora = {"weight_name": "pytorch_lora_weights.safetensors", "license": "random weights (tests)"}
    with_dora = parse_adapter_config({"loras": {"ink": {"source": config.loras["ink"].source, **lora},
                                                "dora": {"source": "./dora", **lora}}}, tmp_path)
    eager = pipe_with_adapters(with_dora)
    compiled = pipe_with_adapters(with_dora).compile(backend="aot_eager")
    warm_ups, choices = [AdapterChoice(), AdapterChoice({"dora": 0.5})], [
        AdapterChoice({"ink": 0.6}), AdapterChoice({"dora": 0.8}), AdapterChoice({"ink": 0.3, "dora": 0.2}),
        AdapterChoice()]
    for choice in warm_ups:
        run_with(compiled, with_dora, choice)
    warm = dynamo_counts()
    off = run_with(eager, with_dora, AdapterChoice())
    for choice in choices:
        expected = run_with(eager, with_dora, choice)
        torch.testing.assert_close(run_with(compiled, with_dora, choice), expected, **EXACT)
        assert (relative_error(expected, off) > 1e-3) == bool(choice.loras)
    assert counts_since(warm) == {"recompiles": 0, "graph_breaks": 0}
