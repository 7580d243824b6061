"""Coloured shapes on coloured backgrounds: the offline data set of the embedded model, and its judge.

Every image is drawn from a caption such as "a red triangle on a blue background" (3 shapes, 6 shape
colours, 5 background colours, never the same colour twice: 84 captions), with jittered size, position,
rotation and tint, drawn at 4x and downsampled for anti-aliased edges.  :class:`ShapeClassifier` is a
small CNN trained on held-out images of the same set; it reads shape, colour and background back from
an image (the prompt-accuracy score) and its penultimate layer gives the features of a Frechet distance.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

IMAGE_SIZE = 32  # pixels

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "blue": (35, 70, 215),
    "purple": (140, 40, 180),
}
#: Blue and green backgrounds are the shapes' blue and green.
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
               "blue": COLOURS["blue"], "green": COLOURS["green"]}


def caption(shape: str, colour: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


#: (shape, colour, background) of every caption in the set; a shape never has its background's colour.
LABELS: tuple[tuple[str, str, str], ...] = tuple(
    (s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, BACKGROUNDS) if c != b
)
#: The 84 captions of the set, the prompts the embedded model knows.
CAPTIONS: tuple[str, ...] = tuple(caption(*label) for label in LABELS)


def parse_caption(text: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a caption of the set; ValueError naming the text otherwise."""
    for label in LABELS:
        if caption(*label) == text.strip().lower():
            return label
    raise ValueError(f"{text!r} is not a caption of the shapes set (e.g. {CAPTIONS[0]!r})")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, ...]:
    return tuple(int(min(255, max(0, v + rng.randint(-amount, amount)))) for v in rgb)


def draw(shape: str, colour: str, background: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """One image of the caption: the shape at a random size, position and rotation, tints jittered."""
    scale = 4
    big = size * scale
    image = Image.new("RGB", (big, big), _jitter(BACKGROUNDS[background], rng))
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.36) * big  # half the shape's extent
    cx = rng.uniform(radius + 0.04 * big, big - radius - 0.04 * big)
    cy = rng.uniform(radius + 0.04 * big, big - radius - 0.04 * big)
    fill = _jitter(COLOURS[colour], rng)
    if shape == "circle":
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        corners = 4 if shape == "square" else 3
        # A square of half-width r has circumradius r*sqrt(2); keep the area comparable to the circle's.
        circumradius = radius * (1.2 if shape == "square" else 1.15)
        angle = rng.uniform(-0.3, 0.3) + (math.pi / 4 if shape == "square" else -math.pi / 2)
        points = [
            (cx + circumradius * math.cos(angle + 2 * math.pi * k / corners),
             cy + circumradius * math.sin(angle + 2 * math.pi * k / corners))
            for k in range(corners)
        ]
        pen.polygon(points, fill=fill)
    return image.resize((size, size), Image.LANCZOS)


def sample(count: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """``count`` images (uint8, N x H x W x 3) with their labels, captions drawn uniformly, seeded."""
    rng = random.Random(seed)
    labels = [LABELS[rng.randrange(len(LABELS))] for _ in range(count)]
    images = np.stack([np.asarray(draw(*label, rng, size)) for label in labels])
    return images, labels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def label_indices(labels: list[tuple[str, str, str]]) -> torch.Tensor:
    """N x 3 indices into SHAPES, COLOURS, BACKGROUNDS."""
    keys = (SHAPES, tuple(COLOURS), tuple(BACKGROUNDS))
    return torch.tensor([[k.index(v) for k, v in zip(keys, label)] for label in labels])


class ShapeClassifier(nn.Module):
    """A small CNN: image in [-1, 1] -> 128 features -> logits for shape, colour and background."""

    feature_dim = 128

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleList([nn.Linear(self.feature_dim, n) for n in (len(SHAPES), len(COLOURS), len(BACKGROUNDS))])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [head(f) for head in self.heads]

    @torch.no_grad()
    def predict(self, images) -> list[tuple[str, str, str]]:
        """(shape, colour, background) for PIL images, a uint8 array, or a tensor in [-1, 1]."""
        x = as_tensor(images).to(next(self.parameters()).device)
        keys = (SHAPES, tuple(COLOURS), tuple(BACKGROUNDS))
        picks = [logits.argmax(1).tolist() for logits in self(x)]
        return [tuple(k[i] for k, i in zip(keys, row)) for row in zip(*picks)]

    @classmethod
    def load(cls, path: str | Path) -> "ShapeClassifier":
        from safetensors.torch import load_file

        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def as_tensor(images) -> torch.Tensor:
    """PIL images (resized to IMAGE_SIZE), a uint8 array or a tensor, as a float tensor in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        return to_tensor(images)
    arrays = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in images]
    return to_tensor(np.stack(arrays))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples), as in FID."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
