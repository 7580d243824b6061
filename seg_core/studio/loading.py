"""Loading a model's pipelines once: the base pipeline, a ControlNet pipeline per control type sharing its
components, the detectors, and what cannot be loaded here (and why)."""

from __future__ import annotations

import logging
import threading
from typing import Sequence

from .. import control as controls
from .. import models
from ..adapters import AdapterConfig, load_adapters
from ..control import RANDOM_WEIGHTS, load_detector
from ..options import CONTROL
from ..pipeline import StableDiffusionXLSEGPipeline
from ..presets import DEPTH_ESTIMATOR, UNION, controlnet_choice, load_depth_estimator, load_pipeline, with_controlnet

logger = logging.getLogger(__name__)

CONTROL_TYPES = CONTROL["control_type"].choices  # "none" first


def depth_available() -> bool:
    """Whether the depth estimator can be loaded: online, or its weights cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return True
    return isinstance(try_to_load_from_cache(DEPTH_ESTIMATOR, "config.json"), str)


class Pipelines:
    """One model's pipelines, each loaded once on first use (or by :meth:`preload`) and cached.

    Args:
        model: "sdxl", "embedded", "tiny", or an SDXL Hub id or local folder.
        device: torch device (by default CUDA, else MPS, else CPU).
        compile: compile the UNet (regional); the ControlNet pipelines share it.
        adapters: the operator's LoRAs and IP-Adapter, loaded onto the base pipeline (so the ControlNet
            pipelines, which share its components, have them too).
    """

    def __init__(self, model: str, device: str | None = None, compile: bool = False,
                 adapters: AdapterConfig | None = None):
        self.model, self.device, self.compile, self.adapters = model, device, compile, adapters
        self.loaded: dict[str, StableDiffusionXLSEGPipeline] = {}
        self.unavailable: dict[str, str] = {}  # control type -> why it cannot be loaded here
        self._lock = threading.Lock()

    def get(self, control_type: str | Sequence[str] = "none") -> StableDiffusionXLSEGPipeline:
        """The pipeline for a control type ("none", or one of ``CONTROL_TYPES``) or two of them, loaded once
        and cached. Every type the union model serves, and every pair, share one pipeline ("union")."""
        types = () if control_type == "none" else (control_type,) if isinstance(control_type, str) else tuple(control_type)
        for name in types:
            if name not in CONTROL_TYPES[1:]:
                raise ValueError(f"control_type must be one of {list(CONTROL_TYPES)}, got {name!r}")
            if name in self.unavailable:
                raise RuntimeError(self.unavailable[name])
        key = "none" if not types else "union" if controlnet_choice(types).is_union else types[0]
        if key in self.unavailable:
            raise RuntimeError(self.unavailable[key])
        pipe = self.loaded.get(key)
        if pipe is not None:  # loaded: no lock (a ZeroGPU worker's copy of the lock may be held forever)
            return pipe
        with self._lock:
            if key not in self.loaded:
                self.loaded[key] = self._load(key)
            return self.loaded[key]

    @property
    def detector_weights(self) -> str | None:
        """Where the learned detectors' weights come from: the Hub (or its cache), or, on the small offline
        models (which get random ControlNets too), seeded random weights."""
        return RANDOM_WEIGHTS if models.is_offline(self.model) else None

    def preload(self) -> "Pipelines":
        """Load (and move to the device) every model a request can use, ControlNets and the depth estimator
        included, so that none loads inside a request: on ZeroGPU a GPU worker would load it again in every
        new worker, inside the visitor's GPU time. What cannot be loaded is recorded in ``unavailable``
        (and left out of ``control_types``); a request for it gets that reason."""
        for control_type in CONTROL_TYPES[1:]:
            try:
                if control_type == "depth":
                    self._load_depth_estimator()
                elif control_type in controls.DETECTOR_FILES:
                    load_detector(control_type, self.detector_weights)
                self.get(control_type)
            except RuntimeError as error:
                logger.warning("ControlNet %r unavailable: %s", control_type, error)
                self.unavailable[control_type] = str(error)
        try:  # two controls: the union model (any two types that load)
            self.get([t for t in CONTROL_TYPES[1:] if t not in self.unavailable][:2])
        except (RuntimeError, ValueError) as error:
            logger.warning("two controls unavailable: %s", error)
            self.unavailable["union"] = str(error)
        return self

    def _load_depth_estimator(self) -> None:
        """The depth estimator: seeded random weights on the small offline models (as their detectors and
        ControlNets), else DPT from the Hub or its cache (RuntimeError when offline and not cached)."""
        if self.detector_weights == RANDOM_WEIGHTS:
            load_depth_estimator(RANDOM_WEIGHTS)
        elif not depth_available():
            raise RuntimeError(f"depth needs its estimator's weights ({DEPTH_ESTIMATOR}), "
                               "not available here (offline and not cached)")
        else:
            load_depth_estimator()

    @property
    def control_types(self) -> list[str]:
        """The control types a request may use here ("none" first)."""
        return [c for c in CONTROL_TYPES if c not in self.unavailable]

    def _load(self, key: str) -> StableDiffusionXLSEGPipeline:
        if key == "none":
            pipe = load_pipeline(self.model, device=self.device)
            if self.adapters is not None:  # before compiling, and before any ControlNet pipeline shares the UNet
                load_adapters(pipe, self.adapters)
            if self.compile:  # the ControlNet pipelines share this UNet
                pipe.compile()
        else:
            # Share the base pipeline's components: a second SDXL copy would double the memory.
            pipe = with_controlnet(self.loaded["none"], UNION if key == "union" else key,
                                   random_controlnet=models.is_offline(self.model))
        pipe.set_progress_bar_config(disable=True)
        return pipe
