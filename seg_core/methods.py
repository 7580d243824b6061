"""Guidance methods as small objects behind one interface, and the step that combines them.

Every method adds ``scale * (eps_reference - eps_weak)`` to the noise prediction.  SEG and PAG weaken
the conditional model by changing attention in some layers; their branch shares the conditional input,
so it rides along in the main UNet call.  SAG weakens the *input* instead (a blurred x0, re-noised), so
it needs a second call.  A new method subclasses :class:`GuidanceMethod` and nothing else changes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

from .attention import (
    AttentionChange,
    AttentionMaskProbe,
    BranchPlan,
    IdentityAttention,
    SmoothedEnergyAttention,
    patched_self_attention,
    resolve_layers,
)
from .blur import blur_image
from .guidance import GuidanceTerm, guided_prediction
from .options import GUIDANCE, check_interval, check_number  # (seg_core.studio imports check_interval from here)
from .sharing import DownBlockSharing, shared_down_blocks


class Branch(NamedTuple):
    """One branch of a UNet call: the conditioning it gets ("uncond" or "cond"), on which image rows
    (None: all of them)."""

    role: str
    rows: tuple[int, ...] | None = None


#: ``model(x, t, branches) -> prediction``: one UNet call in which branch k sees ``x`` (B rows), or
#: ``x[rows]`` where the branch names rows, with its role's conditioning for those rows. The prediction
#: holds the branches' rows one branch after another.
ModelFn = Callable[[torch.Tensor, torch.Tensor, Sequence[Branch]], torch.Tensor]


def check_scale(name: str, value, upper: float = 100.0) -> float:
    """A scale in [0, upper] (seg_core.options.check_number; kept under this name for seg_core.studio)."""
    return check_number(name, value, 0.0, upper)


@dataclass
class StepState:
    """What a method may use at one denoising step."""

    x: torch.Tensor  # the UNet's input for one branch (after scheduler.scale_model_input)
    t: torch.Tensor
    scheduler: object
    model: ModelFn
    do_cfg: bool
    outputs: dict = field(default_factory=dict)  # "uncond", "cond" (all rows), and each method's branch

    @property
    def alpha_prod(self) -> float:
        """alpha-bar of the noise level of ``x``: x = sqrt(a) x0 + sqrt(1 - a) eps."""
        return model_input_alpha_prod(self.scheduler, self.t)


class GuidanceMethod:
    """One additive guidance term, active on the steps in [start, end) of the schedule."""

    name = "method"
    layers_spec: Sequence[str] | None = None  # the attention layers the method changes, if any
    #: The image rows the term applies to (None: every image). Several methods on disjoint rows render
    #: several methods' images in one denoising loop (see seg_core.compare).
    rows: tuple[int, ...] | None = None

    def __init__(self, scale: float, start: float = 0.0, end: float = 1.0):
        name = f"{self.name}_scale"
        self.scale = GUIDANCE[name].check(scale) if name in GUIDANCE else check_number(name, scale)
        self.start, self.end = check_interval(start, end, "perturbation_guidance")

    def is_active(self, step: int, num_steps: int) -> bool:
        # The same rule as diffusers' control_guidance_start / control_guidance_end.
        return self.scale > 0 and not (step / num_steps < self.start or (step + 1) / num_steps > self.end)

    def scale_at(self, t) -> float:
        return self.scale

    def bind(self, unet: torch.nn.Module) -> None:
        """Resolve layer names against ``unet`` (raises ValueError for unknown ones)."""
        self.layers = [] if self.layers_spec is None else resolve_layers(unet, self.layers_spec)

    # A method with an extra branch in the main call returns its AttentionChange here.
    def branch_change(self) -> AttentionChange | None:
        return None

    # Changes on the reference branch ("uncond" with CFG, else "cond") that only observe.
    def probe(self) -> AttentionChange | None:
        return None

    # Both predictions cover the method's rows (all images when ``rows`` is None).
    def weak_prediction(self, state: StepState) -> torch.Tensor:
        return state.outputs[self]

    def reference_prediction(self, state: StepState) -> torch.Tensor:
        return select_rows(state.outputs["cond"], self.rows)


class SEG(GuidanceMethod):
    """Smoothed Energy Guidance (Hong, NeurIPS 2024): the conditional model with its self-attention
    energy landscape smoothed by a Gaussian blur of the query, in ``applied_layers``."""

    name = "seg"

    def __init__(
        self,
        scale: float = 3.0,
        blur_sigma: float = GUIDANCE["seg_blur_sigma"].default,
        applied_layers=GUIDANCE["seg_applied_layers"].default,
        blur_target: str = GUIDANCE["seg_blur_target"].default,
        blur_kernel: str = GUIDANCE["seg_blur_kernel"].default,
        start: float = 0.0,
        end: float = 1.0,
    ):
        super().__init__(scale, start, end)
        self.blur_sigma = GUIDANCE["seg_blur_sigma"].check(blur_sigma)
        self.layers_spec = applied_layers
        self.change = SmoothedEnergyAttention(self.blur_sigma, GUIDANCE["seg_blur_target"].check(blur_target),
                                              GUIDANCE["seg_blur_kernel"].check(blur_kernel))

    def branch_change(self):
        return self.change


class PAG(GuidanceMethod):
    """Perturbed-Attention Guidance (Ahn et al. 2024): self-attention maps replaced by the identity."""

    name = "pag"

    def __init__(self, scale: float = 3.0, applied_layers=GUIDANCE["pag_applied_layers"].default,
                 adaptive_scale: float = GUIDANCE["pag_adaptive_scale"].default, start: float = 0.0, end: float = 1.0):
        super().__init__(scale, start, end)
        self.adaptive_scale = GUIDANCE["pag_adaptive_scale"].check(adaptive_scale)
        self.layers_spec = applied_layers

    def scale_at(self, t) -> float:
        # diffusers' PAGMixin: the scale falls linearly as t leaves 1000, floored at 0.
        if self.adaptive_scale == 0:
            return self.scale
        return max(self.scale - self.adaptive_scale * (1000 - float(t)), 0.0)

    def branch_change(self):
        return IdentityAttention()


class SAG(GuidanceMethod):
    """Self-Attention Guidance (Hong et al., ICCV 2023): blur the predicted x0 where the first mid-block
    self-attention looks most, re-noise it, and guide away from the prediction on that input."""

    name = "sag"

    def __init__(self, scale: float = 0.75, blur_sigma: float = GUIDANCE["sag_blur_sigma"].default,
                 start: float = 0.0, end: float = 1.0):
        super().__init__(scale, start, end)
        self.blur_sigma = GUIDANCE["sag_blur_sigma"].check(blur_sigma)
        self._probe = AttentionMaskProbe()

    def bind(self, unet):
        self.layers = resolve_layers(unet, ["m0"])

    def probe(self):
        return self._probe

    def reference_prediction(self, state):
        return select_rows(state.outputs["uncond" if state.do_cfg else "cond"], self.rows)

    def weak_prediction(self, state):
        a = state.alpha_prod
        role = "uncond" if state.do_cfg else "cond"
        # Degrade every image (cheap, elementwise); the second UNet call runs only this method's rows.
        x0, eps = predicted_x0_and_eps(state.x, state.outputs[role], a, state.scheduler.config.prediction_type)
        mask = self._probe.mask.to(x0.dtype).view(-1, 1, *self._probe.grid)
        mask = F.interpolate(mask, size=x0.shape[-2:]).expand_as(x0)  # nearest, as in diffusers
        # diffusers uses a 9-tap kernel at sigma 1; 2 * ceil(4 sigma) + 1 keeps that and scales with sigma.
        size = min(2 * math.ceil(4 * self.blur_sigma) + 1, 2 * min(x0.shape[-2:]) - 1)
        degraded = blur_image(x0, self.blur_sigma, size) * mask + x0 * (1 - mask)
        degraded = a**0.5 * degraded + (1 - a) ** 0.5 * eps
        return state.model(degraded, state.t, [Branch(role, self.rows)])


def predicted_x0_and_eps(x: torch.Tensor, output: torch.Tensor, alpha_prod: float, prediction_type: str):
    """x0 and eps from a model output at noise level alpha-bar (DDPM parameterisations)."""
    a, b = alpha_prod**0.5, (1 - alpha_prod) ** 0.5
    if prediction_type == "epsilon":
        return (x - b * output) / a, output
    if prediction_type == "sample":
        return output, (x - a * output) / b
    if prediction_type == "v_prediction":
        return a * x - b * output, a * output + b * x
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def model_input_alpha_prod(scheduler, t) -> float:
    """alpha-bar of the UNet input at timestep ``t``, for any diffusers scheduler.

    Karras-style schedulers (Euler, Heun, ...) keep x = x0 + sigma eps and feed x / sqrt(sigma^2 + 1),
    i.e. alpha-bar = 1 / (1 + sigma^2); DDPM-style ones (DDIM, DPM-Solver, ...) feed x as it is.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    step_index = getattr(scheduler, "step_index", None)
    if sigmas is not None and step_index is not None and float(scheduler.init_noise_sigma) > 1.0:
        sigma = float(sigmas[step_index])
        return 1.0 / (1.0 + sigma * sigma)
    return float(scheduler.alphas_cumprod[int(t)])


class GuidedStep:
    """Computes the guided noise prediction of one denoising step from the active methods.

    Main call: ``[uncond (with CFG), cond, <one branch per SEG/PAG-like method>]``, the layout of the
    SEG authors and diffusers' PAG pipelines; then methods that need more calls (SAG) make them.
    """

    def __init__(self, methods: Sequence[GuidanceMethod], unet: torch.nn.Module, share_down_blocks: bool = True):
        self.methods = list(methods)
        for method in self.methods:
            method.bind(unet)
        self.unet = unet
        self.plan = BranchPlan()
        # Run the down blocks once for rows identical there (exact; see seg_core.sharing).
        self.sharing = DownBlockSharing() if share_down_blocks else None

    @contextmanager
    def installed(self):
        """The UNet ready for this step: the methods' attention layers patched and (with sharing) its down
        blocks hooked; the original processors come back and the hooks go on exit, whatever happens inside."""
        with patched_self_attention(self.unet, self.patched_layers(), self.plan), \
                shared_down_blocks(self.unet, self.sharing) if self.sharing else nullcontext():
            yield self

    def patched_layers(self) -> list[str]:
        names: list[str] = []
        for method in self.methods:
            names.extend(n for n in method.layers if n not in names)
        return names

    def __call__(self, model: ModelFn, x: torch.Tensor, t, step: int, num_steps: int, scheduler,
                 guidance_scale: float, do_cfg: bool, guidance_rescale: float = 0.0):
        """The guided prediction at step ``step`` of ``num_steps``; CFG's settings are read per step (a
        callback may change them, as in diffusers)."""
        model = owned_outputs(model)
        active = [m for m in self.methods if m.is_active(step, num_steps)]
        branches = [Branch("uncond")] if do_cfg else []
        branches.append(Branch("cond"))
        keys: list = [b.role for b in branches]
        changes: dict[str, dict[int, AttentionChange]] = {}
        for method in active:
            change, branch = method.branch_change(), None
            if change is not None:
                branch = len(branches)
                keys.append(method)
                branches.append(Branch("cond", method.rows))
            elif method.probe() is not None:
                change, branch = method.probe(), 0
            if change is not None:
                for layer in method.layers:
                    if changes.get(layer, {}).get(branch, change) is not change:
                        raise ValueError(f"two {method.name} methods change layer {layer} of the same branch; "
                                         "use one per call")
                    changes.setdefault(layer, {})[branch] = change
        batch = x.shape[0]
        sizes = [batch if b.rows is None else len(b.rows) for b in branches]
        self.plan.set(sizes, changes, tuple(x.shape[-2:]), x.device, x.dtype)
        if self.sharing is not None:
            # Rows changed only at or after the mid block compute the same down path as their role's row.
            in_down = {b for layer, by_branch in changes.items() if layer.startswith("down_blocks.") for b in by_branch}
            self.sharing.set([
                (k if k in in_down else branch.role, row)
                for k, branch in enumerate(branches)
                for row in (range(batch) if branch.rows is None else branch.rows)
            ], x.device)
        try:
            prediction = model(x, t, branches)
        finally:
            self.plan.set([], {}, None)
            if self.sharing is not None:
                self.sharing.set(None)
        state = StepState(x, t, scheduler, model, do_cfg, dict(zip(keys, prediction.split(sizes))))
        eps_cond = state.outputs["cond"]
        terms = [guidance_term(method, state, batch) for method in active]
        eps = guided_prediction(eps_cond, terms, state.outputs.get("uncond"), guidance_scale)
        if do_cfg and guidance_rescale > 0.0:
            eps = rescale_noise_cfg(eps, eps_cond, guidance_rescale=guidance_rescale)
        return eps


def owned_outputs(model: ModelFn) -> ModelFn:
    """``model`` returning tensors of its own. A UNet compiled with CUDA graphs (``mode="reduce-overhead"``)
    returns views of static buffers that its next call overwrites, and the main call's predictions are
    still read after SAG's second call. The copy costs one latent per branch."""
    return lambda x, t, branches: model(x, t, branches).clone()


def guidance_term(method: GuidanceMethod, state: StepState, batch: int) -> GuidanceTerm:
    """``method``'s (reference, weak, scale) over all ``batch`` rows; rows it does not guide get zeros in
    both predictions, so their term adds exactly nothing."""
    reference, weak = method.reference_prediction(state), method.weak_prediction(state)
    if method.rows is not None:
        reference, weak = spread_rows(reference, method.rows, batch), spread_rows(weak, method.rows, batch)
    return GuidanceTerm(reference, weak, method.scale_at(state.t))


def rows_index(rows: Sequence[int]) -> slice | list[int]:
    """An index for ``rows``: a slice where they are consecutive (as a Compare's are), so that no index
    tensor is copied to the device at every step."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


def select_rows(tensor: torch.Tensor, rows: Sequence[int] | None) -> torch.Tensor:
    """The given image rows of ``tensor`` (all of it when ``rows`` is None)."""
    return tensor if rows is None else tensor[rows_index(rows)]


def spread_rows(tensor: torch.Tensor, rows: Sequence[int], batch: int) -> torch.Tensor:
    """``batch`` rows: ``tensor``'s at ``rows``, zeros elsewhere."""
    out = tensor.new_zeros((batch, *tensor.shape[1:]))
    out[rows_index(rows)] = tensor
    return out
