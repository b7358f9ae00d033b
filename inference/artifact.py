"""A model directory: `model.json` (the card) + `weights.safetensors`.

The serving path never unpickles anything: the architecture is rebuilt from the card
and the weights are read with safetensors after their sha256 matches the card's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.architectures import ARCHITECTURES, build_model
from inference.errors import RadgateError
from inference.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
CARD_VERSION = 1


class ModelLoadError(RadgateError):
    """A model directory that cannot be served; the message names the file and the problem."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    arch: str
    classes: tuple[str, ...]
    preprocessing: PreprocessSpec
    weights_file: str
    sha256: str
    raw: dict[str, Any]

    @property
    def input_size(self) -> int:
        return self.preprocessing.size

    @property
    def model_id(self) -> str:
        """Short, stable identity: architecture + the first 12 hex of the weights' hash."""
        return f"{self.raw.get('name', 'chest-abd')}-{self.arch}-{self.sha256[:12]}"

    @classmethod
    def read(cls, model_dir: Path) -> ModelCard:
        card_path = model_dir / CARD_FILE
        if not model_dir.is_dir():
            raise ModelLoadError(f"{model_dir}: model directory does not exist")
        if not card_path.is_file():
            raise ModelLoadError(f"{card_path}: model card missing (train a model first)")
        try:
            raw = json.loads(card_path.read_text())
            arch = raw["arch"]
            classes = tuple(raw["classes"])
            spec = PreprocessSpec.from_json(raw["preprocessing"])
            weights_file = raw["weights_file"]
            sha256 = raw["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ModelLoadError(f"{card_path}: invalid model card ({error!r})") from error
        if arch not in ARCHITECTURES:
            raise ModelLoadError(f"{card_path}: unknown arch {arch!r}")
        if Path(weights_file).name != weights_file:
            raise ModelLoadError(f"{card_path}: weights_file must be a plain file name")
        return cls(arch, classes, spec, weights_file, sha256, raw)


def save_model(model: nn.Module, model_dir: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write weights (safetensors) and the card with the weights' sha256; returns the card."""
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    weights_path = model_dir / WEIGHTS_FILE
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    save_file(state, str(weights_path))
    card = dict(card)
    card["card_version"] = CARD_VERSION
    card["weights_file"] = WEIGHTS_FILE
    card["sha256"] = sha256_file(weights_path)
    (model_dir / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return card


def resolve_device(requested: str) -> torch.device:
    """`auto` (CUDA when available), `cpu` or `cuda`; a missing GPU is a clear error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {requested!r} requested but CUDA is not available here")
        return torch.device(requested)
    raise ModelLoadError(f"device {requested!r} not one of auto, cpu, cuda")


@dataclass
class LoadedModel:
    card: ModelCard
    model: nn.Sequential
    device: torch.device

    @property
    def model_id(self) -> str:
        return self.card.model_id


def load_model(model_dir: Path, device: str = "auto", threads: int = 0) -> LoadedModel:
    """Rebuild the network from the card, verify and load the weights, move to `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card = ModelCard.read(model_dir)
    weights_path = model_dir / card.weights_file
    if not weights_path.is_file():
        raise ModelLoadError(f"{weights_path}: weights file missing")
    actual = sha256_file(weights_path)
    if actual != card.sha256:
        raise ModelLoadError(
            f"{weights_path}: sha256 {actual} does not match the model card's {card.sha256}; "
            "refusing to load weights that are not the ones the card describes"
        )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"{weights_path}: not a safetensors file ({error})") from error
    model = build_model(card.arch, len(card.classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise ModelLoadError(
            f"{weights_path}: weights do not fit {card.arch} ({first_line})"
        ) from error
    if threads > 0:
        torch.set_num_threads(threads)
    target = resolve_device(device)
    model.to(target).eval()
    log.info("loaded model %s on %s", card.model_id, target)
    return LoadedModel(card=card, model=model, device=target)
