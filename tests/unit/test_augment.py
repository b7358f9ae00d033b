"""Training-only radiograph augmentations: what they do, and that validation never sees them."""

from __future__ import annotations

import numpy as np
import torch
from fastai.vision.all import PILImage, TensorImage

from training.augment import RandomCollimation, RandomGamma


def _image(height: int = 120, width: int = 100) -> PILImage:
    rng = np.random.default_rng(3)
    pixels = rng.integers(60, 200, (height, width, 3), dtype=np.uint8)
    return PILImage.create(pixels)


def test_collimation_frames_the_image_and_keeps_it_intact() -> None:
    torch.manual_seed(0)
    image = _image()
    original = np.asarray(image)
    transform = RandomCollimation(p=1.0, max_fraction=0.15)
    framed_sizes = set()
    for _ in range(10):
        framed = np.asarray(transform(image, split_idx=0))
        height, width = framed.shape[:2]
        assert 120 <= height <= 120 + 2 * 18 and 100 <= width <= 100 + 2 * 15
        framed_sizes.add((height, width))
        # The original pixels appear unchanged somewhere in the framed image.
        found = False
        for top in range(height - 120 + 1):
            for left in range(width - 100 + 1):
                if framed[top, left, 0] == original[0, 0, 0] and np.array_equal(
                    framed[top : top + 120, left : left + 100], original
                ):
                    found = True
                    break
            if found:
                break
        assert found
    assert len(framed_sizes) > 1  # random widths, not one fixed frame


def test_collimation_is_training_only() -> None:
    image = _image()
    transform = RandomCollimation(p=1.0)
    assert np.array_equal(np.asarray(transform(image, split_idx=1)), np.asarray(image))


def test_collimation_is_reproducible_under_the_torch_seed() -> None:
    image = _image()
    transform = RandomCollimation(p=1.0)
    torch.manual_seed(7)
    first = np.asarray(transform(image, split_idx=0))
    torch.manual_seed(7)
    second = np.asarray(transform(image, split_idx=0))
    assert np.array_equal(first, second)


def test_gamma_changes_contrast_per_image_within_range() -> None:
    torch.manual_seed(0)
    batch = TensorImage(torch.linspace(0.05, 0.95, 8 * 3 * 4 * 4).reshape(8, 3, 4, 4))
    out = RandomGamma(p=1.0, max_gamma=1.6)(batch, split_idx=0)
    assert out.shape == batch.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Gamma keeps the order of grey levels within an image, and changes each image.
    assert torch.all(out.flatten(1).diff(dim=1) > 0)
    assert torch.all((out - batch).flatten(1).abs().amax(dim=1) > 1e-4)
    gammas = torch.log(out[:, 0, 0, 1]) / torch.log(batch[:, 0, 0, 1])
    assert float(gammas.min()) >= 1 / 1.6 - 1e-4 and float(gammas.max()) <= 1.6 + 1e-4


def test_gamma_is_identity_off_training_or_at_p0() -> None:
    batch = TensorImage(torch.rand(4, 3, 8, 8))
    assert torch.equal(RandomGamma(p=1.0)(batch, split_idx=1), batch)
    assert torch.allclose(RandomGamma(p=0.0)(batch, split_idx=0), batch.clamp(1e-6, 1.0))


def test_recipe_options_choose_preprocessing_and_augmentation() -> None:
    import argparse

    from training.train import (
        CROP_AUGMENTATION,
        DEFAULT_DETAIL_SIDE,
        RADIOGRAPH_EXTRA,
        SEED_AUGMENTATION,
        Recipe,
        choose_recipe,
    )

    def recipe(**options: object) -> Recipe:
        values = dict(arch=None, size=224, preprocessing=None, augmentation=None, weights=None)
        values.update(epochs=None, lr=None, seed=42, **options)
        return choose_recipe(argparse.Namespace(**values))

    default = recipe()
    assert default.augmentation == CROP_AUGMENTATION and default.extra_augmentation == {}
    assert CROP_AUGMENTATION["min_scale"] < SEED_AUGMENTATION["min_scale"]
    assert {k: v for k, v in CROP_AUGMENTATION.items() if k != "min_scale"} == {
        k: v for k, v in SEED_AUGMENTATION.items() if k != "min_scale"
    }
    assert recipe(augmentation="crops").augmentation == CROP_AUGMENTATION
    seed = recipe(augmentation="seed")
    assert seed.augmentation == SEED_AUGMENTATION and seed.extra_augmentation == {}
    assert seed.to_json()["augmentation"]["min_scale"] == 0.75  # recorded in the card
    assert not default.preprocessing.trim_borders and default.preprocessing.intensity == "none"
    assert default.preprocessing.detail_side == DEFAULT_DETAIL_SIDE
    assert recipe(detail_side=0).preprocessing.detail_side == 0
    assert recipe(detail_side=96, preprocessing="trim").preprocessing.detail_side == 96
    assert recipe(detail_side=96).to_json()["preprocessing"]["detail_side"] == 96  # in the card
    trimmed = recipe(preprocessing="trim")
    assert trimmed.preprocessing.trim_borders and trimmed.preprocessing.intensity == "none"
    robust = recipe(preprocessing="robust")
    assert robust.preprocessing.trim_borders and robust.preprocessing.intensity == "percentile"
    radiograph = recipe(augmentation="radiograph")
    assert radiograph.extra_augmentation == RADIOGRAPH_EXTRA
    assert radiograph.augmentation["min_scale"] < SEED_AUGMENTATION["min_scale"]
    assert radiograph.to_json()["extra_augmentation"] == RADIOGRAPH_EXTRA  # recorded in the card
