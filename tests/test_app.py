"""The demo through its API (gradio_client), and the generation service behind it (seg_core.studio)."""

import json
import math
import sys
import types

import numpy as np
import pytest
from PIL import Image

from app_server import running_demo
from seg_core.zerogpu import GPU
from seg_core.studio import Studio, UNetCounter, labelled_grid, parse_sigma, parse_values, read_png_settings

STEPS = 2  # fast on the tiny model; every path still runs
HOUSE = "assets/control_house.png"


@pytest.fixture(scope="session")
def client():
    from gradio_client import Client

    _, url = running_demo()
    return Client(url, verbose=False)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_api_has_named_endpoints_with_library_argument_names(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/compare", "/sweep"} <= set(info)
    params = {p["parameter_name"]: p for p in info["/generate"]["parameters"]}
    for name in ("prompt", "negative_prompt", "seed", "steps", "width", "height", "guidance_scale", "seg_scale",
                 "seg_blur_sigma", "seg_applied_layers", "pag_scale", "sag_scale", "control_type", "control_image",
                 "controlnet_conditioning_scale"):
        assert name in params, name
    optional = [name for name, p in params.items() if p["parameter_has_default"]]
    assert set(params) - set(optional) == {"prompt"}


def test_every_input_of_every_request_reaches_the_studio():
    """Each handler's inputs are named (its signature, built from the registry), and each name is one the
    studio reads: a Settings field, a control image, a Compare or Sweep option, the number of images, or one
    of the page's widgets that Handlers.settings converts. A renamed input fails here instead of being
    silently dropped."""
    import inspect

    from app import ENDPOINTS, SETTINGS_FIELDS, UI_EXTRAS
    from seg_core.options import COMPARE_AND_SWEEP

    demo, _ = running_demo()
    converted = {"size", "log2_sigma", "infinite_sigma", "randomize_seed"}
    known = SETTINGS_FIELDS | {"control_image", "control_image_2", "num_images"} | set(COMPARE_AND_SWEEP) | converted
    handlers = {fn.fn.__name__: fn for fn in demo.fns.values()
                if getattr(fn.fn, "__name__", None) in {*ENDPOINTS, *(f"ui_{kind}" for kind in UI_EXTRAS)}}
    assert set(handlers) == {"generate", "compare", "sweep", "ui_generate", "ui_compare", "ui_sweep"}
    for name, fn in handlers.items():
        parameters = [p for p in inspect.signature(fn.fn).parameters if p != "progress"]
        assert len(parameters) == len(fn.inputs) and set(parameters) <= known, (name, set(parameters) - known)
        if name in ENDPOINTS:
            assert tuple(parameters) == ENDPOINTS[name]


def test_generate_writes_settings_into_the_png_and_is_reproducible(client):
    path, info = client.predict(prompt="a jellyfish playing the drums", seed=7, steps=STEPS, api_name="/generate")
    settings = read_png_settings(path)
    assert settings["prompt"] == "a jellyfish playing the drums"
    assert settings["seed"] == 7 and settings["steps"] == STEPS and settings["method"] == "SEG"
    assert settings["seg_blur_sigma"] == "inf" and settings["seg_applied_layers"] == ["mid"]
    assert settings["model"] == "tiny" and (settings["width"], settings["height"]) == (64, 64)
    assert "Seed: 7" in Image.open(path).info["parameters"]
    assert info["seed"] == 7 and info["unet_evaluations"] == 2 * STEPS  # no CFG: cond + SEG branch

    again, _ = client.predict(prompt="a jellyfish playing the drums", seed=7, steps=STEPS, api_name="/generate")
    other, _ = client.predict(prompt="a jellyfish playing the drums", seed=8, steps=STEPS, api_name="/generate")
    assert np.array_equal(pixels(path), pixels(again))
    assert not np.array_equal(pixels(path), pixels(other))


def test_generate_sigma_forms_and_random_seed(client):
    _, info = client.predict(prompt="", steps=1, seg_blur_sigma=10, seg_applied_layers=["mid", "up"],
                             api_name="/generate")
    assert info["settings"]["seg_blur_sigma"] == "10" and info["settings"]["seg_applied_layers"] == ["mid", "up"]
    assert 0 <= info["seed"] < 2**32  # seed omitted: a random one, reported
    inf_path, _ = client.predict(prompt="x", seed=3, steps=1, seg_blur_sigma="inf", api_name="/generate")
    big_path, info = client.predict(prompt="x", seed=3, steps=1, seg_blur_sigma=10000, api_name="/generate")
    assert info["settings"]["seg_blur_sigma"] == "inf"
    assert np.array_equal(pixels(inf_path), pixels(big_path))


def test_compare_labels_times_and_counts_unet_evaluations(client):
    gallery, runs = client.predict(prompt="a corgi", seed=1, steps=STEPS, guidance_scale=5.0, api_name="/compare")
    assert [item["caption"].split(" ")[0] for item in gallery] == ["Vanilla", "SAG", "PAG", "SEG"]
    per_step = [run["unet_evaluations_per_step"] for run in runs]
    assert per_step == [2, 3, 3, 3]  # CFG; CFG + one extra branch or pass
    assert all(run["seconds"] > 0 and run["seed"] == 1 for run in runs)
    methods = [read_png_settings(item["image"])["method"] for item in gallery]
    assert methods == ["vanilla", "SAG", "PAG", "SEG"]

    # All four in one loop: the same images (to a rounding step) and the same UNet evaluations each.
    together, together_runs = client.predict(prompt="a corgi", seed=1, steps=STEPS, guidance_scale=5.0,
                                             one_loop=True, api_name="/compare")
    assert [run["unet_evaluations"] for run in together_runs] == [run["unet_evaluations"] for run in runs]
    assert all(run["one_loop"] for run in together_runs) and not any(run["one_loop"] for run in runs)
    for alone, batched in zip(gallery, together):
        difference = np.abs(pixels(alone["image"]).astype(int) - pixels(batched["image"]).astype(int))
        assert difference.max() <= 1


def test_sweep_with_canny_controlnet(client):
    from gradio_client import handle_file

    grid, info = client.predict(prompt="", seed=2, steps=1, seg_blur_sigmas="1, 16, inf", second_axis="seg_scale",
                                second_axis_values="1, 3", control_type="canny", control_image=handle_file(HOUSE),
                                api_name="/sweep")
    assert len(info["runs"]) == 6 and info["unet_evaluations"] == 6 * 2
    assert info["columns"]["values"] == [1.0, 16.0, "inf"] and info["rows"]["values"] == [1.0, 3.0]
    stored = read_png_settings(grid)
    assert stored["control_type"] == "canny" and stored["control_image_sha256"]
    assert stored["sweep"]["columns"]["values"] == ["1", "16", "inf"]
    width, height = Image.open(grid).size
    assert width > 3 * 64 and height > 2 * 64  # labels around 3 x 2 cells


def test_controlnet_changes_the_image(client):
    from gradio_client import handle_file

    plain, _ = client.predict(prompt="", seed=4, steps=STEPS, api_name="/generate")
    controlled, info = client.predict(prompt="", seed=4, steps=STEPS, control_type="canny",
                                      control_image=handle_file(HOUSE), controlnet_conditioning_scale=1.5,
                                      api_name="/generate")
    assert info["settings"]["control_type"] == "canny"
    assert not np.array_equal(pixels(plain), pixels(controlled))


def test_every_control_type_and_a_second_control_through_the_api(client):
    """Each control type runs on the tiny model (its random ControlNet and detector); a second control,
    its scale and window reach the PNG, and the detector knobs change the map (and so the image)."""
    from gradio_client import handle_file

    pixels = lambda path: np.asarray(Image.open(path))  # noqa: E731
    for control_type in ("canny", "lineart", "softedge", "openpose"):
        path, info = client.predict(prompt="", seed=4, steps=1, control_type=control_type,
                                    control_image=handle_file(HOUSE), detect_resolution=128, api_name="/generate")
        assert info["settings"]["control_type"] == control_type
    one, _ = client.predict(prompt="", seed=4, steps=STEPS, control_type="canny", control_image=handle_file(HOUSE),
                            api_name="/generate")
    two, info = client.predict(prompt="", seed=4, steps=STEPS, control_type="canny", control_image=handle_file(HOUSE),
                               control_type_2="softedge", control_image_2=handle_file("assets/control_rings.png"),
                               controlnet_conditioning_scale_2=0.6, control_guidance_end_2=0.5,
                               control_preprocess_2=False, api_name="/generate")
    stored = read_png_settings(two)
    assert (stored["control_type_2"], stored["controlnet_conditioning_scale_2"], stored["control_guidance_end_2"],
            stored["control_preprocess_2"]) == ("softedge", 0.6, 0.5, False)
    assert not np.array_equal(pixels(one), pixels(two))
    strict, _ = client.predict(prompt="", seed=4, steps=STEPS, control_type="canny", control_image=handle_file(HOUSE),
                               canny_low_threshold=250, canny_high_threshold=255, api_name="/generate")
    assert not np.array_equal(pixels(one), pixels(strict))
    images, infos = client.predict(prompt="", seed=4, steps=1, control_type="openpose",
                                   control_image=handle_file(HOUSE), control_type_2="canny",
                                   control_image_2=handle_file(HOUSE), api_name="/compare")
    assert len(images) == 4


@pytest.mark.parametrize("bad, named", [
    (dict(control_type_2="canny"), "control_type_2 ('canny') needs a first control_type"),
    (dict(control_type="canny", control_type_2="canny"), "control_image"),
    (dict(detect_resolution=10), "detect_resolution must be an integer in [64, 2048], got 10"),
    (dict(canny_low_threshold=300), "low_threshold must be an integer in [0, 255], got 300"),
    (dict(controlnet_conditioning_scale_2=11), "controlnet_conditioning_scale_2"),
    (dict(control_guidance_start_2=0.9, control_guidance_end_2=0.1), "control_guidance_2"),
])
def test_second_control_and_knob_errors_are_named(client, bad, named):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        client.predict(**{"prompt": "x", "steps": 1, **bad}, api_name="/generate")
    assert named in str(error.value)


@pytest.mark.parametrize("bad, named", [
    (dict(width=60), "60"),
    (dict(seg_blur_sigma="abc"), "'abc'"),
    (dict(seg_scale=-1), "-1"),
    (dict(steps=0), "steps must be an integer in [1, 150], got 0"),
    (dict(control_type="canny"), "control_image"),
    (dict(control_type="sketch"), "'sketch'"),
    (dict(seg_applied_layers=["middle"]), "middle"),
])
def test_bad_input_gives_an_error_naming_the_value(client, bad, named):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        client.predict(**{"prompt": "x", "steps": 1, **bad}, api_name="/generate")
    assert named in str(error.value)


def test_depth_runs_offline_on_the_small_models(client):
    """Every control type is selectable offline: depth gets a seeded random estimator there, as the offline
    models' other detectors and ControlNets get random weights."""
    from gradio_client import handle_file

    path, info = client.predict(prompt="x", steps=1, control_type="depth", control_image=handle_file(HOUSE),
                                api_name="/generate")
    assert info["settings"]["control_type"] == "depth" and info["settings"]["control_image_sha256"]


def test_sweep_bad_values_are_named(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="'abc'"):
        client.predict(prompt="x", steps=1, seg_blur_sigmas="1, abc", api_name="/sweep")
    with pytest.raises(AppError, match="'cfg'"):
        client.predict(prompt="x", steps=1, second_axis="cfg", second_axis_values="1", api_name="/sweep")


# ---- the service without a server -------------------------------------------------------------------


def test_unavailable_model_falls_back_to_the_embedded_model_with_a_banner():
    missing = "no-such-user/no-such-sdxl"  # fails fast offline and online, whatever the local cache holds
    studio = Studio(missing)
    assert studio.model == "embedded" and studio.load_error
    assert missing in studio.banner and "trained on" in studio.banner and "coloured shapes" in studio.banner
    assert studio.size_presets == [(32, 32)] and studio.profile.guidance_scale == 5.0
    run, _ = studio.generate(studio.settings(prompt="a red square on a white background", seed=1, steps=8,
                                             width=32, height=32, guidance_scale=5.0))
    assert run.image.size == (32, 32) and run.settings.model == "embedded"
    with pytest.raises(Exception):
        Studio(missing, fallback=None)
    tiny = Studio(missing, fallback="tiny")
    assert tiny.model == "tiny" and "random weights" in tiny.banner and tiny.size_presets[0] == (64, 64)


def test_unet_counter_divides_rows_by_images_per_call():
    import torch

    class Net(torch.nn.Module):
        def forward(self, sample, t=None):
            return sample

    module = Net()
    with UNetCounter(module, images_per_call=2) as counter:
        module(torch.zeros(6, 1))
        module(sample=torch.zeros(4, 1))
    module(torch.zeros(6, 1))  # after the block: not counted
    assert counter.evaluations == 5


def test_parsing_helpers():
    assert parse_sigma("inf") == math.inf and parse_sigma(10000) == math.inf and parse_sigma("4") == 4.0
    assert parse_values("1, 4; inf", "x", parse_sigma) == [1.0, 4.0, math.inf]
    assert parse_values("['1', '2']", "x") == [1.0, 2.0]
    for bad in ("-1", "nan", "x"):
        with pytest.raises(ValueError, match="seg_blur_sigma"):
            parse_sigma(bad)
    with pytest.raises(ValueError, match="at least one"):
        parse_values(" , ", "x")


def test_labelled_grid_layout():
    cell = Image.new("RGB", (64, 32), "red")
    grid = labelled_grid([[cell] * 3] * 2, ["a", "b", "c"], ["row 1", "row 2"], title="t")
    assert grid.width > 3 * 160 and grid.height > 2 * 80  # cells enlarged to at least 160 px wide
    assert grid.getpixel((grid.width - 20, grid.height - 20)) == (255, 0, 0)  # the last cell, bottom right


def test_gpu_decorator_is_a_no_op_without_spaces_and_uses_it_when_present(monkeypatch):
    def f(x):
        return x + 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails
    assert GPU(f) is f and GPU(duration=60)(f) is f and GPU()(f) is f

    calls = []

    def fake_gpu(fn=None, duration=None):
        if fn is None:
            return lambda g: (calls.append(("with", duration)), g)[1]
        calls.append(("bare", None))
        return fn

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    assert GPU(f)(1) == 2 and GPU(duration=60)(f)(1) == 2
    assert calls == [("bare", None), ("with", 60)]


def test_settings_roundtrip_through_json():
    from seg_core.studio import Settings

    settings = Settings(prompt="p", seed=3, seg_blur_sigma=math.inf, seg_applied_layers=["mid", "u0"])
    again = Settings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings


def test_progress_counts_every_step_of_a_request_and_one_lock_per_model():
    from seg_core.studio import model_lock

    demo, _ = running_demo()
    studio = demo.studio
    assert studio.lock is model_lock("tiny")
    assert demo._queue.max_size is not None
    calls = []
    studio.compare(studio.settings(prompt="", seed=0, steps=2), progress=lambda *call: calls.append(call))
    assert [done for done, _, _ in calls] == list(range(1, 9)) and {total for _, total, _ in calls} == {8}
    assert calls[0][2] == "Vanilla" and calls[-1][2].startswith("SEG")


# ---- the demo's images equal direct library calls (no setting dropped on the way) -------------------


def library_call(client_demo, control_type="none", **kwargs):
    from app_server import library_image

    return library_image(client_demo.studio.pipeline(control_type), **kwargs)


#: A setting of every kind away from its default (σ finite, non-square size, layers, interval, ControlNet).
EVERY_SETTING = dict(prompt="a corgi", negative_prompt="blurry", seed=11, steps=3, width=72, height=56,
                     guidance_scale=2.5, seg_scale=2.0, seg_blur_sigma=4.0, seg_applied_layers=["mid", "u1"],
                     perturbation_guidance_start=0.3, perturbation_guidance_end=0.9,
                     controlnet_conditioning_scale=0.7)


def _library_kwargs(**settings):
    kwargs = dict(settings)
    kwargs["num_inference_steps"] = kwargs.pop("steps")
    kwargs.setdefault("pag_applied_layers", kwargs["seg_applied_layers"])
    return kwargs


def test_generate_equals_a_direct_library_call_pixel_for_pixel(client):
    from gradio_client import handle_file

    demo, _ = running_demo()
    path, _ = client.predict(**EVERY_SETTING, pag_scale=1.5, control_type="canny", control_image=handle_file(HOUSE),
                             api_name="/generate")
    expected = library_call(demo, "canny", control_image=HOUSE, pag_scale=1.5, **_library_kwargs(**EVERY_SETTING))
    assert np.array_equal(pixels(path), expected)
    # Each setting reaches the pipeline: changing it alone changes the image.
    for name, value in (("seg_blur_sigma", "inf"), ("perturbation_guidance_start", 0.0), ("seg_applied_layers", ["mid"]),
                        ("negative_prompt", ""), ("controlnet_conditioning_scale", 1.2)):
        other, _ = client.predict(**{**EVERY_SETTING, name: value}, pag_scale=1.5, control_type="canny",
                                  control_image=handle_file(HOUSE), api_name="/generate")
        assert not np.array_equal(pixels(other), expected), name


def test_every_compare_method_equals_a_direct_library_call(client):
    from gradio_client import handle_file

    demo, _ = running_demo()
    gallery, runs = client.predict(**EVERY_SETTING, sag_scale=0.8, pag_scale=2.5, control_type="canny",
                                   control_image=handle_file(HOUSE), api_name="/compare")
    base = _library_kwargs(**EVERY_SETTING)
    methods = [dict(seg_scale=0.0), dict(seg_scale=0.0, sag_scale=0.8), dict(seg_scale=0.0, pag_scale=2.5), {}]
    for item, change in zip(gallery, methods):
        expected = library_call(demo, "canny", control_image=HOUSE, **{**base, **change})
        assert np.array_equal(pixels(item["image"]), expected), item["caption"]


def test_a_sweep_cell_equals_a_direct_library_call(client):
    from app_server import grid_cells

    demo, _ = running_demo()
    settings = {k: v for k, v in EVERY_SETTING.items() if k not in ("seg_blur_sigma", "controlnet_conditioning_scale")}
    grid, info = client.predict(**settings, seg_blur_sigmas="2, inf", api_name="/sweep")
    base = _library_kwargs(**settings)
    expected = [[library_call(demo, seg_blur_sigma=sigma, **base) for sigma in (2.0, float("inf"))]]
    shown, drawn = grid_cells(pixels(grid), expected)
    assert shown.size > 2 * 64 * 3 and np.array_equal(shown, drawn)
    parameters = Image.open(grid).info["parameters"]
    assert "Sweep columns: seg_blur_sigma = 2, inf" in parameters


def test_several_images_per_request_are_the_images_of_consecutive_seeds():
    from seg_core.studio import Limits

    demo, _ = running_demo()
    studio = demo.studio
    assert studio.max_images == Limits().max_images  # a small model on a CPU: allowed
    runs, _ = studio.generate_images(studio.settings(prompt="x", seed=5, steps=STEPS), 3)
    assert [run.settings.seed for run in runs] == [5, 6, 7]
    for run in runs:
        alone, _ = studio.generate(studio.settings(prompt="x", seed=run.settings.seed, steps=STEPS))
        assert np.array_equal(pixels(run.path), pixels(alone.path))
    with pytest.raises(ValueError, match=r"images must be an integer in \[1, 4\] here, got 5"):
        studio.generate_images(studio.settings(prompt="x", seed=5, steps=STEPS), 5)
    with pytest.raises(ValueError, match="max_images must be a positive integer, got 0"):
        Limits(max_images=0)
    assert studio.gpu_seconds("generate", studio.settings(steps=50), images=4) > studio.gpu_seconds(
        "generate", studio.settings(steps=50))


def test_compare_scales_left_out_are_the_model_profiles():
    """Compare's SAG and PAG scales default to the model's profile (the embedded model's from its sweep),
    in the studio and in the API spec alike."""
    studio = Studio("embedded", fallback=None)
    runs, _ = studio.compare(studio.settings(prompt="", seed=0, steps=1))
    profile = studio.profile
    assert (profile.sag_scale, profile.pag_scale) != (1.0, 3.0)  # else this test could not tell
    assert [run.settings.sag_scale for run in runs][1] == profile.sag_scale
    assert [run.settings.pag_scale for run in runs][2] == profile.pag_scale


def test_settings_left_null_are_the_models_defaults():
    """A raw API request may send null for a setting it leaves out: the model's default, as when omitted."""
    studio = Studio("embedded", fallback=None)
    nulls = studio.settings(prompt="", seed=0, steps=None, width=None, height=None, guidance_scale=None)
    omitted = studio.settings(prompt="", seed=0)
    assert (nulls.width, nulls.height, nulls.steps) == (omitted.width, omitted.height, omitted.steps)
    assert (nulls.width, nulls.height) == studio.size_presets[0] != (1024, 1024)


@pytest.mark.parametrize("queue_size", [0, True, 2.5, 10**6])
def test_a_bad_queue_size_is_refused_before_any_model_loads(queue_size, monkeypatch):
    import app

    monkeypatch.setattr(app, "Studio", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"queue_size must be an integer in \[1, 10000\]"):
        app.build_demo("tiny", queue_size=queue_size)
