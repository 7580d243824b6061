"""The blur: exact to the authors' 2-D convolution, on square and non-square grids."""

import math

import pytest
import torch

from reference import authors_kernel_size, reference_blur_2d
from seg_core.blur import blur_image, blur_matrices, blur_tokens, is_infinite_sigma, paper_kernel_size


def as_tokens(img):
    b, c, h, w = img.shape
    return img.permute(0, 2, 3, 1).reshape(b, h * w, c)


def as_image(tokens, h, w):
    b, n, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("sigma, width, expected", [(1.0, 32, 7), (0.5, 32, 3), (10.0, 32, 33), (10.0, 31, 31),
                                                    (2.0, 64, 13), (0.1, 8, 1), (3.0, 9, 9)])
def test_kernel_size_follows_authors_rule(sigma, width, expected):
    assert paper_kernel_size(sigma, width) == expected == authors_kernel_size(sigma, width)


def test_infinite_threshold():
    assert not is_infinite_sigma(9999.0)
    assert is_infinite_sigma(9999.5)
    assert is_infinite_sigma(math.inf)


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (13, 13), (26, 38), (38, 26), (20, 48), (5, 12), (1, 7)])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5, 10.0, 64.0, math.inf])
def test_separable_blur_matches_2d_convolution(grid, sigma):
    h, w = grid
    img = torch.randn(2, 6, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * 100 + w))
    ours = as_image(blur_tokens(as_tokens(img), grid, sigma), h, w)
    reference = reference_blur_2d(img, sigma)  # a side of 1 clamps its kernel to 1 tap
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_both_axes_are_blurred_on_non_square_grids():
    h, w = 6, 10
    impulse = torch.zeros(1, h * w, 1, dtype=torch.float64)
    impulse[0, 3 * w + 5, 0] = 1.0
    out = blur_tokens(impulse, (h, w), 1.0).reshape(h, w)
    assert out[2, 5] > 0 and out[4, 5] > 0  # along H
    assert out[3, 4] > 0 and out[3, 6] > 0  # along W
    torch.testing.assert_close(out[2, 5], out[3, 4])  # the same Gaussian on both axes


def test_blur_keeps_constants_and_sigma_zero_is_identity():
    x = torch.randn(3, 12 * 7, 5)
    torch.testing.assert_close(blur_tokens(x, (12, 7), 0.0), x)
    const = torch.full((1, 12 * 7, 2), 3.25)
    for sigma in (0.7, 3.0, 50.0, math.inf):
        torch.testing.assert_close(blur_tokens(const, (12, 7), sigma), const)
        torch.testing.assert_close(blur_tokens(const, (12, 7), sigma, "untruncated"), const)


def test_infinite_sigma_is_mean_and_differs_from_finite():
    x = torch.randn(2, 64, 4, dtype=torch.float64)
    inf = blur_tokens(x, (8, 8), math.inf)
    torch.testing.assert_close(inf, x.mean(dim=1, keepdim=True).expand_as(x))
    assert (blur_tokens(x, (8, 8), 10.0) - inf).abs().max() > 1e-3  # the authors' clamp: no continuity


def test_untruncated_kernel_tends_to_the_mean_and_is_resolution_consistent():
    x = torch.randn(1, 12 * 20, 3, dtype=torch.float64)
    mean = x.mean(dim=1, keepdim=True).expand_as(x)
    gaps = [(blur_tokens(x, (12, 20), s, "untruncated") - mean).abs().max().item() for s in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-10
    # Away from the borders the untruncated kernel is the plain Gaussian, whatever the grid size.
    small, large = blur_matrices((1, 40), 2.0, "untruncated")[1], blur_matrices((1, 80), 2.0, "untruncated")[1]
    torch.testing.assert_close(small[20, 10:31], large[40, 30:51], rtol=1e-6, atol=1e-9)


def test_sag_blur_matches_reference_kernel_9():
    img = torch.randn(1, 4, 24, 16, dtype=torch.float64)
    from reference import kernel_1d
    import torch.nn.functional as F

    kernel = torch.outer(kernel_1d(1.0, 9, img.dtype), kernel_1d(1.0, 9, img.dtype)).expand(4, 1, 9, 9)
    reference = F.conv2d(F.pad(img, [4, 4, 4, 4], mode="reflect"), kernel, groups=4)
    torch.testing.assert_close(blur_image(img, 1.0, 9), reference, rtol=1e-10, atol=1e-10)
