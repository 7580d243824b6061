"""Control maps: the preprocessors that turn a picture into what an SDXL ControlNet reads.

The detectors are controlnet-aux's (lllyasviel's ControlNet annotators), except depth, which runs the same
MiDaS DPT-Hybrid through transformers because that copy ships safetensors weights. controlnet-aux's own
``from_pretrained`` unpickles ``.pth`` files with a bare ``torch.load``; here every detector network is
built from its class and given a state dict read by :func:`load_weights` (safetensors, or
``torch.load(weights_only=True)``), so no pickled code can run. Which ControlNet reads each map is
``seg_core.presets``' business.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .options import CONTROL_TYPES, OPTIONS  # noqa: F401 (CONTROL_TYPES re-exported)

logger = logging.getLogger(__name__)

#: lllyasviel's annotator weights, the files controlnet-aux downloads by default.
ANNOTATORS = "lllyasviel/Annotators"
#: transformers' copy of MiDaS DPT-Hybrid, with safetensors weights.
DEPTH_ESTIMATOR = "Intel/dpt-hybrid-midas"
#: The annotator files each learned detector reads.
DETECTOR_FILES = {
    "lineart": ("sk_model.pth", "sk_model2.pth"),
    "softedge": ("ControlNetHED.pth",),
    "openpose": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
}
#: ``weights_dir`` for the small offline models: the detectors keep random (seeded) weights, as their
#: ControlNets do; the maps are noise, but every code path runs without downloads.
RANDOM_WEIGHTS = "random"


#: Each knob of :class:`Detection` and the option (seg_core.options) that holds its default and range.
_KNOBS = {"preprocess": "control_preprocess", "detect_resolution": "detect_resolution",
          "low_threshold": "canny_low_threshold", "high_threshold": "canny_high_threshold",
          "hands": "openpose_hands", "face": "openpose_face"}
_KNOB_OPTIONS = {knob: OPTIONS[name].renamed(knob, OPTIONS[name].label) for knob, name in _KNOBS.items()}


@dataclass(frozen=True)
class Detection:
    """How to detect a control map: the knobs people use in ControlNet demos, with their options' defaults and
    ranges (seg_core.options.DETECTION)."""

    preprocess: bool = _KNOB_OPTIONS["preprocess"].default  # False: the image is already a control map
    detect_resolution: int = _KNOB_OPTIONS["detect_resolution"].default  # the detector's input, shorter side
    low_threshold: int = _KNOB_OPTIONS["low_threshold"].default  # canny
    high_threshold: int = _KNOB_OPTIONS["high_threshold"].default  # canny
    hands: bool = _KNOB_OPTIONS["hands"].default  # openpose
    face: bool = _KNOB_OPTIONS["face"].default  # openpose

    def __post_init__(self):
        for knob, option in _KNOB_OPTIONS.items():
            object.__setattr__(self, knob, option.check(getattr(self, knob)))  # 512.0 -> 512
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold ({self.low_threshold}) must not exceed high_threshold "
                             f"({self.high_threshold})")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a torch file read with ``weights_only=True`` (tensors
    and plain containers only: a pickle that would run code is refused)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def weights_path(filename: str, weights_dir: str | None = None) -> str:
    """``filename`` of the annotators: in ``weights_dir`` (an operator's folder, or a test's) or else from
    the Hub (or its cache). RuntimeError naming the file when it is not there."""
    if weights_dir is not None:
        path = Path(weights_dir) / filename
        if not path.is_file():
            raise RuntimeError(f"the detector weights {filename} are not in {weights_dir}")
        return str(path)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(ANNOTATORS, filename)
    except Exception as error:  # no network, no cache
        raise RuntimeError(f"the detector weights {ANNOTATORS}/{filename} could not be loaded: "
                           f"{str(error).splitlines()[0]}") from error


def _import_aux() -> None:
    """Import controlnet-aux quietly: its package imports every detector it has and warns about those
    not used here (mediapipe missing, timm model names registered again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import controlnet_aux  # noqa: F401


def _read(filename: str, weights_dir: str | None) -> dict | None:
    """The state dict in ``filename`` (:func:`weights_path`), or None with ``RANDOM_WEIGHTS``."""
    return None if weights_dir == RANDOM_WEIGHTS else load_weights(weights_path(filename, weights_dir))


def _loaded(net: torch.nn.Module, state: dict | None) -> torch.nn.Module:
    if state is not None:
        net.load_state_dict(state)
    return net.float().eval()


def _lineart(weights_dir):
    """Informative-drawings line art (controlnet-aux ``LineartDetector``): fine and coarse generators."""
    _import_aux()
    from controlnet_aux.lineart import Generator, LineartDetector

    fine, coarse = (_loaded(Generator(3, 1, 3), _read(f, weights_dir)) for f in DETECTOR_FILES["lineart"])
    return LineartDetector(fine, coarse)


def _softedge(weights_dir):
    """HED soft edges (controlnet-aux ``HEDdetector``, lllyasviel's Apache-2.0 reimplementation)."""
    _import_aux()
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    (filename,) = DETECTOR_FILES["softedge"]
    return HEDdetector(_loaded(ControlNetHED_Apache2(), _read(filename, weights_dir)))


def _openpose(weights_dir):
    """OpenPose body, hands and face (controlnet-aux ``OpenposeDetector``). Body and hand files name their
    tensors without the network's first module level, as controlnet-aux's ``util.transfer`` expects."""
    _import_aux()
    from controlnet_aux.open_pose import Body, Face, Hand, OpenposeDetector, util
    from controlnet_aux.open_pose.body import bodypose_model
    from controlnet_aux.open_pose.face import FaceNet, params
    from controlnet_aux.open_pose.hand import handpose_model

    body_state, hand_state, face_state = (_read(f, weights_dir) for f in DETECTOR_FILES["openpose"])
    body, hand, face = Body.__new__(Body), Hand.__new__(Hand), Face.__new__(Face)  # (their __init__ unpickle)
    for part, net, state in ((body, bodypose_model(), body_state), (hand, handpose_model(), hand_state)):
        part.model = _loaded(net, None if state is None else util.transfer(net, state))
    face.model = _loaded(FaceNet(), face_state)
    face.inference_size, face.sigma, face.threshold = (params["inference_img_size"], params["gaussian_sigma"],
                                                      params["heatmap_peak_thresh"])
    return OpenposeDetector(body, hand, face)


_DETECTOR_BUILDERS = {"lineart": _lineart, "softedge": _softedge, "openpose": _openpose}
_detectors: dict = {}


def load_detector(control_type: str, weights_dir: str | None = None):
    """The controlnet-aux detector of a learned control type, built once per weights folder (or
    ``RANDOM_WEIGHTS``: seeded random weights)."""
    key = (control_type, weights_dir)
    if key not in _detectors:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _detectors[key] = _DETECTOR_BUILDERS[control_type](weights_dir)
    return _detectors[key]


_depth_models: dict = {}


def tiny_depth_estimator():
    """A small random DPT (transformers) and its image processor: the offline models' depth estimator."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                       image_size=64, patch_size=16, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3], head_in_index=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DPTImageProcessor(size={"height": 64, "width": 64}), DPTForDepthEstimation(config).eval()


def load_depth_estimator(source: str = DEPTH_ESTIMATOR):
    """DPT-Hybrid MiDaS (safetensors weights; ``source`` a Hub id or folder, or ``RANDOM_WEIGHTS``: see
    :func:`tiny_depth_estimator`) and its image processor, loaded once, on the CPU. RuntimeError naming
    the model when the weights cannot be loaded."""
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    if source == RANDOM_WEIGHTS and source not in _depth_models:
        _depth_models[source] = tiny_depth_estimator()
    if source not in _depth_models:
        try:
            _depth_models[source] = (
                DPTImageProcessor.from_pretrained(source),
                DPTForDepthEstimation.from_pretrained(source, use_safetensors=True).eval(),
            )
        except Exception as error:  # no network, no cache: the loader's paragraphs go to the log only
            logger.warning("depth estimator %s: %s", source, error)
            raise RuntimeError(f"control_type 'depth' is not available on this server: its depth estimator "
                               f"{source} could not be loaded ({type(error).__name__}); use another control "
                               f"type or 'none'") from None
    return _depth_models[source]


def _gray_to_rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.stack([array] * 3, axis=-1))


def canny_edges(image: Image.Image, detection: Detection = Detection()) -> Image.Image:
    """Canny edges (controlnet-aux ``CannyDetector``: OpenCV at the detect resolution) with the thresholds."""
    _import_aux()
    from controlnet_aux.canny import CannyDetector

    if detection.detect_resolution >= min(image.size):  # no finer than the image: Canny on its own pixels
        import cv2

        return _gray_to_rgb(cv2.Canny(np.asarray(image.convert("RGB")), detection.low_threshold,
                                      detection.high_threshold))
    return CannyDetector()(image, low_threshold=detection.low_threshold, high_threshold=detection.high_threshold,
                           detect_resolution=detection.detect_resolution,
                           image_resolution=detection.detect_resolution, output_type="pil")


def depth_map(image: Image.Image, detection: Detection = Detection(), source: str = DEPTH_ESTIMATOR) -> Image.Image:
    """Relative depth (DPT-Hybrid MiDaS) at the detect resolution, normalised to [0, 255], 3 channels."""
    processor, estimator = load_depth_estimator(source)
    rgb = image.convert("RGB")
    scale = detection.detect_resolution / min(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    with torch.no_grad():
        depth = estimator(**processor(images=rgb, return_tensors="pt")).predicted_depth
    depth = torch.nn.functional.interpolate(depth[:, None], size=rgb.size[::-1], mode="bicubic")[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min()).clamp(min=1e-8)
    return _gray_to_rgb((depth.clamp(0, 1).numpy() * 255).astype(np.uint8))


def learned_map(control_type: str, image: Image.Image, detection: Detection = Detection(),
                weights_dir: str | None = None) -> Image.Image:
    """The map of a learned controlnet-aux detector (lineart, softedge, openpose) at the detect resolution."""
    extra = {"include_hand": detection.hands, "include_face": detection.face} if control_type == "openpose" else {}
    return load_detector(control_type, weights_dir)(
        image.convert("RGB"), detect_resolution=detection.detect_resolution,
        image_resolution=detection.detect_resolution, output_type="pil", **extra)


def control_map(control_type: str, image: Image.Image, detection: Detection = Detection(),
                weights_dir: str | None = None, depth_source: str = DEPTH_ESTIMATOR) -> Image.Image:
    """The control map of ``control_type`` for ``image``, at ``image``'s size; with ``detection.preprocess``
    False the image is taken as a ready map. ``weights_dir``/``depth_source``: where the learned detectors'
    weights are (default: the Hub or its cache; ``RANDOM_WEIGHTS`` for random detectors)."""
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {control_type!r}: expected one of {list(CONTROL_TYPES)}")
    if not detection.preprocess:
        return image.convert("RGB")
    if control_type == "canny":
        result = canny_edges(image, detection)
    elif control_type == "depth":
        result = depth_map(image, detection, RANDOM_WEIGHTS if weights_dir == RANDOM_WEIGHTS else depth_source)
    else:
        result = learned_map(control_type, image, detection, weights_dir)
    return result.convert("RGB").resize(image.size, Image.BILINEAR)
