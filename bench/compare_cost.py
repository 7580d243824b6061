"""What one Compare (vanilla, SAG, PAG and SEG from one seed, the demo's Compare tab at its defaults) costs
on this machine, for the README's deployment table.

    python bench/compare_cost.py --model embedded --threads 2     # a CPU box (about a minute)
    python bench/compare_cost.py --model sdxl                     # a GPU with SDXL's weights
    python bench/compare_cost.py --sdxl-cpu-estimate --threads 1  # SDXL on this CPU, without its weights

SDXL cannot be loaded without its weights (none here), and a full UNet in fp32 needs 10 GB: the estimate
times SDXL's full-size mid block (random weights, 1024x1024, batch 1) and scales it by the FLOPs of a whole
UNet evaluation (6,761 GFLOP, bench/results/h200_1024_batch1.log), then by a Compare's evaluations.

Times one warm-up Compare, then ``--rounds`` more (one after another, and ``--one-loop`` all four in one
loop), and prints per-method seconds, UNet evaluations, and the ZeroGPU duration the demo would ask for.
The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from seg_core.studio import Studio  # noqa: E402


SDXL_UNET_GFLOP = 6761.24  # one evaluation at 1024x1024 (bench/results/h200_1024_batch1.log, mode cond)
SDXL_COMPARE_EVALUATIONS = {1.0: 175, 5.0: 275}  # 25 steps; vanilla, SAG, PAG, SEG without / with CFG


def sdxl_cpu_estimate(rounds: int) -> dict:
    """Seconds of one SDXL UNet evaluation on this CPU, from its mid block's measured time and FLOPs."""
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    block = UNetMidBlock2DCrossAttn(in_channels=1280, temb_channels=1280, transformer_layers_per_block=10,
                                    cross_attention_dim=2048, num_attention_heads=20, use_linear_projection=True,
                                    resnet_groups=32).eval()
    x, temb, text = torch.randn(1, 1280, 32, 32), torch.randn(1, 1280), torch.randn(1, 77, 2048)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            block(x, temb, encoder_hidden_states=text)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            block(x, temb, encoder_hidden_states=text)
            times.append(time.perf_counter() - start)
    gflop = counter.get_total_flops() / 1e9
    seconds = statistics.median(times) * SDXL_UNET_GFLOP / gflop
    return {"mid_block_gflop": round(gflop, 1), "mid_block_seconds": round(statistics.median(times), 3),
            "sdxl_evaluation_seconds": round(seconds, 2),
            "sdxl_compare_hours": {f"cfg {w:g}": round(n * seconds / 3600, 2)
                                   for w, n in SDXL_COMPARE_EVALUATIONS.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="sdxl, embedded, tiny, a Hub id or a folder")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    parser.add_argument("--one-loop", action="store_true", help="all four in one loop (seg_core.compare)")
    parser.add_argument("--sdxl-cpu-estimate", action="store_true", help="estimate SDXL on this CPU (see above)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sdxl_cpu_estimate:
        estimate = sdxl_cpu_estimate(args.rounds)
        print(f"SDXL mid block: {estimate['mid_block_gflop']} GFLOP in {estimate['mid_block_seconds']} s on "
              f"{torch.get_num_threads()} CPU thread(s); "
              f"one UNet evaluation about {estimate['sdxl_evaluation_seconds']} s; "
              f"a Compare (25 steps, 1024x1024) about {estimate['sdxl_compare_hours']} hours")
        print(json.dumps(estimate))
        return
    studio = Studio(args.model, device=args.device, fallback=None)
    settings = studio.settings(prompt=studio.profile.prompts[0] if studio.profile.prompts else "a jellyfish", seed=0,
                               guidance_scale=args.guidance_scale or studio.profile.guidance_scale)
    studio.compare(settings, one_loop=args.one_loop)  # warm-up
    totals, runs = [], None
    for _ in range(args.rounds):
        start = time.perf_counter()
        runs, _ = studio.compare(settings, one_loop=args.one_loop)
        totals.append(time.perf_counter() - start)
    device = studio.pipeline().device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model {studio.model_id} on {name}: {settings.width}x{settings.height}, {settings.steps} steps, "
          f"CFG {settings.guidance_scale:g}, {'one loop' if args.one_loop else 'one after another'}")
    for run in runs:
        print(f"  {run.label:32s} {run.seconds:8.2f} s  {run.unet_evaluations:4d} UNet evaluations")
    evaluations = sum(run.unet_evaluations for run in runs)
    summary = {"model": studio.model_id, "device": name, "width": settings.width, "height": settings.height,
               "steps": settings.steps, "guidance_scale": settings.guidance_scale, "one_loop": args.one_loop,
               "compare_seconds": round(statistics.median(totals), 3), "unet_evaluations": evaluations,
               "seconds_per_evaluation": round(statistics.median(totals) / evaluations, 4),
               "zerogpu_duration_asked": studio.gpu_seconds("compare", settings)}
    print(f"Compare: {summary['compare_seconds']:.2f} s (median of {args.rounds}), {evaluations} UNet evaluations; "
          f"the demo would ask ZeroGPU for {summary['zerogpu_duration_asked']} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
