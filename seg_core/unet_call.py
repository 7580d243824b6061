"""One UNet call of a guided step, and the ControlNet inputs it adds (ours, used by seg_core.pipeline).

A guided step (seg_core.methods.GuidedStep) asks for one UNet call on a list of branches, each a role
("uncond" or "cond") on some image rows.  :class:`ControlledUNet` gives each branch its role's conditioning
and adds the ControlNet's residuals, computed once per role.  :class:`Controls` holds the controls of a call
(one per net of a MultiControlNetModel, one per mode of a ControlNetUnionModel), checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, MultiControlNetModel

from .methods import Branch, select_rows
from .options import CONTROL, MAX_SIDE, check_interval, is_integer


class ControlledUNet:
    """The model of a guided step (seg_core.methods.ModelFn): one UNet call on a list of branches, each with
    the conditioning of its role, plus the ControlNet's residuals. Ours; the ControlNet call's inputs are
    laid out as in diffusers 0.42 StableDiffusionXLControlNetPipeline.__call__ (and its Union variant).

    The ControlNet is not patched, so branches of one role get the same residuals: they are computed once
    per role and added to every branch of that role, so SEG, PAG and SAG see the control exactly as the
    plain branches do. Guess mode feeds the ControlNet only the conditional role; the others get zeros.
    """

    def __init__(self, unet, controlnet, conditioning: dict, controls: "Controls | None", control_images: list,
                 guess: bool, timestep_cond, cross_attention_kwargs):
        self.unet, self.controlnet = unet, controlnet
        self.conditioning = conditioning  # by role; a step-end callback may replace its tensors
        self.controls, self.control_images, self.guess = controls, control_images, guess
        self.control_scales: list[float] = []  # this step's scale of each control (0 outside its window)
        self.timestep_cond = timestep_cond
        self.cross_attention_kwargs = cross_attention_kwargs
        self.dtype = conditioning["cond"]["prompt_embeds"].dtype

    def at_step(self, step: int, steps: int) -> None:
        if self.controls is not None:
            self.control_scales = self.controls.scales_at(step, steps)

    def _gather(self, key: str, branches: Sequence[Branch]) -> torch.Tensor:
        return torch.cat([select_rows(self.conditioning[b.role][key], b.rows) for b in branches])

    def __call__(self, x: torch.Tensor, t, branches: Sequence[Branch]) -> torch.Tensor:
        cond = self.conditioning["cond"]
        added_cond_kwargs = {"text_embeds": self._gather("text_embeds", branches),
                             "time_ids": self._gather("time_ids", branches)}
        if "image_embeds" in cond:
            added_cond_kwargs["image_embeds"] = [
                torch.cat([select_rows(self.conditioning[b.role]["image_embeds"][k], b.rows) for b in branches])
                for k in range(len(cond["image_embeds"]))
            ]
        timestep_cond = self.timestep_cond
        return self.unet(
            _by_branch(x, branches), t,
            encoder_hidden_states=self._gather("prompt_embeds", branches),
            timestep_cond=None if timestep_cond is None else _by_branch(timestep_cond, branches),
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
            **self._control_residuals(x, t, branches),
        )[0]

    def _control_residuals(self, x: torch.Tensor, t, branches: Sequence[Branch]) -> dict:
        """The UNet's ControlNet arguments for ``branches``: the ControlNet run once per role."""
        roles = [r for r in dict.fromkeys(b.role for b in branches) if r == "cond" or not self.guess]
        if self.controlnet is None or not roles:
            return {}
        conditioning = self.conditioning
        down, mid = self.controlnet(
            torch.cat([x] * len(roles)), t,
            encoder_hidden_states=torch.cat([conditioning[r]["prompt_embeds"] for r in roles]),
            **_controlnet_inputs(self.controlnet, self.control_images, self.control_scales, self.controls.modes,
                                 len(roles), self.dtype),
            guess_mode=self.guess,
            added_cond_kwargs={k: torch.cat([conditioning[r][k] for r in roles]) for k in ("text_embeds", "time_ids")},
            return_dict=False,
        )
        return {
            "down_block_additional_residuals": [_rows_by_branch(d, roles, branches) for d in down],
            "mid_block_additional_residual": _rows_by_branch(mid, roles, branches),
        }


def _by_branch(tensor: torch.Tensor, branches: Sequence[Branch]) -> torch.Tensor:
    """``tensor``'s rows of each branch, one branch after another (the layout of a guided UNet call)."""
    return torch.cat([select_rows(tensor, b.rows) for b in branches])


@dataclass
class Controls:
    """One entry per control: its image, conditioning scale, guidance window and (union model) mode."""

    images: list
    scales: list[float]
    starts: list[float]
    ends: list[float]
    modes: list[int] | None = None

    @classmethod
    def from_arguments(cls, net, image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                       control_mode) -> "Controls":
        """One entry per control of ``net`` (one per net of a MultiControlNetModel, one per mode of a
        ControlNetUnionModel) from the pipeline's arguments, checked; a single value of a per-control argument
        applies to every control."""
        union = isinstance(net, ControlNetUnionModel)
        if not union and control_mode is not None:
            raise ValueError(f"control_mode is for a ControlNetUnionModel; this pipeline's controlnet is "
                             f"{type(net).__name__}, got control_mode={control_mode!r}")
        if union:
            modes = control_mode if isinstance(control_mode, list) else [control_mode]
            allowed = net.config.num_control_type
            if not modes or not all(is_integer(m) and 0 <= m < allowed for m in modes):
                raise ValueError(f"control_mode must be an integer in [0, {allowed - 1}] or a list of them (one per "
                                 f"control image), got {control_mode!r}")
            count = len(modes)
        else:
            modes = None
            count = len(net.nets) if isinstance(net, MultiControlNetModel) else 1
        if isinstance(net, ControlNetModel):
            images = [image]  # (a list is a batch, as in diffusers)
        else:  # one image per control; the union model also takes a single one bare, as in diffusers
            images = [image] if union and not isinstance(image, list) else image
            if not isinstance(images, list) or len(images) != count:
                raise ValueError(f"image must be a list of {count} control images (one per control), got "
                                 f"{short_repr(image)}")
        controls = cls(
            images=images, modes=modes,
            scales=_per_control("controlnet_conditioning_scale", controlnet_conditioning_scale, count),
            starts=_per_control("control_guidance_start", control_guidance_start, count),
            ends=_per_control("control_guidance_end", control_guidance_end, count),
        )
        for k in range(count):
            _check_control_image(controls.images[k])
            CONTROL["controlnet_conditioning_scale"].check(controls.scales[k])
            check_interval(controls.starts[k], controls.ends[k], "control_guidance")
        return controls

    def scales_at(self, step: int, steps: int) -> list[float]:
        """Each control's scale at ``step`` of ``steps``: 0 outside its window (diffusers' rule)."""
        return [scale * (1.0 - float(step / steps < start or (step + 1) / steps > end))
                for scale, start, end in zip(self.scales, self.starts, self.ends)]


def _per_control(name: str, value, count: int) -> list:
    """``value`` as a list of ``count``: a single value applies to every control."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} must be one value or a list of one per control ({count}), got {list(value)!r}")
    return list(value)


def _controlnet_inputs(controlnet, images, scales, modes, copies: int, dtype) -> dict:
    """The control arguments of one ControlNet call on ``copies`` stacked copies of the latents, laid out
    as diffusers' SDXL ControlNet pipelines pass them to each kind of ControlNet."""
    conds = [torch.cat([image] * copies) for image in images]
    if isinstance(controlnet, ControlNetModel):
        return {"controlnet_cond": conds[0], "conditioning_scale": scales[0]}
    inputs = {"controlnet_cond": conds, "conditioning_scale": scales}
    if isinstance(controlnet, ControlNetUnionModel):
        control_type = torch.zeros(controlnet.config.num_control_type).scatter_(0, torch.tensor(modes), 1)
        rows = conds[0].shape[0]
        inputs["control_type"] = control_type.reshape(1, -1).to(conds[0].device, dtype=dtype).repeat(rows, 1)
        inputs["control_type_idx"] = modes
    return inputs


def _rows_by_branch(tensor: torch.Tensor, computed: Sequence[str], branches: Sequence[Branch]) -> torch.Tensor:
    """Lay out per-role results (``computed``, one chunk each) for ``branches``; zeros for roles not computed."""
    chunks = dict(zip(computed, tensor.chunk(len(computed))))
    zero = torch.zeros_like(chunks[computed[0]])
    return torch.cat([select_rows(chunks.get(b.role, zero), b.rows) for b in branches])


def short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_control_image(image) -> None:
    """ValueError unless ``image`` is a PIL image, array or tensor (or a list of them) of a usable size."""
    import numpy as np
    from PIL import Image

    items = image if isinstance(image, list) else [image]
    if not items:
        raise ValueError("image must be a PIL image, numpy array or torch tensor (or a list of them), got []")
    for item in items:
        if isinstance(item, Image.Image):
            width, height = item.size
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            if item.ndim not in (2, 3, 4):
                raise ValueError(f"image arrays must have 2 to 4 dimensions, got shape {tuple(item.shape)}")
            if isinstance(item, torch.Tensor) and item.ndim >= 3:
                height, width = item.shape[-2:]
            else:
                height, width = item.shape[-3:-1] if item.ndim == 4 else item.shape[:2]
        else:
            raise ValueError("image must be a PIL image, numpy array or torch tensor (or a list of them), "
                             f"got {type(item).__name__}")
        if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
            raise ValueError(f"image sides must be in [8, {MAX_SIDE}] pixels, got {width}x{height}")
