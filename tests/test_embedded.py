"""The embedded shapes model: it loads through the real loading code and draws what it is asked for."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from seg_core import shapes
from seg_core.embedded import CLASSIFIER_PATH, EMBEDDED_DIR, PROMPTS, SIZE, load_classifier, load_embedded



def test_the_weights_ship_with_the_repository():
    # The demo falls back to this model; its absence must fail, not skip.
    assert (EMBEDDED_DIR / "model_index.json").is_file() and CLASSIFIER_PATH.is_file()

# Prompts of the set with seeds whose 8-step CFG images the classifier reads right (shape, colour and
# background); every shape, and a third of the colours and backgrounds, appear.
CASES = [
    ("an orange circle on a blue background", 4),
    ("a red square on a gray background", 15),
    ("a yellow triangle on a green background", 35),
]
CFG = {"guidance_scale": 5.0, "seg_scale": 0.0}


@pytest.fixture(scope="module")
def pipe():
    return load_embedded(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def generate(pipe, cases, **kwargs):
    prompts = [p for p, _ in cases]
    generators = [torch.Generator().manual_seed(seed) for _, seed in cases]
    return pipe(prompts, num_inference_steps=8, generator=generators, **kwargs).images


def test_loads_sdxl_components_from_the_saved_folder(pipe):
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.default_sample_size * pipe.vae_scale_factor == SIZE
    assert pipe.unet.dtype == torch.float32
    mid_self_attentions = [n for n in pipe.unet.attn_processors if n.startswith("mid_block") and "attn1" in n]
    assert len(mid_self_attentions) == 2  # what SEG, PAG and SAG act on
    assert len(PROMPTS) == 84 and all(shapes.parse_caption(p) for p in PROMPTS)


def test_generated_images_show_the_prompt(pipe, classifier):
    images = generate(pipe, CASES, **CFG)
    assert images[0].size == (SIZE, SIZE)
    assert classifier.predict(images) == [shapes.parse_caption(p) for p, _ in CASES]


def test_shape_and_colour_follow_the_prompt_well_above_chance(pipe, classifier):
    # Half the set, one seed each. The model follows shape and colour (chance: 1/3 and 1/6) far more
    # reliably than the background (see the README's embedded model section), so only those two are held to a bar.
    cases = [(p, k) for k, p in enumerate(PROMPTS[::2])]
    predicted = classifier.predict(generate(pipe, cases, **CFG))
    wanted = [shapes.parse_caption(p) for p, _ in cases]
    shape = sum(p[0] == w[0] for p, w in zip(predicted, wanted)) / len(cases)
    colour = sum(p[1] == w[1] for p, w in zip(predicted, wanted)) / len(cases)
    assert shape >= 0.6 and colour >= 0.6, (shape, colour)


def test_seg_changes_the_image(pipe):
    vanilla = generate(pipe, CASES, guidance_scale=1.0, seg_scale=0.0)
    seg = generate(pipe, CASES, guidance_scale=1.0, seg_scale=3.0, seg_blur_sigma=math.inf)
    # the mid-block self-attention the guidance perturbs matters to this model
    assert (shapes.as_tensor(seg) - shapes.as_tensor(vanilla)).abs().mean() > 0.01


def test_classifier_reads_real_images_of_the_set(classifier):
    images, labels = shapes.sample(200, seed=99)
    accuracy = sum(p == t for p, t in zip(classifier.predict(images), labels)) / len(labels)
    assert accuracy >= 0.95
