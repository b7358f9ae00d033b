"""Training-only augmentations for what real radiographs bring and the sample PNGs do not.

The sample images are 8-bit, already windowed, tightly cropped web images. Films from
other hospitals arrive with unexposed collimator borders, other gamma and contrast, and
other fields of view. These transforms show the network such images during training so
that it learns anatomy instead of the photometry and framing of one source. They run on
the training split only (`split_idx = 0`): validation and serving keep the one shared
preprocessing path of `inference.preprocess`, so the parity test still holds.

- `RandomCollimation` (item transform, before `Resize`): frames the image with a flat
  border of random width on each side, bright like an unexposed collimator (with
  quantum noise) or dark like a letterbox.
- `RandomGamma` (batch transform, after fastai's lighting and before `Normalize`): a
  per-image gamma drawn log-uniformly, so both darker and brighter renderings appear.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from fastai.vision.all import PILImage, RandTransform, TensorImage, Transform


class RandomCollimation(RandTransform):  # type: ignore[misc]
    """Pad with a collimator-like border: each side 0..`max_fraction` of the image size."""

    split_idx = 0  # training only
    order = 0  # before Resize (order 1)

    def __init__(self, p: float = 0.5, max_fraction: float = 0.15) -> None:
        super().__init__(p=p)
        self.max_fraction = max_fraction
        self.rng = np.random.default_rng()

    def before_call(self, b: Any, split_idx: int) -> None:
        super().before_call(b, split_idx)
        # Reseeded from torch so `seed_everything` makes the whole run reproducible.
        self.rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))

    def encodes(self, image: PILImage) -> PILImage:
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        height, width = pixels.shape[:2]
        top, bottom = (int(height * self.rng.uniform(0, self.max_fraction)) for _ in range(2))
        left, right = (int(width * self.rng.uniform(0, self.max_fraction)) for _ in range(2))
        bright = self.rng.random() < 0.7  # unexposed collimation is bright on MONOCHROME2
        level = self.rng.uniform(0.8, 1.0) if bright else self.rng.uniform(0.0, 0.1)
        shape = (height + top + bottom, width + left + right, *pixels.shape[2:])
        framed = np.clip(level + self.rng.normal(0.0, 0.015, shape[:2]), 0.0, 1.0)
        if pixels.ndim == 3:
            framed = np.repeat(framed[..., None], pixels.shape[2], axis=2)
        framed = framed.astype(np.float32)
        framed[top : top + height, left : left + width] = pixels
        return PILImage.create((framed * 255.0 + 0.5).astype(np.uint8))


class RandomGamma(Transform):  # type: ignore[misc]
    """Per-image gamma in [1/`max_gamma`, `max_gamma`] (log-uniform), with probability `p`."""

    split_idx = 0
    order = 45  # after fastai's lighting (40), before Normalize (99)

    def __init__(self, p: float = 0.5, max_gamma: float = 1.6) -> None:
        super().__init__()
        self.p = p
        self.log_gamma = math.log(max_gamma)

    def encodes(self, batch: TensorImage) -> TensorImage:
        count = batch.shape[0]
        log_gamma = (torch.rand(count, device=batch.device) * 2 - 1) * self.log_gamma
        applied = torch.rand(count, device=batch.device) < self.p
        gamma = torch.where(applied, log_gamma.exp(), torch.ones_like(log_gamma))
        return batch.clamp(1e-6, 1.0).pow(gamma.view(count, 1, 1, 1))
