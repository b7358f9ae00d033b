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
from PIL import Image

from inference.preprocess import PreprocessSpec, model_tensor, prepare, read_pixels, to_uint8_rgb
from training.data import ImageCache, scan_dataset
from training.train import (
    RADIOGRAPH_AUGMENTATION,
    RADIOGRAPH_EXTRA,
    Recipe,
    build_dataloaders,
)


def _fastai_valid_tensors(
    data: Path, spec: PreprocessSpec, radiograph_augmentation: bool = False
) -> tuple[list, torch.Tensor]:
    dataset = scan_dataset(data)
    cache = ImageCache(spec)
    recipe = Recipe(preprocessing=spec)
    if radiograph_augmentation:
        recipe.augmentation = dict(RADIOGRAPH_AUGMENTATION)
        recipe.extra_augmentation = dict(RADIOGRAPH_EXTRA)
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
        PreprocessSpec(intensity="percentile", trim_borders=True),
        PreprocessSpec(trim_borders=True),
        PreprocessSpec(detail_side=160),
        PreprocessSpec(trim_borders=True, detail_side=192),
    ],
    ids=["seed-crop", "percentile-pad", "small", "robust", "trim", "detail", "trim-detail"],
)
def test_serving_geometry_matches_fastai_validation(
    sample_data_dir: Path, spec: PreprocessSpec
) -> None:
    items, fastai_batch = _fastai_valid_tensors(sample_data_dir, spec)
    ours = torch.stack([prepare(item.path, spec).tensor for item in items])
    assert ours.shape == fastai_batch.shape == (len(items), 3, spec.size, spec.size)
    # Float rounding only: one 8-bit grey level is 1/255/0.225 = 0.017 in normalised units.
    assert float((ours - fastai_batch).abs().max()) < 1e-4


def test_radiograph_augmentations_never_reach_validation(sample_data_dir: Path) -> None:
    # Collimation and gamma are training-only: validation still equals the serving path.
    spec = PreprocessSpec()
    items, fastai_batch = _fastai_valid_tensors(sample_data_dir, spec, radiograph_augmentation=True)
    ours = torch.stack([prepare(item.path, spec).tensor for item in items])
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


def test_flat_borders_are_trimmed_and_anatomy_is_not(sample_data_dir: Path) -> None:
    from inference.preprocess import content_box

    path = next((sample_data_dir / "val" / "chest").glob("*.png"))
    grey = read_pixels(path)
    grey = grey if grey.ndim == 2 else grey.mean(axis=2)
    height, width = grey.shape
    inner = content_box(grey)
    framed = np.pad(grey, ((40, 60), (30, 50)), constant_values=0.95)
    framed += np.random.default_rng(1).normal(0, 0.005, framed.shape).astype(np.float32)
    left, top, right, bottom = content_box(framed)
    assert abs(left - (30 + inner[0])) <= 4 and abs(top - (40 + inner[1])) <= 4
    assert abs(right - (30 + inner[2])) <= 4 and abs(bottom - (40 + inner[3])) <= 4


def test_trimming_is_capped_and_never_empties_the_image() -> None:
    from inference.preprocess import MAX_TRIM, content_box

    flat = np.full((200, 300), 0.5, dtype=np.float32)
    left, top, right, bottom = content_box(flat)
    assert left <= 300 * MAX_TRIM and top <= 200 * MAX_TRIM
    assert (
        right - left >= 300 * (1 - 2 * MAX_TRIM) - 2
        and bottom - top >= 200 * (1 - 2 * MAX_TRIM) - 2
    )


def test_prepared_box_maps_back_to_the_trimmed_square() -> None:
    from pydicom.dataset import Dataset

    from training.stress import encode_dicom

    rng = np.random.default_rng(2)
    anatomy = rng.uniform(0.1, 0.9, (300, 200)).astype(np.float32)
    framed = np.pad(anatomy, ((50, 50), (100, 100)), constant_values=0.95)
    spec = PreprocessSpec(intensity="percentile", trim_borders=True)
    dataset: Dataset = encode_dicom(framed)
    prepared = prepare(dataset, spec)
    assert prepared.display.shape[:2] == framed.shape
    left, top, right, bottom = prepared.box
    # The 200-wide anatomy is the limiting side: a centred 200x200 square inside it.
    assert (left, right) == (100, 300) and (top, bottom) == (100, 300)


def test_detail_limit_gives_every_source_size_the_same_sharpness(sample_data_dir: Path) -> None:
    from inference.preprocess import limit_detail

    path = next((sample_data_dir / "val" / "chest").glob("*.png"))
    spec = PreprocessSpec(detail_side=160)
    rgb = to_uint8_rgb(read_pixels(path), spec)
    height, width = rgb.shape[:2]
    reduced = limit_detail(rgb, spec)
    assert min(reduced.shape[:2]) == 160
    assert abs(reduced.shape[1] / reduced.shape[0] - width / height) < 0.02
    # The same anatomy as a 4x larger radiograph (a 2000-pixel DICOM) and as the PNG reach
    # the network with the same detail: their model inputs agree to a few grey levels.
    big = np.asarray(Image.fromarray(rgb).resize((width * 4, height * 4), Image.Resampling.BICUBIC))
    assert min(limit_detail(big, spec).shape[:2]) == 160
    difference = (model_tensor(limit_detail(big, spec), spec) - model_tensor(reduced, spec)).abs()
    assert float(difference.mean()) < 0.02
    # Off, and images already below the limit, are untouched.
    assert limit_detail(rgb, PreprocessSpec()) is rgb
    small = np.ascontiguousarray(rgb[:100, :120])
    assert limit_detail(small, spec) is small


def test_detail_limit_keeps_the_heat_map_box_on_the_original(sample_data_dir: Path) -> None:
    path = next((sample_data_dir / "val" / "abd").glob("*.png"))
    plain = prepare(path, PreprocessSpec())
    limited = prepare(path, PreprocessSpec(detail_side=96))
    # Display stays at the original resolution; the box is the same square of it.
    assert limited.display.shape == plain.display.shape
    assert limited.box == plain.box


def test_detail_limit_below_the_minimum_side_is_refused() -> None:
    with pytest.raises(ValueError, match="detail_side 8"):
        PreprocessSpec(detail_side=8)
