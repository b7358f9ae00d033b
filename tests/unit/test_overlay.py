"""Overlays: the seed's picture at the original resolution, the legend strip below it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.overlay import colormap_table, render_overlay, save_png, strip_height


def _radiograph(height: int = 120, width: int = 90) -> np.ndarray:
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    return np.repeat(np.round(ramp).astype(np.uint8)[..., None], 3, axis=2)


def _blend(grey: float | np.ndarray, colour: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """What matplotlib draws for `imshow(heat, alpha=alpha)` over a grey image."""
    grey_values = np.asarray(grey, dtype=np.float32)[..., None]
    return np.round(alpha * colour.astype(np.float32) + (1 - alpha) * grey_values)


@pytest.mark.parametrize(("height", "width"), [(120, 90), (40, 300), (489, 404)])
def test_output_is_the_original_size_plus_a_strip_below(height: int, width: int) -> None:
    image = _radiograph(height, width)
    out = render_overlay(image, np.zeros((height, width)), "chest", 0.93)
    assert out.dtype == np.uint8
    assert out.shape == (height + strip_height(width), width, 3)
    assert strip_height(width) > 0


def test_the_strip_does_not_overwrite_image_rows() -> None:
    image = _radiograph()
    heat = np.zeros(image.shape[:2])
    heat[100:, :] = 1.0  # hot at the bottom edge, right where a strip drawn over it would be
    chest = render_overlay(image, heat, "chest", 0.93)
    abd = render_overlay(image, heat, "a much longer label", 0.12)
    height = image.shape[0]
    assert np.array_equal(chest[:height], abd[:height])
    expected_last_row = _blend(image[-1, :, 0], colormap_table()[255][None, :].repeat(90, 0))
    assert np.array_equal(chest[height - 1], expected_last_row.astype(np.uint8))
    assert not np.array_equal(chest[height:], abd[height:]), "the strip shows the label"


def test_hot_regions_take_the_heat_map_colour() -> None:
    image = np.full((64, 80, 3), 128, dtype=np.uint8)
    heat = np.zeros((64, 80))
    heat[:, :40] = 1.0
    out = render_overlay(image, heat, "abd", 0.5)
    magma = colormap_table()
    assert np.array_equal(out[10, 10], _blend(128, magma[255]).astype(np.uint8))
    assert np.array_equal(out[10, 70], _blend(128, magma[0]).astype(np.uint8))
    # magma's hot end is a pale yellow; its cold end near black: visibly different.
    assert int(out[10, 10, 0]) - int(out[10, 70, 0]) > 100


def test_the_strip_carries_text_and_a_colour_bar() -> None:
    image = _radiograph(100, 400)
    out = render_overlay(image, np.zeros((100, 400)), "chest", 0.93)
    strip = out[100:]
    assert len(np.unique(strip.reshape(-1, 3), axis=0)) > 10
    bright_text = (strip[:, : 400 // 2] > 200).all(axis=2)
    assert bright_text.any(), "label text in the left half of the strip"
    hottest = colormap_table()[255].astype(int)
    distance = np.abs(strip[:, 400 // 2 :].astype(int) - hottest).max(axis=2)
    assert (distance <= 8).any(), "colour bar with magma's hot end in the right half"


def test_grey_input_and_mismatched_maps() -> None:
    grey = _radiograph()[..., 0]
    assert render_overlay(grey, np.zeros(grey.shape), "abd", 0.5).shape[1] == grey.shape[1]
    with pytest.raises(ValueError, match="does not match"):
        render_overlay(_radiograph(), np.zeros((10, 10)), "abd", 0.5)
    with pytest.raises(ValueError, match="uint8"):
        render_overlay(_radiograph().astype(np.float32), np.zeros((120, 90)), "abd", 0.5)


def test_save_png_round_trips(tmp_path: Path) -> None:
    out = render_overlay(_radiograph(), np.random.default_rng(0).random((120, 90)), "abd", 0.7)
    path = save_png(out, tmp_path / "nested" / "overlay.png")
    with Image.open(path) as written:
        assert written.format == "PNG" and written.mode == "RGB"
        assert np.array_equal(np.asarray(written), out)
