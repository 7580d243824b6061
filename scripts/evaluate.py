"""Evaluate vanilla sampling, CFG, SAG, PAG and SEG as in the paper's Tables 1 and 2.

Two protocols:

* ``--protocol embedded`` (default; offline, CPU): the embedded shapes model.  The judge is
  seg_core.shapes.ShapeClassifier, trained on held-out images of the set: a Frechet distance on its
  128 penultimate features against real images of the set (an FID in miniature), and a prompt accuracy
  (shape, colour and background all read back as asked).  For the unconditional table, instead of LPIPS
  (whose VGG weights are not available offline), the RMS pixel difference from the vanilla image of the
  same seed.

      OMP_NUM_THREADS=2 python scripts/evaluate.py --threads 2 --write README.md

* ``--protocol sdxl`` (GPU and SDXL weights): the paper's protocol.  FID (torchmetrics, which needs
  torch-fidelity) and CLIP score (open_clip ViT-L/14, or torchmetrics' CLIPScore) of images generated from
  the captions in ``--captions`` (one per line, e.g. MS-COCO 2014 val) against the images in
  ``--reference-dir``; LPIPS (the ``lpips`` package, VGG) against the vanilla outputs of the same seeds.

      python scripts/evaluate.py --protocol sdxl --captions coco_captions.txt --reference-dir coco_val2014/ \\
          --num-images 30000 --steps 25 --out-dir sdxl_eval/

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

from seg_core import shapes  # noqa: E402

REFERENCE_SEED = 3  # real images for the Frechet distance (training used 1, the classifier 2)
VANILLA = {"guidance_scale": 1.0, "seg_scale": 0.0}

#: Table 1: unconditional generation (empty prompt, no CFG).
UNCONDITIONAL = {
    "Vanilla": VANILLA,
    "SAG (s=1.0)": {**VANILLA, "sag_scale": 1.0},
    "PAG (s=3.0)": {**VANILLA, "pag_scale": 3.0},
    "SEG (sigma=10)": {"guidance_scale": 1.0, "seg_scale": 3.0, "seg_blur_sigma": 10.0},
    "SEG (sigma=inf)": {"guidance_scale": 1.0, "seg_scale": 3.0, "seg_blur_sigma": math.inf},
}


def conditional_rows(cfg_scale: float) -> dict[str, dict]:
    """Table 2: text-conditional generation without CFG, plus CFG itself and CFG + SEG for reference."""
    rows = {
        "Vanilla": VANILLA,
        "SAG (s=1.0)": {**VANILLA, "sag_scale": 1.0},
        "PAG (s=3.0)": {**VANILLA, "pag_scale": 3.0},
    }
    for sigma in (1.0, 2.0, 5.0, 10.0, math.inf):
        rows[f"SEG (sigma={sigma:g})"] = {"guidance_scale": 1.0, "seg_scale": 3.0, "seg_blur_sigma": sigma}
    rows[f"CFG (w={cfg_scale:g})"] = {"guidance_scale": cfg_scale, "seg_scale": 0.0}
    rows[f"CFG (w={cfg_scale:g}) + SEG (sigma=inf)"] = {"guidance_scale": cfg_scale, "seg_scale": 3.0, "seg_blur_sigma": math.inf}
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=("embedded", "sdxl"), default="embedded")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded model, or 'sdxl')")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=42, help="images per pipeline call")
    # embedded protocol
    p.add_argument("--per-prompt", type=int, default=2, help="images per caption (84 captions) in Table 2")
    p.add_argument("--unconditional", type=int, default=168, help="images per row of Table 1")
    p.add_argument("--reference", type=int, default=1000, help="real images for the Frechet distance")
    p.add_argument("--write", default=None, help="markdown file whose eval block receives the tables")
    p.add_argument("--grid", default=None, help="save a PNG grid of samples per method here")
    # sdxl protocol
    p.add_argument("--captions", default=None, help="text file, one caption per line")
    p.add_argument("--reference-dir", default=None, help="folder of real images for FID")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--out-dir", default="sdxl_eval")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Embedded protocol
# --------------------------------------------------------------------------------------------------


def generate(pipe, prompts: list[str], kwargs: dict, args, first_seed: int) -> np.ndarray:
    """uint8 images, one per prompt; sample k starts from the noise of seed first_seed + k."""
    out = []
    for i in range(0, len(prompts), args.batch):
        chunk = prompts[i:i + args.batch]
        generators = [torch.Generator().manual_seed(first_seed + i + k) for k in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=args.steps, generator=generators, output_type="np", **kwargs).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def features(classifier, images: np.ndarray) -> np.ndarray:
    return torch.cat([classifier.features(shapes.to_tensor(images[i:i + 256])) for i in range(0, len(images), 256)]).numpy()


def prompt_accuracy(classifier, images: np.ndarray, labels) -> tuple[float, list[float]]:
    """Fraction with all three attributes right, and per attribute (shape, colour, background)."""
    predicted = classifier.predict(images)
    hits = np.array([[p[k] == t[k] for k in range(3)] for p, t in zip(predicted, labels)])
    return float(hits.all(1).mean()), hits.mean(0).tolist()


def run_embedded(args) -> str:
    from seg_core.embedded import EMBEDDED_DIR, load_classifier
    from seg_core.presets import load_pipeline

    pipe = load_pipeline(args.model or str(EMBEDDED_DIR), device=args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    real, _ = shapes.sample(args.reference, seed=REFERENCE_SEED)
    real_features = features(classifier, real)
    real_again, _ = shapes.sample(args.reference, seed=REFERENCE_SEED + 1)
    grid_rows = {}

    def timed(name, fn):
        start = time.time()
        result = fn()
        print(f"  {name}: {time.time() - start:.0f} s", flush=True)
        return result

    # Table 1: unconditional
    print("Table 1 (unconditional)")
    n = args.unconditional
    floor = shapes.frechet_distance(features(classifier, real_again[:n]), real_features)
    table1 = ["| Method | FD (classifier features) | RMS pixel change vs vanilla |", "|---|---|---|",
              f"| *real images ({n}) vs reference* | {floor:.2f} | - |"]
    vanilla = None
    for name, kwargs in UNCONDITIONAL.items():
        images = timed(name, lambda: generate(pipe, [""] * n, kwargs, args, args.seed))
        fd = shapes.frechet_distance(features(classifier, images), real_features)
        if vanilla is None:
            vanilla, change = images, "-"
        else:
            change = f"{np.sqrt(((images / 255.0 - vanilla / 255.0) ** 2).mean(axis=(1, 2, 3))).mean():.3f}"
        table1.append(f"| {name} | {fd:.2f} | {change} |")
        grid_rows[f"uncond {name}"] = images[:12]

    # Table 2: text-conditional
    print("Table 2 (text-conditional)")
    labels = [label for label in shapes.LABELS for _ in range(args.per_prompt)]
    prompts = [shapes.caption(*label) for label in labels]
    floor = shapes.frechet_distance(features(classifier, real_again[:len(prompts)]), real_features)
    table2 = ["| Method | FD (classifier features) | Prompt accuracy | shape / colour / background |",
              "|---|---|---|---|", f"| *real images ({len(prompts)}) vs reference* | {floor:.2f} | - | - |"]
    for name, kwargs in conditional_rows(args.cfg_scale).items():
        images = timed(name, lambda: generate(pipe, prompts, kwargs, args, args.seed + 10_000))
        fd = shapes.frechet_distance(features(classifier, images), real_features)
        accuracy, parts = prompt_accuracy(classifier, images, labels)
        table2.append(f"| {name} | {fd:.2f} | {accuracy:.1%} | {' / '.join(f'{p:.0%}' for p in parts)} |")
        grid_rows[f"cond {name}"] = images[::len(images) // 12][:12]

    if args.grid:
        save_grid(grid_rows, args.grid)
    n_cond = len(prompts)
    return "\n".join([
        f"Table 1 analogue: unconditional generation (prompt \"\", no CFG), {n} images per row.",
        "", *table1, "",
        f"Table 2 analogue: text-conditional generation without CFG, {n_cond} images per row "
        f"({args.per_prompt} per caption); CFG rows for reference.",
        "", *table2,
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
# The paper's protocol on SDXL (needs a GPU, the SDXL weights, and optional packages)
# --------------------------------------------------------------------------------------------------


def _require(module: str, pip_name: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SystemExit(f"{purpose} needs the '{pip_name}' package: pip install {pip_name}  ({error})") from error


def run_sdxl(args) -> str:
    """FID and CLIP score against real images, LPIPS against vanilla, for each row of Tables 1 and 2."""
    if not args.captions or not args.reference_dir:
        raise SystemExit("--protocol sdxl needs --captions (one caption per line) and --reference-dir (real images)")
    fid_module = _require("torchmetrics.image.fid", "torchmetrics[image]", "FID")
    _require("torch_fidelity", "torch-fidelity", "torchmetrics' FID")
    lpips = _require("lpips", "lpips", "LPIPS")
    from seg_core.presets import load_pipeline

    device = torch.device(args.device or "cuda")
    if device.type == "cpu":
        print("warning: the SDXL protocol on a CPU takes days", file=sys.stderr)
    captions = [line.strip() for line in Path(args.captions).read_text().splitlines() if line.strip()]
    captions = (captions * math.ceil(args.num_images / len(captions)))[:args.num_images]
    reference = sorted(p for p in Path(args.reference_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not reference:
        raise SystemExit(f"no .png/.jpg images in {args.reference_dir}")
    clip_score = _clip_scorer(device)
    lpips_vgg = lpips.LPIPS(net="vgg").to(device)
    pipe = load_pipeline(args.model or "sdxl", device=str(device))
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(args.out_dir)

    def to_uint8(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)

    def real_batches():
        for i in range(0, len(reference), 32):
            arrays = [np.asarray(Image.open(p).convert("RGB").resize((299, 299), Image.BICUBIC)) for p in reference[i:i + 32]]
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def evaluate(rows: dict[str, dict], prompts: list[str], title: str) -> list[str]:
        table = ["| Method | FID | CLIP score | LPIPS vs vanilla |", "|---|---|---|---|"]
        vanilla_dir = None
        for name, kwargs in rows.items():
            folder = out_dir / title / name.replace(" ", "_").replace("=", "")
            folder.mkdir(parents=True, exist_ok=True)
            fid = fid_module.FrechetInceptionDistance(feature=2048, normalize=False).to(device)
            for batch in real_batches():
                fid.update(batch.to(device), real=True)
            clips, lpips_values = [], []
            for i in range(0, len(prompts), args.batch):
                chunk = prompts[i:i + args.batch]
                generators = [torch.Generator(device).manual_seed(args.seed + i + k) for k in range(len(chunk))]
                images = pipe(chunk, height=args.size, width=args.size, num_inference_steps=args.steps,
                              generator=generators, output_type="np", **kwargs).images
                batch = to_uint8(images)
                for k, image in enumerate(batch):
                    Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i + k:06d}.png")
                fid.update(torch.nn.functional.interpolate(batch.float(), size=299, mode="bicubic").clamp(0, 255).to(torch.uint8).to(device), real=False)
                if any(chunk):
                    clips.append(clip_score(batch, chunk))
                if vanilla_dir is not None:
                    vanilla = torch.stack([torch.from_numpy(np.asarray(Image.open(vanilla_dir / f"{i + k:06d}.png"))).permute(2, 0, 1)
                                           for k in range(len(chunk))])
                    with torch.no_grad():
                        lpips_values.append(lpips_vgg(batch.float().to(device) / 127.5 - 1, vanilla.float().to(device) / 127.5 - 1).flatten().cpu())
            vanilla_dir = vanilla_dir or folder
            clip = f"{torch.cat(clips).mean():.3f}" if clips else "-"
            lp = f"{torch.cat(lpips_values).mean():.3f}" if lpips_values else "-"
            table.append(f"| {name} | {fid.compute().item():.1f} | {clip} | {lp} |")
            print(table[-1], flush=True)
        return table

    table1 = evaluate(UNCONDITIONAL, [""] * len(captions), "unconditional")
    table2 = evaluate(conditional_rows(args.cfg_scale), captions, "conditional")
    return "\n".join([f"SDXL, {len(captions)} images per row, {args.steps} steps, {args.size}px.", "",
                      "Table 1 (unconditional)", "", *table1, "", "Table 2 (text-conditional, no CFG)", "", *table2])


def _clip_scorer(device):
    """CLIP score as the cosine of image and text embeddings (open_clip ViT-L/14, else torchmetrics)."""
    try:
        import open_clip
    except ImportError:
        multimodal = _require("torchmetrics.multimodal.clip_score", "torchmetrics[multimodal]", "CLIP score (or open_clip_torch)")
        metric = multimodal.CLIPScore(model_name_or_path="openai/clip-vit-large-patch14").to(device)

        def score(images: torch.Tensor, texts: list[str]) -> torch.Tensor:
            # torchmetrics reports 100 * max(cos, 0) over the batch
            return (metric(images.to(device), texts) / 100).detach().cpu().reshape(1)

        return score
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained="openai", device=device)
    tokenizer = open_clip.get_tokenizer("ViT-L-14")

    @torch.no_grad()
    def score(images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        pixels = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images]).to(device)
        a = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1)
        return (a * b).sum(-1).cpu()

    return score


def write_block(path: str, text: str) -> None:
    """Replace the text between <!-- eval:start --> and <!-- eval:end --> in ``path`` (appended if absent)."""
    start, end = "<!-- eval:start -->", "<!-- eval:end -->"
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
    command = "python scripts/evaluate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(command)
    started = time.time()
    text = run_embedded(args) if args.protocol == "embedded" else run_sdxl(args)
    text += f"\n\nCommand: `{command}` ({time.time() - started:.0f} s, {torch.get_num_threads()} CPU thread(s)" \
            f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''})."
    print(text)
    if args.write:
        write_block(args.write, text)


if __name__ == "__main__":
    main()
