"""A tiny random-weight model in SDXL's exact architecture, built in code (no files, no network).

It draws noise, not pictures: it exists so that every code path (two text encoders, text_time
conditioning, the VAE, ControlNet) runs in a fraction of a second on a CPU, deterministically.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, ControlNetUnionModel, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_SIZE = 64  # pixels; the tiny VAE downsamples 2x, so the latent is 32x32 and the mid grid 16x16


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_level_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes: 256 symbols, the same with "</w>", and the two specials."""
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)


def small_text_config(vocab_size: int, intermediate_size: int = 37, num_hidden_layers: int = 5) -> CLIPTextConfig:
    """A CLIP text encoder of hidden size 32 (projection 32) over :func:`byte_level_tokenizer`'s vocabulary."""
    return CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=32, intermediate_size=intermediate_size, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=num_hidden_layers, vocab_size=vocab_size, hidden_act="gelu", projection_dim=32,
    )


def tiny_sdxl_components(seed: int = 0) -> dict:
    """The components of a StableDiffusionXLPipeline, tiny and seeded (same seed, same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=TINY_SIZE // 2,
            in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=1,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4, sample_size=TINY_SIZE,
        )
        tokenizer = byte_level_tokenizer()
        text_encoder = CLIPTextModel(small_text_config(len(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(small_text_config(len(tokenizer)))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    )
    return {
        "unet": unet.eval(), "vae": vae.eval(), "scheduler": scheduler,
        "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2.eval(), "tokenizer_2": byte_level_tokenizer(),
        "image_encoder": None, "feature_extractor": None,
    }


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet for the tiny UNet whose zero-initialised output convolutions are made non-zero,
    so that the control image visibly changes the result (a trained ControlNet's would be)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        for name, param in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_mid_block" in name or "conv_out" in name:
                torch.nn.init.normal_(param, std=0.05)
    return controlnet.eval()


def _unzero_outputs(controlnet):
    """Make a fresh ControlNet's zero-initialised outputs non-zero, so the control image changes the result."""
    for name, param in controlnet.named_parameters():
        if "zero_conv" in name or "controlnet_mid_block" in name or "conv_out" in name or "controlnet_down_blocks" in name \
                or "spatial_ch_projs" in name:
            torch.nn.init.normal_(param, std=0.05)


def tiny_union_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetUnionModel:
    """A ControlNet-Union (xinsir's architecture, diffusers' ``ControlNetUnionModel``) for the tiny UNet:
    its mode transformer is sized to the UNet's first block width, and its outputs are made non-zero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        copied = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        width = unet.config.block_out_channels[0]
        config = {k: v for k, v in copied.config.items() if k != "_use_default_values"}  # (else defaults win)
        config.update(num_trans_channel=width, num_trans_head=4, num_proj_channel=width)
        controlnet = ControlNetUnionModel.from_config(config)
        controlnet.load_state_dict({k: v for k, v in copied.state_dict().items()
                                    if controlnet.state_dict()[k].shape == v.shape}, strict=False)
        _unzero_outputs(controlnet)
    return controlnet.eval()


# ---- adapters: files in the published layouts, for seg_core.adapters' loaders ------------------------

def tiny_lora_layers(module: torch.nn.Module, target_modules: list[str], seed: int = 0, rank: int = 4,
                     use_dora: bool = False) -> dict:
    """A random LoRA (A and B both non-zero; ``use_dora``: DoRA, with magnitudes) for a copy of ``module``, as
    diffusers' ``save_lora_weights`` takes it (its training scripts' state dict)."""
    import copy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapted = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, init_lora_weights=False,
                       use_dora=use_dora),
            copy.deepcopy(module))
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(adapted))


def write_tiny_lora(folder, components: dict, seed: int = 0, text_encoders: bool = False,
                    weight_name: str = "pytorch_lora_weights.safetensors", use_dora: bool = False) -> None:
    """A random LoRA (``use_dora``: DoRA) for the tiny model's UNet attention (and, with ``text_encoders``, both
    text encoders'), written to ``folder`` as diffusers writes SDXL LoRAs (safetensors)."""
    from diffusers import StableDiffusionXLPipeline

    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    layers = {"unet_lora_layers": tiny_lora_layers(components["unet"], attention, seed, use_dora=use_dora)}
    if text_encoders:
        for k, name in enumerate(("text_encoder", "text_encoder_2")):
            layers[f"{name}_lora_layers"] = tiny_lora_layers(
                components[name], ["q_proj", "k_proj", "v_proj", "out_proj"], seed + 1 + k)
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers, weight_name=weight_name, safe_serialization=True)


def tiny_ip_adapter_state_dict(unet: UNet2DConditionModel, clip_dim: int = 32, seed: int = 0) -> dict:
    """A random IP-Adapter for ``unet`` in the layout of the published checkpoints (h94/IP-Adapter): an image
    projection to 4 tokens and a key and value projection per cross-attention, numbered 1, 3, 5, ..."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cross = unet.config.cross_attention_dim
        image_proj = {"proj.weight": torch.randn(4 * cross, clip_dim) * 0.2, "proj.bias": torch.zeros(4 * cross),
                      "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
        modules = dict(unet.named_modules())
        cross_layers = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
        ip_layers = {}
        for i, name in enumerate(cross_layers):
            hidden = modules[name].to_q.out_features
            ip_layers[f"{1 + 2 * i}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.2
            ip_layers[f"{1 + 2 * i}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.2
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def tiny_image_encoder(clip_dim: int = 32, seed: int = 0):
    """A CLIP vision encoder with projection ``clip_dim``, on 32x32 images (the IP-Adapter's image encoder)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = CLIPVisionConfig(hidden_size=32, projection_dim=clip_dim, image_size=32, patch_size=8,
                                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
        return CLIPVisionModelWithProjection(config).eval()


def write_tiny_ip_adapter(folder, unet: UNet2DConditionModel, seed: int = 0,
                          weight_name: str = "ip-adapter_tiny.safetensors") -> None:
    """A random IP-Adapter in ``folder``/models/``weight_name`` with its encoder in ``folder``/models/image_encoder,
    as the published repository lays them out."""
    from pathlib import Path

    from safetensors.torch import save_file

    models = Path(folder, "models")
    models.mkdir(parents=True, exist_ok=True)
    state = tiny_ip_adapter_state_dict(unet, seed=seed)
    save_file({f"{part}.{key}": value.contiguous() for part, tensors in state.items() for key, value in tensors.items()},
              str(models / weight_name))
    tiny_image_encoder(seed=seed).save_pretrained(models / "image_encoder")


def write_tiny_adapters(folder, components: dict) -> str:
    """Two random LoRAs ("ink": UNet only, "glaze": UNet and text encoders) and an IP-Adapter for the model
    of ``components`` in ``folder``, and the adapters.json offering them (seg_core.adapters); its path."""
    import json
    from pathlib import Path

    folder = Path(folder)
    write_tiny_lora(folder / "ink", components, seed=1)
    write_tiny_lora(folder / "glaze", components, seed=2, text_encoders=True)
    write_tiny_ip_adapter(folder / "ip-adapter", components["unet"], seed=3)
    lora = {"weight_name": "pytorch_lora_weights.safetensors", "license": "random weights (tests)"}
    config = {
        "loras": {"ink": {"source": "./ink", "weight_range": [-1.0, 1.5], **lora},
                  "glaze": {"source": "./glaze", "weight_range": [0.0, 1.0], "default_weight": 0.8, **lora}},
        "ip_adapter": {"source": "./ip-adapter", "subfolder": "models", "weight_name": "ip-adapter_tiny.safetensors",
                       "image_encoder": "models/image_encoder", "license": "random weights (tests)"},
    }
    path = folder / "adapters.json"
    path.write_text(json.dumps(config, indent=2))
    return str(path)
