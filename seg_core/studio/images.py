"""Control images from uploads: decoded defensively, checked against the operator's limits, made 8-bit RGB."""

from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..limits import Limits

MIN_IMAGE_SIDE = 8  # pixels: a smaller control image carries nothing to fit to the output size


def load_control_image(source, limits: Limits = Limits()) -> Image.Image:
    """An RGB control image from a PIL image, a file path or bytes, decoded defensively.

    Refuses what is not an image, a file over ``limits.max_upload_mb``, sides under 8 or over
    ``limits.max_image_side`` pixels (checked from the header, before decoding: no decompression bombs).
    Converts grayscale, 16-bit, float, palette, CMYK and transparent images to 8-bit RGB (transparent
    pixels on white) and applies the EXIF orientation.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(_checked_size(source, limits))
    if isinstance(source, (bytes, bytearray)):
        size, opener = len(source), lambda: io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ValueError("control_image could not be read (no such uploaded file)") from None
        opener = lambda: path  # noqa: E731
    else:
        raise ValueError(f"control_image must be an image file, got {type(source).__name__}")
    if size > limits.max_upload_mb * 2**20:
        raise ValueError(f"control_image must be at most {limits.max_upload_mb:g} MB, got {size / 2**20:.1f} MB")
    if size == 0:
        raise ValueError("control_image is an empty file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opener()) as image:
                _checked_size(image, limits)  # from the header, before any pixel is decoded
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ValueError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"control_image is not a readable image (PNG, JPEG, WebP, ...): "
                         f"{type(error).__name__}") from None
    except (OSError, SyntaxError, EOFError, struct.error, MemoryError) as error:
        raise ValueError(f"control_image is corrupt or truncated ({type(error).__name__})") from None


def _checked_size(image: Image.Image, limits: Limits) -> Image.Image:
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE or max(width, height) > limits.max_image_side:
        raise ValueError(f"control_image sides must be in [{MIN_IMAGE_SIDE}, {limits.max_image_side}] pixels, "
                         f"got {width}x{height}")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float data rescaled (not clipped), transparency flattened onto white."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            array = array / 257.0
        elif mode == "I" and 0 <= array.min() and array.max() <= 65535:
            array = array / (257.0 if array.max() > 255 else 1.0)
        else:  # floats or 32-bit integers: stretch what is there
            low, high = float(np.nanmin(array)), float(np.nanmax(array))
            array = (np.nan_to_num(array, nan=low) - low) / max(high - low, 1e-12) * 255.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")

