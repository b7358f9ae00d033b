"""The validity gate: is this instance valid input for the chest/abdomen model?

Metadata first (cheap, from the header): Modality, BodyPartExamined. Then the pixels must
decode into valid model input (`inference.preprocess`'s typed errors). Every rejection
keeps its reasons, in words an auditor can read (`modality CT not in [CR, DX]`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from gateway.config import GateConfig
from inference.errors import InvalidInput

# BodyPartExamined values that name one of the model's classes.
BODY_PART_LABELS = {"CHEST": "chest", "ABDOMEN": "abd"}


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    prepared: Any = None  # the model input, when the pixels were decoded


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None


def metadata_reasons(ds: Dataset, gate: GateConfig) -> list[str]:
    """Reasons the header alone makes this instance invalid model input."""
    reasons = []
    modality = _text(ds, "Modality")
    allowed = ", ".join(gate.modalities)
    if modality is None:
        reasons.append(f"modality missing (expected one of [{allowed}])")
    elif modality not in gate.modalities:
        reasons.append(f"modality {modality} not in [{allowed}]")
    body_part = _text(ds, "BodyPartExamined")
    if body_part is None:
        if not gate.allow_missing_body_part:
            reasons.append("body part missing")
    elif body_part not in gate.body_parts:
        reasons.append(f"body part {body_part} not allowed")
    frames = ds.get("NumberOfFrames")
    try:
        if frames is not None and int(frames) > 1:
            reasons.append("multi-frame")
    except (TypeError, ValueError):
        reasons.append(f"NumberOfFrames {frames!r} not a number")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        reasons.append("no pixel data")
    return reasons


def evaluate(ds: Dataset, gate: GateConfig, prepare: Callable[[Dataset], Any]) -> GateResult:
    """Metadata checks, then decode with `prepare` (only if the metadata passed)."""
    reasons = metadata_reasons(ds, gate)
    if reasons:
        return GateResult(False, tuple(reasons))
    try:
        prepared = prepare(ds)
    except InvalidInput as error:
        return GateResult(False, (error.reason,))
    return GateResult(True, (), prepared)


def body_part_mismatch(ds: Dataset, label: str) -> bool:
    """True when BodyPartExamined names the other class than the model predicted."""
    expected = BODY_PART_LABELS.get(_text(ds, "BodyPartExamined") or "")
    return expected is not None and expected != label
