"""Render the demo's examples ahead: for every example prompt, vanilla, SAG, PAG and SEG from one seed
(the Compare tab's request at its defaults), so the page shows results before anyone clicks.

    python scripts/render_examples.py                    # the embedded model (offline, CPU, about a minute)
    python scripts/render_examples.py --model sdxl       # on a GPU with SDXL's weights

Writes assets/examples/<model>/: per example a labelled grid (NN.png) and the four images (NN-<method>.png,
each PNG with its settings), and examples.json, which the app reads (seg_core.space.rendered_examples).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from seg_core.space import EXAMPLES_DIR, example_rows  # noqa: E402
from seg_core.studio import Studio, format_sigma, labelled_grid  # noqa: E402

def render(model: str, out: Path, threads: int | None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    studio = Studio(model, fallback=None)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, (prompt, negative, guidance) in enumerate(example_rows(studio.profile.prompts,
                                                                       studio.profile.guidance_scale)):
        settings = studio.settings(prompt=prompt, negative_prompt=negative, guidance_scale=guidance, seed=number)
        # the Compare tab's defaults: the model profile's scales
        sag_scale, pag_scale = studio.profile.sag_scale, studio.profile.pag_scale
        runs, _ = studio.compare(settings, None, sag_scale, pag_scale)
        images = []
        for run in runs:
            name = f"{number:02d}-{run.settings.method.lower()}.png"
            shutil.copyfile(run.path, out / name)  # keeps the PNG's settings
            images.append((name, run.label))
        title = f"seed {settings.seed} · " + (prompt[:60] if prompt else "unconditional")
        grid = labelled_grid([[run.image for run in runs]],
                             ["vanilla", f"SAG {sag_scale:g}", f"PAG {pag_scale:g}",
                              f"SEG {settings.seg_scale:g}, sigma {format_sigma(settings.seg_blur_sigma)}"],
                             title=title, min_cell=128)
        grid.save(out / f"{number:02d}.png", optimize=True)
        entries.append(dict(prompt=prompt, negative_prompt=negative, guidance_scale=guidance, seed=settings.seed,
                            steps=settings.steps, grid=f"{number:02d}.png", images=images))
        print(f"{number:02d} {prompt or '(unconditional)'}: {sum(r.seconds for r in runs):.2f} s", flush=True)
    (out / "examples.json").write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="the model to render for (default: embedded)")
    parser.add_argument("--out", type=Path, default=None, help="default: assets/examples/<model>")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    start = time.perf_counter()
    entries = render(args.model, args.out or EXAMPLES_DIR / args.model, args.threads)
    print(f"{len(entries)} examples in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
