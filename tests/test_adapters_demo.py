"""The operator's adapters in the demo (issue 13): a Studio with an adapters.json gives what the library gives
with the same adapters, refuses what the operator did not offer with the library's message, records the
choice in the PNG, and takes ``loras`` and an uploaded ``ip_adapter_image`` through the API (never a path)."""

import numpy as np
import pytest
from PIL import Image

from app_server import running_demo
from seg_core.adapters import AdapterChoice, applied_adapters, load_adapters, read_adapter_config
from seg_core.guard import FILE_REFUSED
from seg_core.presets import load_pipeline
from seg_core.studio import Studio, read_png_settings
from seg_core.tiny import tiny_sdxl_components, write_tiny_adapters

#: diffusers' loader, as a model gets its second LoRA (the point here).
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
REQUEST = dict(prompt="a lighthouse", seed=3, steps=2, seg_scale=2.0)
IMAGE = "assets/control_house.png"


@pytest.fixture(scope="module")
def adapters_json(tmp_path_factory):
    return write_tiny_adapters(tmp_path_factory.mktemp("adapters"), tiny_sdxl_components(seed=0))


@pytest.fixture(scope="module")
def studio(adapters_json):
    return Studio("tiny", fallback=None, adapters=read_adapter_config(adapters_json))


@pytest.fixture(scope="module")
def plain():
    return Studio("tiny", fallback=None)


@pytest.fixture(scope="module")
def library(adapters_json):
    """The library pipeline on the tiny model with the same adapters, loaded by seg_core.adapters alone."""
    pipe = load_pipeline("tiny")
    config = read_adapter_config(adapters_json)
    load_adapters(pipe, config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, config


def pixels(image):
    return np.asarray(image.convert("RGB"))


def generated(studio, **values):
    run, _ = studio.generate(studio.settings(**REQUEST, **values))
    return run


def library_pixels(library, choice, settings):
    import torch

    pipe, config = library
    with applied_adapters(pipe, config, choice) as kwargs:
        image = pipe(**settings.pipeline_kwargs(), **kwargs, generator=torch.Generator().manual_seed(settings.seed),
                     output_type="pil").images[0]
    return pixels(image)


def test_a_lora_request_equals_the_library_call_with_the_same_adapters(studio, library):
    run = generated(studio, loras={"ink": 1.2, "glaze": 0.5})
    expected = library_pixels(library, AdapterChoice({"ink": 1.2, "glaze": 0.5}), run.settings)
    assert np.array_equal(pixels(run.image), expected)
    assert not np.array_equal(pixels(run.image), pixels(generated(studio).image))  # the LoRAs act
    stored = read_png_settings(run.path)
    assert stored["loras"] == {"ink": 1.2, "glaze": 0.5} and stored["ip_adapter_scale"] == 0.0
    assert "LoRAs: ink x1.2, glaze x0.5" in Image.open(run.path).info["parameters"]


def test_an_image_prompt_equals_the_library_call_and_is_recorded(studio, library):
    run = generated(studio, ip_adapter_image=IMAGE, ip_adapter_scale=0.7)
    decoded = run.settings.ip_adapter_image
    expected = library_pixels(library, AdapterChoice({}, decoded, 0.7), run.settings)
    assert np.array_equal(pixels(run.image), expected)
    assert not np.array_equal(pixels(run.image), pixels(generated(studio).image))
    stored = read_png_settings(run.path)
    assert stored["ip_adapter_scale"] == 0.7 and len(stored["ip_adapter_image_sha256"]) == 16
    assert "ip_adapter_image" not in stored and "IP-Adapter scale: 0.7" in Image.open(run.path).info["parameters"]
    # Left out, the scale is the configured default with an image prompt, else 0.
    assert studio.settings(ip_adapter_image=IMAGE).ip_adapter_scale == 0.5
    assert studio.settings().ip_adapter_scale == 0.0


def test_weight_zero_equals_no_lora_and_the_adapters_are_off_after_each_request(studio, plain):
    without = pixels(generated(studio).image)
    assert np.array_equal(pixels(generated(studio, loras={"ink": 0.0}).image), without)
    generated(studio, loras={"ink": 1.5})
    assert np.array_equal(pixels(generated(studio).image), without)
    # ... and with nothing chosen, a server with adapters gives what a server without them gives, ControlNet
    # included (the offline model's random ControlNet is built from the UNet without its adapters).
    assert np.array_equal(without, pixels(generated(plain).image))
    controlled = [s.generate(s.settings(**REQUEST, control_type="canny"), IMAGE)[0].image for s in (studio, plain)]
    assert np.array_equal(*map(pixels, controlled)) and not np.array_equal(pixels(controlled[0]), without)
    lora = studio.generate(studio.settings(**REQUEST, control_type="canny", loras={"ink": 1.0}), IMAGE)[0].image
    assert not np.array_equal(pixels(lora), pixels(controlled[0]))  # the ControlNet pipeline has the LoRAs too


@pytest.mark.parametrize("values, message", [
    (dict(loras={"sketch": 1.0}), "LoRA 'sketch' is not offered here; the LoRAs are: 'ink', 'glaze'"),
    (dict(loras={"glaze": 1.5}), "LoRA 'glaze' weight must be a number in [0.0, 1.0], got 1.5"),
    (dict(loras={"ink": "1"}), "LoRA 'ink' weight must be a number in [-1.0, 1.5], got '1'"),
    (dict(loras=["ink"]), "loras must map LoRA names to weights, got list"),
    (dict(ip_adapter_scale=0.6), "ip_adapter_scale=0.6 needs an ip_adapter_image"),
    (dict(ip_adapter_image=IMAGE, ip_adapter_scale=2.0), "ip_adapter_scale must be 0 (off) or a number in [0.0, 1.0]"),
])
def test_what_the_operator_did_not_offer_is_refused_with_its_name(studio, values, message):
    with pytest.raises(ValueError, match=None) as error:
        studio.settings(**values)
    assert message in str(error.value)


def test_a_server_without_adapters_refuses_any_choice_and_is_otherwise_unchanged(plain):
    settings = plain.settings(**REQUEST)
    assert (settings.loras, settings.ip_adapter_scale, settings.ip_adapter_image) == ({}, 0.0, None)
    assert plain.settings(**REQUEST, loras={}) == settings
    assert "LoRA" not in settings.describe() and "IP-Adapter" not in settings.describe()
    with pytest.raises(ValueError, match="LoRA 'ink' is not offered here; no LoRAs are configured on this server"):
        plain.settings(loras={"ink": 1.0})
    with pytest.raises(ValueError, match="no IP-Adapter is configured on this server"):
        plain.settings(ip_adapter_image=IMAGE)


@pytest.fixture(scope="module")
def client(adapters_json):
    from gradio_client import Client

    return Client(running_demo(adapters=adapters_json)[1], verbose=False)


def test_the_api_takes_loras_and_refuses_a_server_path_as_the_image_prompt(client, studio):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    path, info = client.predict(**REQUEST, loras={"ink": 1.2, "glaze": 0.5}, api_name="/generate")
    assert info["settings"]["loras"] == {"ink": 1.2, "glaze": 0.5}
    assert np.array_equal(pixels(Image.open(path)), pixels(generated(studio, loras={"ink": 1.2, "glaze": 0.5}).image))
    _, info = client.predict(**REQUEST, ip_adapter_image=handle_file(IMAGE), ip_adapter_scale=0.4,
                             api_name="/generate")
    assert info["settings"]["ip_adapter_scale"] == 0.4
    for payload in ({"path": "/etc/passwd"}, IMAGE, {"path": "/work/assets/control_house.png"}):
        with pytest.raises(AppError) as error:
            client.predict(**REQUEST, ip_adapter_image=payload, api_name="/generate")
        assert str(error.value) == FILE_REFUSED
    with pytest.raises(AppError, match="LoRA 'sketch' is not offered here"):
        client.predict(**REQUEST, loras={"sketch": 1.0}, api_name="/compare")


def test_the_page_offers_the_adapters_and_names_their_licenses(adapters_json):
    demo, _ = running_demo(adapters=adapters_json)
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert by_id["lora"].choices == [("none", "none"), ("ink (random weights (tests))", "ink"),
                                     ("glaze (random weights (tests))", "glaze")]
    assert (by_id["lora-weight"].minimum, by_id["lora-weight"].maximum) == (-1.0, 1.5)
    assert type(by_id["ip-adapter-image"]).__name__ == "ControlImage"
    assert "LoRA `glaze`: random weights (tests)" in by_id["adapter-licenses"].value
    assert "adapters" not in {block.elem_id for block in running_demo()[0].blocks.values()}
    import inspect

    for fn in demo.fns.values():  # every request of the page reads the panel (Handlers.settings converts it)
        if getattr(fn.fn, "__name__", "") in ("ui_generate", "ui_compare", "ui_sweep"):
            assert {"lora", "lora_weight", "ip_adapter_image", "ip_adapter_strength"} <= set(
                inspect.signature(fn.fn).parameters), fn.fn.__name__


def test_the_pages_lora_choice_and_strength_become_the_requests_adapters(studio):
    from app import Handlers

    handlers = Handlers(studio)
    page = dict(prompt="", seed=1, lora="glaze", lora_weight=0.3, ip_adapter_image=None, ip_adapter_strength=0.5)
    settings = handlers.settings(page)  # (the strength counts only with an image prompt)
    assert (settings.loras, settings.ip_adapter_scale) == ({"glaze": 0.3}, 0.0)
    settings = handlers.settings({**page, "lora": "none", "ip_adapter_image": IMAGE})
    assert (settings.loras, settings.ip_adapter_scale) == ({}, 0.5)


def test_compare_in_one_loop_gives_the_separate_runs_with_an_image_prompt_and_a_lora(studio):
    settings = studio.settings(**REQUEST, loras={"ink": 1.0}, ip_adapter_image=IMAGE, ip_adapter_scale=0.6)
    separate, _ = studio.compare(settings)
    together, _ = studio.compare(settings, one_loop=True)
    plain, _ = studio.compare(studio.settings(**REQUEST))
    for one, other, without in zip(separate, together, plain):
        assert np.abs(pixels(one.image).astype(int) - pixels(other.image)).max() <= 1, one.label  # float rounding
        assert not np.array_equal(pixels(one.image), pixels(without.image)), one.label
