"""How noise predictions combine: classifier-free guidance plus additive weakened-model terms.

SEG (Hong 2024, Eq. 10), PAG (Ahn et al. 2024) and SAG (Hong et al. 2023) share one shape: a prediction
from a deliberately weakened model is pushed away from, ``eps += scale * (eps_reference - eps_weak)``.
The pipeline combines every step's predictions with :func:`guided_prediction`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class GuidanceTerm(NamedTuple):
    """``scale * (reference - weak)``: SEG's is ``(eps_c, eps_seg, s)``."""

    reference: torch.Tensor
    weak: torch.Tensor
    scale: float


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG (Ho & Salimans 2022): ``eps_u + w (eps_c - eps_u)``."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def weakened_model_guidance(eps: torch.Tensor, eps_reference: torch.Tensor, eps_weak: torch.Tensor, scale: float):
    """One guidance term: ``eps + s (eps_reference - eps_weak)``."""
    return eps + scale * (eps_reference - eps_weak)


def guided_prediction(
    eps_cond: torch.Tensor,
    terms: Sequence[GuidanceTerm] = (),
    eps_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Eq. 10 of the SEG paper, one term per method: ``eps_u + w (eps_c - eps_u) + sum_k s_k (ref_k - weak_k)``;
    without CFG (``eps_uncond`` None) ``eps_c`` takes ``eps_u + w (eps_c - eps_u)``'s place."""
    eps = eps_cond if eps_uncond is None else classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
    for term in terms:
        eps = weakened_model_guidance(eps, *term)
    return eps
