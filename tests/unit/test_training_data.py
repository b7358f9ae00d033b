"""Data folder checks: every bad layout gets an error that names the path and the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from inference.preprocess import PreprocessSpec
from training.data import DataError, ImageCache, scan_dataset, scan_flat


def _image(path: Path, size: tuple[int, int] = (64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path)


def _layout(root: Path) -> Path:
    for split in ("train", "val", "test"):
        for label in ("abd", "chest"):
            _image(root / split / label / f"{label}0.png")
    return root


def test_good_layout_lists_classes_and_splits(tmp_path: Path) -> None:
    dataset = scan_dataset(_layout(tmp_path / "data"))
    assert dataset.classes == ("abd", "chest")
    assert {item.split for item in dataset.items} == {"train", "val", "test"}
    assert len(dataset.split("train")) == 2


def test_sample_data_layout(sample_data_dir: Path) -> None:
    dataset = scan_dataset(sample_data_dir)
    assert dataset.classes == ("abd", "chest")
    assert [len(dataset.split(s)) for s in ("train", "val", "test")] == [65, 10, 2]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: data folder does not exist"):
        scan_dataset(tmp_path / "nope")


def test_missing_split(tmp_path: Path) -> None:
    root = _layout(tmp_path / "data")
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="val: missing split folder"):
        scan_dataset(root)


def test_empty_class_folder(tmp_path: Path) -> None:
    root = _layout(tmp_path / "data")
    (root / "train" / "chest" / "chest0.png").unlink()
    with pytest.raises(DataError, match="chest: class folder has no images"):
        scan_dataset(root)


def test_single_class(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        _image(root / split / "abd" / "a.png")
    with pytest.raises(DataError, match="need at least two class folders"):
        scan_dataset(root)


def test_corrupt_files_are_skipped_and_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _layout(tmp_path / "data")
    _image(root / "train" / "abd" / "abd1.png")
    (root / "train" / "abd" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "train" / "chest" / "tiny.png").parent.mkdir(exist_ok=True)
    _image(root / "train" / "chest" / "tiny.png", size=(8, 8))
    dataset = ImageCache(PreprocessSpec()).check(scan_dataset(root))
    skipped = {path.name: reason for path, reason in dataset.skipped}
    assert set(skipped) == {"broken.png", "tiny.png"}
    assert "does not decode" in skipped["broken.png"]
    assert "smaller than 32x32" in skipped["tiny.png"]
    printed = capsys.readouterr().out
    assert "skipped 2 unreadable file(s)" in printed and "broken.png" in printed


def test_a_class_with_only_corrupt_files_is_an_error(tmp_path: Path) -> None:
    root = _layout(tmp_path / "data")
    (root / "val" / "chest" / "chest0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="val/chest: no readable images left"):
        ImageCache(PreprocessSpec()).check(scan_dataset(root))


def test_external_set(external_data_dir: Path) -> None:
    items = scan_flat(external_data_dir, ("abd", "chest"))
    assert {item.label for item in items} == {"abd", "chest"}
    assert len(items) == 33
