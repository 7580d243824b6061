"""Evaluate vanilla sampling, CFG, SAG, PAG and SEG as in the paper's Tables 1 and 2, on one process or many.

Run it plainly, or under ``accelerate launch`` to split the work over GPUs, machines or CPU processes:

    python scripts/evaluate.py ...
    accelerate launch --multi_gpu --num_processes 8 scripts/evaluate.py ...      # 8 GPUs (or 8 CPU ranks)

Every image is one (row, caption, seed) job, generated once by one process and written to
``--out-dir/<run>/<row>/<seed>-<caption hash>.png``; a rerun skips images already there, and the main
process computes the metrics when all processes are done (seg_core.evaluation). The images and the
tables are the same for any number of processes.

Two protocols:

* ``--protocol embedded`` (default; offline, CPU): the embedded shapes model.  The judge is
  seg_core.shapes.ShapeClassifier, trained on held-out images of the set: a Frechet distance on its
  128 penultimate features against real images of the set (an FID in miniature), and a prompt accuracy
  (shape, colour and background all read back as asked).  For the unconditional table, instead of LPIPS
  (whose VGG weights are not available offline), the RMS pixel difference from the vanilla image of the
  same seed.

      OMP_NUM_THREADS=2 python scripts/evaluate.py --threads 2 --write README.md

* ``--protocol sdxl`` (the paper's protocol; GPU and SDXL weights): FID against the images in
  ``--reference-dir`` and CLIP score of images generated from the captions in ``--captions`` (one per
  line, e.g. MS-COCO 2014 val), LPIPS (VGG) against the vanilla outputs of the same seeds.  The networks
  come from ``--judges``: ``paper`` (Inception-v3 of torch-fidelity, open_clip ViT-L/14, lpips VGG;
  pip install -r requirements-eval.txt) or ``shapes`` (the shapes classifier: the same path offline on
  the embedded model).

      accelerate launch --multi_gpu --num_processes 8 scripts/evaluate.py --protocol sdxl \\
          --captions coco_captions.txt --reference-dir coco_val2014/ --num-images 30000 --steps 25 --batch 8

Every row uses the pipeline's own scheduler (Euler discrete for SDXL and the embedded model), the same
initial noise per sample, guidance on the mid-block self-attentions, SEG and PAG scale 3.0, SAG scale 1.0.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from seg_core import evaluation, shapes  # noqa: E402
from seg_core.evaluation import Row  # noqa: E402

REFERENCE_SEED = 3  # real images for the Frechet distance (training used 1, the classifier 2)
CONDITIONAL_SEED_OFFSET = 10_000  # the embedded protocol's Table 2 seeds follow Table 1's

#: Table 1: unconditional generation (empty prompt, no CFG).
UNCONDITIONAL = [
    Row("Vanilla"),
    Row("SAG (s=1.0)", {"sag_scale": 1.0}),
    Row("PAG (s=3.0)", {"pag_scale": 3.0}),
    Row("SEG (sigma=10)", {"seg_scale": 3.0, "seg_blur_sigma": 10.0}),
    Row("SEG (sigma=inf)", {"seg_scale": 3.0, "seg_blur_sigma": math.inf}),
]


def conditional_rows(cfg_scale: float) -> list[Row]:
    """Table 2: text-conditional generation without CFG, plus CFG itself and CFG + SEG for reference."""
    rows = UNCONDITIONAL[:3]
    for sigma in (1.0, 2.0, 5.0, 10.0, math.inf):
        rows.append(Row(f"SEG (sigma={sigma:g})", {"seg_scale": 3.0, "seg_blur_sigma": sigma}))
    rows.append(Row(f"CFG (w={cfg_scale:g})", {"guidance_scale": cfg_scale}))
    rows.append(Row(f"CFG (w={cfg_scale:g}) + SEG (sigma=inf)",
                    {"guidance_scale": cfg_scale, "seg_scale": 3.0, "seg_blur_sigma": math.inf}))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=("embedded", "sdxl"), default="embedded")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded model, or 'sdxl')")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: this process's device under accelerate (else CUDA, else CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--batch", type=int, default=42, help="images per pipeline call (part of the run's folder name)")
    p.add_argument("--out-dir", default="eval_images", help="where the images go; a rerun skips those already there")
    # embedded protocol
    p.add_argument("--per-prompt", type=int, default=2, help="images per caption (84 captions) in Table 2")
    p.add_argument("--conditional", type=int, default=None,
                   help="images in Table 2, captions spread evenly over the set (default: 84 x --per-prompt)")
    p.add_argument("--unconditional", type=int, default=168, help="images per row of Table 1")
    p.add_argument("--reference", type=int, default=1000, help="real images for the Frechet distance")
    p.add_argument("--write", default=None, help="markdown file whose eval block receives the tables")
    p.add_argument("--grid", default=None, help="save a PNG grid of samples per method here")
    # sdxl protocol
    p.add_argument("--captions", default=None, help="text file, one caption per line")
    p.add_argument("--reference-dir", default=None, help="folder of real images for FID")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--size", type=int, default=None, help="image side (default: 32 for the embedded model, else 1024)")
    p.add_argument("--judges", choices=("paper", "shapes"), default="paper",
                   help="networks behind FID / CLIP / LPIPS: the paper's, or the shapes classifier (offline)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "threads", "per_prompt", "unconditional", "reference", "num_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def model_and_size(args) -> tuple[str, int]:
    from seg_core.embedded import EMBEDDED_DIR, SIZE

    model = args.model or ("embedded" if args.protocol == "embedded" else "sdxl")
    embedded = model == "embedded" or Path(model).resolve() == EMBEDDED_DIR
    return model, args.size or (SIZE if embedded else 1024)


def generate(args, state, all_jobs) -> tuple[Path, str]:
    """Every image of ``all_jobs`` on disk (this process's share made here); the run folder and a summary."""
    from seg_core.presets import load_pipeline

    model, size = model_and_size(args)
    run_dir = Path(args.out_dir) / evaluation.run_name(model, args.steps, size, size, args.batch)

    def load_pipe(device):
        pipe = load_pipeline(model, device=args.device or str(device))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    started = time.time()
    report = evaluation.generate_sharded(
        all_jobs, run_dir, args.batch, load_pipe,
        {"num_inference_steps": args.steps, "height": size, "width": size}, state)
    summary = (f"Images: {report.generated} generated by {state.num_processes} process(es) in "
               f"{time.time() - started:.0f} s, {report.reused} reused, in {run_dir}.")
    return run_dir, summary


def row_jobs(rows: list[Row], prompts: list[str], seeds: list[int]) -> dict[str, list[evaluation.Job]]:
    return {row.name: evaluation.jobs(row, prompts, seeds) for row in rows}


# --------------------------------------------------------------------------------------------------
# Embedded protocol
# --------------------------------------------------------------------------------------------------


def conditional_labels(count: int) -> list[tuple[str, str, str]]:
    """``count`` captions spread evenly over the set; count = 84 k gives each caption k times in a row."""
    return [shapes.LABELS[k * len(shapes.LABELS) // count] for k in range(count)]


def run_embedded(args, state) -> str | None:
    from seg_core.embedded import load_classifier

    n = args.unconditional
    labels = conditional_labels(args.conditional or len(shapes.LABELS) * args.per_prompt)
    first = args.seed + CONDITIONAL_SEED_OFFSET
    table1_jobs = row_jobs(UNCONDITIONAL, [""] * n, list(range(args.seed, args.seed + n)))
    table2_jobs = row_jobs(conditional_rows(args.cfg_scale), [shapes.caption(*label) for label in labels],
                           list(range(first, first + len(labels))))
    run_dir, summary = generate(args, state, [j for js in (*table1_jobs.values(), *table2_jobs.values()) for j in js])
    if not state.is_main_process:
        return None

    classifier = load_classifier()
    judge = evaluation.shape_judges(classifier)
    real, _ = shapes.sample(args.reference, seed=REFERENCE_SEED)
    real_features = evaluation.in_chunks(judge.features, real)
    real_again, _ = shapes.sample(max(n, len(labels)), seed=REFERENCE_SEED + 1)
    grid_rows = {}

    def fd(images):
        return evaluation.frechet_distance(evaluation.in_chunks(judge.features, images), real_features)

    table1 = ["| Method | FD (classifier features) | RMS pixel change vs vanilla |", "|---|---|---|",
              f"| *real images ({n}) vs reference* | {fd(real_again[:n]):.2f} | - |"]
    vanilla = None
    for name, jobs in table1_jobs.items():
        images = evaluation.load_images(jobs, run_dir)
        change = "-" if vanilla is None else f"{evaluation.rms_change(images, vanilla):.3f}"
        vanilla = images if vanilla is None else vanilla
        table1.append(f"| {name} | {fd(images):.2f} | {change} |")
        grid_rows[f"uncond {name}"] = images[:12]

    table2 = ["| Method | FD (classifier features) | Prompt accuracy | shape / colour / background |",
              "|---|---|---|---|", f"| *real images ({len(labels)}) vs reference* | {fd(real_again[:len(labels)]):.2f} | - | - |"]
    for name, jobs in table2_jobs.items():
        images = evaluation.load_images(jobs, run_dir)
        accuracy, parts = evaluation.prompt_accuracy(classifier, images, labels)
        table2.append(f"| {name} | {fd(images):.2f} | {accuracy:.1%} | {' / '.join(f'{p:.0%}' for p in parts)} |")
        grid_rows[f"cond {name}"] = images[::max(1, len(images) // 12)][:12]

    if args.grid:
        save_grid(grid_rows, args.grid)
    per_caption = f"{args.per_prompt} per caption" if args.conditional is None else "captions spread over the set"
    return "\n".join([
        f"Table 1 analogue: unconditional generation (prompt \"\", no CFG), {n} images per row.",
        "", *table1, "",
        f"Table 2 analogue: text-conditional generation without CFG, {len(labels)} images per row "
        f"({per_caption}); CFG rows for reference.",
        "", *table2, "", summary,
    ])


def save_grid(rows: dict[str, np.ndarray], path: str, scale: int = 2) -> None:
    """One labelled row of samples per method, each image upscaled ``scale``x."""
    from PIL import ImageDraw

    label_width, size = 230, max(images.shape[1] for images in rows.values()) * scale
    columns = max(len(images) for images in rows.values())
    grid = Image.new("RGB", (label_width + columns * (size + 2), len(rows) * (size + 2)), "white")
    pen = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(rows.items()):
        pen.text((4, r * (size + 2) + size // 2 - 6), name, fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray(image).resize((size, size), Image.NEAREST)
            grid.paste(tile, (label_width + c * (size + 2), r * (size + 2)))
    grid.save(path)
    print(f"samples grid -> {path}")


# --------------------------------------------------------------------------------------------------
# The paper's protocol (SDXL; any model with --judges shapes for an offline check)
# --------------------------------------------------------------------------------------------------


def read_captions(path: str, count: int) -> list[str]:
    captions = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not captions:
        raise SystemExit(f"no captions in {path} (one caption per line)")
    return (captions * math.ceil(count / len(captions)))[:count]


def reference_files(folder: str) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no .png/.jpg images in {folder}")
    return files


def run_sdxl(args, state) -> str | None:
    """FID and CLIP score against real images, LPIPS against vanilla, for each row of Tables 1 and 2."""
    if not args.captions or not args.reference_dir:
        raise SystemExit("--protocol sdxl needs --captions (one caption per line) and --reference-dir (real images)")
    captions = read_captions(args.captions, args.num_images)
    reference = reference_files(args.reference_dir)
    device = torch.device(args.device) if args.device else state.device
    if device.type == "cpu" and args.judges == "paper":
        print("warning: the SDXL protocol on a CPU takes days", file=sys.stderr)
    seeds = list(range(args.seed, args.seed + len(captions)))
    tables = {"Table 1 (unconditional)": row_jobs(UNCONDITIONAL, [""] * len(captions), seeds),
              "Table 2 (text-conditional, no CFG)": row_jobs(conditional_rows(args.cfg_scale), captions, seeds)}
    run_dir, summary = generate(args, state, [j for t in tables.values() for js in t.values() for j in js])
    if not state.is_main_process:
        return None

    if args.judges == "shapes":
        from seg_core.embedded import load_classifier

        judges = evaluation.shape_judges(load_classifier())
    else:
        judges = evaluation.paper_judges(device)
    _, size = model_and_size(args)
    real_features = evaluation.reference_features(reference, judges, size)
    text = [f"{len(captions)} images per row, {args.steps} steps, {size}px, {len(reference)} reference images."]
    for title, table_jobs in tables.items():
        vanilla = table_jobs["Vanilla"]
        table = ["| Method | FID | CLIP score | LPIPS vs vanilla |", "|---|---|---|---|"]
        for name, jobs in table_jobs.items():
            m = evaluation.paper_metrics(jobs, run_dir, judges, real_features, None if jobs is vanilla else vanilla)
            table.append(f"| {name} | {m['fid']:.2f} | {_fmt(m['clip_score'])} | {_fmt(m['lpips'])} |")
        text += ["", title, "", *table]
    return "\n".join([*text, "", summary])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_block(path: str, text: str, name: str = "eval") -> None:
    """Replace the text between <!-- {name}:start --> and <!-- {name}:end --> in ``path`` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    file = Path(path)
    doc = file.read_text() if file.exists() else ""
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    file.write_text(doc)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    state = evaluation.distributed_state()
    launcher = "accelerate launch ... " if state.num_processes > 1 else "python "
    command = launcher + "scripts/evaluate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if state.is_main_process:
        print(command, flush=True)
    started = time.time()
    text = run_embedded(args, state) if args.protocol == "embedded" else run_sdxl(args, state)
    if not state.is_main_process:
        return
    text += f"\n\nCommand: `{command}` ({time.time() - started:.0f} s, {state.num_processes} process(es) x " \
            f"{torch.get_num_threads()} CPU thread(s){', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''})."
    print(text, flush=True)
    if args.write:
        write_block(args.write, text)


if __name__ == "__main__":
    main()
