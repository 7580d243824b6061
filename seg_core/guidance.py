"""How noise predictions combine: classifier-free guidance plus additive weakened-model terms.

SEG (Hong 2024, Eq. 10), PAG (Ahn et al. 2024) and SAG (Hong et al. 2023) share one shape: a prediction
from a deliberately weakened model is pushed away from, ``eps += scale * (eps_reference - eps_weak)``.
"""

from __future__ import annotations

import torch


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG (Ho & Salimans 2022): ``eps_u + w (eps_c - eps_u)``."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def weakened_model_guidance(eps: torch.Tensor, eps_reference: torch.Tensor, eps_weak: torch.Tensor, scale: float):
    """One guidance term: ``eps + s (eps_reference - eps_weak)``."""
    return eps + scale * (eps_reference - eps_weak)


def smoothed_energy_guidance(
    eps_cond: torch.Tensor,
    eps_seg: torch.Tensor,
    seg_scale: float,
    eps_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """SEG, Eq. 10: ``eps_u + w (eps_c - eps_u) + s (eps_c - eps_seg)``; ``eps_c + s (eps_c - eps_seg)`` without CFG."""
    eps = eps_cond if eps_uncond is None else classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
    return weakened_model_guidance(eps, eps_cond, eps_seg, seg_scale)
