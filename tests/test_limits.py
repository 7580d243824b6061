"""S3 (issue 10): per-model limits from the model's geometry, its training sizes and the memory budget,
and a request at each model's largest allowed size measured against the budget."""

import json
import os
import subprocess
import sys

import pytest

from seg_core.limits import TRAINED_AREA_FACTOR, Geometry, ModelLimits
from seg_core.studio import Limits, Studio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDXL = Geometry(vae_factor=8, unet_channels=(320, 640, 1280), vae_channels=(128, 256, 512, 512), mid_heads=20,
                bytes_per_value=2)


@pytest.fixture(scope="module")
def tiny():
    return Studio("tiny", fallback=None)


def test_geometry_is_read_from_the_pipeline(tiny):
    geometry = tiny.model_limits.geometry
    assert (geometry.vae_factor, geometry.unet_channels, geometry.mid_heads) == (2, (32, 64), 4)
    # Token grids: the image over (VAE factor x 2^level); the mid block is the coarsest level.
    assert geometry.token_grid(64, 96, 0) == (48, 32) and geometry.token_grid(64, 96, 1) == (24, 16)
    assert geometry.mid_tokens(64, 64) == 256 and SDXL.mid_tokens(1024, 1024) == 32 * 32
    # SAG's map grows with side^4: twice the side, 16 times the memory.
    assert geometry.sag_map_bytes(128, 128, 1) == 16 * geometry.sag_map_bytes(64, 64, 1)
    assert geometry.activation_bytes(128, 128, 3) < 4 * geometry.activation_bytes(64, 64, 3)


def test_sizes_follow_the_training_sizes_and_the_operators_limit(tiny):
    assert tiny.model_limits.trained_pixels == 64 * 64
    assert tiny.model_limits.max_pixels == TRAINED_AREA_FACTOR * 64 * 64 == 128 * 128
    embedded = Studio("embedded", fallback=None)
    assert embedded.model_limits.max_pixels == 64 * 64  # trained at 32x32
    with pytest.raises(ValueError, match=r"at most 4096 pixels \(64x64\) for this model on this server "
                                         r"\(4x the area of its largest training size\), got 512x512"):
        embedded.settings(prompt="x", width=512, height=512)
    sdxl = ModelLimits(SDXL, 1024 * 1024, 24 * 2**30, Limits().max_pixels)
    assert sdxl.max_pixels == 2048 * 2048 and sdxl.sag_max_pixels == 2048 * 2048
    # The default budget holds every SDXL training size, not 2048x2048 (the VAE decoder at full size).
    sdxl = ModelLimits(SDXL, 1024 * 1024, int(Limits().memory_budget_gb * 2**30), Limits().max_pixels)
    assert 1024 * 1024 <= sdxl.sag_max_pixels <= sdxl.max_pixels < 2048 * 2048
    operator = Studio("tiny", fallback=None, limits=Limits(max_pixels=72 * 72))
    with pytest.raises(ValueError, match=r"\(the operator's --max-pixels\), got 80x80"):
        operator.settings(prompt="x", width=80, height=80)


def test_sag_is_refused_where_its_map_exceeds_the_budget_naming_the_limit():
    # The embedded model's geometry, allowed as far as 1024x1024 by its training sizes: SAG's map limits it.
    embedded = Geometry(vae_factor=2, unet_channels=(32, 64), vae_channels=(32, 64), mid_heads=4, bytes_per_value=4)
    limits = ModelLimits(embedded, 512 * 512, 8 * 2**30, 2048 * 2048)
    assert limits.max_pixels == 1024 * 1024
    assert 256 * 256 < limits.sag_max_pixels < 512 * 512  # the 10 GB at 512x512
    limits.check(256, 256, rows=3, sag_images=1)
    limits.check(512, 512, rows=3)  # the other methods do fit
    side = int(limits.sag_max_pixels ** 0.5)
    with pytest.raises(ValueError) as error:
        limits.check(512, 512, rows=2, sag_images=1)
    message = str(error.value)
    assert "SAG at 512x512 needs about 12.00 GB for its attention map ((16384 mid-block tokens)^2 x 4 heads)" in message
    assert f"memory budget of 8.00 GB per request; SAG runs at most {side * side} pixels ({side}x{side})" in message
    small = ModelLimits(embedded, 512 * 512, 256 * 2**20, 2048 * 2048)
    assert small.max_pixels < 512 * 512
    with pytest.raises(ValueError, match=r"memory budget of 256 MB per request\), got 512x512"):
        small.check(512, 512, rows=3)


def test_requests_with_more_rows_are_checked_against_the_budget(tiny):
    budget = Studio("tiny", fallback=None, limits=Limits(memory_budget_gb=0.05))
    side = int(budget.model_limits.max_pixels ** 0.5)
    assert 64 <= side < 128
    budget.settings(prompt="x", width=side, height=side, guidance_scale=5.0)
    with pytest.raises(ValueError, match=r"4 batch rows\) needs about \d+ MB, over this server's memory budget"):
        budget.settings(prompt="x", width=side, height=side, guidance_scale=5.0, pag_scale=3.0,
                        control_type="canny")


def test_peak_memory_at_each_models_largest_size_stays_within_the_budget():
    """Measured in a fresh process (bench/request_memory.py): the peak of one request above what the
    process held before it, for every method at the largest size the model allows, under a small budget."""
    budget_gb = 0.1
    output = subprocess.run([sys.executable, "bench/request_memory.py", "--budget-gb", str(budget_gb)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    results = json.loads(output.strip().splitlines()[-1])
    assert {(r["model"], r["method"]) for r in results} >= {(m, k) for m in ("tiny", "embedded")
                                                            for k in ("vanilla", "SEG", "PAG", "SAG")}
    for result in results:
        assert result["budget_bytes"] == int(budget_gb * 2**30)
        assert result["peak_bytes"] <= result["estimate_bytes"] <= result["budget_bytes"], result
