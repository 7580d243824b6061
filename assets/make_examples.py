"""Draws the example control images (simple shapes with clean edges, 512 x 512) next to this file."""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 512


def house() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 380, SIZE, SIZE), fill=(90, 160, 80))
    draw.rectangle((140, 230, 370, 400), fill=(220, 200, 160), outline=(60, 40, 30), width=6)
    draw.polygon([(120, 235), (255, 120), (390, 235)], fill=(170, 60, 50), outline=(60, 40, 30))
    draw.rectangle((230, 310, 280, 400), fill=(110, 70, 40))
    draw.rectangle((170, 260, 215, 300), fill=(250, 250, 220), outline=(60, 40, 30), width=4)
    draw.rectangle((300, 260, 345, 300), fill=(250, 250, 220), outline=(60, 40, 30), width=4)
    draw.ellipse((400, 40, 470, 110), fill=(255, 220, 80))
    return image


def shapes() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (245, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 60, 250, 250), fill=(220, 80, 60))
    draw.rectangle((280, 90, 450, 260), fill=(60, 110, 200))
    draw.polygon([(120, 460), (250, 290), (380, 460)], fill=(240, 190, 40))
    draw.ellipse((370, 330, 470, 430), fill=(70, 170, 110))
    return image


def rings() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (20, 24, 40))
    draw = ImageDraw.Draw(image)
    for k, radius in enumerate(range(230, 20, -35)):
        shade = 90 + 25 * k
        draw.ellipse((256 - radius, 256 - radius, 256 + radius, 256 + radius),
                     outline=(shade, 180, 255 - 20 * k), width=10)
    return image


if __name__ == "__main__":
    for name, draw in (("house", house), ("shapes", shapes), ("rings", rings)):
        draw().save(HERE / f"control_{name}.png", optimize=True)
