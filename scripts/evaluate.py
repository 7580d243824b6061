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
from dataclasses import dataclass, field
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
    p.add_argument("--protocol", choices=("embedded", "scales", "sdxl"), default="embedded",
                   help="embedded: Tables 1 and 2 on the embedded model; scales: every method over a range of "
                        "scales on the embedded model; sdxl: the paper's protocol")
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
    p.add_argument("--plot", default=None, help="--protocol scales: save the curves as a PNG here")
    p.add_argument("--write-json", default=None, help="--protocol scales: save every measured point here")
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

    model = args.model or ("sdxl" if args.protocol == "sdxl" else "embedded")
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


def shape_sets(args) -> tuple[list, dict[str, tuple[list[str], list[int]]]]:
    """The captions' labels, and the (prompts, seeds) of the unconditional and the conditional images."""
    n = args.unconditional
    labels = conditional_labels(args.conditional or len(shapes.LABELS) * args.per_prompt)
    first = args.seed + CONDITIONAL_SEED_OFFSET
    return labels, {"unconditional": ([""] * n, list(range(args.seed, args.seed + n))),
                    "conditional": ([shapes.caption(*label) for label in labels],
                                    list(range(first, first + len(labels))))}


def shape_judge(args):
    """The shapes classifier, its judges, and the features of --reference real images."""
    from seg_core.embedded import load_classifier

    classifier = load_classifier()
    judge = evaluation.shape_judges(classifier)
    real, _ = shapes.sample(args.reference, seed=REFERENCE_SEED)
    return classifier, judge, evaluation.in_chunks(judge.features, real)


def run_embedded(args, state) -> str | None:
    labels, sets = shape_sets(args)
    n = args.unconditional
    table1_jobs = row_jobs(UNCONDITIONAL, *sets["unconditional"])
    table2_jobs = row_jobs(conditional_rows(args.cfg_scale), *sets["conditional"])
    run_dir, summary = generate(args, state, [j for js in (*table1_jobs.values(), *table2_jobs.values()) for j in js])
    if not state.is_main_process:
        return None

    classifier, judge, real_features = shape_judge(args)
    real_again, _ = shapes.sample(max(args.reference, n, len(labels)), seed=REFERENCE_SEED + 1)
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
# Scales as curves (embedded model): every method over a range of scales
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One method over scales: ``key`` takes each of ``scales`` on top of ``fixed``; ``off`` is the
    scale at which the method is off (its point is the plain row of ``fixed``)."""

    name: str
    key: str
    scales: tuple
    authors: float | None  # the scale the authors use on SDXL (the paper's tables; CFG: SDXL's 5.0)
    fixed: dict = field(default_factory=dict)
    unconditional: bool = True  # also swept without a prompt
    off: float = 0.0

    def rows(self) -> list[tuple[float, Row]]:
        points = [(self.off, Row(f"{self.name} off", dict(self.fixed)))]
        return points + [(s, Row(f"{self.name} {s:g}", {**self.fixed, self.key: s})) for s in self.scales]


GUIDANCE_SCALES = (0.5, 1.0, 2.0, 3.0, 5.0)
CURVES = [
    *[Curve(f"SEG sigma={sigma:g}", "seg_scale", GUIDANCE_SCALES, 3.0, {"seg_blur_sigma": sigma})
      for sigma in (1.0, 2.0, 10.0, math.inf)],
    Curve("PAG", "pag_scale", GUIDANCE_SCALES, 3.0),
    Curve("SAG", "sag_scale", (0.25, 0.5, 1.0, 2.0, 3.0), 1.0),
    Curve("CFG", "guidance_scale", (1.5, 2.0, 3.0, 5.0, 7.0), 5.0, unconditional=False, off=1.0),
    *[Curve(f"CFG {w:g} + SEG sigma=inf", "seg_scale", GUIDANCE_SCALES, 3.0,
            {"guidance_scale": w, "seg_blur_sigma": math.inf}, unconditional=False) for w in (3.0, 5.0)],
]


def run_scales(args, state) -> str | None:
    """FD (unconditional and conditional) and prompt accuracy against scale, for every curve."""
    import json

    labels, sets = shape_sets(args)
    points = {name: {} for name in sets}  # set -> row folder -> jobs
    for curve in CURVES:
        for name, (prompts, seeds) in sets.items():
            if name == "conditional" or curve.unconditional:
                for _, row in curve.rows():
                    points[name].setdefault(row.folder, evaluation.jobs(row, prompts, seeds))
    run_dir, summary = generate(args, state, [j for rows in points.values() for js in rows.values() for j in js])
    if not state.is_main_process:
        return None

    classifier, judge, real_features = shape_judge(args)
    measured = {}  # (set, folder) -> {"fd": .., "accuracy": ..}
    for name, rows in points.items():
        for folder, jobs in rows.items():
            images = evaluation.load_images(jobs, run_dir)
            fd = evaluation.frechet_distance(evaluation.in_chunks(judge.features, images), real_features)
            measured[name, folder] = {"fd": fd}
            if name == "conditional":
                measured[name, folder]["accuracy"] = evaluation.prompt_accuracy(classifier, images, labels)[0]
    curves = {}
    for curve in CURVES:
        curves[curve.name] = {"authors": curve.authors, "scales": [s for s, _ in curve.rows()]}
        for name in sets:
            if name == "conditional" or curve.unconditional:
                for metric in ("fd", "accuracy") if name == "conditional" else ("fd",):
                    curves[curve.name][f"{name}_{metric}"] = [measured[name, row.folder][metric] for _, row in curve.rows()]
    if args.write_json:
        Path(args.write_json).write_text(json.dumps(curves, indent=1, default=str) + "\n")
    if args.plot:
        plot_curves(curves, args.plot)
    return "\n".join([
        f"Scale sweep on the embedded model, {args.steps} Euler steps: unconditional FD over {args.unconditional} "
        f"images per point; conditional (no CFG unless named) FD and prompt accuracy over {len(labels)} images "
        "per point (the 84 captions alike). Best = lowest FD / highest accuracy on these same images.", "",
        *best_scale_table(curves), "", summary,
    ])


def best_scale_table(curves: dict) -> list[str]:
    """Per curve: the value at the authors' scale and at the best scale, for each measure."""
    measures = [("unconditional_fd", min, "{:.2f}"), ("conditional_fd", min, "{:.2f}"),
                ("conditional_accuracy", max, "{:.1%}")]
    head = "| Method | authors' scale | uncond. FD: authors' -> best (scale) | cond. FD: authors' -> best (scale) " \
           "| prompt accuracy: authors' -> best (scale) |"
    lines = [head, "|---|---|---|---|---|"]
    for name, curve in curves.items():
        cells = [name, f"{curve['authors']:g}"]
        for key, pick, fmt in measures:
            if key not in curve:
                cells.append("-")
                continue
            values, scales = curve[key], curve["scales"]
            best = values.index(pick(values))
            at_authors = values[scales.index(curve["authors"])] if curve["authors"] in scales else None
            authors_text = fmt.format(at_authors) if at_authors is not None else "-"
            best_scale = "off" if best == 0 else f"{scales[best]:g}"  # the first point is the method off
            cells.append(f"{authors_text} -> **{fmt.format(values[best])}** ({best_scale})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


CURVE_COLOURS = [(30, 60, 200), (70, 140, 230), (0, 170, 190), (120, 40, 170), (220, 120, 0), (0, 150, 60),
                 (90, 90, 90), (200, 30, 30), (240, 110, 150)]


def plot_curves(curves: dict, path: str) -> None:
    """Three panels (unconditional FD, conditional FD, prompt accuracy against scale), drawn with PIL."""
    from PIL import ImageDraw

    panels = [("unconditional_fd", "FD, unconditional (lower is better)"),
              ("conditional_fd", "FD, conditional (lower is better)"),
              ("conditional_accuracy", "prompt accuracy, conditional (higher is better)")]
    w, h, pad, legend = 430, 330, 50, 190
    canvas = Image.new("RGB", (w * len(panels) + legend, h), "white")
    pen = ImageDraw.Draw(canvas)
    top = max(max(c["scales"]) for c in curves.values())
    for p, (key, title) in enumerate(panels):
        values = [v for c in curves.values() for v in c.get(key, [])]
        lo, hi = min(values), max(values)
        x0, y0, x1, y1 = p * w + pad, 26, (p + 1) * w - 14, h - 40

        def xy(scale, value):
            return (x0 + (x1 - x0) * scale / top, y1 - (y1 - y0) * (value - lo) / max(1e-9, hi - lo))

        pen.rectangle([x0, y0, x1, y1], outline="black")
        pen.text((x0, 6), title, fill="black")
        fmt = "{:.0%}" if "accuracy" in key else "{:.1f}"
        for value in np.linspace(lo, hi, 5):
            y = xy(0, value)[1]
            pen.line([(x0 - 4, y), (x0, y)], fill="black")
            pen.text((x0 - 44, y - 6), fmt.format(value), fill="black")
        for scale in range(0, int(top) + 1):
            x = xy(scale, lo)[0]
            pen.line([(x, y1), (x, y1 + 4)], fill="black")
            pen.text((x - 3, y1 + 6), str(scale), fill="black")
        pen.text((x1 - 40, y1 + 20), "scale", fill="black")
        for colour, curve in zip(CURVE_COLOURS, curves.values()):
            if key not in curve:
                continue
            line = [xy(s, v) for s, v in zip(curve["scales"], curve[key])]
            pen.line(line, fill=colour, width=2)
            for x, y in line:
                pen.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            if curve["authors"] in curve["scales"]:  # the authors' setting: a ring
                x, y = line[curve["scales"].index(curve["authors"])]
                pen.ellipse([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
    for i, (colour, name) in enumerate(zip(CURVE_COLOURS, curves)):
        y = 30 + 18 * i
        pen.line([(w * len(panels) + 8, y + 6), (w * len(panels) + 30, y + 6)], fill=colour, width=3)
        pen.text((w * len(panels) + 36, y), name, fill="black")
    pen.text((w * len(panels) + 8, 30 + 18 * len(curves) + 8), "ring: the authors' scale", fill="black")
    canvas.save(path)
    print(f"curves -> {path}")


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
    launcher = f"accelerate launch --multi_gpu --num_processes {state.num_processes} " if state.num_processes > 1 else "python "
    command = launcher + "scripts/evaluate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if state.is_main_process:
        print(command, flush=True)
    started = time.time()
    text = {"embedded": run_embedded, "scales": run_scales, "sdxl": run_sdxl}[args.protocol](args, state)
    if not state.is_main_process:
        return
    text += f"\n\nCommand: `{command}` ({time.time() - started:.0f} s, {state.num_processes} process(es) x " \
            f"{torch.get_num_threads()} CPU thread(s){', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''})."
    print(text, flush=True)
    if args.write:
        write_block(args.write, text, "scales" if args.protocol == "scales" else "eval")


if __name__ == "__main__":
    main()
