"""LoRA and IP-Adapter from the operator's list (seg_core.adapters): loaded from files in the published
layouts, equal to diffusers' own pipeline with the same adapters, in every guidance branch, off again after
each request, and nothing a request may not choose.

float64 throughout, so that the comparisons agree to 1e-10 (see test_exactness).
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from conftest import EXACT, SMALL, generator, in_float64, make_pipe, sharpen_self_attention
from seg_core import StableDiffusionXLSEGPipeline
from seg_core.adapters import (
    AdapterChoice,
    AdapterConfig,
    applied_adapters,
    load_adapters,
    parse_adapter_config,
    read_adapter_config,
)
from seg_core.tiny import tiny_sdxl_components, write_tiny_adapters
from test_exactness import relative_error

#: diffusers' loader, as a model gets its second LoRA (the point here).
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
README = Path(__file__).resolve().parent.parent / "README.md"
PROMPT = "a lighthouse in a storm"
GUIDED = dict(seg_scale=3.0, seg_blur_sigma=2.0, pag_scale=2.0, sag_scale=1.0)
#: An image prompt: a red disc on blue.
_yy, _xx = np.mgrid[:48, :48]
IMAGE = Image.fromarray(np.where(((_yy - 24) ** 2 + (_xx - 24) ** 2 < 200)[..., None], [220, 30, 30], [20, 40, 200])
                        .astype(np.uint8))


@pytest.fixture(scope="module")
def adapters_json(tmp_path_factory):
    return write_tiny_adapters(tmp_path_factory.mktemp("adapters"), tiny_sdxl_components(seed=0))


@pytest.fixture(scope="module")
def config(adapters_json):
    return read_adapter_config(adapters_json)


def fresh_components64():
    """Another copy of the tests' float64 tiny model (the conftest fixture's weights)."""
    parts = tiny_sdxl_components(seed=0)
    sharpen_self_attention(parts["unet"])
    return in_float64(parts)


@pytest.fixture
def ours(pipe64, config):
    load_adapters(pipe64, config)
    return pipe64


def run(pipe, **kwargs):
    return pipe(PROMPT, generator=generator(), num_inference_steps=3, output_type="latent", **SMALL, **kwargs).images


def run_with(pipe, config, choice, **kwargs):
    with applied_adapters(pipe, config, choice) as call_kwargs:
        return run(pipe, **call_kwargs, **kwargs)


def diffusers_with_adapters(config, loras, ip_scale=None, cls=StableDiffusionXLPipeline):
    """``cls`` on a fresh copy of the model with the configured files loaded by diffusers' own loaders."""
    pipe = make_pipe(fresh_components64(), cls)
    for name in loras:
        spec = config.loras[name]
        pipe.load_lora_weights(spec.source, weight_name=spec.weight_name, adapter_name=name)
    if loras:
        pipe.set_adapters(list(loras), list(loras.values()))
    if ip_scale is not None:
        spec = config.ip_adapter
        pipe.load_ip_adapter(spec.source, spec.subfolder, spec.weight_name, image_encoder_folder="image_encoder")
        pipe.set_ip_adapter_scale(ip_scale)
    return pipe


CHOICES = {
    "lora": AdapterChoice({"ink": 0.7}),
    "two-loras": AdapterChoice({"ink": -0.6, "glaze": 0.9}),  # glaze adapts the text encoders too
    "ip-adapter": AdapterChoice(ip_adapter_image=IMAGE, ip_adapter_scale=0.8),
    "all": AdapterChoice({"ink": 1.2, "glaze": 0.5}, IMAGE, 0.6),
}


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name", CHOICES)
def test_equals_diffusers_with_the_same_adapters(ours, config, name, guidance_scale):
    choice = CHOICES[name]
    ip_scale = choice.ip_adapter_scale if choice.ip_adapter_image is not None else None
    base = diffusers_with_adapters(config, choice.loras, ip_scale)
    image = {} if ip_scale is None else dict(ip_adapter_image=choice.ip_adapter_image)
    expected = run(base, guidance_scale=guidance_scale, **image)
    actual = run_with(ours, config, choice, guidance_scale=guidance_scale, seg_scale=0)
    torch.testing.assert_close(actual, expected, **EXACT)
    assert relative_error(actual, run_with(ours, config, AdapterChoice(), seg_scale=0,
                                           guidance_scale=guidance_scale)) > 1e-3  # the adapters matter


@pytest.mark.parametrize("mode", [dict(seg_scale=0), GUIDED], ids=["off", "guided"])
def test_weight_and_scale_zero_equal_no_adapter(ours, config, mode):
    plain = run(make_pipe(fresh_components64()), **mode)
    for choice in (AdapterChoice(), AdapterChoice({"ink": 0.0, "glaze": 0.0}, IMAGE, 0.0)):
        torch.testing.assert_close(run_with(ours, config, choice, **mode), plain, **EXACT)
    for choice in (AdapterChoice({"ink": 0.3}), AdapterChoice({"glaze": 0.3}), AdapterChoice({}, IMAGE, 0.3)):
        assert relative_error(run_with(ours, config, choice, **mode), plain) > 1e-3


def test_lora_applies_to_every_branch(ours, config):
    """SEG, PAG and SAG with the LoRAs on equal the same run on a model whose weights have the LoRAs fused
    in: every branch (the perturbed ones, SAG's extra call, the text encoders) ran through them."""
    weights = {"ink": 0.8, "glaze": 0.6}
    fused = diffusers_with_adapters(config, weights, cls=StableDiffusionXLSEGPipeline)
    fused.fuse_lora()
    fused.unload_lora_weights()
    expected = run(fused, **GUIDED)
    actual = run_with(ours, config, AdapterChoice(weights), **GUIDED)
    torch.testing.assert_close(actual, expected, **EXACT)
    ours.share_down_blocks = False
    torch.testing.assert_close(run_with(ours, config, AdapterChoice(weights), **GUIDED), expected, **EXACT)
    assert relative_error(actual, run_with(ours, config, AdapterChoice(), **GUIDED)) > 1e-3


def adapters_are_off(pipe):
    lora_layers = [m for c in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for m in c.modules()
                   if isinstance(m, BaseTunerLayer)]
    ip_scales = [s for p in pipe.unet.attn_processors.values() for s in getattr(p, "scale", [])]
    return lora_layers and ip_scales and all(m.disable_adapters for m in lora_layers) and set(ip_scales) == {0.0}


def test_state_is_restored_when_the_call_raises(ours, config):
    assert adapters_are_off(ours)
    before = run_with(ours, config, AdapterChoice(), **GUIDED)

    def stop_at_step_1(pipeline, step, t, tensors):
        assert not adapters_are_off(pipeline)
        if step == 1:
            raise RuntimeError("stopped at step 1")
        return tensors

    with pytest.raises(RuntimeError, match="stopped at step 1"):
        run_with(ours, config, AdapterChoice({"ink": 1.0, "glaze": 1.0}, IMAGE, 1.0), callback_on_step_end=stop_at_step_1)
    assert adapters_are_off(ours)
    torch.testing.assert_close(run_with(ours, config, AdapterChoice(), **GUIDED), before, rtol=0, atol=0)


NOT_OFFERED = [
    (AdapterChoice([("ink", 1.0)]), "loras must map LoRA names to weights, got list"),
    (AdapterChoice({"nope": 1.0}), "LoRA 'nope' is not offered here; the LoRAs are: 'ink', 'glaze'"),
    (AdapterChoice({"ink": 2.0}), r"LoRA 'ink' weight must be a number in [-1.0, 1.5], got 2.0"),
    (AdapterChoice({"glaze": -0.1}), r"LoRA 'glaze' weight must be a number in [0.0, 1.0], got -0.1"),
    (AdapterChoice({"ink": True}), "LoRA 'ink' weight must be a number in [-1.0, 1.5], got True"),
    (AdapterChoice({"ink": math.nan}), "LoRA 'ink' weight must be a number in [-1.0, 1.5], got nan"),
    (AdapterChoice({"ink": "1"}), "LoRA 'ink' weight must be a number in [-1.0, 1.5], got '1'"),
    (AdapterChoice({}, IMAGE, 1.5), "ip_adapter_scale must be 0 (off) or a number in [0.0, 1.0], got 1.5"),
    (AdapterChoice({}, IMAGE, None), "ip_adapter_scale must be 0 (off) or a number in [0.0, 1.0], got None"),
    (AdapterChoice({}, None, 0.5), "ip_adapter_scale=0.5 needs an ip_adapter_image"),
    (AdapterChoice({}, np.zeros((8, 8, 3)), 0.5), "ip_adapter_image must be a PIL image, got ndarray"),
]


@pytest.mark.parametrize("choice, message", NOT_OFFERED)
def test_a_request_may_only_choose_what_is_offered(config, choice, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        with applied_adapters(None, config, choice):  # refused before the pipeline is touched
            pass


def test_nothing_is_offered_without_a_config():
    with pytest.raises(ValueError, match="LoRA 'ink' is not offered here; no LoRAs are configured on this server"):
        AdapterConfig().check(AdapterChoice({"ink": 1.0}))
    with pytest.raises(ValueError, match=r"no IP-Adapter is configured on this server \(an image prompt needs one\); "
                                         r"got an image prompt at ip_adapter_scale=0.0"):
        AdapterConfig().check(AdapterChoice({}, IMAGE, 0.0))
    with pytest.raises(ValueError, match="got no image at ip_adapter_scale=0.5"):
        AdapterConfig().check(AdapterChoice({}, None, 0.5))
    AdapterConfig().check(AdapterChoice())


def test_the_config_file(adapters_json, config):
    folder = Path(adapters_json).parent
    assert list(config.loras) == ["ink", "glaze"]
    ink = config.loras["ink"]
    assert ink.source == str(folder / "ink") and ink.weight_range == (-1.0, 1.5) and ink.default_weight == 1.0
    assert config.loras["glaze"].default_weight == 0.8
    ip = config.ip_adapter
    assert ip.source == str(folder / "ip-adapter") and ip.image_encoder == "models/image_encoder"
    assert ip.scale_range == (0.0, 1.0) and ip.default_scale == 0.5
    Path(adapters_json).with_name("broken.json").write_text("{\"loras\": ")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        read_adapter_config(Path(adapters_json).with_name("broken.json"))


def readme_example() -> dict:
    """The adapters.json example of the README (Hub sources)."""
    section = README.read_text().split("### Adapters", 1)[1]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))


def test_the_readme_example_is_a_valid_config():
    config = parse_adapter_config(readme_example())
    assert config.loras and config.ip_adapter is not None
    for spec in [*config.loras.values(), config.ip_adapter]:
        assert spec.license and spec.weight_name.endswith(".safetensors")


def _lora(**changes):
    entry = {"source": "owner/lora", "weight_name": "lora.safetensors", "license": "openrail++", **changes}
    return {"loras": {"x": {k: v for k, v in entry.items() if v is not None}}}


def _ip(**changes):
    entry = {"source": "h94/IP-Adapter", "subfolder": "sdxl_models", "weight_name": "ip-adapter_sdxl.safetensors",
             "image_encoder": "sdxl_models/image_encoder", "license": "apache-2.0", **changes}
    return {"ip_adapter": {k: v for k, v in entry.items() if v is not None}}


BAD_CONFIGS = [
    ([], "the adapter config must be a JSON object, got list"),
    ({"lora": {}}, "the adapter config: unknown keys ['lora']; allowed: ['ip_adapter', 'loras']"),
    ({"loras": {"a.b": {}}}, "LoRA names must be 1 to 64 letters, digits, '_' or '-' (not first), got 'a.b'"),
    ({"loras": {"x": "owner/lora"}}, "loras.x must be a JSON object, got str"),
    (_lora(scale=1), "loras.x: unknown keys ['scale']; allowed: ['default_weight', 'license', 'revision',"),
    (_lora(license=None), "loras.x: missing ['license']"),
    (_lora(license=" "), "loras.x.license must be a non-empty string, got ' '"),
    (_lora(weight_name="lora.bin"), "loras.x.weight_name must be a .safetensors file name (safetensors only"),
    (_lora(weight_name="sub/lora.safetensors"), "loras.x.weight_name must be a .safetensors file name"),
    (_lora(source="https://example.com/lora"), "loras.x.source must be a Hub id 'owner/name' or a folder starting"),
    (_lora(source="./no-such-folder"), "loras.x.source: the folder"),
    (_lora(subfolder="../up"), "loras.x.subfolder must be a relative path inside the source (no '..'), got '../up'"),
    (_lora(weight_range=[1.0, 0.0]), "loras.x.weight_range must be [min, max], finite numbers with min <= max, got"),
    (_lora(weight_range=[0, math.inf]), "loras.x.weight_range must be [min, max], finite numbers with min <= max"),
    (_lora(weight_range=[0.0, 0.5]), "loras.x.default_weight (1.0 when not given) must be a number in [0.0, 0.5]"),
    (_lora(default_weight="1"), "loras.x.default_weight must be a float, got '1'"),
    (_lora(default_weight=2), "loras.x.default_weight must be a number in [0.0, 1.0], got 2.0"),
    (_ip(image_encoder=None), "ip_adapter: missing ['image_encoder']"),
    (_ip(image_encoder="/abs/encoder"), "ip_adapter.image_encoder must be a relative path inside the source"),
    (_ip(weight_name="ip-adapter_sdxl.bin"), "ip_adapter.weight_name must be a .safetensors file name"),
    (_ip(scale_range=[-1.0, 1.0]), "ip_adapter.scale_range must be [min, max], finite numbers with min <= max, "
                                   "from 0.0, got [-1.0, 1.0]"),
    (_ip(default_scale=1.5), "ip_adapter.default_scale must be a number in [0.0, 1.0], got 1.5"),
]


@pytest.mark.parametrize("data, message", BAD_CONFIGS)
def test_a_bad_config_is_refused_by_name(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_adapter_config(data)
