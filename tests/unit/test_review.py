"""Border attention: the share of Grad-CAM mass on an added collimator border."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training import review
from training.data import scan_dataset
from training.stress import _collimated, _grey, border_pads


def _fake_maps(inside: float, border: float) -> Any:
    """A `_maps_for` that returns `inside` on the original image and `border` around it."""

    def maps_for(model_dir: Path, sources: list[Any]) -> list[tuple[Any, Any, Any]]:
        results = []
        for dataset in sources:
            height, width = int(dataset.Rows), int(dataset.Columns)
            heat = np.full((height, width), border, dtype=np.float32)
            # The border `_collimated` adds is 12% of the original side each way.
            original_h, original_w = round(height / 1.24), round(width / 1.24)
            pad_y, pad_x = border_pads(original_h, original_w)
            heat[pad_y : pad_y + original_h, pad_x : pad_x + original_w] = inside
            prediction = type("P", (), {"label": "chest", "probability": 0.9})()
            results.append((None, heat, prediction))
        return results

    return maps_for


@pytest.fixture
def items(sample_data_dir: Path) -> list[Any]:
    return scan_dataset(sample_data_dir).split("test")


@pytest.mark.parametrize(
    ("inside", "border", "figure", "expected"),
    [(1.0, 0.0, "max_border_share", 0.0), (0.0, 1.0, "mean_border_share", 1.0)],
    ids=["heat-only-on-anatomy", "heat-only-on-border"],
)
def test_heat_on_one_side_only_gives_an_all_or_nothing_share(
    monkeypatch: pytest.MonkeyPatch,
    items: list[Any],
    inside: float,
    border: float,
    figure: str,
    expected: float,
) -> None:
    monkeypatch.setattr(review, "_maps_for", _fake_maps(inside=inside, border=border))
    result = review.border_attention(Path("unused"), items)
    assert result[figure] == pytest.approx(expected, abs=0.01)


def test_uniform_heat_puts_the_border_area_on_the_border(
    monkeypatch: pytest.MonkeyPatch, items: list[Any]
) -> None:
    monkeypatch.setattr(review, "_maps_for", _fake_maps(inside=1.0, border=1.0))
    result = review.border_attention(Path("unused"), items)
    for row in result["rows"]:
        assert row["border_share"] == pytest.approx(row["border_area"], abs=1e-3)
        # 12% a side: 1 - 1/1.24^2 of the framed image.
        assert row["border_area"] == pytest.approx(1 - 1 / 1.24**2, abs=0.01)


def test_the_collimated_frame_is_what_border_pads_says(sample_data_dir: Path) -> None:
    from inference.preprocess import read_pixels

    item = scan_dataset(sample_data_dir).split("test")[0]
    grey = _grey(read_pixels(item.path))
    framed = _collimated(grey)
    pad_y, pad_x = border_pads(*grey.shape)
    assert framed.shape == (grey.shape[0] + 2 * pad_y, grey.shape[1] + 2 * pad_x)
    assert np.array_equal(
        framed[pad_y : pad_y + grey.shape[0], pad_x : pad_x + grey.shape[1]], grey
    )
