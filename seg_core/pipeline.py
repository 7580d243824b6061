"""StableDiffusionXLSEGPipeline: SDXL (optionally with a ControlNet) guided by SEG, PAG and/or SAG."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    MultiControlNetModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import get_module_execution_device
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .compiled import compile_unet
from .methods import PAG, SAG, SEG, GuidanceMethod, GuidedStep
from .options import (  # (MAX_SIDE etc. are imported from here too: the pipeline's limits)
    GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_ROWS,
    MAX_SIDE,
    MAX_STEPS,
    REQUEST,
    arguments_doc,
    check_integer,
    check_interval,
    check_number,
    check_side,
    check_text,
    defaults,
    is_integer,
    is_number,
)
from .unet_call import ControlledUNet, Controls, short_repr


def build_guidance_methods(**guidance) -> list[GuidanceMethod]:
    """The methods that the guidance arguments ask for, validated; a method at scale 0 is left out.

    The arguments are those of :meth:`StableDiffusionXLSEGPipeline.__call__` (``seg_scale``, ...,
    ``perturbation_guidance_end``), by keyword; their names, defaults and help are seg_core.options.GUIDANCE.
    """
    unknown = sorted(guidance.keys() - GUIDANCE.keys())
    if unknown:
        raise TypeError(f"build_guidance_methods() got unexpected keyword arguments {unknown}")
    g = {**defaults(GUIDANCE), **guidance}
    check_interval(g["perturbation_guidance_start"], g["perturbation_guidance_end"], "perturbation_guidance")
    interval = dict(start=g["perturbation_guidance_start"], end=g["perturbation_guidance_end"])
    methods: list[GuidanceMethod] = [
        SEG(g["seg_scale"], g["seg_blur_sigma"], g["seg_applied_layers"], g["seg_blur_target"], g["seg_blur_kernel"],
            **interval),
        PAG(g["pag_scale"], g["pag_applied_layers"], g["pag_adaptive_scale"], **interval),
        SAG(g["sag_scale"], g["sag_blur_sigma"], **interval),
    ]
    return [m for m in methods if m.scale > 0]


# Its signature, for help() and inspect, read from the options.
build_guidance_methods.__signature__ = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option.default)
     for name, option in GUIDANCE.items()],
    return_annotation="list[GuidanceMethod]",
)


class StableDiffusionXLSEGPipeline(StableDiffusionXLPipeline):
    r"""Stable Diffusion XL with Smoothed Energy Guidance (Hong, NeurIPS 2024), PAG and SAG.

    Built from the standard SDXL components (loadable with ``from_pretrained`` / ``from_pipe``), plus an
    optional ``controlnet``: a [`ControlNetModel`], several of them (a list or a [`MultiControlNetModel`]),
    or a [`ControlNetUnionModel`] (one net, several control modes). ``__call__`` takes every argument of
    [`StableDiffusionXLPipeline.__call__`]; with a ControlNet also those of
    [`StableDiffusionXLControlNetPipeline.__call__`] (``image``, ``controlnet_conditioning_scale``,
    ``guess_mode``, ``control_guidance_start``, ``control_guidance_end``, per control with several) and,
    with the union model, ``control_mode`` as in [`StableDiffusionXLControlNetUnionPipeline`]. The
    ControlNet is never patched: its residuals are computed once per role (conditional, unconditional) and
    added to every branch of that role, so SEG, PAG and SAG see the control exactly as the plain
    branches do.  Guidance terms add up:

        eps = eps_u + w (eps_c - eps_u) + s_seg (eps_c - eps_seg) + s_pag (eps_c - eps_pag)
              + s_sag (eps_u - eps_sag)

    (without CFG, ``eps_c`` replaces ``eps_u``).  Each is off at scale 0; with all at 0 the pipeline gives
    exactly what StableDiffusionXLPipeline (or its ControlNet variant) gives.
    """

    _optional_components = StableDiffusionXLPipeline._optional_components + ["controlnet"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        controlnet: ControlNetModel | MultiControlNetModel | ControlNetUnionModel | list | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
            image_encoder=image_encoder, feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker,
        )
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        if isinstance(controlnet, MultiControlNetModel):
            bad = [type(net).__name__ for net in controlnet.nets if not isinstance(net, ControlNetModel)]
            if bad or not controlnet.nets:
                raise ValueError(f"a MultiControlNetModel must hold one or more ControlNetModels, got {bad or 'none'}")
        elif controlnet is not None and not isinstance(controlnet, (ControlNetModel, ControlNetUnionModel)):
            raise ValueError("controlnet must be a diffusers ControlNetModel, MultiControlNetModel, "
                             f"ControlNetUnionModel or a list of ControlNetModels, got {type(controlnet).__name__}")
        self.register_modules(controlnet=controlnet)
        #: Run the down blocks once for branches identical there (exact; see seg_core.sharing).
        self.share_down_blocks = True
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    def compile(self, mode: str | None = None, regional: bool = True, fullgraph: bool = True,
                dynamic: bool = False, backend: str = "inductor") -> "StableDiffusionXLSEGPipeline":
        r"""Compile the UNet with ``torch.compile``, in place, for every guidance method (see seg_core.compiled).

        The first call at a new size or with a new set of methods (or applied layers) compiles; sigma, the
        scales, the steps, the prompts and a request's adapters (seg_core.adapters) then reuse the graphs.
        The ControlNet, VAE and text encoders stay eager. Outputs equal the eager pipeline's up to float
        rounding (SEG's blur runs as matrices there).

        Args:
            mode (`str`, *optional*): inductor's mode: None (default), "reduce-overhead" (CUDA graphs where
                shapes are static: batch-1 steps on a GPU are launch-bound), "max-autotune" or
                "max-autotune-no-cudagraphs". The two with CUDA graphs need `regional=False`.
            regional (`bool`, defaults to True): compile only the repeated transformer blocks (diffusers'
                `compile_repeated_blocks`; a few small graphs, short compile), or the whole UNet (False: one
                graph per call layout, longer compile, no eager code between blocks).
            fullgraph (`bool`, defaults to True): raise on a graph break instead of splitting the graph.
            dynamic (`bool`, defaults to False): static shapes, one graph per size (what CUDA graphs need);
                True traces sizes symbolically.
            backend (`str`, defaults to "inductor"): the `torch.compile` backend ("aot_eager" traces without
                generating code, for checks).

        Returns: the pipeline.
        """
        compile_unet(self.unet, mode=mode, regional=regional, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
        return self

    def prepare_control_image(self, image, width, height, batch_size, num_images_per_prompt, device, dtype):
        """The control image as diffusers' SDXL ControlNet pipeline prepares it: one row per image."""
        image = self.control_image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        repeat_by = batch_size if image.shape[0] == 1 else num_images_per_prompt
        return image.repeat_interleave(repeat_by, dim=0).to(device=device, dtype=dtype)

    def _check_call(self, height, width, num_inference_steps, guidance_scale, guidance_rescale, image, prompts: dict,
                    num_images_per_prompt, eta, denoising_end, clip_skip, timesteps, sigmas) -> None:
        """ValueError naming the first bad argument (diffusers' own and ours) and what it may be."""
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                check_side(name, value, strict=True)
        _check_schedule(num_inference_steps, timesteps, sigmas)
        REQUEST["guidance_scale"].check(guidance_scale)
        check_number("guidance_rescale", guidance_rescale, high=1.0)
        check_number("eta", eta, high=1.0)
        if denoising_end is not None and not (is_number(denoising_end) and 0 < denoising_end <= 1):
            raise ValueError(f"denoising_end must be None or a fraction in (0, 1], got {denoising_end!r}")
        if clip_skip is not None and not (is_integer(clip_skip) and clip_skip >= 0):
            raise ValueError(f"clip_skip must be None or an integer >= 0, got {clip_skip!r}")
        num_images_per_prompt = 1 if num_images_per_prompt is None else num_images_per_prompt
        check_integer("num_images_per_prompt", num_images_per_prompt, 1, MAX_ROWS, strict=True)
        for name, prompt in prompts.items():
            if prompt is None:
                continue
            items = prompt if isinstance(prompt, list) else [prompt]
            if not items or not all(isinstance(item, str) for item in items):
                raise ValueError(f"{name} must be a string or a non-empty list of strings, got {short_repr(prompt)}")
            for item in items:
                check_text(name, item, MAX_PROMPT_CHARS)
            if name == "prompt" and len(items) * num_images_per_prompt > MAX_ROWS:
                raise ValueError(f"len(prompt) x num_images_per_prompt must be at most {MAX_ROWS} images, got "
                                 f"{len(items)} x {num_images_per_prompt}")
        if self.controlnet is None and image is not None:
            raise ValueError("a control `image` was given, but this pipeline has no `controlnet` component")
        if self.controlnet is not None and image is None:
            raise ValueError("this pipeline has a ControlNet: pass the control `image`")

    def _controls(self, image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                  control_mode) -> "Controls | None":
        """The control inputs, checked (see Controls.from_arguments); None without a ControlNet."""
        net = self.controlnet
        if net is None:
            if control_mode is not None:
                raise ValueError(f"control_mode was given ({control_mode!r}), but this pipeline has no `controlnet`")
            return None
        return Controls.from_arguments(net, image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, control_mode)

    # Over 80 lines for its signature (diffusers' arguments, the ControlNet's and the guidance's, one a line as
    # in diffusers) and its docstring; the body is the outline of a call, its steps the methods below.
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        # ControlNet
        image=None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_mode: int | list[int] | None = None,
        # Guidance
        seg_scale: float = GUIDANCE["seg_scale"].default,
        seg_blur_sigma: float = GUIDANCE["seg_blur_sigma"].default,
        seg_applied_layers: Sequence[str] = GUIDANCE["seg_applied_layers"].default,
        seg_blur_target: str = GUIDANCE["seg_blur_target"].default,
        seg_blur_kernel: str = GUIDANCE["seg_blur_kernel"].default,
        pag_scale: float = GUIDANCE["pag_scale"].default,
        pag_applied_layers: Sequence[str] = GUIDANCE["pag_applied_layers"].default,
        pag_adaptive_scale: float = GUIDANCE["pag_adaptive_scale"].default,
        sag_scale: float = GUIDANCE["sag_scale"].default,
        sag_blur_sigma: float = GUIDANCE["sag_blur_sigma"].default,
        perturbation_guidance_start: float = GUIDANCE["perturbation_guidance_start"].default,
        perturbation_guidance_end: float = GUIDANCE["perturbation_guidance_end"].default,
        guidance_methods: Sequence[GuidanceMethod] | None = None,
        **kwargs,
    ):
        r"""Generate images. Arguments not listed here are those of `StableDiffusionXLPipeline.__call__`.

        Args:
            image (`PipelineImageInput` or `list`, *optional*): the control image; required when the pipeline
                has a `controlnet`, refused otherwise. With several controls (a MultiControlNetModel, or a
                union model given a list of modes) a list with one image per control.
            controlnet_conditioning_scale (`float` or `list[float]`, defaults to 1.0): ControlNet residual
                scale, in [0, 10]; a list gives one per control.
            guess_mode (`bool`, defaults to False): ControlNet guess mode, as in diffusers.
            control_guidance_start / control_guidance_end (`float` or `list[float]`, defaults to 0.0 / 1.0):
                the fraction of steps in which the ControlNet (each control, given lists) is applied.
            control_mode (`int` or `list[int]`, *optional*): with a ControlNetUnionModel, the control type of
                each control image (for xinsir's union model: 0 openpose, 1 depth, 2 hed/pidi/scribble/ted,
                3 canny/lineart/anime_lineart/mlsd, 4 normal, 5 segment, 6 tile, 7 repaint); required there.
{guidance_arguments}
            guidance_methods (`list[GuidanceMethod]`, *optional*): method objects to use instead of the
                `seg_*`, `pag_*` and `sag_*` arguments.
        """
        given = locals()
        guidance = {name: given[name] for name in GUIDANCE}  # (the signature's, listed once: see test_pipeline)
        callbacks = _Callbacks(callback_on_step_end, callback_on_step_end_tensor_inputs,
                               kwargs.pop("callback", None), kwargs.pop("callback_steps", None))
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
        # Ours: every argument checked (named, with its range), then the controls and the guidance methods.
        prompts = dict(prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt,
                       negative_prompt_2=negative_prompt_2)
        self._check_call(height, width, num_inference_steps, guidance_scale, guidance_rescale, image, prompts,
                         num_images_per_prompt, eta, denoising_end, clip_skip, timesteps, sigmas)
        controls = self._controls(image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                                  control_mode)
        methods = self._guidance_methods(guidance_methods, guidance)
        self._start_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs, denoising_end)

        # The set-up of diffusers 0.42 StableDiffusionXLPipeline.__call__ and its ControlNet pipelines, in
        # their order (each step's method names its source).
        rows = _batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device
        height, width, control_images, guess = self._size_and_control_images(
            controls, height, width, rows, num_images_per_prompt, guess_mode, device)
        self.check_inputs(
            prompt, prompt_2, height, width, callbacks.legacy_steps, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds, callbacks.tensor_inputs,
        )
        embeds = self._encode(prompts, num_images_per_prompt, device, cross_attention_kwargs, prompt_embeds,
                              negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        timesteps, num_inference_steps, num_warmup_steps = self._schedule(
            num_inference_steps, timesteps, sigmas, denoising_end, device)
        latents = self.prepare_latents(
            rows, self.unet.config.in_channels, height, width, embeds[0].dtype, device, generator, latents)
        time_ids = self._time_ids(embeds, (height, width), original_size, crops_coords_top_left, target_size,
                                  negative_original_size, negative_crops_coords_top_left, negative_target_size)
        # Ours: the conditioning by role, the UNet call with ControlNet residuals per role, the guided loop.
        conditioning = self._conditioning(embeds, time_ids, rows, device, ip_adapter_image, ip_adapter_image_embeds)
        model = ControlledUNet(self.unet, self.controlnet, conditioning, controls, control_images, guess,
                               self._timestep_cond(rows, device, latents.dtype), cross_attention_kwargs)
        latents = self._denoise(model, methods, latents, timesteps, num_inference_steps, num_warmup_steps,
                                self.prepare_extra_step_kwargs(generator, eta), callbacks)

        image = latents if output_type == "latent" else self.decode_latents_to_images(latents, output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=image) if return_dict else (image,)

    # The guidance arguments' entries, from their options (written once, there).
    __call__.__doc__ = __call__.__doc__.replace("{guidance_arguments}", arguments_doc(GUIDANCE))

    # ---- the set-up of a call -------------------------------------------------------------------------

    def _guidance_methods(self, guidance_methods, guidance: dict) -> list[GuidanceMethod]:
        """The methods to apply (``guidance_methods``, else those the guidance arguments ask for), those at
        scale 0 left out, their layer names resolved against the UNet now, for a ValueError before any work
        (GuidedStep resolves them again when it patches the UNet: cheap, and the same names)."""
        if guidance_methods is None:
            guidance_methods = build_guidance_methods(**guidance)
        methods = [m for m in guidance_methods if m.scale > 0]
        for method in methods:
            method.bind(self.unet)
        return methods

    def _start_call(self, guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs, denoising_end):
        # Adapted from diffusers 0.42 StableDiffusionXLPipeline.__call__ ("2. Define call parameters"): the
        # properties its helpers and callbacks read (do_classifier_free_guidance, clip_skip, interrupt, ...).
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False

    def _size_and_control_images(self, controls, height, width, rows, num_images_per_prompt, guess_mode, device):
        """(height, width, the control images prepared, guess mode on).

        Adapted from diffusers 0.42 StableDiffusionXLPipeline.__call__ (the default size) and
        StableDiffusionXLControlNetPipeline.__call__ ("4. Prepare image": the size is the control image's;
        guess mode is on for a ControlNet with global pooling)."""
        if controls is None:
            default = self.default_sample_size * self.vae_scale_factor
            return height or default, width or default, [], False
        net = self.controlnet
        first = net.nets[0] if isinstance(net, MultiControlNetModel) else net
        images = [self.prepare_control_image(item, width, height, rows, num_images_per_prompt, device, net.dtype)
                  for item in controls.images]
        height, width = images[0].shape[-2:]
        return height, width, images, guess_mode or first.config.global_pool_conditions

    def _encode(self, prompts: dict, num_images_per_prompt, device, cross_attention_kwargs, *embeds) -> tuple:
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds), as
        diffusers 0.42 StableDiffusionXLPipeline.__call__ encodes them ("3. Encode input prompt")."""
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return self.encode_prompt(
            **prompts, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance, **dict(zip(names, embeds)),
            lora_scale=lora_scale, clip_skip=self.clip_skip,
        )

    def _schedule(self, num_inference_steps, timesteps, sigmas, denoising_end, device):
        """(timesteps, num_inference_steps, num_warmup_steps): adapted from diffusers 0.42
        StableDiffusionXLPipeline.__call__ ("4. Prepare timesteps", and "8.1 Apply denoising_end")."""
        timestep_device = "cpu" if device.type == "neuron" else device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        if denoising_end is not None and isinstance(denoising_end, float) and 0 < denoising_end < 1:
            cutoff = int(round(self.scheduler.config.num_train_timesteps * (1 - denoising_end)))
            num_inference_steps = len([ts for ts in timesteps if ts >= cutoff])
            timesteps = timesteps[:num_inference_steps]
        return timesteps, num_inference_steps, num_warmup_steps

    def _time_ids(self, embeds, size, original_size, crops_coords_top_left, target_size, negative_original_size,
                  negative_crops_coords_top_left, negative_target_size):
        """(add_time_ids, negative_add_time_ids): SDXL's micro-conditioning, adapted from diffusers 0.42
        StableDiffusionXLPipeline.__call__ ("7. Prepare added time ids & embeddings")."""
        prompt_embeds, _, pooled_prompt_embeds, _ = embeds
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size or size, crops_coords_top_left, target_size or size, dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        if negative_original_size is not None and negative_target_size is not None:
            return add_time_ids, self._get_add_time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size,
                dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim,
            )
        return add_time_ids, add_time_ids

    def _conditioning(self, embeds, time_ids, rows, device, ip_adapter_image, ip_adapter_image_embeds) -> dict:
        """The UNet's conditioning by role ("cond"; "uncond" with CFG): branch k of a UNet call gets the
        tensors of its role (seg_core.methods.Branch). Ours: diffusers concatenates [uncond, cond] instead."""
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = embeds
        add_time_ids, negative_add_time_ids = time_ids
        do_cfg = self.do_classifier_free_guidance
        conditioning = {"cond": {"prompt_embeds": prompt_embeds.to(device),
                                 "text_embeds": pooled_prompt_embeds.to(device),
                                 "time_ids": add_time_ids.to(device).repeat(rows, 1)}}
        if do_cfg:
            conditioning["uncond"] = {"prompt_embeds": negative_prompt_embeds.to(device),
                                      "text_embeds": negative_pooled_prompt_embeds.to(device),
                                      "time_ids": negative_add_time_ids.to(device).repeat(rows, 1)}
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            # diffusers' IP-Adapter embeddings ([uncond, cond] halves with CFG), split by role.
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, rows, do_cfg
            )
            for embeds_k in image_embeds:
                halves = embeds_k.chunk(2) if do_cfg else (None, embeds_k)
                for role, half in zip(("uncond", "cond"), halves):
                    if half is not None:
                        conditioning[role].setdefault("image_embeds", []).append(half)
        return conditioning

    def _timestep_cond(self, rows, device, dtype):
        """The guidance-scale embedding of guidance-distilled UNets (LCM), as diffusers 0.42
        StableDiffusionXLPipeline.__call__ makes it ("9. Optionally get Guidance Scale Embedding"); else None."""
        if self.unet.config.time_cond_proj_dim is None:
            return None
        guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(rows)
        return self.get_guidance_scale_embedding(
            guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
        ).to(device=device, dtype=dtype)

    # ---- the denoising loop ---------------------------------------------------------------------------

    def _denoise(self, model: ControlledUNet, methods, latents, timesteps, num_inference_steps, num_warmup_steps,
                 extra_step_kwargs, callbacks: "_Callbacks") -> torch.Tensor:
        """The denoising loop of diffusers 0.42 StableDiffusionXLPipeline.__call__ ("8. Denoising loop"), with
        its noise prediction replaced by ours: one guided step (seg_core.methods.GuidedStep) of ``methods``.
        As in diffusers, CFG's scale and flag are read at every step, so a callback may change them."""
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        conditioning = model.conditioning
        with GuidedStep(methods, self.unet, self.share_down_blocks).installed() as guided, \
                self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model.at_step(i, len(timesteps))
                x = self.scheduler.scale_model_input(latents, t)
                do_cfg = self.do_classifier_free_guidance
                _check_roles(conditioning, do_cfg, self.guidance_scale, i)
                noise_pred = guided(model, x, t, i, len(timesteps), self.scheduler,
                                    self.guidance_scale, do_cfg, self.guidance_rescale)

                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)
                if callbacks.on_step_end is not None:
                    latents = self._step_end(callbacks, i, t, latents, conditioning, do_cfg)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callbacks.legacy is not None and i % callbacks.legacy_steps == 0:
                        callbacks.legacy(i // getattr(self.scheduler, "order", 1), t, latents)
        return latents

    def _step_end(self, callbacks: "_Callbacks", i, t, latents, conditioning, do_cfg) -> torch.Tensor:
        """diffusers' ``callback_on_step_end``: it sees and may replace the latents and the embeddings."""
        callback_kwargs = self._callback_tensors(callbacks.tensor_inputs, latents, conditioning, do_cfg)
        outputs = callbacks.on_step_end(self, i, t, callback_kwargs)
        latents = outputs.pop("latents", latents)
        # Returned embeddings are laid out for the next step, as the callback has left CFG.
        self._apply_callback_tensors(outputs, conditioning, self.do_classifier_free_guidance)
        return latents

    _callback_roles = {"prompt_embeds": "prompt_embeds", "add_text_embeds": "text_embeds", "add_time_ids": "time_ids"}

    def _callback_tensors(self, names, latents, conditioning, do_cfg):
        """The tensors callbacks ask for, laid out as in diffusers ([uncond, cond] with CFG)."""
        tensors = {"latents": latents}
        for name, key in self._callback_roles.items():
            parts = [conditioning[r][key] for r in (("uncond", "cond") if do_cfg else ("cond",))]
            tensors[name] = torch.cat(parts)
        return {name: tensors[name] for name in names}

    def _apply_callback_tensors(self, outputs, conditioning, do_cfg):
        rows = conditioning["cond"]["prompt_embeds"].shape[0]
        roles = ("uncond", "cond") if do_cfg else ("cond",)
        for name, key in self._callback_roles.items():
            if name in outputs:
                if outputs[name].shape[0] != len(roles) * rows:
                    raise ValueError(f"callback returned {name} with {outputs[name].shape[0]} rows; with "
                                     f"classifier-free guidance {'on' if do_cfg else 'off'} it needs "
                                     f"{len(roles)} x {rows} ({' then '.join(roles)})")
                for role, part in zip(roles, outputs[name].split(rows)):
                    conditioning.setdefault(role, {})[key] = part

    def decode_latents_to_images(self, latents: torch.Tensor, output_type: str = "pil"):
        """Decode latents with the VAE exactly as StableDiffusionXLPipeline does, then post-process."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        elif latents.dtype != self.vae.dtype and torch.backends.mps.is_available():
            self.vae = self.vae.to(latents.dtype)
        mean = getattr(self.vae.config, "latents_mean", None)
        std = getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        latents = latents.to(get_module_execution_device(self.vae))
        image = self.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)


class _Callbacks:
    """diffusers' step callbacks: ``callback_on_step_end`` (with the tensors it asks for) and the deprecated
    ``callback`` every ``callback_steps`` steps."""

    def __init__(self, on_step_end, tensor_inputs, legacy, legacy_steps):
        if isinstance(on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = on_step_end.tensor_inputs
        self.on_step_end, self.tensor_inputs = on_step_end, tensor_inputs
        self.legacy, self.legacy_steps = legacy, legacy_steps


def _batch_size(prompt, prompt_embeds) -> int:
    """The number of prompts (as diffusers 0.42 StableDiffusionXLPipeline.__call__ counts them)."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    if prompt_embeds is None:
        raise ValueError("pass `prompt` (a string or list of strings; '' for unconditional) or `prompt_embeds`")
    return prompt_embeds.shape[0]


def _check_roles(conditioning: dict, do_cfg: bool, guidance_scale, step: int) -> None:
    """ValueError where CFG is on (a callback may turn it on) but the unconditional tensors are missing."""
    missing = sorted(conditioning["cond"].keys() - conditioning.get("uncond", {}).keys()) if do_cfg else []
    if missing:
        raise ValueError(f"guidance_scale became {guidance_scale} at step {step}, but there are no "
                         f"unconditional {', '.join(missing)}: a callback that turns CFG on must return "
                         "[uncond, cond] rows of prompt_embeds, add_text_embeds and add_time_ids")


def _check_schedule(num_inference_steps, timesteps, sigmas) -> None:
    """ValueError unless the steps are given as diffusers takes them: a count, or custom timesteps or sigmas
    (then ``num_inference_steps`` is ignored and may be None)."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass either custom `timesteps` or custom `sigmas`, not both")
    custom = timesteps if timesteps is not None else sigmas
    if custom is not None:
        name = "timesteps" if timesteps is not None else "sigmas"
        if not 1 <= len(custom) <= MAX_STEPS:
            raise ValueError(f"{name} must hold 1 to {MAX_STEPS} values, got {len(custom)}")
        return  # num_inference_steps is ignored, as in diffusers
    check_integer("num_inference_steps", num_inference_steps, 1, MAX_STEPS, strict=True)
