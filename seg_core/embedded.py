"""The embedded model: a small trained SDXL-architecture model that ships in assets/embedded.

Same pipeline classes as SDXL (a UNet2DConditionModel with text_time conditioning and self-attention in
its mid block, an AutoencoderKL, two CLIP text encoders and tokenizers), trained by
scripts/train_embedded.py on the procedural set of seg_core.shapes: it draws a coloured shape on a
coloured background at 32x32 pixels from prompts such as "a red triangle on a blue background".  The text
encoders are random CLIP models built from a fixed seed and kept frozen; the UNet and VAE are trained.
It loads through the ordinary loading code (``from_pretrained`` of a local folder).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .shapes import CAPTIONS, IMAGE_SIZE, ShapeClassifier
from .tiny import byte_level_tokenizer, small_text_config
from .models import ASSETS_DIR, EMBEDDED, EMBEDDED_DESCRIPTION, EMBEDDED_DIR  # noqa: F401 (re-exported)

#: The judge of the evaluation and the tests: a small CNN trained on held-out images of the set.
CLASSIFIER_PATH = ASSETS_DIR / "embedded_classifier.safetensors"
#: What the app's banner says when this model is loaded.
DESCRIPTION = f"Embedded model: {EMBEDDED_DESCRIPTION}"
#: Every prompt the model was trained on (plus "" for unconditional generation).
PROMPTS: tuple[str, ...] = CAPTIONS
#: Width and height the model was trained at.
SIZE = IMAGE_SIZE
# The demo's defaults on this model: its profile (seg_core.models, which says where each comes from).
DEFAULT_STEPS = EMBEDDED.steps
GUIDANCE_SCALE = EMBEDDED.guidance_scale
SEG_SCALE = EMBEDDED.seg_scale
PAG_SCALE = EMBEDDED.pag_scale
SAG_SCALE = EMBEDDED.sag_scale
EXAMPLE_PROMPTS: tuple[str, ...] = EMBEDDED.prompts
LATENT_SIZE = IMAGE_SIZE // 2  # the VAE downsamples 2x


def load_embedded(device: str | None = None, dtype: torch.dtype | None = None):
    """The embedded pipeline, loaded from EMBEDDED_DIR by seg_core.presets.load_pipeline."""
    from .presets import load_pipeline

    if not (EMBEDDED_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"no embedded model at {EMBEDDED_DIR}: run scripts/train_embedded.py")
    return load_pipeline(str(EMBEDDED_DIR), device=device, dtype=dtype)


def load_classifier() -> ShapeClassifier:
    """The shapes classifier saved next to the embedded model."""
    return ShapeClassifier.load(CLASSIFIER_PATH)


# --------------------------------------------------------------------------------------------------
# The architecture, for training from scratch
# --------------------------------------------------------------------------------------------------


def text_encoder_config(vocab_size: int) -> CLIPTextConfig:
    return small_text_config(vocab_size, intermediate_size=64, num_hidden_layers=3)


def build_components(seed: int = 0) -> dict:
    """Untrained components of the embedded model; the text encoders are final (random, frozen, seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = byte_level_tokenizer()
        text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(len(tokenizer)))
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # the mid block (8x8 tokens at 32 px) holds 2 transformer blocks: 2 self-attentions for "mid"
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32, cross_attention_dim=64,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    return {
        "unet": unet, "vae": vae, "scheduler": scheduler,
        "text_encoder": _as_shipped(text_encoder), "tokenizer": tokenizer,
        "text_encoder_2": _as_shipped(text_encoder_2), "tokenizer_2": byte_level_tokenizer(),
        "image_encoder": None, "feature_extractor": None,
    }


def _as_shipped(model: torch.nn.Module) -> torch.nn.Module:
    """Frozen, with weights rounded to fp16 as they are saved, so training sees the shipped encoder."""
    return model.to(torch.float16).to(torch.float32).eval().requires_grad_(False)
