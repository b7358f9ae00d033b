"""The model soup: members fine-tuned from one starting point, served as their weight average."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

import training.train as train
from inference.preprocess import PreprocessSpec
from training.data import ImageCache, scan_dataset


def test_average_weights_averages_floats_and_keeps_counters() -> None:
    first = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(7), "h": torch.tensor([2.0])}
    second = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9), "h": torch.tensor([4.0])}
    average = train.average_weights([first, second])
    assert torch.equal(average["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(average["h"], torch.tensor([3.0]))
    assert average["n"].item() == 7 and average["n"].dtype == first["n"].dtype
    half = train.average_weights([{"w": torch.tensor([1.0], dtype=torch.float16)}] * 2)
    assert half["w"].dtype == torch.float16  # each entry keeps its dtype


@pytest.mark.parametrize(
    ("other", "problem"),
    [
        ({"w": torch.zeros(2)}, "member 2 does not have the first member's layers"),
        ({"w": torch.zeros(3), "n": torch.tensor(1)}, "member 2 does not have"),
    ],
    ids=["missing-layer", "other-shape"],
)
def test_average_weights_refuses_members_of_another_model(
    other: dict[str, torch.Tensor], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        train.average_weights([{"w": torch.zeros(2), "n": torch.tensor(1)}, other])
    with pytest.raises(ValueError, match="no weights to average"):
        train.average_weights([])


def _recipe(**options: Any) -> train.Recipe:
    values: dict[str, Any] = dict(
        arch=None, size=224, preprocessing=None, augmentation=None, weights=None
    )
    values.update(epochs=None, lr=None, seed=42, **options)
    return train.choose_recipe(argparse.Namespace(**values))


def test_the_default_recipe_is_a_soup_and_the_card_says_so() -> None:
    default = _recipe()
    assert default.soup == train.DEFAULT_SOUP > 1
    assert default.to_json()["soup"] == train.DEFAULT_SOUP
    assert _recipe(soup=1).soup == 1
    assert _recipe(arch="resnet18").soup == 1  # from scratch: no shared starting point
    assert _recipe(arch="resnet18", soup=2).soup == 2


def test_default_members_crop_differently_and_the_card_says_so() -> None:
    default = _recipe()
    assert default.member_min_scales == train.MIXED_MIN_SCALES
    assert default.to_json()["member_min_scales"] == list(train.MIXED_MIN_SCALES)
    scales = [default.for_member(k).augmentation["min_scale"] for k in range(4)]
    assert scales == [0.5, 0.75, 0.75, 0.75]  # a fourth member keeps the last entry
    # Only the crop floor differs; the rest of the augmentation is the member's too.
    assert default.for_member(1).augmentation == train.SEED_AUGMENTATION
    assert default.for_member(0).augmentation == train.CROP_AUGMENTATION
    assert _recipe(augmentation="mixed") == default
    for single in ("crops", "seed", "radiograph"):
        recipe = _recipe(augmentation=single)
        assert recipe.member_min_scales == ()
        assert recipe.for_member(2) is recipe


def test_members_start_alike_train_apart_and_the_model_is_their_average(
    sample_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real one-epoch fine-tunes (64 px): same starting weights, different draws, and
    the Learner returned holds the element-wise mean of the two trained members."""
    spec = PreprocessSpec(size=64, resize=131)
    recipe = train.Recipe(
        arch="efficientnet_lite0",
        pretrained=True,
        weights=None,
        schedule="fine_tune",
        epochs=1,
        lr=5e-3,
        preprocessing=spec,
        soup=2,
        member_min_scales=(0.5, 0.75),
    )
    dataset = scan_dataset(sample_data_dir)
    cache = ImageCache(spec)
    starts: list[dict[str, torch.Tensor]] = []
    ends: list[dict[str, torch.Tensor]] = []
    original_fit = train.fit

    def recording_fit(learn: Any, fit_recipe: train.Recipe) -> None:
        starts.append({k: v.clone() for k, v in learn.model.state_dict().items()})
        original_fit(learn, fit_recipe)
        ends.append({k: v.clone() for k, v in learn.model.state_dict().items()})

    monkeypatch.setattr(train, "fit", recording_fit)
    history = train._history_callback()
    crops: list[float] = []

    def loaders(member_recipe: train.Recipe) -> Any:
        crops.append(member_recipe.augmentation["min_scale"])
        return train.build_dataloaders(
            dataset.split("train"), dataset.split("val"), dataset.classes, cache, member_recipe
        )

    learn = train.fit_soup(loaders, recipe, history)
    assert crops == [0.5, 0.75]  # each member's loaders carry its own crops
    assert len(starts) == len(ends) == 2
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])
    head = [k for k in ends[0] if k.startswith("1.") and ends[0][k].is_floating_point()]
    assert head and any(not torch.equal(ends[0][k], ends[1][k]) for k in head)
    served = learn.model.state_dict()
    for key, value in served.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (ends[0][key] + ends[1][key]) / 2)
    # Two epochs per member (fine_tune's frozen one first), each row names its member.
    assert [(row["member"], row["epoch"]) for row in history.rows] == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
