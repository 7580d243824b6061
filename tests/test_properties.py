"""Property tests (hypothesis) of the pure pieces: the blur, the layer-name parser, the guidance combination."""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from seg_core.attention import resolve_layers, self_attention_layers
from seg_core.blur import BLUR_KERNELS, blur_matrices, blur_tokens
from seg_core.guidance import GuidanceTerm, classifier_free_guidance, guided_prediction, weakened_model_guidance
from seg_core.tiny import tiny_sdxl_components

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

sides = st.integers(min_value=1, max_value=12)
finite_sigmas = st.floats(min_value=0.05, max_value=50.0, allow_nan=False)
kernels = st.sampled_from(BLUR_KERNELS)


def tokens_for(height, width, channels=3, seed=0, lead=(2,)):
    return torch.randn(*lead, height * width, channels, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


# ---- the blur ----------------------------------------------------------------------------------------------


@FAST
@given(height=sides, width=sides, sigma=finite_sigmas, kernel=kernels, seed=st.integers(0, 2**16))
def test_blur_keeps_the_shape_and_the_mean_preserving_rows(height, width, sigma, kernel, seed):
    x = tokens_for(height, width, seed=seed)
    y = blur_tokens(x, (height, width), sigma, kernel)
    assert y.shape == x.shape and torch.isfinite(y).all()
    m_h, m_w = blur_matrices((height, width), sigma, kernel, dtype=torch.float64)
    assert m_h.shape == (height, height) and m_w.shape == (width, width)
    # every row is a weighted average (weights >= 0 summing to 1)
    for m in (m_h, m_w):
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(dim=1), torch.ones(len(m), dtype=torch.float64))


@FAST
@given(height=sides, width=sides, sigma=st.one_of(finite_sigmas, st.just(math.inf), st.just(1e6)),
       kernel=kernels, value=st.floats(-100, 100, allow_nan=False))
def test_a_constant_grid_stays_constant(height, width, sigma, kernel, value):
    x = torch.full((1, height * width, 4), value, dtype=torch.float64)
    torch.testing.assert_close(blur_tokens(x, (height, width), sigma, kernel), x)


@FAST
@given(height=sides, width=sides, kernel=kernels, seed=st.integers(0, 2**16),
       sigma=st.floats(min_value=0.0, max_value=0.05))
def test_sigma_to_zero_is_the_identity(height, width, kernel, seed, sigma):
    x = tokens_for(height, width, seed=seed)
    torch.testing.assert_close(blur_tokens(x, (height, width), 0.0, kernel), x, rtol=0, atol=0)
    # a tiny sigma puts (numerically) all weight on the token itself
    torch.testing.assert_close(blur_tokens(x, (height, width), sigma, kernel), x, rtol=1e-6, atol=1e-6)


@FAST
@given(height=sides, width=sides, kernel=kernels, seed=st.integers(0, 2**16),
       sigma=st.sampled_from([math.inf, 1e4 + 1, 1e9]))
def test_infinite_sigma_is_the_mean_token(height, width, kernel, seed, sigma):
    x = tokens_for(height, width, seed=seed)
    y = blur_tokens(x, (height, width), sigma, kernel)
    torch.testing.assert_close(y, x.mean(dim=-2, keepdim=True).expand_as(x))


@FAST
@given(height=st.integers(2, 12), width=st.integers(2, 12), kernel=kernels, seed=st.integers(0, 2**16),
       sigma=st.floats(min_value=0.3, max_value=20.0))
def test_a_finite_sigma_differs_from_the_infinite_one(height, width, kernel, seed, sigma):
    # The untruncated kernel tends to the mean continuously (that is its point): it differs clearly while
    # sigma is at most half the grid's longer side; the paper's clamped kernel never reaches the mean.
    if kernel == "untruncated":
        sigma = min(sigma, max(height, width) / 2)
    x = tokens_for(height, width, seed=seed)
    finite = blur_tokens(x, (height, width), sigma, kernel)
    infinite = blur_tokens(x, (height, width), math.inf, kernel)
    assert (finite - infinite).abs().max() > 1e-6


@FAST
@given(height=st.integers(1, 12), width=st.integers(1, 12), sigma=finite_sigmas, kernel=kernels)
def test_a_wrong_token_count_is_refused(height, width, sigma, kernel):
    x = torch.zeros(1, height * width + 1, 2)
    with pytest.raises(ValueError, match=f"a {height}x{width} grid has {height * width} tokens"):
        blur_tokens(x, (height, width), sigma, kernel)


# ---- the layer-name parser -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl_components()["unet"]


def _valid_specs(available):
    parts = {"d": "down", "m": "mid", "u": "up"}
    singles = [f"{p}{i}" for p, part in parts.items() for i in range(len(available[part]))]
    return st.sampled_from(["down", "mid", "up", *singles]).flatmap(
        lambda spec: st.sampled_from([spec, spec.upper(), f" {spec} "]))


@FAST
@given(data=st.data())
def test_valid_layer_specs_resolve_to_self_attention_modules(unet, data):
    available = self_attention_layers(unet)
    specs = data.draw(st.lists(_valid_specs(available), min_size=1, max_size=6))
    names = resolve_layers(unet, specs)
    everything = [n for part in ("down", "mid", "up") for n in available[part]]
    assert names and len(names) == len(set(names)) and set(names) <= set(everything)
    # a single name picks one layer; a part name picks all of that part
    for spec in specs:
        key = spec.strip().lower()
        chosen = available[key] if key in available else [available[{"d": "down", "m": "mid", "u": "up"}[key[0]]][int(key[1:])]]
        assert set(chosen) <= set(names)
    assert resolve_layers(unet, specs[0]) == resolve_layers(unet, [specs[0]])  # a bare string works


@FAST
@given(spec=st.text(min_size=1, max_size=12))
def test_invalid_layer_specs_raise_naming_the_spec(unet, spec):
    available = self_attention_layers(unet)
    key = spec.strip().lower()
    match = re.fullmatch(r"([dmu])(\d+)", key)
    is_valid = key in available or (
        match is not None and int(match.group(2)) < len(available[{"d": "down", "m": "mid", "u": "up"}[match.group(1)]])
    )
    assume(not is_valid)
    with pytest.raises(ValueError) as error:
        resolve_layers(unet, ["mid", spec])
    assert repr(spec) in str(error.value) and "allowed" in str(error.value)


@FAST
@given(spec=st.one_of(st.integers(), st.none(), st.floats(allow_nan=True), st.lists(st.text(), max_size=2)))
def test_non_string_layer_specs_raise(unet, spec):
    with pytest.raises(ValueError, match="layer names are strings"):
        resolve_layers(unet, [spec])


def test_empty_layer_list_raises(unet):
    with pytest.raises(ValueError, match="at least one layer"):
        resolve_layers(unet, [])


# ---- the guidance combination ---------------------------------------------------------------------------------

scales = st.floats(min_value=0.0, max_value=20.0, allow_nan=False)


def eps(seed):
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@FAST
@given(seed=st.integers(0, 2**16), w=scales, s=scales)
def test_equation_10_with_and_without_cfg(seed, w, s):
    e_u, e_c, e_s = eps(seed), eps(seed + 1), eps(seed + 2)
    seg = [GuidanceTerm(e_c, e_s, s)]
    torch.testing.assert_close(guided_prediction(e_c, seg, e_u, w), e_u + w * (e_c - e_u) + s * (e_c - e_s))
    torch.testing.assert_close(guided_prediction(e_c, seg), e_c + s * (e_c - e_s))


@FAST
@given(seed=st.integers(0, 2**16), w=scales, s=scales)
def test_guidance_identities(seed, w, s):
    e_u, e_c, e_s = eps(seed), eps(seed + 1), eps(seed + 2)
    # scale 0 leaves the prediction alone; a weak model equal to the reference adds nothing
    torch.testing.assert_close(weakened_model_guidance(e_u, e_c, e_s, 0.0), e_u)
    torch.testing.assert_close(weakened_model_guidance(e_u, e_c, e_c, s), e_u)
    # CFG at w = 1 is the conditional prediction, at w = 0 the unconditional one
    torch.testing.assert_close(classifier_free_guidance(e_u, e_c, 1.0), e_c)
    torch.testing.assert_close(classifier_free_guidance(e_u, e_c, 0.0), e_u)
    # SEG with eps_seg == eps_c is plain CFG
    torch.testing.assert_close(guided_prediction(e_c, [GuidanceTerm(e_c, e_c, s)], e_u, w), classifier_free_guidance(e_u, e_c, w))


@FAST
@given(seed=st.integers(0, 2**16), s1=scales, s2=scales)
def test_guidance_is_linear_in_the_scale(seed, s1, s2):
    e, e_c, e_s = eps(seed), eps(seed + 1), eps(seed + 2)
    twice = weakened_model_guidance(weakened_model_guidance(e, e_c, e_s, s1), e_c, e_s, s2)
    torch.testing.assert_close(twice, weakened_model_guidance(e, e_c, e_s, s1 + s2))
