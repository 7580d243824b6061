"""What a Hugging Face Space reads: the README front matter, the pins, the license; and the model the app
starts on, everything it loads before launch(), and the launch options."""

import os
import re

import torch
import yaml

from seg_core.presets import HUB_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hub-docs, docs/hub/spaces-config-reference.md and spaces-zerogpu.md at commit 242f4a1 (2026-08-22).
CONFIG_KEYS = {"title", "emoji", "colorFrom", "colorTo", "sdk", "python_version", "sdk_version",
               "suggested_hardware", "suggested_storage", "app_file", "app_build_command", "app_port", "base_path",
               "fullWidth", "header", "short_description", "models", "datasets", "tags", "thumbnail", "pinned",
               "hf_oauth", "hf_oauth_scopes", "hf_oauth_expiration_minutes", "hf_oauth_authorized_org",
               "disable_embedding", "startup_duration_timeout", "custom_headers", "preload_from_hub",
               "license"}  # license: the Hub's repository card metadata (repositories-licenses.md)
COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4", "l40sx8",
            "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4", "a100x8"}
ZEROGPU_PYTHON = {"3.10", "3.12"}
ZEROGPU_TORCH = {"2.8.0", "2.9.1", "2.10.0", "2.11.0"}


def front_matter() -> dict:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        text = file.read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def test_front_matter_holds_only_documented_keys_and_valid_values():
    meta = front_matter()
    assert set(meta) <= CONFIG_KEYS, set(meta) - CONFIG_KEYS
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["colorFrom"] in COLORS and meta["colorTo"] in COLORS
    assert isinstance(meta["python_version"], str) and meta["python_version"] in ZEROGPU_PYTHON
    assert meta.get("suggested_hardware", "cpu-basic") in HARDWARE
    import gradio

    assert meta["sdk_version"] == gradio.__version__  # the version the tests ran on
    assert meta["license"] == "mit" and os.path.isfile(os.path.join(ROOT, "LICENSE"))
    assert len(meta["short_description"]) <= 60


def test_preload_from_hub_lists_exactly_the_files_the_app_loads():
    entries = dict(line.split(" ", 1) for line in front_matter()["preload_from_hub"])
    assert {repo: files.split(",") for repo, files in entries.items()} == HUB_FILES
    assert set(HUB_FILES) <= set(front_matter()["models"])


def test_torch_is_pinned_to_a_zerogpu_version_and_the_tests_run_on_it():
    with open(os.path.join(ROOT, "requirements.txt")) as file:
        pins = dict(re.findall(r"^(torch|torchvision)==(\S+)", file.read(), re.M))
    assert pins["torch"] in ZEROGPU_TORCH
    assert torch.__version__.split("+")[0] == pins["torch"]


def test_without_a_gpu_the_app_starts_on_the_embedded_model_and_says_how_to_force_sdxl(monkeypatch):
    from seg_core.presets import model_for_hardware

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    model, notice = model_for_hardware()
    assert model == "embedded" and "--model sdxl" in notice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_for_hardware() == ("sdxl", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert model_for_hardware() == ("sdxl", None)


def test_main_launches_auto_with_every_model_loaded_and_share_left_to_gradio_share(monkeypatch):
    import gradio as gr

    import app

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launched = {}

    def fake_launch(demo, **options):
        launched.update(options, pipes=set(demo.studio._pipes), banner=demo.studio.banner)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    app.main([])
    assert launched["share"] is None  # not False: $GRADIO_SHARE still decides
    # Loaded before launch(), depth too (a random estimator, as the offline model's other detectors);
    # "union" serves soft edges and any two controls.
    assert launched["pipes"] == {"none", "canny", "lineart", "depth", "openpose", "union"}
    assert "No GPU here" in launched["banner"] and "--model sdxl" in launched["banner"]
    app.main(["--model", "tiny", "--share"])
    assert launched["share"] is True


def test_pixelated_rendering_only_for_small_models(monkeypatch):
    from app import PIXELATED_STYLE, build_demo
    from seg_core.studio import SDXL_PROFILE, Studio

    def has_style(demo):
        return any(getattr(block, "value", None) == PIXELATED_STYLE for block in demo.blocks.values())

    assert has_style(build_demo("tiny"))
    monkeypatch.setattr(Studio, "profile", property(lambda self: SDXL_PROFILE))  # SDXL's sizes and steps
    assert not has_style(build_demo(studio=Studio("tiny", fallback=None)))


def component(demo, elem_id):
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_the_page_shows_examples_rendered_ahead_about_citation_license_and_duplicate_hint(monkeypatch):
    import numpy as np
    from PIL import Image

    from app import build_demo
    from seg_core.space import ABOUT, CITATION, rendered_examples
    from seg_core.studio import read_png_settings

    monkeypatch.setenv("SPACE_ID", "someone/seg-sdxl")
    demo = build_demo("embedded")
    rendered = rendered_examples("embedded")
    assert len(rendered) == 13 and rendered[-1]["prompt"] == ""  # the model's prompts, then unconditional
    gallery = component(demo, "compare-gallery").value
    assert [item["caption"].split(" ")[0] for item in gallery] == ["Vanilla", "SAG", "PAG", "SEG"]
    assert component(demo, "example-preview").value is not None
    values = [getattr(block, "value", None) for block in demo.blocks.values()]
    assert ABOUT.strip() in values and CITATION in values and any("MIT-licensed" in str(v) for v in values)
    assert any("spaces/someone/seg-sdxl?duplicate=true" in str(v) for v in values)
    assert any(type(block).__name__ == "DuplicateButton" for block in demo.blocks.values())

    # The shipped results are what Compare gives for the same request today (to a rounding step: machines differ).
    first = rendered[0]
    for path, label in first["images"]:
        stored = read_png_settings(path)
        assert stored["seed"] == first["seed"] and stored["prompt"] == first["prompt"] and stored["model"] == "embedded"
    studio = demo.studio
    runs, _ = studio.compare(studio.settings(prompt=first["prompt"], guidance_scale=first["guidance_scale"],
                                             seed=first["seed"], steps=first["steps"]), None,
                                 studio.profile.sag_scale, studio.profile.pag_scale)
    for (path, label), run in zip(first["images"], runs, strict=True):
        assert label == run.label
        with Image.open(path) as shipped:
            difference = np.abs(np.asarray(shipped, dtype=int) - np.asarray(run.image, dtype=int))
        assert difference.max() <= 3, label


def test_without_a_space_id_there_is_no_duplicate_button(monkeypatch):
    from app import build_demo

    monkeypatch.delenv("SPACE_ID", raising=False)
    demo = build_demo("tiny")
    assert not any(type(block).__name__ == "DuplicateButton" for block in demo.blocks.values())


def test_one_image_per_request_for_sdxl_on_a_cpu(monkeypatch):
    from app import build_demo
    from seg_core.studio import Studio

    studio = Studio("tiny", fallback=None)
    studio.model = "stabilityai/stable-diffusion-xl-base-1.0"  # an SDXL-sized model, here on a CPU
    assert studio.max_images == 1
    demo = build_demo(studio=studio)
    assert component(demo, "num-images").visible is False
