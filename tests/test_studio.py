"""The service's one sources (issue 12): a request's values are checked once with the options' rules and the
operator's limits, what it leaves out comes from the model's profile, and its UNet rows are counted one way."""

import math

import pytest

from seg_core.models import EMBEDDED, TINY
from seg_core.options import OPTIONS
from seg_core.studio import Limits, Settings, Studio
from seg_core.zerogpu import evaluations_per_step


@pytest.fixture(scope="module")
def tiny():
    return Studio("tiny", fallback=None, limits=Limits(max_steps=12, max_prompt_chars=40))


def test_a_settings_field_defaults_to_its_option():
    settings = Settings()
    assert settings.guidance_scale == OPTIONS["guidance_scale"].default == 5.0
    assert settings.seg_applied_layers == ["mid"] and settings.seg_applied_layers is not Settings().seg_applied_layers
    assert (settings.detect_resolution, settings.canny_high_threshold) == (512, 200)


def test_what_a_request_leaves_out_is_the_models_then_the_options(tiny):
    settings = tiny.settings(seed=1, guidance_scale=None)
    assert (settings.width, settings.height) == TINY.sizes[0] and settings.steps == TINY.steps
    assert settings.guidance_scale == TINY.guidance_scale != OPTIONS["guidance_scale"].default
    assert settings.pag_scale == 0.0 != TINY.pag_scale  # the profile's PAG scale is Compare's, not a default
    assert settings.control_type == "none" and tiny.settings(control_type="").control_type == "none"
    embedded = Studio("embedded", fallback=None)
    assert embedded.settings(seed=0).seg_scale == EMBEDDED.seg_scale == 1.0


def test_each_value_is_normalised_and_the_operator_narrows_the_options(tiny):
    settings = tiny.settings(seed=2.0, steps=3.0, detect_resolution=256.0, seg_blur_sigma="1e5",
                             seg_applied_layers="mid, m0")
    assert (settings.seed, settings.steps, settings.detect_resolution) == (2, 3, 256)
    assert type(settings.steps) is int and math.isinf(settings.seg_blur_sigma)
    assert settings.seg_applied_layers == ["mid", "m0"]
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 12\], got 13"):
        tiny.settings(steps=13)
    with pytest.raises(ValueError, match=r"negative_prompt must be at most 40 characters, got 41"):
        tiny.settings(negative_prompt="x" * 41)
    with pytest.raises(ValueError, match=r"control_guidance_2_start \(0.5\) must be below control_guidance_2_end"):
        tiny.settings(control_guidance_start_2=0.5, control_guidance_end_2=0.5)
    with pytest.raises(ValueError, match=r"low_threshold \(201\) must not exceed high_threshold \(200\)"):
        tiny.settings(canny_low_threshold=201)
    with pytest.raises(TypeError, match="unknown settings: \\['sead'\\]"):
        tiny.settings(sead=3)


def test_request_rows_gpu_work_and_the_counted_evaluations_agree(tiny):
    settings = tiny.settings(seed=0, steps=2, guidance_scale=5.0, seg_scale=3.0, pag_scale=2.0)
    assert tiny.request_rows(settings) == evaluations_per_step(5.0, 3.0, 2.0) == 4
    assert tiny.request_rows(settings, images=3) == 3 * 2 + 2
    run, _ = tiny.generate(settings)
    assert run.unet_evaluations == settings.steps * tiny.request_rows(settings)
    with_sag = tiny.settings(seed=0, steps=2, guidance_scale=1.0, sag_scale=1.0)
    run, _ = tiny.generate(with_sag)
    assert run.unet_evaluations == 2 * evaluations_per_step(1.0, with_sag.seg_scale, 0.0, 1.0) == 2 * 3


def test_depth_without_its_estimator_is_unavailable_with_its_reason(monkeypatch):
    """On a real model (Hub weights) offline and without the estimator cached, depth is left out of the
    control types and a request for it gets the reason; the small offline models use a random one."""
    from seg_core.studio import loading

    studio = Studio("tiny", fallback=None)
    assert "depth" in studio.control_types  # the offline model: a random estimator
    monkeypatch.setattr(loading.Pipelines, "detector_weights", property(lambda self: None))
    monkeypatch.setattr(loading, "depth_available", lambda: False)
    pipelines = loading.Pipelines("tiny")
    pipelines.get("none")
    pipelines.preload()
    assert "depth" not in pipelines.control_types
    with pytest.raises(RuntimeError, match=r"depth needs its estimator's weights \(Intel/dpt-hybrid-midas\)"):
        pipelines.get("depth")


def test_compare_checks_one_loop_itself(tiny):
    with pytest.raises(ValueError, match="one_loop must be true or false, got 'yes'"):
        tiny.compare(tiny.settings(prompt="x", steps=1), one_loop="yes")
