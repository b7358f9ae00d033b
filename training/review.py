"""Where the model looks: Grad-CAM review sheets and a border-attention figure.

A classifier that learned "bright frame means abdomen" can score 100% on the sample
split. Two outputs of `radgate train` make that visible:

- `gradcam_review.png` (and `gradcam_external.png` with `--external`): a sheet of Grad-CAM
  overlays, one per image, titled with the true label, the prediction and its probability,
  wrong ones in red. A person looks at it and sees whether the heat sits on lungs,
  mediastinum, spine and bowel, or on borders, text and markers.
- `border_attention`: each validation/test image framed with the stress set's collimator
  border (training/stress.py); the share of the Grad-CAM mass that falls on that border.
  The border covers about a third of the framed image, so a model that ignored anatomy
  would put about that share there; one that looks at anatomy puts little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data import LabelledImage

SHEET_COLUMNS = 6


def _maps_for(model_dir: Path, sources: Sequence[Any]) -> list[tuple[Any, Any, Any]]:
    """(prepared, heat map on the original grid, prediction) per source, Grad-CAM at -1."""
    from inference.classifier import Classifier
    from inference.commands import predict_with_gradcam
    from inference.gradcam import upsample_to
    from inference.preprocess import prepare

    classifier = Classifier.from_dir(model_dir, device="cpu")
    spec = classifier.loaded.card.preprocessing
    results: list[tuple[Any, Any, Any]] = []
    for start in range(0, len(sources), 16):
        prepared = [prepare(source, spec) for source in sources[start : start + 16]]
        maps, predictions = predict_with_gradcam(classifier, [p.tensor for p in prepared])
        for item, heat, prediction in zip(prepared, maps.heatmaps, predictions, strict=True):
            height, width = item.display.shape[:2]
            results.append((item, upsample_to(heat, item.box, (width, height)), prediction))
    return results


def gradcam_sheet(model_dir: Path, items: Sequence[LabelledImage], path: Path, title: str) -> Path:
    """One Grad-CAM overlay per image in a grid, saved as a PNG."""
    import matplotlib.pyplot as plt

    results = _maps_for(model_dir, [item.path for item in items])
    rows = max(1, math.ceil(len(items) / SHEET_COLUMNS))
    figure, axes = plt.subplots(
        rows, SHEET_COLUMNS, figsize=(2.2 * SHEET_COLUMNS, 2.5 * rows), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, item, (prepared, heat, prediction) in zip(axes.flat, items, results, strict=False):
        axis.imshow(prepared.display, cmap="gray")
        axis.imshow(heat, cmap="magma", alpha=0.5, vmin=0.0, vmax=1.0)
        wrong = prediction.label != item.label
        axis.set_title(
            f"{item.path.name[:18]}\n{item.label} -> {prediction.label} {prediction.probability:.2f}",
            fontsize=7,
            color="red" if wrong else "black",
        )
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def border_attention(model_dir: Path, items: Sequence[LabelledImage]) -> dict[str, Any]:
    """Share of Grad-CAM mass on an added collimator border, per image and summarised."""
    from inference.preprocess import read_pixels
    from training.stress import _collimated, _grey, border_pads, encode_dicom

    originals = [_grey(read_pixels(item.path)) for item in items]
    results = _maps_for(model_dir, [encode_dicom(_collimated(image)) for image in originals])
    rows = []
    for item, original, (_, heat, prediction) in zip(items, originals, results, strict=True):
        pad_y, pad_x = border_pads(*original.shape)
        inside = np.zeros_like(heat, dtype=bool)
        inside[pad_y : pad_y + original.shape[0], pad_x : pad_x + original.shape[1]] = True
        total = float(heat.sum())
        share = float(heat[~inside].sum()) / total if total > 0 else 0.0
        rows.append(
            {
                "file": str(item.path),
                "prediction": prediction.label,
                "border_share": round(share, 4),
                "border_area": round(float((~inside).mean()), 4),
            }
        )
    shares = [row["border_share"] for row in rows]
    return {
        "rows": rows,
        "mean_border_share": round(float(np.mean(shares)), 4) if shares else None,
        "max_border_share": round(float(np.max(shares)), 4) if shares else None,
        "border_area": rows[0]["border_area"] if rows else None,
    }
