"""The labelled image folders and the fastai DataLoaders built on them.

Layout: DATA/{train,val,test}/{abd,chest}/*.png (JPEG and DICOM files work too).
Every image is decoded once up front with the serving path's `read_pixels` +
`to_uint8_rgb`, so training starts from the very image inference starts from, and a
corrupt file is reported (and skipped) before any training time is spent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.errors import InvalidInput, RadgateError
from inference.preprocess import PreprocessSpec, is_dicom_file, read_pixels, training_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff", ".bmp"}


class DataError(RadgateError):
    """A data folder that cannot be trained on; names the path and the problem."""


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str
    split: str


@dataclass
class Dataset:
    root: Path
    classes: tuple[str, ...]
    items: list[LabelledImage]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def split(self, name: str) -> list[LabelledImage]:
        return [item for item in self.items if item.split == name]


def _is_image(path: Path) -> bool:
    return path.is_file() and (
        path.suffix.lower() in IMAGE_SUFFIXES or (path.suffix == "" and is_dicom_file(path))
    )


def scan_dataset(
    root: Path, splits: Sequence[str] = SPLITS, required: Sequence[str] = ("train", "val")
) -> Dataset:
    """Check the folder layout and list the labelled images. Raises `DataError`."""
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    for split in required:
        if not (root / split).is_dir():
            raise DataError(f"{root / split}: missing split folder (expected train/, val/, test/)")
    classes = sorted(
        {child.name for split in required for child in (root / split).iterdir() if child.is_dir()}
    )
    if len(classes) < 2:
        raise DataError(f"{root / required[0]}: need at least two class folders, found {classes}")
    items: list[LabelledImage] = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for label in classes:
            class_dir = split_dir / label
            if not class_dir.is_dir():
                if split in required:
                    raise DataError(f"{class_dir}: missing class folder")
                continue
            files = sorted(path for path in class_dir.iterdir() if _is_image(path))
            if not files and split in required:
                raise DataError(f"{class_dir}: class folder has no images")
            items += [LabelledImage(path, label, split) for path in files]
    return Dataset(root=root, classes=tuple(classes), items=items)


def scan_flat(root: Path, classes: Sequence[str]) -> list[LabelledImage]:
    """An evaluation folder laid out as ROOT/<class>/*: every image labelled by its folder."""
    if not root.is_dir():
        raise DataError(f"{root}: evaluation folder does not exist")
    items = []
    for label in classes:
        class_dir = root / label
        if class_dir.is_dir():
            items += [
                LabelledImage(path, label, "external")
                for path in sorted(class_dir.iterdir())
                if _is_image(path)
            ]
    if not items:
        raise DataError(f"{root}: no images in class folders {list(classes)}")
    return items


class ImageCache:
    """Decoded 8-bit RGB images by path: each file is read once per process."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self._images: dict[Path, np.ndarray] = {}

    def load(self, path: Path) -> np.ndarray:
        if path not in self._images:
            self._images[path] = training_image(read_pixels(path), self.spec)
        return self._images[path]

    def check(self, dataset: Dataset) -> Dataset:
        """Decode every image; drop (and list) the ones that are not readable images."""
        kept, skipped = [], list(dataset.skipped)
        for item in dataset.items:
            try:
                self.load(item.path)
                kept.append(item)
            except InvalidInput as error:
                skipped.append((item.path, str(error)))
        for path, reason in skipped:
            log.warning("skipping %s: %s", path, reason)
        if skipped:
            print(f"warning: skipped {len(skipped)} unreadable file(s):")
            for path, reason in skipped:
                print(f"  {path}: {reason}")
        checked = Dataset(dataset.root, dataset.classes, kept, skipped)
        for split in ("train", "val"):
            for label in dataset.classes:
                if dataset.split(split) and not any(
                    item.label == label for item in checked.split(split)
                ):
                    raise DataError(f"{dataset.root / split / label}: no readable images left")
        return checked
