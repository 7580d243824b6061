"""The demo's Gradio pieces (app.py lays them out): widgets built from the options, the UI's own conversions
(size preset, log2 σ slider), the control-image input that takes uploads only, errors and cancellation.

Each widget that sets an option is built by :func:`option_widget` from seg_core.options (label, slider range,
help, default; the model's default where it has one): no label, range or default is written twice.
"""

from __future__ import annotations

import base64
import binascii
import functools
import html
import inspect
import logging
import math
import re

import gradio as gr
from gradio.context import LocalContext
from gradio.data_classes import ImageData
from gradio_client.utils import is_http_url_like
from pydantic import ConfigDict, model_validator

from .guard import FILE_REFUSED, is_upload
from .options import Option, format_sigma
from .studio import GenerationCancelled, Limits
from .zerogpu import GPU, in_gpu_worker

logger = logging.getLogger("seg_app")

#: The layer names a dropdown offers (single layers such as m0, d4, u0 may be typed too).
LAYER_CHOICES = ["mid", "down", "up"]


# --------------------------------------------------------------------------------------------------
# Widgets from options
# --------------------------------------------------------------------------------------------------


class Widgets(dict):
    """Components by name: an option's name where the widget sets that option (``seg_scale``), else what it
    is (``size``, ``log2_sigma``, ``generate_button``)."""

    def __call__(self, *names: str) -> list:
        return [self[name] for name in names]

    def add(self, name: str, component: gr.Component) -> gr.Component:
        self[name] = component
        return component

    def option(self, option: Option, value=None, **kwargs) -> gr.Component:
        """The widget of ``option`` (:func:`option_widget`), kept under the option's name."""
        return self.add(option.name, option_widget(option, value, **kwargs))


def option_widget(option: Option, value=None, **kwargs) -> gr.Component:
    """The widget of ``option``: a slider over its slider range, a number, a checkbox (a flag), a radio (a
    choice), a dropdown (layers) or a textbox; its label, its help as info; ``value``: the model's default,
    else the option's. ``kwargs`` (elem_id, layout, a narrower maximum, ...) go to the component."""
    kwargs = {"label": option.label or option.name, "info": option.help,
              "value": option.default if value is None else value, **kwargs}
    if option.kind == "flag":
        return gr.Checkbox(**kwargs)
    if option.kind == "choice":
        return gr.Radio(**{"choices": list(option.choices), **kwargs})
    if option.kind == "layers":
        kwargs["value"] = list(kwargs["value"])
        return gr.Dropdown(LAYER_CHOICES, multiselect=True, allow_custom_value=True, **kwargs)
    if option.kind == "text":
        return gr.Textbox(**kwargs)
    if option.slider:
        low, high, step = option.slider
        return gr.Slider(**{"minimum": low, "maximum": high, "step": step, **kwargs})
    return gr.Number(**kwargs)


def api_widget(option: Option | None, value, max_upload_mb: float) -> gr.Component:
    """A hidden input of an API endpoint whose value is the parameter's default (what /gradio_api/info shows);
    ``option`` None: a control image. Numbers are gr.Number without precision: Gradio would round NaN itself
    and fail without a message; the studio checks them and names the bad value."""
    if option is None:
        return ControlImage(max_upload_mb=max_upload_mb)
    if option.kind in ("number", "integer", "side"):
        return gr.Number(value)
    if option.kind == "flag":
        return gr.Checkbox(value)
    if option.kind == "sigma":
        return gr.Textbox(format_sigma(value))
    if option.kind == "layers":
        return gr.Dropdown(LAYER_CHOICES, value=list(value), multiselect=True, allow_custom_value=True)
    if option.kind == "loras":
        return gr.JSON(value)
    return gr.Textbox(value)


# --------------------------------------------------------------------------------------------------
# The UI's own widgets: size preset, log2 σ slider
# --------------------------------------------------------------------------------------------------

#: The σ slider is in log2 σ; its top, 2^14 > 9999, is infinite as for the authors (seg_core.blur).
LOG2_SIGMA_MAX = 14.0
LOG2_SIGMA_DEFAULT = 4.0  # σ 16, where unticking "infinite σ" starts


def sigma_label(log2_sigma: float, infinite: bool) -> str:
    if infinite or log2_sigma >= LOG2_SIGMA_MAX:
        return "Blur σ = ∞ (slider at its top, 14; move it for a finite σ)"
    return f"Blur σ = {2 ** log2_sigma:.4g}   (slider in log₂ σ: 0 → 1, 2 → 4, 4 → 16, ...; 14 = ∞)"


def log2_sigma(sigma: float) -> float:
    """The slider's position for ``sigma``."""
    return LOG2_SIGMA_MAX if math.isinf(sigma) else math.log2(sigma)


def sigma_from_ui(log2_sigma: float, infinite: bool) -> float:
    return math.inf if infinite or float(log2_sigma) >= LOG2_SIGMA_MAX else 2.0 ** float(log2_sigma)


def infinite_ticked(log2_sigma: float) -> bool:
    """The "infinite σ" tick after the slider moved: the slider's top is ∞."""
    return log2_sigma >= LOG2_SIGMA_MAX


def slider_after_tick(infinite: bool, log2_sigma: float) -> float:
    """The slider after "infinite σ" was ticked (its top) or unticked (σ 16, if it was at the top)."""
    if infinite:
        return LOG2_SIGMA_MAX
    return LOG2_SIGMA_DEFAULT if log2_sigma >= LOG2_SIGMA_MAX else log2_sigma


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) from a size preset, "1024x1024" (or "1024×1024")."""
    try:
        width, height = (int(part) for part in str(text).lower().replace("×", "x").split("x"))
    except ValueError:
        raise gr.Error(f"size must look like 1024x1024, got {text!r}") from None
    return width, height


# --------------------------------------------------------------------------------------------------
# Handlers: errors, cancellation, progress, ZeroGPU
# --------------------------------------------------------------------------------------------------


def show_errors(fn):
    """Library errors (ValueError naming the bad value, RuntimeError for what cannot be loaded or out of
    memory) -> gr.Error with their message; anything else -> a short gr.Error, logged. The server goes on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (GenerationCancelled, ValueError, RuntimeError, OSError) as error:
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


def watched(progress: gr.Progress) -> dict:
    """The studio's ``progress`` and ``should_stop`` arguments for the Gradio event running now."""
    return {"progress": lambda done, total, label: progress((done, total), desc=f"{label}: step {done}/{total}",
                                                            unit="steps"),
            "should_stop": cancellation_check()}


def gpu(seconds):
    """Marks a handler method as GPU work (``spaces.GPU`` on ZeroGPU): ``seconds(handler_object, values)``
    is the duration a request asks for, computed in the server before it is scheduled (a request that could
    never fit the quota is refused at once)."""

    def mark(method):
        method.gpu_seconds = seconds
        return method

    return mark


def bind(method, names, required=()) -> callable:
    """``method(values)`` (or ``method(values, progress)``) as a function Gradio calls with the values of the
    inputs ``names``, in order: its signature (``__signature__``) names them, so an API endpoint's parameter
    names are ``names``; each but ``required`` defaults to None (the model's default)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, kind, **({} if name in required else {"default": None})) for name in names]
    takes_progress = "progress" in inspect.signature(method).parameters
    if takes_progress:
        parameters.append(inspect.Parameter("progress", kind, default=gr.Progress()))
    signature = inspect.Signature(parameters)

    def values_of(args, kwargs) -> dict:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def call(*args, **kwargs):
        values = values_of(args, kwargs)
        return method(values, values.pop("progress")) if takes_progress else method(values)

    call.__name__ = call.__qualname__ = method.__name__
    call.__doc__, call.__signature__ = method.__doc__, signature
    call = show_errors(call)
    seconds = getattr(method, "gpu_seconds", None)
    if seconds is None:
        return call
    duration = show_errors(lambda *args, **kwargs: seconds(method.__self__, values_of(args, kwargs)))
    return GPU(call, duration=duration)


# --------------------------------------------------------------------------------------------------
# The control image: uploads only
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Page text and styles
# --------------------------------------------------------------------------------------------------

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


def intro(paper_url: str, model_id: str) -> str:
    return ("# Smoothed Energy Guidance for SDXL\n"
            f"[SEG]({paper_url}) (Hong, NeurIPS 2024) guides a diffusion model away from a version of itself whose "
            "self-attention is blurred with a Gaussian of standard deviation σ; σ = ∞ makes every query the mean "
            "query. It needs no prompt and no training. Compare it with vanilla SDXL, SAG and PAG from the same "
            f"seed, or sweep σ as in the paper's figures. Model: `{model_id}`.")


def rendered_note(example: dict) -> str:
    """The caption of an example's results shown before anyone clicks."""
    what = f"“{example['prompt']}”" if example["prompt"] else "unconditional (no prompt)"
    return (f"Rendered ahead on this model: {what}, seed **{example['seed']}**, {example['steps']} steps, "
            f"CFG {example['guidance_scale']:g}. Run your own with the button above.")


def run_table(runs) -> str:
    rows = ["| Method | Time (s) | UNet evaluations | per step |", "|---|---:|---:|---:|"]
    for run in runs:
        info = run.info()
        seconds = "(one loop)" if run.one_loop else f"{info['seconds']:.2f}"
        rows.append(f"| {run.label} | {seconds} | {info['unet_evaluations']} | "
                    f"{info['unet_evaluations_per_step']:g} |")
    return "\n".join(rows)
