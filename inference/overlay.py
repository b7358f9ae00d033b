"""Heat map overlays as people look at them: the seed's picture, plus a legend strip.

The image part is what the seed shows: the radiograph in grey with the heat map drawn over
it in matplotlib's `magma` colormap at alpha 0.6, at the image's own resolution. The label,
probability and a colour bar go in a strip added *below* the image, so no text ever covers
anatomy.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORMAP = "magma"
DEFAULT_ALPHA = 0.6
STRIP_BACKGROUND = (32, 32, 32)  # dark grey: visibly not part of the image
STRIP_TEXT = (255, 255, 255)


@lru_cache(maxsize=4)
def colormap_table(name: str = COLORMAP) -> np.ndarray:
    """A colormap as a (256, 3) uint8 lookup table."""
    from matplotlib import colormaps

    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255.0).astype(np.uint8)


def colormap_indices(heatmap: np.ndarray) -> np.ndarray:
    """A (H, W) map in [0, 1] to the nearest of the table's 256 entries (NaN counts as 0)."""
    scaled = np.nan_to_num(np.asarray(heatmap, dtype=np.float32) * 255.0)
    return np.rint(np.clip(scaled, 0.0, 255.0, out=scaled), out=scaled).astype(np.uint8)


def colorize(heatmap: np.ndarray, name: str = COLORMAP) -> np.ndarray:
    """A (H, W) map in [0, 1] to (H, W, 3) uint8 colours."""
    return colormap_table(name)[colormap_indices(heatmap)]


def strip_height(width: int) -> int:
    return max(28, round(width * 0.09))


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _legend(width: int, label: str, probability: float, title: str) -> Image.Image:
    height = strip_height(width)
    strip = Image.new("RGB", (width, height), STRIP_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    margin = max(4, height // 6)
    small = _font(max(8, round(height * 0.28)))
    # Colour bar at the right: 0 (left) .. 1 (right), labelled at both ends.
    bar_width = max(24, width // 5)
    bar_height = max(4, height // 4)
    bar_right = width - margin
    bar_left = max(bar_right - bar_width, width // 2)
    bar_top = margin
    text = f"{label}  p={probability:.2f}"
    if title:
        text = f"{text}  {title}"
    # Text sized with the image, shrunk until it fits left of the colour bar.
    room = bar_left - 2 * margin
    size = max(10, round(height * 0.42))
    font = _font(size)
    while size > 8 and draw.textlength(text, font=font) > room:
        size -= 1
        font = _font(size)
    draw.text((margin, height // 2), text, fill=STRIP_TEXT, font=font, anchor="lm")
    if bar_right - bar_left >= 8:
        ramp = colorize(np.linspace(0.0, 1.0, bar_right - bar_left)[None, :])
        ramp = np.repeat(ramp, bar_height, axis=0)
        strip.paste(Image.fromarray(ramp, mode="RGB"), (bar_left, bar_top))
        tick_y = bar_top + bar_height + 1
        draw.text((bar_left, tick_y), "0", fill=STRIP_TEXT, font=small, anchor="lt")
        draw.text((bar_right, tick_y), "1", fill=STRIP_TEXT, font=small, anchor="rt")
    return strip


def render_overlay(
    display_rgb: np.ndarray,
    heatmap: np.ndarray,
    label: str,
    probability: float,
    alpha: float = DEFAULT_ALPHA,
    title: str = "",
) -> np.ndarray:
    """Grey image + magma heat map (alpha) + legend strip below: uint8 (H + strip, W, 3).

    `display_rgb` is the image at its original resolution (uint8, (H, W, 3) or (H, W));
    `heatmap` is (H, W) in [0, 1] on the same grid (see `gradcam.upsample_to`).
    """
    image = np.asarray(display_rgb)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if image.ndim == 2:
        grey = image.astype(np.float32)
    else:  # channel by channel: much faster than a reduction over the last axis
        grey = image[..., 0].astype(np.float32)
        grey += image[..., 1]
        grey += image[..., 2]
        grey /= 3.0
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != grey.shape:
        raise ValueError(f"heat map {heat.shape} does not match the image {grey.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} not in [0, 1]")
    # As matplotlib draws `imshow(heat, alpha=0.6, cmap='magma')` over a grey image.
    colours = alpha * colormap_table().astype(np.float32)
    grey *= 1.0 - alpha
    blended = colours[colormap_indices(heat)]
    blended += grey[..., None]
    picture = np.rint(blended, out=blended).clip(0, 255).astype(np.uint8)
    strip = np.asarray(_legend(picture.shape[1], label, probability, title))
    return np.concatenate([picture, strip], axis=0)


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) or (H, W) array encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(array: np.ndarray, path: Path) -> Path:
    """Write a uint8 (H, W, 3) or (H, W) array as PNG, creating the folder; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
    return path
