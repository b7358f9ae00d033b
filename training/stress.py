"""A stress set made from the sample images: the same anatomy as real DICOM would bring it.

Each validation/test image is re-encoded as the odd-but-ordinary radiographs a gateway
receives (12-bit with rescale, MONOCHROME1, 2000+ pixels, collimation borders, other
gamma and contrast, a slight rotation) and scored through the serving path, DICOM decode
included. A robust model gives every variant the label of the plain image, and the
probability of the true class moves by little.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from inference.preprocess import read_pixels
from training.data import LabelledImage

MAX_PROBABILITY_SHIFT = 0.05
BORDER_FRACTION = 0.12  # collimator border width, per side, as a fraction of the image


def border_pads(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of collimator border `_collimated` adds on each side."""
    return int(height * BORDER_FRACTION), int(width * BORDER_FRACTION)


def _grey(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 2 else pixels.mean(axis=2)


def _resize(grey: np.ndarray, width: int, height: int) -> np.ndarray:
    image = Image.fromarray(grey.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def encode_dicom(
    grey: np.ndarray,
    *,
    bits_stored: int = 12,
    monochrome1: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> Dataset:
    """A minimal single-frame greyscale image dataset, 16 bits allocated, in memory."""
    maximum = (1 << bits_stored) - 1
    values = np.clip(grey, 0.0, 1.0)
    if monochrome1:
        values = 1.0 - values
    stored = np.round(values * maximum).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    ds.PixelData = stored.tobytes()
    return ds


def _collimated(grey: np.ndarray) -> np.ndarray:
    """Unexposed collimator borders (bright, with quantum noise) around the field, 12% a side."""
    height, width = grey.shape
    pad_y, pad_x = border_pads(height, width)
    noise = np.random.default_rng(0).normal(0.0, 0.01, (height + 2 * pad_y, width + 2 * pad_x))
    framed = (0.93 + noise).astype(np.float32)
    framed[pad_y : pad_y + height, pad_x : pad_x + width] = grey
    return framed


def _rotated(grey: np.ndarray, degrees: float) -> np.ndarray:
    image = Image.fromarray(grey.astype(np.float32), mode="F")
    return np.asarray(image.rotate(degrees, resample=Image.Resampling.BILINEAR), dtype=np.float32)


def _upscaled(grey: np.ndarray) -> np.ndarray:
    height, width = grey.shape
    scale = 2048 / max(height, width)
    return _resize(grey, round(width * scale), round(height * scale))


VARIANTS: dict[str, Callable[[np.ndarray], Dataset]] = {
    "dicom12_rescale": lambda g: encode_dicom(g, slope=0.5, intercept=-1024),
    "monochrome1": lambda g: encode_dicom(g, monochrome1=True),
    "upscaled_2048": lambda g: encode_dicom(_upscaled(g), bits_stored=14),
    "collimation_border": lambda g: encode_dicom(_collimated(g)),
    "gamma_0.7": lambda g: encode_dicom(np.power(g, 0.7)),
    "gamma_1.4": lambda g: encode_dicom(np.power(g, 1.4)),
    "low_contrast": lambda g: encode_dicom(g * 0.6 + 0.2),
    "rotated_7": lambda g: encode_dicom(_rotated(g, 7.0)),
}


def stress_evaluation(model_dir: Path, items: Sequence[LabelledImage]) -> dict[str, Any]:
    """Score every variant of every image against its plain version; rows + summary."""
    from inference.classifier import Classifier
    from inference.preprocess import prepare

    classifier = Classifier.from_dir(model_dir, device="cpu")
    spec = classifier.loaded.card.preprocessing
    rows: list[dict[str, Any]] = []
    for item in items:
        grey = _grey(read_pixels(item.path))
        plain = classifier.predict([prepare(item.path, spec).tensor])[0]
        names = list(VARIANTS)
        tensors = [prepare(VARIANTS[name](grey), spec).tensor for name in names]
        for name, prediction in zip(names, classifier.predict(tensors), strict=True):
            shift = prediction.probabilities[item.label] - plain.probabilities[item.label]
            rows.append(
                {
                    "file": str(item.path),
                    "variant": name,
                    "label": item.label,
                    "plain_prediction": plain.label,
                    "prediction": prediction.label,
                    "probability": round(prediction.probability, 6),
                    "true_class_shift": round(shift, 6),
                    "label_changed": prediction.label != plain.label,
                    "correct": prediction.label == item.label,
                }
            )
    changed = sum(r["label_changed"] for r in rows)
    worst = max((abs(r["true_class_shift"]) for r in rows), default=0.0)
    return {
        "rows": rows,
        "summary": {
            "variants": len(rows),
            "label_changes": changed,
            "max_true_class_shift": round(worst, 6),
            "within_target": changed == 0 and worst < MAX_PROBABILITY_SHIFT,
            "by_variant": {
                name: {
                    "label_changes": sum(r["label_changed"] for r in rows if r["variant"] == name),
                    "max_true_class_shift": round(
                        max(abs(r["true_class_shift"]) for r in rows if r["variant"] == name), 6
                    ),
                }
                for name in VARIANTS
                if any(r["variant"] == name for r in rows)
            },
        },
    }
