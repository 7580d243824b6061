"""Gaussian blurs over token grids: the smoothing of SEG (Hong 2024, Sec. 4) and the degradation of SAG.

A 2-D Gaussian blur with reflect padding is separable, so it is applied as two small matrices, one per
axis: ``blurred = M_H @ X @ M_W^T`` on an ``H x W`` grid.  The matrices are built once per
(grid side, sigma, kernel) and cached; applying them costs O(N (H + W) C) instead of the
O(N k^2 C) of a direct 2-D convolution with a ``k x k`` kernel.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

#: The SEG authors treat any sigma above this as infinite (every query becomes the mean query).
INFINITE_SIGMA_THRESHOLD = 9999.0

#: ``"paper"``: the authors' kernel (truncated to ceil(6 sigma)+1 taps, clamped to the grid side,
#: reflect padding), reproduced exactly.  ``"untruncated"``: the full Gaussian over the mirrored grid;
#: the same sigma means the same blur at every resolution, and sigma -> infinity tends to the mean.
BLUR_KERNELS = ("paper", "untruncated")


def is_infinite_sigma(sigma: float) -> bool:
    """True where SEG replaces the blur by the mean over all tokens (above the authors' threshold)."""
    return sigma > INFINITE_SIGMA_THRESHOLD


def paper_kernel_size(sigma: float, length: int) -> int:
    """The authors' kernel size: ceil(6 sigma) + 1 made odd, clamped to ``length - (length % 2 - 1)``."""
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    return min(size, length - (length % 2 - 1))


def gaussian_taps(sigma: float, size: int) -> torch.Tensor:
    """A normalised 1-D Gaussian sampled at ``linspace(-(size-1)/2, (size-1)/2, size)`` (float64)."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def reflect_blur_matrix(length: int, taps: torch.Tensor) -> torch.Tensor:
    """The ``length x length`` matrix of a 1-D convolution with ``taps`` after reflect padding."""
    size = taps.numel()
    pad = size // 2
    if pad > length - 1:
        raise ValueError(f"a {size}-tap kernel needs a side of at least {pad + 1} for reflect padding, got {length}")
    matrix = torch.zeros(length, length, dtype=torch.float64)
    rows = torch.arange(length)
    for offset in range(size):
        source = rows + offset - pad
        source = torch.where(source < 0, -source, source)
        source = torch.where(source > length - 1, 2 * (length - 1) - source, source)
        matrix.index_put_((rows, source), taps[offset].expand(length), accumulate=True)
    return matrix


def untruncated_blur_matrix(length: int, sigma: float) -> torch.Tensor:
    """The full Gaussian over the grid mirrored without repeating its edge (period ``2 * length``).

    Row ``i`` weighs every mirror image of token ``j``; as sigma grows every image weighs the same, so
    each row tends to ``1 / length``: the infinite-sigma mean, reached continuously.
    """
    period = 2 * length
    reach = math.ceil(8 * sigma) + period
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    # wrapped[p] = sum over all integers m of the Gaussian at p + m * period
    wrapped = torch.zeros(period, dtype=torch.float64)
    wrapped.index_add_(0, torch.remainder(offsets.long(), period), weights)
    i = torch.arange(length).view(-1, 1)
    j = torch.arange(length).view(1, -1)
    matrix = wrapped[torch.remainder(i - j, period)] + wrapped[torch.remainder(i + j + 1, period)]
    return matrix / matrix.sum(dim=1, keepdim=True)


@lru_cache(maxsize=256)
def _axis_matrix(length: int, sigma: float, kernel: str) -> torch.Tensor:
    if sigma == 0 or length == 1:
        return torch.eye(length, dtype=torch.float64)
    if is_infinite_sigma(sigma):  # every token the mean (blur_tokens takes the mean directly)
        return torch.full((length, length), 1.0 / length, dtype=torch.float64)
    if kernel == "paper":
        return reflect_blur_matrix(length, gaussian_taps(sigma, paper_kernel_size(sigma, length)))
    if kernel == "untruncated":
        return untruncated_blur_matrix(length, sigma)
    raise ValueError(f"unknown blur kernel {kernel!r}: expected one of {BLUR_KERNELS}")


@lru_cache(maxsize=256)
def _axis_matrix_on(length: int, sigma: float, kernel: str, device: torch.device, dtype: torch.dtype):
    return _axis_matrix(length, sigma, kernel).to(device=device, dtype=dtype)


def blur_matrices(grid: tuple[int, int], sigma: float, kernel: str = "paper", *, device=None, dtype=None):
    """(M_H, M_W) such that blurring an ``H x W`` grid is ``M_H @ X @ M_W^T``.

    With the paper kernel each axis clamps the kernel to its own side, which on square grids is exactly
    the authors' rule (they clamp to the width).
    """
    height, width = grid
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.float32
    return (
        _axis_matrix_on(height, float(sigma), kernel, device, dtype),
        _axis_matrix_on(width, float(sigma), kernel, device, dtype),
    )


def blur_tokens(tokens: torch.Tensor, grid: tuple[int, int], sigma: float, kernel: str = "paper") -> torch.Tensor:
    """Blur ``(..., H*W, C)`` tokens over their row-major ``H x W`` grid, every channel alike.

    sigma 0 is the identity; an infinite sigma (:func:`is_infinite_sigma`) gives every token the mean over all
    tokens.
    """
    *lead, num_tokens, channels = tokens.shape
    height, width = grid
    if height * width != num_tokens:
        raise ValueError(f"a {height}x{width} grid has {height * width} tokens, got {num_tokens}")
    if is_infinite_sigma(sigma):
        return tokens.mean(dim=-2, keepdim=True).expand_as(tokens)
    if sigma == 0:
        return tokens
    m_h, m_w = blur_matrices(grid, sigma, kernel, device=tokens.device, dtype=tokens.dtype)
    return blur_with_matrices(tokens, grid, m_h, m_w)


def blur_with_matrices(tokens: torch.Tensor, grid: tuple[int, int], m_h: torch.Tensor, m_w: torch.Tensor):
    """``M_H @ X @ M_W^T`` on ``(..., H*W, C)`` tokens over their row-major ``H x W`` grid."""
    *lead, num_tokens, channels = tokens.shape
    height, width = grid
    x = tokens.reshape(-1, height, width * channels)
    x = torch.matmul(m_h, x)  # along H
    x = x.reshape(-1, width, channels)
    x = torch.matmul(m_w, x)  # along W
    return x.reshape(*lead, num_tokens, channels)


def blur_image(images: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Blur ``(..., H, W)`` images with a ``kernel_size``-tap Gaussian and reflect padding (SAG's blur)."""
    height, width = images.shape[-2:]
    m_h = _image_axis_matrix(height, float(sigma), kernel_size, images.device, images.dtype)
    m_w = _image_axis_matrix(width, float(sigma), kernel_size, images.device, images.dtype)
    return m_h @ images @ m_w.transpose(0, 1)


@lru_cache(maxsize=64)
def _image_axis_matrix(length: int, sigma: float, kernel_size: int, device: torch.device, dtype: torch.dtype):
    # Built once per setting, not per step: no host-to-device copy inside a denoising step.
    return reflect_blur_matrix(length, gaussian_taps(sigma, kernel_size)).to(device=device, dtype=dtype)
