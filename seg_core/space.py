"""What a visitor of the demo (a Hugging Face Space, or a local run) reads besides the controls: the About
text, the citations, the duplicate hint, and the examples whose outputs were rendered ahead
(scripts/render_examples.py writes them to assets/examples/<model>/)."""

from __future__ import annotations

import json

from .blur import INFINITE_SIGMA_THRESHOLD
from .models import ASSETS_DIR

PAPER_URL = "https://arxiv.org/abs/2408.00760"
EXAMPLES_DIR = ASSETS_DIR / "examples"

#: SDXL's example prompts in the spirit of the paper's figures; "" is unconditional generation (Table 1).
#: (prompt, negative prompt, CFG scale)
SDXL_EXAMPLES = [
    ("a jellyfish playing the drums", "", 1.0),
    ("a corgi wearing a red scarf, sitting in a snowy forest", "", 1.0),
    ("a vintage car parked in front of a small cottage, golden hour", "", 1.0),
    ("a bowl of ramen on a wooden table, studio photograph", "blurry, low quality", 5.0),
    ("", "", 1.0),
]

ABOUT = f"""
**What SEG is.** [Smoothed Energy Guidance]({PAPER_URL}) (Hong, NeurIPS 2024) runs, at every denoising step,
a second prediction of the same model in which a few self-attention layers (here the mid block's) see their
queries blurred with a Gaussian over the token grid, which smooths the attention's energy landscape, and
steps away from that prediction as classifier-free guidance steps away from the unconditional one (Eq. 10).
It needs no prompt, no training and no extra model, so it helps unconditional generation as much as
text-to-image.

**σ and the scale.** The *SEG scale* s says how far to step away from the blurred prediction (the authors
keep s = 3). *Blur σ* (in tokens) says how strongly that prediction is blurred: small σ changes little,
σ = ∞ makes every query the mean query (uniform attention). The authors vary σ, not s: raising σ
(1, 4, 16, ..., ∞) strengthens the effect with fewer side effects (saturation, changed layout) than
raising the scale. The *CFG scale* is ordinary classifier-free guidance (1 = off, the paper's setting).

**How the methods differ** (Compare tab: same seed, same settings):
- *Vanilla*: no extra guidance.
- *SAG* (Self-Attention Guidance): blurs the predicted clean image where the mid-block attention looks most,
  re-noises it and guides away from the model's prediction on it: a second UNet pass per step.
- *PAG* (Perturbed-Attention Guidance): replaces the chosen self-attention maps by the identity (every token
  attends only to itself) in the extra branch.
- *SEG*: blurs the attention queries instead, by σ: a continuous knob between the model itself (σ = 0) and
  uniform attention (σ = ∞).

**In the paper, look for** Figure 1 (vanilla SDXL against SEG, with and without a prompt), Table 1
(unconditional SDXL, FID: vanilla 129.5, SAG 106.7, PAG 105.3, SEG σ = 10 95.3, SEG σ = ∞ 88.2) and
Table 2 (text-conditional without CFG, FID: 53.4 unguided, 48.3 with SEG at σ = 1, down to 26.2 at σ = ∞), and the
qualitative figures that raise σ at a fixed scale of 3: the Sweep tab draws that grid for your prompt.

**How this implementation was checked.** SEG equals an independent implementation of the paper's rules
(the authors' clamped kernel as a full 2-D convolution, the σ > {INFINITE_SIGMA_THRESHOLD:g} threshold, the
[uncond, cond, perturbed] batch layout, Eq. 10) run inside diffusers' own PAG pipeline, to 1e-10 in float64; PAG
equals diffusers' `StableDiffusionXLPAGPipeline` (to 1e-10) and SAG its `StableDiffusionSAGPipeline` (1e-5); with every
scale at 0 the output is bit-identical to `StableDiffusionXLPipeline` (with ControlNet too). The tests
(`tests/`, offline, on a CPU) and their tolerances are listed in the README.
"""

CITATION = """@inproceedings{hong2024seg,
  title     = {Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of Attention},
  author    = {Hong, Susung},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024}
}

@inproceedings{ahn2024pag,
  title     = {Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance},
  author    = {Ahn, Donghoon and Cho, Hyoungwon and Min, Jaewon and Jang, Wooseok and Kim, Jungwoo and
               Kim, SeonHwa and Park, Hyun Hee and Jin, Kyong Hwan and Kim, Seungryong},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}

@inproceedings{hong2023sag,
  title     = {Improving Sample Quality of Diffusion Models Using Self-Attention Guidance},
  author    = {Hong, Susung and Lee, Gyuseong and Jang, Wooseok and Kim, Seungryong},
  booktitle = {IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""

LICENSE_NOTE = ("This demo's code is MIT-licensed (LICENSE). The models keep their own licenses: SDXL base 1.0 "
                "the CreativeML Open RAIL++-M license, the ControlNets and the depth estimator theirs.")


def duplicate_hint(space_id: str | None) -> str:
    """Markdown for visitors facing a long queue or a spent quota: run their own copy."""
    where = (f"[duplicate this Space](https://huggingface.co/spaces/{space_id}?duplicate=true)" if space_id
             else "duplicate this Space (the ⋮ menu of its page)")
    return (f"**Long queue, or out of GPU quota?** {where} to run it on a GPU of your own (an L4 is enough), "
            "or clone the repository: `make demo` starts on SDXL with a GPU and on the small embedded model "
            "without one.")


def example_rows(prompts: tuple | None, guidance_scale: float) -> list[tuple[str, str, float]]:
    """The page's examples, (prompt, negative prompt, CFG scale): a model's own prompts when it knows only
    those, then unconditional generation; else SDXL's."""
    if prompts:
        return [(p, "", guidance_scale) for p in prompts] + [("", "", 1.0)]
    return list(SDXL_EXAMPLES)


def rendered_examples(model: str) -> list[dict]:
    """The examples rendered ahead for ``model`` (assets/examples/<model>/examples.json), with absolute file
    paths; empty when none ship for it."""
    folder = EXAMPLES_DIR / model
    index = folder / "examples.json"
    if not index.is_file():
        return []
    entries = json.loads(index.read_text())
    for entry in entries:
        entry["grid"] = str(folder / entry["grid"])
        entry["images"] = [(str(folder / name), label) for name, label in entry["images"]]
    return entries
