"""The embedded shapes model: it loads through the real loading code and draws what it is asked for."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from seg_core import shapes
from seg_core.embedded import CLASSIFIER_PATH, EMBEDDED_DIR, PROMPTS, SIZE, load_classifier, load_embedded

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_DIR / "model_index.json").is_file() or not CLASSIFIER_PATH.is_file(),
    reason="assets/embedded not trained (scripts/train_embedded.py)",
)

# Prompts of the set with the seeds this check uses; every attribute value appears at least once.
CASES = [
    ("a red circle on a white background", 0),
    ("a yellow triangle on a black background", 1),
    ("a blue square on a gray background", 2),
    ("a green triangle on a blue background", 3),
    ("a purple circle on a green background", 4),
    ("an orange square on a white background", 5),
]


@pytest.fixture(scope="module")
def pipe():
    return load_embedded(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def generate(pipe, **kwargs):
    prompts = [p for p, _ in CASES]
    generators = [torch.Generator().manual_seed(seed) for _, seed in CASES]
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
    images = generate(pipe, guidance_scale=1.0, seg_scale=0.0)
    assert images[0].size == (SIZE, SIZE)
    predicted = classifier.predict(images)
    wanted = [shapes.parse_caption(p) for p, _ in CASES]
    assert sum(p == w for p, w in zip(predicted, wanted)) >= len(CASES) - 1, list(zip(predicted, wanted))


def test_seg_changes_the_image_and_keeps_it_on_prompt(pipe, classifier):
    vanilla = generate(pipe, guidance_scale=1.0, seg_scale=0.0)
    seg = generate(pipe, guidance_scale=1.0, seg_scale=3.0, seg_blur_sigma=math.inf)
    to_tensor = lambda images: shapes._as_tensor(images)  # noqa: E731
    assert (to_tensor(seg) - to_tensor(vanilla)).abs().mean() > 0.01  # the mid-block attention matters
    predicted = classifier.predict(seg)
    wanted = [shapes.parse_caption(p) for p, _ in CASES]
    assert sum(p == w for p, w in zip(predicted, wanted)) >= len(CASES) - 1, list(zip(predicted, wanted))


def test_classifier_reads_real_images_of_the_set(classifier):
    images, labels = shapes.sample(200, seed=99)
    accuracy = sum(p == t for p, t in zip(classifier.predict(images), labels)) / len(labels)
    assert accuracy >= 0.95
