"""What SEG costs per denoising step, measured side by side in one process.

    python bench/guidance_cost.py --quick      # CPU, SDXL's block structure with narrow channels (< 3 min)
    python bench/guidance_cost.py              # full-size SDXL UNet shapes, random weights (fp16 on CUDA)
    python bench/guidance_cost.py --quick --compile   # plus a compiled column (torch.compile of the UNet)

Every mode is timed in turn, round after round (interleaved), and the median is reported.  Besides wall
time it counts FLOPs (torch.utils.flop_counter) so the measured ratios can be read against the floor.
The last line printed is a JSON object with the headline ratios.

``--compile`` also times the step modes in COMPILED_MODES on a compiled copy of the UNet (see
seg_core.compiled), reports each mode's compile time (its first call), and dynamo's graph breaks and
recompiles: graphs compiled by cfg_seg_inf's first call (only sigma differs from cfg_seg, so its graphs
must be reused) and while timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from seg_core.attention import SmoothedEnergyAttention  # noqa: E402
from seg_core.blur import blur_tokens  # noqa: E402
from seg_core.compiled import CUDA_GRAPH_MODES, compile_unet, counts_since, dynamo_counts  # noqa: E402
from seg_core.methods import PAG, SAG, SEG, GuidedStep, select_rows  # noqa: E402
from seg_core.models import SDXL as SDXL_PROFILE  # noqa: E402

SDXL = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), layers_per_block=2, use_linear_projection=True,
    addition_embed_type="text_time", in_channels=4, out_channels=4,
)
FULL = dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
QUICK = dict(block_out_channels=(40, 80, 160), attention_head_dim=(5, 10, 20), cross_attention_dim=128,
             addition_time_embed_dim=16, projection_class_embeddings_input_dim=6 * 16 + 64, norm_num_groups=8)


class Scheduler:
    """Just what SAG reads: a DDPM alpha-bar and the prediction type."""

    init_noise_sigma = 1.0
    config = type("Config", (), {"prediction_type": "epsilon"})()

    def __init__(self):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)


def build(quick: bool, device, dtype):
    config = {**SDXL, **(QUICK if quick else FULL)}
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a full-size UNet's 2.6e9 weights init fast there
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype).eval()
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    conditioning = {
        role: {
            "prompt_embeds": torch.randn(1, 77, config["cross_attention_dim"], device=device, dtype=dtype),
            "text_embeds": torch.randn(1, text_dim, device=device, dtype=dtype),
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=device, dtype=dtype),
        }
        for role in ("uncond", "cond")
    }

    def model_of(unet):
        def model(x, t, branches):
            def gather(key):
                return torch.cat([select_rows(conditioning[b.role][key].expand(x.shape[0], *conditioning[b.role][key].shape[1:]),
                                              b.rows) for b in branches])

            return unet(torch.cat([select_rows(x, b.rows) for b in branches]), t, encoder_hidden_states=gather("prompt_embeds"),
                        added_cond_kwargs={"text_embeds": gather("text_embeds"), "time_ids": gather("time_ids")},
                        return_dict=False)[0]

        return model

    return unet, model_of


def guided_step(unet, model, methods, do_cfg, share):
    """A closure running one guided denoising step, with processors and hooks installed around it."""
    step = GuidedStep(methods, unet, share_down_blocks=share)
    scheduler = Scheduler()

    def run(x, t):
        with step.installed():
            return step(model, x, t, 0, 1, scheduler, 5.0 if do_cfg else 1.0, do_cfg)

    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def cuda_graphed(fn):
    """Capture ``fn`` in a CUDA graph and return its replay: GPU time without Python launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def attention_layer_modes(device, dtype, sigma, side=32):
    """One self-attention layer of SDXL's mid block at 1024x1024 (a 32x32 grid, 1280 channels, 20 heads,
    in every mode): the blur alone, the attention it feeds, the layer with and without the blur."""
    torch.manual_seed(0)
    attn = Attention(query_dim=1280, heads=20, dim_head=64, bias=False, out_bias=True).to(device, dtype).eval()
    hidden = torch.randn(1, side * side, 1280, device=device, dtype=dtype)
    heads, head_dim = 20, 64
    q, k, v = (torch.randn(1, heads, side * side, head_dim, device=device, dtype=dtype) for _ in range(3))
    with_blur, without_blur = SmoothedEnergyAttention(sigma), SmoothedEnergyAttention(0.0)
    return dict(zip(LAYER_MODES, (
        lambda: blur_tokens(q, (side, side), sigma),
        lambda: F.scaled_dot_product_attention(q, k, v),
        lambda: with_blur(attn, hidden, (side, side)),
        lambda: without_blur(attn, hidden, (side, side)),
    )))


LAYER_MODES = ("blur", "attention", "seg_layer_blur", "seg_layer_no_blur")


def step_modes(sigma: float) -> dict:
    """Each step mode's (guidance methods, CFG on, down blocks shared), with new method objects."""
    seg = lambda: SEG(3.0, sigma)  # noqa: E731
    return {
        "cond": ([], False, True),
        "cfg": ([], True, True),
        "cfg_seg": ([seg()], True, True),
        "cfg_seg_unshared": ([seg()], True, False),
        "cfg_seg_inf": ([SEG(3.0, math.inf)], True, True),
        "seg_only": ([seg()], False, True),
        "seg_only_unshared": ([seg()], False, False),
        "cfg_pag": ([PAG(3.0)], True, True),
        "cfg_sag": ([SAG(0.75)], True, True),
    }


STEP_MODES = tuple(step_modes(1.0))
#: The Compare tab's four methods, one step each: vanilla, SAG, PAG, SEG.
COMPARE_MODES = ("cfg", "cfg_sag", "cfg_pag", "cfg_seg")


#: The step modes timed compiled (each new layout compiles its graphs); cfg_seg_inf differs from cfg_seg
#: in sigma only, so it must compile nothing.
COMPILED_MODES = {"quick": ("cfg", "cfg_seg", "cfg_seg_inf"),
                  "full": ("cond", "cfg", "cfg_seg", "cfg_seg_inf", "cfg_pag", "cfg_sag", "compare_sequential")}


def compiled_columns(args, unet, model_of, x, t, device, rounds):
    """Median step times on a compiled copy of ``unet``, each mode's compile time, and dynamo's counts."""
    options = dict(mode=args.compile_mode, regional=not args.compile_whole)
    compiled_unet = compile_unet(copy.deepcopy(unet), **options)
    model = model_of(compiled_unet)
    steps = {name: guided_step(compiled_unet, model, *spec) for name, spec in step_modes(args.sigma).items()}
    modes = {name: (lambda s=s: s(x, t)) for name, s in steps.items()}
    modes["compare_sequential"] = lambda: [steps[k](x, t) for k in COMPARE_MODES]
    modes = {name: modes[name] for name in COMPILED_MODES["quick" if args.quick else "full"]
             if name in args.modes}
    compile_s, recompiles = {}, 0
    host_syncs = None
    with torch.no_grad():
        for name, fn in modes.items():  # first call compiles (twice more: CUDA graphs record on later calls)
            before = dynamo_counts()
            compile_s[name] = timed(fn, device)
            print(f"compiled {name}: first call {compile_s[name]:.1f} s", flush=True)  # (the table comes last)
            if name == "cfg_seg_inf":
                recompiles += counts_since(before)["recompiles"]
            fn(), fn()
        if args.sync_check and device.type == "cuda" and "cfg_seg" in modes:
            host_syncs = host_synchronisation(modes["cfg_seg"])
        warm = dynamo_counts()
        times = {name: [] for name in modes}
        for _ in range(rounds):
            for name, fn in modes.items():
                times[name].append(timed(fn, device))
    return {
        "options": {**options, "backend": "inductor"},
        "median": {name: statistics.median(values) for name, values in times.items()},
        "compile_s": compile_s,
        "graph_breaks": dynamo_counts()["graph_breaks"],
        "recompiles": recompiles + counts_since(warm)["recompiles"],
        "host_syncs": host_syncs,
        # graphs inductor ran without CUDA graphs (each logged with its reason): 0 is the aim
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def host_synchronisation(fn) -> str:
    """"none" if ``fn`` (a warm compiled step) runs without waiting on the GPU, else the first such wait."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


#: Ratios in the JSON line, each (numerator mode, denominator mode, table: "time" or "flops").
RATIOS = {
    "cfg_seg_over_cfg": ("cfg_seg", "cfg", "time"),
    "cfg_seg_unshared_over_cfg": ("cfg_seg_unshared", "cfg", "time"),
    "cfg_seg_inf_over_cfg": ("cfg_seg_inf", "cfg", "time"),
    "seg_only_over_cond": ("seg_only", "cond", "time"),
    "seg_only_unshared_over_cond": ("seg_only_unshared", "cond", "time"),
    "cfg_pag_over_cfg": ("cfg_pag", "cfg", "time"),
    "cfg_sag_over_cfg": ("cfg_sag", "cfg", "time"),
    "flops_cfg_seg_over_cfg": ("cfg_seg", "cfg", "flops"),
    "flops_cfg_seg_unshared_over_cfg": ("cfg_seg_unshared", "cfg", "flops"),
    "flops_seg_only_over_cond": ("seg_only", "cond", "flops"),
    "compare_batched_over_sequential": ("compare_batched", "compare_sequential", "time"),
    "blur_over_attention": ("blur", "attention", "time"),
    "seg_layer_blur_over_no_blur": ("seg_layer_blur", "seg_layer_no_blur", "time"),
}
#: The compiled ones: "eager_" names the eager column. The issue's targets: compiled_over_eager <= 0.6
#: and compiled_cfg_seg_over_compiled_cfg <= 1.2 (GPU, batch 1, 1024x1024).
COMPILED_RATIOS = {
    "compiled_over_eager": ("cfg_seg", "eager_cfg_seg", "time"),
    "compiled_cfg_over_eager": ("cfg", "eager_cfg", "time"),
    "compiled_cfg_seg_over_compiled_cfg": ("cfg_seg", "cfg", "time"),
}
#: A Compare's steps at SDXL's default (its profile's): its UNet time is this many compare_sequential steps.
COMPARE_STEPS = SDXL_PROFILE.steps


def ratios(wanted: dict, times: dict, counted: dict | None = None) -> dict:
    """The ratios of ``wanted`` whose two modes were both timed (``--modes`` may leave some out)."""
    tables = {"time": times, "flops": counted or {}}
    return {name: round(tables[table][a] / tables[table][b], 3)
            for name, (a, b, table) in wanted.items() if a in tables[table] and b in tables[table]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow channels on the CPU, under 3 minutes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; quick 256)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10; quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (rows per branch)")
    parser.add_argument("--sigma", type=float, default=10.0, help="SEG blur sigma for the SEG modes")
    parser.add_argument("--compile", action="store_true", help="add compiled columns (torch.compile of the UNet)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--compile-whole", action="store_true", help="compile the whole UNet, not its repeated blocks")
    parser.add_argument("--modes", default=None,
                        help="comma-separated modes to time (default: all); e.g. cfg,cfg_seg,compare_sequential")
    parser.add_argument("--sync-check", action="store_true",
                        help="with --compile on CUDA: run the compiled CFG + SEG step with host syncs as errors")
    args = parser.parse_args(argv)
    known = STEP_MODES + ("compare_sequential", "compare_batched") + LAYER_MODES
    args.modes = known if args.modes is None else tuple(args.modes.split(","))
    if unknown := [m for m in args.modes if m not in known]:
        parser.error(f"--modes: unknown {', '.join(unknown)}; the modes are {', '.join(known)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or (256 if args.quick else 1024)
    rounds = args.rounds or (5 if args.quick else 10)
    latent_side = size // 8
    unet, model_of = build(args.quick, device, dtype)
    model = model_of(unet)
    x = torch.randn(args.batch, 4, latent_side, latent_side, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)

    steps = {name: guided_step(unet, model, *spec) for name, spec in step_modes(args.sigma).items()}
    modes = {name: (lambda s=s: s(x, t)) for name, s in steps.items()}
    # Compare view: vanilla, SAG, PAG and SEG one after another...
    modes["compare_sequential"] = lambda: [steps[k](x, t) for k in COMPARE_MODES]
    # ...against the four in one step of one loop (seg_core.compare): image k of a batch of 4 guided by
    # method k, one UNet call with every method's rows plus SAG's second call.
    batch = args.batch
    x4 = x.repeat(4, 1, 1, 1)
    methods = [SAG(0.75), PAG(3.0), SEG(3.0, args.sigma)]
    for k, method in enumerate(methods, start=1):
        method.rows = tuple(range(k * batch, (k + 1) * batch))
    compare_step = guided_step(unet, model, methods, True, True)
    modes["compare_batched"] = lambda: compare_step(x4, t)
    layer_modes = attention_layer_modes(device, dtype, args.sigma)
    if device.type == "cuda":  # single layers are launch-bound on a GPU: time their kernels alone
        with torch.no_grad():
            layer_modes = {name: cuda_graphed(fn) for name, fn in layer_modes.items()}
    modes.update(layer_modes)
    modes = {name: fn for name, fn in modes.items() if name in args.modes}

    with torch.no_grad():
        counted, peak = {}, {}
        for name, fn in modes.items():  # warm-up: FLOPs, and peak memory per mode
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            counted[name] = flops(fn)
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
        times = {name: [] for name in modes}
        for _ in range(rounds):
            for name, fn in modes.items():
                times[name].append(timed(fn, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    if args.compile:  # what a stage stopped while compiling still reports
        print("eager median ms: " + json.dumps({name: round(m * 1e3, 2) for name, m in median.items()}), flush=True)
    compiled = compiled_columns(args, unet, model_of, x, t, device, rounds) if args.compile else None

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} ({dtype}), "
          f"{'quick' if args.quick else 'full'} UNet, {size}x{size}, batch {args.batch}, sigma {args.sigma}, {rounds} rounds, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    header = f"{'mode':22s} {'median ms':>10s} {'GFLOP':>10s} {'peak GiB':>9s}"
    if compiled:
        header += f" {'compiled ms':>12s} {'compiled/eager':>15s} {'compile s':>10s}"
        print(f"compiled: {compiled['options']}")
    print(header)
    for name in modes:
        line = f"{name:22s} {median[name] * 1e3:10.2f} {counted[name] / 1e9:10.2f} {peak.get(name, float('nan')):9.2f}"
        if compiled and name in compiled["median"]:
            c = compiled["median"][name]
            line += f" {c * 1e3:12.2f} {c / median[name]:15.3f} {compiled['compile_s'][name]:10.1f}"
        print(line)

    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "mode": "quick" if args.quick else "full",
        "size": size,
        "batch": args.batch,
        **ratios(RATIOS, median, counted),
    }
    if "compare_sequential" in median:
        summary["compare_25_steps_s"] = round(COMPARE_STEPS * median["compare_sequential"], 2)
    if compiled:
        c = compiled["median"]
        summary.update({
            "compile": compiled["options"],
            **ratios(COMPILED_RATIOS, {**{f"eager_{k}": v for k, v in median.items()}, **c}),
            "compile_s": round(sum(compiled["compile_s"].values()), 1),
            "graph_breaks": compiled["graph_breaks"],
            "recompiles": compiled["recompiles"],
        })
        if args.compile_mode in CUDA_GRAPH_MODES and device.type == "cuda":
            summary["cudagraph_skips"] = compiled["cudagraph_skips"]
        if "compare_sequential" in c:
            summary["compiled_compare_25_steps_s"] = round(COMPARE_STEPS * c["compare_sequential"], 2)
        if compiled["host_syncs"] is not None:
            summary["host_syncs"] = compiled["host_syncs"]
    if peak:
        summary["peak_gib"] = {k: round(v, 2) for k, v in peak.items() if not k.startswith(("blur", "attention", "seg_layer"))}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
