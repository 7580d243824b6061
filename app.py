"""Gradio demo of Smoothed Energy Guidance (SEG) for SDXL, with vanilla SDXL, SAG and PAG to compare.

UI only: layout, events and input checks. Generation (seeds, progress, UNet counting, grids, PNG
metadata, the per-model lock) lives in seg_core.studio.  `python app.py --help` lists the flags.
"""

from __future__ import annotations

try:  # on a ZeroGPU Space `spaces` must be imported before anything initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

import argparse
import base64
import binascii
import dataclasses
import functools
import html
import inspect
import logging
import math
import os
import random
import re
from pathlib import Path

import gradio as gr
from gradio.context import LocalContext
from gradio.data_classes import ImageData
from gradio_client.utils import is_http_url_like
from pydantic import ConfigDict, model_validator
from starlette.middleware import Middleware

from seg_core.guard import FILE_REFUSED, RequestGuard, is_upload
from seg_core.studio import (
    GenerationCancelled,
    Limits,
    Settings,
    Studio,
    format_sigma,
    parse_sigma,
    parse_values,
)
from seg_core.control import Detection
from seg_core.presets import model_for_hardware
from seg_core.space import ABOUT, CITATION, LICENSE_NOTE, PAPER_URL, duplicate_hint, example_rows, rendered_examples
from seg_core.zerogpu import GPU, in_gpu_worker

logger = logging.getLogger("seg_app")

ASSETS = Path(__file__).resolve().parent / "assets"
QUEUE_SIZE = 16  # requests waiting; more are refused with "queue is full"
SWEEP_AXES = {"none": "none", "SEG scale": "seg_scale", "CFG scale": "guidance_scale"}

# Small results (the embedded model's 32 px, tiny's 64 px) fill their frame with visible pixels; SDXL's are
# shown as they are. Sent through gr.HTML so that build_demo() is complete without launch(css=...).
PIXELATED_STYLE = """<style>
#result img, #compare-slider img, #control-map img { image-rendering: pixelated; width: 100%; height: 100%;
  object-fit: contain; }
#compare-gallery img, #result-images img { image-rendering: pixelated; }
</style>"""
# Every model: on a phone the results (tabs, buttons) come above the settings, and the gallery is 2 x 2.
PHONE_STYLE = """<style>
@media (max-width: 760px) {
  #outputs { order: -1; }
  #compare-gallery .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }
  #compare-gallery, #compare-gallery .grid-wrap { height: auto !important; max-height: none !important; }
}
</style>"""

# Amber border, a translucent amber wash and the theme's own text colour: readable on light and dark themes.
BANNER_STYLE = ("border: 2px solid #e0a800; background: rgba(224, 168, 0, 0.14); color: inherit; "
                "border-radius: 8px; padding: 8px 14px; line-height: 1.45")


def banner_html(markdown: str) -> str:
    """The studio's banner (bold, code and paragraphs only) as an HTML box that needs no CSS file."""
    text = html.escape(markdown)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    paragraphs = "".join(f"<p style='margin: 4px 0'>{p}</p>" for p in text.split("\n\n"))
    return f"<div role='alert' style='{BANNER_STYLE}'>{paragraphs}</div>"


#: The σ slider is in log2 σ; its top, 2^14 > 9999, is infinite as for the authors (seg_core.parse_sigma).
LOG2_SIGMA_MAX = 14.0
LOG2_SIGMA_DEFAULT = 4.0  # σ 16, where unticking "infinite σ" starts


def sigma_label(log2_sigma: float, infinite: bool) -> str:
    if infinite or log2_sigma >= LOG2_SIGMA_MAX:
        return "Blur σ = ∞ (slider at its top, 14; move it for a finite σ)"
    return f"Blur σ = {2 ** log2_sigma:.4g}   (slider in log₂ σ: 0 → 1, 2 → 4, 4 → 16, ...; 14 = ∞)"


def sigma_from_ui(log2_sigma: float, infinite: bool) -> float:
    return math.inf if infinite or float(log2_sigma) >= LOG2_SIGMA_MAX else 2.0 ** float(log2_sigma)


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in str(text).lower().replace("×", "x").split("x"))
    except ValueError:
        raise gr.Error(f"size must look like 1024x1024, got {text!r}") from None
    return width, height


def show_errors(fn):
    """Library errors (ValueError naming the bad value, RuntimeError for what cannot be loaded or out of
    memory) -> gr.Error with their message; anything else -> a short gr.Error, logged. The server goes on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except GenerationCancelled as error:
            raise gr.Error(str(error), print_exception=False) from error
        except (ValueError, RuntimeError, OSError) as error:
            raise gr.Error(str(error), print_exception=False) from error
        except Exception as error:
            logger.exception("request failed")
            raise gr.Error(f"the request failed ({type(error).__name__}); the server logged it",
                           print_exception=False) from error

    return wrapper


def cancellation_check():
    """For the Gradio event running this handler, a function that turns True once the event was
    cancelled (``/cancel``, e.g. ``job.cancel()`` in gradio_client) or its client went away (tab closed).

    Gradio cannot stop a handler's thread; it drops a cancelled event from its running jobs and marks
    the event of a lost client as not alive. Generation polls this after every denoising step.
    None outside a Gradio event (a direct call), and in a ZeroGPU worker: there the queue is the copy
    taken when the worker was forked, so it would call every later request cancelled; ZeroGPU bounds the
    work itself (the request's duration, seg_core.zerogpu).
    """
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None or in_gpu_worker():
        return None

    def should_stop() -> bool:
        for job in list(queue.active_jobs):
            for event in job or ():
                if event._id == event_id:
                    return not event.alive
        return True

    return should_stop


class ControlImageData(ImageData):
    model_config = ConfigDict(json_schema_extra={"description": (
        "An image file uploaded with the request (gradio_client: handle_file(path)); server paths and URLs "
        "are refused.")})

    @model_validator(mode="before")
    @classmethod
    def _not_a_file_payload(cls, value):
        """A bare string (a path) or any other non-object: no file, refused in preprocess like a path."""
        return value if isinstance(value, (dict, ImageData)) else {"path": ""}


class ControlImage(gr.Image):
    """An image input that hands the handler the bytes of a file Gradio received as an upload for this
    request (or one of the examples it ships, which Gradio copies into its upload folder), for seg_core to
    decode defensively. Anything else (a server path, with or without Gradio's ``meta``, a URL) is refused
    with seg_core.guard.FILE_REFUSED, the same words whatever the path; the request guard refuses it
    before it gets here, this is the second line."""

    is_template = True  # the frontend is gr.Image's
    data_model = ControlImageData

    def __init__(self, *args, max_upload_mb: float = Limits.max_upload_mb, **kwargs):
        super().__init__(*args, type="filepath", **kwargs)
        self.max_upload_mb = max_upload_mb

    def get_config(self, cls=None):
        # The frontend needs gr.Image's props (label, buttons, sources, ...), which Gradio collects from
        # the constructor's signature: ours has only *args / **kwargs.
        return super().get_config(cls or gr.Image)

    def example_inputs(self):
        return {"path": "assets/control_house.png", "meta": {"_type": "gradio.FileData"},
                "orig_name": "control_house.png"}

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        if url_or_file_path is not None and is_http_url_like(str(url_or_file_path)):
            raise gr.Error(FILE_REFUSED, print_exception=False)
        return await super().async_move_resource_to_block_cache(url_or_file_path)

    def preprocess(self, payload):
        if payload is None:
            return None
        limit = self.max_upload_mb * 2**20
        if payload.url and payload.url.startswith("data:") and not payload.path:
            encoded = payload.url.partition(",")[2]
            if len(encoded) * 3 / 4 > limit:
                raise gr.Error(f"control_image must be at most {self.max_upload_mb:g} MB, got "
                               f"{len(encoded) * 3 / 4 / 2**20:.1f} MB", print_exception=False)
            try:
                return base64.b64decode(encoded, validate=False)
            except (binascii.Error, ValueError):
                raise gr.Error("control_image: the data URL is not valid base64", print_exception=False) from None
        if not is_upload(payload.path):
            raise gr.Error(FILE_REFUSED, print_exception=False)
        with open(payload.path, "rb") as file:  # an upload: its size is ours to report
            data = file.read(int(limit) + 1)
        if len(data) > limit:
            raise gr.Error(f"control_image must be at most {self.max_upload_mb:g} MB", print_exception=False)
        return data


#: UI controls passed to Settings as they are (the panel's knobs and its second control).
UI_CONTROL_FIELDS = ("control_guidance_start", "control_guidance_end", "control_preprocess", "detect_resolution",
                     "canny_low_threshold", "canny_high_threshold", "openpose_hands", "openpose_face",
                     "control_type_2", "controlnet_conditioning_scale_2", "control_guidance_start_2",
                     "control_guidance_end_2", "control_preprocess_2")


def rendered_note(example: dict) -> str:
    """The caption of an example's results shown before anyone clicks."""
    what = f"“{example['prompt']}”" if example["prompt"] else "unconditional (no prompt)"
    return (f"Rendered ahead on this model: {what}, seed **{example['seed']}**, {example['steps']} steps, "
            f"CFG {example['guidance_scale']:g}. Run your own with the button above.")


def progress_reporter(progress: gr.Progress):
    return lambda done, total, label: progress((done, total), desc=f"{label}: step {done}/{total}", unit="steps")


def run_table(runs) -> str:
    rows = ["| Method | Time (s) | UNet evaluations | per step |", "|---|---:|---:|---:|"]
    for run in runs:
        info = run.info()
        seconds = "(one loop)" if run.one_loop else f"{info['seconds']:.2f}"
        rows.append(f"| {run.label} | {seconds} | {info['unet_evaluations']} | "
                    f"{info['unet_evaluations_per_step']:g} |")
    return "\n".join(rows)


def build_demo(model: str = "tiny", device: str | None = None, studio: Studio | None = None,
               limits: Limits | None = None, queue_size: int = QUEUE_SIZE, compile: bool = False) -> gr.Blocks:
    """The demo on ``model`` ("auto": SDXL with a GPU, else the embedded model; "sdxl", "embedded", "tiny",
    a Hub id or a folder); when it cannot be loaded, the embedded model (or tiny, without its weights) with a
    banner. Every model a request can use is loaded here, before ``launch()``.

    ``limits`` (seg_core.studio.Limits) bound every request; ``queue_size`` requests may wait, more are
    refused. Launch with ``demo.launch(**demo.launch_options, ...)`` to apply the upload and body size limits
    and the request guard (seg_core.guard).
    Only the operator picks the model: no request can name one. ``compile``: torch.compile the UNet.
    """
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
    notice = None
    if studio is None and model == "auto":
        model, notice = model_for_hardware()
        if notice:
            logger.warning(re.sub(r"[*`]", "", notice))
    studio = (studio or Studio(model, device=device, limits=limits, notice=notice, compile=compile)).preload()  # before launch()
    limits = studio.limits
    sizes = [(f"{w}×{h}", f"{w}x{h}") for w, h in studio.size_presets]
    control_choices = studio.control_types
    control_examples = sorted(str(p) for p in ASSETS.glob("control_*.png"))

    def ui_settings(values: dict):
        """Settings from the UI controls (sigma from the log2 slider, size from the preset, seed)."""
        width, height = parse_size(values["size"])
        seed = values["seed"]
        if values["randomize_seed"] or seed is None:
            seed = -1
        control_type = values["control_type"] or "none"
        if control_type != "none" and values["control_image"] is None:
            raise gr.Error(f"ControlNet '{control_type}': upload a control image or pick an example first")
        if (values["control_type_2"] or "none") != "none" and values["control_image_2"] is None:
            raise gr.Error(f"Second control '{values['control_type_2']}': upload its image first")
        settings = studio.settings(
            prompt=values["prompt"], negative_prompt=values["negative_prompt"], seed=seed,
            steps=int(values["steps"]), width=width, height=height,
            guidance_scale=float(values["guidance_scale"]), seg_scale=float(values["seg_scale"]),
            seg_blur_sigma=sigma_from_ui(values["log2_sigma"], values["infinite_sigma"]),
            seg_applied_layers=values["applied_layers"],
            perturbation_guidance_start=float(values["guidance_start"]),
            perturbation_guidance_end=float(values["guidance_end"]),
            control_type=control_type,
            controlnet_conditioning_scale=float(values["controlnet_conditioning_scale"]),
            **{name: values[name] for name in UI_CONTROL_FIELDS},
        )
        return settings, values["control_image"]

    def on_gpu(request_seconds):
        """``spaces.GPU`` asking, per request, for ``request_seconds(arguments)`` (computed in the server
        before the request is scheduled: a request that could never fit the quota is refused at once)."""

        def decorate(handler):
            signature = inspect.signature(handler)

            @show_errors
            def duration(*args, **kwargs):
                arguments = signature.bind(*args, **kwargs)
                arguments.apply_defaults()
                return request_seconds(dict(arguments.arguments))

            return GPU(handler, duration=duration)

        return decorate

    def ui_sweep_axes(values: dict):
        """The sweep's sigmas, second axis and its values from the UI controls."""
        sigmas = parse_values(values["sweep_sigmas"], "blur σ values", parse_sigma)
        axis = SWEEP_AXES.get(values["sweep_axis"], values["sweep_axis"])
        axis_values = parse_values(values["sweep_values"], f"{values['sweep_axis']} values") if axis != "none" else []
        return sigmas, axis, axis_values

    def api_sweep_axes(values: dict):
        """The sweep's sigmas, second axis and its values from the API's arguments."""
        sigmas = parse_values(values["seg_blur_sigmas"], "seg_blur_sigmas", parse_sigma)
        axis = values["second_axis"] or "none"
        if axis not in ("none", *SWEEP_AXES.values()):
            raise ValueError(f"second_axis must be 'none', 'seg_scale' or 'guidance_scale', got {axis!r}")
        axis_values = parse_values(values["second_axis_values"], "second_axis_values") if axis != "none" else []
        return sigmas, axis, axis_values

    # ---- UI event handlers (private: the API below has library-named arguments) -------------------

    @on_gpu(lambda values: studio.gpu_seconds("generate", ui_settings(values)[0], images=int(values["num_images"])))
    @show_errors
    def ui_generate(prompt, negative_prompt, seed, randomize_seed, size, steps, guidance_scale, seg_scale,
                    log2_sigma, infinite_sigma, applied_layers, guidance_start, guidance_end, control_type,
                    control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                    control_preprocess, detect_resolution, canny_low_threshold, canny_high_threshold, openpose_hands,
                    openpose_face, control_type_2, control_image_2, controlnet_conditioning_scale_2,
                    control_guidance_start_2, control_guidance_end_2, control_preprocess_2, num_images=1,
                    progress=gr.Progress()):
        settings, image = ui_settings(locals())
        runs, control = studio.generate_images(settings, int(num_images), image,
                                               progress=progress_reporter(progress), should_stop=cancellation_check(),
                                               control_image_2=control_image_2)
        run = runs[0]
        info = run.info()
        method = run.settings.method
        if settings.seg_scale > 0:
            method += f" (scale {settings.seg_scale:g}, σ {format_sigma(settings.seg_blur_sigma)})"
        seeds = (f"seed **{settings.seed}**" if len(runs) == 1
                 else f"seeds **{settings.seed}**–{runs[-1].settings.seed}")
        text = (f"**{method}** · {seeds} · {settings.width}×{settings.height} · "
                f"{settings.steps} steps · {sum(r.seconds for r in runs):.2f} s · "
                f"**{sum(r.unet_evaluations for r in runs)} UNet evaluations** "
                f"({info['unet_evaluations_per_step']:g} per step and image). The PNGs carry all settings.")
        more = gr.update(value=[(r.path, f"seed {r.settings.seed}") for r in runs], visible=len(runs) > 1)
        return run.path, more, settings.seed, text, control

    @on_gpu(lambda values: studio.gpu_seconds("compare", ui_settings(values)[0]))
    @show_errors
    def ui_compare(prompt, negative_prompt, seed, randomize_seed, size, steps, guidance_scale, seg_scale,
                   log2_sigma, infinite_sigma, applied_layers, guidance_start, guidance_end, control_type,
                   control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                    control_preprocess, detect_resolution, canny_low_threshold, canny_high_threshold, openpose_hands,
                    openpose_face, control_type_2, control_image_2, controlnet_conditioning_scale_2,
                    control_guidance_start_2, control_guidance_end_2, control_preprocess_2, sag_scale, pag_scale,
                   one_loop, progress=gr.Progress()):
        settings, image = ui_settings(locals())
        runs, control = studio.compare(settings, image, float(sag_scale), float(pag_scale),
                                       progress=progress_reporter(progress), should_stop=cancellation_check(),
                                       one_loop=bool(one_loop), control_image_2=control_image_2)
        paths = {run.label: run.path for run in runs}
        labels = list(paths)
        gallery = [(run.path, run.label) for run in runs]  # times and UNet evaluations: in the table
        how = (f"all four in one loop, {runs[0].seconds:.2f} s in all" if runs[0].one_loop
               else "one after another")
        return (
            gallery, f"Seed **{settings.seed}**, same settings for all four, {how}.\n\n" + run_table(runs),
            paths, gr.update(choices=labels, value=labels[0]), gr.update(choices=labels, value=labels[-1]),
            (paths[labels[0]], paths[labels[-1]]), list(paths.values()), settings.seed, control,
        )

    @on_gpu(lambda values: studio.gpu_seconds("sweep", ui_settings(values)[0], *ui_sweep_axes(values)))
    @show_errors
    def ui_sweep(prompt, negative_prompt, seed, randomize_seed, size, steps, guidance_scale, seg_scale,
                 log2_sigma, infinite_sigma, applied_layers, guidance_start, guidance_end, control_type,
                 control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                    control_preprocess, detect_resolution, canny_low_threshold, canny_high_threshold, openpose_hands,
                    openpose_face, control_type_2, control_image_2, controlnet_conditioning_scale_2,
                    control_guidance_start_2, control_guidance_end_2, control_preprocess_2, sweep_sigmas, sweep_axis,
                 sweep_values, progress=gr.Progress()):
        settings, image = ui_settings(locals())
        sigmas, axis, values = ui_sweep_axes(locals())
        sweep, control = studio.sweep(settings, sigmas, axis, values, image, progress=progress_reporter(progress),
                                      should_stop=cancellation_check(), control_image_2=control_image_2)
        info = sweep.info()
        text = (f"Seed **{settings.seed}** · {len(info['runs'])} images · {info['seconds']:.2f} s · "
                f"{info['unet_evaluations']} UNet evaluations. The PNG carries all settings and both axes.")
        return sweep.path, sweep.path, text, settings.seed, control

    @show_errors
    def ui_control_map(control_type, control_image, size, preprocess=True, detect_resolution=512, low=100, high=200,
                       hands=False, face=False):
        if control_type in (None, "none") or control_image is None:
            return None
        width, height = parse_size(size)
        detection = Detection(bool(preprocess), int(detect_resolution), int(low), int(high), bool(hands), bool(face))
        try:
            return studio.control_map(control_type, control_image, width, height, detection)
        except RuntimeError as error:
            gr.Warning(f"{error}. Choose 'canny' or 'none'.")
            return None

    # ---- API handlers: argument names are the library's; every one but `prompt` is optional -------

    def api_settings(values: dict):
        """Settings from an API handler's locals() (its parameters, named as Settings' fields)."""
        fields = {f.name for f in dataclasses.fields(Settings)}
        return studio.settings(**{k: v for k, v in values.items() if k in fields}), values.get("control_image")

    @on_gpu(lambda values: studio.gpu_seconds("generate", api_settings(values)[0]))
    @show_errors
    def generate(prompt: str, negative_prompt=None, seed=None, steps=None, width=None, height=None,
                 guidance_scale=None, seg_scale=None, seg_blur_sigma=None, seg_applied_layers=None, pag_scale=None,
                 sag_scale=None, perturbation_guidance_start=None, perturbation_guidance_end=None,
                 control_type=None, control_image=None, controlnet_conditioning_scale=None,
                 control_guidance_start=None, control_guidance_end=None, control_preprocess=None,
                 detect_resolution=None, canny_low_threshold=None, canny_high_threshold=None, openpose_hands=None,
                 openpose_face=None, control_type_2=None, control_image_2=None, controlnet_conditioning_scale_2=None,
                 control_guidance_start_2=None, control_guidance_end_2=None, control_preprocess_2=None, progress=gr.Progress()):
        """One image with SEG (and PAG / SAG if their scales are > 0). Returns the PNG (its metadata holds
        every setting) and a JSON summary (seed used, time, UNet evaluations). seed -1: random;
        seg_blur_sigma: a number, or "inf" (values > 9999 are infinite too)."""
        settings, image = api_settings(locals())
        run, _ = studio.generate(settings, image, progress=progress_reporter(progress),
                                 should_stop=cancellation_check(), control_image_2=control_image_2)
        return run.path, run.info()

    @on_gpu(lambda values: studio.gpu_seconds("compare", api_settings(values)[0]))
    @show_errors
    def compare(prompt: str, negative_prompt=None, seed=None, steps=None, width=None, height=None,
                guidance_scale=None, seg_scale=None, seg_blur_sigma=None, seg_applied_layers=None, pag_scale=None,
                sag_scale=None, perturbation_guidance_start=None, perturbation_guidance_end=None,
                control_type=None, control_image=None, controlnet_conditioning_scale=None, one_loop=False,
                control_guidance_start=None, control_guidance_end=None, control_preprocess=None,
                detect_resolution=None, canny_low_threshold=None, canny_high_threshold=None, openpose_hands=None,
                openpose_face=None, control_type_2=None, control_image_2=None, controlnet_conditioning_scale_2=None,
                control_guidance_start_2=None, control_guidance_end_2=None, control_preprocess_2=None,
                progress=gr.Progress()):
        """Vanilla, SAG (sag_scale), PAG (pag_scale) and SEG (seg_scale, seg_blur_sigma) from one seed; a
        scale left out is the model's default (SDXL: the paper's SAG 1, PAG 3, SEG 3). Returns the four labelled PNGs and, per method, its time and UNet evaluations. one_loop: all four
        in one denoising loop with batched UNet calls (same images; faster on a GPU; one time for all)."""
        values = locals()
        sag, pag, one_loop = values.pop("sag_scale"), values.pop("pag_scale"), values.pop("one_loop")
        if not isinstance(one_loop, bool):
            raise gr.Error(f"one_loop must be true or false, got {one_loop!r}", print_exception=False)
        settings, image = api_settings(values)
        runs, _ = studio.compare(settings, image, sag, pag, progress=progress_reporter(progress),
                                 should_stop=cancellation_check(), one_loop=one_loop,
                                 control_image_2=values["control_image_2"])
        return [(run.path, run.label) for run in runs], [run.info() for run in runs]

    @on_gpu(lambda values: studio.gpu_seconds("sweep", api_settings(values)[0], *api_sweep_axes(values)))
    @show_errors
    def sweep(prompt: str, negative_prompt=None, seed=None, steps=None, width=None, height=None,
              guidance_scale=None, seg_scale=None, seg_blur_sigmas="1, 4, 16, 64, inf", second_axis="none",
              second_axis_values="", seg_applied_layers=None, perturbation_guidance_start=None,
              perturbation_guidance_end=None, control_type=None, control_image=None,
              controlnet_conditioning_scale=None, control_guidance_start=None, control_guidance_end=None, control_preprocess=None,
                 detect_resolution=None, canny_low_threshold=None, canny_high_threshold=None, openpose_hands=None,
                 openpose_face=None, control_type_2=None, control_image_2=None, controlnet_conditioning_scale_2=None,
                 control_guidance_start_2=None, control_guidance_end_2=None, control_preprocess_2=None, progress=gr.Progress()):
        """A labelled grid: seg_blur_sigmas (e.g. "1, 4, 16, inf") as columns and, optionally, second_axis
        ("seg_scale" or "guidance_scale") over second_axis_values (e.g. "1, 3, 5") as rows; one seed."""
        values = locals()
        sigmas, axis, axis_values = api_sweep_axes(values)
        settings, image = api_settings(values)
        result, _ = studio.sweep(settings, sigmas, axis, axis_values, image, progress=progress_reporter(progress),
                                 should_stop=cancellation_check(), control_image_2=values["control_image_2"])
        return result.path, result.info()

    # ---- layout ---------------------------------------------------------------------------------------

    with gr.Blocks(title="Smoothed Energy Guidance (SDXL)", delete_cache=(3600, 7200)) as demo:
        gr.Markdown(
            "# Smoothed Energy Guidance for SDXL\n"
            f"[SEG]({PAPER_URL}) (Hong, NeurIPS 2024) guides a diffusion model away from a version of itself whose "
            "self-attention is blurred with a Gaussian of standard deviation σ; σ = ∞ makes every query the mean "
            "query. It needs no prompt and no training. Compare it with vanilla SDXL, SAG and PAG from the same "
            f"seed, or sweep σ as in the paper's figures. Model: `{studio.model_id}`."
        )
        banner = studio.banner
        gr.HTML(banner_html(banner) if banner else "", visible=bool(banner), elem_id="model-banner")
        space_id = os.environ.get("SPACE_ID")  # set on a Hugging Face Space
        if space_id:
            with gr.Row(equal_height=True):
                gr.Markdown(duplicate_hint(space_id), elem_id="duplicate-hint")
                gr.DuplicateButton(scale=0, min_width=200)
        rendered = rendered_examples(studio.model)  # outputs rendered ahead (scripts/render_examples.py)
        first = rendered[0] if rendered else None
        if max(studio.size_presets[0]) < 256:
            gr.HTML(PIXELATED_STYLE, visible="hidden")
        gr.HTML(PHONE_STYLE, visible="hidden")

        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                prompt = gr.Textbox(first and first["prompt"], label="Prompt", lines=2, elem_id="prompt",
                                    max_length=limits.max_prompt_chars,
                                    placeholder="Leave empty for unconditional generation, as in the paper")
                negative_prompt = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt",
                                             max_length=limits.max_prompt_chars)
                with gr.Row():
                    seg_scale = gr.Slider(0, 10, value=studio.profile.seg_scale, step=0.1, label="SEG scale",
                                          info="the authors keep 3 and vary σ", elem_id="seg-scale")
                    guidance_scale = gr.Slider(1, 15, value=studio.profile.guidance_scale, step=0.5, label="CFG scale",
                                               info=f"1 = no CFG, as in the paper's tables; "
                                                    f"{studio.profile.guidance_scale:g} suits this model",
                                               elem_id="cfg-scale")
                with gr.Row():
                    sigma = studio.profile.seg_blur_sigma
                    start = LOG2_SIGMA_MAX if math.isinf(sigma) else math.log2(sigma)
                    log2_sigma = gr.Slider(0, LOG2_SIGMA_MAX, value=start, step=0.5, scale=3,
                                           label=sigma_label(start, math.isinf(sigma)), elem_id="log2-sigma")
                    infinite_sigma = gr.Checkbox(value=math.isinf(sigma), label="infinite σ", elem_id="infinite-sigma",
                                                 scale=1, min_width=100)
                with gr.Row():
                    size = gr.Dropdown(sizes, value=sizes[0][1], label="Size (width × height)", elem_id="size")
                    steps = gr.Slider(1, min(100, limits.max_steps), value=studio.default_steps, step=1, label="Steps",
                                      elem_id="steps")
                with gr.Row(equal_height=True):
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (the one used is shown)",
                                     elem_id="seed", scale=3)
                    dice = gr.Button("New seed", size="sm", scale=0, min_width=90, elem_id="new-seed")
                    randomize_seed = gr.Checkbox(value=False, label="random seed each run", scale=2,
                                                 elem_id="randomize-seed")
                with gr.Accordion("Advanced", open=False):
                    applied_layers = gr.Dropdown(
                        ["mid", "down", "up"], value=["mid"], multiselect=True, allow_custom_value=True,
                        label="Applied layers (SEG, and PAG in Compare)", elem_id="applied-layers",
                        info="mid, down, up, or single self-attention layers such as m0, d4, u0",
                    )
                    with gr.Row():
                        guidance_start = gr.Slider(0, 1, value=0.0, step=0.05, elem_id="guidance-start",
                                                   label="Guidance from (fraction of steps)")
                        guidance_end = gr.Slider(0, 1, value=1.0, step=0.05, label="Guidance until",
                                                 elem_id="guidance-end")
                    with gr.Row():
                        sag_scale = gr.Slider(0.05, 5, value=studio.profile.sag_scale, step=0.05, label="SAG scale (Compare)",
                                              info="the paper compares with 1.0", elem_id="sag-scale")
                        pag_scale = gr.Slider(0.1, 10, value=studio.profile.pag_scale, step=0.1, label="PAG scale (Compare)",
                                              elem_id="pag-scale")
                with gr.Accordion("ControlNet", open=False):
                    control_type = gr.Radio(control_choices, value="none", label="ControlNet", elem_id="control-type",
                                            info=None if "depth" in control_choices else
                                            "depth needs its estimator's weights (Hub), not available here")
                    with gr.Row():
                        control_image = ControlImage(label="Control image", sources=["upload", "clipboard"],
                                                     height=200, elem_id="control-image",
                                                     max_upload_mb=limits.max_upload_mb)
                        control_map = gr.Image(label="Control map (what the ControlNet sees)", interactive=False,
                                               height=200, format="png", elem_id="control-map")
                    if control_examples:
                        gr.Examples(control_examples, inputs=[control_image], label="Example control images",
                                    elem_id="control-examples")
                    controlnet_conditioning_scale = gr.Slider(0, 2, value=1.0, step=0.05,
                                                              label="ControlNet conditioning scale",
                                                              elem_id="controlnet-scale")
                    with gr.Row():
                        control_guidance_start = gr.Slider(0, 1, value=0.0, step=0.05, label="Control from",
                                                           elem_id="control-start")
                        control_guidance_end = gr.Slider(0, 1, value=1.0, step=0.05, label="Control until",
                                                         elem_id="control-end")
                    control_preprocess = gr.Checkbox(True, label="Detect the map (off: the image already is a "
                                                     "control map)", elem_id="control-preprocess")
                    with gr.Row():
                        detect_resolution = gr.Slider(64, 2048, value=512, step=64, label="Detect resolution",
                                                      elem_id="detect-resolution")
                        canny_low_threshold = gr.Slider(0, 255, value=100, step=1, label="Canny low threshold",
                                                        elem_id="canny-low")
                        canny_high_threshold = gr.Slider(0, 255, value=200, step=1, label="Canny high threshold",
                                                         elem_id="canny-high")
                    with gr.Row():
                        openpose_hands = gr.Checkbox(False, label="OpenPose: hands", elem_id="openpose-hands")
                        openpose_face = gr.Checkbox(False, label="OpenPose: face", elem_id="openpose-face")
                    with gr.Accordion("Second control (read with the first by the union ControlNet)", open=False,
                                      elem_id="second-control"):
                        control_type_2 = gr.Radio(control_choices, value="none", label="Second control",
                                                  elem_id="control-type-2")
                        with gr.Row():
                            control_image_2 = ControlImage(label="Second control image", sources=["upload", "clipboard"],
                                                           height=200, elem_id="control-image-2",
                                                           max_upload_mb=limits.max_upload_mb)
                            control_map_2 = gr.Image(label="Second control map", interactive=False, height=200,
                                                     format="png", elem_id="control-map-2")
                        controlnet_conditioning_scale_2 = gr.Slider(0, 2, value=1.0, step=0.05,
                                                                    label="Second control's scale",
                                                                    elem_id="controlnet-scale-2")
                        with gr.Row():
                            control_guidance_start_2 = gr.Slider(0, 1, value=0.0, step=0.05, label="From",
                                                                 elem_id="control-start-2")
                            control_guidance_end_2 = gr.Slider(0, 1, value=1.0, step=0.05, label="Until",
                                                               elem_id="control-end-2")
                        control_preprocess_2 = gr.Checkbox(True, label="Detect the map (off: a ready map)",
                                                           elem_id="control-preprocess-2")

            with gr.Column(scale=3, min_width=340, elem_id="outputs"):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                        result = gr.Image(first and first["images"][-1][0], label="Result (PNG with settings)",
                                          type="filepath", format="png", interactive=False, height=512,
                                          elem_id="result")
                        result_info = gr.Markdown(first and rendered_note(first), elem_id="result-info")
                        result_images = gr.Gallery(label="All images of the request", columns=4, type="filepath",
                                                   format="png", object_fit="contain", height=230, visible=False,
                                                   elem_id="result-images")
                        num_images = gr.Slider(1, max(2, studio.max_images), value=1, step=1, elem_id="num-images",
                                               label="Images per request (seeds seed, seed + 1, ...)",
                                               visible=studio.max_images > 1)
                    with gr.Tab("Compare", id="compare"):
                        compare_button = gr.Button(f"Compare {studio.vanilla_label.lower()} · SAG · PAG · SEG", variant="primary",
                                                   elem_id="compare-button")
                        one_loop = gr.Checkbox(studio.pipeline().device.type == "cuda", elem_id="one-loop",
                                               label="All four in one loop (faster on a GPU, one time for all "
                                                     "four; the same images up to float rounding: a pixel may "
                                                     "differ by 1/255)")
                        gallery = gr.Gallery(first and first["images"], label="Same seed, same settings", columns=4,
                                             rows=1, type="filepath", format="png", object_fit="contain", height=230,
                                             elem_id="compare-gallery")
                        compare_info = gr.Markdown(first and rendered_note(first), elem_id="compare-info")
                        compare_paths = gr.State({})
                        with gr.Row():
                            left = gr.Dropdown([], label="Left", elem_id="slider-left")
                            right = gr.Dropdown([], label="Right", elem_id="slider-right")
                        pair = gr.ImageSlider(label="Drag to compare the pair", type="filepath", format="png",
                                              elem_id="compare-slider")
                        compare_files = gr.File(label="PNG files with settings", file_count="multiple")
                    with gr.Tab("Sweep", id="sweep"):
                        sweep_sigmas = gr.Textbox("1, 4, 16, 64, inf", label="Blur σ values (columns)",
                                                  info="comma-separated; inf = infinite", elem_id="sweep-sigmas")
                        with gr.Row():
                            sweep_axis = gr.Radio(list(SWEEP_AXES), value="none", label="Second axis (rows)",
                                                  elem_id="sweep-axis")
                            sweep_values = gr.Textbox("1, 3, 5", label="Second axis values", elem_id="sweep-values")
                        sweep_button = gr.Button("Sweep", variant="primary", elem_id="sweep-button")
                        # No label over the grid: it would hide the grid's own title (seed and prompt).
                        grid = gr.Image(label="Sweep (PNG with settings)", show_label=False, type="filepath",
                                        format="png", interactive=False, elem_id="sweep-grid")
                        grid_file = gr.File(label="Download the grid")
                        sweep_info = gr.Markdown()

        if rendered:  # each example with its four results, rendered ahead: clicking shows them at once
            preview = gr.Image(first["grid"], label="Rendered ahead: vanilla · SAG · PAG · SEG, same seed",
                               type="filepath", interactive=False, render=False, elem_id="example-preview")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    gr.Examples([[e["prompt"], e["negative_prompt"], e["guidance_scale"], e["seed"], e["steps"],
                                  e["grid"]] for e in rendered],
                                inputs=[prompt, negative_prompt, guidance_scale, seed, steps, preview],
                                example_labels=[e["prompt"] or "(no prompt: unconditional)" for e in rendered],
                                cache_examples=False, examples_per_page=16, elem_id="examples",
                                label="Examples with their results (the empty prompt is unconditional generation)")
                with gr.Column(scale=2):
                    preview.render()
        else:
            gr.Examples([list(row) for row in example_rows(studio.profile.prompts, studio.profile.guidance_scale)],
                        inputs=[prompt, negative_prompt, guidance_scale], cache_examples=False, elem_id="examples",
                        label="Examples (the empty prompt is unconditional generation)")

        with gr.Accordion("About SEG, the methods compared, and this demo", open=False, elem_id="about"):
            gr.Markdown(ABOUT)
            gr.Code(CITATION, label="Cite (BibTeX): SEG, and PAG and SAG if you compare with them",
                    interactive=False)
            gr.Markdown(LICENSE_NOTE)

        # ---- events ---------------------------------------------------------------------------------
        common = [prompt, negative_prompt, seed, randomize_seed, size, steps, guidance_scale, seg_scale, log2_sigma,
                  infinite_sigma, applied_layers, guidance_start, guidance_end, control_type, control_image,
                  controlnet_conditioning_scale, control_guidance_start, control_guidance_end, control_preprocess,
                  detect_resolution, canny_low_threshold, canny_high_threshold, openpose_hands, openpose_face,
                  control_type_2, control_image_2, controlnet_conditioning_scale_2, control_guidance_start_2,
                  control_guidance_end_2, control_preprocess_2]
        events = dict(concurrency_limit=1, concurrency_id="generation", api_visibility="private")
        generated = [result, result_images, seed, result_info, control_map]
        generate_button.click(ui_generate, common + [num_images], generated, **events)
        prompt.submit(ui_generate, common + [num_images], generated, **events)
        compare_button.click(ui_compare, common + [sag_scale, pag_scale, one_loop],
                             [gallery, compare_info, compare_paths, left, right, pair, compare_files, seed,
                              control_map], **events)
        sweep_button.click(ui_sweep, common + [sweep_sigmas, sweep_axis, sweep_values],
                           [grid, grid_file, sweep_info, seed, control_map], **events)

        def show_pair(paths, left_label, right_label):
            if left_label not in paths or right_label not in paths:
                return None
            return paths[left_label], paths[right_label]

        left.change(show_pair, [compare_paths, left, right], pair, api_visibility="private")
        right.change(show_pair, [compare_paths, left, right], pair, api_visibility="private")
        knobs = [detect_resolution, canny_low_threshold, canny_high_threshold, openpose_hands, openpose_face]
        for first, image, preprocess, shown in ((control_type, control_image, control_preprocess, control_map),
                                                (control_type_2, control_image_2, control_preprocess_2, control_map_2)):
            for trigger in (first.change, image.change, size.change, preprocess.change, *(k.change for k in knobs)):
                trigger(ui_control_map, [first, image, size, preprocess, *knobs], shown, api_visibility="private")
        # One σ on screen: the box and the tick agree (the slider's top is ∞).
        log2_sigma.input(lambda v: v >= LOG2_SIGMA_MAX, log2_sigma, infinite_sigma, api_visibility="private",
                         queue=False)
        infinite_sigma.input(lambda inf, v: LOG2_SIGMA_MAX if inf else (LOG2_SIGMA_DEFAULT if v >= LOG2_SIGMA_MAX else v),
                             [infinite_sigma, log2_sigma], log2_sigma, api_visibility="private", queue=False)
        for component in (log2_sigma, infinite_sigma):
            component.change(lambda v, inf: gr.update(label=sigma_label(v, inf)), [log2_sigma, infinite_sigma],
                             log2_sigma, api_visibility="private", queue=False)
        dice.click(lambda: random.randint(0, 2**32 - 1), None, seed, api_visibility="private", queue=False)

        # ---- API: hidden components whose values are the defaults -------------------------------------
        default_w, default_h = studio.size_presets[0]

        def api_inputs(**overrides):
            """Hidden inputs for an API endpoint, in the order of its function's parameters."""
            spec = {
                # (no precision=0: Gradio would round NaN itself and fail without a message; the studio
                # checks these integers and names the bad value)
                "prompt": lambda: gr.Textbox(None), "negative_prompt": lambda: gr.Textbox(""),
                "seed": lambda: gr.Number(-1),
                "steps": lambda: gr.Number(studio.default_steps),
                "width": lambda: gr.Number(default_w),
                "height": lambda: gr.Number(default_h),
                "guidance_scale": lambda: gr.Number(studio.profile.guidance_scale),
                "seg_scale": lambda: gr.Number(studio.profile.seg_scale),
                "seg_blur_sigma": lambda: gr.Textbox(format_sigma(studio.profile.seg_blur_sigma)),
                "seg_blur_sigmas": lambda: gr.Textbox("1, 4, 16, 64, inf"),
                "second_axis": lambda: gr.Textbox("none"), "second_axis_values": lambda: gr.Textbox(""),
                "seg_applied_layers": lambda: gr.Dropdown(["mid", "down", "up"], value=["mid"], multiselect=True,
                                                          allow_custom_value=True),
                "pag_scale": lambda: gr.Number(overrides.get("pag_scale", 0.0)),
                "sag_scale": lambda: gr.Number(overrides.get("sag_scale", 0.0)),
                "perturbation_guidance_start": lambda: gr.Number(0.0),
                "perturbation_guidance_end": lambda: gr.Number(1.0),
                "control_type": lambda: gr.Textbox("none"),
                "control_image": lambda: ControlImage(max_upload_mb=limits.max_upload_mb),
                "controlnet_conditioning_scale": lambda: gr.Number(1.0),
                "one_loop": lambda: gr.Checkbox(False),
                "control_guidance_start": lambda: gr.Number(0.0), "control_guidance_end": lambda: gr.Number(1.0),
                "control_preprocess": lambda: gr.Checkbox(True),
                "detect_resolution": lambda: gr.Number(512),
                "canny_low_threshold": lambda: gr.Number(100), "canny_high_threshold": lambda: gr.Number(200),
                "openpose_hands": lambda: gr.Checkbox(False), "openpose_face": lambda: gr.Checkbox(False),
                "control_type_2": lambda: gr.Textbox("none"),
                "control_image_2": lambda: ControlImage(max_upload_mb=limits.max_upload_mb),
                "controlnet_conditioning_scale_2": lambda: gr.Number(1.0),
                "control_guidance_start_2": lambda: gr.Number(0.0), "control_guidance_end_2": lambda: gr.Number(1.0),
                "control_preprocess_2": lambda: gr.Checkbox(True),
            }
            names = overrides["names"]
            return [spec[name]() for name in names]

        def parameter_names(fn):
            return [p for p in inspect.signature(fn).parameters if p != "progress"]

        with gr.Group(visible=False):
            for fn, outputs, overrides in (
                (generate, lambda: [gr.Image(type="filepath", format="png", label="image"), gr.JSON(label="info")], {}),
                (compare, lambda: [gr.Gallery(type="filepath", format="png", label="images"), gr.JSON(label="info")],
                 {"pag_scale": studio.profile.pag_scale, "sag_scale": studio.profile.sag_scale}),
                (sweep, lambda: [gr.Image(type="filepath", format="png", label="grid"), gr.JSON(label="info")], {}),
            ):
                inputs = api_inputs(names=parameter_names(fn), **overrides)
                gr.Button(visible=False).click(fn, inputs, outputs(), api_name=fn.__name__,
                                               concurrency_limit=1, concurrency_id="generation")

    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.studio = studio  # for tests and scripts
    public_api = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    guard = Middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, public_api=lambda: public_api)
    demo.launch_options = {"max_file_size": int(limits.max_upload_mb * 2**20),  # bytes
                           "app_kwargs": {"middleware": [guard]}}
    return demo


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
        if args.queue_size < 1:
            raise ValueError(f"queue_size must be a positive integer, got {args.queue_size}")
    except ValueError as error:
        parser.error(str(error))
    demo = build_demo(args.model, device=args.device, limits=limits, queue_size=args.queue_size, compile=args.compile)
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
