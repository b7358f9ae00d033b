"""The serving path's geometry equals fastai's validation pipeline, pixel for pixel.

Training feeds fastai `Resize(460)` + `aug_transforms(size=224)` + `Normalize`; inference
reimplements the validation branch without fastai. If the two drift apart, the model is
served images it was never validated on: this test compares them on the sample images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.preprocess import PreprocessSpec, model_tensor, prepare, read_pixels, to_uint8_rgb
from training.data import ImageCache, scan_dataset
from training.train import Recipe, build_dataloaders


def _fastai_valid_tensors(data: Path, spec: PreprocessSpec) -> tuple[list, torch.Tensor]:
    dataset = scan_dataset(data)
    cache = ImageCache(spec)
    recipe = Recipe(preprocessing=spec)
    dls = build_dataloaders(
        dataset.split("train"), dataset.split("val"), dataset.classes, cache, recipe
    )
    batches = [x for x, _ in dls.valid]
    return dataset.split("val"), torch.cat([torch.as_tensor(b) for b in batches]).cpu()


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(),
        PreprocessSpec(intensity="percentile", resize_method="pad"),
        PreprocessSpec(size=64, resize=131),
    ],
    ids=["seed-crop", "percentile-pad", "small"],
)
def test_serving_geometry_matches_fastai_validation(
    sample_data_dir: Path, spec: PreprocessSpec
) -> None:
    items, fastai_batch = _fastai_valid_tensors(sample_data_dir, spec)
    ours = torch.stack([prepare(item.path, spec).tensor for item in items])
    assert ours.shape == fastai_batch.shape == (len(items), 3, spec.size, spec.size)
    # Float rounding only: one 8-bit grey level is 1/255/0.225 = 0.017 in normalised units.
    assert float((ours - fastai_batch).abs().max()) < 1e-4


def test_png_pixels_reach_the_model_unchanged(sample_data_dir: Path) -> None:
    path = next((sample_data_dir / "val" / "chest").glob("*.png"))
    from PIL import Image

    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB"))
    rgb = to_uint8_rgb(read_pixels(path), PreprocessSpec())
    assert np.array_equal(rgb, expected)


def test_percentile_window_makes_contrast_variants_alike(sample_data_dir: Path) -> None:
    path = next((sample_data_dir / "val" / "abd").glob("*.png"))
    pixels = read_pixels(path)
    spec = PreprocessSpec(intensity="percentile")
    dimmed = pixels * 0.4 + 0.3  # a flatter, brighter rendering of the same anatomy
    a = model_tensor(to_uint8_rgb(pixels, spec), spec)
    b = model_tensor(to_uint8_rgb(dimmed, spec), spec)
    seed = PreprocessSpec()
    c = model_tensor(to_uint8_rgb(pixels, seed), seed)
    d = model_tensor(to_uint8_rgb(dimmed, seed), seed)
    assert float((a - b).abs().mean()) < 0.1 * float((c - d).abs().mean())
