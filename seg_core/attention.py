"""Patching self-attention layers so that some branches of a batch see a changed attention.

A guided UNet call stacks several branches along the batch axis (``[uncond, cond, seg, pag, ...]``,
each ``B`` rows).  In a patched layer, :class:`BranchAttnProcessor` runs the layer's own processor on the
ordinary branches (so a user's custom processor keeps working) and an :class:`AttentionChange` on the
others.  :func:`patched_self_attention` installs the processors and always puts the originals back.
"""

from __future__ import annotations

import inspect
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .blur import blur_matrices, blur_tokens, blur_with_matrices, is_infinite_sigma

_PARTS = {"d": "down", "m": "mid", "u": "up"}
_PART_PREFIX = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


# --------------------------------------------------------------------------------------------------
# Layer names
# --------------------------------------------------------------------------------------------------


def self_attention_layers(unet: torch.nn.Module) -> dict[str, list[str]]:
    """Module names of the UNet's self-attention layers, per part ("down", "mid", "up"), in order."""
    layers = {"down": [], "mid": [], "up": []}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and not module.is_cross_attention and name.endswith("attn1"):
            for part, prefix in _PART_PREFIX.items():
                if name.startswith(prefix):
                    layers[part].append(name)
    return layers


def resolve_layers(unet: torch.nn.Module, applied_layers) -> list[str]:
    """Module names for layer specs like ``["mid"]``, ``["down", "u0"]`` or ``"d4"`` (SEG authors' names).

    "down" / "mid" / "up" select every self-attention of that part; "d<i>", "m<i>", "u<i>" the i-th one.
    """
    if isinstance(applied_layers, str):
        applied_layers = [applied_layers]
    available = self_attention_layers(unet)
    allowed = (
        f"'down', 'mid', 'up', 'd0'..'d{len(available['down']) - 1}', "
        f"'m0'..'m{len(available['mid']) - 1}', 'u0'..'u{len(available['up']) - 1}'"
    )
    if not applied_layers:
        raise ValueError(f"applied layers must name at least one layer: {allowed}")
    names: list[str] = []
    for spec in applied_layers:
        if not isinstance(spec, str):
            raise ValueError(f"layer names are strings, got {spec!r}; allowed: {allowed}")
        key = spec.strip().lower()
        if key in available:
            chosen = available[key]
        else:
            match = re.fullmatch(r"([dmu])(\d+)", key)
            part = _PARTS[match.group(1)] if match else None
            if part is None or int(match.group(2)) >= len(available[part]):
                raise ValueError(f"unknown attention layer {spec!r}; allowed: {allowed}")
            chosen = [available[part][int(match.group(2))]]
        names.extend(n for n in chosen if n not in names)
    return names


def grid_levels(latent_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The token grids a UNet can see on a latent, largest first, down to 1x1.

    Each UNet level halves the latent with a stride-2 convolution, i.e. rounds up.
    """
    height, width = latent_size
    levels, factor = [], 1
    while not levels or levels[-1] != (1, 1):
        levels.append((math.ceil(height / factor), math.ceil(width / factor)))
        factor *= 2
    return levels


def token_grid(num_tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) of a layer's token grid, from the latent size (never a square root)."""
    for h, w in grid_levels(latent_size):
        if h * w == num_tokens:
            return h, w
    height, width = latent_size
    raise ValueError(f"{num_tokens} tokens do not form a grid of a {height}x{width} latent")


# --------------------------------------------------------------------------------------------------
# Attention changes (one per guidance method)
# --------------------------------------------------------------------------------------------------


def _split_heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, attn.heads, inner // attn.heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _qkv(attn: Attention, hidden_states: torch.Tensor):
    query = _split_heads(attn, attn.to_q(hidden_states))
    key = _split_heads(attn, attn.to_k(hidden_states))
    value = _split_heads(attn, attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


class AttentionChange:
    """Self-attention of one branch, changed. ``attend`` maps normalised tokens to pre-``to_out`` features.

    Inside a compiled graph a change reads its settings only from ``operands`` (tensors, so graph inputs):
    Python numbers read there would be baked in, and a new value would compile a new graph.
    """

    def attend(self, attn: Attention, hidden_states: torch.Tensor, grid: tuple[int, int], operands=None) -> torch.Tensor:
        raise NotImplementedError

    def operands(self, latent_size: tuple[int, int], device, dtype) -> dict:
        """The tensors ``attend`` reads when compiled, for a UNet call on a latent of ``latent_size``."""
        return {}

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, grid, temb=None, operands=None) -> torch.Tensor:
        # The same pre- and post-processing as diffusers' AttnProcessor2_0.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = self.attend(attn, hidden_states, grid, operands)
        out = attn.to_out[1](attn.to_out[0](out))
        # A change may compute one token row that stands for all of them (infinite-sigma SEG).
        out = out.expand(hidden_states.shape[0], hidden_states.shape[1], out.shape[-1])
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass(frozen=True)
class SmoothedEnergyAttention(AttentionChange):
    """SEG: blur the query (or key) over the token grid before attention; blur is linear, so this
    equals blurring the attention logits along that axis (Hong 2024, Eq. 9)."""

    blur_sigma: float
    blur_target: str = "query"
    blur_kernel: str = "paper"

    def operands(self, latent_size, device, dtype):
        # The blur of every token grid of the latent as its two matrices (the mean for an infinite sigma).
        return {grid: blur_matrices(grid, self.blur_sigma, self.blur_kernel, device=device, dtype=dtype)
                for grid in grid_levels(latent_size)}

    def attend(self, attn, hidden_states, grid, operands=None):
        query, key, value = _qkv(attn, hidden_states)
        if torch.compiler.is_compiling():
            # sigma enters as the matrices, so one graph serves every sigma (same result within rounding).
            m_h, m_w = operands[grid]
            if self.blur_target == "query":
                query = blur_with_matrices(query, grid, m_h.to(query.dtype), m_w.to(query.dtype))
            else:
                key = blur_with_matrices(key, grid, m_h.to(key.dtype), m_w.to(key.dtype))
        elif self.blur_target == "query" and is_infinite_sigma(self.blur_sigma):
            # Every query row is the mean query, so every output row is the same: compute one.
            query = query.mean(dim=-2, keepdim=True)
        elif self.blur_target == "query":
            query = blur_tokens(query, grid, self.blur_sigma, self.blur_kernel)
        else:
            key = blur_tokens(key, grid, self.blur_sigma, self.blur_kernel)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return _merge_heads(out).to(query.dtype)


@dataclass(frozen=True)
class IdentityAttention(AttentionChange):
    """PAG: self-attention map replaced by the identity, so the layer outputs ``to_out(to_v(x))``."""

    def attend(self, attn, hidden_states, grid, operands=None):
        return attn.to_v(hidden_states)


@dataclass
class AttentionMaskProbe(AttentionChange):
    """SAG's probe: ordinary attention that also records which key tokens draw more than average
    attention: ``mean over heads, sum over queries > 1`` (Hong et al. 2023, Eq. 13)."""

    mask: torch.Tensor | None = field(default=None, repr=False)
    grid: tuple[int, int] | None = None

    def attend(self, attn, hidden_states, grid, operands=None):
        query, key, value = _qkv(attn, hidden_states)
        batch, heads = query.shape[:2]
        probs = attn.get_attention_scores(query.flatten(0, 1), key.flatten(0, 1), None)
        self.mask = probs.view(batch, heads, *probs.shape[1:]).mean(dim=1).sum(dim=1) > 1.0
        self.grid = grid
        out = torch.bmm(probs, value.flatten(0, 1)).view(batch, heads, -1, value.shape[-1])
        return _merge_heads(out)


# --------------------------------------------------------------------------------------------------
# The processor and the patch
# --------------------------------------------------------------------------------------------------


class BranchPlan:
    """Which branch of the batch each patched layer changes, for the UNet call about to run.

    A compiled UNet reads the plan on every call, so what it reads stays put between calls: each layer
    reads its own dict (a ``slot``, refilled in place, keyed by branch, never by layer name), and the
    changes' numbers come as tensors (``operands``, by branch).  Only the branch sizes, the latent size
    and the kinds of change are Python values the graph depends on.
    """

    def __init__(self):
        self.sizes: list[int] = []  # rows per branch, in batch order
        self.changes: dict[str, dict[int, AttentionChange]] = {}
        self.latent_size: tuple[int, int] | None = None
        self.operands: dict[int, dict] = {}
        self._slots: dict[str, dict[int, AttentionChange]] = {}

    def slot(self, layer_name: str) -> dict[int, AttentionChange]:
        """The dict of ``layer_name``'s changes by branch, the same object for the plan's lifetime."""
        return self._slots.setdefault(layer_name, {})

    def set(self, sizes: list[int], changes: dict[str, dict[int, AttentionChange]], latent_size,
            device=None, dtype=None) -> None:
        self.sizes = list(sizes)
        self.changes = changes
        self.latent_size = latent_size
        for name, slot in self._slots.items():
            slot.clear()
            slot.update(changes.get(name, {}))
        self.operands = {}
        if latent_size is not None:
            for by_branch in changes.values():
                for branch, change in by_branch.items():
                    if branch not in self.operands:
                        self.operands[branch] = change.operands(latent_size, device, dtype or torch.float32)


class BranchAttnProcessor:
    """Runs ``original`` on unchanged branches and the plan's AttentionChange on the others."""

    def __init__(self, original, layer_name: str, plan: BranchPlan):
        self.original = original
        self.layer_name = layer_name
        self.plan = plan
        self.changes = plan.slot(layer_name)
        self._accepts = accepted_keywords(original)

    def call_original(self, attn, hidden_states, encoder_hidden_states, attention_mask, extra):
        """The original processor, called as ``Attention.forward`` calls one: the states and the mask by
        keyword, anything else only if its signature takes it (SlicedAttnProcessor takes no ``temb``)."""
        extra = {k: v for k, v in extra.items() if self._accepts is None or k in self._accepts}
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **extra)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        extra = kwargs if temb is None else {"temb": temb, **kwargs}
        changes = self.changes
        if not changes or encoder_hidden_states is not None:
            return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, extra)
        sizes = self.plan.sizes
        n = len(sizes)
        if hidden_states.shape[0] != sum(sizes):
            raise RuntimeError(f"batch of {hidden_states.shape[0]} does not split into branches of {sizes} rows")
        chunks = hidden_states.split(sizes)
        masks = attention_mask.split(sizes) if attention_mask is not None else [None] * n
        grid = None
        if hidden_states.ndim == 3:
            grid = token_grid(hidden_states.shape[1], self.plan.latent_size)
        outputs, start = [], 0
        # Consecutive unchanged branches go through the original processor together.
        for index in range(n + 1):
            if index < n and index not in changes:
                continue
            if start < index:
                rows = torch.cat(chunks[start:index]) if index - start > 1 else chunks[start]
                mask = torch.cat(masks[start:index]) if masks[start] is not None else None
                outputs.append(self.call_original(attn, rows, None, mask, extra))
            if index < n:
                outputs.append(changes[index](attn, chunks[index], grid, temb, self.plan.operands.get(index)))
            start = index + 1
        return torch.cat(outputs)


def accepted_keywords(processor) -> set[str] | None:
    """The keyword arguments ``processor`` takes (None: any, it has ``**kwargs``)."""
    parameters = inspect.signature(processor).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


@contextmanager
def patched_self_attention(unet: torch.nn.Module, layer_names, plan: BranchPlan):
    """Install BranchAttnProcessors on ``layer_names``; the original processors come back on exit,
    whatever happens inside."""
    modules = dict(unet.named_modules())
    originals = {name: modules[name].processor for name in layer_names}
    try:
        for name in layer_names:
            modules[name].set_processor(BranchAttnProcessor(originals[name], name, plan))
        yield plan
    finally:
        for name, processor in originals.items():
            modules[name].set_processor(processor)
