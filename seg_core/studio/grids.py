"""Labelled image grids (the sweep's figure, laid out like the paper's)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(images: Sequence[Sequence[Image.Image]], column_labels: Sequence[str],
                  row_labels: Sequence[str] | None = None, title: str = "",
                  min_cell: int = 160, max_cell: int = 512, gap: int = 4) -> Image.Image:
    """A grid of images with column labels on top and row labels on the left (the paper's figures).

    Cells are scaled so their longer side lies in [min_cell, max_cell]: tiny images are enlarged
    (nearest neighbour, so pixels stay visible), SDXL's 1024 px ones shrunk.
    """
    width, height = images[0][0].size
    scale = min(max(min_cell / max(width, height), 1.0), max_cell / max(width, height))
    image_w, image_h = round(width * scale), round(height * scale)
    cell_w, cell_h = image_w + gap, image_h + gap
    font_size = max(14, min(28, cell_w // 9))
    font, pad = _font(font_size), font_size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text):
        left, _, right, _ = measure.textbbox((0, 0), text, font=font)
        return right - left

    label_h = font_size + 2 * pad
    title_h = label_h if title else 0
    left_w = max((text_width(t) for t in row_labels), default=0) + 2 * pad if row_labels else 0
    grid = Image.new("RGB", (left_w + cell_w * len(column_labels), title_h + label_h + cell_h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for c, text in enumerate(column_labels):
        x = left_w + c * cell_w + (cell_w - text_width(text)) // 2
        draw.text((x, title_h + pad), text, fill="black", font=font)
    for r, row in enumerate(images):
        y = title_h + label_h + r * cell_h
        if row_labels:
            draw.text((pad, y + (cell_h - font_size) // 2), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            resample = Image.NEAREST if scale > 1 else Image.LANCZOS
            grid.paste(image.convert("RGB").resize((image_w, image_h), resample), (left_w + c * cell_w, y))
    return grid

