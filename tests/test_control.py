"""Control maps (seg_core.control) and the ControlNet for each control type (seg_core.presets).

The learned detectors' weights cannot be downloaded here: each is built from random weights saved in the
annotators' file layout in a temporary folder and loaded through the real loading code (load_weights,
torch.load with weights_only=True), then run on an example image.
"""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import make_pipe
from seg_core import control
from seg_core.control import CONTROL_TYPES, DETECTOR_FILES, Detection, control_map, load_weights
from seg_core.presets import CONTROLNETS, UNION, UNION_FILES, UNION_MODES, load_union_controlnet, with_controlnet
from seg_core.tiny import TINY_SIZE, tiny_union_controlnet

HOUSE = "assets/control_house.png"


def house(size=(160, 120)):
    return Image.open(HOUSE).convert("RGB").resize(size)


def random_annotators(folder):
    """Random-weight annotator files, named and laid out as lllyasviel/Annotators' (plain state dicts)."""
    control._import_aux()
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.open_pose.body import bodypose_model
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.hand import handpose_model

    torch.manual_seed(0)
    without_first_level = lambda net: {".".join(k.split(".")[1:]): v for k, v in net.state_dict().items()}  # noqa: E731
    nets = {
        "sk_model.pth": Generator(3, 1, 3).state_dict(), "sk_model2.pth": Generator(3, 1, 3).state_dict(),
        "ControlNetHED.pth": ControlNetHED_Apache2().state_dict(),
        "body_pose_model.pth": without_first_level(bodypose_model()),
        "hand_pose_model.pth": without_first_level(handpose_model()),
        "facenet.pth": FaceNet().state_dict(),
    }
    assert set(nets) == {f for files in DETECTOR_FILES.values() for f in files}
    for name, state in nets.items():
        torch.save(state, folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    return random_annotators(tmp_path_factory.mktemp("annotators"))


@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory):
    """A small random DPT (transformers), saved as safetensors with its image processor."""
    folder = tmp_path_factory.mktemp("dpt")
    processor, model = control.tiny_depth_estimator()
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return str(folder)


def varied(image):
    array = np.asarray(image)
    return array.std() > 1.0


@pytest.mark.parametrize("control_type", ["lineart", "softedge", "openpose"])
def test_learned_detectors_run_from_weights_loaded_without_pickle_code(annotators, control_type):
    detection = Detection(detect_resolution=128, hands=True, face=True)
    result = control_map(control_type, house(), detection, weights_dir=annotators)
    assert result.size == (160, 120) and result.mode == "RGB"
    if control_type != "openpose":  # (random pose nets find nobody: a black canvas is right)
        assert varied(result)
    net = control.load_detector(control_type, annotators)
    first = next(iter(vars(net).values()))
    module = first if isinstance(first, torch.nn.Module) else first.model
    saved = load_weights(f"{annotators}/{DETECTOR_FILES[control_type][0]}")
    assert torch.equal(next(iter(module.state_dict().values())), next(iter(saved.values())))


def test_missing_detector_weights_name_the_file(tmp_path):
    with pytest.raises(RuntimeError, match="sk_model.pth are not in"):
        control_map("lineart", house(), weights_dir=str(tmp_path))


class RunsCode:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_load_weights_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": RunsCode()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_weights(path)
    assert "pickled code ran" not in capsys.readouterr().out
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["w"], torch.ones(2))


def test_canny_thresholds_and_detect_resolution_change_the_map():
    image = house().filter(ImageFilter.GaussianBlur(2))  # soft edges: gradients of every strength
    default = np.asarray(control_map("canny", image))
    assert default.shape == (120, 160, 3) and varied(default)
    strict = np.asarray(control_map("canny", image, Detection(low_threshold=200, high_threshold=255)))
    loose = np.asarray(control_map("canny", image, Detection(low_threshold=20, high_threshold=60)))
    assert strict.sum() < default.sum() < loose.sum()
    coarse = np.asarray(control_map("canny", image, Detection(detect_resolution=64)))
    assert not np.array_equal(coarse, default)


def test_depth_runs_from_a_safetensors_folder(tiny_depth):
    result = control_map("depth", house(), Detection(detect_resolution=64), depth_source=tiny_depth)
    assert result.size == (160, 120) and varied(result)
    random = control_map("depth", house(), Detection(detect_resolution=64), depth_source=control.RANDOM_WEIGHTS)
    assert np.array_equal(np.asarray(random), np.asarray(result))  # the same seeded weights, saved and loaded


@pytest.mark.parametrize("control_type", ["lineart", "softedge", "openpose"])
def test_random_detectors_for_the_offline_models_need_no_files(control_type):
    detection = Detection(detect_resolution=64)
    random = control_map(control_type, house(), detection, weights_dir=control.RANDOM_WEIGHTS)
    assert random.size == (160, 120)
    assert control.load_detector(control_type, control.RANDOM_WEIGHTS) is control.load_detector(
        control_type, control.RANDOM_WEIGHTS)  # built once


def test_no_preprocessing_takes_the_image_as_the_map():
    image = house()
    for control_type in CONTROL_TYPES:
        assert np.array_equal(np.asarray(control_map(control_type, image, Detection(preprocess=False))),
                              np.asarray(image))


@pytest.mark.parametrize("bad, message", [
    (dict(detect_resolution=32), r"detect_resolution must be an integer in \[64, 2048\], got 32"),
    (dict(detect_resolution=512.5), "detect_resolution"),
    (dict(low_threshold=-1), r"low_threshold must be an integer in \[0, 255\]"),
    (dict(high_threshold=300), r"high_threshold must be an integer in \[0, 255\]"),
    (dict(low_threshold=150, high_threshold=100), "must not exceed high_threshold"),
])
def test_detection_knobs_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        Detection(**bad)


def test_unknown_control_type_names_the_choices():
    with pytest.raises(ValueError, match="unknown control type 'scribble'"):
        control_map("scribble", house())


def test_every_control_type_has_a_controlnet_and_a_union_mode():
    assert set(CONTROLNETS) == set(CONTROL_TYPES) == set(UNION_MODES)
    for choice in CONTROLNETS.values():
        assert (choice.mode is not None) == (choice.repo == UNION)


def test_union_promax_files_load_through_the_loader(tmp_path, components):
    net = tiny_union_controlnet(components["unet"])
    config = {k: v for k, v in net.config.items() if not k.startswith("_")}
    import json

    from safetensors.torch import save_file

    (tmp_path / UNION_FILES[0]).write_text(json.dumps({"_class_name": "ControlNetUnionModel", **config}))
    save_file(net.state_dict(), tmp_path / UNION_FILES[1])
    loaded = load_union_controlnet(str(tmp_path))
    assert loaded.config.num_trans_channel == net.config.num_trans_channel
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_offline_softedge_gets_a_random_union_model_and_runs_with_its_mode(components):
    pipe = with_controlnet(make_pipe(components), "softedge", random_controlnet=True)
    from diffusers import ControlNetUnionModel

    assert isinstance(pipe.controlnet, ControlNetUnionModel)
    size = (TINY_SIZE, TINY_SIZE)
    out = pipe("a house", image=control_map("softedge", house(size), Detection(preprocess=False)),
               control_mode=CONTROLNETS["softedge"].mode, num_inference_steps=2, output_type="np", seg_scale=1.0,
               height=TINY_SIZE, width=TINY_SIZE).images
    assert out.shape == (1, TINY_SIZE, TINY_SIZE, 3) and np.isfinite(out).all()


def test_two_control_types_share_one_union_model_with_a_mode_each(components):
    from seg_core.presets import control_modes, controlnet_choice

    assert controlnet_choice(["canny", "depth"]).repo == UNION
    assert control_modes(["canny", "depth"]) == [UNION_MODES["canny"], UNION_MODES["depth"]]
    assert control_modes("canny") is None and control_modes("softedge") == UNION_MODES["softedge"]
    with pytest.raises(ValueError, match="control types must be among"):
        controlnet_choice(["canny", "scribble"])
    pipe = with_controlnet(make_pipe(components), ["canny", "openpose"], random_controlnet=True)
    maps = [control_map(t, house((TINY_SIZE, TINY_SIZE)), Detection(preprocess=False)) for t in ("canny", "openpose")]
    out = pipe("a house", image=maps, control_mode=control_modes(["canny", "openpose"]),
               controlnet_conditioning_scale=[0.7, 0.4], control_guidance_end=[1.0, 0.5],
               num_inference_steps=2, output_type="np", seg_scale=1.0, height=TINY_SIZE, width=TINY_SIZE).images
    assert out.shape == (1, TINY_SIZE, TINY_SIZE, 3) and np.isfinite(out).all()


def test_control_arguments_single_values_for_one_control_lists_for_two():
    from seg_core.presets import control_arguments

    assert control_arguments(["canny"], [0.5], [0.0], [0.8]) == dict(
        controlnet_conditioning_scale=0.5, control_guidance_start=0.0, control_guidance_end=0.8)
    assert control_arguments(["softedge"], [0.5], [0.0], [1.0])["control_mode"] == UNION_MODES["softedge"]
    two = control_arguments(["depth", "openpose"], [0.5, 0.7], [0.0, 0.2], [1.0, 0.9])
    assert two == dict(controlnet_conditioning_scale=[0.5, 0.7], control_guidance_start=[0.0, 0.2],
                       control_guidance_end=[1.0, 0.9], control_mode=[UNION_MODES["depth"], UNION_MODES["openpose"]])
    with pytest.raises(ValueError, match="one scale and window per control"):
        control_arguments(["depth", "openpose"], [0.5], [0.0], [1.0])
