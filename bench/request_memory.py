"""Peak memory of one request at a model's largest allowed size, against the per-model limits' estimate.

    python bench/request_memory.py                        # tiny and embedded, the default budget
    python bench/request_memory.py --budget-gb 0.25 --models embedded

For each model: the limits (seg_core.limits) on this server, then one request per method at the largest
size the model allows (SAG at the largest size SAG allows), 1 denoising step (a step's peak is every
step's), CFG on. CPU: the process's peak resident memory above what it held before the request (Linux
VmHWM, reset through /proc/self/clear_refs); CUDA: torch's peak allocation above the weights. The last
line is a JSON list of the measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from seg_core.limits import format_bytes  # noqa: E402
from seg_core.studio import Limits, Studio  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak memory above the level at entry, in bytes (CUDA allocations, else resident memory)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM (the peak) to the current resident size
            self.start = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status_kb("VmHWM") * 1024 - self.start


def measure(model: str, budget_gb: float, steps: int = 1) -> list[dict]:
    studio = Studio(model, fallback=None, limits=Limits(memory_budget_gb=budget_gb))
    limits = studio.model_limits
    device = studio.pipeline().device
    side, sag_side = math.isqrt(limits.max_pixels) // 8 * 8, math.isqrt(limits.sag_max_pixels) // 8 * 8
    print(f"{model}: {limits.describe()}")
    guidance = max(studio.profile.guidance_scale, 5.0)
    runs = [("vanilla", side, dict(seg_scale=0.0)), ("SEG", side, {}), ("PAG", side, dict(seg_scale=0.0, pag_scale=3.0)),
            ("SEG+PAG", side, dict(pag_scale=3.0)), ("SAG", sag_side, dict(seg_scale=0.0, sag_scale=1.0))]
    studio.generate(studio.settings(prompt="warm up", steps=1, width=16, height=16, seed=0))  # lazy set-up
    results = []
    for name, size, change in runs:
        if size < 8:
            continue
        settings = studio.settings(prompt="a red circle", seed=0, steps=steps, width=size, height=size,
                                   guidance_scale=guidance, **change)
        rows = studio.request_rows(settings)
        estimate = limits.estimate(size, size, rows, sag_images=int(settings.sag_scale > 0))
        with PeakMemory(device) as peak:
            run, _ = studio.generate(settings)
        result = dict(model=model, method=name, size=f"{size}x{size}", rows=rows, steps=steps,
                      device=str(device), peak_bytes=peak.peak, estimate_bytes=estimate,
                      budget_bytes=limits.memory_budget_bytes, seconds=round(run.seconds, 2))
        print(f"  {name:8s} {size}x{size}: peak {format_bytes(peak.peak)}, estimate {format_bytes(estimate)}, "
              f"budget {format_bytes(limits.memory_budget_bytes)}, {run.seconds:.2f} s")
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "embedded"])
    parser.add_argument("--budget-gb", type=float, default=Limits().memory_budget_gb)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    results = [r for model in args.models for r in measure(model, args.budget_gb, args.steps)]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
