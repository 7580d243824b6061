"""Evaluation at scale: the paper's tables as (row, caption, seed) jobs sharded over processes.

The paper's claims (Sec. 5, Tables 1 and 2) are FID, CLIP score and LPIPS over thousands of images per
row. Here every image is one job: a row (a method and its scales), a caption and a seed. Jobs are grouped
into batches that depend only on the rows, the captions and ``batch`` (never on the number of processes),
so an image is computed in the same batch composition however the work is split and comes out
bit-identical. The batches still to do are dealt out round-robin over the processes that
``accelerate launch`` starts (GPUs, machines sharing a file system, or CPU processes with gloo); each
image is written once, atomically, to ``<out>/<run>/<row>/<seed>-<caption hash>.png``, so a rerun skips
finished batches and a killed run leaves no half-written file. When every process is done, the main
process reads the images back and computes the metrics from features that :class:`Judges` supplies
(the paper's Inception / CLIP / VGG networks, or small offline ones in tests).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import shapes

#: Every guidance term off: rows state only what they turn on (the pipeline's own default SEG scale is 3).
GUIDANCE_OFF = {"guidance_scale": 1.0, "seg_scale": 0.0, "pag_scale": 0.0, "sag_scale": 0.0}
_SHORT = {"guidance_scale": "cfg", "seg_scale": "seg", "seg_blur_sigma": "sigma", "pag_scale": "pag",
          "sag_scale": "sag"}  # folder-name abbreviations, in folder-name order (other keys follow)


# --------------------------------------------------------------------------------------------------
# Rows and jobs (pure)
# --------------------------------------------------------------------------------------------------


def _folder_order(item: tuple[str, object]) -> tuple[int, str]:
    key = item[0]
    return (list(_SHORT).index(key) if key in _SHORT else len(_SHORT), key)


@dataclass(frozen=True)
class Row:
    """One row of a table: a label and the pipeline arguments that differ from :data:`GUIDANCE_OFF`."""

    name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def pipeline_kwargs(self) -> dict:
        return {**GUIDANCE_OFF, **self.kwargs}

    @property
    def folder(self) -> str:
        """A name that only the images' settings decide: equal settings share their images."""
        kwargs = self.pipeline_kwargs
        parts = [f"cfg{kwargs['guidance_scale']:g}"]
        for key, value in sorted(kwargs.items(), key=_folder_order):
            if key == "guidance_scale" or (key.endswith("_scale") and value == 0):
                continue
            if key.startswith("seg_") and key != "seg_scale" and kwargs["seg_scale"] == 0:
                continue
            value = "inf" if isinstance(value, float) and math.isinf(value) else (
                f"{value:g}" if isinstance(value, (int, float)) else str(value))
            parts.append(f"{_SHORT.get(key, key)}{value}")
        return "_".join(parts)


@dataclass(frozen=True)
class Job:
    """One image: a row, a caption and the seed of its initial noise."""

    row: Row
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        digest = hashlib.sha1(self.prompt.encode()).hexdigest()[:8]
        return f"{self.seed:08d}-{digest}.png"

    def path(self, run_dir: Path) -> Path:
        return run_dir / self.row.folder / self.name


def jobs(row: Row, prompts: list[str], seeds: list[int]) -> list[Job]:
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    return [Job(row, prompt, seed) for prompt, seed in zip(prompts, seeds)]


def batches(all_jobs: list[Job], batch: int) -> list[list[Job]]:
    """Consecutive jobs of one row, ``batch`` at a time: the composition every process count shares."""
    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    out, start = [], 0
    while start < len(all_jobs):
        end = start
        while end < len(all_jobs) and end - start < batch and all_jobs[end].row == all_jobs[start].row:
            end += 1
        out.append(all_jobs[start:end])
        start = end
    return out


def run_name(model: str, steps: int, height: int, width: int, batch: int) -> str:
    """The folder of one run's settings; other settings (or another model) never reuse these images."""
    label = Path(model.rstrip("/")).name or "model"
    digest = hashlib.sha1(model.encode()).hexdigest()[:6]
    return f"{label}-{digest}_{steps}steps_{width}x{height}_batch{batch}"


# --------------------------------------------------------------------------------------------------
# Sharded generation
# --------------------------------------------------------------------------------------------------


def distributed_state(timeout_hours: float = 48.0):
    """accelerate's PartialState: the launcher's processes (one without a launcher); CPU ranks use gloo.

    The barrier waits for the slowest process, which in a 30k-image run can be hours behind the first.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=timeout_hours))


def _done(batch: list[Job], run_dir: Path) -> bool:
    return all(job.path(run_dir).is_file() for job in batch)


def _remove_partial_files(run_dir: Path) -> None:
    for tmp in run_dir.glob("*/.*.tmp"):
        tmp.unlink(missing_ok=True)


def save_image(image: np.ndarray, job: Job, run_dir: Path) -> None:
    """Write under a temporary name, then rename: the final name only ever holds a whole image."""
    path = job.path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("seg_eval", json.dumps({"prompt": job.prompt, "seed": job.seed, "row": job.row.name,
                                          **{k: str(v) for k, v in job.row.pipeline_kwargs.items()}}))
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def generate_batch(pipe, batch: list[Job], call_kwargs: dict) -> np.ndarray:
    """uint8 images of one batch; each starts from the noise of its own seed (a CPU generator, so the
    noise is the same on every device)."""
    generators = [torch.Generator().manual_seed(job.seed) for job in batch]
    images = pipe([job.prompt for job in batch], generator=generators, output_type="np",
                  **call_kwargs, **batch[0].row.pipeline_kwargs).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


@dataclass
class GenerationReport:
    generated: int  # images made by this call, over all processes
    reused: int  # images already on disk


def generate_sharded(all_jobs: list[Job], run_dir: Path, batch: int, load_pipe: Callable, call_kwargs: dict,
                     state=None, log: Callable[[str], None] = print) -> GenerationReport:
    """Make every image of ``all_jobs`` missing under ``run_dir``, this process's share of the batches.

    ``load_pipe(device)`` is called only when this process has work. Returns on every process once all
    processes are done.
    """
    state = state or distributed_state()
    unique: dict[Path, Job] = {}  # two rows of equal settings (e.g. CFG w=1 and vanilla) share a file
    for job in all_jobs:
        unique.setdefault(job.path(run_dir), job)
    all_jobs = list(unique.values())
    run_dir.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        _remove_partial_files(run_dir)
    state.wait_for_everyone()
    planned = batches(all_jobs, batch)
    todo = [b for b in planned if not _done(b, run_dir)]
    state.wait_for_everyone()  # every process has listed the same finished files before anyone writes
    mine = todo[state.process_index::state.num_processes]
    pipe, made = None, 0
    for i, jobs_ in enumerate(mine):
        if pipe is None:
            pipe = load_pipe(state.device)
        for job, image in zip(jobs_, generate_batch(pipe, jobs_, call_kwargs)):
            save_image(image, job, run_dir)
        made += len(jobs_)
        if (i + 1) % 10 == 0 or i + 1 == len(mine):
            log(f"[rank {state.process_index}] {i + 1}/{len(mine)} batches ({made} images)")
    from accelerate.utils import gather_object

    made_all = sum(gather_object([made]))
    state.wait_for_everyone()
    return GenerationReport(made_all, len(all_jobs) - sum(len(b) for b in todo))


def load_images(row_jobs: list[Job], run_dir: Path) -> np.ndarray:
    """The images of ``row_jobs`` in order, uint8 N x H x W x 3."""
    return np.stack([np.asarray(Image.open(job.path(run_dir)).convert("RGB")) for job in row_jobs])


# --------------------------------------------------------------------------------------------------
# Metrics: Frechet distance, CLIP score, LPIPS, from injectable feature extractors
# --------------------------------------------------------------------------------------------------


@dataclass
class Judges:
    """The networks behind the metrics, each taking uint8 N x H x W x 3 images.

    ``features``: N x D features for the Frechet distance (FID: Inception-v3 pool3, D = 2048).
    ``clip_score``: per-image cosine of image and caption embeddings (the paper's CLIP score).
    ``perceptual``: per-image LPIPS distance between two image sets of the same seeds.
    """

    features: Callable[[np.ndarray], np.ndarray]
    clip_score: Callable[[np.ndarray, list[str]], np.ndarray] | None = None
    perceptual: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID's formula (Heusel et al. 2017) on any features: see :func:`seg_core.shapes.frechet_distance`."""
    return shapes.frechet_distance(features_a, features_b)


def in_chunks(fn: Callable, images: np.ndarray, *more, size: int = 64) -> np.ndarray:
    """``fn`` over ``images`` (and aligned ``more``) ``size`` at a time, concatenated."""
    return np.concatenate([np.asarray(fn(images[i:i + size], *(m[i:i + size] for m in more)))
                           for i in range(0, len(images), size)])


def shape_judges(classifier: shapes.ShapeClassifier) -> Judges:
    """Offline stand-ins built on the shapes classifier, with the paper's metrics' form.

    Features: its 128 penultimate features. CLIP score: the cosine between the image's predicted
    attribute probabilities (shape, colour, background, concatenated) and the caption's one-hot
    attributes. LPIPS: LPIPS's recipe (unit-normalise each layer's channels, squared difference, spatial
    mean, summed over layers) on the classifier's three conv blocks with unit weights.
    """

    @torch.no_grad()
    def features(images):
        return classifier.features(shapes.to_tensor(images)).numpy()

    @torch.no_grad()
    def clip_score(images, captions):
        probs = torch.cat([logits.softmax(1) for logits in classifier(shapes.to_tensor(images))], dim=1)
        onehot = torch.zeros_like(probs)
        offsets = np.cumsum([0, len(shapes.SHAPES), len(shapes.COLOURS)])
        for i, caption in enumerate(captions):
            for offset, index in zip(offsets, shapes.label_indices([shapes.parse_caption(caption)])[0]):
                onehot[i, offset + index] = 1
        return torch.nn.functional.cosine_similarity(probs, onehot, dim=1).numpy()

    @torch.no_grad()
    def perceptual(images_a, images_b):
        total = 0
        for a, b in zip(_block_activations(classifier, images_a), _block_activations(classifier, images_b)):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((a - b) ** 2).sum(1).mean((1, 2))
        return total.numpy()

    return Judges(features, clip_score, perceptual)


def _block_activations(classifier: shapes.ShapeClassifier, images: np.ndarray) -> list[torch.Tensor]:
    """The outputs of the classifier's conv blocks (the Sequential modules of its body)."""
    x, out = shapes.to_tensor(images), []
    for module in classifier.body:
        x = module(x)
        if isinstance(module, torch.nn.Sequential):
            out.append(x)
    return out


def paper_judges(device: torch.device | str, clip_model: str = "ViT-L-14") -> Judges:
    """The paper's metrics: FID features from torch-fidelity's Inception-v3 (the network of
    torchmetrics' and torch-fidelity's FID), CLIP score from open_clip, LPIPS (VGG) from ``lpips``.
    Their weights download on first use; requirements-eval.txt lists the packages."""
    fidelity = _require("torch_fidelity.feature_extractor_inceptionv3", "torch-fidelity", "FID")
    inception = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()

    @torch.no_grad()
    def features(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)  # uint8; it resizes to 299 itself
        return inception(x)[0].double().cpu().numpy()

    open_clip = _require("open_clip", "open_clip_torch", "CLIP score")
    model, _, preprocess = open_clip.create_model_and_transforms(clip_model, pretrained="openai", device=device)
    tokenizer = open_clip.get_tokenizer(clip_model)

    @torch.no_grad()
    def clip_score(images, captions):
        pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images]).to(device)
        a = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(tokenizer(captions).to(device)).float(), dim=-1)
        return (a * b).sum(-1).cpu().numpy()

    lpips = _require("lpips", "lpips", "LPIPS")
    vgg = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()

    @torch.no_grad()
    def perceptual(images_a, images_b):
        def scaled(images):
            return torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1

        return vgg(scaled(images_a), scaled(images_b)).flatten().cpu().numpy()

    return Judges(features, clip_score, perceptual)


def _require(module: str, pip_name: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SystemExit(f"{purpose} needs the '{pip_name}' package: pip install -r requirements-eval.txt "
                         f"({error})") from error


def prompt_accuracy(classifier: shapes.ShapeClassifier, images: np.ndarray, labels) -> tuple[float, list[float]]:
    """Fraction of images with shape, colour and background all as asked, and per attribute."""
    predicted = classifier.predict(images)
    hits = np.array([[p[k] == t[k] for k in range(3)] for p, t in zip(predicted, labels)])
    return float(hits.all(1).mean()), hits.mean(0).tolist()


def rms_change(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of the RMS pixel difference (in [0, 1] units) from the reference of the same seed."""
    diff = images.astype(np.float64) / 255 - reference.astype(np.float64) / 255
    return float(np.sqrt((diff ** 2).mean(axis=(1, 2, 3))).mean())


def load_reference(paths: list[Path], size: int) -> np.ndarray:
    """Real images, centre-cropped to a square and resized (bicubic) to the generated images' size."""
    arrays = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        arrays.append(np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)))
    return np.stack(arrays)


def reference_features(paths: list[Path], judges: Judges, size: int, chunk: int = 64) -> np.ndarray:
    """The FID features of the real images, ``chunk`` files at a time (30k images never sit in memory)."""
    return np.concatenate([judges.features(load_reference(paths[i:i + chunk], size))
                           for i in range(0, len(paths), chunk)])


def paper_metrics(row_jobs: list[Job], run_dir: Path, judges: Judges, real_features: np.ndarray,
                  vanilla_jobs: list[Job] | None = None, chunk: int = 64) -> dict:
    """FID against ``real_features``, mean CLIP score (rows with captions), mean LPIPS against the
    vanilla images of the same seeds (when ``vanilla_jobs`` is given); images read ``chunk`` at a time."""
    features, clips, distances = [], [], []
    for i in range(0, len(row_jobs), chunk):
        part = row_jobs[i:i + chunk]
        images = load_images(part, run_dir)
        features.append(judges.features(images))
        captions = [job.prompt for job in part]
        if judges.clip_score is not None and all(captions):
            clips.append(judges.clip_score(images, captions))
        if judges.perceptual is not None and vanilla_jobs is not None:
            distances.append(judges.perceptual(images, load_images(vanilla_jobs[i:i + chunk], run_dir)))
    return {
        "fid": frechet_distance(np.concatenate(features), real_features),
        "clip_score": float(np.concatenate(clips).mean()) if clips else None,
        "lpips": float(np.concatenate(distances).mean()) if distances else None,
    }
