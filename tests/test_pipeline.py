"""Pipeline behaviour: state restored, calls independent, errors clear, loading through the real code."""

import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from conftest import EXACT, SMALL, generator, in_float64
from seg_core import StableDiffusionXLSEGPipeline, load_pipeline
from seg_core.attention import resolve_layers, token_grid
from seg_core.methods import GuidanceMethod

RUN = dict(num_inference_steps=3, output_type="latent")


def run(pipe, prompt="a red bicycle", **kwargs):
    return pipe(prompt, generator=generator(), **{**RUN, **kwargs}).images


def differs(a, b, at_least=1e-4):
    return ((a - b).norm() / b.norm()).item() > at_least


class CountingProcessor(AttnProcessor2_0):
    """A user's own processor: standard attention that counts the rows it sees."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.rows += hidden_states.shape[0]
        return super().__call__(attn, hidden_states, *args, **kwargs)


def processors(pipe):
    return dict(pipe.unet.attn_processors)


def test_user_processors_survive_and_serve_the_unchanged_branches(pipe):
    mid = resolve_layers(pipe.unet, ["m0"])[0]
    mine = CountingProcessor()
    pipe.unet.set_attn_processor({**processors(pipe), mid + ".processor": mine})
    before = processors(pipe)
    run(pipe, seg_scale=3.0, pag_scale=1.0)
    assert processors(pipe) == before
    assert processors(pipe)[mid + ".processor"] is mine
    assert mine.rows == 3 * 2  # 3 steps x [uncond, cond]; the SEG and PAG branches are changed


def hooks_left(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s submodules (itself included) that carry forward hooks of any kind."""
    return [name or "<root>" for name, m in module.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs]


class FailingProcessor(AttnProcessor2_0):
    """Ordinary attention that raises on its n-th call: a fault inside the UNet, mid-run."""

    def __init__(self, n):
        super().__init__()
        self.calls, self.n = 0, n

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("fault inside the UNet")
        return super().__call__(*args, **kwargs)


def explode(pipeline, step, t, tensors):
    raise RuntimeError("user callback failed")


@pytest.mark.parametrize("where", ["callback", "unet"])
def test_processors_and_hooks_restored_when_a_step_raises(pipe, where):
    clean = run(pipe, seg_scale=3.0, pag_scale=1.0, sag_scale=1.0)
    if where == "unet":  # the first down-block attention, on the second step (its down path is shared)
        name = [n for n in processors(pipe) if n.startswith("down_blocks.1")][0]
        pipe.unet.set_attn_processor({**processors(pipe), name: FailingProcessor(3)})
    before = processors(pipe)
    kwargs = dict(callback_on_step_end=explode) if where == "callback" else {}
    with pytest.raises(RuntimeError, match="user callback failed|fault inside the UNet"):
        run(pipe, seg_scale=3.0, pag_scale=1.0, sag_scale=1.0, **kwargs)
    assert processors(pipe) == before
    assert hooks_left(pipe.unet) == []  # down-block sharing hooks every unet.down_blocks[i]
    if where == "unet":
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(run(pipe, seg_scale=3.0, pag_scale=1.0, sag_scale=1.0), clean, rtol=0, atol=0)


def test_calls_do_not_influence_each_other(pipe):
    first = run(pipe, seg_blur_sigma=1.0)
    run(pipe, seg_blur_sigma=math.inf, pag_scale=2.0, sag_scale=1.0, seg_applied_layers=["up"])
    torch.testing.assert_close(run(pipe, seg_blur_sigma=1.0), first, rtol=0, atol=0)


def test_batches_match_single_images(pipe64):
    pipe = pipe64
    prompts = ["a red bicycle", "a blue house"]
    kwargs = dict(seg_blur_sigma=2.0, sag_scale=0.5, pag_scale=1.0, **RUN, **SMALL)
    batch = pipe(prompts, generator=[generator(0), generator(1)], **kwargs).images
    for k, prompt in enumerate(prompts):
        single = pipe(prompt, generator=generator(k), **kwargs).images
        torch.testing.assert_close(batch[k : k + 1], single, **EXACT)


def test_every_option_changes_the_result(pipe):
    base = run(pipe, seg_scale=0)
    seg = run(pipe, seg_blur_sigma=2.0)
    assert differs(seg, base)
    assert differs(run(pipe, seg_blur_sigma=2.0, seg_blur_target="key"), seg)
    assert differs(run(pipe, seg_blur_sigma=2.0, seg_blur_kernel="untruncated"), seg, 1e-6)
    assert differs(run(pipe, seg_blur_sigma=2.0, seg_applied_layers=["down", "u3"]), seg)
    halfway = run(pipe, seg_blur_sigma=2.0, perturbation_guidance_end=0.6)
    assert differs(halfway, seg) and differs(halfway, base)
    late = run(pipe, seg_blur_sigma=2.0, perturbation_guidance_start=0.3)
    assert differs(late, seg) and differs(late, base)


def test_untruncated_kernel_is_continuous_at_infinity(pipe):
    inf = run(pipe)
    assert not differs(run(pipe, seg_blur_sigma=5000.0, seg_blur_kernel="untruncated"), inf, 1e-6)
    assert differs(run(pipe, seg_blur_sigma=5000.0), inf, 1e-5)  # the paper's kernel jumps at 9999


def test_empty_prompt_is_unconditional_and_callbacks_see_latents(pipe):
    seen = []

    def record(pipeline, step, t, tensors):
        seen.append(step)
        return {"latents": tensors["latents"]}

    out = run(pipe, prompt="", callback_on_step_end=record)
    assert seen == [0, 1, 2] and torch.isfinite(out).all()


def test_custom_method_through_the_shared_interface(pipe64):
    pipe = pipe64
    class NegatedCFG(GuidanceMethod):
        """Guides away from the unconditional prediction: a term of scale * (eps_c - eps_u)."""

        name = "negcfg"

        def reference_prediction(self, state):
            return state.outputs["cond"]

        def weak_prediction(self, state):
            return state.outputs["uncond"]

    method = NegatedCFG(2.0)
    a = run(pipe, guidance_scale=5.0, guidance_methods=[method])
    b = run(pipe, guidance_scale=7.0, seg_scale=0)
    torch.testing.assert_close(a, b, **EXACT)  # the same sum, added in another order


def test_the_pipeline_computes_equation_10_through_guided_prediction(pipe, monkeypatch):
    """Eq. 10 lives in seg_core.guidance.guided_prediction, and the pipeline's noise prediction is its result."""
    import seg_core.methods

    calls, scheduler_inputs = [], []
    real = seg_core.methods.guided_prediction

    def recording(eps_cond, terms, eps_uncond, guidance_scale):
        calls.append((eps_cond, list(terms), eps_uncond, guidance_scale))
        return real(eps_cond, terms, eps_uncond, guidance_scale)

    monkeypatch.setattr(seg_core.methods, "guided_prediction", recording)
    step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step", lambda eps, *a, **k: (scheduler_inputs.append(eps), step(eps, *a, **k))[1])
    run(pipe, guidance_scale=5.0, seg_scale=3.0, seg_blur_sigma=2.0)
    assert len(calls) == len(scheduler_inputs) == RUN["num_inference_steps"]
    for (e_c, terms, e_u, w), eps in zip(calls, scheduler_inputs):
        (reference, e_seg, s), = terms
        assert w == 5.0 and s == 3.0 and reference is e_c
        torch.testing.assert_close(eps, e_u + w * (e_c - e_u) + s * (e_c - e_seg), rtol=0, atol=0)


@pytest.mark.parametrize("size", [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
                                  (1344, 768), (768, 1344), (1536, 640), (640, 1536), (1000, 600)])
def test_token_grid_for_every_sdxl_bucket(size):
    latent = (size[0] // 8, size[1] // 8)
    for factor in (1, 2, 4):  # SDXL's three UNet levels
        h, w = math.ceil(latent[0] / factor), math.ceil(latent[1] / factor)
        assert token_grid(h * w, latent) == (h, w)


def test_non_square_and_odd_grids_run(pipe):
    for height, width in ((48, 96), (96, 40), (72, 56)):  # 56 / 2 = 28 -> 14; 72/2 = 36 -> 18
        base = run(pipe, seg_scale=0, height=height, width=width)
        assert differs(run(pipe, seg_blur_sigma=3.0, height=height, width=width), base)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seg_applied_layers=["mid", "x3"]), r"unknown attention layer 'x3'; allowed: 'down', 'mid', 'up', 'd0'..'d3', 'm0'..'m1', 'u0'..'u5'"),
        (dict(seg_applied_layers=["m7"]), r"unknown attention layer 'm7'"),
        (dict(pag_scale=1.0, pag_applied_layers=[]), r"at least one layer"),
        (dict(seg_blur_sigma=-1.0), r"seg_blur_sigma must be a number >= 0 or 'inf', got -1.0"),
        (dict(seg_blur_sigma=float("nan")), r"seg_blur_sigma must be a number >= 0 .* got nan"),
        (dict(seg_scale=-0.5), r"seg_scale must be in \[0, 100\], got -0.5"),
        (dict(pag_scale=float("nan")), r"pag_scale must be a finite number in \[0, 100\], got nan"),
        (dict(sag_scale=float("inf")), r"sag_scale must be a finite number"),
        (dict(guidance_scale=-1.0), r"guidance_scale must be in \[0, 100\], got -1.0"),
        (dict(sag_scale=1.0, sag_blur_sigma=0.0), r"sag_blur_sigma must be in \(0, 10\], got 0.0"),
        (dict(height=60), r"height must be a multiple of 8 in \[8, 4096\], got 60"),
        (dict(width=0), r"width must be a multiple of 8 in \[8, 4096\], got 0"),
        (dict(num_inference_steps=0), r"num_inference_steps must be an integer in \[1, 1000\], got 0"),
        (dict(seg_blur_target="value"), r"seg_blur_target must be one of \['query', 'key'\], got 'value'"),
        (dict(seg_blur_kernel="box"), r"seg_blur_kernel must be one of"),
        (dict(perturbation_guidance_start=0.8, perturbation_guidance_end=0.2), r"perturbation_guidance_start \(0.8\) must be below"),
        (dict(image=object()), r"no `controlnet` component"),
    ],
)
def test_bad_arguments_name_the_value_and_range(pipe, kwargs, message):
    before = processors(pipe)
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)
    assert processors(pipe) == before


def test_controlnet_pipeline_requires_a_control_image(components, controlnet):
    pipe = StableDiffusionXLSEGPipeline(**components, controlnet=controlnet)
    with pytest.raises(ValueError, match="pass the control `image`"):
        run(pipe)


def test_save_and_load_through_the_real_loading_code(tmp_path, pipe, controlnet):
    pipe.save_pretrained(tmp_path / "model")
    controlnet.save_pretrained(tmp_path / "controlnet")
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_pipeline(str(tmp_path / "model"), device="cpu")
    loaded.set_progress_bar_config(disable=True)
    in_float64(pipe.components, loaded.components)
    assert isinstance(loaded, StableDiffusionXLSEGPipeline) and loaded.controlnet is None
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        saved, back = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(saved[k], back[k]) for k in saved), name
    # (transformers may pick another attention kernel for loaded text encoders: hence float64)
    torch.testing.assert_close(run(loaded, seg_blur_sigma=2.0), run(pipe, seg_blur_sigma=2.0), **EXACT)
    with_net = load_pipeline(str(tmp_path / "model"), controlnet=str(tmp_path / "controlnet"), device="cpu")
    assert with_net.controlnet is not None


def test_loads_a_plain_sdxl_folder_and_from_pipe(tmp_path, components):
    sdxl = StableDiffusionXLPipeline(**components, add_watermarker=False)
    sdxl.save_pretrained(tmp_path / "sdxl")  # model_index.json of StableDiffusionXLPipeline, no controlnet
    loaded = StableDiffusionXLSEGPipeline.from_pretrained(tmp_path / "sdxl", use_safetensors=True)
    assert loaded.controlnet is None
    derived = StableDiffusionXLSEGPipeline.from_pipe(sdxl)
    assert derived.unet is sdxl.unet
    derived.set_progress_bar_config(disable=True)
    assert torch.isfinite(run(derived)).all()


def test_tiny_preset_is_deterministic():
    a, b = load_pipeline("tiny", device="cpu"), load_pipeline("tiny", device="cpu")
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(pa, pb)


# ---- the guidance arguments: one source (seg_core.options.GUIDANCE) ---------------------------------


def test_guidance_arguments_are_the_options():
    import inspect

    from seg_core import build_guidance_methods
    from seg_core.options import GUIDANCE

    for function in (StableDiffusionXLSEGPipeline.__call__, build_guidance_methods):
        parameters = inspect.signature(function).parameters
        guidance = {name: p.default for name, p in parameters.items() if name in GUIDANCE}
        assert list(guidance) == list(GUIDANCE), function
        assert guidance == {name: option.default for name, option in GUIDANCE.items()}, function
    own = set(inspect.signature(build_guidance_methods).parameters)
    assert own == set(GUIDANCE)  # nothing else, and nothing left out
    doc = StableDiffusionXLSEGPipeline.__call__.__doc__
    for name, option in GUIDANCE.items():  # the help is the option's (whitespace aside)
        entry = doc[doc.index(f"            {name} ("):]
        assert option.help.split()[:6] == entry.split("):", 1)[1].split()[:6], name


@pytest.mark.parametrize("name, value", [("seg_scale", -0.5), ("seg_blur_sigma", "blurry"), ("pag_scale", math.nan),
                                         ("sag_blur_sigma", 0.0), ("seg_blur_kernel", "box"),
                                         ("perturbation_guidance_end", 2.0), ("pag_adaptive_scale", 1.5)])
def test_a_wrong_guidance_value_is_refused_with_its_options_message(pipe, name, value):
    from seg_core.options import GUIDANCE, check_interval

    with pytest.raises(ValueError) as expected:
        if name.startswith("perturbation_guidance"):  # a pair, checked by the options' interval rule
            check_interval(0.0, value, "perturbation_guidance")
        else:
            GUIDANCE[name].check(value)
    kwargs = {"sag_scale": 1.0, "pag_scale": 1.0} if name.startswith(("sag", "pag_")) and name != "pag_scale" else {}
    with pytest.raises(ValueError) as refused:
        run(pipe, **{**kwargs, name: value})
    assert str(refused.value) == str(expected.value)
