"""LoRAs and an IP-Adapter from the operator's list, loaded once and chosen per request (issue 13).

The operator names what may be used in a small JSON file (:func:`read_adapter_config`); a request may only
pick from it: configured LoRAs (Hu et al. 2021, low-rank updates of the UNet's linear layers) with weights in
each one's range, and an image prompt for the IP-Adapter (Ye et al. 2023, image features through decoupled
cross-attention) with its scale. Nothing a request sends is ever a Hub id or a path.

:func:`load_adapters` loads everything once with diffusers' loaders, safetensors only, and leaves it off.
:func:`applied_adapters` turns a request's choice on for the calls inside it and off again (LoRAs disabled,
IP-Adapter scale 0) however they end. The LoRA layers wrap the UNet's own linear layers, so every branch a
guidance method adds (SEG's, PAG's, SAG's) runs through them, as through fused weights.

Once an IP-Adapter is loaded the UNet needs image embeddings on every call; without an image prompt a blank
image goes in at scale 0, where diffusers' IP-Adapter processors skip the adapter: the result is then
exactly the one without it.

On a compiled UNet (``pipe.compile()``) a new weight or scale must not be a new graph: there every LoRA stays
active (a DoRA only while chosen) and the IP-Adapter always runs, and a request writes its weights (0 for
LoRAs not chosen) and scale into tensors in place; at 0 they add exact zeros, so "off" is still exactly no
adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from .compiled import is_compiled
from .options import is_number

#: Adapter names become module keys inside the UNet (peft), so no dots.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
LOCAL_PREFIXES = ("/", "./", "../")
#: The buffer on each IP-Adapter value projection that holds the scale (:func:`_scaled_values`).
VALUE_SCALE = "ip_adapter_value_scale"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA the operator offers: where its weights are, the weights a request may give it, its license."""

    name: str
    source: str  # a Hub id, or a local folder (absolute)
    weight_name: str  # a .safetensors file in ``source`` (/ ``subfolder``)
    license: str
    subfolder: str = ""
    revision: str | None = None  # a Hub revision (a commit pins it)
    weight_range: tuple[float, float] = (0.0, 1.0)
    default_weight: float = 1.0
    trigger: str = ""  # words its training used in prompts, to show next to it


@dataclass(frozen=True)
class IPAdapterSpec:
    """The IP-Adapter the operator offers: its weights, its CLIP image encoder, the scales a request may use."""

    source: str
    weight_name: str
    image_encoder: str  # the encoder's folder inside ``source`` (e.g. "sdxl_models/image_encoder")
    license: str
    subfolder: str = ""
    revision: str | None = None
    scale_range: tuple[float, float] = (0.0, 1.0)
    default_scale: float = 0.5


@dataclass(frozen=True)
class AdapterChoice:
    """What one request asks of the configured adapters: LoRA name -> weight, and an image prompt."""

    loras: Mapping[str, float] = field(default_factory=dict)
    ip_adapter_image: Image.Image | None = None
    ip_adapter_scale: float = 0.0


@dataclass(frozen=True)
class AdapterConfig:
    """The operator's adapters: LoRAs by name (in the file's order) and at most one IP-Adapter."""

    loras: Mapping[str, LoraSpec] = field(default_factory=dict)
    ip_adapter: IPAdapterSpec | None = None

    def check(self, choice: AdapterChoice) -> None:
        """ValueError naming the value and what is allowed, unless every part of ``choice`` is offered here."""
        if not isinstance(choice.loras, Mapping):
            raise ValueError(f"loras must map LoRA names to weights, got {type(choice.loras).__name__}")
        for name, weight in choice.loras.items():
            spec = self.loras.get(name)
            if spec is None:
                offered = (f"the LoRAs are: {', '.join(map(repr, self.loras))}" if self.loras
                           else "no LoRAs are configured on this server")
                raise ValueError(f"LoRA {name!r} is not offered here; {offered}")
            _check_in_range(f"LoRA {name!r} weight", weight, spec.weight_range)
        image, scale = choice.ip_adapter_image, choice.ip_adapter_scale
        if self.ip_adapter is None:
            if image is not None or scale != 0:
                given = "no image" if image is None else "an image prompt"
                raise ValueError(f"no IP-Adapter is configured on this server (an image prompt needs one); got "
                                 f"{given} at ip_adapter_scale={scale!r}")
            return
        if scale != 0:  # 0 (off) is always allowed
            _check_in_range("ip_adapter_scale", scale, self.ip_adapter.scale_range, "0 (off) or ")
        if image is not None and not isinstance(image, Image.Image):
            raise ValueError(f"ip_adapter_image must be a PIL image, got {type(image).__name__}")
        if image is None and scale != 0:
            raise ValueError(f"ip_adapter_scale={scale!r} needs an ip_adapter_image (an image prompt)")


def _check_in_range(what: str, value, bounds: tuple[float, float], also: str = "") -> None:
    low, high = bounds
    if not is_number(value) or not low <= value <= high:
        raise ValueError(f"{what} must be {also}a number in [{low}, {high}], got {value!r}")


# ---- the operator's file --------------------------------------------------------------------------

LORA_KEYS = {"source": str, "weight_name": str, "license": str, "subfolder": str, "revision": str,
             "weight_range": list, "default_weight": float, "trigger": str}
IP_ADAPTER_KEYS = {"source": str, "weight_name": str, "image_encoder": str, "license": str, "subfolder": str,
                   "revision": str, "scale_range": list, "default_scale": float}
REQUIRED = ("source", "weight_name", "license")


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The adapters configured in the JSON file at ``path`` (relative folders are relative to the file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    return parse_adapter_config(data, path.parent)


def parse_adapter_config(data, base_dir: str | os.PathLike = ".") -> AdapterConfig:
    """An :class:`AdapterConfig` from the file's JSON object; ValueError naming the first bad entry.

    ``{"loras": {name: {source, weight_name, license, [subfolder], [revision], [weight_range],
    [default_weight], [trigger]}, ...}, "ip_adapter": {source, weight_name, image_encoder,
    license, [subfolder], [revision], [scale_range], [default_scale]}}``; both parts are optional.
    """
    _check_keys("the adapter config", data, {"loras": dict, "ip_adapter": dict})
    loras = {}
    for name, entry in data.get("loras", {}).items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"LoRA names must be 1 to 64 letters, digits, '_' or '-' (not first), got {name!r}")
        fields = _entry(f"loras.{name}", entry, LORA_KEYS, base_dir)
        if "weight_range" in fields:
            fields["weight_range"] = _range(f"loras.{name}.weight_range", fields["weight_range"])
        loras[name] = LoraSpec(name=name, **fields)
        unset = "" if "default_weight" in entry else f" ({LoraSpec.default_weight} when not given)"
        _check_in_range(f"loras.{name}.default_weight{unset}", loras[name].default_weight, loras[name].weight_range)
    ip_adapter = None
    if data.get("ip_adapter") is not None:
        fields = _entry("ip_adapter", data["ip_adapter"], IP_ADAPTER_KEYS, base_dir, required=("image_encoder",))
        if "scale_range" in fields:
            fields["scale_range"] = _range("ip_adapter.scale_range", fields["scale_range"], low=0.0)
        fields["image_encoder"] = _inner_path("ip_adapter.image_encoder", fields["image_encoder"])
        ip_adapter = IPAdapterSpec(**fields)
        unset = "" if "default_scale" in data["ip_adapter"] else f" ({IPAdapterSpec.default_scale} when not given)"
        _check_in_range(f"ip_adapter.default_scale{unset}", ip_adapter.default_scale, ip_adapter.scale_range)
    return AdapterConfig(loras, ip_adapter)


def _check_keys(where: str, entry, types: Mapping[str, type], required=()) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(types)}")
    missing = [key for key in required if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    for key, value in entry.items():
        expected = types[key]
        numeric = expected is float and is_number(value)
        if not (numeric or isinstance(value, expected)) or (expected is str and not value.strip()):
            raise ValueError(f"{where}.{key} must be a {'non-empty string' if expected is str else expected.__name__}, "
                             f"got {value!r}")


def _entry(where: str, entry, types, base_dir, required=()) -> dict:
    """The checked fields of one entry: its source resolved, its file names plain, its numbers floats."""
    _check_keys(where, entry, types, REQUIRED + tuple(required))
    fields = {k: float(v) if types[k] is float else v for k, v in entry.items()}
    fields["source"] = _source(f"{where}.source", fields["source"], base_dir)
    weight_name = fields["weight_name"]
    if "/" in weight_name or "\\" in weight_name or not weight_name.endswith(".safetensors"):
        raise ValueError(f"{where}.weight_name must be a .safetensors file name (safetensors only: pickled "
                         f"weights can run code; put folders in 'subfolder'), got {weight_name!r}")
    if "subfolder" in fields:
        fields["subfolder"] = _inner_path(f"{where}.subfolder", fields["subfolder"])
    return fields


def _source(where: str, value: str, base_dir) -> str:
    """A Hub id as it is, or a local folder (absolute, or starting with ./ or ../ from ``base_dir``) resolved."""
    if value.startswith(LOCAL_PREFIXES):
        folder = (Path(base_dir) / value).resolve()
        if not folder.is_dir():
            raise ValueError(f"{where}: the folder {str(folder)!r} does not exist")
        return str(folder)
    if not HUB_ID.fullmatch(value):
        raise ValueError(f"{where} must be a Hub id 'owner/name' or a folder starting with '/', './' or '../', "
                         f"got {value!r}")
    return value


def _inner_path(where: str, value: str) -> str:
    parts = value.replace("\\", "/").split("/")
    if value.startswith("/") or ".." in parts:
        raise ValueError(f"{where} must be a relative path inside the source (no '..'), got {value!r}")
    return value


def _range(where: str, value, low: float = -math.inf) -> tuple[float, float]:
    numbers = isinstance(value, list) and len(value) == 2 and all(
        is_number(v) and math.isfinite(v) for v in value)
    if not numbers or not low <= value[0] <= value[1]:
        lowest = "" if low == -math.inf else f", from {low}"
        raise ValueError(f"{where} must be [min, max], finite numbers with min <= max{lowest}, got {value!r}")
    return float(value[0]), float(value[1])


# ---- the pipeline ---------------------------------------------------------------------------------

def load_adapters(pipe, config: AdapterConfig) -> None:
    """Load every configured LoRA (under its name) and the IP-Adapter onto ``pipe`` (a
    StableDiffusionXLSEGPipeline), once, from safetensors only; everything is left off. Pipelines that share
    ``pipe``'s components afterwards (e.g. its ControlNet variants) share the adapters."""
    for spec in config.loras.values():
        _load_lora(pipe, spec)
    if config.ip_adapter is not None:
        _load_ip_adapter(pipe, config.ip_adapter)
    _adapters_off(pipe, config)


def _load_lora(pipe, spec: LoraSpec) -> None:
    """Its UNet part and, where it has them, its text-encoder parts (diffusers' loader; kohya files too)."""
    with warnings.catch_warnings():  # peft warns that a model gets a second adapter: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(spec.source, adapter_name=spec.name, weight_name=spec.weight_name,
                               subfolder=spec.subfolder, revision=spec.revision, use_safetensors=True)


def _load_ip_adapter(pipe, spec: IPAdapterSpec) -> None:
    from transformers import CLIPVisionModelWithProjection

    unet = pipe.unet
    encoder = CLIPVisionModelWithProjection.from_pretrained(
        spec.source, subfolder=spec.image_encoder, revision=spec.revision, use_safetensors=True, dtype=unet.dtype)
    pipe.register_modules(image_encoder=encoder.to(unet.device))
    pipe.load_ip_adapter(spec.source, subfolder=spec.subfolder, weight_name=spec.weight_name,
                         image_encoder_folder=None, revision=spec.revision)
    for projection in _ip_value_projections(pipe):
        projection.register_buffer(VALUE_SCALE, projection.weight.new_ones(()), persistent=False)
        projection.register_forward_hook(_scaled_values)


def _ip_value_projections(pipe) -> Iterator[torch.nn.Linear]:
    """The IP-Adapter's value projections (diffusers' ``to_v_ip``), in every cross-attention of the UNet."""
    for processor in pipe.unet.attn_processors.values():
        yield from getattr(processor, "to_v_ip", ())


def _scaled_values(projection, args, values: torch.Tensor) -> torch.Tensor:
    """The image prompt's values times the IP-Adapter scale, a tensor: decoupled cross-attention adds
    scale * Attention(Q, K', V') (Ye et al. 2023), which is Attention(Q, K', scale * V')."""
    return values * getattr(projection, VALUE_SCALE)


@contextmanager
def applied_adapters(pipe, config: AdapterConfig, choice: AdapterChoice) -> Iterator[dict]:
    """Turn ``choice`` on for the calls inside (``pipe`` loaded by :func:`load_adapters` with ``config``) and
    off again however they end. Yields the keyword arguments each call of ``pipe`` must add (the image
    prompt, or with an IP-Adapter loaded a blank one at scale 0). One request at a time per pipeline: the
    state is the shared UNet's. ValueError (before anything changes) when ``choice`` is not offered."""
    config.check(choice)
    try:
        _choose(pipe, config, choice)
        call_kwargs = {}
        if config.ip_adapter is not None:
            image = choice.ip_adapter_image
            call_kwargs["ip_adapter_image"] = _blank_image(pipe) if image is None else image
        yield call_kwargs
    finally:
        _adapters_off(pipe, config)


def _adapters_off(pipe, config: AdapterConfig) -> None:
    _choose(pipe, config, AdapterChoice())


def _choose(pipe, config: AdapterConfig, choice: AdapterChoice, keep_graphs: bool | None = None) -> None:
    """Set the loaded adapters to ``choice``. With ``keep_graphs`` (by default: when the UNet is compiled)
    without changing what a compiled graph reads from Python: the LoRAs stay active (0 for the ones not
    chosen; but for a DoRA, which runs only when chosen: one graph each way) and the IP-Adapter always runs,
    their weights and scale written in place into tensors (graph inputs, where each new float would be a new
    graph). Eagerly that would cost every call the unused adapters' work (bench/adapters_eager_cost.py), so
    an eager UNet runs only the chosen ones."""
    if keep_graphs is None:
        keep_graphs = is_compiled(pipe.unet)
    if config.loras:
        _choose_loras(pipe, choice.loras, list(config.loras), keep_graphs)
    if config.ip_adapter is not None:
        _choose_ip_adapter_scale(pipe, float(choice.ip_adapter_scale), keep_graphs)


def _choose_loras(pipe, weights: Mapping[str, float], names: list[str], keep_graphs: bool) -> None:
    """The LoRAs ``names`` (in the config's order) at ``weights`` (0 where not given), in the UNet and the text
    encoders: the chosen ones running, with ``keep_graphs`` also the others where 0 adds nothing."""
    for layer in _lora_layers(pipe):
        for name in layer.scaling:
            _set_scale(layer, name, float(weights.get(name, 0.0)), keep_graphs)
        active = [n for n in names if n in weights or (keep_graphs and _zero_is_off(layer, n))]
        layer.set_adapter(active or layer.active_adapters)
        layer.enable_adapters(bool(active))


def _lora_layers(pipe) -> Iterator[BaseTunerLayer]:
    """The layers peft wrapped for LoRAs in the UNet and the text encoders (those ``pipe`` has)."""
    for component in pipe._lora_loadable_modules:
        model = getattr(pipe, component, None)
        if model is not None:
            yield from (module for module in model.modules() if isinstance(module, BaseTunerLayer))


def _zero_is_off(layer, name: str) -> bool:
    """Whether LoRA ``name`` adds exactly nothing to ``layer`` at weight 0: a plain LoRA (W + 0 * BA); not a
    peft variant such as DoRA (Liu et al. 2024), whose magnitude rescales the layer at any weight."""
    return name not in getattr(layer, "lora_variant", {})


def _set_scale(layer, name: str, weight: float, in_tensor: bool) -> None:
    """peft's scaling of LoRA ``name`` at ``weight`` (weight * alpha / r); ``in_tensor``: written in place into
    a 0-dim tensor on the layer's device (as peft's compiled hotswapping keeps it)."""
    held = layer.scaling[name]
    layer.set_scale(name, weight)
    if in_tensor:
        weights = layer.get_base_layer().weight
        if not isinstance(held, torch.Tensor) or held.device != weights.device:
            held = weights.new_empty((), dtype=torch.promote_types(weights.dtype, torch.float32))
        layer.scaling[name] = held.fill_(layer.scaling[name])


def _choose_ip_adapter_scale(pipe, scale: float, keep_graphs: bool) -> None:
    """The IP-Adapter at ``scale``: diffusers' processors skip it at 0 (exactly no adapter). To keep the
    graphs they always run it, at 1, and the scale goes into the values (:func:`_scaled_values`)."""
    pipe.set_ip_adapter_scale(1.0 if keep_graphs else scale)
    for projection in _ip_value_projections(pipe):
        getattr(projection, VALUE_SCALE).fill_(scale if keep_graphs else 1.0)


def _blank_image(pipe) -> Image.Image:
    size = pipe.image_encoder.config.image_size
    return Image.new("RGB", (size, size))
