"""Batched prediction on CPU or CUDA under `torch.inference_mode`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference.artifact import LoadedModel, load_model


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    model_id: str
    inference_ms: float  # this image's share of its batch's forward pass
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def probability(self) -> float:
        return self.probabilities[self.label]


class Classifier:
    """One loaded model, reused for every batch."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 16) -> None:
        self.loaded = loaded
        self.batch_size = max(1, batch_size)

    @classmethod
    def from_dir(
        cls, model_dir: Path, device: str = "auto", batch_size: int = 16, threads: int = 0
    ) -> Classifier:
        return cls(load_model(model_dir, device=device, threads=threads), batch_size=batch_size)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.loaded.card.classes

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    def probabilities(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Softmax probabilities (N, classes) on the CPU, in input order."""
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(tensors), self.batch_size):
                batch = torch.stack(list(tensors[start : start + self.batch_size]))
                logits = self.loaded.model(batch.to(self.device, non_blocking=True))
                chunks.append(torch.softmax(logits.float(), dim=1).cpu())
        if not chunks:
            return torch.empty(0, len(self.classes))
        return torch.cat(chunks)

    def predict(self, tensors: Sequence[torch.Tensor]) -> list[Prediction]:
        started = time.perf_counter()
        probabilities = self.probabilities(tensors)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        per_image_ms = (time.perf_counter() - started) * 1000 / max(len(tensors), 1)
        predictions = []
        for row in probabilities.tolist():
            by_class = {name: float(p) for name, p in zip(self.classes, row, strict=True)}
            label = max(by_class, key=lambda name: by_class[name])
            predictions.append(
                Prediction(
                    label=label,
                    probabilities=by_class,
                    model_id=self.loaded.model_id,
                    inference_ms=per_image_ms,
                )
            )
        return predictions
