"""What keeping every adapter running would cost an eager UNet (seg_core.adapters): the scheme a compiled UNet
needs (every LoRA active, 0 for the ones not chosen; the IP-Adapter always computed, its scale in the values)
against the eager one (only the chosen LoRAs; the IP-Adapter skipped at scale 0).

    python bench/adapters_eager_cost.py                       # the embedded model, 1 thread
    python bench/adapters_eager_cost.py --model tiny --rounds 40

The adapters are the tests' random ones (seg_core.tiny.write_tiny_adapters: two rank-4 LoRAs on every
attention projection, one also on the text encoders, and an IP-Adapter). Times a request with no adapter
chosen and one with one LoRA, CFG + SEG, median of ``--rounds`` after a warm-up, the two schemes taking
turns. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from seg_core import adapters  # noqa: E402
from seg_core.adapters import AdapterChoice, load_adapters, read_adapter_config  # noqa: E402
from seg_core.tiny import write_tiny_adapters  # noqa: E402

CHOICES = {"none": AdapterChoice(), "one LoRA": AdapterChoice({"ink": 0.8})}


def load(model: str):
    if model == "embedded":
        from seg_core.embedded import IMAGE_SIZE, load_embedded

        return load_embedded(device="cpu", dtype=torch.float32), IMAGE_SIZE
    from seg_core.pipeline import StableDiffusionXLSEGPipeline
    from seg_core.tiny import tiny_sdxl_components

    return StableDiffusionXLSEGPipeline(**tiny_sdxl_components(seed=0), add_watermarker=False), 64


def seconds(pipe, config, choice, size: int, steps: int, rounds: int) -> dict[bool, float]:
    """Median seconds of one call with ``choice`` written as an eager (False) and as a compiled (True) UNet
    needs, the two taking turns (so that a busy machine slows both alike)."""
    image = adapters._blank_image(pipe)
    times = {False: [], True: []}
    for _ in range(rounds + 1):  # the first round is a warm-up
        for keep_graphs, measured in times.items():
            adapters._choose(pipe, config, choice, keep_graphs)
            start = time.perf_counter()
            pipe("a red cube", height=size, width=size, num_inference_steps=steps, seg_scale=3.0,
                 ip_adapter_image=image, output_type="latent", generator=torch.Generator().manual_seed(0))
            measured.append(time.perf_counter() - start)
    adapters._adapters_off(pipe, config)
    return {keep_graphs: statistics.median(measured[1:]) for keep_graphs, measured in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, size = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as folder:
        config = read_adapter_config(write_tiny_adapters(folder, pipe.components))
        load_adapters(pipe, config)
    result = {"model": args.model, "size": size, "steps": args.steps}
    for label, choice in CHOICES.items():
        eager, always = seconds(pipe, config, choice, size, args.steps, args.rounds).values()
        print(f"{label:>9}: only the chosen {eager * 1000:7.1f} ms, every adapter running {always * 1000:7.1f} ms "
              f"({always / eager:.2f}x)")
        result[label] = {"chosen_ms": round(eager * 1000, 1), "all_running_ms": round(always * 1000, 1),
                         "ratio": round(always / eager, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
