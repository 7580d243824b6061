"""Gradio demo of Smoothed Energy Guidance (SEG) for SDXL, with vanilla SDXL, SAG and PAG to compare.

A thin layer of widgets bound to one handler object (:class:`Handlers`): each handler converts widget values
(size preset, log2 σ slider, random seed) and calls seg_core.studio, which checks every value and applies the
model's defaults. The widgets are built from seg_core.options (seg_core.ui); the API's parameters are listed
once (PARAMETERS). `python app.py --help` lists the flags.
"""

from __future__ import annotations

try:  # on a ZeroGPU Space `spaces` must be imported before anything initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

import argparse
import dataclasses
import logging
import math
import os
import random
import re
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from seg_core.control import Detection
from seg_core.guard import RequestGuard
from seg_core.adapters import AdapterConfig, read_adapter_config
from seg_core.options import ADAPTERS, COMPARE_AND_SWEEP, DETECTION, MAX_SEED, OPTIONS, SWEEP_AXES, check_integer
from seg_core.presets import model_for_hardware
from seg_core.space import ABOUT, CITATION, LICENSE_NOTE, PAPER_URL, duplicate_hint, example_rows, rendered_examples
from seg_core.studio import Limits, Settings, Studio, format_sigma, parse_sigma, parse_values
from seg_core.ui import (
    LOG2_SIGMA_MAX,
    PHONE_STYLE,
    PIXELATED_STYLE,
    ControlImage,
    Widgets,
    api_widget,
    banner_html,
    bind,
    gpu,
    infinite_ticked,
    intro,
    log2_sigma,
    parse_size,
    rendered_note,
    run_table,
    sigma_from_ui,
    sigma_label,
    slider_after_tick,
    watched,
)

logger = logging.getLogger("seg_app")

ASSETS = Path(__file__).resolve().parent / "assets"
QUEUE_SIZE = 16  # requests waiting; more are refused with "queue is full"
MAX_QUEUE_SIZE = 10_000

#: Every option a widget or an API parameter sets, by name.
ALL = {**OPTIONS, **COMPARE_AND_SWEEP, **ADAPTERS}
SETTINGS_FIELDS = {field.name for field in dataclasses.fields(Settings)}

#: The API's parameters (a client may pass them by position: never reorder), named as seg_core.options names
#: them; the control images are files. /compare and /sweep edit this list (ENDPOINTS).
PARAMETERS = (
    "prompt", "negative_prompt", "seed", "steps", "width", "height", "guidance_scale", "seg_scale", "seg_blur_sigma",
    "seg_applied_layers", "pag_scale", "sag_scale", "perturbation_guidance_start", "perturbation_guidance_end",
    "control_type", "control_image", "controlnet_conditioning_scale", "control_guidance_start",
    "control_guidance_end", "control_preprocess", "detect_resolution", "canny_low_threshold", "canny_high_threshold",
    "openpose_hands", "openpose_face", "control_type_2", "control_image_2", "controlnet_conditioning_scale_2",
    "control_guidance_start_2", "control_guidance_end_2", "control_preprocess_2",
    "loras", "ip_adapter_image", "ip_adapter_scale",
)


def edited(names: tuple, **replace: tuple) -> tuple:
    """``names`` with each name in ``replace`` replaced by its tuple of names (empty: removed)."""
    return tuple(new for name in names for new in replace.get(name, (name,)))


ENDPOINTS = {
    "generate": PARAMETERS,
    "compare": edited(PARAMETERS, controlnet_conditioning_scale=("controlnet_conditioning_scale", "one_loop")),
    "sweep": edited(PARAMETERS, seg_blur_sigma=("seg_blur_sigmas", "second_axis", "second_axis_values"),
                    pag_scale=(), sag_scale=()),
}
API_OUTPUTS = {
    "generate": lambda: [gr.Image(type="filepath", format="png", label="image"), gr.JSON(label="info")],
    "compare": lambda: [gr.Gallery(type="filepath", format="png", label="images"), gr.JSON(label="info")],
    "sweep": lambda: [gr.Image(type="filepath", format="png", label="grid"), gr.JSON(label="info")],
}

#: The UI's inputs each request reads besides the settings panel (every other input widget).
UI_EXTRAS = {"generate": ("num_images",), "compare": ("sag_scale", "pag_scale", "one_loop"),
             "sweep": ("seg_blur_sigmas", "second_axis", "second_axis_values")}
#: What a control map's preview reads (the first control's names; the second's end in "_2").
CONTROL_MAP_INPUTS = ("control_type", "control_image", "size", "control_preprocess", *DETECTION)
PER_CONTROL = ("control_type", "control_image", "control_preprocess")


def model_defaults(studio: Studio) -> dict:
    """The options whose default is the model's: its profile's steps, first size, CFG, SEG scale and σ."""
    width, height = studio.size_presets[0]
    profile = studio.profile
    return {"steps": studio.default_steps, "width": width, "height": height,
            "guidance_scale": profile.guidance_scale, "seg_scale": profile.seg_scale,
            "seg_blur_sigma": profile.seg_blur_sigma}


def compare_defaults(studio: Studio) -> dict:
    """Compare's SAG and PAG scales: the model's."""
    return {"sag_scale": studio.profile.sag_scale, "pag_scale": studio.profile.pag_scale}


def api_defaults(studio: Studio, endpoint: str) -> dict:
    """An endpoint's defaults: its options', but none for the prompt (the one parameter a request must send), a
    random seed (-1), and the model's where it has one."""
    defaults = {name: option.default for name, option in ALL.items()}
    defaults.update(prompt=None, seed=-1, **model_defaults(studio))
    if endpoint == "compare":
        defaults.update(compare_defaults(studio))
    return defaults


# --------------------------------------------------------------------------------------------------
# The handlers
# --------------------------------------------------------------------------------------------------


class Handlers:
    """The demo's handlers, UI and API alike: each takes its inputs' values by name, converts the UI's own
    widgets and calls the studio, which checks every value (seg_core.studio: Studio.settings); then it
    shapes the result for the page or the API."""

    def __init__(self, studio: Studio):
        self.studio = studio

    def settings(self, values: dict) -> Settings:
        """The request's Settings: the values named as Settings' fields, plus the UI's size preset, log2 σ
        slider and "random seed" tick converted; what is left out or None is the model's default."""
        values = dict(values)
        if "size" in values:
            values["width"], values["height"] = parse_size(values.pop("size"))
        if "log2_sigma" in values:
            values["seg_blur_sigma"] = sigma_from_ui(values.pop("log2_sigma"), values.pop("infinite_sigma"))
        if values.pop("randomize_seed", False):
            values["seed"] = -1
        if "lora" in values:  # the page's one LoRA choice and its weight
            name, weight = values.pop("lora"), values.pop("lora_weight")
            values["loras"] = {} if name in (None, "none") else {name: weight}
        if "ip_adapter_strength" in values:  # the page's strength counts only with an image prompt
            strength = values.pop("ip_adapter_strength")
            values["ip_adapter_scale"] = None if values.get("ip_adapter_image") is None else strength
        return self.studio.settings(**{name: value for name, value in values.items() if name in SETTINGS_FIELDS})

    def compare_request(self, values: dict):
        """(settings, SAG scale, PAG scale, one loop) of a Compare request."""
        values = dict(values)
        sag_scale, pag_scale = values.pop("sag_scale"), values.pop("pag_scale")
        one_loop = values.pop("one_loop")
        return self.settings(values), sag_scale, pag_scale, one_loop

    def sweep_request(self, values: dict, sigmas_name: str = "seg_blur_sigmas",
                      values_name: str = "second_axis_values"):
        """(settings, sigmas, second axis, its values) of a Sweep request, the lists parsed from their text."""
        axis = values["second_axis"] or "none"
        text = values["second_axis_values"]
        rows = parse_values(text, values_name) if axis != "none" and str(text or "").strip() else []
        return self.settings(values), parse_values(values["seg_blur_sigmas"], sigmas_name, parse_sigma), axis, rows

    def _generate(self, values: dict, progress, count: int = 1):
        settings = self.settings(values)
        runs, control = self.studio.generate_images(settings, count, values["control_image"],
                                                    control_image_2=values["control_image_2"], **watched(progress))
        return settings, runs, control

    def _compare(self, values: dict, progress):
        settings, sag_scale, pag_scale, one_loop = self.compare_request(values)
        runs, control = self.studio.compare(settings, values["control_image"], sag_scale, pag_scale, one_loop=one_loop,
                                            control_image_2=values["control_image_2"], **watched(progress))
        return settings, runs, control

    def _sweep(self, values: dict, progress, *names: str):
        settings, sigmas, axis, rows = self.sweep_request(values, *names)
        sweep, control = self.studio.sweep(settings, sigmas, axis, rows, values["control_image"],
                                           control_image_2=values["control_image_2"], **watched(progress))
        return settings, sweep, control

    # ---- the API: parameters named as the library's; every one but `prompt` optional ------------------

    @gpu(lambda self, values: self.studio.gpu_seconds("generate", self.settings(values)))
    def generate(self, values: dict, progress):
        """One image with SEG (and PAG / SAG if their scales are > 0). Returns the PNG (its metadata holds
        every setting) and a JSON summary (seed used, time, UNet evaluations). seed -1: random;
        seg_blur_sigma: a number, or "inf" (infinite: every query the mean query)."""
        _, runs, _ = self._generate(values, progress)
        return runs[0].path, runs[0].info()

    @gpu(lambda self, values: self.studio.gpu_seconds("compare", self.compare_request(values)[0]))
    def compare(self, values: dict, progress):
        """Vanilla, SAG (sag_scale), PAG (pag_scale) and SEG (seg_scale, seg_blur_sigma) from one seed; a
        scale left out is the model's default (SDXL: the paper's SAG 1, PAG 3, SEG 3). Returns the four labelled PNGs and, per method, its time and UNet evaluations. one_loop: all four
        in one denoising loop with batched UNet calls (same images; faster on a GPU; one time for all)."""
        _, runs, _ = self._compare(values, progress)
        return [(run.path, run.label) for run in runs], [run.info() for run in runs]

    @gpu(lambda self, values: self.studio.gpu_seconds("sweep", *self.sweep_request(values)))
    def sweep(self, values: dict, progress):
        """A labelled grid: seg_blur_sigmas (e.g. "1, 4, 16, inf") as columns and, optionally, second_axis
        ("seg_scale" or "guidance_scale") over second_axis_values (e.g. "1, 3, 5") as rows; one seed."""
        _, sweep, _ = self._sweep(values, progress)
        return sweep.path, sweep.info()

    # ---- the page (private events: the API above has library-named arguments) ---------------------------

    @gpu(lambda self, values: self.studio.gpu_seconds("generate", self.settings(values),
                                                      images=int(values["num_images"])))
    def ui_generate(self, values: dict, progress):
        settings, runs, control = self._generate(values, progress, int(values["num_images"]))
        more = gr.update(value=[(r.path, f"seed {r.settings.seed}") for r in runs], visible=len(runs) > 1)
        return runs[0].path, more, settings.seed, generate_note(settings, runs), control

    @gpu(lambda self, values: self.studio.gpu_seconds("compare", self.compare_request(values)[0]))
    def ui_compare(self, values: dict, progress):
        settings, runs, control = self._compare(values, progress)
        paths = {run.label: run.path for run in runs}
        labels = list(paths)
        gallery = [(run.path, run.label) for run in runs]  # times and UNet evaluations: in the table
        how = f"all four in one loop, {runs[0].seconds:.2f} s in all" if runs[0].one_loop else "one after another"
        return (
            gallery, f"Seed **{settings.seed}**, same settings for all four, {how}.\n\n" + run_table(runs),
            paths, gr.update(choices=labels, value=labels[0]), gr.update(choices=labels, value=labels[-1]),
            (paths[labels[0]], paths[labels[-1]]), list(paths.values()), settings.seed, control,
        )

    @gpu(lambda self, values: self.studio.gpu_seconds("sweep", *self.sweep_request(values, *UI_SWEEP_NAMES)))
    def ui_sweep(self, values: dict, progress):
        settings, sweep, control = self._sweep(values, progress, *UI_SWEEP_NAMES)
        info = sweep.info()
        text = (f"Seed **{settings.seed}** · {len(info['runs'])} images · {info['seconds']:.2f} s · "
                f"{info['unet_evaluations']} UNet evaluations. The PNG carries all settings and both axes.")
        return sweep.path, sweep.path, text, settings.seed, control

    def ui_control_map(self, values: dict):
        """The preview of a control's map (nothing until it has a type and an image)."""
        if values["control_type"] in (None, "none") or values["control_image"] is None:
            return None
        width, height = parse_size(values["size"])
        detection = Detection(bool(values["control_preprocess"]), int(values["detect_resolution"]),
                              int(values["canny_low_threshold"]), int(values["canny_high_threshold"]),
                              bool(values["openpose_hands"]), bool(values["openpose_face"]))
        try:
            return self.studio.control_map(values["control_type"], values["control_image"], width, height, detection)
        except RuntimeError as error:
            gr.Warning(f"{error}. Choose 'canny' or 'none'.")
            return None


#: How the page names the sweep's lists in an error (the API uses the parameters' names).
UI_SWEEP_NAMES = ("blur σ values", "second axis values")


def generate_note(settings: Settings, runs) -> str:
    """What Generate shows under its image."""
    method = runs[0].settings.method
    if settings.seg_scale > 0:
        method += f" (scale {settings.seg_scale:g}, σ {format_sigma(settings.seg_blur_sigma)})"
    seeds = f"seed **{settings.seed}**" if len(runs) == 1 else f"seeds **{settings.seed}**–{runs[-1].settings.seed}"
    return (f"**{method}** · {seeds} · {settings.width}×{settings.height} · {settings.steps} steps · "
            f"{sum(r.seconds for r in runs):.2f} s · **{sum(r.unet_evaluations for r in runs)} UNet evaluations** "
            f"({runs[0].info()['unet_evaluations_per_step']:g} per step and image). The PNGs carry all settings.")


def show_pair(paths: dict, left_label: str, right_label: str):
    if left_label not in paths or right_label not in paths:
        return None
    return paths[left_label], paths[right_label]


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------


def build_demo(model: str = "tiny", device: str | None = None, studio: Studio | None = None,
               limits: Limits | None = None, queue_size: int = QUEUE_SIZE, compile: bool = False,
               adapters: AdapterConfig | None = None) -> gr.Blocks:
    """The demo on ``model`` ("auto": SDXL with a GPU, else the embedded model; "sdxl", "embedded", "tiny",
    a Hub id or a folder); when it cannot be loaded, the embedded model (or tiny, without its weights) with a
    banner. Every model a request can use is loaded here, before ``launch()``.

    ``limits`` (seg_core.studio.Limits) bound every request; ``queue_size`` requests may wait, more are
    refused. Launch with ``demo.launch(**demo.launch_options, ...)`` to apply the upload and body size limits
    and the request guard (seg_core.guard).
    Only the operator picks the model: no request can name one. ``compile``: torch.compile the UNet.
    ``adapters``: the operator's LoRAs and IP-Adapter (seg_core.adapters), offered in an "Adapters" panel.
    """
    queue_size = check_integer("queue_size", queue_size, 1, MAX_QUEUE_SIZE)
    notice = None
    if studio is None and model == "auto":
        model, notice = model_for_hardware()
        if notice:
            logger.warning(re.sub(r"[*`]", "", notice))
    studio = (studio or Studio(model, device=device, limits=limits, notice=notice, compile=compile,
                                adapters=adapters)).preload()  # before launch()
    handlers, inputs, shown = Handlers(studio), Widgets(), Widgets()
    rendered = rendered_examples(studio.model)  # outputs rendered ahead (scripts/render_examples.py)
    with gr.Blocks(title="Smoothed Energy Guidance (SDXL)", delete_cache=(3600, 7200)) as demo:
        page_header(studio)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                settings_panel(studio, inputs, shown, rendered[0] if rendered else None)
            with gr.Column(scale=3, min_width=340, elem_id="outputs"):
                result_tabs(studio, inputs, shown, rendered[0] if rendered else None)
        examples(studio, inputs, rendered)
        about(studio)
        wire_requests(handlers, inputs, shown)
        wire_page(handlers, inputs, shown)
        api_endpoints(handlers, studio)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.studio = studio  # for tests and scripts
    public_api = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    guard = Middleware(RequestGuard, max_body_bytes=studio.limits.max_body_bytes, public_api=lambda: public_api)
    demo.launch_options = {"max_file_size": int(studio.limits.max_upload_mb * 2**20),  # bytes
                           "app_kwargs": {"middleware": [guard]}}
    return demo


def page_header(studio: Studio) -> None:
    gr.Markdown(intro(PAPER_URL, studio.model_id))
    banner = studio.banner
    gr.HTML(banner_html(banner) if banner else "", visible=bool(banner), elem_id="model-banner")
    space_id = os.environ.get("SPACE_ID")  # set on a Hugging Face Space
    if space_id:
        with gr.Row(equal_height=True):
            gr.Markdown(duplicate_hint(space_id), elem_id="duplicate-hint")
            gr.DuplicateButton(scale=0, min_width=200)
    if max(studio.size_presets[0]) < 256:
        gr.HTML(PIXELATED_STYLE, visible="hidden")
    gr.HTML(PHONE_STYLE, visible="hidden")


def settings_panel(studio: Studio, inputs: Widgets, shown: Widgets, first: dict | None) -> None:
    """The settings every request reads (Compare's SAG and PAG scales too, in "Advanced")."""
    defaults, chars = model_defaults(studio), studio.limits.max_prompt_chars
    inputs.option(ALL["prompt"], first and first["prompt"], info=None, lines=2, elem_id="prompt", max_length=chars,
                  placeholder="Leave empty for unconditional generation, as in the paper")
    inputs.option(ALL["negative_prompt"], lines=1, elem_id="negative-prompt", max_length=chars)
    with gr.Row():
        inputs.option(ALL["seg_scale"], defaults["seg_scale"], elem_id="seg-scale")
        inputs.option(ALL["guidance_scale"], defaults["guidance_scale"], elem_id="cfg-scale",
                      info=f"{ALL['guidance_scale'].help} {defaults['guidance_scale']:g} suits this model.")
    with gr.Row():
        start, infinite = log2_sigma(defaults["seg_blur_sigma"]), math.isinf(defaults["seg_blur_sigma"])
        inputs.add("log2_sigma", gr.Slider(0, LOG2_SIGMA_MAX, value=start, step=0.5, scale=3,
                                           label=sigma_label(start, infinite), elem_id="log2-sigma"))
        inputs.add("infinite_sigma", gr.Checkbox(value=infinite, label="infinite σ", elem_id="infinite-sigma",
                                                 scale=1, min_width=100))
    with gr.Row():
        sizes = [(f"{w}×{h}", f"{w}x{h}") for w, h in studio.size_presets]
        inputs.add("size", gr.Dropdown(sizes, value=sizes[0][1], label="Size (width × height)", elem_id="size"))
        inputs.option(ALL["steps"], defaults["steps"], maximum=min(ALL["steps"].slider[1], studio.limits.max_steps),
                      elem_id="steps")
    with gr.Row(equal_height=True):
        inputs.option(ALL["seed"], 0, info=None, precision=0, minimum=0, elem_id="seed", scale=3)
        shown.add("dice", gr.Button("New seed", size="sm", scale=0, min_width=90, elem_id="new-seed"))
        inputs.add("randomize_seed", gr.Checkbox(value=False, label="random seed each run", scale=2,
                                                 elem_id="randomize-seed"))
    with gr.Accordion("Advanced", open=False):
        advanced(studio, inputs)
    with gr.Accordion("ControlNet", open=False):
        control_panel(studio, inputs, shown)
    if studio.adapters is not None:
        with gr.Accordion("Adapters", open=False, elem_id="adapters"):
            adapter_panel(studio.adapters, inputs, studio.limits.max_upload_mb)


def advanced(studio: Studio, inputs: Widgets) -> None:
    scales = compare_defaults(studio)
    inputs.option(ALL["seg_applied_layers"], elem_id="applied-layers")
    with gr.Row():
        inputs.option(ALL["perturbation_guidance_start"], elem_id="guidance-start")
        inputs.option(ALL["perturbation_guidance_end"], elem_id="guidance-end")
    with gr.Row():
        inputs.option(ALL["sag_scale"], scales["sag_scale"], label="SAG scale (Compare)",
                      info="the paper compares with 1.0", elem_id="sag-scale")
        inputs.option(ALL["pag_scale"], scales["pag_scale"], label="PAG scale (Compare)", info=None,
                      elem_id="pag-scale")


def control_panel(studio: Studio, inputs: Widgets, shown: Widgets) -> None:
    """The ControlNet panel: a control, the detectors' knobs, and a second control."""
    choices = studio.control_types
    # (no help under the radios: its words, 'none' among them, would sit beside the choices)
    missing = None if "depth" in choices else "depth needs its estimator's weights (Hub), not available here"
    inputs.option(ALL["control_type"], choices=choices, info=missing, elem_id="control-type")
    control_images(inputs, shown, "", studio.limits.max_upload_mb)
    examples = sorted(str(p) for p in ASSETS.glob("control_*.png"))
    if examples:
        gr.Examples(examples, inputs=[inputs["control_image"]], label="Example control images",
                    elem_id="control-examples")
    control_strength(inputs, "")
    with gr.Row():
        for name, elem_id in (("detect_resolution", "detect-resolution"), ("canny_low_threshold", "canny-low"),
                              ("canny_high_threshold", "canny-high")):
            inputs.option(ALL[name], elem_id=elem_id)
    with gr.Row():
        inputs.option(ALL["openpose_hands"], elem_id="openpose-hands")
        inputs.option(ALL["openpose_face"], elem_id="openpose-face")
    with gr.Accordion("Second control (read with the first by the union ControlNet)", open=False,
                      elem_id="second-control"):
        inputs.option(ALL["control_type_2"], choices=choices, info=None, elem_id="control-type-2")
        control_images(inputs, shown, "_2", studio.limits.max_upload_mb)
        control_strength(inputs, "_2")


def adapter_panel(config: AdapterConfig, inputs: Widgets, max_upload_mb: float) -> None:
    """The operator's adapters: one LoRA and its weight, an image prompt and its strength."""
    if config.loras:
        choices = [("none", "none")] + [(lora_label(spec), name) for name, spec in config.loras.items()]
        first = next(iter(config.loras.values()))
        with gr.Row():
            lora = inputs.add("lora", gr.Dropdown(choices, value="none", label=ADAPTERS["loras"].label,
                                                  elem_id="lora"))
            weight = inputs.add("lora_weight", gr.Slider(*first.weight_range, value=first.default_weight, step=0.05,
                                                         label="LoRA weight", elem_id="lora-weight"))
        lora.change(lambda name: lora_weight_slider(config, name), lora, weight, api_visibility="private",
                    queue=False)
    if config.ip_adapter is not None:
        spec = config.ip_adapter
        inputs.add("ip_adapter_image", ControlImage(label="Image prompt (IP-Adapter)", sources=["upload", "clipboard"],
                                                    height=200, elem_id="ip-adapter-image",
                                                    max_upload_mb=max_upload_mb))
        inputs.add("ip_adapter_strength", gr.Slider(*spec.scale_range, value=spec.default_scale, step=0.05,
                                                    label=ADAPTERS["ip_adapter_scale"].label,
                                                    elem_id="ip-adapter-scale"))


def lora_label(spec) -> str:
    trigger = f", trigger “{spec.trigger}”" if spec.trigger else ""
    return f"{spec.name}{trigger} ({spec.license})"


def lora_weight_slider(config: AdapterConfig, name: str):
    """The weight slider over the chosen LoRA's range, at its default weight."""
    spec = config.loras.get(name)
    if spec is None:
        return gr.update()
    return gr.update(minimum=spec.weight_range[0], maximum=spec.weight_range[1], value=spec.default_weight)


def adapter_licenses(config: AdapterConfig) -> str:
    """The About text naming each adapter this server offers and its license."""
    lines = [f"- LoRA `{name}`: {spec.license}" for name, spec in config.loras.items()]
    if config.ip_adapter is not None:
        lines.append(f"- IP-Adapter (`{config.ip_adapter.source}`): {config.ip_adapter.license}")
    return "**Adapters on this server** (chosen by its operator), and their licenses:\n\n" + "\n".join(lines)


def control_images(inputs: Widgets, shown: Widgets, suffix: str, max_upload_mb: float) -> None:
    """A control's image and, beside it, the map the ControlNet sees."""
    second, dash = ("Second control", "-2") if suffix else ("Control", "")
    with gr.Row():
        inputs.add(f"control_image{suffix}", ControlImage(
            label=f"{second} image", sources=["upload", "clipboard"], height=200, elem_id=f"control-image{dash}",
            max_upload_mb=max_upload_mb))
        shown.add(f"control_map{suffix}", gr.Image(
            label=f"{second} map" + ("" if suffix else " (what the ControlNet sees)"), interactive=False, height=200,
            format="png", elem_id=f"control-map{dash}"))


def control_strength(inputs: Widgets, suffix: str) -> None:
    """A control's scale, window and whether its image is detected or already a map."""
    dash = "-2" if suffix else ""
    inputs.option(ALL[f"controlnet_conditioning_scale{suffix}"], elem_id=f"controlnet-scale{dash}")
    with gr.Row():
        inputs.option(ALL[f"control_guidance_start{suffix}"], elem_id=f"control-start{dash}")
        inputs.option(ALL[f"control_guidance_end{suffix}"], elem_id=f"control-end{dash}")
    inputs.option(ALL[f"control_preprocess{suffix}"], elem_id=f"control-preprocess{dash}")


def result_tabs(studio: Studio, inputs: Widgets, shown: Widgets, first: dict | None) -> None:
    with gr.Tabs():
        with gr.Tab("Generate", id="generate"):
            generate_tab(studio, inputs, shown, first)
        with gr.Tab("Compare", id="compare"):
            compare_tab(studio, inputs, shown, first)
        with gr.Tab("Sweep", id="sweep"):
            sweep_tab(inputs, shown)


def generate_tab(studio: Studio, inputs: Widgets, shown: Widgets, first: dict | None) -> None:
    shown.add("generate_button", gr.Button("Generate", variant="primary", elem_id="generate-button"))
    shown.add("result", gr.Image(first and first["images"][-1][0], label="Result (PNG with settings)",
                                 type="filepath", format="png", interactive=False, height=512, elem_id="result"))
    shown.add("result_info", gr.Markdown(first and rendered_note(first), elem_id="result-info"))
    shown.add("result_images", gr.Gallery(label="All images of the request", columns=4, type="filepath",
                                          format="png", object_fit="contain", height=230, visible=False,
                                          elem_id="result-images"))
    inputs.add("num_images", gr.Slider(1, max(2, studio.max_images), value=1, step=1, elem_id="num-images",
                                       label="Images per request (seeds seed, seed + 1, ...)",
                                       visible=studio.max_images > 1))


def compare_tab(studio: Studio, inputs: Widgets, shown: Widgets, first: dict | None) -> None:
    shown.add("compare_button", gr.Button(f"Compare {studio.vanilla_label.lower()} · SAG · PAG · SEG",
                                          variant="primary", elem_id="compare-button"))
    inputs.option(ALL["one_loop"], studio.pipeline().device.type == "cuda", info=None, elem_id="one-loop")
    shown.add("gallery", gr.Gallery(first and first["images"], label="Same seed, same settings", columns=4, rows=1,
                                    type="filepath", format="png", object_fit="contain", height=230,
                                    elem_id="compare-gallery"))
    shown.add("compare_info", gr.Markdown(first and rendered_note(first), elem_id="compare-info"))
    shown.add("compare_paths", gr.State({}))
    with gr.Row():
        shown.add("left", gr.Dropdown([], label="Left", elem_id="slider-left"))
        shown.add("right", gr.Dropdown([], label="Right", elem_id="slider-right"))
    shown.add("pair", gr.ImageSlider(label="Drag to compare the pair", type="filepath", format="png",
                                     elem_id="compare-slider"))
    shown.add("compare_files", gr.File(label="PNG files with settings", file_count="multiple"))


def sweep_tab(inputs: Widgets, shown: Widgets) -> None:
    inputs.option(ALL["seg_blur_sigmas"], elem_id="sweep-sigmas")
    with gr.Row():
        axes = [("none", "none"), *((ALL[axis].label, axis) for axis in SWEEP_AXES)]
        inputs.option(ALL["second_axis"], choices=axes, info=None, elem_id="sweep-axis")
        inputs.option(ALL["second_axis_values"], "1, 3, 5", info=None, elem_id="sweep-values")
    shown.add("sweep_button", gr.Button("Sweep", variant="primary", elem_id="sweep-button"))
    # No label over the grid: it would hide the grid's own title (seed and prompt).
    shown.add("grid", gr.Image(label="Sweep (PNG with settings)", show_label=False, type="filepath", format="png",
                               interactive=False, elem_id="sweep-grid"))
    shown.add("grid_file", gr.File(label="Download the grid"))
    shown.add("sweep_info", gr.Markdown())


def examples(studio: Studio, inputs: Widgets, rendered: list[dict]) -> None:
    """The model's example prompts; each with its four results, rendered ahead, where they ship."""
    if not rendered:
        gr.Examples([list(row) for row in example_rows(studio.profile.prompts, studio.profile.guidance_scale)],
                    inputs=inputs("prompt", "negative_prompt", "guidance_scale"), cache_examples=False,
                    elem_id="examples", label="Examples (the empty prompt is unconditional generation)")
        return
    preview = gr.Image(rendered[0]["grid"], label="Rendered ahead: vanilla · SAG · PAG · SEG, same seed",
                       type="filepath", interactive=False, render=False, elem_id="example-preview")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.Examples([[e["prompt"], e["negative_prompt"], e["guidance_scale"], e["seed"], e["steps"], e["grid"]]
                         for e in rendered],
                        inputs=[*inputs("prompt", "negative_prompt", "guidance_scale", "seed", "steps"), preview],
                        example_labels=[e["prompt"] or "(no prompt: unconditional)" for e in rendered],
                        cache_examples=False, examples_per_page=16, elem_id="examples",
                        label="Examples with their results (the empty prompt is unconditional generation)")
        with gr.Column(scale=2):
            preview.render()


def about(studio: Studio) -> None:
    with gr.Accordion("About SEG, the methods compared, and this demo", open=False, elem_id="about"):
        gr.Markdown(ABOUT)
        gr.Code(CITATION, label="Cite (BibTeX): SEG, and PAG and SAG if you compare with them", interactive=False)
        gr.Markdown(LICENSE_NOTE)
        if studio.adapters is not None:
            gr.Markdown(adapter_licenses(studio.adapters), elem_id="adapter-licenses")


# --------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------


def wire_requests(handlers: Handlers, inputs: Widgets, shown: Widgets) -> None:
    """Generate, Compare and Sweep: each reads the settings panel and its own inputs (UI_EXTRAS)."""
    extras = {name for names in UI_EXTRAS.values() for name in names}
    panel = [name for name in inputs if name not in extras]
    every = Widgets({**inputs, **shown})
    outputs = {
        "generate": ("result", "result_images", "seed", "result_info", "control_map"),
        "compare": ("gallery", "compare_info", "compare_paths", "left", "right", "pair", "compare_files", "seed",
                    "control_map"),
        "sweep": ("grid", "grid_file", "sweep_info", "seed", "control_map"),
    }
    triggers = {"generate": (shown["generate_button"].click, inputs["prompt"].submit),
                "compare": (shown["compare_button"].click,), "sweep": (shown["sweep_button"].click,)}
    for kind, names in UI_EXTRAS.items():
        handler = bind(getattr(handlers, f"ui_{kind}"), [*panel, *names])
        for trigger in triggers[kind]:
            trigger(handler, inputs(*panel, *names), every(*outputs[kind]), concurrency_limit=1,
                    concurrency_id="generation", api_visibility="private")


def wire_page(handlers: Handlers, inputs: Widgets, shown: Widgets) -> None:
    """What changes on the page alone: the control maps, the pair slider, one σ on screen, a new seed."""
    control_map = bind(handlers.ui_control_map, CONTROL_MAP_INPUTS)
    for suffix in ("", "_2"):
        names = [name + suffix if name in PER_CONTROL else name for name in CONTROL_MAP_INPUTS]
        for widget in inputs(*names):
            widget.change(control_map, inputs(*names), shown[f"control_map{suffix}"], api_visibility="private")
    pair = shown("compare_paths", "left", "right")
    for dropdown in shown("left", "right"):
        dropdown.change(show_pair, pair, shown["pair"], api_visibility="private")
    # One σ on screen: the box and the tick agree (the slider's top is ∞).
    log2, infinite = inputs("log2_sigma", "infinite_sigma")
    private = dict(api_visibility="private", queue=False)
    log2.input(infinite_ticked, log2, infinite, **private)
    infinite.input(slider_after_tick, [infinite, log2], log2, **private)
    for component in (log2, infinite):
        component.change(lambda v, inf: gr.update(label=sigma_label(v, inf)), [log2, infinite], log2, **private)
    shown["dice"].click(lambda: random.randint(0, MAX_SEED), None, inputs["seed"], **private)


def api_endpoints(handlers: Handlers, studio: Studio) -> None:
    """/generate, /compare and /sweep: hidden inputs whose values are the parameters' defaults."""
    with gr.Group(visible=False):
        for name, parameters in ENDPOINTS.items():
            defaults = api_defaults(studio, name)
            hidden = [api_widget(ALL.get(p), defaults.get(p), studio.limits.max_upload_mb) for p in parameters]
            gr.Button(visible=False).click(bind(getattr(handlers, name), parameters, required=("prompt",)), hidden,
                                           API_OUTPUTS[name](), api_name=name, concurrency_limit=1,
                                           concurrency_id="generation")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Gradio demo of Smoothed Energy Guidance for SDXL.")
    parser.add_argument("--model", default="auto",
                        help="'auto' (default: 'sdxl' with a GPU, else 'embedded'), 'sdxl' (SDXL base 1.0; "
                             "forces it on a CPU too), 'embedded' (the small trained offline model), "
                             "'tiny' (offline random weights), "
                             "or any SDXL Hub id / local folder")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also create a public Gradio share link")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, mps, cpu (default: best)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (faster steps; the first request at each size and set of "
                             "methods waits for compilation)")
    parser.add_argument("--adapters", default=os.environ.get("SEG_ADAPTERS") or None, metavar="PATH.json",
                        help="the LoRAs and IP-Adapter requests may choose (README.md, Adapters; $SEG_ADAPTERS)")
    defaults = Limits()
    limit = parser.add_argument_group("limits (what one request may ask for; see README.md, Limits)")
    limit.add_argument("--max-pixels", type=int, default=_env("SEG_MAX_PIXELS", int, defaults.max_pixels),
                       help=f"width x height of one image (default {defaults.max_pixels}; $SEG_MAX_PIXELS)")
    limit.add_argument("--max-steps", type=int, default=_env("SEG_MAX_STEPS", int, defaults.max_steps),
                       help=f"denoising steps per image, at most 1000 (default {defaults.max_steps}; $SEG_MAX_STEPS)")
    limit.add_argument("--max-prompt-chars", type=int,
                       default=_env("SEG_MAX_PROMPT_CHARS", int, defaults.max_prompt_chars),
                       help=f"characters per prompt (default {defaults.max_prompt_chars}; $SEG_MAX_PROMPT_CHARS)")
    limit.add_argument("--max-upload-mb", type=float, default=_env("SEG_MAX_UPLOAD_MB", float, defaults.max_upload_mb),
                       help=f"control image file size in MB (default {defaults.max_upload_mb:g}; $SEG_MAX_UPLOAD_MB)")
    limit.add_argument("--max-body-mb", type=float, default=_env("SEG_MAX_BODY_MB", float, defaults.max_body_mb),
                       help="one HTTP request body in MB, refused before it is read (default: room for a base64 "
                            "upload at --max-upload-mb, + 2 MB; $SEG_MAX_BODY_MB)")
    limit.add_argument("--memory-budget-gb", type=float,
                       default=_env("SEG_MEMORY_BUDGET_GB", float, defaults.memory_budget_gb),
                       help=f"memory one request may use beyond the weights; sizes and methods (SAG) that "
                            f"need more are refused (default {defaults.memory_budget_gb:g}; $SEG_MEMORY_BUDGET_GB)")
    limit.add_argument("--max-image-side", type=int,
                       default=_env("SEG_MAX_IMAGE_SIDE", int, defaults.max_image_side),
                       help=f"control image sides in pixels (default {defaults.max_image_side}; $SEG_MAX_IMAGE_SIDE)")
    limit.add_argument("--queue-size", type=int, default=_env("SEG_QUEUE_SIZE", int, QUEUE_SIZE),
                       help=f"requests that may wait; more are refused (default {QUEUE_SIZE}; $SEG_QUEUE_SIZE)")
    args = parser.parse_args(argv)
    try:
        limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars,
                        max_upload_mb=args.max_upload_mb, max_image_side=args.max_image_side,
                        max_body_mb=args.max_body_mb, memory_budget_gb=args.memory_budget_gb)
        check_integer("queue_size", args.queue_size, 1, MAX_QUEUE_SIZE)  # before any model loads
        adapters = read_adapter_config(args.adapters) if args.adapters else None
    except (ValueError, OSError) as error:
        parser.error(str(error))
    demo = build_demo(args.model, device=args.device, limits=limits, queue_size=args.queue_size, compile=args.compile,
                      adapters=adapters)
    # share=None, not False: without --share, $GRADIO_SHARE decides (Gradio ignores share on a Space)
    demo.launch(server_name=args.host, server_port=args.port, share=True if args.share else None,
                **demo.launch_options)


def _env(name: str, kind, default):
    """An operator setting from the environment (a bad value stops the server with its name)."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return kind(text)
    except ValueError:
        raise SystemExit(f"${name} must be a number, got {text!r}") from None


if __name__ == "__main__":
    main()
