"""Independent reference implementations, written from ../shared/REFERENCE.md (not from seg_core).

They follow the authors' rules literally: a full 2-D depthwise convolution with the outer-product kernel,
reflect padding, the clamped kernel size, sigma > 9999 as the mean, and the [uncond, cond, perturbed]
batch layout where only the last chunk is changed.
"""

import math

import torch
import torch.nn.functional as F


def authors_kernel_size(sigma, width):
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    return min(k, width - (width % 2 - 1))


def kernel_1d(sigma, size, dtype=torch.float32):
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=dtype)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def reference_blur_2d(img, sigma):
    """(B, C, H, W): depthwise 2-D Gaussian conv with reflect padding, kernel clamped per axis."""
    if sigma > 9999:
        return img.mean(dim=(-2, -1), keepdim=True).expand_as(img)
    height, width = img.shape[-2:]
    k_h, k_w = authors_kernel_size(sigma, height), authors_kernel_size(sigma, width)
    kernel = torch.outer(kernel_1d(sigma, k_h, img.dtype), kernel_1d(sigma, k_w, img.dtype)).to(img)
    kernel = kernel.expand(img.shape[-3], 1, k_h, k_w)
    padded = F.pad(img, [k_w // 2, k_w // 2, k_h // 2, k_h // 2], mode="reflect")
    return F.conv2d(padded, kernel, groups=img.shape[-3])


class ReferenceSEGProcessor:
    """SEG self-attention in the authors' form: the last of ``chunks`` batch chunks has its query, viewed
    as (B, heads * head_dim, H, W), blurred before attention. The grid is the authors' square one
    (isqrt of the token count) unless ``grid`` gives (H, W) explicitly (tokens in row-major order)."""

    def __init__(self, sigma, chunks, grid=None):
        self.sigma = sigma
        self.chunks = chunks
        self.grid = grid

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch, tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        height, width = self.grid or (math.isqrt(tokens), math.isqrt(tokens))
        assert height * width == tokens, f"a {height}x{width} grid does not hold {tokens} tokens"
        *rest, perturbed = query.chunk(self.chunks)
        b = perturbed.shape[0]
        grid = perturbed.permute(0, 1, 3, 2).reshape(b, attn.heads * head_dim, height, width)
        grid = reference_blur_2d(grid, self.sigma)
        perturbed = grid.reshape(b, attn.heads, head_dim, tokens).permute(0, 1, 3, 2)
        query = torch.cat([*rest, perturbed])
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
